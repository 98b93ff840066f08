"""Issue 9's reproductions, one regression test each, as a hostile guest sends them over the real protocol
to a real gateway process: a trailing slash on a symlink (findings 1), object conditions checked on the
link instead of what is opened (2), a protected name aliased into place (4), and the smaller points of 8
(an object's type taken from the guest's mode bits, a '..' walk through a denied directory).

Every test asserts what the host sees afterwards (owner, mode, size, times, xattrs of the protected
objects: unchanged), what the guest got (the rule's errno, no fd, no attributes) and what the trail says
(deny, and the path really decided on). Each of them fails on main before the fix (0635075)."""

from __future__ import annotations

import errno
import os
import shutil
import stat
from pathlib import Path

import pytest
from gw_attack import (
    ACL_ALICE_RWX,
    ALICE,
    BOB,
    README_POLICY,
    Session,
    gateway,
    make_dir,
    make_file,
    snapshot,
    snapshot_tree,
    xattrs,
)
from helpers import ROOT, require_root
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway import protocol as p
from gateway import syscalls as sc

MULTI_TENANT = ROOT / "policies" / "multi-tenant.yaml"


@pytest.fixture
def export(tmp_path: Path) -> Path:
    """/home/alice (alice's), /home/bob (bob's, private), /secret (root's, 0700, xattrs and a file), and
    the export root itself, each marked with a user.* xattr so that a read or a removal shows (not trusted.*:
    the gateway drops CAP_SYS_ADMIN, so those are out of its reach whatever the policy says)."""
    root = make_dir(tmp_path / "export")
    os.setxattr(root, "user.mark", b"root")
    make_dir(root / "home")
    alice = make_dir(root / "home" / "alice", ALICE, ALICE)
    make_file(alice / "notes", b"alice's notes\n", ALICE, ALICE)
    bob = make_dir(root / "home" / "bob", BOB, BOB, 0o700)
    os.setxattr(bob, "user.mark", b"bob")
    make_file(bob / "diary", b"bob's diary\n", BOB, BOB, 0o600)
    secret = make_dir(root / "secret", 0, 0, 0o700)
    os.setxattr(secret, "user.mark", b"secret")
    make_file(secret / "file", b"the secret\n", 0, 0, 0o600)
    make_dir(secret / "dir", 0, 0, 0o700)
    return root


# -- finding 1: a trailing slash on a symlink ---------------------------------------------------------------

# link kind -> (the links alice makes, in order: name in her home, target), the link the attack goes
# through, and the object the kernel follows it to (what must be decided on, and what must stay intact).
LINKS: dict[str, tuple[list[tuple[str, bytes]], str, str]] = {
    "absolute": ([("ls", b"/secret")], "ls", "/secret"),
    "relative": ([("rel", b"../../secret")], "rel", "/secret"),
    "chain": ([("c2", b"../../secret"), ("c1", b"c2"), ("c0", b"/home/alice/c1")], "c0", "/secret"),
    "other-tenant": ([("tobob", b"/home/bob")], "tobob", "/home/bob"),
    "export-root": ([("toroot", b"/")], "toroot", "/"),
    "export-root-relative": ([("up", b"../..")], "up", "/"),
}
SPELLINGS = ["/home/alice/{}/", "/home/alice/{}//", "/home/alice//{}/", "//home/alice/{}/"]


def _node_attacks(path: bytes) -> list[p.Request]:
    """Every request that acts on a final component without following it (issue 9 finding 1's list)."""
    return [  # the reads first, so that on a gateway that performs them they show the object untouched
        p.Lgetxattr(4096, path, b"user.mark"),
        p.Lgetxattr(0, path, b"user.mark"),
        p.Llistxattr(4096, path),
        p.Lstat(path),
        p.Chown(path, ALICE, ALICE),
        p.Lsetxattr(path, b"system.posix_acl_access", ACL_ALICE_RWX, len(ACL_ALICE_RWX), 0),
        p.Lsetxattr(path, b"user.planted", b"x", 1, 0),
        p.Utime(path, 1, 0, 1, 0),
        p.Lremovexattr(path, b"user.mark"),
    ]


