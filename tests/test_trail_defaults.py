"""Defaults that don't collide: without --audit-log, each gateway's trail is its own (named after its
socket path, or its export with -f), and a trail another gateway holds is refused with the option to give."""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
from pathlib import Path

from helpers import ALLOW_ALL, require_root, wait_listening

from gateway import serve
from gateway.audit import writer

# The gateway with its default directory moved to a temporary one (DEFAULT_DIR is read at open time).
LAUNCH = (
    "import sys; from gateway.audit import writer; writer.DEFAULT_DIR = sys.argv[1]; "
    "from gateway import serve; raise SystemExit(serve.run(sys.argv[2:]))"
)


def opts(**kw: object) -> argparse.Namespace:
    return argparse.Namespace(**{"socket": None, "fd": -1, "path": "/srv/guests/g1", **kw})


def test_the_default_is_named_after_the_socket_or_the_export() -> None:
    a = writer.default_audit_path("default", serve.trail_channel(opts(socket="/run/gateway/g1.sock")))
    b = writer.default_audit_path("default", serve.trail_channel(opts(socket="/run/gateway/g2.sock")))
    c = writer.default_audit_path("default", serve.trail_channel(opts(fd=3)))
    d = writer.default_audit_path("default", serve.trail_channel(opts(fd=3, path="/srv/guests/g2")))
    assert a == "/var/log/gateway/default@run-gateway-g1.sock.jsonl"
    assert c == "/var/log/gateway/default@fd-srv-guests-g1.jsonl"
    assert len({a, b, c, d}) == 4
    assert writer.default_audit_path("guest-42") == "/var/log/gateway/guest-42.jsonl"  # no channel: as before


def start(
    tmp_path: Path, logs: Path, export: Path, *args: str, pass_fds: tuple[int, ...] = ()
) -> subprocess.Popen:
    cmd = [sys.executable, "-c", LAUNCH, str(logs), "-p", str(export), "-n", "--policy", ALLOW_ALL, *args]
    return subprocess.Popen(cmd, pass_fds=pass_fds, stderr=subprocess.PIPE, text=True)


def test_two_gateways_started_alike_get_two_trails_and_a_third_is_told_what_to_give(tmp_path: Path) -> None:
    require_root()
    logs = tmp_path / "log"
    export = tmp_path / "export"
    export.mkdir()
    running: list[subprocess.Popen] = []
    pairs = [socket.socketpair() for _ in range(3)]
    try:
        # two named sockets, same tenant, same export: two default trails
        for name in ("g1.sock", "g2.sock"):
            sock = tmp_path / name
            running.append(start(tmp_path, logs, export, "-s", str(sock), "-u", "0", "-g", "0"))
            wait_listening(str(sock))
        # an inherited fd: the export names its trail
        theirs = pairs[0][1]
        fd = theirs.fileno()
        running.append(start(tmp_path, logs, export, "-f", str(fd), pass_fds=(fd,)))
        deadline = time.monotonic() + 20
        names = ("g1.sock", "g2.sock", "export")
        dashed = {n: str(tmp_path / n).lstrip("/").replace("/", "-") for n in names}
        expected = {f"default@{dashed['g1.sock']}.jsonl", f"default@{dashed['g2.sock']}.jsonl"}
        expected.add(f"default@fd-{dashed['export']}.jsonl")
        while time.monotonic() < deadline and {p.name for p in logs.glob("*.jsonl")} != expected:
            time.sleep(0.1)
        assert {p.name for p in logs.glob("*.jsonl")} == expected
        assert all(p.poll() is None for p in running)

        # a second gateway on the same export over an fd: the same default, held by the first
        theirs = pairs[1][1]
        second = start(tmp_path, logs, export, "-f", str(theirs.fileno()), pass_fds=(theirs.fileno(),))
        _, err = second.communicate(timeout=30)
        assert second.returncode == 1
        assert "is in use by another process" in err and "--audit-log FILE, or another --tenant NAME" in err
        assert f"fd-{dashed['export']}" in err

        # the same explicit --audit-log twice: the option to change is --audit-log
        shared = tmp_path / "shared.jsonl"
        theirs = pairs[2][1]
        third = start(tmp_path, logs, export, "-f", str(theirs.fileno()), "--audit-log", str(shared),
                      pass_fds=(theirs.fileno(),))  # fmt: skip
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not shared.exists():
            time.sleep(0.1)
        _ours, fourth_end = socket.socketpair()
        fourth = start(tmp_path, logs, export, "-f", str(fourth_end.fileno()), "--audit-log", str(shared),
                       pass_fds=(fourth_end.fileno(),))  # fmt: skip
        _, err = fourth.communicate(timeout=30)
        running.append(third)
        assert fourth.returncode == 1
        assert "in use by another process: give this gateway a trail of its own with --audit-log FILE" in err
        assert "--tenant" not in err
    finally:
        for proc in running:
            proc.terminate()
            proc.wait(10)
        for a, b in pairs:
            a.close()
            b.close()
