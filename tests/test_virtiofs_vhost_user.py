"""The vhost-user control channel, driven with bytes as QEMU sends them (gateway/virtiofs/vhost_user.py)."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.virtiofs import vhost_user as vu
from gateway.virtiofs import vhost_user_abi as abi
from gateway.virtiofs.vhost_user_abi import MemoryRegion, Req, message, u64, vring_addr, vring_state

ALL_FEATURES = abi.DEVICE_FEATURES
ACK = 1 << abi.ProtocolFeature.REPLY_ACK
MQ = 1 << abi.ProtocolFeature.MQ
REGION = MemoryRegion(guest_phys_addr=0, memory_size=0x10000, userspace_addr=0x7F0000000000, mmap_offset=0)


def replies(events: list) -> list[tuple[int, int, bytes]]:
    return [abi.parse_reply(e.data) for e in events if isinstance(e, vu.Reply)]


def kinds(events: list) -> list[type]:
    return [type(e) for e in events]


def negotiated(ack: bool = True) -> vu.Backend:
    b = vu.Backend()
    b.feed(message(Req.SET_PROTOCOL_FEATURES, u64(MQ | (ACK if ack else 0))))
    b.feed(message(Req.SET_FEATURES, u64(ALL_FEATURES)))
    return b


def qemu_start_ring(index: int, num: int = 8, kick_fd: int = 100, call_fd: int = 200) -> list[tuple]:
    """What QEMU 7.2's vhost_virtqueue_start sends for one ring: NUM, BASE, ADDR, KICK, CALL."""
    base = 0x7F0000000000 + 0x1000 * index
    return [
        (message(Req.SET_VRING_NUM, vring_state(index, num)), ()),
        (message(Req.SET_VRING_BASE, vring_state(index, 0)), ()),
        (message(Req.SET_VRING_ADDR, vring_addr(index, base, base + 0x800, base + 0x400)), ()),
        (message(Req.SET_VRING_KICK, u64(index)), (kick_fd + index,)),
        (message(Req.SET_VRING_CALL, u64(index)), (call_fd + index,)),
    ]


def test_qemu_like_session() -> None:
    """The order QEMU 7.2's vhost-user-fs uses: probe, negotiate, own, memory, rings, enable, stop."""
    b = vu.Backend()
    ev = b.feed(message(Req.GET_FEATURES))
    assert replies(ev) == [(Req.GET_FEATURES, abi.VERSION | abi.FLAG_REPLY, u64(ALL_FEATURES))]
    ev = b.feed(message(Req.GET_PROTOCOL_FEATURES))
    (_, _, payload), = replies(ev)
    offered = struct.unpack("<Q", payload)[0]
    assert offered & ACK and offered & MQ
    assert not offered & (1 << abi.ProtocolFeature.CONFIG)
    assert b.feed(message(Req.SET_PROTOCOL_FEATURES, u64(MQ | ACK))) == []
    ev = b.feed(message(Req.GET_QUEUE_NUM))
    assert replies(ev)[0][2] == u64(2)
    # With REPLY_ACK, each NEED_REPLY message gets a u64 0.
    ev = b.feed(message(Req.SET_OWNER, need_reply=True))
    assert replies(ev) == [(Req.SET_OWNER, abi.VERSION | abi.FLAG_REPLY, u64(0))]
    ev = b.feed(message(Req.SET_FEATURES, u64(ALL_FEATURES), need_reply=True))
    assert kinds(ev) == [vu.FeaturesSet, vu.Reply]
    ev = b.feed(message(Req.SET_MEM_TABLE, abi.mem_table([REGION]), need_reply=True), [7])
    assert ev[0] == vu.MemTableSet((REGION,), (7,))
    assert replies(ev)[0][2] == u64(0)
    for index in (0, 1):
        for data, fds in qemu_start_ring(index):
            for e in b.feed(data, fds):
                assert not isinstance(e, (vu.Disconnect, vu.CloseFds)), e
        assert b.vrings[index].kick and not b.vrings[index].enabled  # protocol features: starts disabled
        ev = b.feed(message(Req.SET_VRING_ENABLE, vring_state(index, 1)))
        assert ev == [vu.VringEnabled(index, True)]
    assert b.vrings[1].desc_addr == 0x7F0000001000 and b.vrings[1].num == 8
    b.vrings[1].base = 5  # as the data plane advances it
    ev = b.feed(message(Req.GET_VRING_BASE, vring_state(1, 0)))
    assert replies(ev) == [(Req.GET_VRING_BASE, abi.VERSION | abi.FLAG_REPLY, vring_state(1, 5))]
    assert ev[-1] == vu.VringStopped(1, 5) and not b.vrings[1].kick
    assert not b.closed


