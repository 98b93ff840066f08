"""A real `gateway serve` process over a socketpair (-f) and over a named socket (-s): every request type,
success and error paths, the fd received and usable, the named socket's rules, the usage errors."""

from __future__ import annotations

import errno
import os
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import (
    GATEWAY,
    REFERENCE,
    Running,
    over_socketpair,
    require_reference,
    require_root,
    trail_args,
    wait_listening,
)

from gateway import protocol as p
from gateway.client import Client


@pytest.fixture
def export(tmp_path: Path) -> Path:
    root = tmp_path / "export"
    root.mkdir()
    (root / "file").write_bytes(b"hello world\n")
    (root / "dir").mkdir()
    (root / "dir" / "inner").write_bytes(b"inner\n")
    os.symlink("file", root / "link")
    os.mkfifo(root / "fifo")
    return root


@pytest.fixture
def gw(export: Path) -> Iterator[Running]:
    require_root()
    with over_socketpair(GATEWAY, export) as running:
        yield running


def test_every_request_type_success_path(gw: Running, export: Path) -> None:
    c = gw.client
    st = c.lstat(b"/file")
    assert stat.S_ISREG(st.mode) and st.size == 12
    fd = c.open(b"/file", os.O_RDONLY)
    try:
        assert os.read(fd, 100) == b"hello world\n"
        assert os.fstat(fd).st_ino == st.ino  # the received fd is the file itself
    finally:
        os.close(fd)
    fd = c.create(b"/dir/made", os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o640, 1000, 1000)
    try:
        os.write(fd, b"written through the fd")
    finally:
        os.close(fd)
    made = os.stat(export / "dir" / "made")
    assert (made.st_uid, made.st_gid, stat.S_IMODE(made.st_mode)) == (1000, 1000, 0o640)
    assert (export / "dir" / "made").read_bytes() == b"written through the fd"
    c.mknod(b"/node", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    assert stat.S_ISCHR(os.lstat(export / "node").st_mode)
    c.mkdir(b"/newdir", 0o1750, uid=1001, gid=1002)
    nd = os.stat(export / "newdir")
    assert (nd.st_uid, nd.st_gid, stat.S_IMODE(nd.st_mode)) == (1001, 1002, 0o1750)
    c.symlink(b"/dir/inner", b"/sl", uid=1000, gid=1000)
    assert os.readlink(export / "sl") == "/dir/inner" and os.lstat(export / "sl").st_uid == 1000
    assert c.readlink(b"/sl") == b"/dir/inner"
    c.link(b"/file", b"/hard")
    assert os.stat(export / "file").st_nlink == 2
    assert c.statfs(b"/").namelen == os.statvfs(export).f_namemax
    c.chmod(b"/file", 0o4711)
    assert stat.S_IMODE(os.stat(export / "file").st_mode) == 0o4711
    c.chown(b"/link", 77, 88)  # lchown: the link, not its target
    assert (os.lstat(export / "link").st_uid, os.stat(export / "file").st_uid) == (77, 0)
    c.truncate(b"/file", 5)
    assert (export / "file").read_bytes() == b"hello"
    c.utime(b"/file", (1000, 5), (2000, 7))
    s = os.stat(export / "file")
    assert (s.st_atime_ns, s.st_mtime_ns) == (1000 * 10**9 + 5, 2000 * 10**9 + 7)
    c.rename(b"/hard", b"/dir/moved")
    assert (export / "dir" / "moved").exists() and not (export / "hard").exists()
    c.remove(b"/dir/moved")
    c.remove(b"/newdir")
    assert not (export / "newdir").exists()
    c.setxattr(b"/file", b"user.colour", b"blue")
    assert os.getxattr(export / "file", "user.colour") == b"blue"
    assert c.getxattr(b"/file", b"user.colour") == b"blue"
    assert c.getxattr_length(b"/file", b"user.colour") == 4
    assert b"user.colour" in c.listxattr(b"/file")
    c.removexattr(b"/file", b"user.colour")
    assert "user.colour" not in os.listxattr(export / "file")
    assert isinstance(c.getversion(b"/file"), int)


@pytest.mark.parametrize(
    ("request_", "expected"),
    [
        (p.Open(b"/missing", os.O_RDONLY), errno.ENOENT),
        (p.Open(b"/fifo", os.O_RDONLY), errno.ENXIO),
        (p.Open(b"/file", os.O_RDONLY | os.O_DIRECTORY), errno.ENOTDIR),
        (p.Create(b"/file", os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644, 0, 0), errno.EEXIST),
        (p.Create(b"/nodir/x", os.O_CREAT | os.O_RDWR, 0o644, 0, 0), errno.ENOENT),
        (p.Mknod(0, 0, b"/file", stat.S_IFIFO | 0o644, 0), errno.EEXIST),
        (p.Mkdir(0, 0, b"/dir", 0o755), errno.EEXIST),
        (p.Symlink(0, 0, b"x", b"/file"), errno.EEXIST),
        (p.Link(b"/missing", b"/x"), errno.ENOENT),
        (p.Link(b"/dir", b"/x"), errno.EPERM),
        (p.Lstat(b"/missing"), errno.ENOENT),
        (p.Lstat(b"/file/x"), errno.ENOTDIR),
        (p.Readlink(b"/file", 100), errno.EINVAL),
        (p.Readlink(b"/link", 1), errno.EINVAL),
        (p.Statfs(b"/missing"), errno.ENOENT),
        (p.Chmod(b"/missing", 0o644), errno.ENOENT),
        (p.Chown(b"/missing", 0, 0), errno.ENOENT),
        (p.Truncate(b"/dir", 0), errno.EISDIR),
        (p.Utime(b"/missing", 0, 0, 0, 0), errno.ENOENT),
        (p.Rename(b"/missing", b"/x"), errno.ENOENT),
        (p.Remove(b"/dir"), errno.ENOTEMPTY),
        (p.Lgetxattr(100, b"/file", b"user.none"), errno.ENODATA),
        (p.Llistxattr(100, b"/missing"), errno.ENOENT),
        (p.Lsetxattr(b"/file", b"bogus.ns", b"v", 1, 0), errno.EOPNOTSUPP),
        (p.Lremovexattr(b"/file", b"user.none"), errno.ENODATA),
        (p.Getversion(b"/missing"), errno.ENOENT),
    ],
    ids=lambda v: v.type.name if isinstance(v, p.Request.__args__) else errno.errorcode.get(v, v),  # type: ignore[attr-defined]
)
def test_error_paths(gw: Running, request_: p.Request, expected: int) -> None:
    reply = gw.client.call(request_)
    assert reply.errno == expected, errno.errorcode.get(reply.errno)
    assert reply.fd is None
    assert gw.client.lstat(b"/").mode  # and it keeps serving


def test_malformed_frames_get_replies_and_serving_goes_on(gw: Running) -> None:
    c = gw.client
    c.send_raw(p.HEADER.pack(p.RequestType.LSTAT, 0))
    assert c.read_reply(p.RequestType.LSTAT).errno == errno.ENOBUFS
    c.send_raw(p.HEADER.pack(p.RequestType.OPEN, 3) + b"\x01\x00/")
    assert c.read_reply(p.RequestType.OPEN).errno == errno.ENOBUFS  # in the OPEN shape: no header
    c.send_raw(p.HEADER.pack(99, 4) + b"abcd")
    assert c.read_reply(99).errno == errno.EOPNOTSUPP
    c.send_raw(p.encode_request(p.Lstat(b"/file")) + p.encode_request(p.Lstat(b"/missing")))
    assert c.read_reply(p.RequestType.LSTAT).ok
    assert c.read_reply(p.RequestType.LSTAT).errno == errno.ENOENT


@pytest.mark.parametrize(
    "frame",
    [
        p.HEADER.pack(8, p.MAX_PAYLOAD + 1),
        p.HEADER.pack(8, 0xFFFFFFFF),
        p.HEADER.pack(8, 20) + b"short",
        b"\x08\x00",
    ],
    ids=["64k+1", "4g", "eof-in-payload", "eof-in-header"],
)
def test_fatal_frames_end_the_connection_cleanly(export: Path, frame: bytes) -> None:
    require_root()
    with over_socketpair(GATEWAY, export) as gw:
        gw.client.send_raw(frame)
        gw.client.sock.shutdown(socket.SHUT_WR)
        assert gw.client.sock.recv(100) == b""  # closed, no reply
        assert gw.proc.wait(5) == 0
        assert gw.proc.stderr is not None
        err = gw.proc.stderr.read().decode()
        assert "Traceback" not in err and ("protocol error" in err or "exceeds" in err or "EOF" in err), err


def test_exits_cleanly_when_the_client_goes_away(export: Path) -> None:
    require_root()
    with over_socketpair(GATEWAY, export) as gw:
        gw.client.lstat(b"/")
        code = gw.stop()
        assert code == 0


def _serve_named(sock_path: Path, export: Path, uid: int = 1234, gid: int = 4321) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [
            *GATEWAY,
            "-p",
            str(export),
            "-s",
            str(sock_path),
            "-u",
            str(uid),
            "-g",
            str(gid),
            "-n",
            *trail_args(export),
        ],
        stderr=subprocess.PIPE,
    )
    wait_listening(str(sock_path))
    return proc


