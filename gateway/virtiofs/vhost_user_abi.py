"""vhost-user wire constants and layouts (QEMU's docs/interop/vhost-user.rst, hw/virtio/vhost-user.c),
and builders of front-end messages for tests and tools."""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable
from dataclasses import dataclass

# --- the header (VhostUserHeader) -------------------------------------------------------------------
HEADER = struct.Struct("<III")
VERSION = 0x1
VERSION_MASK = 0x3
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8
# The largest payload we ever accept. SET_MEM_TABLE with 8 regions is 264 bytes, GET/SET_CONFIG at most
# 268; anything bigger is not a message we would act on, and buffering it would let the front-end make
# us hold arbitrary amounts of memory.
MAX_PAYLOAD = 4096
MAX_FDS = 8  # VHOST_MEMORY_BASELINE_NREGIONS: the most fds one message carries
MAX_REGIONS = 8
MAX_QUEUE_SIZE = 32768  # the virtio limit for a split ring


class Req(enum.IntEnum):
    """VhostUserRequest (front-end to back-end)."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43


class ProtocolFeature(enum.IntEnum):
    """VhostUserProtocolFeature bit numbers."""

    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16


# Virtio device feature bits (virtio spec 6, include/uapi/linux/virtio_*.h).
VIRTIO_RING_F_INDIRECT_DESC = 1 << 28
VIRTIO_RING_F_EVENT_IDX = 1 << 29
VHOST_USER_F_PROTOCOL_FEATURES = 1 << 30
VIRTIO_F_VERSION_1 = 1 << 32

# What this back-end offers. Split rings only (no RING_PACKED), no IOMMU, no dirty logging (so no
# VHOST_F_LOG_ALL and no LOG_SHMFD: live migration is refused rather than silently corrupted).
# EVENT_IDX is offered: virtqueue.py implements both the used_event test and the avail_event update.
DEVICE_FEATURES = (VIRTIO_F_VERSION_1 | VIRTIO_RING_F_INDIRECT_DESC | VIRTIO_RING_F_EVENT_IDX
                   | VHOST_USER_F_PROTOCOL_FEATURES)
# MQ: QEMU then asks GET_QUEUE_NUM and checks the device's queues fit. REPLY_ACK: QEMU learns of a
# failed SET_* instead of carrying on with a back-end that ignored it. CONFIG is not offered: the
# virtio-fs config space (tag, num_request_queues) stays QEMU's.
PROTOCOL_FEATURES = (1 << ProtocolFeature.MQ) | (1 << ProtocolFeature.REPLY_ACK)

U64 = struct.Struct("<Q")
STATE = struct.Struct("<II")  # struct vhost_vring_state: index, num
ADDR = struct.Struct("<IIQQQQ")  # struct vhost_vring_addr: index, flags, desc, used, avail, log
MEM_HEAD = struct.Struct("<II")  # VhostUserMemory: nregions, padding
REGION = struct.Struct("<QQQQ")  # VhostUserMemoryRegion
VRING_IDX_MASK = 0xFF
VRING_NOFD_MASK = 0x100
VHOST_VRING_F_LOG = 0x1


@dataclass(frozen=True)
class MemoryRegion:
    """VhostUserMemoryRegion: guest-physical range, where QEMU maps it, and where it is in its fd."""

    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int


# --- for tests and tools: building messages as the front-end does ------------------------------------
def message(request: int, payload: bytes = b"", need_reply: bool = False) -> bytes:
    return HEADER.pack(request, VERSION | (FLAG_NEED_REPLY if need_reply else 0), len(payload)) + payload


def u64(value: int) -> bytes:
    return U64.pack(value)


def vring_state(index: int, num: int) -> bytes:
    return STATE.pack(index, num)


def vring_addr(index: int, desc: int, used: int, avail: int, flags: int = 0, log: int = 0) -> bytes:
    return ADDR.pack(index, flags, desc, used, avail, log)


def mem_table(regions: Iterable[MemoryRegion]) -> bytes:
    regions = list(regions)
    return MEM_HEAD.pack(len(regions), 0) + b"".join(
        REGION.pack(r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset) for r in regions)


def parse_reply(data: bytes) -> tuple[int, int, bytes]:
    """(request, flags, payload) of one reply this back-end sent."""
    request, flags, size = HEADER.unpack_from(data)
    return request, flags, data[HEADER.size:HEADER.size + size]
