"""Differential tests: the gateway against the reference virtfs-proxy-helper, request for request.

One scripted guest session (SCRIPT, well over 150 requests, every request type, success and error
cases) runs against the reference helper and against the gateway, each serving its own freshly built,
identical export tree over a socketpair (`-f FD -n`, as libvirt starts them). The replies, normalised
for what legitimately differs between two trees and two processes (inode and device numbers, ctime,
atime and mtime unless the script set them, free-space counters, fd numbers, FS_IOC_GETVERSION's
random generation, O_NOFOLLOW in a received fd's F_GETFL), must be identical, and so must the two export
trees afterwards. The gateway runs with policies/allow-all.yaml: the reference has no policy, and policy
decisions are not what this compares.

What is NOT in the shared script, and why, is listed explicitly:
  * REFERENCE_BREAKERS: requests that crash or hang the reference. They run against the gateway only,
    which must answer sensibly and keep serving.
  * DELIBERATE_DIVERGENCES: requests where the gateway answers differently on purpose. They run against
    both, and the test pins down both answers.
Malformed frames (short payloads, trailing bytes, pipelined requests) run against both.

Needs root (both helpers chroot) and /usr/lib/qemu/virtfs-proxy-helper (Debian's qemu-system-common); a
missing prerequisite FAILS the test with a message, it is never skipped.

    cd /work/main && /tmp/v/bin/pytest -q tests/test_differential.py
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway import protocol as p
from gateway.client import Client, ProtocolClosed, Reply
from gateway.core.executor import getversion_supported

REPO = Path(__file__).resolve().parent.parent
REFERENCE_HELPER: list[str] = ["/usr/lib/qemu/virtfs-proxy-helper"]
# The reference has no policy; the gateway's built-in baseline denies device nodes and setid bits. The
# comparison is of everything but policy decisions, so the gateway runs with the allow-all policy (what
# an operator introducing it would start with). Options before -p are the gateway's own.
ALLOW_ALL = REPO / "policies" / "allow-all.yaml"
GATEWAY_HELPER: list[str] = [sys.executable, "-m", "gateway", "serve", "--policy", str(ALLOW_ALL)]
HELPERS: dict[str, list[str]] = {"reference": REFERENCE_HELPER, "gateway": GATEWAY_HELPER}

# Guest-visible constants, spelled as the guest's kernel (x86-64) defines them.
O_RDONLY, O_WRONLY, O_RDWR = os.O_RDONLY, os.O_WRONLY, os.O_RDWR
O_CREAT, O_EXCL, O_TRUNC, O_APPEND = os.O_CREAT, os.O_EXCL, os.O_TRUNC, os.O_APPEND
O_NONBLOCK, O_DIRECTORY, O_NOFOLLOW, O_PATH = os.O_NONBLOCK, os.O_DIRECTORY, os.O_NOFOLLOW, os.O_PATH
O_TMPFILE = os.O_TMPFILE
O_UNKNOWN = 0x40000000  # a bit open(2) does not define: open() ignores it, openat2() would refuse it
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2
NO_ID = 0xFFFFFFFF  # chown's "leave unchanged" (-1) as it travels in a u32 field
XATTR_CREATE, XATTR_REPLACE = 1, 2
NAME255 = b"n" * 255
NAME256 = b"n" * 256
# The export's deep directory: 19 components of 200 bytes, a ~3.8 KiB path that still fits PATH_MAX.
DEEP = b"/".join([b"p" * 200] * 19)
T0 = 1_600_000_000  # the fixture's fixed timestamps start here, so untouched mtimes compare exactly
# A timestamp at or after this is "set by the clock during the run" and compares as "recent"; anything
# earlier was set by the fixture or by an explicit UTIME and must match to the nanosecond.
RECENT = T0 + 10**7


def stamp(sec: int, nsec: int) -> tuple[int, int] | str:
    if RECENT <= sec < 1 << 63:  # a u64 on the wire: pre-epoch times arrive as huge values
        return "recent"
    return (sec, nsec)


def require_prerequisites(*, reference: bool = True) -> None:
    """Fail (never skip) when the test cannot mean anything here: both helpers chroot, so root is
    needed, and the differential side needs Debian's reference helper."""
    problems = []
    if os.geteuid() != 0:
        problems.append(
            "these tests must run as root (both helpers chroot into the export and keep "
            "root's file capabilities)"
        )
    if not ALLOW_ALL.is_file():
        problems.append(f"the gateway's allow-all policy {ALLOW_ALL} is missing")
    if reference and not os.access(REFERENCE_HELPER[0], os.X_OK):
        problems.append(
            f"the reference helper {REFERENCE_HELPER[0]} is missing: "
            "apt-get install qemu-system-common (QEMU 7.2, Debian 12)"
        )
    if problems:
        pytest.fail("cannot run the differential tests:\n  - " + "\n  - ".join(problems), pytrace=False)


# ---------------------------------------------------------------------------------------------------------
# The export tree: built twice, identically (same names, contents, modes, owners, xattrs, timestamps).


APPEND_ONLY = (
    "appendonly",
)  # chattr +a files: EPERM for truncate, chmod, rename, ... (no CAP_LINUX_IMMUTABLE)


