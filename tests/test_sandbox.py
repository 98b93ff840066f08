"""The sandbox, shown rather than claimed: what /proc says about a running gateway, and a test-only child
confined by the same code path failing (errno mode) or dying (kill mode) at each forbidden call."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import GATEWAY, over_socketpair, require_root, status_of, trail_args, wait_listening

from gateway.client import Client
from gateway.inspect import inspect_pid
from gateway.landlock import abi_version

CHILD = Path(__file__).with_name("sandbox_child.py")
SEVEN = (1 << 0) | (1 << 1) | (1 << 3) | (1 << 4) | (1 << 6) | (1 << 7) | (1 << 27)


@pytest.fixture
def export(tmp_path: Path) -> Path:
    root = tmp_path / "export"
    root.mkdir()
    (root / "inside").write_text("inside\n")
    return root


def _check_proc(pid: int, export: Path) -> None:
    st = status_of(pid)
    assert int(st["CapEff"], 16) == SEVEN
    assert int(st["CapPrm"], 16) == SEVEN
    assert int(st["CapBnd"], 16) == SEVEN
    assert int(st["CapInh"], 16) == 0 and int(st["CapAmb"], 16) == 0
    assert st["NoNewPrivs"] == "1"
    assert st["Seccomp"] == "2"
    assert os.readlink(f"/proc/{pid}/root") == str(export)


def test_running_gateway_over_socketpair_is_confined(export: Path) -> None:
    require_root()
    with over_socketpair(GATEWAY, export) as gw:
        gw.client.lstat(b"/")  # serving: the sandbox is in place
        _check_proc(gw.proc.pid, export)
        result = inspect_pid(gw.proc.pid)
        assert result is not None and result.holds, [f for f in result.findings if not f.ok]


def test_running_gateway_on_named_socket_is_confined(export: Path, tmp_path: Path) -> None:
    require_root()
    sock = tmp_path / "s.sock"
    proc = subprocess.Popen(
        [*GATEWAY, "-p", str(export), "-s", str(sock), "-u", "0", "-g", "0", "-n", *trail_args(export)]
    )
    try:
        wait_listening(str(sock))
        with Client.connect(str(sock), timeout=10) as c:
            c.lstat(b"/")
            _check_proc(proc.pid, export)
            out = subprocess.run(
                [sys.executable, "-m", "gateway", "inspect", str(proc.pid)],
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert out.returncode == 0, out.stdout + out.stderr
            assert "confinement holds" in out.stdout and "dac_override" in out.stdout
    finally:
        proc.kill()
        proc.wait()


def test_inspect_reports_a_weaker_gateway(export: Path) -> None:
    """--seccomp none is a promise too: inspect holds it to that, and flags a gateway that is weaker
    than its defaults would be only when it promised them (here: it did not)."""
    require_root()
    with over_socketpair(GATEWAY, export, extra=["--seccomp", "none"]) as gw:
        gw.client.lstat(b"/")
        assert status_of(gw.proc.pid)["Seccomp"] == "0"
        result = inspect_pid(gw.proc.pid)
        assert result is not None and result.holds
    # A process that is not a gateway at all is refused with exit 2.
    out = subprocess.run([sys.executable, "-m", "gateway", "inspect", str(os.getpid())], capture_output=True)
    assert out.returncode == 2


# A process that confines its main thread exactly as a gateway (-p / --seccomp none) would, but only
# after starting a second thread, which keeps every capability and no_new_privs 0.
_WEAK_THREAD = """
import threading, time, prctl, sys
from gateway.sandbox import SandboxState, drop_capabilities
threading.Thread(target=time.sleep, args=(30,), daemon=True).start()
drop_capabilities(SandboxState())
prctl.set_no_new_privs(1)
print("ready", flush=True)
time.sleep(30)
"""


def test_inspect_holds_every_thread_to_the_promise() -> None:
    """Capabilities and no_new_privs are per thread: a second thread left unconfined makes the gateway
    weaker than promised even when its main thread is not, and inspect names that thread."""
    require_root()
    fake = subprocess.Popen(
        [sys.executable, "-c", _WEAK_THREAD, "serve", "-p", "/", "-f", "3", "-n", "--seccomp", "none"],
        stdout=subprocess.PIPE,
    )
    try:
        assert fake.stdout is not None and fake.stdout.readline() == b"ready\n"
        threads = os.listdir(f"/proc/{fake.pid}/task")
        assert len(threads) == 2
        main = status_of(fake.pid)
        assert main["NoNewPrivs"] == "1"
        result = inspect_pid(fake.pid)
        assert result is not None and not result.holds
        weak = {f.item: f.seen for f in result.findings if not f.ok}
        other = next(t for t in threads if int(t) != fake.pid)
        assert weak["no_new_privs"] == f"thread {other}: 0"
        assert weak["capabilities permitted"].startswith(f"thread {other}: ")
    finally:
        fake.kill()
        fake.wait()


def test_inspect_flags_missing_confinement() -> None:
    """A process whose command line claims to be a gateway but which is not confined is reported."""
    require_root()
    fake = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(30)", "serve", "-p", "/", "-f", "3", "-n"],
    )
    try:
        deadline = time.monotonic() + 10
        while b"serve" not in Path(f"/proc/{fake.pid}/cmdline").read_bytes() and time.monotonic() < deadline:
            time.sleep(0.02)  # until the exec has replaced the forked pytest's command line
        result = inspect_pid(fake.pid)
        assert result is not None and not result.holds
        weak = {f.item for f in result.findings if not f.ok}
        assert {"seccomp", "no_new_privs", "capabilities permitted"} <= weak
        out = subprocess.run([sys.executable, "-m", "gateway", "inspect", str(fake.pid)], capture_output=True)
        assert out.returncode == 1
    finally:
        fake.kill()
        fake.wait()


def _child(
    export: Path, mode: str, action: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(CHILD), str(export), mode, action],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **(env or {})},
    )


FORBIDDEN = [
    "execve",
    "socket",
    "connect",
    "ptrace",
    "fork",
    "kill",
    "mount",
    "unshare",
    "setns",
    "bpf",
    "chroot",
]


@pytest.mark.parametrize("action", FORBIDDEN)
def test_forbidden_calls_fail_in_errno_mode(export: Path, action: str) -> None:
    require_root()
    out = _child(export, "errno", action)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["result"] == f"error {errno.EPERM}"


# errno mode: each call fails EPERM. For mount, unshare, setns, bpf and chroot the dropped capabilities
# would say EPERM too, so kill mode below is the proof that the filter itself stops them (SIGSYS).
@pytest.mark.parametrize("action", FORBIDDEN)
def test_forbidden_calls_kill_in_kill_mode(export: Path, action: str) -> None:
    require_root()
    out = _child(export, "kill", action)
    assert out.returncode == -signal.SIGSYS, (out.returncode, out.stdout, out.stderr)
    assert out.stdout == ""  # it never got to report


def test_the_child_itself_runs_fine_under_the_filter(export: Path) -> None:
    """The control: the same child, doing nothing forbidden, exits normally in kill mode."""
    require_root()
    out = _child(export, "kill", "open-inside")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["result"] == "succeeded"


def test_landlock_stops_a_direct_open_outside_the_export(export: Path) -> None:
    require_root()
    assert abi_version() > 0, "this kernel has no Landlock"
    out = _child(export, "errno", "open-outside")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["landlock"] > 0
    assert report["result"] == f"error {errno.EACCES}"
    # The control: without Landlock, the same bug-simulating open reaches the host file.
    out = _child(export, "errno", "open-outside", env={"NO_LANDLOCK": "1"})
    assert json.loads(out.stdout)["result"] == "succeeded"


@pytest.fixture
def named_gateway(export: Path, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Client]]:
    sock = tmp_path / "g.sock"
    proc = subprocess.Popen(
        [*GATEWAY, "-p", str(export), "-s", str(sock), "-u", "0", "-g", "0", "-n", *trail_args(export)]
    )
    wait_listening(str(sock))
    client = Client.connect(str(sock), timeout=10)
    yield proc, client
    client.close()
    proc.kill()
    proc.wait()


def test_the_listening_socket_is_closed_once_serving(
    named_gateway: tuple[subprocess.Popen[bytes], Client],
) -> None:
    """After accepting its one client, the gateway holds no listening socket: only the connection."""
    require_root()
    proc, client = named_gateway
    client.lstat(b"/")
    targets = [os.readlink(f"/proc/{proc.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{proc.pid}/fd")]
    inodes = {t[len("socket:[") : -1] for t in targets if t.startswith("socket:")}
    with open("/proc/net/unix") as f:
        listening = [line for line in f if line.split()[6] in inodes and line.split()[3] == "00010000"]
    assert inodes and not listening
