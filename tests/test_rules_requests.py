"""Requests from text, mappings and audit records; describe() reads back."""

from __future__ import annotations

import os

import pytest

from gateway.protocol import Chmod, Chown, Create, Lsetxattr, Mknod, Open, Rename, Symlink, Truncate, Utime
from gateway.rules import ObjectAttrs
from gateway.rules.requests import RequestError, describe, from_audit, from_mapping, parse_text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("open /etc/passwd flags=O_RDWR", Open(b"/etc/passwd", os.O_RDWR)),
        ("open /etc/passwd flags=rdwr,trunc", Open(b"/etc/passwd", os.O_RDWR | os.O_TRUNC)),
        ("open /x", Open(b"/x", 0)),
        ("create /home/alice/a mode=0644 uid=1000 gid=1000",
         Create(b"/home/alice/a", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644, 1000, 1000)),
        ("mknod /dev/x mode=020644 rdev=257", Mknod(0, 0, b"/dev/x", 0o20644, 257)),
        ("rename /a /b", Rename(b"/a", b"/b")),
        ("symlink /l target=../x uid=5", Symlink(5, 0, b"../x", b"/l")),
        ("chmod /a mode=0o4755", Chmod(b"/a", 0o4755)),
        ("chown /a uid=7", Chown(b"/a", 7, 0xFFFFFFFF)),
        ("truncate /a length=0x10", Truncate(b"/a", 16)),
        ("utime /a atime=5.5 mtime=7", Utime(b"/a", 5, 500000000, 7, 0)),
        ("lsetxattr /a name=user.x value=hi flags=XATTR_CREATE", Lsetxattr(b"/a", b"user.x", b"hi", 2, 1)),
        ("open '/a b/c d'", Open(b"/a b/c d", 0)),
    ],
)
def test_parse_text(text: str, expected: object) -> None:
    spec = parse_text(text)
    assert spec.request == expected
    assert parse_text(describe(spec.request)).request == expected  # describe reads back


def test_object_attributes_in_text_and_mappings() -> None:
    spec = parse_text("open /a owner=1000 group=100 type=reg object_mode=0644")
    assert spec.object == ObjectAttrs(1000, 100, 0o100000, 0o644)
    assert describe(spec.request, spec.object) == "open /a flags=O_RDONLY owner=1000 group=100 type=reg " \
                                                  "object_mode=0644"
    spec = from_mapping({"op": "open", "path": "/a", "object": {"owner": 1, "type": "dir"}})
    assert spec.object == ObjectAttrs(owner=1, type=0o040000)
    assert parse_text("open /a").object is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty request"),
        ("opne /x", "op: unknown op 'opne' (did you mean 'open'?)"),
        ("open", "path: open needs 'path'"),
        ("rename /a", "path2: rename needs 'path2'"),
        ("symlink /l ../x", "too many paths for symlink: /l ../x (give a symlink's target as target=...)"),
        ("open /x flags=O_BOGUS", "flags: unknown open flag 'O_BOGUS'"),
        ("open /x mode=0644", "mode: open has no field 'mode' (did you mean 'mode'?)"),
        ("create /x mode=9", "mode: expected an octal mode such as 0644, not '9'"),
        ("create /x uid=abc", "uid: expected a number, not 'abc'"),
        ("open /x type=regular", "type: unknown file type 'regular' (did you mean 'reg'?)"),
        ("chmod /x", "mode: chmod needs 'mode'"),
        ("lgetxattr /x", "name: lgetxattr needs 'name'"),
        ("open 'unclosed", "cannot split"),
    ],
)
def test_parse_errors(text: str, message: str) -> None:
    with pytest.raises(RequestError) as info:
        parse_text(text)
    assert message.split(" (did you mean 'mode'?)")[0] in str(info.value)


def test_mapping_modes_from_yaml_must_be_octal_text() -> None:
    assert from_mapping({"op": "create", "path": "/x", "mode": "0755"}, yaml_ints=True).request.mode == 0o755
    with pytest.raises(RequestError, match="octal text"):
        from_mapping({"op": "create", "path": "/x", "mode": 755}, yaml_ints=True)
    assert from_mapping({"op": "create", "path": "/x", "mode": 493}).request.mode == 0o755  # JSON: a number


def test_from_audit_record() -> None:
    record = {"seq": 7, "time": "2026-11-22T07:41:29.123456Z", "tenant": "t", "policy": "ab" * 8,
              "event": "request", "op": "create", "path": "/home/a/\udcff", "uid": 1000, "gid": 1000,
              "mode": "0644", "flags": ["O_WRONLY", "O_CREAT"], "decision": "allow", "rule": "home",
              "reason": "allowed", "result": "ok", "us": 12.5, "prev": "0" * 64, "future_field": 1}
    assert from_audit(record) == Create(b"/home/a/\xff", os.O_WRONLY | os.O_CREAT, 0o644, 1000, 1000)
    record = {"event": "request", "op": "lsetxattr", "path": "/a", "name": "user.x", "size": 3,
              "flags": ["XATTR_REPLACE"], "decision": "deny", "rule": None}
    assert from_audit(record) == Lsetxattr(b"/a", b"user.x", b"", 3, 2)
    record = {"event": "request", "op": "utime", "path": "/a", "atime": [1, 2], "mtime": [3, 4]}
    assert from_audit(record) == Utime(b"/a", 1, 2, 3, 4)
    with pytest.raises(RequestError):
        from_audit({"event": "request", "op": "nosuch", "path": "/a"})