def build_tree(root: Path) -> None:
    """Build the export. Every entry gets a fixed mtime, so that LSTAT of an object the script did not
    touch can compare mtimes exactly across the two trees."""
    root.mkdir(mode=0o755)
    os.chmod(root, 0o755)

    def write(rel: str, data: bytes, mode: int = 0o644, owner: tuple[int, int] = (0, 0)) -> None:
        path = root / rel
        path.write_bytes(data)
        os.chmod(path, mode)
        os.chown(path, *owner)

    def mkdir(rel: str, mode: int = 0o755, owner: tuple[int, int] = (0, 0)) -> None:
        path = root / rel
        path.mkdir()
        os.chmod(path, mode)
        os.chown(path, *owner)

    write("f", b"hello, world\n")
    write("empty", b"", 0o600)
    write("exec", b"#!/bin/sh\necho hi\n", 0o755)
    write("setuid", b"suid\n", 0o4755)
    write("owned1000", b"mine\n", 0o640, (1000, 1000))
    for name in (
        "trunc1",
        "trunc2",
        "rw1",
        "chmod1",
        "chown1",
        "chown2",
        "utime1",
        "ren1",
        "ren2",
        "ren3",
        "rm1",
        "xset",
        "link1",
    ):
        write(name, name.encode() + b" data\n")
    mkdir("d")
    write("d/g", b"in d\n")
    mkdir("d/sub")
    write("d/sub/h", b"deep\n")
    mkdir("nonempty")
    write("nonempty/x", b"x\n")
    mkdir("emptydir", 0o700)
    mkdir("emptydir2")
    mkdir("rendir1")
    mkdir("rendir2")
    mkdir("etc")  # what an absolute symlink to /etc/passwd reaches under the chroot (and RESOLVE_IN_ROOT)
    write("etc/passwd", b"root:x:0:0:export's own passwd:/root:/bin/sh\n")
    write("xattrs", b"has xattrs\n")
    os.setxattr(root / "xattrs", "user.a", b"alpha")
    os.setxattr(root / "xattrs", "user.empty", b"")
    os.setxattr(root / "xattrs", "user.bin", b"\x00\x01\xff")
    mkdir("xdir")
    os.setxattr(root / "xdir", "user.d", b"dirval")
    write("appendonly", b"log\n", 0o644)
    mkdir("sgid_dir", 0o2775, (0, 50))
    mkdir("sticky", 0o1777)
    write("sticky/other", b"someone else's\n", 0o644, (2000, 2000))
    os.mkfifo(root / "fifo", 0o644)
    os.mknod(root / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    bind_socket(root / "sock")
    (root / NAME255.decode()).write_bytes(b"long name\n")
    deep = root / DEEP.decode()
    deep.mkdir(parents=True)
    (deep / "leaf").write_bytes(b"leaf\n")
    links = {
        "L_f": "f",
        "L_d": "d",
        "L_abs": "/etc/passwd",
        "L_rel": "../../../../../../../etc/passwd",
        "L_dangling": "nowhere",
        "L_dangling_abs": "/nowhere_abs",
        "L_dangling2": "nowhere2",
        "L_loop": "L_loop",
        "L_fifo": "fifo",
        "L_null": "null",
        "L_proc": "/proc/self/root",
        "L_procfd": "/proc/self/fd/0",
        "L_long": "t" * 300,
        "L_trunc": "trunc2",
        "L_ren": "ren1",
        "L_dir2": "d",
        "d/L_up": "../f",
        "d/L_upout": "../../../../../../f",
    }
    for name, target in links.items():
        os.symlink(target, root / name)
    # Fixed timestamps everywhere, children before their directory (creating a child changes it).
    stamp = T0
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in sorted(filenames + dirnames):
            stamp += 1
            os.utime(
                os.path.join(dirpath, name), ns=(stamp * 10**9, stamp * 10**9 + 7), follow_symlinks=False
            )
    os.utime(root, ns=(T0 * 10**9, T0 * 10**9))
    for name in APPEND_ONLY:  # after the timestamps: an append-only file refuses utime
        subprocess.run(["chattr", "+a", str(root / name)], check=True)


def bind_socket(path: Path) -> None:
    """Leave a UNIX socket file at path (sun_path is short, so bind relative to the directory)."""
    old = os.getcwd()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        os.chdir(path.parent)
        s.bind(path.name)
    finally:
        os.chdir(old)
        s.close()


def unlock_tree(root: Path) -> None:
    """Undo chattr so that pytest can delete the tree."""
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            full = os.path.join(dirpath, name)
            if not os.path.islink(full) and stat.S_ISREG(os.lstat(full).st_mode):
                subprocess.run(["chattr", "-a", "-i", full], check=False, capture_output=True)


def snapshot_tree(root: Path) -> dict[str, tuple[object, ...]]:
    """Everything about a tree that must match after the same requests: per relative path, type, mode,
    owner, nlink, size, content or symlink target, xattrs, and mtime unless the clock set it (ctime, atime
    and inode numbers differ anyway).
    Directory sizes are left out: ext4 grows a directory by blocks as entries come and go, identically
    for identical histories, but that is not the point of this comparison."""
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            st = os.lstat(full)
            kind = stat.S_IFMT(st.st_mode)
            if stat.S_ISREG(st.st_mode):
                with open(full, "rb") as fh:
                    body: object = fh.read()
            elif stat.S_ISLNK(st.st_mode):
                body = os.readlink(full)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                body = st.st_rdev
            else:
                body = None
            try:
                xattrs = tuple(
                    sorted(
                        (n, os.getxattr(full, n, follow_symlinks=False))
                        for n in os.listxattr(full, follow_symlinks=False)
                    )
                )
            except OSError:
                xattrs = ()
            size = None if stat.S_ISDIR(st.st_mode) else st.st_size
            mtime = stamp(*divmod(st.st_mtime_ns, 10**9)) if st.st_mtime_ns >= 0 else st.st_mtime_ns
            out[rel] = (
                kind,
                oct(stat.S_IMODE(st.st_mode)),
                st.st_uid,
                st.st_gid,
                st.st_nlink,
                size,
                body,
                xattrs,
                mtime,
            )
    return out


@pytest.fixture
def trees(tmp_path: Path) -> Iterator[dict[str, Path]]:
    """Two identical exports, one per helper."""
    require_prerequisites()
    made: dict[str, Path] = {}
    try:
        for name in HELPERS:
            made[name] = tmp_path / f"export-{name}"
            build_tree(made[name])
        yield made
    finally:
        for path in made.values():
            unlock_tree(path)


# ---------------------------------------------------------------------------------------------------------
# Running a helper.


class Helper:
    """One helper process serving one export over a socketpair, started the way libvirt starts it."""

    def __init__(self, argv0: Sequence[str], export: Path, log: Path, *, timeout: float = 10.0) -> None:
        ours, theirs = socket.socketpair()
        self.log = log
        with open(log, "wb") as err:
            self.proc = subprocess.Popen(
                [*argv0, "-p", str(export), "-f", str(theirs.fileno()), "-n"],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                cwd=REPO,
            )
        theirs.close()
        ours.settimeout(timeout)  # a hang is a failure, not a stuck test run
        self.sock = ours
        self.client = Client(ours)

    def call(self, request: p.Request, *, nul: bool = True) -> Reply:
        """One request; nul=True counts a trailing NUL in every path string, as QEMU 7.2 does."""
        self.sock.sendall(p.encode_request(request, nul=nul))
        return self.client.read_reply(request.type)

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_reply(self, rtype: int) -> Reply:
        return self.client.read_reply(rtype)

    def stderr_text(self) -> str:
        return self.log.read_text(errors="replace")

    def close(self) -> int:
        self.sock.close()
        try:
            return self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            return -9

    def __enter__(self) -> Helper:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------------------
# The script.


@dataclass(frozen=True)
class Step:
    request: p.Request
    note: str = ""
    nul: bool | None = None  # paths with QEMU's trailing NUL (True), bare (False), None: alternate
    write: bytes | None = None  # OPEN/CREATE: write this through the received fd (exercises its mode)


def S(request: p.Request, note: str = "", **kw: object) -> Step:
    return Step(request, note, **kw)  # type: ignore[arg-type]


def lstat(path: bytes, note: str = "", *, nul: bool | None = None) -> Step:
    return Step(p.Lstat(path), note or f"lstat {path[:40]!r}", nul)


def build_script() -> list[Step]:
    """The session. Order matters: later steps observe earlier ones (an LSTAT after a CHMOD...)."""
    s: list[Step] = []
    add = s.append
    Lg, Ll, Ls, Lr = p.Lgetxattr, p.Llistxattr, p.Lsetxattr, p.Lremovexattr

    # -- LSTAT: the path forms a guest and a hostile guest can send ---------------------------------------
    add(lstat(b"/", "QEMU's first request"))
    add(lstat(b"", "empty path"))
    add(lstat(b"//f", "QEMU's //-prefixed form"))
    add(lstat(b"f", "no trailing NUL", nul=False))
    add(lstat(b"f", "with QEMU's trailing NUL", nul=True))
    add(lstat(b"f\0junk", "a NUL inside the string ends the path", nul=False))
    add(lstat(b"/f/", "trailing slash on a file"))
    add(lstat(b"d/"))
    add(lstat(b"d/."))
    add(lstat(b"d/.."))
    add(lstat(b"..", "'..' at the root stays at the root"))
    add(lstat(b"/../../.."))
    add(lstat(b"../f"))
    add(lstat(b"../../../../../../../etc/passwd", "'..' cannot leave the export"))
    add(lstat(b"/etc/passwd", "absolute paths mean inside the export"))
    add(lstat(b"L_f", "a symlink itself"))
    add(lstat(b"L_d/", "trailing slash follows a symlink to a directory"))
    add(lstat(b"L_d/g"))
    add(lstat(b"L_d/../f", "'..' after a symlink is physical"))
    add(lstat(b"L_f/", "trailing slash through a symlink to a file"))
    add(lstat(b"L_dangling/"))
    add(lstat(b"L_abs", "absolute symlink, not followed"))
    add(lstat(b"L_abs/", "absolute symlink to a file, with slash"))
    add(lstat(b"L_loop/", "symlink loop"))
    add(lstat(b"L_proc/", "/proc/self/root does not exist inside the export"))
    add(lstat(b"L_procfd/"))
    add(lstat(b"d/L_upout/", "relative symlink climbing out clamps at the root"))
    add(lstat(b"nonexistent"))
    add(lstat(b"f/x", "a file as a directory component"))
    add(lstat(NAME255, "255-byte name"))
    add(lstat(NAME256, "256-byte name"))
    add(lstat(DEEP + b"/leaf", "a ~3.8 KiB path"))
    add(lstat(b"/" * 4094 + b"f", "4095-byte path: the longest the kernel takes"))
    add(lstat(b"/" * 4095 + b"f", "4096-byte path: ENAMETOOLONG"))
    add(lstat(b"fifo"))
    add(lstat(b"null"))
    add(lstat(b"sock"))
    add(lstat(b"d/sub/../g"))

    # -- READLINK: bufsize edges ------------------------------------------------------------------------
    for path, size, note in [
        (b"L_f", 4096, ""),
        (b"L_f", 0, "bufsize 0"),
        (b"L_f", 1, "bufsize 1"),
        (b"L_f", 2, "bufsize 2"),
        (b"L_abs", 5, "truncated to bufsize-1"),
        (b"L_abs", 11, "exactly len"),
        (b"L_abs", 12, "len+1"),
        (b"L_long", 4096, "300-byte target"),
        (b"L_long", 100000, "bufsize past the frame limit"),
        (b"f", 4096, "not a symlink"),
        (b"nonexistent", 4096, ""),
        (b"", 4096, "empty path"),
        (b"L_d/", 4096, "trailing slash follows"),
        (b"L_dangling/", 4096, ""),
        (b"L_loop", 64, ""),
        (b"d/L_up", 64, ""),
    ]:
        add(S(p.Readlink(path, size), note))

    # -- STATFS / GETVERSION ---------------------------------------------------------------------------
    for path in (b"/", b"f", b"L_d", b"fifo", b"nonexistent", b"", b"L_dangling", b"f/"):
        add(S(p.Statfs(path)))
    for path in (b"f", b"d", b"L_f", b"/", b"nonexistent", b"", b"sock", b"L_dangling", b"f/"):
        add(S(p.Getversion(path)))

    # -- OPEN -------------------------------------------------------------------------------------------
    for path, flags, note in [
        (b"f", O_RDONLY, ""),
        (b"//f", O_RDONLY, ""),
        (b"f", O_RDONLY | O_UNKNOWN, "unknown flag bits are ignored"),
        (b"L_f", O_RDONLY, "follows a final symlink"),
        (b"L_f", O_RDONLY | O_NOFOLLOW, "O_NOFOLLOW on a symlink: ELOOP"),
        (b"L_f", O_PATH | O_NOFOLLOW, "an O_PATH fd to the symlink itself: ENXIO"),
        (b"L_f", O_PATH, ""),
        (b"L_d/g", O_RDONLY | O_NOFOLLOW, "O_NOFOLLOW only concerns the last component"),
        (b"d", O_RDONLY | O_DIRECTORY, ""),
        (b"d/", O_RDONLY, ""),
        (b"/", O_RDONLY | O_DIRECTORY, ""),
        (b"f", O_RDONLY | O_DIRECTORY, ""),
        (b"L_d", O_RDONLY | O_DIRECTORY, ""),
        (b"L_d", O_RDONLY | O_DIRECTORY | O_NOFOLLOW, ""),
        (b"d", O_WRONLY, "a directory for writing"),
        (b"d", O_RDONLY | O_CREAT, "O_CREAT on a directory"),
        (b"f/", O_RDONLY, ""),
        (b"fifo", O_RDWR, "a FIFO (O_RDWR cannot block)"),
        (b"fifo", O_RDONLY | O_NONBLOCK, ""),
        (b"fifo", O_WRONLY | O_NONBLOCK, ""),
        (b"L_fifo", O_RDWR, ""),
        (b"null", O_RDWR, "a device"),
        (b"L_null", O_RDONLY, ""),
        (b"sock", O_RDONLY, "a socket"),
        (b"L_abs", O_RDONLY, "absolute symlink: the export's /etc/passwd"),
        (b"L_rel", O_RDONLY, "relative symlink climbing out: clamped"),
        (b"L_dangling", O_RDONLY, ""),
        (b"L_loop", O_RDONLY, ""),
        (b"", O_RDONLY, "empty path"),
        (b"nonexistent", O_RDONLY, ""),
        (NAME256, O_RDONLY, ""),
        (NAME255, O_RDONLY, ""),
        (DEEP + b"/leaf", O_RDONLY, ""),
        (b"L_proc/", O_RDONLY, ""),
        (b"fifo", O_RDONLY | O_DIRECTORY, "O_DIRECTORY on a FIFO: ENOTDIR, never an open"),
        (b"null", O_RDONLY | O_DIRECTORY, ""),
        (b"fifo", O_RDWR | O_TRUNC, ""),
        (b"L_f", O_PATH | O_NOFOLLOW | O_DIRECTORY, ""),
        (b"L_d", O_PATH | O_NOFOLLOW, "O_PATH to a symlink to a directory"),
        (b"d", O_RDWR, ""),
        (b"d", O_RDONLY | O_TRUNC, "O_TRUNC on a directory"),
        (b"d", O_PATH | O_CREAT, "O_PATH ignores O_CREAT"),
        (b"d", O_RDONLY | O_CREAT | O_DIRECTORY, "O_CREAT|O_DIRECTORY: EINVAL"),
        (b"nonexistent", O_RDONLY | O_CREAT | O_DIRECTORY, ""),
        (b"d", O_TMPFILE | O_RDONLY, "O_TMPFILE without write access"),
        (b"f", O_TMPFILE | O_RDWR, "O_TMPFILE on a file"),
        (b"f", os.O_ACCMODE, "access mode 3"),
        (b"exec", O_RDONLY | O_PATH, ""),
    ]:
        add(S(p.Open(path, flags), note))
    add(
        S(
            p.Open(b"L_dangling", O_CREAT | O_WRONLY),
            "O_CREAT through a dangling symlink creates its target",
            write=b"via dangling\n",
        )
    )
    add(lstat(b"nowhere", "created with mode 0"))
    add(S(p.Open(b"L_dangling2", O_CREAT | O_WRONLY | O_NOFOLLOW), "O_CREAT|O_NOFOLLOW on a symlink: ELOOP"))
    add(S(p.Open(b"L_dangling_abs", O_CREAT | O_WRONLY), "absolute dangling symlink: created inside"))
    add(lstat(b"nowhere_abs"))
    add(S(p.Open(b"opened_new", O_CREAT | O_RDWR), "O_CREAT via OPEN: mode 0", write=b"x"))
    add(lstat(b"opened_new"))
    add(S(p.Open(b"opened_new", O_CREAT | O_EXCL | O_RDWR)))
    add(S(p.Open(b"L_f", O_CREAT | O_EXCL | O_RDWR), "O_EXCL never follows"))
    add(S(p.Open(b"opened_unknown", O_CREAT | O_WRONLY | O_UNKNOWN), "unknown bits with O_CREAT"))
    add(S(p.Open(b"trunc1", O_WRONLY | O_TRUNC), "O_TRUNC"))
    add(lstat(b"trunc1"))
    add(S(p.Open(b"appendonly", O_WRONLY), "append-only file for plain writing: EPERM"))
    add(S(p.Open(b"appendonly", O_WRONLY | O_APPEND), write=b"more\n"))
    add(S(p.Open(b"rw1", O_RDWR | O_APPEND), write=b"appended\n"))
    add(S(p.Open(b"rw1", O_RDONLY), "the append landed at the end"))
    add(S(p.Open(b"nonexistent/x", O_CREAT | O_WRONLY)))
    add(S(p.Open(b"f/x", O_CREAT | O_WRONLY)))
    add(S(p.Open(b"newdir_open/", O_CREAT | O_WRONLY), "O_CREAT with a trailing slash"))
    add(S(p.Open(NAME256[:-1] + b"o", O_CREAT | O_WRONLY), "create a 255-byte name"))
    add(S(p.Open(NAME256, O_CREAT | O_WRONLY)))
    add(S(p.Open(b"d", O_TMPFILE | O_RDWR), "O_TMPFILE in a directory", write=b"tmp"))
    add(S(p.Open(b"../../opened_clamped", O_CREAT | O_WRONLY), "created inside, '..' clamped"))
    add(lstat(b"opened_clamped"))

    # -- CREATE -----------------------------------------------------------------------------------------
    C = p.Create
    for path, flags, mode, uid, gid, note in [
        (b"c1", O_CREAT | O_RDWR, 0o644, 0, 0, ""),
        (b"c2", O_CREAT | O_WRONLY, 0o640, 1000, 1000, "as the guest's user"),
        (b"c3", O_CREAT | O_EXCL | O_RDWR, 0o6755, 0, 0, "setid bits as root"),
        (b"c4", O_CREAT | O_RDWR, 0o4755, 1000, 0, "setuid as uid 1000, gid 0"),
        (b"sgid_dir/c5", O_CREAT | O_RDWR, 0o2755, 1000, 1000, "setgid in a setgid dir of another group"),
        (b"sgid_dir/c6", O_CREAT | O_RDWR, 0o2755, 0, 0, ""),
        (b"c7", O_CREAT | O_RDWR, 0o100600, 0, 0, "file-type bits in the mode are ignored"),
        (b"c1", O_CREAT | O_EXCL | O_RDWR, 0o644, 0, 0, "O_EXCL on an existing file"),
        (b"f", O_CREAT | O_RDONLY, 0o600, 0, 0, "O_CREAT on an existing file opens it"),
        (b"d", O_CREAT | O_RDONLY, 0o600, 0, 0, ""),
        (b"fifo", O_CREAT | O_RDWR, 0o600, 0, 0, "an existing FIFO"),
        (b"fifo", O_CREAT | O_RDONLY | O_NONBLOCK, 0o600, 0, 0, ""),
        (b"fifo", O_CREAT | O_EXCL | O_RDWR, 0o600, 0, 0, ""),
        (b"L_dangling_abs", O_CREAT | O_WRONLY, 0o600, 1000, 1000, "through an absolute symlink"),
        (b"nonexistent/c", O_CREAT | O_RDWR, 0o600, 0, 0, ""),
        (b"c8/", O_CREAT | O_RDWR, 0o600, 0, 0, ""),
        (b"", O_CREAT | O_RDWR, 0o600, 0, 0, ""),
        (NAME256, O_CREAT | O_RDWR, 0o600, 0, 0, ""),
        (b"/c9", O_CREAT | O_RDWR, 0o600, 0, 0, "absolute path"),
        (b"/../../c10", O_CREAT | O_RDWR, 0o600, 0, 0, ""),
        (b"d/../c11", O_CREAT | O_RDWR, 0o600, 0, 0, ""),
        (b"sticky/other", O_CREAT | O_WRONLY, 0o600, 1000, 1000, "someone else's file in a sticky dir"),
        (b"sticky/mine", O_CREAT | O_WRONLY, 0o600, 1000, 1000, ""),
        (b"d", O_TMPFILE | O_RDWR, 0o600, 0, 0, "O_TMPFILE through CREATE keeps the mode"),
        (b"c12", O_CREAT | O_RDWR | O_UNKNOWN, 0o600, 0, 0, "unknown flag bits"),
    ]:
        add(S(C(path, flags, mode, uid, gid), note))
    for name in (
        b"c1",
        b"c2",
        b"c3",
        b"c4",
        b"sgid_dir/c5",
        b"sgid_dir/c6",
        b"c7",
        b"nowhere_abs",
        b"c9",
        b"c10",
        b"c11",
        b"sticky/mine",
        b"c12",
    ):
        add(lstat(name))

    # -- MKNOD ------------------------------------------------------------------------------------------
    dev13 = os.makedev(1, 3)
    for uid, gid, path, mode, rdev, note in [
        (0, 0, b"n_fifo", stat.S_IFIFO | 0o644, 0, ""),
        (0, 0, b"n_reg", stat.S_IFREG | 0o600, 0, ""),
        (0, 0, b"n_zero", 0o640, 0, "no type: a regular file"),
        (0, 0, b"n_chr", stat.S_IFCHR | 0o600, dev13, "a device as root (CAP_MKNOD)"),
        (1000, 1000, b"n_chr1000", stat.S_IFCHR | 0o600, dev13, "a device as uid 1000: EPERM"),
        (1000, 1000, b"n_fifo1000", stat.S_IFIFO | 0o620, 0, ""),
        (0, 0, b"n_sock", stat.S_IFSOCK | 0o600, 0, ""),
        (0, 0, b"n_dir", stat.S_IFDIR | 0o700, 0, "mknod cannot make a directory"),
        (0, 0, b"n_bad", 0o170000 | 0o644, 0, "an invalid type"),
        (0, 0, b"f", stat.S_IFIFO | 0o644, 0, ""),
        (0, 0, b"n_big", stat.S_IFIFO | 0o644, 1 << 40, "rdev that does not fit 32 bits"),
        (0, 0, b"n_slash/", stat.S_IFIFO | 0o644, 0, ""),
        (0, 0, b"nonexistent/n", stat.S_IFIFO | 0o644, 0, ""),
        (0, 0, NAME256, stat.S_IFIFO | 0o644, 0, ""),
        (0, 0, b"/", stat.S_IFIFO | 0o644, 0, "the root"),
        (1000, 1000, b"n_whiteout", stat.S_IFCHR | 0o600, 0, "a whiteout needs no CAP_MKNOD"),
        (1000, 1000, b"n_setid", stat.S_IFREG | 0o6755, 0, ""),
        (1000, 1000, b"sgid_dir/n_sg", stat.S_IFREG | 0o2755, 0, ""),
    ]:
        add(S(p.Mknod(uid, gid, path, mode, rdev), note))
    for name in (
        b"n_fifo",
        b"n_reg",
        b"n_zero",
        b"n_chr",
        b"n_fifo1000",
        b"n_sock",
        b"n_setid",
        b"sgid_dir/n_sg",
        b"n_whiteout",
    ):
        add(lstat(name))

    # -- MKDIR ------------------------------------------------------------------------------------------
    for uid, gid, path, mode, note in [
        (0, 0, b"m1", 0o755, ""),
        (1000, 1000, b"m2", 0o700, ""),
        (0, 0, b"m3", 0o3777, "setgid and sticky"),
        (1000, 1000, b"sgid_dir/m4", 0o755, "inherits the setgid dir's group and bit"),
        (0, 0, b"m5/", 0o755, "trailing slash"),
        (0, 0, b"m6//", 0o755, ""),
        (0, 0, b"d", 0o755, ""),
        (0, 0, b"L_d", 0o755, "over a symlink"),
        (0, 0, b"L_dangling", 0o755, ""),
        (0, 0, b"nonexistent/m", 0o755, ""),
        (0, 0, b"f/m", 0o755, ""),
        (0, 0, NAME256, 0o755, ""),
        (0, 0, b"", 0o755, ""),
        (0, 0, b"/", 0o755, "the root"),
        (0, 0, b".", 0o755, ""),
        (0, 0, b"d/..", 0o755, ""),
    ]:
        add(S(p.Mkdir(uid, gid, path, mode), note))
    for name in (b"m1", b"m2", b"m3", b"sgid_dir/m4", b"m5", b"m6"):
        add(lstat(name))

    # -- SYMLINK ----------------------------------------------------------------------------------------
    for uid, gid, target, path, note in [
        (0, 0, b"f", b"s1", ""),
        (1000, 1000, b"/etc/passwd", b"s2", "owned by the guest's user"),
        (0, 0, b"../../../../x", b"s3", ""),
        (0, 0, b"", b"s4", "empty target"),
        (0, 0, b"t" * 4096, b"s5", "target longer than PATH_MAX"),
        (0, 0, b"f", b"f", ""),
        (0, 0, b"f", b"s6/", ""),
        (0, 0, b"f", b"nonexistent/s", ""),
        (0, 0, b"f", NAME256, ""),
        (0, 0, b"f", b"/", ""),
        (0, 0, b"f", b"", ""),
    ]:
        add(S(p.Symlink(uid, gid, target, path), note))
    add(lstat(b"s2"))
    add(S(p.Readlink(b"s2", 4096)))
    add(S(p.Readlink(b"s3", 4096)))

    # -- LINK -------------------------------------------------------------------------------------------
    for old, new, note in [
        (b"link1", b"lnk1", ""),
        (b"L_f", b"lnk2", "a hard link to the symlink itself"),
        (b"d", b"lnk3", "a directory: EPERM"),
        (b"link1", b"d", ""),
        (b"nonexistent", b"lnk4", ""),
        (b"link1", b"nonexistent/x", ""),
        (b"link1/", b"lnk5", "trailing slash on the old name"),
        (b"link1", b"lnk6/", "trailing slash on the new name"),
        (b"d/", b"lnk7", ""),
        (b"L_d/", b"lnk8", ""),
        (b"L_f/", b"lnk8b", ""),
        (b"appendonly", b"lnk9", ""),
        (b"fifo", b"lnk10", ""),
        (b"", b"lnk11", ""),
        (b"link1", b"", ""),
        (b"/", b"lnk12", "the root"),
        (b"link1", b"/", ""),
        (b"link1", NAME256, ""),
        (b"d/", b"f", "old a directory, new exists"),
        (b"d/.", b"lnk13", ""),
        (b"L_dangling/", b"lnk14", ""),
        (b"d/", b"lnk15/", ""),
        (b"link1", b"d/.", ""),
    ]:
        add(S(p.Link(old, new), note))
    add(lstat(b"link1", "nlink 2"))
    add(lstat(b"lnk2"))

    # -- CHMOD ------------------------------------------------------------------------------------------
    for path, mode, note in [
        (b"chmod1", 0o600, ""),
        (b"chmod1", 0o4755, "setuid"),
        (b"chmod1", 0o7777, "all the setid and sticky bits"),
        (b"chmod1", 0o100640, "file-type bits ignored"),
        (b"L_abs", 0o600, "follows the symlink to the export's /etc/passwd"),
        (b"L_dangling2", 0o600, ""),
        (b"d/", 0o700, ""),
        (b"f/", 0o600, ""),
        (b"appendonly", 0o600, ""),
        (b"", 0o600, ""),
        (b"fifo", 0o600, ""),
        (b"null", 0o600, ""),
        (b"nonexistent", 0o600, ""),
    ]:
        add(S(p.Chmod(path, mode), note))
    for name in (b"chmod1", b"etc/passwd", b"d", b"fifo", b"null"):
        add(lstat(name))

    # -- CHOWN ------------------------------------------------------------------------------------------
    for path, uid, gid, note in [
        (b"chown1", 1000, 1000, ""),
        (b"chown1", NO_ID, NO_ID, "-1, -1: no change"),
        (b"chown1", NO_ID, 2000, ""),
        (b"chown1", 3000, NO_ID, ""),
        (b"L_f", 1000, 1000, "the symlink itself"),
        (b"L_dir2/", 1000, 1000, "trailing slash follows to the directory"),
        (b"setuid", 1000, 1000, "a setuid file changes owner"),
        (b"appendonly", 1000, 1000, ""),
        (b"nonexistent", 1000, 1000, ""),
        (b"", 1000, 1000, ""),
        (b"chown2/", 1000, 1000, ""),
        (b"/", NO_ID, NO_ID, "the root"),
        (b"d/.", 1000, NO_ID, ""),
    ]:
        add(S(p.Chown(path, uid, gid), note))
    for name in (b"chown1", b"L_f", b"f", b"d", b"setuid"):
        add(lstat(name))

    # -- TRUNCATE ---------------------------------------------------------------------------------------
    for path, length, note in [
        (b"trunc2", 3, ""),
        (b"L_trunc", 100000, "through a symlink, sparse extension"),
        (b"trunc2", 0, ""),
        (b"d", 0, "a directory"),
        (b"fifo", 0, "a FIFO"),
        (b"null", 0, "a device"),
        (b"sock", 0, ""),
        (b"nonexistent", 0, ""),
        (b"trunc2", (1 << 64) - 1, "length -1"),
        (b"nonexistent", (1 << 64) - 1, "length -1 is checked before the path"),
        (b"trunc2", 1 << 62, "too large"),
        (b"appendonly", 0, ""),
        (b"", 0, ""),
        (b"f/", 0, ""),
    ]:
        add(S(p.Truncate(path, length), note))
    add(lstat(b"trunc2"))

    # -- UTIME ------------------------------------------------------------------------------------------
    U = p.Utime
    add(S(U(b"utime1", 1000, 5, 2000, 6)))
    add(lstat(b"utime1"))
    add(S(U(b"utime1", 0, UTIME_OMIT, 3000, 0), "atime omitted"))
    add(lstat(b"utime1"))
    add(S(U(b"utime1", 0, UTIME_NOW, 0, UTIME_OMIT), "atime now, mtime omitted"))
    add(lstat(b"utime1"))
    add(S(U(b"utime1", 0, UTIME_NOW, 0, UTIME_NOW), "both now"))
    add(S(U(b"L_f", 4000, 0, 5000, 0), "the symlink itself"))
    add(lstat(b"L_f"))
    add(S(U(b"L_dir2/", 6000, 1, 7000, 2), "trailing slash follows"))
    add(lstat(b"d/"))
    add(S(U(b"utime1", (1 << 64) - 1, 0, (1 << 64) - 5, 999_999_999), "before the epoch"))
    add(lstat(b"utime1"))
    for path, times, note in [
        (b"nonexistent", (1, 0, 1, 0), ""),
        (b"", (1, 0, 1, 0), ""),
        (b"utime1", (1, 2_000_000_000, 1, 0), "nsec out of range"),
        (b"appendonly", (1, 0, 1, 0), ""),
        (b"fifo", (8000, 0, 9000, 0), ""),
        (b"f/", (1, 0, 1, 0), ""),
        (b"/", (T0, 11, T0, 12), "the root"),
    ]:
        add(S(U(path, *times), note))
    add(lstat(b"fifo"))

    # -- RENAME -----------------------------------------------------------------------------------------
    for old, new, note in [
        (b"ren1", b"ren1b", ""),
        (b"ren1b", b"ren2", "over an existing file"),
        (b"rendir1", b"rendir2", "a directory over an empty directory"),
        (b"ren3", b"d", "a file over a directory"),
        (b"d", b"ren3", "a directory over a file"),
        (b"d", b"nonempty", "over a non-empty directory"),
        (b"d", b"d/sub/x", "into itself"),
        (b"nonexistent", b"x", ""),
        (b"ren3", b"nonexistent/x", ""),
        (b"ren3/", b"x", ""),
        (b"ren3", b"ren4/", "a file to a name with a trailing slash"),
        (b"/", b"x", "the root"),
        (b"ren3", b"/", ""),
        (b".", b"x", ""),
        (b"appendonly", b"y", ""),
        (b"L_ren", b"L_ren2", "renames the symlink, not its target"),
        (b"", b"x", ""),
        (b"ren3", b"ren3", "onto itself"),
        (b"ren3", NAME256, ""),
        (b"rendir2/", b"rendir3/", "directories with slashes"),
    ]:
        add(S(p.Rename(old, new), note))
    for name in (b"ren2", b"rendir3", b"ren3", b"L_ren2"):
        add(lstat(name))
    add(lstat(b"ren1b"))

    # -- REMOVE -----------------------------------------------------------------------------------------
    for path, note in [
        (b"rm1", ""),
        (b"m2", "an empty directory"),
        (b"nonempty", "a non-empty directory"),
        (b"d/", ""),
        (b"emptydir/", "with a trailing slash"),
        (b"L_dir2", "a symlink to a directory: removes the link"),
        (b"L_d/", "a symlink with a trailing slash"),
        (b"/", "the root"),
        (b".", ""),
        (b"d/..", ""),
        (b"nonexistent", ""),
        (b"", ""),
        (b"appendonly", ""),
        (b"f/", ""),
        (b"sticky/other", ""),
        (b"n_fifo", "a FIFO"),
        (NAME256, ""),
    ]:
        add(S(p.Remove(path), note))
    add(lstat(b"L_d"))

    # -- xattrs -----------------------------------------------------------------------------------------
    for size, path, name, note in [
        (0, b"xattrs", b"user.a", "size 0 asks for the length"),
        (100, b"xattrs", b"user.a", ""),
        (5, b"xattrs", b"user.a", "exact size"),
        (4, b"xattrs", b"user.a", "one short: ERANGE"),
        (1, b"xattrs", b"user.a", ""),
        (0, b"xattrs", b"user.empty", ""),
        (10, b"xattrs", b"user.empty", ""),
        (10, b"xattrs", b"user.bin", "binary value"),
        (10, b"xattrs", b"user.missing", ""),
        (10, b"xattrs", b"", "empty name"),
        (10, b"xattrs", b"foo", "no namespace"),
        (10, b"xattrs", b"user." + b"x" * 251, "name longer than 255"),
        (10, b"nonexistent", b"user.a", ""),
        (10, b"", b"user.a", ""),
        (10, b"L_f", b"user.a", "a symlink: not followed"),
        (10, b"xdir", b"user.d", "a directory"),
        (0, b"xdir/", b"user.d", ""),
        (10, b"xattrs", b"trusted.x", "trusted.* without CAP_SYS_ADMIN"),
        (100000, b"xattrs", b"user.a", "size beyond the frame limit"),
    ]:
        add(S(Lg(size, path, name), note))
    for size, path, note in [
        (0, b"xattrs", "length query"),
        (100, b"xattrs", ""),
        (5, b"xattrs", "too small: ERANGE"),
        (0, b"f", "no xattrs"),
        (10, b"f", ""),
        (10, b"L_f", ""),
        (10, b"nonexistent", ""),
        (10, b"", ""),
        (10, b"xdir/", ""),
        (100000, b"xattrs", ""),
    ]:
        add(S(Ll(size, path), note))
    for path, name, value, size, flags, note in [
        (b"xset", b"user.new", b"v1", 2, 0, ""),
        (b"xset", b"user.new", b"v2", 2, XATTR_CREATE, "XATTR_CREATE on an existing name"),
        (b"xset", b"user.missing", b"v", 1, XATTR_REPLACE, "XATTR_REPLACE on a missing name"),
        (b"xset", b"user.new", b"v3", 2, XATTR_REPLACE, ""),
        (b"xset", b"user.prefix", b"abc", 1, 0, "size shorter than the value: its prefix"),
        (b"xset", b"user.zero", b"abc", 0, 0, "size 0: an empty value"),
        (b"xset", b"user.nul", b"a\0b", 3, 0, "NULs inside a value"),
        (b"xset", b"trusted.x", b"v", 1, 0, "trusted.*: EPERM"),
        (b"L_f", b"user.x", b"v", 1, 0, "user.* on a symlink: EPERM"),
        (b"fifo", b"user.x", b"v", 1, 0, "user.* on a FIFO: EPERM"),
        (b"xset", b"", b"v", 1, 0, "empty name"),
        (b"xset", b"user.x", b"v", 1, 4, "unknown flags"),
        (b"nonexistent", b"user.x", b"v", 1, 0, ""),
        (b"appendonly", b"user.x", b"v", 1, 0, ""),
        (b"xdir/", b"user.x", b"dv", 2, 0, ""),
        (b"/", b"user.root", b"r", 1, 0, "the root"),
        (b"xset", b"user.big", b"v", 0xFFFFFFFF, 0, "size -1: E2BIG from the kernel"),
    ]:
        add(S(Ls(path, name, value, size, flags), note))
    for name in (b"user.new", b"user.prefix", b"user.zero", b"user.nul"):
        add(S(Lg(100, b"xset", name)))
    add(S(Ll(100, b"xset")))
    for path, name, note in [
        (b"xset", b"user.new", ""),
        (b"xset", b"user.new", "already gone"),
        (b"xset", b"trusted.x", ""),
        (b"xset", b"", ""),
        (b"nonexistent", b"user.a", ""),
        (b"L_f", b"user.a", ""),
        (b"appendonly", b"user.a", ""),
        (b"xdir/", b"user.d", ""),
    ]:
        add(S(Lr(path, name), note))
    add(S(Ll(100, b"xset")))
    add(S(Ll(100, b"xdir")))

    # -- the end state, seen through the protocol (the trees are compared on disk afterwards) ----------
    for name in (b"f", b"etc/passwd", b"appendonly", b"owned1000", b"sticky", b"sgid_dir", b"xattrs"):
        add(lstat(name))
    add(S(p.Open(b"appendonly", O_RDONLY), "the append through OPEN landed"))
    add(lstat(b"/", "still serving"))
    return s


SCRIPT = build_script()


# ---------------------------------------------------------------------------------------------------------
# Normalising replies.

# F_GETFL bits worth comparing. O_LARGEFILE is forced on 64-bit; O_NOFOLLOW stays in f_flags when the
# reference opens by name, while the gateway reopens the inode through /proc/self/fd, where O_NOFOLLOW
# must be dropped (the magic link has to be followed) -- it has done its work during the lookup.
O_LARGEFILE = 0o100000  # the kernel's bit; Python's os.O_LARGEFILE is 0 on 64-bit hosts
_FL_MASK = ~(O_LARGEFILE | O_NOFOLLOW | os.O_CLOEXEC)


def describe_fd(fd: int, write: bytes | None) -> tuple[object, ...]:
    """What the guest can observe through a received fd: type, mode, size, owner, link count, flags,
    and what it reads (a file's bytes, a directory's names); optionally a write through it."""
    try:
        st = os.fstat(fd)
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        seen: object = None
        if stat.S_ISDIR(st.st_mode):
            seen = tuple(sorted(os.listdir(f"/proc/self/fd/{fd}")))
        elif stat.S_ISREG(st.st_mode) and not flags & O_PATH and flags & os.O_ACCMODE != O_WRONLY:
            try:
                seen = os.pread(fd, 1 << 16, 0)
            except OSError as exc:  # access mode 3 opens for neither reading nor writing
                seen = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        wrote: object = None
        if write is not None:
            try:
                wrote = os.write(fd, write)
            except OSError as exc:
                wrote = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        return (
            "fd",
            stat.S_IFMT(st.st_mode),
            oct(stat.S_IMODE(st.st_mode)),
            st.st_size,
            st.st_uid,
            st.st_gid,
            st.st_nlink,
            oct(flags & _FL_MASK),
            seen,
            wrote,
        )
    finally:
        os.close(fd)


def normalise(step: Step, reply: Reply) -> tuple[object, ...]:
    if reply.fd is not None:
        return describe_fd(reply.fd, step.write)
    if reply.errno:
        return ("error", errno.errorcode.get(reply.errno, reply.errno))
    rtype = reply.rtype
    shape = p.reply_shape(rtype)
    if shape is not p.ReplyShape.PAYLOAD:
        return ("ok",)
    payload = reply.payload
    if rtype == p.RequestType.LSTAT:
        st = p.parse_stat(payload)
        return (
            "stat",
            len(payload),
            st.nlink,
            oct(st.mode),
            st.uid,
            st.gid,
            st.rdev,
            st.size,
            st.blksize,
            st.blocks,
            stamp(st.atime_sec, st.atime_nsec),
            stamp(st.mtime_sec, st.mtime_nsec),
        )
    if rtype == p.RequestType.STATFS:
        sf = p.parse_statfs(payload)  # free counts move with the rest of the host's file system
        return (
            "statfs",
            len(payload),
            sf.type,
            sf.bsize,
            sf.blocks,
            sf.files,
            sf.fsid0,
            sf.fsid1,
            sf.namelen,
            sf.frsize,
        )
    if rtype == p.RequestType.GETVERSION:
        # Random per inode, so it differs between two trees; the reference also leaves the upper half of
        # its u64 uninitialised (the ioctl writes an int). Only its presence and size are comparable.
        return ("version", len(payload))
    return ("payload", payload)  # READLINK, LGETXATTR, LLISTXATTR: exact bytes


def step_nul(i: int, step: Step) -> bool:
    """Half the requests carry QEMU's trailing NUL in every path string, half do not."""
    return step.nul if step.nul is not None else i % 2 == 0


def run_script(helper: Helper, steps: Sequence[Step]) -> list[tuple[object, ...]]:
    out: list[tuple[object, ...]] = []
    for i, step in enumerate(steps):
        try:
            reply = helper.call(step.request, nul=step_nul(i, step))
        except (OSError, ProtocolClosed) as exc:  # a hang (timeout) or a dead helper ends the run
            out.append(("DEAD", repr(exc), helper.stderr_text()[-800:]))
            break
        out.append(normalise(step, reply))
    return out


def describe_step(i: int, step: Step) -> str:
    text = repr(step.request)
    if len(text) > 160:
        text = text[:157] + "..."
    return f"#{i} {text}" + (f"  ({step.note})" if step.note else "")


def test_script_covers_every_request_type() -> None:
    """The script is the contract: every type, well over 150 requests, with and without the NUL."""
    types = {step.request.type for step in SCRIPT}
    assert types == set(p.RequestType), f"missing: {set(p.RequestType) - types}"
    assert len(SCRIPT) >= 150, len(SCRIPT)
    nuls = [step_nul(i, step) for i, step in enumerate(SCRIPT)]
    assert nuls.count(True) > 50 and nuls.count(False) > 50


def test_differential_script(trees: dict[str, Path], tmp_path: Path) -> None:
    """The whole script against both helpers: identical normalised replies, identical trees after."""
    results: dict[str, list[tuple[object, ...]]] = {}
    for name, argv0 in HELPERS.items():
        with Helper(argv0, trees[name], tmp_path / f"{name}.log") as helper:
            results[name] = run_script(helper, SCRIPT)
            alive = helper.proc.poll() is None
        assert alive, f"{name} died during the script:\n{helper.stderr_text()[-2000:]}"
    ref, gw = results["reference"], results["gateway"]
    assert len(ref) == len(SCRIPT), (
        f"the reference stopped at {describe_step(len(ref) - 1, SCRIPT[len(ref) - 1])}:\n{ref[-1]}"
    )
    mismatches = [
        f"{describe_step(i, step)}\n    reference: {a}\n    gateway:   {b}"
        for i, (step, a, b) in enumerate(zip(SCRIPT, ref, gw, strict=False))
        if a != b
    ]
    assert len(gw) == len(SCRIPT) or mismatches, f"the gateway stopped early: {gw[-1]}"
    assert not mismatches, f"{len(mismatches)} of {len(SCRIPT)} replies differ:\n" + "\n".join(mismatches)

    # The same requests must have left the same trees behind.
    before = {name: snapshot_tree(path) for name, path in trees.items()}
    a, b = before["reference"], before["gateway"]
    diff = [
        f"{k}:\n    reference: {a.get(k)}\n    gateway:   {b.get(k)}"
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k)
    ]
    assert not diff, "the two exports differ after the script:\n" + "\n".join(diff)

    # No request may have cost the gateway an internal error (an exception turned into EIO).
    log = (tmp_path / "gateway.log").read_text(errors="replace")
    assert "Traceback" not in log and "internal error" not in log, log[-3000:]


