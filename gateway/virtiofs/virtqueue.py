"""Split virtqueues (virtio 1.1, 2.6) in guest memory: popping descriptor chains, returning used ones.

The guest writes every byte of the rings and of the descriptor table, so every value read from them is
checked before it is used:

* a head or ``next`` index beyond the table, an INDIRECT descriptor inside an indirect table or with
  NEXT set, an indirect table whose length is not a multiple of 16, a readable descriptor after a
  writable one: ``ChainError``;
* a chain with more descriptors than its table has entries (``num`` for the ring's own table, the
  table's length for an indirect one, at most 65536 since ``next`` is a u16) is a ``ChainError``: it is
  how a loop shows, and it makes every walk end, whatever the tables hold. Linux may build an indirect
  table longer than the queue (a 1 MiB READ is ~260 buffers on a 128-entry queue), so an indirect table
  is bounded by its own size, as rust-vmm's virtio-queue does;
* every buffer address and length goes through ``GuestMemory.translate``, so one outside the memory
  table, or one that wraps, is an error before any byte is touched;
* an avail index more than ``num`` ahead of what was consumed is a ``QueueError`` (the ring is broken,
  not one request).

Memory ordering: the guest publishes a ring entry, then (after a barrier) the index; we read the index,
then the entry, and write a used entry, then the index. CPython does each access as a plain load or
store through the mapping, in program order, which x86's TSO keeps in order between CPUs. A port to a
weakly ordered CPU needs explicit fences here (the compiled data plane will carry them).

EVENT_IDX (virtio 2.6.7/2.6.8) is supported when negotiated: ``should_notify`` applies the used_event
test, and ``pop`` publishes avail_event so the guest kicks only when there is new work.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from gateway.virtiofs.memory import GuestMemory, GuestMemoryError
from gateway.virtiofs.vhost_user import VringState

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1

DESC = struct.Struct("<QIHH")  # struct virtq_desc: addr, len, flags, next
U16 = struct.Struct("<H")
USED_ELEM = struct.Struct("<II")  # struct virtq_used_elem: id, len
MAX_INDIRECT = 1 << 16  # entries an indirect table may have: `next` is a u16
MAX_CHAIN_BYTES = (1 << 32) - 1  # used_elem.len is a u32: a chain may not claim more


class QueueError(Exception):
    """The ring itself is inconsistent: the queue cannot be served any further."""


class ChainError(Exception):
    """One descriptor chain is malformed. ``head`` is returned to the used ring with length 0."""

    def __init__(self, head: int, reason: str) -> None:
        super().__init__(f"chain {head}: {reason}")
        self.head = head
        self.reason = reason


@dataclass
class DescriptorChain:
    """One request: the device-readable buffers, then the device-writable ones, already translated."""

    head: int
    readable: list[memoryview] = field(default_factory=list)
    writable: list[memoryview] = field(default_factory=list)

    @property
    def readable_len(self) -> int:
        return sum(len(v) for v in self.readable)

    @property
    def writable_len(self) -> int:
        return sum(len(v) for v in self.writable)

    def read_all(self) -> bytes:
        return b"".join(bytes(v) for v in self.readable)

    def write_all(self, data: bytes | bytearray | memoryview) -> int:
        """Scatter ``data`` over the writable buffers; what does not fit is an error, not truncated."""
        if len(data) > self.writable_len:
            raise ChainError(self.head, f"reply of {len(data)} bytes, room for {self.writable_len}")
        src = memoryview(data)
        pos = 0
        for v in self.writable:
            if pos >= len(src):
                break
            n = min(len(v), len(src) - pos)
            v[:n] = src[pos:pos + n]
            pos += n
        return pos


class Virtqueue:
    """One started ring. ``state`` is the vhost-user VringState: its ``base`` is advanced as chains are
    popped, so GET_VRING_BASE reports where processing stopped."""

    def __init__(self, memory: GuestMemory, state: VringState, *, event_idx: bool = False,
                 indirect: bool = True) -> None:
        num = state.num
        if not num or num & (num - 1):
            raise QueueError(f"queue size {num}")
        self.memory = memory
        self.state = state
        self.num = num
        self.event_idx = event_idx
        self.indirect = indirect
        try:
            self._desc = memory.translate_uva(state.desc_addr, DESC.size * num)
            # avail: flags, idx, ring[num], used_event; used: flags, idx, ring[num], avail_event.
            self._avail = memory.translate_uva(state.avail_addr, 4 + 2 * num + 2)
            self._used = memory.translate_uva(state.used_addr, 4 + USED_ELEM.size * num + 2)
        except GuestMemoryError as exc:
            raise QueueError(str(exc)) from exc
        self.next_used = U16.unpack_from(self._used, 2)[0]
        self._signalled_used: int | None = None

    # --- the avail ring ---------------------------------------------------------------------------
    def pending(self) -> int:
        avail_idx = U16.unpack_from(self._avail, 2)[0]
        ahead = (avail_idx - self.state.base) & 0xFFFF
        if ahead > self.num:
            raise QueueError(f"avail index {avail_idx} is {ahead} ahead of {self.state.base} "
                             f"(size {self.num})")
        return ahead

    def pop(self) -> DescriptorChain | None:
        """The next available chain, or None. A malformed chain is consumed and raised as ChainError
        (the caller returns its head with ``push(head, 0)``)."""
        if not self.pending():
            if self.event_idx:
                self._publish_avail_event()
            return None
        slot = self.state.base % self.num
        head = U16.unpack_from(self._avail, 4 + 2 * slot)[0]
        self.state.base = (self.state.base + 1) & 0xFFFF
        if self.event_idx:
            self._publish_avail_event()
        return self.walk(head)

    def _publish_avail_event(self) -> None:
        U16.pack_into(self._used, 4 + USED_ELEM.size * self.num, self.state.base)

    # --- descriptor chains -----------------------------------------------------------------------
    def walk(self, head: int) -> DescriptorChain:
        if head >= self.num:
            raise ChainError(head, f"head {head} beyond the table ({self.num})")
        chain = DescriptorChain(head)
        table, size = self._desc, self.num
        index = head
        seen, limit = 0, self.num
        total = 0
        in_indirect = False
        while True:
            seen += 1
            if seen > limit:
                raise ChainError(head, f"more than {limit} descriptors (a loop?)")
            addr, length, flags, nxt = DESC.unpack_from(table, DESC.size * index)
            if flags & VIRTQ_DESC_F_INDIRECT:
                if not self.indirect:
                    raise ChainError(head, "INDIRECT_DESC was not negotiated")
                if in_indirect:
                    raise ChainError(head, "an indirect descriptor inside an indirect table")
                if flags & VIRTQ_DESC_F_NEXT:
                    raise ChainError(head, "INDIRECT and NEXT together")
                if length == 0 or length % DESC.size or length > DESC.size * MAX_INDIRECT:
                    raise ChainError(head, f"indirect table of {length} bytes")
                try:
                    table = self.memory.contiguous(addr, length)
                except GuestMemoryError as exc:
                    raise ChainError(head, str(exc)) from exc
                size = limit = length // DESC.size
                index = seen = 0
                in_indirect = True
                continue
            total += length
            if total > MAX_CHAIN_BYTES:
                raise ChainError(head, "more than 4 GiB in one chain")
            try:
                views = self.memory.translate(addr, length)
            except GuestMemoryError as exc:
                raise ChainError(head, str(exc)) from exc
            if flags & VIRTQ_DESC_F_WRITE:
                chain.writable.extend(views)
            elif chain.writable:
                raise ChainError(head, "a readable descriptor after a writable one")
            else:
                chain.readable.extend(views)
            if not flags & VIRTQ_DESC_F_NEXT:
                return chain
            if nxt >= size:
                raise ChainError(head, f"next {nxt} beyond the table ({size})")
            index = nxt

    # --- the used ring ---------------------------------------------------------------------------
    def push(self, head: int, written: int) -> None:
        slot = self.next_used % self.num
        USED_ELEM.pack_into(self._used, 4 + USED_ELEM.size * slot, head, written)
        self.next_used = (self.next_used + 1) & 0xFFFF
        U16.pack_into(self._used, 2, self.next_used)  # after the element: see "Memory ordering"

    def should_notify(self) -> bool:
        """Whether the guest wants an interrupt for what was pushed since the last notification."""
        if not self.event_idx:
            return not U16.unpack_from(self._avail, 0)[0] & VIRTQ_AVAIL_F_NO_INTERRUPT
        old, new = self._signalled_used, self.next_used
        self._signalled_used = new
        if old is None:
            return True
        used_event = U16.unpack_from(self._avail, 4 + 2 * self.num)[0]
        # vring_need_event: notify when used_event lies in (old, new], in 16-bit arithmetic.
        return ((new - used_event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)
