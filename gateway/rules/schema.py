"""The policy's Cerberus schema, and Cerberus errors translated into operator's words.

Cerberus checks the shape (keys, types, allowed words); the ``check_with`` hooks below check the values
with the same parsers the compiler uses, so that anything that validates also compiles. Every error is
reported as ``file:line: field: message``; all of them at once, never just the first.
"""

from __future__ import annotations

import difflib
import math
import re
from typing import Any

from gateway import names
from gateway.rules import globs, idmap, model
from gateway.rules._cerberus import TypeDefinition, Validator, errors

RULE_ID_RE = r"[A-Za-z0-9][A-Za-z0-9_.:@/-]{0,127}"


def _list_of(item: dict[str, Any]) -> dict[str, Any]:
    # A single value is accepted where a list is expected (`ops: write`): one fewer thing to get wrong.
    return {"type": "list", "coerce": "listify", "empty": False, "schema": item}


IDS = _list_of({"type": ["integer", "string"], "check_with": "id_range"})
MODE_BITS = _list_of({"type": ["integer", "string"], "check_with": "mode_bit"})
FILE_TYPES = _list_of({"type": "string", "check_with": "file_type"})
FLAGS = _list_of({"type": "string", "check_with": "flag"})
PATH_GLOBS = _list_of({"type": "string", "empty": False, "check_with": "glob"})
NAME_GLOBS = _list_of({"type": "string", "empty": False, "check_with": "glob"})
LENGTH = {"type": "integer", "min": 0}

# `owner: self` / `group: self`: the request's uid / gid (alone: self with other ids would be an either-or
# the rule can say with two rules).
OBJECT_IDS = _list_of({"type": ["integer", "string"], "check_with": "object_id"})
OBJECT = {
    "type": "dict",
    "empty": False,
    "schema": {
        "owner": OBJECT_IDS,
        "group": OBJECT_IDS,
        "type": FILE_TYPES,
        "mode_any": MODE_BITS,
        "mode_all": MODE_BITS,
        "mode_none": MODE_BITS,
    },
}
CONDITIONS = {
    "type": "dict",
    "empty": False,
    "schema": {
        "uid": IDS,
        "gid": IDS,
        "mode_any": MODE_BITS,
        "mode_all": MODE_BITS,
        "mode_none": MODE_BITS,
        "type": FILE_TYPES,
        "flags_any": FLAGS,
        "flags_all": FLAGS,
        "flags_none": FLAGS,
        "target": NAME_GLOBS,
        "target_except": NAME_GLOBS,
        "target_resolved": PATH_GLOBS,
        "target_absolute": {"type": "boolean"},
        "target_dotdot": {"type": "boolean"},
        "length_min": LENGTH,
        "length_max": LENGTH,
        "xattr": NAME_GLOBS,
        "xattr_except": NAME_GLOBS,
        "object": OBJECT,
    },
}
ERRNO = {"type": ["string", "integer"], "check_with": "errno"}
RULE = {
    "type": "dict",
    "schema": {
        "id": {"type": "string", "required": True, "empty": False, "regex": RULE_ID_RE},
        "effect": {"type": "string", "required": True, "allowed": ["allow", "deny"]},
        "description": {"type": "string"},
        "ops": {**_list_of({"type": "string", "check_with": "op"}), "required": True},
        "paths": PATH_GLOBS,
        "except": PATH_GLOBS,
        "errno": ERRNO,
        "enforce": {"type": "string", "allowed": ["always"]},
        "when": CONDITIONS,
        "unless": CONDITIONS,
    },
}
# Object attributes a test (or a --requests entry) states for the lookup; unknown when left out.
OBJECT_ATTRS = {
    "type": "dict",
    "schema": {
        "owner": {"type": "integer", "min": 0},
        "group": {"type": "integer", "min": 0},
        "type": {"type": "string", "check_with": "file_type"},
        "mode": {"type": ["string", "integer"]},
    },
}
TEST = {
    "type": "dict",
    "schema": {
        "name": {"type": "string"},
        "description": {"type": "string"},
        "request": {"type": ["dict", "string"], "required": True, "empty": False},
        "object": OBJECT_ATTRS,
        "expect": {"type": "string", "required": True, "allowed": ["allow", "deny", "would-deny"]},
        "rule": {"type": "string", "nullable": True},
        "errno": ERRNO,
    },
}
# `ids:` the guest<->host id map (gateway/rules/idmap.py). Overlaps and ranges running past the last id are
# checked by the loader, which sees whole ranges.
ID = {"type": "integer", "min": 0, "max": idmap.ID_LAST}
ID_RANGE = {
    "type": "dict",
    "schema": {
        "guest": {**ID, "required": True},
        "host": {**ID, "required": True},
        "count": {"type": "integer", "required": True, "min": 1, "max": idmap.ID_LAST + 1},
    },
}
IDS = {
    "type": "dict",
    "schema": {
        # Both required: a map that forgot gid would leave guest gids unmapped (or, if that meant identity,
        # let the guest's root group be the host's).
        "uid": {**_list_of(ID_RANGE), "required": True},
        "gid": {**_list_of(ID_RANGE), "required": True},
        "unmapped": {"type": "string", "allowed": list(idmap.UNMAPPED_MODES)},
        "squash_uid": ID,
        "squash_gid": ID,
    },
}
POSITIVE = {"type": "integer", "min": 1}
LIMITS = {
    "type": "dict",
    "empty": False,
    "schema": {
        "rate": {
            "type": "dict",
            "schema": {
                "requests_per_second": {"type": "number", "required": True, "check_with": "positive"},
                "burst": POSITIVE,
            },
        },
        "truncate_max": {"type": ["integer", "string"], "check_with": "size"},
        "open_fds": POSITIVE,
    },
}
POLICY = {
    "version": {"type": "integer", "required": True, "allowed": [1]},
    "tenant": {"type": "string", "empty": False, "regex": r"[^\x00-\x1f]+"},
    "default": {"type": "string", "required": True, "allowed": ["allow", "deny"]},
    "enforcement": {"type": "string", "allowed": ["enforce", "permissive"]},
    "audit": {"type": "dict", "schema": {"path": {"type": "string", "required": True, "empty": False}}},
    "ids": IDS,
    "limits": LIMITS,
    "rules": {"type": "list", "nullable": True, "schema": RULE},  # `rules:` left empty: no rules
    "tests": {"type": "list", "nullable": True, "schema": TEST},
}

