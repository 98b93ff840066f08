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
sandbox's chroot, an absolute path would name a file inside the guest's export.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import stat
import time
from json.encoder import encode_basestring_ascii as quote  # type: ignore[attr-defined]
from typing import Any

from gateway.audit.fields import FIELD_ORDER, request_fragment, text
from gateway.audit.syslog import DEFAULT_ADDRESS, SyslogSink

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


class AuditError(OSError):
    """The trail cannot be written; the server must not reply as if the request had been recorded."""


def default_audit_path(tenant: str) -> str:
    """/var/log/gateway/<tenant>.jsonl, with the tenant reduced to a safe file name (it comes from a
    policy file, so "../x" or "a/b" must not leave the directory)."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", tenant) or "default"
    if name.startswith("."):
        name = "_" + name[1:]
    return os.path.join(DEFAULT_DIR, name + ".jsonl")


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
        "_busy", "_console", "_dirfd", "_fd", "_first_extra", "_head", "_last_sync", "_policy_full",
        "_prev", "_reopen_pending", "_seq", "_sync", "_syslog", "_tprefix", "_tsec", "console_dropped",
        "interval", "name", "notes", "path", "tenant",
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
    ) -> AuditWriter:
        """Open (or resume) the trail at path; None means default_audit_path(tenant), never nowhere.

        syslog: True for /dev/log, or a socket path. console: a pipe fd (console.start_console_renderer);
        the writer owns it from now on and closes it in close(). Raises AuditError when the trail
        cannot be opened or another process holds it.
        """
        if sync not in SYNC_MODES:
            raise ValueError(f"sync must be one of {', '.join(SYNC_MODES)}, not {sync!r}")
        if not interval > 0:
            raise ValueError("interval must be positive")
        if path is None:
            path = default_audit_path(tenant)
            try:  # the default directory may not exist yet; only the default one is created
                os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
            except OSError as exc:
                raise AuditError(exc.errno, f"cannot create {DEFAULT_DIR}: {exc.strerror}") from None
        path = os.path.abspath(os.fspath(path))
        directory = os.path.dirname(path)
        try:
            dirfd = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise AuditError(exc.errno, f"audit log directory {directory}: {exc.strerror}") from None
        try:
            fd = _open_locked(dirfd, path)
        except BaseException:
            os.close(dirfd)
            raise
        writer = cls(path, dirfd, fd, tenant, sync, interval)
        try:
            writer._resume()
        except OSError as exc:
            writer.close()
            raise AuditError(exc.errno, f"cannot resume {path}: {exc.strerror}") from None
        writer.set_policy(policy_hash)
        if syslog:
            address = syslog if isinstance(syslog, str) else DEFAULT_ADDRESS
            try:
                writer._syslog = SyslogSink.connect(address)
            except OSError as exc:
                writer.notes.append(f"syslog: {address} unavailable ({exc.strerror or exc}); not sent there")
        writer._console = console
        return writer

    def _resume(self) -> None:
        st = os.fstat(self._fd)
        if not stat.S_ISREG(st.st_mode):  # /dev/stderr, a FIFO: nothing to resume, nothing to warn about
            return
        if stat.S_IMODE(st.st_mode) & 0o077:
            self.notes.append(f"{self.path} is accessible to others (mode {stat.S_IMODE(st.st_mode):04o})")
        if st.st_size == 0:
            return
        rfd = os.open(self.name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=self._dirfd)
        try:
            last, torn = _read_tail(rfd, st.st_size)
            lines = _count_lines(rfd, st.st_size) if torn else 0
        finally:
            os.close(rfd)
        if last is not None:
            self._prev = hashlib.sha256(last).hexdigest()
            try:
                self._seq = int(json.loads(last)["seq"]) + 1
            except (ValueError, KeyError, TypeError):
                self.notes.append("the last complete line is not a record: seq restarts at 1")
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
        """Record one decided request. Returns once the line is in the kernel; raises AuditError if not."""
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
                self._emit(body, now, "request", decision, rule, request)
            else:
                # _emit's steps for the common configuration (no notes pending, no copies to send),
                # inlined: this runs once per request, between the operation and the reply.
                line = (body + ',"prev":"' + self._prev + '"}').encode("ascii")
                data = line + b"\n"
                try:
                    written = _write(self._fd, data)
                except OSError as exc:  # nothing reached the file: no torn line to note
                    why = f"audit write to {self.path} failed: {exc.strerror}"
                    raise AuditError(exc.errno, why) from None
                if written != len(data):  # a short write (a full disk): finish it, or note a torn line
                    self._write_all(data, written)
                self._prev = _sha256(line).hexdigest()
                self._seq += 1
                if self._sync != "never":
                    self._sync_now(self._sync == "every")
        finally:
            self._busy = False
        if self._reopen_pending:
            self._reopen_pending = False
            self.reopen()

    def lifecycle(self, event: str, **fields: Any) -> None:
        """Record a lifecycle event (start, policy-load, policy-reload, protocol-error, client-gone, stop,
        or another lower-case name) with the fields the server gives."""
        if not _EVENT_NAME.match(event) or event == "request":
            raise ValueError(f"not a lifecycle event name: {event!r}")
        if event in _FULL_POLICY_EVENTS and len(self._policy_full) > POLICY_SHORT:
            fields.setdefault("policy_sha256", self._policy_full)
        extra = ""
        if event == "stop" and self.syslog_dropped:
            # The trail is complete; say how incomplete its syslog copy is (a copy is dropped when the
            # daemon's queue, net.unix.max_dgram_qlen datagrams, is full). The console says so itself.
            extra = _members({"audit_dropped": {"syslog": self.syslog_dropped}}, frozenset())
        self._busy = True
        try:
            now = self._now()
            body = f'{{"seq":{self._seq},"time":"{now}"{self._head},"event":{quote(event)}'
            self._emit(body + _members(fields, _CHAIN_KEYS) + extra, now, event, None, None, None)
        finally:
            self._busy = False
        if self._reopen_pending:
            self._reopen_pending = False
            self.reopen()

    def _emit(
        self, body: str, now: str, event: str, decision: str | None, rule: str | None, request: Any
    ) -> None:
        first = bool(self._first_extra or self.notes)
        if first:
            extra = dict(self._first_extra)
            if self.notes:
                extra["audit_notes"] = list(self.notes)
            body += _members(extra, frozenset())
        line = (body + ',"prev":"' + self._prev + '"}').encode("ascii")
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
        if self._console is not None:
            self._to_console(line)

    def _sync_now(self, always: bool) -> None:
        mono = time.monotonic()
        if always or mono - self._last_sync >= self.interval:
            try:
                os.fdatasync(self._fd)  # data and size: all a reader needs to find the record
            except OSError as exc:  # written, but not known to be durable: the caller must know
                raise AuditError(exc.errno, f"audit sync of {self.path} failed: {exc.strerror}") from None
            self._last_sync = mono

    def _write_all(self, data: bytes, written: int = 0) -> None:
        """Write data from offset written on (the bytes before it are already in the file)."""
        view = memoryview(data)
        try:
            while written < len(data):
                written += os.write(self._fd, view[written:])
        except OSError as exc:
            if written:
                # Part of the line reached the file: the next record terminates it and names it torn.
                self._first_extra["torn"] = {"bytes": written}
                with contextlib.suppress(OSError):
                    os.write(self._fd, b"\n")
            raise AuditError(exc.errno, f"audit write to {self.path} failed: {exc.strerror}") from None

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
        prev). On failure, keeps writing to the old file, records why, and returns False.
        """
        if self._fd < 0:
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
        if self._sync != "never":
            with contextlib.suppress(OSError):
                os.fdatasync(old)
        self._fd = fd
        os.close(old)
        self.lifecycle("reopen", rotated=rotated)
        return True

    def sync_if_due(self) -> None:
        """For an idle loop (optional): in interval mode, sync records written since the last sync."""
        if self._sync == "interval" and self._fd >= 0:
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
        if self._sync != "never":
            with contextlib.suppress(OSError):
                os.fdatasync(self._fd)
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


def _open_locked(dirfd: int, path: str) -> int:
    """Open for appending and take an exclusive lock: two gateways on one trail would fork its chain."""
    try:
        fd = os.open(
            os.path.basename(path), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600,
            dir_fd=dirfd,
        )  # fmt: skip
    except OSError as exc:
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
