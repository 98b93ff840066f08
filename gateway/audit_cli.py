"""`gateway audit LOG...`: review a trail (filters, table, summary with a timeline, follow, csv/json) or
verify its hash chain.

gateway/cli.py calls add_arguments() to build the subcommand and run() to run it. Nothing here imports
rich at module level (cli.py imports this module for every command, serve included); the views are
imported when a review actually runs.

Exit status: 0 done (or the trail verified), 1 --verify found a problem, 2 bad arguments or no input.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import io
import json
import os
import shlex
import shutil
import subprocess
import sys
from collections import deque
from collections.abc import Iterator
from typing import IO, Any

from gateway.audit.filters import OP_GROUPS, RecordFilter, parse_duration
from gateway.audit.reader import ReadStats, first_record, follow, iter_records, order_files
from gateway.audit.writer import default_audit_path

EPILOG = (
    """\
op groups: """
    + ", ".join(f"{g}" for g in OP_GROUPS)
    + """ (OPEN counts as write when its flags have
  O_WRONLY, O_RDWR, O_TRUNC, O_APPEND or O_CREAT). Times: RFC 3339 (without an offset: local time),
  today, yesterday, this-hour, or 10m / 2h / 3d (ago). Globs: * within a name, ** across, {a,b}.
examples:
  gateway audit /var/log/gateway/guest-42.jsonl* --decision deny --since today
  gateway audit --tenant guest-42 --summary
  gateway audit t.jsonl --op write --path '/etc/**' --format csv > writes.csv
  gateway audit t.jsonl* --verify
