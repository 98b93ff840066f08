"""Policy files in, compiled policies out: YAML with line marks -> schema -> model -> index.

Every problem found on the way is collected with its line; an invalid policy raises PolicyError listing
them all and is never returned, so it can never be served.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime
import errno as errno_mod
import gc
import hashlib
import math
import os
import posixpath
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

from gateway import names
from gateway.rules import globs, idmap, model, requests, schema
from gateway.rules.compiler import compile_rules
from gateway.rules.globs import GlobSet
from gateway.rules.model import Conditions, ObjectConditions, Policy, PolicyError, PolicyTest, Problem, Rule

Lines = dict[tuple[Any, ...], int]

# The largest policy (or --requests file) read: some 40,000 rules like bench/policy_gen.py's (10,000 of them
# are 1 MB). A larger file is refused unread, never parsed.
MAX_POLICY_BYTES = 4 << 20
# Deeper nesting is no policy (one nests six levels); without a bound, 100,000 '[' ran out of stack.
MAX_DEPTH = 64


def anchor_problem(event: Any) -> tuple[int, str] | None:
    """(1-based line, message) if this YAML parse event is an alias or carries an anchor, else None.

    Aliases make a small document a huge one: nine levels of nine aliases, a few hundred bytes, expand to
    387 million scalars (`gateway check` grew to 3.1 GiB). A policy has no need of them, so they are
    refused, not bounded. Written for the event stream (AliasEvent; the anchor and start_mark attributes,
    which ruamel and PyYAML share), which _compose() reads, so an anchor is refused before anything is built
    from it.
    """
    anchor = getattr(event, "anchor", None)
    if type(event).__name__ == "AliasEvent":
        what = f"an alias, *{anchor}"
    elif anchor is not None:
        what = f"an anchor, &{anchor}"
    else:
        return None
    return event.start_mark.line + 1, f"YAML anchors and aliases are not allowed ({what})"


class _Refused(Exception):
    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line = line


# libyaml's parser, driven from Python one event at a time: the tree, the line map and every bound are
# built here in a single pass (no recursion, so no nesting depth can run out of stack). Without the C
# extension the pure-Python parser would be some 30x slower: refuse to start rather than crawl.
_CParser = getattr(yaml, "CSafeLoader", None)
if _CParser is None or not getattr(yaml, "__with_libyaml__", False):
    raise ImportError(
        "gateway needs PyYAML built with libyaml (yaml.CSafeLoader): install PyYAML>=6 from a wheel, or "
        "build it with libyaml-dev present; the pure-Python YAML parser is too slow for large policies"
    )

# YAML 1.2 core-schema resolution of plain scalars, as ruamel's round-trip loader did it (`yes` is text,
# `0644` keeps its leading zero): the regular expressions are ruamel's resolver's.
_BOOLS = {"true": True, "True": True, "TRUE": True, "false": False, "False": False, "FALSE": False}
_NULLS = frozenset(("~", "null", "Null", "NULL"))
_NUMBER_START = frozenset("-+0123456789.")
_INT_RE = re.compile(r"[-+]?(?:0b[0-1_]+|0o?[0-7_]+|[0-9_]+|0x[0-9a-fA-F_]+)\Z")
_FLOAT_RE = re.compile(
    r"[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?\Z|[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)\Z"
    r"|[-+]?\.[0-9_]+(?:[eE][-+][0-9]+)?\Z|[-+]?\.(?:inf|Inf|INF)\Z|\.(?:nan|NaN|NAN)\Z"
)
_TIMESTAMP_RE = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}\Z|[0-9]{4}-[0-9]{1,2}-[0-9]{1,2}(?:[Tt]|[ \t]+)[0-9]{1,2}:[0-9]{2}:[0-9]{2}"
    r"(?:\.[0-9]*)?(?:[ \t]*(?:Z|[-+][0-9]{1,2}(?::[0-9]{2})?))?\Z"
)
_TAG = "tag:yaml.org,2002:"


def _int(text: str) -> int | str:
    """A YAML 1.2 integer as ruamel handed it on: 0o-octal as '0o...' text, digits with leading zeros
    (0644, 0x00F, 0b0101) as zero-padded decimal text, which mode fields read as octal; else an int."""
    digits = text.replace("_", "")
    sign = 1
    if digits[:1] in ("+", "-"):
        sign = -1 if digits[0] == "-" else 1
        digits = digits[1:]
    try:
        prefix = digits[:2]
        if prefix == "0o":
            return f"0o{sign * int(digits[2:], 8):o}"
        if prefix in ("0b", "0x"):
            value = sign * int(digits[2:], 2 if prefix == "0b" else 16)
            width = len(digits) - 2 if digits[2:3] == "0" else 0
        else:
            value = sign * int(digits)
            width = len(digits) if digits[:1] == "0" else 0
    except ValueError:
        return text  # `_`: no digits at all
    shown = str(value)
    return shown.zfill(width) if width > len(shown) and value >= 0 else value


def _float(text: str) -> float:
    digits = text.replace("_", "").lower()
    if digits.endswith("inf"):
        return -math.inf if digits[0] == "-" else math.inf
    if digits.endswith("nan"):
        return math.nan
    return float(digits)


def _timestamp(text: str) -> str:
    """Dates and times are text to the schema, in the form ruamel gave them (ISO, microseconds)."""
    if len(text) == 10:
        return text
    try:
        node = yaml.ScalarNode(_TAG + "timestamp", text)
        stamp = yaml.constructor.SafeConstructor().construct_yaml_timestamp(node)
    except (ValueError, TypeError):
        return text
    sep = "T" if "T" in text or "t" in text else " "
    return stamp.isoformat(sep) if isinstance(stamp, datetime.datetime) else str(stamp)


def _plain_scalar(text: str) -> Any:
    if not text:
        return None
    first = text[0]
    if first in "tTfF":
        return _BOOLS.get(text, text)
    if first in "~nN":
        return None if text in _NULLS else text
    if first in _NUMBER_START:
        if _FLOAT_RE.match(text):
            return _float(text)
        if _INT_RE.match(text):
            return _int(text)
        if _TIMESTAMP_RE.match(text):
            return _timestamp(text)
    return text


def _tagged_scalar(tag: str, text: str) -> Any:
    """A scalar with an explicit tag: the core ones as their types, anything else as its text."""
    kind = tag[len(_TAG):] if tag.startswith(_TAG) else None
    try:
        if kind == "int":
            value = _int(text)
            return int(text) if isinstance(value, str) and not value.isdigit() else value
        if kind == "float":
            return _float(text)
        if kind == "bool":
            return _BOOLS[text]
        if kind == "null":
            return None
        if kind == "timestamp":
            return _timestamp(text)
        if kind == "binary":
            return str(base64.decodebytes(text.encode("ascii")))
    except (ValueError, KeyError, UnicodeError, base64.binascii.Error):
        pass
    return text


def _hashable(key: Any) -> Any:
    """A mapping key that is itself a list or a mapping (`? [a, b]`), made a key Python can hash."""
    if isinstance(key, list):
        return tuple(_hashable(k) for k in key)
    if isinstance(key, dict):
        return tuple((k, _hashable(v)) for k, v in key.items())
    return key


def _compose(text: str, depth: int | None = None) -> tuple[Any, Lines]:
    """One pass over libyaml's events: plain data, the line of every key and list item (``depth``: of
    those at most that many levels deep), and the bounds (anchors and aliases, depth, duplicate keys,
    one document) checked as the events arrive."""
    lines: Lines = {(): 1}
    deep = MAX_DEPTH + 1 if depth is None else depth  # a key or item at len(path) >= deep: no line kept
    parser = _CParser(text)
    get_event = parser.get_event
    Scalar, SeqStart, MapStart = yaml.ScalarEvent, yaml.SequenceStartEvent, yaml.MappingStartEvent
    SeqEnd, MapEnd, Alias = yaml.SequenceEndEvent, yaml.MappingEndEvent, yaml.AliasEvent
    DocStart, StreamEnd = yaml.DocumentStartEvent, yaml.StreamEndEvent
    plain = _plain_scalar
    # One frame per open collection: [container, path, is_mapping, pending key, its line, its mark, the
    # collection's mark].
    stack: list[list[Any]] = []
    top: list[Any] | None = None
    root: Any = None
    documents = 0
    try:
        while True:
            event = get_event()
            cls = type(event)
            if cls is Scalar or cls is MapStart or cls is SeqStart or cls is Alias:
                if cls is Alias or event.anchor is not None:
                    raise _Refused(*anchor_problem(event))  # type: ignore[misc]
                if len(stack) >= MAX_DEPTH:
                    raise _Refused(event.start_mark.line + 1, f"nested more than {MAX_DEPTH} levels deep: "
                                   "not a policy")
                if cls is Scalar:
                    tag = event.tag
                    if tag is None:
                        value = event.value if event.style else plain(event.value)  # '' is plain
                    elif tag == "!" or tag == _TAG + "str":
                        value = event.value
                    else:
                        value = _tagged_scalar(tag, event.value)
                    mark = event.start_mark
                else:
                    mark = event.start_mark
                    if top is None:
                        path: tuple[Any, ...] = ()
                    elif top[2]:
                        path = (*top[1], top[3]) if top[4] is not None else (*top[1], None)
                    else:
                        path = (*top[1], len(top[0]))
                    top = [{} if cls is MapStart else [], path, cls is MapStart, None, None, None, mark]
                    stack.append(top)
                    continue
            elif cls is MapEnd or cls is SeqEnd:
                frame = stack.pop()
                value, mark = frame[0], frame[6]
                top = stack[-1] if stack else None
            elif cls is DocStart:
                documents += 1
                if documents > 1:
                    raise yaml.MarkedYAMLError("expected a single document in the stream", None,
                                               "but found another document", event.start_mark)
                continue
            elif cls is StreamEnd:
                return root, lines
            else:
                continue  # stream start, document end
            # A complete node: the value of the frame on top (or the document).
            if top is None:
                root = value
            elif not top[2]:
                items = top[0]
                if len(top[1]) < deep:
                    lines[(*top[1], len(items))] = mark.line + 1
                items.append(value)
            elif top[4] is None:
                top[3] = _hashable(value) if isinstance(value, list | dict) else value
                top[4] = mark.line + 1
                top[5] = mark
            else:
                mapping, key = top[0], top[3]
                if key in mapping:
                    old = mapping[key]
                    problem = f'found duplicate key "{key}" with value "{value}" (original value: "{old}")'
                    raise yaml.MarkedYAMLError("while constructing a mapping", None, problem, top[5])
                if len(top[1]) < deep:
                    lines[(*top[1], key)] = top[4]
                mapping[key] = value
                top[4] = None
    finally:
        parser.dispose()


def read_yaml(text: str, source: str, depth: int | None = None) -> tuple[Any, Lines]:
    """Plain data (dict/list/str/int/bool/None) and the 1-based line of every key and list item (with
    ``depth``, only of those whose path has at most ``depth`` steps, such as ``("rules", 3)``)."""
    if len(text) > MAX_POLICY_BYTES:  # characters: at least as many bytes
        raise PolicyError([Problem(source, 0, "", _too_large(len(text.encode("utf-8", "surrogatepass"))))])
    try:
        return _compose(text, depth)
    except _Refused as err:
        raise PolicyError([Problem(source, err.line, "", str(err))]) from None
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        line = mark.line + 1 if mark is not None else 0
        if "maximum nesting depth" in str(err.problem):  # libyaml's own bound (1000), met scanning ahead
            message = f"nested more than {MAX_DEPTH} levels deep: not a policy"
            raise PolicyError([Problem(source, line, "", message)]) from None
        what = " ".join(str(p) for p in (err.context, err.problem) if p)
        raise PolicyError([Problem(source, line, "", f"not valid YAML: {what}")]) from None
    except yaml.reader.ReaderError as err:
        # A character YAML does not allow: libyaml counts characters from the start; name its line.
        line = text.count("\n", 0, err.position) + 1 if isinstance(err.position, int) else 0
        raise PolicyError([Problem(source, line, "", f"not valid YAML: {err.reason}")]) from None
    except yaml.YAMLError as err:
        raise PolicyError([Problem(source, 0, "", f"not valid YAML: {err}")]) from None
    except UnicodeError:
        raise PolicyError([Problem(source, 0, "", "not valid YAML: not UTF-8 text")]) from None


def _too_large(size: int) -> str:
    return f"{size} bytes or more: larger than a policy may be ({MAX_POLICY_BYTES} bytes); not parsed"


def read_bounded(f: Any) -> bytes:
    """Up to MAX_POLICY_BYTES + 1 bytes from a binary file: enough to know it is too large, never more
    (a policy path that names a huge file or /dev/zero must not be read whole)."""
    chunks = []
    left = MAX_POLICY_BYTES + 1
    while left > 0:
        chunk = f.read(left)
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


Reader = Callable[[str], bytes]  # a file name relative to the policy's directory -> its bytes


def dir_reader(dir_fd: int) -> Reader:
    """Included files read through the policy's directory fd (a reload after chroot has nothing else),
    never above it: openat2 RESOLVE_BENEATH refuses '..' and symlinks that leave it."""
    from gateway import syscalls

    def read(name: str) -> bytes:
        fd = syscalls.openat2(dir_fd, name.encode("utf-8", "surrogateescape"), os.O_RDONLY, 0,
                              syscalls.RESOLVE_BENEATH | syscalls.RESOLVE_NO_MAGICLINKS)
        with os.fdopen(fd, "rb") as f:
            return read_bounded(f)

    return read


def load_policy(path: str | os.PathLike[str]) -> Policy:
    source = os.fspath(path)
    try:
        with open(source, "rb") as f:
            raw = read_bounded(f)
    except OSError as err:
        raise PolicyError([Problem(source, 0, "", f"cannot read the policy: {err.strerror}")]) from None
    base = Path(source).resolve().parent
    if b"include" not in raw:  # no includes can be read: no directory fd to open
        return _load(raw, source, base, None)
    try:
        dir_fd = os.open(base, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as err:
        why = f"cannot open the policy's directory: {err.strerror}"
        raise PolicyError([Problem(source, 0, "", why)]) from None
    try:
        return _load(raw, source, base, dir_reader(dir_fd))
    finally:
        os.close(dir_fd)


def load_policy_text(text: str, source: str = "<policy>") -> Policy:
    return _load(text.encode("utf-8"), source, None, None)


def load_policy_bytes(raw: bytes, source: str = "<policy>", reader: Reader | None = None) -> Policy:
    """A policy file's bytes as read (a reload through the policy's directory fd, which ``reader`` reads
    its includes through): not UTF-8 is a problem with its line, like any other."""
    return _load(raw, source, None, reader)


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Loading builds hundreds of thousands of small objects (YAML nodes, closures, trie nodes), and the
    cyclic collector rescans them all again and again: a 10,000-rule policy compiled 3x slower with it
    on. Nothing built here needs collecting before the load ends, so the collector waits until then.

    When it resumes, everything the load allocated is in the youngest generation, and the first young
    collection would walk all of it (1.5 s after a 10,000-rule load). A compiled policy is long-lived, so
    the objects are handed to the oldest generation instead (freeze then unfreeze: two list splices, no
    walk); any garbage among them goes at the next full collection, as it would have after surviving."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.freeze()
            gc.unfreeze()
            gc.enable()


def _load(raw: bytes, source: str, base: Path | None, reader: Reader | None) -> Policy:
    with _gc_paused():
        with globs.compile_cache():
            fields = _read(raw, source, base, reader)
        # The load's caches (programs and placements by pattern) and the text are gone before the index
        # is built: its peak is the resident size a serving gateway keeps.
        return Policy(**fields, compiled=compile_rules(fields["rules"], fields["default"],
                                                       fields["enforcement"]))


class _Unit:
    """One file of the policy: the policy's own or one it includes (directly or not)."""

    __slots__ = ("data", "doc", "lines", "main", "name", "raw", "source", "tests")

    def __init__(self, source: str, name: str, raw: bytes, data: Any, lines: Lines, main: bool) -> None:
        self.source, self.name, self.raw, self.main = source, name, raw, main
        self.data, self.lines = data, lines
        self.doc: Any = None
        self.tests: tuple[PolicyTest, ...] = ()


