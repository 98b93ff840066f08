"""``gateway check POLICY``: the dry run. Nothing is executed.

1. validate (every problem with file:line:field), 2. lint, 3. run the policy's own ``tests:``,
4. decide given requests (``--request``, ``--requests FILE``; ``--explain`` says why each rule did or did
not match), 5. replay an audit log under the policy (``--replay``) and report the decisions that change.

Exit status: 0 valid and every test passes; 1 a test failed (or ``--fail-on-change`` saw a change, or
``--strict`` saw a lint warning); 2 the policy is invalid (or a request, requests file or log cannot be
read: the input is unusable, as with any usage error).

This is the CLI view: the only module of the rules feature that imports rich.
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from gateway import names
from gateway.rules import PolicyError, decide, load_policy, loader
from gateway.rules import requests as reqs
from gateway.rules.idmap import IdMap, IdRange
from gateway.rules.lint import Finding, lint
from gateway.rules.model import Decision, Limits, Policy, format_size
from gateway.rules.replay import ReplayReport, open_log, replay
from gateway.rules.testing import TestResult, run_tests

PROGRESS_MIN_BYTES = 64 << 20  # below this a log replays in seconds: no progress bar unless on a terminal
OUTCOME_STYLE = {"allow": "green", "deny": "red", "would-deny": "yellow"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("policy", metavar="POLICY", help="the policy file to check")
    parser.add_argument("--request", action="append", default=[], metavar="'OP PATH [PATH2] [key=value ...]'",
                        help="decide this request (repeatable), e.g. 'open /etc/passwd flags=O_RDWR'; object "
                             "attributes: owner= group= type= object_mode=")
    parser.add_argument("--requests", metavar="FILE", help="decide each request of a YAML list or JSON lines")
    parser.add_argument("--explain", action="store_true",
                        help="with --request/--requests: every rule that matched and why the others did not")
    parser.add_argument("--root", metavar="DIR",
                        help="read object attributes (owner, type, mode) from this tree, not the request")
    parser.add_argument("--replay", metavar="AUDIT", help="re-decide an audit log (JSON lines, plain or .gz)")
    parser.add_argument("--fail-on-change", action="store_true", help="exit 1 when --replay finds a change")
    parser.add_argument("--examples", type=int, default=3, metavar="N",
                        help="examples kept per kind of change (default 3)")
    parser.add_argument("--strict", action="store_true", help="exit 1 when lint finds a warning")
    parser.add_argument("--no-progress", action="store_true", help="never show a progress bar")
    parser.add_argument("--format", choices=["text", "json"], default="text",
                        help="output for people (text) or machines (json)")


class UsageError(Exception):
    pass


def root_lookup(root: str) -> Any:
    """lookup(path) reading a real tree without following symlinks on the way (None when it cannot)."""

    def lookup(path: str) -> os.stat_result | None:
        current = root
        parts = [p for p in path.split("/") if p]
        try:
            result = os.lstat(root)
            for i, part in enumerate(parts):
                current = os.path.join(current, part)
                result = os.lstat(current)
                if i < len(parts) - 1 and stat.S_ISLNK(result.st_mode):
                    return None  # the server resolves links beneath the export; a check does not guess
        except OSError:
            return None
        return result

    return lookup


def _read_requests(path: str) -> list[tuple[str, reqs.RequestSpec]]:
    """(where, request) for each entry of a YAML list or a JSON-lines file."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"{path}: cannot read: {err}") from None
    out = []
    stripped = text.lstrip()
    if path.endswith((".jsonl", ".json")) or stripped.startswith(("{", '"')):
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                if isinstance(entry, dict):
                    entry = {k: v for k, v in entry.items() if k not in reqs.AUDIT_META}
                out.append((f"{path}:{number}", reqs.from_mapping(entry)))
            except (ValueError, reqs.RequestError) as err:
                raise UsageError(f"{path}:{number}: {err}") from None
        return out
    try:
        data, lines = loader.read_yaml(text, path)
    except PolicyError as err:
        raise UsageError(str(err)) from None
    if not isinstance(data, list):
        raise UsageError(f"{path}: expected a YAML list of requests (or JSON lines)")
    for i, entry in enumerate(data):
        where = f"{path}:{lines.get((i,), 0)}"
        try:
            out.append((where, reqs.from_mapping(entry, yaml_ints=True)))
        except reqs.RequestError as err:
            raise UsageError(f"{where}: {err}") from None
    return out