# Known keys per place in the document, for "unknown field ... (did you mean ...)".
_KEYS = {
    "top": list(POLICY),
    "rule": list(RULE["schema"]),
    "conditions": list(CONDITIONS["schema"]),
    "object": list(OBJECT["schema"]),
    "test": list(TEST["schema"]),
    "object_attrs": list(OBJECT_ATTRS["schema"]),
    "audit": ["path"],
    "ids": list(IDS["schema"]),
    "id_range": list(ID_RANGE["schema"]),
    "limits": list(LIMITS["schema"]),
    "rate": list(LIMITS["schema"]["rate"]["schema"]),
}


def did_you_mean(word: object, choices: list[str]) -> str:
    if not isinstance(word, str):
        return ""
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    if not close:
        close = [c for c in choices if c.lower() == word.lower()]
    return f" (did you mean '{close[0]}'?)" if close else ""


class PolicyValidator(Validator):  # type: ignore[misc]
    """Cerberus with the policy's value checks; messages are already in final form."""

    # Cerberus takes true/false for an integer (bool is an int in Python): `count: true` would be a count
    # of 1. A whole number here is never a bool.
    types_mapping = {**Validator.types_mapping, "integer": TypeDefinition("integer", (int,), (bool,))}

    def _normalize_coerce_listify(self, value: Any) -> Any:
        return value if isinstance(value, list) else [value]

    def _check_with_op(self, field: str, value: Any) -> None:
        if isinstance(value, str) and model.op_slots(value) is None:
            self._error(field, f"unknown op '{value}'{did_you_mean(value, list(model.OP_WORDS))}")

    def _check_with_glob(self, field: str, value: Any) -> None:
        if isinstance(value, str) and (why := globs.check_pattern(value)) is not None:
            self._error(field, f"bad pattern '{value}': {why}")

    def _check_with_id_range(self, field: str, value: Any) -> None:
        try:
            model.parse_id_range(value)
        except ValueError as err:
            self._error(field, str(err))

    def _check_with_object_id(self, field: str, value: Any) -> None:
        if value == "self":
            return  # the loader checks that it stands alone
        try:
            model.parse_id_range(value)
        except ValueError as err:
            self._error(field, f"{err}, or self (the request's own uid or gid)")

    def _check_with_mode_bit(self, field: str, value: Any) -> None:
        try:
            model.parse_mode_bit(value)
        except ValueError as err:
            self._error(field, f"{err}{did_you_mean(value, list(model.MODE_BITS))}")

    def _check_with_file_type(self, field: str, value: Any) -> None:
        if value not in names.FILE_TYPES:
            choices = ", ".join(names.FILE_TYPES)
            self._error(field, f"unknown file type '{value}'{did_you_mean(value, list(names.FILE_TYPES))}"
                        f" (one of {choices})")

    def _check_with_flag(self, field: str, value: Any) -> None:
        try:
            model.parse_flag(value)
        except ValueError as err:
            guess = value.strip().upper() if isinstance(value, str) else value
            self._error(field, f"{err}{did_you_mean(guess, list(model.FLAG_NAMES))}")

    def _check_with_positive(self, field: str, value: Any) -> None:
        if isinstance(value, int | float) and not (math.isfinite(value) and value > 0):
            self._error(field, f"must be a positive number, not {value}")

    def _check_with_size(self, field: str, value: Any) -> None:
        try:
            model.parse_size(value)
        except ValueError as err:
            self._error(field, str(err))

    def _check_with_errno(self, field: str, value: Any) -> None:
        if isinstance(value, bool) or (isinstance(value, int) and not 0 < value < 4096):
            self._error(field, f"errno {value!r} is not a positive errno number")
        elif isinstance(value, str):
            try:
                names.errno_from_name(value)
            except ValueError:
                import errno as errno_mod

                known = sorted(errno_mod.errorcode.values())
                self._error(field, f"unknown errno '{value}'{did_you_mean(value.upper(), known)}")


