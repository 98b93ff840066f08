"""Semantics of decide(): deny overrides, default, permissive, enforce always, two-path requests, lazy object
lookups, path normalisation, order independence, and the index agreeing with a brute-force reference."""

from __future__ import annotations

import errno
import os
import random
import textwrap

import pytest

from gateway.protocol import Chmod, Create, Link, Lstat, Open, Rename, Symlink
from gateway.protocol import RequestType as RT
from gateway.rules import Decision, ObjectAttrs, decide, load_policy_text
from gateway.rules.aliases import Tail
from gateway.rules.compiler import model_path
from gateway.rules.engine import slot_of
from gateway.rules.globs import has_special, translate
from gateway.rules.matcher import Matcher
from gateway.rules.model import OPEN_READ, TWO_PATH, Policy, Rule
from gateway.rules.requests import parse_text


def policy(rules: str, default: str = "deny", enforcement: str = "enforce") -> Policy:
    body = textwrap.indent(textwrap.dedent(rules).strip("\n"), "  ")
    return load_policy_text(f"version: 1\ndefault: {default}\nenforcement: {enforcement}\nrules:\n{body}\n")


def ask(p: Policy, text: str, obj: ObjectAttrs | None = None) -> Decision:
    spec = parse_text(text)
    found = obj if obj is not None else spec.object
    return decide(spec.request, p, lambda _path: found)


class CountingLookup:
    def __init__(self, answer: object = None) -> None:
        self.answer = answer
        self.calls: list[str] = []

    def __call__(self, path: str) -> object:
        self.calls.append(path)
        return self.answer


RULES = """
- {id: read-all, effect: allow, ops: [read]}
- {id: etc-ro, effect: deny, ops: [write], paths: ["/etc/**"], errno: EROFS}
- {id: home, effect: allow, ops: [all], paths: ["/home/**"], when: {uid: ["1000-59999"]}}
- {id: home-writes, effect: allow, ops: [write], paths: ["/home/**"]}
"""


def test_deny_overrides_allow() -> None:
    p = policy(RULES + '- {id: etc-allow, effect: allow, ops: [all], paths: ["/etc/**"]}\n')
    d = ask(p, "open /etc/passwd flags=O_RDWR")
    assert (d.effect, d.outcome, d.enforced, d.rule, d.errno) == ("deny", "deny", True, "etc-ro", errno.EROFS)
    assert d.matched == ("etc-ro", "etc-allow")
    assert d.reason == "denied by rule 'etc-ro' (also matched: etc-allow)"
    d = ask(p, "open /etc/passwd")  # reads are not denied; two allows match, the first id decides
    assert (d.outcome, d.rule, d.matched) == ("allow", "etc-allow", ("etc-allow", "read-all"))


def test_default_when_nothing_matches() -> None:
    d = ask(policy(RULES), "mknod /srv/x mode=0644")
    assert (d.outcome, d.rule, d.errno, d.matched) == ("deny", None, errno.EACCES, ())
    assert d.reason == "no rule matched: default deny"
    d = ask(policy(RULES, default="allow"), "mknod /srv/x mode=0644")
    assert (d.outcome, d.rule, d.errno) == ("allow", None, 0)


def test_allow_decision_fields() -> None:
    d = ask(policy(RULES), "create /home/a/x uid=1000 gid=1000")
    assert (d.effect, d.outcome, d.enforced, d.errno) == ("allow", "allow", True, 0)
    assert d.rule == "home" and d.matched == ("home", "home-writes")  # precedence among allows: by id


def test_several_denies_name_one_by_id_whatever_the_order() -> None:
    rules = """
    - {id: b-deny, effect: deny, ops: [all], errno: EPERM}
    - {id: a-deny, effect: deny, ops: [all], errno: EROFS}
    - {id: c-deny, effect: deny, ops: [all]}
    """
    for order in (rules, "\n".join(reversed(textwrap.dedent(rules).strip().splitlines()))):
        d = ask(policy(order), "lstat /x")
        assert (d.rule, d.errno, d.matched) == ("a-deny", errno.EROFS, ("a-deny", "b-deny", "c-deny"))


