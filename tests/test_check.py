"""`gateway check`: exit codes, reports (text and JSON), requests, explanations, --root, --replay."""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import shlex
import subprocess
import sys
import textwrap
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway import check
from gateway.rules import load_policy_text
from gateway.rules.replay import replay

ROOT = Path(__file__).resolve().parent.parent

POLICY = """\
version: 1
tenant: guest-42
default: allow
rules:
  - id: etc-ro
    effect: deny
    ops: [write]
    paths: ["/etc/**"]
    errno: EROFS
  - id: no-dev
    effect: deny
    ops: [mknod]
    when: {type: [chr, blk]}
    errno: EPERM
  - id: no-dir-removal
    effect: deny
    ops: [remove]
    when: {object: {type: [dir]}}
tests:
  - request: {op: open, path: /etc/passwd, flags: [O_RDWR]}
    expect: deny
    rule: etc-ro
  - request: "open /etc/passwd"
    expect: allow
"""


def run_check(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="gateway check")
    check.add_arguments(parser)
    code = check.run(parser.parse_args([str(a) for a in argv]))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict]:
    code, out, _ = run_check(capsys, *argv, "--format", "json")
    report = json.loads(out)
    assert report["exit"] == code
    return code, report


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    return path


def test_valid_policy_with_passing_tests_exits_0(capsys, policy_file) -> None:
    code, out, err = run_check(capsys, policy_file)
    assert code == 0, out
    assert "valid" in out and "2 passed, 0 failed" in out and "result: OK (exit 0)" in out
    assert err == ""
    code, report = run_json(capsys, policy_file)
    assert report["valid"] and report["tests"]["passed"] == 2 and report["tests"]["failed"] == 0
    assert report["policy"]["tenant"] == "guest-42"
    assert report["policy"]["hash"] == hashlib.sha256(POLICY.encode()).hexdigest()


