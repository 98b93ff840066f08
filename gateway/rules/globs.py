"""Path globs compiled to linear-time (RE2) matchers, and the literal prefixes the compiler indexes them by.

Syntax (matched against a whole, lexically normalised path such as ``/home/alice/notes.txt``):

``*``      any run of characters within one path component (never ``/``)
``?``      one character other than ``/``
``[...]``  one character from the set (``[a-z]``, ``[!0-9]`` or ``[^0-9]`` negates; never ``/``)
``**``     as a whole component: any number of components, including none. ``/etc/**`` therefore
           matches ``/etc`` itself and everything below it, which is what an operator protecting a
           tree means; ``/a/**/b`` matches ``/a/b`` and ``/a/x/y/b``; ``**/.git/**`` matches anywhere.
``{a,b}``  alternatives, nestable (``/srv/{www,ftp}/**``)
``\\x``     the character ``x`` literally

Braces are expanded before translation so that each alternative gets its own literal prefix in the
index (``/{etc,usr}/**`` lands in two trie nodes instead of in the bucket every request scans).

Every match runs on RE2 (``gateway.rules.matcher``): the guest picks the path, so no pattern may cost
more than linear time in it. ``GlobSet.reaches`` also answers "could this match at or below a path",
which is what deciding an alias (a symlink, a renamed directory) needs.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from gateway.rules.matcher import LAZY_MAX, NEVER, AnyOf, Matcher, MatchError, literal, union

_OWNERS = {(0,): (0,), (0, 1): (0, 1)}  # the owners of a set of one or two patterns, shared

SPECIAL = frozenset("*?[{\\")
MAX_ALTERNATIVES = 256  # a brace bomb in a policy must not become a 10^6-way regex


class GlobError(ValueError):
    """A pattern that cannot be compiled (unclosed bracket or brace, dangling backslash...)."""


def _class_end(pattern: str, start: int) -> int:
    """Index of the ``]`` closing the class opened at ``start``, or -1 when it is never closed."""
    i = start + 1
    if i < len(pattern) and pattern[i] in "!^":
        i += 1
    if i < len(pattern) and pattern[i] == "]":  # a leading ] is a member, as in fnmatch
        i += 1
    while i < len(pattern):
        if pattern[i] == "\\":
            i += 2
            continue
        if pattern[i] == "]":
            return i
        i += 1
    return -1


def _find_brace(pattern: str) -> tuple[int, int, list[str]] | None:
    """First top-level ``{...}`` group: (start, end, alternatives), or None when there is none."""
    i = 0
    n = len(pattern)
    while i < n:
        c = pattern[i]
        if c == "\\":
            i += 2
            continue
        if c == "[":
            end = _class_end(pattern, i)
            if end < 0:
                raise GlobError("unclosed '[' (write '\\[' for a literal bracket)")
            i = end + 1
            continue
        if c == "}":
            raise GlobError("'}' without a matching '{'")
        if c == "{":
            depth = 0
            parts: list[str] = []
            last = i + 1
            j = i
            while j < n:
                d = pattern[j]
                if d == "\\":
                    j += 2
                    continue
                if d == "[":
                    end = _class_end(pattern, j)
                    if end < 0:
                        raise GlobError("unclosed '[' (write '\\[' for a literal bracket)")
                    j = end + 1
                    continue
                if d == "{":
                    depth += 1
                elif d == "}":
                    depth -= 1
                    if depth == 0:
                        parts.append(pattern[last:j])
                        return i, j, parts
                elif d == "," and depth == 1:
                    parts.append(pattern[last:j])
                    last = j + 1
                j += 1
            raise GlobError("unclosed '{' (write '\\{' for a literal brace)")
        i += 1
    return None


def expand_braces(pattern: str) -> list[str]:
    """All brace-free alternatives of a pattern, in order, without duplicates."""
    if "{" not in pattern and "}" not in pattern and "[" not in pattern:
        return [pattern]  # what _find_brace would say, without its walk (it raises only on [ and })
    found = _find_brace(pattern)
    if found is None:
        return [pattern]
    start, end, parts = found
    out: list[str] = []
    for part in parts:
        for tail in expand_braces(pattern[:start] + part + pattern[end + 1 :]):
            if tail not in out:
                out.append(tail)
            if len(out) > MAX_ALTERNATIVES:
                raise GlobError(f"more than {MAX_ALTERNATIVES} alternatives after expanding braces")
    return out


# A brace-free pattern is a list of tokens, each (kind, RE2 source). The kinds matter to prefix_source():
#   "one"    exactly one character, never "/": a literal, ?, [...]
#   "slash"  a literal "/"
#   "star"   [^/]*       *, or ** inside a component
#   "any"    .*          ** (or **/**) as the whole pattern
#   "dirs"   (?:.*/)?    **/ : zero or more whole components
#   "below"  (?:/.*)?    a trailing /** : the directory itself or anything below it
Token = tuple[str, str]


def _class_ranges(body: str) -> list[tuple[int, int]]:
    """The code point ranges of a class body, read as Python's re reads a set (so the meaning of
    ``[a-c-e]``, ``[-a]`` or ``[a-]`` did not change when the engine did)."""
    items: list[tuple[str, bool]] = []  # (character, escaped)
    k = 0
    while k < len(body):
        if body[k] == "\\" and k + 1 < len(body):
            items.append((body[k + 1], True))
            k += 2
        else:
            items.append((body[k], False))
            k += 1
    ranges: list[tuple[int, int]] = []
    k = 0
    while k < len(items):
        lo = items[k][0]
        if k + 2 < len(items) and items[k + 1] == ("-", False):  # an unescaped - between two members
            hi = items[k + 2][0]
            if ord(hi) < ord(lo):
                raise GlobError(f"bad range '{lo}-{hi}' in '[...]'")
            ranges.append((ord(lo), ord(hi)))
            k += 3
        else:
            ranges.append((ord(lo), ord(lo)))
            k += 1
    return ranges


def _class_source(body: str) -> str:
    negate = body[:1] in ("!", "^")
    ranges = _class_ranges(body[1:] if negate else body)
    if not ranges:
        raise GlobError("empty character class '[]'")
    slash = ord("/")
    if not negate:  # a class never matches "/", as documented: cut it out of every range
        ranges = [r for lo, hi in ranges for r in ((lo, min(hi, slash - 1)), (max(lo, slash + 1), hi))
                  if r[0] <= r[1]]
        if not ranges:
            return NEVER
    else:
        ranges.append((slash, slash))
    body_src = "".join(literal(chr(lo)) if lo == hi else f"{literal(chr(lo))}-{literal(chr(hi))}"
                       for lo, hi in ranges)
    return f"[{'^' if negate else ''}{body_src}]"


def tokens(pattern: str) -> list[Token]:
    """The tokens of one brace-free pattern."""
    out: list[Token] = []
    i = 0
    n = len(pattern)
    while i < n:
        c = pattern[i]
        if c == "\\":
            if i + 1 >= n:
                raise GlobError("pattern ends with a lone backslash")
            d = pattern[i + 1]
            out.append(("slash", "/") if d == "/" else ("one", literal(d)))
            i += 2
        elif c == "*":
            j = i + 1
            while j < n and pattern[j] == "*":  # *** is just a longer **
                j += 1
            at_start = i == 0 or pattern[i - 1] == "/"
            at_end = j == n or pattern[j] == "/"
            if j - i >= 2 and at_start and at_end:
                while j == n and out and out[-1][0] == "dirs":
                    out.pop()  # **/** is **: /a/**/** matches /a itself, as /a/** does
                if j == n and out and out[-1][0] == "slash":
                    out[-1] = ("below", "(?:/.*)?")  # trailing /**: the directory itself or anything below
                elif j == n:
                    out.append(("any", ".*"))
                else:
                    out.append(("dirs", "(?:.*/)?"))  # **/ : zero or more whole components
                    j += 1
            else:
                out.append(("star", "[^/]*"))  # ** inside a component spans nothing more than *
            i = j
        elif c == "?":
            out.append(("one", "[^/]"))
            i += 1
        elif c == "[":
            end = _class_end(pattern, i)
            if end < 0:
                raise GlobError("unclosed '[' (write '\\[' for a literal bracket)")
            out.append(("one", _class_source(pattern[i + 1 : end])))
            i = end + 1
        elif c == "/":
            out.append(("slash", "/"))
            i += 1
        else:
            out.append(("one", literal(c)))
            i += 1
    return out


def translate(pattern: str) -> str:
    """RE2 source (without anchors) for one brace-free pattern."""
    return "".join(src for _, src in tokens(pattern))


def prefix_source(toks: list[Token]) -> str:
    """RE2 source matching every prefix of every string that ``toks`` match (and nothing else).

    Built from the end: the prefixes of ``t R`` are the prefixes of ``t`` plus ``t`` followed by a prefix
    of ``R``. One character: ``(?:t P)?``. ``[^/]*`` is closed under prefixes: ``[^/]*P``. A ``**`` that
    can span "/" makes every string a prefix (any string s is a prefix of s + "/"): ``.*``. The result is
    one nested group per token, so its size, and its matching cost, stay linear in the pattern's.
    """
    if any(src == NEVER for _, src in toks):  # no match at all (a class of only "/"), so no prefixes
        return NEVER
    out = ""
    for kind, src in reversed(toks):
        if kind in ("any", "dirs"):
            out = ".*"
        elif kind == "star":
            out = src + out
        elif kind == "below":
            out = f"(?:/.*|{out})"
        else:
            out = f"(?:{src}{out})?"
    return out


def has_special(text: str) -> bool:
    return any(c in SPECIAL for c in text)


def _below(path: str) -> str:
    """What every path strictly below ``path`` starts with (the root's children are "/name")."""
    return path if path.endswith("/") else path + "/"


# A pattern this short has sources of at most LAZY_MAX characters (a character becomes at most 14 of a
# regex source, a range split around "/", and 5 more of the prefix source's group), so its programs cannot
# fail and are made only when first asked for; a longer pattern's are made at once, so that "too large
# for the matcher" is still the schema's error, with its line.
LAZY_PATTERN_MAX = LAZY_MAX // 20


class Placement:
    """Where one brace-free path pattern goes in the index.

    kind "exact": the pattern is a literal path, matched by reaching its trie node at the path's end;
    "subtree": literal prefix + ``/**``, matched by reaching its node at all (no regex needed);
    "glob": the regex must confirm, but only paths under the literal prefix can reach it.
    ``reach`` matches the prefixes of the pattern's matches (see ``reaches``). Both matchers are built
    from the pattern when first used: serving a subtree or exact placement never needs either.
    """

    __slots__ = ("_reach", "_regex", "kind", "pattern", "prefix")

    def __init__(self, prefix: tuple[str, ...], kind: str, pattern: str) -> None:
        self.prefix, self.kind, self.pattern = prefix, kind, pattern
        self._regex: Matcher | None = None
        self._reach: Matcher | None = None
        if len(pattern) > LAZY_PATTERN_MAX:
            self._programs()

    def _programs(self) -> None:
        toks = tokens(self.pattern)
        self._regex = _matcher("".join(src for _, src in toks))
        self._reach = _matcher(prefix_source(toks))

    @property
    def regex(self) -> Matcher:
        if self._regex is None:
            self._programs()
        return self._regex  # type: ignore[return-value]

    @property
    def reach(self) -> Matcher:
        if self._reach is None:
            self._programs()
        return self._reach  # type: ignore[return-value]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Placement) and (self.prefix, self.kind, self.pattern) == (
            other.prefix, other.kind, other.pattern)

    def __hash__(self) -> int:
        return hash((self.prefix, self.kind, self.pattern))

    def __repr__(self) -> str:
        return f"Placement(prefix={self.prefix!r}, kind={self.kind!r}, pattern={self.pattern!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return placement, (self.pattern,)

    def reaches(self, path: str) -> bool:
        """True when the pattern matches ``path`` or some path strictly below it."""
        return self.regex.fullmatch(path) is not None or self.reach.fullmatch(_below(path)) is not None