MAX_INCLUDES = 256  # files in one policy, all included files counted once
INCLUDED_KEYS = ("include", "vars", "rules", "tests")
_VAR = re.compile(r"\$\{([^}]*)\}")
_VAR_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def _decode(raw: bytes, source: str) -> str:
    if len(raw) > MAX_POLICY_BYTES:
        raise PolicyError([Problem(source, 0, "", _too_large(len(raw)))])
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise PolicyError([Problem(source, line, "", "not UTF-8 text")]) from None


def _gather(raw: bytes, source: str, reader: Reader | None, depth: int | None,
            problems: list[Problem]) -> list[_Unit]:
    """The policy's file and every file it includes, included ones first (each once), parsed."""
    units: list[_Unit] = []
    main_name = os.path.basename(source)
    _visit(raw, source, main_name, (main_name,), reader, depth, problems, units, {main_name},
           os.path.dirname(source))
    return units


def _visit(raw: bytes, source: str, name: str, chain: tuple[str, ...], reader: Reader | None,
           depth: int | None, problems: list[Problem], units: list[_Unit], seen: set[str],
           where: str) -> None:
    # A function of its own, not a closure calling itself: that would be a cycle holding every file's
    # parse, and the load freezes what the collector has not freed (_gc_paused).
    try:
        data, lines = read_yaml(_decode(raw, source), source, depth)
    except PolicyError as err:
        problems.extend(err.problems)
        return
    inc = data.pop("include", None) if isinstance(data, dict) else None
    if inc is not None:
        items = [inc] if isinstance(inc, str) else inc
        if not isinstance(items, list):
            problems.append(Problem(source, schema.line_of(("include",), lines), "include",
                                    "must be a list of file names, relative to this file"))
            items = []
        for j, item in enumerate(items):
            line, field = schema.line_of(("include", j), lines), f"include[{j}]"
            if not isinstance(item, str) or not item or "\0" in item:
                problems.append(Problem(source, line, field, "must be a file name"))
                continue
            target = posixpath.normpath(posixpath.join(posixpath.dirname(name), item))
            if item.startswith("/") or target == ".." or target.startswith("../"):
                problems.append(Problem(source, line, field, f"'{item}' is not beneath the policy's "
                                        "directory: an include names a file relative to the including "
                                        "one, inside the policy's directory (all a reload can read)"))
                continue
            if target in chain:
                cycle = " -> ".join((*chain, target))
                problems.append(Problem(source, line, field, f"include cycle: {cycle}"))
                continue
            if target in seen:
                continue  # included already (a diamond): its rules once
            seen.add(target)
            if len(seen) > MAX_INCLUDES:
                problems.append(Problem(source, line, field, f"more than {MAX_INCLUDES} files included"))
                return
            shown = os.path.join(where, target)
            if reader is None:
                problems.append(Problem(source, line, field, f"cannot read '{item}': a policy given as "
                                        "text has no directory to include from"))
                continue
            try:
                raw2 = reader(target)
            except OSError as err:
                why = ("it is not beneath the policy's directory" if err.errno == errno_mod.EXDEV
                       else err.strerror)
                problems.append(Problem(source, line, field, f"cannot read '{item}' ({shown}): {why}"))
                continue
            _visit(raw2, shown, target, (*chain, target), reader, depth, problems, units, seen, where)
    if not chain[1:] or isinstance(data, dict):
        units.append(_Unit(source, name, raw, data, lines, not chain[1:]))


