"""The 9p proxy wire protocol, sans I/O.

Bytes go in through :meth:`Decoder.feed`, typed events come out of :meth:`Decoder.next_event`;
replies are built by the ``encode_*`` functions. Nothing here touches a socket, a file or a policy, so
tests drive it with byte strings (the model is h11).

Framing (spec/PROXY-PROTOCOL.md): ``u32 type, u32 size, size bytes``, native (little-endian) order.
Strings are ``u16 length`` + bytes; QEMU counts a trailing NUL in that length, and a NUL inside a path
ends it. A payload too short for its fields is a :class:`Malformed` event (answered ENOBUFS in the
request's reply shape, as the reference does); an unknown type with a sane size is :class:`Unknown`
(answered EOPNOTSUPP); an oversized size or EOF inside a frame is :class:`Fatal` (close the connection).
"""

from __future__ import annotations

import enum
import errno
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

HEADER = struct.Struct("<II")
HEADER_SIZE = HEADER.size
MAX_PAYLOAD = 65536  # PROXY_MAX_IO_SZ: a larger size field is fatal, as in the reference
FD_VALID = 0x7FFFFFFF  # V9FS_FD_VALID: the OPEN/CREATE success marker that travels with SCM_RIGHTS
T_SUCCESS = 0
T_ERROR = 1

_I32 = struct.Struct("<i")
_U16 = struct.Struct("<H")
_STAT = struct.Struct("<QQQIIIQQQQQQQQQQ")  # qqqdddqqqqqqqqqq: 116 bytes, packed without padding
_STATFS = struct.Struct("<11Q")
_Q = struct.Struct("<Q")


class RequestType(enum.IntEnum):
    OPEN = 2
    CREATE = 3
    MKNOD = 4
    MKDIR = 5
    SYMLINK = 6
    LINK = 7
    LSTAT = 8
    READLINK = 9
    STATFS = 10
    CHMOD = 11
    CHOWN = 12
    TRUNCATE = 13
    UTIME = 14
    RENAME = 15
    REMOVE = 16
    LGETXATTR = 17
    LLISTXATTR = 18
    LSETXATTR = 19
    LREMOVEXATTR = 20
    GETVERSION = 21


class ReplyShape(enum.Enum):
    """The three reply shapes; which one a request gets depends only on its type."""

    FD = "fd"  # OPEN, CREATE: a bare i32 (FD_VALID or -errno), the fd over SCM_RIGHTS
    STATUS = "status"  # header {0|1, 4} + i32 status
    PAYLOAD = "payload"  # header {0, n} + payload, or header {1, 4} + i32 -errno


_FD_TYPES = {RequestType.OPEN, RequestType.CREATE}
_PAYLOAD_TYPES = {
    RequestType.LSTAT,
    RequestType.STATFS,
    RequestType.READLINK,
    RequestType.LGETXATTR,
    RequestType.LLISTXATTR,
    RequestType.GETVERSION,
}


def reply_shape(rtype: int) -> ReplyShape:
    if rtype in _FD_TYPES:
        return ReplyShape.FD
    if rtype in _PAYLOAD_TYPES:
        return ReplyShape.PAYLOAD
    return ReplyShape.STATUS


# ---------------------------------------------------------------------------------------------------------
# Requests: one small frozen class per type. Paths are bytes, already cut at their first NUL.


@dataclass(frozen=True, slots=True)
class Open:
    path: bytes
    flags: int
    type: RequestType = field(default=RequestType.OPEN, init=False, repr=False)


@dataclass(frozen=True, slots=True)
class Create:
    path: bytes
    flags: int
    mode: int
    uid: int
    gid: int
    type: RequestType = field(default=RequestType.CREATE, init=False, repr=False)


@dataclass(frozen=True, slots=True)
class Mknod:
    uid: int
    gid: int
    path: bytes
    mode: int
    rdev: int
    type: RequestType = field(default=RequestType.MKNOD, init=False, repr=False)


@dataclass(frozen=True, slots=True)
class Mkdir:
    uid: int
    gid: int
    path: bytes
    mode: int
    type: RequestType = field(default=RequestType.MKDIR, init=False, repr=False)


@dataclass(frozen=True, slots=True)
class Symlink:
    uid: int
    gid: int
    target: bytes
    path: bytes
    type: RequestType = field(default=RequestType.SYMLINK, init=False, repr=False)


