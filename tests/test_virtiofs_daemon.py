"""The read-only back-end end to end, with a front-end written here that does what QEMU and the guest's
virtio-fs driver do: vhost-user over a real Unix socket (memfd and eventfds over SCM_RIGHTS), rings
laid out in the shared memfd, FUSE requests in descriptor chains, replies read back from the used ring
(gateway/virtiofs/daemon.py, device.py, readonly_fs.py, inodes.py, cli.py)."""

from __future__ import annotations

import contextlib
import errno
import json
import mmap
import os
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.virtiofs import daemon
from gateway.virtiofs import fuse_abi as abi
from gateway.virtiofs.device import Device
from gateway.virtiofs.fuse_abi import Op
from gateway.virtiofs.readonly_fs import ReadOnlyFs
from gateway.virtiofs.vhost_user_abi import (
    DEVICE_FEATURES,
    VHOST_USER_F_PROTOCOL_FEATURES,
    MemoryRegion,
    ProtocolFeature,
    Req,
    mem_table,
    message,
    parse_reply,
    u64,
    vring_addr,
    vring_state,
)

MEM_SIZE = 1 << 20
UVA = 0x7F1200000000
NUM = 8
HIPRIO, REQUEST = 0, 1
ROOT = abi.FUSE_ROOT_ID


def ring_base(index: int) -> int:
    return 0x1000 * (1 + 2 * index)  # desc at base, avail at +0x200, used at +0x400 (8 entries)


