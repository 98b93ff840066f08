"""One policy for both front-ends: FUSE requests mapped onto the policy language's requests, decided
before they are performed, recorded in the trail (gateway/virtiofs/policy.py)."""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway import names
from gateway import protocol as p
from gateway.audit import AuditWriter
from gateway.rules import decide, load_policy_text
from gateway.virtiofs import fuse_abi as abi
from gateway.virtiofs import fuse_requests as r
from gateway.virtiofs.fuse_abi import Op
from gateway.virtiofs.fuse_decode import decode
from gateway.virtiofs.policy import Gate, rules_requests, setattr_requests
from gateway.virtiofs.readonly_fs import ReadOnlyFs

H = r.InHeader(0, 0, 7, 1, 1000, 100, 1, 0)

POLICY = """
version: 1
tenant: t
default: deny
rules:
  - id: hide-secrets
    effect: deny
    ops: [all]
    paths: ["/secret", "/secret/**"]
    errno: ENOENT
  - id: read-all
    effect: allow
    ops: [read]
  - id: tmp-writable
    effect: allow
    ops: [all]
    paths: ["/tmp/**"]
"""


def _ops(reqs: list[p.Request]) -> list[str]:
    return [names.OP_NAMES[q.type] for q in reqs]


def test_the_mapping_table() -> None:
    cases: list[tuple[r.Request, list[str]]] = [
        (r.Lookup(H, b"x"), ["lstat"]),
        (r.Getattr(H, 0, 0), ["lstat"]),
        (r.Access(H, 4), ["lstat"]),
        (r.Readlink(H), ["readlink"]),
        (r.Statfs(H), ["statfs"]),
        (r.Open(H, os.O_RDWR, 0), ["open"]),
        (r.Opendir(H, 0, 0), ["open"]),
        (r.Create(H, os.O_WRONLY | os.O_CREAT, 0o644, 0o22, 0, b"n"), ["create"]),
        (r.Mknod(H, 0o10644, 0, 0, b"n"), ["mknod"]),
        (r.Mkdir(H, 0o755, 0, b"n"), ["mkdir"]),
        (r.Symlink(H, b"n", b"t"), ["symlink"]),
        (r.Unlink(H, b"n"), ["remove"]),
        (r.Rmdir(H, b"n"), ["remove"]),
        (r.Rename(H, 1, b"a", b"b"), ["rename"]),
        (r.Rename2(H, 1, b"a", b"b", 1), ["rename"]),
        (r.Link(H, 5, b"n"), ["link"]),
        (r.Getxattr(H, 0, b"user.a"), ["lgetxattr"]),
        (r.Listxattr(H, 0), ["llistxattr"]),
        (r.Setxattr(H, 1, b"user.a", b"v"), ["lsetxattr"]),
        (r.Removexattr(H, b"user.a"), ["lremovexattr"]),
        (r.Read(H, 1, 0, 10, 0, 0, 0), []),
        (r.Write(H, 1, 0, 1, 0, 0, 0, b"x"), []),
        (r.Readdir(H, 1, 0, 10, 0, 0, 0), []),
        (r.Release(H, 1, 0, 0, 0), []),
        (r.Flush(H, 1, 0), []),
        (r.Fsync(H, 1, 0), []),
        (r.Fallocate(H, 1, 0, 1, 0), []),
        (r.Lseek(H, 1, 0, 0), []),
        (r.Forget(H, 1), []),
    ]
    for req, ops in cases:
        assert _ops(rules_requests(req, b"/a", b"/b")) == ops, req
    # RULES_OPS (the codec's summary) says the same as the mapping.
    for req, _ in cases:
        want = set(r.RULES_OPS[type(req)])
        assert set(_ops(rules_requests(req, b"/a", b"/b"))) == want, req


