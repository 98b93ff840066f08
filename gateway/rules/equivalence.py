"""``gateway check OLD --same-as NEW``: do two policies decide alike? An enumeration, not a proof.

Cedar's symcc proves equivalence symbolically; this does what a gateway policy allows instead: it builds
every request *shape* the two policies' rules can tell apart and decides each under both. The values
come from the rules themselves:

* paths: for every glob of either policy (``paths`` and ``except``), instances of each brace alternative
  (``*`` as ``x`` and as nothing, ``**`` as nothing and as two components, ``?`` and ``[...]`` as a
  member), then for each instance a path below it, its parent and a sibling beside its literal prefix,
  and ``/`` and a path no rule names;
* ops: every request type, OPEN with each access mode and each flag a condition names (and the write
  flags), LSETXATTR with each flags word;
* uid and gid: the ends of every range a condition names and the ids just outside them (and 0, 1000);
* mode bits: 0644 and 0755, each bit a condition names added to 0644 and taken from 0777; MKNOD's file
  types; symlink targets, xattr names and truncate lengths likewise from their conditions;
* the object: unknown, and when a rule looks at it, each owner, group, type and mode drawn as above.

Two shapes differ when their outcome (allow, deny, would-deny) or errno differs; which rule decides is
not compared (a renamed rule decides alike). The bounds are printed with the result: the product is cut
at ``max_shapes`` (every op gets its share, paths varying fastest), and a difference that needs a value
no condition names (a glob's instance other than the ones above, an id inside a range but not at its
ends) can be missed. Rich-free; gateway/check_authoring.py shows it.
"""

from __future__ import annotations

import itertools
import os
import posixpath
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from typing import Any

from gateway import names
from gateway import protocol as p
from gateway.protocol import RequestType as RT
from gateway.rules.engine import decide
from gateway.rules.globs import GlobError, GlobSet, expand_braces
from gateway.rules.model import Conditions, ObjectAttrs, Policy

MAX_SHAPES = 1_000_000
MAX_PATHS = 400
_CLASS_PICKS = "ax0_Z~.-"
_REQUEST_CLASSES: dict[RT, type] = {
    c.__dataclass_fields__["type"].default: c  # type: ignore[attr-defined]
    for c in vars(p).values()
    if isinstance(c, type) and hasattr(c, "__dataclass_fields__") and "type" in c.__dataclass_fields__
    and isinstance(c.__dataclass_fields__["type"].default, RT)
}


@dataclass
class Difference:
    request: Any
    object: ObjectAttrs | None
    old: tuple[str, int, str | None]  # outcome, errno, deciding rule
    new: tuple[str, int, str | None]


@dataclass
class Comparison:
    shapes: int = 0
    differences: list[Difference] = field(default_factory=list)
    differing: int = 0  # all differing shapes, shown or not
    per_op: dict[str, tuple[int, int]] = field(default_factory=dict)  # op -> (decided, in the product)
    dims: dict[str, int] = field(default_factory=dict)  # how many values each dimension took
    # per op, how far the enumeration got: "singles" (cut while varying one dimension at a time),
    # "pairs" (every single done, cut among the pairs), "product" (every pair done, or all of it)
    phases: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what else differs (not decisions)

    @property
    def cut(self) -> bool:
        return any(done < total for done, total in self.per_op.values())


def _instances(pattern: str) -> list[str]:
    """A few paths the brace-free ``pattern`` matches (see the module's docstring)."""
    out = []
    for variant in (0, 1):
        parts = []
        for comp in pattern.split("/"):
            if comp == "**":
                parts.append("" if variant == 0 else "d1/d2")
                continue
            text, i = "", 0
            while i < len(comp):
                ch = comp[i]
                if ch == "\\" and i + 1 < len(comp):
                    text, i = text + comp[i + 1], i + 2
                    continue
                if ch == "*":
                    text += "x" if variant == 0 else ""
                elif ch == "?":
                    text += "q"
                elif ch == "[":
                    end = comp.find("]", i + 2)
                    cls = comp[i : end + 1] if end > 0 else "[a]"
                    text += next((c for c in _CLASS_PICKS if _matches(cls, c)), "a")
                    i = (end if end > 0 else i) + 1
                    continue
                else:
                    text += ch
                i += 1
            parts.append(text)
        path = "/".join(x for x in parts if x != "") if parts else ""
        out.append("/" + path.lstrip("/"))
    return out


def _matches(pattern: str, text: str) -> bool:
    try:
        return GlobSet.compile([pattern]).matches(text)
    except GlobError:
        return False