# ---------------------------------------------------------------------------------------------------------
# Requests the reference cannot take (it crashes or hangs): run against the gateway only, which must
# answer sensibly and go on serving.

CAPS_SEVEN = sum(
    1 << bit for bit in (0, 1, 3, 4, 6, 7, 27)
)  # CHOWN DAC_OVERRIDE FOWNER FSETID SETGID SETUID MKNOD


def frame(rtype: int, payload: bytes) -> bytes:
    return p.HEADER.pack(rtype, len(payload)) + payload


def pstr(value: bytes) -> bytes:
    return struct.pack("<H", len(value)) + value


def cap_eff(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    raise AssertionError("no CapEff line")


def still_privileged(gw: Helper, export: Path) -> None:
    """After a request that broke the reference's identity switching: the seven capabilities are all
    effective again, creating as another user still works, and so do the calls needing CAP_MKNOD and
    CAP_CHOWN."""
    assert cap_eff(gw.proc.pid) == CAPS_SEVEN, hex(cap_eff(gw.proc.pid))
    reply = gw.call(p.Create(b"after_create", O_CREAT | O_RDWR, 0o644, 1000, 1000))
    assert reply.fd is not None, reply
    os.close(reply.fd)
    st = os.lstat(export / "after_create")
    assert (st.st_uid, st.st_gid) == (1000, 1000)
    assert gw.call(p.Mknod(0, 0, b"after_chr", stat.S_IFCHR | 0o600, os.makedev(1, 3))).errno == 0
    assert gw.call(p.Chown(b"after_create", 0, 0)).errno == 0
    st = os.lstat(export / "after_create")
    assert (st.st_uid, st.st_gid) == (0, 0)
    assert cap_eff(gw.proc.pid) == CAPS_SEVEN


def owned(rel: str, uid: int, gid: int) -> Callable[[Helper, Path], None]:
    def check(gw: Helper, export: Path) -> None:
        st = os.lstat(export / rel)
        assert (st.st_uid, st.st_gid) == (uid, gid), (rel, st.st_uid, st.st_gid)
        still_privileged(gw, export)

    return check


def xattr_list(export: Path) -> tuple[object, ...]:
    names = os.listxattr(export / "xattrs", follow_symlinks=False)
    return ("payload", pstr(b"".join(os.fsencode(n) + b"\0" for n in names)))


@dataclass(frozen=True)
class GatewayOnly:
    id: str
    why: str  # what the reference does with it: why it cannot be in the shared script
    request: p.Request | None = None
    raw: bytes = b""  # bytes to send instead of a request (framing cases)
    eof: bool = False  # then close our sending side
    reply_type: int = 0  # the reply shape to read after raw bytes
    # The gateway's normalised reply (a callable gets the export); None: it must close the connection.
    expect: tuple[object, ...] | Callable[[Path], tuple[object, ...]] | None = None
    then: Callable[[Helper, Path], None] | None = None


EOPNOTSUPP = ("error", errno.errorcode[errno.EOPNOTSUPP])  # errorcode spells 95 "ENOTSUP"
_FIFO_WHY = "the reference open()s before it checks the type: a FIFO without a writer blocks it for good"
REFERENCE_BREAKERS: list[GatewayOnly] = [
    GatewayOnly(
        "readlink-size-ffffffff",
        "g_malloc((size_t)-1) aborts the reference",
        p.Readlink(b"L_f", 0xFFFFFFFF),
        expect=("error", "EINVAL"),
    ),
    GatewayOnly(
        "readlink-size-80000000",
        "a negative bufsize: g_malloc of ~2^64 aborts it",
        p.Readlink(b"L_f", 0x80000000),
        expect=("error", "EINVAL"),
    ),
    GatewayOnly(
        "lgetxattr-size-ffffffff",
        "g_malloc((size_t)-1) aborts the reference; the kernel would "
        "take any size >= the value's length, so the gateway returns the value",
        p.Lgetxattr(0xFFFFFFFF, b"xattrs", b"user.a"),
        expect=("payload", pstr(b"alpha")),
    ),
    GatewayOnly(
        "lgetxattr-size-80000000",
        "as above",
        p.Lgetxattr(0x80000000, b"xattrs", b"user.a"),
        expect=("payload", pstr(b"alpha")),
    ),
    GatewayOnly(
        "llistxattr-size-ffffffff", "as above", p.Llistxattr(0xFFFFFFFF, b"xattrs"), expect=xattr_list
    ),
    GatewayOnly(
        "create-uid0-gid1000",
        "uid 0 leaves its euid alone, so capng_apply leaves only "
        "DAC_OVERRIDE effective and nothing restores the rest: a later setresgid aborts it",
        p.Create(b"c_0_1000", O_CREAT | O_RDWR, 0o640, 0, 1000),
        expect=("fd", stat.S_IFREG, "0o640", 0, 0, 1000, 1, oct(O_RDWR), b"", None),
        then=owned("c_0_1000", 0, 1000),
    ),
    GatewayOnly(
        "mknod-uid0-gid1000",
        "as above",
        p.Mknod(0, 1000, b"n_0_1000", stat.S_IFIFO | 0o640, 0),
        expect=("ok",),
        then=owned("n_0_1000", 0, 1000),
    ),
    GatewayOnly(
        "mkdir-uid0-gid1000",
        "as above",
        p.Mkdir(0, 1000, b"m_0_1000", 0o750),
        expect=("ok",),
        then=owned("m_0_1000", 0, 1000),
    ),
    GatewayOnly(
        "symlink-uid0-gid1000",
        "as above",
        p.Symlink(0, 1000, b"f", b"s_0_1000"),
        expect=("ok",),
        then=owned("s_0_1000", 0, 1000),
    ),
    GatewayOnly("open-fifo-rdonly", _FIFO_WHY, p.Open(b"fifo", O_RDONLY), expect=("error", "ENXIO")),
    GatewayOnly("open-fifo-wronly", _FIFO_WHY, p.Open(b"fifo", O_WRONLY), expect=("error", "ENXIO")),
    GatewayOnly("open-symlink-to-fifo", _FIFO_WHY, p.Open(b"L_fifo", O_RDONLY), expect=("error", "ENXIO")),
    GatewayOnly(
        "create-over-fifo-rdonly",
        _FIFO_WHY,
        p.Create(b"fifo", O_CREAT | O_RDONLY, 0o600, 0, 0),
        expect=("error", "ENXIO"),
    ),
    GatewayOnly(
        "create-over-fifo-wronly",
        _FIFO_WHY,
        p.Create(b"fifo", O_CREAT | O_WRONLY, 0o600, 0, 0),
        expect=("error", "ENXIO"),
    ),
    GatewayOnly(
        "getversion-fifo",
        "DELIBERATE: the reference open(O_RDONLY)s the FIFO for its ioctl and "
        "blocks; the gateway never opens a special file: ENXIO",
        p.Getversion(b"fifo"),
        expect=("error", "ENXIO"),
    ),
    GatewayOnly(
        "unknown-type-0",
        "an unknown type ends the reference without a reply; the gateway answers EOPNOTSUPP and reads on",
        raw=frame(0, b""),
        reply_type=0,
        expect=EOPNOTSUPP,
    ),
    GatewayOnly("unknown-type-1", "as above", raw=frame(1, b"\0" * 12), reply_type=1, expect=EOPNOTSUPP),
    GatewayOnly("unknown-type-22", "as above", raw=frame(22, pstr(b"f")), reply_type=22, expect=EOPNOTSUPP),
    GatewayOnly(
        "unknown-type-ffffffff",
        "as above",
        raw=frame(0xFFFFFFFF, b"x"),
        reply_type=0xFFFFFFFF,
        expect=EOPNOTSUPP,
    ),
    GatewayOnly(
        "size-65537",
        "an over-64-KiB size ends the reference; after it the stream cannot be "
        "framed, so the gateway closes the connection cleanly (no reply, exit status 0)",
        raw=p.HEADER.pack(p.RequestType.LSTAT, 65537) + b"\0" * 64,
    ),
    GatewayOnly("size-ffffffff", "as above", raw=p.HEADER.pack(p.RequestType.LSTAT, 0xFFFFFFFF)),
    GatewayOnly(
        "eof-in-header",
        "EOF inside a frame ends the reference; the gateway closes cleanly",
        raw=b"\x08\0\0",
        eof=True,
    ),
    GatewayOnly(
        "eof-in-payload", "as above", raw=p.HEADER.pack(p.RequestType.LSTAT, 10) + b"\x03\0ab", eof=True
    ),
]


def fs_has_getversion(path: Path) -> bool:
    """Whether both helpers issue FS_IOC_GETVERSION on this file system (ext2/3/4, btrfs, reiserfs, xfs).
    Elsewhere they answer 0 without looking at the path, so no GETVERSION can diverge there."""
    fd = os.open(path, os.O_PATH | os.O_DIRECTORY)
    try:
        return getversion_supported(fd)
    finally:
        os.close(fd)


def expected_for(request: p.Request, expect: tuple[object, ...], export: Path) -> tuple[object, ...]:
    if request.type == p.RequestType.GETVERSION and not fs_has_getversion(export):
        return ("version", 8)
    return expect


def test_reference_breakers_are_listed_once() -> None:
    ids = [case.id for case in REFERENCE_BREAKERS]
    assert len(ids) == len(set(ids))
    assert all(case.why for case in REFERENCE_BREAKERS)


@pytest.fixture
def gateway_export(tmp_path: Path) -> Iterator[Path]:
    require_prerequisites(reference=False)
    export = tmp_path / "export"
    build_tree(export)
    try:
        yield export
    finally:
        unlock_tree(export)


@pytest.mark.parametrize("case", REFERENCE_BREAKERS, ids=lambda c: c.id)
def test_gateway_survives_what_breaks_the_reference(
    case: GatewayOnly, gateway_export: Path, tmp_path: Path
) -> None:
    log = tmp_path / "gateway.log"
    with Helper(GATEWAY_HELPER, gateway_export, log, timeout=5.0) as gw:
        started = time.monotonic()
        if case.request is not None:
            got: tuple[object, ...] | None = normalise(Step(case.request), gw.call(case.request))
        else:
            gw.send_raw(case.raw)
            if case.eof:
                gw.sock.shutdown(socket.SHUT_WR)
            got = normalise(Step(p.Lstat(b"")), gw.read_reply(case.reply_type)) if case.expect else None
        elapsed = time.monotonic() - started
        if case.expect is None:
            # A stream that can no longer be framed: the gateway hangs up, without a reply or a crash.
            assert gw.sock.recv(1) == b"", "the gateway answered an unframeable stream"
            status = gw.proc.wait(10)
            text = gw.stderr_text()
            assert status == 0 and "Traceback" not in text, f"exit status {status}:\n{text}"
            return
        expect = case.expect(gateway_export) if callable(case.expect) else case.expect
        if case.request is not None:
            expect = expected_for(case.request, expect, gateway_export)
        assert got == expect, f"{case.id}: got {got}, expected {expect}"
        assert elapsed < 2.0, f"{case.id} took {elapsed:.1f} s"
        if case.then is not None:
            case.then(gw, gateway_export)
        # ... and it goes on serving.
        assert gw.call(p.Lstat(b"/")).errno == 0
        assert gw.proc.poll() is None
    text = log.read_text(errors="replace")
    assert "Traceback" not in text, text


# ---------------------------------------------------------------------------------------------------------
# Where the gateway answers differently on purpose: both helpers get the request, both answers are pinned.


@dataclass(frozen=True)
class Divergence:
    id: str
    why: str
    request: p.Request
    reference: tuple[object, ...]
    gateway: tuple[object, ...]
    check: Callable[[str, Path], None] | None = None  # (helper name, its export) afterwards


def _over_read_check(helper: str, export: Path) -> None:
    names = os.listxattr(export / "xset")
    if helper == "reference":  # it stored 8 bytes: "v" and 7 read from past its buffer
        value = os.getxattr(export / "xset", "user.over")
        assert len(value) == 8 and value[:1] == b"v", value
    else:
        assert "user.over" not in names


DELIBERATE_DIVERGENCES: list[Divergence] = [
    Divergence(
        "lsetxattr-size-past-value",
        "the reference trusts the size field and lsetxattr()s 8 bytes from a 1-byte value, reading "
        "past its buffer (a heap over-read into the file's xattr); the gateway refuses a size the "
        "frame does not hold: EINVAL",
        p.Lsetxattr(b"xset", b"user.over", b"v", 8, 0),
        ("ok",),
        ("error", "EINVAL"),
        _over_read_check,
    ),
    Divergence(
        "getversion-device",
        "the reference open()s the device node for its ioctl (ENOTTY from /dev/null; any device's "
        "open side effects happen); the gateway never opens a special file: ENXIO",
        p.Getversion(b"null"),
        ("error", "ENOTTY"),
        ("error", "ENXIO"),
    ),
    Divergence(
        "getversion-symlink-to-device",
        "as above, through a symlink",
        p.Getversion(b"L_null"),
        ("error", "ENOTTY"),
        ("error", "ENXIO"),
    ),
]


@pytest.mark.parametrize("case", DELIBERATE_DIVERGENCES, ids=lambda c: c.id)
def test_deliberate_divergence(case: Divergence, trees: dict[str, Path], tmp_path: Path) -> None:
    for name, argv0 in HELPERS.items():
        with Helper(argv0, trees[name], tmp_path / f"{name}.log") as helper:
            got = normalise(Step(case.request), helper.call(case.request))
            assert got == expected_for(case.request, getattr(case, name), trees[name]), f"{name}: {got}"
            assert helper.call(p.Lstat(b"/")).errno == 0
        if case.check is not None:
            case.check(name, trees[name])


# ---------------------------------------------------------------------------------------------------------
# Malformed frames, against both: the reference's observed handling is the one to match.


def with_junk(request: p.Request, junk: bytes) -> bytes:
    """A request whose frame carries extra bytes after its fields (counted in its size)."""
    data = p.encode_request(request, nul=True)
    return frame(request.type, data[p.HEADER_SIZE :] + junk)


def i32(*values: int) -> bytes:
    return struct.pack(f"<{len(values)}i", *values)


T = p.RequestType
MALFORMED: list[tuple[str, bytes, Sequence[int]]] = [
    *[(f"empty-{t.name.lower()}", frame(t, b""), [t]) for t in p.RequestType],
    ("lstat-string-overruns", frame(T.LSTAT, struct.pack("<H", 100) + b"abc"), [T.LSTAT]),
    ("lstat-half-a-length", frame(T.LSTAT, b"\x01"), [T.LSTAT]),
    ("open-without-flags", frame(T.OPEN, pstr(b"f")), [T.OPEN]),
    ("create-without-gid", frame(T.CREATE, pstr(b"cx") + i32(O_CREAT | O_RDWR, 0o644, 0)), [T.CREATE]),
    ("mknod-without-rdev", frame(T.MKNOD, i32(0, 0) + pstr(b"nx") + i32(stat.S_IFIFO | 0o644)), [T.MKNOD]),
    ("symlink-without-linkpath", frame(T.SYMLINK, i32(0, 0) + pstr(b"f")), [T.SYMLINK]),
    ("link-one-path", frame(T.LINK, pstr(b"f")), [T.LINK]),
    ("utime-three-times", frame(T.UTIME, pstr(b"f") + struct.pack("<3Q", 1, 2, 3)), [T.UTIME]),
    ("lgetxattr-without-name", frame(T.LGETXATTR, i32(10) + pstr(b"xattrs")), [T.LGETXATTR]),
    (
        "lsetxattr-without-flags",
        frame(T.LSETXATTR, pstr(b"xset") + pstr(b"user.a") + pstr(b"v") + i32(1)),
        [T.LSETXATTR],
    ),
    ("readlink-without-size", frame(T.READLINK, pstr(b"L_f")), [T.READLINK]),
    ("trailing-bytes-lstat", with_junk(p.Lstat(b"f"), b"JUNKJUNK"), [T.LSTAT]),
    ("trailing-bytes-open", with_junk(p.Open(b"f", O_RDONLY), b"\0" * 13), [T.OPEN]),
    ("trailing-bytes-chmod", with_junk(p.Chmod(b"chmod1", 0o600), b"x"), [T.CHMOD]),
    ("trailing-bytes-readlink", with_junk(p.Readlink(b"L_f", 64), b"\xff" * 4), [T.READLINK]),
    (
        "back-to-back",
        b"".join(
            p.encode_request(r, nul=True)
            for r in (
                p.Lstat(b"f"),
                p.Readlink(b"L_f", 64),
                p.Open(b"f", O_RDONLY),
                p.Statfs(b"/"),
                p.Chmod(b"chmod1", 0o640),
            )
        ),
        [T.LSTAT, T.READLINK, T.OPEN, T.STATFS, T.CHMOD],
    ),
    (
        "short-then-good-in-one-write",
        frame(T.LSTAT, b"") + p.encode_request(p.Lstat(b"f"), nul=False),
        [T.LSTAT, T.LSTAT],
    ),
]


def test_malformed_frames(trees: dict[str, Path], tmp_path: Path) -> None:
    """Short payloads get ENOBUFS in the request's own reply shape, trailing bytes are ignored, and
    pipelined requests are answered in order -- by both helpers alike, each still serving after."""
    Outcome = tuple[str, list[tuple[object, ...]], bool]  # (case, normalised replies, still serving)
    results: dict[str, list[Outcome]] = {}
    for name, argv0 in HELPERS.items():
        out: list[Outcome] = []
        with Helper(argv0, trees[name], tmp_path / f"{name}.log") as helper:
            for case_id, data, types in MALFORMED:
                helper.send_raw(data)
                replies = [normalise(Step(p.Lstat(b"")), helper.read_reply(t)) for t in types]
                serving = helper.call(p.Lstat(b"/")).errno == 0
                out.append((case_id, replies, serving))
            assert helper.proc.poll() is None, f"{name} died"
        results[name] = out
    assert results["reference"] == results["gateway"], "\n".join(
        f"{a}\n  vs {b}" for a, b in zip(results["reference"], results["gateway"], strict=True) if a != b
    )
    for case_id, replies, serving in results["gateway"]:
        assert serving, case_id
        if not case_id.startswith(("trailing", "back-to-back", "short-then")):
            assert replies == [("error", "ENOBUFS")], (case_id, replies)
    by_id = {case_id: replies for case_id, replies, _ in results["gateway"]}
    assert by_id["short-then-good-in-one-write"][0] == ("error", "ENOBUFS")
    assert by_id["short-then-good-in-one-write"][1][0] == "stat"
    assert [r[0] for r in by_id["back-to-back"]] == ["stat", "payload", "fd", "statfs", "ok"]
