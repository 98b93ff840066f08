"""FUSE requests as Linux 6.1's virtiofs sends them, decoded; replies encoded as it reads them
(gateway/virtiofs/fuse_decode.py, fuse_requests.py, fuse_encode.py), hostile requests included."""

from __future__ import annotations

import errno
import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.virtiofs import fuse_abi as abi
from gateway.virtiofs import fuse_encode as enc
from gateway.virtiofs import fuse_requests as r
from gateway.virtiofs.fuse_abi import Op
from gateway.virtiofs.fuse_decode import SERVED_OPS, Malformed, decode


def frame(op: int, body: bytes = b"", unique: int = 77, nodeid: int = 1, uid: int = 1000, gid: int = 100,
          pid: int = 42, extlen: int = 0, length: int | None = None) -> bytes:
    size = abi.IN_HEADER.size + len(body) if length is None else length
    return abi.IN_HEADER.pack(size, op, unique, nodeid, uid, gid, pid, extlen, 0) + body


def ok(op: int, body: bytes = b"", **kw: int) -> r.Request:
    req = decode(frame(op, body, **kw))
    assert isinstance(req, r.Request), req
    assert req.op == op and req.unique == kw.get("unique", 77)
    return req


def bad(data: bytes) -> Malformed:
    m = decode(data)
    assert isinstance(m, Malformed), m
    return m


# --- every served request ---------------------------------------------------------------------------
def test_init_as_linux_6_1_sends_it() -> None:
    flags = abi.FUSE_ASYNC_READ | abi.FUSE_INIT_EXT | abi.FUSE_MAX_PAGES | abi.FUSE_DO_READDIRPLUS
    req = ok(Op.INIT, abi.INIT_IN.pack(7, 36, 131072, flags, 1))  # flags2 bit 0: SECURITY_CTX
    assert isinstance(req, r.Init)
    assert (req.major, req.minor, req.max_readahead) == (7, 36, 131072)
    assert req.flags == flags | abi.FUSE_SECURITY_CTX
    old = ok(Op.INIT, abi.INIT_IN_COMPAT.pack(7, 31, 0, abi.FUSE_ASYNC_READ))  # pre-7.36: 16 bytes
    assert isinstance(old, r.Init) and old.flags == abi.FUSE_ASYNC_READ


def test_header_fields() -> None:
    req = ok(Op.GETATTR, abi.GETATTR_IN.pack(abi.FUSE_GETATTR_FH, 0, 9), unique=2**64 - 1, nodeid=5,
             uid=0, gid=0)
    assert req.header.nodeid == 5 and req.header.pid == 42 and req.unique == 2**64 - 1
    assert req == r.Getattr(req.header, abi.FUSE_GETATTR_FH, 9)


