"""The sans-IO protocol core, driven with byte strings only."""

from __future__ import annotations

import errno
import os
import struct

import pytest

from gateway import protocol as p

SAMPLES: list[p.Request] = [
    p.Open(b"/a/b", os.O_RDWR | os.O_TRUNC),
    p.Create(b"/new", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644, 1000, 1001),
    p.Mknod(0, 0, b"/dev/null2", 0o20666, os.makedev(1, 3)),
    p.Mkdir(1000, 1000, b"/d", 0o2755),
    p.Symlink(1000, 1000, b"../target", b"/link"),
    p.Link(b"/old", b"/new"),
    p.Lstat(b"/"),
    p.Readlink(b"/link", 4096),
    p.Statfs(b"/"),
    p.Chmod(b"/f", 0o4755),
    p.Chown(b"/f", 0xFFFFFFFF, 50),
    p.Truncate(b"/f", 1 << 40),
    p.Utime(b"/f", 1, (1 << 30) - 1, 3, (1 << 30) - 2),
    p.Rename(b"/a", b"/b"),
    p.Remove(b"/a"),
    p.Lgetxattr(0, b"/f", b"user.k"),
    p.Llistxattr(128, b"/f"),
    p.Lsetxattr(b"/f", b"user.k", b"v\0with nul", 10, 1),
    p.Lremovexattr(b"/f", b"user.k"),
    p.Getversion(b"/f"),
]


def test_every_request_type_has_a_sample() -> None:
    assert {r.type for r in SAMPLES} == set(p.RequestType)


@pytest.mark.parametrize("request_", SAMPLES, ids=lambda r: r.type.name)
@pytest.mark.parametrize("nul", [False, True], ids=["plain", "qemu-nul"])
def test_round_trip(request_: p.Request, nul: bool) -> None:
    data = p.encode_request(request_, nul=nul)
    rtype, size = p.HEADER.unpack_from(data)
    assert rtype == request_.type and size == len(data) - 8
    d = p.Decoder()
    d.feed(data)
    assert d.next_event() == request_
    assert d.next_event() is p.NEED_DATA


def test_wire_bytes_of_an_open_are_as_the_spec_says() -> None:
    data = p.encode_request(p.Open(b"/", 2), nul=True)
    # type 2, size 8: u16 length 2 counting QEMU's NUL, "/\0", then flags.
    assert data == struct.pack("<II", 2, 8) + b"\x02\x00/\x00" + struct.pack("<i", 2)


def test_nul_inside_a_path_ends_it_but_not_inside_an_xattr_value() -> None:
    payload = b"\x09\x00file\0junk" + struct.pack("<i", 0)
    d = p.Decoder()
    d.feed(p.HEADER.pack(2, len(payload)) + payload)
    assert d.next_event() == p.Open(b"file", 0)
    req = p.Lsetxattr(b"/f", b"user.a", b"a\0b", 3, 0)
    d.feed(p.encode_request(req, nul=True))
    assert d.next_event() == req


def test_frames_split_at_every_byte_boundary() -> None:
    stream = b"".join(p.encode_request(r, nul=True) for r in SAMPLES)
    d = p.Decoder()
    got = []
    for i in range(len(stream)):
        d.feed(stream[i : i + 1])
        while not isinstance(ev := d.next_event(), p.NeedData):
            got.append(ev)
    assert got == SAMPLES


def test_back_to_back_frames_in_one_feed() -> None:
    d = p.Decoder()
    d.feed(p.encode_request(SAMPLES[6]) + p.encode_request(SAMPLES[8]))
    assert d.next_event() == SAMPLES[6]
    assert d.next_event() == SAMPLES[8]
    assert d.next_event() is p.NEED_DATA


def test_trailing_extra_bytes_are_ignored() -> None:
    payload = p.encode_request(p.Lstat(b"/x"))[8:] + b"extra"
    d = p.Decoder()
    d.feed(p.HEADER.pack(8, len(payload)) + payload)
    assert d.next_event() == p.Lstat(b"/x")


@pytest.mark.parametrize(
    ("rtype", "payload"),
    [
        (p.RequestType.LSTAT, b""),  # empty payload
        (p.RequestType.LSTAT, b"\x01"),  # half a length
        (p.RequestType.LSTAT, b"\x10\x00abc"),  # string longer than what is left
        (p.RequestType.OPEN, b"\x02\x00/\x00"),  # missing flags
        (p.RequestType.CREATE, b"\x01\x00/" + b"\0" * 12),  # missing gid
        (p.RequestType.UTIME, b"\x01\x00/" + b"\0" * 31),  # one byte short of four u64
        (p.RequestType.LSETXATTR, b"\x01\x00/\x01\x00n"),
    ],
)
def test_short_payload_is_malformed_not_fatal(rtype: p.RequestType, payload: bytes) -> None:
    d = p.Decoder()
    d.feed(p.HEADER.pack(rtype, len(payload)) + payload + p.encode_request(p.Lstat(b"/next")))
    assert d.next_event() == p.Malformed(rtype, len(payload))
    assert d.next_event() == p.Lstat(b"/next")  # and the stream goes on


