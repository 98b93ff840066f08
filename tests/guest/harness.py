"""Boot a real QEMU guest whose 9p share is served by a proxy helper, and collect what the guest says.

The pieces (facts behind them: /work/shared/spec/QEMU-GUEST.md):

* the guest kernel and its 9p/virtio modules come from ``scripts/fetch-guest-kernel.sh`` (``.cache/guest``);
* the initramfs is written here with the standard library (cpio "newc" + gzip, no root, no cpio tool):
  busybox-static, the modules, ``gtool`` (``gtool.c`` built with ``gcc -static``), ``init.sh`` as ``/init``;
* the per-run guest script rides in a second, tiny cpio appended to the cached base archive (the kernel
  unpacks concatenated archives in order), so a custom script costs no rebuild;
* the helper runs with ``-s SOCK -u 0 -g 0 -n`` or ``-f FD -n`` (a socketpair), QEMU under TCG with the
  matching ``-fsdev proxy``; success is judged only by the lines the guest prints on its serial console.

``run_guest()`` is the reusable entry point; ``verify_full_export()`` checks the export after the default
script (``full.sh``) ran.
"""

from __future__ import annotations

import array
import contextlib
import gzip
import hashlib
import io
import os
import re
import select
import shutil
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CACHE = REPO / ".cache" / "guest"
FETCH_HINT = "run `scripts/fetch-guest-kernel.sh` (as root, on Debian 12, after `apt-get update`)"

REFERENCE_HELPER: list[str] = ["/usr/lib/qemu/virtfs-proxy-helper"]
# The gateway is started exactly like the reference, with the same options after `serve`. cwd is the repo
# (see _start_helper), so `-m gateway` finds the package even when it is not installed.
# allow-all: these tests compare the gateway with the reference, which has no policy. Policy denials
# inside a guest are tested by passing a policy of their own.
ALLOW_ALL = str(Path(__file__).resolve().parents[2] / "policies" / "allow-all.yaml")
GATEWAY_HELPER: list[str] = [sys.executable, "-m", "gateway", "serve", "--policy", ALLOW_ALL]


def _trail_args(helper_cmd: Sequence[str], tmpdir: Path) -> list[str]:
    """A gateway run gets its own audit trail in the run's directory (unless the caller chose one)."""
    if "gateway" in " ".join(helper_cmd) and "--audit-log" not in helper_cmd:
        return ["--audit-log", str(tmpdir / "audit.jsonl")]
    return []


QEMU = "qemu-system-x86_64"
BUSYBOX = Path("/bin/busybox")
INIT_SCRIPT = HERE / "init.sh"
FULL_SCRIPT = HERE / "full.sh"
GTOOL_SOURCE = HERE / "gtool.c"

Mode = Literal["s", "f"]

# How long to wait for the helper's listening socket, and for each process to end after we stop it.
HELPER_LISTEN_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0


class GuestSetupError(RuntimeError):
    """A prerequisite of booting the guest is missing; the message says how to get it."""


# --------------------------------------------------------------------------------------------------------
# Prerequisites


