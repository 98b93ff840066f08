"""Record filters for `gateway audit`: op groups, path globs, id ranges, times people type.

Everything here works on parsed records (dicts) and is free of I/O and rich. A filter also offers a
cheap test on the raw line (:meth:`RecordFilter.may_match`) that rejects most non-matching lines before
the JSON is parsed; it only ever rejects lines whose parse would be rejected too.
"""

from __future__ import annotations

import fnmatch
import posixpath
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from json.encoder import encode_basestring_ascii as quote  # type: ignore[attr-defined]
from typing import TYPE_CHECKING, Any

from gateway import names
from gateway.names import OPS_BY_NAME

if TYPE_CHECKING:
    from gateway.rules.globs import GlobSet

ALL_OPS = frozenset(OPS_BY_NAME)

# The op groups and what makes an OPEN a write ("open:read" or "open:write"): one table, shared with
# the policy language.
OP_GROUPS = names.OP_GROUPS
OPEN_WRITE_FLAGS = names.OPEN_WRITE_FLAG_NAMES

DECISIONS = ("allow", "deny", "would-deny")


def op_class(record: dict[str, Any]) -> str | None:
    """The record's op class: its op, or open:read / open:write for OPEN."""
    op = record.get("op")
    if op == "open":
        flags = record.get("flags") or ()
        return "open:write" if OPEN_WRITE_FLAGS.intersection(flags) else "open:read"
    return op


def expand_ops(names: Iterable[str]) -> frozenset[str]:
    """Op names and group names to the set of op classes they cover (ValueError for unknown names)."""
    classes: set[str] = set()
    for raw in names:
        name = raw.strip().lower()
        if name in OP_GROUPS:
            classes |= OP_GROUPS[name]
        elif name == "open":
            classes |= {"open:read", "open:write"}
        elif name in ALL_OPS or name in ("open:read", "open:write"):
            classes.add(name)
        else:
            known = ", ".join(sorted(OP_GROUPS)) + ", or an op name (" + ", ".join(sorted(ALL_OPS)) + ")"
            raise ValueError(f"unknown op or group {raw!r}: use {known}")
    return frozenset(classes)


# ---------------------------------------------------------------------------------------------------------
# Path globs: the policy's own language (gateway.rules.globs), so that --path '/etc/**' selects what a
# rule with paths: ['/etc/**'] covers: * within a component, ** across (dir/** is dir too), ?, [...],
# {a,b}. One addition for people searching: a pattern without a slash matches the last component
# anywhere (--path shadow, --path '*.so').


def glob_regex(pattern: str) -> GlobSet:
    """The policy's own matcher (RE2, linear-time): a log's paths were chosen by guests."""
    # Imported here: the policy package loads its schema libraries, and only --path needs it.
    from gateway.rules.globs import GlobError, GlobSet

    if "/" not in pattern:
        pattern = "**/" + pattern
    elif not pattern.startswith(("/", "**")):
        pattern = "/" + pattern
    try:
        return GlobSet.compile([pattern])
    except GlobError as exc:
        raise ValueError(f"bad path pattern {pattern!r}: {exc}") from None


def normal_path(path: str) -> str:
    """Lexically normalised as the engine sees paths (QEMU sends //dir/file): no //, ., .., clamped at /."""
    if path[:1] == "/" and "//" not in path and "/." not in path and path[-1:] != "/":
        return path  # already normal (the common case: normpath would return it as it is)
    path = posixpath.normpath("/" + path)
    return "/" + path.lstrip("/") if path.startswith("//") else path


# ---------------------------------------------------------------------------------------------------------
# Numbers and times


def parse_ranges(values: Iterable[str]) -> list[tuple[int, int]]:
    """ "1000", "1000-59999", "0,1000-1999" -> inclusive ranges."""
    ranges: list[tuple[int, int]] = []
    for value in values:
        for part in value.split(","):
            part = part.strip()
            if not part:
                continue
            low, sep, high = part.partition("-")
            try:
                ranges.append((int(low), int(high) if sep else int(low)))
            except ValueError:
                raise ValueError(f"not a number or range: {part!r}") from None
    return ranges


TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"  # the records' own: string order is time order
_RELATIVE = re.compile(
    r"(\d+(?:\.\d+)?)\s*(s|sec|secs|seconds?|m|min|mins|minutes?|h|hours?|d|days?|w|weeks?)(?:\s+ago)?\Z"
)
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


_BARE_TIME = re.compile(r"(\d{1,2}):(\d{2})(?::(\d{2}))?\Z")
_EPOCH = re.compile(r"@?(\d+(?:\.\d+)?)\Z")
TIME_WORDS = (
    "now", "recent", "today", "yesterday", "this-hour", "this-week", "this-month", "this-year", "boot",
)  # fmt: skip


def boot_time() -> datetime:
    """When the host booted (ausearch's "boot"): btime in /proc/stat."""
    with open("/proc/stat", "rb") as f:
        for line in f:
            if line.startswith(b"btime "):
                return datetime.fromtimestamp(int(line.split()[1]), UTC)
    raise ValueError("the boot time is unknown (no btime in /proc/stat)")


def parse_time(text: str, now: datetime | None = None) -> datetime:
    """When --since / --until mean. ausearch's words: now, recent (10 minutes ago), today, yesterday,
    this-week (since Monday), this-month, this-year, boot; also this-hour; a bare time of day (19:00,
    19:00:30: today, local time); an epoch (1700000000, @1700000000.5); a duration ago (10m, 2h, 3d, 90s,
    1w, "10 minutes ago"); or RFC 3339 (without an offset, or a bare date: local time).
    Returns an aware UTC time."""
    now = (now or datetime.now(UTC)).astimezone(UTC)
    word = text.strip().lower().replace("_", "-").replace(" ", "-")
    local_now = now.astimezone()
    midnight = local_now.replace(hour=0, minute=0, second=0, microsecond=0)
    if word == "now":
        return now
    if word == "recent":
        return now - timedelta(minutes=10)
    if word == "today":
        return midnight.astimezone(UTC)
    if word == "yesterday":
        return (midnight - timedelta(days=1)).astimezone(UTC)
    if word == "this-hour":
        return local_now.replace(minute=0, second=0, microsecond=0).astimezone(UTC)
    if word == "this-week":  # ISO weeks start on Monday
        return (midnight - timedelta(days=midnight.weekday())).astimezone(UTC)
    if word == "this-month":
        return midnight.replace(day=1).astimezone(UTC)
    if word == "this-year":
        return midnight.replace(month=1, day=1).astimezone(UTC)
    if word == "boot":
        return boot_time()
    bare = _BARE_TIME.match(word)
    if bare:
        hour, minute, second = int(bare.group(1)), int(bare.group(2)), int(bare.group(3) or 0)
        try:
            return midnight.replace(hour=hour, minute=minute, second=second).astimezone(UTC)
        except ValueError:
            raise ValueError(f"not a time of day: {text!r}") from None
    epoch = _EPOCH.match(word)
    if epoch and (word.startswith("@") or len(epoch.group(1).split(".")[0]) >= 5):
        # (a bare number of at least five digits: a year is four, and 19:00 has a colon)
        return datetime.fromtimestamp(float(epoch.group(1)), UTC)
    if _RELATIVE.match(text.strip().lower()):
        return now - timedelta(seconds=parse_duration(text))
    try:
        moment = datetime.fromisoformat(text.strip().replace("z", "Z"))
    except ValueError:
        raise ValueError(
            f"not a time: {text!r} (use {', '.join(TIME_WORDS)}, a time of day (19:00), an epoch "
            "(@1700000000), 10m / 2h / 3d ago, or RFC 3339)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.astimezone()  # naive: the operator's local time
    return moment.astimezone(UTC)


def parse_duration(text: str) -> float:
    """ "90s", "5m", "1h", "1d", "2w" (as --since takes them) -> seconds."""
    match = _RELATIVE.match(text.strip().lower())
    if not match:
        raise ValueError(f"not a duration: {text!r} (use 90s, 5m, 1h, 1d, 1w)")
    unit = match.group(2)
    return float(match.group(1)) * _UNIT_SECONDS["m" if unit.startswith("min") else unit[0]]


def time_key(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime(TIME_FORMAT)


# ---------------------------------------------------------------------------------------------------------
# The filter


_LITERAL = re.compile(r"[A-Za-z0-9._-]+\Z")


def _literal(pattern: str) -> bytes | None:
    """The longest component of a path glob that can only match itself (letters, digits, . _ -), as the
    bytes that must then be in the raw line: a path the glob matches has that component, lexical
    normalisation never makes one up, and JSON leaves those characters as they are. None if there is
    none (every component has a wildcard, a class or alternatives)."""
    parts = [c for c in pattern.split("/") if _LITERAL.match(c) and c not in (".", "..")]
    return max(parts, key=len).encode() if parts else None


def _needle_test(needles: list[tuple[bytes, ...]]) -> Callable[[bytes], bool]:
    """may_match for these needles as one generated expression (as fields.py generates its encoders): a
    chain of `in` tests costs a third of all()/any() over generators, and it runs once a line."""
    if not needles:
        return lambda line: True
    namespace: dict[str, Any] = {}
    groups = []
    for i, alternatives in enumerate(needles):
        names = []
        for j, needle in enumerate(alternatives):
            namespace[f"n{i}_{j}"] = needle
            names.append(f"n{i}_{j} in line")
        groups.append("(" + " or ".join(names) + ")")
    source = "def may_match(line):\n    return (" + " and ".join(groups) + ") or line[:7] != b'{\"seq\":'\n"
    exec(source, namespace)
    return namespace["may_match"]  # type: ignore[no-any-return]


def _split(values: Iterable[str] | None) -> list[str]:
    return [v.strip() for value in values or () for v in value.split(",") if v.strip()]


@dataclass
class RecordFilter:
    """All given conditions must hold; each condition's values are alternatives."""

    tenants: list[str] = field(default_factory=list)
    decisions: list[str] = field(default_factory=list)
    ops: frozenset[str] = frozenset()
    paths: list[GlobSet] = field(default_factory=list)
    rules: list[str] = field(default_factory=list)
    uids: list[tuple[int, int]] = field(default_factory=list)
    gids: list[tuple[int, int]] = field(default_factory=list)
    since: str | None = None
    until: str | None = None
    results: list[str] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    failed: bool = False  # aureport's --failed: denied, would-deny, or a result other than ok
    path_texts: list[str] = field(default_factory=list)  # the --path patterns as given
    _tests: list[Callable[[dict[str, Any]], bool]] = field(default_factory=list, repr=False)
    _needles: list[tuple[bytes, ...]] = field(default_factory=list, repr=False)

    @classmethod
    def build(
        cls, *, tenant: Iterable[str] | None = None, decision: Iterable[str] | None = None,
        op: Iterable[str] | None = None, path: Iterable[str] | None = None, rule: Iterable[str] | None = None,
        uid: Iterable[str] | None = None, gid: Iterable[str] | None = None, since: str | None = None,
        until: str | None = None, result: Iterable[str] | None = None, event: Iterable[str] | None = None,
        now: datetime | None = None, failed: bool = False,
    ) -> RecordFilter:  # fmt: skip
        """From the command line's strings (each may be comma-separated); ValueError names a bad one."""
        decisions = [d.lower() for d in _split(decision)]
        for d in decisions:
            if d not in DECISIONS:
                raise ValueError(f"unknown decision {d!r}: use {', '.join(DECISIONS)}")
        f = cls(
            tenants=_split(tenant),
            decisions=decisions,
            ops=expand_ops(_split(op)) if op else frozenset(),
            paths=[glob_regex(p) for p in (path or ()) if p],
            rules=_split(rule),
            uids=parse_ranges(uid or ()),
            gids=parse_ranges(gid or ()),
            since=time_key(parse_time(since, now)) if since else None,
            until=time_key(parse_time(until, now)) if until else None,
            results=[r.upper() if r.lower() not in ("ok", "error") else r.lower() for r in _split(result)],
            events=[e.lower() for e in _split(event)],
            failed=failed,
            path_texts=[p for p in (path or ()) if p],
        )
        f._compile()
        return f

    def __getstate__(self) -> dict[str, Any]:
        # The compiled tests are closures (not picklable); a worker process compiles its own.
        return {k: v for k, v in self.__dict__.items() if k not in ("_tests", "_needles", "may_match")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _tests=[], _needles=[])
        self._compile()

    def _compile(self) -> None:
        tests = self._tests
        needles = self._needles
        if self.tenants:
            names = self.tenants
            globbed = any(set(n) & set("*?[") for n in names)
            tests.append(lambda r: any(fnmatch.fnmatchcase(str(r.get("tenant", "")), n) for n in names))
            if not globbed:
                needles.append(tuple(b'"tenant":' + quote(n).encode() for n in names))
        if self.decisions:
            allowed = frozenset(self.decisions)
            tests.append(lambda r: r.get("decision") in allowed)
            needles.append(tuple(b'"decision":' + quote(d).encode() for d in allowed))
        if self.events:
            events = frozenset(self.events)
            lifecycle = "lifecycle" in events
            tests.append(lambda r: r.get("event") in events or (lifecycle and r.get("event") != "request"))
            if not lifecycle:
                needles.append(tuple(b'"event":' + quote(e).encode() for e in events))
        if self.ops:
            ops = self.ops
            tests.append(lambda r: op_class(r) in ops)
            needles.append(tuple(sorted({b'"op":' + quote(o.split(":")[0]).encode() for o in ops})))
        if self.paths:
            patterns = self.paths
            # The request's paths and the canonical ones the rules decided on (resolved, resolved2):
            # a search for /home/alice/** finds a request that reached it through a symlink.
            def on_path(r: dict[str, Any]) -> bool:
                for key in ("path", "path2", "resolved", "resolved2"):
                    v = r.get(key)
                    if v.__class__ is str:
                        v = normal_path(v)
                        for p in patterns:
                            if p.matches(v):
                                return True
                return False

            tests.append(on_path)
            literals = [_literal(text) for text in self.path_texts]
            if literals and all(literals):
                needles.append(tuple(literals))  # type: ignore[arg-type]
        if self.rules:
            wanted = self.rules
            none = any(w.lower() in ("none", "-") for w in wanted)
            tests.append(lambda r: (r.get("rule") is None and none and "decision" in r) or any(
                isinstance(r.get("rule"), str) and fnmatch.fnmatchcase(r["rule"], w) for w in wanted
            ))  # fmt: skip
            if not any(set(w) & set("*?[") for w in wanted):
                needles.append(tuple(
                    b'"rule":null' if w.lower() in ("none", "-") else b'"rule":' + quote(w).encode()
                    for w in wanted
                ))  # fmt: skip
        for key, ranges in (("uid", self.uids), ("gid", self.gids)):
            if ranges:
                tests.append(lambda r, key=key, ranges=ranges: isinstance(r.get(key), int) and any(
                    low <= r[key] <= high for low, high in ranges
                ))  # fmt: skip
        if self.since is not None:
            since = self.since
            tests.append(lambda r: str(r.get("time", "")) >= since)
        if self.until is not None:
            until = self.until
            tests.append(lambda r: str(r.get("time", "")) < until)
        if self.results:
            results = frozenset(self.results)
            error = "error" in results
            tests.append(lambda r: r.get("result") in results or (error and r.get("result", "ok") != "ok"))
            if not error:
                needles.append(tuple(b'"result":' + quote(r).encode() for r in results))
        if self.failed:
            tests.append(lambda r: r.get("event", "request") == "request" and (
                r.get("decision") in ("deny", "would-deny") or r.get("result", "ok") != "ok"
            ))  # fmt: skip

        self.may_match = _needle_test(needles)  # type: ignore[method-assign]

    @property
    def active(self) -> bool:
        return bool(self._tests)

    def may_match(self, line: bytes) -> bool:
        """False only when the line cannot match: a needed key:value pair is absent from the raw bytes.
        (Inside a JSON string every quote is escaped, so '"decision":"deny"' can only be the member.)
        Only lines in the writer's own compact shape are judged; anything else goes on to be parsed.
        (_compile replaces this with a function generated for the filter's needles.)"""
        if not line.startswith(b'{"seq":'):
            return True
        return all(any(n in line for n in alternatives) for alternatives in self._needles)

    def __call__(self, record: dict[str, Any]) -> bool:
        return all(test(record) for test in self._tests)
