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


def gateway_audit(*argv: str | Path, **kw) -> subprocess.CompletedProcess[str]:
    """The real command, its stdout a pipe (as under grep)."""
    return subprocess.run([sys.executable, "-m", "gateway", "audit", *map(str, argv)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, **kw)  # fmt: skip


def test_piped_output_is_one_greppable_line_per_record(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    long_dir = "/home/alice/" + "a-rather-long-directory-name/" * 6
    with AuditWriter.open(path, tenant="guest-42", policy_hash="ab" * 32) as w:
        w.lifecycle("start", version="0.1.0")
        for i in range(30):
            w.request(p.Lstat(f"{long_dir}f{i}".encode()), decision="allow", rule="r", reason="a b",
                      result="ok", us=1)  # fmt: skip
        w.request(p.Lstat(b"/home/alice/notes.txt"), decision="deny", rule="r", reason="", result="EACCES",
                  us=1)  # fmt: skip
        w.request(p.Lstat(b"/evil\n\x1b[31mname"), decision="deny", rule="r", reason="", result="EACCES",
                  us=1)  # fmt: skip
    out = gateway_audit(path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == len(path.read_bytes().splitlines())  # one line per record, no header, no wrap
    assert sum("/home/alice/notes.txt" in line for line in lines) == 1
    notes = next(line for line in lines if "notes.txt" in line)
    for field in ("seq=32 ", "tenant=guest-42", "event=request", "op=lstat", "decision=deny", "result=EACCES",
                  "prev="):  # fmt: skip
        assert field in notes, field
    assert all(f"{long_dir}f{i}" in out.stdout for i in range(30))  # paths whole, never cut
    assert 'reason="a b"' in lines[1]
    evil = next(line for line in lines if "evil" in line)
    assert "\x1b" not in out.stdout and "\\n" in evil and "\\x1b" in evil  # a name cannot drive the terminal
    grep = subprocess.run(f"{sys.executable} -m gateway audit {path} | grep -c /home/alice/notes.txt",
                          shell=True, cwd=ROOT, capture_output=True, text=True)  # fmt: skip
    assert grep.stdout.strip() == "1"


def test_no_match_says_so_and_exits_1(trail: Path) -> None:
    for view in ([], ["--format", "json"], ["--format", "csv"], ["--summary"], ["--by", "uid"],
                 ["--last", "3"], ["--reverse"]):  # fmt: skip
        out = gateway_audit(trail, "--path", "/nowhere/**", *view)
        assert out.returncode == 1 and out.stderr.strip() == "<no matches>" and out.stdout == "", view


def test_reverse_and_last(trail: Path, capsys) -> None:
    assert audit(trail, "--reverse", "--format", "json") == 0
    seqs = [json.loads(x)["seq"] for x in capsys.readouterr().out.splitlines()]
    assert seqs == list(range(7, 0, -1))
    assert audit(trail, "--last", "3", "--format", "json") == 0
    assert [json.loads(x)["seq"] for x in capsys.readouterr().out.splitlines()] == [5, 6, 7]
    assert audit(trail, "--last", "2", "--reverse", "--decision", "allow,would-deny", "--format", "json") == 0
    assert [json.loads(x)["path"] for x in capsys.readouterr().out.splitlines()] == [
        "/home/a/tool", "/home/a/d",
    ]  # fmt: skip


def test_focused_reports(trail: Path, capsys) -> None:
    assert audit(trail, "--by", "rule", "--format", "csv") == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[0] == "rule,count,allow,deny,would-deny,errors"
    assert "system-read-only,1,0,1,0,1" in rows and "no-setid-bits,1,0,0,1,0" in rows
    assert audit(trail, "--by", "path", "--failed") == 0  # piped: one key=value line per path
    lines = capsys.readouterr().out.splitlines()
    assert sorted(lines) == [
        "path=/etc/shadow count=1 allow=0 deny=1 would-deny=0 errors=1",
        "path=/home/a/tool count=1 allow=0 deny=0 would-deny=1 errors=0",
    ]
    assert audit(trail, "--by", "uid", "--format", "json") == 0
    by_uid = {json.loads(x)["uid"]: json.loads(x)["count"] for x in capsys.readouterr().out.splitlines()}
    assert by_uid == {"1000": 1, "-": 3}


def test_summary_as_csv_keeps_deny_and_would_deny_apart(trail: Path, capsys) -> None:
    assert audit(trail, "--summary", "--format", "csv") == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[0] == "section,key,allow,deny,would-deny,other,count"
    assert "requests,,2,1,1,0,4" in rows
    assert "denied-path,/etc/shadow,,1,,,1" in rows and "would-deny-path,/home/a/tool,,,1,,1" in rows
    assert any(r.startswith("timeline-") for r in rows)


def test_quitting_the_pager_exits_0(trail: Path, tmp_path: Path) -> None:
    """On a terminal the table goes through $PAGER; a pager that quits at once (q) is not an error."""
    import pty

    big = tmp_path / "big.jsonl"
    with AuditWriter.open(big, tenant="t", policy_hash="ab") as w:
        for i in range(3000):
            w.request(p.Lstat(f"/f/{i}".encode()), decision="allow", rule="r", reason="", result="ok", us=1)
    for pager, wanted in (("true", 0), ("cat", 0)):
        pid, fd = pty.fork()
        if pid == 0:  # the child: stdout is the pty's terminal
            os.environ["PAGER"] = pager
            os.chdir(ROOT)
            os.execv(sys.executable, [sys.executable, "-m", "gateway", "audit", str(big)])
        shown = b""
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            shown += chunk
        _, status = os.waitpid(pid, 0)
        os.close(fd)
        assert os.waitstatus_to_exitcode(status) == wanted, (pager, shown[-500:])
        if pager == "cat":
            assert b"/f/2999" in shown and b"time (UTC)" in shown  # the table, on a terminal


def test_keygen_and_checkpoints_commands(tmp_path: Path) -> None:
    out = gateway_audit("keygen", tmp_path / "s.key", tmp_path / "v.key")
    assert out.returncode == 0 and "OFF this host" in out.stdout, out.stderr
    assert gateway_audit("keygen", tmp_path / "s.key", tmp_path / "v2.key").returncode == 2  # no overwrite
    assert gateway_audit("keygen", tmp_path / "only-one").returncode == 2
    from gateway.audit.seal import SealKey

    path = tmp_path / "t.jsonl"
    with AuditWriter.open(path, tenant="t", policy_hash="ab", seal=SealKey.open(tmp_path / "s.key"),
                          checkpoint_every=2) as w:  # fmt: skip
        for _ in range(5):
            w.request(p.Lstat(b"/x"), decision="allow", rule=None, reason="", result="ok", us=1)
    listed = gateway_audit("checkpoints", path)
    cps = [json.loads(x) for x in listed.stdout.splitlines()]
    assert listed.returncode == 0 and [c["epoch"] for c in cps] == [0, 1, 2]
    assert listed.stdout.encode() == b"".join(
        x + b"\n" for x in path.read_bytes().splitlines() if b'"event":"checkpoint"' in x
    )  # byte for byte
    ok = gateway_audit(path, "--verify", "--key", tmp_path / "v.key")
    assert ok.returncode == 0 and "trail intact and sealed" in ok.stdout, ok.stdout
    as_json = gateway_audit(path, "--verify", "--key", tmp_path / "v.key", "--format", "json")
    report = json.loads(as_json.stdout)
    assert report["keyed"] and report["seals_valid"] == 3 and report["cannot_rule_out"]
    last = f"{report['last_seq']}:{report['last_hash']}"
    assert gateway_audit(path, "--verify", "--key", tmp_path / "v.key", "--expect-last", last).returncode == 0
    bad = gateway_audit(path, "--verify", "--expect-last", f"{report['last_seq'] + 5}:{'0' * 64}")
    assert bad.returncode == 1 and "cut short" in bad.stdout
    assert gateway_audit(path, "--verify", "--expect-last", "12:xyz").returncode == 2
    copy = tmp_path / "copy"
    copy.write_text(listed.stdout)
    assert gateway_audit(path, "--verify", "--checkpoints", copy).returncode == 0
