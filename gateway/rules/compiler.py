"""Rules compiled into per-op indexes, so that deciding a request looks at a handful of rules, not all.

For each op slot (a request type; OPEN split into read and write) the compiler builds a trie keyed by path
components. A rule sits at the node of its pattern's literal prefix (``/home/alice/**`` at home -> alice),
once per pattern; rules without ``paths`` or with a pattern that starts with a wildcard sit at the root.
Deciding walks the request path down the trie and meets only the rules whose prefix is a prefix of the
path: the cost grows with the path's depth and the rules that really compete for it, not with the policy.

At each slot, every condition is specialised: a condition on a field the request type does not carry is
settled at compile time (a ``when`` that can never hold removes the rule from that slot; an ``unless``
that can never hold is dropped), and the survivors become small closures over the request.
"""

from __future__ import annotations

import stat
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from operator import attrgetter
from typing import Any

from gateway import names
from gateway.paths import normalise
from gateway.protocol import RequestType as RT
from gateway.rules import aliases, model
from gateway.rules.model import Conditions, Decision, ObjectAttrs, ObjectConditions, Rule

Test = Callable[[Any], bool]


@dataclass(frozen=True)
class Cond:
    """One compiled condition: ``test`` takes the request (or, for object conditions, an ObjectAttrs)."""

    key: str
    text: str  # what the condition demands, in words: "uid in 1000-59999"
    test: Test
    actual: Callable[[Any], str]  # what the request (object) has, for explanations


_NEVER = object()  # a condition that cannot hold at this slot


def ranges_text(ranges: tuple[tuple[int, int], ...]) -> str:
    return ", ".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in ranges)


def _in_ranges(ranges: tuple[tuple[int, int], ...]) -> Callable[[int | None], bool]:
    if all(lo == hi for lo, hi in ranges):
        ids = frozenset(lo for lo, _ in ranges)
        return lambda v: v in ids
    if len(ranges) == 1:
        lo, hi = ranges[0]
        return lambda v: v is not None and lo <= v <= hi
    return lambda v: v is not None and any(lo <= v <= hi for lo, hi in ranges)


def _bits_text(mask: int) -> str:
    words = [name for name, bit in model.MODE_BITS.items() if mask & bit == bit]
    return ", ".join(words) if words else "0"


def _types_text(types: frozenset[int]) -> str:
    return ", ".join(sorted(names.FILE_TYPE_NAMES.get(t, str(t)) for t in types))


def _mode_conds(prefix: str, c: Any, get: Callable[[Any], int | None]) -> list[Cond]:
    """mode_any / mode_all / mode_none on a mode read by ``get`` (None when unknown)."""
    out = []
    show: Callable[[Any], str] = lambda x: "unknown" if get(x) is None else names.mode_text(get(x) & 0o7777)  # noqa: E731
    if c.mode_any is not None:
        m = c.mode_any
        out.append(Cond(prefix + "mode_any", f"{prefix}mode has any of {_bits_text(m)}",
                        lambda x: (v := get(x)) is not None and bool(v & m), show))
    if c.mode_all is not None:
        m2 = c.mode_all
        out.append(Cond(prefix + "mode_all", f"{prefix}mode has all of {_bits_text(m2)}",
                        lambda x: (v := get(x)) is not None and v & m2 == m2, show))
    if c.mode_none is not None:
        m3 = c.mode_none
        out.append(Cond(prefix + "mode_none", f"{prefix}mode has none of {_bits_text(m3)}",
                        lambda x: (v := get(x)) is not None and not v & m3, show))
    return out


