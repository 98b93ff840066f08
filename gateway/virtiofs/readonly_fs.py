"""A read-only FUSE file system over the export, the first that ``gateway virtiofsd`` serves.

Served: INIT, DESTROY, LOOKUP, FORGET, BATCH_FORGET, GETATTR, READLINK, ACCESS, STATFS, OPEN, READ,
FLUSH, FSYNC, RELEASE, OPENDIR, READDIR, READDIRPLUS, RELEASEDIR, FSYNCDIR. Every request that would
change the export gets EROFS; the xattr reads and LSEEK get ENOSYS (the kernel then stops asking).

Every lookup goes through the shared core (gateway.core.resolve.Resolver: openat2 beneath the root fd,
RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS, the final component never followed), so a symlink or a '..'
cannot lead out of the export, and the inode table records the canonical path that lookup found. Only
regular files are opened for reading and only directories for listing, by reopening the O_PATH fd
(through /proc/self/fd, as virtiofsd does); a FIFO or a device is never opened.

Not here yet (the next session): the rules' decision for each request (``fuse_requests.RULES_OPS``),
the audit trail, the uid/gid of the guest's caller, the sandbox.
"""

from __future__ import annotations

import errno
import os
import stat

from gateway.core.resolve import Resolver
from gateway.virtiofs import fuse_encode as enc
from gateway.virtiofs import fuse_requests as r
from gateway.virtiofs.fuse_decode import Malformed
from gateway.virtiofs.inodes import Handle, HandleTable, Inode, InodeTable

_WRITES = (r.Setattr, r.Symlink, r.Mknod, r.Mkdir, r.Unlink, r.Rmdir, r.Rename, r.Link, r.Write,
           r.Create, r.Setxattr, r.Removexattr, r.Fallocate)
_NOT_SERVED = (r.Getxattr, r.Listxattr, r.Lseek)
_ACCMODE_WRITE = os.O_WRONLY | os.O_RDWR
MAX_READ = 1 << 20


