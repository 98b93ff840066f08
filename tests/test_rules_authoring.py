"""Owner-relative rules, variables (${uid}, ${gid}, vars:) and includes (issue 15, points 1 and 2)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.rules import PolicyError, decide, load_policy, load_policy_text
from gateway.rules.requests import parse_text

ROOT = Path(__file__).resolve().parent.parent

HOMES = """
version: 1
default: deny
vars: {homes: "/home/*"}
rules:
  - id: guard
    effect: deny
    ops: [CREATE, mkdir, mknod, symlink, chown]
    paths: ["${homes}/**"]
    except: ["/home/u${uid}/**"]
  - id: new
    effect: allow
    ops: [CREATE, mkdir, mknod, symlink]
    paths: ["/home/u${uid}/**"]
  - id: group-dir
    effect: allow
    ops: [CREATE]
    paths: ["/groups/g${gid}/**"]
  - id: mine
    effect: allow
    ops: [chown]
    paths: ["/tmp/**"]
    when: {object: {owner: self}}
"""


def _decide(policy, text):  # type: ignore[no-untyped-def]
    spec = parse_text(text)
    return decide(spec.request, policy, lambda _p: spec.object)


@pytest.mark.parametrize(("text", "outcome", "rule"), [
    ("create /home/u1001/notes mode=0644 uid=1001 gid=1001", "allow", "new"),
    ("create /home/u1001/trap mode=0644 uid=1002 gid=1002", "deny", "guard"),  # bob plants in alice's home
    ("mkdir /home/u1001/.x mode=0755 uid=0 gid=0", "deny", "guard"),
    ("create /home/u10010/x mode=0644 uid=1001 gid=1001", "deny", "guard"),  # a prefix is not the home
    ("open /home/u1001/notes flags=O_RDWR", "deny", None),  # no uid: ${uid} has no value
    ("create /groups/g50/x mode=0644 uid=1 gid=50", "allow", "group-dir"),
    ("create /groups/g51/x mode=0644 uid=1 gid=50", "deny", None),
    ("chown /tmp/f uid=5 gid=5 owner=5", "allow", "mine"),
    ("chown /tmp/f uid=5 gid=5 owner=6", "deny", None),
])
def test_request_variables_and_owner_self(text: str, outcome: str, rule: str | None) -> None:
    d = _decide(load_policy_text(HOMES), text)
    assert (d.outcome, d.rule) == (outcome, rule)


def test_explain_shows_each_variable_and_its_value() -> None:
    spec = parse_text("create /home/u1001/trap mode=0644 uid=1002 gid=1002")
    d = decide(spec.request, load_policy_text(HOMES), lambda _p: None, explain=True)
    guard = next(t for t in d.explanation if t.rule == "guard")
    new = next(t for t in d.explanation if t.rule == "new")
    assert "${homes}=/home/*" in guard.detail and "${uid}=1002" in guard.detail, guard
    assert "/home/u${uid}/**" in new.detail and "${uid}=1002" in new.detail, new


def test_an_unknown_variable_names_its_file_line_and_field() -> None:
    text = "version: 1\ndefault: deny\nvars: {homes: /home/*}\nrules:\n  - id: a\n    effect: allow\n" \
           "    ops: [all]\n    paths:\n      - /x\n      - ${home}/**\n"
    with pytest.raises(PolicyError) as err:
        load_policy_text(text, "p.yaml")
    assert "p.yaml:10: rules[0].paths[1]: unknown variable ${home}" in str(err.value)
    assert "did you mean 'homes'" in str(err.value)


UIDS = st.integers(0, 70000)


@settings(max_examples=60, deadline=None)
@given(uid=UIDS, other=UIDS, tail=st.sampled_from(["x", "a/b", "", ".ssh/k"]),
       op=st.sampled_from(["create", "mkdir", "chown", "symlink"]))
def test_a_variable_decides_as_the_literal_id_would(uid: int, other: int, tail: str, op: str) -> None:
    """For uid u, a policy with ${uid} decides exactly as the same policy with u written in."""
    literal = load_policy_text(HOMES.replace("${uid}", str(uid)).replace("${homes}", "/home/*"))
    templated = load_policy_text(HOMES)
    for who in (uid, other):
        extra = " target=t" if op == "symlink" else " mode=0644"
        if op == "chown":
            extra = ""
        text = f"{op} /home/u{uid}/{tail}{extra} uid={who} gid={who}"
        a, b = _decide(templated, text), _decide(literal, text)
        if who == uid:
            assert (a.outcome, a.rule) == (b.outcome, b.rule), text


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


RULE = "rules:\n  - {{id: {0}, effect: deny, ops: [mknod], paths: ['/{0}/**']}}\n"


def test_includes_merge_rules_hash_every_file_and_reload_reads_them_again(tmp_path: Path) -> None:
    d = _tree(tmp_path, {
        "p.yaml": "version: 1\ndefault: allow\ninclude: [lib/a.yaml]\n" + RULE.format("main"),
        "lib/a.yaml": "include: [b.yaml]\n" + RULE.format("a"),
        "lib/b.yaml": RULE.format("b"),
    })
    p = load_policy(d / "p.yaml")
    assert [r.id for r in p.rules] == ["b", "a", "main"]
    assert p.includes == ("lib/b.yaml", "lib/a.yaml")
    assert p.rules[0].file == str(d / "lib/b.yaml")
    assert p.hash != hashlib.sha256((d / "p.yaml").read_bytes()).hexdigest()
    (d / "lib/b.yaml").write_text(RULE.format("b2"))
    q = load_policy(d / "p.yaml")
    assert q.hash != p.hash and "b2" in [r.id for r in q.rules]
    # the serving reload reads through the directory's fd
    from gateway.serve import policy_reloader

    reload, fd = policy_reloader(d / "p.yaml")
    try:
        assert reload().hash == q.hash
    finally:
        os.close(fd)


def test_an_error_three_levels_down_names_its_file_and_line(tmp_path: Path) -> None:
    d = _tree(tmp_path, {
        "p.yaml": "version: 1\ndefault: allow\ninclude: [one.yaml]\n",
        "one.yaml": "include: [two.yaml]\n",
        "two.yaml": "include: [sub/three.yaml]\n",
        "sub/three.yaml": "rules:\n  - id: x\n    effect: deny\n    ops: [wirte]\n",
    })
    with pytest.raises(PolicyError) as err:
        load_policy(d / "p.yaml")
    assert f"{d}/sub/three.yaml:4: rules[0].ops" in str(err.value), str(err.value)


def test_cycles_and_escapes_are_refused(tmp_path: Path) -> None:
    d = _tree(tmp_path, {
        "p.yaml": "version: 1\ndefault: allow\ninclude: [a.yaml]\n",
        "a.yaml": "include: [b.yaml]\n",
        "b.yaml": "include: [a.yaml]\n",
    })
    with pytest.raises(PolicyError) as err:
        load_policy(d / "p.yaml")
    assert "include cycle: p.yaml -> a.yaml -> b.yaml -> a.yaml" in str(err.value)
    (d / "p.yaml").write_text("version: 1\ndefault: allow\ninclude: [../x.yaml, /etc/passwd]\n")
    with pytest.raises(PolicyError) as err:
        load_policy(d / "p.yaml")
    assert str(err.value).count("not beneath the policy's directory") == 2
    (tmp_path.parent / "outside.yaml").write_text("rules: []\n")
    (d / "link.yaml").symlink_to(tmp_path.parent / "outside.yaml")
    (d / "p.yaml").write_text("version: 1\ndefault: allow\ninclude: [link.yaml]\n")
    with pytest.raises(PolicyError) as err:
        load_policy(d / "p.yaml")
    assert "link.yaml" in str(err.value) and "not beneath" in str(err.value)


def test_a_duplicate_id_across_files_names_both(tmp_path: Path) -> None:
    d = _tree(tmp_path, {
        "p.yaml": "version: 1\ndefault: allow\ninclude: [a.yaml]\n" + RULE.format("x"),
        "a.yaml": RULE.format("x"),
    })
    with pytest.raises(PolicyError) as err:
        load_policy(d / "p.yaml")
    assert "duplicate rule id 'x'" in str(err.value) and "a.yaml:2" in str(err.value)


def test_the_shipped_abstractions_decide_as_the_baseline(tmp_path: Path) -> None:
    """policies/abstractions/ are the baseline's rules as includable pieces: a policy made of them
    decides the baseline's own tests alike (the built-in baseline stays self-contained: it is package
    data, and the abstractions are not)."""
    from gateway.rules.testing import run_tests

    (tmp_path / "abstractions").symlink_to(ROOT / "policies" / "abstractions")
    base = (ROOT / "policies" / "baseline.yaml").read_text()
    start, end = base.index("rules:\n"), base.index("tests:\n")
    (tmp_path / "p.yaml").write_text(base[:start] + "include: [abstractions/baseline.yaml]\n" + base[end:])
    with pytest.raises(PolicyError, match="not beneath"):  # a symlink out of the directory is refused
        load_policy(tmp_path / "p.yaml")
    import shutil

    (tmp_path / "abstractions").unlink()
    shutil.copytree(ROOT / "policies" / "abstractions", tmp_path / "abstractions")
    p = load_policy(tmp_path / "p.yaml")
    assert p.includes == ("abstractions/no-device-nodes.yaml", "abstractions/no-setid-bits.yaml",
                          "abstractions/baseline.yaml")
    assert all(r.passed for r in run_tests(p))
    ro = tmp_path / "ro.yaml"
    ro.write_text("version: 1\ndefault: allow\ninclude: [abstractions/system-read-only.yaml]\n")
    d = _decide(load_policy(ro), "open /etc/passwd flags=O_RDWR")
    assert (d.outcome, d.rule) == ("deny", "system-read-only")


def test_a_load_leaves_no_parse_behind(tmp_path: Path) -> None:
    """The files' parses go when the load ends, freed by their counts, not left to the collector (the
    load pauses it and hands what it built to the oldest generation: 10 MB at 10,000 rules)."""
    import gc

    from gateway.rules import loader

    d = _tree(tmp_path, {"p.yaml": "version: 1\ndefault: allow\ninclude: [a.yaml]\n",
                         "a.yaml": RULE.format("a")})
    load_policy(d / "p.yaml")
    # (only this load's: a PolicyError an earlier test kept holds its load's frames)
    assert not [o for o in gc.get_objects() if type(o) is loader._Unit and o.source.startswith(str(d))]


OWNERS = """
version: 1
default: deny
rules:
  - {id: own, effect: allow, ops: [write], paths: ["/home/u${owner}/**"]}
  - {id: team, effect: allow, ops: [write], paths: ["/teams/g${group}/**"]}
