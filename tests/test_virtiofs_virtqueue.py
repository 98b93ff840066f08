"""Guest memory and split virtqueues laid out in memfds, as a guest driver would lay them out
(gateway/virtiofs/memory.py, gateway/virtiofs/virtqueue.py), hostile layouts included."""

from __future__ import annotations

import ctypes
import os
import struct
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.virtiofs.memory import GuestMemory, GuestMemoryError
from gateway.virtiofs.vhost_user import VringState
from gateway.virtiofs.vhost_user_abi import MemoryRegion
from gateway.virtiofs.virtqueue import (
    VIRTQ_DESC_F_INDIRECT as INDIRECT,
)
from gateway.virtiofs.virtqueue import (
    VIRTQ_DESC_F_NEXT as NEXT,
)
from gateway.virtiofs.virtqueue import (
    VIRTQ_DESC_F_WRITE as WRITE,
)
from gateway.virtiofs.virtqueue import ChainError, DescriptorChain, QueueError, Virtqueue

UVA = 0x7F0000000000  # where "QEMU" maps guest-physical 0
A_GPA, A_SIZE = 0x10000, 0x10000
B_GPA, B_SIZE, B_OFFSET = 0x20000, 0x8000, 0x1000  # adjacent to A, at an offset in its memfd
NUM = 16
DESC_GPA, AVAIL_GPA, USED_GPA = 0x10000, 0x10400, 0x10800
DATA_GPA = 0x11000


def regions() -> list[MemoryRegion]:
    return [MemoryRegion(A_GPA, A_SIZE, UVA + A_GPA, 0), MemoryRegion(B_GPA, B_SIZE, UVA + B_GPA, B_OFFSET)]


def memfds() -> list[int]:
    a = os.memfd_create("guest-a")
    os.ftruncate(a, A_SIZE)
    b = os.memfd_create("guest-b")
    os.ftruncate(b, B_OFFSET + B_SIZE)
    return [a, b]


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    fds = memfds()
    m = GuestMemory(regions(), fds)
    for fd in fds:
        os.close(fd)  # the mappings outlive the fds, as they will in the daemon
    yield m
    m.close()


class Guest:
    """The driver's side: writes descriptors and avail entries, reads the used ring."""

    def __init__(self, mem: GuestMemory, num: int = NUM) -> None:
        self.mem, self.num, self.avail_idx = mem, num, 0

    def desc(self, i: int, addr: int, length: int, flags: int = 0, nxt: int = 0,
             table: int = DESC_GPA) -> None:
        self.mem.write(table + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))

    def offer(self, head: int) -> None:
        self.mem.write(AVAIL_GPA + 4 + 2 * (self.avail_idx % self.num), struct.pack("<H", head))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.mem.write(AVAIL_GPA + 2, struct.pack("<H", self.avail_idx))

    def used(self) -> tuple[int, list[tuple[int, int]]]:
        idx = struct.unpack("<H", self.mem.read(USED_GPA + 2, 2))[0]
        elems = [struct.unpack("<II", self.mem.read(USED_GPA + 4 + 8 * i, 8))
                 for i in range(min(idx, self.num))]
        return idx, elems

    def queue(self, **kw: bool) -> Virtqueue:
        state = VringState(0, num=self.num, desc_addr=UVA + DESC_GPA, avail_addr=UVA + AVAIL_GPA,
                           used_addr=UVA + USED_GPA, addr_set=True)
        return Virtqueue(self.mem, state, **kw)


# --- guest memory -------------------------------------------------------------------------------------
def test_translation_and_bounds(mem: GuestMemory) -> None:
    mem.write(0x12345, b"hello")
    assert mem.read(0x12345, 5) == b"hello"
    assert mem.translate(0x12345, 0) == []
    # A buffer straddling the two adjacent regions comes back in two pieces, the second at B's offset.
    mem.write(A_GPA + A_SIZE - 3, b"abcdef")
    parts = mem.translate(A_GPA + A_SIZE - 3, 6)
    assert [bytes(p) for p in parts] == [b"abc", b"def"]
    for gpa, length in ((0x0, 1), (A_GPA - 1, 2), (B_GPA + B_SIZE - 1, 2), (B_GPA + B_SIZE, 1),
                        (2**64 - 16, 32), (2**64 - 1, 1), (A_GPA, 2**64), (-1, 1), (A_GPA, -1)):
        with pytest.raises(GuestMemoryError):
            mem.translate(gpa, length)
    assert bytes(mem.translate_uva(UVA + 0x10010, 4)) == bytes(mem.translate(0x10010, 4)[0])
    with pytest.raises(GuestMemoryError):
        mem.translate_uva(UVA + A_GPA + A_SIZE - 2, 4)  # a ring may not straddle regions
    with pytest.raises(GuestMemoryError):
        mem.contiguous(A_GPA + A_SIZE - 3, 6)