@pytest.mark.parametrize("rtype", [0, 1, 22, 255, 0xFFFFFFFF])
def test_unknown_type_with_sane_size(rtype: int) -> None:
    d = p.Decoder()
    d.feed(p.HEADER.pack(rtype, 3) + b"abc" + p.encode_request(p.Lstat(b"/")))
    assert d.next_event() == p.Unknown(rtype, 3)
    assert d.next_event() == p.Lstat(b"/")


def test_oversized_size_is_fatal_and_stays_fatal() -> None:
    d = p.Decoder()
    d.feed(p.HEADER.pack(8, p.MAX_PAYLOAD + 1))
    ev = d.next_event()
    assert isinstance(ev, p.Fatal) and "exceeds" in ev.reason
    d.feed(p.encode_request(p.Lstat(b"/")))
    assert d.next_event() == ev


def test_exactly_64k_is_allowed() -> None:
    payload = p.encode_request(p.Lstat(b"/"))[8:]
    payload += b"\0" * (p.MAX_PAYLOAD - len(payload))
    d = p.Decoder()
    d.feed(p.HEADER.pack(8, p.MAX_PAYLOAD) + payload)
    assert d.next_event() == p.Lstat(b"/")


@pytest.mark.parametrize("cut", [1, 4, 7, 8, 12])
def test_eof_inside_a_frame_is_fatal(cut: int) -> None:
    d = p.Decoder()
    d.feed(p.encode_request(p.Lstat(b"/abcdef"))[:cut])
    assert d.next_event() is p.NEED_DATA
    d.feed_eof()
    assert isinstance(d.next_event(), p.Fatal)


def test_eof_between_frames_is_a_clean_close() -> None:
    d = p.Decoder()
    d.feed(p.encode_request(p.Lstat(b"/")))
    d.feed(b"")
    assert d.next_event() == p.Lstat(b"/")
    assert d.next_event() is p.CLOSED


def test_reply_shapes() -> None:
    assert p.reply_shape(p.RequestType.OPEN) is p.ReplyShape.FD
    assert p.reply_shape(p.RequestType.CREATE) is p.ReplyShape.FD
    for t in [
        "MKNOD",
        "MKDIR",
        "SYMLINK",
        "LINK",
        "CHMOD",
        "CHOWN",
        "TRUNCATE",
        "UTIME",
        "RENAME",
        "REMOVE",
        "LSETXATTR",
        "LREMOVEXATTR",
    ]:
        assert p.reply_shape(p.RequestType[t]) is p.ReplyShape.STATUS
    for t in ["LSTAT", "STATFS", "READLINK", "LGETXATTR", "LLISTXATTR", "GETVERSION"]:
        assert p.reply_shape(p.RequestType[t]) is p.ReplyShape.PAYLOAD


def test_reply_encodings() -> None:
    assert p.encode_fd_reply(0) == struct.pack("<i", 0x7FFFFFFF)
    assert p.encode_fd_reply(errno.ENOENT) == struct.pack("<i", -errno.ENOENT)
    assert p.encode_status(0) == struct.pack("<IIi", 0, 4, 0)
    assert p.encode_status(errno.EPERM) == struct.pack("<IIi", 1, 4, -errno.EPERM)
    assert p.encode_payload(b"abc") == struct.pack("<II", 0, 3) + b"abc"
    assert p.encode_payload(b"x" * (p.MAX_PAYLOAD + 1)) == p.encode_status(errno.ENOBUFS)
    assert p.encode_error(p.RequestType.OPEN, errno.ENOBUFS) == struct.pack("<i", -errno.ENOBUFS)
    assert p.encode_error(p.RequestType.LSTAT, errno.ENOBUFS) == struct.pack("<IIi", 1, 4, -errno.ENOBUFS)
    assert p.encode_error(p.RequestType.CHMOD, errno.ENOBUFS) == struct.pack("<IIi", 1, 4, -errno.ENOBUFS)


def test_stat_and_statfs_payloads_round_trip() -> None:
    st = os.stat("/")
    payload = p.stat_payload(st)
    assert len(payload) == 116  # what the reference sends: qqqdddqqqqqqqqqq, no padding
    parsed = p.parse_stat(payload)
    assert (parsed.ino, parsed.mode, parsed.size) == (st.st_ino, st.st_mode, st.st_size)
    assert parsed.mtime_sec * 10**9 + parsed.mtime_nsec == st.st_mtime_ns
    fields = tuple(range(11))
    assert len(p.statfs_payload(fields)) == 88
    assert p.parse_statfs(p.statfs_payload(fields)).frsize == 10
    assert p.parse_string(p.string_payload(b"target")) == b"target"
    assert p.parse_u64(p.u64_payload(-1)) == 0xFFFFFFFFFFFFFFFF
