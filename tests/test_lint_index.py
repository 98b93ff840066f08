"""The indexed lint reports exactly what the pairwise lint it replaced reported.

``_reference_findings`` is the lint as it was before rules were indexed (every live rule compared with
every other, in policy order): the indexed lint must give the same findings, in the same order, with the
same messages, on every shipped policy, on generated fleet policies, and on a policy of the awkward cases
(brace alternatives, ``**`` and ``/**``, exact paths, rules without paths, several ops, ranks).
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.rules import lint as lint_mod
from gateway.rules import load_policy, load_policy_text
from gateway.rules.lint import Finding, lint
from gateway.rules.model import Policy

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import bench_rules  # noqa: E402
import policy_gen  # noqa: E402


def _reference_findings(policy: Policy) -> list[Finding]:
    """The pairwise lint, verbatim as it was (quadratic in the rules)."""
    out: list[Finding] = []
    live = []
    for rule in policy.rules:
        why = lint_mod._never_matches(policy, rule)
        if why:
            out.append(Finding("warning", "never-matches", rule.line, rule.id, why))
        else:
            live.append(rule)
        out += lint_mod._pattern_findings(rule)
        out += lint_mod._unless_findings(rule)
        if rule.effect == "allow" and policy.default == "allow":
            out.append(Finding("warning", "pointless-allow", rule.line, rule.id,
                               f"rule '{rule.id}' has no effect: with default: allow, what it allows is "
                               "allowed anyway, and deny rules override it either way"))
        if rule.always and policy.enforcement == "enforce":
            out.append(Finding("info", "always-enforced", rule.line, rule.id,
                               f"rule '{rule.id}': enforce: always only matters under "
                               "enforcement: permissive"))
    ranks = policy.compiled.ranks
    for a in live:
        for d in live:
            if d is a or not lint_mod.rule_covers(policy, d, a):
                continue
            if d.deny and not a.deny:
                out.append(Finding("warning", "shadowed", a.line, a.id,
                                   f"rule '{a.id}' can never allow: rule '{d.id}' (line {d.line}) denies "
                                   "everything it matches"))
                break
            if d.deny == a.deny and ranks[d.id] < ranks[a.id]:
                out.append(Finding("info", "redundant", a.line, a.id,
                                   f"rule '{a.id}' never decides: rule '{d.id}' (line {d.line}) matches "
                                   f"whenever it does and takes precedence (it has the same effect)"))
                break
    out += lint_mod._ids_findings(policy)
    out += lint_mod._alias_findings(policy)
    if policy.limits.open_fds is not None:
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


SHIPPED = sorted([*ROOT.glob("policies/*.yaml"), ROOT / "examples/policy.yaml",
                  *ROOT.glob("gateway/rules/*.yaml")])

# Overlaps of every shape the index must not miss: each rule below is covered by some other one (or is
# the one covering), through a different kind of pattern or condition.
AWKWARD = """\
version: 1
default: deny
enforcement: permissive
rules:
  - {id: any-write, effect: deny, ops: [write], when: {uid: ["0-100"]}}
  - {id: any-write-narrow, effect: deny, ops: [truncate], when: {uid: [5]}}
  - {id: all-below, effect: deny, ops: [mkdir], paths: ["/**"]}
  - {id: all-glob, effect: deny, ops: [mkdir, symlink], paths: ["**"]}
  - {id: mk-etc, effect: allow, ops: [mkdir], paths: ["/etc/x/y"]}
  - {id: mk-any, effect: allow, ops: [mkdir], paths: ["**/*.d"]}
  - {id: braces, effect: deny, ops: [create], paths: ["/{srv,opt}/**"]}
  - {id: in-srv, effect: allow, ops: [create], paths: ["/srv/a/**", "/opt/b/*.txt"]}
  - {id: half-in, effect: allow, ops: [create], paths: ["/srv/a/**", "/var/b/*.txt"]}
  - {id: same-glob-1, effect: allow, ops: [create], paths: ["**/*.key"], when: {uid: [7]}}
  - {id: same-glob-0, effect: allow, ops: [create], paths: ["**/*.key"]}
  - {id: same-glob-2, effect: deny, ops: [create], paths: ["**/*.key", "/a/**"], when: {uid: [7, 8]}}
  - {id: exact-a, effect: deny, ops: [remove], paths: ["/data/file"]}
  - {id: exact-b, effect: deny, ops: [remove], paths: ["/data/file"], errno: EROFS}
  - {id: exact-c, effect: allow, ops: [remove, rename], paths: ["/data/file", "/data/other"]}
  - {id: under-data, effect: deny, ops: [remove, rename], paths: ["/data/**"], enforce: always}
  - {id: star-mid, effect: allow, ops: [remove], paths: ["/data/*/x/**"]}
  - {id: relative, effect: allow, ops: [remove], paths: ["data/**"]}
  - {id: deep, effect: allow, ops: [chmod], paths: ["/a/b/c/d/**"], when: {mode_any: [setuid]}}
  - {id: mid, effect: deny, ops: [chmod, chown], paths: ["/a/b/**"]}
  - {id: top, effect: allow, ops: [chmod], paths: ["/a/**"]}
  - {id: excepted, effect: deny, ops: [chmod], paths: ["/a/**"], except: ["/a/b/**"]}
  - {id: excepted-2, effect: allow, ops: [chmod], paths: ["/a/b/c/**"], except: ["/a/b/**", "/z"]}
  - {id: unless-1, effect: deny, ops: [chown], paths: ["/u/**"], unless: {uid: [0]}}
  - {id: unless-2, effect: deny, ops: [chown], paths: ["/u/v/**"], unless: {uid: [0]}}
  - {id: never, effect: deny, ops: [open], when: {uid: [0]}}
  - {id: mk-uid, effect: allow, ops: [mkdir, create], paths: ["/h/**"], when: {uid: [1000]}}
  - {id: mk-uid-wide, effect: deny, ops: [mkdir, create, mknod], when: {uid: ["900-2000"]}}
  - {id: no-paths-allow, effect: allow, ops: [symlink, link]}
  - {id: link-deny, effect: deny, ops: [link], paths: ["/l/**"]}
  - {id: link-allow, effect: allow, ops: [link], paths: ["/l/m"]}