def _protected(export: Path) -> dict[str, object]:
    """What no request in the trailing-slash tests may change: everything outside alice's home."""
    return {
        "root": snapshot(export),
        "home": snapshot(export / "home"),
        "secret": snapshot_tree(export / "secret"),
        "bob": snapshot_tree(export / "home" / "bob"),
    }


@pytest.mark.parametrize("kind", list(LINKS))
def test_trailing_slash_on_a_symlink_decides_on_what_it_follows_to(
    export: Path, tmp_path: Path, kind: str
) -> None:
    require_root()
    links, via, target = LINKS[kind]
    before = _protected(export)
    with gateway(export, README_POLICY, tmp_path / "trail.jsonl") as gw:
        for name, to in links:  # the premise: alice may make these links in her home
            gw.ok(p.Symlink(ALICE, ALICE, to, b"/home/alice/" + name.encode()))
        for spelling in SPELLINGS:
            path = spelling.format(via).encode()
            for request in _node_attacks(path):
                reply, record = gw.call(request)
                what = f"{request.type.name} {path!r} (-> {target})"
                assert reply.errno == errno.EACCES, f"{what}: {os.strerror(reply.errno) or 'performed'}"
                assert reply.payload == b"", f"{what}: answered with {target}'s data"
                assert record["decision"] == "deny", (what, record)
                assert record["resolved"] == target, (what, record)
        # The link itself, without the slash: alice's own object, allowed, and only the link changes.
        link = f"/home/alice/{via}".encode()
        assert stat.S_ISLNK(p.parse_stat(gw.ok(p.Lstat(link)).payload).mode)
        gw.ok(p.Chown(link, ALICE, ALICE))
        # '.' last was already decided on the directory; it still is.
        reply, record = gw.call(p.Chown(f"/home/alice/{via}/.".encode(), ALICE, ALICE))
        assert (reply.errno, record["decision"], record["resolved"]) == (errno.EACCES, "deny", target)
    assert _protected(export) == before


def test_a_symlinked_home_is_not_given_away_with_a_trailing_slash(tmp_path: Path) -> None:
    """policies/multi-tenant.yaml (alice 1001 at /home/u1001, bob 1002 at /home/u1002): `CHOWN
    /home/u1001/tobob/ 1001 1001` handed bob's home to alice. The link is alice's own object; what it
    leads to is bob's."""
    require_root()
    alice_uid, bob_uid = 1001, 1002
    export = make_dir(tmp_path / "export")
    make_dir(export / "home")
    make_dir(export / "shared", 0, 0, 0o1777)
    make_dir(export / "home" / "u1001", alice_uid, alice_uid)
    bob = make_dir(export / "home" / "u1002", bob_uid, bob_uid, 0o700)
    make_file(bob / "plans", b"bob's plans\n", bob_uid, bob_uid, 0o600)
    before = snapshot_tree(bob)
    with gateway(export, MULTI_TENANT, tmp_path / "trail.jsonl") as gw:
        gw.ok(p.Symlink(alice_uid, alice_uid, b"/home/u1002", b"/home/u1001/tobob"))
        gw.ok(p.Symlink(alice_uid, alice_uid, b"../u1002", b"/home/u1001/tobob-rel"))
        for path in (b"/home/u1001/tobob/", b"/home/u1001/tobob//", b"/home/u1001/tobob-rel/",
                     b"/home/u1001/tobob/.", b"/home/u1001/tobob/plans"):  # fmt: skip
            reply, record = gw.call(p.Chown(path, alice_uid, alice_uid))
            assert reply.errno == errno.EPERM, (path, os.strerror(reply.errno) or "performed")
            assert (record["decision"], record["rule"]) == ("deny", "home-guard"), record
            assert str(record["resolved"]).startswith("/home/u1002"), record
        # Without the slash the link is the object: alice may chown her own link, and only the link.
        gw.ok(p.Chown(b"/home/u1001/tobob", alice_uid, alice_uid))
    assert snapshot_tree(bob) == before
    assert os.lstat(bob).st_uid == bob_uid


