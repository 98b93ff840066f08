"""Landlock: file access only beneath the export (everything), the audit log's directory (append and
create for rotation) and the policy file's directory (read). A second wall behind openat2 and chroot:
even a bug that opened a path by hand could not reach anything else.

The ABI is probed and the handled rights degrade to what the kernel knows; without Landlock at all the
state says so and serving goes on (the other walls stand)."""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

_libc = ctypes.CDLL("libc.so.6", use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long

SYS_CREATE_RULESET = 444
SYS_ADD_RULE = 445
SYS_RESTRICT_SELF = 446
CREATE_RULESET_VERSION = 1
RULE_PATH_BENEATH = 1

EXECUTE = 1 << 0
WRITE_FILE = 1 << 1
READ_FILE = 1 << 2
READ_DIR = 1 << 3
REMOVE_DIR = 1 << 4
REMOVE_FILE = 1 << 5
MAKE_CHAR = 1 << 6
MAKE_DIR = 1 << 7
MAKE_REG = 1 << 8
MAKE_SOCK = 1 << 9
MAKE_FIFO = 1 << 10
MAKE_BLOCK = 1 << 11
MAKE_SYM = 1 << 12
REFER = 1 << 13  # ABI 2
TRUNCATE = 1 << 14  # ABI 3
IOCTL_DEV = 1 << 15  # ABI 5

_ABI_RIGHTS = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 4: (1 << 15) - 1}


def rights_for(abi: int) -> int:
    return _ABI_RIGHTS.get(abi, (1 << 16) - 1)


class _RulesetAttr(ctypes.Structure):
    _fields_ = (("handled_access_fs", ctypes.c_uint64),)


class _PathBeneath(ctypes.Structure):
    _pack_ = 1  # the kernel's struct landlock_path_beneath_attr is packed
    _fields_ = (("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32))


def abi_version() -> int:
    """0 when the kernel has no Landlock (or it is disabled)."""
    v = _syscall(
        ctypes.c_long(SYS_CREATE_RULESET), None, ctypes.c_size_t(0), ctypes.c_uint32(CREATE_RULESET_VERSION)
    )
    return int(v) if v > 0 else 0


@dataclass
class Grant:
    fd: int  # an O_PATH fd of a directory or file, opened before any chroot
    access: int  # rights beneath it (masked to what the ABI handles)
    label: str


def restrict(grants: list[Grant]) -> int:
    """Apply a ruleset that handles every right the kernel knows and allows only grants. Returns the ABI
    used (0: Landlock unavailable, nothing applied). Needs no_new_privs first."""
    abi = abi_version()
    if abi <= 0:
        return 0
    handled = rights_for(abi)
    attr = _RulesetAttr(handled)
    ruleset = _syscall(
        ctypes.c_long(SYS_CREATE_RULESET),
        ctypes.byref(attr),
        ctypes.c_size_t(ctypes.sizeof(attr)),
        ctypes.c_uint32(0),
    )
    if ruleset < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"landlock_create_ruleset: {os.strerror(err)}")
    try:
        for grant in grants:
            rule = _PathBeneath(grant.access & handled, grant.fd)
            if (
                _syscall(
                    ctypes.c_long(SYS_ADD_RULE),
                    ctypes.c_int(ruleset),
                    ctypes.c_int(RULE_PATH_BENEATH),
                    ctypes.byref(rule),
                    ctypes.c_uint32(0),
                )
                != 0
            ):
                err = ctypes.get_errno()
                raise OSError(err, f"landlock_add_rule({grant.label}): {os.strerror(err)}")
        if _syscall(ctypes.c_long(SYS_RESTRICT_SELF), ctypes.c_int(ruleset), ctypes.c_uint32(0)) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"landlock_restrict_self: {os.strerror(err)}")
    finally:
        os.close(ruleset)
    return abi


# Rights on a file (not a directory) are limited to these by the kernel.
FILE_RIGHTS = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV
EVERYTHING = (1 << 16) - 1
AUDIT_DIR = WRITE_FILE | MAKE_REG | READ_FILE | TRUNCATE  # append and create the rotated-to file
READ_ONLY = READ_FILE | READ_DIR
