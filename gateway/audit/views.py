"""How `gateway audit` shows records: the rich table, the summary with its timeline, csv and json, the
verify report, the console line, the progress bar. Imported only by the review side (never by the writer).

Everything a guest chose (paths, xattr names, symlink targets) is shown through :func:`safe`: a file
name holding an escape sequence must not be able to drive the operator's terminal, and rich markup in a
file name must stay text, so cells are Text objects, never markup strings.
"""

from __future__ import annotations

import csv
import json
import re
import sys
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import IO, Any

from rich.columns import Columns
from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Column, Table
from rich.text import Text

from gateway.audit.filters import DECISIONS
from gateway.audit.reader import Progress
from gateway.audit.verify import VerifyReport

DECISION_STYLES = {"allow": "green", "deny": "bold red", "would-deny": "yellow"}
LIFECYCLE_STYLE = "cyan"
# C0 and C1 controls, lone surrogates (undecodable bytes), and the bidi controls that can make a line
# read in another order than it is written ("Trojan Source").
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
UTIME_SPECIAL = {(1 << 30) - 1: "now", (1 << 30) - 2: "omit"}  # UTIME_NOW, UTIME_OMIT in the nsec field
_CHAIN = ("seq", "time", "tenant", "policy", "event", "prev")
_DETAIL_KEYS = ("flags", "mode", "uid", "gid", "rdev", "length", "name", "size", "bufsize", "atime", "mtime")


def _escape(match: re.Match[str]) -> str:
    c = ord(match.group())
    if 0xDC80 <= c <= 0xDCFF:  # an undecodable byte (surrogateescape): show the byte
        return f"\\x{c - 0xDC00:02x}"
    return {10: "\\n", 9: "\\t", 13: "\\r"}.get(c) or (f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}")


def safe(value: object) -> str:
    """Printable text for anything a record holds: control characters and undecodable bytes escaped."""
    text = value if isinstance(value, str) else str(value)
    return _CONTROL.sub(_escape, text)


def subject(record: dict[str, Any]) -> str:
    """What a request is about: the path, with the new name (rename, link) or the link's target."""
    path = safe(record.get("path", ""))
    if "path2" in record:
        return f"{path} → {safe(record['path2'])}"
    if "target" in record:
        return f"{path} → {safe(record['target'])}"
    return path


def details(record: dict[str, Any]) -> str:
    parts: list[str] = []
    for key in _DETAIL_KEYS:
        if key not in record:
            continue
        value = record[key]
        if key == "flags" and isinstance(value, list):
            parts.append("|".join(safe(v) for v in value))
        elif key == "uid":
            parts.append(f"uid {safe(value)}")
        elif key == "gid":
            parts.append(f"gid {safe(value)}")
        elif key in ("atime", "mtime") and isinstance(value, list) and len(value) == 2:
            sec, nsec = value
            if nsec in UTIME_SPECIAL:
                parts.append(f"{key} {UTIME_SPECIAL[nsec]}")
            elif isinstance(sec, int) and isinstance(nsec, int):
                parts.append(f"{key} {sec}.{nsec:09d}")
            else:
                parts.append(f"{key} {safe(value)}")
        elif key == "mode":
            parts.append(safe(value))
        else:
            parts.append(f"{key} {safe(value)}")
    return " ".join(parts)


def lifecycle_summary(record: dict[str, Any], limit: int = 48) -> str:
    parts = []
    for key, value in record.items():
        if key in _CHAIN or key == "policy_sha256":
            continue
        shown = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
        shown = safe(shown)
        parts.append(f"{safe(key)}={shown[:limit] + '…' if len(shown) > limit else shown}")
    return " ".join(parts)


def decision_cell(record: dict[str, Any]) -> Text:
    event = record.get("event", "request")
    if event != "request":
        return Text(f"• {safe(event)}", style=LIFECYCLE_STYLE)
    decision = str(record.get("decision", "?"))
    return Text(safe(decision), style=DECISION_STYLES.get(decision, "magenta"))


