"""Fuzz a real gateway over the proxy protocol (issue 9, "Tests": at least 100,000 frames over many
connections: 0 crashes, 0 hangs, 0 tracebacks, every trail verifies, no fd or RSS growth).

Frames come from a fixed seed: valid requests of every type with random fields, short payloads, lying
string lengths, trailing bytes, unknown types, oversized size fields, frames cut by EOF, garbage,
pipelined bursts (2,500 OPENs of an existing file among them), and paths with `..`, `//`, trailing
slashes, NULs and 64 KiB. Many short-lived gateways (one connection each, ended by every kind of end)
and two long-lived ones, whose fd count and resident size are sampled while they serve.

What the gateway must answer is computed by a framer written here, independent of gateway/protocol.py:
one reply per complete frame, in its type's shape, until a size over 64 KiB or EOF. Each read has a
timeout, so a hang fails. Exports are pytest tmp_path directories; the gateway chroots beneath them.

GATEWAY_FUZZ_SCALE=10 multiplies the frame budget (a longer run); GATEWAY_FUZZ_SEED picks another seed.
On a failure the connection's bytes are kept next to its export (conn-N.bin) as the reproducer.
"""

from __future__ import annotations

import errno
import json
import os
import random
import socket
import stat
import struct
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers import GATEWAY, Running, over_socketpair, require_root

from gateway.client import ProtocolClosed

SEED = int(os.environ.get("GATEWAY_FUZZ_SEED", "90009"))
SCALE = max(1, int(os.environ.get("GATEWAY_FUZZ_SCALE", "1")))
SHORT_LIVED = 64 * SCALE  # connections, each a fresh gateway
SHORT_FRAMES = 900  # frames per short-lived connection (about)
LONG_LIVED = 2
LONG_FRAMES = 24_000 * SCALE  # frames per long-lived connection
TIMEOUT = 20.0  # seconds any one read may wait: longer is a hang
MAX = 65536  # the protocol's size limit (spec): written here again, not taken from the code under test

# Wire types, spelled out from spec/PROXY-PROTOCOL.md.
OPEN, CREATE, MKNOD, MKDIR, SYMLINK, LINK, LSTAT, READLINK, STATFS, CHMOD = range(2, 12)
CHOWN, TRUNCATE, UTIME, RENAME, REMOVE, LGETXATTR, LLISTXATTR, LSETXATTR, LREMOVEXATTR = range(12, 21)
GETVERSION = 21
KNOWN = range(2, 22)
# Field codes per type: p = path string, s = raw string, d/u = 32-bit, q = 64-bit.
LAYOUT = {
    OPEN: "pd", CREATE: "pdddd", MKNOD: "ddpdq", MKDIR: "ddpd", SYMLINK: "ddpp", LINK: "pp", LSTAT: "p",
    READLINK: "pd", STATFS: "p", CHMOD: "pd", CHOWN: "pdd", TRUNCATE: "pq", UTIME: "pqqqq", RENAME: "pp",
    REMOVE: "p", LGETXATTR: "dpp", LLISTXATTR: "dp", LSETXATTR: "pssdd", LREMOVEXATTR: "pp", GETVERSION: "p",
}  # fmt: skip


# -- finding 6 through a real gateway (the reproductions the issue gives) ----------------------------------


@contextmanager
def one_gateway(tmp_path: Path) -> Iterator[tuple[Running, Path]]:
    require_root()
    export = tmp_path / "export"
    make_export(export)
    with (
        open(tmp_path / "stderr", "wb") as err,
        over_socketpair(GATEWAY, export, timeout=TIMEOUT, stderr=err) as gw,
    ):
        yield gw, export
        gw.client.sock.shutdown(socket.SHUT_WR)
        assert gw.client.sock.recv(1) == b""
        assert gw.proc.wait(TIMEOUT) == 0
    ended_cleanly(export, tmp_path / "stderr", "the gateway")


def lstat_frame(path: bytes) -> bytes:
    return frame(LSTAT, pack("p", [path]))