def _globs(policy: Policy) -> list[str]:
    return [g for r in policy.rules for s in (r.paths, r.except_) if s is not None for g in s.patterns]


def _conds(policy: Policy) -> list[Conditions]:
    return [c for r in policy.rules for c in (r.when, r.unless) if c is not None]


def sample_paths(policies: tuple[Policy, Policy]) -> list[str]:
    out: dict[str, None] = {"/": None, "/unnamed~": None}
    for policy in policies:
        for glob in _globs(policy):
            try:
                alternatives = expand_braces(glob)
            except GlobError:
                alternatives = [glob]
            for alt in alternatives:
                literal = alt.split("*")[0].split("?")[0].split("[")[0].rstrip("/")
                for inst in _instances(alt):
                    for path in (inst, posixpath.join(inst, "below"), posixpath.dirname(inst),
                                 (literal or "/sib") + "~"):
                        out[posixpath.normpath(path) if path.startswith("/") else "/" + path] = None
    return sorted(out)[:MAX_PATHS] if len(out) > MAX_PATHS else sorted(out)


def _ids(ranges: list[tuple[tuple[int, int], ...] | None]) -> list[int]:
    out = {0, 1000}
    for given in ranges:
        for lo, hi in given or ():
            out.update(x for x in (lo - 1, lo, hi, hi + 1) if 0 <= x < 2**32)
    return sorted(out)


def _values(policies: tuple[Policy, Policy]) -> dict[str, list[Any]]:
    conds = [c for pol in policies for c in _conds(pol)]
    objects = [c.object for c in conds if c.object is not None]
    bits = set()
    for c in [*conds, *objects]:
        for value in (c.mode_any, c.mode_all, c.mode_none):
            bits.update(1 << i for i in range(12) if value is not None and value >> i & 1)
    modes = sorted({0o644, 0o755, 0o777, 0} | {0o644 | b for b in bits} | {0o777 & ~b for b in bits})
    flags = {os.O_RDONLY, os.O_WRONLY, os.O_RDWR, os.O_WRONLY | os.O_TRUNC, os.O_WRONLY | os.O_APPEND,
             os.O_RDWR | os.O_CREAT, os.O_RDWR | os.O_CREAT | os.O_EXCL, os.O_RDONLY | os.O_NOFOLLOW}
    for c in conds:
        for tests in (c.flags_any, c.flags_all, c.flags_none):
            for f in tests or ():
                if not f.xattr:
                    flags.update({f.value, f.value | os.O_RDWR, f.value | os.O_WRONLY})
    uids = _ids([c.uid for c in conds])
    gids = _ids([c.gid for c in conds])
    targets = {b"x", b"/abs/x", b"../x", b"a/../../b"}
    xattrs = {b"user.x", b"security.x", b"trusted.x", b"system.posix_acl_access"}
    for c in conds:
        for globset, into in ((c.target, targets), (c.target_except, targets), (c.xattr, xattrs),
                              (c.xattr_except, xattrs)):
            for g in globset.patterns if globset is not None else ():
                for alt in expand_braces(g):
                    into.update(i.lstrip("/").encode() if not g.startswith("/") else i.encode()
                                for i in _instances(alt))
    lengths = {0, 1 << 20}
    for c in conds:
        for value in (c.length_min, c.length_max):
            if value is not None:
                lengths.update(x for x in (value - 1, value, value + 1) if x >= 0)
    found: dict[str, list[Any]] = {}
    if objects:  # None first: the base is "no object known", each attribute then drawn on its own
        named = sorted({t for o in objects for t in o.type or ()})
        types = [stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, *named]
        found = {"object_owner": [None, *_ids([o.owner for o in objects])],
                 "object_group": [None, *_ids([o.group for o in objects])],
                 "object_type": [None, *dict.fromkeys(types)], "object_mode": [None, *modes]}
    return {**found, "uid": uids, "gid": gids, "mode": modes, "flags": sorted(flags),
            "target": sorted(targets), "name": sorted(xattrs), "length": sorted(lengths),
            "xattr_flags": [0, 1, 2], "rdev": [0]}


_MKNOD_TYPES = (stat.S_IFREG, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK)
_OBJECT_DIMS = ("object_owner", "object_group", "object_type", "object_mode")