CONSOLE_DECISION_WIDTH = 15


def console_text(record: dict[str, Any]) -> Text:
    """One line for the foreground console: time, decision, op, path, details, rule, result."""
    t = str(record.get("time", ""))
    line = Text(t[11:26] + " ", style="dim")
    cell = decision_cell(record)
    # A column as wide as "• policy-reload" (the longest event name but "• protocol-error"), and always
    # one space after it, so that no name runs into what follows.
    line.append(cell.plain.ljust(CONSOLE_DECISION_WIDTH), style=cell.style)
    line.append(" ")
    if record.get("event", "request") != "request":
        line.append(lifecycle_summary(record), style=LIFECYCLE_STYLE)
        return line
    denied = record.get("decision") in ("deny", "would-deny")
    line.append(f"{safe(record.get('op', '?')):<12} ")
    line.append(subject(record), style="red" if denied else "")
    extra = details(record)
    if extra:
        line.append(f"  {extra}", style="dim")
    if record.get("rule") is not None:
        line.append(f"  rule {safe(record['rule'])}", style="bold" if denied else "dim")
    result = str(record.get("result", ""))
    if result and result != "ok":
        line.append(f"  {safe(result)}", style="red")
    return line


# ---------------------------------------------------------------------------------------------------------
# The table: streamed in chunks of fixed-width columns, so that memory stays constant and the chunks
# line up as one table (and --follow can add one row at a time).


class TableView:
    """Columns by terminal width, so that the path keeps 35-40 cells: seq from 110 columns, µs from 140
    (and 14 fewer when a tenant column is shown)."""

    def __init__(self, console: Console, *, show_tenant: bool = False, chunk: int = 200) -> None:
        self.console = console
        self.chunk = chunk
        width = console.width - (14 if show_tenant else 0)
        wide = width >= 110
        self.columns: list[tuple[str, Column]] = []
        if wide:
            self.columns.append(("seq", Column("seq", justify="right", width=7, no_wrap=True)))
        self.columns.append(("time", Column("time (UTC)", width=15, no_wrap=True)))
        if show_tenant:
            self.columns.append(("tenant", Column("tenant", width=12, no_wrap=True, overflow="ellipsis")))
        self.columns += [
            ("decision", Column("decision", width=10, no_wrap=True)),
            ("op", Column("op", width=12, no_wrap=True)),
            ("subject", Column("path", ratio=1, overflow="fold")),
            ("rule", Column("rule", width=16 if wide else 12, no_wrap=True, overflow="ellipsis")),
            ("result", Column("result", width=9, no_wrap=True)),
        ]
        if width >= 140:
            self.columns.append(("us", Column("µs", justify="right", width=6, no_wrap=True)))
        self.rows: list[list[Text]] = []
        self.header_shown = False
        self.date = ""
        self.count = 0

    def _cells(self, record: dict[str, Any]) -> list[Text]:
        denied = record.get("decision") in ("deny", "would-deny")
        request = record.get("event", "request") == "request"
        t = str(record.get("time", ""))
        rule = record.get("rule")
        result = record.get("result", "")
        cells: dict[str, Text] = {
            "seq": Text(safe(record.get("seq", "")), style="dim"),
            "time": Text(t[11:26]),
            "tenant": Text(safe(record.get("tenant", ""))),
            "decision": decision_cell(record),
            "op": Text(safe(record.get("op", ""))),
            "rule": Text(safe(rule) if rule is not None else ("—" if request else "")),
            "result": Text(safe(result), style="red" if result not in ("ok", "") else ""),
            "us": Text(safe(record.get("us", "")), style="dim"),
        }
        if request:
            cell = Text(subject(record), style="red" if denied else "")
            extra = details(record)
            if extra:
                cell.append("  " + extra, style="dim")
        else:
            cell = Text(lifecycle_summary(record), style=LIFECYCLE_STYLE)
        cells["subject"] = cell
        return [cells[key] for key, _ in self.columns]

    def add(self, record: dict[str, Any]) -> None:
        date = str(record.get("time", ""))[:10]
        if date != self.date:
            self.date = date
            marker = [Text("") for _ in self.columns]
            marker[[k for k, _ in self.columns].index("time")] = Text(safe(date), style="bold underline")
            self.rows.append(marker)
        self.rows.append(self._cells(record))
        self.count += 1
        if len(self.rows) >= self.chunk:
            self.flush()

    def flush(self) -> None:
        if not self.rows and self.header_shown:
            return
        table = Table(
            *[column.copy() for _, column in self.columns], box=None, expand=True, pad_edge=False,
            show_header=not self.header_shown, header_style="bold", padding=(0, 1),
        )  # fmt: skip
        for row in self.rows:
            table.add_row(*row)
        self.console.print(table)
        self.header_shown = True
        self.rows = []


