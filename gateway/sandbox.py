"""Everything that makes the serving process small before it serves, kept apart from the file-system
code (the model is virtiofsd's sandbox.rs): chroot into the export, then keep only the seven capabilities
the reference helper keeps, in every set that matters, with python-prctl.

The seccomp filter, no_new_privs, Landlock and rlimits are the sandbox issue's; they will be added here.
"""

from __future__ import annotations

import ctypes
import logging
import os
from dataclasses import dataclass, field

import prctl

log = logging.getLogger("gateway.sandbox")

# The capabilities virtfs-proxy-helper keeps (init_capabilities), and why we need each.
KEPT_CAPABILITIES: dict[str, int] = {
    "chown": prctl.CAP_CHOWN,  # CHOWN, and CREATE/MKDIR/... owned by the guest's user
    "dac_override": prctl.CAP_DAC_OVERRIDE,  # act on any guest file regardless of its mode
    "fowner": prctl.CAP_FOWNER,  # chmod/utime/xattrs on files the server does not own
    "fsetid": prctl.CAP_FSETID,  # keep setid bits through chmod as the guest asked (policy decides)
    "setgid": prctl.CAP_SETGID,  # setfsgid to the guest's gid
    "setuid": prctl.CAP_SETUID,  # setfsuid to the guest's uid
    "mknod": prctl.CAP_MKNOD,  # MKNOD of devices (policy decides)
}

_PR_CAPBSET_DROP = 24
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_CLEAR_ALL = 4
_libc = ctypes.CDLL("libc.so.6", use_errno=True)  # not find_library: it forks ldconfig and gcc


@dataclass
class SandboxState:
    """What confinement was applied: logged at start and, later, recorded in the audit trail."""

    chroot: str | None = None
    capabilities: list[str] = field(default_factory=list)
    securebits: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {
            "chroot": self.chroot,
            "capabilities": self.capabilities,
            "securebits": self.securebits,
            "notes": self.notes,
        }


def _prctl(option: int, arg2: int, arg3: int = 0) -> None:
    if _libc.prctl(option, arg2, arg3, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}, {arg2}): {os.strerror(err)}")


def _last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except OSError:
        return prctl.CAP_LAST_CAP


def enter_export(export: str, state: SandboxState) -> None:
    """chroot into the export and chdir to its root; only possible (and only done) as root."""
    if os.geteuid() != 0:
        state.notes.append("not root: no chroot (paths are still resolved beneath the export by openat2)")
        return
    os.chroot(export)
    os.chdir("/")
    state.chroot = export


def drop_capabilities(state: SandboxState) -> None:
    """Keep exactly KEPT_CAPABILITIES in the effective, permitted and bounding sets; nothing inheritable
    or ambient. SECBIT_NO_SETUID_FIXUP (locked) first, so that setfsuid to a guest's uid does not clear
    the effective set and the way back does not need to restore it."""
    if os.geteuid() != 0:
        state.notes.append("not root: capabilities left as they are")
        return
    prctl.securebits.no_setuid_fixup = True
    prctl.securebits.no_setuid_fixup_locked = True
    state.securebits = ["no_setuid_fixup", "no_setuid_fixup_locked"]
    keep = set(KEPT_CAPABILITIES.values())
    for cap in range(_last_cap() + 1):  # the bounding set first: dropping needs CAP_SETPCAP
        if cap not in keep:
            _prctl(_PR_CAPBSET_DROP, cap)
    _prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL)
    prctl.cap_inheritable.limit()
    prctl.cap_effective.limit(*keep)
    prctl.cap_permitted.limit(*keep)
    state.capabilities = sorted(KEPT_CAPABILITIES)


def read_status(pid: int | str = "self") -> dict[str, str]:
    """/proc/PID/status as a dict (CapEff, CapPrm, CapBnd, CapInh, CapAmb, NoNewPrivs, Seccomp, ...)."""
    fields: dict[str, str] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


def capability_mask(names: list[str] | None = None) -> int:
    return sum(1 << KEPT_CAPABILITIES[n] for n in (names or list(KEPT_CAPABILITIES)))
