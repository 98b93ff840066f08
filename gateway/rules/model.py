"""The policy model: op slots and groups, condition values, rules, policies, decisions.

Everything here is plain data and small parsers shared by the schema (to validate), the compiler (to
build matchers) and the check command (to print). No I/O, no rich.
"""

from __future__ import annotations

import math
import re
import stat
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

from gateway import names
from gateway.protocol import RequestType as RT
from gateway.rules.idmap import IdMap as IdMap  # re-exported: part of the model, in a module of its own
from gateway.rules.idmap import IdRange as IdRange

if TYPE_CHECKING:
    from gateway.rules.compiler import Compiled
    from gateway.rules.globs import GlobSet

# --------------------------------------------------------------------------------------------------------
# Op slots. Rules are indexed per slot; a slot is a request type number, except that OPEN is split in two
# because an open for writing is a write (slot 1 is free: no request type has that number).

OPEN_WRITE = 1
OPEN_READ = int(RT.OPEN)
SLOTS: tuple[int, ...] = (OPEN_WRITE, *sorted(int(t) for t in RT))
SLOT_NAMES: dict[int, str] = {int(t): names.OP_NAMES[t] for t in RT}
SLOT_NAMES[OPEN_READ] = "open (read)"
SLOT_NAMES[OPEN_WRITE] = "open (write)"

OPEN_WRITE_FLAGS = names.OPEN_WRITE_FLAGS  # what makes an OPEN a write (names.py says why)


def _s(*types: RT) -> frozenset[int]:
    return frozenset(int(t) for t in types)


def _slot(op_class: str) -> int:
    if op_class == "open:read":
        return OPEN_READ
    if op_class == "open:write":
        return OPEN_WRITE
    return int(names.OPS_BY_NAME[op_class])


# The groups (names.OP_GROUPS, shared with `gateway audit --op`) as the engine's slots.
GROUPS: dict[str, frozenset[int]] = {
    group: frozenset(_slot(c) for c in classes) for group, classes in names.OP_GROUPS.items()
}
assert GROUPS["all"] == frozenset(SLOTS)


def op_slots(name: str) -> frozenset[int] | None:
    """Slots an ``ops`` entry stands for, or None when it names nothing.

    Lower case: a group or an op (``create`` is the group: CREATE, MKNOD, MKDIR, SYMLINK, LINK, RENAME).
    Upper case: exactly that request type (``CREATE`` is only CREATE; ``OPEN`` both kinds of open).
    """
    if name in GROUPS:
        return GROUPS[name]
    key = name.lower() if name.isupper() else name
    rtype = names.OPS_BY_NAME.get(key)
    if rtype is None:
        return None
    if rtype is RT.OPEN:
        return frozenset({OPEN_READ, OPEN_WRITE})
    return frozenset({int(rtype)})


OP_WORDS: tuple[str, ...] = (
    *GROUPS, *sorted(names.OPS_BY_NAME), *sorted(n.upper() for n in names.OPS_BY_NAME)
)