def test_named_socket(tmp_path: Path, export: Path) -> None:
    require_root()
    sock_path = tmp_path / "proxy.sock"
    proc = _serve_named(sock_path, export)
    try:
        st = os.lstat(sock_path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o770  # srwxrwx---: bound with umask 007
        assert (st.st_uid, st.st_gid) == (1234, 4321)
        c = Client.connect(str(sock_path), timeout=10)
        fd = c.open(b"/dir/inner", os.O_RDONLY)
        assert os.read(fd, 10) == b"inner\n"
        os.close(fd)
        time.sleep(0.1)
        second = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with pytest.raises(ConnectionRefusedError):  # one client: the listener is closed
            second.connect(str(sock_path))
        second.close()
        assert c.lstat(b"/file").size == 12
        c.close()
        assert proc.wait(5) == 0
        assert sock_path.exists()  # left behind, as the reference leaves it
    finally:
        proc.kill()
        proc.wait()


def test_daemon_mode_detaches_and_serves(tmp_path: Path, export: Path) -> None:
    require_root()
    sock_path = tmp_path / "daemon.sock"
    result = subprocess.run(
        [*GATEWAY, "-p", str(export), "-s", str(sock_path), "-u", "0", "-g", "0", *trail_args(export)],
        capture_output=True,
        timeout=20,
    )
    assert result.returncode == 0  # the parent returns at once; the daemon listens
    wait_listening(str(sock_path))
    with Client.connect(str(sock_path), timeout=10) as c:
        assert c.lstat(b"/file").size == 12


USAGE_CASES = [
    ["-n"],
    ["-p", "/"],
    ["-p", "/", "-f", "3", "-s", "/tmp/x", "-u", "0", "-g", "0"],
    ["-p", "/", "-s", "/tmp/x", "-u", "0"],
    ["-p", "/nonexistent-dir", "-f", "3"],
    ["-p", "/etc/passwd", "-f", "3"],
    ["-x"],
    ["-h"],
]


@pytest.mark.parametrize("argv", USAGE_CASES, ids=lambda a: " ".join(a))
def test_usage_errors_as_the_reference_reports_them(argv: list[str]) -> None:
    require_reference()
    ours = subprocess.run([*GATEWAY, *argv], capture_output=True, timeout=20)
    ref = subprocess.run([REFERENCE, *argv], capture_output=True, timeout=20)
    assert ours.returncode == ref.returncode
    # The first line names the problem in the reference's words (its usage text follows).
    ref_first = ref.stderr.decode().splitlines()[0]
    ours_text = ours.stderr.decode()
    if ref_first.startswith(REFERENCE):  # getopt's own words, e.g. "invalid option -- 'x'"
        assert argv[0] in ours_text.splitlines()[0]
    elif not ref_first.startswith("usage:"):
        assert ours_text.splitlines()[0] == ref_first
    has_usage = "-p|--path <path> 9p path to export" in ref.stderr.decode()
    assert ("-p|--path <path> 9p path to export" in ours_text) == has_usage