def _context(path: tuple[Any, ...]) -> str:
    """Which kind of mapping a document path points into."""
    if not path:
        return "top"
    if path[0] in ("audit", "ids", "limits"):
        if path[0] == "ids" and len(path) >= 3:
            return "id_range"
        if path[0] == "limits" and len(path) >= 2:
            return "rate"
        return str(path[0])
    if path[0] == "rules":
        if len(path) == 2:
            return "rule"
        if len(path) >= 4 and path[3] == "object":
            return "object"
        return "conditions"
    if path[0] == "tests":
        return "object_attrs" if len(path) >= 3 and path[2] == "object" else "test"
    return "top"


def format_field(path: tuple[Any, ...], data: Any) -> str:
    """``('rules', 2, 'ops', 1)`` -> ``rules[2].ops``: a scalar list item is named by its list."""
    node = data
    parts: list[str] = []
    for i, step in enumerate(path):
        is_last = i == len(path) - 1
        try:
            node = node[step]
        except (KeyError, IndexError, TypeError):
            node = None
        if isinstance(step, int):
            if is_last and not isinstance(node, dict):
                break
            parts.append(f"[{step}]")
        else:
            parts.append(("." if parts else "") + str(step))
    return "".join(parts)


def line_of(path: tuple[Any, ...], lines: dict[tuple[Any, ...], int]) -> int:
    """The line of the deepest part of ``path`` the document has (a missing key: its mapping's line)."""
    for cut in range(len(path), -1, -1):
        line = lines.get(path[:cut])
        if line:
            return line
    return 0


def _type_words(constraint: Any) -> str:
    words = {"list": "a list", "dict": "a mapping", "string": "text", "integer": "a whole number",
             "number": "a number", "boolean": "true or false"}
    types = constraint if isinstance(constraint, list) else [constraint]
    return " or ".join(words.get(t, t) for t in types)


def _value_words(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, int | float):
        return f"the number {value}"
    if isinstance(value, str):
        return f"the text '{value}'"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def _message(err: Any) -> tuple[tuple[Any, ...], str]:
    """(path to report at, message) for one leaf Cerberus error (unknown fields: see _field_path)."""
    path = tuple(err.document_path)
    code = err.code
    if code == errors.UNKNOWN_FIELD.code:
        key = path[-1]
        parent = path[:-1]
        known = _KEYS[_context(parent)]
        hint = did_you_mean(key, known) or f" (known: {', '.join(known)})"
        return path, f"unknown field '{key}'{hint}"
    if code == errors.REQUIRED_FIELD.code:
        return path, "missing (required)"
    if code == errors.BAD_TYPE.code:
        return path, f"must be {_type_words(err.constraint)}, not {_value_words(err.value)}"
    if code in (errors.EMPTY_NOT_ALLOWED.code, errors.NOT_NULLABLE.code):
        if path and path[-1] in ("paths", "except"):
            return path, "must not be empty (leave the key out to match every path)"
        return path, "must not be empty"
    if code == errors.UNALLOWED_VALUE.code:
        choices = [str(c) for c in err.constraint]
        hint = did_you_mean(err.value, choices)
        return path, f"{_value_words(err.value)} is not allowed: use {' or '.join(choices)}{hint}"
    if code == errors.MIN_VALUE.code:
        return path, f"must be at least {err.constraint}"
    if code == errors.MAX_VALUE.code:
        if err.constraint == idmap.ID_LAST:
            return path, f"must be at most {idmap.ID_LAST} ({idmap.NO_ID} is -1, which means 'unchanged')"
        return path, f"must be at most {err.constraint}"
    if code == errors.REGEX_MISMATCH.code:
        if path and path[-1] == "id":
            return path, f"rule ids are letters, digits and - _ . : @ / (got '{err.value}')"
        return path, f"'{err.value}' is not valid here"
    if code == errors.CUSTOM.code:
        return path, str(err.info[0])
    return path, errors.BasicErrorHandler().messages.get(code, "invalid").format(constraint=err.constraint)


