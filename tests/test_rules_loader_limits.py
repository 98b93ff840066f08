"""The policy loader's bounds: no YAML anchors or aliases (a few hundred bytes of them grew `gateway check`
to 3.1 GiB), a bounded document size, a bounded depth, each refused with file:line and never a traceback.

Memory is measured in a child process (its peak RSS before and after the load) under an address-space
limit, so that a regression fails quickly instead of swapping the machine.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import ROOT, over_socketpair, require_root

from gateway.protocol import Lstat
from gateway.rules import PolicyError, load_policy, load_policy_text
from gateway.rules.loader import MAX_DEPTH, MAX_POLICY_BYTES, anchor_problem


def alias_bomb() -> str:
    """Nine levels of nine aliases: 9**9 = 387 million scalars once expanded."""
    lines = ["version: 1", "default: deny", 'l0: &l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, 9):
        lines.append(f"l{i}: &l{i} [" + ",".join([f"*l{i - 1}"] * 9) + "]")
    lines.append("rules: []")
    return "\n".join(lines) + "\n"


MEASURE = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))  # a regression dies here, not in swap
from gateway.protocol import Lstat
from gateway.rules import PolicyError, load_policy
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    load_policy(sys.argv[1])
    message = "loaded"
except PolicyError as err:
    message = str(err)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(message)
print((after - before) * 1024)
"""


def load_in_child(path: Path | str) -> tuple[str, int]:
    """(the loader's message, the peak RSS the load added, in bytes)."""
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, str(path)], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert out.returncode == 0, out.stdout + out.stderr
    message, grown = out.stdout.rsplit("\n", 2)[-3:-1]
    return message, int(grown)


def test_the_alias_bomb_is_refused_with_its_line_and_little_memory(tmp_path: Path) -> None:
    bomb = tmp_path / "policy.yaml"
    bomb.write_text(alias_bomb())
    assert len(bomb.read_bytes()) < 700
    message, grown = load_in_child(bomb)
    assert message.startswith(f"{bomb}:3: YAML anchors and aliases are not allowed"), message
    assert grown < 20 << 20, f"the load grew RSS by {grown} bytes"


def test_gateway_check_names_the_anchor(tmp_path: Path) -> None:
    bomb = tmp_path / "policy.yaml"
    bomb.write_text(alias_bomb())
    out = subprocess.run(
        [sys.executable, "-m", "gateway", "check", str(bomb)], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stdout + out.stderr
    assert f"{bomb}:3: YAML anchors and aliases are not allowed" in out.stdout + out.stderr


@pytest.mark.parametrize(
    ("text", "line", "what"),
    [
        ("version: 1\ndefault: deny\nbase: &b {effect: allow, ops: [read]}\nrules:\n  - <<: *b\n    id: x\n",
         3, "an anchor, &b"),
        ("version: 1\ndefault: deny\nrules:\n  - id: x\n    effect: allow\n    ops: *undefined\n", 6,
         "an alias, *undefined"),
        ("version: 1\ndefault: deny\nrules:\n  - &r {id: x, effect: allow, ops: [read]}\n", 4,
         "an anchor, &r"),
    ],
)  # fmt: skip
def test_anchors_aliases_and_merge_keys_are_refused_where_they_are(text: str, line: int, what: str) -> None:
    with pytest.raises(PolicyError) as err:
        load_policy_text(text, "policy.yaml")
    assert str(err.value) == f"policy.yaml:{line}: YAML anchors and aliases are not allowed ({what})"


def test_a_plain_star_in_a_quoted_glob_is_no_alias() -> None:
    policy = load_policy_text(
        'version: 1\ndefault: deny\nrules:\n  - {id: x, effect: allow, ops: [read], paths: ["**/*.txt"]}\n',
        "policy.yaml",
    )
    assert policy.rules[0].id == "x"


def test_the_check_works_on_any_event_stream() -> None:
    """anchor_problem() judges parse events only, so a change of YAML parser keeps it."""
    import yaml

    events = list(yaml.parse("a: &x 1\nb: *x\nc: 2\n", Loader=yaml.CSafeLoader))
    found = [problem for e in events if (problem := anchor_problem(e)) is not None]
    assert found == [
        (1, "YAML anchors and aliases are not allowed (an anchor, &x)"),
        (2, "YAML anchors and aliases are not allowed (an alias, *x)"),
    ]


def test_a_document_over_the_size_bound_is_not_parsed(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    big.write_bytes(b"# " + b"x" * MAX_POLICY_BYTES + b"\n")
    with pytest.raises(PolicyError, match=f"{big}: .*larger than a policy may be"):
        load_policy(big)
    with pytest.raises(PolicyError, match="larger than a policy may be"):
        load_policy_text("#" * (MAX_POLICY_BYTES + 1), "p.yaml")
    # A policy path naming an endless file is read no further than the bound.
    message, grown = load_in_child("/dev/zero")
    assert "larger than a policy may be" in message and grown < 64 << 20, (message, grown)


def test_nesting_beyond_the_bound_is_named_not_a_recursion_error() -> None:
    deep = "version: 1\ndefault: deny\nx: " + "[" * 100_000 + "]" * 100_000 + "\n"
    with pytest.raises(PolicyError, match=f"p.yaml:3: nested more than {MAX_DEPTH} levels deep"):
        load_policy_text(deep, "p.yaml")


def test_a_sighup_reload_of_the_bomb_is_refused_and_the_old_policy_kept(tmp_path: Path) -> None:
    require_root()
    export = tmp_path / "export"
    export.mkdir()
    policy = tmp_path / "p.yaml"
    policy.write_text("version: 1\ntenant: t\ndefault: allow\nrules: []\n")
    trail = tmp_path / "trail.jsonl"
    serve = [sys.executable, "-m", "gateway", "serve"]
    with over_socketpair(serve, export, extra=["--policy", str(policy), "--audit-log", str(trail)]) as gw:
        gw.client.lstat(b"/")
        policy.write_text(alias_bomb())
        os.kill(gw.proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + 60  # against a hang; the refusal itself takes milliseconds
        reloads: list[dict[str, object]] = []
        while not reloads:
            assert time.monotonic() < deadline, "no policy-reload record"
            time.sleep(0.02)
            recs = map(json.loads, trail.read_bytes().splitlines())
            reloads = [r for r in recs if r["event"] == "policy-reload"]
        assert gw.client.call(Lstat(b"/")).errno == 0  # still serving, under the old policy
    assert reloads[0]["result"] == "refused"
    assert f"{policy}:3: YAML anchors and aliases are not allowed" in str(reloads[0]["error"])