@pytest.mark.parametrize("op, body, expected", [
    (Op.LOOKUP, b"file\0", lambda h: r.Lookup(h, b"file")),
    (Op.LOOKUP, b"..\0", lambda h: r.Lookup(h, b"..")),  # answered by the file-system layer
    (Op.FORGET, struct.pack("<Q", 3), lambda h: r.Forget(h, 3)),
    (Op.BATCH_FORGET, struct.pack("<II", 2, 0) + struct.pack("<QQQQ", 5, 1, 6, 2),
     lambda h: r.BatchForget(h, ((5, 1), (6, 2)))),
    (Op.SETATTR, abi.SETATTR_IN.pack(abi.FATTR_MODE | abi.FATTR_SIZE, 0, 3, 4096, 0, 1, 2, 3, 4, 5, 6,
                                      0o100600, 0, 1000, 100, 0),
     lambda h: r.Setattr(h, abi.FATTR_MODE | abi.FATTR_SIZE, 3, 4096, 0, 1, 2, 3, 4, 5, 6, 0o100600, 1000,
                         100)),
    (Op.READLINK, b"", lambda h: r.Readlink(h)),
    (Op.SYMLINK, b"link\0../target/x\0", lambda h: r.Symlink(h, b"link", b"../target/x")),
    (Op.MKNOD, abi.MKNOD_IN.pack(0o10644, 0, 0o022, 0) + b"fifo\0",
     lambda h: r.Mknod(h, 0o10644, 0, 0o22, b"fifo")),
    (Op.MKDIR, abi.MKDIR_IN.pack(0o755, 0o022) + b"d\0", lambda h: r.Mkdir(h, 0o755, 0o22, b"d")),
    (Op.UNLINK, b"f\0", lambda h: r.Unlink(h, b"f")),
    (Op.RMDIR, b"d\0", lambda h: r.Rmdir(h, b"d")),
    (Op.RENAME, struct.pack("<Q", 9) + b"a\0b\0", lambda h: r.Rename(h, 9, b"a", b"b")),
    (Op.RENAME2, abi.RENAME2_IN.pack(9, 1, 0) + b"a\0b\0", lambda h: r.Rename2(h, 9, b"a", b"b", 1)),
    (Op.LINK, struct.pack("<Q", 4) + b"hard\0", lambda h: r.Link(h, 4, b"hard")),
    (Op.OPEN, abi.OPEN_IN.pack(os.O_RDWR | os.O_TRUNC, 0), lambda h: r.Open(h, os.O_RDWR | os.O_TRUNC, 0)),
    (Op.OPENDIR, abi.OPEN_IN.pack(os.O_DIRECTORY, 0), lambda h: r.Opendir(h, os.O_DIRECTORY, 0)),
    (Op.READ, abi.READ_IN.pack(3, 4096, 65536, 0, 0, os.O_RDONLY, 0),
     lambda h: r.Read(h, 3, 4096, 65536, 0, 0, 0)),
    (Op.READDIR, abi.READ_IN.pack(3, 0, 4096, 0, 0, 0, 0), lambda h: r.Readdir(h, 3, 0, 4096, 0, 0, 0)),
    (Op.READDIRPLUS, abi.READ_IN.pack(3, 2, 4096, 0, 0, 0, 0),
     lambda h: r.Readdirplus(h, 3, 2, 4096, 0, 0, 0)),
    (Op.STATFS, b"", lambda h: r.Statfs(h)),
    (Op.RELEASE, abi.RELEASE_IN.pack(3, os.O_RDWR, abi.FUSE_RELEASE_FLUSH, 7),
     lambda h: r.Release(h, 3, os.O_RDWR, abi.FUSE_RELEASE_FLUSH, 7)),
    (Op.RELEASEDIR, abi.RELEASE_IN.pack(3, 0, 0, 0), lambda h: r.Releasedir(h, 3, 0, 0, 0)),
    (Op.FSYNC, abi.FSYNC_IN.pack(3, abi.FUSE_FSYNC_FDATASYNC, 0), lambda h: r.Fsync(h, 3, 1)),
    (Op.FSYNCDIR, abi.FSYNC_IN.pack(3, 0, 0), lambda h: r.Fsyncdir(h, 3, 0)),
    (Op.FLUSH, abi.FLUSH_IN.pack(3, 0, 0, 99), lambda h: r.Flush(h, 3, 99)),
    (Op.SETXATTR, abi.SETXATTR_IN.pack(3, 1) + b"user.a\0xyz", lambda h: r.Setxattr(h, 1, b"user.a", b"xyz")),
    (Op.SETXATTR, abi.SETXATTR_IN.pack(0, 0) + b"user.empty\0",
     lambda h: r.Setxattr(h, 0, b"user.empty", b"")),
    (Op.GETXATTR, abi.GETXATTR_IN.pack(0, 0) + b"user.a\0", lambda h: r.Getxattr(h, 0, b"user.a")),
    (Op.LISTXATTR, abi.GETXATTR_IN.pack(4096, 0), lambda h: r.Listxattr(h, 4096)),
    (Op.REMOVEXATTR, b"user.a\0", lambda h: r.Removexattr(h, b"user.a")),
    (Op.ACCESS, abi.ACCESS_IN.pack(os.R_OK | os.W_OK, 0), lambda h: r.Access(h, 6)),
    (Op.CREATE, abi.CREATE_IN.pack(os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o100644, 0o022, 0) + b"new\0",
     lambda h: r.Create(h, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o100644, 0o22, 0, b"new")),
    (Op.FALLOCATE, abi.FALLOCATE_IN.pack(3, 0, 1 << 20, 0, 0), lambda h: r.Fallocate(h, 3, 0, 1 << 20, 0)),
    (Op.LSEEK, abi.LSEEK_IN.pack(3, 100, os.SEEK_DATA, 0), lambda h: r.Lseek(h, 3, 100, os.SEEK_DATA)),
    (Op.DESTROY, b"", lambda h: r.Destroy(h)),
])
def test_each_request(op: Op, body: bytes, expected) -> None:  # type: ignore[no-untyped-def]
    req = ok(op, body)
    assert req == expected(req.header)
    assert type(req) in r.RULES_OPS  # every request has its place in the rules mapping


def test_write_carries_its_data() -> None:
    req = ok(Op.WRITE, abi.WRITE_IN.pack(3, 10, 5, 0, 0, 0, 0) + b"hello")
    assert isinstance(req, r.Write) and bytes(req.data) == b"hello" and req.offset == 10


