"""`gateway virtiofsd`: virtiofsd's options (as libvirt and users pass them), the read-only back-end.

Every option virtiofsd users pass is accepted; one that this first version does not act on says so on
stderr ("not yet"), none is silently ignored.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys

# What QEMU 7.2's C virtiofsd prints for --print-capabilities (libvirt probes with it).
CAPABILITIES = {"type": "fs"}
# Options accepted with a value, or as flags, that do nothing yet.
_NOT_YET_VALUED = ("--sandbox", "--seccomp", "--cache", "--translate-uid", "--translate-gid",
                   "--thread-pool-size", "--socket-group", "--rlimit-nofile", "--modcaps",
                   "--inode-file-handles", "--xattrmap", "--uid-map", "--gid-map")
_LEVELS = {"off": logging.CRITICAL + 1, "error": logging.ERROR, "warn": logging.WARNING, "info": logging.INFO,
           "debug": logging.DEBUG, "trace": logging.DEBUG}
_NOT_YET_FLAGS = ("--xattr", "--no-xattr", "--announce-submounts", "--killpriv-v2", "--no-killpriv-v2",
                  "--posix-acl", "--security-label", "--syslog", "--writeback", "--allow-direct-io",
                  "--preserve-noatime", "--no-announce-submounts", "--allow-mmap")
_O_KNOWN = {"source", "cache", "xattr", "no_xattr", "readdirplus", "no_readdirplus", "sandbox", "flock",
            "no_flock", "posix_lock", "no_posix_lock", "writeback", "no_writeback", "timeout", "log_level",
            "announce_submounts", "killpriv_v2", "no_killpriv_v2", "xattrmap", "modcaps", "allow_direct_io"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--socket-path", help="the vhost-user socket to create and listen on")
    parser.add_argument("--fd", type=int, help="an inherited, listening vhost-user socket")
    parser.add_argument("--shared-dir", help="the directory to export")
    parser.add_argument("-o", dest="options", action="append", default=[], metavar="OPT[,OPT...]",
                        help="C virtiofsd's options: source=DIR; the others are reported 'not yet'")
    parser.add_argument("--print-capabilities", action="store_true", help="print the JSON libvirt probes for")
    parser.add_argument("--readonly", action="store_true", help="read-only (this version always is)")
    parser.add_argument("-f", "--foreground", action="store_true", help="accepted: it always runs in front")
    parser.add_argument("-d", "--debug", action="store_true", help="log each step on stderr")
    parser.add_argument("--log-level", choices=sorted(_LEVELS), default="info", help="what goes to stderr")
    for name in _NOT_YET_VALUED:
        parser.add_argument(name, dest=_dest(name), help="accepted, not yet acted on")
    for name in _NOT_YET_FLAGS:
        parser.add_argument(name, dest=_dest(name), action="store_true", help="accepted, not yet acted on")


def _dest(name: str) -> str:
    return "ny_" + name.lstrip("-").replace("-", "_")


def _not_yet(what: str) -> None:
    print(f"gateway virtiofsd: {what}: accepted, not yet acted on (this version serves read-only, "
          "with no policy, trail or sandbox yet)", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    if args.print_capabilities:
        print(json.dumps(CAPABILITIES, indent=2))
        return 0
    logging.basicConfig(level=logging.DEBUG if args.debug else _LEVELS[args.log_level], stream=sys.stderr,
                        format="gateway virtiofsd: %(message)s")
    shared = args.shared_dir
    for group in args.options:
        for opt in filter(None, group.split(",")):
            key, _, value = opt.partition("=")
            if key == "source":
                shared = value
            elif key in _O_KNOWN:
                _not_yet(f"-o {opt}")
            else:
                print(f"gateway virtiofsd: unknown option -o {opt}", file=sys.stderr)
                return 1
    for name in _NOT_YET_VALUED + _NOT_YET_FLAGS:
        if getattr(args, _dest(name)) not in (None, False):
            _not_yet(name)
    if not shared:
        print("gateway virtiofsd: --shared-dir DIR (or -o source=DIR) is required", file=sys.stderr)
        return 1
    if not os.path.isdir(shared):
        print(f"gateway virtiofsd: {shared}: not a directory", file=sys.stderr)
        return 1
    if (args.socket_path is None) == (args.fd is None):
        print("gateway virtiofsd: one of --socket-path PATH or --fd FD is required", file=sys.stderr)
        return 1
    from gateway.virtiofs import daemon

    try:
        sock = daemon.listen(args.socket_path) if args.socket_path else socket.socket(fileno=args.fd)
    except OSError as exc:
        print(f"gateway virtiofsd: {args.socket_path or args.fd}: {exc}", file=sys.stderr)
        return 1
    return daemon.run(shared, sock)
