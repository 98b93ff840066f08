"""Log lines as `key=value` fields (logfmt), never a Python repr.

    log.info("policy reloaded %s", kv(old=old.hash[:16], new=new.hash[:16]))
    -> gateway[812]: policy reloaded old=3f2a9c01d4e5b6a7 new=0b1c2d3e4f5a6b7c

kv(**fields) renders each field as key=value in the order given. A value is written bare when it is
made only of characters that need no quoting (letters, digits and `-._/:@,+%~`); otherwise it is
double-quoted with `\\`, `"` and control characters escaped, so that a line always splits back into its
fields (`logfmt_split`). None is `-`, booleans are `true`/`false`, a mapping is flattened to dotted keys
(`sandbox.seccomp=kill`), a list or tuple is comma-joined, bytes are decoded with surrogateescape (and
so escaped like any other control or undecodable character).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

__all__ = ["kv", "logfmt_split"]

_BARE = re.compile(r"[A-Za-z0-9\-._/:@,+%~]+")
_KEY = re.compile(r"[^A-Za-z0-9_.\-]")
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(match: re.Match[str]) -> str:
    c = match.group()
    if c in _ESCAPES:
        return _ESCAPES[c]
    code = ord(c)
    if 0xDC80 <= code <= 0xDCFF:  # an undecodable byte (surrogateescape): show the byte
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


_NEEDS_ESCAPE = re.compile(r'["\\\x00-\x1f\x7f-\x9f\ud800-\udfff\u2028\u2029\u202a-\u202e\u2066-\u2069]')


def _text(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, bytes):
        return value.decode(errors="surrogateescape")
    if isinstance(value, list | tuple | set | frozenset):
        items = sorted(value, key=str) if isinstance(value, set | frozenset) else value
        return ",".join(_text(v) for v in items)
    return str(value)


def _value(value: Any) -> str:
    text = _text(value)
    if _BARE.fullmatch(text):
        return text
    return '"' + _NEEDS_ESCAPE.sub(_escape_char, text) + '"'


def _key(key: str) -> str:
    return _KEY.sub("_", key) or "_"


def _flatten(prefix: str, value: Any, out: list[tuple[str, Any]]) -> None:
    if isinstance(value, Mapping):
        if not value:
            out.append((prefix, ""))
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
        return
    as_dict = getattr(value, "as_dict", None)
    if callable(as_dict):
        _flatten(prefix, as_dict(), out)
        return
    out.append((prefix, value))


def kv(**fields: Any) -> str:
    """`key=value key2="a value"`: one field per keyword, in order; see the module's docstring."""
    flat: list[tuple[str, Any]] = []
    for key, value in fields.items():
        _flatten(key, value, flat)
    return " ".join(f"{_key(k)}={_value(v)}" for k, v in flat)


_FIELD = re.compile(r'([^\s=]+)=("(?:[^"\\]|\\.)*"|\S*)')
_UNESCAPE = re.compile(r"\\(x[0-9a-f]{2}|u[0-9a-f]{4}|.)")


def _unescape(match: re.Match[str]) -> str:
    s = match.group(1)
    if s[0] in "xu" and len(s) > 1:
        return chr(int(s[1:], 16))
    return {"n": "\n", "r": "\r", "t": "\t"}.get(s, s)


def logfmt_split(line: str) -> dict[str, str]:
    """The fields of a kv() line (or of any text holding such fields) back as a dict of strings."""
    out: dict[str, str] = {}
    for key, raw in _FIELD.findall(line):
        if raw.startswith('"') and raw.endswith('"') and len(raw) >= 2:
            raw = _UNESCAPE.sub(_unescape, raw[1:-1])
        out[key] = raw
    return out