class _LoadCaches(threading.local):
    """RE2 programs by source, while a policy loads (see compile_cache): the schema compiles each pattern
    to check it, and the rule built from it needs the same programs again. Per thread: a SIGHUP reload
    loads in its own thread (gateway.reload_worker) while the serve loop's decisions build matchers."""

    compiled: dict[str, Matcher] | None = None
    placed: dict[str, Placement] | None = None  # likewise, whole placements by brace-free pattern
    components: dict[str, str] | None = None  # and the literal components of their prefixes


_load = _LoadCaches()


@contextlib.contextmanager
def compile_cache() -> Iterator[None]:
    """Within this block, a glob's RE2 programs are compiled once (they are immutable, so shared); the
    cache goes when the outermost block ends, so nothing outlives the load that built it."""
    load = _load
    outer = load.compiled is not None
    if not outer:
        load.compiled, load.placed, load.components = {}, {}, {}
    try:
        yield
    finally:
        if not outer:
            load.compiled = load.placed = load.components = None


def _matcher(source: str) -> Matcher:
    cache = _load.compiled
    if cache is not None and (hit := cache.get(source)) is not None:
        return hit
    try:
        matcher = Matcher(source)
    except MatchError as err:  # only size can fail: tokens() writes nothing RE2 cannot parse
        raise GlobError(f"too large for the matcher ({err})") from None
    if cache is not None:
        cache[source] = matcher
    return matcher


