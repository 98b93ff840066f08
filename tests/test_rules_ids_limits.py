"""The policy's `ids:` (guest<->host id map) and `limits:` sections: validation with lines, the map both
ways at the edges of its ranges, forbid vs squash, -1 untouched, sizes, defaults."""

from __future__ import annotations

import random
import textwrap
from pathlib import Path

import pytest

from gateway.rules import IdMap, IdRange, Limits, PolicyError, load_policy, load_policy_text
from gateway.rules.idmap import ID_LAST, NO_ID, range_problems
from gateway.rules.lint import lint
from gateway.rules.model import format_size, parse_size

ROOT = Path(__file__).resolve().parent.parent
HEAD = "version: 1\ndefault: allow\n"


def load(text: str):
    return load_policy_text(HEAD + textwrap.dedent(text), "p.yaml")


def problems(text: str) -> list[str]:
    with pytest.raises(PolicyError) as info:
        load(text)
    return [str(p) for p in info.value.problems]


SHIFTED = """\
ids:
  uid:
    - {guest: 0, host: 100000, count: 65536}
  gid:
    - {guest: 0, host: 200000, count: 1000}
"""

# --------------------------------------------------------------------------------------------------------
# Validation: each bad case, with its line.


UID = "  uid: {guest: 0, host: 0, count: 1}\n"
GID = "  gid: {guest: 0, host: 0, count: 1}\n"
UNCHANGED = "(4294967295 is -1, which means 'unchanged')"
NOT_A_SIZE = "is not a size such as 10G (a whole number, optionally with K, M, G or T: powers of 1024)"


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        # Overlaps, on either side, within uid or gid (never between uid and gid: they are separate spaces).
        ("ids:\n  uid:\n    - {guest: 0, host: 100000, count: 100}\n"
         "    - {guest: 50, host: 300000, count: 10}\n" + GID,
         ["p.yaml:6: ids.uid[1]: guest ids 50-59 overlap guest ids 0-99 of ids.uid[0] (line 5): each guest "
          "id may be in one range only"]),
        ("ids:\n" + UID + "  gid:\n    - {guest: 0, host: 500, count: 10}\n"
         "    - {guest: 10, host: 509, count: 10}\n",
         ["p.yaml:7: ids.gid[1]: host ids 509-518 overlap host ids 500-509 of ids.gid[0] (line 6): each host "
          "id may be in one range only"]),
        # The later-listed range is the one reported, whichever comes first in id order.
        ("ids:\n  uid:\n    - {guest: 100, host: 0, count: 10}\n    - {guest: 0, host: 5, count: 10}\n" + GID,
         ["p.yaml:6: ids.uid[1]: host ids 5-14 overlap host ids 0-9 of ids.uid[0] (line 5): each host id may "
          "be in one range only"]),
        ("ids:\n  uid: {guest: 0, host: 4294967000, count: 65536}\n" + GID,
         ["p.yaml:4: ids.uid[0]: host ids 4294967000-4295032535 are outside 0-4294967294 (4294967295 is -1, "
          "which means 'unchanged', and is never mapped)"]),
        ("ids:\n  uid: {guest: 0, host: 0, count: 0}\n" + GID,
         ["p.yaml:4: ids.uid[0].count: must be at least 1"]),
        ("ids:\n  uid: {guest: -1, host: 0, count: 1}\n" + GID,
         ["p.yaml:4: ids.uid[0].guest: must be at least 0"]),
        ("ids:\n  uid: {guest: 0, host: 4294967295, count: 1}\n" + GID,
         [f"p.yaml:4: ids.uid[0].host: must be at most 4294967294 {UNCHANGED}"]),
        ("ids:\n  uid: {guest: 0, host: 0, count: true}\n" + GID,
         ["p.yaml:4: ids.uid[0].count: must be a whole number, not true/false"]),
        ("ids:\n  uid: {guest: 0, host: 0}\n" + GID, ["p.yaml:4: ids.uid[0].count: missing (required)"]),
        ("ids:\n  uid: {guest: 0, hots: 0, count: 1}\n" + GID,
         ["p.yaml:4: ids.uid[0].host: missing (required)",
          "p.yaml:4: ids.uid: unknown field 'hots' (did you mean 'host'?)"]),
        ("ids:\n" + UID, ["p.yaml:3: ids.gid: missing (required)"]),
        ("ids:\n  uid: []\n" + GID, ["p.yaml:4: ids.uid: must not be empty"]),
        ("ids:\n  uid: 100000\n" + GID, ["p.yaml:4: ids.uid: must be a mapping, not the number 100000"]),
        ("ids:\n" + UID + GID + "  unmapped: drop\n",
         ["p.yaml:6: ids.unmapped: the text 'drop' is not allowed: use forbid or squash"]),
        ("ids:\n" + UID + GID + "  squash_gid: 4294967295\n",
         [f"p.yaml:6: ids.squash_gid: must be at most 4294967294 {UNCHANGED}"]),
        ("ids:\n" + UID + GID + "  squash: 1\n",
         ["p.yaml:6: ids: unknown field 'squash' (did you mean 'squash_uid'?)"]),
        ("ids:\n", ["p.yaml:3: ids: must not be empty"]),
        ("limits:\n  rate: {requests_per_second: 0}\n",
         ["p.yaml:4: limits.rate.requests_per_second: must be a positive number, not 0"]),
        ("limits:\n  rate: {requests_per_second: -2.5}\n",
         ["p.yaml:4: limits.rate.requests_per_second: must be a positive number, not -2.5"]),
        ("limits:\n  rate: {requests_per_second: fast}\n",
         ["p.yaml:4: limits.rate.requests_per_second: must be a number, not the text 'fast'"]),
        ("limits:\n  rate: {burst: 10}\n", ["p.yaml:4: limits.rate.requests_per_second: missing (required)"]),
        ("limits:\n  rate:\n    requests_per_second: 10\n    burst: 0\n",
         ["p.yaml:6: limits.rate.burst: must be at least 1"]),
        ("limits:\n  rate: 100\n", ["p.yaml:4: limits.rate: must be a mapping, not the number 100"]),
        ("limits:\n  truncate_max: 1.5G\n", [f"p.yaml:4: limits.truncate_max: '1.5G' {NOT_A_SIZE}"]),
        ("limits:\n  truncate_max: 10GB\n",
         [f"p.yaml:4: limits.truncate_max: '10GB' {NOT_A_SIZE} (write 10G or 10GiB: sizes are binary, G is "
          "1024^3)"]),
        ("limits:\n  truncate_max: -1\n",
         ["p.yaml:4: limits.truncate_max: sizes are between 0 and 18446744073709551615"]),
        ("limits:\n  open_fds: 0\n", ["p.yaml:4: limits.open_fds: must be at least 1"]),
        ("limits:\n  open_fd: 10\n",
         ["p.yaml:4: limits: unknown field 'open_fd' (did you mean 'open_fds'?)"]),
        ("limits:\n  rate: {requests_per_second: 1, brust: 2}\n",
         ["p.yaml:4: limits.rate: unknown field 'brust' (did you mean 'burst'?)"]),
        ("limits: {}\n", ["p.yaml:3: limits: must not be empty"]),
    ],
)
def test_each_bad_case_is_reported_with_its_line(section: str, expected: list[str]) -> None:
    assert problems(section) == expected