def test_kick_and_call_fds_reach_their_ring() -> None:
    b = negotiated()
    b.feed(message(Req.SET_MEM_TABLE, abi.mem_table([REGION])), [7])
    events = []
    for data, fds in qemu_start_ring(1, kick_fd=40, call_fd=50):
        events += b.feed(data, fds)
    fd_events = [e for e in events if isinstance(e, vu.VringFdSet)]
    assert fd_events == [vu.VringFdSet("kick", 1, 41), vu.VringFdSet("call", 1, 51)]
    # "no fd" (bit 8): polling, no fd expected
    ev = b.feed(message(Req.SET_VRING_CALL, u64(1 | abi.VRING_NOFD_MASK)))
    assert ev == [vu.VringFdSet("call", 1, None)]


def test_byte_at_a_time_is_the_same_as_all_at_once() -> None:
    stream = [(message(Req.GET_FEATURES), ()), (message(Req.SET_PROTOCOL_FEATURES, u64(ACK)), ()),
              (message(Req.SET_FEATURES, u64(ALL_FEATURES)), ()),
              (message(Req.SET_MEM_TABLE, abi.mem_table([REGION]), need_reply=True), (9,)),
              *qemu_start_ring(0)]
    whole = vu.Backend()
    expected = [e for data, fds in stream for e in whole.feed(data, fds)]
    piecemeal = vu.Backend()
    got = []
    for data, fds in stream:
        for i in range(len(data)):
            got += piecemeal.feed(data[i:i + 1], fds if i == 0 else ())
    assert got == expected
    assert any(isinstance(e, vu.MemTableSet) and e.fds == (9,) for e in got)


def test_malformed_framing_disconnects_cleanly() -> None:
    for bad in (struct.pack("<III", Req.GET_FEATURES, 2, 0),  # version 2
                struct.pack("<III", Req.GET_FEATURES, abi.VERSION | abi.FLAG_REPLY, 0),  # a reply
                struct.pack("<III", Req.SET_FEATURES, abi.VERSION, 0xFFFFFFFF)):  # oversized
        b = vu.Backend()
        ev = b.feed(bad, [3])
        assert isinstance(ev[-1], vu.Disconnect) and b.closed
        assert vu.CloseFds((3,)) in ev
        assert b.feed(message(Req.GET_FEATURES)) == []  # nothing is parsed after a disconnect


def test_eof_disconnects_and_returns_buffered_fds() -> None:
    b = vu.Backend()
    assert b.feed(message(Req.SET_MEM_TABLE, abi.mem_table([REGION]))[:20], [5]) == []
    ev = b.feed(b"")
    assert ev[0] == vu.CloseFds((5,)) and isinstance(ev[-1], vu.Disconnect)