def test_gateway_answers_a_64k_lstat_and_the_next_one_in_the_same_write(tmp_path: Path) -> None:
    with one_gateway(tmp_path) as (gw, export):
        gw.client.send_raw(lstat_frame(b"/" + b"a" * 65533) + lstat_frame(b"/file"))
        assert gw.client.read_reply(LSTAT).errno == errno.ENAMETOOLONG  # was /file's stat
        second = gw.client.read_reply(LSTAT)  # was never answered
        assert second.ok and struct.unpack_from("<Q", second.payload, 8)[0] == os.stat(export / "file").st_ino


def test_gateway_survives_a_64k_lstat_and_four_bytes_of_the_next_header(tmp_path: Path) -> None:
    with one_gateway(tmp_path) as (gw, _export):
        rest = lstat_frame(b"/file")
        gw.client.send_raw(lstat_frame(b"/" + b"a" * 65533) + rest[:4])  # was IndexError: the gateway died
        assert gw.client.read_reply(LSTAT).errno == errno.ENAMETOOLONG
        gw.client.send_raw(rest[4:])
        assert gw.client.read_reply(LSTAT).ok


def test_gateway_answers_2500_pipelined_opens_written_before_any_reply_is_read(tmp_path: Path) -> None:
    with one_gateway(tmp_path) as (gw, export):
        burst = b"".join(piece.data for piece in open_burst())
        assert len(burst) > MAX
        with sending(gw.client.sock, burst) as thread:
            thread.join(TIMEOUT)  # all written first
            inodes = set()
            for _ in range(OPENS):
                reply = gw.client.read_reply(OPEN)
                assert reply.ok and reply.fd is not None
                inodes.add(os.fstat(reply.fd).st_ino)
                os.close(reply.fd)
        assert inodes == {os.stat(export / "pinned" / "file").st_ino}
        assert gw.client.lstat(b"/").ino == os.stat(export).st_ino


# -- the export every gateway serves ------------------------------------------------------------------------


def make_export(root: Path) -> None:
    root.mkdir()
    (root / "file").write_bytes(b"hello world\n")
    (root / "dir" / "sub").mkdir(parents=True)
    (root / "dir" / "inner").write_bytes(b"inner\n")
    os.symlink("file", root / "link")
    os.symlink("dir", root / "dirlink")
    os.symlink("nowhere", root / "dangling")
    os.symlink("../../../..", root / "up")  # escapes, as far as a name goes: the gateway stays beneath
    os.symlink("/etc", root / "abs")
    os.symlink("loop", root / "loop")
    (root / "pinned").mkdir()  # no fuzzed path can name it: the OPEN bursts' file stays
    (root / "pinned" / "file").write_bytes(b"pinned\n")
    os.mkfifo(root / "fifo")  # OPEN, TRUNCATE or GETVERSION of it must never block the gateway
    os.setxattr(root / "file", "user.k", b"value")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(root / "sock"))


def heal(root: Path) -> None:
    """The host puts back the top-level names the fuzz removed (a host may change its export at any time),
    so that a long-lived gateway keeps meeting real objects, not only ENOENT. Through dir fds, creating
    with O_EXCL and never following a name: the guest may have made any name a symlink to a host path."""
    rfd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW)
    excl = os.O_CREAT | os.O_EXCL | os.O_WRONLY
    makers = [
        lambda: os.close(os.open("file", excl, 0o644, dir_fd=rfd)),
        lambda: os.mkdir("dir", 0o755, dir_fd=rfd),
        lambda: os.symlink("file", "link", dir_fd=rfd),
        lambda: os.symlink("dir", "dirlink", dir_fd=rfd),
        lambda: os.mkfifo("fifo", dir_fd=rfd),
    ]
    try:
        for make in makers:
            with suppress(OSError):  # it exists (in whatever form the guest left it), or cannot be made
                make()
    finally:
        os.close(rfd)


# -- frames -------------------------------------------------------------------------------------------------

