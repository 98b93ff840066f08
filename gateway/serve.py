"""`gateway serve`: the start-up of the drop-in helper, in the reference's order.

Parse options (same meaning as virtfs-proxy-helper's), check the export is a directory, daemonise unless
-n (logs then go to syslog), create the named socket if asked and accept one client, open the export's
root fd and /proc/self/fd, chroot into the export, umask 0, drop capabilities, then serve until the
client goes away.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import logging
import os
import socket
import stat
import sys
from collections.abc import Callable
from pathlib import Path

from gateway import __version__, fastloop, landlock, signals
from gateway.audit import AuditWriter
from gateway.audit.seal import open_seal_key
from gateway.core.executor import Executor, getversion_supported
from gateway.rules import Policy, PolicyError, load_policy, load_policy_bytes, loader
from gateway.sandbox import SandboxConfig, confine
from gateway.server import Server

log = logging.getLogger("gateway")

USAGE = """usage: {prog}
 -p|--path <path> 9p path to export
 {{-f|--fd <socket-descriptor>}} socket file descriptor to be used
 {{-s|--socket <socketname> socket file used for communication
 \t-u|--uid <uid> -g|--gid <gid>}} - uid:gid combination to give  access to this socket
 \tNote: -s & -f can not be used together
 [-n|--nodaemon] Run as a normal program
 gateway's own options:
 [--policy FILE | --policy-dir DIR --tenant NAME] the policy (default: the built-in baseline)
 [--audit-log FILE] the trail (default: the policy's audit.path, else /var/log/gateway/<tenant>.jsonl)
 [--audit-sync every|interval|never] [--audit-syslog] [--console] (with -n: a live rich view)
 [--audit-seal-key FILE] seal the trail's checkpoints (`gateway audit keygen` makes the key)
 [--seccomp kill|trap|log|errno|none] [--no-landlock]
"""


class UsageError(Exception):
    """A usage error, reported as the reference reports it; `status` is its exit status."""

    def __init__(self, message: str, status: int = 1, *, show_usage: bool = True) -> None:
        super().__init__(message)
        self.status = status
        self.show_usage = show_usage


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}")


def _atoi(text: str) -> int:
    """C atoi: leading digits, else 0 (the reference's -f/-u/-g parsing)."""
    text = text.strip()
    sign = -1 if text.startswith("-") else 1
    digits = ""
    for ch in text.lstrip("+-"):
        if not ch.isdigit():
            break
        digits += ch
    return sign * int(digits) if digits else 0


def build_parser(prog: str = "gateway serve") -> argparse.ArgumentParser:
    parser = _Parser(prog=prog, add_help=False, usage=argparse.SUPPRESS)
    parser.add_argument("-p", "--path", dest="path")
    parser.add_argument("-f", "--fd", dest="fd", type=_atoi, default=-1)
    parser.add_argument("-s", "--socket", dest="socket")
    parser.add_argument("-u", "--uid", dest="uid", type=_atoi, default=-1)
    parser.add_argument("-g", "--gid", dest="gid", type=_atoi, default=-1)
    parser.add_argument("-n", "--nodaemon", dest="nodaemon", action="store_true")
    parser.add_argument("-h", "-?", "--help", dest="help", action="store_true")
    parser.add_argument("--policy", dest="policy")
    parser.add_argument("--tenant", dest="tenant")
    parser.add_argument("--policy-dir", dest="policy_dir")
    parser.add_argument("--audit-log", dest="audit_log")
    parser.add_argument(
        "--audit-sync", dest="audit_sync", default="interval", choices=["every", "interval", "never"]
    )
    parser.add_argument("--audit-syslog", dest="audit_syslog", action="store_true")
    parser.add_argument("--audit-seal-key", dest="audit_seal_key")  # gateway.audit.seal
    parser.add_argument("--console", dest="console", action="store_true")
    parser.add_argument(
        "--seccomp", dest="seccomp", default="kill", choices=["kill", "trap", "log", "errno", "none"]
    )
    parser.add_argument("--no-landlock", dest="landlock", action="store_false")
    return parser


def parse_options(argv: list[str], prog: str) -> argparse.Namespace:
    """The reference's validation, message for message."""
    opts = build_parser(prog).parse_args(argv)
    if opts.help:
        raise UsageError("")
    if (opts.socket is None and opts.fd == -1) or opts.path is None:
        raise UsageError("socket, socket descriptor or path not specified", status=255)
    if opts.socket is not None and opts.fd != -1:
        raise UsageError("both named socket and socket descriptor specified")
    if opts.socket is not None and (opts.uid == -1 or opts.gid == -1):
        raise UsageError(
            "owner uid:gid not specified, owner uid:gid specifies who can access the socket file"
        )
    return opts


def check_export(path: str) -> None:
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise UsageError(f'invalid path "{path}" specified, {exc.strerror}', show_usage=False) from None
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f'specified path "{path}" is not directory', show_usage=False)


def setup_logging(foreground: bool) -> None:
    root = logging.getLogger("gateway")
    root.setLevel(logging.INFO)
    root.handlers.clear()
    if foreground:
        handler: logging.Handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("gateway[%(process)d]: %(message)s"))
    else:
        handler = DevLogHandler()
        handler.setFormatter(logging.Formatter("gateway[%(process)d]: %(message)s"))
    root.addHandler(handler)


