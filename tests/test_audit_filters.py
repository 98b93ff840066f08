"""Filters for `gateway audit`: op groups, globs, ranges, times, and the raw-line pre-test."""

from __future__ import annotations

import itertools
import json
import os
from datetime import UTC, datetime, timedelta

import pytest

from gateway import protocol as p
from gateway.audit.fields import request_fields
from gateway.audit.filters import (
    ALL_OPS,
    OP_GROUPS,
    RecordFilter,
    expand_ops,
    glob_regex,
    op_class,
    parse_duration,
    parse_ranges,
    parse_time,
)

NOW = datetime(2026, 11, 22, 7, 41, 29, 123456, tzinfo=UTC)


def rec(request: p.Request, decision: str = "allow", **over) -> dict:
    record = {
        "seq": 1,
        "time": "2026-11-22T07:00:00.000000Z",
        "tenant": "guest-42",
        "policy": "ab",
        "event": "request",
        **request_fields(request),
        "decision": decision,
        "rule": "homes",
        "reason": "",
        "result": "ok",
        "us": 1.0,
        "prev": "0" * 64,
    }
    record.update(over)
    return record


def test_groups_are_the_policy_languages_groups() -> None:
    from gateway.rules import model

    def name(slot: int) -> str:
        return {model.OPEN_READ: "open:read", model.OPEN_WRITE: "open:write"}.get(slot) or model.SLOT_NAMES[
            slot
        ]

    assert {group: frozenset(name(s) for s in slots) for group, slots in model.GROUPS.items()} == OP_GROUPS


def test_groups_cover_every_op_and_name_only_known_ones() -> None:
    classes = set().union(*OP_GROUPS.values())
    assert classes == (ALL_OPS - {"open"}) | {"open:read", "open:write"}
    assert OP_GROUPS["all"] == classes
    assert OP_GROUPS["read"].isdisjoint(OP_GROUPS["write"])


@pytest.mark.parametrize(("flags", "cls"), [
    (os.O_RDONLY, "open:read"),
    (os.O_RDONLY | os.O_NOFOLLOW | os.O_DIRECTORY, "open:read"),
    (os.O_WRONLY, "open:write"),
    (os.O_RDWR, "open:write"),
    (os.O_RDONLY | os.O_TRUNC, "open:write"),
    (os.O_RDONLY | os.O_APPEND, "open:write"),
    (os.O_RDONLY | os.O_CREAT, "open:write"),
])  # fmt: skip
def test_open_is_a_write_by_its_flags(flags: int, cls: str) -> None:
    assert op_class(rec(p.Open(b"/x", flags))) == cls


def test_expand_ops() -> None:
    assert expand_ops(["open"]) == {"open:read", "open:write"}
    assert expand_ops(["read", "chmod"]) == OP_GROUPS["read"] | {"chmod"}
    assert expand_ops(["XATTR"]) == OP_GROUPS["xattr"]
    with pytest.raises(ValueError, match="wirte"):
        expand_ops(["wirte"])


@pytest.mark.parametrize(("pattern", "yes", "no"), [
    ("/etc/**", ["/etc", "/etc/passwd", "/etc/ssh/sshd_config"], ["/etcetera", "/home/etc/x"]),
    ("/etc/*", ["/etc/passwd"], ["/etc/ssh/sshd_config", "/etc"]),
    ("/home/*/.ssh/**", ["/home/a/.ssh/id_rsa", "/home/b/.ssh"], ["/home/a/b/.ssh/x"]),
    ("**/.ssh/**", ["/home/a/.ssh/id_rsa", "/root/.ssh"], ["/home/a/ssh"]),
    ("*.so", ["/usr/lib/x.so", "x.so"], ["/usr/lib/x.so.6"]),
    ("/usr/lib/*.so.?", ["/usr/lib/libc.so.6"], ["/usr/lib/libc.so.66"]),
    ("/tmp/[abc]*", ["/tmp/apple"], ["/tmp/dog"]),
    ("/tmp/[!abc]*", ["/tmp/dog"], ["/tmp/apple"]),
    ("/{etc,usr}/**", ["/etc/x", "/usr/bin/x"], ["/var/x"]),
    ("/a+b(c)", ["/a+b(c)"], ["/aab(c)"]),
    ("/etc/**", ["//etc/x", "/etc/./x", "/tmp/../etc/x"], ["/etc/../tmp"]),  # normalised as the engine does
    ("etc/*", ["/etc/x"], []),
])  # fmt: skip
def test_globs(pattern: str, yes: list[str], no: list[str]) -> None:
    flt = RecordFilter.build(path=[pattern])
    for path in yes:
        assert flt(rec(p.Lstat(path.encode()))), (pattern, path)
    for path in no:
        assert not flt(rec(p.Lstat(path.encode()))), (pattern, path)
    with pytest.raises(ValueError, match="bad path pattern"):
        glob_regex("/etc/[abc")


