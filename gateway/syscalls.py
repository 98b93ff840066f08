"""The few system calls Python's os module lacks: openat2, utimensat with raw timespecs, fstatfs,
setfsuid/setfsgid. Thin ctypes wrappers that raise OSError like the os module does."""

from __future__ import annotations

import ctypes
import os

_libc = ctypes.CDLL("libc.so.6", use_errno=True)  # not find_library: it forks ldconfig and gcc

SYS_OPENAT2 = 437  # x86-64 and every other architecture that came after the unified syscall table
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10
# Every guest path is resolved as if the export were "/": absolute symlinks and ".." stay inside it, and
# /proc magic links (which jump anywhere) are refused outright.
GUEST_RESOLVE = RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS

AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
AT_EMPTY_PATH = 0x1000
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2
FS_IOC_GETVERSION = 0x80087601  # _IOR('v', 1, long)


class _OpenHow(ctypes.Structure):
    _fields_ = (("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64))


_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_how_cache: dict[tuple[int, int, int], tuple[_OpenHow, ctypes.c_size_t]] = {}
_SYS = ctypes.c_long(SYS_OPENAT2)
_HOW_SIZE = ctypes.c_size_t(ctypes.sizeof(_OpenHow))


def openat2(dirfd: int, path: bytes, flags: int, mode: int = 0, resolve: int = GUEST_RESOLVE) -> int:
    """openat2(2). Retries EAGAIN, which RESOLVE_IN_ROOT returns when a concurrent rename races a '..'."""
    key = (flags, mode, resolve)
    how = _how_cache.get(key)
    if how is None:
        how = _how_cache[key] = (_OpenHow(flags | os.O_CLOEXEC, mode, resolve), _HOW_SIZE)
    for _ in range(16):
        fd = _syscall(_SYS, dirfd, path, ctypes.byref(how[0]), how[1])
        if fd >= 0:
            return fd
        err = ctypes.get_errno()
        if err != 11:  # EAGAIN
            raise OSError(err, os.strerror(err), path)
    raise OSError(11, os.strerror(11), path)


def openat2_available() -> bool:
    try:
        os.close(openat2(AT_FDCWD, b"/", os.O_PATH | os.O_DIRECTORY, 0, RESOLVE_NO_MAGICLINKS))
    except OSError:
        return False
    return True


class _Timespec(ctypes.Structure):
    _fields_ = (("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long))


_utimensat = _libc.utimensat
_utimensat.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(_Timespec), ctypes.c_int)


def _signed64(value: int) -> int:
    value &= 0xFFFFFFFFFFFFFFFF
    return value - (1 << 64) if value >= 1 << 63 else value


def utimensat(
    dirfd: int, name: bytes | None, atime: tuple[int, int], mtime: tuple[int, int], flags: int
) -> None:
    """utimensat(2) with the guest's timespecs passed through as they are (UTIME_NOW/UTIME_OMIT too)."""
    times = (_Timespec * 2)(
        _Timespec(_signed64(atime[0]), _signed64(atime[1])),
        _Timespec(_signed64(mtime[0]), _signed64(mtime[1])),
    )
    if _utimensat(dirfd, name, times, flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class _Statfs(ctypes.Structure):
    _fields_ = (
        ("f_type", ctypes.c_long),
        ("f_bsize", ctypes.c_long),
        ("f_blocks", ctypes.c_ulong),
        ("f_bfree", ctypes.c_ulong),
        ("f_bavail", ctypes.c_ulong),
        ("f_files", ctypes.c_ulong),
        ("f_ffree", ctypes.c_ulong),
        ("f_fsid", ctypes.c_int * 2),
        ("f_namelen", ctypes.c_long),
        ("f_frsize", ctypes.c_long),
        ("f_flags", ctypes.c_long),
        ("f_spare", ctypes.c_long * 4),
    )


_fstatfs = _libc.fstatfs
_fstatfs.argtypes = (ctypes.c_int, ctypes.POINTER(_Statfs))


def fstatfs(fd: int) -> tuple[int, ...]:
    """fstatfs(2) (works on O_PATH fds): type, bsize, blocks, bfree, bavail, files, ffree, fsid0, fsid1,
    namelen, frsize: the STATFS reply's order."""
    buf = _Statfs()
    if _fstatfs(fd, ctypes.byref(buf)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return (
        buf.f_type, buf.f_bsize, buf.f_blocks, buf.f_bfree, buf.f_bavail, buf.f_files, buf.f_ffree,
        buf.f_fsid[0] & 0xFFFFFFFF, buf.f_fsid[1] & 0xFFFFFFFF, buf.f_namelen, buf.f_frsize,
    )  # fmt: skip


_setfsuid = _libc.setfsuid
_setfsuid.argtypes = (ctypes.c_uint32,)
_setfsgid = _libc.setfsgid
_setfsgid.argtypes = (ctypes.c_uint32,)


def setfsuid(uid: int) -> int:
    """setfsuid(2); returns the previous fsuid. It never fails loudly, so callers verify with fsuid()."""
    return int(_setfsuid(uid & 0xFFFFFFFF)) & 0xFFFFFFFF


def setfsgid(gid: int) -> int:
    return int(_setfsgid(gid & 0xFFFFFFFF)) & 0xFFFFFFFF


def fsuid() -> int:
    return setfsuid(0xFFFFFFFF)  # an invalid id changes nothing and returns the current one


def fsgid() -> int:
    return setfsgid(0xFFFFFFFF)