def test_permissive_turns_denials_into_would_deny() -> None:
    p = policy(RULES, enforcement="permissive")
    d = ask(p, "open /etc/passwd flags=O_RDWR")
    assert (d.effect, d.outcome, d.enforced, d.rule, d.errno) == ("deny", "would-deny", False, "etc-ro", 30)
    assert "permissive" in d.reason
    d = ask(p, "mknod /srv/x")  # the default's denials too
    assert (d.outcome, d.enforced, d.rule) == ("would-deny", False, None)
    assert ask(p, "open /etc/passwd").outcome == "allow"


def test_enforce_always_stays_enforced_under_permissive() -> None:
    rules = RULES + textwrap.dedent("""
    - {id: z-no-dev, effect: deny, ops: [mknod], when: {type: [chr]}, enforce: always, errno: EPERM}
    - {id: a-no-mknod, effect: deny, ops: [mknod]}
    """)
    d = ask(policy(rules, enforcement="permissive"), "mknod /x mode=020644")
    # the always-enforced rule decides although "a-no-mknod" sorts first: it decides whether the request
    # is really refused
    assert (d.outcome, d.enforced, d.rule, d.errno) == ("deny", True, "z-no-dev", errno.EPERM)
    assert d.matched == ("z-no-dev", "a-no-mknod")
    d = ask(policy(rules, enforcement="permissive"), "mknod /x mode=010644")
    assert (d.outcome, d.rule) == ("would-deny", "a-no-mknod")
    d = ask(policy(rules), "mknod /x mode=020644")
    assert (d.outcome, d.rule) == ("deny", "a-no-mknod")  # enforce: plain id order


def test_two_path_requests_need_both_paths_allowed() -> None:
    p = policy(RULES)
    assert ask(p, "rename /home/a/x /home/a/y").outcome == "allow"
    d = ask(p, "rename /home/a/x /etc/y")
    assert (d.outcome, d.rule, d.errno) == ("deny", "etc-ro", errno.EROFS)
    assert d.reason == "denied by rule 'etc-ro' on path2 (also matched: home-writes)"
    d = ask(p, "rename /etc/y /home/a/x")
    assert d.reason == "denied by rule 'etc-ro' (also matched: home-writes)"
    d = ask(p, "link /home/a/x /srv/y")  # path2 falls to the default
    assert (d.outcome, d.rule, d.matched) == ("deny", None, ("home-writes",))
    assert d.reason == "no rule matched path2: default deny (also matched: home-writes)"
    d = ask(p, "rename /srv/x /home/a/y")
    assert (d.outcome, d.rule) == ("deny", None)


def test_symlink_target_is_a_condition_not_a_path() -> None:
    p = policy(RULES)
    assert ask(p, "symlink /home/a/l target=/etc/passwd uid=1000").outcome == "allow"
    assert ask(p, "symlink /etc/l target=/home/a uid=1000").rule == "etc-ro"


def test_no_lookup_when_no_rule_reads_the_object() -> None:
    lookup = CountingLookup()
    for text in ("open /etc/passwd flags=O_RDWR", "create /home/a/x uid=1000", "rename /a /b", "lstat /x"):
        decide(parse_text(text).request, policy(RULES), lookup)
    assert lookup.calls == []


OWNER_RULES = """
- {id: own, effect: allow, ops: [write], paths: ["/data/**"], when: {object: {owner: [1000]}}}
- {id: etc-ro, effect: deny, ops: [write], paths: ["/etc/**"]}
- {id: root-files, effect: deny, ops: [remove], when: {object: {owner: [0]}}}
- {id: tmp, effect: allow, ops: [all], paths: ["/tmp/**"]}
"""