# Every way of spelling a path through alice's links (absolute, relative, chained, to bob's home, to the
# root), with '.', '..', '//' anywhere and any ending: the object the kernel would act on for a request
# that does not follow its final name (openat2 O_PATH | O_NOFOLLOW beneath the root: a trailing slash or
# '.' last follows it anyway) is the oracle.
_ANY_LINK = st.sampled_from(["ls", "rel", "c0", "tobob", "toroot", "up", "sub", "notes"])
_MORE = st.lists(
    st.sampled_from(["dir", "file", ".", "..", "sub", "notes", "ls", "alice", "home"]), max_size=3
)
_SEP = st.sampled_from(["/", "//", "/./"])
_END = st.sampled_from(["", "/", "//", "/.", "/./"])
_NODE_OPS = st.sampled_from(
    ["lstat", "lgetxattr", "llistxattr", "chown", "utime", "lsetxattr", "lremovexattr"]
)


@st.composite
def _spellings(draw: st.DrawFn) -> bytes:
    comps = ["home", "alice", draw(_ANY_LINK), *draw(_MORE)]
    return ("".join(draw(_SEP) + c for c in comps) + draw(_END)).encode()


def _node_request(op: str, path: bytes) -> p.Request:
    return {
        "lstat": lambda: p.Lstat(path),
        "lgetxattr": lambda: p.Lgetxattr(4096, path, b"user.mark"),
        "llistxattr": lambda: p.Llistxattr(4096, path),
        "chown": lambda: p.Chown(path, ALICE, ALICE),
        "utime": lambda: p.Utime(path, 7, 0, 7, 0),
        "lsetxattr": lambda: p.Lsetxattr(path, b"user.planted", b"x", 1, 0),
        "lremovexattr": lambda: p.Lremovexattr(path, b"user.mark"),
    }[op]()