def test_problems_in_both_sections_are_reported_together() -> None:
    got = problems("""\
        ids:
          uid:
            - {guest: 0, host: 100000, count: 65536}
            - {guest: 0, host: 300000, count: 1}
          gid:
            - {guest: 0, host: 100000, count: 65536}
        limits:
          open_fds: 0
        rules:
          - {id: a, effect: deny, ops: [wirte]}
        """)
    assert [g.split(": ")[0] for g in got] == ["p.yaml:6", "p.yaml:10", "p.yaml:12"]


def test_a_hand_built_map_is_checked_too() -> None:
    with pytest.raises(ValueError, match=r"uid\[1\]: guest ids 5-14 overlap"):
        IdMap(uid=(IdRange(0, 100, 10), IdRange(5, 500, 10)), gid=())
    with pytest.raises(ValueError, match="unmapped must be forbid or squash"):
        IdMap(uid=(), gid=(), unmapped="allow")
    with pytest.raises(ValueError, match="squash_uid"):
        IdMap(uid=(), gid=(), squash_uid=NO_ID)
    assert range_problems([IdRange(0, 0, 10), IdRange(10, 10, 10)]) == []  # adjacent is not overlapping
    assert [i for i, _ in range_problems([IdRange(0, 0, 10), IdRange(20, 20, 5), IdRange(3, 40, 1)])] == [2]


