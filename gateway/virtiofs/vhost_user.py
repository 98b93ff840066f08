"""The vhost-user control channel, back-end side, as a sans-IO state machine (the model is h11).

QEMU (the front-end) connects to a Unix socket and sends messages: a 12-byte header (request u32,
flags u32, size u32, little-endian) and ``size`` payload bytes, with file descriptors attached over
SCM_RIGHTS (memory regions, eventfds). ``Backend.feed(data, fds)`` takes what one ``recvmsg`` returned
and gives back a list of events: replies to send, configuration the data plane must act on, fds it must
close, or one final ``Disconnect``. No socket, no mmap, no syscall happens here, and no input escapes as
an exception: anything malformed or unexpected is a NACK (when the front-end asked for one with
REPLY_ACK) or a ``Disconnect`` with a reason.

Names and numbers follow QEMU's docs/interop/vhost-user.rst and hw/virtio/vhost-user.c.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from gateway.virtiofs.vhost_user_abi import (
    ADDR,
    DEVICE_FEATURES,
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    HEADER,
    MAX_FDS,
    MAX_PAYLOAD,
    MAX_QUEUE_SIZE,
    MAX_REGIONS,
    MEM_HEAD,
    PROTOCOL_FEATURES,
    REGION,
    STATE,
    U64,
    VERSION,
    VERSION_MASK,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VHOST_VRING_F_LOG,
    VRING_IDX_MASK,
    VRING_NOFD_MASK,
    MemoryRegion,
    ProtocolFeature,
    Req,
)


# --- events -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Reply:
    data: bytes  # send as is; this back-end never attaches fds to a reply


@dataclass(frozen=True)
class FeaturesSet:
    features: int


@dataclass(frozen=True)
class OwnerReset:
    """RESET_OWNER / RESET_DEVICE: every ring is stopped, the memory table is dropped."""


@dataclass(frozen=True)
class MemTableSet:
    regions: tuple[MemoryRegion, ...]
    fds: tuple[int, ...]  # one per region, now owned by the caller (map them, then close them)


@dataclass(frozen=True)
class VringFdSet:
    """SET_VRING_KICK/CALL/ERR. ``fd`` None: the front-end said "no fd" (polling / no notification)."""

    kind: str  # "kick", "call" or "err"
    index: int
    fd: int | None  # owned by the caller; it replaces (and the caller closes) the previous one


@dataclass(frozen=True)
class VringEnabled:
    index: int
    enabled: bool


@dataclass(frozen=True)
class VringStopped:
    """GET_VRING_BASE: the ring must stop; the reply (already queued) carried ``base``."""

    index: int
    base: int


@dataclass(frozen=True)
class CloseFds:
    """Fds that came with a message that takes none, or with one that was refused."""

    fds: tuple[int, ...]


@dataclass(frozen=True)
class Disconnect:
    """Terminal: close the connection. Nothing more is parsed."""

    reason: str


Event = Reply | FeaturesSet | OwnerReset | MemTableSet | VringFdSet | VringEnabled | VringStopped | \
    CloseFds | Disconnect


@dataclass
class VringState:
    """What the front-end configured for one ring. ``base`` is the next avail index to process: the
    data plane advances it (virtqueue.Virtqueue.state), and GET_VRING_BASE reports it."""

    index: int
    num: int = 0
    desc_addr: int = 0  # front-end (QEMU) virtual addresses: translated through userspace_addr
    avail_addr: int = 0
    used_addr: int = 0
    addr_set: bool = False
    base: int = 0
    kick: bool = False  # a kick fd (or "no fd") was given: the ring has started
    enabled: bool = False


class _Refused(Exception):
    """A message this back-end will not act on (internal: it never leaves ``feed``)."""


@dataclass
class Backend:
    """One vhost-user connection, from the back-end's side."""

    num_queues: int = 2  # virtio-fs: the high-priority queue and one request queue
    device_features: int = DEVICE_FEATURES
    protocol_features: int = PROTOCOL_FEATURES
    features: int = 0  # acked by SET_FEATURES
    acked_protocol_features: int = 0
    owner: bool = False
    regions: tuple[MemoryRegion, ...] = ()
    vrings: list[VringState] = field(default_factory=list)
    closed: bool = False
    _buf: bytearray = field(default_factory=bytearray)
    _consumed: int = 0  # stream offset of _buf[0]
    _fds: list[tuple[int, tuple[int, ...]]] = field(default_factory=list)  # (stream offset, fds)

    def __post_init__(self) -> None:
        if not self.vrings:
            self.vrings = [VringState(i) for i in range(self.num_queues)]

    # --- input ------------------------------------------------------------------------------------
    def feed(self, data: bytes, fds: Iterable[int] = ()) -> list[Event]:
        """What one recvmsg returned: bytes, and the fds SCM_RIGHTS attached to their first byte.
        An empty ``data`` is EOF."""
        fds = tuple(fds)
        if self.closed:
            return [CloseFds(fds)] if fds else []
        if not data:
            return self._disconnect([CloseFds(fds)] if fds else [], "front-end closed the connection")
        if fds:
            self._fds.append((self._consumed + len(self._buf), fds))
        self._buf += data
        events: list[Event] = []
        while not self.closed:
            if len(self._buf) < HEADER.size:
                break
            request, flags, size = HEADER.unpack_from(self._buf)
            if flags & VERSION_MASK != VERSION:
                return self._disconnect(events, f"message version {flags & VERSION_MASK}, not 1")
            if flags & FLAG_REPLY:
                return self._disconnect(events, "a reply where a request was expected")
            if size > MAX_PAYLOAD:
                return self._disconnect(events, f"payload of {size} bytes (at most {MAX_PAYLOAD})")
            end = HEADER.size + size
            if len(self._buf) < end:
                break
            payload = bytes(self._buf[HEADER.size:end])
            msg_fds = self._take_fds(self._consumed + end)
            del self._buf[:end]
            self._consumed += end
            self._handle(request, flags, payload, msg_fds, events)
        return events

    def wanted(self) -> int:
        """How many more bytes complete the message being received (the header's, then the payload's).

        The caller reads no more than this: a Unix stream socket delivers fds with the first read that
        touches the message they were sent with, and one read spanning two messages would hand the
        second's fds over with the first's bytes, where they cannot be told apart.
        """
        if len(self._buf) < HEADER.size:
            return HEADER.size - len(self._buf)
        size = HEADER.unpack_from(self._buf)[2]
        return max(1, HEADER.size + min(size, MAX_PAYLOAD) - len(self._buf))

    def _take_fds(self, end: int) -> tuple[int, ...]:
        """The fds attached anywhere inside the message that ends at stream offset ``end``."""
        taken: list[int] = []
        while self._fds and self._fds[0][0] < end:
            taken.extend(self._fds.pop(0)[1])
        return tuple(taken)

    def _disconnect(self, events: list[Event], reason: str) -> list[Event]:
        self.closed = True
        leftover = [fd for _, fds in self._fds for fd in fds]
        self._fds.clear()
        self._buf.clear()
        if leftover:
            events.append(CloseFds(tuple(leftover)))
        events.append(Disconnect(reason))
        return events

    # --- dispatch ---------------------------------------------------------------------------------
    def _handle(self, request: int, flags: int, payload: bytes, fds: tuple[int, ...],
                events: list[Event]) -> None:
        want_ack = bool(flags & FLAG_NEED_REPLY) and self._has(ProtocolFeature.REPLY_ACK)
        handler = _HANDLERS.get(request)
        mark = len(events)
        try:
            if handler is None:
                raise _Refused(f"request {request} is not supported")
            if len(fds) > MAX_FDS:
                raise _Refused(f"{len(fds)} fds on one message")
            replied = handler(self, request, payload, fds, events)
        except _Refused as exc:
            del events[mark:]  # nothing of a refused message takes effect
            if fds:
                events.append(CloseFds(fds))
            if want_ack and request not in _GETTERS:
                events.append(Reply(_reply(request, U64.pack(1))))
                return
            # Without REPLY_ACK the front-end cannot learn of the failure and would carry on with a
            # back-end that ignored part of its configuration; a getter would wait for ever.
            self._disconnect(events, f"{_name(request)}: {exc}")
            return
        if want_ack and not replied:
            events.append(Reply(_reply(request, U64.pack(0))))

    def _has(self, bit: ProtocolFeature) -> bool:
        # QEMU sends SET_PROTOCOL_FEATURES before SET_FEATURES (once GET_FEATURES showed bit 30), so a
        # protocol feature counts from the moment it is set.
        return bool(self.acked_protocol_features >> bit & 1)

    def _vring(self, index: int) -> VringState:
        if not 0 <= index < len(self.vrings):
            raise _Refused(f"vring {index} does not exist ({len(self.vrings)} queues)")
        return self.vrings[index]


