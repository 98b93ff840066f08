"""aureport-style focused summaries: `gateway audit --by uid|gid|path|rule|op|tenant|result|event`.

One streaming pass; one row per value of the key, with its counts by decision and its errors, most
frequent first. Paths are what a guest chooses, so their table is bounded as the summary's is.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from typing import IO, Any

from gateway.audit.lines import format_line

BY_KEYS = ("uid", "gid", "path", "rule", "op", "tenant", "result", "event")
COLUMNS = ("count", "allow", "deny", "would-deny", "errors")
_LIMIT = 100_000
_DIDX = {"allow": 1, "deny": 2, "would-deny": 3}


def _key(record: dict[str, Any], by: str) -> str:
    if by == "event":
        return str(record.get("event", "request"))
    if by == "path":
        value = record.get("resolved", record.get("path"))  # what the rules decided on
    elif by == "rule":
        value = record.get("rule")
        if value is None:
            return "(default)" if "decision" in record else "-"
    else:
        value = record.get(by)
    return "-" if value is None else str(value)


def group(records: Iterable[dict[str, Any]], by: str) -> tuple[list[tuple[str, list[int]]], bool]:
    """([(value, [count, allow, deny, would-deny, errors])], whether the table was cut to stay bounded)."""
    if by not in BY_KEYS:
        raise ValueError(f"--by takes one of {', '.join(BY_KEYS)}")
    rows: dict[str, list[int]] = {}
    cut = False
    for record in records:
        if by != "event" and record.get("event", "request") != "request":
            continue  # uids, paths, rules are the requests'
        key = _key(record, by)
        counts = rows.get(key)
        if counts is None:
            if len(rows) >= _LIMIT:
                keep = sorted(rows.items(), key=lambda kv: -kv[1][0])[: _LIMIT // 2]
                rows = dict(keep)
                cut = True
            counts = rows[key] = [0, 0, 0, 0, 0]
        counts[0] += 1
        i = _DIDX.get(record.get("decision"))  # type: ignore[arg-type]
        if i is not None:
            counts[i] += 1
        if record.get("result", "ok") != "ok":
            counts[4] += 1
    return sorted(rows.items(), key=lambda kv: (-kv[1][0], kv[0])), cut


def write_rows(rows: list[tuple[str, list[int]]], by: str, out: IO[str], fmt: str) -> None:
    """Piped or --format csv / json: one line per value."""
    if fmt == "csv":
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow((by, *COLUMNS))
        for key, counts in rows:
            writer.writerow((key, *counts))
        return
    for key, counts in rows:
        record = {by: key, **dict(zip(COLUMNS, counts, strict=True))}
        if fmt == "json":
            import json

            out.write(json.dumps(record, separators=(",", ":")) + "\n")
        else:
            out.write(format_line(record) + "\n")
