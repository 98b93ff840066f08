"""The `gateway` command: serve (the drop-in helper), check (dry-run a policy), audit (review the
trail), demo (a newcomer's first run). Each subcommand's module is imported only when it runs, so that
`serve` never loads the view-only libraries.

build_parser() is the whole command as one argparse parser (every subcommand and option, with help): the
man pages (argparse-manpage) and the shell completions (shtab) are generated from it at build time
(scripts/build-docs.sh). main() does not parse with it, so that `serve` keeps the reference's usage and
exit statuses and no subcommand imports another's modules."""

from __future__ import annotations

import argparse
import importlib
import sys

from gateway import __version__
from gateway.signals import hold_reload_signals

COMMANDS = {
    "serve": "serve a guest's 9p proxy requests (virtfs-proxy-helper's options)",
    "check": "dry-run a policy: validate, lint, run its tests, decide requests, replay a trail; "
             "suggest rules from a trail, test coverage, compare two policies",
    "fmt": "format a policy in its canonical layout, comments kept (--check for CI)",
    "audit": "review audit trails: filters, tables, summaries, follow, verify the hash chain",
    "inspect": "show a running gateway's confinement, read from /proc",
    "demo": "a scripted guest session against a real gateway, then its summary",
    "virtiofsd": "serve a virtio-fs guest under the policy (a vhost-user-fs backend, virtiofsd's options)",
}
# Subcommands with an add_arguments(parser) / run(args) module, imported only when they run.
MODULES = {
    "audit": "gateway.audit_cli",
    "check": "gateway.check",
    "fmt": "gateway.fmt",
    "inspect": "gateway.inspect",
    "demo": "gateway.demo",
    "virtiofsd": "gateway.virtiofs.cli",
}


# shtab's completion hints, written out so that the runtime does not need shtab (shtab.FILE, .DIRECTORY)
_FILE = {"bash": "_shtab_compgen_files", "zsh": "_files", "tcsh": "f"}
_DIRECTORY = {"bash": "_shtab_compgen_dirs", "zsh": "_files -/", "tcsh": "d"}
_COMPLETE = {"path": _DIRECTORY, "policy_dir": _DIRECTORY, "socket": _FILE, "policy": _FILE,
             "audit_log": _FILE, "logs": _FILE}  # fmt: skip


def version_text() -> str:
    return f"gateway {__version__}"


def build_parser() -> argparse.ArgumentParser:
    """Every subcommand with its options and help: for the man pages and completions (see above)."""
    from gateway import serve

    parser = argparse.ArgumentParser(
        prog="gateway",
        description="A policy-enforcing, audited, confined drop-in replacement for QEMU's "
        "virtfs-proxy-helper.",
    )
    parser.add_argument("--version", action="version", version=version_text())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    serve_parser = serve.documented_parser()
    sub.add_parser(
        "serve", parents=[serve_parser], add_help=False, help=COMMANDS["serve"],
        description=serve_parser.description,
    )  # fmt: skip
    for name, module_name in MODULES.items():
        command = sub.add_parser(name, help=COMMANDS[name], description=COMMANDS[name])
        importlib.import_module(module_name).add_arguments(command)
    for command in sub.choices.values():
        for action in command._actions:
            if action.dest in _COMPLETE:
                action.complete = _COMPLETE[action.dest]  # type: ignore[attr-defined]
    return parser


def build_serve_parser() -> argparse.ArgumentParser:
    """`gateway serve` (and gateway-proxy-helper) alone, for gateway-serve(1)."""
    from gateway import serve

    return serve.documented_parser()


def _usage() -> str:
    lines = ["usage: gateway COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<8} {text}" for name, text in COMMANDS.items()]
    lines += ["", "`gateway COMMAND --help` for a command's options, `gateway --version` for the version."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0 if args else 2
    if args[0] in ("--version", "-V"):
        print(version_text())
        return 0
    command, rest = args[0], args[1:]
    if command == "serve":
        # Held before serving's imports (gateway.signals); not for the other commands, where a terminal's
        # SIGHUP should still end, say, `gateway audit --follow`.
        hold_reload_signals()
        from gateway import serve

        return serve.run(rest)
    if command in MODULES:
        module = importlib.import_module(MODULES[command])
        parser = argparse.ArgumentParser(prog=f"gateway {command}", description=COMMANDS[command])
        module.add_arguments(parser)
        return int(module.run(parser.parse_args(rest)))
    print(f"gateway: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
    return 2


def proxy_helper_main() -> int:
    """`gateway-proxy-helper`: the serve command under a name a virtfs-proxy-helper wrapper can exec."""
    hold_reload_signals()
    from gateway import serve

    return serve.run(sys.argv[1:], prog="gateway-proxy-helper")


def virtiofsd_main() -> int:
    """`gateway-virtiofsd`: the virtiofsd command as one executable, for libvirt's vhost-user description
    (contrib/vhost-user/50-gateway-virtiofsd.json), which names a binary, not a command line."""
    return main(["virtiofsd", *sys.argv[1:]])
