"""Acting as the guest's user for create-type requests: fs ids and the effective capability set.

setfsuid/setfsgid change only this thread's fs ids, so the object a CREATE, MKNOD, MKDIR or SYMLINK makes
is born owned by the guest's user, with no window where it is root's; the server stays single-threaded
for that reason. Kept apart from the executor's path handling: this is privilege work.
"""

from __future__ import annotations

import ctypes
import errno
import os

from gateway import syscalls as sc


class _CapHeader(ctypes.Structure):
    _fields_ = (("version", ctypes.c_uint32), ("pid", ctypes.c_int))


class _CapData(ctypes.Structure):
    _fields_ = (
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    )


_CAP_VERSION_3 = 0x20080522  # _LINUX_CAPABILITY_VERSION_3: two 32-bit words per set
_CAP_DAC_OVERRIDE = 1
_libc = ctypes.CDLL("libc.so.6", use_errno=True)
# One header for every capget/capset (single-threaded server; the kernel writes it back only to report
# its preferred version when ours is wrong, which version 3 never is): no ctypes object built per call.
_CAP_HEADER = _CapHeader(_CAP_VERSION_3, 0)
_CAP_HEADER_REF = ctypes.byref(_CAP_HEADER)
# The ids FsIds restores on exit. The gateway never changes its euid/egid (the seccomp filter forbids the
# set*id calls that would), so they are read once instead of with two system calls per create request.
_HOST_EUID = os.geteuid()
_HOST_EGID = os.getegid()


def _capget() -> ctypes.Array[_CapData]:
    data = (_CapData * 2)()
    if _libc.capget(_CAP_HEADER_REF, data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"capget: {os.strerror(err)}")
    return data


def _set_effective(data: ctypes.Array[_CapData], low: int, high: int) -> None:
    """capset(2) with only the effective set changed (never beyond the permitted set)."""
    data[0].effective = low & data[0].permitted
    data[1].effective = high & data[1].permitted
    if _libc.capset(_CAP_HEADER_REF, data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"capset: {os.strerror(err)}")


class FsIds:
    """Run a block with the guest's uid/gid as the fs ids, restored afterwards.

    setfsuid/setfsgid change only this thread's fs ids, so the server must stay single-threaded. The
    securebit SECBIT_NO_SETUID_FIXUP (set by the sandbox) keeps the kernel from clearing our effective
    capabilities when the fsuid leaves 0, so they are never lost on the way back.

    While acting as anyone but root:root, only CAP_DAC_OVERRIDE stays effective, as in the reference
    (setugid + capng_apply: "we still need DAC_OVERRIDE because we don't change supplementary group
    ids"). Keeping all seven let a uid-1000 MKNOD make a device (CAP_MKNOD) and kept the setgid bit of a
    file created in another group's setgid directory (CAP_FSETID), where the reference answers EPERM
    and clears the bit. The effective set is restored on exit (capset within the permitted set; the
    seccomp allowlist must permit capget/capset).

    System calls per use: capget, setfsgid, setfsuid, the two read-backs that prove the ids were taken,
    capset; on exit setfsuid, setfsgid, capset. The exit reuses the capget result from the entry: only
    our capset touched the sets in between, and it changed the effective set alone, so a second capget
    would return the same permitted and inheritable sets."""

    __slots__ = ("caps", "gid", "saved", "uid")

    def __init__(self, uid: int, gid: int) -> None:
        self.uid = uid & 0xFFFFFFFF
        self.gid = gid & 0xFFFFFFFF
        self.saved: tuple[int, int] | None = None
        self.caps: ctypes.Array[_CapData] | None = None

    def __enter__(self) -> None:
        if self.uid == 0xFFFFFFFF or self.gid == 0xFFFFFFFF:
            raise OSError(errno.EINVAL, "invalid owner id")
        caps = _capget() if self.uid or self.gid else None
        sc.setfsgid(self.gid)
        sc.setfsuid(self.uid)
        if sc.fsuid() != self.uid or sc.fsgid() != self.gid:
            self.__exit__()
            raise OSError(errno.EPERM, "cannot act as the requested uid/gid")
        if caps is not None:
            # The set from before the switch: without the securebit (an unsandboxed, in-process
            # executor) setfsuid has trimmed it meanwhile; the exit's setfsuid(0) and capset restore it.
            self.saved = (caps[0].effective, caps[1].effective)
            self.caps = caps
            try:
                _set_effective(caps, 1 << _CAP_DAC_OVERRIDE, 0)
            except OSError:
                self.__exit__()
                raise

    def __exit__(self, *exc: object) -> None:
        sc.setfsuid(_HOST_EUID)
        sc.setfsgid(_HOST_EGID)
        if self.saved is not None:
            assert self.caps is not None
            _set_effective(self.caps, *self.saved)
            self.saved = self.caps = None
