"""The decoder survives any byte stream (issue 9, finding 6), driven with byte strings only.

Regressions for the buffer compaction that moved bytes under the parser once more than 64 KiB had been
consumed, and Hypothesis properties: any stream, split anywhere, decodes to the events a plain reference
model gives, and next_event never raises.
"""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway import protocol as p

BIG_PATH = b"a" * 65534  # LSTAT payload 2 + 65534 = 65536 bytes: the largest frame there is


def drain(d: p.Decoder) -> list[p.Event]:
    """Every event up to NEED_DATA, or up to and including CLOSED / the first Fatal."""
    events: list[p.Event] = []
    while True:
        ev = d.next_event()
        if ev is p.NEED_DATA:
            return events
        events.append(ev)
        if ev is p.CLOSED or isinstance(ev, p.Fatal):
            return events


def decode_all(stream: bytes, eof: bool = True) -> list[p.Event]:
    d = p.Decoder()
    d.feed(stream)
    if eof:
        d.feed_eof()
    return drain(d)


def decode_chunked(stream: bytes, cuts: list[int], eof: bool = True) -> list[p.Event]:
    d = p.Decoder()
    events: list[p.Event] = []
    last = 0
    for cut in [*sorted(cuts), len(stream)]:
        if cut == last:
            continue  # feed(b"") means EOF: an empty chunk is no chunk
        d.feed(stream[last:cut])
        last = cut
        events += drain(d)
        if events and (events[-1] is p.CLOSED or isinstance(events[-1], p.Fatal)):
            return events
    if eof:
        d.feed_eof()
        events += drain(d)
    return events


def model(stream: bytes) -> list[p.Event]:
    """The reference: frame by slicing immutable bytes, decode each payload with the generic field loop."""
    events: list[p.Event] = []
    pos = 0
    while True:
        rest = len(stream) - pos
        if rest == 0:
            return [*events, p.CLOSED]
        if rest < p.HEADER_SIZE:
            return [*events, p.Fatal(f"EOF inside a frame header ({rest} of {p.HEADER_SIZE} bytes)")]
        rtype, size = struct.unpack_from("<II", stream, pos)
        if size > p.MAX_PAYLOAD:
            return [
                *events,
                p.Fatal(f"frame size {size} exceeds the {p.MAX_PAYLOAD}-byte limit (type {rtype})"),
            ]
        if rest - p.HEADER_SIZE < size:
            got = rest - p.HEADER_SIZE
            return [*events, p.Fatal(f"EOF inside a frame (type {rtype}, {got} of {size} bytes)")]
        payload = stream[pos + p.HEADER_SIZE : pos + p.HEADER_SIZE + size]
        pos += p.HEADER_SIZE + size
        if rtype not in {int(t) for t in p.RequestType}:
            events.append(p.Unknown(rtype, size))
            continue
        try:
            events.append(p.decode_request(p.RequestType(rtype), payload))
        except p.ShortPayload:
            events.append(p.Malformed(p.RequestType(rtype), size))


# -- the reproductions of finding 6 ------------------------------------------------------------------------


def test_64k_lstat_then_a_normal_lstat_in_one_write_both_decode() -> None:
    stream = p.encode_request(p.Lstat(BIG_PATH)) + p.encode_request(p.Lstat(b"/next"))
    d = p.Decoder()
    d.feed(stream)
    assert d.next_event() == p.Lstat(BIG_PATH)  # was Lstat(b"/next"): parsed from the shifted buffer
    assert d.next_event() == p.Lstat(b"/next")
    assert d.next_event() is p.NEED_DATA


def test_64k_lstat_then_four_bytes_of_a_header_waits_instead_of_raising() -> None:
    d = p.Decoder()
    d.feed(p.encode_request(p.Lstat(BIG_PATH)) + struct.pack("<I", 8))  # was IndexError
    assert d.next_event() == p.Lstat(BIG_PATH)
    assert d.next_event() is p.NEED_DATA
    assert d.buffered == 4
    d.feed(struct.pack("<I", 4) + b"\x02\x00/z")  # the rest of that next frame
    assert d.next_event() == p.Lstat(b"/z")
    d.feed_eof()
    assert d.next_event() is p.CLOSED


@pytest.mark.parametrize("count", [2100, 2500])
def test_pipelined_opens_in_one_write_all_decode(count: int) -> None:
    # Names as long as a guest's usually are: 2,100 of them make well over 64 KiB in one write.
    requests = [
        p.Open(b"//home/alice/project/src/module/file-%05d.py" % i, os.O_RDONLY) for i in range(count)
    ]
    stream = b"".join(p.encode_request(r, nul=True) for r in requests)
    assert len(stream) > p.MAX_PAYLOAD  # the buffer is compacted along the way
    assert decode_all(stream) == [*requests, p.CLOSED]


@pytest.mark.parametrize("chunk", [1 << 18, 65536, 65544, 4096, 1000, 7])
def test_a_long_stream_fed_in_fixed_chunks_matches_the_model(chunk: int) -> None:
    # Frames of every size class, so that compaction lands at every kind of offset.
    frames = []
    for i in range(60):
        frames.append(p.encode_request(p.Lstat(b"x" * (i * 1093 % 65535))))
        frames.append(p.encode_request(p.Chmod(b"/f%d" % i, 0o644)))
        frames.append(p.HEADER.pack(8, 1) + b"\x05")  # short: Malformed
        frames.append(p.HEADER.pack(99, 3) + b"abc")  # Unknown
    stream = b"".join(frames)
    cuts = list(range(chunk, len(stream), chunk))
    expected = model(stream)
    assert len(expected) == 241
    assert decode_chunked(stream, cuts) == expected