"""
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = "Review an audit trail, or verify its hash chain."
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "logs", nargs="*", metavar="LOG",
        help="trail files, plain or .gz, in any order ('-' reads stdin); default: the trail of each "
        "--tenant at its default path, with its rotated files",
    )  # fmt: skip
    f = parser.add_argument_group("filters (repeat one or give a comma list for alternatives; all must hold)")
    f.add_argument("--tenant", action="append", metavar="NAME", help="tenant (glob)")
    f.add_argument("--decision", action="append", metavar="D", help="allow, deny, would-deny")
    f.add_argument("--op", action="append", metavar="OP", help="op name or group (see below)")
    f.add_argument("--path", action="append", metavar="GLOB", help="path or new name matches GLOB")
    f.add_argument("--rule", action="append", metavar="ID", help="deciding rule id (glob); 'none': default")
    f.add_argument("--uid", action="append", metavar="N[-M]", help="request uid or range")
    f.add_argument("--gid", action="append", metavar="N[-M]", help="request gid or range")
    f.add_argument("--since", metavar="TIME", help="records at or after TIME")
    f.add_argument("--until", metavar="TIME", help="records before TIME")
    f.add_argument("--result", action="append", metavar="R", help="ok, an errno name (ENOENT), or error")
    f.add_argument("--event", action="append", metavar="E", help="request, lifecycle, or an event name")
    v = parser.add_argument_group("views")
    v.add_argument("--summary", action="store_true", help="counts, top denied paths and a timeline")
    v.add_argument("-f", "--follow", action="store_true", help="show the last records, then new ones live")
    v.add_argument("--format", choices=("table", "json", "csv"), default="table", help="default: table")
    v.add_argument("--verify", action="store_true", help="walk the hash chain; exit 1 on any problem")
    v.add_argument("-n", "--lines", type=int, default=10, metavar="N", help="--follow: records shown first")
    v.add_argument("--idle-exit", type=float, metavar="SECONDS", help="--follow: stop after SECONDS quiet")
    v.add_argument("--top", type=int, default=10, metavar="N", help="--summary: denied paths listed")
    v.add_argument("--bucket", metavar="DURATION", help="--summary: timeline bucket (5m, 1h, 1d)")
    v.add_argument("--given-order", action="store_true", help="read files as given, not by first seq")
    v.add_argument("--no-pager", action="store_true", help="never page the table")
    v.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar on stderr (default: for large inputs on a terminal)",
    )


def _error(message: str) -> int:
    print(f"gateway audit: {message}", file=sys.stderr)
    return 2


def _logs(args: argparse.Namespace) -> list[str]:
    if args.logs:
        return list(args.logs)
    paths: list[str] = []
    for value in args.tenant or ():
        for tenant in value.split(","):
            if tenant.strip() and not set(tenant) & set("*?["):
                base = default_audit_path(tenant.strip())
                paths += sorted(p for p in glob.glob(glob.escape(base) + "*") if os.path.isfile(p))
    return paths


def run(args: argparse.Namespace) -> int:
    try:
        flt = RecordFilter.build(
            tenant=args.tenant, decision=args.decision, op=args.op, path=args.path, rule=args.rule,
            uid=args.uid, gid=args.gid, since=args.since, until=args.until, result=args.result,
            event=args.event,
        )  # fmt: skip
        step = int(parse_duration(args.bucket)) if args.bucket else None
    except ValueError as exc:
        return _error(str(exc))
    paths = _logs(args)
    if not paths:
        if args.tenant:
            return _error(f"no trail found at {default_audit_path(args.tenant[0].split(',')[0])}*")
        return _error("give the trail's files (LOG...), or --tenant NAME to read its default trail")
    # The same file twice (a glob and a name) would read as a broken chain: keep the first mention.
    seen: dict[str, str] = {}
    for path in paths:
        seen.setdefault(os.path.realpath(path) if path != "-" else path, path)
    paths = list(seen.values())
    for path in paths:
        if path != "-" and not os.path.isfile(path):
            return _error(f"no such file: {path}")
        if path != "-" and not os.access(path, os.R_OK):
            return _error(f"cannot read {path}: trails are 0600; run as their owner (or root)")
    if step is not None and step < 60:
        return _error("--bucket must be at least 1m")
    try:
        if args.verify:
            if flt.active or args.summary or args.follow or args.format == "csv":
                return _error("--verify checks the whole trail: no filters, --summary, --follow or csv")
            return _verify(args, paths)
        if args.summary and (args.follow or args.format == "csv"):
            return _error("--summary is shown as a table or --format json (not with --follow or csv)")
        ordered = order_files(paths, args.given_order)
        if args.follow:
            return _follow(args, ordered, flt)
        return _review(args, ordered, flt, step)
    except BrokenPipeError:  # `gateway audit ... | head`: not an error
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        return 130 if not args.follow else 0


def _verify(args: argparse.Namespace, paths: list[str]) -> int:
    from rich.console import Console

    from gateway.audit.verify import verify
    from gateway.audit.views import RichProgress, render_verify

    progress = RichProgress(paths, args.progress)
    try:
        report = verify(paths, given_order=args.given_order, progress=progress)
    finally:
        progress.close()
    if args.format == "json":
        print(json.dumps(report.as_dict(), indent=2))
    else:
        render_verify(report, Console(highlight=False))
    return 0 if report.ok else 1


def _records(
    paths: list[str], flt: RecordFilter, stats: ReadStats, progress: Any
) -> Iterator[dict[str, Any]]:
    if not flt.active:
        return iter_records(paths, stats=stats, progress=progress)
    return iter_records(paths, keep=flt, may_match=flt.may_match, stats=stats, progress=progress)


def _text_out() -> io.TextIOWrapper:
    # surrogateescape: an undecodable path byte goes out as the byte it was (csv); json escapes it anyway
    return io.TextIOWrapper(sys.stdout.buffer, encoding="utf-8", errors="surrogateescape", newline="")


def _multi_tenant(paths: list[str]) -> bool:
    tenants = {str((first_record(p) or {}).get("tenant")) for p in paths if p != "-"}
    return len(tenants) > 1


def _review(args: argparse.Namespace, paths: list[str], flt: RecordFilter, step: int | None) -> int:
    from rich.console import Console

    from gateway.audit.views import RichProgress, render_summary, render_table, write_csv, write_json

    stats = ReadStats()
    if args.summary:
        from gateway.audit.summary import summarize

        summary = summarize(paths, flt, read=stats, progress=lambda: RichProgress(paths, args.progress))
        if args.format == "json":
            print(json.dumps(summary.as_dict(args.top, step=step), indent=2))
        else:
            render_summary(summary, Console(highlight=False), top=args.top, step=step)
        _report_read_problems(stats)
        return 0
    # Records stream to stdout as they are read: a bar on the same terminal would tear through them.
    wanted = args.progress if args.progress is not None else (None if not sys.stdout.isatty() else False)
    progress = RichProgress(paths, wanted)
    try:
        records = _records(paths, flt, stats, progress if progress.active else None)
        if args.format in ("json", "csv"):
            out = _text_out()
            try:
                (write_json if args.format == "json" else write_csv)(records, out)
                out.flush()
            finally:
                out.detach()
        else:
            with _pager(args) as console:
                render_table(_closing_progress(records, progress), console, show_tenant=_multi_tenant(paths))
    finally:
        progress.close()
    _report_read_problems(stats)
    return 0


def _closing_progress(records: Iterator[dict[str, Any]], progress: Any) -> Iterator[dict[str, Any]]:
    yield from records
    progress.close()


def _report_read_problems(stats: ReadStats) -> None:
    for error in stats.errors:
        print(f"gateway audit: warning: {error}", file=sys.stderr)
    if stats.bad:
        print(
            f"gateway audit: warning: {stats.bad} unreadable line{'s' * (stats.bad != 1)} skipped "
            f"(first at {stats.first_bad[0]}); run --verify",
            file=sys.stderr,
        )


@contextlib.contextmanager
def _pager(args: argparse.Namespace) -> Iterator[Any]:
    """A console writing into $PAGER (less -FRX: quits at once when the table fits the screen) when
    stdout is a terminal; streamed, so a long table does not have to fit in memory first."""
    from rich.console import Console

    if args.no_pager or not sys.stdout.isatty():
        yield Console(highlight=False)
        return
    width = shutil.get_terminal_size().columns
    env = dict(os.environ)
    env.setdefault("LESS", "FRX")
    try:
        command = shlex.split(os.environ.get("PAGER") or "less")
        pager = subprocess.Popen(command, stdin=subprocess.PIPE, env=env)
    except (OSError, ValueError):
        yield Console(highlight=False)
        return
    assert pager.stdin is not None
    stream: IO[str] = io.TextIOWrapper(pager.stdin, encoding="utf-8", errors="replace")
    try:
        yield Console(file=stream, force_terminal=True, width=width, highlight=False)
        stream.flush()
    except BrokenPipeError:
        pass  # the reader quit the pager early
    finally:
        with contextlib.suppress(OSError):
            stream.close()
        pager.wait()


def _end_offset(path: str) -> int:
    """Where the file's last complete line ends (a line being written is not shown half)."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        start = max(0, size - 65536)
        f.seek(start)
        tail = f.read()
    cut = tail.rfind(b"\n")
    return start + cut + 1 if cut >= 0 else start