def test_the_header_length_bounds_the_body() -> None:
    """Bytes beyond fuse_in_header.len (a chain's spare readable room) are not part of the request."""
    data = frame(Op.UNLINK, b"f\0", length=abi.IN_HEADER.size + 2) + b"garbage"
    req = decode(data)
    assert isinstance(req, r.Unlink) and req.name == b"f"


def test_every_required_opcode_is_served() -> None:
    required = {"INIT", "LOOKUP", "FORGET", "BATCH_FORGET", "GETATTR", "SETATTR", "READLINK", "SYMLINK",
                "MKNOD", "MKDIR", "UNLINK", "RMDIR", "RENAME", "RENAME2", "LINK", "OPEN", "READ", "WRITE",
                "STATFS", "RELEASE", "FSYNC", "FLUSH", "SETXATTR", "GETXATTR", "LISTXATTR", "REMOVEXATTR",
                "OPENDIR", "READDIR", "READDIRPLUS", "RELEASEDIR", "FSYNCDIR", "ACCESS", "CREATE",
                "FALLOCATE", "LSEEK", "DESTROY"}
    assert {op.name for op in SERVED_OPS} == required
    assert set(r.RULES_OPS) >= {type(ok(Op.STATFS))}


# --- hostile requests --------------------------------------------------------------------------------
@pytest.mark.parametrize("n", range(abi.IN_HEADER.size))
def test_truncated_headers_are_eio(n: int) -> None:
    m = bad(frame(Op.GETATTR, unique=0x1122334455667788)[:n])
    assert m.errno == errno.EIO and m.reply
    assert m.unique == (0x1122334455667788 if n >= 16 else 0)


def test_header_length_lies_are_eio() -> None:
    assert bad(frame(Op.LOOKUP, b"x\0", length=abi.IN_HEADER.size + 3)).errno == errno.EIO  # beyond
    assert bad(frame(Op.LOOKUP, b"x\0", length=12)).errno == errno.EIO  # below the header
    assert bad(frame(Op.STATFS, length=2**32 - 1)).errno == errno.EIO


@pytest.mark.parametrize("opcode", [0, 7, 19, Op.GETLK, Op.SETLK, Op.SETLKW, Op.INTERRUPT, Op.BMAP, Op.IOCTL,
                                    Op.POLL, Op.NOTIFY_REPLY, Op.COPY_FILE_RANGE, Op.SETUPMAPPING,
                                    Op.REMOVEMAPPING, Op.SYNCFS, 51, 4096, 2**32 - 1])
def test_unknown_opcodes_are_enosys(opcode: int) -> None:
    m = bad(frame(opcode, b"\0" * 64))
    assert m.errno == errno.ENOSYS and m.reply and m.unique == 77


@pytest.mark.parametrize("op, body", [
    (Op.LOOKUP, b"noterminator"),
    (Op.UNLINK, b""),
    (Op.SYMLINK, b"link\0target-without-nul"),
    (Op.SYMLINK, b"link-without-nul"),
    (Op.MKDIR, abi.MKDIR_IN.pack(0o755, 0) + b"d"),
    (Op.RENAME, struct.pack("<Q", 1) + b"a\0b"),
    (Op.LINK, struct.pack("<Q", 1) + b"x"),
    (Op.CREATE, abi.CREATE_IN.pack(0, 0o644, 0, 0) + b"f"),
    (Op.SETXATTR, abi.SETXATTR_IN.pack(1, 0) + b"user.a"),
    (Op.GETXATTR, abi.GETXATTR_IN.pack(0, 0) + b"user.a"),
    (Op.REMOVEXATTR, b"user.a"),
])
def test_names_without_a_nul_are_einval(op: Op, body: bytes) -> None:
    assert bad(frame(op, body)).errno == errno.EINVAL