class FakeQemu:
    """The front-end and the guest driver, in one."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.memfd = os.memfd_create("guest-ram")
        os.ftruncate(self.memfd, MEM_SIZE)
        self.mem = mmap.mmap(self.memfd, MEM_SIZE)
        self.kick = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(2)]
        self.call = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in range(2)]
        self.avail_idx = [0, 0]
        self.used_seen = [0, 0]
        self.unique = 0

    def close(self) -> None:
        self.mem.close()
        for fd in (self.memfd, *self.kick, *self.call):
            os.close(fd)
        self.sock.close()

    def send(self, request: int, payload: bytes = b"", fds: tuple[int, ...] = (), reply: bool = False,
             ack: bool = True) -> bytes | None:
        socket.send_fds(self.sock, [message(request, payload, need_reply=ack)], list(fds))
        if reply or ack:
            head = self.sock.recv(12)
            size = struct.unpack_from("<I", head, 8)[0]
            body = self.sock.recv(size) if size else b""
            req, flags, _ = parse_reply(head + body)
            assert req == request and flags & 0x4
            return body
        return None

    def start(self) -> None:
        """What QEMU 7.2's vhost-user-fs does from connect to a running device."""
        features = struct.unpack("<Q", self.send(Req.GET_FEATURES, reply=True, ack=False))[0]
        assert features == DEVICE_FEATURES
        protocol = struct.unpack("<Q", self.send(Req.GET_PROTOCOL_FEATURES, reply=True, ack=False))[0]
        ack = 1 << ProtocolFeature.REPLY_ACK
        assert self.send(Req.SET_PROTOCOL_FEATURES, u64(protocol & (ack | 1)), ack=False) is None
        assert self.send(Req.GET_QUEUE_NUM, reply=True, ack=False) == u64(2)
        assert self.send(Req.SET_OWNER) == u64(0)
        assert self.send(Req.SET_FEATURES, u64(features)) == u64(0)
        region = MemoryRegion(0, MEM_SIZE, UVA, 0)
        assert self.send(Req.SET_MEM_TABLE, mem_table([region]), (self.memfd,)) == u64(0)
        for i in (HIPRIO, REQUEST):
            base = ring_base(i)
            assert self.send(Req.SET_VRING_NUM, vring_state(i, NUM)) == u64(0)
            assert self.send(Req.SET_VRING_BASE, vring_state(i, 0)) == u64(0)
            assert self.send(Req.SET_VRING_ADDR, vring_addr(i, UVA + base, UVA + base + 0x400,
                                                            UVA + base + 0x200)) == u64(0)
            assert self.send(Req.SET_VRING_KICK, u64(i), (self.kick[i],)) == u64(0)
            assert self.send(Req.SET_VRING_CALL, u64(i), (self.call[i],)) == u64(0)
            assert self.send(Req.SET_VRING_ENABLE, vring_state(i, 1)) == u64(0)

    # --- the guest driver -------------------------------------------------------------------------
    def _desc(self, q: int, i: int, addr: int, length: int, flags: int, nxt: int) -> None:
        struct.pack_into("<QIHH", self.mem, ring_base(q) + 16 * i, addr, length, flags, nxt)

    def _offer(self, q: int, head: int) -> None:
        avail = ring_base(q) + 0x200
        struct.pack_into("<H", self.mem, avail + 4 + 2 * (self.avail_idx[q] % NUM), head)
        self.avail_idx[q] = (self.avail_idx[q] + 1) & 0xFFFF
        struct.pack_into("<H", self.mem, avail + 2, self.avail_idx[q])
        os.eventfd_write(self.kick[q], 1)

    def _wait_used(self, q: int) -> tuple[int, int]:
        used = ring_base(q) + 0x400
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            idx = struct.unpack_from("<H", self.mem, used + 2)[0]
            if idx != self.used_seen[q]:
                slot = self.used_seen[q] % NUM
                self.used_seen[q] = (self.used_seen[q] + 1) & 0xFFFF
                return struct.unpack_from("<II", self.mem, used + 4 + 8 * slot)
            # The interrupt: wait for it, then clear it, as the guest's driver does.
            if select.select([self.call[q]], [], [], 0.05)[0]:
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(self.call[q])
        raise AssertionError("no used entry")

    def fuse(self, op: int, body: bytes = b"", nodeid: int = ROOT, out_size: int = 8192,
             q: int = REQUEST) -> tuple[int, bytes]:
        """One request: (error, reply body)."""
        self.unique += 1
        req = abi.IN_HEADER.pack(40 + len(body), op, self.unique, nodeid, 0, 0, 1, 0, 0) + body
        inbuf, outbuf = 0x10000, 0x40000
        self.mem[inbuf:inbuf + len(req)] = req
        self._desc(q, 0, inbuf, len(req), 1, 1)  # NEXT
        self._desc(q, 1, outbuf, out_size, 2, 0)  # WRITE
        self._offer(q, 0)
        head, written = self._wait_used(q)
        assert head == 0
        if op in (Op.FORGET, Op.BATCH_FORGET):
            assert written == 0
            return 0, b""
        length, error, unique = abi.OUT_HEADER.unpack_from(self.mem, outbuf)
        assert unique == self.unique and length == written
        return -error, bytes(self.mem[outbuf + 16:outbuf + length])

    def raw_chain(self, q: int, descs: list[tuple[int, int, int, int]], head: int = 0) -> tuple[int, int]:
        for i, d in enumerate(descs):
            self._desc(q, i, *d)
        self._offer(q, head)
        return self._wait_used(q)


@pytest.fixture
def export(tmp_path: Path) -> Path:
    root = tmp_path / "export"
    (root / "dir" / "sub").mkdir(parents=True)
    (root / "hello.txt").write_bytes(b"hello, guest\n")
    (root / "big").write_bytes(bytes(range(256)) * 1024)
    (root / "dir" / "a").write_bytes(b"a")
    (root / "dir" / "b").write_bytes(b"bb")
    os.symlink("/etc/passwd", root / "escape")
    os.symlink("../../..", root / "dir" / "up")
    os.mkfifo(root / "fifo")
    (tmp_path / "secret").write_bytes(b"outside")
    return root


