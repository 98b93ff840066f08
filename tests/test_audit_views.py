"""The views: the rich table (a text snapshot), the summary and its timeline, json and csv shapes."""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
from pathlib import Path

from rich.console import Console

from gateway import protocol as p
from gateway.audit import AuditWriter
from gateway.audit import summary as summary_module
from gateway.audit.filters import RecordFilter
from gateway.audit.reader import iter_records
from gateway.audit.summary import SummaryStats, summarize
from gateway.audit.views import (
    CSV_FIELDS,
    console_text,
    render_summary,
    render_table,
    safe,
    write_csv,
    write_json,
)

START = {
    "seq": 1,
    "time": "2026-11-22T07:41:29.123456Z",
    "tenant": "guest-42",
    "policy": "ab",
    "event": "start",
    "version": "0.1.0",
    "export": "/srv/g",
    "prev": "0",
}
SHADOW = {
    "seq": 2,
    "time": "2026-11-22T07:41:30.000001Z",
    "tenant": "guest-42",
    "policy": "ab",
    "event": "request",
    "op": "open",
    "path": "/etc/shadow",
    "flags": ["O_RDWR"],
    "decision": "deny",
    "rule": "system-read-only",
    "reason": "denied",
    "result": "EROFS",
    "us": 3.1,
    "prev": "0",
}
RENAME = {
    "seq": 3,
    "time": "2026-11-23T00:00:00.500000Z",
    "tenant": "guest-42",
    "policy": "ab",
    "event": "request",
    "op": "rename",
    "path": "/home/a/x",
    "path2": "/home/a/y",
    "decision": "allow",
    "rule": "homes",
    "reason": "allowed",
    "result": "ok",
    "us": 12.0,
    "prev": "0",
}


def row(seq: str, time: str, decision: str, op: str, path: str, rule: str, result: str) -> str:
    # At width 120: seq, time, decision, op, rule and result take 69 cells, with two spaces between
    # columns 81; the path gets the other 39. (µs comes at 140 columns.)
    line = f"{seq:>7}  {time:<15}  {decision:<10}  {op:<12}  {path:<39}  {rule:<16}  {result:<9}"
    return line.rstrip()


def test_table_snapshot() -> None:
    console = Console(record=True, width=120, force_terminal=False)
    assert render_table([START, SHADOW, RENAME], console) == 3
    got = [line.rstrip() for line in console.export_text().splitlines()]
    assert got == [
        row("seq", "time (UTC)", "decision", "op", "path", "rule", "result"),
        row("", "2026-11-22", "", "", "", "", ""),
        row("1", "07:41:29.123456", "• start", "", "version=0.1.0 export=/srv/g", "", ""),
        row("2", "07:41:30.000001", "deny", "open", "/etc/shadow  O_RDWR", "system-read-only", "EROFS"),
        row("", "2026-11-23", "", "", "", "", ""),  # the date changed
        row("3", "00:00:00.500000", "allow", "rename", "/home/a/x → /home/a/y", "homes", "ok"),
    ]


def test_wide_terminals_show_microseconds() -> None:
    console = Console(record=True, width=140, force_terminal=False)
    render_table([SHADOW], console)
    header, _, line = console.export_text().splitlines()
    assert header.endswith("µs") and line.endswith("3.1")


def test_table_colors_by_decision_and_streams_in_aligned_chunks() -> None:
    out = io.StringIO()
    console = Console(file=out, width=120, force_terminal=True, color_system="standard")
    from gateway.audit.views import TableView

    view = TableView(console, chunk=2)
    for record in [SHADOW, RENAME] * 3:
        view.add(record)
    view.flush()
    text = out.getvalue()
    assert "\x1b[1;31mdeny" in text and "\x1b[32mallow" in text
    plain = Console(record=True, width=120, force_terminal=False)
    view = TableView(plain, chunk=2)
    for record in [SHADOW, RENAME] * 3:
        view.add(record)
    view.flush()
    rendered = plain.export_text()
    lines = [line for line in rendered.splitlines() if "/etc/shadow" in line]
    assert len(lines) == 3 and len({line.index("system-read-only") for line in lines}) == 1
    assert rendered.count("time (UTC)") == 1  # one header for all chunks


