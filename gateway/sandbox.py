"""Everything that makes the serving process small before it serves, kept apart from the file-system
code (the model is virtiofsd's sandbox.rs). The order matters, and each step is recorded:

1. the caller has opened everything it will need (export root fd, /proc/self/fd, audit log and its
   directory, the policy's directory, the syslog socket): nothing is opened by path afterwards;
2. chroot into the export and chdir there (as root);
3. keep only the seven capabilities the reference helper keeps (effective, permitted, bounding;
   nothing inheritable or ambient), with SECBIT_NO_SETUID_FIXUP so setfsuid never changes them;
4. no_new_privs;
5. Landlock where the kernel has it (the ABI probed; degrade gracefully);
   then any thread the caller starts (the reload worker): it inherits steps 2-5, which are per thread;
6. rlimits: no core dumps, a bounded number of open files, no new processes;
7. last, the seccomp allowlist (gateway/seccomp_filter.py), default action kill, loaded for every thread
   at once (TSYNC).
"""

from __future__ import annotations

import ctypes
import logging
import os
import resource
from collections.abc import Callable
from dataclasses import dataclass, field

import prctl

from gateway import landlock, seccomp_filter

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

# gateway virtiofsd's: the same but CAP_MKNOD, since it makes regular files and FIFOs only (neither
# needs it); gateway/virtiofs/export_fs.py refuses device nodes whatever the policy says.
VIRTIOFS_CAPABILITIES: dict[str, int] = {k: v for k, v in KEPT_CAPABILITIES.items() if k != "mknod"}

_PR_CAPBSET_DROP = 24
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_CLEAR_ALL = 4
_libc = ctypes.CDLL("libc.so.6", use_errno=True)  # not find_library: it forks ldconfig and gcc


@dataclass
class SandboxState:
    """What confinement was applied: logged at start and recorded in the audit trail's start record."""

    chroot: str | None = None
    capabilities: list[str] = field(default_factory=list)
    securebits: list[str] = field(default_factory=list)
    no_new_privs: bool = False
    landlock_abi: int = 0
    landlock_paths: list[str] = field(default_factory=list)
    rlimits: dict[str, int] = field(default_factory=dict)
    seccomp: str = "none"
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {
            "chroot": self.chroot,
            "capabilities": self.capabilities,
            "securebits": self.securebits,
            "no_new_privs": self.no_new_privs,
            "landlock": {"abi": self.landlock_abi, "paths": self.landlock_paths}
            if self.landlock_abi
            else None,
            "rlimits": self.rlimits,
            "seccomp": self.seccomp,
            "notes": self.notes,
        }


@dataclass
class SandboxConfig:
    export: str
    seccomp: str = "kill"  # kill | trap | log | errno | none
    landlock: bool = True
    max_open_files: int = 1024
    # (O_PATH fd, rights, label) beyond the export: the audit log's directory, the policy's directory.
    grants: list[tuple[int, int, str]] = field(default_factory=list)
    # The listening socket the filter lets accept4 take clients from (None: there is none, -f).
    accept_fd: int | None = None
    # Started inside every wall but the resource limits and the filter (which TSYNC then applies to all
    # threads): the reload worker, which thus inherits chroot, capabilities, no_new_privs and Landlock.
    start_threads: Callable[[], object] | None = None
    # The capabilities to keep (gateway virtiofsd: VIRTIOFS_CAPABILITIES), and the system calls its
    # front-end needs beyond the 9p allowlist (seccomp_filter.VIRTIOFS_EXTRA).
    capabilities: dict[str, int] = field(default_factory=lambda: dict(KEPT_CAPABILITIES))
    extra_syscalls: tuple[str, ...] = ()
    chroot: bool = True  # gateway virtiofsd --sandbox none: every wall but the chroot


def confine(config: SandboxConfig, export_fd: int) -> SandboxState:
    """Steps 2-7 above, in order. Raises OSError when a step that must succeed fails."""
    state = build_walls(config, export_fd)
    lock_down(config, state)
    return state


def build_walls(config: SandboxConfig, export_fd: int) -> SandboxState:
    """Steps 2-5: what a fork inherits, so a daemon can have them in place (and report their failure on
    stderr) before it detaches."""
    state = SandboxState()
    if config.chroot:
        enter_export(config.export, state)
    else:
        state.notes.append("--sandbox none: no chroot (paths are still resolved beneath the export)")
    drop_capabilities(state, config.capabilities)
    prctl.set_no_new_privs(1)
    state.no_new_privs = bool(prctl.get_no_new_privs())
    if config.landlock:
        grants = [landlock.Grant(export_fd, landlock.EVERYTHING & ~landlock.EXECUTE, config.export)]
        grants += [landlock.Grant(fd, access, label) for fd, access, label in config.grants]
        state.landlock_abi = landlock.restrict(grants)
        if state.landlock_abi:
            state.landlock_paths = [g.label for g in grants]
        else:
            state.notes.append("Landlock unavailable in this kernel: not applied")
    return state


def lock_down(config: SandboxConfig, state: SandboxState) -> None:
    """The threads started inside the walls, then steps 6 and 7 (no fork is possible after them)."""
    if config.start_threads is not None:
        config.start_threads()
    set_rlimits(config.max_open_files, state)
    seccomp_filter.load(config.seccomp, accept_fd=config.accept_fd, extra=config.extra_syscalls)
    state.seccomp = config.seccomp
    if config.seccomp == "none":
        state.notes.append("SECCOMP FILTER DISABLED (--seccomp none): every system call is allowed")


def set_rlimits(max_open_files: int, state: SandboxState) -> None:
    limits = {
        "core": (resource.RLIMIT_CORE, 0),  # no core dumps: they would hold guest data
        "nofile": (resource.RLIMIT_NOFILE, max_open_files),  # fd exhaustion stays ours, bounded
        "nproc": (resource.RLIMIT_NPROC, 0),  # no new processes (seccomp forbids them too)
    }
    for name, (which, value) in limits.items():
        _soft, hard = resource.getrlimit(which)
        if hard != resource.RLIM_INFINITY and value > hard:
            value = hard
        resource.setrlimit(which, (value, value))
        state.rlimits[name] = value


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


def drop_capabilities(state: SandboxState, kept: dict[str, int] | None = None) -> None:
    """Keep exactly KEPT_CAPABILITIES in the effective, permitted and bounding sets; nothing inheritable
    or ambient. SECBIT_NO_SETUID_FIXUP (locked) first, so that setfsuid to a guest's uid does not clear
    the effective set and the way back does not need to restore it."""
    if os.geteuid() != 0:
        state.notes.append("not root: capabilities left as they are")
        return
    prctl.securebits.no_setuid_fixup = True
    prctl.securebits.no_setuid_fixup_locked = True
    state.securebits = ["no_setuid_fixup", "no_setuid_fixup_locked"]
    kept = KEPT_CAPABILITIES if kept is None else kept
    keep = set(kept.values())
    for cap in range(_last_cap() + 1):  # the bounding set first: dropping needs CAP_SETPCAP
        if cap not in keep:
            _prctl(_PR_CAPBSET_DROP, cap)
    _prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL)
    prctl.cap_inheritable.limit()
    prctl.cap_effective.limit(*keep)
    prctl.cap_permitted.limit(*keep)
    state.capabilities = sorted(kept)
