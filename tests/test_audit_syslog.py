"""--audit-syslog: RFC 5424 datagrams to a local socket, checked against a socket bound by the test."""

from __future__ import annotations

import json
import os
import re
import socket
from pathlib import Path

import pytest

from gateway import protocol as p
from gateway.audit import AuditWriter
from gateway.audit.syslog import format_message, sd_escape

RFC5424 = re.compile(
    rb"<(?P<pri>\d{1,3})>1 (?P<time>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z) (?P<host>[!-~]+) gateway "
    rb'(?P<pid>\d+) (?P<msgid>[!-~]{1,32}) (?P<sd>\[gateway@32473(?: [a-z]+="(?:[^"\\\]]|\\["\\\]])*")*\]) '
    rb"(?P<msg>\{.*\})\Z"
)


@pytest.fixture
def log_socket(tmp_path: Path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "log"))
    sock.settimeout(2)
    yield sock
    sock.close()


def test_each_record_goes_to_syslog_as_rfc5424(tmp_path: Path, log_socket: socket.socket) -> None:
    path = tmp_path / "t.jsonl"
    with AuditWriter.open(path, tenant="guest-42", policy_hash="ab" * 32, syslog=str(tmp_path / "log")) as w:
        w.lifecycle("start", version="0.1.0")
        w.request(
            p.Open(b"/etc/shadow", os.O_RDWR),
            decision="deny",
            rule="system-read-only",
            reason="ro",
            result="EROFS",
            us=2.0,
        )
        w.request(p.Lstat(b"/"), decision="allow", rule=None, reason="default", result="ok", us=1.0)
    lines = path.read_bytes().split(b"\n")[:-1]
    messages = [log_socket.recv(65536) for _ in range(4)]
    parsed = [RFC5424.match(m) for m in messages]
    assert all(parsed), messages
    start, deny, allow, checkpoint = parsed
    # the checkpoints go off the host too: a copy that shows where the local trail ends
    assert checkpoint["msgid"] == b"checkpoint" and json.loads(checkpoint["msg"])["final"] is True
    assert int(start["pri"]) == 10 * 8 + 6 and start["msgid"] == b"start"  # authpriv.info
    assert start["sd"] == b'[gateway@32473 seq="1" tenant="guest-42"]'
    assert int(deny["pri"]) == 10 * 8 + 5 and deny["msgid"] == b"request"  # authpriv.notice for a denial
    assert (
        deny["sd"]
        == b'[gateway@32473 seq="2" tenant="guest-42" decision="deny" op="open" rule="system-read-only"]'
    )
    assert allow["sd"] == b'[gateway@32473 seq="3" tenant="guest-42" decision="allow" op="lstat"]'  # no rule
    assert [m["msg"] for m in parsed] == lines  # the JSON message is the trail's line, byte for byte
    assert deny["time"].decode() == json.loads(lines[1])["time"]
    assert int(deny["pid"]) == os.getpid() and deny["host"] == socket.gethostname().encode()


def test_structured_data_values_are_escaped() -> None:
    assert sd_escape('a"b]c\\d') == 'a\\"b\\]c\\\\d'
    message = format_message(
        time="2026-11-22T07:41:29.000000Z",
        event="request",
        seq=7,
        tenant='t"]',
        decision="deny",
        op="open",
        rule="r]1",
        message=b"{}",
        hostname="h o\tst",
        pid=1,
    )
    assert message == (
        b"<85>1 2026-11-22T07:41:29.000000Z host gateway 1 request "
        b'[gateway@32473 seq="7" tenant="t\\"\\]" decision="deny" op="open" rule="r\\]1"] {}'
    )
    assert RFC5424.match(message)


def test_a_missing_syslog_socket_is_reported_not_fatal(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    with AuditWriter.open(path, tenant="t", policy_hash="00", syslog=str(tmp_path / "nope")) as w:
        w.lifecycle("start")
        w.request(p.Lstat(b"/"), decision="allow", rule=None, reason="", result="ok", us=1)
    start = json.loads(path.read_bytes().split(b"\n")[0])
    assert any("syslog" in note and "unavailable" in note for note in start["audit_notes"])


def test_a_full_syslog_queue_drops_instead_of_blocking(tmp_path: Path, log_socket: socket.socket) -> None:
    log_socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # and nobody reads it
    with AuditWriter.open(
        tmp_path / "t.jsonl", tenant="t", policy_hash="00", syslog=str(tmp_path / "log")
    ) as w:
        for _ in range(2000):
            w.request(p.Lstat(b"/x"), decision="allow", rule=None, reason="", result="ok", us=1)
        assert w.syslog_dropped > 0
        assert w.seq == 2003  # every record is in the file all the same (and two checkpoints)
        dropped = w.syslog_dropped
        w.lifecycle("stop")
    stop = json.loads((tmp_path / "t.jsonl").read_bytes().split(b"\n")[-3])  # before the final checkpoint
    assert stop["audit_dropped"] == {"syslog": dropped}


def test_syslog_never_reconnects_after_the_daemon_restarts(tmp_path: Path) -> None:
    """connect() is outside the seccomp allowlist: a restarted daemon costs copies (counted), never the
    process, and the trail itself keeps every record."""
    address = str(tmp_path / "log")
    first = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    first.bind(address)
    w = AuditWriter.open(tmp_path / "t.jsonl", tenant="t", policy_hash="00", syslog=address)
    w.lifecycle("start")
    assert first.recv(65536)
    first.close()
    os.unlink(address)
    second = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    second.bind(address)
    second.settimeout(0.5)
    w.lifecycle("stop")
    with pytest.raises(TimeoutError):
        second.recv(65536)
    assert w.syslog_dropped == 1
    w.close()
    second.close()
    lines = (tmp_path / "t.jsonl").read_text().splitlines()
    assert [json.loads(line)["event"] for line in lines] == ["start", "stop", "checkpoint"]