def placement(pattern: str) -> Placement:
    cache = _load.placed
    if cache is not None and (hit := cache.get(pattern)) is not None:
        return hit
    place = _placement(pattern)
    if cache is not None:
        cache[pattern] = place
    return place


def _placement(pattern: str) -> Placement:
    if "[" in pattern or pattern.endswith("\\"):
        # tokens() raises GlobError only for a class or a trailing backslash: now, not at first use
        tokens(pattern)
    if not pattern.startswith("/"):
        return Placement((), "glob", pattern)
    parts = pattern[1:].split("/") if pattern != "/" else []
    components = _load.components
    if components is not None:  # "home" once, not once per rule under /home
        parts = [components.setdefault(c, c) for c in parts]
    prefix: list[str] = []
    for idx, part in enumerate(parts):
        if has_special(part):
            rest = parts[idx:]
            if rest == ["**"]:
                return Placement(tuple(prefix), "subtree", pattern)
            return Placement(tuple(prefix), "glob", pattern)
        prefix.append(part)
    return Placement(tuple(prefix), "exact", pattern)


class GlobSet:
    """A list of patterns as written, compiled to one RE2 matcher and to index placements.

    Every match runs in time linear in the text (RE2), so a guest-chosen path cannot stall the server.
    The combined matchers (``full``, ``reach``) are built when first used.
    """

    __slots__ = ("_full", "_reach", "owners", "patterns", "placements")

    def __init__(self, patterns: tuple[str, ...], placements: tuple[Placement, ...],
                 owners: tuple[int, ...]) -> None:
        self.patterns = patterns
        self.placements = placements
        self.owners = owners  # placement index -> index of its pattern
        self._full: Matcher | AnyOf | None = None
        self._reach: Matcher | AnyOf | None = None

    @classmethod
    def compile(cls, patterns: Iterable[str]) -> GlobSet:
        pats = tuple(patterns)
        places: list[Placement] = []
        owners: list[int] = []
        for idx, pat in enumerate(pats):
            for alt in expand_braces(pat):
                places.append(placement(alt))
                owners.append(idx)
        return cls(pats, tuple(places), _OWNERS.get(tuple(owners)) or tuple(owners))

    @property
    def full(self) -> Matcher | AnyOf:
        """The combined matcher: one program when RE2 can build it."""
        if self._full is None:
            self._full = union([p.regex for p in self.placements])
        return self._full

    @property
    def reach(self) -> Matcher | AnyOf:
        """Prefixes of any pattern's matches."""
        if self._reach is None:
            self._reach = union([p.reach for p in self.placements])
        return self._reach

    @property
    def fullmatch(self) -> Callable[[str], object]:
        return self.full.fullmatch

    def __eq__(self, other: object) -> bool:
        return isinstance(other, GlobSet) and other.patterns == self.patterns

    def __hash__(self) -> int:
        return hash(self.patterns)

    def __repr__(self) -> str:
        return f"GlobSet(patterns={self.patterns!r})"

    def __reduce__(self) -> tuple[Any, ...]:  # audit filters are pickled into worker processes
        return GlobSet.compile, (self.patterns,)

    def matches(self, text: str) -> bool:
        return self.fullmatch(text) is not None

    def reaches(self, path: str) -> bool:
        """True when some pattern matches ``path`` itself or could match a path strictly below it.

        This is what an alias needs: a symlink or a directory renamed to ``path`` makes things reachable
        at ``path/...``, so a deny on ``**/.git/hooks/**`` reaches ``/cache/repo/.git`` (and
        ``/cache/repo``). Linear in the path, like ``matches``.
        """
        return self.full.fullmatch(path) is not None or self.reach.fullmatch(_below(path)) is not None

    def index_entries(self) -> list[tuple[tuple[str, ...], str, Callable[[str], object] | None]]:
        """(trie prefix, kind, matcher or None) per node: the placements at one node, one entry.

        The globs that share a node become one RE2 program, so ``**/{a,b,c,d}{a,b,c,d}x`` costs one
        match per request, not one per alternative (256 of them cost 4.7 ms on a 4 KiB path). Exact
        and subtree placements need no matcher: reaching the node is the match.
        """
        globs: dict[tuple[str, ...], list[Matcher]] = {}
        out: list[tuple[tuple[str, ...], str, Callable[[str], object] | None]] = []
        for place in self.placements:
            if place.kind == "glob":
                globs.setdefault(place.prefix, []).append(place.regex)
            elif (place.prefix, place.kind, None) not in out:
                out.append((place.prefix, place.kind, None))
        out += [(prefix, "glob", union(ms).fullmatch) for prefix, ms in globs.items()]
        return out

    def which(self, text: str) -> str | None:
        """The first pattern (as written) that matches: for explanations, not the hot path."""
        for place, owner in zip(self.placements, self.owners, strict=True):
            if place.regex.fullmatch(text) is not None:
                return self.patterns[owner]  # placements are in pattern order: the first hit is the first
        return None