def test_refusals_with_reply_ack_are_nacks_and_take_no_effect() -> None:
    b = negotiated(ack=True)
    nack = u64(1)
    cases = [
        (message(Req.SET_VRING_NUM, vring_state(2, 8), need_reply=True), ()),  # no such ring
        (message(Req.SET_VRING_NUM, vring_state(0, 100), need_reply=True), ()),  # not a power of 2
        (message(Req.SET_VRING_NUM, vring_state(0, 65536), need_reply=True), ()),
        (message(Req.SET_VRING_BASE, vring_state(0, 0x10000), need_reply=True), ()),
        (message(Req.SET_VRING_ADDR, vring_addr(0, 0x1001, 0, 0), need_reply=True), ()),  # misaligned
        (message(Req.SET_VRING_ADDR, vring_addr(0, 0, 0, 0, flags=1), need_reply=True), ()),  # logging
        (message(Req.SET_VRING_KICK, u64(0), need_reply=True), ()),  # fd missing
        (message(Req.SET_VRING_KICK, u64(0), need_reply=True), (11,)),  # before NUM/ADDR
        (message(Req.SET_VRING_CALL, u64(0 | abi.VRING_NOFD_MASK), need_reply=True), (12,)),  # fd extra
        (message(Req.SET_VRING_CALL, u64(1 << 20), need_reply=True), ()),  # unknown bits
        (message(Req.SET_FEATURES, u64(1 << 34), need_reply=True), ()),  # RING_PACKED: not offered
        (message(Req.SET_PROTOCOL_FEATURES, u64(1 << abi.ProtocolFeature.CONFIG), need_reply=True), ()),
        (message(Req.SET_MEM_TABLE, abi.mem_table([REGION]), need_reply=True), ()),  # no fd
        (message(Req.SET_MEM_TABLE, abi.mem_table([REGION, REGION]), need_reply=True), (1, 2)),  # overlap
        (message(Req.SET_MEM_TABLE, abi.mem_table([MemoryRegion(2**64 - 4096, 8192, 0, 0)]),
                 need_reply=True), (1,)),  # wraps
        (message(Req.SET_MEM_TABLE, abi.mem_table([MemoryRegion(0, 0, 0, 0)]), need_reply=True), (1,)),
        (message(Req.SET_MEM_TABLE, struct.pack("<II", 9, 0), need_reply=True), ()),  # 9 regions
        (message(Req.SET_MEM_TABLE, abi.mem_table([REGION])[:-1], need_reply=True), (1,)),  # short
        (message(Req.SET_OWNER, b"x", need_reply=True), ()),  # payload where none belongs
        (message(Req.SET_CONFIG, b"\0" * 12, need_reply=True), ()),  # not offered
        (message(999, b"", need_reply=True), ()),  # unknown request
    ]
    for data, fds in cases:
        before = (b.features, b.regions, [vars(v).copy() for v in b.vrings])
        ev = b.feed(data, fds)
        assert replies(ev) == [(struct.unpack_from("<I", data)[0], abi.VERSION | abi.FLAG_REPLY, nack)], data
        if fds:
            assert vu.CloseFds(tuple(fds)) in ev
        assert not any(isinstance(e, (vu.MemTableSet, vu.VringFdSet, vu.FeaturesSet)) for e in ev)
        assert (b.features, b.regions, [vars(v) for v in b.vrings]) == before
        assert not b.closed


def test_refusals_without_reply_ack_disconnect() -> None:
    b = negotiated(ack=False)
    ev = b.feed(message(Req.SET_VRING_NUM, vring_state(5, 8), need_reply=True))
    assert kinds(ev) == [vu.Disconnect] and "vring 5" in ev[0].reason


def test_getters_that_cannot_be_answered_disconnect() -> None:
    """SET_LOG_BASE (dirty logging was never offered) and unknown getters: a NACK would be misread as
    the value asked for, so these end the connection."""
    for data, fds in ((message(Req.SET_LOG_BASE, b"\0" * 16, need_reply=True), (4,)),
                      (message(Req.GET_CONFIG, b"\0" * 12, need_reply=True), ()),
                      (message(Req.GET_INFLIGHT_FD, b"\0" * 16), ())):
        b = negotiated(ack=True)
        ev = b.feed(data, fds)
        assert isinstance(ev[-1], vu.Disconnect) and not replies(ev)
        if fds:
            assert vu.CloseFds(fds) in ev


def test_stray_fds_are_closed_and_the_message_served() -> None:
    b = vu.Backend()
    ev = b.feed(message(Req.GET_FEATURES), [8])
    assert vu.CloseFds((8,)) in ev and replies(ev)


def test_ring_without_protocol_features_starts_enabled() -> None:
    b = vu.Backend()
    b.feed(message(Req.SET_FEATURES, u64(abi.VIRTIO_F_VERSION_1)))
    for data, fds in qemu_start_ring(0):
        b.feed(data, fds)
    assert b.vrings[0].enabled
    ev = b.feed(message(Req.SET_VRING_ENABLE, vring_state(0, 0)))
    assert isinstance(ev[-1], vu.Disconnect)  # ENABLE needs protocol features


def test_reset_owner_forgets_memory_and_rings() -> None:
    b = negotiated()
    b.feed(message(Req.SET_MEM_TABLE, abi.mem_table([REGION])), [7])
    for data, fds in qemu_start_ring(0):
        b.feed(data, fds)
    assert b.feed(message(Req.RESET_OWNER)) == [vu.OwnerReset()]
    assert b.regions == () and not b.vrings[0].kick and b.vrings[0].num == 0
    # RESET_DEVICE was not negotiated
    ev = negotiated(ack=False).feed(message(Req.RESET_DEVICE))
    assert isinstance(ev[-1], vu.Disconnect)