def _variables(units: list[_Unit], problems: list[Problem]) -> tuple[dict[str, str], dict[str, str]]:
    """The named variables of every file (one namespace), and where each is defined."""
    values: dict[str, str] = {}
    defined: dict[str, str] = {}
    for unit in units:
        d = unit.data.pop("vars", None) if isinstance(unit.data, dict) else None
        if d is None:
            continue
        if not isinstance(d, dict):
            problems.append(Problem(unit.source, schema.line_of(("vars",), unit.lines), "vars",
                                    "must be a mapping of names to path text: {homes: /home/*}"))
            continue
        for name, value in d.items():
            line = schema.line_of(("vars", name), unit.lines)
            field = f"vars.{name}"
            if not isinstance(name, str) or not _VAR_NAME.match(name):
                problems.append(Problem(unit.source, line, field, "names are letters, digits and _"))
            elif name in model.PATH_VARS:
                problems.append(Problem(unit.source, line, field, f"${{{name}}} is the request's (or its "
                                        "object's): it cannot be defined"))
            elif not isinstance(value, str) or "${" in value:
                problems.append(Problem(unit.source, line, field, "must be path text without variables"))
            elif name in values and values[name] != value:
                problems.append(Problem(unit.source, line, field, f"defined again with another value (also "
                                        f"{defined[name]}: {values[name]!r})"))
            else:
                values[name] = value
                defined[name] = f"{unit.source}:{line}"
    return values, defined


