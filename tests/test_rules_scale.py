"""Policies at fleet scale: the quick paths of loading and compiling give exactly what the slow ones gave.

Nothing here times anything. The schema's quick rule check must accept only what Cerberus accepts, and
normalise it as Cerberus does; the compiled form must stay small (views, indexes and RE2 programs a
10,000-rule policy builds, counted).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.rules import schema

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import policy_gen  # noqa: E402

_WORDS = st.sampled_from([
    "a", "", "x y", "read", "write", "all", "CREATE", "wirte", "open", "allow", "deny", "EROFS", "EACCES",
    "eacces", "ENOPE", "always", "never", "/home/**", "/a/{b,c}/*.key", "/a/[", "**/.git/**", "r-1", "r.1:x",
    "-bad", "id\n", "/etc/passwd", "/{a,b", "\\", "permissive",
])
_SCALARS = st.one_of(_WORDS, st.integers(-2, 5000), st.booleans(), st.none(), st.floats(allow_nan=False))
_VALUES = st.one_of(_SCALARS, st.lists(_SCALARS, max_size=3), st.dictionaries(_WORDS, _SCALARS, max_size=2))
_KEYS = st.sampled_from(["id", "effect", "ops", "paths", "except", "errno", "enforce", "description",
                         "when", "pathz", "unless"])
_RULES = st.one_of(
    st.dictionaries(_KEYS, _VALUES, max_size=8),
    st.fixed_dictionaries(
        {"id": _WORDS, "effect": _WORDS, "ops": st.one_of(_WORDS, st.lists(_WORDS, max_size=3))},
        optional={"paths": st.one_of(_WORDS, st.lists(_WORDS, max_size=3)),
                  "except": st.lists(_WORDS, max_size=2), "errno": st.one_of(_WORDS, st.integers(-1, 5000)),
                  "enforce": _WORDS, "description": st.one_of(_WORDS, st.integers())},
    ),
    _SCALARS,
)


def _cerberus(rule: Any) -> tuple[bool, Any]:
    v = schema.PolicyValidator({"rule": schema.RULE})
    ok = v.validate({"rule": rule})
    return ok, v.document.get("rule") if ok else None


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_RULES)
def test_the_quick_rule_check_accepts_only_what_cerberus_accepts_and_normalises_alike(rule: Any) -> None:
    quick = schema._quick_rule(rule)
    ok, normalised = _cerberus(rule)
    if quick is not None:
        assert ok, rule
        assert quick == normalised


def test_the_quick_check_takes_every_rule_of_a_generated_policy() -> None:
    import yaml

    doc = yaml.safe_load(policy_gen.path_policy(200))
    assert all(schema._quick_rule(r) is not None for r in doc["rules"])


def test_a_rule_cerberus_words_keeps_its_place_in_the_document() -> None:
    from gateway.rules import PolicyError, load_policy_text

    text = policy_gen.path_policy(50).replace("    ops: [write]\n    paths: ['/srv/ro3/**']",
                                              "    ops: [wirte]\n    paths: ['/srv/ro3/**']\n    pathz: 1")
    try:
        load_policy_text(text, "p.yaml")
    except PolicyError as err:
        lines = str(err).splitlines()
    else:
        raise AssertionError("an invalid policy loaded")
    line = text.splitlines().index("    ops: [wirte]") + 1
    assert f"p.yaml:{line}: rules[16].ops: unknown op 'wirte' (did you mean 'write'?)" in lines
    assert any(s.startswith(f"p.yaml:{line + 2}: rules[16]: unknown field 'pathz'") for s in lines), lines


_GLOB_CHARS = st.sampled_from([*"ab/*?[]{},\\!^-.", "**", "/**", "[a-c]", "[!/]", "{x,y}"])


def _reference_check(pattern: str) -> str | None:
    """check_pattern as it was: every brace walked, every alternative tokenised."""
    from gateway.rules import globs

    try:
        globs._find_brace(pattern)
        for alt in globs.expand_braces(pattern):
            globs.tokens(alt)
    except globs.GlobError as err:
        return str(err)
    return None


@settings(max_examples=1500, deadline=None)
@given(st.lists(_GLOB_CHARS, max_size=10).map("".join))
def test_the_quick_glob_checks_refuse_exactly_what_the_full_walk_refuses(pattern: str) -> None:
    from gateway.rules import globs

    assert globs.check_pattern(pattern) == _reference_check(pattern)


# ---------------------------------------------------------------------------------------------------------
# The compiled form: shared views, shared indexes, no program compiled before it is used.


def _reachable(root: object) -> list[object]:
    import gc
    import types

    seen: set[int] = set()
    out = []
    todo = [root]
    while todo:
        obj = todo.pop()
        if id(obj) in seen or isinstance(obj, type | types.ModuleType | types.FunctionType | types.CodeType):
            continue
        seen.add(id(obj))
        out.append(obj)
        todo.extend(gc.get_referents(obj))
        for slot in getattr(type(obj), "__slots__", ()):  # slotted objects: get_referents sees them too
            if hasattr(obj, slot):
                todo.append(getattr(obj, slot))
    return out


def test_a_fleet_policy_compiles_to_shared_views_and_indexes_and_no_programs() -> None:
    from gateway.rules import load_policy_text
    from gateway.rules.compiler import View
    from gateway.rules.matcher import Matcher

    n = 10_000
    p = load_policy_text(policy_gen.path_policy(n))
    c = p.compiled
    views = {id(c.views[k]) for k in c.views}
    assert len(views) == n  # one view per rule, whatever the number of slots its ops name
    assert len(c.views) == sum(len(r.slots) for r in p.rules)  # ... and each still found at every slot
    assert len({id(r) for r in c.roots if r is not None}) <= 4  # slots with the same rules share an index
    assert len({id(r) for r in c.alias_roots.values()}) <= 2
    found = _reachable(p)
    assert sum(isinstance(o, View) for o in found) == n
    matchers = [o for o in found if isinstance(o, Matcher)]
    assert not [m for m in matchers if m.compiled]  # RE2 programs: made when first used
    # Python objects per rule, everything reachable from the policy (a rule, its globs and view, its
    # index entries, alias nodes, strings, ints): about 29 a rule. Before the views and indexes were
    # shared, the collector tracked 2,050,000 objects after this load (200 a rule; 157,000 views).
    assert len(found) / n < 35, len(found) / n


def test_the_first_use_of_a_glob_compiles_it_and_decides_as_before() -> None:
    from gateway import protocol as pr
    from gateway.rules import decide, load_policy_text

    p = load_policy_text(policy_gen.path_policy(102))
    d = decide(pr.Lstat(b"/home/u7/a/b/id.key"), p)
    assert (d.outcome, d.rule) == ("deny", "secret-7")
    assert decide(pr.Lstat(b"/home/u7/a/b/id.pub"), p).rule == "read-anything"


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10**6))
def test_a_view_shared_between_slots_is_the_view_each_slot_would_get(seed: int) -> None:
    """The compiler builds one view per rule for the slots its conditions cannot tell apart (_slot_key);
    each must be exactly what compiling the rule for that slot alone gives (the engine's brute-force test
    reads the shared views, so it cannot see a wrong grouping: this does)."""
    import random

    from test_rules_engine import random_policy_text

    from gateway.rules import compiler, load_policy_text

    rng = random.Random(seed)
    rules = random_policy_text(rng, rng.randint(3, 14))
    p = load_policy_text("version: 1\ndefault: deny\nrules:\n" + "\n".join("  " + r for r in rules) + "\n")

    def shape(v: compiler.View | None) -> object:
        if v is None:
            return None
        conds = (v.when, v.unless, v.when_obj, v.unless_obj)
        return v.obj, v.deny, v.prio, tuple(None if cs is None else tuple((c.key, c.text) for c in cs)
                                            for cs in conds)

    for rule in p.rules:
        when_obj = compiler.object_conds(rule.when.object)
        unless_obj = compiler.object_conds(rule.unless.object) if rule.unless else []
        for slot in rule.slots:
            alone = compiler._view(rule, slot, p.compiled.ranks[rule.id], when_obj, unless_obj, True)
            assert shape(p.compiled.views.get((rule.id, slot))) == shape(alone), (rule.id, slot, rules)
