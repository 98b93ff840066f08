"""Walk a trail's hash chain and its checkpoints across its files, and report what is wrong, file:line.

The chain: every line's ``prev`` must be the sha256 of the line before it (64 zeros for the first line of
a trail, the last line of the previous file for the first line of a rotated one), and seq must go up by
one. So an edited line breaks the link after it, a removed line breaks a link and leaves a seq gap, two
swapped lines break links and put seq out of order, and a cut-off write leaves a last line without its
newline.

A chain alone proves nothing to someone who could rewrite the file: they can recompute every hash.
The checkpoints (writer.checkpoint) close the gaps a chain leaves:

- the trail must *end* with a final checkpoint (written at close): a trail cut at a line boundary, or
  whose last checkpoint was removed, does not; a live or crashed gateway's does not either (--live
  accepts records after the last checkpoint of a trail still being written, and says so);
- the first file must start at seq 1 or at a rotation record ("reopen"): a cut head does not;
- with the verification key (seal.VerifyKey), every checkpoint's seal must be the HMAC of its range and
  chain head under k[epoch], the epochs running 0, 1, 2, ... in trail order. A chain recomputed by
  someone without the key then fails at the first checkpoint after the change, and a seal made with a
  later key (an intruder's) over an earlier range fails on its epoch (CVE-2023-31439);
- --expect-last SEQ:HASH and a copy of the checkpoints kept elsewhere (syslog, `gateway audit
  checkpoints`) anchor the end: a trail cut back to an earlier session's final checkpoint is caught only
  by them.

A torn line in the middle is accepted as a crash scar only where the writer's next record says so
(its "torn" member names it); it is still reported, so a verified trail is one nothing happened to.

Speed: a line in the writer's own shape (``{"seq":N,...,"prev":"<64 hex>"}``) is checked without being
parsed as JSON: its seq and prev are read from their fixed places. Only lifecycle records, checkpoints
and lines of another shape are parsed. So --verify checks links, seals and positions, not the syntax of
each request record (a line the writer did not write carries a valid link only if the chain was
recomputed, which the seals reveal).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from dataclasses import dataclass, field
from typing import Any

from gateway.audit.reader import Progress, ReadError, iter_lines, order_files
from gateway.audit.seal import KeyChain, VerifyKey, compute_seal
from gateway.audit.writer import ZERO_HASH

MAX_PROBLEMS = 100
_REQUEST = b'","event":"request","op":"'  # the head, then a request's fields: never nested
_PREV_AT = -75  # ',"prev":"' + 64 hex + '"}' ends every line the writer writes
_PREV_KEY = b',"prev":"'


@dataclass
class Problem:
    path: str
    line: int
    kind: str  # broken link, edited line, seq gap, cut head, unsealed tail, bad seal, epoch out of order, ...
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.kind}: {self.message}"

    def as_dict(self) -> dict[str, Any]:
        return {"file": self.path, "line": self.line, "kind": self.kind, "message": self.message}


@dataclass
class VerifyReport:
    files: list[str] = field(default_factory=list)
    records: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    last_hash: str | None = None
    problems: list[Problem] = field(default_factory=list)
    problem_count: int = 0  # all of them; problems keeps the first MAX_PROBLEMS
    notes: list[str] = field(default_factory=list)
    keyed: bool = False  # a verification key was given: seals were checked
    checkpoints: int = 0
    seals_valid: int = 0
    sealed_through: int | None = None  # seq of the last checkpoint that held (sealed, with a key)
    unsealed_after: tuple[str, int, int] | None = None  # (file, line, seq) of the first record after it
    cannot_rule_out: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.problem_count == 0

    def add(self, problem: Problem) -> None:
        self.problem_count += 1
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(problem)

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok, "files": self.files, "records": self.records, "first_seq": self.first_seq,
            "last_seq": self.last_seq, "last_hash": self.last_hash, "keyed": self.keyed,
            "checkpoints": self.checkpoints, "seals_valid": self.seals_valid,
            "sealed_through": self.sealed_through, "problem_count": self.problem_count,
            "problems": [p.as_dict() for p in self.problems], "notes": self.notes,
            "cannot_rule_out": self.cannot_rule_out,
        }  # fmt: skip


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size if path != "-" else 0
    except OSError:
        return 0


def _parse(data: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(data)
    except ValueError:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("seq"), int):
        return None
    if not isinstance(record.get("prev"), str):
        return None
    return record


def parse_expect(text: str) -> tuple[int, str]:
    """SEQ:HASH (the hash in full, or a prefix of at least 12 hex digits) -> (seq, hash prefix)."""
    seq, sep, digest = text.partition(":")
    digest = digest.strip().lower()
    if not sep or not seq.strip().isdigit() or len(digest) < 12 or len(digest) > 64 \
            or any(c not in "0123456789abcdef" for c in digest):
        raise ValueError(f"--expect-last wants SEQ:HASH (at least 12 hex digits), not {text!r}")
    return int(seq), digest


class _Checkpoints:
    """What the checkpoints seen so far establish: epochs in order, seals, the last one that held."""

    def __init__(self, report: VerifyReport, key: VerifyKey | None,
                 remote: dict[int, dict[str, Any]] | None) -> None:  # fmt: skip
        self.report = report
        self.key = key
        self.chain = KeyChain(key) if key is not None else None
        self.epoch: int | None = None  # the last checkpoint's epoch
        self.restarted = False  # a start record since the last checkpoint (an epoch may repeat once)
        self.last: tuple[str, int, dict[str, Any]] | None = None  # the last checkpoint, where
        self.after: tuple[str, int, int] | None = None  # the first record after the last good checkpoint
        self.remote = remote
        self.from_start = False  # the trail starts at seq 1: the first epoch must be 0

    def record(self, path: str, lineno: int, seq: int) -> None:
        if self.after is None:
            self.after = (path, lineno, seq)

    def checkpoint(self, path: str, lineno: int, cp: dict[str, Any]) -> None:
        report = self.report
        report.checkpoints += 1
        seq = cp["seq"]
        good = True
        if cp.get("head") != cp.get("prev") or cp.get("last") != seq - 1:
            report.add(Problem(path, lineno, "bad checkpoint", (
                "its head or range does not name the line before it: edited"
            )))  # fmt: skip
            good = False
        first = cp.get("first")
        floor = self.last[2]["seq"] + 1 if self.last is not None else 1
        if not isinstance(first, int) or first < floor or first > seq:
            report.add(Problem(path, lineno, "bad checkpoint", (
                f"its range starts at {first!r}, not after the checkpoint before it (seq {floor - 1})"
            )))  # fmt: skip
            good = False
        if self.key is not None:
            good = self._seal(path, lineno, cp) and good
        if self.remote is not None:
            copy = self.remote.pop(seq, None)
            if copy is not None and (copy.get("head"), copy.get("seal")) != (cp.get("head"), cp.get("seal")):
                report.add(Problem(path, lineno, "checkpoint differs from its copy", (
                    f"the remote copy of checkpoint seq {seq} has head {str(copy.get('head'))[:12]}…, "
                    f"the trail {str(cp.get('head'))[:12]}…: the records before it were changed"
                )))  # fmt: skip
                good = False
        self.last = (path, lineno, cp)
        self.restarted = False
        if good:
            self.after = None
            if self.key is not None:
                report.seals_valid += 1
            report.sealed_through = seq

    def _seal(self, path: str, lineno: int, cp: dict[str, Any]) -> bool:
        report = self.report
        assert self.key is not None and self.chain is not None
        epoch = cp.get("epoch")
        if cp.get("seal") is None:
            report.add(Problem(path, lineno, "unsealed checkpoint", (
                "no seal: the gateway had no --audit-seal-key, or its sealing stopped (see audit_notes); "
                "anyone who can write the trail could have written the records before it"
            )))  # fmt: skip
            return False
        if cp.get("key_id") != self.key.key_id:
            report.add(Problem(path, lineno, "bad seal", (
                f"sealed with key {cp.get('key_id')!r}, not with this verification key ({self.key.key_id})"
            )))  # fmt: skip
            return False
        if not isinstance(epoch, int) or epoch < 0:
            report.add(Problem(path, lineno, "bad seal", f"epoch {epoch!r} is not an epoch"))
            return False
        previous = self.epoch
        self.epoch = epoch
        if previous is None:
            expected: tuple[int, ...] | None = (0,) if self.from_start else None
        else:
            expected = (previous + 1, previous) if self.restarted else (previous + 1,)
        if expected is not None and epoch not in expected:
            report.add(Problem(path, lineno, "epoch out of order", (
                f"sealed at epoch {epoch}, where epoch {expected[0]} was due: a seal made with a later "
                "key for an earlier range, a replayed seal, or checkpoints removed"
            )))  # fmt: skip
            return False
        if expected is None:
            report.notes.append(
                f"the first checkpoint given ({path}:{lineno}) is at epoch {epoch}: the trail's earlier "
                "files were not given, so whether its first seals are the first ever made is not checked"
            )
        key = self.chain.key(epoch)
        given = str(cp.get("seal")).encode("utf-8", "surrogateescape")  # (bytes: any text compares)
        if key is None or not hmac.compare_digest(compute_seal(key, cp).encode(), given):
            report.add(Problem(path, lineno, "bad seal", (
                "the seal does not match this checkpoint's range and chain head under its epoch's key: "
                "the records before it were changed and the chain recomputed, or the seal was forged"
            )))  # fmt: skip
            return False
        return True


def verify(
    paths: list[str], *, given_order: bool = False, progress: Progress | None = None,
    key: VerifyKey | None = None, expect_last: tuple[int, str] | None = None, live: bool = False,
    remote: list[dict[str, Any]] | None = None,
) -> VerifyReport:  # fmt: skip
    """Verify the files as one trail (ordered by first seq unless given_order).

    key: check every seal with it. expect_last: (seq, hash prefix) an auditor noted earlier: that record
    must be there, unchanged. live: the trail is still being written (records after the last checkpoint
    are reported as a note, not a problem). remote: checkpoint records kept elsewhere (syslog): each one
    must be in the trail as it is there, and none may lie past the trail's end."""
    report = VerifyReport(files=order_files(paths, given_order), keyed=key is not None)
    meter = progress if progress is not None else Progress(report.files)
    remote_by_seq = {r["seq"]: r for r in remote or () if isinstance(r.get("seq"), int)}
    cps = _Checkpoints(report, key, remote_by_seq if remote is not None else None)
    expected: str | None = None  # hash of the last good line
    before: str | None = None  # hash of the good line before that (a torn ack skips the last one)
    last_seq: int | None = None
    before_seq: int | None = None
    last_at = ("", 0)  # file and line of the last good line, for messages
    last_final = False  # the last record is a final checkpoint
    pending: tuple[str, int, int] | None = None  # an unreadable line waiting for the next record's ack
    expect_found = False
    sha256 = hashlib.sha256
    add = report.add
    try:
        for path in report.files:
            lineno = 0
            try:
                for lineno, data, complete in iter_lines(path, meter):
                    if not complete:
                        add(Problem(path, lineno, "truncated last line",
                                    f"{len(data)} bytes without a newline: the last write was cut"))
                        continue
                    # The writer's shape, read in place; anything else (or a lifecycle record) parsed.
                    record: dict[str, Any] | None = None
                    if (_REQUEST in data and data[_PREV_AT:_PREV_AT + 9] == _PREV_KEY
                            and data.startswith(b'{"seq":') and data.endswith(b'"}')
                            and pending is None and b'"torn":' not in data):
                        try:
                            seq = int(data[7:data.index(b",", 7)])
                        except ValueError:
                            seq = -1
                        prev = data[-66:-2].decode("ascii", "replace")
                        if seq < 0:
                            record = _parse(data)
                            if record is None:
                                pending = (path, lineno, len(data))
                                continue
                    else:
                        record = _parse(data)
                        if record is None:
                            if pending is not None:
                                add(Problem(*pending[:2], "unreadable line", "not an audit record"))
                            pending = (path, lineno, len(data))
                            continue
                    if record is not None:
                        torn = record.get("torn")
                        ack = isinstance(torn, dict) and torn.get("line", lineno - 1) == lineno - 1
                        if pending is not None:
                            if ack and pending[0] == path and pending[1] == lineno - 1:
                                add(Problem(pending[0], pending[1], "torn line", (
                                    f"{pending[2]} bytes, not a record: a write was cut (crash, full disk); "
                                    f"the writer resumed after it at {path}:{lineno}"
                                )))  # fmt: skip
                            else:
                                add(Problem(*pending[:2], "unreadable line", "not an audit record"))
                            pending = None
                        elif ack and lineno > 1:
                            # The torn line happened to parse (cut right before its newline): the chain
                            # skips it all the same, as the writer did.
                            add(Problem(path, lineno - 1, "torn line", (
                                f"the writer resumed after it at {path}:{lineno} (its last write was cut)"
                            )))  # fmt: skip
                            expected, last_seq = before, before_seq
                            report.records -= 1
                        seq = record["seq"]
                        prev = record["prev"]
                    if expected is None:
                        report.first_seq = seq
                        event = record.get("event") if record is not None else "request"
                        if seq == 1:
                            cps.from_start = True
                            if prev != ZERO_HASH:
                                add(Problem(path, lineno, "broken link",
                                            "seq 1 must have prev 000…0 (the start of a trail)"))
                        elif event == "reopen":
                            report.notes.append(
                                f"the trail starts at a rotation (seq {seq}, {path}:{lineno}): earlier files "
                                "were not given, so its first link is not checked"
                            )
                        else:
                            add(Problem(path, lineno, "cut head", (
                                f"the trail starts at seq {seq} with a {event} record, not at seq 1 or at a "
                                "rotation record: its first lines were removed (or give the earlier files)"
                            )))  # fmt: skip
                    elif prev != expected:
                        if last_seq is not None and seq == last_seq + 1:
                            # Seq runs on: no line went missing here, so the line before was changed.
                            add(Problem(last_at[0], last_at[1], "edited line", (
                                f"its hash is not the prev of the next line ({path}:{lineno}): this line "
                                "(or the next one's prev) was edited"
                            )))  # fmt: skip
                        else:
                            if last_at[0] == path:
                                where = f"line {last_at[1]}"
                            else:
                                where = f"the last line of the previous file, {last_at[0]}:{last_at[1]}"
                            add(Problem(path, lineno, "broken link", (
                                f"prev {prev[:12]}… is not the hash of {where} ({expected[:12]}…): "
                                "a line was edited, removed, inserted or moved"
                            )))  # fmt: skip
                    if last_seq is not None and seq != last_seq + 1:
                        if seq > last_seq + 1:
                            add(Problem(path, lineno, "seq gap",
                                        f"{seq} follows {last_seq}: {seq - last_seq - 1} missing"))
                        else:
                            add(Problem(path, lineno, "seq out of order", f"{seq} follows {last_seq}"))
                    before, before_seq = expected, last_seq
                    expected = sha256(data).hexdigest()
                    last_seq = seq
                    last_at = (path, lineno)
                    report.records += 1
                    last_final = False
                    if record is not None:
                        event = record.get("event")
                        if event == "checkpoint":
                            cps.checkpoint(path, lineno, record)
                            last_final = record.get("final") is True
                        else:
                            cps.record(path, lineno, seq)
                            if event == "start":
                                cps.restarted = True
                    else:
                        cps.record(path, lineno, seq)
                    if expect_last is not None and seq == expect_last[0]:
                        expect_found = True
                        if not expected.startswith(expect_last[1]):
                            add(Problem(path, lineno, "not the expected record", (
                                f"seq {seq} hashes to {expected[:16]}…, not {expect_last[1][:16]}…: "
                                "the trail up to it was changed since its head was noted"
                            )))  # fmt: skip
            except ReadError as exc:
                add(Problem(exc.path, exc.line, exc.kind, exc.message))
            if pending is not None:
                add(Problem(*pending[:2], "unreadable line", "not an audit record"))
                pending = None
            if lineno == 0:
                report.notes.append(f"{path} is empty")
            meter.file_done(_size(path))
    finally:
        meter.close()
    report.last_seq = last_seq
    report.last_hash = expected
    _judge_end(report, cps, last_final, live, last_at)
    if expect_last is not None and not expect_found:
        add(Problem(last_at[0], last_at[1], "cut short", (
            f"seq {expect_last[0]} (given with --expect-last) is not in the trail, which ends at seq "
            f"{last_seq}"
        )))  # fmt: skip
    if cps.remote:
        beyond = sorted(s for s in cps.remote if last_seq is None or s > last_seq)
        missing = sorted(s for s in cps.remote if last_seq is not None and s <= last_seq)
        if beyond:
            add(Problem(last_at[0], last_at[1], "cut short", (
                f"the copy of the checkpoints has {len(beyond)} past the trail's end (seq {beyond[0]}"
                f"{'…' + str(beyond[-1]) if len(beyond) > 1 else ''}); the trail ends at seq {last_seq}"
            )))  # fmt: skip
        for seq in missing[:10]:
            add(Problem(last_at[0], last_at[1], "checkpoint missing",
                        f"checkpoint seq {seq} of the copy is not in the trail as a checkpoint"))
    if key is None:
        report.cannot_rule_out.append(
            "a rewrite by someone who could write the files: without --key the seals are not checked, and "
            "a recomputed chain (with its checkpoints) looks intact"
        )
    if expect_last is None and remote is None:
        report.cannot_rule_out.append(
            "a cut back to an earlier session's final checkpoint: compare the last hash with one noted "
            "earlier (--expect-last SEQ:HASH) or with a copy of the checkpoints (--checkpoints FILE)"
        )
    return report