"""


def _generated() -> list[tuple[str, str]]:
    return [("policy_gen-200", policy_gen.path_policy(200)),
            ("bench_rules-300", bench_rules.policy_text(300)),
            ("awkward", AWKWARD)]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_policies_lint_as_before(path: Path) -> None:
    policy = load_policy(path)
    assert lint(policy) == _reference_findings(policy)


@pytest.mark.parametrize(("name", "text"), _generated(), ids=[n for n, _ in _generated()])
def test_generated_policies_lint_as_before(name: str, text: str) -> None:
    policy = load_policy_text(text, f"{name}.yaml")
    found = lint(policy)
    assert found == _reference_findings(policy)
    assert Counter(f.code for f in found) == PINNED[name]


# What the pairwise lint found on them (so that a change to the reference cannot pass unnoticed).
PINNED = {
    "policy_gen-200": Counter({"no-tests": 1}),
    "bench_rules-300": Counter({"unless-never-holds": 35, "no-tests": 1}),
    "awkward": Counter({"shadowed": 9, "never-matches": 4, "redundant": 4, "alias-uncovered": 2,
                        "no-tests": 1, "permissive": 1, "glob-double-star": 1, "glob-never-matches": 1}),
}


@pytest.mark.parametrize("make", [policy_gen.path_policy, bench_rules.policy_text],
                         ids=["policy_gen", "bench"])
def test_coverage_proofs_grow_with_the_rules_not_their_pairs(make: Callable[[int], str],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # Deterministic where a timing is not: the lint tries to prove coverage for a handful of candidate
    # pairs per rule (the pairwise lint tried n * (n - 1): 4 million at 2,000 rules).
    calls = []
    real = lint_mod.rule_covers
    monkeypatch.setattr(lint_mod, "rule_covers", lambda p, d, a: calls.append(1) or real(p, d, a))
    policy = load_policy_text(make(2000), "big.yaml")
    lint(policy)
    assert len(calls) < 3 * len(policy.rules)