@pytest.mark.parametrize("op, body, err", [
    (Op.LOOKUP, b"\0", errno.EINVAL),  # empty
    (Op.LOOKUP, b"a/b\0", errno.EINVAL),  # more than one component
    (Op.MKDIR, abi.MKDIR_IN.pack(0o755, 0) + b"..\0", errno.EINVAL),
    (Op.UNLINK, b".\0", errno.EINVAL),
    (Op.RENAME, struct.pack("<Q", 1) + b"a\0../b\0", errno.EINVAL),
    (Op.CREATE, abi.CREATE_IN.pack(0, 0o644, 0, 0) + b"x" * 256 + b"\0", errno.ENAMETOOLONG),
    (Op.LOOKUP, b"x" * 255 + b"\0", None),  # NAME_MAX itself is fine
    (Op.SYMLINK, b"l\0\0", errno.ENOENT),  # empty target, as symlink(2) says
    (Op.SYMLINK, b"l\0" + b"t" * 4096 + b"\0", errno.ENAMETOOLONG),
    (Op.SETXATTR, abi.SETXATTR_IN.pack(10, 0) + b"user.a\0short", errno.EINVAL),  # value < size
    (Op.SETXATTR, abi.SETXATTR_IN.pack(70000, 0) + b"user.a\0", errno.E2BIG),
    (Op.GETXATTR, abi.GETXATTR_IN.pack(0, 0) + b"\0", errno.EINVAL),
    (Op.WRITE, abi.WRITE_IN.pack(3, 0, 100, 0, 0, 0, 0) + b"short", errno.EINVAL),
    (Op.BATCH_FORGET, struct.pack("<II", 2**32 - 1, 0) + b"\0" * 16, errno.EINVAL),
])
def test_bad_names_and_sizes(op: Op, body: bytes, err: int | None) -> None:
    out = decode(frame(op, body))
    if err is None:
        assert isinstance(out, r.Request)
    else:
        assert isinstance(out, Malformed) and out.errno == err, out


_FIXED = {Op.INIT: 16, Op.FORGET: 8, Op.BATCH_FORGET: 8, Op.GETATTR: 16, Op.SETATTR: 88, Op.MKNOD: 16,
          Op.MKDIR: 8, Op.RENAME: 8, Op.RENAME2: 16, Op.LINK: 8, Op.OPEN: 8, Op.OPENDIR: 8, Op.READ: 40,
          Op.READDIR: 40, Op.READDIRPLUS: 40, Op.WRITE: 40, Op.RELEASE: 24, Op.RELEASEDIR: 24, Op.FSYNC: 16,
          Op.FSYNCDIR: 16, Op.FLUSH: 24, Op.SETXATTR: 8, Op.GETXATTR: 8, Op.LISTXATTR: 8, Op.ACCESS: 8,
          Op.CREATE: 16, Op.FALLOCATE: 32, Op.LSEEK: 24}


@pytest.mark.parametrize("op", sorted(_FIXED))
def test_truncated_structs_are_einval(op: Op) -> None:
    for n in range(_FIXED[op]):
        m = bad(frame(op, b"\xff" * n))
        assert m.errno == errno.EINVAL
        assert m.reply is (op not in abi.NO_REPLY)  # a FORGET gets no reply, even a broken one


def test_extensions_that_were_not_negotiated_are_einval() -> None:
    assert bad(frame(Op.LOOKUP, b"a\0" + b"\0" * 6, extlen=1)).errno == errno.EINVAL


_opcodes = st.one_of(st.sampled_from([int(o) for o in Op]), st.integers(0, 2**32 - 1))