@pytest.fixture
def guest(export: Path) -> Iterator[FakeQemu]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    root_fd = os.open(export, os.O_PATH | os.O_DIRECTORY)
    proc_fd = os.open("/proc/self/fd", os.O_PATH | os.O_DIRECTORY)
    fs = ReadOnlyFs(root_fd, proc_fd, max_handles=4)
    device = Device(fs)
    result: list[str] = []
    thread = threading.Thread(target=lambda: result.append(daemon.serve_connection(theirs, device)))
    thread.start()
    q = FakeQemu(ours)
    try:
        q.start()
        err, body = q.fuse(Op.INIT, abi.INIT_IN.pack(7, 36, 65536, abi.FUSE_INIT_EXT | abi.FUSE_MAX_PAGES
                                                    | abi.FUSE_DO_READDIRPLUS, 0))
        assert err == 0 and abi.INIT_OUT.unpack_from(body)[:2] == (7, 36)
        yield q
    finally:
        ours.shutdown(socket.SHUT_RDWR)
        thread.join(10)
        assert not thread.is_alive()
        assert result and "closed" in result[0]
        device.close()
        fs.close()
        theirs.close()
        os.close(root_fd)
        os.close(proc_fd)
        q.close()


def lookup(q: FakeQemu, name: bytes, parent: int = ROOT) -> tuple[int, int, bytes]:
    err, body = q.fuse(Op.LOOKUP, name + b"\0", nodeid=parent)
    if err:
        return err, 0, b""
    nodeid = abi.ENTRY_OUT_HEAD.unpack_from(body)[0]
    return 0, nodeid, body[40:128]


def attr_mode_size(attr: bytes) -> tuple[int, int]:
    fields = abi.ATTR.unpack(attr)
    return fields[9], fields[1]


def read_file(q: FakeQemu, nodeid: int, size: int = 4096, offset: int = 0) -> tuple[int, bytes]:
    err, body = q.fuse(Op.OPEN, abi.OPEN_IN.pack(os.O_RDONLY, 0), nodeid=nodeid)
    if err:
        return err, b""
    fh = abi.OPEN_OUT.unpack(body)[0]
    err, data = q.fuse(Op.READ, abi.READ_IN.pack(fh, offset, size, 0, 0, 0, 0), nodeid=nodeid,
                       out_size=16 + size)
    assert q.fuse(Op.RELEASE, abi.RELEASE_IN.pack(fh, 0, 0, 0), nodeid=nodeid)[0] == 0
    return err, data


def test_lookup_getattr_open_read(guest: FakeQemu, export: Path) -> None:
    err, nodeid, attr = lookup(guest, b"hello.txt")
    assert err == 0 and nodeid > ROOT
    mode, size = attr_mode_size(attr)
    assert mode == os.lstat(export / "hello.txt").st_mode and size == 13
    assert lookup(guest, b"hello.txt")[1] == nodeid  # the same object, the same nodeid
    err, body = guest.fuse(Op.GETATTR, abi.GETATTR_IN.pack(0, 0, 0), nodeid=nodeid)
    assert err == 0 and attr_mode_size(body[16:])[1] == 13
    assert read_file(guest, nodeid) == (0, b"hello, guest\n")
    _, big, _ = lookup(guest, b"big")
    err, data = read_file(guest, big, size=65536, offset=1000)
    assert err == 0 and data == (bytes(range(256)) * 1024)[1000:1000 + 65536]
    guest.fuse(Op.FORGET, struct.pack("<Q", 2), nodeid=nodeid, q=HIPRIO)  # on the high-priority queue
    assert lookup(guest, b"nope")[0] == errno.ENOENT