def render_table(records: Iterable[dict[str, Any]], console: Console, *, show_tenant: bool = False) -> int:
    view = TableView(console, show_tenant=show_tenant)
    for record in records:
        view.add(record)
    view.flush()
    return view.count


# ---------------------------------------------------------------------------------------------------------
# Machine formats


CSV_FIELDS = (
    "seq", "time", "tenant", "policy", "event", "op", "path", "path2", "target", "uid", "gid", "mode",
    "flags", "rdev", "length", "name", "size", "bufsize", "atime", "mtime", "decision", "rule", "reason",
    "result", "us", "prev",
)  # fmt: skip


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, list):
        return "|".join(str(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, separators=(",", ":"))
    return value


def write_csv(records: Iterable[dict[str, Any]], out: IO[str]) -> int:
    """One header, then one row a record; fields beyond CSV_FIELDS go as JSON in the last column."""
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow((*CSV_FIELDS, "extra"))
    count = 0
    known = set(CSV_FIELDS)
    for record in records:
        rest = {k: v for k, v in record.items() if k not in known}
        writer.writerow([_csv_value(record.get(k)) for k in CSV_FIELDS] + [json.dumps(rest) if rest else ""])
        count += 1
    return count


def write_json(records: Iterable[dict[str, Any]], out: IO[str]) -> int:
    """JSON lines, encoded as the writer encodes (compact, ASCII): its lines come out byte for byte."""
    count = 0
    for record in records:
        out.write(json.dumps(record, separators=(",", ":")) + "\n")
        count += 1
    return count


# ---------------------------------------------------------------------------------------------------------
# Progress on stderr


class RichProgress(Progress):
    """A transient bar on stderr over the inputs' total size, when that is large and stderr a terminal."""

    MIN_BYTES = 32 << 20

    def __init__(self, paths: list[str], enabled: bool | None = None) -> None:
        super().__init__(paths)
        if enabled is None:
            enabled = self.total >= self.MIN_BYTES and sys.stderr.isatty()
        self._bar: Any = None
        if enabled and self.total:
            from rich.progress import BarColumn, DownloadColumn, TimeRemainingColumn
            from rich.progress import Progress as Bar

            self._bar = Bar(
                "reading", BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                console=Console(stderr=True), transient=True,
            )  # fmt: skip
            self._task = self._bar.add_task("reading", total=self.total)
            self._bar.start()
            self.active = True

    def update(self, position: int) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done + position)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


# ---------------------------------------------------------------------------------------------------------
# The verify report


