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
server is single-threaded on purpose), so the object is born owned by the guest's user; while acting as
anyone but root:root only CAP_DAC_OVERRIDE is effective, as in the reference (see gateway/fsids.py).

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

from gateway import protocol as p
from gateway import syscalls as sc
from gateway.fsids import FsIds

log = logging.getLogger("gateway.executor")

_O_PATH = os.O_PATH | os.O_CLOEXEC
_O_PARENT = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
_O_DIR_OBJECT = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NONBLOCK
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
PATH_MAX = 4096  # including the NUL: the kernel refuses a path of 4096 or more bytes with ENAMETOOLONG
XATTR_SIZE_MAX = 65536  # the kernel refuses a larger xattr value with E2BIG before anything else


@dataclass(slots=True)
class Result:
    """What a request produced: errno (0 = success) and, on success, a payload or an fd to send."""

    errno: int = 0
    payload: bytes = b""
    fd: int | None = None


OK = Result()
_stat_payload = p.stat_payload


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

    @staticmethod
    def check_path(path: bytes) -> None:
        """What getname() refuses before any lookup: an empty path (ENOENT, as open("") gives) and one of
        PATH_MAX bytes or more (ENAMETOOLONG). The latter must be checked here because target() hands
        the kernel only the parent and the last component, each of which may be short enough."""
        if not path:
            raise OSError(errno.ENOENT, "empty path")
        if len(path) >= PATH_MAX:
            raise OSError(errno.ENAMETOOLONG, "path too long")

    def target(self, path: bytes) -> Target:
        """Resolve the parent of path beneath the root (after check_path)."""
        self.check_path(path)
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
        self.check_path(path)
        return sc.openat2(self.root_fd, path, _O_PATH if follow else _O_PATH | os.O_NOFOLLOW)

    def dir_object(self, path: bytes) -> int:
        """A real fd for a path that can only name a directory ('.', '..', 'x/', the root)."""
        return sc.openat2(self.root_fd, path, _O_DIR_OBJECT)

    def reopen(self, fd: int, flags: int, mode: int = 0) -> int:
        """Open the inode behind an O_PATH fd with new flags, through /proc/self/fd: no name lookup.
        mode matters only for O_TMPFILE (a new inode in the directory fd names); it must be passed
        explicitly, since os.open's default would give such a file 0777."""
        return os.open(b"%d" % fd, (flags & ~_NAME_ONLY_FLAGS) | os.O_CLOEXEC, mode, dir_fd=self.proc_fd)

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

    @staticmethod
    def _check_open_flags(flags: int) -> None:
        """The flag combinations open(2) refuses with EINVAL before any lookup (build_open_flags)."""
        if flags & os.O_CREAT and flags & os.O_DIRECTORY:  # also covers O_TMPFILE | O_CREAT
            raise OSError(errno.EINVAL, "O_CREAT with O_DIRECTORY")
        tmpfile = os.O_TMPFILE & ~os.O_DIRECTORY
        if flags & tmpfile and (flags & os.O_TMPFILE != os.O_TMPFILE or flags & os.O_ACCMODE == 0):
            raise OSError(errno.EINVAL, "O_TMPFILE needs O_DIRECTORY and write access")

    def _open_existing(self, obj: int, flags: int, mode: int) -> Result:
        """Open an object that exists. Before the type check (which must come before any open, so that
        a FIFO never blocks and a device never sees an open), answer what open(2) answers for the object
        without opening it, in the kernel's order; the reference gets these from its open()."""
        if flags & os.O_CREAT and flags & os.O_EXCL:
            raise OSError(errno.EEXIST, "exists")
        st = os.fstat(obj)
        if flags & os.O_DIRECTORY and not stat.S_ISDIR(st.st_mode):
            raise OSError(errno.ENOTDIR, "not a directory")  # a FIFO, a device, a symlink (O_NOFOLLOW)
        if stat.S_ISLNK(st.st_mode) and not flags & os.O_PATH:
            raise OSError(errno.ELOOP, "O_NOFOLLOW on a symlink")  # O_PATH|O_NOFOLLOW: ENXIO below
        if stat.S_ISDIR(st.st_mode) and flags & os.O_CREAT and not flags & os.O_PATH:
            raise OSError(errno.EISDIR, "O_CREAT on a directory")  # O_PATH ignores O_CREAT
        # _openable's type check on the fstat above (the same O_PATH fd: a second fstat learnt nothing).
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            raise OSError(errno.ENXIO, "not a regular file or directory")
        return Result(fd=self.reopen(obj, flags, mode))

    def _open_or_create(self, path: bytes, flags: int, mode: int) -> Result:
        flags &= _VALID_OPEN_FLAGS
        self._check_open_flags(flags)
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
                return self._open_existing(obj, flags, mode)
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

    @staticmethod
    def _at_name(t: Target) -> bytes:
        """The name to hand an *at() call that never follows its final component (mkdir, mknod,
        symlink, unlink/rmdir, rename, link's new name). A trailing slash stays on the name: the kernel
        then insists on a directory (or refuses to create a non-directory) exactly as for the full
        path, and these calls do not follow the final component even so."""
        assert t.name is not None
        return t.name + b"/" if t.dir_only and t.name not in (b".", b"..") else t.name

    def _name_op(
        self, path: bytes, op: Callable[[int, bytes], object], root_errno: int = errno.EEXIST
    ) -> Result:
        t = self.target(path)
        try:
            if t.name is None:
                # The root itself: creating it is EEXIST and removing it EBUSY, as the kernel answers
                # for "/" (the reference's mkdir("/") inside its chroot).
                raise OSError(root_errno, "the export root")
            op(t.dirfd, self._at_name(t))
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

    def link(self, r: p.Link) -> Result:
        a = self.target(r.path)
        try:
            b = self.target(r.path2)
            try:
                if a.dir_only:
                    # 'x/', 'x/.', '..', '/': link(2) follows a final symlink here and insists on a
                    # directory (the trailing slash used to be dropped, linking 'file/' as 'file').
                    # Following by name from the parent fd would not stay beneath the root, so resolve
                    # it beneath the root; what it names is a directory, which link(2) refuses with
                    # EPERM once the new name checks out -- answered here without a linkat at all.
                    os.close(self.dir_object(r.path))
                    self._link_new_name_free(b)
                    raise OSError(errno.EPERM, "hard link to a directory")
                assert a.name is not None
                if b.name is None:  # link(2) looks the old name up first, then finds "/" exists
                    os.stat(a.name, dir_fd=a.dirfd, follow_symlinks=False)
                    raise OSError(errno.EEXIST, "the export root")
                os.link(
                    a.name, self._at_name(b), src_dir_fd=a.dirfd, dst_dir_fd=b.dirfd, follow_symlinks=False
                )
                return OK
            finally:
                b.close()
        finally:
            a.close()

    def _link_new_name_free(self, b: Target) -> None:
        """link(2)'s checks of the new name (filename_create): EEXIST when it exists (the root, '.', '..'
        included), ENOENT for a missing name with a trailing slash."""
        if b.name is None:
            raise OSError(errno.EEXIST, "the export root")
        try:
            os.stat(b.name, dir_fd=b.dirfd, follow_symlinks=False)
        except FileNotFoundError:
            if b.dir_only:
                raise
            return
        raise OSError(errno.EEXIST, "exists")

    def rename(self, r: p.Rename) -> Result:
        a = self.target(r.path)
        try:
            b = self.target(r.path2)
            try:
                if a.name is None or b.name is None:
                    raise OSError(errno.EBUSY, "the export root")  # rename(2) of or onto "/"
                # Trailing slashes stay (rename(2) never follows a final symlink, slash or not): dropping
                # them renamed 'file/' as 'file' where the kernel answers ENOTDIR.
                os.rename(self._at_name(a), self._at_name(b), src_dir_fd=a.dirfd, dst_dir_fd=b.dirfd)
                return OK
            finally:
                b.close()
        finally:
            a.close()

    def remove(self, r: p.Remove) -> Result:
        def remove_at(dirfd: int, name: bytes) -> None:
            try:
                os.unlink(name, dir_fd=dirfd)
            except IsADirectoryError:  # remove(3): unlink, and rmdir when it is a directory
                os.rmdir(name, dir_fd=dirfd)

        return self._name_op(r.path, remove_at, errno.EBUSY)

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
        # The most frequent request: target() and _inode_op inlined for a plain name (no trailing slash,
        # not '.' or '..'), without a Target and two closures per call; anything else takes the general
        # path. Same resolution: the parent beneath the root, then fstatat without following the name.
        path = r.path
        self.check_path(path)
        stripped = path.rstrip(b"/")
        slash = stripped.rfind(b"/")
        name = stripped[slash + 1 :]
        if not stripped or len(stripped) != len(path) or name == b"." or name == b"..":
            return self._inode_op(
                path,
                lambda d, n: Result(0, _stat_payload(os.stat(n, dir_fd=d, follow_symlinks=False))),
                lambda fd: Result(0, _stat_payload(os.fstat(fd))),
            )
        parent = stripped[: slash + 1]
        if not parent.strip(b"/"):  # a top-level name: the root fd is the parent
            return Result(0, _stat_payload(os.stat(name, dir_fd=self.root_fd, follow_symlinks=False)))
        dirfd = sc.openat2(self.root_fd, parent, _O_PARENT)
        try:
            st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
        finally:
            os.close(dirfd)
        return Result(0, _stat_payload(st))

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
            # Through /proc/self/fd, following the magic link: glibc's utimensat refuses a NULL path
            # with EINVAL (so fd + NULL, futimens' form, failed for every 'dir/' path).
            sc.utimensat(self.proc_fd, b"%d" % fd, atime, mtime, 0)
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
        if r.size & 0xFFFFFFFF > XATTR_SIZE_MAX:
            # What the kernel answers (and so the reference) for a size it would never copy, -1 included.
            return Result(errno.E2BIG)
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
        if r.length >= 1 << 63:  # a negative off_t: truncate(2) refuses it before looking at the path
            return Result(errno.EINVAL)
        obj = self.object_fd(r.path, follow=True)
        try:
            mode = os.fstat(obj).st_mode
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
        finally:
            os.close(obj)

    def statfs(self, r: p.Statfs) -> Result:
        obj = self.object_fd(r.path, follow=True)
        try:
            fields = list(sc.fstatfs(obj))
            # f_fsid is two ints; the reference widens each to its u64 field with sign extension, so
            # match it on the wire (fstatfs hands them back as unsigned 32-bit values).
            for i in (7, 8):
                fields[i] = fields[i] - (1 << 32) if fields[i] & 0x80000000 else fields[i]
            return Result(payload=p.statfs_payload(tuple(fields)))
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
