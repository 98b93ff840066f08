"""The one lexical normaliser: what the rules match on when nothing resolves."""

from __future__ import annotations

import pytest

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


def test_undecodable_bytes_survive_the_round_trip() -> None:
    assert normalise_bytes(b"/a/\xff\xfe/../b\xff") == b"/a/b\xff"