def _decision_dict(text: str, d: Decision) -> dict[str, Any]:
    out = {"request": text, "outcome": d.outcome, "effect": d.effect, "enforced": d.enforced, "rule": d.rule,
           "errno": d.errno, "errno_name": names.errno_name(d.errno) if d.errno else None,
           "matched": list(d.matched), "reason": d.reason}
    if d.explanation is not None:
        out["explanation"] = [t._asdict() for t in d.explanation]
    return out


def _test_dict(r: TestResult) -> dict[str, Any]:
    t = r.test
    return {"index": t.index, "line": t.line, "name": t.name, "request": t.text, "expect": t.expect,
            "outcome": r.decision.outcome, "rule": r.decision.rule, "passed": r.passed,
            "failures": list(r.failures), "reason": r.decision.reason}


def _ids_dict(ids: IdMap | None) -> dict[str, Any] | None:
    if ids is None:
        return None
    return {"uid": [r._asdict() for r in ids.uid], "gid": [r._asdict() for r in ids.gid],
            "unmapped": ids.unmapped, "squash_uid": ids.squash_uid, "squash_gid": ids.squash_gid}


def run(args: argparse.Namespace) -> int:
    # Piped output gets a generous width (rich would pick 80) so that a report in a CI log is not folded.
    width = None if sys.stdout.isatty() else int(os.environ.get("COLUMNS", "140"))
    out = Console(soft_wrap=True, highlight=False, width=width)  # lines stay whole: they are grepped
    err = Console(stderr=True, highlight=False)
    as_json = args.format == "json"
    report: dict[str, Any] = {"policy": {"source": args.policy}, "valid": False, "problems": [], "lint": [],
                              "tests": None, "requests": [], "replay": None}
    try:
        policy = load_policy(args.policy)
    except PolicyError as error:
        report["problems"] = [vars(p) for p in error.problems]
        report["exit"] = 2
        if as_json:
            print(json.dumps(report, indent=2))
        else:
            _show_invalid(out, args.policy, error)
        return 2
    report["valid"] = True
    report["policy"] = {"source": policy.source, "hash": policy.hash, "tenant": policy.tenant,
                        "default": policy.default, "enforcement": policy.enforcement,
                        "rules": len(policy.rules),
                        "tests": len(policy.tests), "audit_path": policy.audit_path,
                        "ids": _ids_dict(policy.ids), "limits": vars(policy.limits)}
    findings = lint(policy)
    results = run_tests(policy)
    report["lint"] = [vars(f) for f in findings]
    failed = [r for r in results if not r.passed]
    report["tests"] = {"passed": len(results) - len(failed), "failed": len(failed),
                       "results": [_test_dict(r) for r in results]}
    if not as_json:
        _show_policy(out, policy, findings, results)
    lookup = root_lookup(args.root) if args.root else None
    status = 1 if failed else 0
    if args.strict and any(f.severity == "warning" for f in findings):
        status = 1
    try:
        specs = [(f"--request {i + 1}", reqs.parse_text(t)) for i, t in enumerate(args.request)]
        if args.requests:
            specs += _read_requests(args.requests)
        decided = []
        for where, spec in specs:
            found = spec.object
            use = lookup if lookup is not None else (lambda _p, o=found: o)
            decision = decide(spec.request, policy, use, explain=args.explain)
            decided.append((where, reqs.describe(spec.request, spec.object), decision))
        report["requests"] = [_decision_dict(text, d) for _, text, d in decided]
        if not as_json and decided:
            _show_requests(out, decided)
        if args.replay:
            replayed = _replay(args, policy, lookup, err)
            report["replay"] = replayed.as_dict()
            if not as_json:
                _show_replay(out, args.replay, replayed)
            if args.fail_on_change and replayed.changed:
                status = 1
    except (reqs.RequestError, UsageError, OSError) as error:
        message = f"--request: {error}" if isinstance(error, reqs.RequestError) else str(error)
        report["error"] = message
        report["exit"] = 2
        if as_json:
            print(json.dumps(report, indent=2))
        else:
            out.print(Text(f"error: {message}", style="bold red"))
        return 2
    report["exit"] = status
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        verdict = {0: ("OK", "bold green"), 1: ("FAILED", "bold red")}[status]
        out.print(Text.assemble(("result: ", "bold"), verdict, f" (exit {status})"))
    return status


