"""`gateway fmt`: canonical, idempotent, keeps comments, never changes what a policy decides."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gateway import fmt
from gateway.rules import load_policy, load_policy_text
from gateway.rules.equivalence import compare
from gateway.rules.testing import run_tests

ROOT = Path(__file__).resolve().parent.parent

MESSY = """\
# a policy written by hand, keys in any order
rules:
  # the first rule
  - effect: deny   # deny it
    paths:
      - "/etc/**"
      - /usr/**
    ops:
    - write
    id: system-ro
    errno: EROFS

  # --- the homes section ---
  - when: {uid: ["1000-59999"], mode_none: [setuid]}
    id: homes
    ops: [all]
    effect: allow
    paths: ['/home/**']
    except: ["/home/*/.ssh/**"]
tests:
  - expect: deny
    request: "open /etc/passwd flags=O_RDWR"   # a write to /etc
    name: etc is read-only
  - {request: "mkdir /home/a/d mode=0755 uid=1000 gid=1000", expect: allow}
default: deny
tenant: messy  # stamped on records
version: 1
"""


def fmt_run(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="gateway fmt")
    fmt.add_arguments(parser)
    code = fmt.run(parser.parse_args([str(a) for a in argv]))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def comments(text: str) -> list[str]:
    return [m.group(0).strip() for m in re.finditer(r"#[^\n]*", text)]


def test_canonical_layout_keeps_comments_and_is_idempotent() -> None:
    out = fmt.format_text(MESSY, "messy.yaml")
    assert fmt.format_text(out, "messy.yaml") == out
    assert sorted(comments(out)) == sorted(comments(MESSY))
    top = [line.split(":")[0] for line in out.splitlines() if re.match(r"^[a-z]", line)]
    assert top == ["version", "tenant", "default", "rules", "tests"]
    assert "  - id: system-ro\n    effect: deny   # deny it\n    ops: [write]\n" in out
    assert 'paths: ["/etc/**", /usr/**]' in out  # the quoting as written
    assert "# --- the homes section ---\n  - id: homes" in out  # a section comment stays before its rule
    assert "  - name: etc is read-only\n    request:" in out


def test_formatted_policy_decides_alike() -> None:
    before = load_policy_text(MESSY)
    after = load_policy_text(fmt.format_text(MESSY, "messy.yaml"))
    assert before.hash != after.hash  # the bytes changed ...
    found = compare(before, after, max_shapes=100_000)
    assert found.shapes > 0 and found.differing == 0  # ... and no decision did
    assert [(r.decision.outcome, r.passed) for r in run_tests(before)] == \
        [(r.decision.outcome, r.passed) for r in run_tests(after)]


def test_check_write_and_stdout(capsys, tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(MESSY)
    path.chmod(0o640)
    code, out, _ = fmt_run(capsys, "--check", path)
    assert code == 1 and out.startswith(f"--- {path}\n+++ {path} (formatted)\n")
    assert path.read_text() == MESSY  # --check changes nothing
    code, out, _ = fmt_run(capsys, path)
    assert code == 0 and out == fmt.format_text(MESSY, str(path)) and path.read_text() == MESSY
    code, out, _ = fmt_run(capsys, "--write", path)
    assert code == 0 and out == "" and path.read_text() == fmt.format_text(MESSY, str(path))
    assert path.stat().st_mode & 0o777 == 0o640
    assert fmt_run(capsys, "--check", path)[0] == 0
    assert load_policy(path).tenant == "messy"


def test_unreadable_or_not_a_policy_exits_2(capsys, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    code, _, err = fmt_run(capsys, "--check", bad, tmp_path / "missing.yaml")
    assert code == 2 and "a policy is a YAML mapping" in err and "missing.yaml" in err


@pytest.mark.parametrize("policy", sorted(str(p.relative_to(ROOT)) for p in [
    *ROOT.glob("policies/*.yaml"), ROOT / "examples/policy.yaml", ROOT / "gateway/rules/baseline.yaml"]))
def test_shipped_policies_are_formatted(policy: str) -> None:
    """`gateway fmt -w` them after an edit."""
    text = (ROOT / policy).read_text()
    assert fmt.format_text(text, policy) == text


def test_the_command_is_registered() -> None:
    done = subprocess.run([sys.executable, "-m", "gateway", "fmt", "--check", "policies/baseline.yaml"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
