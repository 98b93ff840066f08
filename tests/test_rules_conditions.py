"""Every condition kind, and the ops and groups, each with requests that match and requests that do not."""

from __future__ import annotations

import pytest

from gateway.protocol import RequestType as RT
from gateway.rules import decide, load_policy_text
from gateway.rules.model import GROUPS, OPEN_READ, OPEN_WRITE, SLOTS, op_slots
from gateway.rules.requests import parse_text


def allowed(rule: str, request: str) -> bool:
    """Does a single allow rule (under default deny) match the request? Object attrs come from the text."""
    policy = load_policy_text(f"version: 1\ndefault: deny\nrules:\n  - {{id: r, effect: allow, {rule}}}\n")
    spec = parse_text(request)
    decision = decide(spec.request, policy, lambda _path: spec.object)
    assert decision.rule == ("r" if decision.outcome == "allow" else None)
    return decision.outcome == "allow"


CASES = [
    # uid / gid: single ids, ranges, lists; only requests that carry them
    ("ops: [all], when: {uid: [1000]}", "create /a uid=1000", True),
    ("ops: [all], when: {uid: [1000]}", "create /a uid=1001", False),
    ("ops: [all], when: {uid: ['1000-59999']}", "mkdir /a uid=59999", True),
    ("ops: [all], when: {uid: ['1000-59999']}", "mkdir /a uid=60000", False),
    ("ops: [all], when: {uid: [0, '100-200']}", "mknod /a uid=150", True),
    ("ops: [all], when: {uid: [0, '100-200']}", "symlink /a target=b uid=0", True),
    ("ops: [all], when: {uid: [0, '100-200']}", "symlink /a target=b uid=99", False),
    ("ops: [all], when: {uid: [5]}", "chown /a uid=5", True),  # chown: the new owner
    ("ops: [all], when: {uid: [0]}", "open /a", False),  # open carries no uid: never holds
    ("ops: [all], when: {uid: [0]}", "rename /a /b", False),
    ("ops: [all], when: {gid: ['100-200']}", "create /a gid=100", True),
    ("ops: [all], when: {gid: ['100-200']}", "create /a gid=99", False),
    # mode bits: by name and octal, any / all / none
    ("ops: [all], when: {mode_any: [setuid, setgid]}", "create /a mode=02755", True),
    ("ops: [all], when: {mode_any: [setuid, setgid]}", "create /a mode=01755", False),
    ("ops: [all], when: {mode_any: ['06000']}", "chmod /a mode=0104755", True),
    ("ops: [all], when: {mode_all: [ow, ox]}", "mkdir /a mode=0777", True),
    ("ops: [all], when: {mode_all: [ow, ox]}", "mkdir /a mode=0776", False),
    ("ops: [all], when: {mode_none: [gw, ow]}", "create /a mode=0644", True),
    ("ops: [all], when: {mode_none: [gw, ow]}", "create /a mode=0664", False),
    ("ops: [all], when: {mode_any: [ur]}", "open /a", False),  # open has no mode
    # type of what is made: fixed per op, from the mode for mknod (0: regular); chmod: the object's own
    ("ops: [all], when: {type: [reg]}", "create /a", True),
    ("ops: [all], when: {type: [dir]}", "create /a", False),
    ("ops: [all], when: {type: [dir]}", "mkdir /a", True),
    ("ops: [all], when: {type: [lnk]}", "symlink /a target=b", True),
    ("ops: [all], when: {type: [chr, blk]}", "mknod /a mode=020600", True),
    ("ops: [all], when: {type: [chr, blk]}", "mknod /a mode=060600", True),
    ("ops: [all], when: {type: [chr, blk]}", "mknod /a mode=010600", False),
    ("ops: [all], when: {type: [reg]}", "mknod /a mode=0600", True),
    # chmod's type is the object's, never the guest's mode bits (issue 9, finding 8)
    ("ops: [all], when: {type: [dir]}", "chmod /a mode=040755", False),  # type bits sent: ignored
    ("ops: [all], when: {type: [dir]}", "chmod /a mode=0755 type=dir", True),
    ("ops: [all], when: {type: [dir]}", "chmod /a mode=040755 type=reg", False),
    ("ops: [all], when: {type: [dir]}", "chmod /a mode=0755", False),  # the object unknown
    # open flags: access modes are a 2-bit field
    ("ops: [all], when: {flags_any: [O_WRONLY, O_RDWR]}", "open /a flags=O_RDWR", True),
    ("ops: [all], when: {flags_any: [O_WRONLY, O_RDWR]}", "open /a flags=O_RDONLY|O_TRUNC", False),
    ("ops: [all], when: {flags_all: [O_CREAT, O_EXCL]}", "open /a flags=O_WRONLY|O_CREAT|O_EXCL", True),
    ("ops: [all], when: {flags_all: [O_CREAT, O_EXCL]}", "open /a flags=O_WRONLY|O_CREAT", False),
    ("ops: [all], when: {flags_none: [O_APPEND]}", "open /a flags=O_WRONLY", True),
    ("ops: [all], when: {flags_none: [O_APPEND]}", "open /a flags=O_WRONLY|O_APPEND", False),
    ("ops: [all], when: {flags_all: [O_RDONLY]}", "open /a", True),
    ("ops: [all], when: {flags_any: [O_TRUNC]}", "create /a flags=O_WRONLY|O_CREAT|O_TRUNC", True),
    ("ops: [all], when: {flags_any: [XATTR_CREATE]}", "lsetxattr /a name=user.x flags=XATTR_CREATE", True),
    ("ops: [all], when: {flags_any: [XATTR_CREATE]}", "lsetxattr /a name=user.x flags=XATTR_REPLACE", False),
    ("ops: [all], when: {flags_any: [XATTR_CREATE]}", "open /a flags=O_WRONLY", False),  # other family
    ("ops: [all], when: {flags_any: [O_TRUNC]}", "truncate /a", False),
    # symlink targets
    ("ops: [all], when: {target: ['/etc/**']}", "symlink /l target=/etc/passwd", True),
    ("ops: [all], when: {target: ['/etc/**']}", "symlink /l target=etc/passwd", False),  # as written
    ("ops: [all], when: {target: ['*']}", "symlink /l target=sibling", True),
    ("ops: [all], when: {target_except: ['/etc/**']}", "symlink /l target=/usr/bin", True),
    ("ops: [all], when: {target_except: ['/etc/**']}", "symlink /l target=/etc/x", False),
    ("ops: [all], when: {target_resolved: ['/home/a/**']}", "symlink /home/a/l target=../a/x", True),
    ("ops: [all], when: {target_resolved: ['/home/a/**']}", "symlink /home/a/l target=../b/x", False),
    ("ops: [all], when: {target_resolved: ['/etc/**']}", "symlink /home/a/l target=../../../../etc/x", True),
    ("ops: [all], when: {target_absolute: true}", "symlink /l target=/x", True),
    ("ops: [all], when: {target_absolute: true}", "symlink /l target=x", False),
    ("ops: [all], when: {target_absolute: false}", "symlink /l target=x", True),
    ("ops: [all], when: {target_dotdot: true}", "symlink /l target=a/../b", True),
    ("ops: [all], when: {target_dotdot: true}", "symlink /l target=a/..b", False),
    ("ops: [all], when: {target_dotdot: false}", "symlink /l target=a/b", True),
    ("ops: [all], when: {target_absolute: true}", "readlink /l", False),
    # truncate length
    ("ops: [all], when: {length_max: 100}", "truncate /a length=100", True),
    ("ops: [all], when: {length_max: 100}", "truncate /a length=101", False),
    ("ops: [all], when: {length_min: 100}", "truncate /a length=100", True),
    ("ops: [all], when: {length_min: 100}", "truncate /a length=99", False),
    ("ops: [all], when: {length_min: 1, length_max: 9}", "truncate /a length=5", True),
    # xattr names
    ("ops: [all], when: {xattr: ['user.*']}", "lgetxattr /a name=user.comment", True),
    ("ops: [all], when: {xattr: ['user.*']}", "lremovexattr /a name=security.selinux", False),
    ("ops: [all], when: {xattr: ['user.*'], xattr_except: ['user.x.*']}", "lsetxattr /a name=user.x.y",
     False),
    ("ops: [all], when: {xattr: ['user.*'], xattr_except: ['user.x.*']}", "lsetxattr /a name=user.y", True),
    ("ops: [all], when: {xattr: ['*']}", "llistxattr /a", False),  # no name
    # the object as it is now
    ("ops: [all], when: {object: {owner: ['1000-1999']}}", "open /a owner=1500", True),
    ("ops: [all], when: {object: {owner: ['1000-1999']}}", "open /a owner=15", False),
    ("ops: [all], when: {object: {owner: ['1000-1999']}}", "open /a", False),  # unknown owner
    ("ops: [all], when: {object: {group: [50]}}", "remove /a group=50", True),
    ("ops: [all], when: {object: {type: [dir]}}", "remove /a type=dir", True),
    ("ops: [all], when: {object: {type: [dir]}}", "remove /a type=reg", False),
    ("ops: [all], when: {object: {mode_all: [gw]}}", "utime /a object_mode=0664", True),
    ("ops: [all], when: {object: {mode_all: [gw]}}", "utime /a object_mode=0644", False),
    ("ops: [all], when: {object: {mode_any: [setuid]}}", "lstat /a object_mode=04755", True),
    ("ops: [all], when: {object: {mode_none: [ox]}}", "lstat /a object_mode=0644", True),
    ("ops: [all], when: {object: {mode_none: [ox]}}", "lstat /a owner=1", False),  # mode unknown
    # paths and except
    ("ops: [all], paths: ['/home/**'], except: ['/home/*/.cache/**']", "open /home/a/x", True),
    ("ops: [all], paths: ['/home/**'], except: ['/home/*/.cache/**']", "open /home/a/.cache/x", False),
    ("ops: [all], except: ['/tmp/**']", "open /etc/x", True),
    ("ops: [all], except: ['/tmp/**']", "open /tmp/x", False),
    # unless: an exception to the rule; an unknown field makes the exception not apply
    ("ops: [all], unless: {uid: [0]}", "create /a uid=0", False),
    ("ops: [all], unless: {uid: [0]}", "create /a uid=1", True),
    ("ops: [all], unless: {uid: [0]}", "rename /a /b", True),
    ("ops: [all], unless: {uid: [0], gid: [0]}", "create /a uid=0 gid=1", True),  # not every one holds
    ("ops: [all], unless: {object: {owner: [0]}}", "open /a owner=0", False),
    ("ops: [all], unless: {object: {owner: [0]}}", "open /a owner=1", True),
    ("ops: [all], unless: {object: {owner: [0]}}", "open /a", True),
    ("ops: [all], when: {uid: [1]}, unless: {object: {type: [dir]}}", "mkdir /a uid=1 type=dir", False),
    ("ops: [all], when: {uid: [1]}, unless: {object: {type: [dir]}}", "mkdir /a uid=1", True),
    # owner: self / group: self: the object's owner (group) is the request's uid (gid); unknown without one
    ("ops: [all], when: {object: {owner: self}}", "create /a uid=7 owner=7", True),
    ("ops: [all], when: {object: {owner: self}}", "create /a uid=7 owner=8", False),
    ("ops: [all], when: {object: {owner: self}}", "open /a owner=7", False),  # open: no uid
    ("ops: [all], when: {object: {group: self}}", "chown /a uid=1 gid=9 group=9", True),
    ("ops: [all], when: {object: {group: self}}", "chown /a uid=1 gid=9", False),
]


