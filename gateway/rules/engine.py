"""``decide``: a pure function of (request, policy, the object's current attributes) -> Decision.

Semantics (the model is Cedar's authorizer):

* A rule *matches* when the request's op is in its ``ops``, the path matches its ``paths`` and none of its
  ``except`` patterns, every ``when`` condition holds and not every ``unless`` condition holds.
* Deny overrides allow: any matching deny rule denies; otherwise any matching allow rule allows; otherwise
  ``default`` decides. Rule order never matters: when several rules of the deciding effect match, the one
  named is the first by (always-enforced first under permissive enforcement, then id).
* Two-path requests (RENAME, LINK) are decided on each path as if it were the request's only path, and
  are allowed only when both paths are (the deciding rule is the one that refused, or else the one that
  allowed). SYMLINK has one path, the new link; its target is a condition, not a path.
* ``enforcement: permissive`` turns a deny into a would-deny (performed anyway, recorded) unless the
  deciding rule says ``enforce: always``.
* Object conditions (owner, group, type, mode as they are now) need ``lookup(path)``: it is called at
  most once per request, on the object the request acts on (for RENAME and LINK the source, which is the
  object getting the new name), and only when some rule whose other conditions all matched could change
  the outcome (or, for a RENAME under a policy with deny rules on paths, always: whether it moves a
  directory decides how far its alias reaches). A missing object, or no lookup, leaves every object
  condition false.
* Aliases count (gateway/rules/aliases.py): a SYMLINK, RENAME or LINK is also denied by a deny rule on a
  path it would make the guest's data reachable at, or would take protected data away from.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gateway.protocol import RequestType as RT
from gateway.rules import model
from gateway.rules.aliases import alias_decision
from gateway.rules.compiler import Compiled, Index, View, model_path
from gateway.rules.model import Decision, ObjectAttrs, Policy, RuleTrace

Lookup = Callable[[str], Any]  # path -> os.stat_result | ObjectAttrs | None
UNKNOWN = ObjectAttrs()
_OPEN = RT.OPEN
_RENAME = RT.RENAME
_LINK = RT.LINK
_SYMLINK = RT.SYMLINK
_ALIASING = frozenset({RT.SYMLINK, RT.RENAME, RT.LINK})
_WRITE = model.OPEN_WRITE_FLAGS
_OPEN_WRITE = model.OPEN_WRITE


def slot_of(request: Any) -> int:
    t = request.type
    if t is _OPEN and request.flags & _WRITE:
        return _OPEN_WRITE
    return int(t)


def _scan(root: Index, path: str, req: Any, hits: list[View], pend: list[View]) -> None:
    """Collect the rules matching ``path`` at this slot: certain ones in hits, object-dependent in pend.

    The walk meets the node of each prefix of the path (``/home``, ``/home/alice``, ...) while there is
    one: its entries apply to the path and everything below; at the path's own node, its exact ones too."""
    rec = root[""]
    todo = []
    if path == "/":
        if rec[0]:
            todo.append(rec[0])
        if rec[1]:
            todo.append(rec[1])
    else:
        end = 0
        get = root.get
        while True:
            if rec[0]:
                todo.append(rec[0])
            end = path.find("/", end + 1)
            if end < 0:
                rec = get(path)
                if rec is not None:
                    if rec[0]:
                        todo.append(rec[0])
                    if rec[1]:
                        todo.append(rec[1])
                break
            rec = get(path[:end])
            if rec is None:
                break
    for entries in todo:
        for v, m in entries:
            if m is not None and m(path) is None:
                continue
            ex = v.ex
            if ex is not None and ex(path) is not None:
                continue
            tpl = v.tpl
            if tpl is not None and not tpl(path, req):
                continue
            if v.obj:
                state = v.pre(req)
                if state == 1:
                    hits.append(v)
                elif state == 2:
                    pend.append(v)
            else:
                chk = v.chk
                if chk is None or chk(req):
                    hits.append(v)


def _default_level(c: Compiled) -> int:
    return 2 if c.default_deny and c.enforce else (1 if c.default_deny else 0)


def _outcome(c: Compiled, hits: list[View]) -> tuple[int, View | None]:
    """Level (0 allow, 1 would-deny, 2 deny) and deciding view (None: the default) for one path."""
    best: View | None = None
    for v in hits:
        if v.deny:
            if best is None or not best.deny or v.prio < best.prio:
                best = v
        elif best is None or (not best.deny and v.prio < best.prio):
            best = v
    if best is None:
        return _default_level(c), None
    if best.deny:
        return (2 if c.enforce or best.always else 1), best
    return 0, best


