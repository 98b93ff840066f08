"""Confinement tests: nothing a guest sends reaches anything outside the export.

Every request type that takes a path (both paths of LINK and RENAME, SYMLINK's link path) is aimed at a
sentinel directory created NEXT TO the export, through every route out there is: absolute and relative
symlinks, '..' sequences, absolute host paths, dangling symlinks whose target would be created outside,
/proc/self/root, /proc/self/cwd and /proc/self/fd/N magic links. After each attempt the sentinel tree must
be exactly as it was (content, mode, owner, mtime, xattrs, link count, names), nothing may have appeared
outside under the escape name, and no reply may carry anything of the outside (an fd or LSTAT naming an
outside inode, the outside symlink's target, the outside xattr).

The same attacks go to:
  * the gateway as deployed (root: chroot + openat2 + Landlock + seccomp), with the allow-all policy (no
    rule pre-filters anything, so the confinement itself is tested) and with its built-in baseline;
  * the gateway with a real procfs mounted INSIDE its export (in a private mount namespace), so that
    /proc/self/... magic links are reachable from within the export and must be refused;
  * an in-process Executor.for_directory(export): no chroot, no Landlock, no seccomp -- openat2 alone
    must confine it just as well (also with a procfs inside the export, in a forked child).
Plus: FIFOs and device nodes are never opened (ENXIO at once; inotify sees no open), a symlink-swap
race, the capabilities around CREATE as another user, and file-descriptor exhaustion.

Needs root; it FAILS (never skips) without it.

    cd /work/main && /tmp/v/bin/pytest -q tests/test_confinement.py
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import os
import resource
import select
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import pytest

from gateway import protocol as p
from gateway.client import Client, ProtocolClosed, Reply
from gateway.core.executor import Executor, getversion_supported
from gateway.syscalls import fstatfs

REPO = Path(__file__).resolve().parent.parent
GATEWAY_HELPER: list[str] = [sys.executable, "-m", "gateway", "serve"]
# allow-all: no rule pre-filters a request, so the executor's confinement is what is tested. None: the
# built-in baseline policy, as deployed by default.
ALLOW_ALL = REPO / "policies" / "allow-all.yaml"
O_RDONLY, O_WRONLY, O_RDWR = os.O_RDONLY, os.O_WRONLY, os.O_RDWR
O_CREAT, O_EXCL, O_TRUNC, O_APPEND = os.O_CREAT, os.O_EXCL, os.O_TRUNC, os.O_APPEND
O_NONBLOCK, O_NOFOLLOW, O_PATH = os.O_NONBLOCK, os.O_NOFOLLOW, os.O_PATH
# CHOWN 0, DAC_OVERRIDE 1, FOWNER 3, FSETID 4, SETGID 6, SETUID 7, MKNOD 27: what the reference keeps.
CAPS_SEVEN = sum(1 << bit for bit in (0, 1, 3, 4, 6, 7, 27))
assert CAPS_SEVEN == 0x80000DB
ESCAPE = "ESCAPED-gw-confinement"  # every create-type attack uses this name: it must appear nowhere outside
SECRET_XATTR = b"SECRET-XATTR-outside"
SECRET_TARGET = "SECRET-LINK-TARGET-outside"
FS_IOC_GETVERSION = 0x80087601


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.fail(
            "the confinement tests must run as root: the gateway chroots, switches fs ids and "
            "keeps root's file capabilities; run them as root (CI does)",
            pytrace=False,
        )


# ---------------------------------------------------------------------------------------------------------
# The arena: an export and, beside it, the outside world the guest must never touch.


@dataclass
class Arena:
    base: Path
    export: Path
    outside: Path
    sentinel: Path  # outside/sentinel: the file every object attack aims at
    sentinel_dir: Path  # outside/dir: where every create-type attack tries to put ESCAPE
    outside_inodes: set[tuple[int, int]] = field(default_factory=set)
    baseline: dict[str, object] = field(default_factory=dict)
    pristine: dict[str, tuple[int, ...]] = field(default_factory=dict)
    fs_type: int = 0  # f_type of the export's file system  # the export as reset_export leaves it
    passwd: tuple[object, ...] = ()

    @property
    def landing_dirs(self) -> list[Path]:
        """Where an escaped create would land: the outside dirs, the arena, its parent, the host's
        root, /etc and /tmp (absolute symlinks and clamping '..' would resolve against those)."""
        return [
            self.outside,
            self.sentinel_dir,
            self.base,
            self.base.parent,
            Path("/"),
            Path("/etc"),
            Path("/tmp"),
        ]


def make_arena(tmp_path: Path) -> Arena:
    base = tmp_path
    export, outside = base / "export", base / "outside"
    export.mkdir(mode=0o755)
    outside.mkdir(mode=0o755)
    sentinel = outside / "sentinel"
    sentinel.write_bytes(b"SENTINEL CONTENT, outside the export\n")
    os.chmod(sentinel, 0o640)
    os.chown(sentinel, 1234, 1234)
    os.setxattr(sentinel, "user.secret", SECRET_XATTR)
    sentinel_dir = outside / "dir"
    sentinel_dir.mkdir(mode=0o750)
    os.setxattr(sentinel_dir, "user.secret", SECRET_XATTR)
    inner = sentinel_dir / "inner"
    inner.write_bytes(b"outside inner\n")
    os.chmod(inner, 0o600)
    os.setxattr(inner, "user.secret", SECRET_XATTR)
    os.symlink(SECRET_TARGET, outside / "secretlink")
    for path in (inner, sentinel, outside / "secretlink", sentinel_dir, outside):
        os.utime(path, ns=(1_000_000_000_000_000_000, 1_100_000_000_123_456_789), follow_symlinks=False)
    arena = Arena(base, export, outside, sentinel, sentinel_dir)
    for path in [*arena.landing_dirs, Path("/etc/passwd")]:
        st = os.stat(path)
        arena.outside_inodes.add((st.st_dev, st.st_ino))
    for dirpath, dirnames, filenames in os.walk(outside):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            arena.outside_inodes.add((st.st_dev, st.st_ino))
    arena.baseline = outside_state(arena)
    fd = os.open(export, os.O_PATH | os.O_DIRECTORY)
    try:
        arena.fs_type = fstatfs(fd)[0]
    finally:
        os.close(fd)
    arena.passwd = file_state(Path("/etc/passwd"))
    (export / "proc").mkdir()  # a mount point for the procfs variants; an empty directory otherwise
    for name in ["victim", "d", *attack_links(arena)]:
        build_entry(arena, name)
    arena.pristine = export_fingerprint(arena)
    return arena


def file_state(path: Path) -> tuple[object, ...]:
    st = os.lstat(path)
    return (
        st.st_mode,
        st.st_uid,
        st.st_gid,
        st.st_size,
        st.st_mtime_ns,
        st.st_nlink,
        hashlib.sha256(path.read_bytes()).hexdigest(),
    )


def outside_state(arena: Arena) -> dict[str, object]:
    """Everything about the outside tree an escape could change, by relative name."""
    state: dict[str, object] = {}
    for dirpath, dirnames, filenames in os.walk(arena.outside):
        for name in [*sorted(dirnames + filenames), "."]:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            if stat.S_ISREG(st.st_mode):
                with open(full, "rb") as fh:
                    body: object = fh.read()
            elif stat.S_ISLNK(st.st_mode):
                body = os.readlink(full)
            else:
                body = sorted(os.listdir(full)) if stat.S_ISDIR(st.st_mode) else None
            xattrs = sorted(
                (n, os.getxattr(full, n, follow_symlinks=False))
                for n in os.listxattr(full, follow_symlinks=False)
            )
            state[os.path.relpath(full, arena.outside)] = (
                st.st_ino,
                st.st_mode,
                st.st_uid,
                st.st_gid,
                st.st_size,
                st.st_nlink,
                st.st_mtime_ns,
                body,
                xattrs,
            )
    return state


def attack_links(arena: Arena) -> dict[str, str]:
    """The export's routes out (absolute targets depend on where the arena is)."""
    s, sd, o = str(arena.sentinel), str(arena.sentinel_dir), str(arena.outside)
    climb = "../" * 24
    links = {
        "abs_file": s,
        "abs_dir": sd,
        "rel_file": "../outside/sentinel",
        "rel_dir": "../outside/dir",
        "deep_rel": climb + s.lstrip("/"),
        "deep_rel_dir": climb + sd.lstrip("/"),
        "etc_passwd": "/etc/passwd",
        "secret_abs": str(arena.outside / "secretlink"),
        "secret_rel": "../outside/secretlink",
        "dangling_abs": f"{o}/{ESCAPE}",
        "dangling_rel": f"../outside/{ESCAPE}",
        "proc_root": "/proc/self/root",
        "proc_cwd": "/proc/self/cwd",
    }
    for n in range(16):
        links[f"proc_fd{n}"] = f"/proc/self/fd/{n}"
    return links