def test_fields_carry_over() -> None:
    (create,) = rules_requests(r.Create(H, os.O_WRONLY | os.O_CREAT, 0o4777, 0o022, 0, b"n"), b"/d/n")
    assert create == p.Create(b"/d/n", os.O_WRONLY | os.O_CREAT, 0o4755, 1000, 100)
    (mknod,) = rules_requests(r.Mknod(H, 0o010666, 0, 0o002, b"n"), b"/d/n")
    assert mknod == p.Mknod(1000, 100, b"/d/n", 0o010664, 0)
    (opendir,) = rules_requests(r.Opendir(H, 0, 0), b"/d")
    assert opendir == p.Open(b"/d", os.O_RDONLY | os.O_DIRECTORY)
    (rename,) = rules_requests(r.Rename(H, 9, b"a", b"b"), b"/x/a", b"/y/b")
    assert rename == p.Rename(b"/x/a", b"/y/b")
    (link,) = rules_requests(r.Link(H, 9, b"n"), b"/old", b"/d/n")
    assert link == p.Link(b"/old", b"/d/n")
    (sym,) = rules_requests(r.Symlink(H, b"l", b"../t"), b"/d/l")
    assert sym == p.Symlink(1000, 100, b"../t", b"/d/l")
    (sx,) = rules_requests(r.Setxattr(H, 2, b"user.a", b"vv"), b"/f")
    assert sx == p.Lsetxattr(b"/f", b"user.a", b"vv", 2, 2)


def _setattr(valid: int, **kw: int) -> r.Setattr:
    base = dict(fh=0, size=0, lock_owner=0, atime=0, mtime=0, ctime=0, atimensec=0, mtimensec=0,
                ctimensec=0, mode=0, uid=0, gid=0)
    base.update(kw)
    return r.Setattr(H, valid, **base)


@given(st.integers(0, (1 << 12) - 1), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1),
       st.integers(0, 2**63 - 1))
def test_setattr_becomes_a_request_per_part(valid: int, uid: int, gid: int, size: int) -> None:
    reqs = setattr_requests(_setattr(valid, uid=uid, gid=gid, size=size, mode=0o104755), b"/f")
    want = []
    if valid & (abi.FATTR_UID | abi.FATTR_GID):
        want.append("chown")
    if valid & abi.FATTR_MODE:
        want.append("chmod")
    if valid & abi.FATTR_SIZE:
        want.append("truncate")
    if valid & (abi.FATTR_ATIME | abi.FATTR_MTIME | abi.FATTR_ATIME_NOW | abi.FATTR_MTIME_NOW):
        want.append("utime")
    assert _ops(reqs) == want
    for q in reqs:
        if isinstance(q, p.Chown):
            assert q.uid == (uid if valid & abi.FATTR_UID else 0xFFFFFFFF)
            assert q.gid == (gid if valid & abi.FATTR_GID else 0xFFFFFFFF)
        if isinstance(q, p.Chmod):
            assert q.mode == 0o4755
        if isinstance(q, p.Truncate):
            assert q.length == size


def test_setattr_times() -> None:
    (u,) = setattr_requests(_setattr(abi.FATTR_ATIME | abi.FATTR_MTIME_NOW, atime=5, atimensec=6), b"/f")
    assert u == p.Utime(b"/f", 5, 6, 0, (1 << 30) - 1)
    (u,) = setattr_requests(_setattr(abi.FATTR_MTIME, mtime=7), b"/f")
    assert u == p.Utime(b"/f", 0, (1 << 30) - 2, 7, 0)


def test_a_9p_policy_decides_the_same() -> None:
    """The mapped requests are 9p requests: the same policy decides them exactly as it does for 9p."""
    policy = load_policy_text(POLICY)
    for path in (b"/secret", b"/secret/k", b"/tmp/x", b"/etc/passwd"):
        for req in (r.Lookup(H, b"x"), r.Open(H, os.O_RDONLY, 0), r.Open(H, os.O_WRONLY, 0),
                    r.Unlink(H, b"x"), r.Opendir(H, 0, 0)):
            for q in rules_requests(req, path):
                got = decide(q, policy)
                assert (got.outcome, got.errno) == {
                    b"/secret": ("deny", errno.ENOENT), b"/secret/k": ("deny", errno.ENOENT),
                }.get(path, (got.outcome, got.errno))
    assert decide(rules_requests(r.Open(H, os.O_WRONLY, 0), b"/etc/passwd")[0], policy).outcome == "deny"
    assert decide(rules_requests(r.Opendir(H, 0, 0), b"/etc")[0], policy).outcome == "allow"


# --- the file system with a gate ----------------------------------------------------------------------
@pytest.fixture
def export(tmp_path: Path) -> Path:
    root = tmp_path / "export"
    (root / "secret").mkdir(parents=True)
    (root / "secret" / "key").write_bytes(b"k")
    (root / "tmp").mkdir()
    (root / "pub").write_bytes(b"0123456789")
    return root


