"""The writable back-end (gateway/virtiofs/export_fs.py): each change decided as its policy request,
performed by the 9p executor on the resolution it was decided on, as the guest's uid/gid, recorded."""

from __future__ import annotations

import errno
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.audit import AuditWriter
from gateway.rules import load_policy_text
from gateway.virtiofs import fuse_abi as abi
from gateway.virtiofs.export_fs import ExportFs
from gateway.virtiofs.fuse_abi import Op
from gateway.virtiofs.fuse_decode import decode
from gateway.virtiofs.policy import Gate

POLICY = """
version: 1
tenant: t
default: allow
rules:
  - id: ro-etc
    effect: deny
    ops: [write]
    paths: ["/etc", "/etc/**"]
    errno: EROFS
  - id: no-setid
    effect: deny
    ops: [CREATE, mkdir, mknod, chmod]
    when: {mode_any: [setuid, setgid]}
    errno: EPERM
"""

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (guest uids)")


@pytest.fixture
def export(tmp_path: Path) -> Path:
    return _make_export(tmp_path / "export")


def _make_export(root: Path) -> Path:
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").write_bytes(b"root:x:0:0\n")
    (root / "d").mkdir()
    (root / "d" / "f").write_bytes(b"0123456789")
    os.chmod(root, 0o777)
    os.chmod(root / "d", 0o777)
    return root


class Fs:
    def __init__(self, export: Path, trail: Path, policy: str = POLICY) -> None:
        p = load_policy_text(policy)
        self.audit = AuditWriter.open(trail, tenant="t", policy_hash=p.hash)
        self.root_fd = os.open(export, os.O_PATH | os.O_DIRECTORY)
        self.proc_fd = os.open("/proc/self/fd", os.O_PATH | os.O_DIRECTORY)
        self.fs = ExportFs(self.root_fd, self.proc_fd, gate=Gate(p, self.audit), max_handles=8)
        self.trail = trail
        assert self.call(Op.INIT, abi.INIT_IN.pack(7, 36, 0, 0, 0))[0] == 0

    def close(self) -> None:
        self.fs.close()
        self.audit.close()
        os.close(self.root_fd)
        os.close(self.proc_fd)

    def call(self, op: int, body: bytes = b"", nodeid: int = 1, uid: int = 0,
             gid: int = 0) -> tuple[int, bytes]:
        out = self.fs.handle(decode(abi.IN_HEADER.pack(40 + len(body), op, 9, nodeid, uid, gid, 1, 0, 0)
                                    + body))
        assert out is not None
        length, error, _ = abi.OUT_HEADER.unpack_from(out)
        assert length == len(out)
        return -error, out[16:]

    def lookup(self, name: bytes, parent: int = 1) -> int:
        err, body = self.call(Op.LOOKUP, name + b"\0", parent)
        assert err == 0, (name, err)
        return abi.ENTRY_OUT_HEAD.unpack_from(body)[0]

    def records(self) -> list[tuple[object, ...]]:
        return [(x["op"], x["path"], x.get("path2"), x["decision"], x["result"])
                for x in map(json.loads, self.trail.read_text().splitlines()) if x["event"] == "request"]


@pytest.fixture
def fs(export: Path, tmp_path: Path) -> Iterator[Fs]:
    f = Fs(export, tmp_path / "trail.jsonl")
    yield f
    f.close()


def _create(fs: Fs, parent: int, name: bytes, mode: int = 0o644, flags: int = os.O_WRONLY | os.O_CREAT,
            uid: int = 0, gid: int = 0) -> tuple[int, int, int]:
    err, body = fs.call(Op.CREATE, abi.CREATE_IN.pack(flags, mode, 0o022, 0) + name + b"\0", parent, uid, gid)
    if err:
        return err, 0, 0
    return 0, abi.ENTRY_OUT_HEAD.unpack_from(body)[0], abi.OPEN_OUT.unpack_from(body, 128)[0]