def _replay(args: argparse.Namespace, policy: Policy, lookup: Any, err: Console) -> ReplayReport:
    try:
        lines, counter, size = open_log(args.replay)
    except OSError as error:
        raise UsageError(f"{args.replay}: cannot read: {error.strerror}") from None
    show = not args.no_progress and (err.is_terminal or size >= PROGRESS_MIN_BYTES)
    if not show:
        return replay(lines, policy, lookup, examples=args.examples)
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("replaying"), BarColumn(), DownloadColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err, transient=err.is_terminal) as progress:
        task = progress.add_task("replay", total=size or None)
        return replay(lines, policy, lookup, examples=args.examples,
                      progress=lambda: progress.update(task, completed=counter.done))


# ---------------------------------------------------------------------------------------------------------
# The text report.


def _show_invalid(out: Console, source: str, error: PolicyError) -> None:
    count = len(error.problems)
    out.print(Text.assemble(("policy ", "bold"), source, ("  invalid", "bold red"),
                            f" ({count} problem{'s' if count != 1 else ''}; it would not be served)"))
    for problem in error.problems:
        out.print(Text("  " + str(problem), style="red"))
    out.print(Text.assemble(("result: ", "bold"), ("INVALID", "bold red"), " (exit 2)"))


def _show_policy(out: Console, policy: Policy, findings: list[Finding], results: list[TestResult]) -> None:
    out.print(Text.assemble(("policy ", "bold"), policy.source, ("  valid", "bold green")))
    out.print(Text(f"  tenant {policy.tenant} · default {policy.default} · "
                   f"enforcement {policy.enforcement} · "
                   f"{len(policy.rules)} rules · {len(policy.tests)} tests · sha256 {policy.hash[:16]}"))
    if policy.ids is not None:
        out.print(Text(f"  ids {_ids_text(policy.ids)}"))
    if policy.limits.given():
        out.print(Text(f"  limits {_limits_text(policy.limits)}"))
    if findings:
        warnings = sum(f.severity == "warning" for f in findings)
        notes = len(findings) - warnings
        out.print(Text.assemble(("\nlint ", "bold"), f"{warnings} warning(s), {notes} note(s)"))
        for f in findings:
            mark, style = ("warning", "yellow") if f.severity == "warning" else ("note", "cyan")
            where = f"{policy.source}:{f.line}: " if f.line else f"{policy.source}: "
            out.print(Text.assemble("  ", (f"{mark:7}", style), f" {where}", (f"[{f.code}] ", "dim"),
                                    f.message))
    else:
        out.print(Text.assemble(("\nlint ", "bold"), ("clean", "green")))
    if not results:
        return
    failed = sum(not r.passed for r in results)
    out.print(Text.assemble(("\ntests ", "bold"), (f"{len(results) - failed} passed", "green"), ", ",
                            (f"{failed} failed", "red" if failed else "dim")))
    table = Table(show_edge=False, box=None, pad_edge=False)
    for column in ("", "line", "test", "request", "expect", "got", "rule"):
        table.add_column(column, overflow="fold")
    for r in results:
        got = r.decision.outcome
        table.add_row(Text("✓", "green") if r.passed else Text("✗", "bold red"), str(r.test.line),
                      r.test.name or f"#{r.test.index}", r.test.text, r.test.expect,
                      Text(got, OUTCOME_STYLE[got]), r.decision.rule or "(default)")
    out.print(table)
    for r in results:
        for failure in r.failures:
            where = f"{policy.source}:{r.test.line}: tests[{r.test.index}]"
            out.print(Text(f"  ✗ {where}: {failure}", style="red"))