def _leaves(errs: Any) -> list[Any]:
    out = []
    for err in errs:
        if err.is_group_error:
            out.extend(_leaves(err.child_errors))
        else:
            out.append(err)
    return out


# The whole document minus the rules' own schema: each rule is validated on its own (see validate).
_POLICY_SHELL = {**POLICY, "rules": {"type": "list", "nullable": True}}
_RULE_KEYS = frozenset(RULE["schema"]) - {"when", "unless"}
_RULE_ID = re.compile(RULE_ID_RE + "$")  # as Cerberus's `regex` rule compiles it (a match, '$' added)


def _listify(value: Any) -> list[Any] | None:
    """The `coerce: listify` of a value the quick check takes: a non-empty list, or one text."""
    if type(value) is list:
        return value if value else None
    return [value] if type(value) is str else None


def _quick_rule(rule: Any) -> dict[str, Any] | None:
    """The normalised rule when Cerberus would accept it unchanged but for listify, else None (then
    Cerberus itself validates it and words every problem). Only the plain shape is taken: no `when` or
    `unless`, every value of the exact type the schema asks for, each value checked by the same hook
    Cerberus calls. Cerberus on 10,000 rules took 2 s of a 4 s load; this check, 0.1 s."""
    if type(rule) is not dict or not rule.keys() <= _RULE_KEYS:
        return None
    rid, effect, ops = rule.get("id"), rule.get("effect"), _listify(rule.get("ops"))
    if type(rid) is not str or not rid or _RULE_ID.match(rid) is None:
        return None
    if effect not in ("allow", "deny") or type(effect) is not str or ops is None:
        return None
    if any(type(op) is not str or model.op_slots(op) is None for op in ops):
        return None
    listified = {"ops": ops} if ops is not rule["ops"] else {}
    for key in ("paths", "except"):
        if key in rule:
            pats = _listify(rule[key])
            if pats is None or any(type(p) is not str or not p or globs.check_pattern(p) is not None
                                   for p in pats):
                return None
            if pats is not rule[key]:
                listified[key] = pats
    if "description" in rule and type(rule["description"]) is not str:
        return None
    if "enforce" in rule and rule["enforce"] != "always":
        return None
    if "errno" in rule:
        errno = rule["errno"]
        if type(errno) is int:
            if not 0 < errno < 4096:
                return None
        elif type(errno) is str:
            try:
                names.errno_from_name(errno)
            except ValueError:
                return None
        else:
            return None
    return {**rule, **listified} if listified else rule  # unchanged: the very dict (no copy of 10,000)


def validate(data: Any, lines: dict[tuple[Any, ...], int], source: str) -> tuple[list[model.Problem], Any]:
    """Problems (empty when valid) and the normalised document.

    The document without its rules goes through Cerberus once; then each rule on its own: the quick
    check (_quick_rule) takes the plain ones, and Cerberus validates the rest, its errors placed where
    they are in the whole document (``rules[i]...``), so the messages are the ones a whole-document pass
    gave."""
    if not isinstance(data, dict):
        return [model.Problem(source, 1, "", "a policy is a mapping with version, default, rules...")], data
    validator = PolicyValidator(_POLICY_SHELL)
    validator.validate(data)
    leaves = _leaves(validator._errors)
    rules = data.get("rules")
    normalised: list[Any] | None = None
    if type(rules) is list:
        normalised = []
        one = None  # made for the first rule that needs it: checking RULE itself leaves 2.5 MB of cycles
        for i, rule in enumerate(rules):
            quick = _quick_rule(rule)
            if quick is not None:
                normalised.append(quick)
                continue
            if one is None:
                one = PolicyValidator({"rule": RULE})
            one.validate({"rule": rule})
            for err in _leaves(one._errors):
                err.document_path = ("rules", i, *tuple(err.document_path)[1:])
                leaves.append(err)
            normalised.append(one.document.get("rule", rule))
    problems = []
    for err in leaves:
        path, message = _message(err)
        # An unknown key is reported on its own line but named by the mapping it is in: the key itself is
        # already quoted in the message ("rules[0]: unknown field 'pathz'").
        field_path = path[:-1] if err.code == errors.UNKNOWN_FIELD.code else path
        problems.append(model.Problem(source, line_of(path, lines), format_field(field_path, data), message))
    doc = dict(validator.document) if not problems else data
    if normalised is not None and not problems:
        doc["rules"] = normalised
    # Cerberus's validators hold each other in cycles, and the document with them; the loader runs with
    # the collector paused, so they would keep the whole parse alive until it ends.
    for v in (validator, one if normalised is not None else None):
        if v is not None:
            v.__dict__.clear()
    return problems, doc