def _prio(v: View) -> int:
    return v.prio


def _objectify(found: Any) -> ObjectAttrs:
    if found is None:
        return UNKNOWN
    if isinstance(found, ObjectAttrs):
        return found
    return ObjectAttrs.from_stat(found)


def decide(request: Any, policy: Policy, lookup: Lookup | None = None, *, explain: bool = False) -> Decision:
    """Decide one request. Pure: the same request, policy and object state give the same decision."""
    if explain:
        return explain_decision(request, policy, lookup)
    c = policy.compiled
    t = request.type
    root = c.roots[_OPEN_WRITE if t is _OPEN and request.flags & _WRITE else t]
    if root is None and not (c.alias_roots and t in _ALIASING):
        return c.default
    path = model_path(request.path)
    hits: list[View] = []
    pend: list[View] = []
    if root is not None:
        _scan(root, path, request, hits, pend)
    if t is _RENAME or t is _LINK:
        hits2: list[View] = []
        pend2: list[View] = []
        path2 = model_path(request.path2)
        if root is not None:
            _scan(root, path2, request, hits2, pend2)
        obj: ObjectAttrs | None = None
        if not pend and not pend2:
            decision = c.default if not hits and not hits2 else _final(c, [("path", hits), ("path2", hits2)])
        else:
            decision, obj = _settle(c, request, path, [("path", hits, pend), ("path2", hits2, pend2)], lookup)
        denial = _alias_worse(c, request, decision, path, path2, obj.type if obj is not None else None)
        if denial is not None and obj is None:
            # How far a rename's or link's alias reaches depends on what it names (a directory, a
            # symlink, a file): look it up, and let the pending rules see it too (so the decision names
            # every rule that matched).
            obj = _objectify(lookup(path)) if lookup is not None else UNKNOWN
            if pend or pend2:
                decision = _final(c, [
                    ("path", hits + [v for v in pend if _holds(v, request, obj, path)]),
                    ("path2", hits2 + [v for v in pend2 if _holds(v, request, obj, path2)]),
                ])
            if obj.type is not None:  # known now: the alias may reach less far than an unknown one
                denial = _alias_worse(c, request, decision, path, path2, obj.type)
        return _with_alias(decision, denial)
    if t is _SYMLINK:
        if not pend:
            decision = c.default if not hits else _final(c, [("path", hits)])
        else:
            decision = _settle(c, request, path, [("path", hits, pend)], lookup)[0]
        return _with_alias(decision, _alias_worse(c, request, decision, path, None, None))
    if not pend:  # the common case: no object conditions in play
        if not hits:
            return c.default
        if len(hits) == 1:
            return hits[0].solo or hits[0].decision()
        return _final(c, [("path", hits)])
    return _settle(c, request, path, [("path", hits, pend)], lookup)[0]


_LEVEL = {"allow": 0, "would-deny": 1, "deny": 2}


def _alias_worse(c: Compiled, request: Any, decision: Decision, path: str, path2: str | None,
                 source_type: int | None) -> Decision | None:
    """The deny an alias meets (gateway/rules/aliases.py), when it is worse than ``decision``."""
    if decision.outcome == "deny" or not c.alias_roots:
        return None
    denial = alias_decision(c, request, path, path2, source_type)
    if denial is None or _LEVEL[denial.outcome] <= _LEVEL[decision.outcome]:
        return None
    return denial


def _with_alias(decision: Decision, denial: Decision | None) -> Decision:
    """The ordinary decision, or the alias's deny (naming every rule that matched) when there is one."""
    if denial is None:
        return decision
    matched = (*denial.matched, *(m for m in decision.matched if m not in denial.matched))
    return denial._replace(matched=matched)


def _holds(v: View, req: Any, obj: ObjectAttrs, path: str) -> bool:
    """A pending rule, the object known: its object conditions, and ${owner}/${group} in its paths."""
    if not v.res(req, obj):
        return False
    otpl = v.otpl
    return otpl is None or bool(otpl(path, req, obj))


