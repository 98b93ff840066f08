"""The audit trail writer: one JSON object a line, hash-chained, written before the reply is sent.

On the request path, so it is built for a few microseconds a record: the line is assembled by hand
(fields.request_fragment, the C string quoter), hashed with sha256 and handed to the kernel with a
single os.write on an O_APPEND fd. No rich, no threads, no buffering in user space: when request()
returns, the record is in the kernel and survives the process being killed.

The chain: every line carries ``prev``, the sha256 of the previous line's bytes (without its newline);
the first line of a trail has 64 zeros. Resuming an existing file continues seq and prev from its last
line, and reopening (logrotate) continues them into the new file, so ``gateway audit --verify`` can
walk a trail across any number of files.

The writer keeps an O_PATH fd on the log's directory and reopens the file relative to it: after the
sandbox's chroot, an absolute path would name a file inside the guest's export. The directory and the
file are opened without following a symlink at either (a planted link would redirect the trail, or
create a root-owned file wherever it points); on the way to the directory, only symlinks owned by root
(or by this process's user) are followed, since only they can have made them.

Failing closed. A request is performed only if its record can be written:

- :meth:`reserve` is called before a request is performed. It makes sure the space the request's record
  will take (a bound computed from the request and the texts the server adds), plus LIFECYCLE_ROOM for
  the records that end a session, is already allocated past the end of the file, with
  fallocate(FALLOC_FL_KEEP_SIZE): the file's size does not change and readers see nothing, but the
  blocks are the file's, so the record's write cannot fail for lack of space. Each top-up takes
  RESERVE_AHEAD more, so the fallocate call is made once every few hundred records. When the room cannot
  be had, reserve() raises TrailFull and the server answers EIO without performing the request (the
  guest's own file system is not full: EIO, "the gateway cannot serve this", not ENOSPC).
- A write is never started that the reserved room does not cover: a record that does not fit is not
  written at all, so the file always ends with a whole line and the chain stays verifiable.
- After the first record that could not be written (or synced), the writer is *failed*: it writes
  nothing more, and every later reserve() and request() raises TrailFailed, so every later request is
  refused without being performed. The latch holds until the gateway restarts (a restart resumes the
  trail where its last whole line left it).
- Lifecycle records (start, policy-reload, stop, ...) never raise for an I/O failure: lifecycle() logs
  the failure, latches and returns False.
- On a file system without fallocate (or a trail that is not a regular file: a FIFO, a device), room
  cannot be reserved. The writer says so in the first record's audit_notes and falls back to latching on
  the first failed write: then the one request whose record failed was performed without a record
  (its reply is EIO), and every later one is refused. On copy-on-write file systems (btrfs with
  snapshots, ZFS) an allocation is not a promise that an overwrite finds space; there too the latch is
  the last line of defence.

What a crash leaves behind, step by step (a request's walk: reserve, perform, record, reply):

- during or after reserve(), before performing: nothing was done, nothing recorded, nothing replied.
  The allocated room stays with the file, invisible past its end, and is used again after a restart.
- after performing, before the record's write(): the request's effect is on disk and its record is not.
  This one window is not closed (an intent record before every request would double the trail's cost);
  the guest got no reply, so it cannot have acted on the result.
- during the record's write(): a record is one write() of a whole line into allocated space, so a killed
  process leaves all of it or none; a power cut can leave a torn last line, which the next start
  terminates and names (``torn``), and with --audit-sync every the record was on disk before the reply.
- after the record, before the reply: the trail says the request was done; the guest never heard.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import stat
import sys
import time
from json.encoder import encode_basestring_ascii as quote  # type: ignore[attr-defined]
from typing import Any

from gateway.audit.fields import FIELD_ORDER, FIELD_SPECS, request_fragment, text
from gateway.audit.seal import SealKey
from gateway.audit.syslog import DEFAULT_ADDRESS, SyslogSink
from gateway.logfmt import kv

log = logging.getLogger("gateway.audit")

ZERO_HASH = "0" * 64
_write = os.write
_sha256 = hashlib.sha256
DEFAULT_DIR = "/var/log/gateway"
SYNC_MODES = ("never", "every", "interval")
PIPE_BUF = 4096  # a pipe write up to this size is atomic: the console renderer never sees half a line
POLICY_SHORT = 16  # records carry 16 hex of the policy hash; start and (re)load records carry it whole
_FULL_POLICY_EVENTS = frozenset({"start", "policy-load", "policy-reload"})
_EVENT_NAME = re.compile(r"[a-z][a-z0-9-]{0,31}\Z")
_DECISIONS = {d: quote(d) for d in ("allow", "deny", "would-deny")}
# Keys the writer sets; "torn" and "audit_notes" are its own notes on the first record after open,
# "audit_dropped" counts copies the syslog daemon or the console did not get (on the stop record).
_CHAIN_KEYS = frozenset(
    {"seq", "time", "tenant", "policy", "event", "prev", "torn", "audit_notes", "audit_dropped"}
)
_REQUEST_KEYS = _CHAIN_KEYS | set(FIELD_ORDER) | {"decision", "rule", "reason", "result", "us"}
_TAIL_LIMIT = 16 << 20  # a "last line" longer than this is not a record: treat it as torn
_monotonic = time.monotonic

# Checkpoints (see checkpoint()): one every CHECKPOINT_EVERY records or CHECKPOINT_SECONDS seconds,
# whichever comes first, checked as each record is written; one before a rotation and one, final, at
# close. A thousand records is ~300 KB of trail and one extra ~450-byte line (0.15%); ten seconds
# bounds how long a quiet gateway's last records stay unsealed while records still come.
CHECKPOINT_EVERY = 1000
CHECKPOINT_SECONDS = 10.0
_NEVER = float("inf")

# Room past the end of the file (see the module's docstring). A top-up allocates what is needed plus
# RESERVE_AHEAD, so that fallocate runs about once every thousand records, not once a record.
RESERVE_AHEAD = 256 << 10
# Kept free beyond every request record for the lifecycle records that end a session (limit,
# client-gone, stop): a full disk still gets its stop record.
LIFECYCLE_ROOM = 8 << 10
# A request record's bytes besides its variable texts: keys, seq, time, event, decision, rule (an id of
# at most 128 characters), result, us, ids, flag names, prev. A test holds every request type to it.
_RECORD_FIXED = 2048
_ESCAPED = 6  # the most JSON characters one byte becomes (\u00XX, \udcXX); one str character: twice that
_TEXT_FIELDS: dict[type, tuple[str, ...]] = {
    cls: tuple(key for key, kind in spec if kind == "text") for cls, spec in FIELD_SPECS.items()
}
_NO_ROOM = (errno.ENOSPC, errno.EDQUOT)
_NOT_RESERVABLE = (errno.EOPNOTSUPP, errno.ENOSYS, errno.ENODEV, errno.ESPIPE, errno.EINVAL)
_UNLIMITED = sys.maxsize  # the reserved end when nothing can be reserved: every room check passes


class AuditError(OSError):
    """The trail cannot be written; the server must not reply as if the request had been recorded."""


class TrailFull(AuditError):
    """reserve(): room for the next record cannot be guaranteed; the request must not be performed."""


class TrailFailed(AuditError):
    """A record could not be written (or synced) earlier: the writer refuses everything from then on."""


_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
try:
    _libc = ctypes.CDLL("libc.so.6", use_errno=True)  # not find_library: it forks ldconfig and gcc
    _fallocate = _libc.fallocate64
    _fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    _fallocate.restype = ctypes.c_int
except (OSError, AttributeError):  # not glibc: nothing can be reserved, the writer latches instead
    _fallocate = None


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2), which the os module lacks (os.posix_fallocate cannot keep the size). OSError on
    failure; ENOSYS when the C library has no fallocate."""
    if _fallocate is None:
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))
    while _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        if err != errno.EINTR:  # a signal (SIGHUP, SIGUSR1) may interrupt a long allocation: again
            raise OSError(err, os.strerror(err))