def _follow(args: argparse.Namespace, paths: list[str], flt: RecordFilter) -> int:
    from rich.console import Console

    from gateway.audit.views import TableView, write_csv, write_json

    live = paths[-1]
    if live == "-" or live.endswith(".gz"):
        return _error(f"cannot follow {live}: give the live file last")
    backlog: deque[dict[str, Any]] = deque(maxlen=max(args.lines, 0))
    stats = ReadStats()
    offset = _end_offset(live)
    if args.lines > 0:
        backlog.extend(_records(paths[:-1], flt, stats, None))
        offset = 0
        with open(live, "rb") as f:
            for line in f:
                if not line.endswith(b"\n"):
                    break
                offset += len(line)
                record = _parse(line, flt)
                if record is not None:
                    backlog.append(record)
    console = Console(highlight=False)
    out = _text_out() if args.format != "table" else None
    table = TableView(console, show_tenant=_multi_tenant(paths), chunk=1)
    if out is not None and args.format == "csv":
        write_csv((), out)  # the header once

    def show(record: dict[str, Any]) -> None:
        if out is None:
            table.add(record)
        else:
            write = write_json if args.format == "json" else _csv_row
            write([record], out)
            out.flush()

    try:
        for record in backlog:
            show(record)
        if out is None:
            table.flush()  # the header, even before the first record
        for line in follow(live, offset, idle_timeout=args.idle_exit):
            record = _parse(line, flt)
            if record is not None:
                show(record)
    except KeyboardInterrupt:
        pass
    finally:
        if out is not None:
            out.flush()
            out.detach()
    return 0


def _csv_row(records: list[dict[str, Any]], out: IO[str]) -> None:
    from gateway.audit.views import write_csv

    buffer = io.StringIO()
    write_csv(records, buffer)
    out.write(buffer.getvalue().split("\n", 1)[1])  # without the header


def _parse(line: bytes, flt: RecordFilter) -> dict[str, Any] | None:
    if flt.active and not flt.may_match(line):
        return None
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict) or (flt.active and not flt(record)):
        return None
    return record