def _name(request: int) -> str:
    try:
        return Req(request).name
    except ValueError:
        return f"request {request}"


def _reply(request: int, payload: bytes) -> bytes:
    return HEADER.pack(request, VERSION | FLAG_REPLY, len(payload)) + payload


def _exact(payload: bytes, size: int) -> None:
    if len(payload) != size:
        raise _Refused(f"payload of {len(payload)} bytes, expected {size}")


def _no_fds(fds: tuple[int, ...], events: list[Event]) -> None:
    # Fds on a message that takes none are closed, not kept: they could be anything (libvhost-user does
    # the same). The message itself is still served.
    if fds:
        events.append(CloseFds(fds))


# --- handlers: each returns True when it queued the message's own reply ------------------------------
Fds = tuple[int, ...]
Events = list[Event]

def _get_u64(value_of: Callable[[Backend], int]) -> Callable[..., bool]:
    def handler(b: Backend, request: int, payload: bytes, fds: Fds, events: Events) -> bool:
        if payload not in (b"",) and len(payload) != U64.size:
            raise _Refused(f"payload of {len(payload)} bytes")
        _no_fds(fds, events)
        events.append(Reply(_reply(request, U64.pack(value_of(b)))))
        return True
    return handler


def _set_features(b: Backend, request: int, payload: bytes, fds: Fds, events: Events) -> bool:
    _exact(payload, 8)
    (features,) = U64.unpack(payload)
    if features & ~b.device_features:
        raise _Refused(f"features {features & ~b.device_features:#x} were not offered")
    if any(v.kick for v in b.vrings):
        raise _Refused("features changed while a ring runs")
    _no_fds(fds, events)
    b.features = features
    events.append(FeaturesSet(features))
    return False


