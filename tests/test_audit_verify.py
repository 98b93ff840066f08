"""--verify: tampering is found and located (file:line); clean trails, rotated and gzipped, pass."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

from gateway import protocol as p
from gateway.audit import AuditWriter
from gateway.audit.verify import verify


def make_trail(path: Path, count: int = 10, *, start: bool = True) -> list[bytes]:
    with AuditWriter.open(path, tenant="t", policy_hash="ab" * 32) as w:
        if start:
            w.lifecycle("start", version="test")
        for i in range(count - int(start)):
            w.request(
                p.Lstat(f"/f{i}".encode()),
                decision="allow" if i % 3 else "deny",
                rule="r",
                reason="",
                result="ok",
                us=1.0,
            )
    return path.read_bytes().split(b"\n")[:-1]


def write_lines(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(line + b"\n" for line in lines))


def kinds(report) -> list[tuple[str, str, int]]:
    return [(p.kind, os.path.basename(p.path), p.line) for p in report.problems]


def test_a_clean_trail_verifies(tmp_path: Path) -> None:
    make_trail(tmp_path / "t.jsonl")
    report = verify([str(tmp_path / "t.jsonl")])
    # 10 records and the final checkpoint written at close
    assert report.ok and report.records == 11 and report.first_seq == 1 and report.last_seq == 11
    assert report.problems == [] and report.notes == [] and report.checkpoints == 1
    assert report.sealed_through == 11 and not report.keyed and report.cannot_rule_out


def test_an_edited_field_breaks_the_next_link(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    lines = make_trail(path)
    record = json.loads(lines[4])
    record["decision"] = "allow" if record["decision"] == "deny" else "deny"
    lines[4] = json.dumps(record, separators=(",", ":")).encode()
    write_lines(path, lines)
    report = verify([str(path)])
    # The edited line itself is named (seq runs on, so nothing was removed: line 5 changed)
    assert kinds(report) == [("edited line", "t.jsonl", 5)]
    assert f"({path}:6)" in report.problems[0].message


def test_an_edit_that_keeps_the_json_byte_for_byte_length_is_still_found(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    lines = make_trail(path)
    lines[2] = lines[2].replace(b'"/f1"', b'"/f9"')
    write_lines(path, lines)
    assert kinds(verify([str(path)])) == [("edited line", "t.jsonl", 3)]


def test_a_deleted_line_is_a_broken_link_and_a_seq_gap(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    lines = make_trail(path)
    del lines[3]
    write_lines(path, lines)
    report = verify([str(path)])
    assert kinds(report) == [("broken link", "t.jsonl", 4), ("seq gap", "t.jsonl", 4)]
    assert "1 missing" in report.problems[1].message


def test_a_swapped_pair_is_found(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    lines = make_trail(path)
    lines[5], lines[6] = lines[6], lines[5]
    write_lines(path, lines)
    report = verify([str(path)])
    assert not report.ok
    assert report.problems[0].kind == "broken link" and report.problems[0].line == 6, kinds(report)
    assert ("seq out of order", "t.jsonl", 7) in kinds(report)


def test_a_truncated_file_has_a_truncated_last_line(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    make_trail(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 40])
    report = verify([str(path)])
    assert kinds(report) == [("truncated last line", "t.jsonl", 11), ("unsealed tail", "t.jsonl", 1)]
    assert str(report.problems[0]).startswith(f"{path}:11: truncated last line")


def test_an_inserted_line_is_found(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    lines = make_trail(path)
    lines.insert(3, lines[3])  # a replayed record
    write_lines(path, lines)
    assert kinds(verify([str(path)]))[:2] == [
        ("broken link", "t.jsonl", 5),
        ("seq out of order", "t.jsonl", 5),
    ]


def test_garbage_in_the_middle_is_an_unreadable_line(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    lines = make_trail(path)
    lines.insert(4, b"hello")
    write_lines(path, lines)
    assert kinds(verify([str(path)])) == [("unreadable line", "t.jsonl", 5)]


def test_rotated_and_gzipped_files_verify_as_one_trail_in_any_order(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    w = AuditWriter.open(path, tenant="t", policy_hash="00")
    names = []
    for part in range(3):
        for i in range(5):
            w.request(
                p.Lstat(f"/{part}/{i}".encode()), decision="allow", rule="r", reason="", result="ok", us=1
            )
        rotated = tmp_path / f"t.jsonl.{3 - part}"
        os.rename(path, rotated)
        w.reopen()
        names.append(rotated)
    w.close()
    with open(names[0], "rb") as src, gzip.open(str(names[0]) + ".gz", "wb") as dst:
        dst.write(src.read())
    os.unlink(names[0])
    files = [str(path), str(names[2]), str(names[1]), str(names[0]) + ".gz"]  # newest first, as a glob gives
    report = verify(files)
    assert report.ok, [str(p) for p in report.problems]
    assert report.files[0].endswith(".gz") and report.files[-1] == str(path)
    assert report.records == 22  # 15 requests, 3 reopen records, 3 checkpoints closing files, the final one


def test_a_missing_rotated_file_is_a_broken_link_across_files(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    w = AuditWriter.open(path, tenant="t", policy_hash="00")
    for part in range(3):
        w.request(p.Lstat(b"/x"), decision="allow", rule="r", reason="", result="ok", us=1)
        os.rename(path, tmp_path / f"t.{part}")
        w.reopen()
    w.close()
    report = verify([str(tmp_path / "t.0"), str(tmp_path / "t.2"), str(path)])
    assert [(k, f, n) for k, f, n in kinds(report)] == [("broken link", "t.2", 1), ("seq gap", "t.2", 1)]
    assert f"the last line of the previous file, {tmp_path / 't.0'}:2" in report.problems[0].message


def test_a_truncated_gzip_file_is_reported(tmp_path: Path) -> None:
    lines = make_trail(tmp_path / "t.jsonl", 200)
    data = gzip.compress(b"".join(line + b"\n" for line in lines))
    (tmp_path / "t.jsonl.1.gz").write_bytes(data[: len(data) // 2])
    report = verify([str(tmp_path / "t.jsonl.1.gz")])
    assert "truncated compressed file" in [p.kind for p in report.problems]


def test_a_cut_head_is_a_problem(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    lines = make_trail(path)
    write_lines(path, lines[5:])  # tail -n +6
    report = verify([str(path)])
    assert kinds(report) == [("cut head", "t.jsonl", 1)] and report.first_seq == 6
    assert "starts at seq 6" in report.problems[0].message


def test_a_forged_first_record_is_found(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    lines = make_trail(path)
    record = json.loads(lines[0])
    record["prev"] = "1" * 64
    lines[0] = json.dumps(record, separators=(",", ":")).encode()
    write_lines(path, lines)
    assert kinds(verify([str(path)]))[0] == ("broken link", "t.jsonl", 1)


def test_report_as_dict(tmp_path: Path) -> None:
    make_trail(tmp_path / "t.jsonl")
    report = verify([str(tmp_path / "t.jsonl")]).as_dict()
    assert report["ok"] is True and report["records"] == 11 and len(report["last_hash"]) == 64
    assert report["keyed"] is False and report["checkpoints"] == 1 and report["cannot_rule_out"]
