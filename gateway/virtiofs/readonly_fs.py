"""A read-only FUSE file system over the export, the first that ``gateway virtiofsd`` serves.

Served: INIT, DESTROY, LOOKUP, FORGET, BATCH_FORGET, GETATTR, READLINK, ACCESS, STATFS, OPEN, READ,
FLUSH, FSYNC, RELEASE, OPENDIR, READDIR, READDIRPLUS, RELEASEDIR, FSYNCDIR. Every request that would
change the export gets EROFS; the xattr reads and LSEEK get ENOSYS (the kernel then stops asking).

Every lookup goes through the shared core (gateway.core.resolve.Resolver: openat2 beneath the root fd,
RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS, the final component never followed), so a symlink or a '..'
cannot lead out of the export, and the inode table records the canonical path that lookup found. Only
regular files are opened for reading and only directories for listing, by reopening the O_PATH fd
(through /proc/self/fd, as virtiofsd does); a FIFO or a device is never opened.

With a ``gate`` (gateway.virtiofs.policy.Gate), every request is first decided by the policy, as the
9p request it maps to (a deny gets the rule's errno and nothing is performed), and recorded in the
trail before its reply goes back; the writes too, decided before this back-end refuses them (EROFS).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable

from gateway import protocol as p
from gateway.core.resolve import Resolver
from gateway.virtiofs import fuse_encode as enc
from gateway.virtiofs import fuse_requests as r
from gateway.virtiofs.fuse_decode import Malformed
from gateway.virtiofs.inodes import Handle, HandleTable, Inode, InodeTable
from gateway.virtiofs.policy import Denied, Gate, join, reply_errno, rules_requests

_WRITES = (r.Setattr, r.Symlink, r.Mknod, r.Mkdir, r.Unlink, r.Rmdir, r.Rename, r.Link, r.Write,
           r.Create, r.Setxattr, r.Removexattr, r.Fallocate)
_NOT_SERVED = (r.Getxattr, r.Listxattr, r.Lseek)
# Decided on the inode's own path before the handler runs (LOOKUP is decided on what it resolves to).
_DECIDED_ON_INODE = frozenset({r.Getattr, r.Access, r.Readlink, r.Statfs, r.Open, r.Opendir})
_ACCMODE_WRITE = os.O_WRONLY | os.O_RDWR
MAX_READ = 1 << 20


class ReadOnlyFs:
    HANDLERS: dict[type, Callable[..., bytes | None]]  # set below the class (ExportFs: more)
    DECIDED_ON_INODE: frozenset[type] = _DECIDED_ON_INODE

    def __init__(self, root_fd: int, proc_fd: int, *, max_inodes: int = 1 << 16,
                 max_handles: int = 4096, gate: Gate | None = None) -> None:
        self.gate = gate  # the policy and the trail (gateway.virtiofs.policy); None: neither
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
        gate = self.gate
        if gate is not None:
            gate.begin()
        try:
            out = self._dispatch(req)
        except Denied as denied:
            out = enc.reply_error(req.unique, denied.errno)
        except (OSError, OverflowError, ValueError) as exc:
            # A guest value a system call cannot take (an offset past 2**63, say) is EINVAL, as the
            # kernel would say; nothing a guest sends may end the back-end.
            if isinstance(req, r.Forget | r.BatchForget):
                return None
            err = exc.errno if isinstance(exc, OSError) and exc.errno else errno.EINVAL
            out = enc.reply_error(req.unique, err)
        # Recorded before the reply goes back; a reply the trail lacks is not sent (EIO instead).
        if gate is not None and gate.pending and not gate.finish(reply_errno(out)):
            out = enc.reply_error(req.unique, errno.EIO)
        return out

    def _check_inode(self, req: r.Request, inode: Inode, path2: bytes = b"") -> None:
        """Decide the request(s) a FUSE request on ``inode`` maps to (a deny raises Denied)."""
        gate = self.gate
        if gate is None:
            return
        for request in rules_requests(req, inode.path, path2):
            gate.check(request, lambda: os.fstat(inode.fd))

    def _check_name(self, req: r.Request, parent: Inode, name: bytes) -> None:
        """Decide a request that names an entry of ``parent`` (it is decided on parent/name)."""
        gate = self.gate
        if gate is None:
            return
        path = join(parent.path, name)
        res = self.resolver.nofollow(path)
        try:
            for request in rules_requests(req, res.path):
                gate.check(request, res.stat)
        finally:
            res.close()

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
        handler = self.HANDLERS.get(type(req))
        if handler is None and isinstance(req, _NOT_SERVED):
            return enc.reply_error(req.unique, errno.ENOSYS)
        inode = self.inodes.get(req.nodeid)
        if inode is None:
            return enc.reply_error(req.unique, errno.ESTALE)
        if handler is None and isinstance(req, _WRITES):
            self._check_write(req, inode)  # decided (and recorded) even though read-only refuses it
            return enc.reply_error(req.unique, errno.EROFS)
        if handler is None:
            return enc.reply_error(req.unique, errno.ENOSYS)
        if type(req) in self.DECIDED_ON_INODE:
            self._check_inode(req, inode)
        return handler(self, req, inode)

    def _check_write(self, req: r.Request, inode: Inode) -> None:
        if self.gate is None:
            return
        if isinstance(req, r.Rename):
            newdir = self.inodes.get(req.newdir)
            if newdir is None:
                raise OSError(errno.ESTALE, "unknown new directory")
            source = join(inode.path, req.oldname)
            res = self.resolver.nofollow(source)
            try:
                for request in rules_requests(req, res.path, join(newdir.path, req.newname)):
                    self.gate.check(request, res.stat)
            finally:
                res.close()
            return
        if isinstance(req, r.Link):
            old = self.inodes.get(req.oldnodeid)
            if old is None:
                raise OSError(errno.ESTALE, "unknown inode")
            self._check_inode(req, old, join(inode.path, req.newname))
            return
        name = getattr(req, "name", None)
        if name is not None and not isinstance(req, r.Setxattr | r.Removexattr):
            self._check_name(req, inode, name)
        else:
            self._check_inode(req, inode)

    # --- names ---------------------------------------------------------------------------------------
    def _lookup(self, parent: Inode, name: bytes, req: r.Request | None = None, *,
                check: bool = True) -> tuple[Inode, os.stat_result]:
        """One lookup of parent/name. With a gate, decided as an lstat of the path it resolved to: as the
        FUSE request ``req`` (a deny raises Denied, the record follows the reply), or for READDIRPLUS
        (``req`` None) quietly, a denied entry then being left for the guest to LOOKUP (and be refused).
        ``check`` False: the entry a decided request has just made (MKDIR's, CREATE's), not decided again."""
        if name in (b".", b".."):
            # Only the guest's NFS export code asks for these (FUSE_EXPORT_SUPPORT, not negotiated).
            raise OSError(errno.ENOENT, "no '.' or '..' lookups")
        if parent.removed:
            raise OSError(errno.ENOENT, "the directory was removed")
        path = parent.path.rstrip(b"/") + b"/" + name
        res = self.resolver.nofollow(path)
        try:
            gate = self.gate if check else None  # (not for the entry a decided create made)
            if gate is not None:
                if req is not None:
                    gate.check(p.Lstat(res.path), res.stat)
                elif not gate.allows(p.Lstat(res.path), res.stat):
                    raise OSError(errno.EACCES, "not prefetched: the policy decides its LOOKUP")
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
        inode, st = self._lookup(parent, req.name, req)
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
        handle = self.handles.release(req.fh, is_dir)
        if handle is None:
            return enc.reply_error(req.unique, errno.EBADF)
        if self.gate is not None:
            self.gate.released(handle.inode.path, is_dir=is_dir, bytes_read=handle.bytes_read,
                               bytes_written=handle.bytes_written)
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
ReadOnlyFs.HANDLERS = _HANDLERS