class ReadOnlyFs:
    def __init__(self, root_fd: int, proc_fd: int, *, max_inodes: int = 1 << 16,
                 max_handles: int = 4096) -> None:
        self.resolver = Resolver(root_fd, proc_fd)
        self.proc_fd = proc_fd
        self.inodes = InodeTable(root_fd, max_inodes)
        self.handles = HandleTable(max_handles)
        self.initialized = False
        self.flags = 0

    def close(self) -> None:
        self.handles.close()
        self.inodes.close()

    # --- entry point ---------------------------------------------------------------------------------
    def handle(self, req: r.Request | Malformed) -> bytes | None:
        """The reply for one decoded request, or None when it gets none (FORGET)."""
        if isinstance(req, Malformed):
            return enc.reply_error(req.unique, req.errno) if req.reply else None
        try:
            return self._dispatch(req)
        except (OSError, OverflowError, ValueError) as exc:
            # A guest value a system call cannot take (an offset past 2**63, say) is EINVAL, as the
            # kernel would say; nothing a guest sends may end the back-end.
            if isinstance(req, r.Forget | r.BatchForget):
                return None
            err = exc.errno if isinstance(exc, OSError) and exc.errno else errno.EINVAL
            return enc.reply_error(req.unique, err)

    def _dispatch(self, req: r.Request) -> bytes | None:
        if isinstance(req, r.Init):
            out = enc.negotiate_init(req, max_write=MAX_READ)
            self.initialized, self.flags = out.ok, out.flags
            return out.data
        if isinstance(req, r.Forget):  # never a reply, whatever the state
            self.inodes.forget(req.nodeid, req.nlookup)
            return None
        if isinstance(req, r.BatchForget):
            for nodeid, nlookup in req.forgets:
                self.inodes.forget(nodeid, nlookup)
            return None
        if not self.initialized:
            return enc.reply_error(req.unique, errno.EIO)  # nothing before INIT (the kernel's own rule)
        if isinstance(req, r.Destroy):
            self.handles.close()
            self.inodes.close()
            self.initialized = False
            return enc.reply(req.unique)
        if isinstance(req, _WRITES):
            return enc.reply_error(req.unique, errno.EROFS)
        if isinstance(req, _NOT_SERVED):
            return enc.reply_error(req.unique, errno.ENOSYS)
        inode = self.inodes.get(req.nodeid)
        if inode is None:
            return enc.reply_error(req.unique, errno.ESTALE)
        handler = _HANDLERS.get(type(req))
        if handler is None:
            return enc.reply_error(req.unique, errno.ENOSYS)
        return handler(self, req, inode)

    # --- names ---------------------------------------------------------------------------------------
    def _lookup(self, parent: Inode, name: bytes) -> tuple[Inode, os.stat_result]:
        if name in (b".", b".."):
            # Only the guest's NFS export code asks for these (FUSE_EXPORT_SUPPORT, not negotiated).
            raise OSError(errno.ENOENT, "no '.' or '..' lookups")
        path = parent.path.rstrip(b"/") + b"/" + name
        res = self.resolver.nofollow(path)
        try:
            if res.err:
                raise OSError(res.err, os.strerror(res.err))
            if res.fd < 0:
                raise OSError(errno.EIO, "no fd")
            fd, canonical = res.fd, res.path
            res.own_fd = False  # the table takes it
        finally:
            res.close()
        try:
            st = os.fstat(fd)
        except OSError:
            os.close(fd)
            raise
        return self.inodes.add(fd, canonical, st), st

    def _entry(self, inode: Inode, st: os.stat_result) -> bytes:
        return enc.entry_out(inode.nodeid, inode.generation, enc.attr_from_stat(st))

    def lookup(self, req: r.Lookup, parent: Inode) -> bytes:
        inode, st = self._lookup(parent, req.name)
        return enc.reply(req.unique, self._entry(inode, st))

    def getattr(self, req: r.Getattr, inode: Inode) -> bytes:
        return enc.reply(req.unique, enc.attr_out(enc.attr_from_stat(os.fstat(inode.fd))))

    def readlink(self, req: r.Readlink, inode: Inode) -> bytes:
        if not stat.S_ISLNK(os.fstat(inode.fd).st_mode):
            return enc.reply_error(req.unique, errno.EINVAL)
        return enc.reply(req.unique, os.readlink(b"", dir_fd=inode.fd))

    def access(self, req: r.Access, inode: Inode) -> bytes:
        if req.mask & os.W_OK:
            return enc.reply_error(req.unique, errno.EROFS)
        return enc.reply(req.unique)

    def statfs(self, req: r.Statfs, inode: Inode) -> bytes:
        return enc.reply(req.unique, enc.statfs_out(os.fstatvfs(inode.fd)))

    # --- files ---------------------------------------------------------------------------------------
    def _reopen(self, inode: Inode, want_dir: bool) -> int:
        """A readable fd of the object, never of a special file: the type is checked on the O_PATH fd
        first, then the object is reopened through /proc/self/fd (no path is looked up again)."""
        mode = os.fstat(inode.fd).st_mode
        if want_dir and not stat.S_ISDIR(mode):
            raise OSError(errno.ENOTDIR, "not a directory")
        if not want_dir and not stat.S_ISREG(mode):
            raise OSError(errno.EISDIR if stat.S_ISDIR(mode) else errno.ENXIO, "not a regular file")
        flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | (os.O_DIRECTORY if want_dir else 0)
        return os.open(b"%d" % inode.fd, flags, dir_fd=self.proc_fd)

    def open(self, req: r.Open, inode: Inode) -> bytes:
        if req.flags & (_ACCMODE_WRITE | os.O_TRUNC | os.O_CREAT | os.O_APPEND):
            return enc.reply_error(req.unique, errno.EROFS)
        handle = self.handles.add(self._reopen(inode, want_dir=False), inode, is_dir=False)
        return enc.reply(req.unique, enc.open_out(handle.fh))

    def read(self, req: r.Read, inode: Inode) -> bytes:
        handle = self.handles.get(req.fh, is_dir=False)
        if handle is None:
            return enc.reply_error(req.unique, errno.EBADF)
        if req.offset >= 1 << 63:
            return enc.reply_error(req.unique, errno.EINVAL)  # loff_t is signed
        data = os.pread(handle.fd, min(req.size, MAX_READ), req.offset)
        handle.bytes_read += len(data)
        return enc.reply(req.unique, data)

    def release(self, req: r.Release, inode: Inode) -> bytes:
        is_dir = isinstance(req, r.Releasedir)
        if self.handles.release(req.fh, is_dir) is None:
            return enc.reply_error(req.unique, errno.EBADF)
        return enc.reply(req.unique)

    def flush(self, req: r.Flush | r.Fsync, inode: Inode) -> bytes:
        return enc.reply(req.unique)  # nothing was written

    # --- directories ---------------------------------------------------------------------------------
    def opendir(self, req: r.Opendir, inode: Inode) -> bytes:
        handle = self.handles.add(self._reopen(inode, want_dir=True), inode, is_dir=True)
        return enc.reply(req.unique, enc.open_out(handle.fh))

    def _listing(self, handle: Handle, offset: int) -> list[tuple[bytes, int, int]]:
        # A fresh listing when the guest starts from the beginning (opendir, rewinddir), else the one it
        # is walking: offsets are positions in it, stable while it lasts.
        if handle.entries is None or offset == 0:
            st = os.fstat(handle.fd)
            entries = [(b".", st.st_ino, enc.dirent_type(stat.S_IFDIR)),
                       (b"..", st.st_ino, enc.dirent_type(stat.S_IFDIR))]  # the guest fills ".."
            with os.scandir(handle.fd) as it:
                for e in it:
                    name = os.fsencode(e.name)
                    try:
                        kind = enc.dirent_type(e.stat(follow_symlinks=False).st_mode)
                    except OSError:
                        kind = 0  # DT_UNKNOWN: it went away meanwhile
                    entries.append((name, e.inode(), kind))
            handle.entries = entries
        return handle.entries

    def readdir(self, req: r.Readdir, inode: Inode) -> bytes:
        handle = self.handles.get(req.fh, is_dir=True)
        if handle is None:
            return enc.reply_error(req.unique, errno.EBADF)
        entries = self._listing(handle, req.offset)
        buf = enc.DirentBuffer(min(req.size, MAX_READ))
        plus = isinstance(req, r.Readdirplus)
        for index in range(req.offset, len(entries)):
            name, ino, kind = entries[index]
            if not plus:
                if not buf.add(ino, index + 1, kind, name):
                    break
                continue
            entry, child = self._plus_entry(handle.inode, name)
            if not buf.add_plus(entry, ino, index + 1, kind, name):
                if child is not None:
                    self.inodes.forget(child.nodeid, 1)  # not sent: the guest does not count it
                break
        return enc.reply(req.unique, buf.body())

    def _plus_entry(self, parent: Inode, name: bytes) -> tuple[bytes, Inode | None]:
        zero = enc.Attr(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
        if name in (b".", b".."):
            return enc.entry_out(0, 0, zero), None  # nodeid 0: the kernel makes no dentry of it
        try:
            child, st = self._lookup(parent, name)
        except OSError:
            return enc.entry_out(0, 0, zero), None  # gone (or refused) meanwhile: a plain entry
        return self._entry(child, st), child


_HANDLERS = {
    r.Lookup: ReadOnlyFs.lookup,
    r.Getattr: ReadOnlyFs.getattr,
    r.Readlink: ReadOnlyFs.readlink,
    r.Access: ReadOnlyFs.access,
    r.Statfs: ReadOnlyFs.statfs,
    r.Open: ReadOnlyFs.open,
    r.Read: ReadOnlyFs.read,
    r.Release: ReadOnlyFs.release,
    r.Flush: ReadOnlyFs.flush,
    r.Fsync: ReadOnlyFs.flush,
    r.Opendir: ReadOnlyFs.opendir,
    r.Readdir: ReadOnlyFs.readdir,
    r.Readdirplus: ReadOnlyFs.readdir,
    r.Releasedir: ReadOnlyFs.release,
    r.Fsyncdir: ReadOnlyFs.flush,
}