@dataclass(frozen=True, slots=True)
class Link:
    path: bytes  # the existing object (oldpath)
    path2: bytes  # the new name (newpath)
    type: RequestType = field(default=RequestType.LINK, init=False, repr=False)


@dataclass(frozen=True, slots=True)
class Lstat:
    path: bytes
    type: RequestType = field(default=RequestType.LSTAT, init=False, repr=False)


@dataclass(frozen=True, slots=True)
class Readlink:
    path: bytes
    bufsize: int
    type: RequestType = field(default=RequestType.READLINK, init=False, repr=False)


@dataclass(frozen=True, slots=True)
class Statfs:
    path: bytes
    type: RequestType = field(default=RequestType.STATFS, init=False, repr=False)


@dataclass(frozen=True, slots=True)
class Chmod:
    path: bytes
    mode: int
    type: RequestType = field(default=RequestType.CHMOD, init=False, repr=False)


@dataclass(frozen=True, slots=True)
class Chown:
    path: bytes
    uid: int
    gid: int
    type: RequestType = field(default=RequestType.CHOWN, init=False, repr=False)


@dataclass(frozen=True, slots=True)
class Truncate:
    path: bytes
    length: int
    type: RequestType = field(default=RequestType.TRUNCATE, init=False, repr=False)


@dataclass(frozen=True, slots=True)
class Utime:
    path: bytes
    atime_sec: int
    atime_nsec: int
    mtime_sec: int
    mtime_nsec: int
    type: RequestType = field(default=RequestType.UTIME, init=False, repr=False)


@dataclass(frozen=True, slots=True)
class Rename:
    path: bytes  # oldpath
    path2: bytes  # newpath
    type: RequestType = field(default=RequestType.RENAME, init=False, repr=False)


@dataclass(frozen=True, slots=True)
class Remove:
    path: bytes
    type: RequestType = field(default=RequestType.REMOVE, init=False, repr=False)


@dataclass(frozen=True, slots=True)
class Lgetxattr:
    size: int
    path: bytes
    name: bytes
    type: RequestType = field(default=RequestType.LGETXATTR, init=False, repr=False)


@dataclass(frozen=True, slots=True)
class Llistxattr:
    size: int
    path: bytes
    type: RequestType = field(default=RequestType.LLISTXATTR, init=False, repr=False)


@dataclass(frozen=True, slots=True)
class Lsetxattr:
    path: bytes
    name: bytes
    value: bytes  # raw: a value is binary and may hold NULs
    size: int
    flags: int
    type: RequestType = field(default=RequestType.LSETXATTR, init=False, repr=False)


@dataclass(frozen=True, slots=True)
class Lremovexattr:
    path: bytes
    name: bytes
    type: RequestType = field(default=RequestType.LREMOVEXATTR, init=False, repr=False)


@dataclass(frozen=True, slots=True)
class Getversion:
    path: bytes
    type: RequestType = field(default=RequestType.GETVERSION, init=False, repr=False)


Request = (
    Open | Create | Mknod | Mkdir | Symlink | Link | Lstat | Readlink | Statfs | Chmod | Chown | Truncate
    | Utime | Rename | Remove | Lgetxattr | Llistxattr | Lsetxattr | Lremovexattr | Getversion
)

# Field codes per type, in wire order: d = i32 (flags, sizes), u = u32 (mode, uid, gid), q = u64,
# p = path string (cut at NUL), s = raw string. The order matches the request classes' fields.
LAYOUTS: dict[RequestType, tuple[type, str]] = {
    RequestType.OPEN: (Open, "pd"),
    RequestType.CREATE: (Create, "pduuu"),
    RequestType.MKNOD: (Mknod, "uupuq"),
    RequestType.MKDIR: (Mkdir, "uupu"),
    RequestType.SYMLINK: (Symlink, "uupp"),
    RequestType.LINK: (Link, "pp"),
    RequestType.LSTAT: (Lstat, "p"),
    RequestType.READLINK: (Readlink, "pd"),
    RequestType.STATFS: (Statfs, "p"),
    RequestType.CHMOD: (Chmod, "pu"),
    RequestType.CHOWN: (Chown, "puu"),
    RequestType.TRUNCATE: (Truncate, "pq"),
    RequestType.UTIME: (Utime, "pqqqq"),
    RequestType.RENAME: (Rename, "pp"),
    RequestType.REMOVE: (Remove, "p"),
    RequestType.LGETXATTR: (Lgetxattr, "dpp"),
    RequestType.LLISTXATTR: (Llistxattr, "dp"),
    RequestType.LSETXATTR: (Lsetxattr, "ppsdd"),
    RequestType.LREMOVEXATTR: (Lremovexattr, "pp"),
    RequestType.GETVERSION: (Getversion, "p"),
}