NAMES = [
    b"file", b"dir", b"sub", b"inner", b"link", b"dirlink", b"dangling", b"up", b"abs", b"loop", b"fifo",
    b"sock", b"new", b"n2", b"d2", b"etc", b"passwd",
]  # fmt: skip
COMPONENTS = [*NAMES, *NAMES, b"..", b"..", b".", b""]
UIDS = [0, 0, 1000, 1001, 65534, 0xFFFFFFFF, 0xFFFFFFFE]
# Device nodes only of harmless devices (null, zero, full), or numbers mknod refuses outright.
SAFE_RDEV = [0, os.makedev(1, 3), os.makedev(1, 5), os.makedev(1, 7), 1 << 40, 0xFFFFFFFFFFFFFFFF]
XATTR_NAMES = [
    b"user.k", b"user.k", b"user.new", b"trusted.t", b"security.s", b"system.posix_acl_access",
    b"system.nope", b"", b"nodot", b"user." + b"n" * 300,
]  # fmt: skip
OPEN_FLAGS = [
    os.O_RDONLY, os.O_WRONLY, os.O_RDWR, os.O_CREAT, os.O_EXCL, os.O_TRUNC, os.O_APPEND, os.O_NOFOLLOW,
    os.O_DIRECTORY, os.O_PATH, os.O_NONBLOCK, os.O_SYNC, os.O_TMPFILE, os.O_NOATIME, os.O_DIRECT,
]  # fmt: skip