# Which slots carry the field a condition reads. A condition on a field the request does not have never
# holds (in `when` the rule does not apply; in `unless` the exception does not apply).
_CREATES = _s(RT.CREATE, RT.MKNOD, RT.MKDIR, RT.SYMLINK)
FIELD_SLOTS: dict[str, frozenset[int]] = {
    "uid": _CREATES | _s(RT.CHOWN),
    "gid": _CREATES | _s(RT.CHOWN),
    "mode_any": _s(RT.CREATE, RT.MKNOD, RT.MKDIR, RT.CHMOD),
    "mode_all": _s(RT.CREATE, RT.MKNOD, RT.MKDIR, RT.CHMOD),
    "mode_none": _s(RT.CREATE, RT.MKNOD, RT.MKDIR, RT.CHMOD),
    "type": _CREATES | _s(RT.CHMOD),
    "flags_any": _s(RT.CREATE, RT.LSETXATTR) | {OPEN_READ, OPEN_WRITE},
    "flags_all": _s(RT.CREATE, RT.LSETXATTR) | {OPEN_READ, OPEN_WRITE},
    "flags_none": _s(RT.CREATE, RT.LSETXATTR) | {OPEN_READ, OPEN_WRITE},
    "target": _s(RT.SYMLINK),
    "target_except": _s(RT.SYMLINK),
    "target_resolved": _s(RT.SYMLINK),
    "target_absolute": _s(RT.SYMLINK),
    "target_dotdot": _s(RT.SYMLINK),
    "length_min": _s(RT.TRUNCATE),
    "length_max": _s(RT.TRUNCATE),
    "xattr": _s(RT.LGETXATTR, RT.LSETXATTR, RT.LREMOVEXATTR),
    "xattr_except": _s(RT.LGETXATTR, RT.LSETXATTR, RT.LREMOVEXATTR),
    "object": frozenset(SLOTS),
}
# The slots whose requests carry a uid and a gid: where ${uid}, ${gid}, `owner: self` and `group: self`
# have a value (the owner a create gives the new object; CHOWN's new owner). Elsewhere they are unknown.
ID_SLOTS = FIELD_SLOTS["uid"]
assert FIELD_SLOTS["gid"] == ID_SLOTS
REQUEST_VARS = ("uid", "gid")
# ${owner} and ${group} in paths: the object's owner and group as the guest sees them (after `ids:`), so
# "/home/u${owner}/**" is "in the home of whoever owns the object"; they need the object looked up.
OBJECT_VARS = ("owner", "group")
PATH_VARS = REQUEST_VARS + OBJECT_VARS

TWO_PATH = frozenset({RT.RENAME, RT.LINK})

# --------------------------------------------------------------------------------------------------------
# Condition values.

MODE_BITS: dict[str, int] = {
    "setuid": 0o4000, "setgid": 0o2000, "sticky": 0o1000,
    "ur": 0o400, "uw": 0o200, "ux": 0o100,
    "gr": 0o040, "gw": 0o020, "gx": 0o010,
    "or": 0o004, "ow": 0o002, "ox": 0o001,
}
ID_MAX = 0xFFFFFFFF


def parse_id_range(value: object) -> tuple[int, int]:
    """``1000`` or ``"1000"`` or ``"1000-59999"`` -> (low, high); raises ValueError in words."""
    if isinstance(value, bool):
        raise ValueError("expected an id or a range such as 1000-59999, not true/false")
    if isinstance(value, int):
        lo = hi = value
    else:
        text = str(value).strip()
        lo_text, sep, hi_text = text.partition("-")
        try:
            lo = int(lo_text, 10)
            hi = int(hi_text, 10) if sep else lo
        except ValueError:
            raise ValueError(f"{text!r} is not an id or a range such as 1000-59999") from None
    if not (0 <= lo <= ID_MAX and 0 <= hi <= ID_MAX):
        raise ValueError(f"ids are between 0 and {ID_MAX}")
    if lo > hi:
        raise ValueError(f"range {lo}-{hi} is empty (the low end comes first)")
    return lo, hi


def parse_mode_bit(value: object) -> int:
    """A mode bit name (``setuid``, ``gw``) or octal text (``"04000"``, ``"0o022"``) -> bit mask."""
    if isinstance(value, bool):
        raise ValueError("expected a mode bit name or octal text, not true/false")
    if isinstance(value, int):
        if value > 7:  # YAML turns an unquoted 4000 into decimal: refuse to guess what was meant
            raise ValueError(f"write octal modes as quoted text with a leading 0 ('0{value}'), or by name")
        return value
    text = str(value).strip()
    if text in MODE_BITS:
        return MODE_BITS[text]
    digits = text[2:] if text[:2] in ("0o", "0O") else text
    if not digits or any(c not in "01234567" for c in digits):
        raise ValueError(f"unknown mode bit {text!r}")
    bits = int(digits, 8)
    if bits & ~0o7777:
        raise ValueError(f"{text!r} has bits outside 07777 (use `type` for the file type)")
    return bits


