"""Plain text for pipes: one line per record, every field, no wrapping (what ausearch and journalctl
print when their output is not a terminal). Free of rich: `gateway audit t | grep /home/alice` must
find the record whatever the width of a terminal that is not there.

A line is ``key=value`` pairs in the record's own order (logfmt): a value without spaces, quotes, ``=``
or backslashes goes as it is, any other in double quotes with ``"`` and ``\\`` escaped; lists are joined
with commas, objects are compact JSON, null is ``-``. Control characters, undecodable bytes and bidi
controls are escaped (views.safe's rules), so a guest's file name cannot drive the reader's terminal
or split a record over two lines.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import IO, Any

# C0 and C1 controls, lone surrogates (undecodable bytes), and the bidi controls ("Trojan Source").
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_BARE = re.compile(r'[^\s"=\\]+\Z')


def _escape(match: re.Match[str]) -> str:
    c = ord(match.group())
    if 0xDC80 <= c <= 0xDCFF:  # an undecodable byte (surrogateescape): the byte
        return f"\\x{c - 0xDC00:02x}"
    return {10: "\\n", 9: "\\t", 13: "\\r"}.get(c) or (f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}")


def _text(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        text = ",".join(_text(v) if not isinstance(v, dict | list) else json.dumps(v) for v in value)
    elif isinstance(value, dict):
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    else:
        text = str(value)
    return text


def _value(value: Any) -> str:
    text = _text(value)
    if _BARE.match(text):
        return _CONTROL.sub(_escape, text)
    return '"' + _CONTROL.sub(_escape, text.replace("\\", "\\\\").replace('"', '\\"')) + '"'


# Anything that makes a text need quoting or escaping: one search decides the common case (a plain path,
# a rule id, a hash), which then goes out as it is.
_SPECIAL = re.compile(
    r'[\s"=\\\x00-\x1f\x7f-\x9f\ud800-\udfff\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]'
)


def format_line(record: dict[str, Any]) -> str:
    """One record as one line: key=value for every field, in the record's order."""
    parts = []
    special = _SPECIAL.search
    for k, v in record.items():
        key = k if k.__class__ is str and k and not special(k) else _value(k)
        cls = v.__class__
        if cls is int or cls is float:  # (not bool: its class is bool)
            parts.append(f"{key}={v}")
        elif cls is str and v and not special(v):
            parts.append(key + "=" + v)
        else:
            parts.append(key + "=" + _value(v))
    return " ".join(parts)


def write_lines(records: Iterable[dict[str, Any]], out: IO[str]) -> int:
    count = 0
    write = out.write
    for record in records:
        write(format_line(record) + "\n")
        count += 1
    return count