def test_a_memfd_shorter_than_its_region_is_refused_not_mapped() -> None:
    """Touching a mapping past the end of its file is SIGBUS: the size is checked before mapping."""
    fd = os.memfd_create("short")
    os.ftruncate(fd, 4096)
    try:
        with pytest.raises(GuestMemoryError):
            GuestMemory([MemoryRegion(0, 8192, UVA, 0)], [fd])
        with pytest.raises(GuestMemoryError):
            GuestMemory([MemoryRegion(0, 4096, UVA, 4096)], [fd])
    finally:
        os.close(fd)


# --- chains -------------------------------------------------------------------------------------------
def test_a_fuse_shaped_chain(mem: GuestMemory) -> None:
    """in header + args readable, out header + reply writable, as virtio_fs builds a request."""
    g = Guest(mem)
    mem.write(DATA_GPA, b"I" * 40 + b"name\0")
    g.desc(3, DATA_GPA, 40, NEXT, 5)
    g.desc(5, DATA_GPA + 40, 5, NEXT, 0)
    g.desc(0, DATA_GPA + 0x100, 16, NEXT | WRITE, 7)
    g.desc(7, DATA_GPA + 0x200, 128, WRITE)
    g.offer(3)
    q = g.queue()
    assert q.pending() == 1
    chain = q.pop()
    assert chain is not None and chain.head == 3
    assert chain.read_all() == b"I" * 40 + b"name\0"
    assert chain.writable_len == 144
    assert chain.write_all(b"O" * 20) == 20
    assert mem.read(DATA_GPA + 0x100, 16) == b"O" * 16 and mem.read(DATA_GPA + 0x200, 4) == b"OOOO\0"[:4]
    q.push(chain.head, 20)
    assert g.used() == (1, [(3, 20)])
    assert q.state.base == 1 and q.pop() is None
    with pytest.raises(ChainError):
        chain.write_all(b"x" * 145)  # a reply that does not fit is refused, not cut


def test_indirect_table(mem: GuestMemory) -> None:
    g = Guest(mem)
    table = 0x13000
    g.desc(0, DATA_GPA, 8, NEXT, 1, table=table)
    g.desc(1, DATA_GPA + 8, 8, WRITE, 0, table=table)
    g.desc(2, table, 32, INDIRECT)
    g.offer(2)
    chain = g.queue().pop()
    assert chain is not None and chain.readable_len == 8 and chain.writable_len == 8


@pytest.mark.parametrize("layout, why", [
    ([(0, DATA_GPA, 8, NEXT, 1), (1, DATA_GPA, 8, NEXT, 0)], "loop"),
    ([(0, DATA_GPA, 8, NEXT, 0)], "self-loop"),
    ([(i, DATA_GPA, 8, NEXT | WRITE, (i + 1) % NUM) for i in range(NUM)], "chain longer than the queue"),
    ([(0, DATA_GPA, 8, NEXT, NUM)], "next beyond the table"),
    ([(0, 0x5000, 8, 0, 0)], "address outside the table"),
    ([(0, B_GPA + B_SIZE - 4, 8, 0, 0)], "length running off the table"),
    ([(0, 2**64 - 0x1000, 0x2000, 0, 0)], "length that wraps"),
    ([(0, DATA_GPA, 0xFFFFFFFF, 0, 0)], "4 GiB buffer"),
    ([(0, DATA_GPA, 8, WRITE | NEXT, 1), (1, DATA_GPA, 8, 0, 0)], "readable after writable"),
    ([(0, 0x13000, 32, INDIRECT | NEXT, 1)], "INDIRECT with NEXT"),
    ([(0, 0x13000, 24, INDIRECT, 0)], "indirect length not a multiple of 16"),
    ([(0, 0x13000, 0, INDIRECT, 0)], "empty indirect table"),
    ([(0, 0x5000, 32, INDIRECT, 0)], "indirect table outside memory"),
    ([(0, A_GPA + A_SIZE - 16, 32, INDIRECT, 0)], "indirect table straddling regions"),
])
def test_hostile_chains_are_errors(mem: GuestMemory, layout: list, why: str) -> None:
    g = Guest(mem)
    for i, addr, length, flags, nxt in layout:
        g.desc(i, addr, length, flags, nxt)
    g.offer(0)
    q = g.queue()
    with pytest.raises(ChainError) as err:
        q.pop()
    assert err.value.head == 0, why
    q.push(err.value.head, 0)  # the chain is returned, the queue goes on
    assert q.pop() is None and g.used()[0] == 1


def test_hostile_indirect_tables(mem: GuestMemory) -> None:
    g = Guest(mem)
    table = 0x13000
    g.desc(0, DATA_GPA, 8, NEXT, 1, table=table)
    g.desc(1, DATA_GPA, 8, NEXT, 0, table=table)  # a loop inside the indirect table
    g.desc(0, table, 32, INDIRECT)
    g.desc(0, 0x14000, 16, INDIRECT, table=0x14000)  # an indirect table pointing to itself
    g.desc(1, 0x14000, 16, INDIRECT)
    g.desc(0, DATA_GPA, 8, NEXT, 2, table=0x15000)  # next beyond a 2-entry table
    g.desc(2, 0x15000, 32, INDIRECT)
    q = g.queue()
    for head in (0, 1, 2):
        g.offer(head)
        with pytest.raises(ChainError):
            q.pop()
    with pytest.raises(ChainError, match="not negotiated"):
        Guest(mem).queue(indirect=False).walk(0)


