"""The guest's inodes and open handles: a bounded table of O_PATH fds, each with its canonical path.

virtiofsd's model: a FUSE nodeid names an O_PATH fd the back-end holds, found by LOOKUP and kept until
the guest FORGETs as many lookups as it was given. Here each entry also keeps ``path``, the canonical
path inside the export that the lookup resolved (gateway.core.resolve, beneath the root fd): it is what
the rules will decide on, so it must stay true. The table grows by LOOKUP (and READDIRPLUS, which is a
LOOKUP per entry, and the entry a create-type request made); RENAME updates ``path`` of the entries it
moves, beneath the renamed one too (``rename_subtree``); a LINK leaves the inode its first name, which
still exists; UNLINK, RMDIR and a RENAME onto an existing name mark the inode whose path went away
``removed`` (``removed``): nothing is then decided or done on it by path.

Both tables are bounded: a guest that looks up more than ``max_inodes`` objects, or holds more than
``max_handles`` files open, gets ENFILE, and the back-end's own fd count stays bounded.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

from gateway.virtiofs.fuse_abi import FUSE_ROOT_ID


@dataclass
class Inode:
    nodeid: int
    fd: int  # O_PATH, never followed
    path: bytes  # canonical, inside the export ("/" for the root)
    key: tuple[int, int]  # (st_dev, st_ino): one nodeid per object, whatever name reached it
    nlookup: int = 0
    generation: int = 0
    # Its path was unlinked, or renamed over (the guest may hold it until FORGET): ``path`` no longer
    # names it, so nothing may be decided or done on it by path (ESTALE); its fd and handles still work.
    removed: bool = False


class TableFull(OSError):
    def __init__(self, what: str) -> None:
        super().__init__(errno.ENFILE, f"too many {what}")


class InodeTable:
    def __init__(self, root_fd: int, max_inodes: int = 1 << 16) -> None:
        st = os.fstat(root_fd)
        self.max_inodes = max_inodes
        self._next = FUSE_ROOT_ID + 1
        root = Inode(FUSE_ROOT_ID, root_fd, b"/", (st.st_dev, st.st_ino), nlookup=1)
        self._by_id: dict[int, Inode] = {FUSE_ROOT_ID: root}
        self._by_key: dict[tuple[int, int], Inode] = {root.key: root}

    def __len__(self) -> int:
        return len(self._by_id)

    def get(self, nodeid: int) -> Inode | None:
        return self._by_id.get(nodeid)

    def add(self, fd: int, path: bytes, st: os.stat_result) -> Inode:
        """One more lookup of the object behind ``fd`` (the table takes the fd, or closes it when the
        object already has an entry)."""
        key = (st.st_dev, st.st_ino)
        known = self._by_key.get(key)
        if known is not None:
            os.close(fd)
            known.nlookup += 1
            if known.removed:  # found again by a name that exists: that name is its path now
                known.path, known.removed = path, False
            return known
        if len(self._by_id) >= self.max_inodes:
            os.close(fd)
            raise TableFull("inodes")
        inode = Inode(self._next, fd, path, key, nlookup=1)
        self._next += 1
        self._by_id[inode.nodeid] = inode
        self._by_key[key] = inode
        return inode

    def forget(self, nodeid: int, nlookup: int) -> None:
        inode = self._by_id.get(nodeid)
        if inode is None or nodeid == FUSE_ROOT_ID:
            return  # the root lives as long as the session; an unknown nodeid is the guest's mistake
        inode.nlookup -= min(nlookup, inode.nlookup)
        if inode.nlookup == 0:
            del self._by_id[nodeid]
            del self._by_key[inode.key]
            os.close(inode.fd)

    def removed(self, path: bytes, key: tuple[int, int] | None) -> None:
        """``path`` no longer names the object ``key`` (unlinked, or replaced by a RENAME): its inode, if
        the table has one under that path, is marked removed."""
        inode = self._by_key.get(key) if key is not None else None
        if inode is not None and inode.path == path and inode.nodeid != FUSE_ROOT_ID:
            inode.removed = True

    def rename_subtree(self, old: bytes, new: bytes) -> None:
        """Keep canonical paths true after ``old`` became ``new`` (for RENAME, when it is served)."""
        prefix = old.rstrip(b"/") + b"/"
        for inode in self._by_id.values():
            if inode.removed:
                continue
            if inode.path == old:
                inode.path = new
            elif inode.path.startswith(prefix):
                inode.path = new.rstrip(b"/") + b"/" + inode.path[len(prefix):]

    def close(self) -> None:
        for inode in self._by_id.values():
            if inode.nodeid != FUSE_ROOT_ID:
                os.close(inode.fd)
        self._by_id = {k: v for k, v in self._by_id.items() if k == FUSE_ROOT_ID}
        self._by_key = {v.key: v for v in self._by_id.values()}


@dataclass
class Handle:
    fh: int
    fd: int
    inode: Inode
    is_dir: bool
    entries: list[tuple[bytes, int, int]] | None = None  # a directory's listing: (name, ino, DT_*)
    bytes_read: int = 0
    bytes_written: int = 0


class HandleTable:
    def __init__(self, max_handles: int = 4096) -> None:
        self.max_handles = max_handles
        self._next = 1
        self._by_fh: dict[int, Handle] = {}

    def __len__(self) -> int:
        return len(self._by_fh)

    def add(self, fd: int, inode: Inode, is_dir: bool) -> Handle:
        if len(self._by_fh) >= self.max_handles:
            os.close(fd)
            raise TableFull("open files")
        handle = Handle(self._next, fd, inode, is_dir)
        self._next += 1
        self._by_fh[handle.fh] = handle
        return handle

    def get(self, fh: int, is_dir: bool) -> Handle | None:
        handle = self._by_fh.get(fh)
        return handle if handle is not None and handle.is_dir == is_dir else None

    def release(self, fh: int, is_dir: bool) -> Handle | None:
        handle = self.get(fh, is_dir)
        if handle is not None:
            del self._by_fh[fh]
            os.close(handle.fd)
        return handle

    def close(self) -> None:
        for handle in self._by_fh.values():
            os.close(handle.fd)
        self._by_fh.clear()