@pytest.mark.parametrize(
    ("text", "answer", "outcome", "calls"),
    [
        ("truncate /data/f", ObjectAttrs(owner=1000), "allow", ["/data/f"]),
        ("truncate /data/f", ObjectAttrs(owner=1), "deny", ["/data/f"]),
        ("truncate /data/f", None, "deny", ["/data/f"]),  # missing object: conditions fail
        ("truncate /data/f", os.stat_result((0o100644, 1, 1, 1, 1000, 0, 0, 0, 0, 0)), "allow", ["/data/f"]),
        ("truncate /data/./g/../f", ObjectAttrs(owner=1000), "allow", ["/data/f"]),  # normalised path
        ("truncate /elsewhere", ObjectAttrs(owner=1000), "deny", []),  # no rule's other conditions hold
        ("open /data/f", ObjectAttrs(owner=1000), "deny", []),  # a read: `own` is not a candidate
        # a cheap deny decides whatever the object: no lookup (remove: root-files could only rename it)
        ("remove /etc/x", ObjectAttrs(owner=0), "deny", []),
        ("remove /tmp/x", ObjectAttrs(owner=0), "deny", ["/tmp/x"]),  # the deny could change the allow
        ("remove /tmp/x", ObjectAttrs(owner=5), "allow", ["/tmp/x"]),
        # rename: one lookup, of the source; destination decided with the source object
        ("rename /data/a /data/b", ObjectAttrs(owner=1000), "allow", ["/data/a"]),
        ("rename /data/a /etc/b", ObjectAttrs(owner=1000), "deny", []),  # path2 denied for sure
        ("rename /tmp/a /data/b", ObjectAttrs(owner=1000), "allow", ["/tmp/a"]),
    ],
)
def test_object_lookup_only_when_it_could_change_the_outcome(text: str, answer: object, outcome: str,
                                                             calls: list[str]) -> None:
    lookup = CountingLookup(answer)
    d = decide(parse_text(text).request, policy(OWNER_RULES), lookup)
    assert d.outcome == outcome
    assert lookup.calls == calls


def test_permissive_looks_up_when_an_always_rule_could_enforce() -> None:
    rules = """
    - {id: a-plain, effect: deny, ops: [remove]}
    - {id: b-root, effect: deny, ops: [remove], when: {object: {owner: [0]}}, enforce: always}
    """
    p = policy(rules, enforcement="permissive")
    lookup = CountingLookup(ObjectAttrs(owner=0))
    d = decide(parse_text("remove /x").request, p, lookup)
    assert (d.outcome, d.rule, lookup.calls) == ("deny", "b-root", ["/x"])
    lookup = CountingLookup(ObjectAttrs(owner=7))
    d = decide(parse_text("remove /x").request, p, lookup)
    assert (d.outcome, d.rule, lookup.calls) == ("would-deny", "a-plain", ["/x"])
    lookup = CountingLookup(ObjectAttrs(owner=0))
    d = decide(parse_text("remove /x").request, policy(rules), lookup)  # enforce: already denied
    assert (d.outcome, lookup.calls) == ("deny", [])


def test_no_lookup_function_means_unknown_attributes() -> None:
    d = decide(parse_text("truncate /data/f").request, policy(OWNER_RULES), None)
    assert d.outcome == "deny" and d.rule is None


@pytest.mark.parametrize(
    ("raw", "normal"),
    [(b"/etc/passwd", "/etc/passwd"), (b"//etc/./passwd", "/etc/passwd"), (b"etc/passwd", "/etc/passwd"),
     (b"/home/../etc/passwd", "/etc/passwd"), (b"/../../etc/passwd", "/etc/passwd"), (b"", "/"),
     (b"/", "/"), (b"/a/", "/a"), (b"/a/.git", "/a/.git"), (b"/a/..b", "/a/..b"), (b"/a/..", "/"),
     (b"/\xff/x", "/\udcff/x")],
)
def test_path_normalisation(raw: bytes, normal: str) -> None:
    assert model_path(raw) == normal


def test_decisions_are_matched_on_the_normalised_path() -> None:
    p = policy(RULES)
    assert ask(p, "open /home/../etc/passwd flags=O_RDWR").rule == "etc-ro"
    assert ask(p, "open //etc//passwd flags=O_RDWR").rule == "etc-ro"
    assert ask(p, "open etc/passwd flags=O_RDWR").rule == "etc-ro"