def _settle(c: Compiled, req: Any, path: str, paths: list[tuple[str, list[View], list[View]]],
            lookup: Lookup | None) -> tuple[Decision, ObjectAttrs | None]:
    """Resolve object-dependent rules if they could change the outcome, then decide."""
    obj: ObjectAttrs | None = None
    if any(pend for _, _, pend in paths):
        # The outcome is monotone: more matching denies can only raise it, more allows only lower it. So
        # the extremes (every pending deny matches / every pending allow matches) bound every possibility;
        # when they agree, the object cannot change the outcome and is not looked up.
        lo = max(_outcome(c, hits + [v for v in pend if not v.deny])[0] for _, hits, pend in paths)
        hi = max(_outcome(c, hits + [v for v in pend if v.deny])[0] for _, hits, pend in paths)
        if lo != hi:
            obj = _objectify(lookup(path)) if lookup is not None else UNKNOWN
            where = {"path": path, "path2": model_path(req.path2) if len(paths) > 1 else path}
            paths = [(role, hits + [v for v in pend if _holds(v, req, obj, where[role])], [])
                     for role, hits, pend in paths]
    return _final(c, [(role, hits) for role, hits, _ in paths]), obj


def _final(c: Compiled, paths: list[tuple[str, list[View]]]) -> Decision:
    level, best, role = -1, None, "path"
    seen: dict[str, View] = {}
    for r, hits in paths:
        lvl, v = _outcome(c, hits)
        if lvl > level or (lvl == level and v is not None and (best is None or v.prio < best.prio)):
            level, best, role = lvl, v, r
        for h in hits:
            seen[h.id] = h
    if best is not None and len(seen) == 1:
        return best.decision()
    others = [v for v in seen.values() if v is not best]
    if len(others) > 1:
        others.sort(key=_prio)
    matched = tuple(v.id for v in ([best] if best is not None else []) + others)
    where = " on path2" if role == "path2" else ""
    also = f" (also matched: {', '.join(v.id for v in others)})" if others else ""
    if best is None:
        base = c.default
        text = base.reason if not where else base.reason.replace("no rule matched", "no rule matched path2")
        return Decision(base.effect, base.outcome, base.enforced, None, base.errno, matched, text + also)
    solo = best.decision()
    reason = solo.reason.replace(f"rule '{best.id}'", f"rule '{best.id}'{where}", 1) + also
    if best.deny:
        outcome = "deny" if level == 2 else "would-deny"
        return Decision("deny", outcome, level == 2, best.id, best.rule.errno, matched, reason)
    return Decision("allow", "allow", True, best.id, 0, matched, reason)


# ----------------------------------------------------------------------------------------------------------
# Explanations: the slow, wordy twin of the hot path, used by `gateway check --explain`. It walks every rule
# instead of the index, and reuses the compiled conditions so that it cannot disagree about what they mean.


def explain_decision(request: Any, policy: Policy, lookup: Lookup | None = None) -> Decision:
    fetched: list[ObjectAttrs] = []

    def recording(path: str) -> Any:
        found = lookup(path) if lookup is not None else None
        fetched.append(_objectify(found))
        return found

    decision = decide(request, policy, recording)
    obj = fetched[0] if fetched else None
    slot = slot_of(request)
    roles = [("path", model_path(request.path))]
    if request.type in model.TWO_PATH:
        roles.append(("path2", model_path(request.path2)))
    traces = []
    for rule in sorted(policy.rules, key=lambda r: r.id):
        for role, path in roles:
            status, detail = _trace(policy.compiled, rule, slot, path, request, obj)
            if status == "matched" and rule.id == decision.rule:
                status = "decides"
            traces.append(RuleTrace(rule.id, role, status, detail))
    decided = any(t.rule == decision.rule and t.status == "decides" for t in traces)
    if decision.rule is not None and not decided:
        # Decided by an alias (gateway/rules/aliases.py): the rule matched a path the request makes reachable.
        traces.append(RuleTrace(decision.rule, "alias", "decides", decision.reason))
    return decision._replace(explanation=tuple(traces))