class ShortPayload(Exception):
    """The payload ended before its fields did."""


def _unpack_fields(codes: str, buf: bytes | memoryview, pos: int, end: int) -> list[object]:
    values: list[object] = []
    for code in codes:
        if code in "ps":
            if pos + 2 > end:
                raise ShortPayload
            (length,) = _U16.unpack_from(buf, pos)
            pos += 2
            if pos + length > end:
                raise ShortPayload
            raw = bytes(buf[pos : pos + length])
            pos += length
            if code == "p":
                nul = raw.find(b"\0")
                if nul >= 0:
                    raw = raw[:nul]
            values.append(raw)
        elif code == "q":
            if pos + 8 > end:
                raise ShortPayload
            values.append(_Q.unpack_from(buf, pos)[0])
            pos += 8
        else:
            if pos + 4 > end:
                raise ShortPayload
            value = int.from_bytes(buf[pos : pos + 4], "little", signed=(code == "d"))
            values.append(value)
            pos += 4
    return values


_FIXED_CODES = {"d": "i", "u": "I", "q": "Q"}


def _compile_parser(cls: type, codes: str) -> Callable[[bytearray, int, int], Request]:
    """The decoder's parser for one layout: the same result as ``cls(*_unpack_fields(codes, buf, pos, end))``
    (and ShortPayload in the same cases), without the per-field loop for the common shape, a path then
    fixed-size fields (LSTAT, OPEN, CREATE, CHMOD, REMOVE, UTIME, ...). ``buf`` is the decoder's bytearray."""
    if codes[0] != "p" or "p" in codes[1:] or "s" in codes[1:]:

        def parse_generic(buf: bytearray, pos: int, end: int) -> Request:
            return cls(*_unpack_fields(codes, buf, pos, end))  # type: ignore[no-any-return]

        return parse_generic
    tail = struct.Struct("<" + "".join(_FIXED_CODES[c] for c in codes[1:]))
    tail_size = tail.size
    unpack_tail = tail.unpack_from

    def parse_path_then_fixed(buf: bytearray, pos: int, end: int) -> Request:
        if pos + 2 > end:
            raise ShortPayload
        start = pos + 2
        stop = start + (buf[pos] | buf[pos + 1] << 8)
        if stop > end:
            raise ShortPayload
        nul = buf.find(0, start, stop)  # a NUL ends the path
        path = bytes(buf[start : stop if nul < 0 else nul])
        if tail_size == 0:
            return cls(path)  # type: ignore[no-any-return]
        if stop + tail_size > end:
            raise ShortPayload
        return cls(path, *unpack_tail(buf, stop))  # type: ignore[no-any-return]

    return parse_path_then_fixed


_PARSERS: dict[int, Callable[[bytearray, int, int], Request]] = {
    int(rtype): _compile_parser(cls, codes) for rtype, (cls, codes) in LAYOUTS.items()
}


def decode_request(rtype: RequestType, payload: bytes | memoryview) -> Request:
    """Decode one payload of a known type; raises ShortPayload when it is too short."""
    cls, codes = LAYOUTS[rtype]
    return cls(*_unpack_fields(codes, payload, 0, len(payload)))


def _pack_fields(codes: str, values: list[object]) -> bytes:
    out = bytearray()
    for code, value in zip(codes, values, strict=True):
        if code in "ps":
            assert isinstance(value, bytes)
            out += _U16.pack(len(value)) + value
        elif code == "q":
            out += _Q.pack(int(value) & 0xFFFFFFFFFFFFFFFF)  # type: ignore[call-overload]
        else:
            out += struct.pack("<I", int(value) & 0xFFFFFFFF)  # type: ignore[call-overload]
    return bytes(out)


