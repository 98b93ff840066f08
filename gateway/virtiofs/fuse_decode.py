"""FUSE requests decoded from the bytes of one virtqueue chain's readable part, into typed values.

``decode(buf)`` never raises: it returns either a ``Request`` (one dataclass per operation, fields named
after the kernel's structs) or a ``Malformed`` that says which errno to reply with (and whether to reply
at all: FORGET and BATCH_FORGET get no reply). The rules:

* fewer than 40 bytes, or a header whose ``len`` is below 40 or beyond what arrived: EIO (the request is
  not a request; its ``unique`` is used when at least its first 16 bytes are there, else 0);
* a known opcode with a body shorter than its struct, a name without its NUL, an xattr value shorter
  than its size, extensions (``total_extlen``) that were never negotiated: EINVAL;
* a name that is empty or has a '/': EINVAL; longer than NAME_MAX: ENAMETOOLONG; '.' or '..' where a
  name is created or removed: EINVAL (LOOKUP may ask for them: the file-system layer answers);
* an opcode this back-end does not serve: ENOSYS, which the kernel remembers for the ones it can live
  without (and never retries).

The file-system layer maps each request onto the rules' ops before performing it
(``fuse_requests.RULES_OPS``: READ and WRITE on a handle are not decided again, the OPEN was).
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

from gateway.virtiofs import fuse_abi as abi
from gateway.virtiofs import fuse_requests as r
from gateway.virtiofs.fuse_abi import Op
from gateway.virtiofs.fuse_requests import Buffer, InHeader, Request


@dataclass(frozen=True)
class Malformed:
    """A request that cannot be served as sent: reply ``-errno`` (unless ``reply`` is False)."""

    unique: int
    errno: int
    reason: str
    opcode: int = 0
    reply: bool = True


class _Bad(Exception):
    def __init__(self, err: int, reason: str) -> None:
        super().__init__(reason)
        self.err = err
        self.reason = reason


class _Bad(Exception):
    def __init__(self, err: int, reason: str) -> None:
        super().__init__(reason)
        self.err = err
        self.reason = reason


# --- decoding -----------------------------------------------------------------------------------------
class _Body:
    """A cursor over a request's body; every read is bounds-checked."""

    def __init__(self, buf: Buffer) -> None:
        self.buf = memoryview(buf)
        self.pos = 0

    def fixed(self, layout: abi.struct.Struct) -> tuple[int, ...]:
        if len(self.buf) - self.pos < layout.size:
            raise _Bad(errno.EINVAL, f"body of {len(self.buf)} bytes, a {layout.size}-byte struct expected")
        values = layout.unpack_from(self.buf, self.pos)
        self.pos += layout.size
        return values

    def cstr(self, what: str, limit: int) -> bytes:
        rest = bytes(self.buf[self.pos:self.pos + limit + 1])
        end = rest.find(b"\0")
        if end < 0:
            if len(self.buf) - self.pos > limit:
                raise _Bad(errno.ENAMETOOLONG, f"{what} longer than {limit} bytes")
            raise _Bad(errno.EINVAL, f"{what} without its NUL")
        self.pos += end + 1
        return rest[:end]

    def name(self, what: str = "name", creating: bool = True) -> bytes:
        name = self.cstr(what, abi.NAME_MAX)
        if not name or b"/" in name:
            raise _Bad(errno.EINVAL, f"{what} {name!r} is not one path component")
        if creating and name in (b".", b".."):
            raise _Bad(errno.EINVAL, f"{what} {name!r}")
        return name

    def rest(self, size: int) -> memoryview:
        if len(self.buf) - self.pos < size:
            raise _Bad(errno.EINVAL, f"{len(self.buf) - self.pos} bytes of data where {size} were announced")
        out = self.buf[self.pos:self.pos + size]
        self.pos += size
        return out


def _init(h: InHeader, b: _Body) -> Request:
    major, minor, readahead, flags = b.fixed(abi.INIT_IN_COMPAT)
    flags2 = 0
    if flags & abi.FUSE_INIT_EXT and len(b.buf) - b.pos >= 4:
        flags2 = int.from_bytes(b.buf[b.pos:b.pos + 4], "little")
    return r.Init(h, major, minor, readahead, flags | flags2 << 32)


