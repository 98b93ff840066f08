"""Log lines carry key=value fields (gateway.logfmt.kv), never a Python repr."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from pathlib import Path

from gateway.logfmt import kv, logfmt_split

ROOT = Path(__file__).resolve().parent.parent


def test_plain_values_are_bare_and_others_quoted() -> None:
    assert kv(path="/srv/g 1", requests=3, ok=True, none=None) == 'path="/srv/g 1" requests=3 ok=true none=-'
    assert kv(reason='say "hi"\n', empty="") == r'reason="say \"hi\"\n" empty=""'
    assert kv(name=b"bad\xff") == r'name="bad\xff"'


def test_mappings_flatten_and_lists_join() -> None:
    line = kv(sandbox={"seccomp": "kill", "caps": ["chown", "fowner"], "landlock": {"abi": 3}})
    assert line == "sandbox.seccomp=kill sandbox.caps=chown,fowner sandbox.landlock.abi=3"
    assert "{" not in line and "'" not in line


def test_a_line_splits_back_into_its_fields() -> None:
    fields = {"error": "No space left on device", "path": "/var/log/a=b", "n": "7", "q": 'x"y\\z'}
    assert logfmt_split("audit record not written " + kv(**fields)) == fields


def test_no_log_call_formats_a_repr_or_a_bare_mapping() -> None:
    """Every log call passes its fields through kv(): no %r, no dict as an argument."""
    call = re.compile(r"\blog\.(debug|info|warning|error|critical|exception)\((.*?)\)\s*$", re.S | re.M)
    offenders = []
    for path in [*sorted((ROOT / "gateway").rglob("*.py")), *sorted((ROOT / "gateway").glob("*.p[yx][xi]"))]:
        for match in call.finditer(path.read_text()):
            args = match.group(2)
            has_arguments = re.search(r"[\"']\s*,", args) is not None  # something after the message
            if "%r" in args or (has_arguments and "kv(" not in args):
                offenders.append(f"{path.relative_to(ROOT)}: {args[:80]}")
    assert not offenders, offenders


def test_a_server_warning_is_logged_as_fields(tmp_path: Path, caplog) -> None:
    """A real log line from the request loop: an unknown request type, as fields."""
    from gateway import server

    caplog.set_level(logging.WARNING, logger="gateway")
    server.log.warning("unknown request type %s", kv(type=99, size=4, reply="EOPNOTSUPP"))
    assert caplog.records[-1].getMessage() == "unknown request type type=99 size=4 reply=EOPNOTSUPP"


def test_the_module_has_no_dependencies() -> None:
    out = subprocess.run(
        [sys.executable, "-c",
         "import sys, gateway.logfmt; print(sorted(m for m in sys.modules if m.startswith('gateway')))"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert out.stdout.strip() == "['gateway', 'gateway.logfmt']"
