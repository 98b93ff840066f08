"""Aliases count: a request that gives something a new name is decided on every path it makes reachable.

A deny rule on a path promises that the guest cannot make its own data appear at that path, and cannot
take what the path protects somewhere else. The ordinary decision sees one name per path, so without
this a guest that may write ``/cache/**`` but not ``**/.git/hooks/**`` would build
``/cache/shadow/hooks/pre-commit`` and then ``rename /cache/shadow /cache/repo/.git`` (or
``symlink ../shadow /cache/repo/.git``): every request allowed, and a host-side git runs the guest's hook.

The semantics, on top of the ordinary decision of each path:

* **SYMLINK at T** makes whatever the link leads to -- now or after the guest changes its target --
  reachable at T and below it. It is denied by every deny rule of the SYMLINK op whose paths could match T
  or any path below T.
* **RENAME S -> T of a directory** (or of an object whose type is unknown) moves everything below S to
  below T. It is denied by every deny rule of the RENAME op whose paths could match at or below T (what
  the guest wrote would appear there) or at or below S (what the rule protects would leave it), and by
  every unconditional deny rule on reads (LSTAT, OPEN for reading) that could match at or below S (what it
  hides would become readable under another name).
* **RENAME or LINK of a symlink** puts a symlink at T: like SYMLINK at T, a deny rule of that op that
  could match at or below T refuses it.
* **RENAME of anything else, and LINK** (never of a directory) keep one object under one more or one
  other name: the ordinary decision of each path covers the new name; in addition a deny rule on reads
  that matches S refuses it (a second name for a hidden file is a way to read it).

"Could match below T" is a property of the glob (``GlobSet.reaches``): ``**/.git/hooks/**`` could match
below any directory, ``/home/alice/private/*`` only below ``/home``, ``/home/alice`` and the directory
itself. Rules without ``paths`` take no part (they already match every path). A deny rule's request
conditions (uid, gid, ...) must hold; its object conditions are taken as holding, since the objects
below T are not the object the request names.

What a deny cannot promise: objects the host creates or moves are the host's business, and a deny on a
path does not follow content the guest copies (reads, then writes elsewhere) when the policy lets it read.
"""

from __future__ import annotations

import bisect
import stat
from typing import Any

from gateway.protocol import RequestType as RT
from gateway.rules import model
from gateway.rules.globs import Placement, has_special, translate
from gateway.rules.matcher import Matcher
from gateway.rules.model import Decision


class AliasNode:
    """A trie of the deny rules with paths at one op slot, keyed by their patterns' literal prefixes, kept
    flat as the compiler's index is: each node's path ("" the root, then "/home", "/home/alice") -> the
    placements whose literal prefix ends there, with every ancestor present (holding none). What lies
    strictly below a node is a range of the sorted keys: those that start with its path and "/"."""

    __slots__ = ("here", "keys")

    def __init__(self, views: list[Any], keys: dict[str, str] | None = None) -> None:
        shared = keys if keys is not None else {}
        here: dict[str, list[tuple[Any, Placement, Tail | None]]] = {"": []}
        for view in views:
            for place in view.rule.paths.placements:
                key = "/" + "/".join(place.prefix) if place.prefix else ""
                key = shared.setdefault(key, key)
                if key not in here:
                    here[key] = []
                    parent = key
                    while True:  # every ancestor present, so that a walk stops where the trie ends
                        parent = parent[: parent.rindex("/")]
                        if parent in here:
                            break
                        here[shared.setdefault(parent, parent)] = []
                # (view, placement, its Tail or None) for the placements whose literal prefix ends here
                here[key].append((view, place, Tail.of(place.pattern)))
        self.here: dict[str, tuple[tuple[Any, Placement, Tail | None], ...]] = {
            k: tuple(v) for k, v in here.items()}
        self.keys = sorted(k for k in self.here if k)

    def below(self, key: str) -> list[Any]:
        """Every view placed strictly below the node ``key``, each once."""
        lo = bisect.bisect_left(self.keys, key + "/")
        hi = bisect.bisect_left(self.keys, key + "0", lo)  # "0" follows "/": the end of that range
        found: dict[int, Any] = {}
        here = self.here
        for k in self.keys[lo:hi]:
            for v, _place, _tail in here[k]:
                found[id(v)] = v
        return list(found.values())


# The slots whose alias tries alias_decision reads: the aliasing ops themselves, and the reads whose
# unconditional denies a rename or link must not route around. No other slot's is ever asked for.
SLOTS = frozenset({int(RT.SYMLINK), int(RT.RENAME), int(RT.LINK), int(RT.LSTAT), model.OPEN_READ})