def _judge_end(report: VerifyReport, cps: _Checkpoints, last_final: bool, live: bool,
               last_at: tuple[str, int]) -> None:  # fmt: skip
    """Records after the last checkpoint that held: a problem unless the trail is live."""
    if report.records == 0:
        return
    after = cps.after
    if after is not None:
        report.unsealed_after = after
        count = (report.last_seq or 0) - after[2] + 1
        span = f"{after[0]}:{after[1]} to {last_at[0]}:{last_at[1]} (seq {after[2]} to {report.last_seq})"
        vouched = "valid checkpoint" if cps.key is not None else "checkpoint"
        if cps.last is None:
            message = f"no {vouched} covers any of the {count:,} records, {span}"
        else:
            message = f"{count:,} records after the last {vouched} are covered by none, {span}"
        if live:
            report.notes.append(message + " (--live: still being written)")
        else:
            report.add(Problem(after[0], after[1], "unsealed tail", (
                message + ": the trail was cut short (or a checkpoint removed), or its gateway is still "
                "running (--live) or crashed"
            )))  # fmt: skip
    elif not last_final and not live:
        assert cps.last is not None
        path, lineno, cp = cps.last
        report.add(Problem(path, lineno, "no final checkpoint", (
            f"the trail ends at checkpoint seq {cp['seq']}, not at the final one written at stop: cut short "
            "after it, or its gateway is still running (--live) or crashed"
        )))  # fmt: skip
