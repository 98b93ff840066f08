"""The pipeline end to end with a real gateway: policies enforced (the file untouched, the errno in the
reply), the trail written before each reply (kill -9 mid-load), rotation on SIGUSR1, reload on SIGHUP,
and `gateway check --replay` over a trail the gateway itself wrote."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import ROOT, over_socketpair, require_root

from gateway import protocol as p
from gateway.client import ProtocolClosed

SERVE = [sys.executable, "-m", "gateway", "serve"]
BASELINE = str(ROOT / "policies" / "baseline.yaml")


@pytest.fixture
def export(tmp_path: Path) -> Path:
    root = tmp_path / "export"
    (root / "home" / "alice").mkdir(parents=True)
    (root / "etc").mkdir()
    (root / "etc" / "passwd").write_text("root:x:0:0\n")
    (root / "home" / "alice" / "script").write_text("#!/bin/sh\n")
    os.chmod(root / "home" / "alice" / "script", 0o755)
    os.symlink("/etc", root / "home" / "alice" / "etc-link")
    return root


def _records(trail: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in trail.read_text().splitlines() if line.strip()]


def _serve(export: Path, trail: Path, *extra: str) -> object:
    return over_socketpair(SERVE, export, extra=["--audit-log", str(trail), *extra])


POLICY = """\
version: 1
tenant: t1
default: allow
rules:
  - id: etc-read-only
    effect: deny
    ops: [write]
    paths: ["/etc/**"]
    errno: EROFS
  - id: no-setid
    effect: deny
    ops: [chmod, CREATE, mkdir, mknod]
    when: {mode_any: [setuid, setgid]}
    errno: EPERM
  - id: no-devices
    effect: deny
    ops: [mknod]
    when: {type: [chr, blk]}
    errno: EPERM
