"""Sealed checkpoints: the key's evolution, and --verify against every kind of tampering, with and without
the verification key (truncation at a line boundary, a cut head, a recomputed chain, a removed
checkpoint, a replayed older seal, a later key used for an earlier range, a cut back to an earlier
session), rotation and restarts."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway import protocol as p
from gateway.audit import AuditWriter
from gateway.audit.seal import KeyChain, SealKey, VerifyKey, compute_seal, evolve, keygen
from gateway.audit.verify import verify

ROOT = Path(__file__).resolve().parent.parent


def keys(tmp: Path) -> tuple[Path, Path]:
    seal, verify_key = tmp / "gw.seal", tmp / "gw.verify"
    keygen(str(seal), str(verify_key))
    return seal, verify_key


def sealed_trail(tmp: Path, records: int = 10, every: int = 3, name: str = "t.jsonl") -> tuple[Path, Path]:
    """A trail of a start record and `records` requests, a checkpoint every `every` records, sealed."""
    seal, verify_key = keys(tmp)
    path = tmp / name
    with AuditWriter.open(path, tenant="t", policy_hash="ab" * 32, seal=SealKey.open(seal),
                          checkpoint_every=every) as w:  # fmt: skip
        w.lifecycle("start", version="test")
        for i in range(records):
            w.request(p.Lstat(f"/f{i}".encode()), decision="allow" if i % 3 else "deny", rule="r", reason="",
                      result="ok", us=1.0)  # fmt: skip
        w.lifecycle("stop")
    return path, verify_key


def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().split(b"\n")[:-1]


def write(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(line + b"\n" for line in lines))


def rechain(lines: list[bytes], renumber: bool = False) -> list[bytes]:
    """What someone with write access but without the key does after an edit: every prev (and each
    checkpoint's head and range) recomputed, so that the chain alone looks intact."""
    out: list[bytes] = []
    prev = "0" * 64
    for seq, line in enumerate(lines, 1):
        record = json.loads(line)
        if renumber:
            record["seq"] = seq
        if record.get("event") == "checkpoint" and isinstance(record.get("seq"), int):
            record["head"] = prev
            record["last"] = record["seq"] - 1
        record["prev"] = prev
        data = json.dumps(record, separators=(",", ":")).encode()
        out.append(data)
        prev = hashlib.sha256(data).hexdigest()
    return out


def kinds(report) -> list[str]:
    return [p.kind for p in report.problems]


def cp_indexes(lines: list[bytes]) -> list[int]:
    return [i for i, line in enumerate(lines) if b'"event":"checkpoint"' in line]


# ---------------------------------------------------------------------------------------------------------
# The keys


def test_keygen_writes_two_private_files_and_never_overwrites(tmp_path: Path) -> None:
    seal, verify_key = keys(tmp_path)
    assert os.stat(seal).st_mode & 0o777 == 0o600 and os.stat(verify_key).st_mode & 0o777 == 0o600
    k = SealKey.open(seal)
    v = VerifyKey.load(str(verify_key))
    assert k.epoch == 0 and k.key_id == v.key_id
    k.close()
    with pytest.raises(FileExistsError):
        keygen(str(seal), str(tmp_path / "other"))
    assert not (tmp_path / "other").exists()  # nothing half-made


def test_the_key_evolves_in_place_and_the_old_one_is_gone(tmp_path: Path) -> None:
    seal, verify_key = keys(tmp_path)
    before = seal.read_bytes()
    k = SealKey.open(seal)
    record = {"key_id": k.key_id, "epoch": 0, "seq": 5, "first": 1, "last": 4, "head": "a" * 64}
    first = k.seal(record)
    k.advance()
    after = seal.read_bytes()
    assert len(after) == len(before) and after != before and k.epoch == 1
    k0 = VerifyKey.load(str(verify_key)).k0
    assert k0.hex().encode() in before and k0.hex().encode() not in after  # k[0] is not on disk any more
    assert evolve(k0).hex().encode() in after
    assert k.seal(record) != first  # a new key: the same message seals differently
    chain = KeyChain(VerifyKey.load(str(verify_key)))
    assert compute_seal(chain.key(0), record) == first
    assert chain.key(5) == evolve(evolve(evolve(evolve(evolve(k0)))))
    assert chain.key(3) is None  # keys are derived forwards only
    k.close()
    assert SealKey.open(seal).epoch == 1


def test_a_damaged_key_file_is_refused(tmp_path: Path) -> None:
    seal, verify_key = keys(tmp_path)
    seal.write_bytes(seal.read_bytes()[:-3] + b"zz\n")
    with pytest.raises(ValueError, match="not a gateway sealing key"):
        SealKey.open(seal)
    data = verify_key.read_bytes()
    verify_key.write_bytes(data[:30] + (b"0" if data[30:31] != b"0" else b"1") + data[31:])
    with pytest.raises(ValueError):
        VerifyKey.load(str(verify_key))


# ---------------------------------------------------------------------------------------------------------
# A clean trail


def test_a_sealed_trail_verifies_with_its_key(tmp_path: Path) -> None:
    path, verify_key = sealed_trail(tmp_path)
    lines = lines_of(path)
    cps = [json.loads(lines[i]) for i in cp_indexes(lines)]
    assert [c["epoch"] for c in cps] == list(range(len(cps))) and cps[-1]["final"] is True
    assert all(c["head"] == c["prev"] and c["seal"] for c in cps)
    report = verify([str(path)], key=VerifyKey.load(str(verify_key)))
    assert report.ok, [str(x) for x in report.problems]
    assert report.keyed and report.seals_valid == report.checkpoints == len(cps)
    assert report.sealed_through == report.last_seq
    assert not any("rewrite" in doubt for doubt in report.cannot_rule_out)
    plain = verify([str(path)])  # without the key: the chain only, and it says what it cannot rule out
    assert plain.ok and not plain.keyed and any("without --key" in d for d in plain.cannot_rule_out)


def test_rotation_and_restarts_keep_the_epochs_in_order(tmp_path: Path) -> None:
    seal, verify_key = keys(tmp_path)
    path = tmp_path / "t.jsonl"
    for session in range(3):
        w = AuditWriter.open(path, tenant="t", policy_hash="ab", seal=SealKey.open(seal), checkpoint_every=4)
        w.lifecycle("start")
        for i in range(6):
            w.request(p.Lstat(b"/x"), decision="allow", rule=None, reason="", result="ok", us=1)
            if session == 1 and i == 2:
                os.rename(path, tmp_path / "t.jsonl.1")
                assert w.reopen()
        w.close()
    files = [str(tmp_path / "t.jsonl.1"), str(path)]
    report = verify(files, key=VerifyKey.load(str(verify_key)))
    assert report.ok, [str(x) for x in report.problems]
    assert report.seals_valid == report.checkpoints >= 7  # 2 a session, 1 closing the rotated file
    assert verify([str(path)], key=VerifyKey.load(str(verify_key))).ok  # the newer file alone: noted
    # the older file alone: sealed up to its closing checkpoint, which is not the final one
    assert kinds(verify([files[0]], key=VerifyKey.load(str(verify_key)))) == ["no final checkpoint"]
    assert verify([files[0]], key=VerifyKey.load(str(verify_key)), live=True).ok


def test_a_crash_between_a_checkpoint_and_the_key_update_is_resumed(tmp_path: Path) -> None:
    """The trail holds checkpoint epoch e but the key file still says e: the next run evolves first."""
    seal, verify_key = keys(tmp_path)
    path = tmp_path / "t.jsonl"
    saved = seal.read_bytes()
    w = AuditWriter.open(path, tenant="t", policy_hash="ab", seal=SealKey.open(seal))
    w.lifecycle("start")
    w.close()  # the final checkpoint at epoch 0; the key file now says 1
    seal.write_bytes(saved)  # as if the process died before its pwrite reached the disk
    w = AuditWriter.open(path, tenant="t", policy_hash="ab", seal=SealKey.open(seal))
    w.lifecycle("start")
    w.close()
    epochs = [json.loads(x)["epoch"] for x in lines_of(path) if b'"checkpoint"' in x]
    assert epochs == [0, 1]
    assert verify([str(path)], key=VerifyKey.load(str(verify_key))).ok


# ---------------------------------------------------------------------------------------------------------
# Tampering, each kind with and without the key


@pytest.mark.parametrize("keyed", [True, False])
def test_truncation_at_a_line_boundary_is_caught(tmp_path: Path, keyed: bool) -> None:
    path, verify_key = sealed_trail(tmp_path, records=20)
    key = VerifyKey.load(str(verify_key)) if keyed else None
    lines = lines_of(path)
    write(path, lines[:15])  # head -15
    report = verify([str(path)], key=key)
    assert kinds(report) == ["unsealed tail"], [str(x) for x in report.problems]
    assert f"{path}:" in str(report.problems[0]) and "cut short" in report.problems[0].message
    # cut right after a checkpoint (a removed final checkpoint): still not the end of a session
    last_cp = cp_indexes(lines)[-2]
    write(path, lines[: last_cp + 1])
    assert kinds(verify([str(path)], key=key)) == ["no final checkpoint"]
    write(path, lines[:-1])  # only the final checkpoint removed
    assert kinds(verify([str(path)], key=key)) == ["unsealed tail"]


def test_truncation_is_caught_from_the_command_line(tmp_path: Path) -> None:
    path, verify_key = sealed_trail(tmp_path, records=20)
    write(path, lines_of(path)[:15])
    for extra in ([], ["--key", str(verify_key)]):
        out = subprocess.run([sys.executable, "-m", "gateway", "audit", str(path), "--verify", *extra],
                             capture_output=True, text=True, cwd=ROOT)  # fmt: skip
        assert out.returncode == 1 and "unsealed tail" in out.stdout, out.stdout + out.stderr
    out = subprocess.run([sys.executable, "-m", "gateway", "audit", str(path), "--verify", "--live"],
                         capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    assert out.returncode == 0 and "--live" in out.stdout, out.stdout + out.stderr


@pytest.mark.parametrize("keyed", [True, False])
def test_a_cut_head_is_caught(tmp_path: Path, keyed: bool) -> None:
    path, verify_key = sealed_trail(tmp_path)
    write(path, lines_of(path)[5:])  # tail -n +6
    report = verify([str(path)], key=VerifyKey.load(str(verify_key)) if keyed else None)
    assert kinds(report)[0] == "cut head" and report.problems[0].line == 1


def test_a_recomputed_chain_is_caught_only_with_the_key(tmp_path: Path) -> None:
    path, verify_key = sealed_trail(tmp_path)
    lines = lines_of(path)
    lines[2] = lines[2].replace(b'"decision":"allow"', b'"decision":"deny"')
    assert b'"decision":"deny"' in lines[2]
    write(path, rechain(lines))
    plain = verify([str(path)])
    assert plain.ok  # the chain alone cannot tell: and the report says so
    assert any("recomputed chain" in doubt for doubt in plain.cannot_rule_out)
    report = verify([str(path)], key=VerifyKey.load(str(verify_key)))
    first_cp = cp_indexes(lines)[0] + 1
    assert kinds(report)[0] == "bad seal" and report.problems[0].line == first_cp
    assert report.sealed_through is None or report.sealed_through < first_cp
    assert "unsealed tail" in kinds(report)  # everything after the last valid checkpoint, file:line


def test_an_edit_after_the_last_seal_is_caught(tmp_path: Path) -> None:
    """Records appended (or edited) after the final checkpoint: not covered by any seal."""
    path, verify_key = sealed_trail(tmp_path)
    lines = lines_of(path)
    extra = json.loads(lines[2])  # (a request)
    extra["seq"] = json.loads(lines[-1])["seq"] + 1
    write(path, rechain([*lines, json.dumps(extra, separators=(",", ":")).encode()]))
    report = verify([str(path)], key=VerifyKey.load(str(verify_key)))
    assert kinds(report) == ["unsealed tail"] and report.problems[0].line == len(lines) + 1


@pytest.mark.parametrize("keyed", [True, False])
def test_a_removed_checkpoint_is_caught(tmp_path: Path, keyed: bool) -> None:
    path, verify_key = sealed_trail(tmp_path)
    key = VerifyKey.load(str(verify_key)) if keyed else None
    lines = lines_of(path)
    cut = cp_indexes(lines)[1]
    write(path, lines[:cut] + lines[cut + 1 :])  # removed as it is
    assert {"broken link", "seq gap"} <= set(kinds(verify([str(path)], key=key)))
    write(path, rechain(lines[:cut] + lines[cut + 1 :], renumber=True))  # and the chain recomputed
    report = verify([str(path)], key=key)
    if keyed:
        assert "epoch out of order" in kinds(report)
    else:
        assert report.ok  # undetectable without the key


def test_a_replayed_older_seal_is_caught(tmp_path: Path) -> None:
    path, verify_key = sealed_trail(tmp_path)
    lines = lines_of(path)
    first, second = cp_indexes(lines)[:2]
    old = json.loads(lines[first])
    record = json.loads(lines[second])
    record["epoch"], record["seal"] = old["epoch"], old["seal"]
    lines[second] = json.dumps(record, separators=(",", ":")).encode()
    write(path, rechain(lines))
    report = verify([str(path)], key=VerifyKey.load(str(verify_key)))
    assert kinds(report)[0] == "epoch out of order" and report.problems[0].line == second + 1
    # the same seal at its own epoch number is no better: it seals another position and head
    record["epoch"] = old["epoch"] + 1
    lines[second] = json.dumps(record, separators=(",", ":")).encode()
    write(path, rechain(lines))
    assert kinds(verify([str(path)], key=VerifyKey.load(str(verify_key))))[0] == "bad seal"


def test_a_later_key_cannot_reseal_an_earlier_range(tmp_path: Path) -> None:
    """CVE-2023-31439: an intruder who read the key file at epoch j rewrites what was sealed before and
    reseals it with the keys it has (j, j+1, ...): the epochs give it away, whatever the MACs."""
    seal, verify_key = keys(tmp_path)
    path = tmp_path / "t.jsonl"
    with AuditWriter.open(path, tenant="t", policy_hash="ab", seal=SealKey.open(seal),
                          checkpoint_every=3) as w:  # fmt: skip
        for i in range(9):
            w.request(p.Lstat(f"/f{i}".encode()), decision="deny", rule="r", reason="", result="EACCES", us=1)
        intruder = seal.read_bytes()  # the intruder reads the key file now, at epoch 3
        for i in range(3):
            w.request(p.Lstat(f"/g{i}".encode()), decision="allow", rule="r", reason="", result="ok", us=1)
    (tmp_path / "stolen").write_bytes(intruder)
    key = SealKey.open(tmp_path / "stolen")
    assert key.epoch == 3
    # Rewrite the first range (a deny becomes an allow), recompute the chain, reseal every checkpoint in
    # order with the intruder's keys, epochs as the intruder can make them.
    lines = [json.loads(x) for x in lines_of(path)]
    lines[0]["decision"], lines[0]["result"] = "allow", "ok"
    for claimed in ("own", "zero"):
        k = SealKey(os.dup(key.fileno), "x", key.key_id, key.epoch, bytes(key._key))
        out: list[bytes] = []
        prev = "0" * 64
        for record in lines:
            record = dict(record, prev=prev)
            if record["event"] == "checkpoint":
                record.update(head=prev, epoch=k.epoch if claimed == "own" else record["epoch"])
                record["seal"] = k.seal(record)
                k._key[:] = evolve(bytes(k._key))
                k.epoch += 1
            data = json.dumps(record, separators=(",", ":")).encode()
            out.append(data)
            prev = hashlib.sha256(data).hexdigest()
        write(path, out)
        report = verify([str(path)], key=VerifyKey.load(str(verify_key)))
        assert not report.ok
        expected = "epoch out of order" if claimed == "own" else "bad seal"
        assert kinds(report)[0] == expected and report.problems[0].line == 4, kinds(report)
        assert not verify([str(path)], key=VerifyKey.load(str(verify_key))).ok


def test_another_keys_seals_and_unsealed_checkpoints_fail_with_a_key(tmp_path: Path) -> None:
    path, _ = sealed_trail(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    _, other_verify = keys(other)
    report = verify([str(path)], key=VerifyKey.load(str(other_verify)))
    assert kinds(report)[0] == "bad seal" and "not with this verification key" in report.problems[0].message
    plain = tmp_path / "plain.jsonl"
    with AuditWriter.open(plain, tenant="t", policy_hash="ab") as w:
        w.lifecycle("start")
    assert verify([str(plain)]).ok  # unsealed checkpoints: the structure holds
    assert kinds(verify([str(plain)], key=VerifyKey.load(str(other_verify)))) == [
        "unsealed checkpoint", "unsealed tail",
    ]  # fmt: skip


def test_expect_last_anchors_the_end(tmp_path: Path) -> None:
    path, _ = sealed_trail(tmp_path)
    report = verify([str(path)])
    anchor = (report.last_seq, report.last_hash)
    assert verify([str(path)], expect_last=(anchor[0], anchor[1][:12])).ok
    with AuditWriter.open(path, tenant="t", policy_hash="ab") as w:  # a later session: the anchor stays
        w.lifecycle("start")
    assert verify([str(path)], expect_last=anchor).ok
    lines = lines_of(path)
    write(path, lines[: anchor[0] - 1])
    report = verify([str(path)], expect_last=anchor)
    assert "cut short" in kinds(report)
    changed = lines[anchor[0] - 1].replace(b'"final":true', b'"final":1')
    write(path, rechain([*lines[: anchor[0] - 1], changed]))
    assert "not the expected record" in kinds(verify([str(path)], expect_last=anchor))


def test_a_copy_of_the_checkpoints_catches_a_cut_back_to_an_earlier_session(tmp_path: Path) -> None:
    path, _ = sealed_trail(tmp_path)
    first_session = len(lines_of(path))
    seal = tmp_path / "gw.seal"
    with AuditWriter.open(path, tenant="t", policy_hash="ab", seal=SealKey.open(seal)) as w:
        w.lifecycle("start")
        w.request(p.Lstat(b"/secret"), decision="deny", rule="r", reason="", result="EACCES", us=1)
    copy = tmp_path / "copy.jsonl"
    out = subprocess.run([sys.executable, "-m", "gateway", "audit", "checkpoints", str(path)],
                         capture_output=True, cwd=ROOT, check=True)  # fmt: skip
    copy.write_bytes(out.stdout)
    assert all(json.loads(x)["event"] == "checkpoint" for x in out.stdout.splitlines())
    write(path, lines_of(path)[:first_session])  # back to the first session's final checkpoint
    key = VerifyKey.load(str(tmp_path / "gw.verify"))
    assert verify([str(path)], key=key).ok  # a whole session gone: invisible to the trail alone
    from gateway.audit_cli import load_checkpoint_copy

    report = verify([str(path)], key=key, remote=load_checkpoint_copy(str(copy)))
    assert kinds(report) == ["cut short"] and "past the trail's end" in report.problems[0].message
    # a syslog copy reads as well: the record is the message after the structured data
    syslog = tmp_path / "syslog"
    syslog.write_bytes(b"".join(b'<85>1 T h gateway 1 checkpoint [gateway@32473 seq="9"] ' + x + b"\n"
                                for x in out.stdout.splitlines()))  # fmt: skip
    assert kinds(verify([str(path)], key=key, remote=load_checkpoint_copy(str(syslog)))) == ["cut short"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_rewrite_before_a_seal_fails_with_the_key(tmp_path_factory, data) -> None:
    tmp = tmp_path_factory.mktemp("prop")
    path, verify_key = sealed_trail(tmp, records=12, every=4)
    lines = lines_of(path)
    last_cp = cp_indexes(lines)[-1]
    index = data.draw(st.integers(0, last_cp - 1), label="line")
    record = json.loads(lines[index])
    field = data.draw(st.sampled_from(sorted(k for k in record if k not in ("prev", "head"))), label="field")
    values = st.one_of(st.integers(-5, 10**6), st.text(max_size=8), st.none())
    record[field] = data.draw(values, label="value")
    edited = json.dumps(record, separators=(",", ":")).encode()
    if edited == lines[index]:
        return
    original = lines_of(path)
    lines[index] = edited
    forged = rechain(lines)
    if forged == original:  # (the edit was one rechain undoes: a checkpoint's head or range)
        return
    write(path, forged)
    assert not verify([str(path)], key=VerifyKey.load(str(verify_key))).ok
    shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------
# A real gateway: confined (chroot, Landlock, seccomp kill), served by the compiled loop


def test_a_confined_gateway_seals_its_trail(tmp_path: Path) -> None:
    """`gateway serve --audit-seal-key`: the key file is opened before the sandbox and rewritten through
    that fd at every checkpoint while confined (pwrite + fsync under the seccomp allowlist); requests
    served in C hand over to the writer when a checkpoint is due; SIGUSR1 rotation still verifies."""
    import signal

    from helpers import over_socketpair, require_root

    require_root()
    export = tmp_path / "export"
    (export / "d").mkdir(parents=True)
    (export / "d" / "f").write_text("x")
    seal, verify_key = keys(tmp_path)
    trail = tmp_path / "trail.jsonl"
    serve = [sys.executable, "-m", "gateway", "serve"]
    extra = ["--audit-log", str(trail), "--audit-seal-key", str(seal)]
    with over_socketpair(serve, export, extra=extra) as gw:
        for i in range(1500):
            gw.client.lstat(b"/d/f" if i % 2 else b"/d")
        os.rename(trail, tmp_path / "trail.jsonl.1")
        os.kill(gw.proc.pid, signal.SIGUSR1)
        for _ in range(1200):
            gw.client.lstat(b"/d/f")
        gw.client.close()
        assert gw.proc.wait(10) == 0
    files = [str(tmp_path / "trail.jsonl.1"), str(trail)]
    records = [json.loads(x) for f in files for x in Path(f).read_bytes().splitlines()]
    start = next(r for r in records if r["event"] == "start")
    assert start["sandbox"]["seccomp"] and start["data_plane"]  # confined, the compiled loop serving
    cps = [r for r in records if r["event"] == "checkpoint"]
    assert [c["epoch"] for c in cps] == list(range(len(cps))) and len(cps) >= 4 and cps[-1]["final"]
    assert SealKey.open(seal).epoch == len(cps)  # evolved once a checkpoint, on disk
    report = verify(files, key=VerifyKey.load(str(verify_key)))
    assert report.ok and report.seals_valid == len(cps), [str(x) for x in report.problems]
    command = [sys.executable, "-m", "gateway", "audit", *files, "--verify", "--key", str(verify_key)]
    out = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and "sealed" in out.stdout, out.stdout + out.stderr


def test_serve_refuses_a_bad_sealing_key(tmp_path: Path) -> None:
    export = tmp_path / "export"
    export.mkdir()
    bad = tmp_path / "bad.key"
    bad.write_text("not a key\n")
    for key in (bad, tmp_path / "missing.key"):
        out = subprocess.run(
            [sys.executable, "-m", "gateway", "serve", "-p", str(export), "-f", "0", "-n",
             "--audit-log", str(tmp_path / "t.jsonl"), "--audit-seal-key", str(key)],
            capture_output=True, text=True, cwd=ROOT, stdin=subprocess.DEVNULL, timeout=60,
        )  # fmt: skip
        assert out.returncode == 1 and "sealing key" in out.stderr, out.stderr
