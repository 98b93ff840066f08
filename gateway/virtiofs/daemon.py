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
import sys
from typing import TYPE_CHECKING

from gateway import __version__, landlock
from gateway.endpoint import peer_credentials
from gateway.logfmt import kv
from gateway.sandbox import SandboxConfig, confine
from gateway.serve import release_startup_memory
from gateway.virtiofs.device import Device
from gateway.virtiofs.export_fs import ExportFs
from gateway.virtiofs.policy import Gate
from gateway.virtiofs.readonly_fs import ReadOnlyFs
from gateway.virtiofs.vhost_user_abi import MAX_FDS

if TYPE_CHECKING:
    from gateway.audit import AuditWriter
    from gateway.rules import Policy

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


def run(shared_dir: str, sock: socket.socket, *, policy: Policy | None = None, policy_source: str = "",
        trail: AuditWriter | None = None, readonly: bool = True, sandbox: SandboxConfig | None = None) -> int:
    """Accept one front-end on the listening ``sock`` and serve ``shared_dir`` to it (read-only unless
    ``readonly`` is False); with a policy, every request decided by it (and recorded in ``trail``, which
    this closes)."""
    export = os.path.abspath(shared_dir)
    root_fd = os.open(export, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    proc_fd = os.open("/proc/self/fd", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    gate = Gate(policy, trail) if policy is not None else None
    fs = ReadOnlyFs(root_fd, proc_fd, gate=gate) if readonly else ExportFs(root_fd, proc_fd, gate=gate)
    os.umask(0)  # the guest's modes as it sent them (its kernel applied its umask)
    reason = "not started"
    try:
        state = None
        if sandbox is not None:
            # Everything is open (the export, /proc/self/fd, the trail and its directory, the listening
            # socket): confined before QEMU connects, accept4 allowed on that socket alone.
            sandbox.accept_fd = sock.fileno()
            if trail is not None:
                sandbox.grants = [(trail.dirfd, landlock.AUDIT_DIR, os.path.dirname(trail.path))]
            sandbox.max_open_files = fs.inodes.max_inodes + fs.handles.max_handles + 256
            release_startup_memory()
            try:
                state = confine(sandbox, root_fd)
            except OSError as exc:
                print(f"gateway virtiofsd: confinement failed: {exc}", file=sys.stderr)
                reason = f"confinement failed: {exc}"
                return 1
            log.info("confined %s", kv(**{k: v for k, v in state.as_dict().items() if v}))
        if trail is not None and policy is not None:
            if not trail.lifecycle("start", version=__version__, frontend="virtiofs", export=export,
                                   readonly=readonly, sandbox=state.as_dict() if state else None,
                                   policy_source=policy_source, endpoint=_describe(sock)):
                log.critical("refusing to serve: the start record cannot be written")
                return 1
            trail.lifecycle("policy-load", source=policy_source, rules=len(policy.rules),
                            enforcement=policy.enforcement)
        log.info("waiting for a vhost-user front-end")
        conn, _ = sock.accept()
        sock.close()
        if trail is not None:
            trail.lifecycle("session", session=1, peer=peer_credentials(conn))
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
        if trail is not None:
            trail.lifecycle("stop", reason=reason, decided=gate.decided if gate else 0,
                            denied=gate.denied if gate else 0, sessions=1)
            trail.close()


def _describe(sock: socket.socket) -> str:
    try:
        name = sock.getsockname()
    except OSError:
        return f"fd {sock.fileno()}"
    return name if isinstance(name, str) and name else f"fd {sock.fileno()}"