def object_conds(o: ObjectConditions | None) -> list[Cond]:
    if o is None:
        return []
    out = []
    # `owner: self`, `group: self`: tested on model.SelfBound (the object with the request's ids beside it,
    # bound by the view); where the request has no ids the rule never gets here (request_conds).
    if o.owner_self:
        out.append(Cond("object.owner", "object owner is the request's uid",
                        lambda a: a.owner is not None and a.owner == getattr(a, "self_uid", None),
                        lambda a: f"{a.owner if a.owner is not None else 'unknown'} (uid "
                                  f"{getattr(a, 'self_uid', None)})"))
    if o.group_self:
        out.append(Cond("object.group", "object group is the request's gid",
                        lambda a: a.group is not None and a.group == getattr(a, "self_gid", None),
                        lambda a: f"{a.group if a.group is not None else 'unknown'} (gid "
                                  f"{getattr(a, 'self_gid', None)})"))
    if o.owner is not None:
        f = _in_ranges(o.owner)
        out.append(Cond("object.owner", f"object owner in {ranges_text(o.owner)}", lambda a: f(a.owner),
                        lambda a: str(a.owner) if a.owner is not None else "unknown"))
    if o.group is not None:
        g = _in_ranges(o.group)
        out.append(Cond("object.group", f"object group in {ranges_text(o.group)}", lambda a: g(a.group),
                        lambda a: str(a.group) if a.group is not None else "unknown"))
    if o.type is not None:
        ts = o.type
        out.append(Cond("object.type", f"object type is {_types_text(ts)}", lambda a: a.type in ts,
                        lambda a: names.FILE_TYPE_NAMES.get(a.type, "unknown")))
    out += _mode_conds("object.", o, attrgetter("mode"))
    return out


def _flag_conds(c: Conditions, slot: int) -> list[Cond] | object:
    xattr_slot = slot == int(RT.LSETXATTR)
    show: Callable[[Any], str] = lambda r: "|".join(  # noqa: E731
        names.xattr_flag_names(r.flags) if xattr_slot else names.open_flag_names(r.flags)) or "0"
    out = []
    if c.flags_any is not None:
        tests = tuple((t.mask, t.value) for t in c.flags_any if t.xattr == xattr_slot)
        if not tests:
            return _NEVER
        words = ", ".join(t.name for t in c.flags_any)
        out.append(Cond("flags_any", f"flags have any of {words}",
                        lambda r: any(r.flags & m == v for m, v in tests), show))
    if c.flags_all is not None:
        if any(t.xattr != xattr_slot for t in c.flags_all):
            return _NEVER
        tests2 = tuple((t.mask, t.value) for t in c.flags_all)
        words = ", ".join(t.name for t in c.flags_all)
        out.append(Cond("flags_all", f"flags have all of {words}",
                        lambda r: all(r.flags & m == v for m, v in tests2), show))
    if c.flags_none is not None:
        tests3 = tuple((t.mask, t.value) for t in c.flags_none if t.xattr == xattr_slot)
        words = ", ".join(t.name for t in c.flags_none)
        if tests3:
            out.append(Cond("flags_none", f"flags have none of {words}",
                            lambda r: not any(r.flags & m == v for m, v in tests3), show))
    return out


def _text(attr: str) -> Callable[[Any], str]:
    return lambda r: getattr(r, attr).decode("utf-8", "surrogateescape")


def resolve_target(link_path: str, target: str) -> str:
    """Where a symlink's target points inside the export, resolved lexically from the link's directory."""
    return normalise(target if target.startswith("/") else link_path.rsplit("/", 1)[0] + "/" + target)


def _target_conds(c: Conditions) -> list[Cond]:
    tgt = _text("target")
    out = []
    if c.target is not None:
        m = c.target.fullmatch
        out.append(Cond("target", f"target matches {', '.join(c.target.patterns)}",
                        lambda r: m(tgt(r)) is not None, tgt))
    if c.target_except is not None:
        mx = c.target_except.fullmatch
        out.append(Cond("target_except", f"target matches none of {', '.join(c.target_except.patterns)}",
                        lambda r: mx(tgt(r)) is None, tgt))
    if c.target_resolved is not None:
        mr = c.target_resolved.fullmatch
        where: Callable[[Any], str] = lambda r: resolve_target(model_path(r.path), tgt(r))  # noqa: E731
        out.append(Cond("target_resolved", f"target resolves into {', '.join(c.target_resolved.patterns)}",
                        lambda r: mr(where(r)) is not None, where))
    if c.target_absolute is not None:
        want = c.target_absolute
        out.append(Cond("target_absolute", "target is absolute" if want else "target is relative",
                        lambda r: r.target.startswith(b"/") == want, tgt))
    if c.target_dotdot is not None:
        want2 = c.target_dotdot
        out.append(Cond("target_dotdot", "target has a '..'" if want2 else "target has no '..'",
                        lambda r: (b".." in r.target.split(b"/")) == want2, tgt))
    return out


