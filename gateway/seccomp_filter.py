"""The seccomp allowlist: exactly the system calls a serving gateway makes, nothing that starts a
process, opens a socket, debugs, mounts, signals others or loads programs into the kernel.

The list was found by tracing the gateway (strace -f) through the integration, differential,
confinement and real-guest suites, then reading each entry: the server's own file operations, what the
CPython runtime needs to run (memory, signals, time, randomness) and what the audit trail needs (write,
fsync, reopen). `ioctl` is allowed for FS_IOC_GETVERSION only, `setsockopt` for SO_RCVTIMEO only; the
terminal ioctls that CPython and rich probe answer ENOTTY instead of killing.
The model is virtiofsd's seccomp.rs.
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import socket
import sys
import termios
import types

from gateway.syscalls import FS_IOC_GETVERSION

# The sonames pyseccomp looks up (Debian's libc6 and libseccomp2).
_SONAMES = {"c": "libc.so.6", "seccomp": "libseccomp.so.2"}


def _import_pyseccomp() -> types.ModuleType:
    """pyseccomp finds its libraries with ctypes.util.find_library, which runs ldconfig (a fork and an
    exec at every start) and imports subprocess, tempfile and shutil: about 1 MiB resident in every
    gateway, for two names that are fixed. It is imported with a find_library that names them."""
    if "ctypes.util" in sys.modules:
        import pyseccomp

        return pyseccomp
    stub = types.ModuleType("ctypes.util")
    stub.find_library = _SONAMES.get  # type: ignore[attr-defined]
    sys.modules["ctypes.util"] = stub
    ctypes.util = stub  # type: ignore[attr-defined]
    try:
        import pyseccomp
    finally:
        del sys.modules["ctypes.util"]
        del ctypes.util  # type: ignore[attr-defined]
    return pyseccomp


sc = _import_pyseccomp()

# Imported at load time, not lazily: after chroot and the filter nothing can be imported.

MODES = ("kill", "trap", "log", "errno", "none")

ALLOWED: tuple[str, ...] = (
    # the request loop and replies (the compiled loop waits in recv alone: no poll, select or epoll)
    "read", "readv", "recvfrom", "recvmsg", "write", "writev", "sendto", "sendmsg", "shutdown",
    "getsockname", "getpeername", "getsockopt",
    # the executor: everything relative to a directory fd
    "openat", "openat2", "close", "fstat", "newfstatat", "statx", "lseek", "pread64", "pwrite64",
    "fstatfs", "statfs", "fchdir", "getcwd", "mkdirat", "mknodat", "symlinkat", "linkat", "unlinkat",
    "renameat", "renameat2", "readlinkat", "readlink", "fchmodat", "fchmod", "fchownat", "fchown",
    "utimensat", "ftruncate", "truncate", "getdents64", "dup", "dup3", "fcntl",
    "lgetxattr", "fgetxattr", "getxattr", "llistxattr", "flistxattr", "listxattr",
    "lsetxattr", "fsetxattr", "setxattr", "lremovexattr", "fremovexattr", "removexattr",
    # acting as the guest's user: fs ids, and the effective set trimmed to CAP_DAC_OVERRIDE meanwhile
    # (capset can only lower, or raise within the permitted set of seven; the bounding set is gone)
    "capget", "capset", "setfsuid", "setfsgid", "getuid", "geteuid", "getgid", "getegid",
    "getresuid", "getresgid",
    # the audit trail: append, sync, reopen on SIGUSR1, room reserved past its end (and given back)
    "fsync", "fdatasync", "flock", "umask", "fallocate",
    # --console: the renderer (started before the filter) is reaped at exit; reaping cannot start anything
    "wait4",
    # the CPython runtime
    "brk", "mmap", "munmap", "mremap", "mprotect", "madvise", "futex", "getrandom",
    "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "sigaltstack", "getpid", "gettid", "getppid",
    "clock_gettime", "clock_getres", "clock_nanosleep", "nanosleep", "gettimeofday", "time",
    "sched_yield", "sched_getaffinity", "uname", "sysinfo", "prlimit64", "getrlimit",
    "exit", "exit_group", "restart_syscall", "set_robust_list", "rseq",
)  # fmt: skip

# gateway virtiofsd's additions (gateway/virtiofs/daemon.py): it waits in poll on the vhost-user socket
# and the kick eventfds (the 9p loop waits in recv alone). The rest it needs the 9p list has already:
# recvmsg with SCM_RIGHTS for the memfds and eventfds QEMU sends, read/write on the eventfds, mmap and
# munmap of the memory table's memfds (and the dup, fstat Python's mmap makes), pread64/pwrite64,
# fallocate, fsync/fdatasync, lseek on the guest's handles, getdents64 for its listings.
VIRTIOFS_EXTRA: tuple[str, ...] = ("poll", "ppoll")

# ioctls answered ENOTTY: terminal probes from CPython's io and rich, harmless to refuse.
TERMINAL_IOCTLS = (termios.TCGETS, termios.TIOCGWINSZ, termios.TIOCGPGRP, termios.FIONREAD)

# Never allowed, whatever the trace said: the calls an attacker who owned the process would want.
# (accept4 and tgkill are allowed only with arguments fixed when the filter is built: see build_filter.)
FORBIDDEN = (
    "execve", "execveat", "fork", "vfork", "clone", "clone3", "socket", "socketpair", "connect",
    "bind", "listen", "accept", "ptrace", "process_vm_readv", "process_vm_writev",
    "mount", "umount2", "pivot_root", "chroot", "kill", "tkill", "setns", "unshare",
    "bpf", "init_module", "finit_module", "delete_module", "kexec_load", "reboot", "setuid",
    "setgid", "setresuid", "setresgid", "prctl", "seccomp", "keyctl", "add_key",
    "perf_event_open", "userfaultfd", "io_uring_setup", "open_by_handle_at", "name_to_handle_at",
)  # fmt: skip

assert not set(ALLOWED) & set(FORBIDDEN)


def build_filter(mode: str, *, accept_fd: int | None = None, pid: int | None = None,
                 extra: tuple[str, ...] = ()) -> object:
    """A pyseccomp SyscallFilter for mode kill|trap|log|errno (the default action for anything else).

    accept_fd: the listening socket accept4 may take clients from, and only it (the gateway is confined
    before its client arrives). pid: this process, the only one SIGUSR2 may be sent to, and only to a
    thread of its own (the reload worker waking the serve loop, gateway.reload_worker).
    The filter is loaded for every thread at once (TSYNC): the reload worker runs under it too."""
    default = {
        "kill": sc.KILL_PROCESS,
        "trap": sc.TRAP,
        "log": sc.LOG,
        "errno": sc.ERRNO(errno.EPERM),
    }[mode]
    flt = sc.SyscallFilter(default)
    assert not set(extra) & set(FORBIDDEN)
    for name in (*ALLOWED, *extra):
        try:
            flt.add_rule(sc.ALLOW, name)
        except (OSError, ValueError):  # a name this architecture lacks (e.g. "time" on arm64)
            continue
    flt.add_rule(sc.ALLOW, "ioctl", sc.Arg(1, sc.EQ, FS_IOC_GETVERSION))
    # The compiled loop's signal wrapper sets and clears the socket's receive timeout (fastloop_c.h);
    # no other socket option can be changed.
    flt.add_rule(
        sc.ALLOW, "setsockopt", sc.Arg(1, sc.EQ, socket.SOL_SOCKET), sc.Arg(2, sc.EQ, socket.SO_RCVTIMEO)
    )
    for request in TERMINAL_IOCTLS:
        flt.add_rule(sc.ERRNO(errno.ENOTTY), "ioctl", sc.Arg(1, sc.EQ, request))
    if accept_fd is not None:
        flt.add_rule(sc.ALLOW, "accept4", sc.Arg(0, sc.EQ, accept_fd))
    pid = os.getpid() if pid is None else pid
    flt.add_rule(sc.ALLOW, "tgkill", sc.Arg(0, sc.EQ, pid), sc.Arg(2, sc.EQ, signal.SIGUSR2))
    flt.set_attr(sc.Attr.CTL_TSYNC, 1)
    return flt


def load(mode: str, *, accept_fd: int | None = None, extra: tuple[str, ...] = ()) -> None:
    if mode == "none":
        return
    build_filter(mode, accept_fd=accept_fd, extra=extra).load()  # type: ignore[attr-defined]