def build_entry(arena: Arena, name: str) -> None:
    """(Re)create one top-level entry of the export."""
    path = arena.export / name
    if name == "victim":
        path.write_bytes(b"inside victim\n")
    elif name == "d":
        path.mkdir()
        (path / "inner").write_bytes(b"inside inner\n")
        os.symlink("../../outside/sentinel", path / "up_file")  # climbs out from one level down
    else:
        os.symlink(attack_links(arena)[name], path)


def export_fingerprint(arena: Arena) -> dict[str, tuple[int, ...]]:
    """The export's entries (not 'proc') and d's, with their ctime: any change to an inode (content,
    mode, owner, xattr, link count) moves it; a new or vanished name shows too. Two levels suffice:
    an attack can only change an existing entry or add a top-level one (whose contents go with it)."""
    found: dict[str, tuple[int, ...]] = {}

    def scan(directory: str, prefix: str) -> None:
        with os.scandir(directory) as it:
            for entry in it:
                if entry.name == "proc" and not prefix:
                    continue
                st = entry.stat(follow_symlinks=False)
                found[prefix + entry.name] = (st.st_ino, st.st_mode, st.st_ctime_ns, st.st_mtime_ns)
                if entry.name == "d" and not prefix and stat.S_ISDIR(st.st_mode):
                    scan(entry.path, "d/")

    scan(str(arena.export), "")
    return found


def reset_export(arena: Arena) -> None:
    """Put the export back as it was before an attempt. Incremental, because creating a symlink costs
    ~0.2 ms here and there are thousands of attempts: only top-level entries that changed (or are new)
    are removed and rebuilt. The root directory itself stays (a running gateway holds it), and so does
    'proc' (a mount point in the procfs variants)."""
    names = ["victim", "d", *attack_links(arena)]
    pristine = arena.pristine
    now = export_fingerprint(arena)
    if now == pristine:
        return
    dirty = {rel.split("/", 1)[0] for rel in set(now) | set(pristine) if now.get(rel) != pristine.get(rel)}
    for name in sorted(dirty):
        path = arena.export / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)  # never follows a symlink
        elif os.path.lexists(path):
            path.unlink()
        if name in names:
            build_entry(arena, name)
    arena.pristine = export_fingerprint(arena)


def export_inodes(arena: Arena) -> set[tuple[int, int]]:
    found = set()
    for dirpath, dirnames, filenames in os.walk(arena.export):
        if dirpath == str(arena.export) and "proc" in dirnames:
            dirnames.remove("proc")
        for name in [*dirnames, *filenames, "."]:
            st = os.lstat(os.path.join(dirpath, name))
            found.add((st.st_dev, st.st_ino))
    return found


