"""``gateway fmt POLICY...``: a policy in its canonical layout, comments kept (``opa fmt``).

The layout: top-level keys in the order a reader meets them (version, tenant, include, vars, default,
enforcement, audit, ids, limits, rules, tests, then any other in its own order); each rule's keys as id,
description, effect, ops, paths, except, when, unless, errno, enforce (then the rest); a test's as name,
request, object, expect, rule, errno; lists of scalars in flow style (``ops: [read, write]``), other
lists in block style; two-space indentation, list items indented two under their key. Comments and
quoting stay as written (ruamel.yaml's round trip), and a long string is never folded.

Formatting never changes what the policy says: the formatted text is read back and compared, value for
value, with the original (key order aside); if they differ (a YAML construct the round trip does not
keep), nothing is written and the file is named (exit 2).

Exit status: 0 formatted (or, with ``--check``, already formatted); 1 ``--check`` found a file that is
not, and printed its diff; 2 a file cannot be read, is not YAML, or would not survive formatting.

ruamel.yaml is imported here only, when the command runs (never on serve's path); it comes with the
``fmt`` extra (``pip install 'gateway[fmt]'``).
"""

from __future__ import annotations

import argparse
import difflib
import io
import os
import sys
import tempfile
from typing import Any

from gateway.rules import PolicyError, loader

TOP = ("version", "tenant", "include", "vars", "default", "enforcement", "audit", "ids", "limits", "rules",
       "tests")
RULE = ("id", "description", "effect", "ops", "paths", "except", "when", "unless", "errno", "enforce")
TEST = ("name", "request", "object", "expect", "rule", "errno")
FLOW_MAX = 100  # a flow list longer than this (as written out) goes to block style

EXIT_HELP = """\
exit status:
  0    formatted; with --check: already formatted
  1    --check: a file is not formatted (its diff is printed)
  2    a file cannot be read, is not YAML, or would not survive formatting unchanged in meaning"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EXIT_HELP
    parser.add_argument("policy", nargs="+", metavar="POLICY", help="the policy file(s) to format")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true",
                      help="change nothing; exit 1 and print a diff when a file is not formatted (for CI)")
    mode.add_argument("--write", "-w", action="store_true",
                      help="rewrite the file(s) in place (default: the formatted text on stdout)")


def _yaml() -> Any:
    from ruamel.yaml import YAML

    y = YAML()  # round trip: comments, quotes and flow/block choices are kept
    y.preserve_quotes = True
    y.indent(mapping=2, sequence=4, offset=2)
    y.width = 1 << 16  # never fold a long string
    y.representer.add_representer(type(None),
                                  lambda r, _d: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    return y


def _order(mapping: Any, keys: tuple[str, ...]) -> None:
    """Put ``keys`` first in that order, the others after in their own; comments move with their keys.

    ruamel keeps what follows a value (its end-of-line comment, then blank lines and comments up to the
    next key) with the key before. Behind a mapping's last key that is what comes before the *next*
    item (a section's header comment), so it stays at the end: the end-of-line part with its key, the
    rest handed to the new last key."""
    order = [k for k in keys if k in mapping] + [k for k in list(mapping) if k not in keys]
    old_last = next(reversed(mapping), None)
    if not order or order == list(mapping):
        return
    tail = _take_tail(mapping, old_last)
    for key in order:
        mapping.move_to_end(key)
    if tail:
        _give_tail(mapping, order[-1], tail)


def _take_tail(mapping: Any, key: Any) -> str:
    entry = mapping.ca.items.get(key)
    token = entry[2] if entry and len(entry) > 2 else None
    if token is None:
        return ""
    text = token.value
    if text.lstrip(" ").startswith("#"):  # an end-of-line comment: it stays on its key's line
        cut = text.find("\n") + 1 or len(text)
        token.value, tail = text[:cut], text[cut:]
        return tail
    entry[2] = None  # nothing on the line itself: all of it is the tail (less the line's own end)
    return text[1:] if text.startswith("\n") else text


def _give_tail(mapping: Any, key: Any, tail: str) -> None:
    from ruamel.yaml.error import CommentMark
    from ruamel.yaml.tokens import CommentToken

    entry = mapping.ca.items.setdefault(key, [None, None, None, None])
    if entry[2] is None:
        entry[2] = CommentToken("\n" + tail, CommentMark(0), None)
    else:
        entry[2].value = entry[2].value + tail


def _flow(node: Any) -> None:
    """Scalar lists in flow style, unless long or commented; recursively."""
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    if isinstance(node, CommentedMap):
        for value in node.values():
            _flow(value)
    elif isinstance(node, CommentedSeq):
        scalars = all(not isinstance(v, (CommentedMap, CommentedSeq)) for v in node)
        commented = bool(node.ca.items) or node.ca.comment is not None
        if scalars and not commented and len(node) and sum(len(str(v)) + 4 for v in node) <= FLOW_MAX:
            node.fa.set_flow_style()
        elif not scalars:
            node.fa.set_block_style()
            for value in node:
                _flow(value)


def format_text(text: str, source: str) -> str:
    """The canonical text of a policy; ValueError when it is not a mapping or would change meaning."""
    from ruamel.yaml.comments import CommentedMap

    y = _yaml()
    try:
        doc = y.load(text)
    except Exception as error:  # ruamel's errors have no common base worth naming here
        raise ValueError(f"{source}: not YAML: {str(error).splitlines()[0]}") from None
    if not isinstance(doc, CommentedMap):
        raise ValueError(f"{source}: a policy is a YAML mapping")
    _order(doc, TOP)
    for section, keys in (("rules", RULE), ("tests", TEST)):
        for item in doc.get(section) or []:
            if isinstance(item, CommentedMap):
                _order(item, keys)
    _flow(doc)
    out = io.StringIO()
    y.dump(doc, out)
    result = out.getvalue()
    if _meaning(text, source) != _meaning(result, source):
        raise ValueError(f"{source}: formatting would change what the policy says; left as it is")
    return result


def _meaning(text: str, source: str) -> Any:
    """The document as the gateway's loader reads it, key order aside."""
    try:
        data, _lines = loader.read_yaml(text, source)
    except PolicyError as error:
        raise ValueError(str(error).splitlines()[0]) from None

    def plain(v: Any) -> Any:
        if isinstance(v, dict):
            return sorted((repr(k), plain(x)) for k, x in v.items())
        if isinstance(v, list):
            return [plain(x) for x in v]
        return (type(v).__name__, v)

    return plain(data)


def run(args: argparse.Namespace) -> int:
    try:
        import ruamel.yaml  # noqa: F401 - only to say what is missing before anything is read
    except ImportError:
        print("gateway fmt: needs ruamel.yaml (pip install 'gateway[fmt]')", file=sys.stderr)
        return 2
    status = 0
    for path in args.policy:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
            formatted = format_text(text, path)
        except (OSError, UnicodeDecodeError, ValueError) as error:
            print(f"gateway fmt: {error}", file=sys.stderr)
            status = 2
            continue
        if args.check:
            if formatted != text:
                sys.stdout.writelines(difflib.unified_diff(text.splitlines(True), formatted.splitlines(True),
                                                           f"{path}", f"{path} (formatted)"))
                status = max(status, 1)
        elif args.write:
            if formatted != text:
                _replace(path, formatted)
        else:
            sys.stdout.write(formatted)
    return status


def _replace(path: str, text: str) -> None:
    """Write beside the file and rename over it: a reader (a reload) sees the old text or the new."""
    directory = os.path.dirname(os.path.abspath(path))
    mode = os.stat(path).st_mode & 0o7777
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".fmt-", suffix=".yaml")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
