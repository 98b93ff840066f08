"""Issue 13, points 1-3 (the code side): a gateway confined before its client arrives, start-up failures
that are loud and specific, inherited fds closed, systemd readiness and socket activation, --persist.

Each test runs a real `gateway serve` process.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from helpers import GATEWAY, REFERENCE, require_reference, require_root, wait_listening

from gateway.client import Client
from gateway.inspect import inspect_pid


@pytest.fixture
def export(tmp_path: Path) -> Path:
    root = tmp_path / "export"
    root.mkdir()
    (root / "file").write_bytes(b"hello world\n")
    return root


def _records(trail: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in trail.read_text().splitlines()]


def _status(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def _wait_for(predicate: object, what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"still waiting for {what}"
        time.sleep(0.02)


@contextmanager
def _named(export: Path, tmp_path: Path, *extra: str, **popen: object) -> Iterator[subprocess.Popen[bytes]]:
    sock = tmp_path / "g.sock"
    proc = subprocess.Popen(
        [*GATEWAY, "-p", str(export), "-s", str(sock), "-u", "0", "-g", "0", "-n",
         "--audit-log", str(tmp_path / "trail.jsonl"), *extra],
        stderr=subprocess.PIPE, **popen,  # type: ignore[arg-type]
    )  # fmt: skip
    try:
        wait_listening(str(sock))
        yield proc
    finally:
        proc.kill()
        proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()


# -- 1. confined before waiting --------------------------------------------------------------------------


def test_a_gateway_waiting_for_its_client_is_already_confined(export: Path, tmp_path: Path) -> None:
    require_root()
    with _named(export, tmp_path) as proc:
        time.sleep(0.2)  # listening is not the last step before accept: the sandbox comes in between
        _wait_for(lambda: _status(proc.pid)["Seccomp"] == "2", "the filter, before any client")
        status = _status(proc.pid)
        assert status["NoNewPrivs"] == "1"
        assert int(status["CapBnd"], 16) == int(status["CapPrm"], 16) != 0
        assert os.readlink(f"/proc/{proc.pid}/root") == str(export)
        result = inspect_pid(proc.pid)
        assert result is not None
        assert result.holds, [f for f in result.findings if not f.ok]
        out = subprocess.run([sys.executable, "-m", "gateway", "inspect", str(proc.pid)], capture_output=True)
        assert out.returncode == 0, out.stdout
        # and it still serves, once the client comes: accept4 on the listener is the one allowed
        with Client.connect(str(tmp_path / "g.sock"), timeout=10) as c:
            assert c.lstat(b"/file").size == 12
    records = _records(tmp_path / "trail.jsonl")
    start = next(r for r in records if r["event"] == "start")
    session = next(r for r in records if r["event"] == "session")
    assert int(start["seq"]) < int(session["seq"])  # type: ignore[call-overload]
    assert session["peer"] == {"pid": os.getpid(), "uid": 0, "gid": 0}


def test_the_listener_is_the_only_socket_accept_is_allowed_on(tmp_path: Path) -> None:
    """The filter's accept4 rule names the listener's fd: another fd number is refused by the filter."""
    import pyseccomp as sc

    from gateway import seccomp_filter

    flt = seccomp_filter.build_filter("errno", accept_fd=7)
    pfc = tmp_path / "filter.pfc"
    with open(pfc, "w") as f:
        flt.export_pfc(f)  # type: ignore[attr-defined]
    text = pfc.read_text()
    assert "accept4" in text and "== 7" in text
    assert sc  # the library the filter is built with


# -- 2. loud, specific failures --------------------------------------------------------------------------


@pytest.mark.parametrize("daemon", [False, True], ids=["-n", "daemon"])
def test_an_existing_socket_path_fails_with_status_1_naming_it(
    export: Path, tmp_path: Path, daemon: bool
) -> None:
    require_root()
    taken = tmp_path / "taken"
    taken.write_text("")
    result = subprocess.run(
        [*GATEWAY, "-p", str(export), "-s", str(taken), "-u", "0", "-g", "0", *([] if daemon else ["-n"]),
         "--audit-log", str(tmp_path / "t.jsonl")],
        capture_output=True, timeout=20,
    )  # fmt: skip
    assert result.returncode == 1
    assert f"{taken}: the path exists already" in result.stderr.decode()
    assert taken.read_text() == ""  # untouched


def test_the_reference_exits_0_on_an_existing_socket_path(export: Path, tmp_path: Path) -> None:
    """The difference the README's table lists: the reference's status 0 hides the failure."""
    require_reference()
    taken = tmp_path / "taken"
    taken.write_text("")
    result = subprocess.run(
        [REFERENCE, "-p", str(export), "-s", str(taken), "-u", "0", "-g", "0", "-n"],
        capture_output=True,
        timeout=20,
    )
    assert result.returncode == 0 and b"socket already exists" in result.stderr


@pytest.mark.parametrize("daemon", [False, True], ids=["-n", "daemon"])
def test_a_socket_in_a_missing_directory_fails_naming_the_directory(
    export: Path, tmp_path: Path, daemon: bool
) -> None:
    require_root()
    path = tmp_path / "nowhere" / "g.sock"
    result = subprocess.run(
        [*GATEWAY, "-p", str(export), "-s", str(path), "-u", "0", "-g", "0", *([] if daemon else ["-n"]),
         "--audit-log", str(tmp_path / "t.jsonl")],
        capture_output=True, timeout=20,
    )  # fmt: skip
    assert result.returncode == 1
    assert f"its directory {tmp_path / 'nowhere'} does not exist" in result.stderr.decode()
    stop = _records(tmp_path / "t.jsonl")[-1]
    assert stop["event"] == "stop" and "does not exist" in str(stop["reason"])


@pytest.mark.parametrize("option", ["-u", "-g"])
@pytest.mark.parametrize("value", ["abc", "12x", "", "-1"])
def test_owner_ids_that_are_not_numbers_are_a_usage_error(
    export: Path, tmp_path: Path, option: str, value: str
) -> None:
    ids = {"-u": "0", "-g": "0", option: value}
    result = subprocess.run(
        [*GATEWAY, "-p", str(export), "-s", str(tmp_path / "g.sock"), "-u", ids["-u"], "-g", ids["-g"], "-n"],
        capture_output=True, timeout=20,
    )  # fmt: skip
    assert result.returncode == 1
    what = "uid" if option == "-u" else "gid"
    assert f"{what} must be a number" in result.stderr.decode()
    assert "usage:" in result.stderr.decode()
    assert not (tmp_path / "g.sock").exists()  # nothing was created on the way


def test_an_fd_that_is_not_a_socket_fails_naming_it(export: Path, tmp_path: Path) -> None:
    with open(tmp_path / "plain", "w") as f:
        fd = f.fileno()
        result = subprocess.run(
            [*GATEWAY, "-p", str(export), "-f", str(fd), "-n", "--audit-log", str(tmp_path / "t.jsonl")],
            capture_output=True, timeout=20, pass_fds=[fd],
        )  # fmt: skip
    assert result.returncode == 1
    assert f"socket descriptor {fd} is not a socket" in result.stderr.decode()


def test_persist_needs_a_named_socket(export: Path) -> None:
    result = subprocess.run([*GATEWAY, "-p", str(export), "-f", "3", "-n", "--persist"], capture_output=True)
    assert result.returncode == 1 and b"--persist needs -s" in result.stderr


def test_inherited_fds_are_closed_but_the_one_given(export: Path, tmp_path: Path) -> None:
    require_root()
    leaked = os.open(tmp_path / "leaked", os.O_RDWR | os.O_CREAT)
    try:
        with _named(export, tmp_path, pass_fds=[leaked]) as proc:
            targets = [os.readlink(f"/proc/{proc.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{proc.pid}/fd")]
            assert str(tmp_path / "leaked") not in targets
            assert str(tmp_path / "trail.jsonl") in targets  # the control: its own fds are there
    finally:
        os.close(leaked)


# -- 3. systemd: readiness, activation, persist ----------------------------------------------------------


@contextmanager
def _notify_socket(tmp_path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(15)
    try:
        yield sock
    finally:
        sock.close()


def _messages(sock: socket.socket) -> Iterator[dict[str, str]]:
    while True:
        data = sock.recv(4096).decode()
        yield dict(line.split("=", 1) for line in data.splitlines() if line)


def test_ready_is_sent_once_listening_and_confined_then_status_and_stopping(
    export: Path, tmp_path: Path
) -> None:
    require_root()
    with _notify_socket(tmp_path) as notify:
        env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify")}
        with _named(export, tmp_path, env=env) as proc:
            messages = _messages(notify)
            ready = next(messages)
            assert ready["READY"] == "1"
            assert "waiting for a client" in ready["STATUS"]
            assert _status(proc.pid)["Seccomp"] == "2"  # confined by the time it says ready
            with Client.connect(str(tmp_path / "g.sock"), timeout=10) as c:
                assert "serving client 1" in next(messages)["STATUS"]
                c.lstat(b"/file")
            stopping = next(messages)
            assert stopping["STOPPING"] == "1"
            assert proc.wait(10) == 0


def _activated(
    export: Path, tmp_path: Path, bound_to: Path, named: Path, *extra: str
) -> subprocess.Popen[bytes]:
    """The gateway started as systemd starts it: the listener as fd 3, LISTEN_PID its own pid."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(bound_to))
    listener.listen(8)
    cmd = [*GATEWAY, "-p", str(export), "-s", str(named), "-u", "0", "-g", "0", "-n",
           "--audit-log", str(tmp_path / "trail.jsonl"), *extra]  # fmt: skip
    # As systemd does it: the socket moved to fd 3, LISTEN_PID set to the pid that then execs the gateway.
    as_systemd = (
        "import os, sys; os.dup2(int(sys.argv[1]), 3); os.environ.update(LISTEN_PID=str(os.getpid()),"
        " LISTEN_FDS='1'); os.execv(sys.argv[2], sys.argv[2:])"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", as_systemd, str(listener.fileno()), *cmd],
        pass_fds=[listener.fileno()], stderr=subprocess.PIPE,
    )  # fmt: skip
    listener.close()
    return proc