def _dims(rtype: RT, values: dict[str, list[Any]]) -> list[tuple[str, list[Any]]]:
    """The dimensions of one request type but its path, each with its values (the first is the base)."""
    cls = _REQUEST_CLASSES[rtype]
    dims: list[tuple[str, list[Any]]] = []
    for f in fields(cls):
        name = f.name
        if name in ("type", "path"):
            continue
        if name == "path2":
            dims.append((name, values["path2"]))
        elif name == "mode" and rtype is RT.MKNOD:
            dims.append((name, [t | m for t in _MKNOD_TYPES for m in values["mode"]]))
        elif name == "flags":
            dims.append((name, values["xattr_flags"] if rtype is RT.LSETXATTR else values["flags"]))
        elif name in values:
            dims.append((name, values[name]))
        else:
            dims.append((name, [0] if f.type == "int" else [b""]))
    dims += [(name, values[name]) for name in _OBJECT_DIMS if name in values]
    return dims


def _combos(dims: list[tuple[str, list[Any]]]) -> Iterator[tuple[str, tuple[Any, ...]]]:
    """(phase, values) without repeats: every value of each dimension with the others at their base,
    then every pair of values of every two dimensions (a 2-way covering set), then the whole product."""
    seen: set[tuple[Any, ...]] = set()
    base = [v[0] for _, v in dims]

    def fresh(combo: tuple[Any, ...]) -> bool:
        if combo in seen:
            return False
        seen.add(combo)
        return True

    for i, (_n, vals) in enumerate(dims):
        for v in vals:
            combo = (*base[:i], v, *base[i + 1 :])
            if fresh(combo):
                yield "singles", combo
    for i, j in itertools.combinations(range(len(dims)), 2):
        for a, b in itertools.product(dims[i][1], dims[j][1]):
            combo = list(base)
            combo[i], combo[j] = a, b
            if fresh(tuple(combo)):
                yield "pairs", tuple(combo)
    for combo in itertools.product(*(v for _, v in dims)):
        if fresh(combo):
            yield "product", combo


def _build(rtype: RT, keys: list[str], combo: tuple[Any, ...], path: bytes) -> tuple[Any, ObjectAttrs | None]:
    given = dict(zip(keys, combo, strict=True))
    attrs = {k[len("object_"):]: given.pop(k) for k in _OBJECT_DIMS if k in given}
    obj = ObjectAttrs(**attrs) if any(v is not None for v in attrs.values()) else None
    return _REQUEST_CLASSES[rtype](path=path, **given), obj


def compare(old: Policy, new: Policy, *, max_shapes: int = MAX_SHAPES, keep: int = 10) -> Comparison:
    result = Comparison()
    pair = (old, new)
    paths = sample_paths(pair)
    raw = [x.encode() for x in paths]
    values = {**_values(pair), "path2": raw}
    result.dims = {"paths": len(paths), **{k: len(v) for k, v in values.items() if k != "path2"}}
    planned = []
    for rtype in sorted(_REQUEST_CLASSES, key=int):
        dims = _dims(rtype, values)
        product = len(raw)
        for _n, vals in dims:
            product *= len(vals)
        planned.append((product, int(rtype), rtype, dims))
    # The smallest products first, each op getting an even share of what is left: what a small op
    # does not need goes to the larger ones.
    planned.sort()
    left = max_shapes
    for n, (product, _number, rtype, dims) in enumerate(planned):
        share = max(len(raw), left // (len(planned) - n))
        keys = [k for k, _ in dims]
        done, phase = 0, "singles"
        for phase, combo in _combos(dims):  # noqa: B007 - the last phase reached is reported
            if done + len(raw) > share:
                break
            for path in raw:
                request, obj = _build(rtype, keys, combo, path)
                done += 1

                def lookup(_path: str, o: ObjectAttrs | None = obj) -> ObjectAttrs | None:
                    return o

                a, b = decide(request, old, lookup), decide(request, new, lookup)
                if a.outcome != b.outcome or a.errno != b.errno:
                    result.differing += 1
                    if len(result.differences) < keep:
                        result.differences.append(Difference(request, obj, (a.outcome, a.errno, a.rule),
                                                             (b.outcome, b.errno, b.rule)))
        else:
            phase = "product"
        result.per_op[names.OP_NAMES[rtype]] = (done, product)
        result.phases[names.OP_NAMES[rtype]] = phase if done < product else "product"
        result.shapes += done
        left -= done
    result.per_op = dict(sorted(result.per_op.items(), key=lambda kv: int(names.OPS_BY_NAME[kv[0]])))
    for what in ("ids", "limits", "tenant"):
        if getattr(old, what) != getattr(new, what):
            result.notes.append(f"{what} differ (not a decision: not enumerated)")
    return result