def build(per_slot: dict[int, list[Any]], keys: dict[str, str] | None = None) -> dict[int, AliasNode]:
    """Alias tries per slot (of SLOTS) from each slot's views of deny rules that have ``paths``, in rule
    order; slots with the same views share one trie. ``keys``: node keys to share."""
    shared: dict[tuple[Any, ...], AliasNode] = {}
    roots: dict[int, AliasNode] = {}
    for slot, here in per_slot.items():
        sig = tuple(here)  # views hash and compare by identity
        root = shared.get(sig)
        if root is None:
            root = shared[sig] = AliasNode(here, keys)
        roots[slot] = root
    return roots


def _applies(view: Any, req: Any, unconditional: bool) -> bool:
    """Whether a deny rule's request conditions hold (object conditions count as holding)."""
    if unconditional:
        return not view.when and view.unless is None
    if view.obj:
        return bool(view.pre(req))
    return view.chk is None or bool(view.chk(req))


def _excepted_below(view: Any, comps: list[str]) -> bool:
    """True when the rule's ``except`` takes out T and everything below it (a ``prefix/**`` at or above
    T); anything less leaves some path below T covered, which is enough to deny."""
    ex = view.rule.except_
    if ex is None:
        return False
    return any(p.kind == "subtree" and tuple(comps[: len(p.prefix)]) == p.prefix for p in ex.placements)


def _template_reaches(view: Any, path: str, comps: list[str], req: Any) -> bool:
    """A rule with ${uid}/${gid}: its patterns with the request's ids reach ``path`` or below it, and its
    templated ``except`` does not take out all of that (as the literal ids would decide)."""
    from gateway.rules.compiler import substitute
    from gateway.rules.globs import GlobSet

    rule = view.rule
    if view.tpl is None:
        return True
    uid, gid = getattr(req, "uid", None), getattr(req, "gid", None)
    paths = rule.paths_tpl
    if paths is not None and not GlobSet.compile([substitute(p, uid, gid) for p in paths]).reaches(path):
        return False
    if rule.except_tpl is not None:
        ex = GlobSet.compile([substitute(p, uid, gid) for p in rule.except_tpl])
        if any(p.kind == "subtree" and tuple(comps[: len(p.prefix)]) == p.prefix for p in ex.placements):
            return False
    return True


def _candidates(root: AliasNode, path: str, comps: list[str]) -> list[Any]:
    """The views whose patterns could match ``path`` or a path below it."""
    found: list[Any] = []
    here = root.here
    node = here[""]
    key = ""
    depth = 0
    end = 0
    while True:
        for view, place, tail in node:
            if place.kind == "exact":
                if depth == len(comps):
                    found.append(view)
            elif place.kind == "subtree" or _reaches(place, tail, path):
                found.append(view)
        if depth == len(comps):
            found.extend(root.below(key))  # every literal prefix down there extends T
            break
        end = path.find("/", end + 1)
        key = path if end < 0 else path[:end]
        got = here.get(key)
        if got is None:
            break
        node = got
        depth += 1
    return found


def _reaches(place: Placement, tail: Tail | None, path: str) -> bool:
    """Whether aliasing ``path`` could put something under the pattern that was not already there."""
    if tail is None:
        return place.reaches(path)  # one RE2 program: linear in the path
    # **/A/**: A wholly inside T is the pattern matching T itself (one RE2 match); else a straddle.
    if tail.trailing and place.regex.fullmatch(path) is not None:
        return True
    return tail.straddles(path[1:].split("/") if path != "/" else [])


