"""The virtio-fs back-end's loop: one front-end (QEMU) on a Unix socket, its kicks, its queues.

Single-threaded, like the 9p server: poll the control socket and the kick eventfds of the running
rings; a control message goes to the device (and its reply back), a kick serves that ring. It serves
one connection and returns when QEMU goes away, as virtiofsd does.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import stat

from gateway.logfmt import kv
from gateway.virtiofs.device import Device
from gateway.virtiofs.readonly_fs import ReadOnlyFs
from gateway.virtiofs.vhost_user_abi import MAX_FDS

log = logging.getLogger("gateway.virtiofs")


def listen(path: str) -> socket.socket:
    """The listening socket at ``path``. A stale socket there is replaced; anything else is refused."""
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise OSError(f"{path} exists and is not a socket")
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(path)
        sock.listen(1)
    except OSError:
        sock.close()
        raise
    return sock


def serve_connection(conn: socket.socket, device: Device) -> str:
    """Until the front-end disconnects or breaks the protocol; returns why it ended."""
    poller = select.poll()
    watched: dict[int, int] = {}  # kick fd -> ring index
    poller.register(conn.fileno(), select.POLLIN)
    while device.closed_reason is None:
        kicks = device.kick_fds()
        if kicks != watched:
            for fd in watched.keys() - kicks.keys():
                with contextlib.suppress(KeyError, ValueError):
                    poller.unregister(fd)
            for fd in kicks.keys() - watched.keys():
                poller.register(fd, select.POLLIN)
            watched = kicks
        for fd, mask in poller.poll():
            if fd == conn.fileno():
                try:
                    # One message at a time (Backend.wanted): that is how its fds stay with it.
                    data, fds, flags, _addr = socket.recv_fds(conn, device.backend.wanted(), MAX_FDS)
                except OSError as exc:
                    return f"control socket: {exc}"
                if flags & socket.MSG_CTRUNC:
                    # More fds than any message carries: some were dropped by the kernel, so the
                    # message they came with cannot be served as sent.
                    for fd in fds:
                        os.close(fd)
                    return "control socket: too many fds on one message"
                reply = device.control(data, fds)
                if reply:
                    conn.sendall(reply)
                if device.closed_reason is not None:
                    break
            elif fd in watched:
                if mask & (select.POLLERR | select.POLLNVAL):
                    continue
                device.kicked(watched[fd])
    return device.closed_reason or "done"


def run(shared_dir: str, sock: socket.socket) -> int:
    """Accept one front-end on the listening ``sock`` and serve ``shared_dir`` to it, read-only."""
    root_fd = os.open(shared_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    proc_fd = os.open("/proc/self/fd", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    fs = ReadOnlyFs(root_fd, proc_fd)
    try:
        log.info("waiting for a vhost-user front-end")
        conn, _ = sock.accept()
        sock.close()
        device = Device(fs)
        try:
            with conn:
                reason = serve_connection(conn, device)
        finally:
            device.close()
        log.info("front-end gone %s", kv(reason=reason))
        return 0
    finally:
        fs.close()
        os.close(proc_fd)
        os.close(root_fd)
