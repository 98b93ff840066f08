"""Re-deciding an audit log under another policy, streaming (constant memory for any log size).

Only ``event == "request"`` records are re-decided; lifecycle records are counted and skipped. A record
whose recorded ``decision`` differs from the new outcome is a change, counted per transition
(``allow->deny``...) and per (transition, new deciding rule, old rule); the first few of each transition
are kept as examples. Lines that are not JSON or not a request the protocol knows are counted as errors.
"""

from __future__ import annotations

import gzip
import json
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

from gateway.rules import requests
from gateway.rules.engine import Lookup, decide
from gateway.rules.model import Policy

MAX_POLICIES = 64  # distinct policy hashes remembered (a log spans a few reloads, not thousands)


@dataclass
class ReplayReport:
    lines: int = 0
    requests: int = 0
    other_events: int = 0
    unchanged: int = 0
    errors: int = 0
    error_examples: list[dict[str, Any]] = field(default_factory=list)
    transitions: Counter[str] = field(default_factory=Counter)  # "allow->deny" -> count
    by_rule: Counter[tuple[str, str | None, str | None]] = field(default_factory=Counter)
    examples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    policies: Counter[str] = field(default_factory=Counter)  # policy hash recorded -> requests
    # The new decisions, changed or not: "no would-deny left" is what a permissive rollout waits for.
    outcomes: Counter[str] = field(default_factory=Counter)

    @property
    def changed(self) -> int:
        return sum(self.transitions.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "lines": self.lines,
            "requests": self.requests,
            "other_events": self.other_events,
            "unchanged": self.unchanged,
            "changed": self.changed,
            "errors": self.errors,
            "error_examples": self.error_examples,
            "transitions": dict(self.transitions),
            "by_rule": [
                {"transition": t, "rule": new, "old_rule": old, "count": n}
                for (t, new, old), n in self.by_rule.most_common()
            ],
            "examples": self.examples,
            "policies": dict(self.policies),
            "outcomes": dict(self.outcomes),
        }


class _Counting:
    """A binary reader that remembers how many bytes were read from the file (compressed, for .gz)."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self.done = 0

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.done += len(data)
        return data

    def readable(self) -> bool:
        return True


def open_log(path: str) -> tuple[Iterator[bytes], _Counting, int]:
    """Lines of a plain or gzip-compressed log (told apart by content, not name), the byte counter and
    the file's size. ``-`` is standard input."""
    if path == "-":
        import sys

        counter = _Counting(sys.stdin.buffer)
        return iter(sys.stdin.buffer), counter, 0
    raw = open(path, "rb")  # noqa: SIM115 - closed when the iterator is exhausted
    size = os.fstat(raw.fileno()).st_size
    counter = _Counting(raw)
    magic = raw.read(2)
    raw.seek(0)
    stream: Any = gzip.GzipFile(fileobj=counter) if magic == b"\x1f\x8b" else None  # type: ignore[arg-type]

    def lines() -> Iterator[bytes]:
        try:
            if stream is not None:
                yield from stream
            else:
                while True:
                    chunk = raw.readline()
                    if not chunk:
                        break
                    counter.done += len(chunk)
                    yield chunk
        finally:
            raw.close()

    return lines(), counter, size


_NOT_RECORDED = object()


def _as_decided(record: dict[str, Any]) -> dict[str, Any]:
    """The record with the path(s) the server decided on (``resolved``, ``resolved2``) as its paths."""
    if "resolved" not in record and "resolved2" not in record:
        return record
    out = dict(record)
    if isinstance(record.get("resolved"), str):
        out["path"] = record["resolved"]
    if isinstance(record.get("resolved2"), str):
        out["path2"] = record["resolved2"]
    return out


def _recorded_object(record: dict[str, Any]) -> object:
    """The object facts a record carries (an ObjectAttrs, or None for "there was none"), or
    _NOT_RECORDED when the decision did not look at the object."""
    if "object" not in record:
        return _NOT_RECORDED
    facts = record["object"]
    if facts is None:
        return None
    if not isinstance(facts, dict):
        raise ValueError("object: not an object")
    return requests.object_attrs(facts, yaml_ints=False)


def replay(lines: Iterator[bytes], policy: Policy, lookup: Lookup | None = None, *, examples: int = 3,
           progress: Callable[[], None] | None = None) -> ReplayReport:
    report = ReplayReport()
    for number, line in enumerate(lines, 1):
        report.lines = number
        if progress is not None and number % 4096 == 0:
            progress()
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
            if record.get("event") != "request":
                report.other_events += 1
                continue
            old = record.get("decision")
            if old not in ("allow", "deny", "would-deny"):
                raise ValueError(f"no usable decision field ({old!r})")
            request = requests.from_audit(_as_decided(record))
            facts = _recorded_object(record)
        except (ValueError, requests.RequestError) as err:
            report.errors += 1
            if len(report.error_examples) < examples:
                report.error_examples.append({"line": number, "error": str(err)})
            continue
        report.requests += 1
        recorded_policy = str(record.get("policy", ""))
        if recorded_policy in report.policies or len(report.policies) < MAX_POLICIES:
            report.policies[recorded_policy] += 1
        # On the facts the server decided on: the object it looked at (recorded when the rules asked)
        # and the canonical path(s) it resolved; otherwise the given lookup (--root) or none.
        decision = decide(request, policy, lookup if facts is _NOT_RECORDED else (lambda _p, f=facts: f))
        report.outcomes[decision.outcome] += 1
        if decision.outcome == old:
            report.unchanged += 1
            continue
        transition = f"{old}->{decision.outcome}"
        report.transitions[transition] += 1
        report.by_rule[(transition, decision.rule, record.get("rule"))] += 1
        kept = report.examples.setdefault(transition, [])
        if len(kept) < examples:
            kept.append({
                "line": number,
                "seq": record.get("seq"),
                "time": record.get("time"),
                "request": requests.describe(request),
                "old": old,
                "old_rule": record.get("rule"),
                "new": decision.outcome,
                "new_rule": decision.rule,
                "reason": decision.reason,
            })
    if progress is not None:
        progress()
    return report