def _kernel_object(root_fd: int, path: bytes) -> os.stat_result | None:
    try:
        fd = sc.openat2(root_fd, path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return os.fstat(fd)
    finally:
        os.close(fd)


def _inodes(top: Path) -> set[tuple[int, int]]:
    out = {(os.lstat(top).st_dev, os.lstat(top).st_ino)}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            st_ = os.lstat(Path(dirpath, name))
            out.add((st_.st_dev, st_.st_ino))
    return out


def test_any_spelling_through_a_link_acts_only_on_what_the_kernel_reaches(
    export: Path, tmp_path: Path
) -> None:
    """Property (Hypothesis, fixed seed): whatever the spelling, a request that reaches anything but
    alice's own objects is denied and changes nothing; an allowed LSTAT answers for exactly the object
    the kernel reaches; every allowed record names a path in alice's home."""
    require_root()
    alice = export / "home" / "alice"
    make_dir(alice / "sub", ALICE, ALICE)
    links = [("ls", b"/secret"), ("rel", b"../../secret"), ("c2", b"../../secret"), ("c1", b"c2"),
             ("c0", b"/home/alice/c1"), ("tobob", b"/home/bob"), ("toroot", b"/"), ("up", b"../.."),
             ("self", b"."), ("tosub", b"sub")]  # fmt: skip
    before = _protected(export)
    root_fd = os.open(export, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    counts = {"denied-outside": 0, "allowed-alice": 0, "no-object": 0}
    try:
        with gateway(export, README_POLICY, tmp_path / "trail.jsonl") as gw:
            for name, to in links:
                gw.ok(p.Symlink(ALICE, ALICE, to, b"/home/alice/" + name.encode()))
            alices = _inodes(alice)

            @settings(max_examples=500, derandomize=True, database=None, deadline=None,
                      suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
            @given(path=_spellings(), op=_NODE_OPS)
            def attack(path: bytes, op: str) -> None:
                obj = _kernel_object(root_fd, path)
                reply, record = gw.call(_node_request(op, path))
                where = f"{op} {path!r}"
                if obj is None:
                    assert reply.errno != 0, f"{where}: the kernel reaches nothing, the gateway did something"
                    counts["no-object"] += 1
                elif (obj.st_dev, obj.st_ino) not in alices:
                    assert (reply.errno, reply.payload) == (errno.EACCES, b""), (where, record)
                    assert record["decision"] == "deny", (where, record)
                    counts["denied-outside"] += 1
                elif record["decision"] == "allow":  # alice's own (it may still fail: no such xattr ...)
                    counts["allowed-alice"] += 1
                    if op == "lstat":
                        assert p.parse_stat(reply.payload).ino == obj.st_ino, where
                if record["decision"] == "allow":
                    decided = str(record.get("resolved", record["path"]))
                    assert decided == "/home/alice" or decided.startswith("/home/alice/"), (where, record)
                assert _protected(export) == before, f"{where} changed something outside alice's home"

            attack()
    finally:
        os.close(root_fd)
    # The generator really reached both sides (a property that never met an outside object proves little).
    assert counts["denied-outside"] >= 50 and counts["allowed-alice"] >= 50, counts


# -- finding 2: object conditions on what is opened ---------------------------------------------------------

OBJECT_POLICY = """\
version: 1
tenant: object-conditions
default: allow
rules:
  - id: root-objects-read-only
    effect: deny
    ops: [write]
    when: {object: {owner: [0]}}
    errno: EPERM
  - id: root-private-unreadable
    effect: deny
    ops: [read]
    when: {object: {owner: [0], mode_none: [or]}}
"""


def test_object_conditions_are_checked_on_what_a_symlink_leads_to(tmp_path: Path) -> None:
    """No `paths` at all: only object conditions. A symlink alice owns, pointing at root's 0600
    /etc/passwd, must not lend the file its owner."""
    require_root()
    export = make_dir(tmp_path / "export")
    make_dir(export / "etc")
    passwd = make_file(export / "etc" / "passwd", b"root:x:0:0::/root:/bin/sh\n", 0, 0, 0o600)
    make_dir(export / "home")
    make_dir(export / "home" / "alice", ALICE, ALICE)
    mine = make_file(export / "home" / "alice" / "mine", b"mine\n", ALICE, ALICE, 0o600)
    before = snapshot(passwd)
    with gateway(export, OBJECT_POLICY, tmp_path / "trail.jsonl") as gw:
        gw.ok(p.Symlink(ALICE, ALICE, b"/etc/passwd", b"/home/alice/p"))
        gw.ok(p.Symlink(ALICE, ALICE, b"../../etc/passwd", b"/home/alice/p-rel"))
        for link in (b"/home/alice/p", b"/home/alice/p-rel"):
            attacks: list[tuple[p.Request, int]] = [
                (p.Chmod(link, 0o666), errno.EPERM),
                (p.Truncate(link, 0), errno.EPERM),
                (p.Open(link, os.O_RDWR), errno.EPERM),
                (p.Open(link, os.O_WRONLY | os.O_APPEND), errno.EPERM),
                (p.Create(link, os.O_RDWR | os.O_CREAT, 0o644, ALICE, ALICE), errno.EPERM),
                (p.Open(link, os.O_RDONLY), errno.EACCES),
            ]
            for request, code in attacks:
                reply, record = gw.call(request)
                assert reply.fd is None, f"{request}: the guest got an fd of root's /etc/passwd"
                assert reply.errno == code, (request, os.strerror(reply.errno) or "performed")
                assert record["decision"] == "deny" and record["resolved"] == "/etc/passwd", record
        # Alice's own file is hers to write; the link itself (LSTAT does not follow) is hers to see.
        gw.ok(p.Open(b"/home/alice/mine", os.O_RDWR))
        gw.ok(p.Chmod(b"/home/alice/mine", 0o640))
        assert stat.S_ISLNK(p.parse_stat(gw.ok(p.Lstat(b"/home/alice/p")).payload).mode)
    assert snapshot(passwd) == before
    assert passwd.read_bytes() == b"root:x:0:0::/root:/bin/sh\n"
    assert stat.S_IMODE(os.stat(mine).st_mode) == 0o640


# -- finding 4: aliasing a protected name into place ---------------------------------------------------------

ALIAS_POLICY = """\
version: 1
tenant: aliases
default: deny
rules:
  - id: read-anything
    effect: allow
    ops: [read]
  - id: cache-writable
    effect: allow
    ops: [write]
    paths: ["/cache/**"]
  - id: no-git-hooks
    effect: deny
    ops: [write]
    paths: ["**/.git/hooks/**"]
    errno: EPERM
  - id: prod-hooks
    effect: deny
    ops: [write]
    paths: ["/cache/prod/app/hooks/**"]
    errno: EPERM
"""

HOOK = b"#!/bin/sh\necho pwned\n"


def _build_shadow(gw: Session) -> None:
    """What the guest may build anywhere in /cache: a directory shaped like .git/hooks, and a tree
    shaped like /cache/prod with an app/hooks inside it."""
    for d in (b"/cache/repo", b"/cache/shadow", b"/cache/shadow/hooks", b"/cache/newparent",
              b"/cache/stage", b"/cache/stage/app", b"/cache/stage/app/hooks"):  # fmt: skip
        gw.ok(p.Mkdir(ALICE, ALICE, d, 0o755))
    for f in (b"/cache/shadow/hooks/pre-commit", b"/cache/stage/app/hooks/post-deploy"):
        fd = gw.ok(p.Create(f, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o755, ALICE, ALICE), keep_fd=True).fd
        assert fd is not None, f
        os.write(fd, HOOK)
        os.close(fd)


# attack -> (requests, the rule that must refuse the last one, the host path that must not lead to the
# guest's hook afterwards)
ALIAS_ATTACKS: dict[str, tuple[list[p.Request], str, str]] = {
    "symlink-relative": ([p.Symlink(ALICE, ALICE, b"../shadow", b"/cache/repo/.git")],
                         "no-git-hooks", "cache/repo/.git/hooks/pre-commit"),
    "symlink-absolute": ([p.Symlink(ALICE, ALICE, b"/cache/shadow", b"/cache/repo/.git")],
                         "no-git-hooks", "cache/repo/.git/hooks/pre-commit"),
    "rename": ([p.Rename(b"/cache/shadow", b"/cache/repo/.git")],
               "no-git-hooks", "cache/repo/.git/hooks/pre-commit"),
    "rename-with-slashes": ([p.Rename(b"/cache/shadow/", b"/cache/repo//.git/")],
                            "no-git-hooks", "cache/repo/.git/hooks/pre-commit"),
    "rename-into-new-parent": ([p.Rename(b"/cache/shadow", b"/cache/newparent/.git")],
                               "no-git-hooks", "cache/newparent/.git/hooks/pre-commit"),
    "rename-parent-tree": ([p.Rename(b"/cache/stage", b"/cache/prod")],
                           "prod-hooks", "cache/prod/app/hooks/post-deploy"),
    "symlink-parent-tree": ([p.Symlink(ALICE, ALICE, b"stage", b"/cache/prod")],
                            "prod-hooks", "cache/prod/app/hooks/post-deploy"),
    "rename-middle-tree": ([p.Mkdir(ALICE, ALICE, b"/cache/prod", 0o755),
                            p.Rename(b"/cache/stage/app", b"/cache/prod/app")],
                           "prod-hooks", "cache/prod/app/hooks/post-deploy"),
}  # fmt: skip


@pytest.mark.parametrize("attack", list(ALIAS_ATTACKS))
def test_a_protected_name_is_not_aliased_into_place(tmp_path: Path, attack: str) -> None:
    require_root()
    export = make_dir(tmp_path / "export")
    make_dir(export / "cache", ALICE, ALICE)
    with gateway(export, ALIAS_POLICY, tmp_path / "trail.jsonl") as gw:
        _build_shadow(gw)
        # The controls: creating under the protected name directly is refused ...
        gw.ok(p.Mkdir(ALICE, ALICE, b"/cache/direct", 0o755))
        gw.ok(p.Mkdir(ALICE, ALICE, b"/cache/direct/.git", 0o755))
        for request in (p.Mkdir(ALICE, ALICE, b"/cache/direct/.git/hooks", 0o755),
                        p.Rename(b"/cache/shadow/hooks", b"/cache/direct/.git/hooks")):  # fmt: skip
            reply, record = gw.call(request)
            assert (reply.errno, record["rule"]) == (errno.EPERM, "no-git-hooks"), record
        # ... while ordinary links and renames in /cache still work.
        gw.ok(p.Symlink(ALICE, ALICE, b"y", b"/cache/x"))
        gw.ok(p.Symlink(ALICE, ALICE, b"../shadow", b"/cache/repo/not-git"))
        requests, rule, reached = ALIAS_ATTACKS[attack]
        for request in requests[:-1]:  # the set-up steps, each harmless alone
            gw.ok(request)
        reply, record = gw.call(requests[-1])
        assert (reply.errno, record["decision"], record["rule"]) == (errno.EPERM, "deny", rule), record
    assert not os.path.exists(export / reached), f"{attack}: the guest's hook is at /{reached}"
    # The shadow trees are still where the guest built them (nothing moved).
    assert (export / "cache/shadow/hooks/pre-commit").read_bytes() == HOOK
    assert (export / "cache/stage/app/hooks/post-deploy").read_bytes() == HOOK


PRIVATE_POLICY = """\
version: 1
tenant: private
default: deny
rules:
  - id: read-anything
    effect: allow
    ops: [read]
  - id: alice-home
    effect: allow
    ops: [all]
    paths: ["/home/alice/**"]
  - id: private
    effect: deny
    ops: [{ops}]
    paths: ["/home/alice/private/*"]
"""


@pytest.mark.parametrize("ops", ["all", "read"])
def test_a_deny_on_a_directory_s_children_survives_renaming_the_directory(tmp_path: Path, ops: str) -> None:
    """`deny /home/alice/private/*` (reads and writes, or reads only): renaming private to public (and
    back, to cover the tracks) would read and rewrite what it protects under another name."""
    require_root()
    export = make_dir(tmp_path / "export")
    make_dir(export / "home")
    alice = make_dir(export / "home" / "alice", ALICE, ALICE)
    private = make_dir(alice / "private", ALICE, ALICE, 0o700)
    make_file(private / "diary", b"dear diary\n", ALICE, ALICE, 0o600)
    make_dir(alice / "other", ALICE, ALICE)
    before = snapshot_tree(private)
    with gateway(export, PRIVATE_POLICY.format(ops=ops), tmp_path / "trail.jsonl") as gw:
        reply, record = gw.call(p.Open(b"/home/alice/private/diary", os.O_RDONLY))
        assert reply.errno == errno.EACCES and record["rule"] == "private"  # the rule holds by name
        for request in (
            p.Rename(b"/home/alice/private", b"/home/alice/public"),
            p.Rename(b"/home/alice/private/", b"/home/alice/public/"),
            p.Rename(b"/home/alice", b"/home/alice/other/moved"),  # above it: EINVAL, but decided first
            p.Rename(b"/home/alice/private/diary", b"/home/alice/diary"),
            p.Link(b"/home/alice/private/diary", b"/home/alice/diary-link"),
        ):
            reply, record = gw.call(request)
            assert reply.errno == errno.EACCES, (request, os.strerror(reply.errno) or "performed")
            assert (record["decision"], record["rule"]) == ("deny", "private"), (request, record)
        for name in (b"/home/alice/public/diary", b"/home/alice/diary", b"/home/alice/diary-link"):
            reply, _record = gw.call(p.Open(name, os.O_RDONLY))
            assert reply.fd is None and reply.errno == errno.ENOENT, name
        # A directory that nothing protects is renamed as before.
        gw.ok(p.Rename(b"/home/alice/other", b"/home/alice/other2"))
    assert snapshot_tree(private) == before
    assert sorted(os.listdir(alice)) == ["other2", "private"]


# -- finding 8's smaller points ------------------------------------------------------------------------------

TYPE_POLICY = """\
version: 1
tenant: types
default: allow
rules:
  - id: directory-modes-fixed
    effect: deny
    ops: [chmod]
    when: {type: [dir]}
    errno: EPERM
"""


def test_a_chmod_type_condition_reads_the_object_not_the_guest_s_mode_bits(tmp_path: Path) -> None:
    require_root()
    export = make_dir(tmp_path / "export")
    d = make_dir(export / "d", ALICE, ALICE, 0o755)
    f = make_file(export / "f", b"f\n", ALICE, ALICE, 0o644)
    before = snapshot(d)
    with gateway(export, TYPE_POLICY, tmp_path / "trail.jsonl") as gw:
        # A directory, with type bits that say "regular file", or none at all: still a directory.
        for mode in (stat.S_IFREG | 0o777, 0o777, stat.S_IFLNK | 0o777):
            reply, record = gw.call(p.Chmod(b"/d", mode))
            assert reply.errno == errno.EPERM, (oct(mode), os.strerror(reply.errno) or "performed")
            assert record["rule"] == "directory-modes-fixed", record
        # A regular file, with type bits that say "directory": still a regular file, allowed.
        gw.ok(p.Chmod(b"/f", stat.S_IFDIR | 0o600))
    assert snapshot(d) == before
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o600


@pytest.mark.parametrize("exists", [True, False], ids=["dir-exists", "dir-absent"])
def test_a_dotdot_walk_through_a_denied_directory_answers_the_same_either_way(
    export: Path, tmp_path: Path, exists: bool
) -> None:
    """`LSTAT /secret/dir/../../home/alice/notes`: ok when /secret/dir exists, ENOENT when not, told
    the guest what is in /secret. Now it is denied either way, and says nothing."""
    require_root()
    if not exists:
        shutil.rmtree(export / "secret" / "dir")
    with gateway(export, README_POLICY, tmp_path / "trail.jsonl") as gw:
        walks = (
            b"/secret/dir/../../home/alice/notes",
            b"/secret/dir/../file/../../home/alice/notes",
            b"/secret/dir/./../../home/alice/notes",
            b"//secret//dir//..//..//home/alice/notes",
        )
        for path in walks:
            reply, record = gw.call(p.Lstat(path))
            assert (reply.errno, reply.payload) == (errno.EACCES, b""), (path, os.strerror(reply.errno))
            assert (record["decision"], record["rule"]) == ("deny", "secret"), record
        # Control: alice's notes themselves, and a '..' walk through her own home, are answered.
        notes = p.parse_stat(gw.ok(p.Lstat(b"/home/alice/notes")).payload)
        assert notes.ino == os.lstat(export / "home" / "alice" / "notes").st_ino
        assert p.parse_stat(gw.ok(p.Lstat(b"/home/alice/../alice/notes")).payload).ino == notes.ino
    assert xattrs(export / "secret")["user.mark"] == b"secret"