def test_socket_activation_serves_the_socket_systemd_bound(export: Path, tmp_path: Path) -> None:
    require_root()
    path = tmp_path / "activated.sock"
    proc = _activated(export, tmp_path, path, path)
    try:
        with Client.connect(str(path), timeout=10) as c:  # connects before the gateway may even be up
            assert c.lstat(b"/file").size == 12
        assert proc.wait(10) == 0
    finally:
        proc.kill()
        proc.wait()
    start = next(r for r in _records(tmp_path / "trail.jsonl") if r["event"] == "start")
    assert "socket activation" in str(start["endpoint"])


def test_socket_activation_on_another_path_than_s_is_refused(export: Path, tmp_path: Path) -> None:
    require_root()
    proc = _activated(export, tmp_path, tmp_path / "a.sock", tmp_path / "b.sock")
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 1
    assert b"not to -s" in err and str(tmp_path / "b.sock").encode() in err


def test_persist_serves_one_client_after_another(export: Path, tmp_path: Path) -> None:
    require_root()
    with _named(export, tmp_path, "--persist") as proc:
        for n in range(1, 4):
            with Client.connect(str(tmp_path / "g.sock"), timeout=10) as c:
                assert c.lstat(b"/file").size == 12
            _wait_for(
                lambda n=n: sum(r["event"] == "client-gone" for r in _records(tmp_path / "trail.jsonl")) >= n,
                "the client's end",
            )
        assert proc.poll() is None  # still waiting for the next one
    sessions = [r for r in _records(tmp_path / "trail.jsonl") if r["event"] == "session"]
    assert [s["session"] for s in sessions] == [1, 2, 3]


