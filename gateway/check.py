"""``gateway check POLICY``: the dry run. Nothing is executed.

1. validate (every problem with file:line:field), 2. lint, 3. run the policy's own ``tests:``,
4. decide given requests (``--request``, ``--requests FILE``; ``--explain`` says why each rule did or did
not match), 5. replay an audit log under the policy (``--replay``) and report the decisions that change.

With ``--request``/``--requests`` the decisions come first and the lint and the policy's tests run only
when asked (``--lint``, ``--tests``): deciding a request under a large policy is a quick answer.
``--no-lint`` validates and runs the tests; ``--lint-only`` validates and lints (no tests, requests or
replay). With requests, ``--format json`` writes JSON lines: one object per request, named as in the audit
record (tenant, policy, event, op, path, ..., decision, rule, reason, result), then, only when the lint,
the tests or a replay ran, one ``"event": "check"`` line with the rest of the report.

Exit status (see EXIT_HELP): 0 valid and nothing failed; 1 a test failed, or ``--strict`` saw a lint
warning, ``--fail-on-change`` a change, ``--fail-on-deny`` a deny or would-deny; 2 the policy is invalid,
or the options conflict, or a request, requests file or log cannot be read (the input is unusable);
141 (128 + SIGPIPE) the reader closed the pipe before the report was written, quietly, as ``cat`` would.

Authoring modes, each alone: ``--suggest TRAIL...`` proposes allow rules for a trail's denials
(gateway/check_suggest.py), ``--coverage`` shows which rules the tests exercised and ``--same-as NEW``
compares two policies' decisions (gateway/check_authoring.py); ``--run PATTERN`` picks the tests.

This is the CLI view: with check_suggest and check_authoring, the only modules of the rules feature that
import rich.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import re
import stat
import sys
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from gateway import names
from gateway.audit.fields import request_fields
from gateway.rules import PolicyError, decide, load_policy, loader
from gateway.rules import requests as reqs
from gateway.rules.idmap import IdMap, IdRange
from gateway.rules.lint import Finding, lint
from gateway.rules.model import Decision, Limits, Policy, format_size
from gateway.rules.replay import ReplayReport, open_log, replay
from gateway.rules.testing import TestResult, run_tests, select_tests
from gateway.tenancy import IdTranslator

PROGRESS_MIN_BYTES = 64 << 20  # below this a log replays in seconds: no progress bar unless on a terminal
OUTCOME_STYLE = {"allow": "green", "deny": "red", "would-deny": "yellow"}
EXIT_PIPE = 141  # 128 + SIGPIPE: what a shell reports for a writer the closed pipe ended
# Keys of a check's own JSON lines that are not request fields (so that its output reads back as requests).
_OUTPUT_META = reqs.AUDIT_META | {"explain"}

EXIT_HELP = """\
exit status:
  0    the policy is valid, every test that ran passed and no --fail-on-* / --strict condition held
  1    a test failed; or --strict: a lint warning; --fail-on-change: --replay found a change;
       --fail-on-deny: a request was denied, or would be (a would-deny of enforcement: permissive counts:
       the policy's rules deny it)
  2    the policy is invalid (it would not be served); or the options conflict; or a request, a requests
       file or an audit log cannot be read
  141  the reader closed the pipe early (`... | head -1`): nothing more is written, no traceback; the
       report was cut short, so this is not a pass

With --request/--requests, lint and tests run only with --lint / --tests (--strict implies --lint);
--format json then writes one JSON object per request per line (the audit record's field names).

authoring modes (each alone; 2 as above for unusable input):
  --suggest TRAIL...  0 the patch was written; 1 applying it would make a test of the policy fail
  --coverage          0 every test that ran passed; 1 one failed
  --same-as NEW       0 no request shape was decided differently; 1 one was (the first are shown)"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EXIT_HELP
    parser.add_argument("policy", metavar="POLICY", help="the policy file to check")
    parser.add_argument("--request", action="append", default=[], metavar="'OP PATH [PATH2] [key=value ...]'",
                        help="decide this request (repeatable), e.g. 'open /etc/passwd flags=O_RDWR'; object "
                             "attributes: owner= group= type= object_mode=")
    parser.add_argument("--requests", metavar="FILE", help="decide each request of a YAML list or JSON lines")
    parser.add_argument("--explain", action="store_true",
                        help="with --request/--requests: every rule that matched and why the others did not")
    parser.add_argument("--fail-on-deny", action="store_true",
                        help="exit 1 when a request is denied or would be denied (would-deny)")
    parser.add_argument("--lint", action="store_true",
                        help="with --request/--requests: lint the policy too (without requests it always is)")
    parser.add_argument("--tests", action="store_true",
                        help="with --request/--requests: run the policy's tests too (without requests they "
                             "always run)")
    parser.add_argument("--no-lint", action="store_true", help="validate and run the tests; skip the lint")
    parser.add_argument("--lint-only", action="store_true",
                        help="validate and lint only: no tests, requests or replay")
    parser.add_argument("--root", metavar="DIR",
                        help="read object attributes (owner, type, mode) from this tree, not the request")
    parser.add_argument("--replay", metavar="AUDIT", help="re-decide an audit log (JSON lines, plain or .gz)")
    parser.add_argument("--fail-on-change", action="store_true", help="exit 1 when --replay finds a change")
    parser.add_argument("--examples", type=int, default=3, metavar="N",
                        help="examples kept per kind of change (default 3)")
    parser.add_argument("--strict", action="store_true",
                        help="exit 1 when lint finds a warning (with requests: implies --lint)")
    parser.add_argument("--no-progress", action="store_true", help="never show a progress bar")
    parser.add_argument("--format", choices=["text", "json"], default="text",
                        help="output for people (text) or machines (json; JSON lines with requests)")
    authoring = parser.add_argument_group("authoring (each a mode of its own)")
    authoring.add_argument("--suggest", nargs="+", metavar="TRAIL",
                           help="propose allow rules for what these trails' records were denied (deny and "
                                "would-deny), as a YAML patch on stdout; the report goes to stderr")
    authoring.add_argument("--interactive", action="store_true",
                           help="with --suggest: accept, skip or re-glob each proposal at the terminal")
    authoring.add_argument("--patch", metavar="FILE", help="with --suggest: write the patch to FILE")
    authoring.add_argument("--coverage", action="store_true",
                           help="run the policy's tests and show which rules they exercised (deciding, "
                                "matching) and which never")
    authoring.add_argument("--run", metavar="PATTERN",
                           help="run only the tests whose name (or request) matches this regular expression")
    authoring.add_argument("--same-as", metavar="NEW",
                           help="decide POLICY and NEW over every request shape their rules tell apart and "
                                "show the first requests where they differ")
    authoring.add_argument("--max-shapes", type=int, default=1_000_000, metavar="N",
                           help="with --same-as: request shapes decided at most (default 1,000,000, some "
                                "15 s); the bounds reached are printed")
    authoring.add_argument("--max-differences", type=int, default=10, metavar="N",
                           help="with --same-as: differences shown (default 10)")


class UsageError(Exception):
    pass


class _Out(Console):
    """stdout. Rich's own answer to a closed pipe is SystemExit(1), which a script would read as "a test
    failed"; this hands the error to run(), which ends with EXIT_PIPE."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        raise BrokenPipeError(errno.EPIPE, "the reader closed the pipe")


def root_lookup(root: str, ids: Any = None) -> Any:
    """lookup(path) reading a real tree without following symlinks on the way (None when it cannot).
    With the policy's id map (``ids``), the owner and group as the guest sees them, as the server shows
    the rules: the tree holds host ids, the rules speak the guest's."""
    translate = IdTranslator(ids).attrs_to_guest if ids is not None else None

    def lookup(path: str) -> Any:
        found = read(path)
        return found if found is None or translate is None else translate(found)

    def read(path: str) -> os.stat_result | None:
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
                    entry = {k: v for k, v in entry.items() if k not in _OUTPUT_META}
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


def decision_line(policy: Policy, spec: reqs.RequestSpec, d: Decision) -> dict[str, Any]:
    """One request's JSON line, named as in the audit record. ``result`` is what the server would record
    (an errno name for a deny, ``ok`` otherwise: an allow and a would-deny are performed); a check performs
    nothing, so it cannot know a failure of the call itself. ``object`` (what the request said of the object)
    and ``explain`` (with --explain) are the check's own. The line reads back as a request (--requests) and
    replays as a trail's record (--replay; a trail has no ``object``: replay reads objects from --root)."""
    line: dict[str, Any] = {"tenant": policy.tenant, "policy": policy.hash[:16], "event": "request",
                            **request_fields(spec.request), "decision": d.outcome, "rule": d.rule,
                            "reason": d.reason,
                            "result": names.errno_name(d.errno) if d.outcome == "deny" else "ok"}
    if spec.object is not None:
        line["object"] = reqs.object_record(spec.object)
    if d.explanation is not None:
        line["explain"] = [t._asdict() for t in d.explanation]
    return line


def _conflicts(args: argparse.Namespace) -> str | None:
    has_requests = bool(args.request or args.requests)
    if args.lint_only:
        given = [name for name, on in (("--request", bool(args.request)), ("--requests", bool(args.requests)),
                                       ("--replay", bool(args.replay)), ("--tests", args.tests),
                                       ("--no-lint", args.no_lint), ("--explain", args.explain),
                                       ("--fail-on-deny", args.fail_on_deny), ("--root", bool(args.root)))
                 if on]
        if given:
            return f"--lint-only validates and lints only: not with {', '.join(given)}"
    modes = [name for name, on in (("--suggest", bool(args.suggest)), ("--coverage", args.coverage),
                                   ("--same-as", bool(args.same_as))) if on]
    if modes:
        others = [name for name, on in (("--request", bool(args.request)),
                                        ("--requests", bool(args.requests)), ("--replay", bool(args.replay)),
                                        ("--lint-only", args.lint_only)) if on]
        if len(modes) > 1 or others:
            return f"{modes[0]} is a mode of its own: not with {', '.join(modes[1:] + others)}"
    if args.run is not None:
        try:
            re.compile(args.run)
        except re.error as error:
            return f"--run {args.run!r}: not a regular expression ({error})"
    if args.interactive and not args.suggest:
        return "--interactive goes with --suggest"
    if args.patch and not args.suggest:
        return "--patch goes with --suggest"
    if args.no_lint and (args.lint or args.strict):
        return f"--no-lint skips the lint: not with {'--lint' if args.lint else '--strict'}"
    if args.fail_on_deny and not has_requests:
        return "--fail-on-deny needs --request or --requests"
    return None


def run(args: argparse.Namespace) -> int:
    """The check; a reader that closes the pipe early (``| head -1``) ends it quietly with EXIT_PIPE."""
    try:
        status = _run(args)
        sys.stdout.flush()  # here, not at exit, where a closed pipe would print "Exception ignored"
    except BrokenPipeError:
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # exit's flush goes nowhere
        return EXIT_PIPE
    return status


def _run(args: argparse.Namespace) -> int:
    conflict = _conflicts(args)
    if conflict is not None:
        print(f"gateway check: error: {conflict}", file=sys.stderr)
        return 2
    # Piped output gets a generous width (rich would pick 80) so that a report in a CI log is not folded.
    width = None if sys.stdout.isatty() else int(os.environ.get("COLUMNS", "140"))
    out = _Out(soft_wrap=True, highlight=False, width=width)  # lines stay whole: they are grepped
    err = Console(stderr=True, highlight=False)
    has_requests = bool(args.request or args.requests)
    as_json = args.format == "json"
    lines = as_json and has_requests  # JSON lines: one per request, then the report's rest on one line
    do_lint = not args.no_lint and (args.lint_only or not has_requests or args.lint or args.strict)
    do_tests = not args.lint_only and (not has_requests or args.tests)

    def emit(report: dict[str, Any]) -> None:
        if lines:
            report = {"event": "check", **{k: v for k, v in report.items() if k != "requests"}}
            print(json.dumps(report, separators=(",", ":")))
        else:
            print(json.dumps(report, indent=2))

    report: dict[str, Any] = {"policy": {"source": args.policy}, "valid": False, "problems": [], "lint": [],
                              "tests": None, "requests": [], "replay": None}
    try:
        policy = load_policy(args.policy)
    except PolicyError as error:
        report["problems"] = [vars(p) for p in error.problems]
        report["exit"] = 2
        if as_json:
            emit(report)
        else:
            _show_invalid(out, args.policy, error)
        return 2
    report["valid"] = True
    report["policy"] = {"source": policy.source, "hash": policy.hash, "tenant": policy.tenant,
                        "default": policy.default, "enforcement": policy.enforcement,
                        "rules": len(policy.rules),
                        "tests": len(policy.tests), "audit_path": policy.audit_path,
                        "ids": _ids_dict(policy.ids), "limits": vars(policy.limits)}
    if args.suggest:
        from gateway import check_suggest  # the authoring modes' modules load only when asked for

        return check_suggest.run(args, policy)
    if args.coverage or args.same_as:
        from gateway import check_authoring

        return check_authoring.run(args, policy, out)
    lookup = root_lookup(args.root, policy.ids) if args.root else None
    why: list[str] = []  # what made the check fail (exit 1)
    try:
        # The decisions first, written and flushed before the lint and the tests run: a script reading the
        # pipe has its answer at once.
        specs = [(f"--request {i + 1}", reqs.parse_text(t)) for i, t in enumerate(args.request)]
        if args.requests:
            specs += _read_requests(args.requests)
        decided = []
        for where, spec in specs:
            found = spec.object
            use = lookup if lookup is not None else (lambda _p, o=found: o)
            decision = decide(spec.request, policy, use, explain=args.explain)
            decided.append((where, spec, decision))
            if lines:
                print(json.dumps(decision_line(policy, spec, decision), separators=(",", ":")))
        if not as_json and decided:
            _show_requests(out, [(w, reqs.describe(s.request, s.object), d) for w, s, d in decided])
        if decided:
            sys.stdout.flush()
        denied = sum(d.outcome != "allow" for _, _, d in decided)
        if args.fail_on_deny and denied:
            why.append(f"{denied} of {len(decided)} request(s) denied or would be (--fail-on-deny)")
        findings = lint(policy) if do_lint else None
        results = run_tests(policy, select_tests(policy, args.run)) if do_tests else None
        report["lint"] = [vars(f) for f in findings] if findings is not None else None
        failed = [r for r in results if not r.passed] if results is not None else []
        if results is not None:
            report["tests"] = {"passed": len(results) - len(failed), "failed": len(failed),
                               "results": [_test_dict(r) for r in results]}
        if not as_json:
            if decided:
                out.print()
            _show_policy(out, policy, findings, results)
            skipped = [f"{what} ({why})" for what, why, ran in (
                ("lint", "--no-lint" if args.no_lint else "ask with --lint", do_lint),
                ("tests", "--lint-only" if args.lint_only else "ask with --tests", do_tests),
            ) if not ran]
            if skipped:
                out.print(Text(f"\nnot run: {', '.join(skipped)}", style="dim"))
        if failed:
            why.append(f"{len(failed)} test(s) failed")
        if args.strict and findings and any(f.severity == "warning" for f in findings):
            why.append("lint warnings (--strict)")
        if args.replay:
            replayed = _replay(args, policy, lookup, err)
            report["replay"] = replayed.as_dict()
            if not as_json:
                _show_replay(out, args.replay, replayed)
            if args.fail_on_change and replayed.changed:
                why.append(f"{replayed.changed:,} decision(s) changed (--fail-on-change)")
    except BrokenPipeError:
        raise  # the reader is gone: run() ends quietly
    except (reqs.RequestError, UsageError, OSError) as error:
        message = f"--request: {error}" if isinstance(error, reqs.RequestError) else str(error)
        report["error"] = message
        report["exit"] = 2
        if as_json:
            emit(report)
        else:
            out.print(Text(f"error: {message}", style="bold red"))
        return 2
    status = 1 if why else 0
    report["exit"] = status
    if lines:
        if do_lint or do_tests or args.replay:
            emit(report)
    elif as_json:
        emit(report)
    else:
        verdict = {0: ("OK", "bold green"), 1: ("FAILED", "bold red")}[status]
        out.print(Text.assemble(("result: ", "bold"), verdict, f" (exit {status})",
                                (": " + "; ".join(why)) if why else ""))
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


def _show_policy(out: Console, policy: Policy, findings: list[Finding] | None,
                 results: list[TestResult] | None) -> None:
    """The policy's summary, then the lint and the tests (None: not run, not shown)."""
    out.print(Text.assemble(("policy ", "bold"), policy.source, ("  valid", "bold green")))
    out.print(Text(f"  tenant {policy.tenant} · default {policy.default} · "
                   f"enforcement {policy.enforcement} · "
                   f"{len(policy.rules)} rules · {len(policy.tests)} tests · sha256 {policy.hash[:16]}"))
    if policy.ids is not None:
        out.print(Text(f"  ids {_ids_text(policy.ids)}"))
    if policy.limits.given():
        out.print(Text(f"  limits {_limits_text(policy.limits)}"))
    if findings is None:
        pass
    elif findings:
        warnings = sum(f.severity == "warning" for f in findings)
        notes = len(findings) - warnings
        out.print(Text.assemble(("\nlint ", "bold"), f"{warnings} warning(s), {notes} note(s)"))
        for f in findings:
            mark, style = ("warning", "yellow") if f.severity == "warning" else ("note", "cyan")
            file = (rule.file if f.rule and (rule := policy.rule(f.rule)) else "") or policy.source
            where = f"{file}:{f.line}: " if f.line else f"{file}: "
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
            where = f"{r.test.file or policy.source}:{r.test.line}: tests[{r.test.index}]"
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
    out.print(Text("requests", style="bold"))  # the first thing said: the answer asked for
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
    if r.outcomes:
        now = ", ".join(f"{r.outcomes[o]:,} {o}" for o in ("allow", "deny", "would-deny") if r.outcomes[o])
        out.print(Text(f"  under this policy: {now}"))
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
