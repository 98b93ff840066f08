"""``gateway check POLICY --suggest TRAIL...``: the view of gateway/rules/suggest.py.

The patch (YAML: ``rules:`` and the rules to append) goes to stdout or ``--patch FILE``; what a person
reads about it (counts, examples, what an allow cannot lift, the check of the patch) goes to stderr, so
that ``gateway check p.yaml --suggest t.jsonl > patch.yaml`` keeps only the patch. ``--interactive`` asks
at the terminal, rule by rule: accept, skip, or take a broader or narrower glob (aa-logprof's choices).

Before the patch is written it is checked: the policy with the rules appended re-decides the trails
(nothing the default denied may remain) and runs the policy's own tests (a test the patch breaks is named,
and makes the exit status 1).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from rich.console import Console
from rich.panel import Panel
from rich.prompt import Prompt
from rich.text import Text

from gateway.rules import PolicyError
from gateway.rules.model import Policy
from gateway.rules.replay import open_log
from gateway.rules.suggest import Proposal, Suggestions, collect, patch_text, suggest, with_rules
from gateway.rules.testing import run_tests


class TrailError(Exception):
    pass


def _trails(paths: list[str]) -> list[Any]:
    out = []
    for path in paths:
        try:
            out.append(open_log(path)[0])
        except OSError as error:
            raise TrailError(f"{path}: cannot read: {error.strerror}") from None
    return out


def _ask(err: Console, proposals: list[Proposal]) -> list[Proposal]:
    """Accept, skip, or re-glob each proposal; 'q' keeps what was accepted so far."""
    kept: list[Proposal] = []
    for i, p in enumerate(proposals, 1):
        while True:
            body = Text.assemble(("paths ", "bold"), ", ".join(p.paths), "\n", ("ops   ", "bold"),
                                 ", ".join(p.ops), "\n", (f"{p.count} record(s)", "cyan"), ", e.g. ",
                                 ", ".join(p.examples))
            for n, alt in enumerate(p.alternatives, 1):
                body.append(f"\n  [{n}] {', '.join(alt)}", style="dim")
            err.print(Panel(body, title=f"{i}/{len(proposals)} {p.id}", expand=False))
            choices = ["a", "s", "q", *(str(n) for n in range(1, len(p.alternatives) + 1))]
            answer = Prompt.ask("(a)ccept, (s)kip, (q)uit, or a number for that glob", console=err,
                                choices=choices, default="a", show_choices=False)
            if answer in ("a", "s", "q"):
                break
            chosen = p.alternatives[int(answer) - 1]
            p.alternatives[int(answer) - 1] = p.paths
            p.paths = chosen
        if answer == "q":
            break
        if answer == "a":
            kept.append(p)
    return kept


def _verify(args: argparse.Namespace, policy: Policy, kept: list[Proposal]) -> dict[str, Any]:
    """The policy with the patch: what of the trails it still leaves to the default, which tests fail."""
    try:
        patched = with_rules(policy.source, [p.rule() for p in kept])
    except (PolicyError, OSError, ValueError) as error:
        return {"verified": False, "error": str(error).splitlines()[0]}
    report, need = collect(_trails(args.suggest), patched)
    failing = [r for r in run_tests(patched) if not r.passed]
    return {"verified": True, "remaining_default_denials": sum(sum(c.values()) for c in need.values()),
            "remaining_denied_by_rules": sum(report.by_deny_rule.values()),
            "tests_broken": [{"line": r.test.line, "name": r.test.name or f"#{r.test.index}",
                              "failure": r.failures[0]} for r in failing]}


def run(args: argparse.Namespace, policy: Policy) -> int:
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    try:
        found: Suggestions = suggest(_trails(args.suggest), policy)
        kept = found.proposals
        if args.interactive:
            if not (sys.stdin.isatty() and err.is_terminal):
                raise TrailError("--interactive needs a terminal (stdin and stderr)")
            kept = _ask(err, list(found.proposals))
        check = _verify(args, policy, kept)
    except TrailError as error:
        print(f"gateway check: error: {error}", file=sys.stderr)
        return 2
    header = (f"gateway check {policy.source} --suggest {' '.join(args.suggest)}\n"
              f"{len(kept)} allow rule(s) for {found.denied} denied record(s) of {found.records}; "
              "append them to the policy's rules:")
    patch = patch_text(kept, header)
    status = 1 if check.get("tests_broken") else 0
    if args.format == "json":
        print(json.dumps({**found.as_dict(), "accepted": [p.id for p in kept], "check": check,
                          "patch": patch, "exit": status}, indent=2))
        return status
    if args.patch:
        with open(args.patch, "w", encoding="utf-8") as f:
            f.write(patch)
    else:
        sys.stdout.write(patch)
        sys.stdout.flush()
    _summary(err, found, kept, check, args.patch)
    return status


def _summary(err: Console, found: Suggestions, kept: list[Proposal], check: dict[str, Any],
             patch: str | None) -> None:
    err.print(Text.assemble(("suggest ", "bold"), f"{found.records:,} request records, "
                            f"{found.denied:,} denied or would be under the policy; ",
                            (f"{len(kept)} rule(s) proposed", "bold green"),
                            f" → {patch}" if patch else ""))
    for p in kept:
        err.print(Text.assemble("  ", (p.id, "bold"), f" {p.ops} on {', '.join(p.paths)}: ",
                                (f"{p.count} record(s)", "cyan"), f", e.g. {', '.join(p.examples)}"))
    for rule, count in found.by_deny_rule.most_common():
        examples = "; ".join(found.deny_examples.get(rule, []))
        err.print(Text(f"  denied by rule {rule} ({count}): an allow cannot lift a deny rule; change the "
                       f"rule if it should allow, e.g. {examples}", style="yellow"))
    if found.skipped:
        err.print(Text(f"  {found.skipped} record(s) with a path that is not UTF-8: no rule proposed",
                       style="yellow"))
    if found.errors:
        err.print(Text(f"  {found.errors} unreadable line(s)", style="yellow"))
    if not check.get("verified"):
        err.print(Text(f"  not checked: {check.get('error')}", style="yellow"))
        return
    left = check["remaining_default_denials"]
    by_rules = check["remaining_denied_by_rules"]
    err.print(Text(f"  checked: with the patch, {left} denial(s) left to the default"
                   + (f", {by_rules} by deny rules" if by_rules else ""),
                   style="green" if not left else "yellow"))
    for b in check["tests_broken"]:
        err.print(Text(f"  ✗ the patch breaks test {b['name']} (line {b['line']}): {b['failure']}",
                       style="bold red"))
