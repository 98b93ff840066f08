"""The FUSE wire ABI as Linux 6.1 speaks it over virtio-fs (include/uapi/linux/fuse.h, protocol 7.36).

Struct layouts are named after the kernel's structs. virtio-fs carries them in the guest's byte order;
the guests this serves are little-endian (x86-64), so every layout is ``<``.
"""

from __future__ import annotations

import enum
import struct

FUSE_KERNEL_VERSION = 7
FUSE_KERNEL_MINOR_VERSION = 36  # what Linux 6.1 sends
FUSE_MIN_MINOR = 31  # the oldest virtiofs client we talk to (Linux 5.4 era); older gets EPROTO
FUSE_ROOT_ID = 1


class Op(enum.IntEnum):
    """enum fuse_opcode."""

    LOOKUP = 1
    FORGET = 2
    GETATTR = 3
    SETATTR = 4
    READLINK = 5
    SYMLINK = 6
    MKNOD = 8
    MKDIR = 9
    UNLINK = 10
    RMDIR = 11
    RENAME = 12
    LINK = 13
    OPEN = 14
    READ = 15
    WRITE = 16
    STATFS = 17
    RELEASE = 18
    FSYNC = 20
    SETXATTR = 21
    GETXATTR = 22
    LISTXATTR = 23
    REMOVEXATTR = 24
    FLUSH = 25
    INIT = 26
    OPENDIR = 27
    READDIR = 28
    RELEASEDIR = 29
    FSYNCDIR = 30
    GETLK = 31
    SETLK = 32
    SETLKW = 33
    ACCESS = 34
    CREATE = 35
    INTERRUPT = 36
    BMAP = 37
    DESTROY = 38
    IOCTL = 39
    POLL = 40
    NOTIFY_REPLY = 41
    BATCH_FORGET = 42
    FALLOCATE = 43
    READDIRPLUS = 44
    RENAME2 = 45
    LSEEK = 46
    COPY_FILE_RANGE = 47
    SETUPMAPPING = 48
    REMOVEMAPPING = 49
    SYNCFS = 50


# Requests that get no reply at all (the kernel does not wait for one).
NO_REPLY = frozenset({Op.FORGET, Op.BATCH_FORGET})

# --- headers ------------------------------------------------------------------------------------------
# fuse_in_header: len opcode unique nodeid uid gid pid total_extlen padding
IN_HEADER = struct.Struct("<IIQQIIIHH")
OUT_HEADER = struct.Struct("<IiQ")  # fuse_out_header: len error unique

# --- request bodies -----------------------------------------------------------------------------------
INIT_IN_COMPAT = struct.Struct("<IIII")  # fuse_init_in before 7.36: major minor max_readahead flags
INIT_IN = struct.Struct("<IIIII44x")  # 7.36: + flags2, unused[11]
FORGET_IN = struct.Struct("<Q")  # nlookup
BATCH_FORGET_IN = struct.Struct("<II")  # count dummy
FORGET_ONE = struct.Struct("<QQ")  # nodeid nlookup
GETATTR_IN = struct.Struct("<IIQ")  # getattr_flags dummy fh
# fuse_setattr_in: valid padding fh size lock_owner atime mtime ctime atimensec mtimensec ctimensec
# mode unused4 uid gid unused5
SETATTR_IN = struct.Struct("<IIQQQQQQIIIIIIII")
MKNOD_IN = struct.Struct("<IIII")  # mode rdev umask padding
MKDIR_IN = struct.Struct("<II")  # mode umask
RENAME_IN = struct.Struct("<Q")  # newdir
RENAME2_IN = struct.Struct("<QII")  # newdir flags padding
LINK_IN = struct.Struct("<Q")  # oldnodeid
OPEN_IN = struct.Struct("<II")  # flags open_flags
READ_IN = struct.Struct("<QQIIQII")  # fh offset size read_flags lock_owner flags padding
WRITE_IN = struct.Struct("<QQIIQII")  # fh offset size write_flags lock_owner flags padding
RELEASE_IN = struct.Struct("<QIIQ")  # fh flags release_flags lock_owner
FSYNC_IN = struct.Struct("<QII")  # fh fsync_flags padding
FLUSH_IN = struct.Struct("<QIIQ")  # fh unused padding lock_owner
SETXATTR_IN = struct.Struct("<II")  # size flags (no FUSE_SETXATTR_EXT: it is not negotiated)
GETXATTR_IN = struct.Struct("<II")  # size padding
ACCESS_IN = struct.Struct("<II")  # mask padding
CREATE_IN = struct.Struct("<IIII")  # flags mode umask open_flags
FALLOCATE_IN = struct.Struct("<QQQII")  # fh offset length mode padding
LSEEK_IN = struct.Struct("<QQII")  # fh offset whence padding
INTERRUPT_IN = struct.Struct("<Q")  # unique

