"""Path globs compiled to regular expressions, and the literal prefixes the compiler indexes them by.

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
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

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


def translate(pattern: str) -> str:
    """Regex source (without anchors) for one brace-free pattern."""
    out: list[str] = []
    i = 0
    n = len(pattern)
    while i < n:
        c = pattern[i]
        if c == "\\":
            if i + 1 >= n:
                raise GlobError("pattern ends with a lone backslash")
            out.append(re.escape(pattern[i + 1]))
            i += 2
        elif c == "*":
            if i + 1 < n and pattern[i + 1] == "*":
                at_start = i == 0 or pattern[i - 1] == "/"
                j = i + 2
                while j < n and pattern[j] == "*":  # *** is just a longer **
                    j += 1
                at_end = j == n or pattern[j] == "/"
                if at_start and at_end:
                    if j == n and out and out[-1] == "/":
                        out[-1] = "(?:/.*)?"  # trailing /**: the directory itself or anything below
                    elif j == n:
                        out.append(".*")
                    else:
                        out.append("(?:.*/)?")  # **/ : zero or more whole components
                        j += 1
                    i = j
                    continue
                out.append("[^/]*")  # ** inside a component spans nothing more than *
                i = j
            else:
                out.append("[^/]*")
                i += 1
        elif c == "?":
            out.append("[^/]")
            i += 1
        elif c == "[":
            end = _class_end(pattern, i)
            if end < 0:
                raise GlobError("unclosed '[' (write '\\[' for a literal bracket)")
            body = pattern[i + 1 : end]
            negate = body[:1] in ("!", "^")
            if negate:
                body = body[1:]
            members = []
            k = 0
            while k < len(body):
                ch = body[k]
                if ch == "\\" and k + 1 < len(body):
                    members.append(re.escape(body[k + 1]))
                    k += 2
                    continue
                members.append("\\" + ch if ch in "\\[]^" else ch)
                k += 1
            if not members:
                raise GlobError("empty character class '[]'")
            out.append(("[^/" if negate else "[") + "".join(members) + "]")
            i = end + 1
        else:
            out.append(re.escape(c))
            i += 1
    return "".join(out)


def has_special(text: str) -> bool:
    return any(c in SPECIAL for c in text)


@dataclass(frozen=True, slots=True)
class Placement:
    """Where one brace-free path pattern goes in the index.

    kind "exact": the pattern is a literal path, matched by reaching its trie node at the path's end;
    "subtree": literal prefix + ``/**``, matched by reaching its node at all (no regex needed);
    "glob": the regex must confirm, but only paths under the literal prefix can reach it.
    """

    prefix: tuple[str, ...]
    kind: str
    pattern: str
    regex: re.Pattern[str]


def placement(pattern: str) -> Placement:
    regex = re.compile(translate(pattern), re.DOTALL)
    if not pattern.startswith("/"):
        return Placement((), "glob", pattern, regex)
    parts = pattern[1:].split("/") if pattern != "/" else []
    prefix: list[str] = []
    for idx, part in enumerate(parts):
        if has_special(part):
            rest = parts[idx:]
            if rest == ["**"]:
                return Placement(tuple(prefix), "subtree", pattern, regex)
            return Placement(tuple(prefix), "glob", pattern, regex)
        prefix.append(part)
    return Placement(tuple(prefix), "exact", pattern, regex)


@dataclass(frozen=True)
class GlobSet:
    """A list of patterns as written, compiled to one anchored regex and to index placements."""

    patterns: tuple[str, ...]
    placements: tuple[Placement, ...] = field(repr=False)
    fullmatch: Callable[[str], object] = field(repr=False, compare=False)  # the combined regex's

    @classmethod
    def compile(cls, patterns: Iterable[str]) -> GlobSet:
        pats = tuple(patterns)
        places: list[Placement] = []
        for pat in pats:
            for alt in expand_braces(pat):
                places.append(placement(alt))
        if len(places) == 1:  # the common case: reuse the one compiled regex
            return cls(pats, tuple(places), places[0].regex.fullmatch)
        combined = "|".join(f"(?:{p.regex.pattern})" for p in places) or "(?!)"
        return cls(pats, tuple(places), re.compile(combined, re.DOTALL).fullmatch)

    def matches(self, text: str) -> bool:
        return self.fullmatch(text) is not None

    def which(self, text: str) -> str | None:
        """The first pattern (as written) that matches: for explanations, not the hot path."""
        for pat in self.patterns:
            for alt in expand_braces(pat):
                if re.fullmatch(translate(alt), text, re.DOTALL):
                    return pat
        return None


def check_pattern(pattern: str) -> str | None:
    """Why a pattern cannot be compiled, or None when it can (used by the schema)."""
    try:
        for alt in expand_braces(pattern):
            re.compile(translate(alt))
    except GlobError as err:
        return str(err)
    except re.error as err:  # pragma: no cover - translate escapes everything it does not mean
        return f"not a valid pattern: {err}"
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