def _substitute(unit: _Unit, values: dict[str, str], problems: list[Problem]) -> dict[int, dict[str, Any]]:
    """The rules' `paths` and `except` with the named variables replaced (in place); for each rule that
    uses ${uid}/${gid}, its templates (the schema sees them as `*`) and the variables it used."""
    out: dict[int, dict[str, Any]] = {}
    rules = unit.data.get("rules") if isinstance(unit.data, dict) else None
    if not isinstance(rules, list):
        return out
    for i, rule in enumerate(rules):
        if not isinstance(rule, dict):
            continue
        info: dict[str, Any] = {}
        used: dict[str, str] = {}
        for key in ("paths", "except"):
            pats = rule.get(key)
            if type(pats) is str:
                pats = [pats]
            if type(pats) is not list or not any(type(p) is str and "${" in p for p in pats):
                continue
            plain, tpl = [], []
            for j, pat in enumerate(pats):
                if type(pat) is not str or "${" not in pat:
                    plain.append(pat)
                    if key == "paths":
                        tpl.append(pat)
                    continue

                def one(m: re.Match[str], j: int = j, i: int = i, key: str = key,
                        used: dict[str, str] = used) -> str:
                    name = m.group(1)
                    if name in model.PATH_VARS:
                        return m.group(0)
                    if name in values:
                        used[name] = values[name]
                        return values[name]
                    known = ", ".join(sorted(values) + list(model.PATH_VARS))
                    problems.append(Problem(unit.source, schema.line_of(("rules", i, key, j), unit.lines),
                                            f"rules[{i}].{key}[{j}]", f"unknown variable ${{{name}}} "
                                            f"(known: {known}){schema.did_you_mean(name, sorted(values))}"))
                    return "x"

                text = _VAR.sub(one, pat)
                if any("${" + v + "}" in text for v in model.PATH_VARS):
                    tpl.append(text)
                    if key == "paths":
                        plain.append(_VAR.sub("*", text))  # the superset the index places
                else:
                    plain.append(text)
                    if key == "paths":
                        tpl.append(text)
            templated = any("${" in t for t in tpl if type(t) is str)
            if key == "paths":
                rule[key] = plain
                if templated:
                    info["paths"] = tuple(tpl)
            else:
                if templated:
                    info["except"] = tuple(t for t in tpl if type(t) is str)
                if plain:
                    rule[key] = plain
                else:
                    del rule[key]
        if used:
            info["vars"] = "; ".join(f"${{{k}}}={v}" for k, v in used.items())
        if info:
            out[i] = info
    return out


