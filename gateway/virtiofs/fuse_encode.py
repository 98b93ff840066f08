"""FUSE replies as bytes for a chain's writable part: fuse_out_header plus the reply struct.

Pure functions of their arguments: the file-system layer gets the values (from fstat, statvfs, its
inode table) and these lay them out as Linux 6.1 reads them. ``negotiate_init`` is the INIT handshake.
"""

from __future__ import annotations

import errno as errno_mod
import os
import stat
from dataclasses import dataclass

from gateway.virtiofs import fuse_abi as abi
from gateway.virtiofs.fuse_requests import Init


def reply(unique: int, body: bytes = b"") -> bytes:
    return abi.OUT_HEADER.pack(abi.OUT_HEADER.size + len(body), 0, unique) + body


def reply_error(unique: int, err: int) -> bytes:
    """fuse_out_header alone, with ``error`` = -errno (the kernel rejects a positive or huge one)."""
    if not 0 < err < 4096:
        err = errno_mod.EIO
    return abi.OUT_HEADER.pack(abi.OUT_HEADER.size, -err, unique)


@dataclass(frozen=True)
class Attr:
    """struct fuse_attr."""

    ino: int
    size: int
    blocks: int
    atime: int
    mtime: int
    ctime: int
    atimensec: int
    mtimensec: int
    ctimensec: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    blksize: int
    flags: int = 0  # FUSE_ATTR_SUBMOUNT, FUSE_ATTR_DAX

    def pack(self) -> bytes:
        # rdev is a u32 in fuse_attr: the kernel's new_encode_dev packing (major 12 bits, minor 20).
        return abi.ATTR.pack(self.ino, self.size, self.blocks, self.atime, self.mtime, self.ctime,
                             self.atimensec, self.mtimensec, self.ctimensec, self.mode, self.nlink,
                             self.uid, self.gid, self.rdev, self.blksize, self.flags)


def encode_dev(rdev: int) -> int:
    """The kernel's new_encode_dev: what fuse_attr.rdev and fuse_mknod_in.rdev carry."""
    major, minor = os.major(rdev), os.minor(rdev)
    return ((minor & 0xFF) | (major & 0xFFF) << 8 | (minor & ~0xFF) << 12) & 0xFFFFFFFF


def attr_from_stat(st: os.stat_result, ino: int | None = None) -> Attr:
    """A fuse_attr from an lstat/fstat of the host object; ``ino`` overrides st_ino (the inode table
    may number nodes itself)."""
    return Attr(ino=st.st_ino if ino is None else ino, size=st.st_size, blocks=st.st_blocks,
                atime=int(st.st_atime), mtime=int(st.st_mtime), ctime=int(st.st_ctime),
                atimensec=st.st_atime_ns % 1_000_000_000, mtimensec=st.st_mtime_ns % 1_000_000_000,
                ctimensec=st.st_ctime_ns % 1_000_000_000, mode=st.st_mode, nlink=st.st_nlink,
                uid=st.st_uid, gid=st.st_gid, rdev=encode_dev(st.st_rdev), blksize=st.st_blksize)


def _split_timeout(seconds: float) -> tuple[int, int]:
    whole = int(seconds)
    return whole, int((seconds - whole) * 1_000_000_000)


def entry_out(nodeid: int, generation: int, attr: Attr, entry_timeout: float = 0.0,
              attr_timeout: float = 0.0) -> bytes:
    """struct fuse_entry_out (LOOKUP, MKNOD, MKDIR, SYMLINK, LINK, and CREATE's first half).
    nodeid 0 with an entry timeout is a cacheable negative entry."""
    ev, ev_ns = _split_timeout(entry_timeout)
    av, av_ns = _split_timeout(attr_timeout)
    return abi.ENTRY_OUT_HEAD.pack(nodeid, generation, ev, av, ev_ns, av_ns) + attr.pack()


def attr_out(attr: Attr, attr_timeout: float = 0.0) -> bytes:
    av, av_ns = _split_timeout(attr_timeout)
    return abi.ATTR_OUT_HEAD.pack(av, av_ns, 0) + attr.pack()


def open_out(fh: int, open_flags: int = 0) -> bytes:
    return abi.OPEN_OUT.pack(fh, open_flags, 0)


def create_out(nodeid: int, generation: int, attr: Attr, fh: int, open_flags: int = 0,
               entry_timeout: float = 0.0, attr_timeout: float = 0.0) -> bytes:
    return entry_out(nodeid, generation, attr, entry_timeout, attr_timeout) + open_out(fh, open_flags)


def write_out(size: int) -> bytes:
    return abi.WRITE_OUT.pack(size, 0)


