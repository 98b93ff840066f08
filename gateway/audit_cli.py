"""`gateway audit LOG...`: review a trail (filters, table, summary with a timeline, focused reports,
follow, csv/json), verify its chain and seals, list its checkpoints, make a sealing key pair.

gateway/cli.py calls add_arguments() to build the subcommand and run() to run it. Nothing here imports
rich at module level (cli.py imports this module for every command, serve included); the views are
imported when a review actually runs.

On a terminal the records are a rich table in a pager; anywhere else (a pipe, a file) one line per
record, every field, key=value (gateway.audit.lines), so that grep, awk and wc see whole records.

Exit status (as `gateway audit --help` says):
  0  records shown (review), or --verify found nothing wrong
  1  --verify found a problem; or a review matched no record (it prints <no matches>, as ausearch does)
  2  bad arguments, or no input
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import io
import itertools
import json
import os
import shlex
import shutil
import subprocess
import sys
from collections import deque
from collections.abc import Iterator
from typing import IO, Any

from gateway.audit.filters import OP_GROUPS, TIME_WORDS, RecordFilter, parse_duration
from gateway.audit.reader import (
    ReadStats,
    first_record,
    follow,
    iter_lines,
    iter_records,
    iter_records_reversed,
    order_files,
)
from gateway.audit.report import BY_KEYS
from gateway.audit.writer import default_audit_path

NO_MATCHES = "<no matches>"
EPILOG = (
    """\
op groups: """
    + ", ".join(f"{g}" for g in OP_GROUPS)
    + """ (OPEN counts as write when its flags have
  O_WRONLY, O_RDWR, O_TRUNC, O_APPEND or O_CREAT).
times: """
    + ", ".join(TIME_WORDS)
    + """,
  a time of day (19:00), an epoch (@1700000000), 10m / 2h / 3d (ago), or RFC 3339 (without an offset:
  local time). Globs: * within a name, ** across, {a,b}. --path also matches resolved and resolved2.
other commands:
  gateway audit keygen SEAL_KEY VERIFY_KEY   a key pair: SEAL_KEY for `gateway serve --audit-seal-key`,
                                             VERIFY_KEY for --verify --key (keep it off the host)
  gateway audit checkpoints LOG...           the checkpoint records, one JSON line each (to ship or compare)
exit status:
  0  records shown, or --verify found nothing wrong
  1  --verify found a problem (tampering, a cut, a bad seal, a missing final checkpoint), or no record
     matched (<no matches> on stderr)
  2  bad arguments or no input
examples:
  gateway audit /var/log/gateway/guest-42.jsonl* --decision deny --since today
  gateway audit --tenant guest-42 --summary
  gateway audit t.jsonl --op write --path '/etc/**' --format csv > writes.csv
  gateway audit t.jsonl* --verify --key guest-42.verify --expect-last 1200:5f0c9a...
  gateway audit t.jsonl --failed --by uid
  gateway audit t.jsonl | grep /home/alice