def model_path(raw: bytes) -> str:
    """Lexically normalise a request path: decode, collapse // and ., resolve .., clamp at /."""
    path = raw.decode("utf-8", "surrogateescape")
    # The fast case (already normal) costs a few substring scans; the engine calls this on every request.
    # "/." alone would send every dot file (/home/a/.git) down the slow road, so look closer first.
    if path[:1] == "/" and "//" not in path and path[-1:] != "/":
        if "/." not in path:
            return path
        if "/./" not in path and "/../" not in path and not path.endswith(("/.", "/..")):
            return path
    return normalise(path)


def request_conds(c: Conditions, slot: int) -> list[Cond] | None:
    """The cheap (request-only) conditions of a block at one slot; None when the block cannot hold."""
    out: list[Cond] = []
    for key in c.given():
        if key != "object" and slot not in model.FIELD_SLOTS[key]:
            return None
    if c.object is not None and c.object.selfref and slot not in model.ID_SLOTS:
        return None  # `owner: self` where the request says no uid: unknown, so it does not hold
    for attr in ("uid", "gid"):
        ranges = getattr(c, attr)
        if ranges is not None:
            f = _in_ranges(ranges)
            get = attrgetter(attr)
            out.append(Cond(attr, f"{attr} in {ranges_text(ranges)}", lambda r, f=f, get=get: f(get(r)),
                            lambda r, get=get: str(get(r))))
    out += _mode_conds("", c, attrgetter("mode"))
    if c.type is not None and slot != int(RT.CHMOD):  # CHMOD: the object's type (object_type_cond)
        types = c.type
        fixed = {int(RT.CREATE): stat.S_IFREG, int(RT.MKDIR): stat.S_IFDIR, int(RT.SYMLINK): stat.S_IFLNK}
        if slot in fixed:
            if fixed[slot] not in types:  # settled now: a CREATE always makes a regular file
                return None
        else:
            # MKNOD carries the type in its mode (0 means a regular file, as mknod(2) says).
            ftype: Callable[[Any], int] = lambda r: r.mode & 0o170000 or stat.S_IFREG  # noqa: E731
            out.append(Cond("type", f"type is {_types_text(types)}", lambda r: ftype(r) in types,
                            lambda r: names.FILE_TYPE_NAMES.get(ftype(r), "unknown")))
    flags = _flag_conds(c, slot)
    if flags is _NEVER:
        return None
    out += flags  # type: ignore[arg-type]
    out += _target_conds(c)
    if c.length_min is not None:
        lo = c.length_min
        out.append(Cond("length_min", f"length >= {lo}", lambda r: r.length >= lo, lambda r: str(r.length)))
    if c.length_max is not None:
        hi = c.length_max
        out.append(Cond("length_max", f"length <= {hi}", lambda r: r.length <= hi, lambda r: str(r.length)))
    name = _text("name")
    if c.xattr is not None:
        mx = c.xattr.fullmatch
        out.append(Cond("xattr", f"xattr name matches {', '.join(c.xattr.patterns)}",
                        lambda r: mx(name(r)) is not None, name))
    if c.xattr_except is not None:
        mxe = c.xattr_except.fullmatch
        out.append(Cond("xattr_except", f"xattr name matches none of {', '.join(c.xattr_except.patterns)}",
                        lambda r: mxe(name(r)) is None, name))
    return out


def object_type_cond(c: Conditions | None, slot: int) -> list[Cond]:
    """``type`` on CHMOD reads the object's own type: a chmod's mode bits say nothing about what they
    are applied to, and a guest could send any type bits it likes."""
    if c is None or c.type is None or slot != int(RT.CHMOD):
        return []
    types = c.type
    return [Cond("type", f"type is {_types_text(types)}", lambda a: a.type in types,
                 lambda a: names.FILE_TYPE_NAMES.get(a.type, "unknown"))]


def all_of(conds: list[Cond]) -> Test | None:
    """One callable testing every condition (None when there are none: the caller skips the call)."""
    tests = tuple(c.test for c in conds)
    if not tests:
        return None
    if len(tests) == 1:
        return tests[0]
    if len(tests) == 2:
        a, b = tests
        return lambda x: a(x) and b(x)
    return lambda x: all(t(x) for t in tests)