class DevLogHandler(logging.Handler):
    """Daemon logging to the local syslog socket, connected once at start-up.

    Unlike logging.handlers.SysLogHandler it never reconnects: after the sandbox, socket() and connect()
    are forbidden, so a syslog daemon that is absent or restarted costs log lines, never the process."""

    _PRIORITY = {"DEBUG": 7, "INFO": 6, "WARNING": 4, "ERROR": 3, "CRITICAL": 2}

    def __init__(self, address: str = "/dev/log") -> None:
        super().__init__()
        self.sock: socket.socket | None = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            self.sock.connect(address)
        except OSError:
            self.sock.close()
            self.sock = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.sock is None:
            return
        priority = 3 * 8 + self._PRIORITY.get(record.levelname, 6)  # facility daemon (3)
        with contextlib.suppress(OSError):
            self.sock.send(f"<{priority}>{self.format(record)}".encode(errors="replace"))


def daemonize() -> None:
    """daemon(0, 0): detach from the terminal and session, cwd /, stdio to /dev/null."""
    if os.fork() > 0:
        os._exit(0)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    os.chdir("/")
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    if null > 2:
        os.close(null)


class SocketExists(Exception):
    pass


def listen_and_accept(path: str, uid: int, gid: int) -> socket.socket:
    """The reference's proxy_socket(): refuse an existing path, bind with umask 007, chown to uid:gid,
    listen with backlog 1, accept ONE client and close the listener (the file is left behind)."""
    if os.path.lexists(path):
        raise SocketExists("socket already exists")
    if len(os.fsencode(path)) >= 108:
        raise OSError(f"UNIX domain socket path exceeds {108} characters")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old = os.umask(0o007)
        try:
            listener.bind(path)
        finally:
            os.umask(old)
        os.chown(path, uid, gid)
        listener.listen(1)
        client, _ = listener.accept()
    finally:
        listener.close()
    return client


def inherited_socket(fd: int) -> socket.socket:
    try:
        return socket.socket(fileno=fd)
    except OSError as exc:
        raise OSError(f"socket descriptor {fd} is not usable: {exc.strerror}") from None


BASELINE = Path(__file__).with_name("rules") / "baseline.yaml"


def policy_location(opts: argparse.Namespace) -> Path:
    """--policy FILE; else --policy-dir DIR with --tenant NAME: DIR/NAME.yaml; else the baseline."""
    if opts.policy is not None:
        return Path(opts.policy)
    if opts.policy_dir is not None:
        if not opts.tenant:
            raise OSError("--policy-dir needs --tenant NAME (the policy is DIR/NAME.yaml)")
        return Path(opts.policy_dir) / f"{opts.tenant}.yaml"
    return BASELINE


def open_trail(opts: argparse.Namespace, policy: Policy, tenant: str) -> AuditWriter:
    """--audit-log, else the policy's audit.path, else /var/log/gateway/<tenant>.jsonl: never nowhere."""
    path = opts.audit_log or policy.audit_path  # None: the writer takes default_audit_path(tenant)
    console = None
    if opts.console:
        from gateway.audit.console import start_console_renderer

        console = start_console_renderer()
    return AuditWriter.open(
        path,
        tenant=tenant,
        policy_hash=policy.hash,
        sync=opts.audit_sync,
        syslog=opts.audit_syslog,
        console=console,
        seal=open_seal_key(opts.audit_seal_key),  # opened now: before the sandbox
    )