def parse_file_type(value: object) -> int:
    if not isinstance(value, str) or value not in names.FILE_TYPES:
        raise ValueError(f"unknown file type {value!r}")
    return names.FILE_TYPES[value]


FLAG_NAMES: tuple[str, ...] = (
    "O_RDONLY", "O_WRONLY", "O_RDWR", *names.OPEN_FLAG_BITS, "O_SYNC", "O_TMPFILE", "XATTR_CREATE",
    "XATTR_REPLACE",
)


class FlagTest(NamedTuple):
    """``flags & mask == value``; ``xattr`` says which flags word the name belongs to."""

    name: str
    mask: int
    value: int
    xattr: bool


def parse_flag(value: object) -> FlagTest:
    if not isinstance(value, str):
        raise ValueError(f"expected a flag name such as O_TRUNC, not {value!r}")
    name = value.strip().upper()
    if not name.startswith(("O_", "__O_", "XATTR_")):
        name = "O_" + name
    if name in ("O_RDONLY", "O_WRONLY", "O_RDWR"):  # access modes are a 2-bit field, not bits
        return FlagTest(name, 3, ("O_RDONLY", "O_WRONLY", "O_RDWR").index(name), False)
    if name in names.OPEN_FLAG_BITS:
        bit = names.OPEN_FLAG_BITS[name]
        return FlagTest(name, bit, bit, False)
    if name in ("O_SYNC", "O_TMPFILE"):
        bits = names.open_flags_from_names([name])
        return FlagTest(name, bits, bits, False)
    if name in ("XATTR_CREATE", "XATTR_REPLACE"):
        bit = 1 if name == "XATTR_CREATE" else 2
        return FlagTest(name, bit, bit, True)
    raise ValueError(f"unknown flag {value!r}")


# --------------------------------------------------------------------------------------------------------
# Rules.


@dataclass(frozen=True)
class ObjectConditions:
    """Conditions on the object as it is now (fetched through the lookup only when they matter)."""

    owner: tuple[tuple[int, int], ...] | None = None
    group: tuple[tuple[int, int], ...] | None = None
    type: frozenset[int] | None = None  # S_IF* values
    mode_any: int | None = None
    mode_all: int | None = None
    mode_none: int | None = None
    owner_self: bool = False  # `owner: self`: the object's owner is the request's uid
    group_self: bool = False  # `group: self`: the object's group is the request's gid

    @property
    def selfref(self) -> bool:
        return self.owner_self or self.group_self


@dataclass(frozen=True)
class Conditions:
    """The ``when`` (or ``unless``) block of a rule, parsed. None means "not given"."""

    uid: tuple[tuple[int, int], ...] | None = None
    gid: tuple[tuple[int, int], ...] | None = None
    mode_any: int | None = None
    mode_all: int | None = None
    mode_none: int | None = None
    type: frozenset[int] | None = None
    flags_any: tuple[FlagTest, ...] | None = None
    flags_all: tuple[FlagTest, ...] | None = None
    flags_none: tuple[FlagTest, ...] | None = None
    target: GlobSet | None = None
    target_except: GlobSet | None = None
    target_resolved: GlobSet | None = None
    target_absolute: bool | None = None
    target_dotdot: bool | None = None
    length_min: int | None = None
    length_max: int | None = None
    xattr: GlobSet | None = None
    xattr_except: GlobSet | None = None
    object: ObjectConditions | None = None

    def given(self) -> list[str]:
        """The condition names that are given, in declaration order (computed once: the compiler asks
        for every slot of every rule)."""
        cached = self.__dict__.get("_given")
        if cached is None:
            cached = [k for k in self.__dataclass_fields__ if getattr(self, k) is not None]
            object.__setattr__(self, "_given", cached)  # frozen, but this is a pure cache of the fields
        return cached