def long_path(rnd: random.Random) -> bytes:
    """Paths from 4 KiB to 64 KiB: one huge name, many `..`, many `//`, deep `./`, a chain of real names."""
    n = rnd.choice([4095, 4096, 4097, 30_000, 65_000, 65_533])
    unit = rnd.choice([b"a", b"../", b"//", b"./", b"dir/", b"dirlink/", b"dir/../"])
    return (b"/" + unit * (n // len(unit) + 1))[:n]


def path(rnd: random.Random) -> bytes:
    roll = rnd.random()
    if roll < 0.02:
        raw = long_path(rnd)
    elif roll < 0.05:
        raw = rnd.randbytes(rnd.randrange(0, 24))
    else:
        comps = [rnd.choice(COMPONENTS) for _ in range(rnd.choice([0, 1, 1, 2, 2, 3, 4, 6]))]
        raw = rnd.choice([b"/", b"//", b"", b"/"]) + b"".join(
            c + rnd.choice([b"/", b"/", b"//"]) for c in comps
        )
        if comps and rnd.random() < 0.7:
            raw = raw.rstrip(b"/")  # most paths end in a name; the rest keep their trailing slash
        if rnd.random() < 0.05:
            raw += rnd.choice([b"/.", b"/..", b"/./"])
    nul = rnd.random()
    if nul < 0.5:
        raw += b"\0"  # QEMU counts a NUL in the length
    elif nul < 0.55:
        raw += b"\0" + rnd.randbytes(rnd.randrange(1, 8))  # a NUL ends the path
    return raw[:65535]  # a string's length is a u16


def value32(rnd: random.Random, common: list[int]) -> int:
    return rnd.choice(common) if rnd.random() < 0.8 else rnd.getrandbits(32)


def fields_for(rnd: random.Random, rtype: int) -> list[int | bytes]:
    """Random fields in wire order for one request of a known type."""
    r = rnd
    if rtype == OPEN:
        flags = (
            sum({r.choice(OPEN_FLAGS) for _ in range(r.randrange(0, 4))})
            if r.random() < 0.9
            else r.getrandbits(32)
        )
        return [path(r), flags]
    if rtype == CREATE:
        flags = os.O_CREAT | sum({r.choice(OPEN_FLAGS) for _ in range(r.randrange(0, 3))})
        return [path(r), flags, value32(r, [0o644, 0o600, 0o4755, 0o7777, 0]), r.choice(UIDS), r.choice(UIDS)]
    if rtype == MKNOD:
        kind = r.choice(
            [stat.S_IFREG, stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFDIR, 0]
        )
        return [
            r.choice(UIDS),
            r.choice(UIDS),
            path(r),
            kind | r.choice([0o644, 0o6755, 0o7777]),
            r.choice(SAFE_RDEV),
        ]
    if rtype == MKDIR:
        return [r.choice(UIDS), r.choice(UIDS), path(r), value32(r, [0o755, 0o700, 0o2755, 0o7777, 0])]
    if rtype == SYMLINK:
        target = path(r) if r.random() < 0.9 else r.choice([b"/etc/passwd", b"../" * 40, b"x" * 5000])
        return [r.choice(UIDS), r.choice(UIDS), target, path(r)]
    if rtype in (LINK, RENAME):
        return [path(r), path(r)]
    if rtype in (LSTAT, STATFS, REMOVE, GETVERSION):
        return [path(r)]
    if rtype == READLINK:
        return [path(r), value32(r, [0, 1, 2, 4096, 65536, 0xFFFFFFFF, 0x7FFFFFFF])]
    if rtype == CHMOD:
        return [path(r), value32(r, [0o644, 0o4755, 0o7777, 0, 0o170777])]
    if rtype == CHOWN:
        return [path(r), r.choice(UIDS), r.choice(UIDS)]
    if rtype == TRUNCATE:
        return [path(r), r.choice([0, 1, 5, 4096, 1 << 31, (1 << 63) - 1, 1 << 63, (1 << 64) - 1])]
    if rtype == UTIME:

        def nsec() -> int:
            return r.choice([0, 999_999_999, 1_000_000_000, (1 << 30) - 1, (1 << 30) - 2, r.getrandbits(64)])

        secs = [0, 1, 1 << 31, (1 << 63) - 1, (1 << 64) - 1]
        return [path(r), r.choice(secs), nsec(), r.choice(secs), nsec()]
    if rtype == LGETXATTR:
        return [value32(r, [0, 1, 3, 5, 65536, 0xFFFFFFFF]), path(r), r.choice(XATTR_NAMES)]
    if rtype == LLISTXATTR:
        return [value32(r, [0, 1, 6, 65536, 0xFFFFFFFF]), path(r)]
    if rtype == LSETXATTR:
        value = r.randbytes(r.choice([0, 1, 5, 100, 5000]))
        size = r.choice([len(value), len(value), 0, len(value) + 10, 0xFFFFFFFF, r.getrandbits(32)])
        return [path(r), r.choice(XATTR_NAMES), value, size, value32(r, [0, 1, 2, 3])]
    if rtype == LREMOVEXATTR:
        return [path(r), r.choice(XATTR_NAMES)]
    raise AssertionError(rtype)


def pack(codes: str, values: list[int | bytes]) -> bytes:
    out = bytearray()
    for code, value in zip(codes, values, strict=True):
        if code in "ps":
            assert isinstance(value, bytes)
            out += struct.pack("<H", len(value)) + value
        elif code == "q":
            out += struct.pack("<Q", int(value))
        else:
            out += struct.pack("<I", int(value))
    return bytes(out)


def frame(rtype: int, payload: bytes, size: int | None = None) -> bytes:
    return struct.pack("<II", rtype, len(payload) if size is None else size) + payload


def valid_payload(rnd: random.Random, rtype: int) -> bytes:
    codes = LAYOUT[rtype]
    values = fields_for(rnd, rtype)
    over = len(pack(codes, values)) - MAX
    if over > 0:  # two long strings: shorten the longest so that the frame stays within 64 KiB
        i = max(range(len(values)), key=lambda k: len(values[k]) if isinstance(values[k], bytes) else -1)
        values[i] = values[i][: len(values[i]) - over]  # type: ignore[index]
    return pack(codes, values)


@dataclass
class Piece:
    data: bytes
    kind: str
    expect: int | None = None  # the errno its reply must carry, when the frame decides it
    rtype: int = 0


def valid(rnd: random.Random, rtype: int | None = None) -> Piece:
    rtype = rnd.choice(KNOWN) if rtype is None else rtype
    return Piece(frame(rtype, valid_payload(rnd, rtype)), "valid", rtype=rtype)


def short(rnd: random.Random) -> Piece:
    """A known type whose payload ends before its fields: ENOBUFS in the type's shape, and go on."""
    rtype = rnd.choice(KNOWN)
    payload = valid_payload(rnd, rtype)
    if rnd.random() < 0.3 and LAYOUT[rtype][0] in "ps":  # a string longer than what is left
        payload = struct.pack("<H", rnd.randrange(len(payload) - 1, 65536)) + payload[2:]
    else:
        payload = payload[: rnd.randrange(0, len(payload))]
    return Piece(frame(rtype, payload), "short", errno.ENOBUFS, rtype)


def trailing(rnd: random.Random) -> Piece:
    """A valid payload with extra bytes after its fields: they are ignored."""
    rtype = rnd.choice(KNOWN)
    payload = valid_payload(rnd, rtype)
    payload += rnd.randbytes(rnd.randrange(1, max(2, min(64, MAX - len(payload)))))
    return Piece(frame(rtype, payload[:MAX]), "trailing", rtype=rtype)


def unknown(rnd: random.Random) -> Piece:
    rtype = rnd.choice([0, 1, 22, 23, 100, 255, 0x7FFFFFFF, 0xFFFFFFFF, rnd.randrange(22, 1 << 32)])
    return Piece(
        frame(rtype, rnd.randbytes(rnd.choice([0, 1, 4, 100, 3000]))), "unknown", errno.EOPNOTSUPP, rtype
    )


def garbage(rnd: random.Random) -> Piece:
    return Piece(rnd.randbytes(rnd.randrange(1, 64)), "garbage")


def big_then_normal(rnd: random.Random) -> list[Piece]:
    """Finding 6 as the issue found it: a frame near 64 KiB, then frames, in one write."""
    rtype = rnd.choice([LSTAT, STATFS, REMOVE, GETVERSION, CHMOD, OPEN])
    payload = pack(
        LAYOUT[rtype], [b"a" * (MAX - 2 - 4 * (len(LAYOUT[rtype]) - 1)), *fields_for(rnd, rtype)[1:]]
    )
    pieces = [Piece(frame(rtype, payload[:MAX]), "valid", rtype=rtype)]
    return pieces + [valid(rnd) for _ in range(rnd.randrange(1, 4))]


def terminal(rnd: random.Random) -> Piece:
    """How a short-lived connection ends, besides a clean close."""
    roll = rnd.randrange(6)
    if roll == 5:  # the client writes frames and goes away without reading their replies
        return Piece(b"".join(valid(rnd).data for _ in range(rnd.choice([1, 20, 300]))), "vanish")
    if roll == 0:  # a size field over the limit (0xffffffff among them), maybe with bytes after it
        size = rnd.choice([MAX + 1, 1 << 20, 0x7FFFFFFF, 0xFFFFFFFF])
        return Piece(
            frame(rnd.choice([*KNOWN, 0, 99]), rnd.randbytes(rnd.randrange(0, 100)), size), "oversized"
        )
    if roll == 1:  # a frame cut by EOF
        whole = valid(rnd).data
        return Piece(whole[: rnd.randrange(1, len(whole))], "cut")
    if roll == 2:  # a header promising more than ever comes
        return Piece(frame(rnd.choice(KNOWN), b"x" * 10, rnd.randrange(11, MAX + 1)), "cut")
    if roll == 3:
        return Piece(rnd.randbytes(rnd.randrange(1, 4096)), "garbage")
    return Piece(b"", "close")


def burst_item(rnd: random.Random, with_garbage: bool) -> Piece:
    roll = rnd.random()
    if roll < 0.72:
        return valid(rnd)
    if roll < 0.84:
        return short(rnd)
    if roll < 0.91:
        return trailing(rnd)
    if roll < 0.99 or not with_garbage:
        return unknown(rnd)
    return garbage(rnd)


LIVENESS = Piece(frame(LSTAT, pack("p", [b"/\0"])), "liveness", rtype=LSTAT)
OPENS = 2500


def open_burst() -> list[Piece]:
    """2,500 OPENs of an existing file, written at once, read only when all are written."""
    one = frame(OPEN, pack("pd", [b"//pinned/../pinned/file\0", os.O_RDONLY]))  # 38 bytes: 95 KB in all
    return [Piece(one, "open-burst", 0, OPEN)] * OPENS


def rounds(
    rnd: random.Random, budget: int, short_lived: bool, opens: bool
) -> Iterator[tuple[str, list[Piece]]]:
    """A connection's rounds: ("step", [piece]) is sent and answered before the next; ("burst", pieces)
    is written at once and read while (or, for "burst-noread", after) it is written; ("drip", pieces)
    is written in writes of 1 to 7 bytes, then read."""
    yield "step", [LIVENESS]  # QEMU's first request
    sent = 1
    burst_at = rnd.randrange(budget // 4, budget // 2) if opens else -1
    while sent < budget:
        if burst_at >= 0 and sent >= burst_at:
            burst_at = -1
            yield "burst-noread", open_burst()
            sent += OPENS
            continue
        roll = rnd.random()
        if roll < 0.40:
            pieces = [valid(rnd)]
        elif roll < 0.48:
            pieces = [short(rnd)]
        elif roll < 0.52:
            pieces = [unknown(rnd)]
        elif roll < 0.54:
            pieces = [trailing(rnd)]
        elif roll < 0.56:
            yield "burst", big_then_normal(rnd)
            sent += 2
            continue
        elif roll < 0.585:
            pieces = [burst_item(rnd, False) for _ in range(rnd.randrange(1, 4))]
            yield "drip", pieces  # written a few bytes at a time
            sent += len(pieces)
            continue
        elif roll < 0.59 and short_lived and sent > budget // 2:
            yield "burst", [burst_item(rnd, True) for _ in range(rnd.randrange(1, 20))] + [garbage(rnd)]
            return  # garbage desynchronises the framing: likely the end of this connection
        else:
            pieces = [burst_item(rnd, False) for _ in range(rnd.choice([2, 3, 10, 50, 200]))]
            yield "burst", pieces
            sent += len(pieces)
            continue
        yield "step", pieces
        sent += 1
    yield "step", [LIVENESS]
    if short_lived:
        yield "burst", [terminal(rnd)]


# -- what the gateway must answer ---------------------------------------------------------------------------


class Framer:
    """One reply per complete frame, until a size field over 64 KiB; then the connection closes."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.pos = 0
        self.dead = False

    def add(self, data: bytes) -> list[tuple[int, int]]:
        """(type, stream offset) of every frame that data completes."""
        self.buf += data
        done = []
        while not self.dead and len(self.buf) - self.pos >= 8:
            rtype, size = struct.unpack_from("<II", self.buf, self.pos)
            if size > MAX:
                self.dead = True
                break
            if len(self.buf) - self.pos < 8 + size:
                break
            done.append((rtype, self.pos))
            self.pos += 8 + size
        return done


@dataclass
class Stats:
    frames: int = 0  # frames written (a piece is a frame, except garbage and cut frames)
    answered: int = 0
    pieces: Counter[str] = field(default_factory=Counter)
    modes: Counter[str] = field(default_factory=Counter)  # rounds: step, burst, burst-noread, drip
    types: Counter[int] = field(default_factory=Counter)
    errnos: Counter[int] = field(default_factory=Counter)
    known: int = 0  # answered frames of a known type (requests + malformed, in the stop record)
    unknown: int = 0
    rss_kib: list[int] = field(default_factory=list)
    fds: list[int] = field(default_factory=list)
    ends: Counter[str] = field(default_factory=Counter)

    def merge(self, other: Stats) -> None:
        for name in ("frames", "answered", "known", "unknown"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.pieces.update(other.pieces)
        self.modes.update(other.modes)
        self.types.update(other.types)
        self.errnos.update(other.errnos)
        self.ends.update(other.ends)


def read_reply(gw: Running, rtype: int) -> int:
    reply = gw.client.read_reply(rtype)  # the socket's timeout bounds every recv: a hang fails
    if reply.fd is not None:
        os.close(reply.fd)
    return reply.errno


def sample(gw: Running, stats: Stats) -> None:
    pid = gw.proc.pid
    stats.fds.append(len(os.listdir(f"/proc/{pid}/fd")))
    with open(f"/proc/{pid}/status") as f:
        stats.rss_kib += [int(line.split()[1]) for line in f if line.startswith("VmRSS:")]


@contextmanager
def sending(sock: socket.socket, data: bytes) -> Iterator[threading.Thread]:
    """Write data from a thread (a peer that closes early is fine: the framer knows when it must)."""

    def send() -> None:
        with suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(data)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    try:
        yield thread
    finally:
        thread.join(TIMEOUT)
        assert not thread.is_alive(), "the gateway stopped reading: a hang"


def run_connection(n: int, base: Path, budget: int, short_lived: bool, opens: bool) -> Stats:
    rnd = random.Random(f"{SEED}:{n}")
    chunks = random.Random(f"{SEED}:{n}:chunks")
    export = base / f"export-{n}"
    make_export(export)
    stats = Stats()
    stream = bytearray()
    errlog = base / f"export-{n}.stderr"
    every = max(1, budget // 30)
    next_sample = every
    try:
        with open(errlog, "wb") as err, over_socketpair(GATEWAY, export, timeout=TIMEOUT, stderr=err) as gw:
            sock = gw.client.sock
            framer = Framer()
            for mode, pieces in rounds(rnd, budget, short_lived, opens):
                data = b"".join(piece.data for piece in pieces)
                stats.modes[mode] += 1
                at = len(stream)
                expected = {}
                for piece in pieces:
                    expected[at] = piece
                    at += len(piece.data)
                    stats.pieces[piece.kind] += 1
                    stats.frames += piece.kind not in ("garbage", "cut", "close")
                if not data:
                    break  # a clean close
                stream += data
                if pieces[0].kind == "vanish":
                    sock.sendall(data)
                    sock.close()  # gone, its replies unread: the gateway meets a write (or read) error
                    break
                if mode == "step":
                    sock.sendall(data)
                    answer(gw, framer.add(data), expected, stats)
                elif mode == "drip":
                    i = 0
                    while i < len(data):
                        step = chunks.randrange(1, 8)
                        sock.sendall(data[i : i + step])
                        i += step
                    answer(gw, framer.add(data), expected, stats)
                else:
                    with sending(sock, data) as thread:
                        if mode == "burst-noread":
                            thread.join(TIMEOUT)  # all of it written before the first reply is read
                        answer(gw, framer.add(data), expected, stats)
                if framer.dead:
                    break
                if not short_lived and stats.answered >= next_sample:
                    # Sample between requests: after a reply to an LSTAT of the root (which holds no fd
                    # of its own), every earlier request has closed what it opened.
                    next_sample += every
                    sock.sendall(LIVENESS.data)
                    answer(gw, framer.add(LIVENESS.data), {len(stream): LIVENESS}, stats)
                    stream += LIVENESS.data
                    stats.frames += 1
                    sample(gw, stats)
                    heal(export)
            # The end: EOF (or the framer saw an oversized size and the gateway must close by itself).
            vanished = sock.fileno() == -1
            if not vanished:
                sock.shutdown(socket.SHUT_WR)
                try:
                    rest = sock.recv(1)
                except ConnectionResetError:  # it closed with our bytes unread (after an oversized size)
                    rest = b""
                assert rest == b"", "bytes after the last reply the framer expects"
            status = gw.proc.wait(TIMEOUT)
            assert status == 0, f"exit status {status}"
            dead = framer.dead or framer.pos != len(framer.buf)
            stats.ends["vanished" if vanished else "fatal" if dead else "closed"] += 1
    except (AssertionError, OSError, ProtocolClosed, subprocess.TimeoutExpired) as exc:
        (base / f"conn-{n}.bin").write_bytes(bytes(stream))
        raise AssertionError(f"connection {n} (seed {SEED}): {exc!r}; bytes in conn-{n}.bin") from exc
    stop = ended_cleanly(export, errlog, f"connection {n}")
    if not vanished:  # (a vanished client's last frames are answered into the void, or never read)
        # The gateway's own count agrees with the framer's: each known-type frame a request or malformed.
        got = (int(stop["requests"]) + int(stop["malformed"]), stop["unknown"])  # type: ignore[call-overload]
        assert got == (stats.known, stats.unknown), f"connection {n}: {stop}"
    return stats


def ended_cleanly(export: Path, errlog: Path, what: str) -> dict[str, object]:
    """After the gateway exited: no traceback on its stderr, its trail verifies and ends with the stop
    record (returned)."""
    text = errlog.read_text(errors="replace")
    assert "Traceback" not in text and "Fatal Python error" not in text, f"{what}:\n{text[-4000:]}"
    trail = Path(f"{export}.audit.jsonl")
    verify = subprocess.run(
        [sys.executable, "-m", "gateway", "audit", str(trail), "--verify"], capture_output=True, timeout=120
    )
    assert verify.returncode == 0, f"{what}: {verify.stdout!r} {verify.stderr!r}"
    *_, stop_line, final_line = trail.read_bytes().rstrip(b"\n").rsplit(b"\n", 2)
    final: dict[str, object] = json.loads(final_line)
    assert final["event"] == "checkpoint" and final["final"] is True, final  # the session's last record
    stop: dict[str, object] = json.loads(stop_line)
    assert stop["event"] == "stop", stop
    return stop


def answer(gw: Running, frames: list[tuple[int, int]], expected: dict[int, Piece], stats: Stats) -> None:
    for rtype, offset in frames:
        code = read_reply(gw, rtype)
        stats.answered += 1
        stats.errnos[code] += 1
        known = rtype in KNOWN
        stats.known += known
        stats.unknown += not known
        stats.types[rtype if known else 0] += 1
        piece = expected.get(offset)
        assert code != errno.EIO, f"EIO for type {rtype} at offset {offset}: an internal error"
        if piece is None:
            continue  # a frame that garbage made
        if piece.expect is not None:
            assert code == piece.expect, f"{piece.kind} type {rtype}: {errno.errorcode.get(code, code)}"
        if piece.kind == "short":
            continue
        assert code != errno.ENOBUFS or rtype in (READLINK, LGETXATTR, LLISTXATTR), (piece.kind, rtype)
        if piece.kind == "liveness":
            assert code == 0, "LSTAT / failed"


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory: pytest.TempPathFactory) -> Fuzz:
    """Every connection runs, whatever the others do: a failure is counted and kept, not the end."""
    require_root()
    base = tmp_path_factory.mktemp("fuzz")
    jobs = [(n, base, LONG_FRAMES, False, True) for n in range(LONG_LIVED)]
    jobs += [
        (n, base, SHORT_FRAMES, True, n % 16 == LONG_LIVED)
        for n in range(LONG_LIVED, LONG_LIVED + SHORT_LIVED)
    ]

    def run(job: tuple[int, Path, int, bool, bool]) -> Stats | AssertionError:
        try:
            return run_connection(*job)
        except AssertionError as exc:
            return exc

    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        results = list(pool.map(run, jobs))
    result = Fuzz(Stats(), [r for r in results[:LONG_LIVED] if isinstance(r, Stats)])
    for r in results:
        if isinstance(r, Stats):
            result.total.merge(r)
        else:
            result.failures.append(str(r))
    t = result.total
    print(
        f"\nfuzz seed {SEED}: {t.frames} frames ({t.answered} answered) over {len(results)} connections,"
        f" {len(result.failures)} failed; ends {dict(t.ends)}; rounds {dict(t.modes)};"
        f" pieces {dict(t.pieces)}"
    )
    return result


@dataclass
class Fuzz:
    total: Stats
    long_lived: list[Stats]
    failures: list[str] = field(default_factory=list)


def test_fuzz_frames_no_crash_no_hang_no_traceback(fuzz: Fuzz) -> None:
    assert not fuzz.failures, f"{len(fuzz.failures)} connections failed:\n" + "\n".join(fuzz.failures)
    total = fuzz.total
    # Each connection asserted its own end, exit status, stderr and trail; here, that the fuzz was the
    # fuzz it claims to be.
    assert total.frames >= 100_000
    assert sum(total.ends.values()) == LONG_LIVED + SHORT_LIVED
    assert total.ends["fatal"] >= SHORT_LIVED // 3 and total.ends["vanished"] > 0
    assert all(total.types[t] >= 500 for t in KNOWN), total.types
    assert total.pieces["short"] >= 5000 and total.pieces["unknown"] >= 2000
    assert total.pieces["open-burst"] == OPENS * (
        LONG_LIVED + len(range(LONG_LIVED, LONG_LIVED + SHORT_LIVED, 16))
    )
    assert total.errnos[0] >= 10_000  # enough requests succeed to reach the executor's every path
    assert total.modes["drip"] >= 50 and total.modes["burst-noread"] == total.pieces["open-burst"] // OPENS
    for kind in ("oversized", "cut", "garbage", "close", "vanish", "trailing"):
        assert total.pieces[kind] > 0, kind


def test_long_lived_gateways_grow_neither_fds_nor_rss(fuzz: Fuzz) -> None:
    assert len(fuzz.long_lived) == LONG_LIVED, "a long-lived gateway failed (see the other test)"
    for stats in fuzz.long_lived:
        assert len(stats.fds) >= 20, "too few samples"
        warm_fds, warm_rss = stats.fds[2], stats.rss_kib[2]
        assert max(stats.fds[2:]) <= warm_fds, f"fds grew: {stats.fds}"
        assert max(stats.rss_kib[2:]) - warm_rss <= 4096, f"RSS grew: {stats.rss_kib}"
        quarter = len(stats.rss_kib[2:]) // 4
        first = sum(stats.rss_kib[2 : 2 + quarter]) / quarter
        last = sum(stats.rss_kib[-quarter:]) / quarter
        assert last - first <= 1024, f"RSS creeps up: {stats.rss_kib}"