def release_startup_memory() -> None:
    """Start-up garbage (the YAML parse tree, argparse's parser) back to the kernel before serving: a
    host runs one gateway per guest, so each one's resident size counts twenty times over."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    # What is left lives as long as the process (modules, the compiled policy): out of the collector's
    # sight, so that a collection the pipeline's requests trigger never walks it.
    gc.freeze()


def policy_reloader(policy_path: Path) -> tuple[Callable[[], Policy], int]:
    """A reader of the policy file through its directory's fd: after chroot the path means nothing,
    the fd still names the host's directory (and Landlock grants reading beneath it)."""
    dir_fd = os.open(policy_path.parent.resolve(), os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    name = policy_path.name
    source = str(policy_path)

    def reload() -> Policy:
        fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
        with os.fdopen(fd, "rb") as f:
            raw = loader.read_bounded(f)  # a reload reads no more than a start would
        return load_policy_bytes(raw, source)

    return reload, dir_fd


def run(argv: list[str], prog: str = "gateway serve") -> int:
    # A reload or rotation signal that lands during start-up must neither kill the gateway (both
    # terminate by default) nor be lost: held until the server can act on it (gateway.signals). The
    # entry points have done so already, before their imports; this covers a caller of run() itself.
    signals.hold_reload_signals()
    try:
        opts = parse_options(argv, prog)
        check_export(opts.path)
    except UsageError as exc:
        if str(exc):
            print(str(exc), file=sys.stderr)
        if exc.show_usage:
            print(USAGE.format(prog=prog), end="", file=sys.stderr)
        return exc.status
    try:
        policy_path = policy_location(opts)
        policy = load_policy(policy_path)
    except (OSError, PolicyError) as exc:
        # An invalid policy is never served: refuse to start, naming every problem (file:line: field).
        print(f"{prog}: refusing to serve: {exc}", file=sys.stderr)
        return 1
    tenant = opts.tenant or policy.tenant
    try:
        trail = open_trail(opts, policy, tenant)
    except (OSError, ValueError) as exc:
        print(f"{prog}: refusing to serve without an audit trail: {exc}", file=sys.stderr)
        return 1

    if not opts.nodaemon:
        daemonize()
    setup_logging(foreground=opts.nodaemon)
    log.info("Started")
    try:
        sock = (
            listen_and_accept(opts.socket, opts.uid, opts.gid)
            if opts.socket is not None
            else inherited_socket(opts.fd)
        )
    except SocketExists as exc:
        log.critical("%s", exc)  # the reference exits with status 0 here
        trail.lifecycle("stop", reason=str(exc))
        return 0
    except OSError as exc:
        log.critical("%s", exc)
        trail.lifecycle("stop", reason=str(exc))
        return 1

    # Everything the server will need is opened now, before the chroot and the filter.
    export = os.path.abspath(opts.path)
    root_fd = os.open(export, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    proc_fd = os.open("/proc/self/fd", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    executor = Executor(root_fd, proc_fd, getversion_supported=getversion_supported(root_fd))
    server = Server(sock, executor, policy, trail)
    server.reloader, policy_dir_fd = policy_reloader(policy_path)
    server.wakeup_fd = signals.install(server.request_reload, server.request_reopen)
    grants = [
        (trail.dirfd, landlock.AUDIT_DIR, os.path.dirname(trail.path)),
        (policy_dir_fd, landlock.READ_ONLY, str(policy_path.parent)),
    ]
    if opts.seccomp == "none":
        log.warning("WARNING: --seccomp none: the gateway serves WITHOUT its system-call filter")
    release_startup_memory()
    try:
        os.umask(0)
        state = confine(
            SandboxConfig(export, seccomp=opts.seccomp, landlock=opts.landlock, grants=grants), root_fd
        )
    except OSError as exc:
        log.critical("confinement failed: %s", exc)
        trail.lifecycle("stop", reason=f"confinement failed: {exc}")
        return 1
    if not trail.lifecycle(
        "start", version=__version__, export=export, policy_source=str(policy_path), sandbox=state.as_dict(),
        data_plane=fastloop.build_info(),
    ):
        log.critical("refusing to serve: the start record cannot be written to %s", trail.path)
        return 1
    trail.lifecycle(
        "policy-load", source=str(policy_path), rules=len(policy.rules), enforcement=policy.enforcement
    )
    log.info("serving %s with policy %s (%s)", export, policy_path, state.as_dict())
    stats = server.serve()
    server.flush_limit_hits()
    if stats.end == "client closed the connection":
        trail.lifecycle("client-gone", requests=stats.requests)
    trail.lifecycle(
        "stop", reason=stats.end, requests=stats.requests, denied=stats.denied, malformed=stats.malformed,
        unknown=stats.unknown,
    )  # fmt: skip
    trail.close()
    log.info("Done: %s after %d requests", stats.end, stats.requests)
    return 0