@dataclass(frozen=True, slots=True)
class Rule:
    id: str
    effect: str  # "allow" | "deny"
    ops: tuple[str, ...]  # as written
    slots: frozenset[int]
    paths: GlobSet | None  # None: every path
    except_: GlobSet | None
    errno: int  # for denials (EACCES unless the rule says otherwise); 0 for allow rules
    always: bool  # enforce: always (stays enforced under enforcement: permissive)
    description: str
    when: Conditions
    unless: Conditions | None
    line: int = 0
    index: int = 0  # position in the file: for messages only, never for deciding
    # ${uid}/${gid} in paths: every pattern of ``paths`` as written (``paths`` itself then holds each with
    # the variables as ``*``, its superset, for the index); the patterns of ``except`` that use them (left
    # out of ``except_``). None: no request variable there.
    paths_tpl: tuple[str, ...] | None = None
    except_tpl: tuple[str, ...] | None = None
    file: str = ""  # the included file the rule is in; "" for the policy's own file
    vars_text: str = ""  # the named variables its patterns used, for explanations: "${homes}=/home/*"

    @property
    def deny(self) -> bool:
        return self.effect == "deny"


@dataclass(frozen=True)
class ObjectAttrs:
    """An object's attributes as far as they are known; None is unknown (a condition on it fails).

    The engine accepts this or an ``os.stat_result`` from the lookup; ``gateway check`` builds these
    from ``owner=1000 type=reg`` in a request, so a check can state only what it cares about.
    """

    owner: int | None = None
    group: int | None = None
    type: int | None = None  # S_IF* value
    mode: int | None = None  # permission and special bits (07777)

    @classmethod
    def from_stat(cls, st: Any) -> ObjectAttrs:
        mode = st.st_mode
        return cls(st.st_uid, st.st_gid, stat.S_IFMT(mode), stat.S_IMODE(mode))


@dataclass(frozen=True)
class SelfBound(ObjectAttrs):
    """The object's attributes with the request's ids beside them, for `owner: self` / `group: self`."""

    self_uid: int | None = None
    self_gid: int | None = None


def bind_self(obj: ObjectAttrs, request: Any) -> SelfBound:
    return SelfBound(obj.owner, obj.group, obj.type, obj.mode, getattr(request, "uid", None),
                     getattr(request, "gid", None))


@dataclass(frozen=True)
class PolicyTest:
    """One entry of the policy's ``tests:`` section."""

    index: int
    line: int
    name: str
    request: Any  # a protocol Request
    object: ObjectAttrs | None
    expect: str  # allow | deny | would-deny
    rule: str | None
    rule_given: bool  # `rule:` present (null means "decided by default")
    errno: int | None
    text: str  # the request as a person reads it
    file: str = ""  # the included file the test is in; "" for the policy's own file


@dataclass(frozen=True)
class Problem:
    file: str
    line: int
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"


class PolicyError(Exception):
    """The policy is invalid; ``problems`` lists every problem found, ``str()`` one per line."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = sorted(problems, key=lambda p: (p.file, p.line))
        super().__init__("\n".join(str(p) for p in self.problems))


# --------------------------------------------------------------------------------------------------------
# Limits.

SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
SIZE_MAX = (1 << 64) - 1  # lengths are u64 on the wire
_SIZE_RE = re.compile(r"(\d+)\s*(?:([KMGTkmgt])(iB)?|(B))?")


def parse_size(value: object) -> int:
    """``1048576``, ``"512K"``, ``"10G"``, ``"1TiB"`` -> bytes (K M G T are powers of 1024)."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 10G, not true/false")
    if isinstance(value, int):
        size = value
    else:
        text = str(value).strip()
        match = _SIZE_RE.fullmatch(text)
        if match is None:
            hint = ""
            if re.fullmatch(r"\d+\s*[KMGTkmgt]B", text):  # 10GB: decimal or binary? Say it, do not guess.
                hint = f" (write {text[:-1]} or {text[:-1]}iB: sizes are binary, G is 1024^3)"
            raise ValueError(f"'{text}' is not a size such as 10G (a whole number, optionally with K, M, G "
                             f"or T: powers of 1024){hint}")
        size = int(match.group(1)) * SIZE_UNITS[(match.group(2) or "").upper()]
    if not 0 <= size <= SIZE_MAX:
        raise ValueError(f"sizes are between 0 and {SIZE_MAX}")
    return size


