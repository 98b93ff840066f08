"""The one lexical normaliser: what the rules match on when nothing resolves."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.paths import normalise, normalise_bytes


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("", "/"),
        ("/", "/"),
        ("//dir//file", "/dir/file"),  # QEMU's double slash
        ("a/./b/", "/a/b"),
        ("/a/../../../etc", "/etc"),  # '..' clamps at the export's root
        ("/home/alice/..", "/home"),
        ("/.git/./x", "/.git/x"),
    ],
)
def test_normalise(raw: str, expected: str) -> None:
    assert normalise(raw) == expected


@given(st.lists(st.sampled_from(["", ".", "..", "a", "b\udcff"]), max_size=12))
@settings(deadline=None, derandomize=True, database=None)
def test_normalise_agrees_with_the_plain_loop(parts: list[str]) -> None:
    path = "/".join(parts)
    stack: list[str] = []
    for part in parts:
        if part == "..":
            stack = stack[:-1]
        elif part not in ("", "."):
            stack.append(part)
    assert normalise(path) == "/" + "/".join(stack)


def test_undecodable_bytes_survive_the_round_trip() -> None:
    assert normalise_bytes(b"/a/\xff\xfe/../b\xff") == b"/a/b\xff"