def test_a_parser_that_raises_costs_only_its_frame(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(buf: bytearray, pos: int, end: int) -> p.Request:
        raise IndexError("a parser bug")

    monkeypatch.setitem(p._PARSERS, int(p.RequestType.CHMOD), broken)
    stream = p.encode_request(p.Chmod(b"/f", 0o600)) + p.encode_request(p.Lstat(b"/f"))
    assert decode_all(stream) == [p.Malformed(p.RequestType.CHMOD, 8), p.Lstat(b"/f"), p.CLOSED]


def test_bytes_after_a_fatal_are_not_kept() -> None:
    d = p.Decoder()
    d.feed(p.HEADER.pack(8, p.MAX_PAYLOAD + 1))
    fatal = d.next_event()
    assert isinstance(fatal, p.Fatal)
    for _ in range(10):
        d.feed(b"z" * 65536)
    assert d.buffered <= p.HEADER_SIZE  # a dead stream must not grow the buffer without bound
    assert d.next_event() == fatal


# -- properties ---------------------------------------------------------------------------------------------

u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, 0xFFFFFFFFFFFFFFFF)
i32 = st.integers(-(1 << 31), (1 << 31) - 1)
PATH_PARTS = [b"/", b"//", b"..", b".", b"a", b"dir", b"\0", b"\xff", b"file/"]
paths = st.one_of(st.lists(st.sampled_from(PATH_PARTS), max_size=12).map(b"".join), st.binary(max_size=64))
long_paths = st.integers(60000, 65400).map(lambda n: b"p" * n)  # pushes a frame near 64 KiB
FIELD = {"p": paths, "s": st.binary(max_size=64), "d": i32, "u": u32, "q": u64}


@st.composite
def valid_request(draw: st.DrawFn) -> bytes:
    """A well-formed frame of a known type; at most one long path, so that it stays within 64 KiB."""
    rtype = draw(st.sampled_from(list(p.LAYOUTS)))
    _cls, codes = p.LAYOUTS[rtype]
    long_one = codes.index("p") if draw(st.integers(0, 9)) == 0 else -1
    values = [draw(long_paths if i == long_one else FIELD[c]) for i, c in enumerate(codes)]
    payload = p._pack_fields(codes, values)
    assert len(payload) <= p.MAX_PAYLOAD
    return p.HEADER.pack(int(rtype), len(payload)) + payload


@st.composite
def odd_frame(draw: st.DrawFn) -> bytes:
    rtype = draw(st.one_of(st.sampled_from([0, 1, 22, 255, 0xFFFFFFFF]), st.integers(2, 21), u32))
    payload = draw(st.binary(max_size=200))
    size = draw(st.one_of(st.just(len(payload)), st.integers(0, len(payload))))
    return p.HEADER.pack(rtype, size) + payload[:size]


@st.composite
def truncated(draw: st.DrawFn) -> bytes:
    frame = draw(valid_request())
    return frame[: draw(st.integers(0, len(frame)))]


pieces = st.one_of(
    valid_request(),
    odd_frame(),
    truncated(),
    st.binary(max_size=40),  # garbage
    st.builds(lambda t, s: p.HEADER.pack(t, s), u32, st.integers(p.MAX_PAYLOAD - 2, 0xFFFFFFFF)),
)
# Half the streams open with a frame near 64 KiB, so that what follows is parsed after a compaction.
big_frame = long_paths.map(lambda path: p.encode_request(p.Lstat(path)))
streams = st.builds(
    lambda first, rest: first + b"".join(rest),
    st.one_of(st.just(b""), big_frame),
    st.lists(pieces, max_size=12),
)

PROPERTY = settings(
    max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)


@PROPERTY
@given(stream=streams, data=st.data())
def test_any_stream_split_anywhere_decodes_as_fed_whole(stream: bytes, data: st.DataObject) -> None:
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=20))
    whole = decode_all(stream)
    assert decode_chunked(stream, cuts) == whole
    assert whole == model(stream)


@PROPERTY
@given(stream=streams, data=st.data())
def test_next_event_never_raises_and_the_stream_ends_once(stream: bytes, data: st.DataObject) -> None:
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=20))
    events = decode_chunked(stream, cuts)  # raising fails the test
    assert events, "a stream that reaches EOF ends with CLOSED or Fatal"
    last = events[-1]
    assert last is p.CLOSED or isinstance(last, p.Fatal)
    assert all(ev is not p.CLOSED and not isinstance(ev, p.Fatal) for ev in events[:-1])
    for ev in events[:-1]:
        assert type(ev) in {cls for cls, _ in p.LAYOUTS.values()} | {p.Malformed, p.Unknown}


@PROPERTY
@given(stream=st.lists(valid_request(), min_size=1, max_size=8).map(b"".join), data=st.data())
def test_valid_frames_decode_without_eof(stream: bytes, data: st.DataObject) -> None:
    """Without EOF, a stream of whole frames gives one request each and nothing buffered."""
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=20))
    events = decode_chunked(stream, cuts, eof=False)
    assert events == model(stream)[:-1]
    assert all(type(ev) in {cls for cls, _ in p.LAYOUTS.values()} for ev in events)
