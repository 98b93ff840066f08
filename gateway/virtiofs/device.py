"""One vhost-user-fs device: the control channel's events applied, the queues served.

It owns what the events hand over (the memory table's mappings, the kick/call/err eventfds) and turns
each available chain into one FUSE request for the file system and one reply in the used ring. The
socket itself stays with the daemon: ``control(data, fds)`` returns the bytes to send back.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from gateway.logfmt import kv
from gateway.virtiofs import vhost_user as vu
from gateway.virtiofs.fuse_decode import Malformed, decode
from gateway.virtiofs.fuse_encode import reply_error
from gateway.virtiofs.fuse_requests import Request
from gateway.virtiofs.memory import GuestMemory, GuestMemoryError
from gateway.virtiofs.vhost_user_abi import VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC
from gateway.virtiofs.virtqueue import ChainError, QueueError, Virtqueue

log = logging.getLogger("gateway.virtiofs")


class FileSystem(Protocol):
    def handle(self, req: Request | Malformed) -> bytes | None: ...


@dataclass
class _Ring:
    kick: int | None = None
    call: int | None = None
    err: int | None = None
    queue: Virtqueue | None = None


@dataclass
class Device:
    fs: FileSystem
    backend: vu.Backend = field(default_factory=vu.Backend)
    memory: GuestMemory | None = None
    rings: list[_Ring] = field(default_factory=list)
    closed_reason: str | None = None

    def __post_init__(self) -> None:
        self.rings = [_Ring() for _ in range(self.backend.num_queues)]

    # --- the control channel -------------------------------------------------------------------------
    def control(self, data: bytes, fds: Iterable[int] = ()) -> bytes:
        """Feed what the socket delivered; the bytes to send back. ``closed_reason`` is set when the
        connection must end."""
        out = bytearray()
        for event in self.backend.feed(data, fds):
            if isinstance(event, vu.Reply):
                out += event.data
            elif isinstance(event, vu.CloseFds):
                _close(event.fds)
            elif isinstance(event, vu.MemTableSet):
                self._set_memory(event)
            elif isinstance(event, vu.VringFdSet):
                self._set_fd(event)
            elif isinstance(event, vu.VringEnabled):
                self._maybe_start(event.index)
            elif isinstance(event, vu.VringStopped):
                self.rings[event.index].queue = None
            elif isinstance(event, vu.OwnerReset):
                self._drop_rings()
                self._drop_memory()
            elif isinstance(event, vu.FeaturesSet):
                log.info("features %s", kv(
                    features=f"{event.features:#x}",
                    event_idx="on" if event.features & VIRTIO_RING_F_EVENT_IDX else "off",
                    indirect_desc="on" if event.features & VIRTIO_RING_F_INDIRECT_DESC else "off",
                ))
            elif isinstance(event, vu.Disconnect):
                self.closed_reason = event.reason
        return bytes(out)

    def _set_memory(self, event: vu.MemTableSet) -> None:
        self._drop_memory()
        try:
            self.memory = GuestMemory(event.regions, event.fds)
        except GuestMemoryError as exc:
            # QEMU was told "ok" (or nothing) already; without memory no queue can start, and each
            # attempt is logged. A front-end that sends fds we cannot map is broken: end it.
            self.closed_reason = f"memory table: {exc}"
        finally:
            _close(event.fds)
        for index in range(len(self.rings)):  # a new table (hotplug) moves the rings too
            if self.rings[index].queue is not None:
                self.rings[index].queue = None
                self._maybe_start(index)

    def _set_fd(self, event: vu.VringFdSet) -> None:
        ring = self.rings[event.index]
        old = getattr(ring, event.kind)
        if old is not None:
            _close((old,))
        setattr(ring, event.kind, event.fd)
        if event.kind == "kick":
            ring.queue = None
            self._maybe_start(event.index)

    def _maybe_start(self, index: int) -> None:
        state = self.backend.vrings[index]
        ring = self.rings[index]
        if ring.queue is not None or not state.kick or self.memory is None:
            return
        features = self.backend.features
        try:
            ring.queue = Virtqueue(self.memory, state, event_idx=bool(features & VIRTIO_RING_F_EVENT_IDX),
                                   indirect=bool(features & VIRTIO_RING_F_INDIRECT_DESC))
        except QueueError as exc:
            self.closed_reason = f"vring {index}: {exc}"

    def _drop_rings(self) -> None:
        for ring in self.rings:
            _close(fd for fd in (ring.kick, ring.call, ring.err) if fd is not None)
        self.rings = [_Ring() for _ in range(self.backend.num_queues)]

    def _drop_memory(self) -> None:
        for ring in self.rings:
            ring.queue = None
        if self.memory is not None:
            self.memory.close()
            self.memory = None

    def close(self) -> None:
        self._drop_rings()
        self._drop_memory()

    # --- the queues ----------------------------------------------------------------------------------
    def kick_fds(self) -> dict[int, int]:
        """fd -> ring index, for the rings that are served now."""
        return {ring.kick: i for i, ring in enumerate(self.rings)
                if ring.kick is not None and ring.queue is not None and self.backend.vrings[i].enabled}

    def kicked(self, index: int) -> None:
        ring = self.rings[index]
        if ring.kick is not None:
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(ring.kick)
        self.serve(index)

    def serve(self, index: int) -> int:
        """Every available chain of one ring; returns how many were served."""
        ring = self.rings[index]
        queue = ring.queue
        if queue is None or not self.backend.vrings[index].enabled:
            return 0
        served = 0
        try:
            while True:
                try:
                    chain = queue.pop()
                except ChainError as exc:
                    log.warning("virtiofs: bad chain %s", kv(error=str(exc)))
                    queue.push(exc.head, 0)
                    served += 1
                    continue
                if chain is None:
                    if queue.pending():  # one that arrived while avail_event was published
                        continue
                    break
                request = decode(chain.read_all())
                try:
                    reply = self.fs.handle(request)
                except Exception:
                    # A bug of ours must not take the guest's file system down with it: this request
                    # fails (EIO), the loop goes on, and the log says what happened.
                    log.exception("virtiofs: serving failed %s", kv(request=type(request).__name__))
                    reply = reply_error(request.unique, errno.EIO)
                written = 0
                if reply is not None:
                    try:
                        written = chain.write_all(reply)
                    except ChainError:
                        # No room for the reply: the header alone says so, if even that fits.
                        unique = int.from_bytes(reply[8:16], "little")
                        with contextlib.suppress(ChainError):
                            written = chain.write_all(reply_error(unique, errno.EOVERFLOW))
                queue.push(chain.head, written)
                served += 1
        except QueueError as exc:
            self.closed_reason = f"vring {index}: {exc}"
            ring.queue = None
        if served and ring.call is not None and (queue.should_notify() or ring.queue is None):
            os.eventfd_write(ring.call, 1)
        return served


def _close(fds: Iterable[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
