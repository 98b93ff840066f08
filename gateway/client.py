"""A small blocking client for the proxy protocol: what QEMU's proxy driver does, in Python.

Used by the tests, the demo and the benchmark. `Client.call` returns the raw `Reply` (for comparing
servers byte for byte); the named methods (`lstat`, `open`, ...) return values and raise OSError.
"""

from __future__ import annotations

import array
import os
import socket
from dataclasses import dataclass

from gateway import protocol as p


@dataclass(frozen=True, slots=True)
class Reply:
    rtype: int
    errno: int  # 0 on success
    payload: bytes = b""  # the success payload of the PAYLOAD shape
    fd: int | None = None  # OPEN/CREATE: the received fd (the caller owns it)

    @property
    def ok(self) -> bool:
        return self.errno == 0

    def check(self) -> Reply:
        if self.errno:
            raise OSError(self.errno, os.strerror(self.errno))
        return self


class ProtocolClosed(ConnectionError):
    """The server closed the connection (or sent a reply that cannot be framed)."""


class Client:
    def __init__(self, sock: socket.socket, *, nul: bool = True) -> None:
        self.sock = sock
        self.nul = nul  # send paths with QEMU's trailing NUL, as a real guest does

    @classmethod
    def connect(cls, path: str, *, nul: bool = True, timeout: float | None = None) -> Client:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(path)
        return cls(sock, nul=nul)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- raw ------------------------------------------------------------------------------------------

    def call(self, request: p.Request) -> Reply:
        self.sock.sendall(p.encode_request(request, nul=self.nul))
        return self.read_reply(request.type)

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_reply(self, rtype: int) -> Reply:
        if p.reply_shape(rtype) is p.ReplyShape.FD:
            return self._read_fd_reply(rtype)
        header = self._recv_exact(p.HEADER_SIZE)
        kind, size = p.HEADER.unpack(header)
        body = self._recv_exact(size)
        if kind == p.T_ERROR:
            return Reply(rtype, -p.parse_i32(body))
        if p.reply_shape(rtype) is p.ReplyShape.STATUS:
            status = p.parse_i32(body)
            return Reply(rtype, -status if status < 0 else 0)
        return Reply(rtype, 0, body)

    def _read_fd_reply(self, rtype: int) -> Reply:
        fds = array.array("i")
        data, ancdata, _flags, _addr = self.sock.recvmsg(4, socket.CMSG_SPACE(fds.itemsize))
        if len(data) < 4:
            data += self._recv_exact(4 - len(data)) if data else b""
            if len(data) < 4:
                raise ProtocolClosed("connection closed before the OPEN/CREATE reply")
        for level, ctype, cdata in ancdata:
            if level == socket.SOL_SOCKET and ctype == socket.SCM_RIGHTS:
                fds.frombytes(cdata[: len(cdata) - (len(cdata) % fds.itemsize)])
        value = p.parse_i32(data)
        if value == p.FD_VALID:
            if not fds:
                raise ProtocolClosed("OPEN/CREATE success without an fd")
            for extra in fds[1:]:
                os.close(extra)
            return Reply(rtype, 0, fd=fds[0])
        for extra in fds:
            os.close(extra)
        return Reply(rtype, -value if value < 0 else 0)

    def _recv_exact(self, n: int) -> bytes:
        chunks = bytearray()
        while len(chunks) < n:
            chunk = self.sock.recv(n - len(chunks))
            if not chunk:
                raise ProtocolClosed(f"connection closed after {len(chunks)} of {n} reply bytes")
            chunks += chunk
        return bytes(chunks)

    # -- convenience ----------------------------------------------------------------------------------

    def open(self, path: bytes, flags: int) -> int:
        fd = self.call(p.Open(path, flags)).check().fd
        assert fd is not None
        return fd

    def create(self, path: bytes, flags: int, mode: int, uid: int = 0, gid: int = 0) -> int:
        fd = self.call(p.Create(path, flags, mode, uid, gid)).check().fd
        assert fd is not None
        return fd

    def mknod(self, path: bytes, mode: int, rdev: int = 0, uid: int = 0, gid: int = 0) -> None:
        self.call(p.Mknod(uid, gid, path, mode, rdev)).check()

    def mkdir(self, path: bytes, mode: int, uid: int = 0, gid: int = 0) -> None:
        self.call(p.Mkdir(uid, gid, path, mode)).check()

    def symlink(self, target: bytes, path: bytes, uid: int = 0, gid: int = 0) -> None:
        self.call(p.Symlink(uid, gid, target, path)).check()

    def link(self, old: bytes, new: bytes) -> None:
        self.call(p.Link(old, new)).check()

    def lstat(self, path: bytes) -> p.StatReply:
        return p.parse_stat(self.call(p.Lstat(path)).check().payload)

    def readlink(self, path: bytes, bufsize: int = 4096) -> bytes:
        return p.parse_string(self.call(p.Readlink(path, bufsize)).check().payload)

    def statfs(self, path: bytes) -> p.StatfsReply:
        return p.parse_statfs(self.call(p.Statfs(path)).check().payload)

    def chmod(self, path: bytes, mode: int) -> None:
        self.call(p.Chmod(path, mode)).check()

    def chown(self, path: bytes, uid: int, gid: int) -> None:
        self.call(p.Chown(path, uid, gid)).check()

    def truncate(self, path: bytes, length: int) -> None:
        self.call(p.Truncate(path, length)).check()

    def utime(self, path: bytes, atime: tuple[int, int], mtime: tuple[int, int]) -> None:
        self.call(p.Utime(path, atime[0], atime[1], mtime[0], mtime[1])).check()

    def rename(self, old: bytes, new: bytes) -> None:
        self.call(p.Rename(old, new)).check()

    def remove(self, path: bytes) -> None:
        self.call(p.Remove(path)).check()

    def getxattr(self, path: bytes, name: bytes, size: int = 65536) -> bytes:
        reply = self.call(p.Lgetxattr(size, path, name)).check()
        return p.parse_string(reply.payload) if size else reply.payload

    def getxattr_length(self, path: bytes, name: bytes) -> int:
        return p.parse_i32(self.call(p.Lgetxattr(0, path, name)).check().payload)

    def listxattr(self, path: bytes, size: int = 65536) -> list[bytes]:
        raw = p.parse_string(self.call(p.Llistxattr(size, path)).check().payload)
        return [name for name in raw.split(b"\0") if name]

    def setxattr(self, path: bytes, name: bytes, value: bytes, flags: int = 0) -> None:
        self.call(p.Lsetxattr(path, name, value, len(value), flags)).check()

    def removexattr(self, path: bytes, name: bytes) -> None:
        self.call(p.Lremovexattr(path, name)).check()

    def getversion(self, path: bytes) -> int:
        return p.parse_u64(self.call(p.Getversion(path)).check().payload)