def _fs(export: Path, policy_text: str, trail: Path) -> tuple[ReadOnlyFs, AuditWriter]:
    policy = load_policy_text(policy_text)
    audit = AuditWriter.open(trail, tenant="t", policy_hash=policy.hash)
    root_fd = os.open(export, os.O_PATH | os.O_DIRECTORY)
    proc_fd = os.open("/proc/self/fd", os.O_PATH | os.O_DIRECTORY)
    fs = ReadOnlyFs(root_fd, proc_fd, gate=Gate(policy, audit))
    out = fs.handle(decode(abi.IN_HEADER.pack(104, Op.INIT, 1, 1, 0, 0, 1, 0, 0)
                           + abi.INIT_IN.pack(7, 36, 0, 0, 0)))
    assert out is not None and abi.OUT_HEADER.unpack_from(out)[1] == 0
    return fs, audit


@pytest.fixture
def gated(export: Path, tmp_path: Path) -> Iterator[tuple[ReadOnlyFs, Path]]:
    fs, audit = _fs(export, POLICY, tmp_path / "trail.jsonl")
    yield fs, tmp_path / "trail.jsonl"
    fs.close()
    audit.close()


def call(fs: ReadOnlyFs, op: int, body: bytes = b"", nodeid: int = 1, uid: int = 0) -> tuple[int, bytes]:
    out = fs.handle(decode(abi.IN_HEADER.pack(40 + len(body), op, 9, nodeid, uid, 0, 1, 0, 0) + body))
    assert out is not None
    return -abi.OUT_HEADER.unpack_from(out)[1], out[16:]


def lookup(fs: ReadOnlyFs, name: bytes, parent: int = 1) -> tuple[int, int]:
    err, body = call(fs, Op.LOOKUP, name + b"\0", parent)
    return err, (abi.ENTRY_OUT_HEAD.unpack_from(body)[0] if not err else 0)


def records(trail: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in trail.read_text().splitlines()]


def requests_of(trail: Path) -> list[tuple[object, ...]]:
    return [(x["op"], x["path"], x["decision"], x["result"]) for x in records(trail)
            if x["event"] == "request"]


def test_denied_lookup_gets_the_rules_errno_and_is_recorded(gated: tuple[ReadOnlyFs, Path]) -> None:
    fs, trail = gated
    assert lookup(fs, b"secret")[0] == errno.ENOENT
    err, nodeid = lookup(fs, b"pub")
    assert err == 0 and nodeid
    assert lookup(fs, b"nope")[0] == errno.ENOENT  # allowed, and not there
    assert requests_of(trail) == [("lstat", "/secret", "deny", "ENOENT"), ("lstat", "/pub", "allow", "ok"),
                                  ("lstat", "/nope", "allow", "ENOENT")]
    rec = next(x for x in records(trail) if x["event"] == "request")
    assert rec["rule"] == "hide-secrets" and rec["tenant"] == "t"


def test_open_read_write_release(gated: tuple[ReadOnlyFs, Path]) -> None:
    fs, trail = gated
    _, nodeid = lookup(fs, b"pub")
    assert call(fs, Op.OPEN, abi.OPEN_IN.pack(os.O_WRONLY, 0), nodeid)[0] == errno.EACCES  # default deny
    err, body = call(fs, Op.OPEN, abi.OPEN_IN.pack(os.O_RDONLY, 0), nodeid)
    assert err == 0
    fh = abi.OPEN_OUT.unpack_from(body)[0]
    before = len(records(trail))
    err, data = call(fs, Op.READ, abi.READ_IN.pack(fh, 2, 5, 0, 0, 0, 0), nodeid)
    assert (err, data) == (0, b"23456")
    assert len(records(trail)) == before  # READ on an allowed handle: not decided again
    assert call(fs, Op.RELEASE, abi.RELEASE_IN.pack(fh, 0, 0, 0), nodeid)[0] == 0
    rel = records(trail)[-1]
    assert rel["event"] == "release" and rel["path"] == "/pub" and rel["bytes_read"] == 5
    assert rel["bytes_written"] == 0
    opens = [x for x in records(trail) if x.get("op") == "open" and x["event"] == "request"]
    assert [(x["flags"], x["decision"]) for x in opens] == [(["O_WRONLY"], "deny"), (["O_RDONLY"], "allow")]


