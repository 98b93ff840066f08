"""systemd's two protocols, spoken directly: readiness (sd_notify(3)) and socket activation
(sd_listen_fds(3)). Both are a few lines of documented wire format, not worth a dependency.

Everything here is opened before the sandbox: after it, socket() and connect() are forbidden, and a
notification is one send() on a datagram socket connected at start-up.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from collections.abc import MutableMapping

LISTEN_FDS_START = 3  # SD_LISTEN_FDS_START


class Notifier:
    """READY=1, STATUS=..., STOPPING=1 to the service manager, when there is one (NOTIFY_SOCKET).

    Without NOTIFY_SOCKET every call does nothing: the gateway run by hand or by QEMU's wrapper is the
    same program. A lost notification is never fatal (systemd may be restarting): it costs a status line.
    """

    def __init__(self, address: str | None) -> None:
        self.sock: socket.socket | None = None
        if not address:
            return
        if address.startswith("@"):  # an abstract-namespace address
            address = "\0" + address[1:]
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(address)
        except OSError:
            sock.close()
            raise
        self.sock = sock

    @classmethod
    def from_environ(cls, env: MutableMapping[str, str] = os.environ) -> Notifier:
        """The notifier NOTIFY_SOCKET names, which is then taken out of the environment: a child never
        speaks for the service (sd_notify's unset_environment)."""
        return cls(env.pop("NOTIFY_SOCKET", None))

    @property
    def active(self) -> bool:
        return self.sock is not None

    def notify(self, **fields: str | int) -> None:
        """One datagram of KEY=value lines: notify(READY=1, STATUS="waiting for a client")."""
        if self.sock is None:
            return
        message = "".join(f"{key}={value}\n" for key, value in fields.items())
        with contextlib.suppress(OSError):
            self.sock.send(message.encode())

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def listen_fds(env: MutableMapping[str, str] = os.environ) -> list[int]:
    """The fds systemd passed (LISTEN_FDS from fd 3), if they are meant for this process (LISTEN_PID).

    The variables are removed, as sd_listen_fds(1) does, so that nothing started later takes them for
    its own; the fds are made close-on-exec."""
    pid = env.pop("LISTEN_PID", None)
    count = env.pop("LISTEN_FDS", None)
    env.pop("LISTEN_FDNAMES", None)
    if pid is None or count is None:
        return []
    try:
        if int(pid) != os.getpid():
            return []
        n = int(count)
    except ValueError:
        return []
    fds = list(range(LISTEN_FDS_START, LISTEN_FDS_START + max(0, n)))
    for fd in fds:
        with contextlib.suppress(OSError):
            fcntl.fcntl(fd, fcntl.F_SETFD, fcntl.fcntl(fd, fcntl.F_GETFD) | fcntl.FD_CLOEXEC)
    return fds