def _batch_forget(h: InHeader, b: _Body) -> Request:
    count, _ = b.fixed(abi.BATCH_FORGET_IN)
    if count > (len(b.buf) - b.pos) // abi.FORGET_ONE.size:
        raise _Bad(errno.EINVAL, f"{count} forgets announced, fewer sent")
    return r.BatchForget(h, tuple(b.fixed(abi.FORGET_ONE) for _ in range(count)))  # type: ignore[misc]


def _setattr(h: InHeader, b: _Body) -> Request:
    (valid, _, fh, size, lock_owner, atime, mtime, ctime, atimensec, mtimensec, ctimensec, mode, _u4,
     uid, gid, _u5) = b.fixed(abi.SETATTR_IN)
    return r.Setattr(h, valid, fh, size, lock_owner, atime, mtime, ctime, atimensec, mtimensec, ctimensec,
                   mode, uid, gid)


def _symlink(h: InHeader, b: _Body) -> Request:
    name = b.name()
    target = b.cstr("target", abi.PATH_MAX - 1)
    if not target:
        raise _Bad(errno.ENOENT, "empty symlink target")
    return r.Symlink(h, name, target)


def _mknod(h: InHeader, b: _Body) -> Request:
    mode, rdev, umask, _ = b.fixed(abi.MKNOD_IN)
    return r.Mknod(h, mode, rdev, umask, b.name())


def _mkdir(h: InHeader, b: _Body) -> Request:
    mode, umask = b.fixed(abi.MKDIR_IN)
    return r.Mkdir(h, mode, umask, b.name())


def _rename(h: InHeader, b: _Body) -> Request:
    (newdir,) = b.fixed(abi.RENAME_IN)
    return r.Rename(h, newdir, b.name("oldname"), b.name("newname"))


def _rename2(h: InHeader, b: _Body) -> Request:
    newdir, flags, _ = b.fixed(abi.RENAME2_IN)
    return r.Rename2(h, newdir, b.name("oldname"), b.name("newname"), flags)


def _read(cls: type[r.Read]):  # type: ignore[no-untyped-def]
    def decode(h: InHeader, b: _Body) -> Request:
        return cls(h, *b.fixed(abi.READ_IN)[:6])
    return decode


def _write(h: InHeader, b: _Body) -> Request:
    fh, offset, size, write_flags, lock_owner, flags, _ = b.fixed(abi.WRITE_IN)
    return r.Write(h, fh, offset, size, write_flags, lock_owner, flags, b.rest(size))


def _release(cls: type[r.Release]):  # type: ignore[no-untyped-def]
    def decode(h: InHeader, b: _Body) -> Request:
        return cls(h, *b.fixed(abi.RELEASE_IN))
    return decode


def _fsync(cls: type[r.Fsync]):  # type: ignore[no-untyped-def]
    def decode(h: InHeader, b: _Body) -> Request:
        return cls(h, *b.fixed(abi.FSYNC_IN)[:2])
    return decode


def _flush(h: InHeader, b: _Body) -> Request:
    fh, _, _, lock_owner = b.fixed(abi.FLUSH_IN)
    return r.Flush(h, fh, lock_owner)


def _xattr_name(b: _Body) -> bytes:
    name = b.cstr("xattr name", abi.XATTR_NAME_MAX)
    if not name:
        raise _Bad(errno.EINVAL, "empty xattr name")  # what setxattr(2) says (ERANGE on some kernels)
    return name


def _setxattr(h: InHeader, b: _Body) -> Request:
    size, flags = b.fixed(abi.SETXATTR_IN)
    if size > abi.XATTR_SIZE_MAX:
        raise _Bad(errno.E2BIG, f"xattr value of {size} bytes")
    name = _xattr_name(b)
    return r.Setxattr(h, flags, name, bytes(b.rest(size)))


def _getxattr(h: InHeader, b: _Body) -> Request:
    size, _ = b.fixed(abi.GETXATTR_IN)
    return r.Getxattr(h, size, _xattr_name(b))


def _create(h: InHeader, b: _Body) -> Request:
    flags, mode, umask, open_flags = b.fixed(abi.CREATE_IN)
    return r.Create(h, flags, mode, umask, open_flags, b.name())


