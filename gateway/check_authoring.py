"""``gateway check --coverage`` and ``gateway check OLD --same-as NEW``: the views (rich tables on a
terminal, one JSON report with ``--format json``) of gateway/rules/coverage.py and equivalence.py.

Exit status: coverage, 0 when every test that ran passed, 1 when one failed; same-as, 0 when no shape
was decided differently, 1 when one was (as ``cmp`` does), 2 when NEW does not load.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from gateway import names
from gateway.rules import PolicyError, load_policy
from gateway.rules import requests as reqs
from gateway.rules.coverage import as_dict, coverage
from gateway.rules.equivalence import Comparison, compare
from gateway.rules.model import Policy
from gateway.rules.testing import select_tests

STATUS_STYLE = {"decides": "green", "matches": "cyan", "never": "bold red"}


def run(args: argparse.Namespace, policy: Policy, out: Console) -> int:
    if args.coverage:
        return _coverage(args, policy, out)
    return _same_as(args, policy, out)


def _coverage(args: argparse.Namespace, policy: Policy, out: Console) -> int:
    tests = select_tests(policy, args.run)
    results, rules = coverage(policy, tests)
    failed = [r for r in results if not r.passed]
    status = 1 if failed else 0
    if args.format == "json":
        print(json.dumps({**as_dict(results, rules), "run": args.run, "exit": status}, indent=2))
        return status
    chosen = f" matching --run {args.run!r}" if args.run else ""
    out.print(Text.assemble(("coverage ", "bold"), f"{policy.source}: {len(tests)} of {len(policy.tests)} "
                            f"test(s){chosen}, ", (f"{len(failed)} failed", "red" if failed else "dim")))
    table = Table(show_edge=False, box=None, pad_edge=False)
    for column in ("line", "rule", "effect", "status", "decides", "matches"):
        table.add_column(column, overflow="fold")
    for r in rules:
        table.add_row(str(r.line), r.id, r.effect, Text(r.status, STATUS_STYLE[r.status]),
                      _tests_text(r.deciding), _tests_text(r.matching))
    out.print(table)
    never = [r.id for r in rules if r.status == "never"]
    covered = len(rules) - len(never)
    out.print(Text.assemble(("rules exercised ", "bold"), f"{covered} of {len(rules)}",
                            (f"; never: {', '.join(never)}", "red") if never else ""))
    for r in failed:
        out.print(Text(f"  ✗ {policy.source}:{r.test.line}: {r.failures[0]}", style="red"))
    return status


def _tests_text(labels: list[str], shown: int = 3) -> str:
    if not labels:
        return "-"
    text = ", ".join(labels[:shown])
    return f"{len(labels)}: {text}" + (", …" if len(labels) > shown else "")


def _same_as(args: argparse.Namespace, policy: Policy, out: Console) -> int:
    try:
        other = load_policy(args.same_as)
    except PolicyError as error:
        print(f"gateway check: error: --same-as {args.same_as}: invalid policy", file=_stderr())
        for problem in error.problems:
            print(f"  {problem}", file=_stderr())
        return 2
    found = compare(policy, other, max_shapes=max(1, args.max_shapes), keep=max(0, args.max_differences))
    status = 1 if found.differing else 0
    if args.format == "json":
        print(json.dumps({**_comparison_dict(found), "old": policy.source, "new": other.source,
                          "exit": status}, indent=2))
        return status
    verdict = (f"{found.differing:,} shape(s) decided differently", "bold red") if found.differing else \
        ("no difference found", "bold green")
    out.print(Text.assemble(("same-as ", "bold"), f"{policy.source} vs {other.source}: "
                            f"{found.shapes:,} request shapes decided under both, ", verdict))
    if found.differences:
        table = Table(show_edge=False, box=None, pad_edge=False)
        for column in ("request", "object", policy.source, other.source):
            table.add_column(column, overflow="fold")
        for d in found.differences:
            table.add_row(reqs.describe(d.request), _object_text(d.object), _decided(d.old), _decided(d.new))
        out.print(table)
    for note in found.notes:
        out.print(Text(f"  note: {note}", style="yellow"))
    out.print(Text("bounds: " + _bounds_text(found), style="dim"))
    return status


def _stderr() -> Any:
    import sys

    return sys.stderr


def _decided(d: tuple[str, int, str | None]) -> Text:
    outcome, errno, rule = d
    errno_text = f" {names.errno_name(errno)}" if outcome != "allow" and errno else ""
    style = {"allow": "green", "deny": "red"}.get(outcome, "yellow")
    return Text.assemble((outcome + errno_text, style), f" by {rule or '(default)'}")


def _object_text(obj: Any) -> str:
    if obj is None:
        return "unknown"
    return reqs.object_record(obj).__repr__()


def _bounds_text(found: Comparison) -> str:
    dims = ", ".join(f"{k} {v}" for k, v in found.dims.items())
    text = (f"values per dimension: {dims}; paths are instances of each glob (wildcards as one sample "
            f"each), with the path below, the parent and a sibling; ids at the ends of each range. Every "
            f"path with each value of each dimension, then every pair of values, then the whole product, "
            f"up to the budget")
    reached: dict[str, list[str]] = {}
    for op, (done, total) in found.per_op.items():
        phase = found.phases.get(op, "product")
        if done >= total:
            phase = "whole product"
        reached.setdefault(phase, []).append(op if done >= total else f"{op} {done:,}/{total:,}")
    words = {"whole product": "every combination", "product": "every pair, part of the product",
             "pairs": "every single value, part of the pairs", "singles": "cut among the single values"}
    for phase, ops in reached.items():
        text += f"; {words[phase]}: {', '.join(ops)}"
    return text + ". An enumeration, not a proof: a value no condition names can hide a difference."


def _comparison_dict(found: Comparison) -> dict[str, Any]:
    return {"shapes": found.shapes, "differing": found.differing,
            "differences": [{"request": reqs.describe(d.request),
                             "object": reqs.object_record(d.object) if d.object is not None else None,
                             "old": {"outcome": d.old[0], "errno": names.errno_name(d.old[1]) if d.old[1]
                                     else None, "rule": d.old[2]},
                             "new": {"outcome": d.new[0], "errno": names.errno_name(d.new[1]) if d.new[1]
                                     else None, "rule": d.new[2]}} for d in found.differences],
            "bounds": {"dimensions": found.dims,
                       "per_op": {op: {"decided": a, "product": b} for op, (a, b) in found.per_op.items()},
                       "phases": found.phases, "cut": found.cut, "text": _bounds_text(found)},
            "notes": found.notes}