def test_ranges() -> None:
    assert parse_ranges(["1000", "0,2000-2999"]) == [(1000, 1000), (0, 0), (2000, 2999)]
    with pytest.raises(ValueError):
        parse_ranges(["ten"])


def test_times() -> None:
    assert parse_time("2026-11-22T07:00:00Z", NOW) == datetime(2026, 11, 22, 7, tzinfo=UTC)
    assert parse_time("2026-11-22T09:00:00+02:00", NOW) == datetime(2026, 11, 22, 7, tzinfo=UTC)
    assert parse_time("10m", NOW) == NOW - timedelta(minutes=10)
    assert parse_time("2h ago", NOW) == NOW - timedelta(hours=2)
    assert parse_time("3 days ago", NOW) == NOW - timedelta(days=3)
    assert parse_time("90s", NOW) == NOW - timedelta(seconds=90)
    assert parse_time("now", NOW) == NOW
    local = NOW.astimezone()
    midnight = local.replace(hour=0, minute=0, second=0, microsecond=0)
    assert parse_time("today", NOW) == midnight
    assert parse_time("yesterday", NOW) == midnight - timedelta(days=1)
    assert parse_time("this-hour", NOW) == local.replace(minute=0, second=0, microsecond=0)
    assert parse_time("2026-11-22", NOW) == datetime(2026, 11, 22).astimezone()  # a bare date: local
    assert parse_duration("5m") == 300 and parse_duration("1d") == 86400
    with pytest.raises(ValueError, match="not a time"):
        parse_time("last tuesday", NOW)


def build(**kw) -> RecordFilter:
    return RecordFilter.build(now=NOW, **kw)


def test_each_filter() -> None:
    shadow = rec(p.Open(b"/etc/shadow", os.O_RDWR), "deny", rule="system-read-only", result="EROFS")
    passwd = rec(p.Open(b"/etc/passwd", os.O_RDONLY), rule="read-anything")
    mkdir = rec(p.Mkdir(1000, 100, b"/home/a/d", 0o755), rule=None, time="2026-11-22T07:30:00.000000Z")
    rename = rec(p.Rename(b"/home/a/x", b"/etc/x"), "would-deny", tenant="other", result="ENOENT")
    start = {"seq": 9, "time": "2026-11-22T07:40:00.000000Z", "tenant": "guest-42", "event": "start"}
    everything = [shadow, passwd, mkdir, rename, start]

    def kept(**kw) -> list[dict]:
        return [r for r in everything if build(**kw)(r)]

    assert kept() == everything
    assert kept(decision=["deny,would-deny"]) == [shadow, rename]
    assert kept(op=["write"]) == [shadow, mkdir, rename]
    assert kept(op=["read"]) == [passwd]
    assert kept(op=["create"]) == [mkdir, rename]
    assert kept(op=["delete"]) == [rename]
    assert kept(op=["open"]) == [shadow, passwd]
    assert kept(path=["/etc/**"]) == [shadow, passwd, rename]  # rename's new name is under /etc
    assert kept(path=["shadow"]) == [shadow]
    assert kept(rule=["system-*"]) == [shadow]
    assert kept(rule=["none"]) == [mkdir]
    assert kept(uid=["1000-1999"]) == [mkdir]
    assert kept(gid=["100"]) == [mkdir]
    assert kept(tenant=["other"]) == [rename]
    assert kept(tenant=["guest-*"]) == [shadow, passwd, mkdir, start]
    assert kept(since="2026-11-22T07:30:00Z") == [mkdir, start]
    assert kept(until="2026-11-22T07:30:00Z") == [shadow, passwd, rename]
    assert kept(since="5m") == [start]  # NOW is 07:41:29
    assert kept(result=["error"]) == [shadow, rename]
    assert kept(result=["enoent"]) == [rename]
    assert kept(event=["lifecycle"]) == [start]
    assert kept(event=["request"]) == [shadow, passwd, mkdir, rename]
    assert kept(decision=["deny"], path=["/etc/**"], op=["write"]) == [shadow]
    with pytest.raises(ValueError, match="unknown decision"):
        build(decision=["maybe"])


