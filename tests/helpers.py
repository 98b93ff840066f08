"""Starting real helper processes (the gateway or the reference) for tests."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from gateway.client import Client

REFERENCE = "/usr/lib/qemu/virtfs-proxy-helper"
ROOT = Path(__file__).resolve().parent.parent
ALLOW_ALL = str(ROOT / "policies" / "allow-all.yaml")
# GATEWAY_CMD overrides how the gateway is started (e.g. under strace to list the syscalls it makes).
# allow-all: these tests hold the gateway to the reference's behaviour; policy tests pass their own.
GATEWAY = os.environ.get("GATEWAY_CMD", "").split() or [sys.executable, "-m", "gateway", "serve"]
GATEWAY = [*GATEWAY, "--policy", ALLOW_ALL]


def trail_args(export: Path, extra: list[str] | None = None) -> list[str]:
    """Each test gateway writes its own trail beside its export (unless the test chose one)."""
    if extra and "--audit-log" in extra:
        return []
    return ["--audit-log", f"{export}.audit.jsonl"]


def require_root() -> None:
    # CI runs as root; a missing prerequisite there is a failure, not a skip.
    assert os.geteuid() == 0, "this test needs root (CI runs as root): run it with sudo"


def require_reference() -> None:
    assert os.access(REFERENCE, os.X_OK), (
        f"{REFERENCE} is missing: apt-get install qemu-system-common (scripts/setup.sh does)"
    )


@dataclass
class Running:
    proc: subprocess.Popen[bytes]
    client: Client

    def stop(self, timeout: float = 5) -> int:
        self.client.close()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


@contextmanager
def over_socketpair(
    cmd: list[str],
    export: Path,
    extra: list[str] | None = None,
    timeout: float = 10,
    stderr: int | IO[bytes] = subprocess.PIPE,
) -> Iterator[Running]:
    """The gateway (or the reference) on one end of a socketpair, the test's Client on the other.
    stderr: a PIPE by default (nobody drains it, so keep it for short sessions: a gateway logs a
    warning per malformed frame and blocks once 64 KiB of them wait); a file for long ones."""
    ours, theirs = socket.socketpair()
    ours.settimeout(timeout)
    proc = subprocess.Popen(
        [
            *cmd,
            "-p",
            str(export),
            "-f",
            str(theirs.fileno()),
            "-n",
            *(extra or []),
            *gateway_only(cmd, export, extra),
        ],
        pass_fds=[theirs.fileno()],
        stderr=stderr,
    )
    theirs.close()
    running = Running(proc, Client(ours))
    try:
        yield running
    finally:
        running.client.close()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()


def gateway_only(cmd: list[str], export: Path, extra: list[str] | None) -> list[str]:
    return trail_args(export, extra) if cmd[: len(GATEWAY)] == GATEWAY else []


def wait_listening(path: str, timeout: float = 10) -> None:
    """Wait until a unix socket at path is listening, without connecting (the helper accepts one)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open("/proc/net/unix") as f:
            for line in f:
                fields = line.split()
                # Flags 00010000 = __SO_ACCEPTCON: a listening socket.
                if len(fields) >= 8 and fields[-1] == path and fields[3] == "00010000":
                    return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listens on {path}")


@contextmanager
def mounted_tmpfs(mnt: Path, size: str = "64k") -> Iterator[Path]:
    """A small tmpfs at mnt (created), unmounted afterwards: a file system a test can fill in a moment."""
    require_root()
    mnt.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def fill(directory: Path) -> None:
    """Take every byte the file system at directory has left (pages first, then the odd bytes)."""
    with open(directory / "filler", "ab", buffering=0) as f:
        for size in (4096, 512, 1):
            try:
                while True:
                    f.write(b"\0" * size)
            except OSError as exc:
                assert exc.errno in (errno.ENOSPC, errno.EDQUOT), exc


def status_of(pid: int) -> dict[str, str]:
    out: dict[str, str] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            out[key] = value.strip()
    return out