@root_only
def test_create_write_release_as_the_guest_user(fs: Fs, export: Path) -> None:
    d = fs.lookup(b"d")
    err, nodeid, fh = _create(fs, d, b"new", 0o640, uid=1000, gid=1000)
    assert err == 0
    err, body = fs.call(Op.WRITE, abi.WRITE_IN.pack(fh, 0, 5, 0, 0, 0, 0) + b"hello", nodeid)
    assert err == 0 and abi.WRITE_OUT.unpack_from(body)[0] == 5
    assert fs.call(Op.FSYNC, abi.FSYNC_IN.pack(fh, 0, 0), nodeid)[0] == 0
    assert fs.call(Op.RELEASE, abi.RELEASE_IN.pack(fh, 0, 0, 0), nodeid)[0] == 0
    st_ = os.lstat(export / "d" / "new")
    assert (st_.st_uid, st_.st_gid, stat.S_IMODE(st_.st_mode)) == (1000, 1000, 0o640)
    assert (export / "d" / "new").read_bytes() == b"hello"
    assert ("create", "/d/new", None, "allow", "ok") in fs.records()
    last = json.loads(fs.trail.read_text().splitlines()[-1])
    assert (last["event"], last["bytes_written"], last["path"]) == ("release", 5, "/d/new")


@root_only
def test_mkdir_mknod_symlink_link_owners(fs: Fs, export: Path) -> None:
    d = fs.lookup(b"d")
    assert fs.call(Op.MKDIR, abi.MKDIR_IN.pack(0o755, 0) + b"sub\0", d, 1000, 100)[0] == 0
    fifo = abi.MKNOD_IN.pack(stat.S_IFIFO | 0o600, 0, 0, 0) + b"fifo\0"
    assert fs.call(Op.MKNOD, fifo, d, 1000, 100)[0] == 0
    mem = abi.MKNOD_IN.pack(stat.S_IFCHR | 0o600, 0x0101, 0, 0) + b"mem\0"
    assert fs.call(Op.MKNOD, mem, d)[0] == errno.EPERM
    assert fs.call(Op.SYMLINK, b"l\0../etc/passwd\0", d, 1000, 100)[0] == 0
    f = fs.lookup(b"f", d)
    err, body = fs.call(Op.LINK, abi.LINK_IN.pack(f) + b"f2\0", d)
    assert err == 0 and abi.ENTRY_OUT_HEAD.unpack_from(body)[0] == f
    assert fs.fs.inodes.get(f).path == b"/d/f"  # its first name, which still exists
    for name, kind in ((b"sub", stat.S_IFDIR), (b"fifo", stat.S_IFIFO), (b"l", stat.S_IFLNK)):
        st_ = os.lstat(export / "d" / os.fsdecode(name))
        assert stat.S_IFMT(st_.st_mode) == kind and (st_.st_uid, st_.st_gid) == (1000, 100)
    assert not (export / "d" / "mem").exists()
    assert os.readlink(export / "d" / "l") == "../etc/passwd"
    assert os.lstat(export / "d" / "f2").st_ino == os.lstat(export / "d" / "f").st_ino
    recs = fs.records()
    assert ("mknod", "/d/mem", None, "allow", "EPERM") in recs
    assert ("link", "/d/f", "/d/f2", "allow", "ok") in recs


def test_unlink_rmdir_are_what_the_guest_called(fs: Fs, export: Path) -> None:
    d = fs.lookup(b"d")
    assert fs.call(Op.MKDIR, abi.MKDIR_IN.pack(0o755, 0) + b"e\0", d)[0] == 0
    assert fs.call(Op.UNLINK, b"e\0", d)[0] == errno.EISDIR
    assert fs.call(Op.RMDIR, b"f\0", d)[0] == errno.ENOTDIR
    assert fs.call(Op.RMDIR, b"e\0", d)[0] == 0
    assert fs.call(Op.UNLINK, b"f\0", d)[0] == 0
    assert sorted(os.listdir(export / "d")) == []


