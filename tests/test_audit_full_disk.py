"""The trail fails closed before acting: with the trail's file system full, no request is performed
unless its record is in the trail, the gateway never dies with a traceback, and the trail still verifies.
Also: a symlink planted where the trail (or its directory) goes is refused."""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import GATEWAY, fill, mounted_tmpfs, over_socketpair, require_root

from gateway import protocol as p

AUDIT = [sys.executable, "-m", "gateway", "audit"]


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs for the trail: small enough to fill in a moment."""
    with mounted_tmpfs(tmp_path / "trail-fs") as mnt:
        yield mnt


def records(trail: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in trail.read_bytes().splitlines()]


def test_a_full_trail_disk_performs_nothing_it_cannot_record(tmp_path: Path, small_fs: Path) -> None:
    export = tmp_path / "export"
    export.mkdir()
    rounds = 40
    for i in range(rounds):
        (export / f"r{i}").write_text("remove me")
        (export / f"m{i}").write_text("chmod me")
        os.chmod(export / f"m{i}", 0o644)
        (export / f"n{i}").write_text("rename me")
    trail = small_fs / "trail.jsonl"
    replies: dict[tuple[str, str], int] = {}
    with over_socketpair(GATEWAY, export, extra=["--audit-log", str(trail)]) as gw:
        c = gw.client
        assert c.call(p.Lstat(b"/")).errno == 0  # serving, its start records written
        fill(small_fs)
        for i in range(rounds):
            calls: list[tuple[str, str, p.Request]] = [
                ("remove", f"/r{i}", p.Remove(f"/r{i}".encode())),
                ("chmod", f"/m{i}", p.Chmod(f"/m{i}".encode(), 0o600)),
                ("rename", f"/n{i}", p.Rename(f"/n{i}".encode(), f"/n{i}.moved".encode())),
                ("mkdir", f"/d{i}", p.Mkdir(0, 0, f"/d{i}".encode(), 0o755)),
                ("create", f"/c{i}", p.Create(f"/c{i}".encode(), os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                                              0o644, 0, 0)),
            ]  # fmt: skip
            for op, path, request in calls:
                reply = c.call(request)
                if reply.fd is not None:
                    os.close(reply.fd)
                replies[(op, path)] = reply.errno
        gw.client.close()
        assert gw.proc.wait(10) == 0
        assert gw.proc.stderr is not None
        stderr = gw.proc.stderr.read().decode()
    assert "Traceback" not in stderr and "AuditError" not in stderr, stderr

    def performed(op: str, path: str) -> bool:
        target = export / path.lstrip("/")
        if op == "remove":
            return not target.exists()
        if op == "chmod":
            return stat.S_IMODE(target.stat().st_mode) == 0o600
        if op == "rename":
            return (export / (path.lstrip("/") + ".moved")).exists()
        return target.exists()

    recorded_ok = {
        (r["op"], r["path"]) for r in records(trail) if r.get("event") == "request" and r["result"] == "ok"
    } & set(replies)
    done = {key for key in replies if performed(*key)}
    assert done - recorded_ok == set(), "performed without a record"
    assert recorded_ok - done == set(), "recorded as done but not performed"
    for key, code in replies.items():  # the guest is told the truth: ok exactly when it was done
        assert (code == 0) == (key in done), (key, code)
    refused = [key for key, code in replies.items() if code]
    assert refused, "the disk never filled: nothing was tested"
    assert {replies[key] for key in refused} == {errno.EIO}
    # Whole lines and an intact chain; the writer that failed wrote no final checkpoint, which plain
    # --verify reports (as it would a cut) and --live accepts
    out = subprocess.run([*AUDIT, str(trail), "--verify", "--live"], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    out = subprocess.run([*AUDIT, str(trail), "--verify"], capture_output=True, text=True)
    assert out.returncode == 1 and "unsealed tail" in out.stdout, out.stdout + out.stderr


def test_a_symlink_planted_at_the_trail_is_refused(tmp_path: Path) -> None:
    require_root()
    export = tmp_path / "export"
    export.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    link = tmp_path / "trail.jsonl"
    link.symlink_to(victim)
    with over_socketpair(GATEWAY, export, extra=["--audit-log", str(link)]) as gw:
        assert gw.proc.wait(10) == 1
        assert gw.proc.stderr is not None
        stderr = gw.proc.stderr.read().decode()
    assert f"audit log {link} is a symlink: refusing" in stderr, stderr
    assert victim.read_text() == "precious\n"
    # A dangling link must not create a root-owned file at its target either.
    dangling = tmp_path / "t2.jsonl"
    dangling.symlink_to(tmp_path / "created-by-root")
    with over_socketpair(GATEWAY, export, extra=["--audit-log", str(dangling)]) as gw:
        assert gw.proc.wait(10) == 1
    assert not (tmp_path / "created-by-root").exists()


def test_a_symlink_planted_as_the_trail_directory_is_refused(tmp_path: Path) -> None:
    require_root()
    export = tmp_path / "export"
    export.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "logs").symlink_to(elsewhere)
    with over_socketpair(GATEWAY, export, extra=["--audit-log", str(tmp_path / "logs" / "t.jsonl")]) as gw:
        assert gw.proc.wait(10) == 1
        assert gw.proc.stderr is not None
        stderr = gw.proc.stderr.read().decode()
    assert f"audit log directory {tmp_path / 'logs'} is a symlink: refusing" in stderr, stderr
    assert list(elsewhere.iterdir()) == []