def _is_static_elf(path: Path) -> bool:
    """True when the ELF file has no PT_INTERP program header, i.e. needs no dynamic loader."""
    with path.open("rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2:  # 64-bit ELF only: the guest is x86-64
            return False
        (e_phoff,) = struct.unpack_from("<Q", head, 0x20)
        e_phentsize, e_phnum = struct.unpack_from("<HH", head, 0x36)
        f.seek(e_phoff)
        table = f.read(e_phentsize * e_phnum)
    pt_interp = 3
    return all(struct.unpack_from("<I", table, i * e_phentsize)[0] != pt_interp for i in range(e_phnum))


def missing_prerequisites(helper_cmd: Sequence[str] | None = None) -> list[str]:
    """Everything that stops a guest from booting here, as readable sentences (empty when all is well)."""
    problems: list[str] = []
    if os.geteuid() != 0:
        problems.append("the guest tests must run as root (the helper chroots and chowns)")
    if shutil.which(QEMU) is None:
        problems.append(f"{QEMU} not found (package qemu-system-x86)")
    if not (BUSYBOX.is_file() and _is_static_elf(BUSYBOX)):
        problems.append(f"{BUSYBOX} is missing or not static (package busybox-static)")
    if shutil.which("gcc") is None:
        problems.append("gcc not found (packages gcc, libc6-dev)")
    for name in ("vmlinuz", "kernel-version", "modules/load-order"):
        if not (CACHE / name).is_file():
            problems.append(f"guest kernel file {CACHE / name} is missing")
            break
    else:
        for mod in _module_names():
            if not (CACHE / "modules" / mod).is_file():
                problems.append(f"guest module {CACHE / 'modules' / mod} is missing")
    if helper_cmd:
        exe = helper_cmd[0]
        if not (os.path.isfile(exe) and os.access(exe, os.X_OK)) and shutil.which(exe) is None:
            problems.append(f"helper {exe} not found (the reference is in package qemu-system-common)")
    return problems


def check_prerequisites(helper_cmd: Sequence[str] | None = None) -> None:
    """Raise GuestSetupError naming every missing prerequisite and the script that provides them."""
    problems = missing_prerequisites(helper_cmd)
    if problems:
        raise GuestSetupError(
            "cannot boot the test guest:\n  - " + "\n  - ".join(problems) + f"\nTo fix: {FETCH_HINT}."
        )


def _module_names() -> list[str]:
    order = CACHE / "modules" / "load-order"
    return [line.strip() for line in order.read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------------------------------------
# cpio "newc" writer (what the kernel's initramfs unpacker reads; see
# Documentation/driver-api/early-userspace/buffer-format.rst)


class CpioWriter:
    """Writes a newc archive into memory; entries are owned by root whatever the host user is."""

    def __init__(self) -> None:
        self._buf = io.BytesIO()
        self._ino = 1
        self._dirs: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        name_bytes = name.encode() + b"\0"
        fields = (
            self._ino,
            mode,
            0,
            0,  # ino, mode, uid, gid
            1,
            0,
            len(data),  # nlink, mtime (0: reproducible archives), filesize
            0,
            0,
            rdev[0],
            rdev[1],  # devmajor, devminor, rdevmajor, rdevminor
            len(name_bytes),
            0,  # namesize (with its NUL), check
        )
        self._ino += 1
        header = b"070701" + b"".join(b"%08X" % v for v in fields)
        self._buf.write(header + name_bytes)
        self._pad()  # the name ends on a 4-byte boundary (header is 110 bytes)
        self._buf.write(data)
        self._pad()

    def _pad(self) -> None:
        self._buf.write(b"\0" * (-self._buf.tell() % 4))

    def mkdir(self, name: str, mode: int = 0o755) -> None:
        """Add a directory and any missing parents."""
        parts = name.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            path = "/".join(parts[:i])
            if path not in self._dirs:
                self._dirs.add(path)
                self._entry(path, stat.S_IFDIR | mode)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        parent = os.path.dirname(name.strip("/"))
        if parent:
            self.mkdir(parent)
        self._entry(name.strip("/"), stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name.strip("/"), stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._entry(name.strip("/"), stat.S_IFCHR | mode, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self._buf.getvalue()


# --------------------------------------------------------------------------------------------------------
# Cached build artifacts


def _digest(parts: Iterable[bytes]) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(hashlib.sha256(p).digest())
    return h.hexdigest()[:16]


def _atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write via a temporary file + rename, so concurrent test runs never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _prune(keep: Path, pattern: str) -> None:
    """Drop artifacts built from older inputs, so edits to init.sh or gtool.c do not pile up files.

    In-progress writes are safe: their temporary names start with a dot, which the patterns never match.
    """
    for old in keep.parent.glob(pattern):
        if old != keep:
            with contextlib.suppress(FileNotFoundError):
                old.unlink()


def build_gtool() -> Path:
    """Compile gtool.c statically (the guest has no libc); cached by the source's hash."""
    source = GTOOL_SOURCE.read_bytes()
    out = CACHE / f"gtool-{_digest([source])}"
    if out.is_file():
        return out
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE, prefix=".tmp-gcc-") as tmp:
        binary = Path(tmp) / "gtool"
        proc = subprocess.run(
            ["gcc", "-static", "-O2", "-Wall", "-Wextra", "-o", str(binary), str(GTOOL_SOURCE)],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            raise GuestSetupError(
                f"gcc -static failed for {GTOOL_SOURCE} (is libc6-dev installed?):\n{proc.stderr}"
            )
        _atomic_write(out, binary.read_bytes(), 0o755)
    _prune(out, "gtool-*")
    return out


def build_base_initramfs() -> Path:
    """The cached part of the initramfs: busybox, modules, gtool, /init, /etc files. Keyed by all inputs."""
    check_prerequisites()
    busybox = BUSYBOX.read_bytes()
    init = INIT_SCRIPT.read_bytes()
    gtool = build_gtool().read_bytes()
    modules = [(m, (CACHE / "modules" / m).read_bytes()) for m in _module_names()]
    kver = (CACHE / "kernel-version").read_bytes()
    key = _digest([busybox, init, gtool, kver, *(m.encode() + d for m, d in modules)])
    out = CACHE / f"initramfs-{key}.cpio.gz"
    if out.is_file():
        return out

    cpio = CpioWriter()
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "dev", "mnt", "tmp", "etc", "guest"):
        cpio.mkdir(d)
    # /dev/console lets the kernel give /init its stdin/stdout before devtmpfs is mounted.
    cpio.chardev("dev/console", 5, 1)
    cpio.file("bin/busybox", busybox, 0o755)
    cpio.symlink("bin/sh", "busybox")
    cpio.file("bin/gtool", gtool, 0o755)
    cpio.file("init", init, 0o755)
    # Names for ls -l/id output; the tests use numeric ids throughout.
    cpio.file("etc/passwd", b"root:x:0:0:root:/:/bin/sh\nuser:x:1000:1000:user:/tmp:/bin/sh\n")
    cpio.file("etc/group", b"root:x:0:\nuser:x:1000:\n")
    cpio.mkdir("lib/modules")
    for name, data in modules:
        cpio.file(f"lib/modules/{name}", data)
    cpio.file("lib/modules/load-order", "".join(f"{m}\n" for m, _ in modules).encode())
    # mtime=0 in the gzip header too, so the same inputs give the same bytes.
    _atomic_write(out, gzip.compress(cpio.finish(), compresslevel=6, mtime=0))
    _prune(out, "initramfs-*.cpio.gz")
    return out


def build_initramfs(script: str, dest: Path) -> Path:
    """Base archive + a second gzip'ed cpio holding /guest/script.sh, concatenated into dest."""
    base = build_base_initramfs()
    extra = CpioWriter()
    extra.file("guest/script.sh", script.encode(), 0o755)
    dest.write_bytes(base.read_bytes() + gzip.compress(extra.finish(), mtime=0))
    return dest


def full_script() -> str:
    """The default guest script, exercising every proxy request type."""
    return FULL_SCRIPT.read_text()


# --------------------------------------------------------------------------------------------------------
# Results

_STEP_RE = re.compile(r"STEP (?P<name>\S+) (?P<status>OK|FAIL)\b ?(?P<detail>.*)$")
_OUT_RE = re.compile(r"OUT (?P<name>\S+)\| ?(?P<line>.*)$")


@dataclass
class Step:
    name: str
    ok: bool
    detail: str = ""  # for FAIL: "rc=N <the command's output on one line>"
    output: list[str] = field(default_factory=list)  # the command's output lines (OUT lines)


@dataclass
class GuestResult:
    console: str  # the guest's serial console (QEMU's stdout), \r removed
    steps: dict[str, Step]  # by step name, in the order printed; a repeated name keeps the last one
    booted: bool  # GUEST-BOOTED seen
    done: bool  # GUEST-DONE seen
    timed_out: bool  # QEMU had to be killed after the timeout
    elapsed: float  # seconds from starting QEMU until it ended
    qemu_returncode: int | None
    helper_returncode: int | None
    helper_log: str  # the helper's stdout+stderr
    requests: list[int] | None = None  # request types QEMU sent, in order (only with trace=True)

    def request_counts(self) -> dict[str, int]:
        """How many requests of each type QEMU sent, by name (trace=True only; empty otherwise)."""
        counts: dict[str, int] = {}
        for t in self.requests or ():
            name = REQUEST_NAMES.get(t, f"TYPE{t}")
            counts[name] = counts.get(name, 0) + 1
        return counts

    @property
    def failed(self) -> list[Step]:
        return [s for s in self.steps.values() if not s.ok]

    def describe(self, console_tail: int = 80) -> str:
        """A report for assertion messages: status, failed steps, helper log, end of the console."""
        lines = [
            f"booted={self.booted} done={self.done} timed_out={self.timed_out} elapsed={self.elapsed:.1f}s "
            f"qemu_rc={self.qemu_returncode} helper_rc={self.helper_returncode}",
        ]
        lines += [f"FAILED STEP {s.name}: {s.detail}" for s in self.failed]
        if self.helper_log.strip():
            lines.append("--- helper log ---")
            lines += self.helper_log.strip().splitlines()[-40:]
        lines.append(f"--- console (last {console_tail} lines) ---")
        if console_tail > 0:
            lines += self.console.splitlines()[-console_tail:]
        return "\n".join(lines)

    def assert_ok(self, expected_steps: Iterable[str] = ()) -> None:
        """Fail unless the guest finished, every step passed and every expected step appeared."""
        missing = [n for n in expected_steps if n not in self.steps]
        if not self.done or self.failed or missing:
            raise AssertionError((f"steps never reported: {missing}\n" if missing else "") + self.describe())


def parse_console(console: str) -> dict[str, Step]:
    steps: dict[str, Step] = {}
    pending: dict[str, list[str]] = {}
    for raw in console.splitlines():
        # Lines are searched, not anchored: a kernel message could still share a line with ours.
        m = _OUT_RE.search(raw)
        if m:
            pending.setdefault(m["name"], []).append(m["line"])
            continue
        m = _STEP_RE.search(raw)
        if m:
            name = m["name"]
            steps.pop(name, None)  # re-insert so the order is the order of the final reports
            steps[name] = Step(name, m["status"] == "OK", m["detail"].strip(), pending.pop(name, []))
    return steps


# --------------------------------------------------------------------------------------------------------
# Optional protocol trace: a relay between QEMU and the helper that records the request types QEMU sends.
# Kept independent of the gateway package on purpose (the harness must judge the gateway, not share code).

REQUEST_NAMES: dict[int, str] = {
    2: "OPEN",
    3: "CREATE",
    4: "MKNOD",
    5: "MKDIR",
    6: "SYMLINK",
    7: "LINK",
    8: "LSTAT",
    9: "READLINK",
    10: "STATFS",
    11: "CHMOD",
    12: "CHOWN",
    13: "TRUNCATE",
    14: "UTIME",
    15: "RENAME",
    16: "REMOVE",
    17: "LGETXATTR",
    18: "LLISTXATTR",
    19: "LSETXATTR",
    20: "LREMOVEXATTR",
    21: "GETVERSION",
}
_FRAME_HEADER = struct.Struct("=II")  # native order, as QEMU writes it


class _Relay(threading.Thread):
    """Copies bytes both ways between QEMU's end and the helper's end, passing SCM_RIGHTS fds along.

    The fd of an OPEN/CREATE reply arrives with the reply's 4 bytes; it is forwarded with the same chunk,
    which is what QEMU's recvmsg expects. Requests are parsed only to count their types.
    """

    def __init__(self, qemu_end: socket.socket, helper_end: socket.socket) -> None:
        super().__init__(daemon=True, name="proxy-trace-relay")
        self.qemu_end = qemu_end
        self.helper_end = helper_end
        self.requests: list[int] = []
        self._stop_event = threading.Event()
        self._pending = b""

    def stop(self) -> None:
        self._stop_event.set()
        self.join(STOP_TIMEOUT)

    def _count(self, data: bytes) -> None:
        self._pending += data
        while len(self._pending) >= _FRAME_HEADER.size:
            rtype, size = _FRAME_HEADER.unpack_from(self._pending)
            if len(self._pending) < _FRAME_HEADER.size + size:
                break
            self.requests.append(rtype)
            self._pending = self._pending[_FRAME_HEADER.size + size :]

    def run(self) -> None:
        open_ends = {self.qemu_end, self.helper_end}
        fd_room = socket.CMSG_SPACE(16 * array.array("i").itemsize)
        while open_ends and not self._stop_event.is_set():
            ready, _, _ = select.select(list(open_ends), [], [], 0.2)
            for src in ready:
                dst = self.helper_end if src is self.qemu_end else self.qemu_end
                try:
                    data, ancdata, _flags, _addr = src.recvmsg(1 << 17, fd_room)
                except OSError:
                    data, ancdata = b"", []
                fds = array.array("i")
                for level, kind, payload in ancdata:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                        fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                if not data:
                    # EOF on one side: pass it on as a half-close, so the other side ends as it would.
                    open_ends.discard(src)
                    with contextlib.suppress(OSError):
                        dst.shutdown(socket.SHUT_WR)
                    continue
                if src is self.qemu_end:
                    self._count(data)
                try:
                    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)] if fds else []
                    dst.sendmsg([data], anc)
                except OSError:
                    open_ends.discard(dst)
                finally:
                    for fd in fds:  # our copies; the receiver has its own now
                        os.close(fd)


# --------------------------------------------------------------------------------------------------------
# Running


def _listening(sock_path: str) -> bool:
    """True once a listening AF_UNIX socket is bound at sock_path (without connecting: -s accepts one)."""
    try:
        table = Path("/proc/net/unix").read_text()
    except OSError:
        return False
    so_acceptcon = 0x10000
    for line in table.splitlines()[1:]:
        cols = line.split()
        # Num RefCount Protocol Flags Type St Inode [Path]
        if len(cols) >= 8 and cols[7] == sock_path and int(cols[3], 16) & so_acceptcon:
            return True
    return False


def _stop(proc: subprocess.Popen[bytes] | None) -> int | None:
    """Terminate a process we started (by its own handle, never by name) and reap it."""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def qemu_command(kernel: Path, initrd: Path, fsdev: str, memory_mb: int = 512) -> list[str]:
    # TCG, not KVM: on these machines the guest hangs under KVM with the default CPU and -cpu host aborts.
    # -nic none skips the iPXE option ROM; -no-reboot + panic=-1 turn a guest panic into a QEMU exit.
    return [
        QEMU,
        "-accel",
        "tcg",
        "-m",
        str(memory_mb),
        "-smp",
        "1",
        "-nographic",
        "-no-reboot",
        "-nic",
        "none",
        "-kernel",
        str(kernel),
        "-initrd",
        str(initrd),
        "-append",
        "console=ttyS0 panic=-1 quiet",
        "-fsdev",
        fsdev,
        "-device",
        "virtio-9p-pci,fsdev=fs0,mount_tag=share",
    ]


def run_guest(
    helper_cmd: Sequence[str],
    mode: Mode,
    export_dir: str | os.PathLike[str],
    script: str | None = None,
    timeout: float = 60.0,
    helper_env: dict[str, str] | None = None,
    trace: bool = False,
) -> GuestResult:
    """Serve export_dir with helper_cmd, boot the guest, run script (default: full.sh) and collect its output.

    helper_cmd: the helper's argv before its options, e.g. REFERENCE_HELPER or GATEWAY_HELPER; the
    harness appends `-p EXPORT -s SOCK -u 0 -g 0 -n` (mode "s") or `-p EXPORT -f FD -n` (mode "f").
    script: busybox sh text sourced in the guest after the share is mounted on $M (= /mnt), with the
    functions step/expect_fail/has_stat/same of init.sh available.
    trace: put a relay between QEMU and the helper that records the request types (GuestResult.requests).
    QEMU then always gets an inherited socket (sock_fd=); the helper side still runs in the given mode.
    Guest failures never raise: judge the returned GuestResult. GuestSetupError is raised for missing
    prerequisites, RuntimeError when the helper dies or never listens before QEMU could start.
    """
    if mode not in ("s", "f"):
        raise ValueError(f"mode must be 's' or 'f', not {mode!r}")
    check_prerequisites(helper_cmd)
    export = str(Path(export_dir).resolve())

    # A short private directory: AF_UNIX paths are limited to 108 bytes, and pytest's tmp_path can be long.
    with tempfile.TemporaryDirectory(prefix="guest9p-") as tmp:
        tmpdir = Path(tmp)
        initrd = build_initramfs(full_script() if script is None else script, tmpdir / "initramfs.cpio.gz")
        helper_log_path = tmpdir / "helper.log"
        console_path = tmpdir / "console.log"
        helper: subprocess.Popen[bytes] | None = None
        qemu: subprocess.Popen[bytes] | None = None
        relay: _Relay | None = None
        socks: list[socket.socket] = []  # every socket we hold, closed at the end whatever happens
        timed_out = False
        started = time.monotonic()
        elapsed = 0.0
        try:
            with helper_log_path.open("wb") as helper_log, console_path.open("wb") as console_out:
                # helper_conn: our end of the connection to the helper, when we hold one.
                helper_conn: socket.socket | None = None
                if mode == "s":
                    sock_path = str(tmpdir / "proxy.sock")
                    helper_args = ["-p", export, "-s", sock_path, "-u", "0", "-g", "0", "-n"]
                    helper_args += _trail_args(helper_cmd, tmpdir)
                    helper = _start_helper(helper_cmd, helper_args, helper_log, (), helper_env)
                    _wait_listening(sock_path, helper, helper_log_path)
                    if trace:
                        # We become the helper's one client; QEMU talks to the relay.
                        helper_conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                        socks.append(helper_conn)
                        helper_conn.connect(sock_path)
                else:
                    # The child's end is inherited at the same fd number (pass_fds keeps it); our copy is
                    # closed once the helper has started, so EOF reaches whichever side is left.
                    child_end, helper_conn = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
                    socks += [child_end, helper_conn]
                    helper_args = ["-p", export, "-f", str(child_end.fileno()), "-n"]
                    helper_args += _trail_args(helper_cmd, tmpdir)
                    helper = _start_helper(
                        helper_cmd, helper_args, helper_log, (child_end.fileno(),), helper_env
                    )
                    child_end.close()

                qemu_end: socket.socket | None = None
                if trace:
                    assert helper_conn is not None
                    qemu_end, relay_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
                    socks += [qemu_end, relay_end]
                    relay = _Relay(relay_end, helper_conn)
                    relay.start()
                elif helper_conn is not None:
                    qemu_end = helper_conn
                if qemu_end is not None:
                    fsdev = f"proxy,id=fs0,sock_fd={qemu_end.fileno()}"
                    qemu_fds: tuple[int, ...] = (qemu_end.fileno(),)
                else:
                    fsdev = f"proxy,id=fs0,socket={tmpdir / 'proxy.sock'}"
                    qemu_fds = ()

                started = time.monotonic()
                qemu = subprocess.Popen(
                    qemu_command(CACHE / "vmlinuz", initrd, fsdev),
                    stdin=subprocess.DEVNULL,
                    stdout=console_out,
                    stderr=subprocess.STDOUT,
                    pass_fds=qemu_fds,
                )
                if qemu_end is not None:
                    qemu_end.close()
                    if not trace:
                        helper_conn = None  # it was QEMU's end, now closed
                try:
                    qemu.wait(timeout)
                except subprocess.TimeoutExpired:
                    timed_out = True
                elapsed = time.monotonic() - started
        finally:
            qemu_rc = _stop(qemu)
            # With QEMU gone the relay sees EOF and half-closes towards the helper; let it finish.
            if relay is not None:
                relay.join(STOP_TIMEOUT)
                relay.stop()
            # The reference helper ends by itself when its connection closes; stop it if not.
            for s in socks:
                s.close()
            if helper is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    helper.wait(STOP_TIMEOUT)
            helper_rc = _stop(helper)

        console = console_path.read_bytes().decode("utf-8", "replace").replace("\r", "")
        helper_text = helper_log_path.read_bytes().decode("utf-8", "replace")
    lines = console.splitlines()
    return GuestResult(
        console=console,
        steps=parse_console(console),
        booted=any("GUEST-BOOTED" in line for line in lines),
        done=any("GUEST-DONE" in line for line in lines),
        timed_out=timed_out,
        elapsed=elapsed,
        qemu_returncode=qemu_rc,
        helper_returncode=helper_rc,
        helper_log=helper_text,
        requests=list(relay.requests) if relay is not None else None,
    )


def _start_helper(
    helper_cmd: Sequence[str],
    args: list[str],
    log: io.BufferedWriter,
    fds: tuple[int, ...],
    env: dict[str, str] | None,
) -> subprocess.Popen[bytes]:
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    return subprocess.Popen(
        [*helper_cmd, *args],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        pass_fds=fds,
        cwd=REPO,  # so `python -m gateway` imports this checkout
        env=full_env,
    )


def _wait_listening(sock_path: str, helper: subprocess.Popen[bytes], log_path: Path) -> None:
    deadline = time.monotonic() + HELPER_LISTEN_TIMEOUT
    while not _listening(sock_path):
        if helper.poll() is not None:
            raise RuntimeError(
                f"helper exited with status {helper.returncode} before listening on {sock_path}:\n"
                + log_path.read_text(errors="replace")
            )
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"helper did not listen on {sock_path} within {HELPER_LISTEN_TIMEOUT}s:\n"
                + log_path.read_text(errors="replace")
            )
        time.sleep(0.05)


