"""The systemd units and the logrotate snippet (contrib/): verified by systemd-analyze (man pages
included), the generator's drop-ins, memory limits above what a 10,000-rule gateway measurably uses,
and a real rotation of a real gateway's trail by the snippet.

systemd does not run as PID 1 on this machine or CI's (no bus, no manager): the units are verified, not
started; the part of a start that is the gateway's (socket activation, sd_notify) is the serve tests'."""

from __future__ import annotations

import configparser
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import ALLOW_ALL, require_root

from gateway import protocol as p

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "contrib" / "systemd"
SERVICE = UNITS / "gateway@.service"
SOCKET = UNITS / "gateway@.socket"
GENERATOR = UNITS / "gateway-env-generator"
LOGROTATE = ROOT / "contrib" / "logrotate" / "gateway"
sys.path.insert(0, str(ROOT / "bench"))


def unit(path: Path) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    text = re.sub(r"\\\n\s*", " ", path.read_text())  # continuation lines
    parser.read_string(text)
    return parser


@pytest.fixture(scope="module")
def manpath(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("docs")
    subprocess.run([str(ROOT / "scripts/build-docs.sh"), str(out), sys.executable], check=True, timeout=120)
    return str(out / "man")


def verify(*units: Path | str, manpath: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    assert shutil.which("systemd-analyze"), "systemd-analyze is missing: apt-get install systemd (setup.sh)"
    return subprocess.run(
        ["systemd-analyze", "verify", "--man=yes", *map(str, units)],
        capture_output=True, text=True, timeout=60, cwd=cwd, env={**os.environ, "MANPATH": manpath},
    )  # fmt: skip


def test_the_units_verify_cleanly_with_their_man_pages(manpath: str, tmp_path: Path) -> None:
    out = verify(SERVICE, SOCKET, manpath=manpath)
    assert out.returncode == 0 and out.stderr == "", out.stderr
    # an instance, as `systemctl start gateway@guest42` loads it, with its socket beside it
    for u in (SERVICE, SOCKET):
        shutil.copy(u, tmp_path / u.name.replace("@.", "@guest42."))
    out = verify(tmp_path / "gateway@guest42.service", tmp_path / "gateway@guest42.socket", manpath=manpath)
    assert out.returncode == 0 and out.stderr == "", out.stderr
    # and verify does catch a unit that names a man page nobody installed
    out = verify(SERVICE, manpath=str(tmp_path))
    assert out.returncode != 0 and "gateway-serve(1)" in out.stderr


def test_service_and_socket_settings() -> None:
    service, sock = unit(SERVICE), unit(SOCKET)
    s = service["Service"]
    assert s["Type"] == "notify" and s["NotifyAccess"] == "main"
    assert s["Restart"] == "on-failure"
    start = s["ExecStart"]
    assert start.startswith("/usr/bin/env --block-signal=HUP,USR1 /opt/gateway/bin/gateway serve ")
    assert " -n --persist " in start
    for part in ("-p ${EXPORT}", "--policy ${POLICY}", "--audit-log ${AUDIT_LOG}", "-s /run/gateway/%i.sock",
                 "-u ${QEMU_UID}", "-g ${QEMU_GID}", "--tenant %i"):  # fmt: skip
        assert part in start, part
    assert s["EnvironmentFile"] == "-/etc/gateway/%i.env"
    assert "man:gateway-serve(1)" in service["Unit"]["Documentation"]
    assert service["Unit"]["Requires"] == "gateway@%i.socket"
    k = sock["Socket"]
    assert k["ListenStream"] == "/run/gateway/%i.sock" and k["SocketMode"] == "0660" and k["Accept"] == "no"
    assert k["Service"] == "gateway@%i.service"
    # why on-failure, written down beside it
    assert "--persist" in SERVICE.read_text().split("Restart=on-failure")[0].rsplit("ExecReload", 1)[1]


def size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(float(text[:-1]) * units[text[-1]]) if text[-1] in units else int(text)


def test_memory_limits_cover_a_measured_10000_rule_gateway_and_its_reload() -> None:
    """Measured now, not copied: the peak of a 10,000-rule gateway through a SIGHUP reload stays under
    MemoryHigh (never throttled) and MemoryMax."""
    require_root()
    import tempfile

    from bench_memory import measure
    from policy_gen import path_policy

    s = unit(SERVICE)["Service"]
    high, hard = size(s["MemoryHigh"]), size(s["MemoryMax"])
    with tempfile.TemporaryDirectory() as d:
        policy = Path(d) / "p10000.yaml"
        policy.write_text(path_policy(10_000))
        figures = measure(policy, Path(d))
    peak = max(figures.values()) * (1 << 20)
    assert peak < high < hard, (figures, s["MemoryHigh"], s["MemoryMax"])


def test_the_generator_makes_the_env_files_paths_writable(manpath: str, tmp_path: Path) -> None:
    conf, out = tmp_path / "etc", tmp_path / "generated"
    conf.mkdir()
    (conf / "guest7.env").write_text(
        'EXPORT=/data/guests/guest 7\nAUDIT_LOG="/data/trails/guest7.jsonl"\nQEMU_UID=1000\nQEMU_GID=1000\n'
    )
    (conf / "plain.env").write_text("QEMU_UID=1000\n")  # nothing moved: no drop-in
    env = {**os.environ, "GATEWAY_CONFIG_DIR": str(conf)}
    subprocess.run([str(GENERATOR), str(out), str(out), str(out)], check=True, env=env)
    dropin = out / "gateway@guest7.service.d" / "50-paths.conf"
    assert dropin.read_text().splitlines()[1:] == [
        "[Service]", 'ReadWritePaths="-/data/guests/guest 7" "-/data/trails"'
    ]
    assert sorted(p.name for p in out.iterdir()) == ["gateway@guest7.service.d"]
    # the drop-in verifies with the unit, as systemd would load them together
    units = tmp_path / "units"
    units.mkdir()
    shutil.copy(SERVICE, units / "gateway@guest7.service")
    shutil.copy(SOCKET, units / "gateway@guest7.socket")
    shutil.copytree(out / "gateway@guest7.service.d", units / "gateway@guest7.service.d")
    res = verify(units / "gateway@guest7.service", units / "gateway@guest7.socket", manpath=manpath)
    assert res.returncode == 0 and res.stderr == "", res.stderr


def test_logrotate_rotates_a_live_trail_and_the_chain_goes_on(tmp_path: Path) -> None:
    """The snippet as shipped, its path moved to a temporary directory and its postrotate's systemctl
    (no systemd here) replaced by the same signal to the gateway's pid: the gateway reopens, the old
    file stays whole, and `gateway audit --verify` reads both as one chain."""
    require_root()
    assert shutil.which("logrotate"), "logrotate is missing: apt-get install logrotate (setup.sh does)"
    logs, export = tmp_path / "log", tmp_path / "export"
    logs.mkdir()
    export.mkdir()
    trail = logs / "guest7.jsonl"
    ours, theirs = socket.socketpair()
    ours.settimeout(10)
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "-p", str(export), "-f", str(theirs.fileno()), "-n",
         "--policy", ALLOW_ALL, "--audit-log", str(trail)],
        pass_fds=[theirs.fileno()], stderr=subprocess.DEVNULL,
    )  # fmt: skip
    theirs.close()
    frame = p.encode_request(p.Lstat(b"/"), nul=True)
    try:
        ours.sendall(frame)
        ours.recv(256)
        text = LOGROTATE.read_text()
        assert "systemctl kill --kill-whom=main --signal=USR1 'gateway@*.service'" in text
        config = text.replace("/var/log/gateway/", f"{logs}/").replace(
            "systemctl kill --kill-whom=main --signal=USR1 'gateway@*.service'", f"kill -USR1 {proc.pid}"
        )
        (tmp_path / "logrotate.conf").write_text(config)
        subprocess.run(
            ["logrotate", "-f", "-s", str(tmp_path / "state"), str(tmp_path / "logrotate.conf")],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        rotated = [f for f in logs.iterdir() if f.name != "guest7.jsonl"]
        assert len(rotated) == 1 and rotated[0].name.startswith("guest7.jsonl-")  # delaycompress: plain
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not trail.exists():
            ours.sendall(frame)
            ours.recv(256)
            time.sleep(0.05)
        assert trail.exists(), "the gateway did not reopen its trail on SIGUSR1"
        ours.sendall(frame)
        ours.recv(256)
        assert trail.stat().st_size > 0
    finally:
        ours.close()
        proc.wait(10)
    out = subprocess.run(
        [sys.executable, "-m", "gateway", "audit", "--verify", str(rotated[0]), str(trail)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert proc.returncode == 0  # SIGUSR1 reopened the trail, it did not end the gateway


def environment(service: configparser.RawConfigParser, env_file: Path) -> dict[str, str]:
    """Environment= (the unit's defaults) then EnvironmentFile= (KEY=VALUE lines), as systemd reads them."""
    env: dict[str, str] = {}
    for line in SERVICE.read_text().splitlines():
        if line.startswith("Environment="):
            for pair in line.removeprefix("Environment=").split():
                key, _, value = pair.partition("=")
                env[key] = value
    for line in env_file.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip().strip('"')
    return env


def test_the_units_start_as_systemd_starts_them(tmp_path: Path) -> None:
    """No systemd here, so the test does what systemd would: bind the .socket's ListenStream with its
    SocketMode, let a client (QEMU) connect before any gateway runs, start the .service's ExecStart with
    the environment file, the listener as fd 3 (LISTEN_FDS=1, LISTEN_PID) and NOTIFY_SOCKET; then wait
    for READY=1, serve that client, serve the next one (--persist), and stop with SIGTERM, which
    Restart=on-failure counts as a clean stop."""
    require_root()
    service, sock_unit = unit(SERVICE), unit(SOCKET)
    run = tmp_path / "run"
    run.mkdir()
    instance = "g1"
    export, logs = tmp_path / "export", tmp_path / "log"
    export.mkdir()
    logs.mkdir()
    env_file = tmp_path / f"{instance}.env"
    env_file.write_text(f"EXPORT={export}\nPOLICY={ALLOW_ALL}\nAUDIT_LOG={logs}/{instance}.jsonl\n"
                        "QEMU_UID=0\nQEMU_GID=0\n")  # fmt: skip
    env = environment(service, env_file)

    def expand(text: str) -> str:
        text = text.replace("/run/gateway/", f"{run}/").replace("%i", instance)
        return re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], text)

    # the socket unit's part
    listen_path = expand(sock_unit["Socket"]["ListenStream"])
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(listen_path)
    os.chmod(listen_path, int(sock_unit["Socket"]["SocketMode"], 8))
    listener.listen(socket.SOMAXCONN)
    early = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    early.settimeout(30)
    early.connect(listen_path)  # QEMU started first: it waits in the backlog
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(run / "notify"))
    notify.settimeout(60)

    # the service's part
    argv = expand(service["Service"]["ExecStart"]).split()
    assert argv[2] == "/opt/gateway/bin/gateway"
    argv[2] = str(Path(sys.executable).with_name("gateway"))  # this checkout's, where the unit has /opt's
    assert "-s" in argv and argv[argv.index("-s") + 1] == listen_path
    lfd = listener.fileno()
    proc = subprocess.Popen(
        [sys.executable, "-c", AS_SYSTEMD_EXECS, str(lfd), *argv],
        env={**CLEAN_ENV, **env, "LISTEN_FDS": "1", "NOTIFY_SOCKET": str(run / "notify")},
        pass_fds=[lfd], stderr=subprocess.PIPE,
    )  # fmt: skip
    listener.close()
    messages: list[str] = []
    try:
        while not any("READY=1" in m for m in messages):
            try:
                messages.append(notify.recv(4096).decode())
            except TimeoutError:
                proc.kill()
                raise AssertionError(f"no READY=1: {proc.communicate()[1].decode()}") from None
        assert any(f"tenant {instance}" in m for m in messages), messages
        frame = p.encode_request(p.Lstat(b"/"), nul=True)
        for client in (early, None):
            if client is None:  # the guest rebooted: a new connection to the same gateway
                client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                client.settimeout(30)
                client.connect(listen_path)
            client.sendall(frame)
            reply = client.recv(4096)
            assert reply[:4] == p.encode_status(0)[:4] or len(reply) > 8, reply
            client.close()
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and proc.poll() is None:
                trail = (logs / f"{instance}.jsonl").read_bytes()
                if trail.count(b'"event":"client-gone"') == (1 if client is not early else 0) + 1:
                    break
                time.sleep(0.05)
        assert proc.poll() is None, "--persist: the gateway waits for the next client"
        trail = (logs / f"{instance}.jsonl").read_bytes()
        assert trail.count(b'"event":"session"') == 2 and trail.count(b'"event":"client-gone"') == 2
    finally:
        proc.send_signal(15)
        _, err = proc.communicate(timeout=30)
        notify.close()
    assert proc.returncode in (0, -15), err  # a clean stop: Restart=on-failure does not restart it


CLEAN_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
# the listener as fd 3 (SD_LISTEN_FDS_START), LISTEN_PID the pid that then execs ExecStart
AS_SYSTEMD_EXECS = (
    "import os, sys; fd = int(sys.argv[1]); os.dup2(fd, 3); fd == 3 or os.close(fd); "
    "os.environ['LISTEN_PID'] = str(os.getpid()); os.execv(sys.argv[2], sys.argv[2:])"
)
