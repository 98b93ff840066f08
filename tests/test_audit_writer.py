"""The audit writer: record shape, the hash chain, resume, rotation, sync modes, failures."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
from dataclasses import replace
from pathlib import Path

import pytest
from helpers import fill, mounted_tmpfs, require_root

from gateway import protocol as p
from gateway.audit import (
    ZERO_HASH,
    AuditError,
    AuditWriter,
    TrailFailed,
    TrailFull,
    default_audit_path,
    request_fields,
)  # fmt: skip
from gateway.audit import writer as writer_module
from gateway.audit.fields import FIELD_ORDER, FIELD_SPECS, request_fragment, text
from gateway.audit.verify import verify

ALL_REQUESTS: list[p.Request] = [
    p.Open(b"/a", os.O_RDWR | os.O_CREAT),
    p.Create(b"/home/u/f", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, 1000, 100),
    p.Mknod(0, 0, b"/dev/x", 0o20644, 0x0501),
    p.Mkdir(1000, 1000, b"/home/u/d", 0o755),
    p.Symlink(1000, 1000, b"../target", b"/home/u/link"),
    p.Link(b"/home/u/f", b"/home/u/g"),
    p.Lstat(b"/"),
    p.Readlink(b"/home/u/link", 4096),
    p.Statfs(b"/"),
    p.Chmod(b"/home/u/f", 0o4755),
    p.Chown(b"/home/u/f", 0, 0),
    p.Truncate(b"/home/u/f", 1 << 40),
    p.Utime(b"/home/u/f", 1, 2, 3, (1 << 30) - 1),
    p.Rename(b"/home/u/f", b"/home/u/h"),
    p.Remove(b"/home/u/h"),
    p.Lgetxattr(0, b"/home/u/f", b"user.x"),
    p.Llistxattr(256, b"/home/u/f"),
    p.Lsetxattr(b"/home/u/f", b"security.capability", b"\x00\x01secret", 7, 1),
    p.Lremovexattr(b"/home/u/f", b"user.x"),
    p.Getversion(b"/home/u/f"),
]


def read_lines(path: Path) -> list[bytes]:
    return path.read_bytes().split(b"\n")[:-1]


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in read_lines(path)]


def open_writer(path: Path | str, **kw) -> AuditWriter:
    kw.setdefault("tenant", "guest-42")
    kw.setdefault("policy_hash", "ab" * 32)
    return AuditWriter.open(path, **kw)


def allow(writer: AuditWriter, request: p.Request, **extra) -> None:
    writer.request(
        request, decision="allow", rule="homes", reason="allowed by homes", result="ok", us=3.25, **extra
    )


def test_every_request_type_has_fields_and_the_fast_encoding_agrees() -> None:
    assert {type(r) for r in ALL_REQUESTS} == set(FIELD_SPECS)
    for request in ALL_REQUESTS:
        fields = request_fields(request)
        assert json.loads("{" + request_fragment(request) + "}") == fields
        assert list(fields) == [k for k in FIELD_ORDER if k in fields]  # the contract's order
        assert fields["op"] == request.type.name.lower()


def test_field_shapes_follow_the_contract() -> None:
    by_op = {request.type.name.lower(): request_fields(request) for request in ALL_REQUESTS}
    assert by_op["open"] == {"op": "open", "path": "/a", "flags": ["O_RDWR", "O_CREAT"]}
    assert by_op["create"]["mode"] == "0644" and by_op["create"]["uid"] == 1000
    assert by_op["mknod"] == {
        "op": "mknod",
        "path": "/dev/x",
        "uid": 0,
        "gid": 0,
        "mode": "020644",
        "rdev": 0x501,
    }
    assert by_op["symlink"] == {
        "op": "symlink",
        "path": "/home/u/link",
        "target": "../target",
        "uid": 1000,
        "gid": 1000,
    }
    assert by_op["rename"]["path2"] == "/home/u/h"
    assert by_op["utime"]["atime"] == [1, 2] and by_op["utime"]["mtime"] == [3, (1 << 30) - 1]
    assert by_op["lsetxattr"] == {
        "op": "lsetxattr",
        "path": "/home/u/f",
        "flags": ["XATTR_CREATE"],
        "name": "security.capability",
        "size": 7,
    }  # the value is never recorded
    assert by_op["readlink"]["bufsize"] == 4096 and by_op["truncate"]["length"] == 1 << 40


def test_undecodable_path_bytes_survive(tmp_path: Path) -> None:
    raw = b"/home/\xff\xfe/\x1b[31mred\n"
    with open_writer(tmp_path / "t.jsonl") as w:
        allow(w, p.Lstat(raw))
    line = read_lines(tmp_path / "t.jsonl")[0]
    assert line.isascii()  # \udcff escapes: the file is pure ASCII JSON lines
    assert json.loads(line)["path"].encode("utf-8", "surrogateescape") == raw


def test_records_chain_and_carry_the_contract_fields(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    with open_writer(path) as w:
        w.lifecycle("start", version="0.1.0", export="/srv/x", sandbox={"chroot": "/srv/x"})
        w.request(
            p.Open(b"/etc/shadow", os.O_RDONLY),
            decision="deny",
            rule=None,
            reason="default deny",
            result="EACCES",
            us=1.0,
        )
        allow(w, p.Create(b"/home/u/f", os.O_RDWR | os.O_CREAT, 0o600, 1000, 1000), matched=["homes", "x"])
        w.lifecycle("stop", reason="client gone")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    lines = read_lines(path)
    recs = [json.loads(line) for line in lines]
    assert [r["seq"] for r in recs] == [1, 2, 3, 4, 5]
    assert recs[0]["prev"] == ZERO_HASH
    for before, rec in zip(lines, recs[1:], strict=False):
        assert rec["prev"] == hashlib.sha256(before).hexdigest()
    start, deny, ok, stop, final = recs
    # close() ends the session with its final checkpoint: the range since the last one and the head
    assert final["event"] == "checkpoint" and final["final"] is True and final["seal"] is None
    assert final["first"] == 1 and final["last"] == 4 and final["head"] == final["prev"]
    assert (
        start["event"] == "start" and start["export"] == "/srv/x" and start["sandbox"] == {"chroot": "/srv/x"}
    )
    assert start["policy"] == "ab" * 8 and start["policy_sha256"] == "ab" * 32
    assert list(deny) == [
        "seq",
        "time",
        "tenant",
        "policy",
        "event",
        "op",
        "path",
        "flags",
        "decision",
        "rule",
        "reason",
        "result",
        "us",
        "prev",
    ]
    assert deny["rule"] is None and deny["decision"] == "deny" and deny["result"] == "EACCES"
    assert ok["matched"] == ["homes", "x"] and ok["us"] == 3.2  # one decimal
    assert stop["event"] == "stop" and "policy_sha256" not in stop
    assert deny["time"].endswith("Z") and len(deny["time"]) == len("2026-11-22T07:41:29.123456Z")
    assert verify([str(path)]).ok


def test_a_record_is_in_the_file_when_request_returns(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    w = open_writer(path)
    for n in range(1, 4):
        allow(w, p.Lstat(b"/x"))
        assert len(read_lines(path)) == n  # no user-space buffering: the kernel has it
    w.close()


def test_reserved_and_bad_names_are_refused(tmp_path: Path) -> None:
    with open_writer(tmp_path / "t.jsonl") as w:
        with pytest.raises(ValueError):
            allow(w, p.Lstat(b"/"), seq=5)
        with pytest.raises(ValueError):
            allow(w, p.Lstat(b"/"), path="/other")
        with pytest.raises(ValueError):
            w.lifecycle("start", prev="0")
        with pytest.raises(ValueError):
            w.lifecycle("Bad Event")
        allow(w, p.Lstat(b"/"))
        assert w.seq == 2  # nothing was written by the refused calls


def test_not_a_number_is_null(tmp_path: Path) -> None:
    with open_writer(tmp_path / "t.jsonl") as w:
        w.request(p.Lstat(b"/"), decision="allow", rule="r", reason="", result="ok", us=float("nan"))
    assert records(tmp_path / "t.jsonl")[0]["us"] is None


def test_resume_continues_seq_and_chain(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    with open_writer(path) as w:
        w.lifecycle("start")
        allow(w, p.Lstat(b"/a"))
    with open_writer(path) as w:
        assert w.seq == 4 and not w.notes  # after the first session's final checkpoint (seq 3)
        w.lifecycle("start")
    recs = records(path)
    assert [r["seq"] for r in recs] == [1, 2, 3, 4, 5]
    assert recs[3]["prev"] == hashlib.sha256(read_lines(path)[2]).hexdigest()
    assert "audit_notes" not in recs[3] and recs[4]["first"] == 4
    assert verify([str(path)]).ok


def test_resume_after_a_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    with open_writer(path) as w:
        w.lifecycle("start")
        allow(w, p.Lstat(b"/a"))
    good = read_lines(path)[:2]  # (without the final checkpoint: as if the gateway had crashed)
    path.write_bytes(b"".join(line + b"\n" for line in good))
    with open(path, "ab") as f:
        f.write(b'{"seq":3,"time":"2026-')  # a write cut short (power loss)
    assert [p.kind for p in verify([str(path)]).problems] == ["truncated last line", "unsealed tail"]
    with open_writer(path) as w:
        assert w.seq == 3
        assert any("torn" in note for note in w.notes)
        w.lifecycle("start")
    lines = read_lines(path)
    assert len(lines) == 5 and lines[2] == b'{"seq":3,"time":"2026-'
    resumed = json.loads(lines[3])
    assert resumed["seq"] == 3 and resumed["torn"] == {"line": 3, "bytes": 22}
    assert resumed["prev"] == hashlib.sha256(good[1]).hexdigest()
    assert any("torn last line" in n for n in resumed["audit_notes"])
    report = verify([str(path)])
    assert [(p.kind, p.line) for p in report.problems] == [("torn line", 3)]
    assert "resumed after it" in report.problems[0].message


def test_reopen_after_rotation_continues_the_chain(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    w = open_writer(path)
    w.lifecycle("start")
    allow(w, p.Lstat(b"/a"))
    os.rename(path, tmp_path / "t.jsonl.1")  # logrotate
    allow(w, p.Lstat(b"/b"))  # still goes to the old file until SIGUSR1
    last_old = w.last_hash
    assert w.reopen()
    allow(w, p.Lstat(b"/c"))
    w.close()
    old, new = records(tmp_path / "t.jsonl.1"), records(path)
    # the old file ends with a checkpoint (seq 4) written before the switch; the new one with the final
    assert [r["seq"] for r in old] == [1, 2, 3, 4] and [r["seq"] for r in new] == [5, 6, 7]
    assert old[-1]["event"] == "checkpoint" and old[-1]["last"] == 3 and "final" not in old[-1]
    assert new[-1]["event"] == "checkpoint" and new[-1]["first"] == 5 and new[-1]["final"] is True
    assert verify([str(tmp_path / "t.jsonl.1")], live=True).ok  # the old file alone: sealed, not final
    old_lines = read_lines(tmp_path / "t.jsonl.1")
    assert old[-1]["prev"] == last_old
    assert new[0]["event"] == "reopen" and new[0]["rotated"] is True
    assert new[0]["prev"] == hashlib.sha256(old_lines[-1]).hexdigest()
    # given in any order (a shell glob), the files are walked by their first seq
    assert verify([str(path), str(tmp_path / "t.jsonl.1")]).ok
    assert not verify([str(path), str(tmp_path / "t.jsonl.1")], given_order=True).ok


def test_reopen_from_a_signal_handler_waits_for_the_record_being_written(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    w = open_writer(path)
    allow(w, p.Lstat(b"/a"))
    os.rename(path, tmp_path / "t.jsonl.1")
    w._busy = True  # as if SIGUSR1 arrived in the middle of request()
    assert w.reopen()
    w._busy = False
    assert not path.exists()
    allow(w, p.Lstat(b"/b"))  # finishes, then reopens
    w.close()
    assert [r["seq"] for r in records(tmp_path / "t.jsonl.1")] == [1, 2, 3]
    assert [r["event"] for r in records(path)] == ["reopen", "checkpoint"]
    assert verify([str(tmp_path / "t.jsonl.1"), str(path)]).ok


def test_reopen_survives_chroot_by_using_the_directory_fd(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "t.jsonl"
    w = open_writer(path)
    allow(w, p.Lstat(b"/a"))
    os.rename(path, tmp_path / "old.jsonl")
    monkeypatch.chdir("/")  # the writer never resolves the path again by name from the cwd or root
    w.reopen()
    w.close()
    assert path.exists()


def test_a_second_writer_on_the_same_trail_is_refused(tmp_path: Path) -> None:
    with open_writer(tmp_path / "t.jsonl"), pytest.raises(AuditError, match="in use"):
        open_writer(tmp_path / "t.jsonl")


def test_sync_modes(tmp_path: Path, monkeypatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(writer_module.os, "fdatasync", lambda fd: calls.append(fd))
    with open_writer(tmp_path / "every.jsonl", sync="every") as w:
        for _ in range(3):
            allow(w, p.Lstat(b"/"))
        assert len(calls) == 3
    calls.clear()
    clock = [100.0]
    monkeypatch.setattr(writer_module.time, "monotonic", lambda: clock[0])
    with open_writer(tmp_path / "interval.jsonl", sync="interval", interval=1.0) as w:
        for _ in range(5):
            allow(w, p.Lstat(b"/"))  # within a second of opening: no sync
        assert calls == []
        clock[0] += 1.5
        allow(w, p.Lstat(b"/"))
        allow(w, p.Lstat(b"/"))
        assert len(calls) == 1  # at most once a second
        clock[0] += 1.0
        w.sync_if_due()
        assert len(calls) == 2
    calls.clear()
    with open_writer(tmp_path / "never.jsonl", sync="never") as w:
        allow(w, p.Lstat(b"/"))
    assert calls == []
    with pytest.raises(ValueError):
        open_writer(tmp_path / "x.jsonl", sync="sometimes")


def test_a_failed_write_raises_and_is_not_counted(tmp_path: Path) -> None:
    w = open_writer("/dev/full")  # a character device: no room can be reserved, the write itself fails
    with pytest.raises(AuditError, match="failed"):
        allow(w, p.Lstat(b"/"))
    assert w.seq == 1 and w.last_hash == ZERO_HASH
    w.close()


def test_default_path_is_per_tenant_and_cannot_escape() -> None:
    assert default_audit_path("guest-42") == "/var/log/gateway/guest-42.jsonl"
    assert default_audit_path("../../etc/passwd") == "/var/log/gateway/_._.._etc_passwd.jsonl"
    assert default_audit_path("") == "/var/log/gateway/default.jsonl"
    assert os.path.dirname(default_audit_path("a/b")) == "/var/log/gateway"


def test_no_path_means_the_default_path(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(writer_module, "DEFAULT_DIR", str(tmp_path / "log" / "gateway"))
    with AuditWriter.open(None, tenant="t1", policy_hash="00") as w:
        allow(w, p.Lstat(b"/"))
        assert w.path == str(tmp_path / "log" / "gateway" / "t1.jsonl")
    assert stat.S_IMODE(os.stat(tmp_path / "log" / "gateway").st_mode) == 0o700
    assert records(tmp_path / "log" / "gateway" / "t1.jsonl")[0]["tenant"] == "t1"


def test_set_policy_changes_later_records(tmp_path: Path) -> None:
    with open_writer(tmp_path / "t.jsonl") as w:
        allow(w, p.Lstat(b"/"))
        w.set_policy("cd" * 32)
        w.lifecycle("policy-reload", source="/etc/gateway/p.yaml")
        allow(w, p.Lstat(b"/"))
    recs = records(tmp_path / "t.jsonl")
    assert [r["policy"] for r in recs] == ["ab" * 8, "cd" * 8, "cd" * 8, "cd" * 8]  # and the checkpoint
    assert recs[1]["policy_sha256"] == "cd" * 32


def test_a_world_readable_trail_is_noted(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_bytes(b"")
    os.chmod(path, 0o644)
    with open_writer(path) as w:
        w.lifecycle("start")
    assert any("accessible to others" in n for n in records(path)[0]["audit_notes"])


def test_writer_module_does_not_import_rich() -> None:
    import subprocess
    import sys

    code = (
        "import sys, gateway.audit; sys.exit('rich' in sys.modules or 'gateway.audit.views' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent.parent).returncode == 0


# ---------------------------------------------------------------------------------------------------------
# Failing closed: room reserved before acting, the latch after a failed record, symlinks refused


def blocks(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def test_room_is_reserved_past_the_end_without_changing_the_size(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    w = open_writer(path)
    allow(w, p.Lstat(b"/a"))
    size = os.stat(path).st_size
    assert size == len(path.read_bytes())  # readers see the records only
    assert blocks(path) >= size + writer_module.RESERVE_AHEAD - 4096
    w.reserve(p.Lstat(b"/b"))  # room there already: nothing to allocate, nothing written
    assert os.stat(path).st_size == size
    w.close()
    assert blocks(path) < size + 64 * 1024  # close gives the room back


def test_reserve_tops_up_as_the_room_is_used(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    w = open_writer(path)
    long = b"/" + b"x" * 4000
    for _ in range(200):  # ~800 KiB of records: three times the first reservation
        w.reserve(p.Lstat(long))
        allow(w, p.Lstat(long))
    assert blocks(path) >= os.stat(path).st_size + writer_module.LIFECYCLE_ROOM
    w.close()
    assert verify([str(path)]).ok


def test_the_record_bound_holds_for_the_worst_bytes(tmp_path: Path) -> None:
    """The bound reserve() allocates for must cover the record, whatever bytes the guest sends: lone
    surrogates and control characters cost six JSON characters a byte."""
    with open_writer(tmp_path / "t.jsonl") as w:
        w.lifecycle("start")  # the first record's notes are accounted apart
        for bad in (b"\xff", b"\x01", "é".encode(), "😀".encode()):
            for request in ALL_REQUESTS:
                fields = {}
                for key in writer_module._TEXT_FIELDS[type(request)]:
                    fields[key] = bad * (1000 // len(bad))
                worst = replace(request, **fields)
                reason = "é" * 300 + "\x01" * 300
                resolved = bad * 700
                bound = w._record_bound(worst, (reason, resolved))
                before = os.stat(w.path).st_size
                w.request(
                    worst, decision="would-deny", rule="r" * 128, reason=reason, result="ENAMETOOLONG",
                    us=1e300, resolved=text(resolved), host_uid=2**32 - 1, host_gid=2**32 - 1,
                )  # fmt: skip
                assert os.stat(w.path).st_size - before <= bound, type(request).__name__


def test_no_room_refuses_before_acting_and_writes_no_partial_line(tmp_path: Path) -> None:
    with mounted_tmpfs(tmp_path / "fs") as fs:
        path = fs / "t.jsonl"
        w = open_writer(path)
        w.lifecycle("start")
        w.reserve(p.Mkdir(0, 0, b"/d", 0o755))  # room for one, taken before the disk fills
        fill(fs)
        granted = 0
        with pytest.raises(TrailFull, match="no room for the next record"):
            for _ in range(10_000):
                w.reserve(p.Mkdir(0, 0, b"/d", 0o755))
                allow(w, p.Mkdir(0, 0, b"/d", 0o755))  # a reserved record is always written
                granted += 1
        assert w.failed is None  # a refused reservation lost no record: the writer still works
        size = os.stat(path).st_size
        # A record that does not fit is not written at all; from then on the writer refuses everything.
        with pytest.raises(TrailFull):
            allow(w, p.Mkdir(0, 0, b"/" + b"d" * 9000, 0o755))
        assert os.stat(path).st_size == size
        assert w.failed is not None and "no room" in w.failed
        with pytest.raises(TrailFailed):
            w.reserve(p.Lstat(b"/"))
        with pytest.raises(TrailFailed):
            allow(w, p.Lstat(b"/"))
        assert w.lifecycle("stop", reason="done") is False  # never raises
        assert not w.reopen()
        w.close()
        data = path.read_bytes()
        assert data.endswith(b"\n") and len(data) == size
        # Whole lines, the chain intact; no final checkpoint (the failed writer wrote nothing more), which
        # --verify reports as it would a cut: the trail is not complete
        assert [p.kind for p in verify([str(path)]).problems] == ["unsealed tail"]
        assert verify([str(path)], live=True).ok
        assert granted >= 1  # the room reserved before the disk filled carried on serving


def test_a_failed_write_latches_and_lifecycle_records_never_raise(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "t.jsonl"
    w = open_writer(path)
    w.lifecycle("start")

    def broken(fd: int, data: bytes) -> int:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(writer_module, "_write", broken)
    w.reserve(p.Lstat(b"/"))  # room is there: the disk is not full, it is broken
    with pytest.raises(AuditError, match="Input/output error"):
        allow(w, p.Lstat(b"/"))
    monkeypatch.undo()  # the disk recovers; the writer does not trust it again
    with pytest.raises(TrailFailed, match="failed earlier"):
        w.reserve(p.Lstat(b"/"))
    with pytest.raises(TrailFailed):
        allow(w, p.Lstat(b"/"))
    assert w.lifecycle("stop") is False
    w.close()
    assert [r["event"] for r in records(path)] == ["start"]


def test_a_failed_sync_latches(tmp_path: Path, monkeypatch) -> None:
    w = open_writer(tmp_path / "t.jsonl", sync="every")

    def broken(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(writer_module.os, "fdatasync", broken)
    with pytest.raises(AuditError, match="sync"):
        allow(w, p.Lstat(b"/"))
    monkeypatch.undo()
    with pytest.raises(TrailFailed):
        w.reserve(p.Lstat(b"/"))
    w.close()


def test_without_fallocate_the_writer_says_so_and_latches_on_the_first_failure(
    tmp_path: Path, monkeypatch
) -> None:
    def unsupported(fd: int, mode: int, offset: int, length: int) -> None:
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(writer_module, "fallocate", unsupported)
    path = tmp_path / "t.jsonl"
    w = open_writer(path)
    w.reserve(p.Lstat(b"/"))  # nothing can be promised, nothing is refused
    allow(w, p.Lstat(b"/"))
    assert any("cannot reserve room" in n for n in records(path)[0]["audit_notes"])

    def full(fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer_module, "_write", full)
    with pytest.raises(AuditError):
        allow(w, p.Lstat(b"/"))
    with pytest.raises(TrailFailed):
        w.reserve(p.Lstat(b"/"))
    w.close()


def test_a_symlink_at_the_trail_is_refused(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (tmp_path / "t.jsonl").symlink_to(victim)
    with pytest.raises(AuditError, match=f"audit log {tmp_path}/t.jsonl is a symlink: refusing"):
        open_writer(tmp_path / "t.jsonl")
    assert victim.read_text() == "precious\n"
    (tmp_path / "d.jsonl").symlink_to(tmp_path / "nowhere")  # dangling: would create a file there
    with pytest.raises(AuditError, match="is a symlink: refusing"):
        open_writer(tmp_path / "d.jsonl")
    assert not (tmp_path / "nowhere").exists()


def test_reopen_refuses_a_symlink_planted_after_rotation(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    w = open_writer(path)
    allow(w, p.Lstat(b"/a"))
    os.rename(path, tmp_path / "t.jsonl.1")
    path.symlink_to(tmp_path / "victim")
    assert not w.reopen()  # keeps writing to the old file, and says why there
    w.close()
    last = records(tmp_path / "t.jsonl.1")[-2]  # before the final checkpoint
    assert last["event"] == "reopen" and "Too many levels of symbolic links" not in last["error"]
    assert "symlink" in last["error"] and not (tmp_path / "victim").exists()


def test_the_trail_directory_and_others_symlinks_on_the_way_are_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "logs").symlink_to(real)
    with pytest.raises(AuditError, match=f"audit log directory {tmp_path}/logs is a symlink: refusing"):
        open_writer(tmp_path / "logs" / "t.jsonl")
    # Higher up, a symlink of root's (/var/run -> /run, /var/log -> /data/log) is followed...
    (real / "sub").mkdir()
    (tmp_path / "up").symlink_to(real)
    with open_writer(tmp_path / "up" / "sub" / "t.jsonl") as w:
        allow(w, p.Lstat(b"/"))
    assert (real / "sub" / "t.jsonl").exists()
    # ...and one that another user made is not: only its owner could have planted it.
    require_root()
    (tmp_path / "theirs").symlink_to(real)
    os.lchown(tmp_path / "theirs", 1000, 1000)
    with pytest.raises(AuditError, match=f"{tmp_path}/theirs is a symlink owned by uid 1000: refusing"):
        open_writer(tmp_path / "theirs" / "sub" / "t2.jsonl")
    assert not (real / "sub" / "t2.jsonl").exists()
