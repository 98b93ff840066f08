"""Real-guest integration tests: a QEMU guest mounts a 9p share served by a proxy helper.

Each test boots Debian 12's kernel under TCG (10-20 s) with the helper in socket mode (`-s SOCK -u 0 -g 0`)
or inherited-fd mode (`-f FD`), runs a busybox script in the guest and checks the export from the host.
Prerequisites (root, qemu, busybox-static, gcc, the guest kernel) are NOT skipped when missing: the
tests fail and say to run scripts/fetch-guest-kernel.sh.

    cd /work/main && /tmp/v/bin/pytest tests/test_guest.py -k reference -v
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import pytest

# tests/ has no __init__.py, so pytest puts tests/ itself on sys.path and the package is `guest`; should
# tests/ become a package, the repo root goes on sys.path instead and it is `tests.guest`.
try:
    from guest import harness
except ImportError:  # pragma: no cover - depends on the layout of tests/
    from tests.guest import harness  # type: ignore[no-redef]

HELPERS: dict[str, list[str]] = {
    "reference": harness.REFERENCE_HELPER,
    "gateway": harness.GATEWAY_HELPER,
}
MODES: tuple[harness.Mode, ...] = ("s", "f")


def _require(helper_cmd: Sequence[str]) -> None:
    """Fail (never skip) when the guest cannot boot here, naming what is missing and how to get it."""
    try:
        harness.check_prerequisites(helper_cmd)
    except harness.GuestSetupError as e:
        pytest.fail(str(e), pytrace=False)


@pytest.fixture
def export(tmp_path: Path) -> Path:
    # A fresh, empty export per boot, owned by root with an ordinary mode; pytest's tmp_path is on the
    # host's real file system (user.* xattrs work there, unlike on an old tmpfs).
    d = tmp_path / "export"
    d.mkdir()
    os.chmod(d, 0o755)
    return d


@pytest.mark.guest
@pytest.mark.root
@pytest.mark.parametrize("mode", MODES, ids=lambda m: f"{m}mode")
@pytest.mark.parametrize("helper", list(HELPERS))
def test_full_script(helper: str, mode: harness.Mode, export: Path) -> None:
    """Every proxy request type through the guest's 9p client; then the export as the host sees it."""
    helper_cmd = HELPERS[helper]
    _require(helper_cmd)
    result = harness.run_guest(helper_cmd, mode, export)
    try:
        result.assert_ok(harness.FULL_STEPS)
    except AssertionError as e:
        pytest.fail(f"guest run with {helper} in -{mode} mode failed:\n{e}", pytrace=False)
    problems = harness.verify_full_export(export)
    assert not problems, "export after the guest run:\n" + "\n".join(problems) + "\n" + result.describe(20)


@pytest.mark.guest
@pytest.mark.root
@pytest.mark.parametrize("helper", list(HELPERS))
def test_full_script_sends_every_request_type(helper: str, export: Path) -> None:
    """With a tracing relay between QEMU and the helper: full.sh makes QEMU send all 20 request types."""
    helper_cmd = HELPERS[helper]
    _require(helper_cmd)
    result = harness.run_guest(helper_cmd, "f", export, trace=True)
    try:
        result.assert_ok(harness.FULL_STEPS)
    except AssertionError as e:
        pytest.fail(f"guest run with {helper} (traced) failed:\n{e}", pytrace=False)
    counts = result.request_counts()
    missing = sorted(set(harness.REQUEST_NAMES.values()) - set(counts))
    assert not missing, f"request types never sent: {missing}; seen: {counts}"


# A custom snippet, as the policy tests will pass: helper-side errors must come back to the guest's shell
# as failing commands. trusted.* xattrs need CAP_SYS_ADMIN, which the guest's root has (so the guest
# kernel passes the request on) but the reference helper drops, so the host side answers EPERM.
DENIED_SNIPPET = """
step touch eval 'echo x >"$M/f"'
expect_fail trusted_xattr gtool setxattr "$M/f" trusted.test v
step still_works eval 'echo y >"$M/g" && [ "$(cat "$M/g")" = y ]'
"""


@pytest.mark.guest
@pytest.mark.root
@pytest.mark.parametrize("helper", list(HELPERS))
def test_custom_snippet_sees_helper_errors(helper: str, export: Path) -> None:
    helper_cmd = HELPERS[helper]
    _require(helper_cmd)
    result = harness.run_guest(helper_cmd, "f", export, script=DENIED_SNIPPET)
    try:
        result.assert_ok(["mount", "touch", "trusted_xattr", "still_works", "umount"])
    except AssertionError as e:
        pytest.fail(f"guest run with {helper} failed:\n{e}", pytrace=False)
    detail = result.steps["trusted_xattr"].detail
    assert "EPERM" in detail, f"expected EPERM in the guest, got: {detail}\n{result.describe(20)}"
    assert "trusted.test" not in os.listxattr(export / "f", follow_symlinks=False)


def test_parse_console_reads_steps() -> None:
    """The console parser (no guest needed): OUT lines attach to the next STEP of the same name."""
    console = "noise\nOUT a| line 1\nOUT a| line 2\nSTEP a OK\n[  1.0] kernel: STEP b FAIL rc=1 boom\n"
    steps = harness.parse_console(console)
    assert list(steps) == ["a", "b"]
    assert steps["a"].ok and steps["a"].output == ["line 1", "line 2"]
    assert not steps["b"].ok and steps["b"].detail == "rc=1 boom"


def test_cpio_writer_layout() -> None:
    """newc entries are 4-byte aligned and the archive ends with the trailer."""
    w = harness.CpioWriter()
    w.file("a/b", b"xyz", 0o644)
    data = w.finish()
    assert data.startswith(b"070701")
    assert len(data) % 4 == 0
    assert b"TRAILER!!!\0" in data
    assert b"a/b\0" in data and b"xyz" in data


POLICY_SNIPPET = """
step touch eval 'echo x >"$M/f"'
expect_fail denied_mknod mknod "$M/sda" b 8 0
expect_fail denied_setuid chmod u+s "$M/f"
step allowed_chmod chmod 0750 "$M/f"
"""


@pytest.mark.guest
@pytest.mark.root
def test_policy_denials_are_errors_in_the_guest_shell(export: Path, tmp_path: Path) -> None:
    """The built-in baseline policy: a device node and a setuid bit are refused, and the guest's own shell
    sees the errors; the export on the host is untouched by them."""
    helper_cmd = [*harness.GATEWAY_HELPER[: harness.GATEWAY_HELPER.index("--policy")]]
    helper_cmd += ["--audit-log", str(tmp_path / "trail.jsonl")]
    _require(helper_cmd)
    result = harness.run_guest(helper_cmd, "s", export, script=POLICY_SNIPPET)
    try:
        result.assert_ok(["mount", "touch", "denied_mknod", "denied_setuid", "allowed_chmod", "umount"])
    except AssertionError as e:
        pytest.fail(f"guest run failed:\n{e}", pytrace=False)
    for step in ("denied_mknod", "denied_setuid"):  # EPERM, the baseline's errno, as the shell prints it
        assert "operation not permitted" in result.steps[step].detail.lower(), result.describe(20)
    assert not (export / "sda").exists()
    assert os.stat(export / "f").st_mode & 0o7777 == 0o750
    records = [json.loads(line) for line in (tmp_path / "trail.jsonl").read_text().splitlines()]
    denied = {(r["op"], r["rule"]) for r in records if r.get("decision") == "deny"}
    assert ("mknod", "no-device-nodes") in denied and ("chmod", "no-setid-bits") in denied