def _ranges_text(ranges: tuple[IdRange, ...], shown: int = 3) -> str:
    """Guest → host ranges, the first few (a map of hundreds of ranges is not read here)."""
    text = ", ".join(str(r) for r in ranges[:shown])
    return text + (f", … ({len(ranges)} ranges)" if len(ranges) > shown else "")


def _ids_text(ids: IdMap) -> str:
    """One line: the guest → host ranges, what becomes of the other ids, and whose ids the rules see."""
    squash = f"{ids.squash_uid}:{ids.squash_gid}"
    unmapped = "forbid" if ids.unmapped == "forbid" else f"squash → {squash}"
    return (f"uid {_ranges_text(ids.uid)} · gid {_ranges_text(ids.gid)} · unmapped {unmapped} · other host "
            f"ids show as {squash} · rules see guest ids")


def _limits_text(limits: Limits) -> str:
    parts = []
    if limits.requests_per_second is not None:
        parts.append(f"rate {limits.requests_per_second:g}/s"
                     f" (burst {limits.burst}; above it the guest waits)")
    if limits.truncate_max is not None:
        parts.append(f"truncate_max {format_size(limits.truncate_max)} (EFBIG above it)")
    if limits.open_fds is not None:
        parts.append(f"open_fds {limits.open_fds}")
    return " · ".join(parts)


def _show_requests(out: Console, decided: list[tuple[str, str, Decision]]) -> None:
    out.print(Text("\nrequests", style="bold"))
    for _where, text, d in decided:
        errno_text = f" {names.errno_name(d.errno)}" if d.errno else ""
        out.print(Text.assemble("  ", (text, "bold"), "\n    → ",
                                (d.outcome + errno_text, OUTCOME_STYLE[d.outcome]),
                                f"  by {d.rule or '(default)'}: {d.reason}"))
        if d.explanation is None:
            continue
        # One line per rule and path, not a table: an explanation is read and grepped, and a table would
        # fold the details into narrow columns.
        styles = {"decides": "bold green", "matched": "green", "no-match": "dim", "not-evaluated": "yellow"}
        traces = list(d.explanation)
        # A rule that fails the same way on both paths of a rename (e.g. on the op) is said once.
        said = {(t.rule, t.status, t.detail) for t in traces if t.role == "path"}
        traces = [t for t in traces if t.role == "path" or (t.rule, t.status, t.detail) not in said]
        for t in sorted(traces, key=lambda t: (t.status not in ("decides", "matched"), t.rule, t.role)):
            role = " (path2)" if t.role == "path2" else ""
            out.print(Text.assemble("      ", (f"{t.status:13}", styles[t.status]), f" {t.rule}{role}: ",
                                    (t.detail, "" if t.status != "no-match" else "dim")))


def _show_replay(out: Console, source: str, r: ReplayReport) -> None:
    changed = (f"{r.changed:,} changed", "bold red" if r.changed else "green")
    out.print(Text.assemble(("\nreplay ", "bold"), source, f": {r.lines:,} lines, {r.requests:,} requests, "
                            f"{r.other_events:,} other events, ", changed, f", {r.errors:,} unreadable"))
    for example in r.error_examples:
        out.print(Text(f"  unreadable line {example['line']}: {example['error']}", style="yellow"))
    if not r.changed:
        return
    table = Table(title=None, show_edge=False, box=None)
    for column in ("change", "count", "now decided by", "was decided by"):
        table.add_column(column)
    for (transition, new, old), count in r.by_rule.most_common():
        table.add_row(Text(transition, "red" if transition.endswith("deny") else "green"), f"{count:,}",
                      new or "(default)", old or "(default)")
    out.print(table)
    for transition, examples in r.examples.items():
        out.print(Text(f"  examples of {transition}:", style="bold"))
        for e in examples:
            out.print(Text(f"    line {e['line']} seq {e['seq']}: {e['request']} → {e['new']} "
                           f"({e['reason']})"))


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry for development: ``python -m gateway.check POLICY ...``."""
    parser = argparse.ArgumentParser(prog="gateway check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