def render_verify(report: VerifyReport, console: Console) -> None:
    files = f"{len(report.files)} file{'s' * (len(report.files) != 1)}"
    span = f"seq {report.first_seq} to {report.last_seq}" if report.first_seq is not None else "no records"
    cps = f"{report.checkpoints:,} checkpoint{'s' * (report.checkpoints != 1)}"
    if report.ok:
        what = "trail intact and sealed" if report.keyed else "trail intact (chain only: seals not checked)"
        console.print(
            Text.assemble(("✓ ", "bold green"), (what, "bold green"),
                          f": {report.records:,} records in {files}, {span}, {cps}"),
            soft_wrap=True,
        )  # fmt: skip
    else:
        console.print(
            Text.assemble(
                ("✗ ", "bold red"),
                (f"{report.problem_count} problem{'s' * (report.problem_count != 1)}", "bold red"),
                f" in {report.records:,} records in {files}, {span}, {cps}",
            ),
            soft_wrap=True,
        )
        # One line a problem, file:line first (as compilers do: editors and grep take it as it is).
        for i, problem in enumerate(report.problems):
            line = Text.assemble(
                ("first " if i == 0 else "      ", "bold"),
                (f"{safe(problem.path)}:{problem.line}", "bold red" if i == 0 else "red"),
                ": ",
                (problem.kind, "bold"),
                ": ",
                safe(problem.message),
            )
            console.print(line, soft_wrap=True)
        if report.problem_count > len(report.problems):
            console.print(f"… and {report.problem_count - len(report.problems)} more")
    if report.keyed:
        through = f"through seq {report.sealed_through}" if report.sealed_through is not None else "nothing"
        console.print(Text(f"seals: {report.seals_valid:,} of {report.checkpoints:,} valid; sealed {through}",
                           style="dim"), soft_wrap=True)  # fmt: skip
    for note in report.notes:
        console.print(Text("note: " + safe(note), style="dim"), soft_wrap=True)
    for doubt in report.cannot_rule_out:
        console.print(Text("cannot rule out: " + safe(doubt), style="yellow"), soft_wrap=True)
    if report.last_hash:
        console.print(
            Text(f"last {report.last_seq}:{report.last_hash} (for --expect-last)", style="dim"),
            soft_wrap=True,
        )


# ---------------------------------------------------------------------------------------------------------
# The summary


def _bar(counts: list[int], scale: float, width: int) -> Text:
    """A stacked bar: allow green, would-deny yellow, deny red; a non-zero denial gets at least one cell."""
    bar = Text()
    allow, deny, would = counts[0], counts[1], counts[2]
    cells = [
        (allow, "green"),
        (would, "yellow"),
        (deny, "red"),
    ]
    for count, style in cells:
        n = round(count * scale)
        if count and style != "green":
            n = max(n, 1)
        bar.append("█" * min(n, width), style=style)
    return bar


def _breakdown(title: str, rows: dict[str, list[int]], limit: int = 12) -> Table:
    table = Table(
        title=title, title_justify="left", title_style="bold", box=None, pad_edge=False, header_style="dim"
    )
    table.add_column("", overflow="fold", max_width=32)
    for decision in DECISIONS:
        table.add_column(decision, justify="right", style=DECISION_STYLES[decision])
    ordered = sorted(rows.items(), key=lambda kv: (-sum(kv[1]), kv[0]))
    for key, counts in ordered[:limit]:
        table.add_row(safe(key), *[f"{c:,}" if c else "·" for c in counts[:3]])
    if len(ordered) > limit:
        rest = [sum(c[i] for _, c in ordered[limit:]) for i in range(3)]
        table.add_row(Text(f"{len(ordered) - limit} more", style="dim"), *[f"{c:,}" for c in rest])
    return table