def test_readdir_and_readdirplus(guest: FakeQemu) -> None:
    _, d, _ = lookup(guest, b"dir")
    for op in (Op.READDIR, Op.READDIRPLUS):
        err, body = guest.fuse(Op.OPENDIR, abi.OPEN_IN.pack(os.O_DIRECTORY, 0), nodeid=d)
        assert err == 0
        fh = abi.OPEN_OUT.unpack(body)[0]
        names, offset = [], 0
        while True:  # a small buffer: the guest comes back from the last offset
            err, body = guest.fuse(op, abi.READ_IN.pack(fh, offset, 200, 0, 0, 0, 0), nodeid=d)
            assert err == 0
            if not body:
                break
            pos = 0
            while pos < len(body):
                if op == Op.READDIRPLUS:
                    pos += 128  # the entry_out
                _ino, offset, namelen, _kind = abi.DIRENT_HEAD.unpack_from(body, pos)
                names.append(body[pos + 24:pos + 24 + namelen])
                pos += (24 + namelen + 7) & ~7
        assert sorted(names) == [b".", b"..", b"a", b"b", b"sub", b"up"]
        assert guest.fuse(Op.RELEASEDIR, abi.RELEASE_IN.pack(fh, 0, 0, 0), nodeid=d)[0] == 0


def test_statfs_readlink_access(guest: FakeQemu) -> None:
    err, body = guest.fuse(Op.STATFS)
    assert err == 0 and len(body) == 80
    _, link, attr = lookup(guest, b"escape")
    assert attr_mode_size(attr)[0] & 0o170000 == 0o120000  # the link itself, never followed
    assert guest.fuse(Op.READLINK, nodeid=link) == (0, b"/etc/passwd")
    assert guest.fuse(Op.ACCESS, abi.ACCESS_IN.pack(os.R_OK, 0))[0] == 0
    assert guest.fuse(Op.ACCESS, abi.ACCESS_IN.pack(os.W_OK, 0))[0] == errno.EROFS


def test_nothing_changes_the_export(guest: FakeQemu, export: Path) -> None:
    before = sorted(p.name for p in export.rglob("*"))
    _, f, _ = lookup(guest, b"hello.txt")
    for op, body, node in (
        (Op.MKDIR, abi.MKDIR_IN.pack(0o755, 0) + b"new\0", ROOT),
        (Op.CREATE, abi.CREATE_IN.pack(os.O_WRONLY | os.O_CREAT, 0o644, 0, 0) + b"new\0", ROOT),
        (Op.UNLINK, b"hello.txt\0", ROOT),
        (Op.RENAME, struct.pack("<Q", ROOT) + b"hello.txt\0x\0", ROOT),
        (Op.SETATTR, abi.SETATTR_IN.pack(abi.FATTR_SIZE, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0), f),
        (Op.SYMLINK, b"l\0t\0", ROOT),
        (Op.OPEN, abi.OPEN_IN.pack(os.O_RDWR, 0), f),
        (Op.OPEN, abi.OPEN_IN.pack(os.O_RDONLY | os.O_TRUNC, 0), f),
    ):
        assert guest.fuse(op, body, nodeid=node)[0] == errno.EROFS, op
    assert sorted(p.name for p in export.rglob("*")) == before
    assert (export / "hello.txt").read_bytes() == b"hello, guest\n"


def test_escapes_and_special_files(guest: FakeQemu) -> None:
    _, d, _ = lookup(guest, b"dir")
    _, up, attr = lookup(guest, b"up", parent=d)
    assert attr_mode_size(attr)[0] & 0o170000 == 0o120000  # a symlink stays a symlink
    assert lookup(guest, b"..", parent=d)[0] == errno.ENOENT  # no '..' lookups at all
    assert guest.fuse(Op.LOOKUP, b"../secret\0")[0] == errno.EINVAL  # not one component
    assert guest.fuse(Op.OPEN, abi.OPEN_IN.pack(os.O_RDONLY, 0), nodeid=up)[0] == errno.ENXIO
    _, fifo, _ = lookup(guest, b"fifo")
    assert guest.fuse(Op.OPEN, abi.OPEN_IN.pack(os.O_RDONLY, 0), nodeid=fifo)[0] == errno.ENXIO  # no block
    assert guest.fuse(Op.OPENDIR, abi.OPEN_IN.pack(0, 0), nodeid=fifo)[0] == errno.ENOTDIR
    assert guest.fuse(Op.GETATTR, abi.GETATTR_IN.pack(0, 0, 0), nodeid=999)[0] == errno.ESTALE
    assert guest.fuse(Op.READ, abi.READ_IN.pack(77, 0, 10, 0, 0, 0, 0))[0] == errno.EBADF
    assert guest.fuse(Op.GETLK, b"\0" * 48)[0] == errno.ENOSYS


