"""A tenant's id map and limits: unit-level with a fake clock, and end to end with a real gateway (create as
guest 1000 lands as the mapped host id, LSTAT shows the guest id, unmapped ids refused or squashed, a
truncate over the cap refused, a rate that slows and never fails)."""

from __future__ import annotations

import errno
import json
import os
import stat
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import over_socketpair, require_root

from gateway import protocol as p
from gateway import tenancy
from gateway.rules import load_policy_text

MAPPED = """\
version: 1
tenant: mapped
default: allow
rules:
  - id: guest-root-may-not-chown-to-alice
    effect: deny
    ops: [chown]
    when: {uid: [1000]}
ids:
  uid: [{guest: 0, host: 100000, count: 65536}]
  gid: [{guest: 0, host: 100000, count: 65536}]
  unmapped: UNMAPPED
limits:
  truncate_max: 1M
"""


def _policy(unmapped: str = "forbid") -> object:
    return load_policy_text(MAPPED.replace("UNMAPPED", unmapped), "mapped.yaml")


def test_translator_maps_owner_fields_and_refuses_unmapped() -> None:
    t = tenancy.IdTranslator(_policy().ids)  # type: ignore[attr-defined]
    mapped = t.to_host(p.Create(b"/f", os.O_CREAT, 0o644, 1000, 1000))
    assert (mapped.uid, mapped.gid) == (101000, 101000)  # type: ignore[union-attr]
    assert t.to_host(p.Lstat(b"/f")) == p.Lstat(b"/f")  # no owner field: untouched
    with pytest.raises(tenancy.Refused) as refused:
        t.to_host(p.Chown(b"/f", 70000, 0))
    assert refused.value.errno == errno.EPERM and refused.value.rule == "ids.unmapped"
    assert t.to_host(p.Chown(b"/f", 0xFFFFFFFF, 5)).uid == 0xFFFFFFFF  # type: ignore[union-attr]
    squash = tenancy.IdTranslator(_policy("squash").ids)  # type: ignore[attr-defined]
    assert squash.to_host(p.Mkdir(70000, 70000, b"/d", 0o755)).uid == 65534  # type: ignore[union-attr]


def _fake_stat(uid: int, gid: int) -> SimpleNamespace:
    return SimpleNamespace(
        st_dev=1, st_ino=2, st_nlink=1, st_mode=stat.S_IFREG | 0o644, st_uid=uid, st_gid=gid, st_rdev=0,
        st_size=5, st_blksize=4096, st_blocks=8, st_atime_ns=1, st_mtime_ns=2, st_ctime_ns=3,
    )  # fmt: skip


def test_translator_inverts_lstat_payloads_and_object_owners() -> None:
    t = tenancy.IdTranslator(_policy().ids)  # type: ignore[attr-defined]
    st = _fake_stat(101000, 100100)
    payload = p.stat_payload(st)
    back = p.parse_stat(t.stat_payload_to_guest(payload))
    assert (back.uid, back.gid, back.mode, back.size) == (1000, 100, stat.S_IFREG | 0o644, 5)
    outside = p.parse_stat(t.stat_payload_to_guest(p.stat_payload(_fake_stat(0, 0))))
    assert (outside.uid, outside.gid) == (65534, 65534)  # host root is nobody to the guest
    attrs = t.attrs_to_guest(st)
    assert (attrs.owner, attrs.group, attrs.type) == (1000, 100, stat.S_IFREG)


def test_truncate_cap() -> None:
    tenancy.check_truncate(p.Truncate(b"/f", 1 << 20), 1 << 20)
    with pytest.raises(tenancy.Refused) as refused:
        tenancy.check_truncate(p.Truncate(b"/f", (1 << 20) + 1), 1 << 20)
    assert refused.value.errno == errno.EFBIG
    tenancy.check_truncate(p.Truncate(b"/f", 1 << 40), None)


def test_rate_limiter_sleeps_exactly_enough_on_a_fake_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [100.0]
    slept: list[float] = []
    monkeypatch.setattr(tenancy.time, "monotonic", lambda: clock[0])

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        clock[0] += seconds + 0.0001  # sleeps overshoot a little: the overshoot is credited back

    monkeypatch.setattr(tenancy.time, "sleep", sleep)
    limiter = tenancy.RateLimiter(rate=100.0, burst=10)
    for _ in range(10):  # the burst goes through at once
        assert limiter.take() == 0.0
    for _ in range(100):  # then one every 10 ms
        limiter.take()
    assert len(slept) == 100 and all(s <= 0.0101 for s in slept)
    assert 0.98 <= clock[0] - 100.0 <= 1.02  # 100 requests past the burst took about a second at 100/s
    clock[0] += 5.0
    summary = limiter.summary_due()
    assert summary is not None and summary["delayed"] == 100
    assert limiter.summary_due() is None  # counted once