def generation(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        return struct.unpack("<i", fcntl.ioctl(fd, FS_IOC_GETVERSION, bytes(8))[:4])[0] & 0xFFFFFFFF
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------------------
# The attacks.


def attacks(arena: Arena) -> list[tuple[str, p.Request]]:
    """(label, request) for every request type with a path, at every route out."""
    s = os.fsencode(arena.sentinel)
    o = os.fsencode(arena.outside)
    fds = range(16)
    objects: list[bytes] = [
        b"abs_file",
        b"rel_file",
        b"deep_rel",
        b"abs_dir/inner",
        b"rel_dir/inner",
        b"deep_rel_dir/inner",
        b"abs_dir/../sentinel",
        b"d/up_file",
        b"../outside/sentinel",
        b"/../outside/sentinel",
        b"d/../../outside/sentinel",
        b"../../../../../../../../../../.." + s,
        s,
        b"//" + s.lstrip(b"/"),
        b"proc_root" + s,
        b"proc/self/root" + s,
        b"proc_cwd/../outside/sentinel",
        b"proc/self/cwd/../outside/sentinel",
        b"proc/1/root" + s,
        *[b"proc_fd%d/../outside/sentinel" % n for n in fds],
        *[b"proc/self/fd/%d/../outside/sentinel" % n for n in fds],
    ]
    dirs: list[bytes] = [
        b"abs_dir",
        b"rel_dir",
        b"deep_rel_dir",
        b"..",
        b"../outside",
        b"/../outside",
        o,
        b"d/../../outside",
        os.fsencode(arena.sentinel_dir),
        b"proc_root" + o,
        b"proc/self/root" + o,
        b"proc_cwd/../outside",
        *[b"proc_fd%d/../outside" % n for n in fds],
        *[b"proc/self/fd/%d/../outside" % n for n in fds],
    ]
    read_only: list[bytes] = [
        b"etc_passwd",
        b"/etc/passwd",
        b"etc_passwd/",
        b"secret_abs",
        b"secret_rel",
        b"../outside/secretlink",
        o + b"/secretlink",
        b"proc_fd3",
        b"proc/self/fd/3",
    ]
    out: list[tuple[str, p.Request]] = []

    def add(request: p.Request) -> None:
        out.append((f"{request.type.name} {request!r}"[:200], request))

    for path in objects:
        for flags in (O_RDONLY, O_RDWR, O_WRONLY | O_TRUNC, O_RDWR | O_APPEND, O_PATH, O_RDONLY | O_NOFOLLOW):
            add(p.Open(path, flags))
        add(p.Create(path, O_CREAT | O_RDWR | O_TRUNC, 0o777, 0, 0))
        add(p.Create(path, O_CREAT | O_WRONLY, 0o600, 1000, 1000))
        add(p.Lstat(path))
        add(p.Readlink(path, 4096))
        add(p.Statfs(path))
        add(p.Getversion(path))
        add(p.Chmod(path, 0o4777))
        add(p.Chown(path, 4242, 4242))
        add(p.Truncate(path, 0))
        add(p.Utime(path, 1, 0, 1, 0))
        add(p.Lgetxattr(100, path, b"user.secret"))
        add(p.Lgetxattr(0, path, b"user.secret"))
        add(p.Llistxattr(100, path))
        add(p.Lsetxattr(path, b"user.pwned", b"x", 1, 0))
        add(p.Lremovexattr(path, b"user.secret"))
        add(p.Link(path, b"stolen_link"))
        add(p.Link(b"victim", path))
        add(p.Rename(path, b"stolen"))
        add(p.Rename(b"victim", path))
        add(p.Remove(path))
        add(p.Mknod(0, 0, path, stat.S_IFREG | 0o644, 0))
        add(p.Mkdir(0, 0, path, 0o755))
        add(p.Symlink(0, 0, b"x", path))
    for d in dirs:
        new = d + b"/" + ESCAPE.encode()
        add(p.Open(new, O_CREAT | O_WRONLY))
        add(p.Create(new, O_CREAT | O_RDWR, 0o644, 0, 0))
        add(p.Create(new, O_CREAT | O_EXCL | O_RDWR, 0o644, 1000, 1000))
        add(p.Mknod(0, 0, new, stat.S_IFIFO | 0o644, 0))
        add(p.Mknod(0, 0, new, stat.S_IFCHR | 0o644, os.makedev(1, 3)))
        add(p.Mkdir(0, 0, new, 0o755))
        add(p.Symlink(0, 0, b"x", new))
        add(p.Link(b"victim", new))
        add(p.Rename(b"victim", new))
        add(p.Rename(b"d", new))
        add(p.Open(d, O_RDONLY))
        add(p.Lstat(d + b"/"))
        add(p.Chmod(d, 0o777))
        add(p.Chown(d + b"/", 4242, 4242))
        add(p.Utime(d + b"/", 1, 0, 1, 0))
        add(p.Lsetxattr(d + b"/", b"user.pwned", b"x", 1, 0))
        add(p.Lremovexattr(d + b"/", b"user.secret"))
        add(p.Llistxattr(100, d + b"/"))
        add(p.Remove(d + b"/inner"))
        add(p.Remove(d + b"/"))
        add(p.Rename(d + b"/", b"stolen_dir"))
    for x in (b"dangling_abs", b"dangling_rel"):
        add(p.Open(x, O_CREAT | O_WRONLY))
        add(p.Open(x, O_CREAT | O_RDWR | O_TRUNC))
        add(p.Create(x, O_CREAT | O_WRONLY, 0o644, 0, 0))
        add(p.Create(x, O_CREAT | O_WRONLY, 0o644, 1000, 1000))
        add(p.Truncate(x, 0))
        add(p.Chmod(x, 0o777))
        add(p.Mkdir(0, 0, x + b"/", 0o755))
    for r in read_only:
        add(p.Open(r, O_RDONLY))
        add(p.Open(r, O_PATH))
        add(p.Lstat(r))
        add(p.Readlink(r, 4096))
        add(p.Statfs(r))
        add(p.Getversion(r))
        add(p.Lgetxattr(100, r, b"user.secret"))
        add(p.Llistxattr(100, r))
    return out


class Driver(Protocol):
    name: str

    def call(self, request: p.Request) -> Reply: ...


def check_reply(arena: Arena, label: str, reply: Reply, sentinel_gen: int) -> list[str]:
    """What a reply must never carry: an outside object, its symlink target, its xattr."""
    problems: list[str] = []
    if reply.fd is not None:
        try:
            st = os.fstat(reply.fd)
            key = (st.st_dev, st.st_ino)
            if key in arena.outside_inodes:
                problems.append(f"{label}: received an fd to an OUTSIDE object {key}")
            elif key not in export_inodes(arena):
                problems.append(f"{label}: received an fd to {key}, which is not in the export")
        finally:
            os.close(reply.fd)
        return problems
    if reply.errno:
        return problems
    rtype, payload = reply.rtype, reply.payload
    if rtype == p.RequestType.LSTAT:
        st_reply = p.parse_stat(payload)
        if (st_reply.dev, st_reply.ino) in arena.outside_inodes:
            problems.append(f"{label}: LSTAT answered for an OUTSIDE object")
    elif rtype == p.RequestType.STATFS and p.parse_statfs(payload).type != arena.fs_type:
        # the outside is on the export's file system, but /proc (a magic-link escape) is not
        problems.append(f"{label}: STATFS of another file system ({p.parse_statfs(payload).type:#x})")
    elif rtype == p.RequestType.GETVERSION and p.parse_u64(payload) & 0xFFFFFFFF == sentinel_gen:
        problems.append(f"{label}: GETVERSION returned the outside sentinel's generation")
    if SECRET_XATTR in payload or b"user.secret" in payload or SECRET_TARGET.encode() in payload:
        problems.append(f"{label}: the reply carries outside data: {payload[:80]!r}")
    return problems


def check_outside(arena: Arena, label: str) -> list[str]:
    problems = []
    now = outside_state(arena)
    if now != arena.baseline:
        changed = sorted(k for k in set(now) | set(arena.baseline) if now.get(k) != arena.baseline.get(k))
        problems.append(f"{label}: the OUTSIDE tree changed: {changed}")
    for d in arena.landing_dirs:
        if os.path.lexists(d / ESCAPE):
            problems.append(f"{label}: {d / ESCAPE} was created outside the export")
    if file_state(Path("/etc/passwd")) != arena.passwd:
        problems.append(f"{label}: /etc/passwd changed")
    return problems


def run_attacks(
    arena: Arena, driver: Driver, requests: Sequence[tuple[str, p.Request]]
) -> tuple[list[str], int]:
    """Each attack on a freshly reset export; returns (violations, how many the server allowed)."""
    problems: list[str] = []
    sentinel_gen = generation(arena.sentinel)
    allowed = 0
    for label, request in requests:
        reset_export(arena)
        try:
            reply = driver.call(request)
        except (OSError, ProtocolClosed) as exc:
            problems.append(f"{label}: the server failed: {exc!r}")
            break
        allowed += reply.errno == 0
        problems += check_reply(arena, f"[{driver.name}] {label}", reply, sentinel_gen)
        problems += check_outside(arena, f"[{driver.name}] {label}")
    return problems, allowed


# ---------------------------------------------------------------------------------------------------------
# Servers: the gateway process, and the executor in this process.


class GatewayProcess:
    """The gateway over a socketpair (-f FD -n), as libvirt starts it; argv0 may wrap it."""

    def __init__(
        self,
        export: Path,
        log: Path,
        *,
        wrapper: Sequence[str] = (),
        timeout: float = 5.0,
        preexec: Callable[[], None] | None = None,
        name: str = "gateway",
        policy: Path | None = ALLOW_ALL,
    ) -> None:
        if policy is not None and not policy.is_file():
            pytest.fail(f"the policy {policy} is missing", pytrace=False)
        ours, theirs = socket.socketpair()
        self.name = name
        self.log = log
        options = ["--policy", str(policy)] if policy is not None else []
        with open(log, "wb") as err:
            self.proc = subprocess.Popen(
                [*wrapper, *GATEWAY_HELPER, *options, "-p", str(export), "-f", str(theirs.fileno()), "-n"],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                cwd=REPO,
                preexec_fn=preexec,
            )
        theirs.close()
        ours.settimeout(timeout)  # a hang fails the test instead of stalling it
        self.sock = ours
        self.client = Client(ours)

    def call(self, request: p.Request) -> Reply:
        return self.client.call(request)

    def wait_serving(self) -> None:
        reply = self.call(p.Lstat(b"/"))  # QEMU's first request: proves the sandbox is up
        assert reply.errno == 0, f"the gateway does not serve: {reply}\n{self.stderr_text()}"

    def stderr_text(self) -> str:
        return self.log.read_text(errors="replace")

    def close(self) -> int:
        self.sock.close()
        try:
            return self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)

    def __enter__(self) -> GatewayProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class InProcess:
    """Executor.for_directory: no chroot, no Landlock, no seccomp; openat2 alone confines it. The executor
    fchdir()s for the l*xattr calls, so the test's cwd is restored on close."""

    def __init__(self, export: Path, name: str = "in-process") -> None:
        self.name = name
        self.cwd = os.getcwd()
        self.executor = Executor.for_directory(str(export))

    def call(self, request: p.Request) -> Reply:
        result = self.executor.perform(request)
        shape = p.reply_shape(request.type)
        if shape is p.ReplyShape.FD:
            return Reply(request.type, result.errno if result.fd is None else 0, fd=result.fd)
        if shape is p.ReplyShape.STATUS or result.errno:
            return Reply(request.type, result.errno)
        return Reply(request.type, 0, result.payload)

    def close(self) -> None:
        os.close(self.executor.root_fd)
        os.close(self.executor.proc_fd)
        os.chdir(self.cwd)

    def __enter__(self) -> InProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def proc_mount_wrapper(export: Path) -> list[str]:
    """Run the gateway in a private mount namespace with a procfs mounted at EXPORT/proc: from inside
    its chroot, /proc/self/root, /proc/self/cwd and /proc/self/fd/N are then real magic links."""
    script = 'mount -t proc proc "$0/proc" && exec "$@"'
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, str(export)]