def test_the_raw_line_pre_test_never_rejects_a_match() -> None:
    from gateway.audit.fields import request_fragment
    from gateway.audit.writer import AuditWriter  # noqa: F401  (the writer's own encoding below)

    requests = [
        p.Open(b"/etc/shadow", os.O_RDWR),
        p.Lstat(b"//etc/./shadow"),
        p.Lstat(b"/x/../etc/shadow/"),
        p.Lstat(b'/odd "decision":"deny" \\ name'),
        p.Mkdir(0, 0, b"/\xff", 0o755),
    ]
    filters = [build(decision=[d]) for d in ("allow", "deny", "would-deny")]
    filters += [build(tenant=[t]) for t in ("guest-42", 'we"ird', "other")]
    filters += [build(decision=["deny"], tenant=["guest-42"]), build(op=["write"], decision=["allow"])]
    filters += [build(rule=[r]) for r in ("none", "homes", 'a"b', "hom*")]
    filters += [build(op=[o]) for o in ("open", "read", "mkdir", "lstat", "create")]
    filters += [build(result=[r]) for r in ("ok", "ENOENT", "error")]
    filters += [build(event=[e]) for e in ("request", "start", "lifecycle")]
    filters += [build(path=[g]) for g in ("/etc/**", "shadow", "/odd*", "/*/shadow", "**/\xff", "/{etc,x}/*")]
    for request, decision, tenant, rule, result in itertools.product(
        requests, ("allow", "deny", "would-deny"), ("guest-42", 'we"ird'), (None, "homes", 'a"b'),
        ("ok", "ENOENT"),
    ):  # fmt: skip
        line = (
            '{"seq":1,"time":"2026-11-22T07:00:00.000000Z","tenant":'
            + json.dumps(tenant)
            + ',"policy":"ab","event":"request",'
            + request_fragment(request)
            + f',"decision":"{decision}","rule":{json.dumps(rule)},"reason":"","result":"{result}","us":1.0'
            + ',"prev":"0"}'
        )
        record = json.loads(line)
        for flt in filters:
            if flt(record):
                assert flt.may_match(line.encode()), (flt, line)
    odd = rec(p.Lstat(b'/odd "decision":"deny"'))
    assert not build(decision=["deny"]).may_match(json.dumps(odd, separators=(",", ":")).encode())
    compact = json.dumps(rec(p.Lstat(b"/x")), separators=(",", ":")).encode()
    assert not build(rule=["other"]).may_match(compact) and build(rule=["homes"]).may_match(compact)
    assert not build(op=["mkdir"]).may_match(compact) and not build(result=["ENOENT"]).may_match(compact)
    assert build(decision=["deny"]).may_match(b"not the writer's shape")  # parsed, then judged
    assert not build(path=["/etc/**"]).may_match(compact) and build(path=["/x*"]).may_match(compact)
    assert build(path=["/home/**", "/x"]).may_match(compact)


def test_every_time_word() -> None:
    """ausearch's words, bare times of day and epochs (NOW is a Sunday: 2026-11-22)."""
    local = NOW.astimezone()
    midnight = local.replace(hour=0, minute=0, second=0, microsecond=0)
    assert parse_time("recent", NOW) == NOW - timedelta(minutes=10)
    assert parse_time("this-week", NOW) == midnight - timedelta(days=midnight.weekday())
    assert parse_time("this-week", NOW).astimezone().weekday() == 0  # since Monday
    assert parse_time("this-month", NOW) == midnight.replace(day=1)
    assert parse_time("this-year", NOW) == midnight.replace(month=1, day=1)
    assert parse_time("this hour", NOW) == parse_time("this-hour", NOW)
    boot = parse_time("boot", NOW)
    assert boot < datetime.now(UTC) and boot.tzinfo is not None
    with open("/proc/stat") as f:
        btime = next(int(line.split()[1]) for line in f if line.startswith("btime "))
    assert boot == datetime.fromtimestamp(btime, UTC)
    assert parse_time("19:00", NOW) == midnight.replace(hour=19)
    assert parse_time("07:05:09", NOW) == midnight.replace(hour=7, minute=5, second=9)
    assert parse_time("1700000000", NOW) == datetime.fromtimestamp(1700000000, UTC)
    assert parse_time("@1700000000.5", NOW) == datetime.fromtimestamp(1700000000.5, UTC)
    assert parse_time("@86400", NOW) == datetime(1970, 1, 2, tzinfo=UTC)
    for bad in ("25:00", "7:61", "this-decade", "12", "@x"):
        with pytest.raises(ValueError):
            parse_time(bad, NOW)


def test_path_also_matches_the_canonical_paths_decided_on() -> None:
    flt = build(path=["/home/alice/**"])
    via_link = dict(rec(p.Lstat(b"/link/notes.txt")), resolved="/home/alice/notes.txt")
    assert flt(via_link) and not flt(rec(p.Lstat(b"/link/notes.txt")))
    renamed = dict(rec(p.Rename(b"/tmp/a", b"/l/b")), resolved2="/home/alice/b")
    assert flt(renamed)


def test_failed_keeps_denials_and_errors() -> None:
    flt = build(failed=True)
    assert flt(rec(p.Lstat(b"/x"), decision="deny", result="EACCES"))
    assert flt(rec(p.Lstat(b"/x"), decision="would-deny"))
    assert flt(rec(p.Lstat(b"/x"), result="ENOENT"))
    assert not flt(rec(p.Lstat(b"/x")))
    assert not flt({"event": "start", "seq": 1})
