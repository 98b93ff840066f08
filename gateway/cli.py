"""The `gateway` command: serve (the drop-in helper), check (dry-run a policy), audit (review the
trail), demo (a newcomer's first run). Each subcommand's module is imported only when it runs, so that
`serve` never loads the view-only libraries."""

from __future__ import annotations

import argparse
import importlib
import sys

from gateway.signals import hold_reload_signals

COMMANDS = {
    "serve": "serve a guest's 9p proxy requests (virtfs-proxy-helper's options)",
    "check": "dry-run a policy: validate, lint, run its tests, decide requests, replay a trail",
    "audit": "review audit trails: filters, tables, summaries, follow, verify the hash chain",
    "inspect": "show a running gateway's confinement, read from /proc",
    "demo": "a scripted guest session against a real gateway, then its summary",
    "virtiofsd": "serve a virtio-fs guest (vhost-user-fs; read-only, no policy yet)",
}
# Subcommands with an add_arguments(parser) / run(args) module, imported only when they run.
MODULES = {
    "audit": "gateway.audit_cli",
    "check": "gateway.check",
    "inspect": "gateway.inspect",
    "demo": "gateway.demo",
    "virtiofsd": "gateway.virtiofs.cli",
}


def _usage() -> str:
    lines = ["usage: gateway COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<8} {text}" for name, text in COMMANDS.items()]
    lines += ["", "`gateway COMMAND --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0 if args else 2
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