@pytest.fixture
def arena(tmp_path: Path) -> Arena:
    require_root()
    return make_arena(tmp_path)


def report(problems: list[str]) -> str:
    shown = problems[:40]
    more = f"\n... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
    return f"{len(problems)} confinement violations:\n" + "\n".join(shown) + more


# ---------------------------------------------------------------------------------------------------------
# Path attacks.


def test_attack_list_covers_every_path_request() -> None:
    """Every request type that takes a path is attacked; LINK and RENAME on both sides."""
    fake = Arena(
        Path("/b"), Path("/b/export"), Path("/b/outside"), Path("/b/outside/sentinel"), Path("/b/outside/dir")
    )
    requests = [r for _, r in attacks(fake)]
    assert {r.type for r in requests} == set(p.RequestType)
    for rtype in (p.RequestType.LINK, p.RequestType.RENAME):
        firsts = {r.path for r in requests if r.type == rtype}  # type: ignore[union-attr]
        seconds = {r.path2 for r in requests if r.type == rtype}  # type: ignore[union-attr]
        assert b"victim" in firsts and b"stolen" in {s[:6] for s in seconds}
        assert len(firsts) > 10 and len(seconds) > 10
    assert len({r.path for r in requests if r.type == p.RequestType.SYMLINK}) > 10  # type: ignore[union-attr]