# ---------------------------------------------------------------------------------------------------------
# Randomised: order independence, and the index against a brute-force reference.

PATHS = ["/a/**", "/a/b/*", "/a/b/c", "**/c", "/{a,d}/e/**", "/d/*/f", "/", "/a/[bx]/**"]
OPS = ["read", "write", "create", "delete", "attr", "xattr", "all", "open", "CREATE", "rename", "mknod",
       "link", "chmod"]
CONDS = ["uid: ['10-20']", "uid: [0]", "gid: [5]", "mode_any: [setuid]", "mode_none: [ow]", "type: [reg]",
         "type: [chr, dir]", "flags_any: [O_RDWR]", "flags_none: [O_TRUNC]", "object: {owner: [1]}",
         "object: {type: [dir]}"]
REQ_PATHS = ["/a", "/a/b", "/a/b/c", "/d/x/f", "/a/e/c", "/d/e/x", "/z", "/a/x/y"]
REQS = ["open {p}", "open {p} flags=O_RDWR", "open {p} flags=O_RDWR|O_TRUNC", "create {p} uid={u} mode=04644",
        "create {p} uid={u} gid=5 mode=0666", "mkdir {p} uid={u} mode=0755", "mknod {p} mode=020644 uid={u}",
        "rename {p} {q}", "link {p} {q}", "chmod {p} mode=040755", "lstat {p}", "remove {p}",
        "lsetxattr {p} name=user.x", "symlink {p} target=x uid={u}"]


def random_policy_text(rng: random.Random, count: int) -> list[str]:
    rules = []
    for i in range(count):
        parts = [f"id: r{i:02d}", f"effect: {rng.choice(['allow', 'deny'])}",
                 f"ops: [{', '.join(rng.sample(OPS, rng.randint(1, 2)))}]"]
        if rng.random() < 0.7:
            parts.append(f"paths: [{', '.join(repr(p) for p in rng.sample(PATHS, rng.randint(1, 2)))}]")
        if rng.random() < 0.2:
            parts.append("except: ['/a/b/**']")
        if rng.random() < 0.5:
            picked = {c.split(":")[0]: c for c in rng.sample(CONDS, rng.randint(1, 3))}  # one per key
            parts.append(f"when: {{{', '.join(picked.values())}}}")
        if rng.random() < 0.15:
            parts.append(f"unless: {{{rng.choice(CONDS)}}}")
        if rng.random() < 0.1 and "deny" in parts[1]:
            parts.append("enforce: always")
        rules.append("- {" + ", ".join(parts) + "}")
    return rules


def reference(p: Policy, request: object, obj: ObjectAttrs) -> tuple[str, set[str]]:
    """Every rule evaluated in full, eagerly, without the index: outcome and matched ids."""
    slot = slot_of(request)
    paths = [model_path(request.path)]  # type: ignore[attr-defined]
    if request.type in TWO_PATH:  # type: ignore[attr-defined]
        paths.append(model_path(request.path2))  # type: ignore[attr-defined]
    levels, matched = [], set()
    for path in paths:
        hits = []
        for rule in p.rules:
            view = p.compiled.views.get((rule.id, slot))
            if view is None or (rule.paths is not None and not rule.paths.matches(path)):
                continue
            if rule.except_ is not None and rule.except_.matches(path):
                continue
            if not all(c.test(request) for c in view.when) or not all(c.test(obj) for c in view.when_obj):
                continue
            if view.unless is not None and all(c.test(request) for c in view.unless) and all(
                    c.test(obj) for c in view.unless_obj):
                continue
            hits.append(rule)
        matched |= {r.id for r in hits}
        denies = [r for r in hits if r.deny]
        if denies:
            levels.append(2 if p.enforcement == "enforce" or any(r.always for r in denies) else 1)
        elif hits:
            levels.append(0)
        else:
            levels.append(0 if p.default == "allow" else (2 if p.enforcement == "enforce" else 1))
    level = max(levels)
    alias = reference_alias(p, request, obj) if level < 2 else None
    if alias is not None:
        alias_level = 2 if p.enforcement == "enforce" or alias.always else 1
        if alias_level > level:
            level = alias_level
            matched.add(alias.id)
    return {0: "allow", 1: "would-deny", 2: "deny"}[level], matched