def _set_protocol_features(b: Backend, request: int, payload: bytes, fds: Fds, events: Events) -> bool:
    _exact(payload, 8)
    (features,) = U64.unpack(payload)
    if features & ~b.protocol_features:
        raise _Refused(f"protocol features {features & ~b.protocol_features:#x} were not offered")
    _no_fds(fds, events)
    b.acked_protocol_features = features
    return False


def _set_owner(b: Backend, request: int, payload: bytes, fds: Fds, events: Events) -> bool:
    _exact(payload, 0)
    _no_fds(fds, events)
    b.owner = True  # QEMU sends it again after a reconnect; a second one is not an error here
    return False


def _reset(b: Backend, request: int, payload: bytes, fds: Fds, events: Events) -> bool:
    if request == Req.RESET_DEVICE and not b._has(ProtocolFeature.RESET_DEVICE):
        raise _Refused("RESET_DEVICE was not negotiated")
    _exact(payload, 0)
    _no_fds(fds, events)
    b.features = 0
    b.regions = ()
    b.vrings = [VringState(i) for i in range(b.num_queues)]
    events.append(OwnerReset())
    return False


def _set_mem_table(b: Backend, request: int, payload: bytes, fds: Fds, events: Events) -> bool:
    if len(payload) < MEM_HEAD.size:
        raise _Refused("payload shorter than its region count")
    nregions, _padding = MEM_HEAD.unpack_from(payload)
    if not 1 <= nregions <= MAX_REGIONS:
        raise _Refused(f"{nregions} regions (1 to {MAX_REGIONS})")
    _exact(payload, MEM_HEAD.size + nregions * REGION.size)
    if len(fds) != nregions:
        raise _Refused(f"{nregions} regions but {len(fds)} fds")
    regions = tuple(MemoryRegion(*REGION.unpack_from(payload, MEM_HEAD.size + i * REGION.size))
                    for i in range(nregions))
    _check_regions(regions)
    b.regions = regions
    events.append(MemTableSet(regions, fds))
    return False