@pytest.mark.parametrize("policy", [ALLOW_ALL, None], ids=["allow-all", "built-in-baseline"])
def test_gateway_confines_every_path(policy: Path | None, arena: Arena, tmp_path: Path) -> None:
    with GatewayProcess(arena.export, tmp_path / "gateway.log", policy=policy) as gw:
        gw.wait_serving()
        problems, allowed = run_attacks(arena, gw, attacks(arena))
        assert gw.proc.poll() is None, gw.stderr_text()
    assert not problems, report(problems)
    assert allowed > 50  # some attacks legitimately act inside the export (on the symlinks themselves)


def test_gateway_with_procfs_inside_export_refuses_magic_links(arena: Arena, tmp_path: Path) -> None:
    """A procfs inside the export (as when '/' is exported) makes /proc/self/... magic links reachable
    from inside: RESOLVE_NO_MAGICLINKS (and Landlock) must still stop every one of them."""
    with GatewayProcess(
        arena.export,
        tmp_path / "gateway.log",
        wrapper=proc_mount_wrapper(arena.export),
        name="gateway+procfs",
    ) as gw:
        gw.wait_serving()
        # The procfs really is there, seen from inside: proc/self is a plain directory path to it.
        reply = gw.call(p.Lstat(b"proc/self/"))
        assert reply.errno == 0, f"no procfs inside the export: {reply}\n{gw.stderr_text()}"
        assert stat.S_ISDIR(p.parse_stat(reply.payload).mode)
        problems, _ = run_attacks(arena, gw, attacks(arena))
        assert gw.proc.poll() is None, gw.stderr_text()
    assert not problems, report(problems)


def test_in_process_executor_confines_every_path(arena: Arena) -> None:
    with InProcess(arena.export) as ex:
        problems, allowed = run_attacks(arena, ex, attacks(arena))
    assert not problems, report(problems)
    assert allowed > 50


_CLONE_NEWNS = 0x00020000
_MS_REC, _MS_PRIVATE = 0x4000, 0x40000


def test_in_process_executor_with_procfs_inside_export(arena: Arena) -> None:
    """The chroot-free executor with a real procfs inside its export: only openat2's
    RESOLVE_NO_MAGICLINKS stands between a /proc/self/... link and the host. Runs in a forked child in a
    private mount namespace, so the procfs mount never shows on the host."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        status = 1
        try:
            os.close(rfd)
            if libc.unshare(_CLONE_NEWNS) != 0 or libc.mount(
                b"none", b"/", None, _MS_REC | _MS_PRIVATE, None
            ):
                raise OSError(ctypes.get_errno(), "unshare/mount --make-rprivate")
            if libc.mount(b"proc", os.fsencode(arena.export / "proc"), b"proc", 0, None) != 0:
                raise OSError(ctypes.get_errno(), "mount proc")
            with InProcess(arena.export, "in-process+procfs") as ex:
                assert ex.call(p.Lstat(b"proc/self/")).errno == 0, "no procfs inside the export"
                problems, _ = run_attacks(arena, ex, attacks(arena))
            os.write(wfd, json.dumps(problems).encode())
            status = 0
        except BaseException as exc:  # report anything to the parent; the child must not unwind
            with contextlib.suppress(BaseException):
                os.write(wfd, json.dumps([f"child failed: {exc!r}"]).encode())
        finally:
            os._exit(status)
    os.close(wfd)
    chunks = []
    while chunk := os.read(rfd, 1 << 16):
        chunks.append(chunk)
    os.close(rfd)
    _, status = os.waitpid(pid, 0)
    problems = json.loads(b"".join(chunks) or b'["child wrote nothing"]')
    assert not problems, report(problems)
    assert os.waitstatus_to_exitcode(status) == 0


# ---------------------------------------------------------------------------------------------------------
# Special files: never opened, never a hang.

_libc = ctypes.CDLL("libc.so.6", use_errno=True)
IN_OPEN = 0x20


class OpenWatch:
    """inotify IN_OPEN on some paths: proves that no process opened them (an O_PATH lookup, which the
    gateway uses to check the type, raises no event; a real open(2) of a FIFO or device does)."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.fd = _libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        assert self.fd >= 0, os.strerror(ctypes.get_errno())
        self.names: dict[int, str] = {}
        for path in paths:
            wd = _libc.inotify_add_watch(self.fd, os.fsencode(path), IN_OPEN)
            assert wd >= 0, os.strerror(ctypes.get_errno())
            self.names[wd] = path.name

    def opened(self) -> list[str]:
        seen: list[str] = []
        while select.select([self.fd], [], [], 0)[0]:
            data = os.read(self.fd, 4096)
            pos = 0
            while pos < len(data):
                wd, mask, _cookie, length = struct.unpack_from("iIII", data, pos)
                if mask & IN_OPEN:
                    seen.append(self.names.get(wd, str(wd)))
                pos += 16 + length
        return seen

    def close(self) -> None:
        os.close(self.fd)