def _fallocate(h: InHeader, b: _Body) -> Request:
    fh, offset, length, mode, _ = b.fixed(abi.FALLOCATE_IN)
    return r.Fallocate(h, fh, offset, length, mode)


def _lseek(h: InHeader, b: _Body) -> Request:
    fh, offset, whence, _ = b.fixed(abi.LSEEK_IN)
    return r.Lseek(h, fh, offset, whence)


_DECODERS = {
    Op.INIT: _init,
    Op.DESTROY: lambda h, b: r.Destroy(h),
    Op.LOOKUP: lambda h, b: r.Lookup(h, b.name(creating=False)),
    Op.FORGET: lambda h, b: r.Forget(h, *b.fixed(abi.FORGET_IN)),
    Op.BATCH_FORGET: _batch_forget,
    Op.GETATTR: lambda h, b: r.Getattr(h, *(lambda f, _d, fh: (f, fh))(*b.fixed(abi.GETATTR_IN))),
    Op.SETATTR: _setattr,
    Op.READLINK: lambda h, b: r.Readlink(h),
    Op.SYMLINK: _symlink,
    Op.MKNOD: _mknod,
    Op.MKDIR: _mkdir,
    Op.UNLINK: lambda h, b: r.Unlink(h, b.name()),
    Op.RMDIR: lambda h, b: r.Rmdir(h, b.name()),
    Op.RENAME: _rename,
    Op.RENAME2: _rename2,
    Op.LINK: lambda h, b: r.Link(h, *b.fixed(abi.LINK_IN), b.name("newname")),
    Op.OPEN: lambda h, b: r.Open(h, *b.fixed(abi.OPEN_IN)),
    Op.OPENDIR: lambda h, b: r.Opendir(h, *b.fixed(abi.OPEN_IN)),
    Op.READ: _read(r.Read),
    Op.READDIR: _read(r.Readdir),
    Op.READDIRPLUS: _read(r.Readdirplus),
    Op.WRITE: _write,
    Op.STATFS: lambda h, b: r.Statfs(h),
    Op.RELEASE: _release(r.Release),
    Op.RELEASEDIR: _release(r.Releasedir),
    Op.FSYNC: _fsync(r.Fsync),
    Op.FSYNCDIR: _fsync(r.Fsyncdir),
    Op.FLUSH: _flush,
    Op.SETXATTR: _setxattr,
    Op.GETXATTR: _getxattr,
    Op.LISTXATTR: lambda h, b: r.Listxattr(h, b.fixed(abi.GETXATTR_IN)[0]),
    Op.REMOVEXATTR: lambda h, b: r.Removexattr(h, _xattr_name(b)),
    Op.ACCESS: lambda h, b: r.Access(h, b.fixed(abi.ACCESS_IN)[0]),
    Op.CREATE: _create,
    Op.FALLOCATE: _fallocate,
    Op.LSEEK: _lseek,
}
SERVED_OPS = frozenset(_DECODERS)


def decode(buf: Buffer) -> Request | Malformed:
    """One request from the readable bytes of a chain (header, then body)."""
    view = memoryview(buf)
    if len(view) < abi.IN_HEADER.size:
        unique = int.from_bytes(view[8:16], "little") if len(view) >= 16 else 0
        return Malformed(unique, errno.EIO, f"{len(view)} bytes: shorter than fuse_in_header")
    h = InHeader(*abi.IN_HEADER.unpack_from(view)[:8])
    no_reply = h.opcode in abi.NO_REPLY
    if not abi.IN_HEADER.size <= h.len <= len(view):
        return Malformed(h.unique, errno.EIO, f"header len {h.len}, {len(view)} bytes arrived", h.opcode,
                         reply=not no_reply)
    decoder = _DECODERS.get(h.opcode)  # type: ignore[call-overload]
    if decoder is None:
        return Malformed(h.unique, errno.ENOSYS, f"opcode {h.opcode} is not served", h.opcode)
    if h.total_extlen:
        return Malformed(h.unique, errno.EINVAL, "request extensions were not negotiated", h.opcode,
                         reply=not no_reply)
    try:
        return decoder(h, _Body(view[abi.IN_HEADER.size:h.len]))
    except _Bad as bad:
        return Malformed(h.unique, bad.err, f"{Op(h.opcode).name}: {bad.reason}", h.opcode,
                         reply=not no_reply)