def _check_regions(regions: tuple[MemoryRegion, ...]) -> None:
    """Sizes nonzero, no range wrapping past 2**64, no two guest-physical ranges overlapping."""
    for r in regions:
        if r.memory_size == 0:
            raise _Refused("a region of size 0")
        for name, start in (("guest_phys_addr", r.guest_phys_addr), ("userspace_addr", r.userspace_addr),
                            ("mmap_offset", r.mmap_offset)):
            if start + r.memory_size > 1 << 64:
                raise _Refused(f"{name} {start:#x} + size {r.memory_size:#x} wraps")
    spans = sorted((r.guest_phys_addr, r.guest_phys_addr + r.memory_size) for r in regions)
    for (_, end), (start, _) in itertools.pairwise(spans):
        if start < end:
            raise _Refused("two regions overlap")
    uspans = sorted((r.userspace_addr, r.userspace_addr + r.memory_size) for r in regions)
    for (_, end), (start, _) in itertools.pairwise(uspans):
        if start < end:
            raise _Refused("two regions overlap in the front-end's address space")


def _set_log_base(b: Backend, request: int, payload: bytes, fds: Fds, events: Events) -> bool:
    # Dirty logging (live migration) was never offered (no LOG_SHMFD, no VHOST_F_LOG_ALL).
    raise _Refused("dirty logging is not supported")


def _set_vring_num(b: Backend, request: int, payload: bytes, fds: Fds, events: Events) -> bool:
    _exact(payload, STATE.size)
    index, num = STATE.unpack(payload)
    ring = b._vring(index)
    if not 1 <= num <= MAX_QUEUE_SIZE or num & (num - 1):
        raise _Refused(f"queue size {num} (a power of two up to {MAX_QUEUE_SIZE})")
    if ring.kick:
        raise _Refused(f"vring {index} resized while running")
    _no_fds(fds, events)
    ring.num = num
    return False


def _set_vring_addr(b: Backend, request: int, payload: bytes, fds: Fds, events: Events) -> bool:
    _exact(payload, ADDR.size)
    index, flags, desc, used, avail, _log = ADDR.unpack(payload)
    ring = b._vring(index)
    if flags & VHOST_VRING_F_LOG:
        raise _Refused("vring dirty logging is not supported")
    if flags & ~VHOST_VRING_F_LOG:
        raise _Refused(f"unknown vring address flags {flags:#x}")
    # Alignment the virtio spec requires of a split ring (2.7): 16, 2 and 4 bytes.
    if desc % 16 or avail % 2 or used % 4:
        raise _Refused("misaligned ring address")
    _no_fds(fds, events)
    ring.desc_addr, ring.used_addr, ring.avail_addr, ring.addr_set = desc, used, avail, True
    return False


def _set_vring_base(b: Backend, request: int, payload: bytes, fds: Fds, events: Events) -> bool:
    _exact(payload, STATE.size)
    index, base = STATE.unpack(payload)
    ring = b._vring(index)
    if base > 0xFFFF:
        raise _Refused(f"ring base {base} beyond a split ring's 16-bit index")
    if ring.kick:
        raise _Refused(f"vring {index} base set while running")
    _no_fds(fds, events)
    ring.base = base
    return False