def test_narrow_terminals_drop_seq_and_us() -> None:
    console = Console(record=True, width=100, force_terminal=False)
    render_table([SHADOW], console)
    header = console.export_text().splitlines()[0]
    assert "seq" not in header and "µs" not in header and "path" in header


def test_guest_chosen_names_cannot_drive_the_terminal() -> None:
    evil = dict(SHADOW, path="/tmp/\x1b]0;owned\x07\x1b[2J[bold red]x[/]\udcff\n")
    out = io.StringIO()
    render_table([evil], Console(file=out, width=200, force_terminal=True, color_system="standard"))
    text = out.getvalue()
    assert "\x1b]0;" not in text and "\x1b[2J" not in text and "\x07" not in text
    assert "\\x1b]0;owned\\x07\\x1b[2J[bold red]x[/]\\xff\\n" in text  # shown, escaped, markup inert
    assert safe("a\tb\x7f\u200b") == "a\\tb\\x7f\u200b"
    assert safe("/home/\u202egnp.exe") == "/home/\\u202egnp.exe"  # bidi override: shown, not obeyed


def test_console_line() -> None:
    text = console_text(SHADOW).plain
    assert text.startswith("07:41:30.000001 deny")
    assert "/etc/shadow" in text and "O_RDWR" in text and "rule system-read-only" in text and "EROFS" in text
    assert "start" in console_text(START).plain and "version=0.1.0" in console_text(START).plain


def make_trail(path: Path) -> bytes:
    with AuditWriter.open(path, tenant="guest-42", policy_hash="ab" * 32) as w:
        w.lifecycle("start", version="0.1.0")
        w.request(
            p.Open(b"/etc/shadow", os.O_RDWR),
            decision="deny",
            rule="system-read-only",
            reason="ro",
            result="EROFS",
            us=3.0,
        )
        w.request(
            p.Create(b"/home/a/\xff", os.O_RDWR | os.O_CREAT, 0o644, 1000, 1000),
            decision="allow",
            rule="homes",
            reason="ok",
            result="ok",
            us=20.0,
            matched=["homes"],
        )
        w.request(
            p.Utime(b"/home/a/f", 1, 2, 3, 4), decision="allow", rule=None, reason="", result="ok", us=1
        )
    return path.read_bytes()


def test_json_is_the_writers_lines_byte_for_byte(tmp_path: Path) -> None:
    data = make_trail(tmp_path / "t.jsonl")
    out = io.StringIO()
    assert write_json(iter_records([str(tmp_path / "t.jsonl")]), out) == 5  # and the final checkpoint
    assert out.getvalue().encode() == data


def test_csv_shape(tmp_path: Path) -> None:
    make_trail(tmp_path / "t.jsonl")
    out = io.StringIO()
    write_csv(iter_records([str(tmp_path / "t.jsonl")]), out)
    rows = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert list(rows[0]) == [*CSV_FIELDS, "extra"]
    start, deny, create, utime, checkpoint = rows
    assert checkpoint["event"] == "checkpoint" and json.loads(checkpoint["extra"])["final"] is True
    assert start["event"] == "start" and json.loads(start["extra"])["version"] == "0.1.0"
    assert deny["flags"] == "O_RDWR" and deny["decision"] == "deny" and deny["result"] == "EROFS"
    assert create["path"] == "/home/a/\udcff" and create["mode"] == "0644" and create["uid"] == "1000"
    assert create["flags"] == "O_RDWR|O_CREAT" and json.loads(create["extra"]) == {"matched": ["homes"]}
    assert utime["atime"] == "1|2" and utime["rule"] == ""


def records_over_hours() -> list[dict]:
    out = []
    for minute in list(range(0, 60)) + list(range(120, 180)):  # an hour with nothing in the middle
        for i, decision in enumerate(("allow", "allow", "deny", "would-deny")):
            out.append(
                dict(
                    SHADOW,
                    time=f"2026-11-22T{7 + minute // 60:02d}:{minute % 60:02d}:{i:02d}.000000Z",
                    decision=decision,
                    path=f"/etc/{minute % 3}",
                )
            )
    return out