@pytest.mark.parametrize(("rule", "text", "expected"), CASES)
def test_condition(rule: str, text: str, expected: bool) -> None:
    assert allowed(rule, text) is expected


def test_every_condition_kind_is_covered_above() -> None:
    from gateway.rules.model import Conditions, ObjectConditions

    text = " ".join(rule for rule, _, _ in CASES)
    for key in [*Conditions.__dataclass_fields__, *ObjectConditions.__dataclass_fields__]:
        key = {"owner_self": "owner: self", "group_self": "group: self"}.get(key, key + ":")
        assert key in text, key


GROUP_MEMBERS = {
    "read": {"open (read)", "lstat", "readlink", "statfs", "lgetxattr", "llistxattr", "getversion"},
    "write": {"open (write)", "create", "mknod", "mkdir", "symlink", "link", "chmod", "chown", "truncate",
              "utime", "rename", "remove", "lsetxattr", "lremovexattr"},
    "create": {"create", "mknod", "mkdir", "symlink", "link", "rename"},
    "delete": {"remove", "rename"},
    "attr": {"chmod", "chown", "truncate", "utime"},
    "xattr": {"lgetxattr", "llistxattr", "lsetxattr", "lremovexattr"},
}


def test_groups() -> None:
    from gateway.rules.model import SLOT_NAMES

    for group, members in GROUP_MEMBERS.items():
        assert {SLOT_NAMES[s] for s in GROUPS[group]} == members, group
    assert GROUPS["all"] == frozenset(SLOTS)
    assert GROUPS["read"] | GROUPS["write"] == GROUPS["all"]  # every request is a read or a write
    assert not GROUPS["read"] & GROUPS["write"]