def statfs_out(st: os.statvfs_result) -> bytes:
    """struct fuse_statfs_out (a fuse_kstatfs)."""
    return abi.KSTATFS.pack(st.f_blocks, st.f_bfree, st.f_bavail, st.f_files, st.f_ffree, st.f_bsize,
                            st.f_namemax, st.f_frsize, 0)


def getxattr_size_out(size: int) -> bytes:
    """GETXATTR/LISTXATTR with size 0: the size the value (or list) would need."""
    return abi.GETXATTR_OUT.pack(size, 0)


def lseek_out(offset: int) -> bytes:
    return abi.LSEEK_OUT.pack(offset)


# --- directories --------------------------------------------------------------------------------------
def _dirent(ino: int, off: int, kind: int, name: bytes) -> bytes:
    raw = abi.DIRENT_HEAD.pack(ino, off, len(name), kind) + name
    return raw + b"\0" * (-len(raw) % 8)  # FUSE_DIRENT_ALIGN: each entry padded to 8 bytes


def dirent_type(mode: int) -> int:
    """The DT_* the kernel expects in fuse_dirent.type: the S_IFMT bits shifted down (as in dirent.h)."""
    return stat.S_IFMT(mode) >> 12


class DirentBuffer:
    """READDIR/READDIRPLUS reply bodies, filled entry by entry until the guest's ``size`` is reached.
    ``add`` returns False (and adds nothing) when the entry would not fit: the guest asks again from
    that entry's offset."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.parts: list[bytes] = []
        self.used = 0

    def _put(self, data: bytes) -> bool:
        if self.used + len(data) > self.size:
            return False
        self.parts.append(data)
        self.used += len(data)
        return True

    def add(self, ino: int, off: int, kind: int, name: bytes) -> bool:
        """fuse_dirent: ``off`` is the offset of the *next* entry (what the guest sends back)."""
        return self._put(_dirent(ino, off, kind, name))

    def add_plus(self, entry: bytes, ino: int, off: int, kind: int, name: bytes) -> bool:
        """fuse_direntplus: an entry_out (``entry_out(...)``; nodeid 0 for '.' and '..', which the kernel
        does not look up), then the dirent."""
        return self._put(entry + _dirent(ino, off, kind, name))

    def body(self) -> bytes:
        return b"".join(self.parts)


# --- INIT ---------------------------------------------------------------------------------------------
# What this back-end asks for, when the kernel offers it. Deliberately absent: WRITEBACK_CACHE and
# the DAX window (the host must see every write as it happens, for the trail), POSIX_LOCKS and
# FLOCK_LOCKS (not served yet), SETXATTR_EXT and SECURITY_CTX (their request shapes are not decoded),
# POSIX_ACL (the kernel would then enforce ACLs itself; the rules decide here), SUBMOUNTS, and
# EXPORT_SUPPORT (LOOKUP of '.' and '..' by the guest's NFS export code: not needed, not served).
WANTED_FLAGS = (abi.FUSE_ASYNC_READ | abi.FUSE_ATOMIC_O_TRUNC | abi.FUSE_BIG_WRITES
                | abi.FUSE_DO_READDIRPLUS | abi.FUSE_READDIRPLUS_AUTO | abi.FUSE_PARALLEL_DIROPS
                | abi.FUSE_MAX_PAGES | abi.FUSE_CACHE_SYMLINKS | abi.FUSE_INIT_EXT)


@dataclass(frozen=True)
class InitReply:
    data: bytes  # the whole reply (header included)
    ok: bool
    flags: int = 0  # what both sides now use
    minor: int = 0


def negotiate_init(req: Init, *, max_write: int = 1 << 20, max_pages: int = 256,
                   wanted: int = WANTED_FLAGS) -> InitReply:
    """The INIT reply. A kernel newer than 7.x gets our major alone (it then retries with ours, as
    the protocol says); one older than 7.31 is refused with EPROTO."""
    if req.major > abi.FUSE_KERNEL_VERSION:
        body = abi.INIT_OUT.pack(abi.FUSE_KERNEL_VERSION, abi.FUSE_KERNEL_MINOR_VERSION, 0, 0, 0, 0, 0, 0, 0,
                                 0, 0)
        return InitReply(reply(req.unique, body), ok=False)
    if req.major < abi.FUSE_KERNEL_VERSION or req.minor < abi.FUSE_MIN_MINOR:
        return InitReply(reply_error(req.unique, errno_mod.EPROTO), ok=False)
    flags = req.flags & wanted
    minor = min(req.minor, abi.FUSE_KERNEL_MINOR_VERSION)
    body = abi.INIT_OUT.pack(abi.FUSE_KERNEL_VERSION, minor, req.max_readahead, flags & 0xFFFFFFFF,
                             16, 12, max_write, 1, max_pages, 0, flags >> 32)
    return InitReply(reply(req.unique, body), ok=True, flags=flags, minor=minor)