# -- stopping: SIGTERM (systemctl stop) and SIGINT end with the records, not mid-instruction --------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_while_waiting_ends_with_a_stop_record(export: Path, tmp_path: Path, sig: int) -> None:
    require_root()
    with _notify_socket(tmp_path) as notify:
        env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify")}
        with _named(export, tmp_path, "--persist", env=env) as proc:
            messages = _messages(notify)
            assert next(messages)["READY"] == "1"
            os.kill(proc.pid, sig)
            assert proc.wait(10) == 0
            assert next(messages)["STOPPING"] == "1"
    *_, stop, final = _records(tmp_path / "trail.jsonl")
    assert stop["event"] == "stop" and "stopped by a signal" in str(stop["reason"])
    assert final["event"] == "checkpoint" and final["final"] is True  # the trail closed properly


def test_sigterm_while_serving_answers_the_request_in_flight_then_stops(export: Path, tmp_path: Path) -> None:
    require_root()
    with _named(export, tmp_path) as proc:
        with Client.connect(str(tmp_path / "g.sock"), timeout=10) as c:
            replies = [c.lstat(b"/file").size for _ in range(50)]
            os.kill(proc.pid, signal.SIGTERM)
            assert proc.wait(10) == 0
        assert replies == [12] * 50
    records = _records(tmp_path / "trail.jsonl")
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))  # the chain whole to the end
    *_, stop, final = records
    assert stop["event"] == "stop" and stop["requests"] == 50
    assert "stopped by a signal" in str(stop["reason"])
    assert final["event"] == "checkpoint" and final["final"] is True  # sealed to the end