def reference_reaches(pattern: str, t: list[str]) -> bool:
    """Could a brace-free pattern match T or below it (an unanchored tail: only where it takes in T), by
    a component walk rather than the engine's RE2 programs."""
    tail = Tail.of(pattern)
    if tail is not None:
        return tail.straddles(t, inside=True)
    if pattern.startswith("/"):
        parts = pattern[1:].split("/") if pattern != "/" else []
    elif pattern.startswith("**"):
        parts = pattern.split("/")
    else:
        return False  # matches no absolute path
    comps = [None if c == "**" else (c.__eq__ if not has_special(c) else Matcher(translate(c)).fullmatch)
             for c in parts]

    def closure(states: set[int]) -> set[int]:  # let a ** match no component
        out, todo = set(states), list(states)
        while todo:
            i = todo.pop()
            if i < len(comps) and comps[i] is None and i + 1 not in out:
                out.add(i + 1)
                todo.append(i + 1)
        return out

    states = {0}
    for name in t:
        nxt: set[int] = set()
        for i in closure(states):
            if i < len(comps):
                c = comps[i]
                if c is None:
                    nxt.add(i)
                elif c(name):
                    nxt.add(i + 1)
        if not nxt:
            return False
        states = nxt
    return True  # some pattern position is alive after T: a suffix (or T itself) can finish it


def reference_alias(p: Policy, request: object, obj: ObjectAttrs) -> Rule | None:
    """The alias semantics of gateway/rules/aliases.py, brute force: every deny rule with paths, no index."""
    t = request.type  # type: ignore[attr-defined]
    if t not in (RT.SYMLINK, RT.RENAME, RT.LINK):
        return None
    path = model_path(request.path)  # type: ignore[attr-defined]
    path2 = model_path(request.path2) if t in TWO_PATH else None  # type: ignore[attr-defined]

    def reach(rule: Rule, where: str) -> bool:
        comps = where[1:].split("/") if where != "/" else []
        excepts = rule.except_.placements if rule.except_ is not None else ()
        if any(pl.kind == "subtree" and tuple(comps[: len(pl.prefix)]) == pl.prefix for pl in excepts):
            return False
        return any(reference_reaches(pl.pattern, comps) for pl in rule.paths.placements)  # type: ignore[union-attr]

    def holds(rule: Rule, slot: int, unconditional: bool) -> bool:
        view = p.compiled.views.get((rule.id, slot))
        if view is None or not rule.deny or rule.paths is None:
            return False
        if unconditional:
            return not view.when and view.unless is None
        return all(c.test(request) for c in view.when) and not (  # object conditions count as holding
            view.unless is not None and all(c.test(request) for c in view.unless) and not view.unless_obj)

    checks: list[tuple[int, str, bool, bool]] = []  # slot, path, unconditional, exact
    if t is RT.SYMLINK:
        checks.append((int(RT.SYMLINK), path, False, False))
    else:
        assert path2 is not None
        if obj.type in (None, 0o040000, 0o120000):  # a directory or a symlink reaches below its new name
            checks.append((int(t), path2, False, False))
        if t is RT.RENAME and obj.type in (None, 0o040000):
            checks += [(int(RT.RENAME), path, False, False)]
            checks += [(int(RT.LSTAT), path, True, False), (OPEN_READ, path, True, False)]
        else:
            checks += [(int(RT.LSTAT), path, True, True), (OPEN_READ, path, True, True)]
    for slot, where, unconditional, exact in checks:
        found = [r for r in p.rules if holds(r, slot, unconditional) and (
            (r.paths.matches(where) and not (r.except_ is not None and r.except_.matches(where)))  # type: ignore[union-attr]
            if exact else reach(r, where))]
        if found:
            return min(found, key=lambda r: p.compiled.ranks[r.id])
    return None


