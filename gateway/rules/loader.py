"""Policy files in, compiled policies out: YAML with line marks -> schema -> model -> index.

Every problem found on the way is collected with its line; an invalid policy raises PolicyError listing
them all and is never returned, so it can never be served.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.composer import Composer, MaxDepthExceededError
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.scalarint import OctalInt, ScalarInt

from gateway import names
from gateway.rules import idmap, model, requests, schema
from gateway.rules.compiler import compile_rules
from gateway.rules.globs import GlobSet
from gateway.rules.model import Conditions, ObjectConditions, Policy, PolicyError, PolicyTest, Problem, Rule

Lines = dict[tuple[Any, ...], int]

# The largest policy (or --requests file) read. Loading costs about 250 bytes of memory and 30 µs per byte
# of YAML (ruamel's round-trip loader, which keeps every line): 4 MiB is about 1 GiB and two minutes, and
# some 30,000 rules; a 10,000-rule policy is 1.3 MB. A larger file is refused unread, never parsed.
MAX_POLICY_BYTES = 4 << 20
# Deeper nesting is no policy (one nests six levels); without a bound, 100,000 '[' ran out of stack.
MAX_DEPTH = 64


def anchor_problem(event: Any) -> tuple[int, str] | None:
    """(1-based line, message) if this YAML parse event is an alias or carries an anchor, else None.

    Aliases make a small document a huge one: nine levels of nine aliases, a few hundred bytes, expand to
    387 million scalars (`gateway check` grew to 3.1 GiB). A policy has no need of them, so they are
    refused, not bounded. Written for the event stream, which ruamel and PyYAML share (AliasEvent; the
    anchor and start_mark attributes), so that a change of parser keeps the check: with PyYAML's C loader,
    run it over ``yaml.parse(text, Loader=yaml.CSafeLoader)`` before loading.
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