"""


def test_denied_requests_are_not_performed_and_carry_the_rules_errno(export: Path, tmp_path: Path) -> None:
    require_root()
    policy = tmp_path / "p.yaml"
    policy.write_text(POLICY)
    trail = tmp_path / "trail.jsonl"
    before = (export / "etc" / "passwd").read_bytes(), os.stat(export / "etc" / "passwd").st_mtime_ns
    with _serve(export, trail, "--policy", str(policy)) as gw:
        c = gw.client
        assert c.call(p.Open(b"/etc/passwd", os.O_RDWR | os.O_TRUNC)).errno == errno.EROFS
        assert c.call(p.Truncate(b"/etc/passwd", 0)).errno == errno.EROFS
        assert c.call(p.Chmod(b"/home/alice/script", 0o4755)).errno == errno.EPERM
        assert (
            c.call(p.Mknod(0, 0, b"/home/alice/sda", stat.S_IFBLK | 0o600, os.makedev(8, 0))).errno
            == errno.EPERM
        )
        # The lexical path is in /home, the real one in /etc: decided on what it would touch.
        assert c.call(p.Open(b"/home/alice/etc-link/passwd", os.O_WRONLY)).errno == errno.EROFS
        assert c.call(p.Rename(b"/etc/passwd", b"/home/alice/stolen")).errno == errno.EROFS
        # What is allowed still works, reads of /etc included.
        fd = c.open(b"/etc/passwd", os.O_RDONLY)
        assert os.read(fd, 100) == b"root:x:0:0\n"
        os.close(fd)
        c.chmod(b"/home/alice/script", 0o750)
    assert (
        (export / "etc" / "passwd").read_bytes(),
        os.stat(export / "etc" / "passwd").st_mtime_ns,
    ) == before
    assert stat.S_IMODE(os.stat(export / "home" / "alice" / "script").st_mode) == 0o750
    assert (
        not (export / "home" / "alice" / "sda").exists()
        and not (export / "home" / "alice" / "stolen").exists()
    )
    requests = [r for r in _records(trail) if r["event"] == "request"]
    denied = [(r["op"], r["rule"], r["result"]) for r in requests if r["decision"] == "deny"]
    assert denied == [
        ("open", "etc-read-only", "EROFS"),
        ("truncate", "etc-read-only", "EROFS"),
        ("chmod", "no-setid", "EPERM"),
        ("mknod", "no-devices", "EPERM"),
        ("open", "etc-read-only", "EROFS"),
        ("rename", "etc-read-only", "EROFS"),
    ]
    resolved = [r for r in requests if r.get("resolved")]
    assert resolved and resolved[0]["path"] == "/home/alice/etc-link/passwd"
    assert resolved[0]["resolved"] == "/etc/passwd"


def test_permissive_records_would_deny_and_performs(export: Path, tmp_path: Path) -> None:
    require_root()
    policy = tmp_path / "p.yaml"
    policy.write_text(
        POLICY.replace("default: allow", "default: allow\nenforcement: permissive").replace(
            "    errno: EPERM\n  - id: no-devices",
            "    errno: EPERM\n    enforce: always\n  - id: no-devices",
        )
    )
    trail = tmp_path / "trail.jsonl"
    with _serve(export, trail, "--policy", str(policy)) as gw:
        gw.client.truncate(b"/etc/passwd", 4)  # would-deny: performed
        assert gw.client.call(p.Chmod(b"/home/alice/script", 0o4755)).errno == errno.EPERM  # always
    assert (export / "etc" / "passwd").read_bytes() == b"root"
    decisions = [(r["op"], r["decision"]) for r in _records(trail) if r["event"] == "request"]
    assert decisions == [("truncate", "would-deny"), ("chmod", "deny")]


def test_an_invalid_policy_is_never_served(export: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\ndefault: allow\nrules:\n  - id: x\n    effect: deny\n    ops: [wirte]\n")
    ours, theirs = socket.socketpair()
    out = subprocess.run(
        [
            *SERVE,
            "-p",
            str(export),
            "-f",
            str(theirs.fileno()),
            "-n",
            "--policy",
            str(bad),
            "--audit-log",
            str(tmp_path / "t"),
        ],
        pass_fds=[theirs.fileno()],
        capture_output=True,
        text=True,
        timeout=30,
    )
    theirs.close()
    assert out.returncode == 1
    assert (
        "bad.yaml:6: rules[0].ops" in out.stderr
        and "wirte" in out.stderr
        and "did you mean 'write'" in out.stderr
    )
    ours.settimeout(2)
    assert ours.recv(10) == b""  # nothing served: the connection is closed unanswered
    ours.close()


def test_kill_9_mid_load_every_reply_has_its_record(export: Path, tmp_path: Path) -> None:
    """A killed gateway never has sent a reply that the trail lacks."""
    require_root()
    trail = tmp_path / "trail.jsonl"
    replied: list[tuple[str, int]] = []
    with _serve(export, trail) as gw:
        gw.client.lstat(b"/")
        stop = threading.Event()

        def load() -> None:
            i = 0
            try:
                while not stop.is_set():
                    name = f"/home/alice/f{i}".encode()
                    gw.client.call(p.Mkdir(1000, 1000, name, 0o755))
                    replied.append(("mkdir", i))
                    gw.client.call(p.Lstat(name))
                    replied.append(("lstat", i))
                    i += 1
            except (ProtocolClosed, OSError):
                return

        worker = threading.Thread(target=load)
        worker.start()
        time.sleep(0.7)
        os.kill(gw.proc.pid, signal.SIGKILL)
        worker.join(10)
        stop.set()
    assert len(replied) > 20
    recorded = [(r["op"], r["path"]) for r in _records(trail) if r.get("event") == "request"]
    for op, i in replied:
        assert (op, f"/home/alice/f{i}") in recorded
    # The chain is whole; a killed gateway wrote no final checkpoint, which --verify reports as it would
    # a cut (it cannot tell one from the other) and --live (a crashed or running writer) accepts.
    out = subprocess.run(
        [sys.executable, "-m", "gateway", "audit", "--verify", "--live", str(trail)], capture_output=True,
        text=True,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    out = subprocess.run(
        [sys.executable, "-m", "gateway", "audit", "--verify", str(trail)], capture_output=True, text=True
    )
    assert out.returncode == 1 and "unsealed tail" in out.stdout, out.stdout + out.stderr


def test_a_torn_last_line_is_reported_as_such(export: Path, tmp_path: Path) -> None:
    require_root()
    trail = tmp_path / "trail.jsonl"
    with _serve(export, trail) as gw:
        gw.client.lstat(b"/")
    data = trail.read_bytes()
    trail.write_bytes(data[:-30])  # as if killed inside the last write
    out = subprocess.run(
        [sys.executable, "-m", "gateway", "audit", "--verify", str(trail)], capture_output=True, text=True
    )
    assert out.returncode == 1
    lines = data.count(b"\n")
    assert "truncated last line" in out.stdout + out.stderr and f":{lines}" in out.stdout + out.stderr


def test_sigusr1_rotation_keeps_the_chain(export: Path, tmp_path: Path) -> None:
    require_root()
    trail = tmp_path / "trail.jsonl"
    with _serve(export, trail) as gw:
        gw.client.lstat(b"/")
        trail.rename(tmp_path / "trail.jsonl.1")  # what logrotate does
        os.kill(gw.proc.pid, signal.SIGUSR1)
        time.sleep(0.3)
        gw.client.lstat(b"/etc")
    old, new = _records(tmp_path / "trail.jsonl.1"), _records(trail)
    assert new[0]["event"] == "reopen" and new[0]["rotated"] is True
    assert any(r.get("path") == "/etc" for r in new)
    out = subprocess.run(
        [sys.executable, "-m", "gateway", "audit", "--verify", str(tmp_path / "trail.jsonl.1"), str(trail)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert old[-1]["seq"] + 1 == new[0]["seq"]


def test_sighup_reload_swaps_valid_and_refuses_invalid(export: Path, tmp_path: Path) -> None:
    require_root()
    policy = tmp_path / "p.yaml"
    policy.write_text("version: 1\ntenant: t\ndefault: allow\nrules: []\n")
    trail = tmp_path / "trail.jsonl"
    with _serve(export, trail, "--policy", str(policy)) as gw:
        c = gw.client
        c.truncate(b"/etc/passwd", 8)
        policy.write_text(POLICY)  # now /etc is read-only
        os.kill(gw.proc.pid, signal.SIGHUP)
        time.sleep(0.5)
        assert c.call(p.Truncate(b"/etc/passwd", 4)).errno == errno.EROFS
        policy.write_text("version: 1\ndefault: allow\nrules:\n  - id: broken\n    effect: perhaps\n")
        os.kill(gw.proc.pid, signal.SIGHUP)
        time.sleep(0.5)
        assert c.call(p.Truncate(b"/etc/passwd", 4)).errno == errno.EROFS  # the old one still in force
        assert c.lstat(b"/etc/passwd").size == 8
    reloads = [r for r in _records(trail) if r["event"] == "policy-reload"]
    assert [r["result"] for r in reloads] == ["ok", "refused"]
    assert reloads[0]["old"] != reloads[0]["new"]
    assert "effect" in str(reloads[1]["error"]) and reloads[1]["kept"] == reloads[0]["new"]


def test_replay_of_a_trail_the_gateway_wrote(export: Path, tmp_path: Path) -> None:
    require_root()
    trail = tmp_path / "trail.jsonl"
    with _serve(export, trail, "--policy", BASELINE) as gw:  # baseline: /etc writable
        gw.client.truncate(b"/etc/passwd", 4)
        gw.client.lstat(b"/etc/passwd")
        gw.client.chmod(b"/home/alice/script", 0o700)
    stricter = tmp_path / "strict.yaml"
    stricter.write_text(POLICY)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway",
            "check",
            str(stricter),
            "--replay",
            str(trail),
            "--format",
            "json",
            "--fail-on-change",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1, out.stdout + out.stderr
    report = json.loads(out.stdout)
    text = json.dumps(report)
    assert "etc-read-only" in text and "truncate" in text
    same = subprocess.run(
        [sys.executable, "-m", "gateway", "check", BASELINE, "--replay", str(trail), "--fail-on-change"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert same.returncode == 0, same.stdout + same.stderr


def test_protocol_errors_are_recorded(export: Path, tmp_path: Path) -> None:
    require_root()
    trail = tmp_path / "trail.jsonl"
    with _serve(export, trail) as gw:
        gw.client.send_raw(p.HEADER.pack(p.RequestType.LSTAT, 0))
        assert gw.client.read_reply(p.RequestType.LSTAT).errno == errno.ENOBUFS
        gw.client.send_raw(p.HEADER.pack(77, 0))
        assert gw.client.read_reply(77).errno == errno.EOPNOTSUPP
    events = [r["event"] for r in _records(trail)]
    assert events.count("protocol-error") == 2
    assert events[0] == "start" and events[-3:] == ["client-gone", "stop", "checkpoint"]


def test_reload_under_load_loses_no_request(export: Path, tmp_path: Path) -> None:
    """SIGHUPs land while a client keeps requests flowing: every request gets its reply, in order, and
    each reload is swapped in between two requests (its record sits between two request records)."""
    require_root()
    policy = tmp_path / "p.yaml"
    policy.write_text("version: 1\ntenant: t\ndefault: allow\nrules: []\n")
    trail = tmp_path / "trail.jsonl"
    with _serve(export, trail, "--policy", str(policy)) as gw:
        gw.client.lstat(b"/")  # serving: its handlers are in place (before, SIGHUP is ignored or fatal)
        replies: list[int] = []
        done = threading.Event()

        def hammer() -> None:
            for i in range(3000):
                replies.append(gw.client.call(p.Lstat(f"/etc/passwd{'' if i % 2 else '/'}".encode())).errno)
            done.set()

        worker = threading.Thread(target=hammer)
        worker.start()
        sent = 0
        while not done.is_set() and sent < 20:
            os.kill(gw.proc.pid, signal.SIGHUP)
            sent += 1
            time.sleep(0.02)
        worker.join(60)
    assert len(replies) == 3000
    assert replies[1::2] == [0] * 1500 and replies[0::2] == [errno.ENOTDIR] * 1500  # answered in order
    records = _records(trail)
    reloads = [r for r in records if r["event"] == "policy-reload"]
    assert reloads and all(r["result"] == "ok" for r in reloads)
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    assert sum(r["event"] == "request" for r in records) == 3001


def test_console_shows_each_decision_and_exits_cleanly_under_the_filter(export: Path, tmp_path: Path) -> None:
    require_root()
    ours, theirs = socket.socketpair()
    proc = subprocess.Popen(
        [
            *SERVE,
            "-p",
            str(export),
            "-f",
            str(theirs.fileno()),
            "-n",
            "--console",
            "--audit-log",
            str(tmp_path / "t"),
        ],
        pass_fds=[theirs.fileno()],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    theirs.close()
    from gateway.client import Client

    c = Client(ours)
    c.lstat(b"/etc/passwd")
    assert c.call(p.Mknod(0, 0, b"/sda", stat.S_IFBLK | 0o600, 2048)).errno == errno.EPERM
    c.close()
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err.decode()  # not killed by seccomp on the way out
    text = out.decode()
    assert "lstat" in text and "/etc/passwd" in text
    assert "deny" in text and "no-device-nodes" in text and "/sda" in text


def test_audit_syslog_copies_reach_dev_log_under_the_filter(export: Path, tmp_path: Path) -> None:
    """--audit-syslog: the socket is connected before the sandbox and written after it (sendto only)."""
    require_root()
    ours_listener = None
    if not os.path.exists("/dev/log"):  # no syslog daemon here: stand in for one
        ours_listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        ours_listener.bind("/dev/log")
        ours_listener.settimeout(5)
    try:
        trail = tmp_path / "trail.jsonl"
        with _serve(export, trail, "--audit-syslog") as gw:
            gw.client.lstat(b"/etc/passwd")
            assert gw.client.call(p.Mknod(0, 0, b"/sda", stat.S_IFBLK | 0o600, 2048)).errno == errno.EPERM
        assert gw.proc.returncode == 0
        notes = json.dumps(_records(trail)[0])
        assert "unavailable" not in notes
        if ours_listener is not None:
            messages = []
            while True:
                try:
                    messages.append(ours_listener.recv(65536).decode())
                except TimeoutError:
                    break
                if any('decision="deny"' in m for m in messages) and any(" stop " in m for m in messages):
                    break
            deny = next(m for m in messages if 'decision="deny"' in m)
            assert deny.startswith("<") and "[gateway@32473 " in deny and 'rule="no-device-nodes"' in deny
            assert '"op":"mknod"' in deny  # the record itself is the message
    finally:
        if ours_listener is not None:
            ours_listener.close()
            os.unlink("/dev/log")


@pytest.mark.parametrize("target", ["/etc/planted", "../../etc/planted", "chain"])
def test_create_through_a_dangling_symlink_is_decided_where_it_lands(
    export: Path, tmp_path: Path, target: str
) -> None:
    """O_CREAT without O_EXCL follows a dangling final symlink (as open(2) does, beneath the export): the
    rules must decide on the file it would create, not on the link's own path in an allowed tree."""
    require_root()
    policy = tmp_path / "p.yaml"
    policy.write_text(POLICY)
    home = export / "home" / "alice"
    if target == "chain":  # a link to a link to a dangling target
        os.symlink("/etc/planted", home / "hop")
        os.symlink("hop", home / "x")
    else:
        os.symlink(target, home / "x")
    with _serve(export, tmp_path / "t.jsonl", "--policy", str(policy)) as gw:
        for request in (
            p.Create(b"/home/alice/x", os.O_CREAT | os.O_WRONLY, 0o644, 1000, 1000),
            p.Open(b"/home/alice/x", os.O_CREAT | os.O_WRONLY),
        ):
            reply = gw.client.call(request)
            assert reply.errno == errno.EROFS, reply
        assert not (export / "etc" / "planted").exists()
        # Where the link leads somewhere allowed, the same request goes through.
        os.unlink(home / "x")
        os.symlink("notes", home / "x")
        fd = gw.client.create(b"/home/alice/x", os.O_CREAT | os.O_WRONLY, 0o644, 1000, 1000)
        os.close(fd)
        assert (home / "notes").exists()
