"""The numbers behind `gateway audit --summary`, gathered in one streaming pass in bounded memory.

Counts by decision, op, rule, tenant, result and lifecycle event are small by nature. Denied paths are
not (a guest chooses them), so they are counted in a bounded table: past PATHS_MAX distinct paths the
rarest half is dropped, and the top list is then marked approximate (its counts are lower bounds).
The timeline keeps one bucket a minute and is regrouped into display buckets at the end.
"""

from __future__ import annotations

import calendar
import json
import multiprocessing
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

from gateway.audit.filters import DECISIONS, RecordFilter
from gateway.audit.reader import GZIP_MAGIC, Progress, ReadStats, iter_records

PATHS_MAX = 100_000
DEFAULT_RULE = "(default)"  # decisions no rule made: the policy's default
_DIDX = {d: i for i, d in enumerate(DECISIONS)}  # allow 0, deny 1, would-deny 2; 3 = other
BUCKET_STEPS = (60, 300, 900, 1800, 3600, 3 * 3600, 6 * 3600, 12 * 3600, 86400, 7 * 86400, 30 * 86400)


def _counts() -> list[int]:
    return [0, 0, 0, 0]


class SummaryStats:
    def __init__(self) -> None:
        self.records = 0
        self.requests = 0
        self.first: str | None = None
        self.last: str | None = None
        self.decisions = _counts()
        self.ops: dict[str, list[int]] = {}
        self.rules: dict[str, list[int]] = {}
        self.tenants: dict[str, list[int]] = {}
        self.results: dict[str, int] = {}
        self.events: dict[str, int] = {}
        self.denied_paths: dict[str, int] = {}  # deny only: a would-deny was performed
        self.would_paths: dict[str, int] = {}  # would-deny (enforcement: permissive)
        self.paths_approximate = False
        self.minutes: dict[str, list[int]] = {}

    def add(self, record: dict[str, Any]) -> None:
        """Count one record (written for speed: it runs a million times for a million records)."""
        self.records += 1
        t = record.get("time")
        if isinstance(t, str):
            if self.first is None or t < self.first:
                self.first = t
            if self.last is None or t > self.last:
                self.last = t
        event = record.get("event", "request")
        if event != "request":
            self.events[event] = self.events.get(event, 0) + 1
            return
        self.requests += 1
        i = _DIDX.get(record.get("decision"), 3)  # type: ignore[arg-type]
        self.decisions[i] += 1
        # Unrolled on purpose: a loop over (table, key) pairs costs a third more.
        key = record.get("op")
        if key.__class__ is not str:
            key = "?" if key is None else str(key)
        counts = self.ops.get(key)
        if counts is None:
            counts = self.ops[key] = _counts()
        counts[i] += 1
        key = record.get("rule")
        if key.__class__ is not str:
            key = DEFAULT_RULE if key is None else str(key)
        counts = self.rules.get(key)
        if counts is None:
            counts = self.rules[key] = _counts()
        counts[i] += 1
        key = record.get("tenant")
        if key.__class__ is not str:
            key = str(key)
        counts = self.tenants.get(key)
        if counts is None:
            counts = self.tenants[key] = _counts()
        counts[i] += 1
        if isinstance(t, str):
            key = t[:16]
            counts = self.minutes.get(key)
            if counts is None:
                counts = self.minutes[key] = _counts()
            counts[i] += 1
        result = record.get("result")
        if result != "ok":
            result = str(result)
            self.results[result] = self.results.get(result, 0) + 1
        if i == 1 or i == 2:
            table = self.denied_paths if i == 1 else self.would_paths
            path = str(record.get("path", ""))
            table[path] = table.get(path, 0) + 1
            if len(table) > PATHS_MAX:
                self._prune()

    def _prune(self) -> None:
        for name in ("denied_paths", "would_paths"):
            table = getattr(self, name)
            if len(table) > PATHS_MAX:
                keep = sorted(table.items(), key=lambda kv: kv[1], reverse=True)[: PATHS_MAX // 2]
                setattr(self, name, dict(keep))
                self.paths_approximate = True

    def top_denied(self, n: int) -> list[tuple[str, int]]:
        """The paths most often denied (deny only)."""
        return sorted(self.denied_paths.items(), key=lambda kv: (-kv[1], kv[0]))[:n]

    def top_would_deny(self, n: int) -> list[tuple[str, int]]:
        """The paths most often would-denied (performed under enforcement: permissive)."""
        return sorted(self.would_paths.items(), key=lambda kv: (-kv[1], kv[0]))[:n]

    def timeline(
        self, max_buckets: int = 24, step: int | None = None
    ) -> tuple[int, list[tuple[int, list[int]]]]:
        """(bucket seconds, [(bucket start as epoch seconds, [allow, deny, would-deny, other])]), empty
        buckets included (a gap in activity is information), at most max_buckets unless step is given."""
        if not self.minutes:
            return 60, []
        starts = {calendar.timegm(time.strptime(key, "%Y-%m-%dT%H:%M")): v for key, v in self.minutes.items()
                  if len(key) == 16}  # fmt: skip
        if not starts:
            return 60, []
        low, high = min(starts), max(starts)
        if step is None:
            step = next((s for s in BUCKET_STEPS if (high // s - low // s) < max_buckets), BUCKET_STEPS[-1])
        buckets: dict[int, list[int]] = {}
        for start in range(low - low % step, high + 1, step):
            buckets[start] = _counts()
        for start, counts in starts.items():
            bucket = buckets.setdefault(start - start % step, _counts())
            for i in range(4):
                bucket[i] += counts[i]
        return step, sorted(buckets.items())

    def as_dict(self, top: int = 10, max_buckets: int = 24, step: int | None = None) -> dict[str, Any]:
        def named(counts: list[int]) -> dict[str, int]:
            out = {d: counts[i] for i, d in enumerate(DECISIONS) if counts[i]}
            if counts[3]:
                out["other"] = counts[3]
            return out

        bucket, rows = self.timeline(max_buckets, step)
        return {
            "records": self.records,
            "requests": self.requests,
            "first": self.first,
            "last": self.last,
            "decisions": named(self.decisions),
            "ops": {k: named(v) for k, v in sorted(self.ops.items())},
            "rules": {k: named(v) for k, v in sorted(self.rules.items())},
            "tenants": {k: named(v) for k, v in sorted(self.tenants.items())},
            "results": dict(sorted(self.results.items())),
            "events": dict(sorted(self.events.items())),
            "top_denied_paths": [{"path": p, "count": c} for p, c in self.top_denied(top)],
            "top_would_deny_paths": [{"path": p, "count": c} for p, c in self.top_would_deny(top)],
            "top_denied_paths_approximate": self.paths_approximate,
            "timeline": {
                "bucket_seconds": bucket,
                "buckets": [
                    {"start": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(s)), **named(c)}
                    for s, c in rows
                ],
            },
        }


# ---------------------------------------------------------------------------------------------------------
# Gathering: one pass, split over processes for large plain files (the counts merge; order does not
# matter to them). A range [start, end) holds the lines that begin inside it.

PARALLEL_MIN_BYTES = 32 << 20
CHUNK_MIN_BYTES = 8 << 20


def merge(into: SummaryStats, other: SummaryStats) -> None:
    into.records += other.records
    into.requests += other.requests
    for mine, theirs in (
        (into.ops, other.ops),
        (into.rules, other.rules),
        (into.tenants, other.tenants),
        (into.minutes, other.minutes),
    ):
        for key, counts in theirs.items():
            target = mine.setdefault(key, _counts())
            for i in range(4):
                target[i] += counts[i]
    for i in range(4):
        into.decisions[i] += other.decisions[i]
    for small_into, small in (
        (into.results, other.results),
        (into.events, other.events),
        (into.denied_paths, other.denied_paths),
        (into.would_paths, other.would_paths),
    ):
        for key, count in small.items():
            small_into[key] = small_into.get(key, 0) + count
    into.paths_approximate |= other.paths_approximate
    if len(into.denied_paths) > PATHS_MAX or len(into.would_paths) > PATHS_MAX:
        into._prune()
    for t in (other.first, other.last):
        if t is not None:
            into.first = t if into.first is None or t < into.first else into.first
            into.last = t if into.last is None or t > into.last else into.last


def _tasks(paths: list[str], workers: int) -> list[tuple[str, int, int | None]]:
    tasks: list[tuple[str, int, int | None]] = []
    for path in paths:
        try:
            size = os.stat(path).st_size if path != "-" else 0
        except OSError:
            size = 0
        if size < 2 * CHUNK_MIN_BYTES or path == "-" or path.endswith(".gz") or not _plain(path):
            tasks.append((path, 0, None))
            continue
        step = max(CHUNK_MIN_BYTES, size // (workers * 4))
        tasks += [(path, start, min(start + step, size)) for start in range(0, size, step)]
    return tasks


def _plain(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(2) != GZIP_MAGIC


_worker_filter: RecordFilter | None = None


def _init_worker(flt: RecordFilter | None) -> None:
    global _worker_filter
    _worker_filter = flt


def _summarize_task(task: tuple[str, int, int | None]) -> tuple[SummaryStats, ReadStats, int]:
    """(counts, read problems, bytes covered) for a whole file (end None) or a byte range of one."""
    path, start, end = task
    flt = _worker_filter
    stats, read = SummaryStats(), ReadStats()
    add = stats.add
    if end is None:
        keep = flt if flt is not None else None
        may = flt.may_match if flt is not None else None
        for record in iter_records([path], keep=keep, may_match=may, stats=read):
            add(record)
        return stats, read, os.stat(path).st_size if path != "-" else 0
    loads = json.loads
    with open(path, "rb") as f:
        if start:
            f.seek(start - 1)
            position = start - 1 + len(f.readline())  # the line holding byte start-1 is the range before's
        else:
            position = 0
        for line in f:
            if position >= end:
                break
            offset = position
            position += len(line)
            read.lines += 1
            if flt is not None and not flt.may_match(line):
                continue
            try:
                record = loads(line)
            except ValueError:
                record = None
            if record.__class__ is not dict:
                read.bad += 1
                read.first_bad.append(f"{path} (byte {offset})")
                continue
            if flt is None or flt(record):
                read.records += 1
                add(record)
    return stats, read, end - start


def summarize(
    paths: list[str], flt: RecordFilter | None = None, *, workers: int | None = None,
    read: ReadStats | None = None, progress: Callable[[], Progress] | None = None,
) -> SummaryStats:  # fmt: skip
    """Summary of the records flt keeps (all when None), over processes when the input is large.
    progress: makes the progress meter, once the workers exist (a drawing thread must not be forked)."""
    read = read if read is not None else ReadStats()
    flt = flt if flt is not None and flt.active else None
    total = sum(os.stat(p).st_size for p in paths if p != "-" and os.path.exists(p))
    if workers is None:
        workers = min(os.cpu_count() or 1, 8) if total >= PARALLEL_MIN_BYTES else 1
    if "-" in paths:
        workers = 1  # stdin belongs to this process
    tasks = _tasks(paths, workers)
    if workers <= 1 or len(tasks) <= 1:
        _init_worker(flt)
        return _gather(map(_summarize_task, tasks), read, progress() if progress else None)
    # fork: the workers start at once with everything imported (and no thread runs yet to fork under).
    with multiprocessing.get_context("fork").Pool(workers, _init_worker, (flt,)) as pool:
        meter = progress() if progress else None
        try:
            return _gather(pool.imap(_summarize_task, tasks), read, meter)
        finally:
            if meter is not None:
                meter.close()


def _gather(results: Iterable[tuple[SummaryStats, ReadStats, int]], read: ReadStats,
            progress: Progress | None) -> SummaryStats:  # fmt: skip
    stats = SummaryStats()
    done = 0
    for part, part_read, size in results:
        merge(stats, part)
        read.lines += part_read.lines
        read.records += part_read.records
        read.bad += part_read.bad
        read.first_bad = (read.first_bad + part_read.first_bad)[:5]
        read.errors += part_read.errors
        done += size
        if progress is not None:
            progress.update(done)
    return stats


def write_summary_csv(stats: SummaryStats, out: Any, top: int = 10, step: int | None = None) -> None:
    """--summary --format csv: one table, section,key,allow,deny,would-deny,other,count (count alone for
    the sections that are not split by decision: results, events, top paths)."""
    import csv

    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(("section", "key", *DECISIONS, "other", "count"))
    writer.writerow(("records", "", "", "", "", "", stats.records))
    writer.writerow(("requests", "", *stats.decisions, stats.requests))
    for section, table in (("op", stats.ops), ("rule", stats.rules), ("tenant", stats.tenants)):
        for key, counts in sorted(table.items(), key=lambda kv: (-sum(kv[1]), kv[0])):
            writer.writerow((section, key, *counts, sum(counts)))
    for key, count in sorted(stats.results.items(), key=lambda kv: -kv[1]):
        writer.writerow(("result", key, "", "", "", "", count))
    for key, count in sorted(stats.events.items()):
        writer.writerow(("event", key, "", "", "", "", count))
    for path, count in stats.top_denied(top):
        writer.writerow(("denied-path", path, "", count, "", "", count))
    for path, count in stats.top_would_deny(top):
        writer.writerow(("would-deny-path", path, "", "", count, "", count))
    bucket, rows = stats.timeline(24, step)
    for start, counts in rows:
        label = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(start))
        writer.writerow((f"timeline-{bucket}s", label, *counts, sum(counts)))
