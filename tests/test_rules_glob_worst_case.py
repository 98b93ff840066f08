"""The glob worst case, by counting rather than timing (bench/bench_rules.py --worst times it).

Python's re took 663 ms for ``/**/a/**/a/**/b`` against a 1,162-byte path and 95 s for six ``/a/**``
against 162 bytes (issue 9). The guard here: nothing the engine runs on a request is a Python ``re``
program, every glob is an RE2 program whose size is linear in the pattern's (RE2 then costs at most
program size x text length), and one decision runs no more matchers than the policy has candidate
patterns for it.
"""

from __future__ import annotations

import re
import textwrap
import types
from collections.abc import Iterator
from typing import Any

import pytest

from gateway.protocol import Link, Lsetxattr, Lstat, Open, Rename, Symlink
from gateway.rules import decide, load_policy_text
from gateway.rules.globs import GlobSet
from gateway.rules.matcher import Matcher
from gateway.rules.model import Policy

WORST_GLOBS = [
    "/**/a/**/a/**/b",
    "/a/**/a/**/a/**/a/**/a/**/a/**",
    "/**/**/**/**/**/**/**/**/z",
    "/{a,{b,{a,c}/**}/**}/**/{a,b}/*x",
    "**/a*a*a*a*a*a*b",
]

POLICY = textwrap.dedent("""\
    version: 1
    default: allow
    rules:
      - {id: w1, effect: deny, ops: [all], paths: ["/**/a/**/a/**/b"]}
      - {id: w2, effect: deny, ops: [all], paths: ["/a/**/a/**/a/**/a/**/a/**/a/**/c"]}
      - {id: w3, effect: deny, ops: [all], paths: ["/**/**/**/**/**/**/**/**/z"]}
      - {id: w4, effect: deny, ops: [all], paths: ["/{a,{b,{a,c}/**}/**}/**/{a,b}/*x"]}
      - {id: w256, effect: deny, ops: [all], paths: ["**/{a,b,c,d}{a,b,c,d}{a,b,c,d}{a,b,c,d}y"]}
      - {id: w5, effect: allow, ops: [all], paths: ["**/a*a*a*a*a*a*b"], except: ["/**/a/**/a/**/x"]}
      - id: w6
        effect: deny
        ops: [symlink]
        when: {target: ["**/a/**/a/**/b"], target_resolved: ["/**/a/**/a/**/b"]}
      - {id: w7, effect: deny, ops: [lsetxattr], when: {xattr: ["*a*a*a*a*a*b"]}}
""")

ADVERSARIAL = [b"/a" * 2048, b"/a" * 2047 + b"/", b"/" + b"a" * 4095, b"/a/" + b"a/" * 2046 + b"x",
               (b"/a" * 2047)[:4094] + b"\xff\xfe"]


def policy() -> Policy:
    return load_policy_text(POLICY, "worst.yaml")


def requests() -> Iterator[Any]:
    for path in ADVERSARIAL:
        assert len(path) <= 4096
        yield Lstat(path)
        yield Open(path, 2)
        yield Rename(path, path[::-1])
        yield Link(path, path[:-1])
        yield Symlink(1000, 1000, path, b"/t")
        yield Lsetxattr(path, path[-255:], b"v", 1, 0)


ATOMS = (str, bytes, int, float, type, types.ModuleType)


def _reachable(obj: Any, seen: set[int]) -> Iterator[Any]:
    """Every object a compiled policy holds: containers, slots, attributes, closure cells, bound
    methods' receivers (not module globals: those are not per-request state)."""
    stack = [obj]
    while stack:
        cur = stack.pop()
        if cur is None or id(cur) in seen or isinstance(cur, ATOMS):
            continue
        seen.add(id(cur))
        yield cur
        if type(cur).__module__.startswith("re2"):  # RE2's own objects: the leaves we are looking for
            continue
        if isinstance(cur, (list, tuple, set, frozenset)):
            stack.extend(cur)
        elif isinstance(cur, dict):
            stack.extend(cur.keys())
            stack.extend(cur.values())
        elif isinstance(cur, types.MethodType):
            stack += [cur.__self__, cur.__func__]
        elif isinstance(cur, types.FunctionType):
            stack.extend(c.cell_contents for c in cur.__closure__ or ())
            stack.extend(cur.__defaults__ or ())
        else:
            for klass in type(cur).__mro__:
                stack.extend(getattr(cur, s) for s in getattr(klass, "__slots__", ()) if hasattr(cur, s))
            stack.extend(getattr(cur, "__dict__", {}).values())


def test_the_engine_holds_no_python_regex() -> None:
    p = policy()
    found = list(_reachable(p.compiled, set()))
    assert not [o for o in found if isinstance(o, re.Pattern)]
    bound = [o for o in found if isinstance(o, types.MethodType) and isinstance(o.__self__, re.Pattern)]
    assert not bound
    matchers = [o for o in found if isinstance(o, Matcher)]
    assert len(matchers) >= 10  # the walk did reach the globs: paths, except, target, xattr
    # compiled at first use (gateway.rules.matcher.LAZY_MAX): whenever that is, the program is RE2's
    assert all(type(m._program()).__module__.startswith("re2") for m in matchers)