def test_a_failing_test_exits_1_and_says_why(capsys, tmp_path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(POLICY.replace("    expect: allow\n", "    expect: deny\n    errno: EPERM\n"))
    code, out, _ = run_check(capsys, path)
    assert code == 1
    assert f"{path}:23: tests[1]: expected deny, got allow (no rule matched: default allow)" in out
    assert f"{path}:23: tests[1]: expected errno EPERM, got none" in out
    code, report = run_json(capsys, path)
    assert code == 1
    failed = [r for r in report["tests"]["results"] if not r["passed"]]
    assert [r["index"] for r in failed] == [1] and len(failed[0]["failures"]) == 2


def test_an_invalid_policy_exits_2_with_every_problem(capsys, tmp_path) -> None:
    path = tmp_path / "p.yaml"
    text = POLICY.replace("ops: [write]", "ops: [wirte]").replace("type: [chr, blk]", "type: [char]")
    path.write_text(text)
    code, out, _ = run_check(capsys, path)
    assert code == 2
    assert "invalid (2 problems; it would not be served)" in out
    assert f"{path}:7: rules[0].ops: unknown op 'wirte' (did you mean 'write'?)" in out
    assert "result: INVALID (exit 2)" in out
    code, report = run_json(capsys, path)
    assert code == 2 and not report["valid"]
    where = [(p["line"], p["field"]) for p in report["problems"]]
    assert where == [(7, "rules[0].ops"), (13, "rules[1].when.type")]


def test_strict_makes_lint_warnings_fail(capsys, tmp_path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(POLICY.replace("rules:\n", "rules:\n  - {id: pointless, effect: allow, ops: [read]}\n"))
    code, out, _ = run_check(capsys, path)
    assert code == 0 and "[pointless-allow]" in out
    assert run_check(capsys, path, "--strict")[0] == 1


def test_requests_and_explain(capsys, policy_file) -> None:
    code, out, _ = run_check(capsys, policy_file, "--request", "open /etc/passwd flags=O_RDWR",
                             "--request", "mknod /dev/sda mode=060600", "--request", "remove /x type=dir",
                             "--request", "remove /x", "--explain", "--format", "json")
    assert code == 0
    got = [(r["decision"], r["rule"], r["result"]) for r in json_lines(out)]
    assert got == [("deny", "etc-ro", "EROFS"), ("deny", "no-dev", "EPERM"),
                   ("deny", "no-dir-removal", "EACCES"), ("allow", None, "ok")]
    first = json_lines(out)[0]
    assert (first["op"], first["path"], first["flags"]) == ("open", "/etc/passwd", ["O_RDWR"])
    statuses = {e["rule"]: e["status"] for e in first["explain"]}
    assert statuses == {"etc-ro": "decides", "no-dev": "no-match", "no-dir-removal": "no-match"}
    code, out, _ = run_check(capsys, policy_file, "--request", "open /etc/passwd flags=O_RDWR", "--explain")
    assert "→ deny EROFS  by etc-ro: denied by rule 'etc-ro'" in out
    assert "op open (write) is not in ops [mknod]" in out


def test_requests_file_yaml_and_json_lines(capsys, policy_file, tmp_path) -> None:
    yaml_file = tmp_path / "reqs.yaml"
    yaml_file.write_text("- {op: open, path: /etc/hosts, flags: [O_WRONLY]}\n- 'lstat /etc/hosts'\n"
                         "- {op: remove, path: /srv, object: {type: dir}}\n")
    code, out, _ = run_check(capsys, policy_file, "--requests", yaml_file, "--format", "json")
    assert code == 0 and [r["decision"] for r in json_lines(out)] == ["deny", "allow", "deny"]
    jsonl = tmp_path / "reqs.jsonl"
    jsonl.write_text('{"op": "mknod", "path": "/d", "mode": "020600"}\n\n"lstat /d"\n'
                     '{"op": "open", "path": "/etc/x", "flags": ["O_RDWR"], "decision": "allow", "seq": 4}\n')
    _, out, _ = run_check(capsys, policy_file, "--requests", jsonl, "--format", "json")
    assert [r["rule"] for r in json_lines(out)] == ["no-dev", None, "etc-ro"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--request", "opne /x"], "--request: op: unknown op 'opne' (did you mean 'open'?)"),
        (["--requests", "/nonexistent/reqs.yaml"], "cannot read"),
        (["--replay", "/nonexistent/audit.jsonl"], "cannot read"),
    ],
)
def test_unusable_input_exits_2(capsys, policy_file, argv: list[str], message: str) -> None:
    code, out, _ = run_check(capsys, policy_file, *argv)
    assert code == 2 and message in out
    code, report = run_json(capsys, policy_file, *argv)
    assert code == 2 and message in report["error"]


def test_bad_entry_in_requests_file_names_its_line(capsys, policy_file, tmp_path) -> None:
    path = tmp_path / "reqs.yaml"
    path.write_text("- lstat /a\n- {op: open}\n")
    code, out, _ = run_check(capsys, policy_file, "--requests", path)
    assert code == 2 and f"{path}:2: path: open needs 'path'" in out


def test_root_reads_a_real_tree(capsys, policy_file, tmp_path) -> None:
    tree = tmp_path / "export"
    (tree / "sub").mkdir(parents=True)
    (tree / "file").write_text("x")
    (tree / "escape").symlink_to(tmp_path)
    _, out, _ = run_check(capsys, policy_file, "--root", tree, "--request", "remove /sub",
                          "--request", "remove /file", "--request", "remove /escape/export/sub",
                          "--request", "remove /sub type=reg", "--format", "json")
    # /escape/... goes through a symlink: not followed, so unknown; --root wins over type= in the request
    assert [r["decision"] for r in json_lines(out)] == ["deny", "allow", "allow", "deny"]
    assert check.root_lookup(str(tree))("/file").st_uid == os.getuid()
    assert check.root_lookup(str(tree))("/missing") is None


# ---------------------------------------------------------------------------------------------------------
# Replay, on a hand-written log in the contract's format (hash-chained JSON lines).


def audit_lines(records: list[dict]) -> list[str]:
    prev = "0" * 64
    lines = []
    for seq, record in enumerate(records, 1):
        full = {"seq": seq, "time": f"2026-11-22T07:41:{seq:02d}.123456Z", "tenant": "guest-42",
                "policy": "1a2b3c4d5e6f7a8b", **record, "prev": prev}
        if full["event"] == "request":
            full.setdefault("result", "ok" if full["decision"] != "deny" else "EACCES")
            full.setdefault("us", 11.5)
        line = json.dumps(full, separators=(",", ":"))
        prev = hashlib.sha256(line.encode()).hexdigest()
        lines.append(line)
    return lines


LOG = [
    {"event": "start", "sandbox": {"seccomp": True}},
    {"event": "policy-load", "source": "/etc/gateway/old.yaml"},
    {"event": "request", "op": "open", "path": "/etc/passwd", "flags": ["O_RDWR"], "decision": "allow",
     "rule": None, "reason": "no rule matched: default allow"},
    {"event": "request", "op": "open", "path": "/etc/shadow", "flags": ["O_WRONLY", "O_TRUNC"],
     "decision": "allow", "rule": None, "reason": "no rule matched: default allow"},
    {"event": "request", "op": "open", "path": "/etc/passwd", "flags": ["O_RDONLY"], "decision": "allow",
     "rule": None, "reason": "no rule matched: default allow"},
    {"event": "request", "op": "mknod", "path": "/dev/sda", "mode": "060660", "rdev": 2048, "uid": 0,
     "gid": 0, "decision": "deny", "rule": "no-dev", "reason": "denied by rule 'no-dev'", "result": "EPERM"},
    {"event": "request", "op": "create", "path": "/home/a/x", "mode": "0644", "uid": 1000, "gid": 1000,
     "flags": ["O_WRONLY", "O_CREAT"], "decision": "deny", "rule": "old-homes-ro", "reason": "denied"},
    {"event": "request", "op": "rename", "path": "/home/a/x", "path2": "/etc/x", "decision": "allow",
     "rule": None, "reason": "no rule matched: default allow"},
    {"event": "protocol-error", "reason": "short payload"},
    {"event": "request", "op": "remove", "path": "/srv/d", "decision": "allow", "rule": None, "reason": "ok"},
    {"event": "client-gone"},
    {"event": "stop"},
]


@pytest.fixture
def audit_log(tmp_path: Path) -> Path:
    path = tmp_path / "audit.jsonl"
    path.write_text("\n".join(audit_lines(LOG)) + "\n")
    return path


def test_replay_reports_changed_decisions(capsys, policy_file, audit_log) -> None:
    code, report = run_json(capsys, policy_file, "--replay", audit_log)
    assert code == 0  # changes alone do not fail the check...
    r = report["replay"]
    assert (r["lines"], r["requests"], r["other_events"], r["errors"]) == (12, 7, 5, 0)
    assert (r["changed"], r["unchanged"]) == (4, 3)
    assert r["transitions"] == {"allow->deny": 3, "deny->allow": 1}
    assert r["by_rule"] == [
        {"transition": "allow->deny", "rule": "etc-ro", "old_rule": None, "count": 3},
        {"transition": "deny->allow", "rule": None, "old_rule": "old-homes-ro", "count": 1},
    ]
    example = r["examples"]["allow->deny"][0]
    assert example == {"line": 3, "seq": 3, "time": "2026-11-22T07:41:03.123456Z",
                       "request": "open /etc/passwd flags=O_RDWR", "old": "allow", "old_rule": None,
                       "new": "deny", "new_rule": "etc-ro", "reason": "denied by rule 'etc-ro'"}
    assert [e["line"] for e in r["examples"]["allow->deny"]] == [3, 4, 8]  # rename: denied on path2
    assert r["policies"] == {"1a2b3c4d5e6f7a8b": 7}
    # ... unless asked to
    assert run_check(capsys, policy_file, "--replay", audit_log, "--fail-on-change")[0] == 1
    code, out, err = run_check(capsys, policy_file, "--replay", audit_log, "--examples", "1")
    assert "4 changed" in out and "examples of allow->deny:" in out and "line 3 seq 3" in out
    assert "line 4 seq 4" not in out
    assert err == ""  # no progress bar: not a terminal, and small


def test_replay_of_an_unchanged_log_passes_fail_on_change(capsys, policy_file, tmp_path) -> None:
    path = tmp_path / "same.jsonl"
    path.write_text("\n".join(audit_lines([r for r in LOG if r.get("path") in (None, "/dev/sda")])) + "\n")
    code, report = run_json(capsys, policy_file, "--replay", path, "--fail-on-change")
    assert code == 0 and report["replay"]["changed"] == 0 and report["replay"]["requests"] == 1


def test_replay_reads_gzip_and_counts_unreadable_lines(capsys, policy_file, tmp_path) -> None:
    lines = audit_lines(LOG)
    lines.insert(3, "{not json")
    lines.insert(5, json.dumps({"event": "request", "op": "frobnicate", "path": "/x", "decision": "allow"}))
    lines.insert(6, json.dumps({"event": "request", "op": "lstat", "path": "/x"}))
    lines.append('{"event": "request", "op": "open", "pa')  # a torn last line
    path = tmp_path / "audit.jsonl.1"  # compressed, whatever the name says
    path.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    _, report = run_json(capsys, policy_file, "--replay", path)
    r = report["replay"]
    assert (r["requests"], r["changed"], r["errors"]) == (7, 4, 4)
    assert [e["line"] for e in r["error_examples"]] == [4, 6, 7]
    assert "no usable decision field (None)" in r["error_examples"][2]["error"]


def test_replay_streams_in_constant_memory() -> None:
    policy = load_policy_text(POLICY)
    record = audit_lines([LOG[2]])[0]

    def lines(count: int) -> Iterator[bytes]:
        for i in range(count):
            yield record.replace('"seq":1', f'"seq":{i}').encode()

    peaks = []
    for count in (1_000, 12_000):
        tracemalloc.start()
        report = replay(lines(count), policy)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        assert report.changed == count and sum(len(v) for v in report.examples.values()) == 3
    assert peaks[1] < peaks[0] * 2 + 200_000, peaks  # 12x the records, about the same memory


def test_progress_bar_for_large_logs_on_stderr(capsys, policy_file, audit_log, monkeypatch) -> None:
    monkeypatch.setattr(check, "PROGRESS_MIN_BYTES", 1)
    code, out, err = run_check(capsys, policy_file, "--replay", audit_log, "--format", "json")
    assert code == 0 and json.loads(out)["replay"]["requests"] == 7  # stdout stays pure JSON
    assert "replaying" in err
    code, out, err = run_check(capsys, policy_file, "--replay", audit_log, "--no-progress")
    assert err == ""


def test_shipped_policies_check_clean(capsys) -> None:
    for path in [*sorted(ROOT.glob("policies/*.yaml")), ROOT / "examples/policy.yaml"]:
        code, report = run_json(capsys, path, "--strict")
        assert code == 0, (path, report["lint"], report["tests"])


def test_text_report_of_a_policy_without_tests(capsys, tmp_path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(textwrap.dedent("""\
        version: 1
        default: deny
        enforcement: permissive
        rules:
          - {id: r, effect: allow, ops: [read]}
        """))
    code, out, _ = run_check(capsys, path)
    assert code == 0
    assert "[no-tests]" in out and "[permissive]" in out and "enforcement permissive" in out


def test_the_report_shows_the_id_map_and_the_limits(capsys, tmp_path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(POLICY.replace("rules:\n", textwrap.dedent("""\
        ids:
          uid: [{guest: 0, host: 100000, count: 65536}, {guest: 70000, host: 300000, count: 1}]
          gid: {guest: 0, host: 100000, count: 65536}
          unmapped: squash
        limits:
          rate: {requests_per_second: 2000}
          truncate_max: 10G
        rules:
        """)))
    code, out, _ = run_check(capsys, path)
    assert code == 0
    assert ("  ids uid 0-65535 → 100000-165535, 70000 → 300000 · gid 0-65535 → 100000-165535 · unmapped "
            "squash → 65534:65534 · other host ids show as 65534:65534 · rules see guest ids") in out
    assert "  limits rate 2000/s (burst 2000; above it the guest waits) · truncate_max 10 GiB (EFBIG" in out
    code, report = run_json(capsys, path)
    assert report["policy"]["ids"] == {
        "uid": [{"guest": 0, "host": 100000, "count": 65536}, {"guest": 70000, "host": 300000, "count": 1}],
        "gid": [{"guest": 0, "host": 100000, "count": 65536}],
        "unmapped": "squash", "squash_uid": 65534, "squash_gid": 65534,
    }
    assert report["policy"]["limits"] == {"requests_per_second": 2000.0, "burst": 2000,
                                          "truncate_max": 10 << 30, "open_fds": None}


def test_no_id_map_and_no_limits_are_not_shown(capsys, policy_file) -> None:
    code, out, _ = run_check(capsys, policy_file)
    assert code == 0 and "  ids " not in out and "  limits " not in out
    code, report = run_json(capsys, policy_file)
    assert report["policy"]["ids"] is None and set(report["policy"]["limits"].values()) == {None}


# ---------------------------------------------------------------------------------------------------------
# Requests as a quick, scriptable answer: decisions first, lint and tests only when asked, JSON lines, exit
# codes, a closed pipe.


def test_with_requests_the_decision_comes_first_and_lint_and_tests_wait_to_be_asked(capsys, tmp_path) -> None:
    path = tmp_path / "p.yaml"  # a failing test and a lint warning: neither counts unless asked for
    path.write_text(POLICY.replace("    expect: allow\n", "    expect: deny\n")
                    .replace("rules:\n", "rules:\n  - {id: pointless, effect: allow, ops: [read]}\n"))
    code, out, _ = run_check(capsys, path, "--request", "lstat /etc/hosts", "--strict", "--no-lint")
    assert code == 2  # --strict needs the lint
    code, out, _ = run_check(capsys, path, "--request", "lstat /etc/hosts")
    assert code == 0, out
    assert out.startswith("requests\n  lstat /etc/hosts\n    → allow")
    assert "\nlint " not in out and "\ntests " not in out and "[pointless-allow]" not in out
    assert "not run: lint (ask with --lint), tests (ask with --tests)" in out
    code, out, _ = run_check(capsys, path, "--request", "lstat /etc/hosts", "--tests")
    assert code == 1 and "1 passed, 1 failed" in out and "[pointless" not in out
    assert "result: FAILED (exit 1): 1 test(s) failed" in out
    assert out.index("requests") < out.index("policy ") < out.index("tests ")
    code, out, _ = run_check(capsys, path, "--request", "lstat /etc/hosts", "--lint")
    assert code == 0 and "[pointless-allow]" in out and "not run: tests (ask with --tests)" in out
    assert run_check(capsys, path, "--request", "lstat /etc/hosts", "--strict")[0] == 1  # implies --lint
    code, report = run_json(capsys, path)  # without requests: as before, everything
    assert code == 1 and report["lint"] and report["tests"]["failed"] == 1


def test_no_lint_and_lint_only(capsys, tmp_path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(POLICY.replace("rules:\n", "rules:\n  - {id: pointless, effect: allow, ops: [read]}\n"))
    code, out, _ = run_check(capsys, path, "--no-lint")
    assert code == 0 and "2 passed, 0 failed" in out and "[pointless" not in out
    assert "not run: lint (--no-lint)" in out
    code, report = run_json(capsys, path, "--no-lint")
    assert report["lint"] is None and report["tests"]["passed"] == 2
    code, out, _ = run_check(capsys, path, "--lint-only", "--strict")
    assert code == 1 and "[pointless-allow]" in out and "passed" not in out
    assert "not run: tests (--lint-only)" in out
    code, report = run_json(capsys, path, "--lint-only")
    assert code == 0 and report["tests"] is None and report["lint"][0]["code"] == "pointless-allow"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--lint-only", "--request", "lstat /x"], "--lint-only validates and lints only: not with --request"),  # noqa: E501
        (["--lint-only", "--no-lint"], "not with --no-lint"),
        (["--no-lint", "--lint", "--request", "lstat /x"], "--no-lint skips the lint: not with --lint"),
        (["--fail-on-deny"], "--fail-on-deny needs --request or --requests"),
    ],
)
def test_conflicting_options_exit_2(capsys, policy_file, argv: list[str], message: str) -> None:
    code, out, err = run_check(capsys, policy_file, *argv)
    assert code == 2 and out == "" and err.startswith("gateway check: error: ") and message in err


def json_lines(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines()]


def test_json_lines_one_per_request_named_as_in_the_audit_record(capsys, policy_file, tmp_path) -> None:
    code, out, _ = run_check(capsys, policy_file, "--format", "json",
                             "--request", "open /etc/passwd flags=O_RDWR", "--request", "remove /x type=dir",
                             "--request", "lstat /etc/hosts", "--request", "rename /a /b")
    assert code == 0
    got = json_lines(out)
    digest = hashlib.sha256(POLICY.encode()).hexdigest()[:16]
    assert got[0] == {"tenant": "guest-42", "policy": digest, "event": "request", "op": "open",
                      "path": "/etc/passwd", "flags": ["O_RDWR"], "decision": "deny", "rule": "etc-ro",
                      "reason": "denied by rule 'etc-ro'", "result": "EROFS"}
    assert [(r["decision"], r["result"]) for r in got] == [("deny", "EROFS"), ("deny", "EACCES"),
                                                           ("allow", "ok"), ("allow", "ok")]
    assert got[1]["object"] == {"type": "dir"} and "object" not in got[2]
    assert got[3]["path2"] == "/b" and all("explain" not in r for r in got)
    code, out, _ = run_check(capsys, policy_file, "--format", "json", "--request", "remove /x type=dir",
                             "--explain")
    (line,) = json_lines(out)
    assert {e["rule"]: e["status"] for e in line["explain"]}["no-dir-removal"] == "decides"
    # The output reads back as requests and replays as a trail: the same decisions, nothing changes.
    saved = tmp_path / "decided.jsonl"
    saved.write_text(out)
    code, out, _ = run_check(capsys, policy_file, "--format", "json", "--requests", saved)
    assert [r["rule"] for r in json_lines(out)] == ["no-dir-removal"]
    # A trail carries no object attributes (the server reads them): replay those without.
    _, out, _ = run_check(capsys, policy_file, "--format", "json",
                          "--request", "open /etc/passwd flags=O_RDWR",
                          "--request", "lstat /a")
    saved.write_text(out)
    code, report = run_json(capsys, policy_file, "--replay", saved, "--fail-on-change")
    assert code == 0 and report["replay"]["requests"] == 2 and report["replay"]["changed"] == 0


def test_json_lines_end_with_the_report_only_when_lint_tests_or_replay_ran(capsys, policy_file) -> None:
    code, out, _ = run_check(capsys, policy_file, "--format", "json", "--request", "lstat /a", "--tests")
    first, last = json_lines(out)
    assert first["event"] == "request" and last["event"] == "check" and "requests" not in last
    assert last["tests"]["passed"] == 2 and last["lint"] is None and last["exit"] == code == 0
    code, out, _ = run_check(capsys, policy_file, "--format", "json", "--request", "opne /a")
    (error,) = json_lines(out)  # an unusable request: one line too
    assert code == 2 and error["event"] == "check" and "unknown op 'opne'" in error["error"]


def test_fail_on_deny(capsys, policy_file, tmp_path) -> None:
    allowed = ["--request", "lstat /etc/hosts"]
    denied = ["--request", "open /etc/passwd flags=O_RDWR"]
    assert run_check(capsys, policy_file, *allowed, *denied)[0] == 0  # a deny alone is an answer, not a fail
    assert run_check(capsys, policy_file, *allowed, "--fail-on-deny")[0] == 0
    code, out, _ = run_check(capsys, policy_file, *allowed, *denied, "--fail-on-deny")
    assert code == 1
    assert "result: FAILED (exit 1): 1 of 2 request(s) denied or would be (--fail-on-deny)" in out
    permissive = tmp_path / "permissive.yaml"
    permissive.write_text(POLICY.replace("default: allow\n", "default: allow\nenforcement: permissive\n")
                          .replace("    expect: deny\n", "    expect: would-deny\n"))
    code, out, _ = run_check(capsys, permissive, *denied, "--fail-on-deny", "--format", "json")
    (line,) = json_lines(out)
    assert code == 1 and (line["decision"], line["result"]) == ("would-deny", "ok")  # performed anyway
    invalid = tmp_path / "invalid.yaml"
    invalid.write_text(POLICY.replace("ops: [write]", "ops: [wirte]"))
    code, out, _ = run_check(capsys, invalid, *denied, "--fail-on-deny", "--format", "json")
    assert code == 2 and json_lines(out)[0]["valid"] is False  # invalid stays 2, on one line


def gateway_check(*argv: object, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", "check", *map(str, argv)], capture_output=True,
                          text=True, timeout=120, cwd=ROOT, **kwargs)  # type: ignore[call-overload]


def test_exit_codes_of_the_command(policy_file, tmp_path) -> None:
    denied = ["--request", "open /etc/passwd flags=O_RDWR"]
    assert gateway_check(policy_file, *denied).returncode == 0
    assert gateway_check(policy_file, *denied, "--fail-on-deny").returncode == 1
    invalid = tmp_path / "invalid.yaml"
    invalid.write_text("version: 1\ndefault: maybe\n")
    done = gateway_check(invalid, *denied, "--fail-on-deny")
    assert done.returncode == 2 and "result: INVALID (exit 2)" in done.stdout
    assert gateway_check(policy_file, "--lint-only", *denied).returncode == 2
    helped = gateway_check("--help")
    assert helped.returncode == 0 and "exit status:" in helped.stdout and "141" in helped.stdout


@pytest.mark.parametrize("json_output", [True, False])
def test_a_closed_pipe_ends_quietly_with_141(policy_file, tmp_path, json_output: bool) -> None:
    reqs_file = tmp_path / "reqs.jsonl"
    reqs_file.write_text('"lstat /etc/hosts"\n' * 20)
    argv = [policy_file, "--requests", reqs_file] + (["--format", "json"] if json_output else [])
    child = subprocess.Popen([sys.executable, "-m", "gateway", "check", *map(str, argv)], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert child.stdout is not None and child.stderr is not None
    child.stdout.close()  # the reader is gone before anything is written: the first write fails
    err = child.stderr.read().decode()
    assert child.wait(timeout=120) == 141 and err == ""


@pytest.mark.parametrize("extra", [["--format", "json", "--requests", "REQS"], []])
def test_head_of_the_output(policy_file, tmp_path, extra: list[str]) -> None:
    reqs_file = tmp_path / "reqs.jsonl"
    reqs_file.write_text("".join(f'"lstat /etc/f{i}"\n' for i in range(5000)))
    argv = " ".join(shlex.quote(str(a).replace("REQS", str(reqs_file))) for a in [policy_file, *extra])
    script = f"{shlex.quote(sys.executable)} -m gateway check {argv} | head -1; echo ${{PIPESTATUS[0]}} >&2"
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT)
    status = done.stderr.splitlines()[-1]
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr
    first = done.stdout.splitlines()
    if extra:
        assert status == "141" and json.loads(first[0])["path"] == "/etc/f0"  # 5000 lines: the pipe closes
    else:
        assert status in ("0", "141") and first[0].startswith("policy ")  # small: may be written in time