def test_summary_counts_and_timeline() -> None:
    stats = SummaryStats()
    for record in [START, *records_over_hours()]:
        stats.add(record)
    data = stats.as_dict(top=2)
    assert data["records"] == 481 and data["requests"] == 480
    assert data["decisions"] == {"allow": 240, "deny": 120, "would-deny": 120}
    assert data["ops"] == {"open": {"allow": 240, "deny": 120, "would-deny": 120}}
    assert data["events"] == {"start": 1}
    # deny and would-deny apart: 40 of each on each path
    assert data["top_denied_paths"] == [{"path": "/etc/0", "count": 40}, {"path": "/etc/1", "count": 40}]
    assert data["top_would_deny_paths"] == [{"path": "/etc/0", "count": 40}, {"path": "/etc/1", "count": 40}]
    timeline = data["timeline"]
    assert timeline["bucket_seconds"] == 900  # 3 hours in at most 24 buckets
    assert len(timeline["buckets"]) == 12
    assert timeline["buckets"][5] == {"start": "2026-11-22T08:15:00Z"}  # the quiet hour is shown empty
    assert timeline["buckets"][0] == {
        "start": "2026-11-22T07:00:00Z",
        "allow": 30,
        "deny": 15,
        "would-deny": 15,
    }


def test_summary_rendering() -> None:
    stats = SummaryStats()
    for record in [START, *records_over_hours()]:
        stats.add(record)
    console = Console(record=True, width=120, force_terminal=False)
    render_summary(stats, console)
    text = console.export_text()
    for expected in (
        "481 records",
        "allow 240 (50.0%)",
        "deny 120 (25.0%)",
        "Ops",
        "Rules",
        "Tenants",
        "Top denied paths",
        "/etc/0",
        "Timeline (UTC, 15m buckets)",
        "11-22 07:00",
        "Lifecycle",
    ):
        assert expected in text, expected
    bars = [line for line in text.splitlines() if line.startswith("11-22 ")]
    assert len(bars) == 12 and "█" not in bars[5]  # the empty bucket has no bar
    assert bars[0].count("█") > 0


def test_parallel_summary_equals_the_sequential_one(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "t.jsonl"
    with AuditWriter.open(path, tenant="t", policy_hash="ab") as w:
        for i in range(3000):
            w.request(
                p.Lstat(f"/d/{i % 50}".encode()),
                decision=("allow", "deny", "would-deny")[i % 3],
                rule=f"r{i % 7}",
                reason="",
                result="ok" if i % 5 else "ENOENT",
                us=1,
            )
    with open(path, "ab") as f:
        f.write(b"not json\n")
    monkeypatch.setattr(summary_module, "CHUNK_MIN_BYTES", 20_000)  # many ranges, lines cut across them
    flt = RecordFilter.build(decision=["deny,would-deny"])
    for f in (None, flt):
        one = summarize([str(path)], f, workers=1).as_dict()
        two = summarize([str(path)], f, workers=2).as_dict()
        assert one == two
    from gateway.audit.reader import ReadStats

    read = ReadStats()
    stats = summarize([str(path)], None, workers=2, read=read)
    # 3,000 requests and 4 checkpoints (3 by count, 1 final); with the garbage line 3,005 lines
    assert stats.records == 3004 and read.bad == 1 and read.lines == 3005
    broken = tmp_path / "t.jsonl.1.gz"
    broken.write_bytes(gzip.compress(path.read_bytes())[:5000])
    read = ReadStats()
    summarize([str(path), str(broken)], None, workers=2, read=read)  # an error crosses the process gap
    assert [e.kind for e in read.errors] == ["truncated compressed file"]


def test_console_columns_never_run_together() -> None:
    """Each event name, however long, is followed by a space; request lines keep their columns."""
    base = {"time": "2026-01-01T07:41:30.000001Z"}
    for event in ("start", "policy-load", "policy-reload", "client-gone", "reply-changed", "protocol-error"):
        text = console_text({**base, "event": event, "source": "/p.yaml"}).plain
        assert text.split()[1:4] == ["•", event, "source=/p.yaml"], text
    lines = [
        console_text({**base, "op": op, "path": "/a", "decision": d, "rule": "r", "result": "ok"}).plain
        for op, d in (("open", "allow"), ("mkdir", "would-deny"), ("lstat", "deny"))
    ]
    assert len({line.index("/a") for line in lines}) == 1  # the path starts in one column
    assert all(line[16:].split()[1] in ("open", "mkdir", "lstat") for line in lines)