def default_audit_path(tenant: str, channel: str | None = None) -> str:
    """/var/log/gateway/<tenant>.jsonl, or with a channel (what the gateway serves on: its socket path,
    or its export with -f) /var/log/gateway/<tenant>@<channel>.jsonl, so that two gateways started
    without --audit-log never share a default. Each part is reduced to a safe file name (the tenant comes
    from a policy file, so "../x" or "a/b" must not leave the directory); a path channel loses its
    leading "/" and the others become "-": /run/gateway/g1.sock -> run-gateway-g1.sock."""
    name = _safe_name(tenant) or "default"
    if channel is not None:
        part = _safe_name(channel.strip("/").replace("/", "-")) or "root"
        if len(part) > 160:  # a file name has 255 bytes at most: keep the end, and a digest of the rest
            part = hashlib.sha256(part.encode()).hexdigest()[:16] + "-" + part[-140:]
        name = f"{name}@{part}"
    return os.path.join(DEFAULT_DIR, name + ".jsonl")


def _safe_name(text: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]", "_", text)
    if name.startswith("."):
        name = "_" + name[1:]
    return name


def _jsonable(value: Any) -> Any:
    """Lifecycle fields come from the server as they are: bytes, paths, states with as_dict()."""
    if isinstance(value, bytes):
        return text(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    as_dict = getattr(value, "as_dict", None)
    if callable(as_dict):
        return as_dict()
    return str(value)


# ensure_ascii keeps every line pure ASCII: lone surrogates (undecodable path bytes) become \udcXX.
_ENCODER = json.JSONEncoder(separators=(",", ":"), default=_jsonable)


def _members(fields: dict[str, Any], reserved: frozenset[str] | set[str]) -> str:
    clash = reserved.intersection(fields)
    if clash:
        raise ValueError(f"audit fields {sorted(clash)} are set by the writer")
    return "".join("," + quote(k) + ":" + _ENCODER.encode(v) for k, v in fields.items())


def _number(us: float) -> str:
    """Microseconds with one decimal; NaN and infinities (not JSON) become null."""
    return "%.1f" % us if us - us == 0 else "null"  # noqa: UP031 (%-format is the fastest here)


def _read_tail(fd: int, size: int) -> tuple[bytes | None, int]:
    """(the last complete line without its newline or None, length of a torn fragment after it)."""
    buf = b""
    pos = size
    end = -1
    while pos > 0 and size - pos < _TAIL_LIMIT:
        start = max(0, pos - 65536)
        buf = os.pread(fd, pos - start, start) + buf
        pos = start
        end = buf.rfind(b"\n")
        if end < 0:
            continue
        begin = buf.rfind(b"\n", 0, end)
        if begin >= 0 or pos == 0:
            return buf[begin + 1 : end], len(buf) - end - 1
    return None, len(buf) - end - 1  # no complete line found (within the limit): all of it is torn


def _count_lines(fd: int, size: int) -> int:
    """Complete lines in the file (only called for a torn tail, to name the torn line's number)."""
    count = 0
    offset = 0
    while offset < size:
        chunk = os.pread(fd, min(1 << 20, size - offset), offset)
        if not chunk:
            break
        count += chunk.count(b"\n")
        offset += len(chunk)
    return count


class AuditWriter:
    """Use :meth:`open`. Not thread-safe (the server is single-threaded on purpose)."""

    __slots__ = (
        "_busy", "_console", "_cp_due_mono", "_cp_due_seq", "_cp_every", "_cp_first", "_cp_seconds",
        "_dirfd", "_failed", "_fd", "_first_extra", "_head", "_last_sync", "_opened_seq", "_policy_full",
        "_prev", "_reopen_pending", "_reserved_end", "_seal", "_seq", "_size", "_sync", "_syslog",
        "_tprefix", "_tsec", "console_dropped", "interval", "name", "notes", "path", "tenant",
    )  # fmt: skip

    def __init__(self, path: str, dirfd: int, fd: int, tenant: str, sync: str, interval: float) -> None:
        self.path = path
        self.name = os.path.basename(path)
        self._dirfd = dirfd
        self._fd = fd
        self.tenant = tenant
        self._sync = sync
        self.interval = interval
        self._last_sync = time.monotonic()
        self._seq = 1
        self._prev = ZERO_HASH
        self._policy_full = ""
        self._head = ""
        self._tsec = -1
        self._tprefix = ""
        self._syslog: SyslogSink | None = None
        self._console: int | None = None
        self.console_dropped = 0
        self.notes: list[str] = []  # told once, on the first record written after open
        self._first_extra: dict[str, Any] = {}
        self._busy = False
        self._reopen_pending = False
        self._failed: str | None = None  # why the writer refuses everything (see TrailFailed)
        # The file's end as this writer has written it, and how far past it space is allocated:
        # a record is written only when _size + its length fits under _reserved_end.
        self._size = 0
        self._reserved_end = _UNLIMITED
        # Checkpoints: the first seq the next one covers, and when it is due (seq reached, or time).
        self._seal: SealKey | None = None
        self._cp_every = CHECKPOINT_EVERY
        self._cp_seconds = CHECKPOINT_SECONDS
        self._cp_first = 1
        self._cp_due_seq = 1 + CHECKPOINT_EVERY
        self._cp_due_mono = _NEVER
        self._opened_seq = 1

    # -----------------------------------------------------------------------------------------------------
    # Opening and resuming

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str] | None,
        *,
        tenant: str,
        policy_hash: str,
        sync: str = "never",
        interval: float = 1.0,
        syslog: bool | str = False,
        console: int | None = None,
        channel: str | None = None,
        seal: SealKey | None = None,
        checkpoint_every: int = CHECKPOINT_EVERY,
        checkpoint_seconds: float = CHECKPOINT_SECONDS,
    ) -> AuditWriter:
        """Open (or resume) the trail at path; None means default_audit_path(tenant, channel), never
        nowhere.

        syslog: True for /dev/log, or a socket path. console: a pipe fd (console.start_console_renderer);
        the writer owns it from now on and closes it in close(). seal: the sealing key (seal.SealKey,
        opened before any confinement); the writer owns it too. Without one, checkpoints are written
        unsealed. checkpoint_every / checkpoint_seconds: 0 for never by count / by time (a checkpoint
        is still written before a rotation and at close). Raises AuditError when the trail cannot be
        opened or another process holds it.
        """
        if checkpoint_every < 0 or checkpoint_seconds < 0:
            raise ValueError("checkpoint_every and checkpoint_seconds must not be negative")
        if sync not in SYNC_MODES:
            raise ValueError(f"sync must be one of {', '.join(SYNC_MODES)}, not {sync!r}")
        if not interval > 0:
            raise ValueError("interval must be positive")
        if path is None:
            path = default_audit_path(tenant, channel)
            try:  # the default directory may not exist yet; only the default one is created
                os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
            except OSError as exc:
                raise AuditError(exc.errno, f"cannot create {DEFAULT_DIR}: {exc.strerror}") from None
        path = os.path.abspath(os.fspath(path))
        dirfd = open_directory(os.path.dirname(path))
        try:
            fd = _open_locked(dirfd, path)
        except BaseException:
            os.close(dirfd)
            raise
        writer = cls(path, dirfd, fd, tenant, sync, interval)
        writer._seal = seal
        writer._cp_every = checkpoint_every
        writer._cp_seconds = checkpoint_seconds
        try:
            writer._resume()
        except AuditError:
            writer.close()
            raise
        except OSError as exc:
            writer.close()
            raise AuditError(exc.errno, f"cannot resume {path}: {exc.strerror}") from None
        writer._start_reserving()
        writer.set_policy(policy_hash)
        if syslog:
            address = syslog if isinstance(syslog, str) else DEFAULT_ADDRESS
            try:
                writer._syslog = SyslogSink.connect(address)
            except OSError as exc:
                writer.notes.append(f"syslog: {address} unavailable ({exc.strerror or exc}); not sent there")
        writer._console = console
        writer._opened_seq = writer._seq
        if writer._cp_first > writer._seq:
            writer._cp_first = writer._seq
        writer._schedule_checkpoint()
        return writer

    def _resume(self) -> None:
        st = os.fstat(self._fd)
        if not stat.S_ISREG(st.st_mode):  # /dev/stderr, a FIFO: nothing to resume, nothing to warn about
            return
        if stat.S_IMODE(st.st_mode) & 0o077:
            self.notes.append(f"{self.path} is accessible to others (mode {stat.S_IMODE(st.st_mode):04o})")
        self._size = st.st_size
        if st.st_size == 0:
            return
        rfd = os.open(self.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self._dirfd)
        try:
            if not os.path.samestat(os.fstat(rfd), st):  # the name was swapped since it was opened
                raise AuditError(errno.ESTALE, f"audit log {self.path} was replaced while being opened")
            last, torn = _read_tail(rfd, st.st_size)
            lines = _count_lines(rfd, st.st_size) if torn else 0
        finally:
            os.close(rfd)
        if last is not None:
            self._prev = hashlib.sha256(last).hexdigest()
            try:
                record = json.loads(last)
                self._seq = int(record["seq"]) + 1
            except (ValueError, KeyError, TypeError):
                self.notes.append("the last complete line is not a record: seq restarts at 1")
            else:
                self._resume_checkpoint(record)
            self._cp_first = self._seq
        if torn:
            # Terminate the fragment so that it stays a line of its own (nothing is ever removed from a
            # trail), and continue the chain from the last complete line. The first record says so, and
            # --verify reports a torn line (not a broken chain) only where such a record follows it.
            self._write_all(b"\n")
            self._first_extra["torn"] = {"line": lines + 1, "bytes": torn}
            self.notes.append(
                f"resumed after a torn last line ({self.name}:{lines + 1}, {torn} bytes); "
                "the chain continues from the line before it"
            )

    def _resume_checkpoint(self, last: dict[str, Any]) -> None:
        """The trail ended with a checkpoint sealed at epoch e while the key file is not past e: the
        previous run stopped between writing the checkpoint and evolving its key. Evolve now, so that
        no epoch is used twice when it need not be."""
        seal = self._seal
        if seal is None or last.get("event") != "checkpoint" or last.get("key_id") != seal.key_id:
            return
        epoch = last.get("epoch")
        if isinstance(epoch, int) and epoch >= seal.epoch:
            try:
                seal.advance(epoch + 1)
            except OSError as exc:
                raise AuditError(exc.errno, f"cannot evolve the sealing key {seal.path}: {exc}") from None

    # -----------------------------------------------------------------------------------------------------
    # Reserving room (see the module's docstring)

    def _start_reserving(self) -> None:
        """Find out whether room can be reserved here, and take the first RESERVE_AHEAD of it."""
        if not stat.S_ISREG(os.fstat(self._fd).st_mode):
            self.notes.append(
                f"{self.path} is not a regular file: no room can be reserved for records; the first record "
                "that fails to be written is lost with its request performed, and every later one is refused"
            )
            return
        self._reserved_end = self._size
        try:
            fallocate(self._fd, _FALLOC_FL_KEEP_SIZE, self._size, RESERVE_AHEAD)
        except OSError as exc:
            if exc.errno in _NOT_RESERVABLE:
                self._reserved_end = _UNLIMITED
                self.notes.append(
                    f"{self.path}: its file system cannot reserve room for records ({exc.strerror}); the "
                    "first record that fails to be written is lost with its request performed, and every "
                    "later one is refused"
                )
            # else (ENOSPC, EDQUOT, EIO): nothing reserved yet; reserve() tries again and refuses if need be
            return
        self._reserved_end = self._size + RESERVE_AHEAD

    def _make_room(self, need: int) -> None:
        """Allocate past the end of the file until need bytes fit; TrailFull if the disk has no room."""
        try:
            size = os.fstat(self._fd).st_size  # the truth, should anything else have changed the file
            if size < self._size:  # truncated behind our back (copytruncate): its allocation went with it
                self._reserved_end = size
            self._size = size
            try:
                fallocate(self._fd, _FALLOC_FL_KEEP_SIZE, size, need + RESERVE_AHEAD)
                self._reserved_end = size + need + RESERVE_AHEAD
            except OSError as exc:
                if exc.errno not in _NO_ROOM:
                    raise
                fallocate(self._fd, _FALLOC_FL_KEEP_SIZE, size, need)  # all there is, if enough
                self._reserved_end = size + need
        except OSError as exc:
            if exc.errno in _NOT_RESERVABLE:  # e.g. the file was moved to such a file system: fall back
                self._reserved_end = _UNLIMITED
                return
            why = f"audit log {self.path}: no room for the next record ({need} bytes): {exc.strerror}"
            raise TrailFull(exc.errno, why) from None

    def _record_bound(self, request: Any, texts: tuple[str | bytes, ...]) -> int:
        n = 0
        if request is not None:
            for key in _TEXT_FIELDS[type(request)]:
                n += len(getattr(request, key))
        for t in texts:
            n += len(t) if isinstance(t, bytes) else 2 * len(t)
        bound = _RECORD_FIXED + 2 * len(self._head) + _ESCAPED * n
        if self._first_extra or self.notes:  # the first record after open also carries the writer's notes
            bound += _RECORD_FIXED + 2 * _ESCAPED * sum(len(note) for note in self.notes)
        return bound

    def reserve(self, request: Any = None, *texts: str | bytes) -> None:
        """Call before performing a request: returns once its record is sure to find room; raises
        TrailFull (no room) or TrailFailed (the writer failed earlier) when the request must not be
        performed.

        texts: the variable-length texts the server will add to the record besides the request's own
        (its reason, the resolved paths); the record's size is bounded from them and the request. The
        room kept includes LIFECYCLE_ROOM for the records that end the session.
        """
        if self._failed is not None:
            raise TrailFailed(errno.EIO, self._failed)
        need = self._record_bound(request, texts) + LIFECYCLE_ROOM
        if self._size + need > self._reserved_end:
            self._make_room(need)

    def _fail(self, why: str) -> None:
        """Latch: from now on nothing is written and every request is refused."""
        if self._failed is None:
            self._failed = f"audit trail {self.path} failed earlier ({why}): refusing every request"
            log.error("audit trail failed %s", kv(path=self.path, error=why, requests="refused"))

    @property
    def failed(self) -> str | None:
        """Why the writer refuses everything, or None while it writes."""
        return self._failed

    def _ensure_room(self, length: int) -> None:
        """Before a write: the whole line must fit in allocated room, or no byte of it is written."""
        if self._failed is not None:
            raise TrailFailed(errno.EIO, self._failed)
        if self._size + length > self._reserved_end:
            try:
                self._make_room(length)
            except TrailFull as exc:
                self._fail(exc.strerror)
                raise

    # -----------------------------------------------------------------------------------------------------
    # Writing

    def set_policy(self, policy_hash: str) -> None:
        """The policy in force from the next record on (call before writing policy-reload)."""
        self._policy_full = policy_hash
        self._head = f',"tenant":{quote(self.tenant)},"policy":{quote(policy_hash[:POLICY_SHORT])}'

    def _now(self) -> str:
        us = time.time_ns() // 1000
        sec = us // 1_000_000
        if sec != self._tsec:  # strftime costs a microsecond: once a second is enough
            self._tsec = sec
            self._tprefix = time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(sec))
        return self._tprefix + str(us % 1_000_000 + 1_000_000)[1:] + "Z"  # six digits, zero-padded

    def request(
        self, request: Any, *, decision: str, rule: str | None, reason: str, result: str, us: float,
        **extra: Any,
    ) -> None:  # fmt: skip
        """Record one decided request. Returns once the line is in the kernel; raises AuditError if not
        (TrailFailed once the writer has failed: then nothing is written)."""
        self._busy = True  # from here on, a reopen() from a signal handler waits for this record
        try:
            now = self._now()
            # One f-string (a single BUILD_STRING): measurably cheaper than joining a list of parts.
            body = (
                f'{{"seq":{self._seq},"time":"{now}"{self._head},"event":"request",'
                f"{request_fragment(request)}"
                f',"decision":{_DECISIONS.get(decision) or quote(decision)}'
                f',"rule":{"null" if rule is None else quote(rule)}'
                f',"reason":{quote(reason)},"result":{quote(result)}'
                f',"us":{_number(us)}'
                f"{_members(extra, _REQUEST_KEYS) if extra else ''}"
            )
            if self._first_extra or self.notes or self._syslog is not None or self._console is not None:
                self._emit(body, now, "request", decision, rule, request, LIFECYCLE_ROOM)
            else:
                # _emit's steps for the common configuration (no notes pending, no copies to send),
                # inlined: this runs once per request, between the operation and the reply.
                line = (body + ',"prev":"' + self._prev + '"}').encode("ascii")
                data = line + b"\n"
                if self._size + len(data) + LIFECYCLE_ROOM > self._reserved_end or self._failed is not None:
                    self._ensure_room(len(data) + LIFECYCLE_ROOM)
                try:
                    written = _write(self._fd, data)
                except OSError as exc:  # nothing reached the file: no torn line to note
                    why = f"audit write to {self.path} failed: {exc.strerror}"
                    self._fail(why)
                    raise AuditError(exc.errno, why) from None
                self._size += written
                if written != len(data):  # a short write (not for space: it was reserved): finish it
                    self._write_all(data, written)
                self._prev = _sha256(line).hexdigest()
                self._seq += 1
                if self._sync != "never":
                    self._sync_now(self._sync == "every")
            if self._seq >= self._cp_due_seq or _monotonic() >= self._cp_due_mono:
                self._checkpoint(False)
        finally:
            self._busy = False
        if self._reopen_pending:
            self._reopen_pending = False
            self.reopen()

    def lifecycle(self, event: str, **fields: Any) -> bool:
        """Record a lifecycle event (start, policy-load, policy-reload, protocol-error, client-gone, stop,
        or another lower-case name) with the fields the server gives.

        Never raises for the trail's failure (a stop record on a full disk must not end the gateway
        in a traceback): logs it, latches (see TrailFailed) and returns False. True once written.
        """
        if not _EVENT_NAME.match(event) or event in ("request", "checkpoint"):
            raise ValueError(f"not a lifecycle event name: {event!r}")
        if event in _FULL_POLICY_EVENTS and len(self._policy_full) > POLICY_SHORT:
            fields.setdefault("policy_sha256", self._policy_full)
        extra = ""
        if event == "stop" and self.syslog_dropped:
            # The trail is complete; say how incomplete its syslog copy is (a copy is dropped when the
            # daemon's queue, net.unix.max_dgram_qlen datagrams, is full). The console says so itself.
            extra = _members({"audit_dropped": {"syslog": self.syslog_dropped}}, frozenset())
        if self._fd < 0:
            log.error("audit record not written %s", kv(event=event, reason="the trail is closed"))
            return False
        self._busy = True
        try:
            now = self._now()
            body = f'{{"seq":{self._seq},"time":"{now}"{self._head},"event":{quote(event)}'
            self._emit(body + _members(fields, _CHAIN_KEYS) + extra, now, event, None, None, None, 0)
            written = True
            # (not after stop: close() follows with the final checkpoint, which covers it)
            if event != "stop" and (self._seq >= self._cp_due_seq or _monotonic() >= self._cp_due_mono):
                self._checkpoint(False)
        except OSError as exc:
            self._fail(exc.strerror or str(exc))
            log.error("audit record not written %s", kv(event=event, error=exc.strerror or str(exc)))
            written = False
        finally:
            self._busy = False
        if self._reopen_pending:
            self._reopen_pending = False
            self.reopen()
        return written

    def _emit(
        self, body: str, now: str, event: str, decision: str | None, rule: str | None, request: Any,
        keep: int,
    ) -> None:  # fmt: skip
        """Write one record; keep: room that must stay free after it (LIFECYCLE_ROOM for requests)."""
        first = bool(self._first_extra or self.notes)
        if first:
            extra = dict(self._first_extra)
            if self.notes:
                extra["audit_notes"] = list(self.notes)
            body += _members(extra, frozenset())
        line = (body + ',"prev":"' + self._prev + '"}').encode("ascii")
        self._ensure_room(len(line) + 1 + keep)
        self._write_all(line + b"\n")
        self._prev = hashlib.sha256(line).hexdigest()
        seq = self._seq
        self._seq = seq + 1
        if first:  # told once it is written; kept for the next record if the write failed
            self._first_extra.clear()
            self.notes.clear()
        if self._sync != "never":
            self._sync_now(self._sync == "every")
        if self._syslog is not None:
            op = None if request is None else request.type.name.lower()
            self._syslog.send(
                time=now, event=event, seq=seq, tenant=self.tenant, decision=decision, op=op, rule=rule,
                message=line,
            )  # fmt: skip
        if self._console is not None and event != "checkpoint":  # (the console shows decisions)
            self._to_console(line)

    # -----------------------------------------------------------------------------------------------------
    # Checkpoints

    def _schedule_checkpoint(self) -> None:
        self._cp_due_seq = self._cp_first + self._cp_every if self._cp_every else sys.maxsize
        self._cp_due_mono = _monotonic() + self._cp_seconds if self._cp_seconds else _NEVER

    def checkpoint(self, final: bool = False) -> bool:
        """Write a checkpoint now (the writer does so by itself: every checkpoint_every records or
        checkpoint_seconds, before a rotation, and final at close). Never raises for the trail's
        failure: logs, latches and returns False, as lifecycle() does."""
        if self._fd < 0:
            return False
        self._busy = True
        try:
            return self._checkpoint(final)
        finally:
            self._busy = False

    def _checkpoint(self, final: bool) -> bool:
        """One checkpoint record: the seq range since the previous one (first..last), the chain head
        (the hash of the line before it, which is also its prev), whether it is the session's last
        (final), and the seal over them with the key of the current epoch, which is then evolved.

        Unsealed (seal null, no epoch) without a key: the range and head still let a copy kept
        elsewhere (syslog) show where the trail was cut, but anyone who can write the file can forge
        them."""
        last = self._seq - 1
        record: dict[str, Any] = {"first": min(self._cp_first, self._seq), "last": last, "head": self._prev}
        if final:
            record["final"] = True
        seal = self._seal
        if seal is not None:
            record["key_id"] = seal.key_id
            record["epoch"] = seal.epoch
            record["seq"] = self._seq
            record["seal"] = seal.seal(record)
            del record["seq"]
        else:
            record["seal"] = None
        try:
            now = self._now()
            body = f'{{"seq":{self._seq},"time":"{now}"{self._head},"event":"checkpoint"'
            self._emit(body + _members(record, _CHAIN_KEYS), now, "checkpoint", None, None, None, 0)
        except OSError as exc:
            self._fail(exc.strerror or str(exc))
            log.error("audit checkpoint not written %s", kv(error=exc.strerror or str(exc)))
            return False
        finally:
            self._cp_first = self._seq
            self._schedule_checkpoint()
        if seal is not None:
            try:
                seal.advance()  # k[i] is forgotten only once k[i+1] is on disk
            except OSError as exc:
                # Sealing on with a key that is still on disk would promise what it cannot: stop, say so.
                self._seal = None
                seal.close()
                self.notes.append(f"sealing stopped: cannot evolve the key in {seal.path} ({exc})")
                log.error("audit: sealing stopped, cannot evolve the key %s", kv(key=seal.path, error=exc))
        return True

    def checkpoint_if_due(self) -> bool:
        """For an idle loop: the time-based checkpoint, if records were written since the last one and
        checkpoint_seconds have passed (a quiet gateway's last records are then sealed without waiting
        for its next record). True if one was written."""
        if self._fd < 0 or self._failed is not None or self._seq <= self._cp_first:
            return False
        if _monotonic() < self._cp_due_mono:
            return False
        return self.checkpoint(False)

    @property
    def checkpoint_seconds(self) -> float:
        return self._cp_seconds

    @property
    def sealed(self) -> bool:
        return self._seal is not None

    def _sync_now(self, always: bool) -> None:
        mono = time.monotonic()
        if always or mono - self._last_sync >= self.interval:
            try:
                os.fdatasync(self._fd)  # data and size: all a reader needs to find the record
            except OSError as exc:  # written, but not known to be durable: the caller must know
                why = f"audit sync of {self.path} failed: {exc.strerror}"
                self._fail(why)  # a failed fdatasync may have dropped the pages: nothing is sure any more
                raise AuditError(exc.errno, why) from None
            self._last_sync = mono

    def _write_all(self, data: bytes, written: int = 0) -> None:
        """Write data from offset written on (the bytes before it are already in the file)."""
        view = memoryview(data)
        try:
            while written < len(data):
                n = os.write(self._fd, view[written:])
                written += n
                self._size += n
        except OSError as exc:
            why = f"audit write to {self.path} failed: {exc.strerror}"
            self._fail(why)
            if written:
                # Part of the line reached the file: terminated, so that a restart resumes after it and
                # names it torn (this writer writes nothing more).
                self._first_extra["torn"] = {"bytes": written}
                with contextlib.suppress(OSError):
                    os.write(self._fd, b"\n")
            raise AuditError(exc.errno, why) from None

    def _to_console(self, line: bytes) -> None:
        assert self._console is not None
        if len(line) >= PIPE_BUF:  # keep writes atomic: the renderer gets only what it shows
            record = json.loads(line)
            for key in ("path", "path2", "target", "reason"):
                if isinstance(record.get(key), str) and len(record[key]) > 256:
                    record[key] = record[key][:256] + "…"
            line = _ENCODER.encode({k: v for k, v in record.items() if k != "notes"}).encode()[: PIPE_BUF - 1]
        try:
            if self.console_dropped:
                os.write(self._console, b'{"dropped":%d}\n' % self.console_dropped)
                self.console_dropped = 0
            os.write(self._console, line + b"\n")
        except BlockingIOError:
            self.console_dropped += 1  # the renderer is behind: never wait for it
        except OSError as exc:  # the renderer is gone: stop feeding it
            os.close(self._console)
            self._console = None
            self.notes.append(f"console renderer gone ({exc.strerror}); console output stopped")

    # -----------------------------------------------------------------------------------------------------
    # Rotation, syncing, closing

    def reopen(self) -> bool:
        """Reopen the path (SIGUSR1 after logrotate moved the file); the chain continues into the new file.

        Safe to call from a signal handler: if a record is being written, the reopen happens right after
        it. Writes a "reopen" record (the first record of a new file, naming the old file's last hash in
        prev). On failure, keeps writing to the old file, records why, and returns False. A failed
        writer stays failed: it does not reopen.
        """
        if self._fd < 0 or self._failed is not None:
            return False
        if self._busy:
            self._reopen_pending = True
            return True
        try:
            fd = _open_locked(self._dirfd, self.path)
        except OSError as exc:
            self.lifecycle("reopen", error=f"{exc.strerror or exc}; still writing to the previous file")
            return False
        old = self._fd
        rotated = not os.path.samestat(os.fstat(old), os.fstat(fd))
        if rotated and self._seq > self._cp_first:
            self._busy = True
            try:
                self._checkpoint(False)  # the old file ends sealed, so it verifies on its own
            finally:
                self._busy = False
            if self._failed is not None:
                os.close(fd)
                return False
        if self._sync != "never":
            with contextlib.suppress(OSError):
                os.fdatasync(old)
        self._release_room()
        self._fd = fd
        os.close(old)
        self._size = os.fstat(fd).st_size
        self._reserved_end = _UNLIMITED
        self._start_reserving()
        self.lifecycle("reopen", rotated=rotated)
        return True

    def _release_room(self) -> None:
        """Give back the room allocated past the end (a truncate to the same size frees it: ext4, tmpfs)."""
        if self._reserved_end != _UNLIMITED and self._reserved_end > self._size:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, os.fstat(self._fd).st_size)
            self._reserved_end = self._size

    def sync_if_due(self) -> None:
        """For an idle loop (optional): in interval mode, sync records written since the last sync."""
        if self._sync == "interval" and self._fd >= 0 and self._failed is None:
            self._sync_now(False)

    @property
    def seq(self) -> int:
        """The seq the next record will get."""
        return self._seq

    @property
    def last_hash(self) -> str:
        return self._prev

    @property
    def syslog_dropped(self) -> int:
        return 0 if self._syslog is None else self._syslog.dropped + self._syslog.errors

    @property
    def dirfd(self) -> int:
        """The O_PATH fd of the trail's directory (the sandbox grants Landlock access beneath it)."""
        return self._dirfd

    @property
    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        if self._fd < 0:
            return
        if self._failed is None and self._seq > self._opened_seq:
            # The session's last record: a trail that does not end with one was cut (or is live).
            self.checkpoint(final=True)
        if self._seal is not None:
            self._seal.close()
            self._seal = None
        if self._sync != "never":
            with contextlib.suppress(OSError):
                os.fdatasync(self._fd)
        self._release_room()
        os.close(self._fd)
        os.close(self._dirfd)
        self._fd = self._dirfd = -1
        if self._syslog is not None:
            self._syslog.close()
            self._syslog = None
        if self._console is not None:
            os.close(self._console)  # EOF: the renderer draws what is left and exits
            self._console = None

    def __enter__(self) -> AuditWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_O_DIR = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_MAX_LINKS = 40  # the kernel's own limit on symlinks followed in one lookup


