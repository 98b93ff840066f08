"""The ready-made policies and the annotated example: valid, their own tests pass, and they mean what they
say (checked over many generated requests, not only the tests they carry)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from gateway.rules import decide, load_policy
from gateway.rules.requests import parse_text
from gateway.rules.testing import run_tests

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted([*ROOT.glob("policies/*.yaml"), ROOT / "examples/policy.yaml"])
NAMES = {p.name for p in ROOT.glob("policies/*.yaml")}

TEMPLATES = ["open {p}", "open {p} flags=O_RDWR", "create {p} mode={m} uid={u} gid={u}",
             "mkdir {p} mode={m} uid={u}", "mknod {p} mode=02{m} uid={u}", "mknod {p} mode=06{m}",
             "mknod {p} mode=01{m}", "chmod {p} mode={m}", "symlink {p} target=../x uid={u}",
             "link {p} /tmp/l",
             "rename {p} /srv/r", "remove {p}", "truncate {p} length=5", "utime {p}", "chown {p} uid={u}",
             "lstat {p}", "readlink {p}", "statfs {p}",
             "lgetxattr {p} name=user.a", "llistxattr {p}", "lsetxattr {p} name=security.x",
             "lremovexattr {p} name=user.a", "getversion {p}"]
PATHS = ["/", "/etc/passwd", "/home/alice/a", "/srv/x", "/tmp/y"]
MODES = ["0644", "04755", "02775", "01777", "0600"]


def corpus() -> list[str]:
    return [t.format(p=p, m=m, u=u) for t, p, m, u in itertools.product(TEMPLATES, PATHS, MODES, [0, 1000])]


def test_the_expected_policies_ship() -> None:
    shipped = {"allow-all.yaml", "baseline.yaml", "read-only.yaml", "multi-tenant.yaml", "mapped-tenant.yaml"}
    assert shipped <= NAMES


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_policy_is_valid_and_its_tests_pass(path: Path) -> None:
    policy = load_policy(path)
    results = run_tests(policy)
    assert len(results) >= 5
    assert [r.failures for r in results if not r.passed] == []


def test_allow_all_allows_everything() -> None:
    policy = load_policy(ROOT / "policies/allow-all.yaml")
    for text in corpus():
        assert decide(parse_text(text).request, policy).outcome == "allow", text


def test_baseline_denies_only_device_nodes_and_setid_bits() -> None:
    policy = load_policy(ROOT / "policies/baseline.yaml")
    for text in corpus():
        request = parse_text(text).request
        op = text.split()[0]
        mode = getattr(request, "mode", 0)
        device = op == "mknod" and mode & 0o170000 in (0o020000, 0o060000)
        setid = op in ("create", "mkdir", "mknod", "chmod") and bool(mode & 0o6000)
        d = decide(request, policy)
        assert d.outcome == ("deny" if device or setid else "allow"), text
        if d.outcome == "deny":
            assert d.errno == 1  # EPERM


def test_read_only_allows_exactly_the_reads() -> None:
    policy = load_policy(ROOT / "policies/read-only.yaml")
    reads = {"lstat", "readlink", "statfs", "lgetxattr", "llistxattr", "getversion"}
    for text in corpus():
        op = text.split()[0]
        is_read = op in reads or (op == "open" and "flags" not in text)
        d = decide(parse_text(text).request, policy)
        assert d.outcome == ("allow" if is_read else "deny"), text
        if not is_read:
            assert d.errno == 30  # EROFS


def test_example_tour_uses_every_feature() -> None:
    text = (ROOT / "examples/policy.yaml").read_text() + (ROOT / "examples/never.yaml").read_text()
    for word in ["version:", "tenant:", "default:", "enforcement:", "audit:", "paths:", "except:", "errno:",
                 "enforce: always", "description:", "unless:", "uid:", "gid:", "mode_any:", "mode_all:",
                 "mode_none:", "type:", "flags_any:", "flags_all:", "flags_none:", "target:",
                 "target_except:",
                 "target_resolved:", "target_absolute:", "target_dotdot:", "length_min:", "length_max:",
                 "xattr:", "xattr_except:", "owner:", "group:", "tests:", "permissive", "ids:", "guest:",
                 "host:", "count:", "unmapped:", "squash_uid:", "squash_gid:", "limits:", "rate:",
                 "requests_per_second:", "burst:", "truncate_max:", "open_fds", "vars:", "include:",
                 "${uid}", "${owner}", "${scratch}", "owner: self"]:
        assert word in text, word
    policy = load_policy(ROOT / "examples/policy.yaml")
    exercised = {rule for r in run_tests(policy) for rule in r.decision.matched}
    assert {r.id for r in policy.rules} == exercised  # the tour's own tests exercise every rule
