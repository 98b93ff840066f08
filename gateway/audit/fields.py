"""A request's readable fields, as an audit record carries them (names and shapes from the contract).

Two views of one table, FIELD_SPECS:
- :func:`request_fields` returns them as a dict (for tools, tests, `gateway check`);
- :func:`request_fragment` returns the same fields already encoded as a JSON object's members. The writer
  is on the request path and the C ``encode_basestring_ascii`` plus string joins cost a third of what
  ``json.dumps`` of a dict does, so the record line is assembled by hand from these fragments. A test
  checks that both views agree for every request type.
"""

from __future__ import annotations

from collections.abc import Callable
from json.encoder import encode_basestring_ascii as quote  # type: ignore[attr-defined]
from typing import Any

from gateway import protocol as p
from gateway.names import OP_NAMES, mode_text, open_flag_names, xattr_flag_names

# The order request fields take in a record (the contract's order); FIELD_SPECS follow it.
FIELD_ORDER = (
    "op", "path", "path2", "target", "uid", "gid", "mode", "flags", "rdev", "length", "name", "size",
    "bufsize", "atime", "mtime",
)  # fmt: skip

# Per request class: (record key, kind). The kind says how the attribute of the same name is shown:
#   text   bytes -> str (utf-8, surrogateescape: every byte survives a round trip)
#   int    as is
#   mode   octal text with a leading zero ("0644")
#   oflags open flag names; xflags: xattr flag names
#   time   [sec, nsec] from <key>_sec and <key>_nsec
# Lsetxattr's value is not recorded: it is binary, may be large and may be a secret; its size is.
FIELD_SPECS: dict[type, tuple[tuple[str, str], ...]] = {
    p.Open: (("path", "text"), ("flags", "oflags")),
    p.Create: (("path", "text"), ("uid", "int"), ("gid", "int"), ("mode", "mode"), ("flags", "oflags")),
    p.Mknod: (("path", "text"), ("uid", "int"), ("gid", "int"), ("mode", "mode"), ("rdev", "int")),
    p.Mkdir: (("path", "text"), ("uid", "int"), ("gid", "int"), ("mode", "mode")),
    p.Symlink: (("path", "text"), ("target", "text"), ("uid", "int"), ("gid", "int")),
    p.Link: (("path", "text"), ("path2", "text")),
    p.Lstat: (("path", "text"),),
    p.Readlink: (("path", "text"), ("bufsize", "int")),
    p.Statfs: (("path", "text"),),
    p.Chmod: (("path", "text"), ("mode", "mode")),
    p.Chown: (("path", "text"), ("uid", "int"), ("gid", "int")),
    p.Truncate: (("path", "text"), ("length", "int")),
    p.Utime: (("path", "text"), ("atime", "time"), ("mtime", "time")),
    p.Rename: (("path", "text"), ("path2", "text")),
    p.Remove: (("path", "text"),),
    p.Lgetxattr: (("path", "text"), ("name", "text"), ("size", "int")),
    p.Llistxattr: (("path", "text"), ("size", "int")),
    p.Lsetxattr: (("path", "text"), ("flags", "xflags"), ("name", "text"), ("size", "int")),
    p.Lremovexattr: (("path", "text"), ("name", "text")),
    p.Getversion: (("path", "text"),),
}


def text(raw: bytes) -> str:
    """Bytes as the record's str: invalid UTF-8 survives as lone surrogates (json escapes them)."""
    return raw.decode("utf-8", "surrogateescape")


def _value(request: Any, key: str, kind: str) -> Any:
    if kind == "text":
        return text(getattr(request, key))
    if kind == "int":
        return getattr(request, key)
    if kind == "mode":
        return mode_text(request.mode)
    if kind == "oflags":
        return open_flag_names(request.flags)
    if kind == "xflags":
        return xattr_flag_names(request.flags)
    if kind == "time":
        return [getattr(request, key + "_sec"), getattr(request, key + "_nsec")]
    raise AssertionError(kind)


def request_fields(request: p.Request) -> dict[str, Any]:
    """The request's readable fields per the contract: op first, then the fields it has, in FIELD_ORDER."""
    spec = FIELD_SPECS.get(type(request))
    if spec is None:
        raise TypeError(f"not a request: {request!r}")
    fields: dict[str, Any] = {"op": OP_NAMES[request.type]}
    values = {key: _value(request, key, kind) for key, kind in spec}
    for key in FIELD_ORDER[1:]:
        if key in values:
            fields[key] = values[key]
    return fields


# ---------------------------------------------------------------------------------------------------------
# The fast view. Flag lists repeat a lot (a guest uses a handful of flag words), so their JSON is cached;
# the cache is bounded because the flags word is guest-controlled.

_FLAGS_CACHE: dict[tuple[str, int], str] = {}
_FLAGS_CACHE_MAX = 4096


def _flags_json(kind: str, flags: int) -> str:
    key = (kind, flags)
    cached = _FLAGS_CACHE.get(key)
    if cached is None:
        names = open_flag_names(flags) if kind == "oflags" else xattr_flag_names(flags)
        cached = "[" + ",".join(quote(n) for n in names) + "]"
        if len(_FLAGS_CACHE) >= _FLAGS_CACHE_MAX:
            _FLAGS_CACHE.clear()
        _FLAGS_CACHE[key] = cached
    return cached


# Each kind as a piece of an f-string over the request ``r`` (KEY stands for the field's name); keep in
# step with _value above. Double quotes only inside the braces: the generated f-string is '''-quoted.
_PIECES = {
    "text": '{quote(r.KEY.decode("utf-8", "surrogateescape"))}',
    "int": "{r.KEY}",
    "mode": '"{mode_text(r.mode)}"',
    "oflags": '{flags_json("oflags", r.flags)}',
    "xflags": '{flags_json("xflags", r.flags)}',
    "time": "[{r.KEY_sec},{r.KEY_nsec}]",
}


def _compile(cls: type, spec: tuple[tuple[str, str], ...]) -> Callable[[Any], str]:
    """Generate one f-string function per request class (as dataclasses does for __init__): one
    BUILD_STRING costs half of what a loop over per-field closures does, and this runs for every request."""
    rank = {key: i for i, key in enumerate(FIELD_ORDER)}
    ordered = sorted(spec, key=lambda item: rank[item[0]])
    op = OP_NAMES[cls.__dataclass_fields__["type"].default]  # type: ignore[attr-defined]
    pieces = ['"op":' + quote(op)]
    for key, kind in ordered:
        pieces.append("," + quote(key) + ":" + _PIECES[kind].replace("KEY", key))
    body = "".join(pieces)
    assert "'" not in body and "\\" not in body  # built from the constant tables above only
    namespace: dict[str, Any] = {"quote": quote, "mode_text": mode_text, "flags_json": _flags_json}
    exec("def fragment(r):\n    return f'''" + body + "'''\n", namespace)
    return namespace["fragment"]  # type: ignore[no-any-return]


_FRAGMENTS: dict[type, Callable[[Any], str]] = {cls: _compile(cls, spec) for cls, spec in FIELD_SPECS.items()}


def request_fragment(request: p.Request) -> str:
    """The request's fields as JSON object members, '"op":"open","path":"/a","flags":["O_RDONLY"]'."""
    encode = _FRAGMENTS.get(type(request))
    if encode is None:
        raise TypeError(f"not a request: {request!r}")
    return encode(request)