# --------------------------------------------------------------------------------------------------------
# The model: present, absent, defaults.


def test_absent_sections_mean_no_map_and_no_limits() -> None:
    policy = load("rules: []\n")
    assert policy.ids is None
    assert policy.limits == Limits() and policy.limits.given() == []
    assert (policy.limits.requests_per_second, policy.limits.burst, policy.limits.truncate_max,
            policy.limits.open_fds) == (None, None, None, None)


def test_the_loaded_map_and_its_defaults() -> None:
    policy = load(SHIFTED)
    ids = policy.ids
    assert ids is not None
    assert ids.uid == (IdRange(guest=0, host=100000, count=65536),)
    assert ids.gid == (IdRange(0, 200000, 1000),)
    assert (ids.unmapped, ids.squash_uid, ids.squash_gid) == ("forbid", 65534, 65534)
    assert ids.line == 3
    assert ids == IdMap(uid=((0, 100000, 65536),), gid=((0, 200000, 1000),))  # the line is not compared


def test_limits_as_written() -> None:
    limits = load("""\
        limits:
          rate: {requests_per_second: 2000, burst: 200}
          truncate_max: 10G
          open_fds: 256
        """).limits
    assert limits == Limits(2000.0, 200, 10 << 30, 256)
    assert isinstance(limits.requests_per_second, float) and isinstance(limits.burst, int)
    assert limits.given() == ["requests_per_second", "burst", "truncate_max", "open_fds"]


@pytest.mark.parametrize(("rate", "burst"), [("2000", 2000), ("0.5", 1), ("2.5", 3), ("1e3", 1000)])
def test_burst_defaults_to_a_seconds_worth(rate: str, burst: int) -> None:
    limits = load(f"limits:\n  rate: {{requests_per_second: {rate}}}\n").limits
    assert limits.requests_per_second == float(rate) and limits.burst == burst
    assert limits.truncate_max is None and limits.open_fds is None


def test_limits_built_by_hand_are_checked() -> None:
    assert Limits(requests_per_second=10).burst == 10
    for bad in ({"requests_per_second": 0}, {"requests_per_second": float("inf")}, {"burst": 0},
                {"open_fds": 0}, {"truncate_max": -1}):
        with pytest.raises(ValueError):
            Limits(**bad)


@pytest.mark.parametrize(
    ("written", "size"),
    [(0, 0), (4096, 4096), ("4096", 4096), ("512K", 512 << 10), ("512k", 512 << 10), ("10M", 10 << 20),
     ("10G", 10 << 30), ("10 G", 10 << 30), ("10GiB", 10 << 30), ("2T", 2 << 40), ("100B", 100)],
)
def test_sizes(written: object, size: int) -> None:
    assert parse_size(written) == size
    text = written if isinstance(written, int) else f"'{written}'"
    assert load(f"limits:\n  truncate_max: {text}\n").limits.truncate_max == size