class _NoAliasComposer(Composer):  # type: ignore[misc]
    """ruamel's composer, asking anchor_problem() about each node before composing it (no extra pass)."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        problem = anchor_problem(self.parser.peek_event())
        if problem is not None:
            raise _Refused(*problem)
        return super().compose_node(parent, index)


def read_yaml(text: str, source: str) -> tuple[Any, Lines]:
    """Plain data (dict/list/str/int/bool/None) and the 1-based line of every key and list item."""
    if len(text) > MAX_POLICY_BYTES:  # characters: at least as many bytes
        raise PolicyError([Problem(source, 0, "", _too_large(len(text.encode("utf-8", "surrogatepass"))))])
    yaml = YAML(typ="rt")
    yaml.Composer = _NoAliasComposer
    yaml.max_depth = MAX_DEPTH
    try:
        node = yaml.load(text)
    except _Refused as err:
        raise PolicyError([Problem(source, err.line, "", str(err))]) from None
    except MaxDepthExceededError as err:
        line = err.problem_mark.line + 1 if err.problem_mark is not None else 0
        message = f"nested more than {MAX_DEPTH} levels deep: not a policy"
        raise PolicyError([Problem(source, line, "", message)]) from None
    except MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        line = mark.line + 1 if mark is not None else 0
        what = " ".join(str(p) for p in (err.context, err.problem) if p)
        raise PolicyError([Problem(source, line, "", f"not valid YAML: {what}")]) from None
    except YAMLError as err:
        raise PolicyError([Problem(source, 0, "", f"not valid YAML: {err}")]) from None
    lines: Lines = {(): 1}
    return _plain(node, (), lines), lines


def _plain(node: Any, path: tuple[Any, ...], lines: Lines) -> Any:
    if isinstance(node, CommentedMap):
        out = {}
        for key, value in node.items():
            lines[(*path, key)] = node.lc.key(key)[0] + 1
            out[key] = _plain(value, (*path, key), lines)
        return out
    if isinstance(node, CommentedSeq):
        items = []
        for i, value in enumerate(node):
            lines[(*path, i)] = node.lc.item(i)[0] + 1
            items.append(_plain(value, (*path, i), lines))
        return items
    if isinstance(node, bool) or node is None:
        return node
    if isinstance(node, OctalInt):
        return f"0o{int(node):o}"  # keep it recognisably octal for modes
    if isinstance(node, ScalarInt):
        width = getattr(node, "_width", None) or 0
        text = str(int(node))
        # 0644 was written with a leading zero: YAML 1.2 reads it as decimal 644, people mean octal. Hand
        # the digits on as text so that mode fields read them as octal (and id fields as plain numbers).
        return text.zfill(width) if width > len(text) and int(node) >= 0 else int(node)
    if isinstance(node, int):
        return int(node)
    if isinstance(node, float):
        return float(node)
    if isinstance(node, str):
        return str(node)
    return str(node)  # dates and other YAML types: text, which the schema will then judge


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


def load_policy(path: str | os.PathLike[str]) -> Policy:
    source = os.fspath(path)
    try:
        with open(source, "rb") as f:
            raw = read_bounded(f)
    except OSError as err:
        raise PolicyError([Problem(source, 0, "", f"cannot read the policy: {err.strerror}")]) from None
    return _load(raw, source, Path(source).resolve().parent)


def load_policy_text(text: str, source: str = "<policy>") -> Policy:
    return _load(text.encode("utf-8"), source, None)


def load_policy_bytes(raw: bytes, source: str = "<policy>") -> Policy:
    """A policy file's bytes as read (a reload through the policy's directory fd): not UTF-8 is a problem
    with its line, like any other."""
    return _load(raw, source, None)


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Loading builds hundreds of thousands of small objects (YAML nodes, closures, trie nodes), and the
    cyclic collector rescans them all again and again: a 10,000-rule policy compiled 3x slower with it
    on. Nothing built here needs collecting before the load ends, so the collector waits until then."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _load(raw: bytes, source: str, base: Path | None) -> Policy:
    with _gc_paused():
        return _load_unpaused(raw, source, base)


def _load_unpaused(raw: bytes, source: str, base: Path | None) -> Policy:
    if len(raw) > MAX_POLICY_BYTES:
        raise PolicyError([Problem(source, 0, "", _too_large(len(raw)))])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise PolicyError([Problem(source, line, "", "not UTF-8 text")]) from None
    data, lines = read_yaml(text, source)
    problems, doc = schema.validate(data, lines, source)
    if not isinstance(doc, dict):
        raise PolicyError(problems)
    problems += _semantic(doc, lines, source)
    tests, test_problems = _build_tests(doc, lines, source)
    problems += test_problems
    if problems:
        raise PolicyError(problems)
    rules = tuple(_build_rule(i, r, lines) for i, r in enumerate(doc.get("rules") or []))
    audit_path = (doc.get("audit") or {}).get("path")
    if audit_path is not None and base is not None and not os.path.isabs(audit_path):
        audit_path = str(base / audit_path)  # relative to the policy file, not to wherever we run
    enforcement = doc.get("enforcement", "enforce")
    return Policy(
        source=source,
        hash=hashlib.sha256(raw).hexdigest(),
        version=doc["version"],
        tenant=doc.get("tenant", "default"),
        default=doc["default"],
        enforcement=enforcement,
        rules=rules,
        tests=tests,
        audit_path=audit_path,
        compiled=compile_rules(rules, doc["default"], enforcement),
        ids=_build_ids(doc.get("ids"), lines),
        limits=_build_limits(doc.get("limits")),
    )


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


def _conditions(d: dict[str, Any] | None) -> Conditions:
    d = d or {}
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
            owner=_ids(obj.get("owner")),
            group=_ids(obj.get("group")),
            type=_types(obj.get("type")),
            mode_any=_bits(obj.get("mode_any")),
            mode_all=_bits(obj.get("mode_all")),
            mode_none=_bits(obj.get("mode_none")),
        ),
    )


def _build_rule(index: int, d: dict[str, Any], lines: Lines) -> Rule:
    slots: frozenset[int] = frozenset()
    for op in d["ops"]:
        slots |= model.op_slots(op) or frozenset()
    deny = d["effect"] == "deny"
    errno = names.errno_from_name(d.get("errno", "EACCES")) if deny else 0
    return Rule(
        id=d["id"],
        effect=d["effect"],
        ops=tuple(d["ops"]),
        slots=slots,
        paths=_globs(d.get("paths")),
        except_=_globs(d.get("except")),
        errno=errno,
        always=d.get("enforce") == "always",
        description=d.get("description", ""),
        when=_conditions(d.get("when")),
        unless=_conditions(d["unless"]) if d.get("unless") is not None else None,
        line=schema.line_of(("rules", index), lines),
        index=index,
    )


def _build_tests(
    doc: dict[str, Any], lines: Lines, source: str
) -> tuple[tuple[PolicyTest, ...], list[Problem]]:
    tests = []
    problems = []
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