SPECIAL_CASES: list[tuple[p.Request, int]] = [
    (p.Open(b"fifo", O_RDONLY), errno.ENXIO),  # no writer: a blocking open would hang the server
    (p.Open(b"fifo", O_WRONLY), errno.ENXIO),  # no reader: likewise
    (p.Open(b"fifo", O_RDWR), errno.ENXIO),
    (p.Open(b"fifo", O_RDONLY | O_NONBLOCK), errno.ENXIO),
    (p.Open(b"fifo", O_WRONLY | O_NONBLOCK), errno.ENXIO),
    (p.Open(b"fifo", O_RDONLY | O_TRUNC), errno.ENXIO),
    (p.Open(b"fifo", O_PATH), errno.ENXIO),
    (p.Open(b"to_fifo", O_RDONLY), errno.ENXIO),
    (p.Open(b"to_fifo", O_WRONLY | O_NONBLOCK), errno.ENXIO),
    (p.Create(b"fifo", O_CREAT | O_RDONLY, 0o644, 0, 0), errno.ENXIO),
    (p.Create(b"fifo", O_CREAT | O_WRONLY | O_TRUNC, 0o644, 0, 0), errno.ENXIO),
    (p.Create(b"fifo", O_CREAT | O_RDWR | O_NONBLOCK, 0o644, 1000, 1000), errno.ENXIO),
    (p.Create(b"to_fifo", O_CREAT | O_RDONLY, 0o644, 0, 0), errno.ENXIO),
    (p.Create(b"fifo", O_CREAT | O_EXCL | O_RDONLY, 0o644, 0, 0), errno.EEXIST),
    (p.Getversion(b"fifo"), errno.ENXIO),
    (p.Getversion(b"to_fifo"), errno.ENXIO),
    (p.Truncate(b"fifo", 0), errno.EINVAL),
    (p.Truncate(b"to_fifo", 0), errno.EINVAL),
    (p.Open(b"null", O_RDWR), errno.ENXIO),
    (p.Open(b"null", O_RDONLY | O_NONBLOCK), errno.ENXIO),
    (p.Open(b"to_null", O_WRONLY), errno.ENXIO),
    (p.Create(b"null", O_CREAT | O_WRONLY, 0o644, 0, 0), errno.ENXIO),
    (p.Getversion(b"null"), errno.ENXIO),
    (p.Truncate(b"null", 0), errno.EINVAL),
    (p.Open(b"sock", O_RDWR), errno.ENXIO),
    (p.Getversion(b"sock"), errno.ENXIO),
]