def _records(trail: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in trail.read_text().splitlines()]


def test_mapping_end_to_end(tmp_path: Path) -> None:
    require_root()
    export = tmp_path / "export"
    export.mkdir()
    os.chown(export, 100000, 100000)  # guest root's export, as the host stores it
    policy = tmp_path / "mapped.yaml"
    policy.write_text(MAPPED.replace("UNMAPPED", "forbid"))
    trail = tmp_path / "trail.jsonl"
    serve = [sys.executable, "-m", "gateway", "serve"]
    with over_socketpair(serve, export, extra=["--policy", str(policy), "--audit-log", str(trail)]) as gw:
        c = gw.client
        fd = c.create(b"/alice.txt", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644, 1000, 1000)
        os.close(fd)
        c.mkdir(b"/d", 0o755, uid=0, gid=0)
        assert (os.stat(export / "alice.txt").st_uid, os.stat(export / "alice.txt").st_gid) == (
            101000,
            101000,
        )
        assert os.stat(export / "d").st_uid == 100000  # guest root is an unprivileged host id
        st = c.lstat(b"/alice.txt")
        assert (st.uid, st.gid) == (1000, 1000)  # the guest sees its own ids back
        assert c.lstat(b"/").uid == 0
        # An unmapped id is refused and nothing changes.
        assert c.call(p.Chown(b"/alice.txt", 70000, 1000)).errno == errno.EPERM
        assert c.call(p.Mkdir(70000, 0, b"/x", 0o755)).errno == errno.EPERM and not (export / "x").exists()
        # The rules see guest ids: this deny names guest uid 1000, not host 101000.
        assert c.call(p.Chown(b"/d", 1000, 0)).errno == errno.EACCES
        c.chown(b"/d", 2000, 2000)
        assert os.stat(export / "d").st_uid == 102000
        # The truncate cap.
        assert c.call(p.Truncate(b"/alice.txt", 2 << 20)).errno == errno.EFBIG
        c.truncate(b"/alice.txt", 1 << 20)
    requests = [r for r in _records(trail) if r["event"] == "request"]
    create = next(r for r in requests if r["op"] == "create")
    assert (create["uid"], create["host_uid"], create["host_gid"]) == (1000, 101000, 101000)
    refused = [r["rule"] for r in requests if r["decision"] == "deny"]
    assert refused == [
        "ids.unmapped",
        "ids.unmapped",
        "guest-root-may-not-chown-to-alice",
        "limits.truncate_max",
    ]


def test_squash_end_to_end(tmp_path: Path) -> None:
    require_root()
    export = tmp_path / "export"
    export.mkdir()
    policy = tmp_path / "squash.yaml"
    policy.write_text(MAPPED.replace("UNMAPPED", "squash"))
    serve = [sys.executable, "-m", "gateway", "serve"]
    with over_socketpair(
        serve, export, extra=["--policy", str(policy), "--audit-log", str(tmp_path / "t")]
    ) as gw:
        gw.client.mkdir(b"/d", 0o755, uid=70000, gid=70000)
        assert os.stat(export / "d").st_uid == 65534
        assert gw.client.lstat(b"/d").uid == 65534  # a host id outside every range: the overflow id


def test_rate_limit_slows_never_fails_and_is_recorded(tmp_path: Path) -> None:
    require_root()
    export = tmp_path / "export"
    export.mkdir()
    policy = tmp_path / "rate.yaml"
    policy.write_text(
        "version: 1\ntenant: r\ndefault: allow\nrules: []\n"
        "limits:\n  rate: {requests_per_second: 100, burst: 5}\n"
    )
    trail = tmp_path / "trail.jsonl"
    serve = [sys.executable, "-m", "gateway", "serve"]
    with over_socketpair(serve, export, extra=["--policy", str(policy), "--audit-log", str(trail)]) as gw:
        replies = [gw.client.call(p.Lstat(b"/")).errno for _ in range(40)]
    assert replies == [0] * 40  # over the rate: slowed, not failed
    limits = [r for r in _records(trail) if r["event"] == "limit"]
    assert limits and limits[0]["limit"] == "rate"
    assert sum(int(r["delayed"]) for r in limits) >= 30  # 40 requests, a burst of 5: the rest waited
