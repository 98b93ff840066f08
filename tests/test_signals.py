"""SIGHUP and SIGUSR1: never acted on inside a signal handler, never fatal from the first line of our code on.

A storm of SIGHUPs against a busy gateway leaves a trail whose seq numbers are unique and contiguous and
whose chain verifies (a reload re-entered from a handler used to write two records with one seq). A
SIGHUP that arrives while the gateway starts does not kill it, and is not lost either.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import ROOT, over_socketpair, require_root

from gateway import protocol as p

SERVE = [sys.executable, "-m", "gateway", "serve"]
POLICY = "version: 1\ntenant: t\ndefault: allow\nrules: []\n"


@pytest.fixture
def export(tmp_path: Path) -> Path:
    root = tmp_path / "export"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").write_text("root:x:0:0\n")
    return root


def records(trail: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in trail.read_bytes().splitlines()]


def verify(*trails: Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "gateway", "audit", "--verify", *map(str, trails)]
    return subprocess.run(command, capture_output=True, text=True)


def wait_for(predicate: object, what: str, timeout: float = 20) -> None:
    """Wait for a condition the gateway brings about (a deadline against a hang, not a timing test)."""
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"still waiting for {what}"
        time.sleep(0.02)


def test_a_sighup_storm_against_a_busy_gateway_keeps_the_chain(export: Path, tmp_path: Path) -> None:
    require_root()
    policy = tmp_path / "p.yaml"
    policy.write_text(POLICY)
    trail = tmp_path / "trail.jsonl"
    replies: list[int] = []
    with over_socketpair(SERVE, export, extra=["--policy", str(policy), "--audit-log", str(trail)]) as gw:
        gw.client.lstat(b"/")  # serving: the handlers are in place
        done = threading.Event()

        def hammer() -> None:
            try:
                while not done.is_set():
                    replies.append(gw.client.call(p.Lstat(b"/etc/passwd")).errno)
            except OSError:
                return

        worker = threading.Thread(target=hammer)
        worker.start()
        try:
            for _ in range(600):
                os.kill(gw.proc.pid, signal.SIGHUP)
                time.sleep(0.002)
            # and while idle: a reload must not wait for the next request
            done.set()
            worker.join(30)
            before = sum(r["event"] == "policy-reload" for r in records(trail))
            os.kill(gw.proc.pid, signal.SIGHUP)
            wait_for(lambda: sum(r["event"] == "policy-reload" for r in records(trail)) > before,
                     "a reload while idle")  # fmt: skip
        finally:
            done.set()
            worker.join(30)
        assert gw.proc.poll() is None
        gw.client.close()
        assert gw.proc.wait(10) == 0
    assert replies and set(replies) == {0}
    recs = records(trail)
    assert [r["seq"] for r in recs] == list(range(1, len(recs) + 1))
    reloads = [r for r in recs if r["event"] == "policy-reload"]
    assert len(reloads) >= 2 and all(r["result"] == "ok" for r in reloads)
    assert sum(r["event"] == "request" for r in recs) == len(replies) + 1
    out = verify(trail)
    assert out.returncode == 0, out.stdout + out.stderr


def test_a_sigusr1_storm_rotates_without_forking_the_chain(export: Path, tmp_path: Path) -> None:
    require_root()
    trail = tmp_path / "trail.jsonl"
    with over_socketpair(SERVE, export, extra=["--audit-log", str(trail)]) as gw:
        gw.client.lstat(b"/")
        for _ in range(200):
            os.kill(gw.proc.pid, signal.SIGUSR1)
            gw.client.lstat(b"/etc")
        gw.client.close()
        assert gw.proc.wait(10) == 0
    recs = records(trail)
    assert [r["seq"] for r in recs] == list(range(1, len(recs) + 1))
    assert any(r["event"] == "reopen" for r in recs)
    out = verify(trail)
    assert out.returncode == 0, out.stdout + out.stderr


HOOK = """
import signal, sys
seen = []
def hook(event, args):
    if event == "import" and args[0] in ("gateway.serve", "ruamel.yaml") and len(seen) < 2:
        blocked = signal.SIGHUP in signal.pthread_sigmask(signal.SIG_BLOCK, [])
        ignored = signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
        usr1 = signal.SIGUSR1 in signal.pthread_sigmask(signal.SIG_BLOCK, [])
        seen.append((args[0], blocked or ignored, usr1 or signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN))
sys.addaudithook(hook)
sys.argv = ["gateway", "serve", "--help"]
try:
    ENTRY
except SystemExit:
    pass
print(repr(seen), file=sys.stderr)
"""


@pytest.mark.parametrize(
    "entry",
    [
        "import runpy; runpy.run_module('gateway', run_name='__main__', alter_sys=True)",  # python -m gateway
        "from gateway.cli import main; main(['serve', '--help'])",  # the `gateway` console script
        "from gateway.cli import proxy_helper_main; sys.argv = ['x', '--help']; proxy_helper_main()",
    ],
)
def test_reload_signals_are_held_before_the_heavy_imports(entry: str) -> None:
    """Importing the serve path takes 100-200 ms (ruamel, cerberus, the rules): a SIGHUP then used to
    kill the gateway, since its default action is to terminate."""
    out = subprocess.run(
        [sys.executable, "-c", HOOK.replace("ENTRY", entry)], capture_output=True, text=True, cwd=ROOT
    )
    seen = eval(out.stderr.strip().splitlines()[-1])
    assert seen and all(held and usr1 for _module, held, usr1 in seen), seen


@contextlib.contextmanager
def spawned_with_sighup_blocked() -> Iterator[None]:
    """What a supervisor does that may signal at once (env --block-signal=HUP, a wrapper): the child
    inherits the mask, so nothing can kill it before its first instruction; the gateway must then not
    lose the pending SIGHUP, nor keep it blocked."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP, signal.SIGUSR1})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def test_sighup_right_after_spawn_neither_kills_nor_is_lost(export: Path, tmp_path: Path) -> None:
    require_root()
    policy = tmp_path / "p.yaml"
    policy.write_text(POLICY)
    trail = tmp_path / "trail.jsonl"
    stack = contextlib.ExitStack()
    with stack:
        with spawned_with_sighup_blocked():
            gw = stack.enter_context(
                over_socketpair(SERVE, export, extra=["--policy", str(policy), "--audit-log", str(trail)])
            )
        deadline = time.monotonic() + 0.3
        while time.monotonic() < deadline:  # all through start-up: imports, policy, trail, sandbox
            os.kill(gw.proc.pid, signal.SIGHUP)
            time.sleep(0.002)
        assert gw.proc.poll() is None
        assert gw.client.call(p.Lstat(b"/")).errno == 0
        wait_for(lambda: any(r["event"] == "policy-reload" for r in records(trail)), "the held reload")
        count = sum(r["event"] == "policy-reload" for r in records(trail))
        os.kill(gw.proc.pid, signal.SIGHUP)  # and SIGHUP is no longer blocked once serving
        wait_for(lambda: sum(r["event"] == "policy-reload" for r in records(trail)) > count, "a later reload")
        gw.client.close()
        assert gw.proc.wait(10) == 0
    out = verify(trail)
    assert out.returncode == 0, out.stdout + out.stderr
