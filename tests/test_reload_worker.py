"""Issue 11 point 5: SIGHUP's reload is read and compiled off the request path, in a thread started
inside the sandbox, and swapped in between two requests.

Nothing here is timed: the property is that the guest is served *while* a large policy compiles (the
reload record counts the requests served meanwhile; an inline reload serves none). The worst extra
latency is a benchmark figure (bench/bench_policy.py).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import ROOT, over_socketpair, require_root

from gateway import protocol as p
from gateway.reload_worker import ReloadWorker
from gateway.rules import PolicyError, load_policy_text

sys.path.insert(0, str(ROOT / "bench"))
from policy_gen import path_policy

SERVE = [sys.executable, "-m", "gateway", "serve"]


def _records(trail: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in trail.read_text().splitlines() if line]


def _wait_for(predicate: object, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"still waiting for {what}"
        time.sleep(0.02)


@pytest.fixture
def export(tmp_path: Path) -> Path:
    root = tmp_path / "export"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").write_text("root:x:0:0\n")
    return root


def test_requests_are_served_while_a_large_policy_compiles(export: Path, tmp_path: Path) -> None:
    require_root()
    policy = tmp_path / "p.yaml"
    small = "version: 1\ntenant: t\ndefault: allow\nrules: []\n"
    policy.write_text(small)
    trail = tmp_path / "trail.jsonl"
    log = open(tmp_path / "stderr", "wb")  # noqa: SIM115 - a long session: stderr to a file, not a pipe
    extra = ["--policy", str(policy), "--audit-log", str(trail)]
    with over_socketpair(SERVE, export, extra=extra, stderr=log) as gw:
        gw.client.lstat(b"/")
        policy.write_text(path_policy(3000))  # big enough that compiling it takes a while
        replies: list[int] = []
        done = threading.Event()

        def hammer() -> None:
            while not done.is_set():
                replies.append(gw.client.call(p.Lstat(b"/etc/passwd")).errno)

        worker = threading.Thread(target=hammer)
        worker.start()
        try:
            os.kill(gw.proc.pid, signal.SIGHUP)
            _wait_for(lambda: any(r["event"] == "policy-reload" for r in _records(trail)), "the reload")
        finally:
            done.set()
            worker.join(30)
        # The new policy (deny by default, but read-anything) is in force for the requests after it.
        assert gw.client.call(p.Lstat(b"/etc/passwd")).errno == 0
        assert gw.client.call(p.Truncate(b"/etc/passwd", 0)).errno == errno.EACCES
        assert gw.stop() == 0
    reload = next(r for r in _records(trail) if r["event"] == "policy-reload")
    assert reload["result"] == "ok"
    assert reload["served_meanwhile"] > 0, reload  # type: ignore[operator]
    assert reload["compile_s"] > 0  # type: ignore[operator]
    assert replies and set(replies) == {0}
    # Every reply has its record, in order, and the reload sits between two requests.
    records = _records(trail)
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    assert sum(r["event"] == "request" for r in records) == len(replies) + 3  # and lstat /, lstat, truncate


def test_a_refused_reload_in_the_worker_keeps_the_policy_and_is_recorded(
    export: Path, tmp_path: Path
) -> None:
    require_root()
    policy = tmp_path / "p.yaml"
    policy.write_text("version: 1\ntenant: t\ndefault: allow\nrules: []\n")
    trail = tmp_path / "trail.jsonl"
    with over_socketpair(SERVE, export, extra=["--policy", str(policy), "--audit-log", str(trail)]) as gw:
        gw.client.lstat(b"/")
        policy.write_text("version: 1\ndefault: allow\nrules:\n  - id: broken\n    effect: perhaps\n")
        os.kill(gw.proc.pid, signal.SIGHUP)
        # idle: the worker's SIGUSR2 wakes the loop, no request needed for the record to appear
        _wait_for(lambda: any(r["event"] == "policy-reload" for r in _records(trail)), "the refusal")
        assert gw.client.call(p.Truncate(b"/etc/passwd", 4)).errno == 0  # the old (allow) policy
        assert gw.stop() == 0
    reload = next(r for r in _records(trail) if r["event"] == "policy-reload")
    assert reload["result"] == "refused" and "effect" in str(reload["error"])


def test_the_worker_reports_every_outcome_in_order_and_wakes_its_main_thread() -> None:
    """In-process: outcomes queue up (none is lost when two reloads finish before the loop looks), a
    failing reader is an outcome too, and each one sends the wake signal to the thread named."""
    texts = iter(["version: 1\ndefault: allow\nrules: []\n", "version: 1\nrules: [1]\n"])
    woken = threading.Event()
    previous = signal.signal(signal.SIGUSR2, lambda *_: woken.set())
    try:
        worker = ReloadWorker(lambda: load_policy_text(next(texts), "<t>"))
        worker.request()
        _wait_for(lambda: woken.is_set() and not worker.busy, "the first outcome", 10)
        woken.clear()
        worker.request()
        _wait_for(lambda: woken.is_set() and not worker.busy, "the second outcome", 10)
        first, second = worker.take()
        assert first.policy is not None and first.error is None
        assert second.policy is None and isinstance(second.error, PolicyError)
        assert worker.take() == []
    finally:
        signal.signal(signal.SIGUSR2, previous)
