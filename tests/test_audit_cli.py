"""`gateway audit`: the command as cli.py will run it (add_arguments + run), end to end over files."""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gateway import protocol as p
from gateway.audit import AuditWriter
from gateway.audit import writer as writer_module
from gateway.audit_cli import add_arguments, run

ROOT = Path(__file__).resolve().parent.parent


def audit(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="gateway audit")
    add_arguments(parser)
    return run(parser.parse_args([str(a) for a in argv]))


def make_trail(path: Path, tenant: str = "guest-42") -> None:
    with AuditWriter.open(path, tenant=tenant, policy_hash="ab" * 32) as w:
        w.lifecycle("start", version="0.1.0")
        w.request(
            p.Open(b"/etc/shadow", os.O_RDWR),
            decision="deny",
            rule="system-read-only",
            reason="ro",
            result="EROFS",
            us=2,
        )
        w.request(
            p.Open(b"/etc/passwd", os.O_RDONLY),
            decision="allow",
            rule="read-anything",
            reason="",
            result="ok",
            us=1,
        )
        w.request(
            p.Mkdir(1000, 1000, b"/home/a/d", 0o755),
            decision="allow",
            rule="homes",
            reason="",
            result="ok",
            us=9,
        )
        w.request(
            p.Chmod(b"/home/a/tool", 0o4755),
            decision="would-deny",
            rule="no-setid-bits",
            reason="",
            result="ok",
            us=1,
        )
        w.lifecycle("stop")


@pytest.fixture
def trail(tmp_path: Path) -> Path:
    make_trail(tmp_path / "t.jsonl")
    return tmp_path / "t.jsonl"


def test_table_when_asked(trail: Path, capsys) -> None:
    assert audit(trail, "--format", "table") == 0
    out = capsys.readouterr().out
    for expected in ("/etc/shadow", "/etc/passwd", "/home/a/d", "deny", "would-deny", "• start", "• stop"):
        assert expected in out


def test_filters_with_json(trail: Path, capsys) -> None:
    assert audit(trail, "--decision", "deny,would-deny", "--format", "json") == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["path"] for r in records] == ["/etc/shadow", "/home/a/tool"]
    assert audit(trail, "--op", "write", "--path", "/etc/**", "--format", "json") == 0
    assert [json.loads(x)["seq"] for x in capsys.readouterr().out.splitlines()] == [2]
    assert audit(trail, "--uid", "1000", "--format", "json") == 0
    assert [json.loads(x)["op"] for x in capsys.readouterr().out.splitlines()] == ["mkdir"]
    assert audit(trail, "--event", "lifecycle", "--format", "json") == 0
    events = [json.loads(x)["event"] for x in capsys.readouterr().out.splitlines()]
    assert events == ["start", "stop", "checkpoint"]  # the final checkpoint, written at close


def test_csv(trail: Path, capsys) -> None:
    assert audit(trail, "--rule", "homes", "--format", "csv") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("seq,time,tenant,policy,event,op,path,") and lines[0].endswith(",prev,extra")
    assert len(lines) == 2 and ",mkdir,/home/a/d," in lines[1]


def test_summary(trail: Path, capsys) -> None:
    assert audit(trail, "--summary") == 0
    out = capsys.readouterr().out
    assert "7 records" in out and "Top denied paths" in out and "Timeline" in out
    assert "Top would-deny paths" in out  # apart from the denials: a would-deny was performed
    assert audit(trail, "--summary", "--format", "json", "--top", "1") == 0
    data = json.loads(capsys.readouterr().out)
    assert data["decisions"] == {"allow": 2, "deny": 1, "would-deny": 1}
    assert data["top_denied_paths"] == [{"path": "/etc/shadow", "count": 1}]
    assert data["top_would_deny_paths"] == [{"path": "/home/a/tool", "count": 1}]