class View:
    """A rule as compiled for one slot. ``pre``/``res`` exist only for rules that read the object."""

    __slots__ = (
        "always",
        "chk",
        "deny",
        "enforce",
        "ex",
        "id",
        "obj",
        "otpl",
        "pre",
        "prio",
        "res",
        "rule",
        "selfref",
        "solo",
        "tpl",
        "unless",
        "unless_obj",
        "when",
        "when_obj",
    )

    def __init__(self, rule: Rule, prio: int, when: list[Cond], unless: list[Cond] | None,
                 when_obj: list[Cond], unless_obj: list[Cond], enforce: bool,
                 tpl: Callable[..., bool] | None = None, otpl: Callable[..., bool] | None = None) -> None:
        self.rule = rule
        # ${uid}/${gid} in paths: (path, request) -> whether the patterns with the request's ids hold;
        # ${owner}/${group}: (path, request, object), tested once the object is known (the engine's _settle)
        self.tpl = tpl
        self.otpl = otpl
        self.id = rule.id
        self.deny = rule.deny
        self.always = rule.always
        self.prio = prio
        self.ex = rule.except_.fullmatch if rule.except_ is not None else None
        # Tuples: most are empty, and the empty tuple is one object.
        self.when, self.when_obj, self.unless_obj = tuple(when), tuple(when_obj), tuple(unless_obj)
        self.unless = tuple(unless) if unless is not None else None
        # The decision when this rule is the only one that matched: made when first needed (decision()),
        # since most rules of a large policy never decide a request (10,000 of them: 2.3 MB).
        self.solo: Decision | None = None
        self.enforce = enforce
        w = all_of(when)
        u = all_of(unless) if unless is not None else None
        self.obj = bool(when_obj or (unless is not None and unless_obj) or otpl is not None)
        self.selfref = False
        if not self.obj:
            # chk: None (always holds) or one call covering `when` and `not unless`
            if unless is None:
                self.chk = w
            elif w is None:
                self.chk = lambda r: not u(r)  # type: ignore[misc]
            else:
                self.chk = lambda r: w(r) and not u(r)  # type: ignore[misc]
            self.pre = self.res = None
            return
        self.chk = None
        wo = all_of(when_obj)
        uo = all_of(unless_obj)
        has_unless = unless is not None
        certain = otpl is None  # with ${owner} in paths nothing holds whatever the object

        def pre(r: Any) -> int:
            """0: cannot match; 1: matches whatever the object; 2: depends on the object."""
            if w is not None and not w(r):
                return 0
            unless_open = has_unless and (u is None or u(r))
            if unless_open and uo is None:
                return 0
            if wo is None and not unless_open and certain:
                return 1
            return 2

        def res(r: Any, o: ObjectAttrs) -> bool:
            if wo is not None and not wo(o):
                return False
            return not (has_unless and (u is None or u(r)) and (uo is None or uo(o)))

        self.selfref = _selfref(rule)
        if self.selfref:
            plain = res

            def res(r: Any, o: ObjectAttrs) -> bool:
                return plain(r, model.bind_self(o, r))

        self.pre, self.res = pre, res

    def decision(self) -> Decision:
        """The decision when this rule is the only one that matched (``solo``, made at first use)."""
        d = self.solo
        if d is None:
            d = self.solo = rule_decision(self.rule, self.enforce)
        return d


def _selfref(rule: Rule) -> bool:
    return any(c is not None and c.object is not None and c.object.selfref for c in (rule.when, rule.unless))


def substitute(pattern: str, uid: int | None, gid: int | None, owner: int | None = None,
               group: int | None = None) -> str:
    """A pattern with ${uid}, ${gid}, ${owner} and ${group} replaced by their values (globs.py has no
    `$`-syntax: the digits are literal; an unknown value is "None", which no id component matches)."""
    for name, value in (("uid", uid), ("gid", gid), ("owner", owner), ("group", group)):
        pattern = pattern.replace("${" + name + "}", str(value))
    return pattern


def template_vars(rule: Rule) -> tuple[bool, bool]:
    """Whether the rule's patterns use the request's ids (${uid}, ${gid}), the object's (${owner},
    ${group})."""
    text = " ".join((*(rule.paths_tpl or ()), *(rule.except_tpl or ())))
    return ("${uid}" in text or "${gid}" in text), ("${owner}" in text or "${group}" in text)