def test_deciding_calls_no_python_regex(monkeypatch: pytest.MonkeyPatch) -> None:
    p = policy()

    def refuse(*_args: Any, **_kw: Any) -> None:
        raise AssertionError("Python's re used while deciding")

    for name in ("compile", "match", "fullmatch", "search", "findall", "finditer", "sub", "split"):
        monkeypatch.setattr(re, name, refuse)
    for req in requests():
        decide(req, p)


def _candidates(p: Policy) -> int:
    """Every matcher a rule could run on one path: one per trie node its paths sit at (the alternatives
    at one node are one program), its except, its conditions."""
    total = 0
    for rule in p.rules:
        total += len(rule.paths.index_entries()) if rule.paths is not None else 0
        total += 1 if rule.except_ is not None else 0
        for block in (rule.when, rule.unless):
            for key in ("target", "target_except", "target_resolved", "xattr", "xattr_except"):
                total += 1 if block is not None and getattr(block, key) is not None else 0
    return total


def _deny_placements(p: Policy) -> int:
    return sum(len(r.paths.placements) for r in p.rules if r.deny and r.paths is not None)


def _deny_excepts(p: Policy) -> int:
    return sum(1 for r in p.rules if r.deny and r.except_ is not None)


def test_matcher_calls_per_decision_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = Matcher.fullmatch

    def counting(self: Matcher, text: str) -> object | None:
        calls.append(len(text))
        return real(self, text)

    monkeypatch.setattr(Matcher, "fullmatch", counting)
    p = policy()  # compiled after the patch, so the engine's bound methods count
    bound = _candidates(p)
    most = 0
    for req in requests():
        calls.clear()
        decide(req, p)
        paths = 2 if isinstance(req, (Rename, Link)) else 1
        # An aliasing request also asks each deny rule's placements whether they reach its paths
        # (gateway/rules/aliases.py): at most four scans (a rename's two paths, its source against the
        # read-denies twice), two matches per placement (the path itself, and below it), plus excepts.
        aliasing = 4 if isinstance(req, Rename) else 2 if isinstance(req, (Link, Symlink)) else 0
        alias_bound = aliasing * (2 * _deny_placements(p) + _deny_excepts(p))
        assert len(calls) <= paths * bound + alias_bound, (req.type, len(calls), bound, alias_bound)
        assert all(n <= 4096 + 1 for n in calls)  # a path, or a path and "/" (reaches: below it)
        most = max(most, len(calls))
    assert most >= 3  # the adversarial paths really reach the worst globs


def test_alternatives_at_one_node_are_one_match(monkeypatch: pytest.MonkeyPatch) -> None:
    # 256 alternatives that all start with a wildcard sit at the root: one program, one call (as 256
    # calls they took 4.7 ms on a 4 KiB path).
    calls: list[str] = []
    real = Matcher.fullmatch
    monkeypatch.setattr(Matcher, "fullmatch", lambda self, text: calls.append(text) or real(self, text))
    p = load_policy_text('version: 1\ndefault: allow\nrules:\n  - {id: r, effect: deny, ops: [all], '
                         'paths: ["**/{a,b,c,d}{a,b,c,d}{a,b,c,d}{a,b,c,d}x", "/etc/{a,b}", "/etc/**"]}\n')
    assert len(p.rules[0].paths.placements) == 259
    assert decide(Lstat(b"/a" * 2047 + b"x"), p).outcome == "allow"
    assert len(calls) == 1
    calls.clear()
    assert decide(Lstat(b"/q/" + b"dcba/" * 800 + b"dcbax"), p).outcome == "deny"
    assert len(calls) == 1
    calls.clear()
    assert decide(Lstat(b"/etc/b"), p).outcome == "deny"  # exact and subtree: reaching the node is the match
    assert len(calls) <= 1


@pytest.mark.parametrize("pattern", WORST_GLOBS)
def test_programs_grow_linearly_with_the_pattern(pattern: str) -> None:
    # RE2's time is bounded by program size x text length; the size must not explode with ** or braces.
    for place in GlobSet.compile([pattern]).placements:
        for m in (place.regex, place.reach):
            assert m.program_size <= 4 * len(place.pattern) + 16, (place.pattern, m.pattern, m.program_size)
    # Doubling the pattern at most doubles each alternative's program (braces multiply the alternatives,
    # which MAX_ALTERNATIVES bounds, and each alternative is matched on its own in the index).
    one = max(p.regex.program_size for p in GlobSet.compile([pattern]).placements)
    twice = max(p.regex.program_size for p in GlobSet.compile([pattern + pattern.lstrip("*")]).placements)
    assert twice <= 2 * one + 8