def encode_request(request: Request, *, nul: bool = False) -> bytes:
    """Encode a request as a client sends it. ``nul=True`` imitates QEMU: path strings count a NUL."""
    _, codes = LAYOUTS[request.type]
    values: list[object] = []
    for name, code in zip(_field_names(request), codes, strict=True):
        value = getattr(request, name)
        if code == "p" and nul:
            value = value + b"\0"
        values.append(value)
    payload = _pack_fields(codes, values)
    return HEADER.pack(int(request.type), len(payload)) + payload


def _field_names(request: Request) -> list[str]:
    return [f for f in request.__dataclass_fields__ if f != "type"]


# ---------------------------------------------------------------------------------------------------------
# Events out of the decoder besides requests.


@dataclass(frozen=True, slots=True)
class Malformed:
    """A known type whose payload is too short for its fields: answer ENOBUFS in its shape."""

    rtype: RequestType
    size: int


@dataclass(frozen=True, slots=True)
class Unknown:
    """A type this protocol does not have, with a sane size: answer EOPNOTSUPP and keep serving."""

    rtype: int
    size: int


@dataclass(frozen=True, slots=True)
class Fatal:
    """The stream can no longer be framed (oversized size, EOF inside a frame): close the connection."""

    reason: str


class NeedData:
    """Sentinel: the buffer holds no complete frame yet."""


class Closed:
    """Sentinel: the peer closed the connection between two frames (a clean end)."""


NEED_DATA = NeedData()
CLOSED = Closed()

Event = Request | Malformed | Unknown | Fatal | NeedData | Closed


class Decoder:
    """Frames a byte stream into events. Feed bytes, then call next_event until it says NEED_DATA.

    next_event never raises, whatever the bytes: a frame is delimited by its header alone, so a payload
    its parser cannot read costs only that frame (Malformed), and the stream goes on."""

    __slots__ = ("_buf", "_eof", "_fatal", "_pos")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0
        self._eof = False
        self._fatal: Fatal | None = None

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._fatal is not None:  # the stream can no longer be framed: keep nothing more of it
            return
        if data:
            self._buf += data
        else:
            self._eof = True

    def feed_eof(self) -> None:
        self._eof = True

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._pos

    def next_event(self) -> Event:
        if self._fatal is not None:
            return self._fatal
        buf = self._buf
        pos = self._pos
        avail = len(buf) - pos
        if avail < HEADER_SIZE:
            if not self._eof:
                return NEED_DATA
            if avail == 0:
                return CLOSED
            return self._fail(f"EOF inside a frame header ({avail} of {HEADER_SIZE} bytes)")
        rtype, size = HEADER.unpack_from(buf, pos)
        if size > MAX_PAYLOAD:
            return self._fail(f"frame size {size} exceeds the {MAX_PAYLOAD}-byte limit (type {rtype})")
        if avail < HEADER_SIZE + size:
            if not self._eof:
                return NEED_DATA
            return self._fail(f"EOF inside a frame (type {rtype}, {avail - HEADER_SIZE} of {size} bytes)")
        start = pos + HEADER_SIZE
        end = start + size
        # Parse first, compact after: the parsers read buf[start:end], so the buffer must not move
        # under them (deleting the consumed prefix first misparsed every frame that crossed 64 KiB of
        # consumed bytes, and an IndexError killed the gateway when the shifted buffer was short).
        parse = _PARSERS.get(rtype)
        event: Event
        if parse is None:
            event = Unknown(rtype, size)
        else:
            try:
                event = parse(buf, start, end)
            except Exception:  # ShortPayload; or a parser bug: the frame is delimited, only it is lost
                event = Malformed(RequestType(rtype), size)
        self._pos = end
        if end == len(buf):  # common case: the buffer drained, reset it cheaply
            self._buf = bytearray()
            self._pos = 0
        elif end > MAX_PAYLOAD:
            del buf[:end]
            self._pos = 0
        return event

    def _fail(self, reason: str) -> Fatal:
        self._fatal = Fatal(reason)
        return self._fatal


# ---------------------------------------------------------------------------------------------------------
# Replies (server side).


