"""Replay tells the truth: a trail replayed against the very policy that wrote it reports no change.

The server records the object facts a decision used (``object``: owner, group, type, mode, in the
guest's ids; null when there was none) and the path it decided on (``resolved``); replay decides on
those. Before, replay looked at no object (so every owner-conditioned allow became a deny) and at the
guest's raw path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from helpers import over_socketpair, require_root

from gateway import protocol as p
from gateway.rules import load_policy
from gateway.rules.replay import replay

# Object rules and an id map at once: guest 1000 is host 101000; a guest may change only what it owns.
POLICY = """\
version: 1
tenant: replay-truth
default: deny
ids:
  uid:
    - {guest: 0, host: 100000, count: 65536}
  gid:
    - {guest: 0, host: 100000, count: 65536}
rules:
  - id: read-anything
    effect: allow
    ops: [read]
  - id: own-objects
    effect: allow
    ops: [chmod, utime, remove, truncate]
    paths: ["/home/**"]
    when: {object: {owner: [1000]}}
  - id: no-dirs-removed
    effect: deny
    ops: [remove]
    when: {object: {type: [dir]}}
    errno: EPERM
  - id: new-files-at-home
    effect: allow
    ops: [CREATE]
    paths: ["/home/**"]
    when: {uid: [1000]}
"""


def test_a_trail_replayed_against_its_own_policy_changes_nothing(tmp_path: Path) -> None:
    require_root()
    export = tmp_path / "export"
    home = export / "home"
    (home / "d").mkdir(parents=True)
    for name, owner in (("mine", 101000), ("theirs", 101001), ("root-owned", 0)):
        (home / name).write_text("x")
        os.chown(home / name, owner, owner)
    os.chown(home / "d", 101000, 101000)
    os.symlink("home", export / "link")  # a path decided as /home/... once resolved
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(POLICY)
    trail = tmp_path / "trail.jsonl"
    requests = [
        p.Chmod(b"home/mine", 0o600),  # allowed: the guest's own (host 101000 is guest 1000)
        p.Chmod(b"home/theirs", 0o600),  # denied: guest 1001's
        p.Chmod(b"home/root-owned", 0o600),  # denied: host root is outside the map
        p.Chmod(b"link/mine", 0o644),  # decided on /home/mine
        p.Utime(b"home/theirs", 0, (1 << 30) - 1, 0, (1 << 30) - 1),
        p.Remove(b"home/d"),  # denied: a directory
        p.Create(b"home/new", os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644, 1000, 1000),
        p.Remove(b"home/new"),  # allowed: created as guest 1000
        p.Remove(b"home/theirs"),  # denied
        p.Lstat(b"home/mine"),
    ]
    extra = ["--policy", str(policy_file), "--audit-log", str(trail)]
    with over_socketpair([sys.executable, "-m", "gateway", "serve"], export, extra) as running:
        answers = [running.client.call(r).errno for r in requests]
    assert answers[0] == 0 and answers[1] != 0 and answers[2] != 0 and answers[3] == 0, answers
    records = [json.loads(line) for line in trail.read_text().splitlines()]
    asked = [r for r in records if r.get("event") == "request" and "object" in r]
    assert asked, "the records of decisions on the object carry its facts"
    mine = next(r for r in asked if r["path"] == "home/mine" and r["op"] == "chmod")
    assert mine["object"] == {"owner": 1000, "group": 1000, "type": "reg", "mode": "0644"}
    linked = next(r for r in records if r.get("path") == "link/mine")
    assert linked["resolved"] == "/home/mine" and linked["decision"] == "allow"

    report = replay(iter(trail.read_bytes().splitlines()), load_policy(policy_file))
    assert report.requests == len(requests) and report.errors == 0, report.as_dict()
    assert report.changed == 0, report.as_dict()
    check = [sys.executable, "-m", "gateway", "check", str(policy_file)]
    done = subprocess.run([*check, "--replay", str(trail), "--fail-on-change"], capture_output=True)
    code = done.returncode
    assert code == 0


def test_root_shows_the_rules_the_guests_ids(tmp_path: Path) -> None:
    """`check --root` reads a host tree, whose owners are host ids; under an id map the rules speak the
    guest's, so the tree's owners go through the map first (as the server does)."""
    require_root()
    tree = tmp_path / "tree"
    (tree / "home").mkdir(parents=True)
    for name, owner in (("mine", 101000), ("theirs", 101001)):
        (tree / "home" / name).write_text("x")
        os.chown(tree / "home" / name, owner, owner)
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(POLICY)
    check = [sys.executable, "-m", "gateway", "check", str(policy_file), "--root", str(tree)]
    check += ["--format", "json"]
    decided = {}
    for name in ("mine", "theirs"):
        done = subprocess.run([*check, "--request", f"chmod /home/{name} mode=0600"], capture_output=True)
        decided[name] = json.loads(done.stdout.splitlines()[0])["decision"]
    assert decided == {"mine": "allow", "theirs": "deny"}, decided