_Analysis = tuple[list[Problem], list[_Unit], dict[str, str], list[dict[int, Any]]]


def _analyse(raw: bytes, source: str, reader: Reader | None, depth: int | None) -> _Analysis:
    problems: list[Problem] = []
    units = _gather(raw, source, reader, depth, problems)
    if not units or not units[-1].main:
        return problems or [Problem(source, 1, "", "not a policy")], units, {}, []
    values, _defined = _variables(units, problems)
    templates = [_substitute(u, values, problems) for u in units]
    ids = {r.get("id") for u in units if isinstance(u.data, dict) and isinstance(u.data.get("rules"), list)
           for r in u.data["rules"] if isinstance(r, dict)}
    for unit in units:
        data = unit.data
        if not unit.main:
            if not isinstance(data, dict):
                problems.append(Problem(unit.source, 1, "", "an included file is a mapping: rules, tests..."))
                continue
            for key in data:
                if key not in INCLUDED_KEYS:
                    allowed = ", ".join(INCLUDED_KEYS)
                    problems.append(Problem(unit.source, schema.line_of((key,), unit.lines), str(key),
                                            f"not for an included file (it may have {allowed})"))
            data = {"version": 1, "default": "deny", **{k: data[k] for k in ("rules", "tests") if k in data}}
        found, unit.doc, unit.tests = _checked(data, unit.lines, unit.source, ids)
        if not unit.main:
            unit.tests = tuple(dataclasses.replace(t, file=unit.source) for t in unit.tests)
        problems += found
    if len(units) > 1:
        problems += _duplicates_across(units)
    return problems, units, values, templates