def encode_fd_reply(errno_: int) -> bytes:
    """The OPEN/CREATE reply's data: FD_VALID when an fd travels with it (errno_ == 0), else -errno."""
    return _I32.pack(FD_VALID if errno_ == 0 else -errno_)


_STATUS_OK = HEADER.pack(T_SUCCESS, 4) + _I32.pack(0)


def encode_status(errno_: int) -> bytes:
    if errno_ == 0:
        return _STATUS_OK
    return HEADER.pack(T_ERROR, 4) + _I32.pack(-errno_)


def encode_payload(payload: bytes) -> bytes:
    if len(payload) > MAX_PAYLOAD:  # as the reference: a reply that cannot fit is ENOBUFS
        return encode_status(errno.ENOBUFS)
    return HEADER.pack(T_SUCCESS, len(payload)) + payload


def encode_error(rtype: int, errno_: int) -> bytes:
    """An error in the reply shape of rtype (unknown types get the header-carrying error shape)."""
    if rtype in _FD_TYPES:
        return encode_fd_reply(errno_)
    return encode_status(errno_)


def stat_payload(st: object) -> bytes:
    """LSTAT payload from an os.stat_result (116 bytes: the reference packs it without padding).

    A time before the epoch has a negative tv_sec (floor division keeps tv_nsec in 0..999999999, as a
    timespec has it); the reference sends it as the u64 two's complement, and packing it unmasked raised
    struct.error, which turned every LSTAT of such a file into EIO."""
    a_ns = st.st_atime_ns  # type: ignore[attr-defined]
    m_ns = st.st_mtime_ns  # type: ignore[attr-defined]
    c_ns = st.st_ctime_ns  # type: ignore[attr-defined]
    u64 = 0xFFFFFFFFFFFFFFFF
    return _STAT.pack(
        st.st_dev, st.st_ino, st.st_nlink,  # type: ignore[attr-defined]
        st.st_mode, st.st_uid, st.st_gid,  # type: ignore[attr-defined]
        st.st_rdev, st.st_size, st.st_blksize, st.st_blocks,  # type: ignore[attr-defined]
        (a_ns // 1_000_000_000) & u64, a_ns % 1_000_000_000,
        (m_ns // 1_000_000_000) & u64, m_ns % 1_000_000_000,
        (c_ns // 1_000_000_000) & u64, c_ns % 1_000_000_000,
    )  # fmt: skip


def statfs_payload(fields: tuple[int, ...]) -> bytes:
    """STATFS payload: type, bsize, blocks, bfree, bavail, files, ffree, fsid0, fsid1, namelen, frsize."""
    return _STATFS.pack(*(v & 0xFFFFFFFFFFFFFFFF for v in fields))


def string_payload(value: bytes) -> bytes:
    return _U16.pack(len(value)) + value


def length_payload(length: int) -> bytes:
    return _I32.pack(length)


def u64_payload(value: int) -> bytes:
    return _Q.pack(value & 0xFFFFFFFFFFFFFFFF)


# ---------------------------------------------------------------------------------------------------------
# Reply parsing (client side), kept here so that both ends share one definition of the wire.


@dataclass(frozen=True, slots=True)
class StatReply:
    dev: int
    ino: int
    nlink: int
    mode: int
    uid: int
    gid: int
    rdev: int
    size: int
    blksize: int
    blocks: int
    atime_sec: int
    atime_nsec: int
    mtime_sec: int
    mtime_nsec: int
    ctime_sec: int
    ctime_nsec: int


@dataclass(frozen=True, slots=True)
class StatfsReply:
    type: int
    bsize: int
    blocks: int
    bfree: int
    bavail: int
    files: int
    ffree: int
    fsid0: int
    fsid1: int
    namelen: int
    frsize: int


def parse_stat(payload: bytes) -> StatReply:
    return StatReply(*_STAT.unpack_from(payload, 0))


def parse_statfs(payload: bytes) -> StatfsReply:
    return StatfsReply(*_STATFS.unpack_from(payload, 0))


def parse_string(payload: bytes) -> bytes:
    (length,) = _U16.unpack_from(payload, 0)
    return bytes(payload[2 : 2 + length])


def parse_i32(payload: bytes) -> int:
    return _I32.unpack_from(payload, 0)[0]


def parse_u64(payload: bytes) -> int:
    return _Q.unpack_from(payload, 0)[0]
