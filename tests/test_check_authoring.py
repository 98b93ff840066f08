"""`gateway check --coverage`, `--run PATTERN` and `OLD --same-as NEW` (issue 15, points 5 and 6)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from gateway import check
from gateway.rules import load_policy_text
from gateway.rules.equivalence import compare

POLICY = """\
version: 1
tenant: authoring
default: deny
rules:
  - id: etc-ro
    effect: deny
    ops: [write]
    paths: ["/etc/**"]
    errno: EROFS
  - id: homes
    effect: allow
    ops: [all]
    paths: ["/home/**"]
    except: ["/home/*/.ssh/**"]
    when: {uid: ["1000-1999"]}
  - id: no-setid
    effect: deny
    ops: [create, mkdir, chmod]
    when: {mode_any: [setuid, setgid]}
    errno: EPERM
  - id: read-all
    effect: allow
    ops: [read]
  - id: untested
    effect: allow
    ops: [mkdir]
    paths: ["/srv/*/new"]
tests:
  - name: etc is read-only
    request: "open /etc/passwd flags=O_RDWR"
    expect: deny
  - name: home is writable
    request: "mkdir /home/al/d mode=0755 uid=1000 gid=1000"
    expect: allow
  - name: no setuid at home
    request: "mkdir /home/al/s mode=04755 uid=1000 gid=1000"
    expect: deny
  - name: reading etc
    request: "lstat /etc/passwd"
    expect: allow
"""


def run_check(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="gateway check")
    check.add_arguments(parser)
    code = check.run(parser.parse_args([str(a) for a in argv]))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    return path


def test_coverage_counts_deciding_and_matching_rules(capsys, policy_file) -> None:
    code, out, _ = run_check(capsys, policy_file, "--coverage", "--format", "json")
    report = json.loads(out)
    assert code == 0 and report["exit"] == 0
    rules = {r["id"]: r for r in report["rules"]}
    assert rules["etc-ro"]["deciding"] == ["etc is read-only"]
    # The setuid chmod at home: decided by no-setid, and homes matched too (a deny overrode it).
    assert rules["no-setid"]["deciding"] == ["no setuid at home"]
    assert "no setuid at home" in rules["homes"]["matching"]
    assert rules["homes"]["deciding"] == ["home is writable"]
    # read-all matched the lstat and decided it.
    assert rules["read-all"]["status"] == "decides"
    assert report["never"] == ["untested"] and report["covered"] == 4 and report["total"] == 5
    code, out, _ = run_check(capsys, policy_file, "--coverage")
    assert code == 0 and "rules exercised 4 of 5" in out and "never: untested" in out


def test_run_selects_tests_by_pattern(capsys, policy_file) -> None:
    code, out, _ = run_check(capsys, policy_file, "--coverage", "--run", "^home", "--format", "json")
    report = json.loads(out)
    assert [t["test"] for t in report["tests"]] == ["home is writable"]
    assert {r["id"] for r in report["rules"] if r["status"] != "never"} == {"homes"}
    code, out, _ = run_check(capsys, policy_file, "--run", "etc", "--no-lint", "--format", "json")
    assert [t["name"] for t in json.loads(out)["tests"]["results"]] == ["etc is read-only", "reading etc"]
    code, _, err = run_check(capsys, policy_file, "--run", "(")
    assert code == 2 and "not a regular expression" in err


def test_coverage_fails_when_a_test_fails(capsys, tmp_path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(POLICY.replace("expect: allow\n", "expect: deny\n", 1))
    code, out, _ = run_check(capsys, path, "--coverage")
    assert code == 1 and "expected deny, got allow" in out


def _reordered(text: str) -> str:
    """The same policy with its rules in reverse order."""
    head, rest = text.split("rules:\n")
    body, tests = rest.split("tests:\n")
    rules = ["  - id:" + r for r in body.split("  - id:")[1:]]
    return head + "rules:\n" + "".join(reversed(rules)) + "tests:\n" + tests


def test_same_as_reports_none_for_a_reordered_copy(capsys, tmp_path, policy_file) -> None:
    other = tmp_path / "reordered.yaml"
    other.write_text(_reordered(POLICY))
    assert other.read_text() != POLICY
    code, out, _ = run_check(capsys, policy_file, "--same-as", other)
    assert code == 0 and "no difference found" in out and "bounds:" in out
    assert "An enumeration, not a proof" in out


@pytest.mark.parametrize("plant, request_text", [
    # a range end moved by one: only uid 1999 tells them apart
    ('["1000-1999"]', "uid=1999"),
    # an exception widened: /home/*/.ssq and the like, which only a sample of the `?` reaches
    ('["/home/*/.ssh/**"]', "/.ss"),
])
def test_same_as_finds_a_planted_difference(capsys, tmp_path, policy_file, plant, request_text) -> None:
    planted = {'["1000-1999"]': '["1000-1998"]', '["/home/*/.ssh/**"]': '["/home/*/.ss?/**"]'}
    other = tmp_path / "planted.yaml"
    other.write_text(_reordered(POLICY).replace(plant, planted[plant]))
    code, out, _ = run_check(capsys, policy_file, "--same-as", other, "--format", "json")
    report = json.loads(out)
    assert code == 1 and report["differing"] > 0
    assert all(request_text in d["request"] for d in report["differences"])
    first = report["differences"][0]
    assert first["old"]["outcome"] != first["new"]["outcome"]
    assert report["bounds"]["dimensions"]["paths"] > 0


def test_same_as_sees_enforcement_and_errno() -> None:
    a = load_policy_text(POLICY)
    b = load_policy_text(POLICY.replace("errno: EROFS", "errno: EACCES"))
    c = load_policy_text(POLICY.replace("default: deny", "default: deny\nenforcement: permissive"))
    found = compare(a, b, max_shapes=50_000)
    assert found.differing and all(d.old[1] != d.new[1] for d in found.differences)
    assert {d.new[0] for d in compare(a, c, max_shapes=50_000).differences} == {"would-deny"}


def test_same_as_with_an_invalid_new_policy_exits_2(capsys, tmp_path, policy_file) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nrules:\n  - id: x\n    effect: maybe\n")
    code, _, err = run_check(capsys, policy_file, "--same-as", bad)
    assert code == 2 and "invalid policy" in err
