"""Findings about a valid policy that is probably not what its author meant.

* a rule that can never decide because another rule always wins over it (an allow fully covered by a
  deny; a rule covered by another of the same effect that takes precedence);
* patterns that can never match a normalised path; ``except`` patterns that swallow all of ``paths``;
* conditions that can never hold for any of the rule's ops (the rule never matches), and ``unless``
  blocks that can never hold for some ops (the rule then applies to those unconditionally);
* allow rules made pointless by ``default: allow``; ``enforce: always`` without permissive enforcement;
* an id map whose squash id is root as the guest sees it;
* an unconditional deny rule that protects a path from writes but not from aliasing (symlink, rename,
  link), where the policy lets the guest create those somewhere: the guest could build its data
  elsewhere and give it the protected name (gateway/rules/aliases.py; the alias check applies the rules
  of the aliasing op).

No finding warns about slow globs: every glob is an RE2 program matched in time linear in the path, and
its cost does not grow with the number of ``**`` (bench/bench_rules.py --worst shows the worst case).

Coverage is proven conservatively: a finding is reported only when it is certain, so a quiet lint does not
prove that no rule is shadowed, but a reported shadow is real. Rules are not compared pairwise: an index by
op slot and literal path prefix (``_CoverIndex``) yields, for each rule, the few rules that could cover it,
so the work grows with the number of rules, not of their pairs. (Duplicate ids are not findings: the
loader refuses them, because decisions and audit records name rules by id.)
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.protocol import RequestType as RT
from gateway.rules import globs, model
from gateway.rules.compiler import request_conds
from gateway.rules.model import Conditions, ObjectConditions, Policy, Rule


@dataclass(frozen=True)
class Finding:
    severity: str  # "warning" | "info"
    code: str
    line: int
    rule: str | None
    message: str


Ranges = tuple[tuple[int, int], ...] | None


def _ranges_cover(outer: Ranges, inner: Ranges) -> bool:
    if outer is None:
        return True
    if inner is None:
        return False
    return all(any(lo <= a and b <= hi for lo, hi in outer) for a, b in inner)


def _globs_cover(outer: globs.GlobSet | None, inner: globs.GlobSet | None) -> bool:
    if outer is None:
        return True
    if inner is None:
        return False
    return all(any(globs.covers_subtree(o, i) for o in outer.patterns) for i in inner.patterns)


def _subset_patterns(small: globs.GlobSet | None, big: globs.GlobSet | None) -> bool:
    """Every exception of ``small`` is also an exception of ``big`` (as written)."""
    if small is None:
        return True
    return big is not None and set(small.patterns) <= set(big.patterns)


def _flags(t: tuple[model.FlagTest, ...] | None) -> set[str] | None:
    return None if t is None else {f.name for f in t}


def _names_cover(kind: str, outer: set[str] | None, inner: set[str] | None) -> bool:
    """Flag-name conditions, with the same logic as the mode masks."""
    if outer is None:
        return True
    if inner is None:
        return False
    return inner <= outer if kind == "any" else outer <= inner


def _mask_cover(kind: str, outer: int | None, inner: int | None) -> bool:
    if outer is None:
        return True
    if inner is None:
        return False
    if kind == "any":  # having any of inner's bits implies having one of outer's
        return inner & ~outer == 0
    return outer & ~inner == 0  # all / none: outer demands a subset of what inner demands


def _object_cover(d: ObjectConditions | None, a: ObjectConditions | None) -> bool:
    if d is None:
        return True
    if a is None:
        return False
    return (
        _ranges_cover(d.owner, a.owner)
        and _ranges_cover(d.group, a.group)
        and (d.type is None or (a.type is not None and a.type <= d.type))
        and _mask_cover("any", d.mode_any, a.mode_any)
        and _mask_cover("all", d.mode_all, a.mode_all)
        and _mask_cover("none", d.mode_none, a.mode_none)
    )


def conditions_cover(d: Conditions, a: Conditions) -> bool:
    """True when every request satisfying ``a`` satisfies ``d``."""
    fa, fd = a, d
    checks = [
        _ranges_cover(fd.uid, fa.uid),
        _ranges_cover(fd.gid, fa.gid),
        _mask_cover("any", fd.mode_any, fa.mode_any),
        _mask_cover("all", fd.mode_all, fa.mode_all),
        _mask_cover("none", fd.mode_none, fa.mode_none),
        fd.type is None or (fa.type is not None and fa.type <= fd.type),
        _names_cover("any", _flags(fd.flags_any), _flags(fa.flags_any)),
        _names_cover("all", _flags(fd.flags_all), _flags(fa.flags_all)),
        _names_cover("none", _flags(fd.flags_none), _flags(fa.flags_none)),
        _globs_cover(fd.target, fa.target),
        _subset_patterns(fd.target_except, fa.target_except),
        _globs_cover(fd.target_resolved, fa.target_resolved),
        fd.target_absolute is None or fd.target_absolute == fa.target_absolute,
        fd.target_dotdot is None or fd.target_dotdot == fa.target_dotdot,
        fd.length_min is None or (fa.length_min is not None and fd.length_min <= fa.length_min),
        fd.length_max is None or (fa.length_max is not None and fd.length_max >= fa.length_max),
        _globs_cover(fd.xattr, fa.xattr),
        _subset_patterns(fd.xattr_except, fa.xattr_except),
        _object_cover(fd.object, fa.object),
    ]
    return all(checks)


def rule_covers(policy: Policy, d: Rule, a: Rule) -> bool:
    """True when ``d`` matches every request ``a`` matches (proven, never guessed)."""
    views = policy.compiled.views
    a_slots = [s for s in a.slots if (a.id, s) in views]
    if not a_slots or any((d.id, s) not in views for s in a_slots):
        return False
    if d.paths is not None and (a.paths is None or not _globs_cover(d.paths, a.paths)):
        return False
    if not _subset_patterns(d.except_, a.except_):
        return False
    if d.unless is not None and d.unless != a.unless:
        return False
    return conditions_cover(d.when, a.when)


def _never_matches(policy: Policy, rule: Rule) -> str | None:
    views = policy.compiled.views
    if not any((rule.id, s) in views for s in rule.slots):
        ops = ", ".join(rule.ops)
        return f"rule '{rule.id}' can never match: its conditions hold for none of its ops ({ops})"
    if rule.paths is not None and rule.except_ is not None and _globs_cover(rule.except_, rule.paths):
        return f"rule '{rule.id}' can never match: its except patterns cover all of its paths"
    if rule.paths is not None and all(globs.never_matches_path(p) for p in rule.paths.patterns):
        return f"rule '{rule.id}' can never match: none of its paths can match a normalised path"
    return None


class _CoverIndex:
    """Which live rules could cover another rule, found by op slot and literal path prefix.

    ``rule_covers(d, a)`` needs every slot of ``a`` to be a slot of ``d`` and every path alternative of
    ``a`` to be covered by one of ``d``'s, and ``globs.covers_subtree`` proves that only when the two are
    equal, when ``d``'s is ``/**`` or ``**``, or when ``d``'s is a literal prefix + ``/**`` whose prefix
    starts ``a``'s literal prefix. So the index keeps the rules without paths, the rules with an
    alternative matching everything, the alternatives by their text, and the subtree alternatives by their
    literal prefix (the compiler's trie, flattened: ``a``'s prefix is walked from the root), then keeps the
    rules having all of ``a``'s slots. The candidates for ``a`` are a superset of the rules that cover it,
    and ``rule_covers`` still decides each one.
    """

    def __init__(self, policy: Policy, live: list[Rule]) -> None:
        # Few containers per rule: on a policy of 10,000 rules, one set per (slot, pattern) made the
        # garbage collector, not the lint, take most of the time.
        views = policy.compiled.views
        self.slots = [frozenset(s for s in r.slots if (r.id, s) in views) for r in live]  # live slots
        self.no_paths: list[int] = []
        self.everything: list[int] = []
        self.text: dict[str, list[int]] = {}
        self.subtree: dict[tuple[str, ...], list[int]] = {}
        for pos, rule in enumerate(live):
            if rule.paths is None:
                self.no_paths.append(pos)
                continue
            for place in rule.paths.placements:
                if place.pattern in ("/**", "**"):
                    self.everything.append(pos)
                _add(self.text, place.pattern, pos)
                if place.kind == "subtree":
                    _add(self.subtree, place.prefix, pos)

    def candidates(self, pos: int, rule: Rule) -> list[int]:
        """Positions, in policy order, of the live rules that may cover ``rule`` (at ``pos``): never
        one that does not."""
        found = set(self.no_paths)
        if rule.paths is not None and not rule.paths.placements:
            found = set(range(len(self.slots)))  # nothing to cover: any rule covers the paths
        elif rule.paths is not None:
            common: set[int] | None = None
            for place in rule.paths.placements:
                here = set(self.everything)
                here.update(self.text.get(place.pattern, ()))
                if place.pattern.startswith("/"):
                    for depth in range(len(place.prefix) + 1):
                        here.update(self.subtree.get(place.prefix[:depth], ()))
                common = here if common is None else common & here
                if not common:
                    break
            found |= common or set()
        needs = self.slots[pos]
        slots = self.slots
        return sorted(p for p in found if p != pos and needs <= slots[p])


def _add(index: dict, key: object, pos: int) -> None:
    got = index.get(key)
    if got is None:
        index[key] = [pos]
    elif got[-1] != pos:
        got.append(pos)


def _cover_findings(policy: Policy, live: list[Rule]) -> list[Finding]:
    """Rules another rule always wins over: the first such rule in policy order is named."""
    ranks = policy.compiled.ranks
    index = _CoverIndex(policy, live)
    out = []
    for pos, a in enumerate(live):
        for dpos in index.candidates(pos, a):
            d = live[dpos]
            # Only a deny over an allow, or a rule of the same effect that takes precedence, is reported:
            # the others are skipped before the (costlier) proof of coverage.
            shadow = d.deny and not a.deny
            if not (shadow or (d.deny == a.deny and ranks[d.id] < ranks[a.id])):
                continue
            if not rule_covers(policy, d, a):
                continue
            if shadow:
                out.append(Finding("warning", "shadowed", a.line, a.id,
                                   f"rule '{a.id}' can never allow: rule '{d.id}' (line {d.line}) denies "
                                   "everything it matches"))
            else:
                out.append(Finding("info", "redundant", a.line, a.id,
                                   f"rule '{a.id}' never decides: rule '{d.id}' (line {d.line}) matches "
                                   f"whenever it does and takes precedence (it has the same effect)"))
            break
    return out


def lint(policy: Policy) -> list[Finding]:
    out: list[Finding] = []
    live = []
    for rule in policy.rules:
        why = _never_matches(policy, rule)
        if why:
            out.append(Finding("warning", "never-matches", rule.line, rule.id, why))
        else:
            live.append(rule)
        out += _pattern_findings(rule)
        out += _unless_findings(rule)
        if rule.effect == "allow" and policy.default == "allow":
            out.append(Finding("warning", "pointless-allow", rule.line, rule.id,
                               f"rule '{rule.id}' has no effect: with default: allow, what it allows is "
                               "allowed anyway, and deny rules override it either way"))
        if rule.always and policy.enforcement == "enforce":
            out.append(Finding("info", "always-enforced", rule.line, rule.id,
                               f"rule '{rule.id}': enforce: always only matters under "
                               "enforcement: permissive"))
    out += _cover_findings(policy, live)
    out += _ids_findings(policy)
    out += _alias_findings(policy)
    if policy.limits.open_fds is not None:
        # Honest about what cannot be enforced: once an fd crosses the socket (SCM_RIGHTS) it lives in
        # QEMU's fd table, and the gateway never learns when QEMU closes it.
        out.append(Finding("warning", "open-fds-not-enforced", 0, None,
                           "limits.open_fds is accepted but not enforced: an fd sent to QEMU is closed "
                           "there, out of the gateway's sight, so the fds a guest holds cannot be counted"))
    if policy.enforcement == "permissive":
        out.append(Finding("info", "permissive", 0, None,
                           "enforcement: permissive: denials are recorded as would-deny and performed anyway "
                           "(except by rules with enforce: always)"))
    if not policy.tests:
        out.append(Finding("info", "no-tests", 0, None,
                           "the policy has no tests: section; `gateway check` can only validate it"))
    return sorted(out, key=lambda f: (f.line, f.code))


_WRITE_SLOTS = frozenset({model.OPEN_WRITE, int(RT.CREATE), int(RT.MKNOD), int(RT.MKDIR)})
_ALIAS_SLOTS = {int(RT.SYMLINK): "symlink", int(RT.RENAME): "rename", int(RT.LINK): "link"}


def _alias_findings(policy: Policy) -> list[Finding]:
    """Deny rules on paths that stop writes but not the requests that give data a protected name."""
    aliasing_allowed = {
        slot for slot in _ALIAS_SLOTS
        if policy.default == "allow" or any(not r.deny and slot in r.slots for r in policy.rules)
    }
    out = []
    for rule in policy.rules:
        if not rule.deny or rule.paths is None or not rule.slots & _WRITE_SLOTS:
            continue
        if rule.when.given() or rule.unless is not None or rule.except_tpl is not None or rule.paths_tpl:
            # A conditional deny (on uid, mode, flags, the object) is about how things are written, and
            # the aliasing requests carry none of those fields: only a plain "not here" is at stake.
            continue
        open_doors = sorted(_ALIAS_SLOTS[s] for s in aliasing_allowed if s not in rule.slots)
        if open_doors:
            out.append(Finding("warning", "alias-uncovered", rule.line, rule.id,
                               f"rule '{rule.id}' denies writes to {', '.join(rule.paths.patterns)} but not "
                               f"{', '.join(open_doors)}: the guest may build its data elsewhere and give it "
                               "a protected name (add them to ops, or use the write or create group)"))
    return out


def _ids_findings(policy: Policy) -> list[Finding]:
    """Under squash, objects an unmapped guest id makes belong to the squash id on the host; if the guest
    sees that id as 0, every unmapped user makes root-owned files (the squash id is meant to be nobody)."""
    ids = policy.ids
    if ids is None or ids.unmapped != "squash":
        return []
    out = []
    for kind, squash, back in (("uid", ids.squash_uid, ids.uid_to_guest), ("gid", ids.squash_gid,
                                                                           ids.gid_to_guest)):
        if back(squash) == 0:
            out.append(Finding("warning", "squash-to-root", ids.line, None,
                               f"ids: unmapped guest {kind}s are squashed to host {kind} {squash}, which the "
                               f"guest sees as {kind} 0 (root): pick an id that is nobody on both sides"))
    return out


def _pattern_findings(rule: Rule) -> list[Finding]:
    out = []
    for label, gs in (("paths", rule.paths), ("except", rule.except_)):
        for pat in gs.patterns if gs is not None else ():
            why = globs.never_matches_path(pat)
            if why:
                out.append(Finding("warning", "glob-never-matches", rule.line, rule.id,
                                   f"rule '{rule.id}' {label} pattern '{pat}' can never match: {why}"))
            if "**" in pat.replace("/**/", "").replace("/**", "").replace("**/", ""):
                out.append(Finding("info", "glob-double-star", rule.line, rule.id,
                                   f"rule '{rule.id}' {label} pattern '{pat}': '**' inside a component acts "
                                   "as '*' (it spans directories only as a whole component)"))
    for block in (rule.when, rule.unless):
        if block is not None and block.target_resolved is not None:
            for pat in block.target_resolved.patterns:
                why = globs.never_matches_path(pat)
                if why:
                    out.append(Finding("warning", "glob-never-matches", rule.line, rule.id,
                                       f"rule '{rule.id}' target_resolved pattern '{pat}' can never "
                                       f"match: {why}"))
    return out


def _unless_findings(rule: Rule) -> list[Finding]:
    if rule.unless is None:
        return []
    lost = sorted(
        model.SLOT_NAMES[s] for s in rule.slots
        if request_conds(rule.when, s) is not None and request_conds(rule.unless, s) is None
    )
    if not lost:
        return []
    return [Finding("warning", "unless-never-holds", rule.line, rule.id,
                    f"rule '{rule.id}': its unless conditions can never hold for {', '.join(lost)} (the "
                    "request has no such field), so the rule applies to them unconditionally")]