"""


@pytest.mark.parametrize(("text", "outcome", "rule"), [
    ("open /home/u1001/f flags=O_RDWR owner=1001", "allow", "own"),
    ("open /home/u1001/f flags=O_RDWR owner=1002", "deny", None),
    ("open /home/u1001/f flags=O_RDWR", "deny", None),  # the object unknown: ${owner} has no value
    ("rename /home/u1001/a /home/u1001/b owner=1001", "allow", "own"),
    ("rename /home/u1001/a /home/u1002/a owner=1001", "deny", None),  # path2 is somebody else's home
    ("truncate /teams/g50/x length=0 owner=1 group=50", "allow", "team"),
    ("truncate /teams/g50/x length=0 owner=1 group=51", "deny", None),
])
def test_the_objects_owner_in_paths(text: str, outcome: str, rule: str | None) -> None:
    d = _decide(load_policy_text(OWNERS), text)
    assert (d.outcome, d.rule) == (outcome, rule)


def test_the_multi_tenant_policy_is_one_rule_per_kind() -> None:
    p = load_policy(ROOT / "policies" / "multi-tenant.yaml")
    assert {"home-guard", "home-new", "home-own"} <= {r.id for r in p.rules}
    assert not [r.id for r in p.rules if "alice" in r.id or "bob" in r.id]
    from gateway.rules.testing import run_tests

    results = run_tests(p)
    assert any(r.test.name == "bob plants a file in alice's home" and r.passed for r in results)


def test_a_failing_test_and_a_lint_finding_in_an_included_file_name_that_file(tmp_path: Path) -> None:
    import subprocess
    import sys

    d = _tree(tmp_path, {
        "p.yaml": "version: 1\ndefault: allow\ninclude: [lib/a.yaml]\n",
        "lib/a.yaml": "rules:\n  - {id: a, effect: deny, ops: [mkdir], paths: ['/a/**']}\n"
                      "tests:\n  - request: 'lstat /a/x'\n    expect: deny\n",
    })
    out = subprocess.run([sys.executable, "-m", "gateway", "check", str(d / "p.yaml")], capture_output=True,
                         text=True, env={**os.environ, "COLUMNS": "200"}).stdout
    assert f"{d}/lib/a.yaml:4: tests[0]" in out, out
    assert f"{d}/lib/a.yaml:2: [alias-uncovered]" in out, out
