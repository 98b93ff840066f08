"""Path globs: syntax, semantics, index placement, lint helpers."""

from __future__ import annotations

import pytest

from gateway.rules import globs
from gateway.rules.globs import GlobError, GlobSet


@pytest.mark.parametrize(
    ("pattern", "yes", "no"),
    [
        ("/etc/passwd", ["/etc/passwd"], ["/etc/passwd2", "/etc", "/etc/passwd/x"]),
        ("/etc/*", ["/etc/passwd", "/etc/.hidden"], ["/etc", "/etc/a/b"]),
        ("/etc/**", ["/etc", "/etc/a", "/etc/a/b/c"], ["/etcx", "/", "/usr/etc"]),
        ("/a/**/b", ["/a/b", "/a/x/b", "/a/x/y/b"], ["/a/xb", "/a/b/c"]),
        ("**/.git/**", ["/.git", "/src/.git", "/src/.git/config"], ["/src/git", "/src/.gitx"]),
        ("/**", ["/", "/a", "/a/b"], []),
        ("/a/?.txt", ["/a/x.txt"], ["/a/xy.txt", "/a//.txt"]),
        ("/a/[abc]", ["/a/a", "/a/c"], ["/a/d", "/a/ab"]),
        ("/a/[!abc]", ["/a/d"], ["/a/a", "/a//"]),
        ("/a/[^0-9]x", ["/a/bx"], ["/a/1x"]),
        ("/a/[]]", ["/a/]"], ["/a/a"]),
        ("/{etc,usr}/**", ["/etc/x", "/usr"], ["/var/x"]),
        ("/srv/{www,ftp/{in,out}}/*", ["/srv/www/a", "/srv/ftp/in/a", "/srv/ftp/out/b"], ["/srv/ftp/a"]),
        ("/a/\\*", ["/a/*"], ["/a/b"]),
        ("/a/b*c", ["/a/bc", "/a/bxxc"], ["/a/b/c"]),
        ("/a/b**c", ["/a/bxc"], ["/a/b/x/c"]),  # ** inside a component is *
        ("/a.b/(x)+", ["/a.b/(x)+"], ["/aab/x"]),  # regex characters are literal
    ],
)
def test_glob_semantics(pattern: str, yes: list[str], no: list[str]) -> None:
    gs = GlobSet.compile([pattern])
    for path in yes:
        assert gs.matches(path), (pattern, path)
        assert gs.which(path) == pattern
    for path in no:
        assert not gs.matches(path), (pattern, path)
        assert gs.which(path) is None


@pytest.mark.parametrize(
    ("pattern", "error"),
    [
        ("/a/[b", "unclosed '['"),
        ("/a/{b,c", "unclosed '{'"),
        ("/a/b}", "'}' without a matching '{'"),
        ("/a/\\", "lone backslash"),
        ("/a/[!]", "unclosed '['"),
    ],
)
def test_glob_errors(pattern: str, error: str) -> None:
    assert error in (globs.check_pattern(pattern) or "")
    with pytest.raises(GlobError):
        GlobSet.compile([pattern])


def test_brace_bombs_are_refused() -> None:
    assert "alternatives" in (globs.check_pattern("/" + "{a,b,c,d}" * 5) or "")


def test_placements_pick_the_literal_prefix() -> None:
    got = [(p.prefix, p.kind) for p in GlobSet.compile(
        ["/etc/passwd", "/home/**", "/home/*/x", "**/y", "/{a,b}/c", "/"]).placements]
    assert got == [
        (("etc", "passwd"), "exact"),
        (("home",), "subtree"),
        (("home",), "glob"),
        ((), "glob"),
        (("a", "c"), "exact"),
        (("b", "c"), "exact"),
        ((), "exact"),
    ]


@pytest.mark.parametrize(
    ("pattern", "never"),
    [
        ("etc/*", True),
        ("/etc/", True),
        ("/a//b", True),
        ("/a/../b", True),
        ("/a/./b", True),
        ("{etc,/etc}/x", False),  # one alternative can match
        ("/etc/**", False),
        ("**/x", False),
        ("/", False),
    ],
)
def test_never_matches_path(pattern: str, never: bool) -> None:
    assert (globs.never_matches_path(pattern) is not None) is never


@pytest.mark.parametrize(
    ("outer", "inner", "covers"),
    [
        ("/home/**", "/home/alice/*.txt", True),
        ("/home/**", "/home", True),
        ("/home/**", "/homes/x", False),
        ("/home/**", "**/x", False),
        ("/**", "**/x", True),
        ("/{a,b}/**", "/b/c", True),
        ("/a/**", "/{a,b}/c", False),
        ("/home/*", "/home/alice", False),  # only literal-prefix subtrees are proven
        ("/x", "/x", True),
    ],
)
def test_covers_subtree(outer: str, inner: str, covers: bool) -> None:
    assert globs.covers_subtree(outer, inner) is covers