def test_opendir_is_an_open_for_reading_a_directory(gated: tuple[ReadOnlyFs, Path], export: Path,
                                                      tmp_path: Path) -> None:
    fs, trail = gated
    err, _ = call(fs, Op.OPENDIR, abi.OPEN_IN.pack(os.O_RDONLY, 0))
    assert err == 0
    last = [x for x in records(trail) if x["event"] == "request"][-1]
    assert (last["op"], last["path"], last["flags"]) == ("open", "/", ["O_RDONLY", "O_DIRECTORY"])
    # A policy without open:read refuses the listing.
    fs2, audit2 = _fs(export, "version: 1\ndefault: deny\nrules:\n  - {id: s, effect: allow, ops: [lstat]}\n",
                      tmp_path / "t2.jsonl")
    try:
        assert call(fs2, Op.OPENDIR, abi.OPEN_IN.pack(os.O_RDONLY, 0))[0] == errno.EACCES
    finally:
        fs2.close()
        audit2.close()


def test_readdirplus_does_not_hand_out_denied_entries(gated: tuple[ReadOnlyFs, Path]) -> None:
    fs, trail = gated
    err, body = call(fs, Op.OPENDIR, abi.OPEN_IN.pack(os.O_RDONLY, 0))
    fh = abi.OPEN_OUT.unpack_from(body)[0]
    err, body = call(fs, Op.READDIRPLUS, abi.READ_IN.pack(fh, 0, 8192, 0, 0, 0, 0))
    assert err == 0
    given_ids: dict[bytes, int] = {}
    off = 0
    while off < len(body):
        nodeid = abi.ENTRY_OUT_HEAD.unpack_from(body, off)[0]
        d = off + 128  # fuse_entry_out, then the dirent
        _ino, _off, namelen, _type = abi.DIRENT_HEAD.unpack_from(body, d)
        given_ids[body[d + 24:d + 24 + namelen]] = nodeid
        off = d + ((24 + namelen + 7) & ~7)
    assert given_ids[b"secret"] == 0 and given_ids[b"pub"] != 0
    assert ("lstat", "/secret", "deny", "ENOENT") not in requests_of(trail)
    assert ("lstat", "/pub", "allow", "ok") in requests_of(trail)


def test_writes_are_decided_before_the_read_only_refusal(gated: tuple[ReadOnlyFs, Path],
                                                         export: Path) -> None:
    fs, trail = gated
    _, tmp = lookup(fs, b"tmp")
    assert call(fs, Op.MKDIR, abi.MKDIR_IN.pack(0o755, 0) + b"d\0", tmp)[0] == errno.EROFS
    assert call(fs, Op.MKDIR, abi.MKDIR_IN.pack(0o755, 0) + b"d\0", 1)[0] == errno.EACCES
    assert call(fs, Op.UNLINK, b"secret\0", 1)[0] == errno.ENOENT  # the rule's errno
    reqs = requests_of(trail)
    assert ("mkdir", "/tmp/d", "allow", "EROFS") in reqs and ("mkdir", "/d", "deny", "EACCES") in reqs
    assert ("remove", "/secret", "deny", "ENOENT") in reqs
    assert sorted(os.listdir(export)) == ["pub", "secret", "tmp"]


def test_permissive_records_would_deny_and_performs(export: Path, tmp_path: Path) -> None:
    fs, audit = _fs(export, POLICY.replace("default: deny", "default: deny\nenforcement: permissive"),
                    tmp_path / "p.jsonl")
    try:
        assert lookup(fs, b"secret")[0] == 0
        assert requests_of(tmp_path / "p.jsonl") == [("lstat", "/secret", "would-deny", "ok")]
    finally:
        fs.close()
        audit.close()


def test_setattr_needs_every_part_allowed(gated: tuple[ReadOnlyFs, Path]) -> None:
    fs, trail = gated
    _, pub = lookup(fs, b"pub")
    body = abi.SETATTR_IN.pack(abi.FATTR_MODE | abi.FATTR_SIZE, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0o600, 0,
                               0, 0, 0)
    assert call(fs, Op.SETATTR, body, pub)[0] == errno.EACCES
    reqs = requests_of(trail)
    assert ("chmod", "/pub", "deny", "EACCES") in reqs