def test_head_beyond_the_table(mem: GuestMemory) -> None:
    g = Guest(mem)
    g.offer(NUM)
    with pytest.raises(ChainError):
        g.queue().pop()


def test_avail_index_too_far_ahead_breaks_the_queue(mem: GuestMemory) -> None:
    g = Guest(mem)
    mem.write(AVAIL_GPA + 2, struct.pack("<H", NUM + 1))
    with pytest.raises(QueueError):
        g.queue().pop()


def test_rings_outside_the_table_are_refused(mem: GuestMemory) -> None:
    for desc, avail, used in ((0x5000, AVAIL_GPA, USED_GPA), (DESC_GPA, B_GPA + B_SIZE - 8, USED_GPA),
                              (DESC_GPA, AVAIL_GPA, A_GPA + A_SIZE - 8), (2**64 - 64, AVAIL_GPA, USED_GPA)):
        state = VringState(0, num=NUM, desc_addr=UVA + desc if desc < 2**63 else desc,
                           avail_addr=UVA + avail, used_addr=UVA + used, addr_set=True)
        with pytest.raises(QueueError):
            Virtqueue(mem, state)


def test_ring_wraps_around_the_16_bit_index(mem: GuestMemory) -> None:
    g = Guest(mem)
    g.avail_idx = 0xFFFE
    mem.write(AVAIL_GPA + 2, struct.pack("<H", 0xFFFE))
    mem.write(USED_GPA + 2, struct.pack("<H", 0xFFFE))
    q = g.queue()
    q.state.base = 0xFFFE
    g.desc(1, DATA_GPA, 4, WRITE)
    for _ in range(4):
        g.offer(1)
        chain = q.pop()
        assert chain is not None
        q.push(chain.head, 4)
    assert q.state.base == 2 and q.next_used == 2


# --- notifications ------------------------------------------------------------------------------------
def test_no_interrupt_flag_without_event_idx(mem: GuestMemory) -> None:
    q = Guest(mem).queue()
    assert q.should_notify()
    mem.write(AVAIL_GPA, struct.pack("<H", 1))  # VIRTQ_AVAIL_F_NO_INTERRUPT
    assert not q.should_notify()


def test_event_idx(mem: GuestMemory) -> None:
    g = Guest(mem)
    q = g.queue(event_idx=True)
    g.desc(1, DATA_GPA, 4, WRITE)
    used_event_at = AVAIL_GPA + 4 + 2 * NUM
    avail_event_at = USED_GPA + 4 + 8 * NUM
    mem.write(used_event_at, struct.pack("<H", 2))  # "interrupt me once used idx passes 2"
    assert q.should_notify()  # the first notification always goes out
    for expected in (False, False, True, False):  # used idx 1, 2, 3, 4
        g.offer(1)
        q.push(q.pop().head, 4)
        assert struct.unpack("<H", mem.read(avail_event_at, 2))[0] == q.state.base  # avail_event published
        assert q.should_notify() is expected, q.next_used


# --- properties ---------------------------------------------------------------------------------------
def _address(view: memoryview) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(view)) if len(view) else 0


_addr = st.one_of(st.integers(A_GPA, B_GPA + B_SIZE),
                  st.sampled_from([0, A_GPA - 8, B_GPA - 4, B_GPA + B_SIZE - 4, 0x13000, 2**64 - 8, 2**63]),
                  st.integers(0, 2**64 - 1))
_len = st.one_of(st.integers(0, 64), st.sampled_from([16, 32, 48, 0x1000, 0x8000, 0xFFFFFFFF]),
                 st.integers(0, 2**32 - 1))
_desc = st.tuples(_addr, _len, st.integers(0, 7), st.integers(0, NUM + 2))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(table=st.lists(_desc, min_size=NUM, max_size=NUM), indirect=st.lists(_desc, max_size=8),
       heads=st.lists(st.integers(0, NUM + 1), min_size=1, max_size=4))
def test_any_descriptor_table_walks_terminate_inside_the_regions(mem: GuestMemory, table: list,
                                                                indirect: list, heads: list) -> None:
    g = Guest(mem)
    for i, d in enumerate(table):
        g.desc(i, *d)
    for i, d in enumerate(indirect):
        g.desc(i, *d, table=0x13000)
    spans = []  # where the regions really are in this process
    for r in mem._regions:
        base = _address(r.view)
        spans.append((base, base + len(r.view)))
    q = g.queue()
    for head in heads:
        g.offer(head)
        try:
            chain = q.pop()
        except ChainError as exc:
            q.push(exc.head, 0)
            continue
        assert isinstance(chain, DescriptorChain)
        for view in chain.readable + chain.writable:
            start = _address(view)
            assert any(lo <= start and start + len(view) <= hi for lo, hi in spans) or not len(view)
        q.push(chain.head, 0)
    assert q.pending() == 0