def test_rename_keeps_canonical_paths_true(fs: Fs, export: Path) -> None:
    d = fs.lookup(b"d")
    f = fs.lookup(b"f", d)
    body = abi.RENAME_IN.pack(1) + b"d\0moved\0"
    assert fs.call(Op.RENAME, body, 1)[0] == 0
    assert fs.fs.inodes.get(d).path == b"/moved" and fs.fs.inodes.get(f).path == b"/moved/f"
    assert (export / "moved" / "f").read_bytes() == b"0123456789"
    # The next decision is on the new path: a rename into /etc is a write there.
    body = abi.RENAME_IN.pack(fs.lookup(b"etc")) + b"f\0x\0"
    assert fs.call(Op.RENAME, body, d)[0] == errno.EROFS
    assert ("rename", "/moved/f", "/etc/x", "deny", "EROFS") in fs.records()
    assert fs.call(Op.RENAME2, abi.RENAME2_IN.pack(1, 1, 0) + b"moved\0m2\0", 1)[0] == errno.ENOSYS


def test_denied_writes_change_nothing(fs: Fs, export: Path) -> None:
    etc = fs.lookup(b"etc")
    pw = fs.lookup(b"passwd", etc)
    before = sorted((str(q), q.lstat().st_mode, q.lstat().st_size) for q in export.rglob("*"))
    assert _create(fs, etc, b"shadow")[0] == errno.EROFS
    assert fs.call(Op.MKDIR, abi.MKDIR_IN.pack(0o755, 0) + b"x\0", etc)[0] == errno.EROFS
    assert fs.call(Op.UNLINK, b"passwd\0", etc)[0] == errno.EROFS
    assert fs.call(Op.OPEN, abi.OPEN_IN.pack(os.O_WRONLY, 0), pw)[0] == errno.EROFS
    err, body = fs.call(Op.OPEN, abi.OPEN_IN.pack(os.O_RDONLY, 0), pw)
    assert err == 0
    fh = abi.OPEN_OUT.unpack_from(body)[0]
    # A handle opened for reading cannot be written through (the kernel's EBADF, nothing decided).
    assert fs.call(Op.WRITE, abi.WRITE_IN.pack(fh, 0, 1, 0, 0, 0, 0) + b"x", pw)[0] == errno.EBADF
    sa = abi.SETATTR_IN.pack(abi.FATTR_SIZE, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
    assert fs.call(Op.SETATTR, sa, pw)[0] == errno.EROFS
    assert fs.call(Op.SETXATTR, abi.SETXATTR_IN.pack(1, 0) + b"user.a\0" + b"v", pw)[0] == errno.EROFS
    d = fs.lookup(b"d")
    assert fs.call(Op.MKDIR, abi.MKDIR_IN.pack(0o4755, 0) + b"s\0", d)[0] == errno.EPERM
    assert sorted((str(q), q.lstat().st_mode, q.lstat().st_size) for q in export.rglob("*")) == before


def test_setattr_parts_and_xattrs(fs: Fs, export: Path) -> None:
    d = fs.lookup(b"d")
    f = fs.lookup(b"f", d)
    sa = abi.SETATTR_IN.pack(abi.FATTR_SIZE | abi.FATTR_MODE | abi.FATTR_MTIME, 0, 0, 4, 0, 0, 1234, 0, 0, 0,
                             0, 0o600, 0, 0, 0, 0)
    err, body = fs.call(Op.SETATTR, sa, f)
    assert err == 0
    st_ = os.lstat(export / "d" / "f")
    assert (st_.st_size, stat.S_IMODE(st_.st_mode), int(st_.st_mtime)) == (4, 0o600, 1234)
    assert [r[0] for r in fs.records()][-3:] == ["chmod", "truncate", "utime"]
    assert fs.call(Op.SETXATTR, abi.SETXATTR_IN.pack(3, 0) + b"user.k\0" + b"abc", f)[0] == 0
    err, body = fs.call(Op.GETXATTR, abi.GETXATTR_IN.pack(0, 0) + b"user.k\0", f)
    assert err == 0 and abi.GETXATTR_OUT.unpack_from(body)[0] == 3
    assert fs.call(Op.GETXATTR, abi.GETXATTR_IN.pack(64, 0) + b"user.k\0", f) == (0, b"abc")
    err, body = fs.call(Op.LISTXATTR, abi.GETXATTR_IN.pack(64, 0), f)
    assert err == 0 and b"user.k\0" in body
    assert fs.call(Op.REMOVEXATTR, b"user.k\0", f)[0] == 0
    assert os.listxattr(export / "d" / "f") == []


def test_fallocate_lseek_on_a_handle(fs: Fs, export: Path) -> None:
    d = fs.lookup(b"d")
    f = fs.lookup(b"f", d)
    err, body = fs.call(Op.OPEN, abi.OPEN_IN.pack(os.O_RDWR, 0), f)
    fh = abi.OPEN_OUT.unpack_from(body)[0]
    assert fs.call(Op.FALLOCATE, abi.FALLOCATE_IN.pack(fh, 0, 100, 0, 0), f)[0] == 0
    assert os.lstat(export / "d" / "f").st_size == 100
    err, body = fs.call(Op.LSEEK, abi.LSEEK_IN.pack(fh, 3, os.SEEK_SET, 0), f)
    assert err == 0 and abi.LSEEK_OUT.unpack_from(body)[0] == 3


_names = st.sampled_from([b"a", b"b", b"d", b"f", b"etc", b"passwd", b"x"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(["mkdir", "create", "unlink", "rmdir", "rename", "link",
                                           "symlink", "lookup"]), _names, _names), max_size=25))