def _duplicates_across(units: list[_Unit]) -> list[Problem]:
    """Rule ids are one namespace across the files (each file's own duplicates are _semantic's)."""
    problems = []
    first: dict[Any, tuple[_Unit, int]] = {}
    for unit in units:
        rules = unit.data.get("rules") if isinstance(unit.data, dict) else None
        for i, rule in enumerate(rules if isinstance(rules, list) else []):
            rid = rule.get("id") if isinstance(rule, dict) else None
            if not isinstance(rid, str):
                continue
            if rid in first and first[rid][0] is not unit:
                other, j = first[rid]
                problems.append(Problem(unit.source, schema.line_of(("rules", i, "id"), unit.lines),
                                        f"rules[{i}].id", f"duplicate rule id '{rid}' (also "
                                        f"{other.source}:{schema.line_of(('rules', j), other.lines)})"))
            first.setdefault(rid, (unit, i))
    return problems


def _read(raw: bytes, source: str, base: Path | None, reader: Reader | None) -> dict[str, Any]:
    """The policy's fields, all but its compiled index; PolicyError listing every problem."""
    _decode(raw, source)
    # A valid policy needs the lines of its rules and tests, and of its top-level keys: two steps deep.
    # Every key's and item's line (80,000 at 10,000 rules, a tenth of the parse's memory) is needed
    # only to word a problem, so when there is one, the text is read again, keeping them all.
    problems, units, values, templates = _analyse(raw, source, reader, 2)
    if problems:
        problems = _analyse(raw, source, reader, None)[0]
        raise PolicyError(problems)
    main = units[-1]
    doc = main.doc
    rules_list: list[Rule] = []
    for unit, tpls in zip(units, templates, strict=True):
        file = "" if unit.main else unit.source
        for i, r in enumerate(unit.doc.get("rules") or []):
            rules_list.append(_build_rule(len(rules_list), r, unit.lines, i, file, tpls.get(i)))
    rules = tuple(rules_list)
    tests = tuple(t for u in units for t in u.tests)
    if len(units) == 1:
        digest = hashlib.sha256(raw).hexdigest()
    else:  # every file, by name, in include order: an edit anywhere is another policy
        h = hashlib.sha256()
        for unit in units:
            h.update(b"%d:%s\0%s\0" % (unit.main, unit.name.encode("utf-8", "surrogateescape"),
                                         hashlib.sha256(unit.raw).hexdigest().encode()))
        digest = h.hexdigest()
    audit_path = (doc.get("audit") or {}).get("path")
    if audit_path is not None and base is not None and not os.path.isabs(audit_path):
        audit_path = str(base / audit_path)  # relative to the policy file, not to wherever we run
    enforcement = doc.get("enforcement", "enforce")
    lines = main.lines
    fields = {
        "source": source,
        "hash": digest,
        "version": doc["version"],
        "tenant": doc.get("tenant", "default"),
        "default": doc["default"],
        "enforcement": enforcement,
        "rules": rules,
        "tests": tests,
        "audit_path": audit_path,
        "ids": _build_ids(doc.get("ids"), lines),
        "limits": _build_limits(doc.get("limits")),
        "vars": values,
        "includes": tuple(u.name for u in units if not u.main),
    }
    return fields  # the document and its lines go here: some 10 MB at 10,000 rules


def _checked(data: Any, lines: Lines, source: str,
             ids: set[Any] | None = None) -> tuple[list[Problem], Any, tuple[PolicyTest, ...]]:
    """Every problem of the document (schema, semantic, tests), the normalised document and the tests."""
    problems, doc = schema.validate(data, lines, source)
    if not isinstance(doc, dict):
        return problems or [Problem(source, 1, "", "not a policy")], doc, ()
    problems += _semantic(doc, lines, source)
    tests, test_problems = _build_tests(doc, lines, source, ids)
    return problems + test_problems, doc, tests