def check_pattern(pattern: str) -> str | None:
    """Why a pattern cannot be compiled, or None when it can (used by the schema)."""
    try:
        GlobSet.compile([pattern])
    except GlobError as err:
        return str(err)
    return None


def never_matches_path(pattern: str) -> str | None:
    """Why a path pattern can never match a normalised path, or None when it might (for lint)."""
    reasons = [_alt_never_matches(alt) for alt in expand_braces(pattern)]
    if any(r is None for r in reasons):
        return None
    return reasons[0]


def _alt_never_matches(alt: str) -> str | None:
    if not alt.startswith(("/", "**")):
        return "paths are absolute inside the export (start the pattern with '/' or '**/')"
    if NEVER in translate(alt):
        return "a character class of only '/' matches nothing (a class never matches '/')"
    if alt == "/":
        return None
    body = alt[1:] if alt.startswith("/") else alt
    for part in body.split("/"):
        if part == "":
            return "normalised paths have no empty components (no '//' and no trailing '/')"
        if part in (".", ".."):
            return f"normalised paths have no '{part}' components"
    return None


def covers_subtree(outer: str, inner: str) -> bool:
    """True when every path ``inner`` can match is matched by ``outer`` (a conservative check).

    Only proven cases count: equal patterns, ``outer`` matching everything, or ``outer`` being a
    literal prefix + ``/**`` and ``inner`` staying under that prefix.
    """
    if outer == inner or outer in ("/**", "**"):
        return True
    try:
        outs = expand_braces(outer)
        ins = expand_braces(inner)
    except GlobError:
        return False
    return all(any(_covers_one(o, i) for o in outs) for i in ins)


def _covers_one(outer: str, inner: str) -> bool:
    if outer == inner or outer in ("/**", "**"):
        return True
    po = placement(outer)
    if po.kind != "subtree" or not inner.startswith("/"):
        return False
    # every path the inner pattern matches starts with its literal prefix, hence with the outer one
    return placement(inner).prefix[: len(po.prefix)] == po.prefix