def test_verify_exit_status(trail: Path, capsys) -> None:
    assert audit(trail, "--verify") == 0
    assert "trail intact" in capsys.readouterr().out
    lines = trail.read_bytes().split(b"\n")
    lines[2] = lines[2].replace(b"/etc/passwd", b"/etc/passwx")
    trail.write_bytes(b"\n".join(lines))
    assert audit(trail, "--verify") == 1
    out = capsys.readouterr().out
    assert "edited line" in out and f"{trail}:3" in out  # the edited line itself
    assert audit(trail, "--verify", "--format", "json") == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False and report["problems"][0]["line"] == 3


def test_usage_errors(trail: Path, tmp_path: Path, capsys) -> None:
    assert audit(trail, "--verify", "--decision", "deny") == 2
    assert audit(trail, "--op", "wirte") == 2
    assert "wirte" in capsys.readouterr().err
    assert audit(trail, "--since", "last tuesday") == 2
    assert audit(trail, "--key", "k") == 2  # verify's options only with --verify
    assert audit(trail, "--verify", "--key", tmp_path / "no-such-key") == 2
    assert audit(tmp_path / "missing.jsonl") == 2
    assert audit() == 2
    assert audit(trail, "--verify", "--summary") == 2


def test_default_trail_of_a_tenant_with_rotated_gzip_files(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(writer_module, "DEFAULT_DIR", str(tmp_path))
    path = Path(writer_module.default_audit_path("guest-7"))
    make_trail(path, "guest-7")
    with open(path, "rb") as src, gzip.open(str(path) + ".1.gz", "wb") as dst:
        dst.write(src.read())
    os.rename(path, str(path) + ".2")  # not a real rotation order: the trail is sorted by first seq
    make_trail(path, "guest-7")  # resumes seq from nothing: a new trail, so verify sees a break
    assert audit("--tenant", "guest-7", "--format", "json", "--decision", "deny") == 0
    assert len(capsys.readouterr().out.splitlines()) == 3


def test_unreadable_lines_are_skipped_with_a_warning(trail: Path, capsys) -> None:
    with open(trail, "ab") as f:
        f.write(b"garbage\n")
    assert audit(trail, "--format", "json") == 0
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 7
    assert "1 unreadable line skipped" in captured.err and f"{trail}:8" in captured.err


def test_follow_shows_the_last_records_then_new_ones_across_rotation(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    make_trail(path)
    code = "import sys; from tests.test_audit_cli import audit; sys.exit(audit(*sys.argv[1:]))"
    follower = subprocess.Popen(
        [
            sys.executable,
            "-c",
            code,
            str(path),
            "--follow",
            "-n",
            "2",
            "--format",
            "json",
            "--idle-exit",
            "3",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    time.sleep(1.0)
    w = AuditWriter.open(path, tenant="guest-42", policy_hash="ab" * 32)
    w.request(p.Lstat(b"/new/1"), decision="allow", rule="r", reason="", result="ok", us=1)
    time.sleep(0.5)
    os.rename(path, tmp_path / "t.jsonl.1")
    w.request(p.Lstat(b"/new/2"), decision="allow", rule="r", reason="", result="ok", us=1)  # old file
    w.reopen()
    w.request(p.Lstat(b"/new/3"), decision="allow", rule="r", reason="", result="ok", us=1)
    w.close()
    out, err = follower.communicate(timeout=60)
    assert follower.returncode == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    # 2 earlier (stop, the final checkpoint), then the new ones: the old file's closing checkpoint, the
    # reopen record, and the final checkpoint at close among them
    assert [r["seq"] for r in records] == list(range(6, 14))
    assert [r.get("path") or r["event"] for r in records[2:]] == [
        "/new/1", "/new/2", "checkpoint", "reopen", "/new/3", "checkpoint",
    ]


def test_stdin(trail: Path) -> None:
    code = "import sys; from tests.test_audit_cli import audit; sys.exit(audit(*sys.argv[1:]))"
    result = subprocess.run(
        [sys.executable, "-c", code, "-", "--verify"],
        cwd=ROOT,
        input=trail.read_bytes(),
        capture_output=True,
        timeout=60,
    )
    assert result.returncode == 0 and b"trail intact" in result.stdout