def make_specials(export: Path) -> list[Path]:
    os.mkfifo(export / "fifo", 0o666)
    os.mknod(export / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    cwd = os.getcwd()
    try:
        os.chdir(export)  # sun_path is short: bind by relative name
        s.bind("sock")
    finally:
        os.chdir(cwd)
        s.close()
    os.symlink("fifo", export / "to_fifo")
    os.symlink("null", export / "to_null")
    return [export / "fifo", export / "null", export / "sock"]


class _Timeout(Exception):
    pass


@contextlib.contextmanager
def alarm(seconds: int) -> Iterator[None]:
    """A hang in this process (the in-process executor) becomes an exception, not a stuck test run."""

    def fire(signum: int, frame: object) -> None:
        raise _Timeout(f"no answer within {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("server", ["gateway", "in-process"])
def test_special_files_are_never_opened(server: str, tmp_path: Path) -> None:
    require_root()
    export = tmp_path / "export"
    export.mkdir()
    watch = OpenWatch(make_specials(export))
    root = os.open(export, os.O_PATH | os.O_DIRECTORY)
    has_getversion = getversion_supported(root)  # elsewhere GETVERSION answers 0 without looking
    os.close(root)
    try:
        with contextlib.ExitStack() as stack:
            if server == "gateway":
                gw = stack.enter_context(GatewayProcess(export, tmp_path / "gateway.log", timeout=5.0))
                gw.wait_serving()
                driver: Driver = gw
            else:
                driver = stack.enter_context(InProcess(export))
            wrong = []
            for request, want in SPECIAL_CASES:
                if request.type == p.RequestType.GETVERSION and not has_getversion:
                    want = 0
                started = time.monotonic()
                with alarm(5):
                    reply = driver.call(request)
                took = time.monotonic() - started
                if reply.fd is not None:
                    os.close(reply.fd)
                if reply.errno != want or took > 2.0:
                    wrong.append(
                        f"{request!r}: {errno.errorcode.get(reply.errno, reply.errno)} after {took:.1f} s, "
                        f"expected {errno.errorcode[want]}"
                    )
            assert driver.call(p.Lstat(b"fifo")).errno == 0  # still serving
        assert not wrong, "\n".join(wrong)
        assert watch.opened() == [], "a special file was opened"
    finally:
        watch.close()


# ---------------------------------------------------------------------------------------------------------
# A symlink race: a host thread swaps a directory component (and a final component) between the real
# thing and a symlink pointing outside, while the client hammers requests through it.

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def exchange(a: Path, b: Path) -> None:
    if _libc.renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def race_requests() -> list[p.Request]:
    out: list[p.Request] = []
    for base in (b"race_abs", b"race_rel"):
        inner = base + b"/inner"
        out += [
            p.Open(inner, O_RDWR),
            p.Open(inner, O_RDONLY | O_NOFOLLOW),
            p.Lstat(inner),
            p.Chmod(inner, 0o4777),
            p.Chown(inner, 4242, 4242),
            p.Truncate(inner, 0),
            p.Utime(inner, 1, 0, 1, 0),
            p.Lsetxattr(inner, b"user.pwned", b"x", 1, 0),
            p.Lremovexattr(inner, b"user.secret"),
            p.Lgetxattr(100, inner, b"user.secret"),
            p.Llistxattr(100, inner),
            p.Readlink(inner, 64),
            p.Statfs(inner),
            p.Getversion(inner),
            p.Link(inner, b"stolen_link"),
            p.Remove(b"stolen_link"),
            p.Rename(inner, b"stolen"),
            p.Rename(b"stolen", inner),
            p.Remove(inner),
            p.Create(inner, O_CREAT | O_RDWR, 0o644, 0, 0),
            p.Mknod(0, 0, base + b"/n", stat.S_IFIFO | 0o644, 0),
            p.Remove(base + b"/n"),
            p.Mkdir(0, 0, base + b"/" + ESCAPE.encode(), 0o755),
            p.Remove(base + b"/" + ESCAPE.encode()),
        ]
    out += [
        p.Open(b"race_file", O_RDWR),
        p.Chmod(b"race_file", 0o4777),
        p.Truncate(b"race_file", 0),
        p.Lstat(b"race_file/"),
        p.Open(b"race_file", O_RDWR | O_TRUNC),
        p.Create(b"race_file", O_CREAT | O_WRONLY | O_TRUNC, 0o644, 0, 0),
    ]
    return out


@pytest.mark.parametrize("server", ["gateway", "in-process"])
def test_symlink_swap_race(server: str, arena: Arena, tmp_path: Path) -> None:
    export = arena.export
    pairs = []
    for name, target in (("race_abs", str(arena.sentinel_dir)), ("race_rel", "../outside/dir")):
        (export / name).mkdir()
        (export / name / "inner").write_bytes(b"inside inner\n")
        os.symlink(target, export / f"{name}_alt")
        pairs.append((export / name, export / f"{name}_alt"))
    (export / "race_file").write_bytes(b"inside file\n")
    os.symlink(str(arena.sentinel), export / "race_file_alt")
    pairs.append((export / "race_file", export / "race_file_alt"))

    stop = threading.Event()
    swaps = [0]

    def swapper() -> None:
        while not stop.is_set():
            for a, b in pairs:
                exchange(a, b)
            swaps[0] += 1

    requests = race_requests()
    seen: dict[str, int] = {}
    problems: list[str] = []
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # interleave the in-process executor with the swapper as much as possible
    thread = threading.Thread(target=swapper, daemon=True)
    with contextlib.ExitStack() as stack:
        if server == "gateway":
            gw = stack.enter_context(GatewayProcess(export, tmp_path / "gateway.log"))
            gw.wait_serving()
            driver: Driver = gw
        else:
            driver = stack.enter_context(InProcess(export))
        thread.start()
        try:
            deadline = time.monotonic() + 1.5
            i = 0
            while time.monotonic() < deadline:
                request = requests[i % len(requests)]
                i += 1
                with alarm(5):
                    reply = driver.call(request)
                seen[errno.errorcode.get(reply.errno, "OK")] = (
                    seen.get(errno.errorcode.get(reply.errno, "OK"), 0) + 1
                )
                if reply.fd is not None:
                    st = os.fstat(reply.fd)
                    os.close(reply.fd)
                    if (st.st_dev, st.st_ino) in arena.outside_inodes:
                        problems.append(f"{request!r}: an fd to an OUTSIDE object")
                elif reply.errno == 0 and reply.rtype == p.RequestType.LSTAT:
                    st_reply = p.parse_stat(reply.payload)
                    if (st_reply.dev, st_reply.ino) in arena.outside_inodes:
                        problems.append(f"{request!r}: LSTAT of an OUTSIDE object")
                elif reply.errno == 0 and (SECRET_XATTR in reply.payload or b"user.secret" in reply.payload):
                    problems.append(f"{request!r}: outside xattr data in the reply")
                if i % 200 == 0:
                    problems += check_outside(arena, f"after {i} requests")
        finally:
            stop.set()
            thread.join(5)
            sys.setswitchinterval(old_interval)
    problems += check_outside(arena, f"after the race ({i} requests, {swaps[0]} swap rounds)")
    assert not problems, report(problems)
    # The race was real: many swaps, and requests both succeeded and ran into the swapped-in links.
    assert swaps[0] > 100, swaps
    assert seen.get("OK", 0) > 100 and sum(v for k, v in seen.items() if k != "OK") > 100, seen


# ---------------------------------------------------------------------------------------------------------
# Capabilities around CREATE as another user.


def proc_status(pid: int) -> dict[str, str]:
    fields = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


def test_create_as_another_user_keeps_the_capabilities(arena: Arena, tmp_path: Path) -> None:
    export = arena.export
    with GatewayProcess(export, tmp_path / "gateway.log") as gw:
        gw.wait_serving()
        pid = gw.proc.pid

        def caps() -> dict[str, int]:
            status = proc_status(pid)
            return {k: int(status[k], 16) for k in ("CapEff", "CapPrm", "CapBnd", "CapInh", "CapAmb")}

        seven = {"CapEff": CAPS_SEVEN, "CapPrm": CAPS_SEVEN, "CapBnd": CAPS_SEVEN, "CapInh": 0, "CapAmb": 0}
        assert caps() == seven, {k: hex(v) for k, v in caps().items()}

        reply = gw.call(p.Create(b"owned", O_CREAT | O_RDWR, 0o640, 1000, 1000))
        assert reply.fd is not None, reply
        os.close(reply.fd)
        st = os.lstat(export / "owned")
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1000, 1000, 0o640)
        assert caps() == seven, "CREATE as uid 1000 cost the server capabilities"
        # Acting as uid 1000 only CAP_DAC_OVERRIDE is effective, as in the reference: no device nodes.
        assert (
            gw.call(p.Mknod(1000, 1000, b"dev1000", stat.S_IFCHR | 0o600, os.makedev(1, 3))).errno
            == errno.EPERM
        )
        # As root again everything is back: CHOWN (CAP_CHOWN) and a device node (CAP_MKNOD).
        assert gw.call(p.Chown(b"owned", 0, 0)).errno == 0
        st = os.lstat(export / "owned")
        assert (st.st_uid, st.st_gid) == (0, 0)
        assert gw.call(p.Mknod(0, 0, b"dev0", stat.S_IFCHR | 0o600, os.makedev(1, 3))).errno == 0

        # uid 0 with gid 1000: the request the reference never recovers from.
        reply = gw.call(p.Create(b"owned_0_1000", O_CREAT | O_RDWR, 0o600, 0, 1000))
        assert reply.fd is not None, reply
        os.close(reply.fd)
        st = os.lstat(export / "owned_0_1000")
        assert (st.st_uid, st.st_gid) == (0, 1000)
        assert gw.call(p.Mkdir(0, 1000, b"dir_0_1000", 0o750)).errno == 0
        assert caps() == seven
        reply = gw.call(p.Create(b"owned2", O_CREAT | O_RDWR, 0o600, 1000, 1000))
        assert reply.fd is not None, reply
        os.close(reply.fd)
        assert gw.call(p.Chown(b"owned2", 0, 0)).errno == 0
        assert gw.call(p.Lstat(b"/")).errno == 0
        assert caps() == seven
        assert gw.proc.poll() is None, gw.stderr_text()


# ---------------------------------------------------------------------------------------------------------
# File-descriptor exhaustion.

FD_LIMIT = 64


def test_fd_exhaustion_answers_emfile_and_recovers(arena: Arena, tmp_path: Path) -> None:
    """The gateway under RLIMIT_NOFILE=64 (set in the child before exec, as a wrapper would).

    1. The client keeps every fd it receives -- three times the gateway's limit: all are served, and
       the gateway's own table does not grow. It closes its copy once sent, so fds a client holds never
       count against the gateway (they are in the client's table, not its).
    2. Requests pipelined without reading the replies: the fds wait in the socket, and the kernel counts
       those in flight against the gateway's RLIMIT_NOFILE (ETOOMANYREFS). Every request is answered:
       with its fd, or, past that limit, with EMFILE -- the session goes on.
    3. The gateway's own table full (its soft limit lowered with prlimit to its lowest free fd number,
       as if it held that many): OPEN, CREATE and any request needing a new fd answer EMFILE -- an error
       reply, not a crash -- while requests needing none still work; once the client has closed its
       fds and the limit is back, OPEN is served again.
    """
    export = arena.export

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))

    with GatewayProcess(export, tmp_path / "gateway.log", preexec=low_limit) as gw:
        gw.wait_serving()
        pid = gw.proc.pid
        assert resource.prlimit(pid, resource.RLIMIT_NOFILE) == (FD_LIMIT, FD_LIMIT)

        def gateway_fds() -> set[int]:
            # The gateway closes its copy of a sent fd just after sendmsg: one more request (which needs
            # no fd) is answered only once that has happened.
            assert gw.call(p.Lstat(b"victim")).errno == 0
            return {int(n) for n in os.listdir(f"/proc/{pid}/fd")}

        before = gateway_fds()
        kept: list[int] = []
        try:
            for _ in range(3 * FD_LIMIT):  # 1
                reply = gw.call(p.Open(b"victim", O_RDONLY))
                assert reply.fd is not None, reply
                kept.append(reply.fd)
            assert gateway_fds() == before, "the gateway kept fds it had sent"

            n = 4 * FD_LIMIT  # 2
            gw.sock.sendall(b"".join(p.encode_request(p.Open(b"victim", O_RDONLY)) for _ in range(n)))
            pipelined = [gw.client.read_reply(p.RequestType.OPEN) for _ in range(n)]
            kept += [r.fd for r in pipelined if r.fd is not None]
            # Each answered: an fd, or EMFILE once the kernel would queue no more of our fds in flight.
            assert all(r.fd is not None or r.errno == errno.EMFILE for r in pipelined), pipelined
            assert gateway_fds() == before

            used = gateway_fds()  # 3
            lowest_free = min(set(range(FD_LIMIT + 1)) - used)
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (lowest_free, FD_LIMIT))
            for request in (
                p.Open(b"victim", O_RDONLY),
                p.Open(b"d", O_RDONLY),
                p.Open(b"new", O_CREAT | O_RDWR),
                p.Create(b"new2", O_CREAT | O_RDWR, 0o644, 0, 0),
                p.Lstat(b"d/inner"),
                p.Chmod(b"victim", 0o600),
                p.Open(b"victim", O_RDONLY),
            ):
                reply = gw.call(request)
                assert reply.fd is None and reply.errno == errno.EMFILE, (request, reply)
            assert gw.call(p.Lstat(b"victim")).errno == 0  # no new fd needed: still served
            assert gw.proc.poll() is None
        finally:
            for fd in kept:
                os.close(fd)
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))
        reply = gw.call(p.Open(b"victim", O_RDONLY))
        assert reply.fd is not None, reply
        os.close(reply.fd)
        assert gw.call(p.Create(b"new3", O_CREAT | O_RDWR, 0o644, 0, 0)).errno == 0
        assert gw.proc.poll() is None
    text = (tmp_path / "gateway.log").read_text(errors="replace")
    assert "Traceback" not in text, text
