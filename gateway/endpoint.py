"""Where the client comes from: a named socket the gateway binds (-s), one systemd bound for it (socket
activation, -s naming the same path), or a connected socket inherited as an fd (-f).

Everything that needs a path or privilege happens in `open_endpoint`, before the sandbox and before the
process detaches, so that a failure is reported on stderr with the path and its cause. What is left for
later, `accept()` on a listening socket, needs neither: the seccomp filter allows accept4 on that one fd.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import struct
from dataclasses import dataclass

SUN_PATH_MAX = 108


class StartupError(Exception):
    """A start-up failure: its message names the path (or fd) and the cause, and serving is refused."""


@dataclass
class Endpoint:
    """The listener (named or activated), or the connection itself (-f)."""

    listener: socket.socket | None = None
    connection: socket.socket | None = None
    path: str | None = None
    activated: bool = False

    @property
    def accept_fd(self) -> int | None:
        """The fd the filter lets accept4 take a client from (None: there is nothing to accept)."""
        return None if self.listener is None else self.listener.fileno()

    def describe(self) -> str:
        if self.listener is None:
            return f"socket descriptor {self.connection.fileno() if self.connection else '?'}"
        return f"{self.path} ({'socket activation' if self.activated else 'named socket'})"

    def next_client(self) -> socket.socket:
        """The next client: accepted (waits), or the inherited connection (once)."""
        if self.listener is not None:
            client, _ = self.listener.accept()
            return client
        if self.connection is None:
            raise StartupError("the inherited connection was served already")
        client, self.connection = self.connection, None
        return client

    def close_listener(self) -> None:
        """One client only (the reference's way): no one else can connect once it is served."""
        if self.listener is not None:
            self.listener.close()
            self.listener = None


def open_endpoint(
    *, socket_path: str | None, fd: int, uid: int, gid: int, activated: list[int]
) -> Endpoint:
    if socket_path is None:
        return Endpoint(connection=inherited_connection(fd))
    if activated:
        return Endpoint(listener=activated_listener(activated, socket_path), path=socket_path, activated=True)
    return Endpoint(listener=bind_listener(socket_path, uid, gid), path=socket_path)


def bind_listener(path: str, uid: int, gid: int) -> socket.socket:
    """The reference's proxy_socket() up to listen(): refuse an existing path, bind with umask 007, chown
    to uid:gid, listen with backlog 1. (It exits 0 on an existing path; the gateway fails, status 1.)"""
    if os.path.lexists(path):
        raise StartupError(
            f"cannot listen on {path}: the path exists already (remove it, or choose another -s)"
        )
    if len(os.fsencode(path)) >= SUN_PATH_MAX:
        raise StartupError(
            f"cannot listen on {path}: a UNIX domain socket path has at most {SUN_PATH_MAX - 1} bytes"
        )
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise StartupError(f"cannot listen on {path}: its directory {parent} does not exist")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        old = os.umask(0o007)
        try:
            listener.bind(path)
        finally:
            os.umask(old)
        os.chown(path, uid, gid)
        listener.listen(1)
    except OSError as exc:
        listener.close()
        raise StartupError(f"cannot listen on {path}: {exc.strerror}") from None
    return listener


def activated_listener(fds: list[int], path: str) -> socket.socket:
    """The one listening socket systemd passed, checked to be the one -s names (a unit whose ListenStream
    and ExecStart disagree is refused rather than served on a socket nobody expects)."""
    if len(fds) != 1:
        raise StartupError(
            f"socket activation passed {len(fds)} sockets (LISTEN_FDS); the gateway takes exactly one"
        )
    try:
        sock = socket.socket(fileno=fds[0])
    except OSError as exc:
        raise StartupError(f"socket activation: fd {fds[0]} is not a socket: {exc.strerror}") from None
    listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM or not listening:
        sock.detach()
        raise StartupError(f"socket activation: fd {fds[0]} is not a listening UNIX stream socket")
    bound = sock.getsockname()
    bound = bound.decode(errors="replace") if isinstance(bound, bytes) else bound
    if os.path.abspath(bound) != os.path.abspath(path):
        sock.detach()
        raise StartupError(f"socket activation: the socket passed is bound to {bound!r}, not to -s {path}")
    return sock


def inherited_connection(fd: int) -> socket.socket:
    try:
        st = os.fstat(fd)
    except OSError as exc:
        raise StartupError(f"socket descriptor {fd} is not usable: {exc.strerror}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise StartupError(f"socket descriptor {fd} is not a socket")
    return socket.socket(fileno=fd)


def peer_credentials(sock: socket.socket) -> dict[str, int] | None:
    """The client's pid, uid and gid (SO_PEERCRED), for the session record: which QEMU this is."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    pid, uid, gid = struct.unpack("3i", raw)
    return {"pid": pid, "uid": uid, "gid": gid}


def close_inherited_fds(keep: set[int]) -> None:
    """Close every fd beyond stdio that the gateway did not ask for (-f's and systemd's are kept): an fd a
    supervisor leaked would otherwise stay open, through the sandbox, for the life of the gateway."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd not in keep:
            with contextlib.suppress(OSError):  # the listing's own fd, closed already
                os.close(fd)