def _get_vring_base(b: Backend, request: int, payload: bytes, fds: Fds, events: Events) -> bool:
    _exact(payload, STATE.size)
    index, _num = STATE.unpack(payload)
    ring = b._vring(index)
    _no_fds(fds, events)
    # The spec: GET_VRING_BASE stops the ring; it starts again with the next SET_VRING_KICK.
    ring.kick = False
    events.append(Reply(_reply(request, STATE.pack(index, ring.base))))
    events.append(VringStopped(index, ring.base))
    return True


_FD_KIND = {Req.SET_VRING_KICK: "kick", Req.SET_VRING_CALL: "call", Req.SET_VRING_ERR: "err"}


def _set_vring_fd(b: Backend, request: int, payload: bytes, fds: Fds, events: Events) -> bool:
    _exact(payload, 8)
    (value,) = U64.unpack(payload)
    if value & ~(VRING_IDX_MASK | VRING_NOFD_MASK):
        raise _Refused(f"unknown bits in {value:#x}")
    ring = b._vring(value & VRING_IDX_MASK)
    nofd = bool(value & VRING_NOFD_MASK)
    if len(fds) != (0 if nofd else 1):
        raise _Refused(f"{len(fds)} fds where {'none' if nofd else 'one'} belongs")
    kind = _FD_KIND[Req(request)]
    if kind == "kick":
        if not (ring.num and ring.addr_set):
            raise _Refused(f"vring {ring.index} kicked before its size and addresses were set")
        ring.kick = True
        if not b.features & VHOST_USER_F_PROTOCOL_FEATURES:
            ring.enabled = True  # without protocol features a ring starts enabled (spec, "Ring states")
    events.append(VringFdSet(kind, ring.index, None if nofd else fds[0]))
    return False


def _set_vring_enable(b: Backend, request: int, payload: bytes, fds: Fds, events: Events) -> bool:
    if not b.features & VHOST_USER_F_PROTOCOL_FEATURES:
        raise _Refused("SET_VRING_ENABLE without VHOST_USER_F_PROTOCOL_FEATURES")
    _exact(payload, STATE.size)
    index, enable = STATE.unpack(payload)
    ring = b._vring(index)
    if enable not in (0, 1):
        raise _Refused(f"enable value {enable}")
    _no_fds(fds, events)
    ring.enabled = bool(enable)
    events.append(VringEnabled(index, ring.enabled))
    return False


_HANDLERS = {
    Req.GET_FEATURES: _get_u64(lambda b: b.device_features),
    Req.SET_FEATURES: _set_features,
    Req.SET_OWNER: _set_owner,
    Req.RESET_OWNER: _reset,
    Req.RESET_DEVICE: _reset,
    Req.SET_MEM_TABLE: _set_mem_table,
    Req.SET_LOG_BASE: _set_log_base,
    Req.SET_VRING_NUM: _set_vring_num,
    Req.SET_VRING_ADDR: _set_vring_addr,
    Req.SET_VRING_BASE: _set_vring_base,
    Req.GET_VRING_BASE: _get_vring_base,
    Req.SET_VRING_KICK: _set_vring_fd,
    Req.SET_VRING_CALL: _set_vring_fd,
    Req.SET_VRING_ERR: _set_vring_fd,
    Req.GET_PROTOCOL_FEATURES: _get_u64(lambda b: b.protocol_features),
    Req.SET_PROTOCOL_FEATURES: _set_protocol_features,
    Req.GET_QUEUE_NUM: _get_u64(lambda b: b.num_queues),
    Req.SET_VRING_ENABLE: _set_vring_enable,
}
# Requests whose answer is their own reply: refusing one can only be a disconnect (a NACK would be read
# as the value asked for).
_GETTERS = {Req.GET_FEATURES, Req.GET_PROTOCOL_FEATURES, Req.GET_QUEUE_NUM, Req.GET_VRING_BASE,
            Req.GET_CONFIG, Req.GET_INFLIGHT_FD, Req.GET_MAX_MEM_SLOTS, Req.GET_STATUS,
            Req.GET_SHARED_OBJECT, Req.SET_LOG_BASE, Req.POSTCOPY_ADVISE, Req.CHECK_DEVICE_STATE}

