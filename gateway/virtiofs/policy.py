"""One policy for both front-ends: each FUSE request as the policy language's request, decided before it
is performed, and recorded in the trail after (issue 14, point 5).

The policy language speaks the 9p proxy's requests (gateway.protocol, gateway/rules): a FUSE request is
turned into the request(s) a 9p guest doing the same thing would send, on the canonical path(s) the
inode table holds, and decided by the same ``decide()``. So a policy written for 9p means the same here.

============================  =========================================================================
FUSE request                  decided as (on the canonical path of the inode, or inode/name)
============================  =========================================================================
LOOKUP                        lstat of parent/name, on the path the lookup resolved to
GETATTR, ACCESS               lstat
READLINK                      readlink
STATFS                        statfs
OPEN                          open with the guest's flags (a read or a write by its flags)
OPENDIR                       open with O_RDONLY|O_DIRECTORY (what a 9p guest's opendir sends)
CREATE                        CREATE with flags, mode & ~umask and the caller's uid/gid
MKNOD, MKDIR, SYMLINK         mknod, mkdir, symlink (mode & ~umask, the caller's uid/gid)
UNLINK, RMDIR                 remove
RENAME, RENAME2               rename (both paths)
LINK                          link (the existing inode's path, the new name)
SETATTR                       chmod (FATTR_MODE), chown (FATTR_UID/GID), truncate (FATTR_SIZE), utime
                              (FATTR_ATIME/MTIME, _NOW): one decision per part, all must allow
GETXATTR, LISTXATTR           lgetxattr, llistxattr
SETXATTR, REMOVEXATTR         lsetxattr, lremovexattr
READ, WRITE, READDIR(PLUS),   not decided: they use a handle whose OPEN/OPENDIR was decided; RELEASE
FLUSH, FSYNC(DIR), FALLOCATE, records the bytes read and written on it (a ``release`` record)
LSEEK, RELEASE(DIR)
INIT, DESTROY, FORGET         not decided: they touch nothing in the export
============================  =========================================================================

``Gate`` holds the policy and the trail for one file system: ``check`` decides one mapped request (a deny
raises ``Denied`` with the rule's errno; permissive mode lets a would-deny through), ``finish`` records
every request decided for one FUSE request once its reply is known, before the reply goes to the guest.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from gateway import protocol as p
from gateway.audit import TrailFailed
from gateway.logfmt import kv
from gateway.names import errno_name
from gateway.rules import Decision, Policy, decide
from gateway.server import ObjectLookup, object_facts
from gateway.tenancy import IdTranslator
from gateway.virtiofs import fuse_abi as abi
from gateway.virtiofs import fuse_requests as r

if TYPE_CHECKING:
    from gateway.audit import AuditWriter

log = logging.getLogger("gateway.virtiofs")

UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2
_KEEP_ID = 0xFFFFFFFF  # chown(2)'s "leave it alone"


class Denied(Exception):
    """The policy said no: the reply is this errno and nothing is performed."""

    def __init__(self, err: int) -> None:
        super().__init__(err)
        self.errno = err


def join(parent: bytes, name: bytes) -> bytes:
    return parent.rstrip(b"/") + b"/" + name


def _mode(mode: int, umask: int) -> int:
    return mode & ~(umask & 0o777)


def _time(sec: int, nsec: int, given: bool, now: bool) -> tuple[int, int]:
    if now:
        return 0, UTIME_NOW
    if given:
        return sec, nsec
    return 0, UTIME_OMIT


def setattr_requests(req: r.Setattr, path: bytes) -> list[p.Request]:
    """SETATTR as the 9p requests its ``valid`` bits ask for (in the order they are performed)."""
    valid = req.valid
    out: list[p.Request] = []
    if valid & (abi.FATTR_UID | abi.FATTR_GID):
        out.append(p.Chown(path, req.uid if valid & abi.FATTR_UID else _KEEP_ID,
                           req.gid if valid & abi.FATTR_GID else _KEEP_ID))
    if valid & abi.FATTR_MODE:
        out.append(p.Chmod(path, req.mode & 0o7777))
    if valid & abi.FATTR_SIZE:
        out.append(p.Truncate(path, req.size))
    times = abi.FATTR_ATIME | abi.FATTR_MTIME | abi.FATTR_ATIME_NOW | abi.FATTR_MTIME_NOW
    if valid & times:
        asec, ansec = _time(req.atime, req.atimensec, bool(valid & abi.FATTR_ATIME),
                            bool(valid & abi.FATTR_ATIME_NOW))
        msec, mnsec = _time(req.mtime, req.mtimensec, bool(valid & abi.FATTR_MTIME),
                            bool(valid & abi.FATTR_MTIME_NOW))
        out.append(p.Utime(path, asec, ansec, msec, mnsec))
    return out


def rules_requests(req: r.Request, path: bytes, path2: bytes = b"") -> list[p.Request]:
    """The policy language's request(s) for one FUSE request. ``path`` is the canonical path of its
    inode, or of inode/name for the requests that name an entry (LOOKUP: the path it resolved to);
    ``path2`` the second path of RENAME (newdir/newname) and LINK (newparent/newname, ``path`` being the
    existing inode). [] for the requests that are not decided (module docstring)."""
    h = req.header
    if isinstance(req, r.Lookup | r.Getattr | r.Access):
        return [p.Lstat(path)]
    if isinstance(req, r.Readlink):
        return [p.Readlink(path, 4096)]
    if isinstance(req, r.Statfs):
        return [p.Statfs(path)]
    if isinstance(req, r.Opendir):
        return [p.Open(path, os.O_RDONLY | os.O_DIRECTORY)]
    if isinstance(req, r.Open):
        return [p.Open(path, req.flags)]
    if isinstance(req, r.Create):
        return [p.Create(path, req.flags, _mode(req.mode, req.umask) & 0o7777, h.uid, h.gid)]
    if isinstance(req, r.Mknod):
        return [p.Mknod(h.uid, h.gid, path, _mode(req.mode, req.umask), req.rdev)]
    if isinstance(req, r.Mkdir):
        return [p.Mkdir(h.uid, h.gid, path, _mode(req.mode, req.umask) & 0o7777)]
    if isinstance(req, r.Symlink):
        return [p.Symlink(h.uid, h.gid, req.target, path)]
    if isinstance(req, r.Unlink | r.Rmdir):
        return [p.Remove(path)]
    if isinstance(req, r.Rename):
        return [p.Rename(path, path2)]
    if isinstance(req, r.Link):
        return [p.Link(path, path2)]
    if isinstance(req, r.Setattr):
        return setattr_requests(req, path)
    if isinstance(req, r.Getxattr):
        return [p.Lgetxattr(req.size, path, req.name)]
    if isinstance(req, r.Listxattr):
        return [p.Llistxattr(req.size, path)]
    if isinstance(req, r.Setxattr):
        return [p.Lsetxattr(path, req.name, req.value, len(req.value), req.flags)]
    if isinstance(req, r.Removexattr):
        return [p.Lremovexattr(path, req.name)]
    return []


class _Object:
    """What ObjectLookup asks: the object as it is now (an fstat of the inode's fd, say)."""

    __slots__ = ("_fn",)

    def __init__(self, fn: Callable[[], os.stat_result | None] | None) -> None:
        self._fn = fn

    def lookup(self, _path: str) -> os.stat_result | None:
        if self._fn is None:
            return None
        try:
            return self._fn()
        except OSError:
            return None


class _Pending:
    __slots__ = ("decision", "extra", "request", "seen")

    def __init__(self, request: p.Request, decision: Decision, seen: ObjectLookup) -> None:
        self.request = request
        self.decision = decision
        self.seen = seen
        self.extra: dict[str, Any] = {}


class Gate:
    """The policy in force and the trail, for one virtio-fs file system."""

    def __init__(self, policy: Policy, audit: AuditWriter | None = None) -> None:
        self.audit = audit
        self.policy = policy
        self.ids: IdTranslator | None = None
        self.set_policy(policy)
        self.pending: list[_Pending] = []
        self.decided = 0
        self.denied = 0
        self._start = 0

    def set_policy(self, policy: Policy) -> None:
        self.policy = policy
        self.ids = IdTranslator(policy.ids) if policy.ids is not None else None
        if self.audit is not None:
            self.audit.set_policy(policy.hash)

    def begin(self) -> None:
        self.pending.clear()
        self._start = time.perf_counter_ns()

    def check(self, request: p.Request, obj: Callable[[], os.stat_result | None] | None = None) -> Decision:
        """Decide one request (``obj``: the object's attributes, read only if a rule asks). A deny raises
        Denied; an allow (or a would-deny) returns once the trail has room for its record."""
        seen = ObjectLookup(_Object(obj), self.ids)  # type: ignore[arg-type]
        decision = decide(request, self.policy, seen)
        pending = _Pending(request, decision, seen)
        self.pending.append(pending)
        self.decided += 1
        if decision.outcome == "deny":
            self.denied += 1
            raise Denied(decision.errno)
        if self.audit is not None:
            try:  # fail closed: performed only once its record is sure to find room in the trail
                self.audit.reserve(request, decision.reason, request.path, getattr(request, "path2", b""))
            except OSError as exc:
                if not isinstance(exc, TrailFailed):
                    log.error("request not performed %s", kv(reason="no room in the trail", reply="EIO"))
                pending.extra["not_performed"] = exc.strerror
                raise Denied(errno.EIO) from None
        return decision

    def allows(self, request: p.Request, obj: Callable[[], os.stat_result | None] | None = None) -> bool:
        """Decide one request that the guest did not send as such (READDIRPLUS's entry attributes): an
        allow is recorded like any decision; a deny is not (the guest is refused nothing: it will LOOKUP
        the entry, and that is decided and recorded)."""
        seen = ObjectLookup(_Object(obj), self.ids)  # type: ignore[arg-type]
        decision = decide(request, self.policy, seen)
        if decision.outcome == "deny":
            return False
        self.decided += 1
        self.pending.append(_Pending(request, decision, seen))
        if self.audit is not None:
            try:
                self.audit.reserve(request, decision.reason, request.path)
            except OSError:
                self.pending.pop()
                return False
        return True

    def refused(self, err: int, rule: str, reason: str) -> None:
        """The last allowed request refused after all, by the id map (as the 9p server's Refused)."""
        last = self.pending[-1]
        last.decision = last.decision._replace(outcome="deny", rule=rule, reason=reason, errno=err)
        self.denied += 1

    def note(self, **fields: Any) -> None:
        """More fields for the last decision's record (host_uid and host_gid under an id map)."""
        self.pending[-1].extra.update(fields)

    def finish(self, result: int) -> bool:
        """Record every request decided for this FUSE request, with the errno its reply carries (0: ok).
        False: a record could not be written, and the reply must not be sent as it is (EIO instead)."""
        pending, self.pending = self.pending, []
        audit = self.audit
        if audit is None or not pending:
            return True
        us = (time.perf_counter_ns() - self._start) / 1000
        ok = True
        for item in pending:
            extra = item.extra
            if item.seen.asked:
                extra["object"] = object_facts(item.seen.found)
            d = item.decision
            code = result if d.outcome != "deny" else d.errno
            try:
                audit.request(item.request, decision=d.outcome, rule=d.rule, reason=d.reason,
                              result=errno_name(code) if code else "ok", us=us, **extra)
            except OSError as exc:
                if not isinstance(exc, TrailFailed):
                    log.error("audit record not written %s", kv(error=str(exc), reply="EIO"))
                ok = False
        return ok

    def released(self, path: bytes, *, is_dir: bool, bytes_read: int, bytes_written: int) -> None:
        """A handle the guest closed: what went through it, since READ and WRITE are not decided."""
        if self.audit is not None:
            self.audit.lifecycle("release", op="opendir" if is_dir else "open", path=os.fsdecode(path),
                                 bytes_read=bytes_read, bytes_written=bytes_written)


def reply_errno(reply: bytes | None) -> int:
    """The errno a FUSE reply carries (0: success, or no reply)."""
    if not reply or len(reply) < 8:
        return 0
    return -int.from_bytes(reply[4:8], "little", signed=True)