def _semantic(doc: dict[str, Any], lines: Lines, source: str) -> list[Problem]:
    """Checks across fields, which a per-field schema cannot express. Defensive: the doc may be invalid."""
    problems = []
    first: dict[str, int] = {}
    rules = doc.get("rules") if isinstance(doc.get("rules"), list) else []
    for i, rule in enumerate(rules):  # type: ignore[arg-type]
        if not isinstance(rule, dict):
            continue
        rid = rule.get("id")
        if isinstance(rid, str):
            if rid in first:
                problems.append(Problem(source, schema.line_of(("rules", i, "id"), lines), f"rules[{i}].id",
                                        f"duplicate rule id '{rid}' (also rules[{first[rid]}], line "
                                        f"{schema.line_of(('rules', first[rid]), lines)})"))
            else:
                first[rid] = i
        if rule.get("effect") == "allow":
            for key, why in (("errno", "an allow rule never refuses"),
                             ("enforce", "it keeps denials enforced; an allow rule denies nothing")):
                if key in rule:
                    problems.append(Problem(source, schema.line_of(("rules", i, key), lines),
                                            f"rules[{i}].{key}", f"only for deny rules: {why}"))
        for block in ("when", "unless"):
            cond = rule.get(block)
            if isinstance(cond, dict) and isinstance(cond.get("length_min"), int) and isinstance(
                cond.get("length_max"), int) and cond["length_min"] > cond["length_max"]:
                problems.append(Problem(source, schema.line_of(("rules", i, block, "length_min"), lines),
                                        f"rules[{i}].{block}", "length_min is above length_max: nothing "
                                        "can match"))
    audit = doc.get("audit")
    if isinstance(audit, dict) and isinstance(audit.get("path"), str) and "\0" in audit["path"]:
        problems.append(Problem(source, schema.line_of(("audit", "path"), lines), "audit.path",
                                "must not contain a NUL character"))
    return problems + _ids_problems(doc.get("ids"), lines, source)


def _id_ranges(entries: Any) -> list[idmap.IdRange] | None:
    """The ranges of ``ids.uid`` or ``ids.gid`` if the schema let every one through, else None (the
    schema has said what is wrong; a range check on half of them would only add noise)."""
    if isinstance(entries, dict):
        entries = [entries]  # a single range, as the schema accepts it
    if not isinstance(entries, list):
        return None
    out = []
    for entry in entries:
        if not isinstance(entry, dict):
            return None
        values = [entry.get(k) for k in ("guest", "host", "count")]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            return None
        guest, host, count = values
        if not (0 <= guest <= idmap.ID_LAST and 0 <= host <= idmap.ID_LAST and 1 <= count <= idmap.NO_ID):
            return None  # the schema's bounds; ranges that fit are the loader's
        out.append(idmap.IdRange(*values))
    return out


def _ids_problems(ids: Any, lines: Lines, source: str) -> list[Problem]:
    """Ranges that overlap, or run past the last id: the schema sees one number at a time."""
    if not isinstance(ids, dict):
        return []
    problems = []
    for kind in ("uid", "gid"):
        ranges = _id_ranges(ids.get(kind))

        def name(j: int, kind: str = kind) -> str:
            return f"ids.{kind}[{j}] (line {schema.line_of(('ids', kind, j), lines)})"

        for i, message in idmap.range_problems(ranges or [], name):
            problems.append(Problem(source, schema.line_of(("ids", kind, i), lines), f"ids.{kind}[{i}]",
                                    message))
    return problems


def _build_ids(d: dict[str, Any] | None, lines: Lines) -> idmap.IdMap | None:
    if d is None:
        return None
    return idmap.IdMap(
        uid=tuple(_id_ranges(d["uid"]) or ()),
        gid=tuple(_id_ranges(d["gid"]) or ()),
        unmapped=d.get("unmapped", "forbid"),
        squash_uid=d.get("squash_uid", idmap.DEFAULT_SQUASH),
        squash_gid=d.get("squash_gid", idmap.DEFAULT_SQUASH),
        line=schema.line_of(("ids",), lines),
    )


def _build_limits(d: dict[str, Any] | None) -> model.Limits:
    d = d or {}
    rate = d.get("rate") or {}
    truncate_max = d.get("truncate_max")
    return model.Limits(
        requests_per_second=rate.get("requests_per_second"),
        burst=rate.get("burst"),
        truncate_max=model.parse_size(truncate_max) if truncate_max is not None else None,
        open_fds=d.get("open_fds"),
    )


def _ids(values: list[Any] | None) -> tuple[tuple[int, int], ...] | None:
    return None if values is None else tuple(sorted({model.parse_id_range(v) for v in values}))


def _bits(values: list[Any] | None) -> int | None:
    if values is None:
        return None
    mask = 0
    for value in values:
        mask |= model.parse_mode_bit(value)
    return mask


def _types(values: list[Any] | None) -> frozenset[int] | None:
    return None if values is None else frozenset(model.parse_file_type(v) for v in values)


def _flags(values: list[Any] | None) -> tuple[model.FlagTest, ...] | None:
    return None if values is None else tuple(model.parse_flag(v) for v in values)


def _globs(values: list[str] | None) -> GlobSet | None:
    return None if values is None else GlobSet.compile(values)


_NO_CONDITIONS = Conditions()  # one for every rule without a `when` (frozen: safely shared)