@settings(max_examples=1500, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_decode_to_a_request_or_an_error(data: bytes) -> None:
    out = decode(data)
    assert isinstance(out, r.Request | Malformed)
    if isinstance(out, Malformed):
        assert 0 < out.errno < 4096


@settings(max_examples=3000, deadline=None)
@given(_opcodes, st.binary(max_size=300), st.integers(0, 400), st.integers(0, 3))
def test_any_request_shaped_bytes_decode_or_fail_cleanly(opcode: int, body: bytes, length: int,
                                                         extlen: int) -> None:
    for data in (frame(opcode, body, extlen=extlen), frame(opcode, body, length=length)):
        out = decode(data)
        assert isinstance(out, r.Request | Malformed)
        if isinstance(out, r.Request):
            assert out.header.opcode == opcode and out.header.len <= len(data)
            for field in ("name", "oldname", "newname"):
                name = getattr(out, field, None)
                if name is not None:
                    assert name and b"/" not in name and b"\0" not in name and len(name) <= abi.NAME_MAX
        else:
            reply = enc.reply_error(out.unique, out.errno)
            assert abi.OUT_HEADER.unpack(reply) == (16, -out.errno, out.unique)


# --- replies -------------------------------------------------------------------------------------------
def test_reply_layouts_have_the_kernels_sizes() -> None:
    attr = enc.Attr(1, 2, 3, 4, 5, 6, 7, 8, 9, 0o100644, 1, 1000, 100, 0, 4096)
    assert len(attr.pack()) == 88
    assert len(enc.entry_out(2, 0, attr)) == 128  # fuse_entry_out
    assert len(enc.attr_out(attr)) == 104  # fuse_attr_out
    assert len(enc.open_out(1)) == 16
    assert len(enc.create_out(2, 0, attr, 5)) == 144
    assert len(enc.write_out(5)) == 8
    assert len(enc.statfs_out(os.statvfs("/"))) == 80  # fuse_statfs_out
    assert len(enc.getxattr_size_out(3)) == 8 and len(enc.lseek_out(3)) == 8
    out = enc.reply(9, enc.write_out(5))
    assert abi.OUT_HEADER.unpack_from(out) == (24, 0, 9)
    assert enc.reply_error(9, errno.ENOENT) == abi.OUT_HEADER.pack(16, -errno.ENOENT, 9)
    assert abi.OUT_HEADER.unpack(enc.reply_error(9, 0)) == (16, -errno.EIO, 9)  # never "success"


def test_timeouts_split_into_seconds_and_nanoseconds() -> None:
    attr = enc.Attr(1, 0, 0, 0, 0, 0, 0, 0, 0, 0o40755, 2, 0, 0, 0, 4096)
    head = abi.ENTRY_OUT_HEAD.unpack_from(enc.entry_out(5, 1, attr, entry_timeout=1.5, attr_timeout=2.25))
    assert head == (5, 1, 1, 2, 500_000_000, 250_000_000)


def test_attr_from_a_real_stat(tmp_path) -> None:  # type: ignore[no-untyped-def]
    f = tmp_path / "f"
    f.write_bytes(b"abc")
    st = os.lstat(f)
    a = enc.attr_from_stat(st, ino=42)
    assert (a.ino, a.size, a.mode, a.uid, a.nlink) == (42, 3, st.st_mode, st.st_uid, 1)
    assert a.mtime == int(st.st_mtime) and a.mtimensec == st.st_mtime_ns % 10**9
    assert enc.encode_dev(os.makedev(8, 1)) == 0x801
    assert enc.encode_dev(os.makedev(259, 0x12345)) == (0x45 | 259 << 8 | 0x12300 << 12) & 0xFFFFFFFF


def test_dirents_are_aligned_and_bounded() -> None:
    buf = enc.DirentBuffer(64)
    assert buf.add(1, 1, enc.dirent_type(0o40755), b".")  # 24 + 1 -> 32
    assert buf.add(2, 2, enc.dirent_type(0o100644), b"file")  # 24 + 4 -> 32
    assert not buf.add(3, 3, 8, b"x")  # would need 96
    body = buf.body()
    assert len(body) == 64
    assert abi.DIRENT_HEAD.unpack_from(body, 32) == (2, 2, 4, 8)  # DT_REG
    assert body[32 + 24:32 + 28] == b"file" and body[60:64] == b"\0" * 4
    attr = enc.Attr(2, 0, 0, 0, 0, 0, 0, 0, 0, 0o100644, 1, 0, 0, 0, 4096)
    plus = enc.DirentBuffer(4096)
    assert plus.add_plus(enc.entry_out(2, 0, attr), 2, 1, 8, b"file")
    assert len(plus.body()) == 128 + 32


def _init(major: int, minor: int, flags: int) -> r.Init:
    req = decode(frame(Op.INIT, abi.INIT_IN.pack(major, minor, 65536, flags & 0xFFFFFFFF, flags >> 32)))
    assert isinstance(req, r.Init)
    return req


def test_init_negotiation() -> None:
    offered = (abi.FUSE_ASYNC_READ | abi.FUSE_WRITEBACK_CACHE | abi.FUSE_POSIX_ACL | abi.FUSE_MAX_PAGES
               | abi.FUSE_DO_READDIRPLUS | abi.FUSE_INIT_EXT | abi.FUSE_SECURITY_CTX)
    out = enc.negotiate_init(_init(7, 36, offered))
    assert out.ok and out.minor == 36
    assert out.flags == abi.FUSE_ASYNC_READ | abi.FUSE_MAX_PAGES | abi.FUSE_DO_READDIRPLUS | abi.FUSE_INIT_EXT
    head = abi.OUT_HEADER.unpack_from(out.data)
    assert head == (16 + 64, 0, 77)
    fields = abi.INIT_OUT.unpack_from(out.data, 16)
    assert fields[:4] == (7, 36, 65536, out.flags) and fields[6] == 1 << 20 and fields[8] == 256
    assert enc.negotiate_init(_init(7, 38, 0)).minor == 36  # a newer minor: ours
    newer = enc.negotiate_init(_init(8, 0, 0))  # a newer major: our major alone, the kernel retries
    assert not newer.ok and abi.INIT_OUT.unpack_from(newer.data, 16)[:2] == (7, 36)
    for major, minor in ((7, 30), (6, 99)):
        old = enc.negotiate_init(_init(major, minor, 0))
        assert not old.ok and abi.OUT_HEADER.unpack(old.data) == (16, -errno.EPROTO, 77)
