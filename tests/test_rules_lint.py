"""Lint findings: each kind reported (with its rule and line), and none for policies that are fine."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from gateway.rules import load_policy, load_policy_text
from gateway.rules.lint import Finding, lint

ROOT = Path(__file__).resolve().parent.parent


def findings(rules: str, default: str = "deny", extra: str = "", tests: bool = True) -> list[Finding]:
    body = textwrap.indent(textwrap.dedent(rules).strip("\n"), "  ")
    text = f"version: 1\ndefault: {default}\n{extra}rules:\n{body}\n"
    if tests:
        expect = "allow" if default == "allow" else "deny"
        text += "tests:\n  - {request: 'lstat /', expect: " + expect + "}\n"
    return [f for f in lint(load_policy_text(text, "p.yaml")) if f.code not in ("no-tests",)]


def codes(found: list[Finding]) -> list[tuple[str, str | None]]:
    return [(f.code, f.rule) for f in found]


def test_allow_shadowed_by_a_deny_with_a_superset_of_conditions() -> None:
    found = findings("""
    - id: homes
      effect: allow
      ops: [CREATE]
      paths: ["/home/alice/**"]
      when: {uid: [1000], mode_none: [ow]}
    - {id: no-home-writes, effect: deny, ops: [write], paths: ["/home/**"], when: {uid: ["0-5000"]}}
    """)
    assert codes(found) == [("shadowed", "homes")]
    assert found[0].line == 4 and found[0].severity == "warning"
    assert found[0].message == ("rule 'homes' can never allow: rule 'no-home-writes' (line 9) denies "
                                "everything it matches")


@pytest.mark.parametrize(
    "deny",
    [
        '{id: d, effect: deny, ops: [write], paths: ["/home/**"], when: {uid: ["2000-3000"]}}',  # uids
        '{id: d, effect: deny, ops: [mkdir], paths: ["/home/**"]}',  # ops
        '{id: d, effect: deny, ops: [write], paths: ["/home/bob/**"]}',  # paths
        '{id: d, effect: deny, ops: [write], paths: ["/home/*/x"]}',  # not provably covering
        '{id: d, effect: deny, ops: [write], except: ["/home/alice/tmp/**"]}',  # except not in the allow
        '{id: d, effect: deny, ops: [write], when: {object: {owner: [0]}}}',  # reads the object
        '{id: d, effect: deny, ops: [write], unless: {uid: [1000]}}',  # an exception the allow lacks
    ],
)
def test_partial_overlaps_are_not_reported(deny: str) -> None:
    found = findings(f"""
    - {{id: homes, effect: allow, ops: [CREATE], paths: ["/home/alice/**"], when: {{uid: [1000]}}}}
    - {deny}
    """)
    assert "shadowed" not in [f.code for f in found]


def test_same_effect_redundancy_is_a_note() -> None:
    found = findings("""
    - {id: a-broad, effect: deny, ops: [write], paths: ["/etc/**"]}
    - {id: b-narrow, effect: deny, ops: [truncate], paths: ["/etc/passwd"], errno: EROFS}
    """)
    assert codes(found) == [("redundant", "b-narrow")]
    assert found[0].severity == "info"
    # the other way round, the narrow rule takes precedence (its id sorts first): it can decide
    assert codes(findings("""
    - {id: z-broad, effect: deny, ops: [write], paths: ["/etc/**"]}
    - {id: b-narrow, effect: deny, ops: [truncate], paths: ["/etc/passwd"]}
    """)) == []


def test_rules_that_can_never_match() -> None:
    found = findings("""
    - {id: no-uid-on-open, effect: deny, ops: [open], when: {uid: [0]}}
    - {id: all-excepted, effect: deny, ops: [write], paths: ["/tmp/x/**"], except: ["/tmp/**"]}
    - {id: relative, effect: deny, ops: [write], paths: ["tmp/**"]}
    - {id: fine, effect: deny, ops: [write, open], when: {uid: [0]}}
    """)
    assert codes(found) == [
        ("never-matches", "no-uid-on-open"),
        ("never-matches", "all-excepted"),
        ("glob-never-matches", "relative"),
        ("never-matches", "relative"),
    ]


def test_globs_that_can_never_match() -> None:
    found = findings("""
    - {id: a, effect: deny, ops: [write], paths: ["/etc/**", "/usr/", "/a/../b"], except: ["/etc//x"]}
    - {id: b, effect: deny, ops: [symlink], when: {target_resolved: ["home/**"]}}
    - {id: c, effect: deny, ops: [write], paths: ["/a**b"]}
    - {id: d, effect: deny, ops: [write], paths: ["/a[/]b", "/x"]}
    """)
    messages = [f.message for f in found if f.code == "glob-never-matches"]
    assert messages == [
        "rule 'a' paths pattern '/usr/' can never match: normalised paths have no empty components (no '//' "
        "and no trailing '/')",
        "rule 'a' paths pattern '/a/../b' can never match: normalised paths have no '..' components",
        "rule 'a' except pattern '/etc//x' can never match: normalised paths have no empty components "
        "(no '//' and no trailing '/')",
        "rule 'b' target_resolved pattern 'home/**' can never match: paths are absolute inside the export "
        "(start the pattern with '/' or '**/')",
        "rule 'd' paths pattern '/a[/]b' can never match: a character class of only '/' matches nothing (a "
        "class never matches '/')",
    ]
    assert ("glob-double-star", "c") in codes(found)


def test_allow_rules_are_pointless_with_default_allow() -> None:
    found = findings("""
    - {id: reads, effect: allow, ops: [read]}
    - {id: no-dev, effect: deny, ops: [mknod], when: {type: [chr]}}
    """, default="allow")
    assert codes(found) == [("pointless-allow", "reads")]


def test_unless_that_cannot_hold_for_some_ops() -> None:
    found = findings("""
    - {id: guard, effect: deny, ops: [create], paths: ["/home/a/**"], unless: {uid: [1000]}}
    """)
    assert codes(found) == [("unless-never-holds", "guard")]
    assert "link, rename" in found[0].message


def test_notes_for_permissive_always_and_missing_tests() -> None:
    found = findings("- {id: d, effect: deny, ops: [mknod], enforce: always}", extra="enforcement: enforce\n")
    assert codes(found) == [("always-enforced", "d")]
    text = "version: 1\ndefault: deny\nenforcement: permissive\nrules: []\n"
    assert [f.code for f in lint(load_policy_text(text))] == ["no-tests", "permissive"]


@pytest.mark.parametrize("path", sorted([*ROOT.glob("policies/*.yaml"), ROOT / "examples/policy.yaml"]))
def test_shipped_policies_have_no_warnings(path: Path) -> None:
    warnings = [f for f in lint(load_policy(path)) if f.severity == "warning"]
    assert warnings == []


def test_a_deny_on_writes_that_aliasing_walks_around() -> None:
    # Denies writes under hooks but lets the guest rename and symlink anywhere in /cache: lint says so.
    found = findings("""
        - {id: cache, effect: allow, ops: [all], paths: ['/cache/**']}
        - {id: hooks, effect: deny, ops: [CREATE, open, mkdir], paths: ['**/.git/hooks/**']}
    """)
    (warning,) = [f for f in found if f.code == "alias-uncovered"]
    assert warning.rule == "hooks" and "link, rename, symlink" in warning.message
    # The write group covers the aliasing requests: nothing to say.
    quiet = findings("""
        - {id: cache, effect: allow, ops: [all], paths: ['/cache/**']}
        - {id: hooks, effect: deny, ops: [write], paths: ['**/.git/hooks/**']}
    """)
    assert "alias-uncovered" not in [f.code for f in quiet]
    # Nothing may rename or link anywhere: no door to close.
    closed = findings("""
        - {id: cache, effect: allow, ops: [CREATE, open], paths: ['/cache/**']}
        - {id: hooks, effect: deny, ops: [CREATE, open], paths: ['**/.git/hooks/**']}
    """)
    assert "alias-uncovered" not in [f.code for f in closed]
