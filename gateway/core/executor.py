"""Performs one allowed request on what gateway/core/resolve.py reached, never on a path it looks up
itself: the rules decided on exactly that object, so acting on anything else would be a bypass.

The model is virtiofsd's file-system code:

* "name" operations (create, mkdir, mknod, symlink, link, rename, remove) act on one final component in
  its resolved parent fd with the *at() call, which never follows it;
* inode operations act on the object's own O_PATH fd: lstat on what the resolver read; chown, utime,
  chmod and the xattr calls through /proc/self/fd/N (a directory fd opened before any chroot; the magic
  link lands on that very inode, a symlink included); readlink with readlinkat(fd, ""); open, truncate
  and getversion by reopening the fd through /proc; statfs with fstatfs on it;
* special files are never opened: OPEN/CREATE of anything but a regular file or a directory answers
  ENXIO without an open(2), so a FIFO can never block the server and a device never sees an open.

Create-type requests run with the guest's uid/gid as the fs ids (setfsuid/setfsgid, per thread: the
server is single-threaded on purpose), so the object is born owned by the guest's user; while acting as
anyone but root:root only CAP_DAC_OVERRIDE is effective, as in the reference (see gateway/core/fsids.py).

Errors match the reference's answers (tests/test_differential.py holds the two side by side): where
the kernel would answer before opening anything (ENOTDIR, ELOOP, EISDIR, EINVAL for impossible flags,
ENAMETOOLONG for a path of PATH_MAX bytes), the executor answers the same before its type check.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gateway import protocol as p
from gateway import syscalls as sc
from gateway.core.fsids import FsIds
from gateway.core.resolve import Resolution, Resolved, Resolver, resolve_request
from gateway.logfmt import kv

log = logging.getLogger("gateway.core.executor")

# Flags that only make sense while resolving by name; reopening through /proc must drop them.
_NAME_ONLY_FLAGS = os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_NOCTTY
# The flag bits open(2) knows (the kernel's VALID_OPEN_FLAGS). open(2) silently ignores any other bit, but
# openat2(2) refuses it with EINVAL, so guest flags are masked to these before they reach openat2.
_O_LARGEFILE = 0o100000  # the kernel's bit; Python's os.O_LARGEFILE is 0 on 64-bit hosts
_VALID_OPEN_FLAGS = (
    os.O_ACCMODE | os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_TRUNC | os.O_APPEND | os.O_NONBLOCK
    | os.O_DSYNC | fcntl.FASYNC | os.O_DIRECT | _O_LARGEFILE | os.O_DIRECTORY | os.O_NOFOLLOW
    | os.O_NOATIME | os.O_CLOEXEC | os.O_SYNC | os.O_PATH | os.O_TMPFILE
)  # fmt: skip
XATTR_SIZE_MAX = 65536  # the kernel refuses a larger xattr value with E2BIG before anything else


@dataclass(slots=True)
class Result:
    """What a request produced: errno (0 = success) and, on success, a payload or an fd to send."""

    errno: int = 0
    payload: bytes = b""
    fd: int | None = None


OK = Result()
_stat_payload = p.stat_payload


class Executor:
    """Performs one allowed request on what the resolver reached (gateway/core/resolve.py): the object's
    fd, or a name in its resolved parent fd. It never resolves a guest path itself."""

    def __init__(self, root_fd: int, proc_fd: int, *, getversion_supported: bool) -> None:
        self.root_fd = root_fd
        self.proc_fd = proc_fd  # /proc/self/fd, opened before chroot: reaches an fd's inode by number
        self.getversion_supported = getversion_supported
        self.resolver = Resolver(root_fd, proc_fd)
        self._in_proc = False  # whether the cwd is proc_fd (the xattr calls have no *at() form)
        self._dispatch: dict[p.RequestType, Callable[[Any, Resolution], Result]] = {
            p.RequestType.OPEN: self.open,
            p.RequestType.CREATE: self.create,
            p.RequestType.MKNOD: self.mknod,
            p.RequestType.MKDIR: self.mkdir,
            p.RequestType.SYMLINK: self.symlink,
            p.RequestType.LINK: self.link,
            p.RequestType.LSTAT: self.lstat,
            p.RequestType.READLINK: self.readlink,
            p.RequestType.STATFS: self.statfs,
            p.RequestType.CHMOD: self.chmod,
            p.RequestType.CHOWN: self.chown,
            p.RequestType.TRUNCATE: self.truncate,
            p.RequestType.UTIME: self.utime,
            p.RequestType.RENAME: self.rename,
            p.RequestType.REMOVE: self.remove,
            p.RequestType.LGETXATTR: self.lgetxattr,
            p.RequestType.LLISTXATTR: self.llistxattr,
            p.RequestType.LSETXATTR: self.lsetxattr,
            p.RequestType.LREMOVEXATTR: self.lremovexattr,
            p.RequestType.GETVERSION: self.getversion,
        }

    @classmethod
    def for_directory(cls, root: str | bytes, proc_fd: int | None = None) -> Executor:
        """An executor over an export directory (the chroot-free form, used by tests and non-root runs)."""
        root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        if proc_fd is None:
            proc_fd = os.open("/proc/self/fd", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        return cls(root_fd, proc_fd, getversion_supported=getversion_supported(root_fd))

    def resolve(self, request: p.Request) -> Resolution:
        return resolve_request(self.resolver, request)

    def perform(self, request: p.Request, res: Resolution | None = None) -> Result:
        """Perform one request on its resolution (resolved here when the caller has none: tests and
        callers without a policy; the server always decides on the resolution it passes)."""
        own = res is None
        if res is None:
            res = self.resolve(request)
        try:
            return self._dispatch[request.type](request, res)
        except OSError as exc:
            return Result(exc.errno or errno.EIO)
        except Exception:  # a bug must cost one request an EIO, never the guest its file system
            log.exception("internal error %s", kv(type=request.type.name, reply="EIO"))
            return Result(errno.EIO)
        finally:
            if own:
                res.close()

    # -- helpers on resolved objects ------------------------------------------------------------------

    @staticmethod
    def _reached(r: Resolved) -> Resolved:
        """The resolved path, or the errno its resolution met (answered now: the request was allowed)."""
        if r.err:
            raise OSError(r.err, os.strerror(r.err))
        return r

    def _object_fd(self, r: Resolved) -> int:
        self._reached(r)
        if r.fd < 0:  # pragma: no cover - every object form opens one
            raise OSError(errno.EIO, "no object fd")
        return r.fd

    def _proc(self, fd: int) -> bytes:
        """The fd's entry in /proc/self/fd: a name that reaches exactly that inode, symlink included."""
        return b"%d" % fd

    def reopen(self, fd: int, flags: int, mode: int = 0) -> int:
        """Open the inode behind an O_PATH fd with new flags, through /proc/self/fd: no name lookup.
        mode matters only for O_TMPFILE (a new inode in the directory fd names); it must be passed
        explicitly, since os.open's default would give such a file 0777."""
        return os.open(self._proc(fd), (flags & ~_NAME_ONLY_FLAGS) | os.O_CLOEXEC, mode, dir_fd=self.proc_fd)

    def _cwd_proc(self) -> None:
        # The xattr calls have no *at() form: they run on /proc/self/fd/N relative to the cwd.
        if not self._in_proc:
            os.fchdir(self.proc_fd)
            self._in_proc = True

    # -- open and create ------------------------------------------------------------------------------

    @staticmethod
    def _openable(fd: int) -> os.stat_result:
        st = os.fstat(fd)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            raise OSError(errno.ENXIO, "not a regular file or directory")
        return st

    @staticmethod
    def _check_open_flags(flags: int) -> None:
        """The flag combinations open(2) refuses with EINVAL before any lookup (build_open_flags)."""
        if flags & os.O_CREAT and flags & os.O_DIRECTORY:  # also covers O_TMPFILE | O_CREAT
            raise OSError(errno.EINVAL, "O_CREAT with O_DIRECTORY")
        tmpfile = os.O_TMPFILE & ~os.O_DIRECTORY
        if flags & tmpfile and (flags & os.O_TMPFILE != os.O_TMPFILE or flags & os.O_ACCMODE == 0):
            raise OSError(errno.EINVAL, "O_TMPFILE needs O_DIRECTORY and write access")

    def _open_existing(self, obj: int, flags: int, mode: int, st: os.stat_result | None = None) -> Result:
        """Open an object that exists. Before the type check (which must come before any open, so that
        a FIFO never blocks and a device never sees an open), answer what open(2) answers for the object
        without opening it, in the kernel's order; the reference gets these from its open()."""
        if flags & os.O_CREAT and flags & os.O_EXCL:
            raise OSError(errno.EEXIST, "exists")
        if st is None:
            st = os.fstat(obj)
        if flags & os.O_DIRECTORY and not stat.S_ISDIR(st.st_mode):
            raise OSError(errno.ENOTDIR, "not a directory")  # a FIFO, a device, a symlink (O_NOFOLLOW)
        if stat.S_ISLNK(st.st_mode) and not flags & os.O_PATH:
            raise OSError(errno.ELOOP, "O_NOFOLLOW on a symlink")  # O_PATH|O_NOFOLLOW: ENXIO below
        if stat.S_ISDIR(st.st_mode) and flags & os.O_CREAT and not flags & os.O_PATH:
            raise OSError(errno.EISDIR, "O_CREAT on a directory")  # O_PATH ignores O_CREAT
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            raise OSError(errno.ENXIO, "not a regular file or directory")
        return Result(fd=self.reopen(obj, flags, mode))

    def _open_or_create(self, flags: int, mode: int, res: Resolution) -> Result:
        flags &= _VALID_OPEN_FLAGS
        self._check_open_flags(flags)
        r = self._reached(res.first)
        if not flags & os.O_CREAT or (r.exists and r.fd >= 0):
            return self._open_existing(self._object_fd(r), flags, mode, r.stat())
        if r.name is None or r.dir_only:
            # The root, 'x/', 'x/.': open(2) with O_CREAT makes nothing there and answers EISDIR.
            raise OSError(errno.EISDIR, "O_CREAT on a directory form")
        # Nothing was there: create exactly this name in exactly this parent. O_NOFOLLOW: a symlink
        # planted since the resolution is refused rather than followed somewhere nobody decided on;
        # O_NONBLOCK guards against a FIFO planted the same way.
        fd = os.open(r.name, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode, dir_fd=r.dirfd)
        try:
            self._openable(fd)
            if not flags & os.O_NONBLOCK:
                fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        except OSError:
            os.close(fd)
            raise
        return Result(fd=fd)

    def open(self, r: p.Open, res: Resolution) -> Result:
        return self._open_or_create(r.flags, 0, res)  # O_CREAT through OPEN creates with mode 0

    def create(self, r: p.Create, res: Resolution) -> Result:
        with FsIds(r.uid, r.gid):
            return self._open_or_create(r.flags, r.mode & 0o7777, res)

    # -- name operations ------------------------------------------------------------------------------

    def _name_op(
        self, t: Resolved, op: Callable[[int, bytes], object], root_errno: int = errno.EEXIST
    ) -> Result:
        self._reached(t)
        if t.name is None:
            # The root itself: creating it is EEXIST and removing it EBUSY, as the kernel answers
            # for "/" (the reference's mkdir("/") inside its chroot).
            raise OSError(root_errno, "the export root")
        op(t.dirfd, t.at_name)
        return OK

    def mknod(self, r: p.Mknod, res: Resolution) -> Result:
        with FsIds(r.uid, r.gid):
            return self._name_op(res.first, lambda d, n: os.mknod(n, r.mode, r.rdev, dir_fd=d))

    def mkdir(self, r: p.Mkdir, res: Resolution) -> Result:
        with FsIds(r.uid, r.gid):
            return self._name_op(res.first, lambda d, n: os.mkdir(n, r.mode & 0o7777, dir_fd=d))

    def symlink(self, r: p.Symlink, res: Resolution) -> Result:
        with FsIds(r.uid, r.gid):
            return self._name_op(res.first, lambda d, n: os.symlink(r.target, n, dir_fd=d))

    def link(self, r: p.Link, res: Resolution) -> Result:
        a = self._reached(res.first)
        assert res.second is not None
        b = self._reached(res.second)
        if a.name is None:
            # 'x/', 'x/.', '..', '/': link(2) follows the source and insists on a directory, which it
            # refuses with EPERM once the new name checks out (the resolver followed it beneath the root).
            self._link_new_name_free(b)
            raise OSError(errno.EPERM, "hard link to a directory")
        if b.name is None:  # link(2) looks the old name up first, then finds "/" exists
            os.stat(a.name, dir_fd=a.dirfd, follow_symlinks=False)
            raise OSError(errno.EEXIST, "the export root")
        os.link(a.name, b.at_name, src_dir_fd=a.dirfd, dst_dir_fd=b.dirfd, follow_symlinks=False)
        return OK

    @staticmethod
    def _link_new_name_free(b: Resolved) -> None:
        """link(2)'s checks of the new name (filename_create): EEXIST when it exists (the root, '.', '..'
        included), ENOENT for a missing name with a trailing slash."""
        if b.name is None or b.name in (b".", b".."):
            raise OSError(errno.EEXIST, "exists")
        try:
            os.stat(b.name, dir_fd=b.dirfd, follow_symlinks=False)
        except FileNotFoundError:
            if b.dir_only:
                raise
            return
        raise OSError(errno.EEXIST, "exists")

    def rename(self, r: p.Rename, res: Resolution) -> Result:
        a = self._reached(res.first)
        assert res.second is not None
        b = self._reached(res.second)
        if a.name is None or b.name is None:
            raise OSError(errno.EBUSY, "the export root")  # rename(2) of or onto "/"
        # Trailing slashes stay (rename(2) never follows a final symlink, slash or not).
        os.rename(a.at_name, b.at_name, src_dir_fd=a.dirfd, dst_dir_fd=b.dirfd)
        return OK

    def remove(self, r: p.Remove, res: Resolution) -> Result:
        def remove_at(dirfd: int, name: bytes) -> None:
            try:
                os.unlink(name, dir_fd=dirfd)
            except IsADirectoryError:  # remove(3): unlink, and rmdir when it is a directory
                os.rmdir(name, dir_fd=dirfd)

        return self._name_op(res.first, remove_at, errno.EBUSY)

    # -- inode operations: on the object's own fd, never by name ------------------------------------------

    def lstat(self, r: p.Lstat, res: Resolution) -> Result:
        t = self._reached(res.first)
        st = t.stat()
        if st is None:  # pragma: no cover - the resolver read it or set err
            raise OSError(errno.EIO, "no attributes")
        return Result(0, _stat_payload(st))

    def readlink(self, r: p.Readlink, res: Resolution) -> Result:
        if r.bufsize <= 1:  # the reference reads into bufsize-1 bytes: 0 or less is EINVAL
            return Result(errno.EINVAL)
        t = self._reached(res.first)
        fd = self._object_fd(t)
        st = t.stat()
        if t.name is None or st is None or not stat.S_ISLNK(st.st_mode):
            return Result(errno.EINVAL)  # readlinkat(fd, "") would say ENOENT; readlink(2) says EINVAL
        target = os.readlink(b"", dir_fd=fd)[: r.bufsize - 1]
        return Result(payload=p.string_payload(target))

    def chown(self, r: p.Chown, res: Resolution) -> Result:
        uid = -1 if r.uid == 0xFFFFFFFF else r.uid
        gid = -1 if r.gid == 0xFFFFFFFF else r.gid
        # Through /proc/self/fd/N: the magic link lands on the fd's own inode, a symlink included.
        os.chown(self._proc(self._object_fd(res.first)), uid, gid, dir_fd=self.proc_fd)
        return OK

    def utime(self, r: p.Utime, res: Resolution) -> Result:
        atime, mtime = (r.atime_sec, r.atime_nsec), (r.mtime_sec, r.mtime_nsec)
        sc.utimensat(self.proc_fd, self._proc(self._object_fd(res.first)), atime, mtime, 0)
        return OK

    def lgetxattr(self, r: p.Lgetxattr, res: Resolution) -> Result:
        fd = self._object_fd(res.first)
        self._cwd_proc()
        return self._xattr_reply(os.getxattr(self._proc(fd), r.name), r.size)

    def llistxattr(self, r: p.Llistxattr, res: Resolution) -> Result:
        fd = self._object_fd(res.first)
        self._cwd_proc()
        names = os.listxattr(self._proc(fd))
        return self._xattr_reply(b"".join(os.fsencode(name) + b"\0" for name in names), r.size)

    @staticmethod
    def _xattr_reply(value: bytes, size: int) -> Result:
        if size == 0:  # a length query
            return Result(payload=p.length_payload(len(value)))
        if 0 < size < len(value):
            return Result(errno.ERANGE)
        return Result(payload=p.string_payload(value))

    def lsetxattr(self, r: p.Lsetxattr, res: Resolution) -> Result:
        if r.size & 0xFFFFFFFF > XATTR_SIZE_MAX:
            # What the kernel answers (and so the reference) for a size it would never copy, -1 included.
            return Result(errno.E2BIG)
        if not 0 <= r.size <= len(r.value):
            # The reference reads past the value here (a bug); a size the frame does not hold is invalid.
            return Result(errno.EINVAL)
        fd = self._object_fd(res.first)
        self._cwd_proc()
        os.setxattr(self._proc(fd), r.name, r.value[: r.size], r.flags)
        return OK

    def lremovexattr(self, r: p.Lremovexattr, res: Resolution) -> Result:
        fd = self._object_fd(res.first)
        self._cwd_proc()
        os.removexattr(self._proc(fd), r.name)
        return OK

    def chmod(self, r: p.Chmod, res: Resolution) -> Result:
        os.chmod(self._proc(self._object_fd(res.first)), r.mode & 0o7777, dir_fd=self.proc_fd)
        return OK

    def truncate(self, r: p.Truncate, res: Resolution) -> Result:
        if r.length >= 1 << 63:  # a negative off_t: truncate(2) refuses it before looking at the path
            return Result(errno.EINVAL)
        t = self._reached(res.first)
        obj = self._object_fd(t)
        st = t.stat()
        mode = st.st_mode if st is not None else os.fstat(obj).st_mode
        if stat.S_ISDIR(mode):
            return Result(errno.EISDIR)
        if not stat.S_ISREG(mode):  # truncate(2) on a FIFO or device is EINVAL; never open one
            return Result(errno.EINVAL)
        fd = self.reopen(obj, os.O_WRONLY)
        try:
            os.ftruncate(fd, r.length)
        finally:
            os.close(fd)
        return OK

    def statfs(self, r: p.Statfs, res: Resolution) -> Result:
        fields = list(sc.fstatfs(self._object_fd(res.first)))
        # f_fsid is two ints; the reference widens each to its u64 field with sign extension, so
        # match it on the wire (fstatfs hands them back as unsigned 32-bit values).
        for i in (7, 8):
            fields[i] = fields[i] - (1 << 32) if fields[i] & 0x80000000 else fields[i]
        return Result(payload=p.statfs_payload(tuple(fields)))

    def getversion(self, r: p.Getversion, res: Resolution) -> Result:
        if not self.getversion_supported:  # as the reference: 0 without looking at the path
            return Result(payload=p.u64_payload(0))
        t = self._reached(res.first)
        obj = self._object_fd(t)
        st = t.stat()
        if st is None or not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            raise OSError(errno.ENXIO, "not a regular file or directory")
        fd = self.reopen(obj, os.O_RDONLY | os.O_NONBLOCK)
        try:
            buf = fcntl.ioctl(fd, sc.FS_IOC_GETVERSION, bytes(8))
        finally:
            os.close(fd)
        return Result(payload=p.u64_payload(struct.unpack("<q", buf)[0]))


# File systems whose FS_IOC_GETVERSION the reference trusts (ext2/3/4, btrfs, reiserfs, xfs).
GETVERSION_MAGICS = {0xEF53, 0x9123683E, 0x52654973, 0x58465342}


def getversion_supported(root_fd: int) -> bool:
    return sc.fstatfs(root_fd)[0] in GETVERSION_MAGICS