def _trace(c: Compiled, rule: model.Rule, slot: int, path: str, req: Any,
           obj: ObjectAttrs | None) -> tuple[str, str]:
    op = model.SLOT_NAMES[slot]
    if slot not in rule.slots:
        return "no-match", f"op {op} is not in ops [{', '.join(rule.ops)}]"
    view = c.views.get((rule.id, slot))
    if view is None:
        for key in rule.when.given():
            if key != "object" and slot not in model.FIELD_SLOTS[key]:
                return "no-match", f"condition '{key}' never holds for {op} (the request has no such field)"
        if rule.when.type is not None:
            return "no-match", f"{op} never creates a {', '.join(_type_words(rule.when.type))}"
        return "no-match", f"conditions never hold for {op}"
    using = _using(rule, req)
    if rule.paths is not None and not rule.paths.matches(path):
        return "no-match", f"{path} matches none of paths [{', '.join(_patterns(rule))}]{using}"
    if rule.except_ is not None and rule.except_.matches(path):
        return "no-match", f"{path} is excepted by '{rule.except_.which(path)}'{using}"
    if view.otpl is not None and obj is not None and not view.otpl(path, req, obj):
        return "no-match", (f"{path} matches none of paths [{', '.join(_patterns(rule))}] or is excepted"
                            f"{_using(rule, req, obj)}")
    if view.tpl is not None and not view.tpl(path, req):
        if rule.paths_tpl is not None and not _tpl_paths_match(rule, path, req):
            return "no-match", f"{path} matches none of paths [{', '.join(_patterns(rule))}]{using}"
        return "no-match", f"{path} is excepted by one of [{', '.join(rule.except_tpl or ())}]{using}"
    if view.selfref and obj is not None:
        obj = model.bind_self(obj, req)
    for cond in view.when:
        if not cond.test(req):
            return "no-match", f"needs {cond.text}; {cond.key} is {cond.actual(req)}"
    unless_cheap = view.unless is not None and all(cond.test(req) for cond in view.unless)
    if unless_cheap and not view.unless_obj:
        return "no-match", f"unless holds: {'; '.join(cond.text for cond in view.unless)}"  # type: ignore[union-attr]
    if not view.obj or (not view.when_obj and not unless_cheap and view.otpl is None):
        return "matched", f"all conditions hold ({_summary(view, req)})"
    if obj is None:
        return "not-evaluated", "needs the object's attributes; not looked up (could not change the outcome)"
    for cond in view.when_obj:
        if not cond.test(obj):
            return "no-match", f"needs {cond.text}; {cond.key} is {cond.actual(obj)}"
    if unless_cheap and all(cond.test(obj) for cond in view.unless_obj):
        conds = [*view.unless, *view.unless_obj]  # type: ignore[misc]
        return "no-match", f"unless holds: {'; '.join(cond.text for cond in conds)}"
    return "matched", f"all conditions hold ({_summary(view, req, obj)})"


def _patterns(rule: model.Rule) -> tuple[str, ...]:
    return rule.paths_tpl if rule.paths_tpl is not None else rule.paths.patterns  # type: ignore[union-attr]


def _tpl_paths_match(rule: model.Rule, path: str, req: Any) -> bool:
    from gateway.rules.compiler import substitute
    from gateway.rules.globs import GlobSet

    uid, gid = getattr(req, "uid", None), getattr(req, "gid", None)
    return GlobSet.compile([substitute(p, uid, gid) for p in rule.paths_tpl or ()]).matches(path)


def _using(rule: model.Rule, req: Any, obj: Any = None) -> str:
    """The variables a rule's patterns use, with their values: " (${uid}=1001; ${homes}=/home/*)"."""
    parts = []
    if rule.paths_tpl is not None or rule.except_tpl is not None:
        text = " ".join((*(rule.paths_tpl or ()), *(rule.except_tpl or ())))
        for name in model.PATH_VARS:
            if "${" + name + "}" in text:
                value = getattr(obj if name in model.OBJECT_VARS else req, name, None)
                parts.append(f"${{{name}}}={value if value is not None else 'unknown'}")
    if rule.vars_text:
        parts.append(rule.vars_text)
    return f" ({'; '.join(parts)})" if parts else ""


def _type_words(types: frozenset[int]) -> list[str]:
    from gateway import names

    return sorted(names.FILE_TYPE_NAMES.get(t, str(t)) for t in types)


def _summary(view: View, req: Any = None, obj: Any = None) -> str:
    parts = [cond.text for cond in (*view.when, *view.when_obj)]
    if view.rule.paths is not None:
        parts.insert(0, f"path matches {', '.join(_patterns(view.rule))}")
    text = "; ".join(parts) if parts else "no conditions"
    return text + _using(view.rule, req, obj)
