"""The CLI people expect: --version, man pages and bash/zsh completion generated from the parsers in the
build (scripts/build-docs.sh), and usage errors where an option would be silently ignored."""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import gateway
from gateway import cli, serve

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "MANWIDTH": "120"}


def gw(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "gateway", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def test_version() -> None:
    out = gw("--version")
    assert out.returncode == 0 and out.stdout == f"gateway {gateway.__version__}\n"
    assert importlib.metadata.version("gateway") == gateway.__version__  # one version, from one place
    assert "--version" in gw("--help").stdout


def test_console_without_nodaemon_is_a_usage_error(tmp_path: Path) -> None:
    out = gw("serve", "-p", str(tmp_path), "-f", "3", "--console")
    assert out.returncode == 1
    assert "--console needs -n|--nodaemon" in out.stderr
    assert "usage:" in out.stderr  # reported before anything starts, like any usage error


def test_every_serve_option_is_documented() -> None:
    """A new option without help text (serve.OPTION_HELP) fails here, not in the man page."""
    parser = serve.documented_parser()
    for action in parser._actions:
        assert action.help, action.dest
    assert set(serve.build_parser()._option_string_actions) == set(parser._option_string_actions)


@pytest.fixture(scope="module")
def docs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("docs")
    subprocess.run([str(ROOT / "scripts/build-docs.sh"), str(out), sys.executable], check=True, timeout=120)
    return out


def test_man_pages_name_every_subcommand_and_option(docs: Path) -> None:
    man1 = docs / "man" / "man1"
    names = sorted(p.name for p in man1.iterdir())
    assert names == ["gateway-proxy-helper.1", "gateway-serve.1", "gateway.1"]
    page = subprocess.run(
        ["man", "-l", str(man1 / "gateway.1")], capture_output=True, text=True, check=True, env=ENV
    ).stdout
    assert page.startswith("GATEWAY(1)") and gateway.__version__ in page
    for command in cli.COMMANDS:
        assert f"gateway {command}" in page, command
        assert f"COMMAND 'gateway {command}'" in page, command  # each with its own options section
    assert "--tenant NAME" in page and "gateway audit" in page and "--explain" in page
    serve_page = subprocess.run(
        ["man", "-l", str(man1 / "gateway-serve.1")], capture_output=True, text=True, check=True, env=ENV
    ).stdout
    assert serve_page.startswith("GATEWAY-SERVE(1)")
    for option, action in serve.build_parser()._option_string_actions.items():
        if action.dest == "help":
            continue  # argparse-manpage leaves -h/--help out
        assert re.search(rf"(^|[ ,]){re.escape(option)}\b", serve_page), option
    assert (man1 / "gateway-proxy-helper.1").read_text() == ".so man1/gateway-serve.1\n"


def test_bash_completion_completes_commands_and_options(docs: Path) -> None:
    script = docs / "completions" / "bash" / "gateway"

    def complete(*words: str) -> list[str]:
        line = " ".join(words)
        program = (
            f"source {script}; COMP_WORDS=({line}); COMP_CWORD={len(words) - 1}; COMP_LINE='{line}'; "
            f"COMP_POINT={len(line)}; _shtab_gateway; printf '%s\\n' \"${{COMPREPLY[@]}}\""
        )
        out = subprocess.run(["bash", "-c", program], capture_output=True, text=True, check=True)
        return out.stdout.split()

    assert set(complete("gateway", "")) >= set(cli.COMMANDS)
    assert complete("gateway", "se") == ["serve"]
    assert {"--policy", "--audit-log", "--tenant", "--nodaemon"} <= set(complete("gateway", "serve", "--"))
    assert "--verify" in complete("gateway", "audit", "--ver")


def test_zsh_completion_is_valid_and_names_every_command(docs: Path) -> None:
    script = docs / "completions" / "zsh" / "_gateway"
    text = script.read_text()
    assert text.startswith("#compdef gateway")
    subprocess.run(["zsh", "-n", str(script)], check=True)
    for command in cli.COMMANDS:
        assert re.search(rf"^\s*{command}:", text, re.M), command
    assert "--audit-log" in text
