"""Path globs: syntax, semantics, index placement, lint helpers."""

from __future__ import annotations

import functools
import itertools
import pickle
import re
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from gateway.rules import globs
from gateway.rules.globs import GlobError, GlobSet


@pytest.mark.parametrize(
    ("pattern", "yes", "no"),
    [
        ("/etc/passwd", ["/etc/passwd"], ["/etc/passwd2", "/etc", "/etc/passwd/x"]),
        ("/etc/*", ["/etc/passwd", "/etc/.hidden"], ["/etc", "/etc/a/b"]),
        ("/etc/**", ["/etc", "/etc/a", "/etc/a/b/c"], ["/etcx", "/", "/usr/etc"]),
        ("/a/**/b", ["/a/b", "/a/x/b", "/a/x/y/b"], ["/a/xb", "/a/b/c"]),
        ("/a/**/**", ["/a", "/a/b", "/a/b/c"], ["/ab"]),  # **/** is ** (it used to miss /a itself)
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
        ("/a/[/]", True),  # a class never matches "/", so a class of only "/" matches nothing
        ("/a/{[/],b}", False),
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


def test_a_class_never_matches_a_slash() -> None:
    # As documented (re used to let [/] and [.-0] match the separator).
    for pattern in ("/a[/]b", "/a[.-0]b", "/a[/a]b"):
        assert not GlobSet.compile([pattern]).matches("/a/b"), pattern
    assert GlobSet.compile(["/a[.-0]b"]).matches("/a.b")
    assert GlobSet.compile(["/a[/a]b"]).matches("/aab")


@pytest.mark.parametrize(
    ("cls", "yes", "no"),
    [  # read as Python's re reads a set, so that existing policies keep their meaning
        ("[a-c-e]", "ace-", "dx"),
        ("[-a]", "-a", "b"),
        ("[a-]", "a-", "b"),
        ("[\\-a]", "-a", "b"),
        ("[!a-c]", "dé\udcff", "abc"),
        ("[é-ê]", "éê", "eë"),
    ],
)
def test_class_members(cls: str, yes: str, no: str) -> None:
    gs = GlobSet.compile(["/" + cls])
    for c in yes:
        assert gs.matches("/" + c), (cls, c)
    for c in no:
        assert not gs.matches("/" + c), (cls, c)


def test_bad_range_is_a_glob_error() -> None:
    assert "bad range 'z-a'" in (globs.check_pattern("/[z-a]") or "")


def test_non_utf8_bytes_are_single_characters() -> None:
    # A byte that is not UTF-8 arrives as a lone surrogate: one character, matched by ?, * and [!...].
    path = b"/secret/\xff\xfe".decode("utf-8", "surrogateescape")
    assert GlobSet.compile(["/secret/*"]).matches(path)
    assert GlobSet.compile(["/secret/??"]).matches(path)
    assert not GlobSet.compile(["/secret/?"]).matches(path)
    assert GlobSet.compile(["/secret/[!a][!a]"]).matches(path)
    assert GlobSet.compile(["/secret/\udcff*"]).matches(path)  # a pattern may name such a byte
    assert GlobSet.compile(["/secret/?"]).matches("/secret/\U0001f600")  # one character, four bytes


def test_globsets_pickle() -> None:
    # The audit tool sends its filters, GlobSets included, to worker processes.
    gs = pickle.loads(pickle.dumps(GlobSet.compile(["/a/**", "/b/{c,d}"])))
    assert gs.matches("/a/x") and gs.matches("/b/d") and not gs.matches("/b/e")
    assert gs.reaches("/b") and not gs.reaches("/c")


@pytest.mark.parametrize(
    ("pattern", "path", "reaches"),
    [
        ("/cache/**/.git/hooks/**", "/cache/repo", True),
        ("/cache/**/.git/hooks/**", "/cache", True),
        ("/cache/**/.git/hooks/**", "/", True),
        ("/cache/**/.git/hooks/**", "/cachex", False),
        ("**/.git/hooks/**", "/cache/repo/.git", True),
        ("**/.git/hooks/**", "/anything", True),
        ("/home/alice/private/*", "/home/alice/private", True),
        ("/home/alice/private/*", "/home/alice", True),
        ("/home/alice/private/*", "/home/alice/private/x", True),
        ("/home/alice/private/*", "/home/alice/private/x/y", False),
        ("/home/alice/private/*", "/home/bob", False),
        ("/etc/passwd", "/etc", True),
        ("/etc/passwd", "/etc/passwd", True),
        ("/etc/passwd", "/etc/shadow", False),
        ("/etc/passwd", "/", True),
        ("/a/b", "/a/b/c", False),
        ("/a/*.txt", "/a", True),
        ("/a/*.txt", "/a/x.txt", True),
        ("/a/*.txt", "/a/x", False),  # "/a/x/" cannot begin a match: * stays within a component
        ("**", "/x/y", True),
        ("/**", "/", True),
        ("/{etc,usr}/**", "/usr", True),
        ("/{etc,usr}/**", "/var", False),
        ("/a/[!x]/b", "/a/y", True),
        ("/a/[!x]/b", "/a/x", False),
    ],
)
def test_reaches(pattern: str, path: str, reaches: bool) -> None:
    gs = GlobSet.compile([pattern])
    assert gs.reaches(path) is reaches
    assert any(p.reaches(path) for p in gs.placements) is reaches


def test_reaches_over_several_patterns() -> None:
    gs = GlobSet.compile(["/etc/passwd", "/home/*/.ssh/**"])
    assert gs.reaches("/home/bob") and gs.reaches("/etc") and not gs.reaches("/usr")
    assert not GlobSet.compile([]).reaches("/") and not GlobSet.compile([]).matches("/")


# ----------------------------------------------------------------------------------------------------------
# Property tests against a slow, obviously correct reference. A pattern is drawn as a tree of nodes
# (rendered to glob text for GlobSet, expanded by the reference on its own); a brace-free alternative is
# a list of tokens, matched against a path component by component.
#
# tokens: ("lit", c) ("slash",) ("star", n) n stars in a row, ("q",), ("cls", negated, members)

Node = tuple[Any, ...]
SETTINGS = settings(deadline=None, derandomize=True, database=None, max_examples=400,
                    suppress_health_check=[HealthCheck.too_slow])


def _render(nodes: list[Node]) -> str:
    out = []
    for node in nodes:
        kind = node[0]
        if kind == "lit":
            out.append(node[1])
        elif kind == "esc":
            out.append("\\" + node[1])
        elif kind == "slash":
            out.append("/")
        elif kind == "star":
            out.append("*" * node[1])
        elif kind == "q":
            out.append("?")
        elif kind == "cls":
            members = "".join(m if len(m) == 1 else f"{m[0]}-{m[1]}" for m in node[2])
            out.append(f"[{node[1]}{members}]")
        else:
            out.append("{" + ",".join(_render(alt) for alt in node[1]) + "}")
    return "".join(out)


def _alternatives(nodes: list[Node]) -> list[list[Node]]:
    """Every brace-free token list, escapes turned into literals."""
    alts: list[list[Node]] = [[]]
    for node in nodes:
        if node[0] == "brace":
            alts = [a + b for a in alts for alt in node[1] for b in _alternatives(alt)]
        elif node[0] == "esc":
            alts = [[*a, ("lit", node[1])] for a in alts]
        else:
            alts = [[*a, node] for a in alts]
    return alts


def _components(alt: list[Node]) -> list[list[Node] | str]:
    """Split at slashes; stars in a row (braces may put them side by side) merge; a component that is
    only two or more stars is "**"."""
    comps: list[list[Node]] = [[]]
    for tok in alt:
        if tok[0] == "slash":
            comps.append([])
        elif tok[0] == "star" and comps[-1] and comps[-1][-1][0] == "star":
            comps[-1][-1] = ("star", comps[-1][-1][1] + tok[1])
        else:
            comps[-1].append(tok)
    return ["**" if len(c) == 1 and c[0][0] == "star" and c[0][1] >= 2 else c for c in comps]


def _one(tok: Node, ch: str) -> bool:
    if tok[0] == "lit":
        return ch == tok[1]
    if tok[0] == "q":
        return True
    inside = any(ch == m if len(m) == 1 else m[0] <= ch <= m[1] for m in tok[2])
    return inside != bool(tok[1])


def _comp_matches(toks: list[Node], text: str) -> bool:
    @functools.cache
    def at(i: int, j: int) -> bool:
        if i == len(toks):
            return j == len(text)
        if toks[i][0] == "star":
            return any(at(i + 1, k) for k in range(j, len(text) + 1))
        return j < len(text) and _one(toks[i], text[j]) and at(i + 1, j + 1)

    return at(0, 0)


def reference_matches(alt: list[Node], path: str) -> bool:
    return _matches_components(_components(alt), path)


def _matches_components(comps: list[list[Node] | str], path: str) -> bool:
    parts = path.split("/")

    @functools.cache
    def at(i: int, j: int) -> bool:
        if i == len(comps):
            return j == len(parts)
        comp = comps[i]
        if comp == "**":  # any number of whole components, none included
            return any(at(i + 1, k) for k in range(j, len(parts) + 1))
        return j < len(parts) and _comp_matches(comp, parts[j]) and at(i + 1, j + 1)  # type: ignore[arg-type]

    return at(0, 0)


def _nodes(chars: str, escapes: str) -> st.SearchStrategy[list[Node]]:
    member = st.one_of(st.sampled_from(["a", "b", "/"]), st.just(("a", "b")))
    members = st.lists(member, min_size=1, max_size=2)
    leaf = st.one_of(
        st.sampled_from(chars).map(lambda c: ("lit", c)),
        st.just(("slash",)),
        st.just(("slash",)),
        st.sampled_from([1, 2, 2, 3]).map(lambda n: ("star", n)),
        st.just(("q",)),
        st.tuples(st.just("cls"), st.sampled_from(["", "!", "^"]), members),
        *([st.sampled_from(escapes).map(lambda c: ("esc", c))] if escapes else []),
    )
    node = st.recursive(leaf, lambda kids: st.lists(st.lists(kids, max_size=3), min_size=1, max_size=3).map(
        lambda alts: ("brace", alts)), max_leaves=6)
    return st.lists(node, max_size=7)


def _path_like(chars: str) -> st.SearchStrategy[list[Node]]:
    """Patterns shaped like the ones people write: components between slashes, some of them "**"."""
    atom = st.one_of(st.sampled_from(chars).map(lambda c: ("lit", c)), st.just(("star", 1)), st.just(("q",)),
                     st.just(("cls", "!", ["a"])))
    comp = st.one_of(st.just([("star", 2)]), st.lists(atom, min_size=1, max_size=2))

    def join(comps: list[list[Node]], lead: bool) -> list[Node]:
        out: list[Node] = [("slash",)] if lead else []
        for k, c in enumerate(comps):
            out += ([("slash",)] if k else []) + c
        return out

    return st.builds(join, st.lists(comp, min_size=1, max_size=4), st.booleans())


def _witness(draw: st.DrawFn, alt: list[Node]) -> str:
    """A path the alternative probably matches (the property test then mutates or cuts it)."""
    out = []
    for comp in _components(alt):
        if comp == "**":
            out.append("/".join(draw(st.lists(st.sampled_from(["a", "b", "ab"]), max_size=3))))
            continue
        text = []
        for tok in comp:  # type: ignore[union-attr]
            if tok[0] == "star":
                text.append(draw(st.sampled_from(["a", "ba", ""])))
            elif tok[0] == "lit":
                text.append(tok[1])
            else:
                text.append(draw(st.sampled_from(["a", "b", "c", "é", "\udcff"])))
        out.append("".join(text))
    return "/".join(out)


@st.composite
def pattern_and_path(draw: st.DrawFn) -> tuple[str, list[list[Node]], str]:
    nodes = draw(st.one_of(_nodes("abé\udcff", "*?[{},\\a"), _path_like("abé\udcff")))
    alts = _alternatives(nodes)
    assume(len(alts) <= 32)
    if draw(st.booleans()):
        path = _witness(draw, draw(st.sampled_from(alts)))
        if draw(st.booleans()):  # a near miss: one character changed, added or dropped
            k = draw(st.integers(0, len(path)))
            path = path[:k] + draw(st.sampled_from(["", "a", "/", "c"])) + path[k + 1 :]
    else:
        path = draw(st.text(alphabet="ab/cé\udcff*?[{,\\", max_size=10))
    return _render(nodes), alts, path


@SETTINGS
@given(pattern_and_path())
def test_matcher_agrees_with_the_reference(case: tuple[str, list[list[Node]], str]) -> None:
    pattern, alts, path = case
    want = any(reference_matches(alt, path) for alt in alts)
    event(f"matches: {want}")
    assert GlobSet.compile([pattern]).matches(path) is want, (pattern, path)


SUFFIX_ALPHABET = "abc/"  # c is in no pattern below, so it stands for "any other character" ([!ab] needs it)


@st.composite
def pattern_and_dir(draw: st.DrawFn) -> tuple[str, list[list[Node]], str]:
    nodes = draw(st.one_of(st.builds(lambda n: [("slash",), *n], _nodes("ab", "")), _path_like("ab")))
    alts = _alternatives(nodes)
    # The brute force below is complete only up to its bound: each token of an alternative consumes at
    # most one character of a shortest match's tail, so suffixes of up to that many characters suffice.
    assume(len(alts) <= 16 and max(len(a) for a in alts) <= 5)
    if draw(st.booleans()):
        witness = _witness(draw, draw(st.sampled_from(alts))).split("/")
        cut = draw(st.integers(1, max(1, len(witness))))
        parts = [p for p in witness[1:cut] if p]
    else:
        parts = draw(st.lists(st.text(alphabet="abc", min_size=1, max_size=2), max_size=3))
    return _render(nodes), alts, "/" + "/".join(parts)


def _suffixes(bound: int) -> list[str]:
    return ["".join(t) for n in range(bound + 1) for t in itertools.product(SUFFIX_ALPHABET, repeat=n)]


@settings(SETTINGS, max_examples=600)
@given(pattern_and_dir())
def test_reaches_agrees_with_brute_force(case: tuple[str, list[list[Node]], str]) -> None:
    pattern, alts, path = case
    bound = max(len(a) for a in alts)
    below = path if path.endswith("/") else path + "/"  # the root's children are "/x", not "//x"
    tails = _suffixes(bound)
    want = any(_matches_components(c, path) or any(_matches_components(c, below + s) for s in tails)
               for c in map(_components, alts))
    event(f"reaches: {want}")
    assert GlobSet.compile([pattern]).reaches(path) is want, (pattern, path)


FIXED = ["/a/*", "/a/?", "/a/??/**", "/[!a]*/**", "**/\udcff?", "/é/[é-ê]", "**/.git/hooks/**", "/x/{a,b/*}"]


def _python_re(pattern: str) -> re.Pattern[str]:
    """The same program for Python's re (which reads \\U, not \\x{...}), as a second opinion on text."""
    sources = [re.sub(r"\\x\{([0-9A-F]+)\}", lambda m: f"\\U{int(m[1], 16):08X}", globs.translate(alt))
               for alt in globs.expand_braces(pattern)]
    return re.compile("|".join(f"(?:{s})" for s in sources), re.DOTALL)


@SETTINGS
@given(st.one_of(st.binary(max_size=24).map(lambda b: b.decode("utf-8", "surrogateescape")),
                 st.text(max_size=12)), st.sampled_from(FIXED))
def test_any_bytes_or_text_never_raise_and_match_as_re_would(path: str, pattern: str) -> None:
    gs = GlobSet.compile([pattern])
    for text in (path, "/a/" + path, "/x/b/" + path):
        assert gs.matches(text) is (_python_re(pattern).fullmatch(text) is not None), (pattern, text)
        gs.reaches(text)


def test_short_programs_compile_at_first_use_long_ones_at_once() -> None:
    from gateway.rules.matcher import LAZY_MAX, Matcher

    short = Matcher("/home/" + "a" * 10 + "(?:/.*)?")
    assert not short.compiled  # a 10,000-rule policy must not build 30,000 programs nobody runs
    assert short.fullmatch("/home/aaaaaaaaaa/x") is not None and short.compiled
    long = Matcher("a" * (LAZY_MAX + 1))
    assert long.compiled  # RE2's one error (too large) stays the loader's, with its line


def test_a_pattern_too_large_for_re2_is_still_refused_when_compiled() -> None:
    from gateway.rules.globs import check_pattern

    why = check_pattern("/" + "[a-z]?" * 400_000)
    assert why is not None and "too large" in why
