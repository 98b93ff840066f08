"""--console: the writer feeds a non-blocking pipe; a separate renderer process draws the lines."""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

from gateway import protocol as p
from gateway.audit import AuditWriter
from gateway.audit.console import start_console_renderer, wait_console_renderer
from gateway.audit.writer import PIPE_BUF


def pipe(size: int | None = None) -> tuple[int, int]:
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    if size is not None:
        fcntl.fcntl(write_end, 1031, size)  # F_SETPIPE_SZ
    os.set_blocking(write_end, False)
    return read_end, write_end


def drain(fd: int) -> bytes:
    os.set_blocking(fd, False)
    out = b""
    try:
        while chunk := os.read(fd, 1 << 16):
            out += chunk
    except BlockingIOError:
        pass
    return out


def deny(w: AuditWriter, path: bytes = b"/etc/shadow") -> None:
    w.request(
        p.Open(path, os.O_RDWR), decision="deny", rule="system-read-only", reason="ro", result="EROFS", us=2
    )


def test_the_console_gets_each_line(tmp_path: Path) -> None:
    read_end, write_end = pipe()
    with AuditWriter.open(tmp_path / "t.jsonl", tenant="t", policy_hash="00", console=write_end) as w:
        w.lifecycle("start")
        deny(w)
    lines = (tmp_path / "t.jsonl").read_bytes().splitlines(keepends=True)
    assert drain(read_end) == b"".join(lines[:-1])  # every line but the checkpoint: decisions only
    assert os.read(read_end, 1) == b""  # close() closed the pipe: the renderer sees EOF
    os.close(read_end)


def test_a_full_pipe_drops_and_counts_without_blocking(tmp_path: Path) -> None:
    read_end, write_end = pipe(4096)
    with AuditWriter.open(tmp_path / "t.jsonl", tenant="t", policy_hash="00", console=write_end) as w:
        for _ in range(100):
            deny(w)
        dropped = w.console_dropped
        assert dropped > 0 and w.seq == 101  # the trail has every record
        first = drain(read_end).split(b"\n")[:-1]
        deny(w)
        after = drain(read_end).split(b"\n")[:-1]
    assert len(first) + dropped == 100
    assert json.loads(after[0]) == {"dropped": dropped} and json.loads(after[1])["seq"] == 101
    os.close(read_end)


def test_long_records_are_trimmed_to_one_atomic_pipe_write(tmp_path: Path) -> None:
    read_end, write_end = pipe()
    with AuditWriter.open(tmp_path / "t.jsonl", tenant="t", policy_hash="00", console=write_end) as w:
        deny(w, b"/" + b"x" * 3000 + b"/" + b"y" * 3000)
    line = drain(read_end)
    assert line.endswith(b"\n") and len(line) <= PIPE_BUF
    record = json.loads(line)
    assert record["decision"] == "deny" and record["path"].endswith("…") and len(record["path"]) < 300
    assert len((tmp_path / "t.jsonl").read_bytes()) > 6000  # the trail keeps the whole path
    os.close(read_end)


def test_a_gone_renderer_stops_the_console_not_the_trail(tmp_path: Path) -> None:
    read_end, write_end = pipe()
    os.close(read_end)
    with AuditWriter.open(tmp_path / "t.jsonl", tenant="t", policy_hash="00", console=write_end) as w:
        deny(w)
        deny(w)
    lines = (tmp_path / "t.jsonl").read_bytes().split(b"\n")[:-1]
    assert len(lines) == 3 and "console renderer gone" in json.loads(lines[1])["audit_notes"][0]


def test_the_renderer_process_draws_each_decision(tmp_path: Path) -> None:
    out = os.open(tmp_path / "console.txt", os.O_WRONLY | os.O_CREAT, 0o600)
    fd = start_console_renderer(output=out)
    os.close(out)
    assert not os.get_blocking(fd) and fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    with AuditWriter.open(tmp_path / "t.jsonl", tenant="t", policy_hash="00", console=fd) as w:
        w.lifecycle("start", version="0.1.0")
        deny(w)
        w.request(
            p.Mkdir(1000, 1000, b"/home/a/d", 0o755),
            decision="allow",
            rule="homes",
            reason="",
            result="ok",
            us=5,
        )
        w.lifecycle("stop")
    assert wait_console_renderer(fd, timeout=30) == 0
    lines = (tmp_path / "console.txt").read_text().splitlines()
    assert len(lines) == 4
    assert "start" in lines[0] and "version=0.1.0" in lines[0]
    assert " deny " in lines[1] and "/etc/shadow" in lines[1] and "rule system-read-only" in lines[1]
    assert " allow " in lines[2] and "/home/a/d" in lines[2] and "0755" in lines[2]
    assert "stop" in lines[3]