def format_size(size: int) -> str:
    """Bytes the way a person wrote them: 10 GiB when exact, else the number."""
    for unit in ("T", "G", "M", "K"):
        if size and size % SIZE_UNITS[unit] == 0:
            return f"{size // SIZE_UNITS[unit]} {unit}iB"
    return f"{size} bytes"


@dataclass(frozen=True)
class Limits:
    """The policy's ``limits:`` section; None is "no limit". Enforced by the server, not the rules: over
    the rate the guest is slowed down (never failed), a TRUNCATE past truncate_max is refused with EFBIG,
    and open_fds caps the fds the guest holds from OPEN/CREATE at once."""

    requests_per_second: float | None = None
    burst: int | None = None  # the requests allowed at once above the rate; defaults to a second's worth
    truncate_max: int | None = None  # bytes
    open_fds: int | None = None

    def __post_init__(self) -> None:
        rps = self.requests_per_second
        if rps is not None:
            if not (math.isfinite(rps) and rps > 0):
                raise ValueError("requests_per_second must be a positive number")
            object.__setattr__(self, "requests_per_second", float(rps))
            if self.burst is None:  # a second's worth, and at least one request (the bucket must hold one)
                object.__setattr__(self, "burst", max(1, math.ceil(rps)))
        for name in ("burst", "open_fds"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.truncate_max is not None and self.truncate_max < 0:
            raise ValueError("truncate_max must be at least 0")

    def given(self) -> list[str]:
        """The limits that are set, in declaration order."""
        return [k for k in self.__dataclass_fields__ if getattr(self, k) is not None]


@dataclass(frozen=True, eq=False)
class Policy:
    source: str
    hash: str  # sha256 of the file's bytes
    version: int
    tenant: str
    default: str  # allow | deny
    enforcement: str  # enforce | permissive
    rules: tuple[Rule, ...]
    tests: tuple[PolicyTest, ...]
    audit_path: str | None
    compiled: Compiled = field(repr=False)
    ids: IdMap | None = None  # None: no mapping, guest ids are host ids. The rules always see guest ids.
    limits: Limits = field(default_factory=Limits)  # always present; each limit None when not set
    vars: dict[str, str] = field(default_factory=dict)  # the named path variables (`vars:`), as defined
    includes: tuple[str, ...] = ()  # every file included, directly or not, as named from the policy's dir

    def rule(self, rule_id: str) -> Rule | None:
        for r in self.rules:
            if r.id == rule_id:
                return r
        return None


class RuleTrace(NamedTuple):
    """Why one rule did or did not take part in a decision (``decide(..., explain=True)``)."""

    rule: str
    role: str  # "path" or "path2"
    status: str  # "decides" | "matched" | "no-match" | "not-evaluated"
    detail: str


class Decision(NamedTuple):
    """The engine's answer. A tuple so that shared, precomputed decisions are safely immutable."""

    effect: str  # "allow" | "deny"
    outcome: str  # "allow" | "deny" | "would-deny"
    enforced: bool  # False when enforcement: permissive turned a deny into a would-deny
    rule: str | None  # the deciding rule's id; None when the default decided
    errno: int  # 0 for allow; the rule's (or EACCES for the default) otherwise, also for would-deny
    matched: tuple[str, ...]  # every rule known to match, deciding rule first
    reason: str
    explanation: tuple[RuleTrace, ...] | None = None