def test_running_ring_cannot_be_reconfigured() -> None:
    b = negotiated()
    for data, fds in qemu_start_ring(0):
        b.feed(data, fds)
    for data in (message(Req.SET_VRING_NUM, vring_state(0, 16), need_reply=True),
                 message(Req.SET_VRING_BASE, vring_state(0, 3), need_reply=True),
                 message(Req.SET_FEATURES, u64(ALL_FEATURES), need_reply=True)):
        assert replies(b.feed(data))[0][2] == u64(1)


# --- properties ---------------------------------------------------------------------------------------
EVENT_TYPES = (vu.Reply, vu.FeaturesSet, vu.OwnerReset, vu.MemTableSet, vu.VringFdSet, vu.VringEnabled,
               vu.VringStopped, vu.CloseFds, vu.Disconnect)


def _fds_in(events: list) -> list[int]:
    out: list[int] = []
    for e in events:
        if isinstance(e, vu.MemTableSet | vu.CloseFds):
            out += e.fds
        elif isinstance(e, vu.VringFdSet) and e.fd is not None:
            out.append(e.fd)
    return out


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.binary(max_size=80), st.integers(0, 3)), max_size=12))
def test_any_bytes_produce_events_or_a_clean_disconnect(chunks: list[tuple[bytes, int]]) -> None:
    b = vu.Backend()
    next_fd = 1000
    given_fds: list[int] = []
    events: list = []
    for data, nfds in chunks:
        fds = list(range(next_fd, next_fd + nfds)) if data else []
        next_fd += nfds
        given_fds += fds
        events += b.feed(data, fds)
    events += b.feed(b"")  # EOF: whatever is buffered comes back
    assert all(isinstance(e, EVENT_TYPES) for e in events)
    # Exactly one Disconnect; after it, only fds handed back to be closed.
    assert sum(isinstance(e, vu.Disconnect) for e in events) == 1
    after = events[[isinstance(e, vu.Disconnect) for e in events].index(True) + 1:]
    assert all(isinstance(e, vu.CloseFds) for e in after)
    # Every fd handed in comes out exactly once: owned by the caller for a purpose, or to be closed.
    assert sorted(_fds_in(events)) == sorted(given_fds)


_requests = st.sampled_from([int(r) for r in Req] + [0, 44, 1000, 0xFFFFFFFF])
_payload = st.one_of(st.binary(max_size=300), st.integers(0, 2**64 - 1).map(u64),
                     st.tuples(st.integers(0, 3), st.integers(0, 70000)).map(lambda t: vring_state(*t)),
                     st.tuples(*[st.integers(0, 2**16)] * 4).map(lambda t: vring_addr(*t)),
                     st.lists(st.tuples(*[st.integers(0, 2**64 - 1)] * 4).map(lambda t: MemoryRegion(*t)),
                              max_size=9).map(abi.mem_table))


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(_requests, _payload, st.booleans(), st.integers(0, 9)), max_size=25),
       st.booleans())
def test_any_well_framed_messages_never_raise(msgs: list, ack_first: bool) -> None:
    b = vu.Backend()
    events = b.feed(message(Req.SET_PROTOCOL_FEATURES, u64(ACK | MQ))) if ack_first else []
    given_fds: list[int] = []
    for n, (request, payload, need_reply, nfds) in enumerate(msgs):
        fds = [2000 + 10 * n + i for i in range(nfds)]
        given_fds += fds
        events += b.feed(message(request, payload, need_reply), fds)
    events += b.feed(b"")
    assert all(isinstance(e, EVENT_TYPES) for e in events)
    assert sorted(_fds_in(events)) == sorted(given_fds)
    for e in events:
        if isinstance(e, vu.VringFdSet | vu.VringEnabled | vu.VringStopped):
            assert 0 <= e.index < b.num_queues
        if isinstance(e, vu.MemTableSet):
            assert len(e.regions) == len(e.fds) and all(r.memory_size for r in e.regions)


def test_wanted_is_what_completes_the_current_message() -> None:
    """The daemon reads exactly this much, so that one read never spans two messages (their fds)."""
    b = vu.Backend()
    msg = message(Req.SET_MEM_TABLE, abi.mem_table([REGION]))
    assert b.wanted() == abi.HEADER.size
    b.feed(msg[:5])
    assert b.wanted() == abi.HEADER.size - 5
    b.feed(msg[5:12])
    assert b.wanted() == len(msg) - 12
    b.feed(msg[12:-1], [7])
    assert b.wanted() == 1
    ev = b.feed(msg[-1:])
    assert ev == [vu.MemTableSet((REGION,), (7,))] and b.wanted() == abi.HEADER.size
