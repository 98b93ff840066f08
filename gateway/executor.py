"""Performs one request relative to the export's root directory fd.

Every guest path is resolved by the kernel beneath the root fd (openat2 RESOLVE_IN_ROOT |
RESOLVE_NO_MAGICLINKS): a symlink, an absolute path or a '..' can never lead outside, whether or not the
process is also chrooted. The model is virtiofsd's file-system code:

* "name" operations (create, mkdir, mknod, symlink, link, rename, remove, and the calls that must not
  follow a final symlink: lstat, lchown, utimensat, the l*xattr calls, readlink) resolve the *parent*
  directory beneath the root and then act on one final component with the *at() call and
  AT_SYMLINK_NOFOLLOW, so the final component is never followed;
* "object" operations that follow a final symlink (chmod, truncate, open, statfs, getversion) resolve
  the whole path to an O_PATH fd beneath the root, check what it is, and act on that inode through
  /proc/self/fd (a directory fd opened before any chroot), so nothing is re-resolved by name;
* special files are never opened: OPEN/CREATE of anything but a regular file or a directory answers
  ENXIO without an open(2), so a FIFO can never block the server and a device never sees an open.

Create-type requests run with the guest's uid/gid as the fs ids (setfsuid/setfsgid, per thread: the
server is single-threaded on purpose), so the object is born owned by the guest's user.
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

from gateway import protocol as p
from gateway import syscalls as sc

log = logging.getLogger("gateway.executor")

_O_PATH = os.O_PATH | os.O_CLOEXEC
_O_PARENT = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
_O_DIR_OBJECT = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NONBLOCK
# Flags that only make sense while resolving by name; reopening through /proc must drop them.
_NAME_ONLY_FLAGS = os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_NOCTTY


@dataclass(slots=True)
class Result:
    """What a request produced: errno (0 = success) and, on success, a payload or an fd to send."""

    errno: int = 0
    payload: bytes = b""
    fd: int | None = None


OK = Result()


class Target:
    """A path split into (parent directory fd, final component), the parent resolved beneath the root.

    ``name`` is None when the path names the root itself. ``dir_only`` is set when the path can only name a
    directory (a trailing slash, '.' or '..' last, or the root): those are handled through a real
    directory fd instead, because '..' or a trailing slash would make the *at() call resolve again."""

    __slots__ = ("dir_only", "dirfd", "name", "owned", "path")

    def __init__(self, path: bytes, dirfd: int, name: bytes | None, owned: bool, dir_only: bool) -> None:
        self.path = path
        self.dirfd = dirfd
        self.name = name
        self.owned = owned
        self.dir_only = dir_only

    def close(self) -> None:
        if self.owned:
            os.close(self.dirfd)
            self.owned = False


class Executor:
    def __init__(self, root_fd: int, proc_fd: int, *, getversion_supported: bool) -> None:
        self.root_fd = root_fd
        self.proc_fd = proc_fd  # /proc/self/fd, opened before chroot: reaches an fd's inode by number
        self.getversion_supported = getversion_supported
        self._cwd: int | None = None
        self._dispatch: dict[p.RequestType, Callable[..., Result]] = {
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

    def perform(self, request: p.Request) -> Result:
        try:
            return self._dispatch[request.type](request)
        except OSError as exc:
            return Result(exc.errno or errno.EIO)
        except Exception:  # a bug must cost one request an EIO, never the guest its file system
            log.exception("internal error performing %s", request.type.name)
            return Result(errno.EIO)

    # -- resolution -----------------------------------------------------------------------------------

    def target(self, path: bytes) -> Target:
        """Resolve the parent of path beneath the root; ENOENT for an empty path, as open("") gives."""
        if not path:
            raise OSError(errno.ENOENT, "empty path")
        stripped = path.rstrip(b"/")
        if not stripped:
            return Target(path, self.root_fd, None, False, True)
        slash = stripped.rfind(b"/")
        name = stripped[slash + 1 :]
        dir_only = len(stripped) != len(path) or name in (b".", b"..")
        parent = stripped[: slash + 1]
        if not parent.strip(b"/"):  # a top-level name: the root fd is the parent, no lookup needed
            return Target(path, self.root_fd, name, False, dir_only)
        dirfd = sc.openat2(self.root_fd, parent, _O_PARENT)
        return Target(path, dirfd, name, True, dir_only)

    def object_fd(self, path: bytes, *, follow: bool) -> int:
        """An O_PATH fd for the object path names, resolved entirely beneath the root."""
        if not path:
            raise OSError(errno.ENOENT, "empty path")
        return sc.openat2(self.root_fd, path, _O_PATH if follow else _O_PATH | os.O_NOFOLLOW)

    def dir_object(self, path: bytes) -> int:
        """A real fd for a path that can only name a directory ('.', '..', 'x/', the root)."""
        return sc.openat2(self.root_fd, path, _O_DIR_OBJECT)

    def reopen(self, fd: int, flags: int) -> int:
        """Open the inode behind an O_PATH fd with new flags, through /proc/self/fd: no name lookup."""
        return os.open(b"%d" % fd, (flags & ~_NAME_ONLY_FLAGS) | os.O_CLOEXEC, dir_fd=self.proc_fd)

    def _chdir(self, dirfd: int) -> None:
        # The l*xattr calls have no *at() form; they run relative to the cwd, set to the parent fd.
        if self._cwd != dirfd or dirfd != self.root_fd:
            os.fchdir(dirfd)
            self._cwd = dirfd

    # -- open and create ------------------------------------------------------------------------------

    def _openable(self, fd: int) -> os.stat_result:
        st = os.fstat(fd)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            raise OSError(errno.ENXIO, "not a regular file or directory")
        return st

    def _open_existing(self, obj: int, flags: int) -> Result:
        self._openable(obj)
        if flags & os.O_CREAT and flags & os.O_EXCL:
            raise OSError(errno.EEXIST, "exists")
        return Result(fd=self.reopen(obj, flags))

    def _open_or_create(self, path: bytes, flags: int, mode: int) -> Result:
        follow = not flags & os.O_NOFOLLOW
        if flags & os.O_CREAT and flags & os.O_EXCL:
            # O_EXCL never opens an existing object, so no special file can be opened here.
            fd = sc.openat2(self.root_fd, path, flags, mode)
            try:
                self._openable(fd)
            except OSError:
                os.close(fd)
                raise
            return Result(fd=fd)
        try:
            obj = self.object_fd(path, follow=follow)
        except OSError as exc:
            if exc.errno != errno.ENOENT or not flags & os.O_CREAT:
                raise
        else:
            try:
                return self._open_existing(obj, flags)
            finally:
                os.close(obj)
        # It did not exist: create it. O_NONBLOCK guards the race where a FIFO appears in between.
        fd = sc.openat2(self.root_fd, path, flags | os.O_NONBLOCK, mode)
        try:
            self._openable(fd)
            if not flags & os.O_NONBLOCK:
                fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        except OSError:
            os.close(fd)
            raise
        return Result(fd=fd)

    def open(self, r: p.Open) -> Result:
        return self._open_or_create(r.path, r.flags, 0)  # O_CREAT through OPEN creates with mode 0

    def create(self, r: p.Create) -> Result:
        with FsIds(r.uid, r.gid):
            return self._open_or_create(r.path, r.flags, r.mode & 0o7777)

    # -- name operations ------------------------------------------------------------------------------

    def _name_op(self, path: bytes, op: Callable[[int, bytes], object]) -> Result:
        t = self.target(path)
        try:
            if t.name is None:  # the root itself cannot be created, removed or renamed
                raise OSError(errno.EBUSY, "the export root")
            # A trailing slash stays on the name: the kernel then insists on a directory, and these
            # calls never follow the final component even so.
            op(t.dirfd, t.name + b"/" if t.dir_only and t.name not in (b".", b"..") else t.name)
            return OK
        finally:
            t.close()

    def mknod(self, r: p.Mknod) -> Result:
        with FsIds(r.uid, r.gid):
            return self._name_op(r.path, lambda d, n: os.mknod(n, r.mode, r.rdev, dir_fd=d))

    def mkdir(self, r: p.Mkdir) -> Result:
        with FsIds(r.uid, r.gid):
            return self._name_op(r.path, lambda d, n: os.mkdir(n, r.mode & 0o7777, dir_fd=d))

    def symlink(self, r: p.Symlink) -> Result:
        with FsIds(r.uid, r.gid):
            return self._name_op(r.path, lambda d, n: os.symlink(r.target, n, dir_fd=d))

    def _two_names(self, old: bytes, new: bytes, op: Callable[[int, bytes, int, bytes], object]) -> Result:
        a = self.target(old)
        try:
            b = self.target(new)
            try:
                if a.name is None or b.name is None:
                    raise OSError(errno.EBUSY, "the export root")
                op(a.dirfd, a.name, b.dirfd, b.name)
                return OK
            finally:
                b.close()
        finally:
            a.close()

    def link(self, r: p.Link) -> Result:
        return self._two_names(
            r.path,
            r.path2,
            lambda da, na, db, nb: os.link(na, nb, src_dir_fd=da, dst_dir_fd=db, follow_symlinks=False),
        )

    def rename(self, r: p.Rename) -> Result:
        return self._two_names(
            r.path, r.path2, lambda da, na, db, nb: os.rename(na, nb, src_dir_fd=da, dst_dir_fd=db)
        )

    def remove(self, r: p.Remove) -> Result:
        def remove_at(dirfd: int, name: bytes) -> None:
            try:
                os.unlink(name, dir_fd=dirfd)
            except IsADirectoryError:  # remove(3): unlink, and rmdir when it is a directory
                os.rmdir(name, dir_fd=dirfd)

        return self._name_op(r.path, remove_at)

    # -- inode operations that never follow a final symlink ---------------------------------------------

    def _inode_op(
        self, path: bytes, at: Callable[[int, bytes], Result], on_dir: Callable[[int], Result]
    ) -> Result:
        t = self.target(path)
        try:
            if t.dir_only:
                fd = self.dir_object(path)
                try:
                    return on_dir(fd)
                finally:
                    os.close(fd)
            assert t.name is not None
            return at(t.dirfd, t.name)
        finally:
            t.close()

    def lstat(self, r: p.Lstat) -> Result:
        return self._inode_op(
            r.path,
            lambda d, n: Result(payload=p.stat_payload(os.stat(n, dir_fd=d, follow_symlinks=False))),
            lambda fd: Result(payload=p.stat_payload(os.fstat(fd))),
        )

    def readlink(self, r: p.Readlink) -> Result:
        if r.bufsize <= 1:  # the reference reads into bufsize-1 bytes: 0 or less is EINVAL
            return Result(errno.EINVAL)

        def at(d: int, n: bytes) -> Result:
            target = os.readlink(n, dir_fd=d)[: r.bufsize - 1]
            return Result(payload=p.string_payload(target))

        return self._inode_op(r.path, at, lambda fd: Result(errno.EINVAL))

    def chown(self, r: p.Chown) -> Result:
        uid = -1 if r.uid == 0xFFFFFFFF else r.uid
        gid = -1 if r.gid == 0xFFFFFFFF else r.gid

        def on_dir(fd: int) -> Result:
            os.chown(fd, uid, gid)
            return OK

        def at(d: int, n: bytes) -> Result:
            os.chown(n, uid, gid, dir_fd=d, follow_symlinks=False)
            return OK

        return self._inode_op(r.path, at, on_dir)

    def utime(self, r: p.Utime) -> Result:
        atime, mtime = (r.atime_sec, r.atime_nsec), (r.mtime_sec, r.mtime_nsec)

        def on_dir(fd: int) -> Result:
            sc.utimensat(fd, None, atime, mtime, 0)
            return OK

        def at(d: int, n: bytes) -> Result:
            sc.utimensat(d, n, atime, mtime, sc.AT_SYMLINK_NOFOLLOW)
            return OK

        return self._inode_op(r.path, at, on_dir)

    def lgetxattr(self, r: p.Lgetxattr) -> Result:
        def at(d: int, n: bytes) -> Result:
            self._chdir(d)
            return self._xattr_reply(os.getxattr(n, r.name, follow_symlinks=False), r.size)

        return self._inode_op(r.path, at, lambda fd: self._xattr_reply(os.getxattr(fd, r.name), r.size))

    def llistxattr(self, r: p.Llistxattr) -> Result:
        def encode(names: list[str]) -> bytes:
            return b"".join(os.fsencode(name) + b"\0" for name in names)

        def at(d: int, n: bytes) -> Result:
            self._chdir(d)
            return self._xattr_reply(encode(os.listxattr(n, follow_symlinks=False)), r.size)

        return self._inode_op(r.path, at, lambda fd: self._xattr_reply(encode(os.listxattr(fd)), r.size))

    @staticmethod
    def _xattr_reply(value: bytes, size: int) -> Result:
        if size == 0:  # a length query
            return Result(payload=p.length_payload(len(value)))
        if 0 < size < len(value):
            return Result(errno.ERANGE)
        return Result(payload=p.string_payload(value))

    def lsetxattr(self, r: p.Lsetxattr) -> Result:
        if not 0 <= r.size <= len(r.value):
            # The reference reads past the value here (a bug); a size the frame does not hold is invalid.
            return Result(errno.EINVAL)
        value = r.value[: r.size]

        def on_dir(fd: int) -> Result:
            os.setxattr(fd, r.name, value, r.flags)
            return OK

        def at(d: int, n: bytes) -> Result:
            self._chdir(d)
            os.setxattr(n, r.name, value, r.flags, follow_symlinks=False)
            return OK

        return self._inode_op(r.path, at, on_dir)

    def lremovexattr(self, r: p.Lremovexattr) -> Result:
        def on_dir(fd: int) -> Result:
            os.removexattr(fd, r.name)
            return OK

        def at(d: int, n: bytes) -> Result:
            self._chdir(d)
            os.removexattr(n, r.name, follow_symlinks=False)
            return OK

        return self._inode_op(r.path, at, on_dir)

    # -- inode operations that follow a final symlink (beneath the root) --------------------------------

    def chmod(self, r: p.Chmod) -> Result:
        obj = self.object_fd(r.path, follow=True)
        try:
            os.chmod(b"%d" % obj, r.mode & 0o7777, dir_fd=self.proc_fd)
            return OK
        finally:
            os.close(obj)

    def truncate(self, r: p.Truncate) -> Result:
        obj = self.object_fd(r.path, follow=True)
        try:
            mode = os.fstat(obj).st_mode
            if stat.S_ISDIR(mode):
                return Result(errno.EISDIR)
            if not stat.S_ISREG(mode):  # truncate(2) on a FIFO or device is EINVAL; never open one
                return Result(errno.EINVAL)
            if r.length >= 1 << 63:
                return Result(errno.EINVAL)
            fd = self.reopen(obj, os.O_WRONLY)
            try:
                os.ftruncate(fd, r.length)
            finally:
                os.close(fd)
            return OK
        finally:
            os.close(obj)

    def statfs(self, r: p.Statfs) -> Result:
        obj = self.object_fd(r.path, follow=True)
        try:
            return Result(payload=p.statfs_payload(sc.fstatfs(obj)))
        finally:
            os.close(obj)

    def getversion(self, r: p.Getversion) -> Result:
        if not self.getversion_supported:  # as the reference: 0 without looking at the path
            return Result(payload=p.u64_payload(0))
        obj = self.object_fd(r.path, follow=True)
        try:
            self._openable(obj)
            fd = self.reopen(obj, os.O_RDONLY | os.O_NONBLOCK)
            try:
                buf = fcntl.ioctl(fd, sc.FS_IOC_GETVERSION, bytes(8))
            finally:
                os.close(fd)
            return Result(payload=p.u64_payload(struct.unpack("<q", buf)[0]))
        finally:
            os.close(obj)


# File systems whose FS_IOC_GETVERSION the reference trusts (ext2/3/4, btrfs, reiserfs, xfs).
GETVERSION_MAGICS = {0xEF53, 0x9123683E, 0x52654973, 0x58465342}


def getversion_supported(root_fd: int) -> bool:
    return sc.fstatfs(root_fd)[0] in GETVERSION_MAGICS


class FsIds:
    """Run a block with the guest's uid/gid as the fs ids, restored afterwards.

    setfsuid/setfsgid change only this thread's fs ids, so the server must stay single-threaded. The
    securebit SECBIT_NO_SETUID_FIXUP (set by the sandbox) keeps the kernel from clearing our effective
    capabilities when the fsuid leaves 0, so the server keeps CAP_DAC_OVERRIDE etc. as the reference does
    after its capng_apply, and never loses them on the way back."""

    __slots__ = ("gid", "uid")

    def __init__(self, uid: int, gid: int) -> None:
        self.uid = uid & 0xFFFFFFFF
        self.gid = gid & 0xFFFFFFFF

    def __enter__(self) -> None:
        if self.uid == 0xFFFFFFFF or self.gid == 0xFFFFFFFF:
            raise OSError(errno.EINVAL, "invalid owner id")
        sc.setfsgid(self.gid)
        sc.setfsuid(self.uid)
        if sc.fsuid() != self.uid or sc.fsgid() != self.gid:
            self.__exit__()
            raise OSError(errno.EPERM, "cannot act as the requested uid/gid")

    def __exit__(self, *exc: object) -> None:
        sc.setfsuid(os.geteuid())
        sc.setfsgid(os.getegid())