class Tail:
    """An unanchored tail, ``**/A`` or ``**/A/**`` with no other ``**``: the one shape whose reach is
    narrower than "could match at or below T".

    The same components A match wherever they sit, so content moved below T matches only if it already
    matched where it came from -- unless the occurrence of A takes in components of T itself. Only that
    straddle (or A inside T, for ``**/A/**``) counts, which keeps ``symlink /cache/x`` legal under a deny
    on ``**/.git/hooks/**`` while ``symlink ../shadow /cache/repo/.git`` is refused. Anchored patterns
    (``/home/*/private/**``) keep the plain question, answered by ``Placement.reaches``.
    """

    __slots__ = ("comps", "trailing")

    def __init__(self, comps: list[Any], trailing: bool) -> None:
        self.comps = comps  # a matcher per component of A
        self.trailing = trailing

    @classmethod
    def of(cls, pattern: str) -> Tail | None:
        """The tail of a brace-free pattern, or None when it is not of that shape."""
        parts = pattern.split("/")
        if parts[0] != "**":
            return None
        rest = parts[1:]
        trailing = bool(rest) and rest[-1] == "**"
        if trailing:
            rest = rest[:-1]
        if not rest or "**" in rest:
            return None
        return cls([_component(c) for c in rest], trailing)

    def straddles(self, t: list[str], inside: bool = False) -> bool:
        """Does an occurrence of A take in components of T itself (``inside``: or lie wholly in T, which
        the caller usually asks RE2 instead)? Linear in T for a tail of fixed length (the policy's)."""
        tail = self.comps
        k, n = len(tail), len(t)
        for j in range(1, min(k, n) + 1):  # T's last j components start the tail
            if all(tail[x](t[n - j + x]) for x in range(j)):
                return True
        if self.trailing and inside:
            for start in range(0, n - k + 1):
                if all(tail[x](t[start + x]) for x in range(k)):
                    return True
        return False


def _component(glob: str) -> Any:
    """A matcher for one component's glob (``*``, ``?``, ``[...]``; never ``/``)."""
    if not has_special(glob):
        return glob.__eq__
    return Matcher(translate(glob)).fullmatch  # RE2: a component is guest text too


def reaching(root: AliasNode | None, path: str, req: Any, *, unconditional: bool = False,
             exact: bool = False) -> Any | None:
    """The deciding deny view (lowest priority number) whose paths could match ``path`` or a path below
    it (``exact``: match ``path`` itself), or None."""
    if root is None:
        return None
    comps = path[1:].split("/") if path != "/" else []
    best = None
    for view in _candidates(root, path, comps):
        if best is not None and view.prio >= best.prio:
            continue
        if not _applies(view, req, unconditional):
            continue
        if exact:
            if not view.rule.paths.matches(path) or (view.ex is not None and view.ex(path) is not None):
                continue
            if view.tpl is not None and not view.tpl(path, req):
                continue
        elif _excepted_below(view, comps) or not _template_reaches(view, path, comps, req):
            continue
        best = view
    return best


def _denial(view: Any, what: str) -> Decision:
    solo: Decision = view.decision()
    return solo._replace(reason=f"{solo.reason} ({what})")


_READ_SLOTS = (int(RT.LSTAT), model.OPEN_READ)


_DIR, _LNK = stat.S_IFDIR, stat.S_IFLNK


def alias_decision(
    c: Any, req: Any, path: str, path2: str | None, source_type: int | None
) -> Decision | None:
    """The deny an alias-creating request meets beyond its ordinary decision, or None. ``source_type``
    is the S_IF* type of a RENAME's or LINK's source (None: unknown, taken as the widest case)."""
    t = req.type
    roots = c.alias_roots
    if t is RT.SYMLINK:
        v = reaching(roots.get(int(RT.SYMLINK)), path, req)
        if v is not None:
            return _denial(v, f"a symlink at {path} makes what it leads to reachable at and below {path}")
        return None
    assert path2 is not None
    # A directory carries what lies below it; a symlink (renamed, or hard-linked: a second symlink) leads
    # to what lies below its target. Either way the new name reaches below itself.
    if source_type in (None, _DIR, _LNK) and t in (RT.RENAME, RT.LINK):
        v = reaching(roots.get(int(t)), path2, req)
        if v is not None:
            what = "a symlink" if source_type == _LNK else "a directory or symlink"
            verb = "renaming" if t is RT.RENAME else "linking"
            return _denial(v, f"{verb} {what} to {path2} makes what it leads to reachable below {path2}")
    if t is RT.RENAME and source_type in (None, _DIR):
        v = reaching(roots.get(int(RT.RENAME)), path, req)
        if v is not None:
            return _denial(v, f"renaming {path} away moves what lies below it out of the rule's paths")
        for slot in _READ_SLOTS:
            v = reaching(roots.get(slot), path, req, unconditional=True)
            if v is not None:
                return _denial(v, f"renaming {path} would make what it hides readable below {path2}")
        return None
    # A file (or a symlink) under a new name: a second name for what a read-deny hides is a way to read it.
    for slot in _READ_SLOTS:
        v = reaching(roots.get(slot), path, req, unconditional=True, exact=True)
        if v is not None:
            verb = "linking" if t is RT.LINK else "renaming"
            return _denial(v, f"{verb} {path} to {path2} would make it readable under another name")
    return None
