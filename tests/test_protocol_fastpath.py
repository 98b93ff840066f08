"""The decoder's compiled per-type parsers (protocol._PARSERS) must decode exactly as the generic field
loop (_unpack_fields, which decode_request uses): same request, or ShortPayload in the same cases."""

from __future__ import annotations

import random
import struct

import pytest

from gateway import protocol as p


def _field(rnd: random.Random, code: str) -> bytes:
    if code in "ps":
        value = bytes(rnd.choice(b"ab/.\0\xff") for _ in range(rnd.choice([0, 1, 2, 5, 40])))
        length = len(value) if rnd.random() < 0.85 else rnd.randrange(0, 300)  # a lying length too
        return struct.pack("<H", length) + value
    if code == "q":
        return struct.pack("<Q", rnd.getrandbits(64))
    return struct.pack("<I", rnd.getrandbits(32))


def _generic(rtype: p.RequestType, payload: bytes) -> object:
    try:
        return p.decode_request(rtype, payload)
    except p.ShortPayload:
        return p.ShortPayload


def _compiled(rtype: p.RequestType, payload: bytes) -> object:
    # As the Decoder calls it: a bytearray holding other bytes before and after the payload.
    buf = bytearray(b"\x01" * 8 + payload + b"\x02" * 8)
    try:
        return p._PARSERS[int(rtype)](buf, 8, 8 + len(payload))
    except p.ShortPayload:
        return p.ShortPayload


@pytest.mark.parametrize("rtype", list(p.LAYOUTS), ids=lambda t: t.name)
def test_compiled_parser_matches_the_generic_loop(rtype: p.RequestType) -> None:
    rnd = random.Random(int(rtype))
    codes = p.LAYOUTS[rtype][1]
    for _ in range(1500):
        payload = b"".join(_field(rnd, c) for c in codes)
        roll = rnd.random()
        if roll < 0.3:
            payload = payload[: rnd.randrange(0, len(payload) + 1)]  # short: ShortPayload somewhere
        elif roll < 0.4:
            payload += bytes(rnd.randrange(1, 9))  # trailing bytes are ignored
        assert _compiled(rtype, payload) == _generic(rtype, payload), payload


def test_every_known_type_has_a_parser_and_unknown_types_none() -> None:
    assert set(p._PARSERS) == {int(t) for t in p.LAYOUTS}
    assert all(t not in p._PARSERS for t in (0, 1, 22, 0xFFFFFFFF))