def test_op_names_and_capitals() -> None:
    assert op_slots("create") == GROUPS["create"]  # lower case: the group
    assert op_slots("CREATE") == {int(RT.CREATE)}  # capitals: exactly that request
    assert op_slots("open") == op_slots("OPEN") == {OPEN_READ, OPEN_WRITE}
    assert op_slots("mknod") == op_slots("MKNOD") == {int(RT.MKNOD)}
    assert op_slots("wirte") is None and op_slots("Read") is None


@pytest.mark.parametrize(
    ("flags", "kind"),
    [("O_RDONLY", "read"), ("O_WRONLY", "write"), ("O_RDWR", "write"), ("O_RDONLY|O_TRUNC", "write"),
     ("O_RDONLY|O_APPEND", "write"), ("O_RDONLY|O_CREAT", "write"), ("O_RDONLY|O_TMPFILE", "write"),
     ("O_RDONLY|O_NOFOLLOW|O_DIRECTORY", "read"), ("O_RDONLY|O_EXCL", "read")],
)
def test_open_is_a_read_or_a_write_by_its_flags(flags: str, kind: str) -> None:
    assert allowed(f"ops: [{kind}]", f"open /a flags={flags}")
    other = "write" if kind == "read" else "read"
    assert not allowed(f"ops: [{other}]", f"open /a flags={flags}")


def test_capital_create_is_only_create() -> None:
    assert allowed("ops: [CREATE]", "create /a")
    assert not allowed("ops: [CREATE]", "mknod /a")
    assert allowed("ops: [create]", "mknod /a")
    assert allowed("ops: [create]", "rename /a /b") and allowed("ops: [delete]", "rename /a /b")
