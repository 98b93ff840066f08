"""The writable FUSE file system ``gateway virtiofsd`` serves (without ``--readonly``).

Everything that reads is ReadOnlyFs's. Everything that changes the export goes through the 9p pipeline's
own steps and code: the FUSE request becomes the policy's request (gateway.virtiofs.policy), that request is
resolved once beneath the root by the shared resolver (gateway.core.resolve, via the Executor), decided on
what was reached (its canonical path(s) and the object), and performed by the 9p executor on exactly that
resolution (gateway.core.executor: the *at() calls in the resolved parent, /proc/self/fd for the inode
calls, create-type requests under the guest's uid/gid with setfsuid/setfsgid, gateway.core.fsids). The
policy's id map applies as for 9p (tenancy.IdTranslator). No system call here is new: what is not the
executor's is a call on a handle the guest opened (pwrite, fsync, fallocate, lseek).

The inode table's canonical paths stay true: a RENAME moves the paths of the renamed entry and of all
below it (``InodeTable.rename_subtree``); a LINK gives the object a second name, and its inode keeps the
first, which still exists. MKNOD makes regular files and FIFOs only (EPERM for the rest, whatever the
policy says); RENAME2 with flags (NOREPLACE, EXCHANGE, WHITEOUT) gets ENOSYS, and the guest's kernel then
answers EINVAL and stops sending them.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import stat
from collections.abc import Callable

from gateway import protocol as p
from gateway.audit.writer import fallocate
from gateway.core.executor import Executor, Result
from gateway.core.resolve import Resolution
from gateway.tenancy import Refused
from gateway.virtiofs import fuse_encode as enc
from gateway.virtiofs import fuse_requests as r
from gateway.virtiofs.inodes import Inode
from gateway.virtiofs.policy import Denied, Gate, join, rules_requests, setattr_requests
from gateway.virtiofs.readonly_fs import _HANDLERS, ReadOnlyFs

_ACCMODE_WRITE = os.O_WRONLY | os.O_RDWR
_MKNOD_TYPES = (stat.S_IFREG, stat.S_IFIFO)


class ExportFs(ReadOnlyFs):
    DECIDED_ON_INODE = frozenset({r.Getattr, r.Access, r.Readlink, r.Statfs, r.Opendir})

    def __init__(self, root_fd: int, proc_fd: int, *, max_inodes: int = 1 << 16, max_handles: int = 4096,
                 gate: Gate | None = None, executor: Executor | None = None) -> None:
        super().__init__(root_fd, proc_fd, max_inodes=max_inodes, max_handles=max_handles, gate=gate)
        self.executor = executor or Executor(root_fd, proc_fd, getversion_supported=False)

    @staticmethod
    def _path(inode: Inode) -> bytes:
        """The canonical path to decide and act on; none for an inode whose name went away."""
        if inode.removed:
            raise OSError(errno.ESTALE, "its name was removed")
        return inode.path

    # --- the 9p pipeline's steps, for one policy request ----------------------------------------------
    def _run(self, request: p.Request, perform: Callable[[Resolution], Result] | None = None,
             refuse: int = 0) -> tuple[Result, p.Request]:
        """Resolve once, decide on what was reached, perform on it. Returns the result (an errno raises
        OSError) and the request as decided (its canonical paths). ``refuse``: an errno this back-end
        answers after the decision whatever it said (a device MKNOD)."""
        res = self.executor.resolve(request)
        try:
            decided = request
            first, second = res.first, res.second
            if second is not None:
                decided = dataclasses.replace(request, path=first.path, path2=second.path)  # type: ignore[call-arg]
            elif first.path != request.path:
                decided = dataclasses.replace(request, path=first.path)  # type: ignore[call-arg]
            gate = self.gate
            performed = request
            if gate is not None:
                gate.check(decided, first.stat)
                if gate.ids is not None:
                    try:
                        performed = gate.ids.to_host(request)
                    except Refused as refusal:
                        gate.refused(refusal.errno, refusal.rule, refusal.reason)
                        raise Denied(refusal.errno) from None
                    if performed is not request:
                        gate.note(host_uid=performed.uid, host_gid=performed.gid)  # type: ignore[union-attr]
            if refuse:
                raise OSError(refuse, os.strerror(refuse))
            result = perform(res) if perform is not None else self.executor.perform(performed, res)
        finally:
            res.close()
        if result.errno:
            if result.fd is not None:
                os.close(result.fd)
            raise OSError(result.errno, os.strerror(result.errno))
        return result, decided

    def _made(self, req: r.Request, parent: Inode, name: bytes) -> bytes:
        """The entry a decided request has just made, as its reply (entry_out)."""
        inode, st = self._lookup(parent, name, check=False)
        return enc.reply(req.unique, self._entry(inode, st))

    # --- names ----------------------------------------------------------------------------------------
    def _name_request(self, req: r.Request, parent: Inode, name: bytes) -> p.Request:
        (request,) = rules_requests(req, join(self._path(parent), name))
        return request

    def mkdir(self, req: r.Mkdir, parent: Inode) -> bytes:
        self._run(self._name_request(req, parent, req.name))
        return self._made(req, parent, req.name)

    def mknod(self, req: r.Mknod, parent: Inode) -> bytes:
        refuse = 0 if stat.S_IFMT(req.mode) in _MKNOD_TYPES else errno.EPERM
        self._run(self._name_request(req, parent, req.name), refuse=refuse)
        return self._made(req, parent, req.name)

    def symlink(self, req: r.Symlink, parent: Inode) -> bytes:
        self._run(self._name_request(req, parent, req.name))
        return self._made(req, parent, req.name)

    def create(self, req: r.Create, parent: Inode) -> bytes:
        result, _ = self._run(self._name_request(req, parent, req.name))
        assert result.fd is not None
        fd = result.fd
        try:
            inode, st = self._lookup(parent, req.name, check=False)
        except OSError:
            os.close(fd)
            raise
        if (st.st_dev, st.st_ino) != inode.key or (os.fstat(fd).st_ino != st.st_ino):
            os.close(fd)  # pragma: no cover - replaced between the create and the lookup
            raise OSError(errno.EIO, "the created file went away")
        handle = self.handles.add(fd, inode, is_dir=False)
        return enc.reply(req.unique, enc.create_out(inode.nodeid, inode.generation, enc.attr_from_stat(st),
                                                    handle.fh))

    def _remove(self, req: r.Unlink | r.Rmdir, parent: Inode) -> bytes:
        rmdir = isinstance(req, r.Rmdir)
        executor = self.executor

        gone: list[tuple[int, int] | None] = [None]

        def perform(res: Resolution) -> Result:
            st = res.first.stat()
            gone[0] = (st.st_dev, st.st_ino) if st is not None else None
            # remove(3)'s 9p form tries both; FUSE says which one the guest called.
            if rmdir:
                return executor._name_op(res.first, lambda d, n: os.rmdir(n, dir_fd=d), errno.EBUSY)
            return executor._name_op(res.first, lambda d, n: os.unlink(n, dir_fd=d), errno.EBUSY)

        _, decided = self._run(self._name_request(req, parent, req.name), perform)
        self.inodes.removed(decided.path, gone[0])
        return enc.reply(req.unique)

    def unlink(self, req: r.Unlink, parent: Inode) -> bytes:
        return self._remove(req, parent)

    def rmdir(self, req: r.Rmdir, parent: Inode) -> bytes:
        return self._remove(req, parent)

    def rename(self, req: r.Rename, parent: Inode) -> bytes:
        if req.flags:
            return enc.reply_error(req.unique, errno.ENOSYS)
        newdir = self.inodes.get(req.newdir)
        if newdir is None:
            return enc.reply_error(req.unique, errno.ESTALE)
        request = rules_requests(req, join(self._path(parent), req.oldname),
                                 join(self._path(newdir), req.newname))[0]
        replaced: list[tuple[int, int] | None] = [None]

        def perform(res: Resolution) -> Result:
            assert res.second is not None
            st = res.second.stat()  # what the new name held, if anything: it is replaced
            replaced[0] = (st.st_dev, st.st_ino) if st is not None else None
            return self.executor.perform(request, res)

        _, decided = self._run(request, perform)
        new = decided.path2  # type: ignore[union-attr]
        self.inodes.removed(new, replaced[0])
        self.inodes.rename_subtree(decided.path, new)
        return enc.reply(req.unique)

    def link(self, req: r.Link, parent: Inode) -> bytes:
        old = self.inodes.get(req.oldnodeid)
        if old is None:
            return enc.reply_error(req.unique, errno.ESTALE)
        (request,) = rules_requests(req, self._path(old), join(self._path(parent), req.newname))
        self._run(request)
        return self._made(req, parent, req.newname)  # the same inode: it keeps its first, existing name

    # --- attributes -----------------------------------------------------------------------------------
    def setattr(self, req: r.Setattr, inode: Inode) -> bytes:
        for request in setattr_requests(req, self._path(inode)):
            self._run(request)
        return enc.reply(req.unique, enc.attr_out(enc.attr_from_stat(os.fstat(inode.fd))))

    def access(self, req: r.Access, inode: Inode) -> bytes:
        return enc.reply(req.unique)  # decided as an lstat; the guest's kernel checks the mode bits

    def getxattr(self, req: r.Getxattr | r.Listxattr, inode: Inode) -> bytes:
        (request,) = rules_requests(req, self._path(inode))
        result, _ = self._run(request)
        if req.size == 0:
            return enc.reply(req.unique, enc.getxattr_size_out(int.from_bytes(result.payload[:4], "little")))
        return enc.reply(req.unique, result.payload[2:])  # the 9p string payload: u16 length, value

    def setxattr(self, req: r.Setxattr | r.Removexattr, inode: Inode) -> bytes:
        (request,) = rules_requests(req, self._path(inode))
        self._run(request)
        return enc.reply(req.unique)

    # --- handles --------------------------------------------------------------------------------------
    def open(self, req: r.Open, inode: Inode) -> bytes:
        (request,) = rules_requests(req, self._path(inode))
        result, _ = self._run(request)
        assert result.fd is not None
        handle = self.handles.add(result.fd, inode, is_dir=False)
        return enc.reply(req.unique, enc.open_out(handle.fh))

    def write(self, req: r.Write, inode: Inode) -> bytes:
        handle = self.handles.get(req.fh, is_dir=False)
        if handle is None:
            return enc.reply_error(req.unique, errno.EBADF)
        if req.offset >= 1 << 63:
            return enc.reply_error(req.unique, errno.EINVAL)
        written = os.pwrite(handle.fd, req.data, req.offset)
        handle.bytes_written += written
        return enc.reply(req.unique, enc.write_out(written))

    def fsync(self, req: r.Fsync, inode: Inode) -> bytes:
        handle = self.handles.get(req.fh, is_dir=isinstance(req, r.Fsyncdir))
        if handle is None:
            return enc.reply_error(req.unique, errno.EBADF)
        (os.fdatasync if req.fsync_flags & 1 else os.fsync)(handle.fd)
        return enc.reply(req.unique)

    def fallocate(self, req: r.Fallocate, inode: Inode) -> bytes:
        handle = self.handles.get(req.fh, is_dir=False)
        if handle is None:
            return enc.reply_error(req.unique, errno.EBADF)
        fallocate(handle.fd, req.mode, req.offset, req.length)
        return enc.reply(req.unique)

    def lseek(self, req: r.Lseek, inode: Inode) -> bytes:
        handle = self.handles.get(req.fh, is_dir=False)
        if handle is None:
            return enc.reply_error(req.unique, errno.EBADF)
        return enc.reply(req.unique, enc.lseek_out(os.lseek(handle.fd, req.offset, req.whence)))


ExportFs.HANDLERS = {
    **_HANDLERS,
    r.Access: ExportFs.access,
    r.Open: ExportFs.open,
    r.Create: ExportFs.create,
    r.Mkdir: ExportFs.mkdir,
    r.Mknod: ExportFs.mknod,
    r.Symlink: ExportFs.symlink,
    r.Unlink: ExportFs.unlink,
    r.Rmdir: ExportFs.rmdir,
    r.Rename: ExportFs.rename,
    r.Rename2: ExportFs.rename,
    r.Link: ExportFs.link,
    r.Setattr: ExportFs.setattr,
    r.Getxattr: ExportFs.getxattr,
    r.Listxattr: ExportFs.getxattr,
    r.Setxattr: ExportFs.setxattr,
    r.Removexattr: ExportFs.setxattr,
    r.Write: ExportFs.write,
    r.Fsync: ExportFs.fsync,
    r.Fsyncdir: ExportFs.fsync,
    r.Fallocate: ExportFs.fallocate,
    r.Lseek: ExportFs.lseek,
}