def render_summary(
    stats: Any, console: Console, *, top: int = 10, max_buckets: int = 24, step: int | None = None
) -> None:
    """Counts, the top denied paths and a timeline of decisions (stats: summary.SummaryStats)."""
    if not stats.records:
        console.print("no matching records")
        return
    span = f"{safe(stats.first)} → {safe(stats.last)}" if stats.first else "no times"
    total = max(stats.requests, 1)
    head = Text.assemble(
        (f"{stats.records:,}", "bold"), " records, ", (f"{stats.requests:,}", "bold"), f" requests, {span}"
    )
    decisions = Text()
    for i, decision in enumerate(DECISIONS):
        count = stats.decisions[i]
        decisions.append(f"{decision} ", style=DECISION_STYLES[decision])
        decisions.append(f"{count:,} ({100 * count / total:.1f}%)   ")
    console.print(
        Panel(Group(head, decisions), title="gateway audit summary", title_align="left", expand=False)
    )
    tables: list[Any] = [_breakdown("Ops", stats.ops), _breakdown("Rules", stats.rules)]
    if len(stats.tenants) > 1 or console.width >= 100:
        tables.append(_breakdown("Tenants", stats.tenants))
    if stats.results:
        results = Table(
            title="Errors",
            title_justify="left",
            title_style="bold",
            box=None,
            pad_edge=False,
            header_style="dim",
        )
        results.add_column("result")
        results.add_column("count", justify="right")
        for name, count in sorted(stats.results.items(), key=lambda kv: -kv[1])[:12]:
            results.add_row(Text(safe(name), style="red"), f"{count:,}")
        tables.append(results)
    if stats.events:
        events = Table(
            title="Lifecycle",
            title_justify="left",
            title_style="bold",
            box=None,
            pad_edge=False,
            header_style="dim",
        )
        events.add_column("event", style=LIFECYCLE_STYLE)
        events.add_column("count", justify="right")
        for name, count in sorted(stats.events.items()):
            events.add_row(safe(name), f"{count:,}")
        tables.append(events)
    console.print(Columns(tables, padding=(1, 4)))
    for title, rows, style in (
        ("Top denied paths", stats.top_denied(top), "red"),
        ("Top would-deny paths (performed: enforcement permissive)", stats.top_would_deny(top), "yellow"),
    ):
        _top_paths(console, title + (" (approximate)" if stats.paths_approximate else ""), rows, style)
    render_timeline(stats, console, max_buckets=max_buckets, step=step)


def _top_paths(console: Console, title: str, denied: list[tuple[str, int]], style: str) -> None:
    if denied:
        table = Table(
            title=title,
            title_justify="left",
            title_style="bold",
            box=None,
            pad_edge=False,
            header_style="dim",
            min_width=len(title),
        )
        table.add_column("count", justify="right", style=style)
        table.add_column("path", overflow="fold")
        for path, count in denied:
            table.add_row(f"{count:,}", safe(path))
        console.print()
        console.print(table)


def render_timeline(stats: Any, console: Console, *, max_buckets: int = 24, step: int | None = None) -> None:
    bucket, rows = stats.timeline(max_buckets, step)
    if not rows:
        return
    label_format = "%Y-%m-%d" if bucket >= 86400 else "%m-%d %H:%M"
    if bucket >= 86400:
        size = f"{bucket // 86400}d"
    else:
        size = f"{bucket // 3600}h" if bucket >= 3600 else f"{bucket // 60}m"
    peak = max(sum(c[:3]) for _, c in rows) or 1
    width = max(10, console.width - 48)
    table = Table(
        title=f"Timeline (UTC, {size} buckets)",
        title_justify="left",
        title_style="bold",
        box=None,
        pad_edge=False,
        header_style="dim",
    )
    table.add_column("", style="dim", no_wrap=True)
    table.add_column("", no_wrap=True, width=width)
    table.add_column("allow", justify="right", style="green", no_wrap=True)
    table.add_column("deny", justify="right", style="red", no_wrap=True)
    table.add_column("would-deny", justify="right", style="yellow", no_wrap=True)
    for start, counts in rows:
        label = datetime.fromtimestamp(start, UTC).strftime(label_format)
        table.add_row(
            label,
            _bar(counts, width / peak, width),
            f"{counts[0]:,}" if counts[0] else "",
            f"{counts[1]:,}" if counts[1] else "",
            f"{counts[2]:,}" if counts[2] else "",
        )
    console.print()
    console.print(table)
    console.print(
        Text.assemble(
            ("█", "green"), " allow  ", ("█", "yellow"), " would-deny  ", ("█", "red"), " deny", style="dim"
        )
    )
