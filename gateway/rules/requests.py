"""Protocol requests built from what people and logs write.

* text, as typed on a command line: ``open /etc/passwd flags=O_RDWR``,
  ``create /home/alice/a mode=0644 uid=1000 gid=1000``, ``rename /a /b``, ``symlink /l target=../x``;
* a mapping, as in a policy's ``tests:``, a ``--requests`` YAML list or JSON lines:
  ``{op: open, path: /etc/passwd, flags: [O_RDWR]}``;
* an audit record (the contract's format): the same keys plus metadata, which is ignored.

Object attributes (the object's current owner, group, type and mode) may be given alongside:
``owner=1000 group=100 type=reg object_mode=0644`` in text, ``object: {owner: 1000, type: reg}`` in a
mapping. Left out, they are unknown, and a rule condition on an unknown attribute does not hold.

Fields a request leaves out get the defaults below (e.g. ``uid``/``gid`` 0, ``create`` mode 0644), so a
short request is still a complete protocol request; ``describe`` prints every field that matters.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, fields
from typing import Any

from gateway import names, protocol
from gateway.protocol import RequestType as RT
from gateway.rules.model import ObjectAttrs
from gateway.rules.schema import did_you_mean


class RequestError(ValueError):
    """A request that cannot be built; ``field`` names the offending key ("" for the whole request)."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}" if field else message)


@dataclass(frozen=True)
class RequestSpec:
    request: protocol.Request
    object: ObjectAttrs | None  # None: nothing known about the object


_CLASSES: dict[RT, type] = {t: cls for t, (cls, _codes) in protocol.LAYOUTS.items()}
_BYTES = {"path", "path2", "target", "name", "value"}
_DEFAULT_MODE = {RT.CREATE: 0o644, RT.MKNOD: 0o100644, RT.MKDIR: 0o755}
_DEFAULT_FLAGS = {RT.OPEN: 0, RT.CREATE: names.open_flags_from_names("O_WRONLY|O_CREAT|O_TRUNC")}
_REQUIRED = {"path"} | {"path2"}  # plus target (symlink), name (xattr), mode (chmod), uid (chown)
_OBJECT_KEYS = {"owner", "group", "type", "object_mode", "omode"}
# Audit record keys that describe the decision or the log, not the request.
AUDIT_META = {"seq", "time", "tenant", "policy", "event", "decision", "rule", "reason", "result", "us",
              "prev"}


# Field lists per request type, computed once: replay builds a request per audit record.
_FIELDS: dict[RT, list[str]] = {
    t: [f.name for f in fields(c) if f.name != "type"] for t, c in _CLASSES.items()
}
# What people write: utime's four time fields are two keys, atime and mtime.
_USER_KEYS: dict[RT, list[str]] = {
    t: [k for k in keys if not k.startswith(("atime_", "mtime_"))]
    + (["atime", "mtime"] if t is RT.UTIME else [])
    for t, keys in _FIELDS.items()
}


def _fields(rtype: RT) -> list[str]:
    return _FIELDS[rtype]


def _user_keys(rtype: RT) -> list[str]:
    return _USER_KEYS[rtype]


def _int(key: str, value: Any) -> int:
    if isinstance(value, bool):
        raise RequestError(key, "expected a number, not true/false")
    if isinstance(value, int):
        return value
    try:
        return int(str(value), 0) if str(value).lower().startswith("0x") else int(str(value), 10)
    except ValueError:
        raise RequestError(key, f"expected a number, not {value!r}") from None


def _mode(key: str, value: Any, yaml_ints: bool) -> int:
    if isinstance(value, bool):
        raise RequestError(key, "expected an octal mode such as 0644")
    if isinstance(value, int):
        if yaml_ints and value > 7:
            raise RequestError(key, f"write the mode as octal text with a leading 0 ('0{value}')")
        return value
    text = str(value).strip()
    digits = text[2:] if text[:2] in ("0o", "0O") else text
    if not digits or any(c not in "01234567" for c in digits):
        raise RequestError(key, f"expected an octal mode such as 0644, not {value!r}")
    return int(digits, 8)


