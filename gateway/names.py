"""Readable names for the protocol's numbers: ops, open flags, modes, file types, errnos.

Shared by the rules (conditions are written with these names), the audit records (written with them)
and the CLI (requests typed by people). Pure tables, no I/O.
"""

from __future__ import annotations

import errno
import os
import stat

from gateway.protocol import RequestType

# Op names: the request type in lower case ("open", "lsetxattr", ...).
OP_NAMES: dict[RequestType, str] = {t: t.name.lower() for t in RequestType}
OPS_BY_NAME: dict[str, RequestType] = {name: t for t, name in OP_NAMES.items()}

# Open flags as the x86-64 kernel defines them (QEMU passes the guest's Linux flags through).
ACCESS_MODES = {0: "O_RDONLY", 1: "O_WRONLY", 2: "O_RDWR", 3: "O_ACCMODE"}
OPEN_FLAG_BITS: dict[str, int] = {
    "O_CREAT": 0o100,
    "O_EXCL": 0o200,
    "O_NOCTTY": 0o400,
    "O_TRUNC": 0o1000,
    "O_APPEND": 0o2000,
    "O_NONBLOCK": 0o4000,
    "O_DSYNC": 0o10000,
    "O_ASYNC": 0o20000,
    "O_DIRECT": 0o40000,
    "O_LARGEFILE": 0o100000,
    "O_DIRECTORY": 0o200000,
    "O_NOFOLLOW": 0o400000,
    "O_NOATIME": 0o1000000,
    "O_CLOEXEC": 0o2000000,
    "__O_SYNC": 0o4000000,
    "O_PATH": 0o10000000,
    "__O_TMPFILE": 0o20000000,
}
assert OPEN_FLAG_BITS["O_CREAT"] == os.O_CREAT and OPEN_FLAG_BITS["O_NOFOLLOW"] == os.O_NOFOLLOW
_COMPOSITE = {"O_SYNC": 0o4010000, "O_TMPFILE": 0o20200000}


def open_flag_names(flags: int) -> list[str]:
    """Names for an open flags word: the access mode first, then each set bit; unknown bits in hex."""
    names = [ACCESS_MODES[flags & 3]]
    rest = flags & ~3
    for name, bit in OPEN_FLAG_BITS.items():
        if rest & bit:
            names.append(name)
            rest &= ~bit
    if rest:
        names.append(hex(rest & 0xFFFFFFFF))
    return names


def open_flags_from_names(names: list[str] | str) -> int:
    """Inverse of open_flag_names; accepts "O_RDWR|O_CREAT", a list, or numbers."""
    if isinstance(names, str):
        names = [n for n in names.replace(",", "|").split("|") if n.strip()]
    value = 0
    for raw in names:
        name = raw.strip().upper()
        if not name.startswith(("O_", "__O_", "0")):
            name = "O_" + name
        if name in ("O_RDONLY",):
            continue
        if name == "O_WRONLY":
            value |= 1
        elif name == "O_RDWR":
            value |= 2
        elif name in OPEN_FLAG_BITS:
            value |= OPEN_FLAG_BITS[name]
        elif name in _COMPOSITE:
            value |= _COMPOSITE[name]
        else:
            try:
                value |= int(name, 0)
            except ValueError:
                raise ValueError(f"unknown open flag {raw!r}") from None
    return value


# OPEN is a read or a write by its flags: a write access mode, or a flag that changes or creates the file
# (O_TMPFILE creates an unnamed one).
OPEN_WRITE_FLAG_NAMES = frozenset(
    {"O_WRONLY", "O_RDWR", "O_ACCMODE", "O_TRUNC", "O_APPEND", "O_CREAT", "__O_TMPFILE"}
)
OPEN_WRITE_FLAGS = 3 | sum(OPEN_FLAG_BITS[n] for n in OPEN_WRITE_FLAG_NAMES if n in OPEN_FLAG_BITS)

# The op groups of the policy language and of `gateway audit --op`, in one place. A group names op
# classes: op names, and open:read / open:write for the two kinds of OPEN. rename is both a create (a new
# name appears) and a delete (the old one goes).
_WRITE_OPS = (
    "create mknod mkdir symlink link rename remove truncate chmod chown utime lsetxattr lremovexattr".split()
)
OP_GROUPS: dict[str, frozenset[str]] = {
    "read": frozenset({"open:read", "lstat", "readlink", "statfs", "lgetxattr", "llistxattr", "getversion"}),
    "write": frozenset({"open:write", *_WRITE_OPS}),
    "create": frozenset({"create", "mknod", "mkdir", "symlink", "link", "rename"}),
    "delete": frozenset({"remove", "rename"}),
    "attr": frozenset({"chmod", "chown", "truncate", "utime"}),
    "xattr": frozenset({"lgetxattr", "llistxattr", "lsetxattr", "lremovexattr"}),
    "all": frozenset({"open:read", "open:write", *(n for n in OPS_BY_NAME if n != "open")}),
}

XATTR_FLAG_NAMES = {1: "XATTR_CREATE", 2: "XATTR_REPLACE"}


def xattr_flag_names(flags: int) -> list[str]:
    names = [name for bit, name in XATTR_FLAG_NAMES.items() if flags & bit]
    if flags & ~3:
        names.append(hex(flags & ~3 & 0xFFFFFFFF))
    return names


def mode_text(mode: int) -> str:
    """Octal text with a leading zero, as people write modes: 0644, 04755, 020644 (a char device)."""
    return "0" + format(mode & 0xFFFFFFFF, "o")


def parse_mode(text: str | int) -> int:
    if isinstance(text, int):
        return text
    return int(text, 8)


FILE_TYPES: dict[str, int] = {
    "reg": stat.S_IFREG,
    "dir": stat.S_IFDIR,
    "lnk": stat.S_IFLNK,
    "chr": stat.S_IFCHR,
    "blk": stat.S_IFBLK,
    "fifo": stat.S_IFIFO,
    "sock": stat.S_IFSOCK,
}
FILE_TYPE_NAMES = {v: k for k, v in FILE_TYPES.items()}


def file_type_name(mode: int) -> str | None:
    return FILE_TYPE_NAMES.get(stat.S_IFMT(mode))


def errno_name(code: int) -> str:
    return errno.errorcode.get(code, str(code))


def errno_from_name(name: str | int) -> int:
    if isinstance(name, int):
        return name
    value = getattr(errno, name.upper(), None)
    if not isinstance(value, int):
        raise ValueError(f"unknown errno {name!r}")
    return value
