"""`gateway check --suggest`: rules proposed from a permissive session's trail.

The round trip of issue 15: a permissive session's trail (records written by gateway.audit's writer, as
the server writes them), the suggestions applied, then a replay of the same trail leaves no would-deny the
default decided, and nothing outside the suggested globs is newly allowed (a Hypothesis property over
generated trails). Denials by a deny rule are never "fixed": deny overrides allow.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml
from helpers import over_socketpair, require_root
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway import protocol as p
from gateway.audit.writer import AuditWriter
from gateway.rules import decide, load_policy
from gateway.rules.globs import GlobSet
from gateway.rules.replay import open_log, replay
from gateway.rules.suggest import escape, patch_text, suggest, with_rules

POLICY = """\
version: 1
tenant: rollout
default: deny
enforcement: permissive
rules:
  - id: system-read-only
    effect: deny
    ops: [write]
    paths: ["/etc/**"]
  - id: read-srv
    effect: allow
    ops: [read]
    paths: ["/srv/**"]
tests:
  - name: etc stays read-only
    request: "open /etc/passwd flags=O_RDWR"
    expect: would-deny
"""


def write_trail(path: Path, policy_file: Path, requests: list[object]) -> None:
    """The records a permissive gateway writes for these requests (decided, then recorded)."""
    policy = load_policy(policy_file)
    with AuditWriter.open(path, tenant=policy.tenant, policy_hash=policy.hash) as w:
        for r in requests:
            d = decide(r, policy)
            w.request(r, decision=d.outcome, rule=d.rule, reason=d.reason, result="ok", us=1.0)


def proposals_for(policy_file: Path, trail: Path) -> list:
    return suggest([open_log(str(trail))[0]], load_policy(policy_file)).proposals


def test_generalised_by_directory_extension_and_tree(tmp_path: Path) -> None:
    policy_file = tmp_path / "p.yaml"
    policy_file.write_text(POLICY)
    trail = tmp_path / "t.jsonl"
    write_trail(trail, policy_file, [
        p.Open(b"/home/al/a.txt", os.O_RDONLY), p.Open(b"/home/al/b.txt", os.O_RDONLY),  # dir, by ext
        p.Lstat(b"/var/log/x"), p.Lstat(b"/var/log/y.gz"),  # dir, mixed extensions
        p.Open(b"/data/p/q/x.c", os.O_RDWR), p.Open(b"/data/p/r/y.c", os.O_RDWR),
        p.Open(b"/data/p/s/z.c", os.O_RDWR),  # three sibling directories: the parent's tree
        p.Mkdir(0, 0, b"/opt/one", 0o755),  # alone: exact
        p.Lstat(b"/srv/ok"),  # allowed already
        p.Open(b"/etc/passwd", os.O_RDWR),  # a deny rule's: no allow can lift it
    ])
    found = suggest([open_log(str(trail))[0]], load_policy(policy_file))
    got = {tuple(x.paths): (x.ops, x.count) for x in found.proposals}
    assert got == {
        ("/home/al/*.txt",): (["read"], 2),
        ("/var/log/*",): (["read"], 2),
        ("/data/p/**/*.c",): (["open"], 3),
        ("/opt/one",): (["mkdir"], 1),
    }
    assert found.records == 10 and found.denied == 9
    assert dict(found.by_deny_rule) == {"system-read-only": 1}
    exact = next(x for x in found.proposals if x.paths == ["/opt/one"])
    assert exact.alternatives == [["/opt/*"], ["/opt/**"]]  # broader choices for the interactive review
    # The patch is policy syntax: appended, it loads.
    patch = yaml.safe_load(patch_text(found.proposals, "header"))
    assert [r["id"] for r in patch["rules"]] == [x.id for x in found.proposals]
    with_rules(str(policy_file), patch["rules"])


def test_interactive_review_accepts_skips_and_reglobs(tmp_path: Path, monkeypatch) -> None:
    from rich.console import Console

    from gateway import check_suggest

    policy_file = tmp_path / "p.yaml"
    policy_file.write_text(POLICY)
    trail = tmp_path / "t.jsonl"
    write_trail(trail, policy_file, [p.Mkdir(0, 0, b"/opt/one", 0o755), p.Lstat(b"/var/log/x")])
    found = proposals_for(policy_file, trail)
    assert [x.paths for x in found] == [["/opt/one"], ["/var/log/x"]]
    answers = iter(["2", "a", "s"])  # /opt/one: take /opt/** instead, accept; /var/log/x: skip
    monkeypatch.setattr(check_suggest.Prompt, "ask", lambda *a, **k: next(answers))
    kept = check_suggest._ask(Console(file=open(os.devnull, "w")), found)  # noqa: SIM115
    assert [(x.paths, x.alternatives[1]) for x in kept] == [(["/opt/**"], ["/opt/one"])]


def test_globs_escape_what_the_path_spells() -> None:
    g = GlobSet.compile([escape("/a/[x]*{b,c}?.txt")])
    assert g.matches("/a/[x]*{b,c}?.txt") and not g.matches("/a/x_b_.txt")


def test_cli_patch_applied_then_replay_leaves_no_would_deny(tmp_path: Path) -> None:
    """The README's rollout: permissive, --suggest, apply, --replay, enforce."""
    policy_file = tmp_path / "p.yaml"
    policy_file.write_text(POLICY)
    trail = tmp_path / "t.jsonl"
    write_trail(trail, policy_file, [
        p.Open(b"/home/al/a.txt", os.O_RDONLY), p.Open(b"/home/al/b.txt", os.O_RDONLY),
        p.Rename(b"/data/in/x", b"/data/out/x"),
        p.Create(b"/data/in/y", os.O_CREAT | os.O_WRONLY, 0o644, 0, 0),
    ])
    gateway = [sys.executable, "-m", "gateway"]
    done = subprocess.run([*gateway, "check", str(policy_file), "--suggest", str(trail)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "0 denial(s) left to the default" in done.stderr
    data = yaml.safe_load(policy_file.read_text())
    data["rules"] += yaml.safe_load(done.stdout)["rules"]
    patched = tmp_path / "patched.yaml"
    patched.write_text(yaml.safe_dump(data, sort_keys=False))
    done = subprocess.run([*gateway, "check", str(patched), "--replay", str(trail), "--format", "json"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    outcomes = json.loads(done.stdout)["replay"]["outcomes"]
    assert outcomes == {"allow": 4}
    # --patch writes the file; the report still names each rule.
    out = tmp_path / "patch.yaml"
    done = subprocess.run([*gateway, "check", str(policy_file), "--suggest", str(trail), "--patch", str(out)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout == "" and "rules:" in out.read_text()
    done = subprocess.run([*gateway, "check", str(policy_file), "--suggest", str(trail), "--coverage"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "mode of its own" in done.stderr


def test_a_real_permissive_session_round_trip(tmp_path: Path) -> None:
    """A real gateway in permissive mode, its trail, the suggestions appended, the replay, then the same
    session under the patched policy *enforced*: every request is allowed, and a path outside the
    suggested globs is still refused."""
    require_root()
    export = tmp_path / "export"
    (export / "srv").mkdir(parents=True)
    (export / "work" / "src").mkdir(parents=True)
    for name in ("a.c", "b.c"):
        (export / "work" / "src" / name).write_text("x")
    (export / "work" / "other").write_text("x")
    policy_file = tmp_path / "p.yaml"
    policy_file.write_text(POLICY)
    trail = tmp_path / "trail.jsonl"
    session = [p.Open(b"work/src/a.c", os.O_RDWR), p.Open(b"work/src/b.c", os.O_RDONLY),
               p.Mkdir(1000, 1000, b"work/build", 0o755), p.Lstat(b"srv")]
    gateway = [sys.executable, "-m", "gateway"]
    extra = ["--policy", str(policy_file), "--audit-log", str(trail)]
    with over_socketpair([*gateway, "serve"], export, extra) as running:
        assert [running.client.call(r).errno for r in session] == [0, 0, 0, 0]  # permissive
    done = subprocess.run([*gateway, "check", str(policy_file), "--suggest", str(trail), "--format", "json"],
                          capture_output=True, text=True, timeout=60)
    report = json.loads(done.stdout)
    assert done.returncode == 0 and report["check"]["remaining_default_denials"] == 0, report
    data = yaml.safe_load(policy_file.read_text())
    data["rules"] += yaml.safe_load(report["patch"])["rules"]
    data["enforcement"] = "enforce"
    data["tests"][0]["expect"] = "deny"
    enforced = tmp_path / "enforced.yaml"
    enforced.write_text(yaml.safe_dump(data, sort_keys=False))
    done = subprocess.run([*gateway, "check", str(enforced), "--replay", str(trail), "--format", "json"],
                          capture_output=True, text=True, timeout=60)
    assert json.loads(done.stdout)["replay"]["outcomes"] == {"allow": 4}, done.stdout
    (export / "work" / "build").rmdir()  # the first session made it
    trail2 = tmp_path / "trail2.jsonl"
    extra = ["--policy", str(enforced), "--audit-log", str(trail2)]
    with over_socketpair([*gateway, "serve"], export, extra) as running:
        assert [running.client.call(r).errno for r in session[:3]] == [0, 0, 0]
        assert running.client.call(p.Open(b"work/other", os.O_RDWR)).errno != 0  # never suggested


def test_a_patch_that_breaks_a_test_is_named_and_fails(tmp_path: Path) -> None:
    policy_file = tmp_path / "p.yaml"
    policy_file.write_text(POLICY + "  - request: \"mkdir /opt/x mode=0755\"\n    expect: would-deny\n")
    trail = tmp_path / "t.jsonl"
    write_trail(trail, policy_file, [p.Mkdir(0, 0, b"/opt/x", 0o755)])
    command = [sys.executable, "-m", "gateway", "check", str(policy_file), "--suggest", str(trail)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "the patch breaks test #1" in done.stderr


# --------------------------------------------------------------------------------------------------------
# The property: over generated permissive trails, the applied suggestions allow every record the default
# denied, and nothing is newly allowed outside the suggested globs.

_NAMES = st.sampled_from(["a", "b", "c.txt", "d.txt", "e.c", "f"])
_PATHS = st.lists(_NAMES, min_size=1, max_size=4).map(lambda parts: "/" + "/".join(parts))


def _request(op: str, path: str, path2: str) -> object:
    raw, raw2 = path.encode(), path2.encode()
    return {
        "lstat": lambda: p.Lstat(raw),
        "open-read": lambda: p.Open(raw, os.O_RDONLY),
        "open-write": lambda: p.Open(raw, os.O_WRONLY | os.O_TRUNC),
        "mkdir": lambda: p.Mkdir(1000, 1000, raw, 0o755),
        "remove": lambda: p.Remove(raw),
        "rename": lambda: p.Rename(raw, raw2),
        "chmod": lambda: p.Chmod(raw, 0o644),
    }[op]()


_REQUESTS = st.builds(_request, st.sampled_from(["lstat", "open-read", "open-write", "mkdir", "remove",
                                                 "rename", "chmod"]), _PATHS, _PATHS)
PROPERTY_POLICY = """\
version: 1
tenant: prop
default: deny
enforcement: permissive
rules:
  - id: no-writes-in-b
    effect: deny
    ops: [write]
    paths: ["/b/**"]
  - id: read-a
    effect: allow
    ops: [read]
    paths: ["/a/**"]
"""


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(trail=st.lists(_REQUESTS, min_size=1, max_size=25), probes=st.lists(_REQUESTS, max_size=30))
def test_property_suggestions_allow_the_trail_and_nothing_outside_their_globs(
        tmp_path: Path, trail: list[object], probes: list[object]) -> None:
    policy_file = tmp_path / "prop.yaml"
    policy_file.write_text(PROPERTY_POLICY)
    log = tmp_path / "trail.jsonl"
    log.unlink(missing_ok=True)
    write_trail(log, policy_file, trail)
    before = load_policy(policy_file)
    found = suggest([open_log(str(log))[0]], before)
    after = with_rules(str(policy_file), [x.rule() for x in found.proposals])
    report = replay(open_log(str(log))[0], after)
    left = [r for r in trail if decide(r, after).outcome != "allow"]
    assert all(decide(r, after).rule == "no-writes-in-b" for r in left)
    assert report.outcomes.get("would-deny", 0) == len(left)
    globs = GlobSet.compile([g for x in found.proposals for g in x.paths]) if found.proposals else None
    for r in [*trail, *probes]:
        if decide(r, before).outcome != "allow" and decide(r, after).outcome == "allow":
            paths = [r.path.decode()] + ([r.path2.decode()] if hasattr(r, "path2") else [])
            assert globs is not None and any(globs.matches(x) for x in paths), r

