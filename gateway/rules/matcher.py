"""Linear-time regex matching for guest-chosen text: paths, symlink targets, xattr names.

Python's ``re`` backtracks, so a policy glob with a few ``**`` against a path the guest picked can take
seconds to minutes, and the server is single-threaded. RE2 (google-re2) runs in time linear in the text
for a given program, whatever the pattern or the text: no backtracking, no backreferences, no lookaround.

Encoding. The gateway's strings are guest bytes decoded with ``surrogateescape``, so a byte that is not
UTF-8 arrives as a lone surrogate (U+DC80..U+DCFF), one character. RE2 reads UTF-8 bytes, and raw
invalid bytes (what ``surrogateescape`` would give back) are not characters to it: ``[^/]`` would not
match ``\\xff``, and a deny on ``/secret/*`` would miss ``/secret/\\xff``. So the text is encoded with
``surrogatepass`` instead: every character, surrogates included, becomes one well-formed 1-4 byte
sequence that RE2's ``.`` and character classes take as exactly one character. Patterns name characters
as ``\\x{HEX}`` (see ``literal``), which covers surrogates too, so a pattern never has to be encoded.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import re2

NEVER = r"[^\x{0}-\x{10FFFF}]"  # matches no character at all: RE2 has no (?!) to say "never"

_OPTIONS = re2.Options()
_ANCHOR_BOTH = re2._Anchor.ANCHOR_BOTH
_NO_SPAN = (-1, -1)  # RE2's span of a group (here: the whole match) that did not match
_OPTIONS.never_capture = True  # groups are only for structure; capturing costs time and memory
_OPTIONS.dot_nl = True  # a path may contain a newline, and "." must still match it
_OPTIONS.log_errors = False  # errors are raised to the caller; RE2's own log would go to stderr

MatchError = re2.error

# A program from a source this short is compiled when first used, not when built: it cannot fail. RE2 fails
# only past its memory budget (8 MiB, some 350,000 instructions), and the sources gateway.rules.globs writes
# have no counted repetition, so their programs stay within a few instructions per source character (a
# dense negated class of 50 characters: some 30). A 10,000-rule policy builds 30,000 programs that serving
# never runs (a request meets a handful), each some kilobytes of RE2 state and 40 us to compile; longer
# sources are compiled at once, so the one error RE2 can raise is still the loader's, with its line.
LAZY_MAX = 4096


def literal(char: str) -> str:
    """RE2 source matching exactly ``char``: alphanumerics as they are, anything else as ``\\x{HEX}``."""
    return char if char.isascii() and char.isalnum() else f"\\x{{{ord(char):X}}}"


def _encode(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


class Matcher:
    """One RE2 program; ``fullmatch(text)`` is not None exactly when the whole text matches.

    A source of at most LAZY_MAX characters is compiled at its first use (``compiled`` says whether it
    has been); a longer one at once, so that a source RE2 refuses raises MatchError here."""

    __slots__ = ("_match", "_rx", "pattern")

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern
        self._rx: re2._Regexp | None = None
        self._match: Callable[..., list[tuple[int, int]]] | None = None
        if len(pattern) > LAZY_MAX:
            self._program()

    def _program(self) -> re2._Regexp:
        rx = self._rx
        if rx is None:
            rx = self._rx = re2.compile(self.pattern, _OPTIONS)
            # The program's own Match, called directly: the wrapper's fullmatch goes through a generator
            # and builds a match object per call, twice the cost of the match itself on a short path.
            self._match = rx._regexp.Match
        return rx

    def fullmatch(self, text: str) -> object | None:
        match = self._match
        if match is None:
            self._program()
            match = self._match
            assert match is not None
        data = _encode(text)
        spans = match(_ANCHOR_BOTH, data, 0, len(data))
        return None if spans[0] == _NO_SPAN else spans

    @property
    def compiled(self) -> bool:
        return self._rx is not None

    @property
    def program_size(self) -> int:
        """RE2's instruction count: matching costs at most this many steps per byte of text."""
        return int(self._program().programsize)

    def __reduce__(self) -> tuple[type, tuple[str]]:  # audit filters are pickled into worker processes
        return Matcher, (self.pattern,)

    def __eq__(self, other: object) -> bool:  # as re.Pattern: equal programs compare equal
        return isinstance(other, Matcher) and other.pattern == self.pattern

    def __hash__(self) -> int:
        return hash(self.pattern)

    def __repr__(self) -> str:
        return f"Matcher({self.pattern!r})"


class AnyOf:
    """Several programs tried in turn: for a union too large to be one program (still linear)."""

    __slots__ = ("matchers",)

    def __init__(self, matchers: Sequence[Matcher]) -> None:
        self.matchers = tuple(matchers)

    def fullmatch(self, text: str) -> object | None:
        for m in self.matchers:
            found = m.fullmatch(text)
            if found is not None:
                return found
        return None

    def __reduce__(self) -> tuple[type, tuple[tuple[Matcher, ...]]]:
        return AnyOf, (self.matchers,)


def union(matchers: Sequence[Matcher]) -> Matcher | AnyOf:
    """One matcher for text that any of ``matchers`` matches: one program when RE2 can build it."""
    if not matchers:
        return Matcher(NEVER)
    if len(matchers) == 1:
        return matchers[0]
    try:
        return Matcher("|".join(f"(?:{m.pattern})" for m in matchers))
    except MatchError:  # past RE2's memory budget: each part compiled on its own, tried in turn
        return AnyOf(matchers)