def template_test(rule: Rule, with_except: bool = True) -> Callable[..., bool]:
    """(path, request[, object]) -> True when the path matches the rule's ``paths`` and none of its
    templated ``except`` patterns, the variables being the request's ids and the object's. Each set of
    values compiles once."""
    from gateway.rules.globs import GlobSet

    paths_tpl, except_tpl = rule.paths_tpl, rule.except_tpl if with_except else None
    cache: dict[tuple[Any, ...], tuple[Any, Any]] = {}

    def test(path: str, r: Any, o: Any = None) -> bool:
        key = (getattr(r, "uid", None), getattr(r, "gid", None), getattr(o, "owner", None),
               getattr(o, "group", None))
        hit = cache.get(key)
        if hit is None:
            if len(cache) >= 1024:
                cache.clear()
            hit = cache[key] = tuple(  # type: ignore[assignment]
                GlobSet.compile([substitute(p, *key) for p in pats]).fullmatch if pats else None
                for pats in (paths_tpl, except_tpl)
            )
        m, ex = hit
        if m is not None and m(path) is None:
            return False
        return ex is None or ex(path) is None

    return test


Record = tuple[tuple[tuple["View", Any], ...], tuple[tuple["View", Any], ...]]
# A rule's view as placed: (view, [(node key, exact, matcher)], its index entries (view, matcher))
Placed = tuple["View", list[tuple[str, bool, Any]], tuple[tuple["View", Any], ...]]
Index = dict[str, Record]
_NO_RECORD: Record = ((), ())  # a node with nothing placed at it, only below it


def node_key(prefix: tuple[str, ...]) -> str:
    """A trie node's key in an Index: its literal prefix as a path ("" is the root, then "/home",
    "/home/alice"). Components never hold "/", so keys and prefixes are one to one, and the request path's
    own prefixes ("/home", "/home/alice", ...) are the keys a walk looks up."""
    return "/" + "/".join(prefix) if prefix else ""


class _IndexBuilder:
    """Index tries (one per distinct set of views: most op slots share theirs) as flat dicts, the node's
    path -> (entries, exact), with every ancestor of a node present (the walk stops at the first missing
    one, as it stopped at a missing kid). Equal keys, entry tuples and records are shared between them."""

    def __init__(self) -> None:
        self.keys: dict[str, str] = {"": ""}
        # Keyed by themselves: a tuple's hash and == go to its items, and views compare by identity.
        self.tuples: dict[tuple[tuple[View, Any], ...], tuple[tuple[View, Any], ...]] = {}
        self.records: dict[Record, Record] = {}

    def key(self, prefix: tuple[str, ...]) -> str:
        k = node_key(prefix)
        return self.keys.setdefault(k, k)

    def _shared(self, items: list[tuple[View, Any]]) -> tuple[tuple[View, Any], ...]:
        if not items:
            return ()
        t = tuple(items)
        return self.tuples.setdefault(t, t)

    def build(self, placed: list[Placed]) -> Index:
        """An Index from (view, its spots [(node key, exact, matcher)], its entries) in rule order."""
        entries: dict[str, list[tuple[View, Any]]] = {"": []}
        exact: dict[str, list[tuple[View, Any]]] = {}
        for _view, spots, items in placed:
            for (key, is_exact, _m), item in zip(spots, items, strict=True):
                if key not in entries:
                    entries[key] = []
                    parent = key
                    while True:  # every ancestor present, so that a walk reaches this node
                        parent = parent[: parent.rindex("/")]
                        parent = self.keys.setdefault(parent, parent)
                        if parent in entries:
                            break
                        entries[parent] = []
                (exact.setdefault(key, []) if is_exact else entries[key]).append(item)
        index: Index = {}
        for key, items in entries.items():
            # Subtree entries (no regex to run) first, as the trie's freeze() ordered them.
            ordered = sorted(items, key=lambda e: e[1] is not None)
            here = self._shared(ordered)
            ex = self._shared(exact.get(key, []))
            if not here and not ex:
                index[key] = _NO_RECORD
                continue
            rec = (here, ex)
            index[key] = self.records.setdefault(rec, rec)
        return index