# --- reply bodies -------------------------------------------------------------------------------------
# fuse_attr: ino size blocks atime mtime ctime atimensec mtimensec ctimensec mode nlink uid gid rdev
# blksize flags
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")
ENTRY_OUT_HEAD = struct.Struct("<QQQQII")  # nodeid generation entry_valid attr_valid *_nsec
ATTR_OUT_HEAD = struct.Struct("<QII")  # attr_valid attr_valid_nsec dummy
OPEN_OUT = struct.Struct("<QII")  # fh open_flags padding
WRITE_OUT = struct.Struct("<II")  # size padding
# fuse_kstatfs: blocks bfree bavail files ffree bsize namelen frsize padding spare[6]
KSTATFS = struct.Struct("<QQQQQIIII24x")
GETXATTR_OUT = struct.Struct("<II")  # size padding
LSEEK_OUT = struct.Struct("<Q")
# fuse_init_out: major minor max_readahead flags max_background congestion_threshold max_write
# time_gran max_pages map_alignment flags2 unused[7]
INIT_OUT = struct.Struct("<IIIIHHIIHHI28x")
DIRENT_HEAD = struct.Struct("<QQII")  # fuse_dirent: ino off namelen type (then the name, 8-aligned)

# --- flags --------------------------------------------------------------------------------------------
# fuse_init_in/out flags (the first 32 bits; flags2 holds bits 32-63 from 7.36 on).
FUSE_ASYNC_READ = 1 << 0
FUSE_POSIX_LOCKS = 1 << 1
FUSE_ATOMIC_O_TRUNC = 1 << 3
FUSE_EXPORT_SUPPORT = 1 << 4
FUSE_BIG_WRITES = 1 << 5
FUSE_DONT_MASK = 1 << 6
FUSE_FLOCK_LOCKS = 1 << 10
FUSE_AUTO_INVAL_DATA = 1 << 12
FUSE_DO_READDIRPLUS = 1 << 13
FUSE_READDIRPLUS_AUTO = 1 << 14
FUSE_ASYNC_DIO = 1 << 15
FUSE_WRITEBACK_CACHE = 1 << 16
FUSE_PARALLEL_DIROPS = 1 << 18
FUSE_HANDLE_KILLPRIV = 1 << 19
FUSE_POSIX_ACL = 1 << 20
FUSE_ABORT_ERROR = 1 << 21
FUSE_MAX_PAGES = 1 << 22
FUSE_CACHE_SYMLINKS = 1 << 23
FUSE_NO_OPENDIR_SUPPORT = 1 << 24
FUSE_EXPLICIT_INVAL_DATA = 1 << 25
FUSE_MAP_ALIGNMENT = 1 << 26
FUSE_SUBMOUNTS = 1 << 27
FUSE_HANDLE_KILLPRIV_V2 = 1 << 28
FUSE_SETXATTR_EXT = 1 << 29
FUSE_INIT_EXT = 1 << 30
FUSE_SECURITY_CTX = 1 << 32  # in flags2
FUSE_HAS_INODE_DAX = 1 << 33  # in flags2

# fuse_setattr_in.valid
FATTR_MODE = 1 << 0
FATTR_UID = 1 << 1
FATTR_GID = 1 << 2
FATTR_SIZE = 1 << 3
FATTR_ATIME = 1 << 4
FATTR_MTIME = 1 << 5
FATTR_FH = 1 << 6
FATTR_ATIME_NOW = 1 << 7
FATTR_MTIME_NOW = 1 << 8
FATTR_LOCKOWNER = 1 << 9
FATTR_CTIME = 1 << 10
FATTR_KILL_SUIDGID = 1 << 11

FUSE_GETATTR_FH = 1 << 0
# fuse_open_out.open_flags
FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_NONSEEKABLE = 1 << 2
FOPEN_CACHE_DIR = 1 << 3
# fuse_release_in.release_flags
FUSE_RELEASE_FLUSH = 1 << 0
FUSE_RELEASE_FLOCK_UNLOCK = 1 << 1
# fuse_read_in.read_flags / fuse_write_in.write_flags
FUSE_READ_LOCKOWNER = 1 << 1
FUSE_WRITE_CACHE = 1 << 0
FUSE_WRITE_LOCKOWNER = 1 << 1
FUSE_WRITE_KILL_SUIDGID = 1 << 2
FUSE_FSYNC_FDATASYNC = 1 << 0

# A name longer than this is ENAMETOOLONG before anything looks at it (NAME_MAX).
NAME_MAX = 255
PATH_MAX = 4096
XATTR_NAME_MAX = 255
XATTR_SIZE_MAX = 65536