def test_paths_stay_true_under_any_sequence(tmp_path_factory: pytest.TempPathFactory,
                                            ops: list[tuple[str, bytes, bytes]]) -> None:
    """Whatever the guest does, each inode's canonical path names that very object, and /etc holds."""
    trail = tmp_path_factory.mktemp("t") / "trail.jsonl"
    export = _make_export(tmp_path_factory.mktemp("e") / "x")
    before = sorted(os.listdir(export / "etc"))
    f = Fs(export, trail)
    try:
        for op, a, b in ops:
            dirs = [1] + [i.nodeid for i in list(f.fs.inodes._by_id.values())
                          if os.path.isdir(os.path.join(export, os.fsdecode(i.path.lstrip(b"/")) or "."))]
            parent = dirs[len(a) % len(dirs)]
            other = dirs[len(b) % len(dirs)]
            if op == "mkdir":
                f.call(Op.MKDIR, abi.MKDIR_IN.pack(0o755, 0) + a + b"\0", parent)
            elif op == "create":
                err, nodeid, fh = _create(f, parent, a)
                if not err:
                    f.call(Op.RELEASE, abi.RELEASE_IN.pack(fh, 0, 0, 0), nodeid)
            elif op == "unlink":
                f.call(Op.UNLINK, a + b"\0", parent)
            elif op == "rmdir":
                f.call(Op.RMDIR, a + b"\0", parent)
            elif op == "rename":
                f.call(Op.RENAME, abi.RENAME_IN.pack(other) + a + b"\0" + b + b"\0", parent)
            elif op == "link":
                target = f.fs.inodes.get(other)
                f.call(Op.LINK, abi.LINK_IN.pack(other) + b + b"\0", parent) if target else None
            elif op == "symlink":
                f.call(Op.SYMLINK, a + b"\0" + b + b"\0", parent)
            else:
                f.call(Op.LOOKUP, a + b"\0", parent)
            for inode in list(f.fs.inodes._by_id.values()):
                if inode.removed:
                    continue
                st_ = os.lstat(os.path.join(export, os.fsdecode(inode.path.lstrip(b"/"))))
                fd_st = os.fstat(inode.fd)
                assert (st_.st_dev, st_.st_ino) == (fd_st.st_dev, fd_st.st_ino), inode
        assert sorted(os.listdir(export / "etc")) == before
    finally:
        f.close()