class ViewMap(Mapping[tuple[str, int], "View"]):
    """(rule id, slot) -> the rule's view at that slot, for explanations and lint. A rule whose
    conditions read no slot-dependent field has one view for every slot (the common case): stored alone
    when it is live at all of the rule's slots, else with the slots it is live at."""

    __slots__ = ("_by_rule",)

    def __init__(self) -> None:
        self._by_rule: dict[str, View | tuple[frozenset[int], View] | dict[int, View]] = {}

    def add(self, rule_id: str, live: dict[int, View], all_slots: frozenset[int]) -> None:
        if not live:
            return
        first = next(iter(live.values()))
        if all(v is first for v in live.values()):
            self._by_rule[rule_id] = first if len(live) == len(all_slots) else (frozenset(live), first)
        else:
            self._by_rule[rule_id] = live

    def _slots(self, found: Any) -> Any:
        if type(found) is View:
            return found.rule.slots
        return found[0] if type(found) is tuple else found

    def __getitem__(self, key: tuple[str, int]) -> View:
        rule_id, slot = key
        found = self._by_rule[rule_id]
        if type(found) is View:
            if slot in found.rule.slots:
                return found
            raise KeyError(key)
        if type(found) is tuple:
            if slot in found[0]:
                return found[1]
            raise KeyError(key)
        return found[slot]  # type: ignore[index]

    def __iter__(self) -> Iterator[tuple[str, int]]:
        for rule_id, found in self._by_rule.items():
            for slot in sorted(self._slots(found)):
                yield rule_id, slot

    def __len__(self) -> int:
        return sum(len(self._slots(f)) for f in self._by_rule.values())


@dataclass
class Compiled:
    roots: list[Index | None]  # indexed by slot; slots with the same rules share one Index
    views: ViewMap  # (rule id, slot) -> view, for explanations and lint
    default: Decision
    enforce: bool
    default_deny: bool
    ranks: dict[str, int]
    alias_roots: dict[int, aliases.AliasNode]  # deny rules with paths, per slot (gateway/rules/aliases.py)


def rule_decision(rule: Rule, enforce: bool) -> Decision:
    about = f": {rule.description}" if rule.description else ""
    if not rule.deny:
        return Decision("allow", "allow", True, rule.id, 0, (rule.id,), f"allowed by rule '{rule.id}'{about}")
    if enforce or rule.always:
        return Decision("deny", "deny", True, rule.id, rule.errno, (rule.id,),
                        f"denied by rule '{rule.id}'{about}")
    return Decision("deny", "would-deny", False, rule.id, rule.errno, (rule.id,),
                    f"would be denied by rule '{rule.id}'{about} (permissive: performed anyway)")


def default_decision(default: str, enforce: bool) -> Decision:
    import errno

    if default == "allow":
        return Decision("allow", "allow", True, None, 0, (), "no rule matched: default allow")
    if enforce:
        return Decision("deny", "deny", True, None, errno.EACCES, (), "no rule matched: default deny")
    return Decision("deny", "would-deny", False, None, errno.EACCES, (),
                    "no rule matched: default deny (permissive: performed anyway)")


_FIXED_TYPE = {int(RT.CREATE): stat.S_IFREG, int(RT.MKDIR): stat.S_IFDIR, int(RT.SYMLINK): stat.S_IFLNK}
_CHMOD = int(RT.CHMOD)
_LSETXATTR = int(RT.LSETXATTR)


def _slot_key(rule: Rule, slot: int) -> tuple[Any, ...] | None:
    """What the rule's compiled conditions at ``slot`` depend on (request_conds, object_type_cond): slots
    with equal keys get one shared view. None: nothing (a rule without conditions)."""
    w = rule.when.given()
    u = rule.unless.given() if rule.unless is not None else ()
    if not w and not u and not _templated(rule):
        return None
    return (slot == _CHMOD, _FIXED_TYPE.get(slot), slot == _LSETXATTR, slot in model.ID_SLOTS,
            tuple(slot in model.FIELD_SLOTS[k] for k in w if k != "object"),
            tuple(slot in model.FIELD_SLOTS[k] for k in u if k != "object"))


def _templated(rule: Rule) -> bool:
    return rule.paths_tpl is not None or rule.except_tpl is not None