def test_open_handles_are_bounded(guest: FakeQemu) -> None:
    _, f, _ = lookup(guest, b"hello.txt")
    errs = [guest.fuse(Op.OPEN, abi.OPEN_IN.pack(os.O_RDONLY, 0), nodeid=f)[0] for _ in range(6)]
    assert errs == [0, 0, 0, 0, errno.ENFILE, errno.ENFILE]  # max_handles=4 in this fixture


def test_hostile_chains_do_not_stop_the_device(guest: FakeQemu) -> None:
    # a descriptor loop, an address outside the memory table, a length that wraps: each chain comes
    # back with nothing written, and the next request is served as if nothing happened
    for descs in ([(0x10000, 40, 1, 1), (0x10000, 40, 1, 0)],
                  [(MEM_SIZE + 0x1000, 40, 0, 0)],
                  [(2**64 - 16, 64, 0, 0)]):
        assert guest.raw_chain(REQUEST, descs) == (0, 0)
    assert guest.fuse(Op.STATFS)[0] == 0
    # a reply larger than the chain's writable room: an error reply, not a truncated one
    _, f, _ = lookup(guest, b"hello.txt")
    fh = abi.OPEN_OUT.unpack(guest.fuse(Op.OPEN, abi.OPEN_IN.pack(os.O_RDONLY, 0), nodeid=f)[1])[0]
    assert guest.fuse(Op.READ, abi.READ_IN.pack(fh, 0, 10, 0, 0, 0, 0), nodeid=f, out_size=16) == (
        errno.EOVERFLOW, b"")


