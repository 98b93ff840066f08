"""Walk a trail's hash chain across its files and report where it breaks.

Every line's ``prev`` must be the sha256 of the line before it (64 zeros for the first line of a trail,
the last line of the previous file for the first line of a rotated one), and seq must go up by one.
So an edited line breaks the link after it, a removed line breaks a link and leaves a seq gap, two
swapped lines break links and put seq out of order, and a cut-off write leaves a last line without its
newline. What a chain cannot show is the removal of whole lines from its very end: compare the last
hash this prints with a copy kept elsewhere (the syslog copy carries every record).

A torn line in the middle is accepted as a crash scar only where the writer's next record says so
(its "torn" member names it); it is still reported, so a verified trail is one nothing happened to.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any

from gateway.audit.reader import Progress, ReadError, iter_lines, order_files
from gateway.audit.writer import ZERO_HASH

MAX_PROBLEMS = 100


@dataclass
class Problem:
    path: str
    line: int
    kind: str  # broken link, seq gap, seq out of order, truncated last line, torn line, unreadable line, ...
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
            "last_seq": self.last_seq, "last_hash": self.last_hash, "problem_count": self.problem_count,
            "problems": [p.as_dict() for p in self.problems], "notes": self.notes,
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


def verify(paths: list[str], *, given_order: bool = False, progress: Progress | None = None) -> VerifyReport:
    """Verify the files as one trail (ordered by first seq unless given_order)."""
    report = VerifyReport(files=order_files(paths, given_order))
    meter = progress if progress is not None else Progress(report.files)
    expected: str | None = None  # hash of the last good line
    before: str | None = None  # hash of the good line before that (a torn ack skips the last one)
    last_seq: int | None = None
    before_seq: int | None = None
    last_at = ("", 0)  # file and line of the last good line, for messages
    pending: tuple[str, int, int] | None = None  # an unreadable line waiting for the next record's ack
    try:
        for path in report.files:
            lineno = 0
            try:
                for lineno, data, complete in iter_lines(path, meter):
                    if not complete:
                        report.add(
                            Problem(
                                path,
                                lineno,
                                "truncated last line",
                                f"{len(data)} bytes without a newline: the last write was cut",
                            )
                        )
                        continue
                    record = _parse(data)
                    if record is None:
                        if pending is not None:
                            report.add(Problem(*pending[:2], "unreadable line", "not an audit record"))
                        pending = (path, lineno, len(data))
                        continue
                    torn = record.get("torn")
                    ack = isinstance(torn, dict) and torn.get("line", lineno - 1) == lineno - 1
                    if pending is not None:
                        if ack and pending[0] == path and pending[1] == lineno - 1:
                            report.add(Problem(pending[0], pending[1], "torn line", (
                                f"{pending[2]} bytes, not a record: a write was cut (crash, full disk); "
                                f"the writer resumed after it at {path}:{lineno}"
                            )))  # fmt: skip
                        else:
                            report.add(Problem(*pending[:2], "unreadable line", "not an audit record"))
                        pending = None
                    elif ack and lineno > 1:
                        # The torn line happened to parse (cut right before its newline): the chain
                        # skips it all the same, as the writer did.
                        report.add(Problem(path, lineno - 1, "torn line", (
                            f"the writer resumed after it at {path}:{lineno} (its last write was cut)"
                        )))  # fmt: skip
                        expected, last_seq = before, before_seq
                        report.records -= 1
                    seq = record["seq"]
                    prev = record["prev"]
                    if expected is None:
                        report.first_seq = seq
                        if seq == 1 and prev != ZERO_HASH:
                            report.add(
                                Problem(
                                    path,
                                    lineno,
                                    "broken link",
                                    "seq 1 must have prev 000…0 (the start of a trail)",
                                )
                            )
                        elif seq != 1:
                            report.notes.append(
                                f"the trail starts at seq {seq} ({path}:{lineno}); earlier files were not "
                                "given, so its first link is not checked"
                            )
                    elif prev != expected:
                        if last_at[0] == path:
                            where = f"line {last_at[1]}"
                        else:
                            where = f"the last line of the previous file, {last_at[0]}:{last_at[1]}"
                        report.add(Problem(path, lineno, "broken link", (
                            f"prev {prev[:12]}… is not the hash of {where} ({expected[:12]}…): "
                            "a line was edited, removed, inserted or moved"
                        )))  # fmt: skip
                    if last_seq is not None and seq != last_seq + 1:
                        if seq > last_seq + 1:
                            report.add(
                                Problem(
                                    path,
                                    lineno,
                                    "seq gap",
                                    f"{seq} follows {last_seq}: {seq - last_seq - 1} missing",
                                )
                            )
                        else:
                            report.add(Problem(path, lineno, "seq out of order", f"{seq} follows {last_seq}"))
                    before, before_seq = expected, last_seq
                    expected = hashlib.sha256(data).hexdigest()
                    last_seq = seq
                    last_at = (path, lineno)
                    report.records += 1
            except ReadError as exc:
                report.add(Problem(exc.path, exc.line, exc.kind, exc.message))
            if pending is not None:
                report.add(Problem(*pending[:2], "unreadable line", "not an audit record"))
                pending = None
            if lineno == 0:
                report.notes.append(f"{path} is empty")
            meter.file_done(_size(path))
    finally:
        meter.close()
    report.last_seq = last_seq
    report.last_hash = expected
    return report
