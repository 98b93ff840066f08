"""Shared by the attack tests (test_bypasses.py, test_host_race.py): a real gateway over a socketpair with
a policy file, each reply paired with the trail record written for it, and snapshots of what the host
sees (owner, mode, size, times, xattrs), to prove that a denied request touched nothing."""

from __future__ import annotations

import json
import os
import stat
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from helpers import GATEWAY, Running, over_socketpair

from gateway import protocol as p
from gateway.client import Reply

ALICE = 1000
BOB = 1001

# The README's policy (issue 9's reproductions): default deny, alice's home to uid 1000 (the requests
# that carry a uid must carry 1000 there), /secret denied outright, no setid bits, no device nodes.
README_POLICY = """\
version: 1
tenant: bypass-tests
default: deny
rules:
  - id: no-device-nodes
    effect: deny
    ops: [mknod]
    when: {type: [chr, blk]}
    errno: EPERM
  - id: no-setid-bits
    effect: deny
    ops: [CREATE, mkdir, mknod, chmod]
    when: {mode_any: [setuid, setgid]}
    errno: EPERM
  - id: secret
    effect: deny
    ops: [all]
    paths: ["/secret/**"]
  - id: alice-guard
    effect: deny
    ops: [CREATE, mkdir, mknod, symlink, chown]
    paths: ["/home/alice/**"]
    unless: {uid: [1000]}
    errno: EPERM
  - id: alice-home
    effect: allow
    ops: [all]
    paths: ["/home/alice/**"]
"""


@dataclass
class Session:
    """A running gateway and its trail: ``call`` returns the reply and the record made for it."""

    running: Running
    trail: Path
    _offset: int = 0

    def records(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.trail.read_text().splitlines() if line.strip()]

    def requests(self) -> list[dict[str, object]]:
        return [r for r in self.records() if r.get("event") == "request"]

    def _new_records(self) -> list[dict[str, object]]:
        try:
            with open(self.trail, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:  # the gateway has not opened it yet: nothing recorded
            return []
        end = data.rfind(b"\n") + 1  # whole lines only
        self._offset += end
        return [json.loads(line) for line in data[:end].splitlines() if line.strip()]

    def call(self, request: p.Request, *, keep_fd: bool = False) -> tuple[Reply, dict[str, object]]:
        """Send one request; the reply, and the one record the trail gained for it. An fd received is
        closed unless ``keep_fd`` (then the caller owns it)."""
        self._new_records()  # skip the lifecycle records written before this request
        reply = self.running.client.call(request)
        if reply.fd is not None and not keep_fd:
            os.close(reply.fd)
        # Each reply comes after its record reached the file: exactly one new request record.
        new = [r for r in self._new_records() if r.get("event") == "request"]
        assert len(new) == 1, f"{len(new)} records for one request: {new}"
        return reply, new[0]

    def ok(self, request: p.Request, *, keep_fd: bool = False) -> Reply:
        """A request that must be allowed and succeed."""
        reply, record = self.call(request, keep_fd=keep_fd)
        assert reply.errno == 0, (request, os.strerror(reply.errno), record)
        assert record["decision"] == "allow", record
        return reply


@contextmanager
def gateway(export: Path, policy: Path | str, trail: Path) -> Iterator[Session]:
    """A real gateway process serving export under the policy (a file, or the text of one)."""
    if isinstance(policy, str):
        text = policy
        policy = trail.with_suffix(".policy.yaml")
        policy.write_text(text)
    extra = ["--policy", str(policy), "--audit-log", str(trail)]
    with over_socketpair(GATEWAY, export, extra=extra, timeout=20) as running:
        yield Session(running, trail)


# -- what the host sees ------------------------------------------------------------------------------------


def xattrs(path: Path) -> dict[str, bytes]:
    return {n: os.getxattr(path, n, follow_symlinks=False) for n in os.listxattr(path, follow_symlinks=False)}


def snapshot(path: Path) -> tuple[object, ...]:
    """Everything a request could change about one object, read without following a final symlink."""
    st = os.lstat(path)
    return (st.st_ino, st.st_uid, st.st_gid, st.st_mode, st.st_size, st.st_nlink, st.st_atime_ns,
            st.st_mtime_ns, st.st_ctime_ns, tuple(sorted(xattrs(path).items())))  # fmt: skip


def snapshot_tree(root: Path) -> dict[str, tuple[object, ...]]:
    """Every object at and below root (names, and each object's snapshot); the directory listing is
    read after the stats so that its atime update is not between two snapshots."""
    out: dict[str, tuple[object, ...]] = {}
    names: list[Path] = [root]
    for dirpath, dirnames, filenames in os.walk(root):
        names += [Path(dirpath, n) for n in dirnames + filenames]
    for name in names:
        out[str(name.relative_to(root.parent))] = snapshot(name)
    return out


def acl_blob(entries: list[tuple[int, int, int]]) -> bytes:
    """A system.posix_acl_access value: version 2, then (tag, perm, id) entries."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", tag, perm, i) for tag, perm, i in entries)


ACL_USER_OBJ, ACL_USER, ACL_GROUP_OBJ, ACL_MASK, ACL_OTHER = 0x01, 0x02, 0x04, 0x10, 0x20
UNDEFINED_ID = 0xFFFFFFFF
# uid 1000 gets rwx on what it is set on: the "ACL granting alice rwx" of the reproduction.
ACL_ALICE_RWX = acl_blob(
    [(ACL_USER_OBJ, 7, UNDEFINED_ID), (ACL_USER, 7, ALICE), (ACL_GROUP_OBJ, 5, UNDEFINED_ID),
     (ACL_MASK, 7, UNDEFINED_ID), (ACL_OTHER, 0, UNDEFINED_ID)]
)  # fmt: skip


def make_dir(path: Path, uid: int = 0, gid: int = 0, mode: int = 0o755) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, uid, gid)
    os.chmod(path, mode)
    return path


def make_file(path: Path, data: bytes, uid: int = 0, gid: int = 0, mode: int = 0o644) -> Path:
    path.write_bytes(data)
    os.chown(path, uid, gid)
    os.chmod(path, mode)
    return path


def is_dir(path: Path) -> bool:
    return stat.S_ISDIR(os.lstat(path).st_mode)