def test_cli_print_capabilities_and_usage_errors(tmp_path: Path) -> None:
    run = [sys.executable, "-m", "gateway", "virtiofsd"]
    out = subprocess.run([*run, "--print-capabilities"], capture_output=True, text=True, check=True)
    assert out.stdout == '{\n  "type": "fs"\n}\n'
    bad = subprocess.run([*run, "--socket-path", str(tmp_path / "s")], capture_output=True, text=True)
    assert bad.returncode == 1 and "shared-dir" in bad.stderr
    bad = subprocess.run([*run, "-o", "source=/nonexistent", "--socket-path", str(tmp_path / "s")],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "not a directory" in bad.stderr
    bad = subprocess.run([*run, "-o", "source=/,frobnicate", "--socket-path", str(tmp_path / "s")],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "unknown option -o frobnicate" in bad.stderr


def test_cli_serves_over_a_named_socket(tmp_path: Path, export: Path) -> None:
    path = tmp_path / "vfs.sock"
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "virtiofsd", "--socket-path", str(path),
                             "-o", f"source={export},cache=none", "--sandbox", "none",
                             f"--audit-log={tmp_path / 'trail.jsonl'}"],
                            stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(200):
            if path.exists():
                break
            select.select([], [], [], 0.05)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(path))
        q = FakeQemu(sock)
        q.start()
        assert q.fuse(Op.INIT, abi.INIT_IN.pack(7, 36, 0, 0, 0))[0] == 0
        _, nodeid, _ = lookup(q, b"hello.txt")
        assert read_file(q, nodeid) == (0, b"hello, guest\n")
        q.close()  # QEMU goes away: the back-end ends
        assert proc.wait(10) == 0
        stderr = proc.stderr.read() if proc.stderr else ""
        assert "-o cache=none: accepted, not yet acted on" in stderr
        assert "--sandbox: accepted" not in stderr and "no chroot" in stderr  # acted on
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_serves_an_inherited_listening_socket(tmp_path: Path, export: Path) -> None:
    """--fd, as libvirt starts virtiofsd: the socket is bound and listening before the back-end runs."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "inherited.sock"))
    listener.listen(1)
    fd = listener.fileno()
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "virtiofsd", f"--fd={fd}",
                             f"--shared-dir={export}", f"--audit-log={tmp_path / 'trail.jsonl'}"],
                            pass_fds=[fd], stderr=subprocess.PIPE, text=True)
    listener.close()
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(tmp_path / "inherited.sock"))
        q = FakeQemu(sock)
        q.start()
        assert q.fuse(Op.INIT, abi.INIT_IN.pack(7, 38, 0, 0, 0))[0] == 0
        assert q.fuse(Op.STATFS)[0] == 0
        q.close()
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_decides_by_the_policy_and_keeps_the_trail(tmp_path: Path, export: Path) -> None:
    """--policy, --tenant and --audit-log as `gateway serve` has them: a denied LOOKUP gets the rule's
    errno, and the trail (start, policy-load, session, each decision, stop) verifies."""
    policy = tmp_path / "p.yaml"
    policy.write_text("version: 1\ndefault: allow\nrules:\n  - id: no-hello\n    effect: deny\n"
                      "    ops: [all]\n    paths: [/hello.txt]\n    errno: EPERM\n")
    path, trail = tmp_path / "vfs.sock", tmp_path / "trail.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "virtiofsd", "--socket-path", str(path),
                             "--shared-dir", str(export), "--policy", str(policy), "--tenant", "vm7",
                             "--audit-log", str(trail)], stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(200):
            if path.exists():
                break
            select.select([], [], [], 0.05)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(path))
        q = FakeQemu(sock)
        q.start()
        assert q.fuse(Op.INIT, abi.INIT_IN.pack(7, 36, 0, 0, 0))[0] == 0
        assert q.fuse(Op.LOOKUP, b"hello.txt\0")[0] == errno.EPERM
        assert q.fuse(Op.STATFS)[0] == 0
        q.close()
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    recs = [json.loads(line) for line in trail.read_text().splitlines()]
    events = [r["event"] for r in recs if r["event"] != "checkpoint"]
    assert events == ["start", "policy-load", "session", "request", "request", "stop"]
    assert all(r["tenant"] == "vm7" for r in recs)
    denied = recs[events.index("request")]
    assert (denied["op"], denied["path"], denied["decision"], denied["rule"], denied["result"]) == (
        "lstat", "/hello.txt", "deny", "no-hello", "EPERM")
    check = subprocess.run([sys.executable, "-m", "gateway", "audit", "--verify", str(trail)],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    bad = subprocess.run([sys.executable, "-m", "gateway", "virtiofsd", "--socket-path", str(path),
                          "--shared-dir", str(export), "--policy", str(tmp_path / "none.yaml")],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "refusing to serve" in bad.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chroot, capabilities)")
def test_cli_is_confined_before_qemu_connects(tmp_path: Path, export: Path) -> None:
    """chroot, the six capabilities (no CAP_MKNOD: regular files and FIFOs only), no_new_privs and the
    filter are in place while it waits for QEMU, `gateway inspect` says so, and it serves so confined."""
    path, trail = tmp_path / "vfs.sock", tmp_path / "trail.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "virtiofsd", "--socket-path", str(path),
                             "--shared-dir", str(export), "--audit-log", str(trail)],
                            stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(200):
            if path.exists() and trail.exists() and '"start"' in trail.read_text():
                break
            select.select([], [], [], 0.05)
        status = {k: v.strip() for k, _, v in (line.partition(":") for line in
                                                 Path(f"/proc/{proc.pid}/status").read_text().splitlines())}
        six = sum(1 << c for c in (0, 1, 3, 4, 6, 7))  # chown dac_override fowner fsetid setgid setuid
        assert int(status["CapEff"], 16) == six and int(status["CapBnd"], 16) == six
        assert status["NoNewPrivs"] == "1" and status["Seccomp"] == "2"
        assert os.readlink(f"/proc/{proc.pid}/root") == str(export)
        out = subprocess.run([sys.executable, "-m", "gateway", "inspect", str(proc.pid)],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0 and "confinement holds" in out.stdout, out.stdout + out.stderr
        assert "mknod" not in out.stdout
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(path))
        q = FakeQemu(sock)
        q.start()
        assert q.fuse(Op.INIT, abi.INIT_IN.pack(7, 36, 0, 0, 0))[0] == 0
        _, nodeid, _ = lookup(q, b"hello.txt")
        assert read_file(q, nodeid) == (0, b"hello, guest\n")
        assert q.fuse(Op.MKDIR, abi.MKDIR_IN.pack(0o755, 0) + b"made\0")[0] == 0
        q.close()
        assert proc.wait(10) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert (export / "made").is_dir()
    start = next(json.loads(line) for line in trail.read_text().splitlines() if '"start"' in line)
    assert start["sandbox"]["chroot"] == str(export) and start["sandbox"]["seccomp"] == "kill"
    assert "mknod" not in start["sandbox"]["capabilities"]


def test_too_many_fds_on_one_message_end_the_connection(tmp_path: Path, export: Path) -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    root_fd = os.open(export, os.O_PATH | os.O_DIRECTORY)
    proc_fd = os.open("/proc/self/fd", os.O_PATH | os.O_DIRECTORY)
    fs = ReadOnlyFs(root_fd, proc_fd)
    device = Device(fs)
    extra = [os.eventfd(0) for _ in range(12)]
    try:
        socket.send_fds(ours, [message(Req.GET_FEATURES)], extra)
        assert "too many fds" in daemon.serve_connection(theirs, device)
    finally:
        for fd in extra:
            os.close(fd)
        device.close()
        fs.close()
        for s in (ours, theirs):
            s.close()
        os.close(root_fd)
        os.close(proc_fd)


def test_back_to_back_messages_keep_their_fds(export: Path) -> None:
    """QEMU does not wait between messages that ask for no reply, so several sit in the socket at once,
    the fd-carrying ones among them. Reading one message at a time is what keeps each fd with its
    own message (a larger read would hand SET_VRING_KICK's fd over with SET_VRING_ADDR's bytes)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    q = FakeQemu(ours)
    region = MemoryRegion(0, MEM_SIZE, UVA, 0)
    no_protocol = DEVICE_FEATURES & ~VHOST_USER_F_PROTOCOL_FEATURES  # rings then start enabled
    burst = [(Req.SET_FEATURES, u64(no_protocol), ()),
             (Req.SET_MEM_TABLE, mem_table([region]), (q.memfd,))]
    for i in (HIPRIO, REQUEST):
        base = ring_base(i)
        burst += [(Req.SET_VRING_NUM, vring_state(i, NUM), ()), (Req.SET_VRING_BASE, vring_state(i, 0), ()),
                  (Req.SET_VRING_ADDR, vring_addr(i, UVA + base, UVA + base + 0x400, UVA + base + 0x200), ()),
                  (Req.SET_VRING_KICK, u64(i), (q.kick[i],)), (Req.SET_VRING_CALL, u64(i), (q.call[i],))]
    for request, payload, fds in burst:  # all queued before the back-end reads a byte
        socket.send_fds(ours, [message(request, payload)], list(fds))
    root_fd = os.open(export, os.O_PATH | os.O_DIRECTORY)
    proc_fd = os.open("/proc/self/fd", os.O_PATH | os.O_DIRECTORY)
    fs = ReadOnlyFs(root_fd, proc_fd)
    device = Device(fs)
    result: list[str] = []
    thread = threading.Thread(target=lambda: result.append(daemon.serve_connection(theirs, device)))
    thread.start()
    try:
        assert q.fuse(Op.INIT, abi.INIT_IN.pack(7, 36, 0, 0, 0))[0] == 0
        assert q.fuse(Op.STATFS, q=REQUEST)[0] == 0
    finally:
        ours.shutdown(socket.SHUT_RDWR)
        thread.join(10)
        device.close()
        fs.close()
        theirs.close()
        os.close(root_fd)
        os.close(proc_fd)
        q.close()
    assert result and "closed" in result[0], result