@pytest.mark.parametrize("bad", ["10P", "1.5G", "G", "-1", "ten", "10 GB", True, -1, 1 << 64])
def test_bad_sizes(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_size(bad)


def test_format_size() -> None:
    assert [format_size(n) for n in (0, 100, 1024, 10 << 30, (10 << 30) + 1, 1 << 40)] == [
        "0 bytes", "100 bytes", "1 KiB", "10 GiB", "10737418241 bytes", "1 TiB"]


# --------------------------------------------------------------------------------------------------------
# The map, both ways.


def test_one_range_both_ways_at_its_edges() -> None:
    ids = load(SHIFTED).ids
    assert ids is not None
    # guest -> host: first and last id of the range, and just outside it
    assert ids.uid_to_host(0) == 100000
    assert ids.uid_to_host(1000) == 101000
    assert ids.uid_to_host(65535) == 165535
    assert ids.uid_to_host(65536) is None  # forbid
    assert ids.gid_to_host(0) == 200000 and ids.gid_to_host(999) == 200999 and ids.gid_to_host(1000) is None
    # host -> guest: the inverse; a host id outside every range shows as the squash id
    assert ids.uid_to_guest(100000) == 0
    assert ids.uid_to_guest(165535) == 65535
    assert ids.uid_to_guest(99999) == 65534 and ids.uid_to_guest(165536) == 65534
    assert ids.uid_to_guest(0) == 65534  # the host's root is nobody to the guest
    assert ids.gid_to_guest(200999) == 999 and ids.gid_to_guest(201000) == 65534
    assert ids.gid_to_guest(100000) == 65534  # uid and gid maps are separate


def test_forbid_refuses_and_squash_replaces() -> None:
    forbid = IdMap(uid=(IdRange(1000, 101000, 10),), gid=(IdRange(1000, 101000, 10),))
    squash = IdMap(uid=forbid.uid, gid=forbid.gid, unmapped="squash", squash_uid=60000, squash_gid=60001)
    for guest in (0, 999, 1010, ID_LAST):
        assert forbid.uid_to_host(guest) is None and forbid.gid_to_host(guest) is None
        assert squash.uid_to_host(guest) == 60000 and squash.gid_to_host(guest) == 60001
    for guest in (1000, 1009):  # mapped ids are the same either way
        assert forbid.uid_to_host(guest) == squash.uid_to_host(guest) == guest + 100000
    # host -> guest gives the squash id in both modes (there is nothing to refuse on the way back)
    assert forbid.uid_to_guest(5) == 65534 and forbid.gid_to_guest(5) == 65534
    assert squash.uid_to_guest(5) == 60000 and squash.gid_to_guest(5) == 60001


@pytest.mark.parametrize("unmapped", ["forbid", "squash"])
@pytest.mark.parametrize("unchanged", [NO_ID, -1])
def test_minus_one_passes_through_both_ways(unmapped: str, unchanged: int) -> None:
    for ranges in ((IdRange(0, 100000, 65536),), (IdRange(0, 100000, 10), IdRange(20, 200000, 10)), ()):
        ids = IdMap(uid=ranges, gid=ranges, unmapped=unmapped)
        for lookup in (ids.uid_to_host, ids.gid_to_host, ids.uid_to_guest, ids.gid_to_guest):
            assert lookup(unchanged) == unchanged


def test_the_largest_id_can_be_mapped() -> None:
    ids = IdMap(uid=(IdRange(ID_LAST, 0, 1), IdRange(0, ID_LAST, 1)), gid=(IdRange(0, 0, ID_LAST + 1),))
    assert ids.uid_to_host(ID_LAST) == 0 and ids.uid_to_guest(0) == ID_LAST
    assert ids.uid_to_host(0) == ID_LAST and ids.uid_to_guest(ID_LAST) == 0
    assert ids.gid_to_host(ID_LAST) == ID_LAST and ids.gid_to_guest(12345) == 12345  # identity, written out
    assert ids.gid_to_host(NO_ID) == NO_ID


def test_several_ranges_in_any_order() -> None:
    policy = load("""\
        ids:
          uid:
            - {guest: 1000, host: 201000, count: 1000}   # people
            - {guest: 0, host: 100000, count: 1000}      # root and the services
            - {guest: 65534, host: 65534, count: 1}      # nobody stays nobody
          gid: {guest: 0, host: 100000, count: 65536}
          unmapped: squash
        """)
    ids = policy.ids
    assert ids is not None
    expected_host = {0: 100000, 999: 100999, 1000: 201000, 1999: 201999, 2000: 65534, 65533: 65534,
                     65534: 65534, 65535: 65534, 70000: 65534}
    assert {g: ids.uid_to_host(g) for g in expected_host} == expected_host
    expected_guest = {100000: 0, 100999: 999, 101000: 65534, 201000: 1000, 201999: 1999, 202000: 65534,
                      65534: 65534, 0: 65534}
    assert {h: ids.uid_to_guest(h) for h in expected_guest} == expected_guest


def test_many_ranges_agree_with_a_plain_scan() -> None:
    rng = random.Random(7)
    guests = sorted(rng.sample(range(0, 1 << 20, 64), 200))
    hosts = rng.sample(range(1 << 21, 1 << 22, 64), 200)
    ranges = tuple(IdRange(g, h, rng.randint(1, 64)) for g, h in zip(guests, hosts, strict=True))
    ids = IdMap(uid=ranges, gid=ranges[:1], unmapped="forbid")

    def scan(value: int, side: str) -> int | None:
        for r in ranges:
            first, target = (r.guest, r.host) if side == "guest" else (r.host, r.guest)
            if first <= value < first + r.count:
                return target + value - first
        return None

    probes = {p + d for r in ranges for p in (r.guest, r.host, r.guest_last, r.host_last) for d in (-1, 0, 1)}
    probes |= {rng.randrange(0, 1 << 23) for _ in range(2000)}
    for value in probes:
        assert ids.uid_to_host(value) == scan(value, "guest"), value
        back = scan(value, "host")
        assert ids.uid_to_guest(value) == (65534 if back is None else back), value


# --------------------------------------------------------------------------------------------------------
# Lint, the shipped policies.


def test_squashing_to_guest_root_is_a_warning() -> None:
    policy = load("""\
        ids:
          uid: {guest: 0, host: 100000, count: 65536}
          gid: {guest: 0, host: 100000, count: 65536}
          unmapped: squash
          squash_uid: 100000
        tests:
          - {request: 'lstat /', expect: allow}
        """)
    found = [(f.code, f.line, f.severity) for f in lint(policy)]
    assert found == [("squash-to-root", 3, "warning")]
    assert "squashed to host uid 100000, which the guest sees as uid 0 (root)" in lint(policy)[0].message
    fine = load(SHIFTED.replace("  gid:", "  unmapped: squash\n  gid:") + "tests:\n  - {request: 'lstat /', "
                "expect: allow}\n")
    assert lint(fine) == []


def test_the_mapped_tenant_policy() -> None:
    policy = load_policy(ROOT / "policies/mapped-tenant.yaml")
    ids = policy.ids
    assert ids is not None and ids.unmapped == "forbid"
    assert ids.uid_to_host(0) == 100000 and ids.gid_to_host(0) == 100000  # guest root is host 100000
    assert ids.uid_to_host(65536) is None and ids.uid_to_guest(0) == 65534
    assert policy.limits.requests_per_second is not None and policy.limits.truncate_max == 64 << 30


def test_the_example_shows_both_sections() -> None:
    policy = load_policy(ROOT / "examples/policy.yaml")
    assert policy.ids is not None and policy.ids.uid_to_host(1000) == 101000
    # open_fds is only described there: it cannot be enforced, and lint says so when it is set
    assert policy.limits.given() == ["requests_per_second", "burst", "truncate_max"]


def test_open_fds_is_flagged_as_not_enforced(tmp_path: Path) -> None:
    text = (ROOT / "examples/policy.yaml").read_text().replace("limits:\n", "limits:\n  open_fds: 64\n", 1)
    (tmp_path / "p.yaml").write_text(text)  # beside what it includes
    (tmp_path / "never.yaml").write_text((ROOT / "examples/never.yaml").read_text())
    codes = {f.code for f in lint(load_policy(tmp_path / "p.yaml"))}
    assert "open-fds-not-enforced" in codes
    assert "open-fds-not-enforced" not in {f.code for f in lint(load_policy(ROOT / "examples/policy.yaml"))}


def test_a_map_survives_pickling_and_replace() -> None:
    import dataclasses
    import pickle

    ids = IdMap(uid=(IdRange(0, 100000, 65536),), gid=(IdRange(0, 100000, 65536),), unmapped="squash")
    again = pickle.loads(pickle.dumps(ids))  # the lookups are closures: rebuilt, not pickled
    assert again == ids and again.uid_to_host(70000) == 65534 and again.gid_to_guest(100001) == 1
    assert dataclasses.replace(ids, unmapped="forbid").uid_to_host(70000) is None