_hostile_names = st.sampled_from([b"f", b"d", b"out", b"etc", b"passwd", b"n", b".", b"..", b"a/b", b""])
_u64 = st.one_of(st.integers(0, 8), st.sampled_from([2**63 - 1, 2**63, 2**64 - 1]))
_u32 = st.one_of(st.integers(0, 70000), st.sampled_from([2**31, 2**32 - 1]))


@st.composite
def _hostile(draw: st.DrawFn) -> bytes:
    op = draw(st.sampled_from([*list(Op), 0, 99]))
    name = draw(_hostile_names) + b"\0"
    body = draw(st.sampled_from([
        b"",
        name,
        name + draw(_hostile_names) + b"\0",
        abi.MKDIR_IN.pack(draw(st.sampled_from([0o755, 0o4755, 0o20644, 2**32 - 1])), 0) + name,
        abi.MKNOD_IN.pack(draw(st.sampled_from([0o100644, 0o10644, 0o20644, 0o140644])), 0, 0, 0) + name,
        abi.CREATE_IN.pack(draw(st.sampled_from([os.O_WRONLY | os.O_CREAT, os.O_RDWR | os.O_CREAT | os.O_EXCL,
                                                 2**32 - 1])), 0o644, 0, 0) + name,
        abi.OPEN_IN.pack(draw(st.sampled_from([0, os.O_RDWR, os.O_TRUNC | os.O_WRONLY, 2**32 - 1])), 0),
        abi.WRITE_IN.pack(draw(_u64), draw(_u64), 3, 0, 0, 0, 0) + b"xyz",
        abi.RENAME_IN.pack(draw(_u64)) + name + draw(_hostile_names) + b"\0",
        abi.LINK_IN.pack(draw(_u64)) + name,
        abi.SETATTR_IN.pack(draw(st.integers(0, 4095)), 0, draw(_u64), draw(_u64), 0, draw(_u64), draw(_u64),
                            0, 0, 0, 0, draw(_u32), 0, draw(_u32), draw(_u32), 0),
        abi.FALLOCATE_IN.pack(draw(_u64), draw(_u64), draw(_u64), draw(_u32), 0),
        abi.LSEEK_IN.pack(draw(_u64), draw(_u64), draw(st.integers(0, 5)), 0),
        abi.SETXATTR_IN.pack(draw(_u32), draw(_u32)) + b"user.x\0v",
        draw(st.binary(max_size=64)),
    ]))
    nodeid = draw(st.one_of(st.integers(0, 8), st.just(2**64 - 1)))
    uid = draw(st.sampled_from([0, 1000, 2**32 - 1]))
    return abi.IN_HEADER.pack(40 + len(body), op, draw(_u64), nodeid, uid, uid, 1, 0, 0) + body


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(_hostile(), max_size=30))
def test_hostile_requests_get_well_formed_replies_and_stay_inside(tmp_path_factory: pytest.TempPathFactory,
                                                                  reqs: list[bytes]) -> None:
    base = tmp_path_factory.mktemp("h")
    outside = base / "outside"
    outside.mkdir()
    (outside / "victim").write_bytes(b"v")
    export = _make_export(base / "export")
    os.symlink("../outside", export / "out")
    os.symlink("../outside/victim", export / "d" / "out")
    before = sorted((str(q), q.lstat().st_mode, q.lstat().st_size) for q in outside.rglob("*"))
    f = Fs(export, base / "trail.jsonl")
    try:
        for data in reqs:
            opcode = abi.IN_HEADER.unpack_from(data)[1]
            out = f.fs.handle(decode(data))
            if opcode in (Op.FORGET, Op.BATCH_FORGET):
                assert out is None
                continue
            assert out is not None
            length, error, _ = abi.OUT_HEADER.unpack_from(out)
            assert length == len(out) and -4096 < error <= 0
            assert len(f.fs.inodes) <= f.fs.inodes.max_inodes
            assert len(f.fs.handles) <= f.fs.handles.max_handles
    finally:
        f.close()
    after = sorted((str(q), q.lstat().st_mode, q.lstat().st_size) for q in outside.rglob("*"))
    assert after == before
    assert (outside / "victim").read_bytes() == b"v"