"""
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = "Review an audit trail, or verify its hash chain and seals."
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
    f.add_argument("--path", action="append", metavar="GLOB",
                   help="path, new name or the canonical paths decided on (resolved) match GLOB")
    f.add_argument("--rule", action="append", metavar="ID", help="deciding rule id (glob); 'none': default")
    f.add_argument("--uid", action="append", metavar="N[-M]", help="request uid or range")
    f.add_argument("--gid", action="append", metavar="N[-M]", help="request gid or range")
    f.add_argument("--since", metavar="TIME", help="records at or after TIME")
    f.add_argument("--until", metavar="TIME", help="records before TIME")
    f.add_argument("--result", action="append", metavar="R", help="ok, an errno name (ENOENT), or error")
    f.add_argument("--event", action="append", metavar="E", help="request, lifecycle, or an event name")
    f.add_argument("--failed", action="store_true", help="failures only: deny, would-deny, an error")
    v = parser.add_argument_group("views")
    v.add_argument("--summary", action="store_true", help="counts, top denied paths and a timeline")
    v.add_argument("--by", choices=BY_KEYS, metavar="KEY",
                   help=f"a focused report, one row per value: {', '.join(BY_KEYS)}")
    v.add_argument("-f", "--follow", action="store_true", help="show the last records, then new ones live")
    v.add_argument("--format", choices=("table", "lines", "json", "csv"), default=None,
                   help="default: a table on a terminal, lines (one key=value line a record) elsewhere")
    v.add_argument("--reverse", action="store_true", help="newest first")
    v.add_argument("--last", type=int, metavar="N", help="only the last N matching records")
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
    c = parser.add_argument_group("verify")
    c.add_argument("--verify", action="store_true",
                   help="walk the hash chain and the checkpoints; exit 1 on any problem")
    c.add_argument("--key", metavar="FILE", help="the verification key: check every checkpoint's seal")
    c.add_argument("--expect-last", metavar="SEQ:HASH",
                   help="a record noted earlier (--verify prints the last): it must be there, unchanged")
    c.add_argument("--checkpoints", metavar="FILE", dest="remote",
                   help="a copy of the checkpoints kept elsewhere (syslog, `audit checkpoints`): each must "
                   "be "
                   "in the trail as it is there, none past its end")
    c.add_argument("--live", action="store_true",
                   help="the trail is still being written: records after its last checkpoint are fine")


def _console(**kwargs: Any) -> Any:
    """A rich console whose reader may leave: rich's own answer to a closed pipe is SystemExit(1), so
    quitting the pager (q) or `| head` would be reported as a failure. Here it is a BrokenPipeError,
    which the pager and run() take as the reader's choice: exit 0."""
    from rich.console import Console

    class _Console(Console):
        def on_broken_pipe(self) -> None:
            raise BrokenPipeError(32, "the reader closed the pipe")

    return _Console(**kwargs)


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
    # The two other commands take the place of the first LOG (a file of that name still reads as a log).
    if args.logs and args.logs[0] == "keygen" and not os.path.exists("keygen"):
        return _keygen(args.logs[1:])
    if args.logs and args.logs[0] == "checkpoints" and not os.path.exists("checkpoints"):
        args.logs = args.logs[1:]
        mode = "checkpoints"
    else:
        mode = "review"
    try:
        flt = RecordFilter.build(
            tenant=args.tenant, decision=args.decision, op=args.op, path=args.path, rule=args.rule,
            uid=args.uid, gid=args.gid, since=args.since, until=args.until, result=args.result,
            event=args.event, failed=args.failed,
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
    if args.last is not None and args.last < 1:
        return _error("--last needs a positive count")
    verify_only = [n for n, v in (("--key", args.key), ("--expect-last", args.expect_last),
                                  ("--checkpoints", args.remote), ("--live", args.live)) if v]  # fmt: skip
    if verify_only and not args.verify:
        return _error(f"{', '.join(verify_only)}: only with --verify")
    try:
        if mode == "checkpoints":
            return _list_checkpoints(order_files(paths, args.given_order))
        if args.verify:
            if flt.active or args.summary or args.follow or args.by or args.format == "csv" or args.reverse \
                    or args.last:
                return _error("--verify checks the whole trail: no filters, views, --follow or csv")
            return _verify(args, paths)
        if args.summary and (args.follow or args.by):
            return _error("--summary is a view of its own (not with --follow or --by)")
        if args.follow and (args.reverse or args.last or args.by):
            return _error("--follow shows records as they come (not with --reverse, --last or --by)")
        ordered = order_files(paths, args.given_order)
        if args.follow:
            return _follow(args, ordered, flt)
        if args.by:
            return _by(args, ordered, flt)
        return _review(args, ordered, flt, step)
    except BrokenPipeError:  # `gateway audit ... | head`: not an error
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        return 130 if not args.follow else 0


def _keygen(rest: list[str]) -> int:
    from gateway.audit.seal import keygen

    if len(rest) != 2:
        return _error("usage: gateway audit keygen SEAL_KEY VERIFY_KEY (both are created, never overwritten)")
    seal_path, verify_path = rest
    try:
        kid = keygen(seal_path, verify_path)
    except OSError as exc:
        return _error(f"cannot write the keys: {exc.strerror or exc}: {exc.filename or ''}")
    print(f"key {kid}")
    print(f"  sealing key      {seal_path}: give it to the gateway (gateway serve --audit-seal-key FILE);")
    print("                   it rewrites it with the next key at every checkpoint")
    print(f"  verification key {verify_path}: move it OFF this host; gateway audit LOG --verify --key FILE")
    return 0


def _list_checkpoints(paths: list[str]) -> int:
    """The checkpoint records, byte for byte as in the trail (one JSON line each)."""
    from gateway.audit.reader import ReadError

    out = sys.stdout.buffer
    count = 0
    for path in paths:
        try:
            for _lineno, data, complete in iter_lines(path):
                if complete and b'"event":"checkpoint"' in data:
                    with contextlib.suppress(ValueError):
                        if json.loads(data).get("event") == "checkpoint":
                            out.write(data + b"\n")
                            count += 1
        except ReadError as exc:
            print(f"gateway audit: warning: {exc}", file=sys.stderr)
    out.flush()
    if not count:
        print(NO_MATCHES, file=sys.stderr)
        return 1
    return 0


def load_checkpoint_copy(path: str) -> list[dict[str, Any]]:
    """Checkpoint records from a copy kept elsewhere: JSON lines (`audit checkpoints`), or syslog lines
    whose message is the record (the JSON after the structured data)."""
    found: list[dict[str, Any]] = []
    with open(path, "rb") as f:
        for line in f:
            at = line.find(b'{"seq":')
            if at < 0:
                continue
            with contextlib.suppress(ValueError):
                record = json.loads(line[at:])
                if isinstance(record, dict) and record.get("event") == "checkpoint":
                    found.append(record)
    return found


def _verify(args: argparse.Namespace, paths: list[str]) -> int:

    from gateway.audit.seal import VerifyKey
    from gateway.audit.verify import parse_expect, verify
    from gateway.audit.views import RichProgress, render_verify

    try:
        key = VerifyKey.load(args.key) if args.key else None
        expect = parse_expect(args.expect_last) if args.expect_last else None
        remote = load_checkpoint_copy(args.remote) if args.remote else None
    except (OSError, ValueError) as exc:
        return _error(str(exc))
    progress = RichProgress(paths, args.progress)
    try:
        report = verify(paths, given_order=args.given_order, progress=progress, key=key, expect_last=expect,
                        live=args.live, remote=remote)  # fmt: skip
    finally:
        progress.close()
    if args.format == "json":
        print(json.dumps(report.as_dict(), indent=2))
    else:
        render_verify(report, _console(highlight=False, soft_wrap=not sys.stdout.isatty()))
    return 0 if report.ok else 1


def _records(
    paths: list[str], flt: RecordFilter, stats: ReadStats, progress: Any
) -> Iterator[dict[str, Any]]:
    if not flt.active:
        return iter_records(paths, stats=stats, progress=progress)
    return iter_records(paths, keep=flt, may_match=flt.may_match, stats=stats, progress=progress)


def _ordered_records(
    args: argparse.Namespace, paths: list[str], flt: RecordFilter, stats: ReadStats, progress: Any
) -> Iterator[dict[str, Any]]:
    """The matching records in the order asked: oldest first, or --reverse; --last N from the end
    (read backwards, so the end of a large trail is reached at once)."""
    if not args.reverse and not args.last:
        return _records(paths, flt, stats, progress)
    keep = flt if flt.active else None
    may = flt.may_match if flt.active else None
    backwards = iter_records_reversed(paths, keep=keep, may_match=may, stats=stats)
    if args.last:
        newest = list(itertools.islice(backwards, args.last))
        return iter(newest if args.reverse else newest[::-1])
    return backwards


def _text_out() -> io.TextIOWrapper:
    # surrogateescape: an undecodable path byte goes out as the byte it was (csv); json escapes it anyway
    return io.TextIOWrapper(sys.stdout.buffer, encoding="utf-8", errors="surrogateescape", newline="")


def _multi_tenant(paths: list[str]) -> bool:
    tenants = {str((first_record(p) or {}).get("tenant")) for p in paths if p != "-"}
    return len(tenants) > 1


def _no_matches() -> int:
    print(NO_MATCHES, file=sys.stderr)
    return 1


def _review(args: argparse.Namespace, paths: list[str], flt: RecordFilter, step: int | None) -> int:
    from gateway.audit.views import RichProgress

    stats = ReadStats()
    if args.summary:
        return _summary(args, paths, flt, step, stats)
    # Records stream to stdout as they are read: a bar on the same terminal would tear through them.
    tty = sys.stdout.isatty()
    wanted = args.progress if args.progress is not None else (None if not tty else False)
    progress = RichProgress(paths, wanted)
    try:
        records = _ordered_records(args, paths, flt, stats, progress if progress.active else None)
        first = next(records, None)
        if first is None:
            progress.close()
            _report_read_problems(stats)
            return _no_matches()
        records = itertools.chain((first,), records)
        fmt = args.format or ("table" if tty else "lines")
        if fmt != "table":
            from gateway.audit.lines import write_lines
            from gateway.audit.views import write_csv, write_json

            out = _text_out()
            write = {"json": write_json, "csv": write_csv}.get(fmt, write_lines)
            try:
                write(records, out)
                out.flush()
            finally:
                out.detach()
        else:
            from gateway.audit.views import render_table

            with _pager(args) as console:
                render_table(_closing_progress(records, progress), console, show_tenant=_multi_tenant(paths))
    finally:
        progress.close()
    _report_read_problems(stats)
    return 0


def _summary(args: argparse.Namespace, paths: list[str], flt: RecordFilter, step: int | None,
             stats: ReadStats) -> int:  # fmt: skip

    from gateway.audit.summary import summarize, write_summary_csv
    from gateway.audit.views import RichProgress, render_summary

    summary = summarize(paths, flt, read=stats, progress=lambda: RichProgress(paths, args.progress))
    _report_read_problems(stats)
    if not summary.records:
        return _no_matches()
    if args.format == "json":
        print(json.dumps(summary.as_dict(args.top, step=step), indent=2))
    elif args.format == "csv":
        out = _text_out()
        try:
            write_summary_csv(summary, out, args.top, step)
            out.flush()
        finally:
            out.detach()
    else:
        render_summary(summary, _console(highlight=False), top=args.top, step=step)
    return 0


def _by(args: argparse.Namespace, paths: list[str], flt: RecordFilter) -> int:
    from gateway.audit.report import COLUMNS, group, write_rows

    stats = ReadStats()
    rows, cut = group(_ordered_records(args, paths, flt, stats, None), args.by)
    _report_read_problems(stats)
    if args.last:
        rows = rows[: args.last]
    if not rows:
        return _no_matches()
    if cut:
        print(f"gateway audit: warning: too many distinct {args.by} values: the rarest were dropped",
              file=sys.stderr)  # fmt: skip
    fmt = args.format or ("table" if sys.stdout.isatty() else "lines")
    if fmt != "table":
        out = _text_out()
        try:
            write_rows(rows, args.by, out, fmt)
            out.flush()
        finally:
            out.detach()
        return 0
    from rich.table import Table

    from gateway.audit.views import safe

    title = f"By {args.by}" + (" (failures only)" if args.failed else "")
    table = Table(title=title, title_justify="left", title_style="bold", box=None, pad_edge=False)
    table.add_column(args.by, overflow="fold")
    styles = {"deny": "red", "would-deny": "yellow", "allow": "green", "errors": "red"}
    for column in COLUMNS:
        table.add_column(column, justify="right", style=styles.get(column, "bold"))
    for key, counts in rows:
        table.add_row(safe(key), *[f"{c:,}" if c else "·" for c in counts])
    _console(highlight=False).print(table)
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

    if args.no_pager or not sys.stdout.isatty():
        yield _console(highlight=False)
        return
    width = shutil.get_terminal_size().columns
    env = dict(os.environ)
    env.setdefault("LESS", "FRX")
    try:
        command = shlex.split(os.environ.get("PAGER") or "less")
        pager = subprocess.Popen(command, stdin=subprocess.PIPE, env=env)
    except (OSError, ValueError):
        yield _console(highlight=False)
        return
    assert pager.stdin is not None
    stream: IO[str] = io.TextIOWrapper(pager.stdin, encoding="utf-8", errors="replace")
    try:
        yield _console(file=stream, force_terminal=True, width=width, highlight=False)
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
    from gateway.audit.lines import write_lines

    console = _console(highlight=False)
    fmt = args.format or ("table" if sys.stdout.isatty() else "lines")
    out = _text_out() if fmt != "table" else None
    table = TableView(console, show_tenant=_multi_tenant(paths), chunk=1)
    if out is not None and fmt == "csv":
        write_csv((), out)  # the header once
    write = {"json": write_json, "csv": _csv_row}.get(fmt, write_lines)

    def show(record: dict[str, Any]) -> None:
        if out is None:
            table.add(record)
        else:
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
