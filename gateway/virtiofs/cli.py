"""`gateway virtiofsd`: virtiofsd's options (as libvirt and users pass them), the read-only back-end.

Every option virtiofsd users pass is accepted; one that this first version does not act on says so on
stderr ("not yet"), none is silently ignored. The gateway's own options (--policy, --tenant and
--policy-dir, --audit-log, --audit-sync, --audit-syslog, --audit-seal-key) mean what they mean to
`gateway serve`, read by its helpers (gateway.serve.policy_location, open_trail).
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
_NOT_YET_VALUED = ("--cache", "--translate-uid", "--translate-gid",
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
    parser.add_argument("--readonly", action="store_true",
                        help="serve read-only: every change is decided, recorded and refused (EROFS)")
    parser.add_argument("-f", "--foreground", action="store_true", help="accepted: it always runs in front")
    parser.add_argument("-d", "--debug", action="store_true", help="log each step on stderr")
    parser.add_argument("--log-level", choices=sorted(_LEVELS), default="info", help="what goes to stderr")
    # The gateway's own options, as `gateway serve` has them (gateway.serve's helpers read them).
    parser.add_argument("--policy", help="the policy to enforce (default: the built-in baseline)")
    parser.add_argument("--tenant", help="the tenant stamped on every record; with --policy-dir, the "
                        "policy DIR/NAME.yaml")
    parser.add_argument("--policy-dir", help="the directory of per-tenant policies (with --tenant)")
    parser.add_argument("--audit-log", help="the audit trail (default: the policy's audit.path, else "
                        "/var/log/gateway/TENANT@CHANNEL.jsonl, CHANNEL from the socket path)")
    parser.add_argument("--audit-sync", default="interval", choices=["every", "interval", "never"],
                        help="fsync after every record, at most once a second (default), or never")
    parser.add_argument("--audit-syslog", action="store_true", help="also send each record to /dev/log")
    parser.add_argument("--audit-seal-key", help="seal the trail's checkpoints with this forward-secure key")
    parser.add_argument("--sandbox", choices=["namespace", "chroot", "none"], default="chroot",
                        help="chroot into the shared directory (namespace: the same, said on stderr); none: "
                        "no chroot, every other wall stands")
    parser.add_argument("--seccomp", choices=["kill", "trap", "log", "errno", "none"], default="kill",
                        help="the system-call filter's action for a forbidden call (default kill)")
    parser.add_argument("--no-landlock", dest="landlock", action="store_false",
                        help="do not apply Landlock (the other walls stand)")
    for name in _NOT_YET_VALUED:
        parser.add_argument(name, dest=_dest(name), help="accepted, not yet acted on")
    for name in _NOT_YET_FLAGS:
        parser.add_argument(name, dest=_dest(name), action="store_true", help="accepted, not yet acted on")


def _dest(name: str) -> str:
    return "ny_" + name.lstrip("-").replace("-", "_")


def _not_yet(what: str) -> None:
    print(f"gateway virtiofsd: {what}: accepted, not yet acted on", file=sys.stderr)


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
    from gateway.serve import open_policy_and_trail
    from gateway.virtiofs import daemon

    # serve's helpers, on serve's option names: the trail's channel is the socket path (or, with --fd,
    # the export), as for `gateway serve -s`/`-f`.
    opts = argparse.Namespace(
        policy=args.policy, policy_dir=args.policy_dir, tenant=args.tenant, audit_log=args.audit_log,
        audit_sync=args.audit_sync, audit_syslog=args.audit_syslog, audit_seal_key=args.audit_seal_key,
        console=False, socket=args.socket_path, path=shared,
    )  # fmt: skip
    opened = open_policy_and_trail(opts, "gateway virtiofsd")
    if opened is None:
        return 1
    policy_path, policy, _tenant, trail = opened
    try:
        sock = daemon.listen(args.socket_path) if args.socket_path else socket.socket(fileno=args.fd)
    except OSError as exc:
        print(f"gateway virtiofsd: {args.socket_path or args.fd}: {exc}", file=sys.stderr)
        trail.lifecycle("stop", reason=f"socket: {exc}")
        trail.close()
        return 1
    if args.sandbox == "namespace":
        print("gateway virtiofsd: --sandbox namespace: no namespaces here; the chroot, capabilities, "
              "no_new_privs, Landlock and the filter are applied", file=sys.stderr)
    if args.seccomp == "none":
        print("gateway virtiofsd: WARNING: --seccomp none: serving WITHOUT the system-call filter",
              file=sys.stderr)
    from gateway.sandbox import VIRTIOFS_CAPABILITIES, SandboxConfig
    from gateway.seccomp_filter import VIRTIOFS_EXTRA

    config = SandboxConfig(
        os.path.abspath(shared), seccomp=args.seccomp, landlock=args.landlock,
        capabilities=dict(VIRTIOFS_CAPABILITIES), extra_syscalls=VIRTIOFS_EXTRA,
        chroot=args.sandbox != "none",
    )  # fmt: skip
    return daemon.run(shared, sock, policy=policy, policy_source=str(policy_path), trail=trail,
                      readonly=args.readonly, sandbox=config)