def open_directory(directory: str) -> int:
    """An O_PATH fd on the trail's directory, opened one component at a time without following a symlink
    at the directory itself. On the way to it, a symlink is followed only when root (or this process's
    user) owns it: a symlink's owner is whoever made it, and nobody else may redirect the trail (/var/run
    -> /run, an administrator's /var/log -> /data/log are root's). AuditError names the component."""
    trusted = {0, os.geteuid()}
    todo = [c for c in directory.split("/") if c][::-1]  # a stack: the next component last
    walked = "/"
    fd = os.open("/", _O_DIR)
    links = 0
    try:
        while todo:
            name = todo.pop()
            if name == ".":
                continue
            here = os.path.normpath(os.path.join(walked, name))
            try:
                nfd = os.open(name, _O_DIR, dir_fd=fd)
            except OSError as exc:
                st = None
                if exc.errno in (errno.ENOTDIR, errno.ELOOP):
                    with contextlib.suppress(OSError):
                        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                if st is None or not stat.S_ISLNK(st.st_mode):
                    raise AuditError(exc.errno, f"audit log directory {directory}: {here}: {exc.strerror}") \
                        from None
                if not todo:
                    raise AuditError(
                        errno.ELOOP, f"audit log directory {directory} is a symlink: refusing"
                    ) from None
                if st.st_uid not in trusted:
                    raise AuditError(
                        errno.ELOOP,
                        f"audit log directory {directory}: {here} is a symlink owned by uid {st.st_uid}: "
                        "refusing (only root's symlinks are followed on the way to the trail)",
                    ) from None
                links += 1
                if links > _MAX_LINKS:
                    raise AuditError(errno.ELOOP, f"audit log directory {directory}: too many symlinks") \
                        from None
                target = os.readlink(name, dir_fd=fd)
                todo.extend([c for c in target.split("/") if c][::-1])
                if target.startswith("/"):
                    os.close(fd)
                    fd = os.open("/", _O_DIR)
                    walked = "/"
                continue
            os.close(fd)
            fd, walked = nfd, here
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_locked(dirfd: int, path: str) -> int:
    """Open for appending and take an exclusive lock: two gateways on one trail would fork its chain."""
    try:
        fd = os.open(
            os.path.basename(path),
            os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dirfd,
        )  # fmt: skip
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # O_NOFOLLOW met a symlink: planted, it would redirect the trail
            raise AuditError(exc.errno, f"audit log {path} is a symlink: refusing") from None
        raise AuditError(exc.errno, f"cannot open audit log {path}: {exc.strerror}") from None
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):  # /dev/stderr and FIFOs may well be shared on purpose
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise AuditError(exc.errno, f"audit log {path} is in use by another process") from None
        raise AuditError(exc.errno, f"cannot lock audit log {path}: {exc.strerror}") from None
    return fd