def _conditions(d: dict[str, Any] | None) -> Conditions:
    if not d:
        return _NO_CONDITIONS
    obj = d.get("object")
    return Conditions(
        uid=_ids(d.get("uid")),
        gid=_ids(d.get("gid")),
        mode_any=_bits(d.get("mode_any")),
        mode_all=_bits(d.get("mode_all")),
        mode_none=_bits(d.get("mode_none")),
        type=_types(d.get("type")),
        flags_any=_flags(d.get("flags_any")),
        flags_all=_flags(d.get("flags_all")),
        flags_none=_flags(d.get("flags_none")),
        target=_globs(d.get("target")),
        target_except=_globs(d.get("target_except")),
        target_resolved=_globs(d.get("target_resolved")),
        target_absolute=d.get("target_absolute"),
        target_dotdot=d.get("target_dotdot"),
        length_min=d.get("length_min"),
        length_max=d.get("length_max"),
        xattr=_globs(d.get("xattr")),
        xattr_except=_globs(d.get("xattr_except")),
        object=None if obj is None else ObjectConditions(
            owner=None if obj.get("owner") == ["self"] else _ids(obj.get("owner")),
            group=None if obj.get("group") == ["self"] else _ids(obj.get("group")),
            owner_self=obj.get("owner") == ["self"],
            group_self=obj.get("group") == ["self"],
            type=_types(obj.get("type")),
            mode_any=_bits(obj.get("mode_any")),
            mode_all=_bits(obj.get("mode_all")),
            mode_none=_bits(obj.get("mode_none")),
        ),
    )


# A rule's slots, one frozenset per distinct set (rules share a handful: [write], [all], ...); likewise
# its ops as written and its effect.
_SLOT_SETS: dict[frozenset[int], frozenset[int]] = {}
_SHARED: dict[Any, Any] = {}


def _shared(value: Any) -> Any:
    if len(_SHARED) > 4096:  # generated ops lists are a handful; anything else is not worth keeping
        _SHARED.clear()
    return _SHARED.setdefault(value, value)


def _build_rule(index: int, d: dict[str, Any], lines: Lines, local: int | None = None, file: str = "",
                tpl: dict[str, Any] | None = None) -> Rule:
    slots: frozenset[int] = frozenset()
    for op in d["ops"]:
        slots |= model.op_slots(op) or frozenset()
    slots = _SLOT_SETS.setdefault(slots, slots)
    deny = d["effect"] == "deny"
    errno = names.errno_from_name(d.get("errno", "EACCES")) if deny else 0
    return Rule(
        id=d["id"],
        effect=_shared(d["effect"]),
        ops=_shared(tuple(_shared(op) for op in d["ops"])),
        slots=slots,
        paths=_globs(d.get("paths")),
        except_=_globs(d.get("except")),
        errno=errno,
        always=d.get("enforce") == "always",
        description=d.get("description", ""),
        when=_conditions(d.get("when")),
        unless=_conditions(d["unless"]) if d.get("unless") is not None else None,
        line=schema.line_of(("rules", index if local is None else local), lines),
        index=index,
        paths_tpl=tpl.get("paths") if tpl else None,
        except_tpl=tpl.get("except") if tpl else None,
        file=file,
        vars_text=tpl.get("vars", "") if tpl else "",
    )


def _build_tests(
    doc: dict[str, Any], lines: Lines, source: str, ids: set[Any] | None = None
) -> tuple[tuple[PolicyTest, ...], list[Problem]]:
    tests = []
    problems = []
    if ids is None:
        ids = {r.get("id") for r in doc.get("rules") or [] if isinstance(r, dict)}
    entries = doc.get("tests") if isinstance(doc.get("tests"), list) else []
    for i, entry in enumerate(entries):  # type: ignore[arg-type]
        if not isinstance(entry, dict) or "request" not in entry or entry.get("expect") is None:
            continue  # the schema has said what is wrong with it
        here = ("tests", i)
        request = entry["request"]
        try:
            spec = requests.from_mapping(request, yaml_ints=True)
            obj = spec.object
            if entry.get("object"):
                obj = requests.object_attrs(entry["object"], yaml_ints=True)
        except requests.RequestError as err:
            sub = (*here, "request", err.field) if isinstance(request, dict) and err.field in request else (
                *here, "request")
            field = f"tests[{i}].request" + (f".{err.field}" if err.field else "")
            problems.append(Problem(source, schema.line_of(sub, lines), field, err.message))
            continue
        rule = entry.get("rule")
        if isinstance(rule, str) and rule not in ids:
            hint = schema.did_you_mean(rule, sorted(str(x) for x in ids if isinstance(x, str)))
            problems.append(Problem(source, schema.line_of((*here, "rule"), lines), f"tests[{i}].rule",
                                    f"no rule has the id '{rule}'{hint}"))
            continue
        errno = entry.get("errno")
        tests.append(PolicyTest(
            index=i,
            line=schema.line_of(here, lines),
            name=entry.get("name") or entry.get("description") or "",
            request=spec.request,
            object=obj,
            expect=entry["expect"],
            rule=rule,
            rule_given="rule" in entry,
            errno=names.errno_from_name(errno) if errno is not None else None,
            text=requests.describe(spec.request, obj),
        ))
    return tuple(tests), problems