def _view(rule: Rule, slot: int, prio: int, when_obj: list[Cond], unless_obj: list[Cond],
          enforce: bool) -> View | None:
    """The rule compiled for one slot, or None when it can never apply there."""
    when = request_conds(rule.when, slot)
    if when is None:
        return None  # a `when` condition reads a field this request type does not have
    tpl = otpl = None
    if _templated(rule):
        ids, objects = template_vars(rule)
        if ids and slot not in model.ID_SLOTS:
            if rule.paths_tpl is not None:
                return None  # ${uid} in paths where the request has no uid: no path matches
            # else: only `except` has them, and an exception on something unknown does not apply
        elif objects:
            otpl = template_test(rule)
        else:
            tpl = template_test(rule)
    unless = request_conds(rule.unless, slot) if rule.unless is not None else None
    unless_obj_here = unless_obj + object_type_cond(rule.unless, slot)
    if rule.unless is not None and unless is not None and not unless and not unless_obj_here:
        return None  # `unless` holds whatever the request: the rule can never apply here
    return View(rule, prio, when, unless, when_obj + object_type_cond(rule.when, slot),
                unless_obj_here if unless is not None else [], enforce, tpl, otpl)


def compile_rules(rules: tuple[Rule, ...], default: str, enforcement: str) -> Compiled:
    enforce = enforcement == "enforce"
    # Precedence among rules of one effect: never the file order. Under permissive enforcement a rule
    # that is always enforced comes first (it decides whether the request is really refused); then ids.
    ordered = sorted(rules, key=lambda r: (not (not enforce and r.always), r.id))
    ranks = {r.id: i for i, r in enumerate(ordered)}
    builder = _IndexBuilder()
    views = ViewMap()
    per_slot: dict[int, list[Placed]] = {}
    alias_views: dict[int, list[View]] = {}  # slot -> its deny views with paths, in rule order
    for rule in rules:
        when_obj = object_conds(rule.when.object)
        unless_obj = object_conds(rule.unless.object) if rule.unless else []
        # Where the rule's paths sit, computed once for all its slots: (node key, exact, matcher).
        spots = [("", False, None)] if rule.paths is None else [
            (builder.key(prefix), kind == "exact", match)
            for prefix, kind, match in rule.paths.index_entries()
        ]
        prio = ranks[rule.id]
        if not rule.when.given() and rule.unless is None and not _templated(rule):
            # No condition reads the request: one view, the same at every slot (the common case).
            view = View(rule, prio, [], None, when_obj, [], enforce)
            item = (view, spots, tuple((view, m) for _k, _exact, m in spots))
            for slot in rule.slots:
                per_slot.setdefault(slot, []).append(item)
            if rule.deny and rule.paths is not None:
                for slot in rule.slots & aliases.SLOTS:
                    alias_views.setdefault(slot, []).append(view)
            views.add(rule.id, dict.fromkeys(rule.slots, view), rule.slots)
            continue
        by_key: dict[Any, View | None] = {}
        placed: dict[int, Placed] = {}  # id(view) -> its item
        live: dict[int, View] = {}
        for slot in sorted(rule.slots):
            key = _slot_key(rule, slot)
            if key in by_key:
                view = by_key[key]
            else:
                view = by_key[key] = _view(rule, slot, prio, when_obj, unless_obj, enforce)
            if view is None:
                continue
            live[slot] = view
            item = placed.get(id(view))
            if item is None:
                item = placed[id(view)] = (view, spots, tuple((view, m) for _k, _exact, m in spots))
            per_slot.setdefault(slot, []).append(item)
            if rule.deny and rule.paths is not None and slot in aliases.SLOTS:
                alias_views.setdefault(slot, []).append(view)
        views.add(rule.id, live, rule.slots)
    roots: list[Index | None] = [None] * (max(model.SLOTS) + 1)
    shared: dict[tuple[View, ...], Index] = {}
    for slot, placed_here in per_slot.items():
        sig = tuple(v for v, _, _ in placed_here)  # views hash and compare by identity
        index = shared.get(sig)
        if index is None:
            index = shared[sig] = builder.build(placed_here)
        roots[slot] = index
    keys = builder.keys
    del per_slot, shared, builder  # some MB at 10,000 rules: gone before the alias tries add theirs
    return Compiled(roots, views, default_decision(default, enforce), enforce, default == "deny", ranks,
                    aliases.build(alias_views, keys))