@pytest.mark.parametrize("seed", range(40))
def test_index_agrees_with_brute_force_and_order_does_not_matter(seed: int) -> None:
    rng = random.Random(seed)
    rules = random_policy_text(rng, rng.randint(3, 14))
    head = f"version: 1\ndefault: {rng.choice(['allow', 'deny'])}\n"
    head += f"enforcement: {rng.choice(['enforce', 'permissive'])}\nrules:\n"
    p = load_policy_text(head + "\n".join("  " + r for r in rules) + "\n")
    shuffled = rules[:]
    rng.shuffle(shuffled)
    q = load_policy_text(head + "\n".join("  " + r for r in shuffled) + "\n")
    for _ in range(150):
        template = rng.choice(REQS)
        text = template.format(p=rng.choice(REQ_PATHS), q=rng.choice(REQ_PATHS), u=rng.choice([0, 15]))
        request = parse_text(text).request
        obj = rng.choice([ObjectAttrs(owner=1, type=0o040000), ObjectAttrs(owner=2, type=0o100000), None])
        d = decide(request, p, lambda _path, o=obj: o)
        assert d == decide(request, q, lambda _path, o=obj: o), text  # rule order never matters
        outcome, matched = reference(p, request, obj or ObjectAttrs())
        assert d.outcome == outcome, (text, rules)
        assert set(d.matched) <= matched, (text, rules)  # lazily skipped object rules may be missing
        if set(d.matched) != matched:  # ... but only rules that read the object
            assert all(p.compiled.views[(r, slot_of(request))].obj for r in matched - set(d.matched))
        explained = decide(request, p, lambda _path, o=obj: o, explain=True)
        assert explained._replace(explanation=None) == d
        said = {t.rule for t in explained.explanation if t.status in ("matched", "decides")}
        assert said == set(d.matched), (text, rules)


def test_explain_says_why_rules_did_not_match() -> None:
    p = policy(RULES + OWNER_RULES.replace("etc-ro", "etc-ro2"))
    d = decide(parse_text("open /etc/passwd flags=O_RDWR").request, p, None, explain=True)
    why = {(t.rule, t.role): (t.status, t.detail) for t in d.explanation}
    assert why[("etc-ro", "path")] == ("decides", "all conditions hold (path matches /etc/**)")
    assert why[("etc-ro2", "path")][0] == "matched"
    assert why[("read-all", "path")] == ("no-match", "op open (write) is not in ops [read]")
    assert why[("home", "path")] == (
        "no-match", "condition 'uid' never holds for open (write) (the request has no such field)")
    assert why[("own", "path")] == ("no-match", "/etc/passwd matches none of paths [/data/**]")
    d = decide(parse_text("truncate /data/x").request, p, lambda _p: ObjectAttrs(owner=3), explain=True)
    why = {t.rule: (t.status, t.detail) for t in d.explanation}
    assert why["own"] == ("no-match", "needs object owner in 1000; object.owner is 3")
    d = decide(parse_text("truncate /etc/x").request, p, lambda _p: ObjectAttrs(owner=3), explain=True)
    assert {t.rule: t.status for t in d.explanation}["root-files"] == "no-match"
    d = decide(parse_text("remove /etc/x").request, p, lambda _p: ObjectAttrs(owner=0), explain=True)
    assert {t.rule: t.status for t in d.explanation}["root-files"] == "not-evaluated"


def test_decide_accepts_protocol_requests_directly() -> None:
    p = policy(RULES)
    assert decide(Open(b"/etc/passwd", os.O_RDWR), p).rule == "etc-ro"
    assert decide(Create(b"/home/a/f", os.O_CREAT, 0o644, 1000, 1000), p).rule == "home"
    assert decide(Rename(b"/home/a/f", b"/etc/f"), p).rule == "etc-ro"
    assert decide(Link(b"/home/a/f", b"/home/a/g"), p).rule == "home-writes"
    assert decide(Symlink(1000, 1000, b"/x", b"/home/a/l"), p).rule == "home"
    assert decide(Chmod(b"/home/a/f", 0o644), p).rule == "home-writes"
    assert decide(Lstat(b"/anything"), p).rule == "read-all"
