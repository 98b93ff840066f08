"""The FUSE requests a virtio-fs guest sends, as typed values: one dataclass per operation, with the
fields of the kernel's request struct (include/uapi/linux/fuse.h) and the names that follow it.

These are what the file-system layer sees; ``fuse_decode`` builds them from bytes. ``RULES_OPS`` is how
each is decided: the rules' ops (the 9p request names; gateway/virtiofs/policy.py builds the requests).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from gateway.virtiofs.fuse_abi import Op

Buffer = bytes | bytearray | memoryview


@dataclass(frozen=True)
class InHeader:
    """fuse_in_header."""

    len: int
    opcode: int
    unique: int
    nodeid: int
    uid: int
    gid: int
    pid: int
    total_extlen: int


@dataclass(frozen=True)
class Request:
    header: InHeader
    op: ClassVar[Op]

    @property
    def unique(self) -> int:
        return self.header.unique

    @property
    def nodeid(self) -> int:
        return self.header.nodeid


# --- one dataclass per operation ----------------------------------------------------------------------
@dataclass(frozen=True)
class Init(Request):
    op = Op.INIT
    major: int
    minor: int
    max_readahead: int
    flags: int  # flags | flags2 << 32 (flags2 only with FUSE_INIT_EXT)


@dataclass(frozen=True)
class Destroy(Request):
    op = Op.DESTROY


@dataclass(frozen=True)
class Lookup(Request):
    op = Op.LOOKUP
    name: bytes


@dataclass(frozen=True)
class Forget(Request):
    op = Op.FORGET
    nlookup: int


@dataclass(frozen=True)
class BatchForget(Request):
    op = Op.BATCH_FORGET
    forgets: tuple[tuple[int, int], ...]  # (nodeid, nlookup)


@dataclass(frozen=True)
class Getattr(Request):
    op = Op.GETATTR
    getattr_flags: int
    fh: int


@dataclass(frozen=True)
class Setattr(Request):
    op = Op.SETATTR
    valid: int  # FATTR_*: which of the fields below mean anything
    fh: int
    size: int
    lock_owner: int
    atime: int
    mtime: int
    ctime: int
    atimensec: int
    mtimensec: int
    ctimensec: int
    mode: int
    uid: int
    gid: int


@dataclass(frozen=True)
class Readlink(Request):
    op = Op.READLINK


@dataclass(frozen=True)
class Symlink(Request):
    op = Op.SYMLINK
    name: bytes
    target: bytes


@dataclass(frozen=True)
class Mknod(Request):
    op = Op.MKNOD
    mode: int
    rdev: int
    umask: int
    name: bytes


@dataclass(frozen=True)
class Mkdir(Request):
    op = Op.MKDIR
    mode: int
    umask: int
    name: bytes


@dataclass(frozen=True)
class Unlink(Request):
    op = Op.UNLINK
    name: bytes


@dataclass(frozen=True)
class Rmdir(Request):
    op = Op.RMDIR
    name: bytes


@dataclass(frozen=True)
class Rename(Request):
    op = Op.RENAME
    newdir: int
    oldname: bytes
    newname: bytes
    flags: int = 0  # RENAME2: RENAME_NOREPLACE / EXCHANGE / WHITEOUT


@dataclass(frozen=True)
class Rename2(Rename):
    op = Op.RENAME2


@dataclass(frozen=True)
class Link(Request):
    op = Op.LINK
    oldnodeid: int
    newname: bytes


@dataclass(frozen=True)
class Open(Request):
    op = Op.OPEN
    flags: int  # the guest's open(2) flags
    open_flags: int  # FUSE_OPEN_KILL_SUIDGID


@dataclass(frozen=True)
class Opendir(Open):
    op = Op.OPENDIR


@dataclass(frozen=True)
class Read(Request):
    op = Op.READ
    fh: int
    offset: int
    size: int
    read_flags: int
    lock_owner: int
    flags: int


@dataclass(frozen=True)
class Readdir(Read):
    op = Op.READDIR


@dataclass(frozen=True)
class Readdirplus(Read):
    op = Op.READDIRPLUS


@dataclass(frozen=True)
class Write(Request):
    op = Op.WRITE
    fh: int
    offset: int
    size: int
    write_flags: int
    lock_owner: int
    flags: int
    data: Buffer


@dataclass(frozen=True)
class Statfs(Request):
    op = Op.STATFS


@dataclass(frozen=True)
class Release(Request):
    op = Op.RELEASE
    fh: int
    flags: int
    release_flags: int
    lock_owner: int


@dataclass(frozen=True)
class Releasedir(Release):
    op = Op.RELEASEDIR


@dataclass(frozen=True)
class Fsync(Request):
    op = Op.FSYNC
    fh: int
    fsync_flags: int


@dataclass(frozen=True)
class Fsyncdir(Fsync):
    op = Op.FSYNCDIR


@dataclass(frozen=True)
class Flush(Request):
    op = Op.FLUSH
    fh: int
    lock_owner: int


@dataclass(frozen=True)
class Setxattr(Request):
    op = Op.SETXATTR
    flags: int  # XATTR_CREATE / XATTR_REPLACE
    name: bytes
    value: bytes


@dataclass(frozen=True)
class Getxattr(Request):
    op = Op.GETXATTR
    size: int  # 0: the guest asks for the value's size
    name: bytes


@dataclass(frozen=True)
class Listxattr(Request):
    op = Op.LISTXATTR
    size: int


@dataclass(frozen=True)
class Removexattr(Request):
    op = Op.REMOVEXATTR
    name: bytes


@dataclass(frozen=True)
class Access(Request):
    op = Op.ACCESS
    mask: int


@dataclass(frozen=True)
class Create(Request):
    op = Op.CREATE
    flags: int
    mode: int
    umask: int
    open_flags: int
    name: bytes


@dataclass(frozen=True)
class Fallocate(Request):
    op = Op.FALLOCATE
    fh: int
    offset: int
    length: int
    mode: int


@dataclass(frozen=True)
class Lseek(Request):
    op = Op.LSEEK
    fh: int
    offset: int
    whence: int


# The rules' ops each request is decided as (gateway/rules: the 9p request names; OPENDIR is an open
# with O_RDONLY|O_DIRECTORY, what a 9p guest's opendir sends). () means "not decided": the handle it
# uses was, when it was opened; SETATTR is decided as each of chmod/chown/truncate/utime its ``valid``
# bits ask for. gateway.virtiofs.policy.rules_requests builds the requests themselves.
RULES_OPS: dict[type[Request], tuple[str, ...]] = {
    Lookup: ("lstat",), Getattr: ("lstat",), Access: ("lstat",), Readlink: ("readlink",),
    Setattr: ("chmod", "chown", "truncate", "utime"), Symlink: ("symlink",), Mknod: ("mknod",),
    Mkdir: ("mkdir",), Unlink: ("remove",), Rmdir: ("remove",), Rename: ("rename",), Rename2: ("rename",),
    Link: ("link",), Open: ("open",), Opendir: ("open",), Create: ("create",), Statfs: ("statfs",),
    Getxattr: ("lgetxattr",), Listxattr: ("llistxattr",), Setxattr: ("lsetxattr",),
    Removexattr: ("lremovexattr",), Readdir: (), Readdirplus: (), Read: (), Write: (), Release: (),
    Releasedir: (), Flush: (), Fsync: (), Fsyncdir: (), Fallocate: (), Lseek: (), Forget: (),
    BatchForget: (), Init: (), Destroy: (),
}