def _flags(rtype: RT, value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    items = value if isinstance(value, list) else str(value).replace(",", "|").split("|")
    items = [str(i).strip() for i in items if str(i).strip()]
    if rtype is RT.LSETXATTR:
        bits = 0
        for item in items:
            word = item.upper()
            if word in ("XATTR_CREATE", "CREATE"):
                bits |= 1
            elif word in ("XATTR_REPLACE", "REPLACE"):
                bits |= 2
            else:
                raise RequestError("flags", f"unknown xattr flag {item!r} (XATTR_CREATE, XATTR_REPLACE)")
        return bits
    try:
        return names.open_flags_from_names(items)
    except ValueError as err:
        raise RequestError("flags", str(err)) from None


def _time(key: str, value: Any) -> tuple[int, int]:
    if isinstance(value, list) and len(value) == 2:
        return _int(key, value[0]), _int(key, value[1])
    text = str(value)
    sec, _, nsec = text.partition(".")
    return _int(key, sec), _int(key, (nsec + "000000000")[:9]) if nsec else 0


def object_attrs(values: dict[str, Any], yaml_ints: bool) -> ObjectAttrs | None:
    if not values:
        return None
    ftype = values.get("type")
    if ftype is not None and ftype not in names.FILE_TYPES:
        hint = did_you_mean(ftype, list(names.FILE_TYPES))
        raise RequestError("type", f"unknown file type {ftype!r}{hint}")
    mode = values.get("mode", values.get("object_mode", values.get("omode")))
    return ObjectAttrs(
        owner=_int("owner", values["owner"]) if values.get("owner") is not None else None,
        group=_int("group", values["group"]) if values.get("group") is not None else None,
        type=names.FILE_TYPES[ftype] if ftype is not None else None,
        mode=_mode("object_mode", mode, yaml_ints) & 0o7777 if mode is not None else None,
    )


def object_record(attrs: ObjectAttrs) -> dict[str, Any]:
    """Object attributes as a record or a JSON line carries them (``object_attrs`` reads them back):
    owner, group, type by name, mode as octal text, each only when known."""
    out: dict[str, Any] = {}
    if attrs.owner is not None:
        out["owner"] = attrs.owner
    if attrs.group is not None:
        out["group"] = attrs.group
    if attrs.type is not None:
        out["type"] = names.FILE_TYPE_NAMES.get(attrs.type, attrs.type)
    if attrs.mode is not None:
        out["mode"] = names.mode_text(attrs.mode)
    return out


def build(op: Any, values: dict[str, Any], *, yaml_ints: bool = False) -> RequestSpec:
    """A request from an op name and a mapping of its fields (plus object attributes)."""
    if not isinstance(op, str) or op.lower() not in names.OPS_BY_NAME:
        raise RequestError("op", f"unknown op {op!r}{did_you_mean(op, sorted(names.OPS_BY_NAME))}")
    rtype = names.OPS_BY_NAME[op.lower()]
    allowed = _user_keys(rtype)
    obj_values = {k: values[k] for k in _OBJECT_KEYS if k in values}
    nested = values.get("object")
    if nested is not None:
        if not isinstance(nested, dict):
            raise RequestError("object", "must be a mapping such as {owner: 1000, type: reg}")
        for key in nested:
            if key not in ("owner", "group", "type", "mode"):
                raise RequestError(f"object.{key}", "unknown object attribute (owner, group, type, mode)")
        obj_values.update(nested)
    args: dict[str, Any] = {}
    for key, value in values.items():
        if key in _OBJECT_KEYS or key == "object":
            continue
        if key not in allowed:
            hint = did_you_mean(key, allowed + sorted(_OBJECT_KEYS))
            raise RequestError(key, f"{rtype.name.lower()} has no field '{key}'{hint or ''} "
                               f"(fields: {', '.join(allowed)})")
        if key in _BYTES:
            if not isinstance(value, str):
                raise RequestError(key, "expected text")
            args[key] = value.encode("utf-8", "surrogateescape")
        elif key == "mode":
            args[key] = _mode(key, value, yaml_ints)
        elif key == "flags":
            args[key] = _flags(rtype, value)
        elif key in ("atime", "mtime"):
            args[f"{key}_sec"], args[f"{key}_nsec"] = _time(key, value)
        else:
            args[key] = _int(key, value)
    for key in _fields(rtype):
        if key in args:
            continue
        required = key in _REQUIRED or (key == "target" and rtype is RT.SYMLINK) or key == "name"
        required = required or (key == "mode" and rtype is RT.CHMOD) or (rtype is RT.CHOWN and key == "uid")
        if required:
            raise RequestError(key, f"{rtype.name.lower()} needs '{key}'")
        if key == "mode":
            args[key] = _DEFAULT_MODE.get(rtype, 0)
        elif key == "flags":
            args[key] = _DEFAULT_FLAGS.get(rtype, 0)
        elif key == "value":
            args[key] = b""
        elif key == "size" and rtype is RT.LSETXATTR:
            args[key] = len(args.get("value", b""))
        elif key == "bufsize":
            args[key] = 4096
        elif key == "gid" and rtype is RT.CHOWN:
            args[key] = 0xFFFFFFFF  # chown(2)'s "leave the group alone"
        else:
            args[key] = 0
    return RequestSpec(_CLASSES[rtype](**args), object_attrs(obj_values, yaml_ints))


def parse_text(text: str) -> RequestSpec:
    """``OP PATH [PATH2] [key=value ...]`` (shell quoting applies to paths with spaces)."""
    try:
        words = shlex.split(text)
    except ValueError as err:
        raise RequestError("", f"cannot split {text!r}: {err}") from None
    if not words:
        raise RequestError("", "empty request (expected OP PATH [PATH2] [key=value ...])")
    op, rest = words[0], words[1:]
    values: dict[str, Any] = {}
    positional = []
    for word in rest:
        key, eq, value = word.partition("=")
        if eq and key and not key.startswith("/"):
            values[key] = value
        else:
            positional.append(word)
    rtype = names.OPS_BY_NAME.get(op.lower())
    slots = ["path", "path2"] if rtype in (RT.RENAME, RT.LINK) else ["path"]
    if len(positional) > len(slots):
        extra = " (give a symlink's target as target=...)" if rtype is RT.SYMLINK else ""
        raise RequestError("", f"too many paths for {op}: {' '.join(positional)}{extra}")
    for key, value in zip(slots, positional, strict=False):
        values[key] = value
    return build(op, values)


def from_mapping(data: Any, *, yaml_ints: bool = False) -> RequestSpec:
    """A request from a mapping (``op`` plus fields) or from text."""
    if isinstance(data, str):
        return parse_text(data)
    if not isinstance(data, dict):
        raise RequestError("", "a request is a mapping such as {op: open, path: /x} or text 'open /x'")
    values = dict(data)
    op = values.pop("op", None)
    if op is None:
        raise RequestError("op", "missing (which request? open, create, rename...)")
    return build(op, values, yaml_ints=yaml_ints)


def from_audit(record: dict[str, Any]) -> protocol.Request:
    """The request an audit record describes (decision metadata is ignored)."""
    op = record.get("op")
    rtype = names.OPS_BY_NAME.get(op) if isinstance(op, str) else None
    # Machine-written: keep the fields this op has and ignore the rest, so that a field the server adds
    # later (or one it records but the protocol does not carry, like an xattr's value) cannot break replay.
    known = set(_user_keys(rtype)) if rtype is not None else set()
    values = {k: v for k, v in record.items() if k in known}
    return build(op, values).request


def describe(request: protocol.Request, obj: ObjectAttrs | None = None) -> str:
    """The request as text that ``parse_text`` reads back."""
    rtype = request.type
    keys = _user_keys(rtype)
    parts = [rtype.name.lower()]
    parts += [shlex.quote(getattr(request, k).decode("utf-8", "surrogateescape")) for k in ("path", "path2")
              if k in keys]
    for key in keys:
        if key in ("path", "path2"):
            continue
        if key in ("atime", "mtime"):
            parts.append(f"{key}={getattr(request, key + '_sec')}.{getattr(request, key + '_nsec'):09d}")
        elif key in _BYTES:
            parts.append(f"{key}={shlex.quote(getattr(request, key).decode('utf-8', 'surrogateescape'))}")
        elif key == "mode":
            parts.append(f"mode={names.mode_text(request.mode)}")  # type: ignore[union-attr]
        elif key == "flags":
            flags = request.flags  # type: ignore[union-attr]
            words = names.xattr_flag_names(flags) if rtype is RT.LSETXATTR else names.open_flag_names(flags)
            if words:
                parts.append("flags=" + "|".join(words))
        else:
            parts.append(f"{key}={getattr(request, key)}")
    if obj is not None:
        for key, value in (("owner", obj.owner), ("group", obj.group)):
            if value is not None:
                parts.append(f"{key}={value}")
        if obj.type is not None:
            parts.append(f"type={names.FILE_TYPE_NAMES.get(obj.type, obj.type)}")
        if obj.mode is not None:
            parts.append(f"object_mode={names.mode_text(obj.mode)}")
    return " ".join(parts)