# --------------------------------------------------------------------------------------------------------
# Host-side checks after full.sh

# Every step full.sh reports (mount/umount come from init.sh).
FULL_STEPS: tuple[str, ...] = (
    "mount",
    "write",
    "read",
    "stat",
    "mkdir",
    "rmdir",
    "readdir",
    "chmod",
    "chmod_setuid",
    "chmod_setgid",
    "chown",
    "user_dir",
    "user_create",
    "user_mkdir",
    "symlink",
    "readlink",
    "hardlink",
    "rename",
    "unlink",
    "mkfifo",
    "mknod",
    "truncate",
    "utime",
    "xattr_set",
    "xattr_get",
    "xattr_list",
    "xattr_remove",
    "statfs",
    "umount",
)


def verify_full_export(export_dir: str | os.PathLike[str]) -> list[str]:
    """What the host sees in the export after full.sh; returns the mismatches (empty when all is right)."""
    root = Path(export_dir)
    problems: list[str] = []

    def lst(name: str) -> os.stat_result | None:
        try:
            return os.lstat(root / name)
        except OSError as e:
            problems.append(f"{name}: {e}")
            return None

    def expect(cond: bool, what: str) -> None:
        if not cond:
            problems.append(what)

    def content(name: str, want: bytes) -> None:
        try:
            got = (root / name).read_bytes()
        except OSError as e:
            problems.append(f"{name}: {e}")
            return
        expect(got == want, f"{name}: content {got!r}, want {want!r}")

    def owner_mode(name: str, fmt: int, perm: int | None, uid: int, gid: int) -> os.stat_result | None:
        st = lst(name)
        if st is None:
            return None
        expect(stat.S_IFMT(st.st_mode) == fmt, f"{name}: type {stat.filemode(st.st_mode)}")
        if perm is not None:
            got = stat.S_IMODE(st.st_mode)
            expect(got == perm, f"{name}: mode {got:04o}, want {perm:04o}")
        owner = (st.st_uid, st.st_gid)
        expect(owner == (uid, gid), f"{name}: owner {owner[0]}:{owner[1]}, want {uid}:{gid}")
        return st

    st = owner_mode("file.txt", stat.S_IFREG, 0o640, 0, 0)
    content("file.txt", b"hello-9p\n")
    if st is not None:
        expect(st.st_nlink == 2, f"file.txt: nlink {st.st_nlink}, want 2 (hard link)")
        expect(int(st.st_mtime) == 1234567890, f"file.txt: mtime {st.st_mtime}, want 1234567890")
        expect(int(st.st_atime) == 1000000000, f"file.txt: atime {st.st_atime}, want 1000000000")
    hard = lst("hard")
    if st is not None and hard is not None:
        expect((hard.st_dev, hard.st_ino) == (st.st_dev, st.st_ino), "hard: not the same inode as file.txt")
    try:
        xattrs = os.listxattr(root / "file.txt", follow_symlinks=False)
        expect("user.test" in xattrs, f"file.txt: xattrs {xattrs}, want user.test")
        expect("user.gone" not in xattrs, f"file.txt: xattrs {xattrs}, user.gone should be removed")
        if "user.test" in xattrs:
            value = os.getxattr(root / "file.txt", "user.test", follow_symlinks=False)
            expect(value == b"hello-xattr", f"file.txt: user.test = {value!r}")
    except OSError as e:
        problems.append(f"file.txt xattrs: {e}")

    owner_mode("dir", stat.S_IFDIR, None, 0, 0)
    expect(not os.path.lexists(root / "gone"), "gone: still exists after rmdir")
    owner_mode("suid", stat.S_IFREG, 0o4755, 0, 0)
    owner_mode("sgid", stat.S_IFREG, 0o2755, 0, 0)
    owner_mode("owned", stat.S_IFREG, None, 1234, 5678)
    owner_mode("userdir", stat.S_IFDIR, None, 1000, 1000)
    owner_mode("userdir/userfile", stat.S_IFREG, None, 1000, 1000)
    content("userdir/userfile", b"user-data\n")
    owner_mode("userdir/usersub", stat.S_IFDIR, None, 1000, 1000)
    if lst("link") is not None:
        expect(os.path.islink(root / "link"), "link: not a symlink")
        with contextlib.suppress(OSError):
            target = os.readlink(root / "link")
            expect(target == "file.txt", f"link: target {target!r}, want 'file.txt'")
    expect(not os.path.lexists(root / "old"), "old: still exists after rename")
    content("new", b"r\n")
    expect(not os.path.lexists(root / "del"), "del: still exists after unlink")
    owner_mode("fifo", stat.S_IFIFO, None, 0, 0)
    dev = owner_mode("null", stat.S_IFCHR, 0o600, 0, 0)
    if dev is not None:
        expect(
            (os.major(dev.st_rdev), os.minor(dev.st_rdev)) == (1, 3),
            f"null: rdev {os.major(dev.st_rdev)}:{os.minor(dev.st_rdev)}, want 1:3",
        )
    content("trunc", b"0123")
    return problems
