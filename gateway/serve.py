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
import errno
import gc
import logging
import os
import socket
import stat
import sys
from collections.abc import Callable
from pathlib import Path

from gateway import __version__, fastloop, landlock, signals, systemd
from gateway.audit import AuditError, AuditWriter
from gateway.audit.seal import open_seal_key
from gateway.core.executor import Executor, getversion_supported
from gateway.endpoint import StartupError, close_inherited_fds, open_endpoint, peer_credentials
from gateway.logfmt import kv
from gateway.reload_worker import ReloadWorker
from gateway.rules import Policy, PolicyError, load_policy, load_policy_bytes, loader
from gateway.sandbox import SandboxConfig, build_walls, lock_down
from gateway.server import STOPPED, Server, ServeStats, StopRequested

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
 [--audit-log FILE] the trail (default: the policy's audit.path, else
   /var/log/gateway/<tenant>@<socket path, or fd-<export>>.jsonl)
 [--audit-sync every|interval|never] [--audit-syslog] [--console] (with -n: a live rich view)
 [--audit-seal-key FILE] seal the trail's checkpoints (`gateway audit keygen` makes the key)
 [--seccomp kill|trap|log|errno|none] [--no-landlock]
 [--persist] (with -s) after a client goes, wait for the next one
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


def _owner_id(what: str) -> Callable[[str], int]:
    """-u/-g: a number, or a usage error. The reference's atoi takes "abc" as 0, which left a socket
    owned by root where the operator meant someone else: the gateway refuses instead."""

    def parse(text: str) -> int:
        if not text.strip().isdigit():
            raise argparse.ArgumentTypeError(f"{what} must be a number, not {text!r}")
        return int(text)

    parse.__name__ = what
    return parse


def build_parser(prog: str = "gateway serve") -> argparse.ArgumentParser:
    parser = _Parser(prog=prog, add_help=False, usage=argparse.SUPPRESS)
    parser.add_argument("-p", "--path", dest="path")
    parser.add_argument("-f", "--fd", dest="fd", type=_atoi, default=-1)
    parser.add_argument("-s", "--socket", dest="socket")
    parser.add_argument("-u", "--uid", dest="uid", type=_owner_id("uid"), default=-1)
    parser.add_argument("-g", "--gid", dest="gid", type=_owner_id("gid"), default=-1)
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
    parser.add_argument("--persist", dest="persist", action="store_true")
    return parser


# Help text and metavar of each option, by dest, for the man pages and shell completions
# (gateway.cli.build_parser); the parser that serves keeps the reference's terse usage. Every option
# build_parser() adds needs an entry here: tests/test_cli_docs.py fails on one that has none.
OPTION_HELP: dict[str, tuple[str | None, str]] = {
    "path": ("DIR", "the directory to export (the gateway chroots into it)"),
    "fd": ("FD", "an inherited, connected socket to serve (QEMU: -fsdev proxy,sock_fd=...)"),
    "socket": ("SOCK", "create this Unix socket and accept the client on it (needs -u and -g); under "
               "socket activation (LISTEN_FDS) the inherited listener bound to this path"),
    "uid": ("UID", "the owner given to the socket file (numeric)"),
    "gid": ("GID", "the group given to the socket file (numeric)"),
    "nodaemon": (None, "stay in the foreground and log to stderr (default: daemonise, log to syslog)"),
    "help": (None, "show the usage and exit"),
    "policy": ("FILE", "the policy to enforce (default: the built-in baseline)"),
    "tenant": ("NAME", "the tenant stamped on every record; with --policy-dir, the policy DIR/NAME.yaml"),
    "policy_dir": ("DIR", "the directory of per-tenant policies (with --tenant)"),
    "audit_log": ("FILE", "the audit trail (default: the policy's audit.path, else "
                  "/var/log/gateway/TENANT@CHANNEL.jsonl, CHANNEL from the socket path or the export)"),
    "audit_sync": (None, "fsync after every record, at most once a second (default), or never"),
    "audit_syslog": (None, "also send each record to /dev/log (RFC 5424, structured data)"),
    "audit_seal_key": ("FILE", "seal the trail's checkpoints with this forward-secure key (made by "
                               "`gateway audit keygen`; it evolves at each checkpoint)"),
    "console": (None, "with -n: draw a live line per decision on stdout"),
    "seccomp": (None, "the system-call filter's action for a forbidden call (default: kill)"),
    "landlock": (None, "do not apply Landlock (the other walls stand)"),
    "persist": (None, "with -s: when the client goes away, accept the next one (a session record each) "
                "instead of exiting; what the systemd unit runs"),
}


def documented_parser(prog: str = "gateway serve") -> argparse.ArgumentParser:
    """build_parser() with each option's help and metavar from OPTION_HELP (KeyError: one has none)."""
    parser = build_parser(prog)
    for action in parser._actions:
        metavar, text = OPTION_HELP[action.dest]
        action.help = text
        if metavar is not None and action.nargs != 0:
            action.metavar = metavar
    parser.usage = None
    parser.description = (
        "Serve a guest's 9p proxy requests: virtfs-proxy-helper's options, each request decided by a "
        "policy, performed beneath the export's root and recorded in a hash-chained audit trail."
    )
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
    if opts.persist and opts.socket is None:
        raise UsageError("--persist needs -s: an inherited connection (-f) has no next client")
    if opts.console and not opts.nodaemon:
        # a daemon's stdout is /dev/null: the console would draw for nobody
        raise UsageError("--console needs -n|--nodaemon (a daemon has no terminal to draw on)")
    return opts


def check_export(path: str) -> None:
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise UsageError(f'invalid path "{path}" specified, {exc.strerror}', show_usage=False) from None
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f'specified path "{path}" is not directory', show_usage=False)


def setup_logging(foreground: bool) -> bool:
    """Log lines to stderr (-n) or to /dev/log, connected now (before the sandbox); False when the daemon
    has no syslog to log to."""
    root = logging.getLogger("gateway")
    root.setLevel(logging.INFO)
    root.handlers.clear()
    if foreground:
        handler: logging.Handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("gateway[%(process)d]: %(message)s"))
    else:
        dev_log = DevLogHandler()
        handler = dev_log
        handler.setFormatter(logging.Formatter("gateway[%(process)d]: %(message)s"))
    root.addHandler(handler)
    return foreground or dev_log.sock is not None


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


def daemonize(null: int) -> None:
    """daemon(0, 0): detach from the terminal and session, cwd /, stdio to /dev/null. null: /dev/null,
    opened before the chroot (the export has none)."""
    if os.fork() > 0:
        os._exit(0)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    os.chdir("/")
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)


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


def trail_channel(opts: argparse.Namespace) -> str:
    """What makes this gateway's default trail its own: the socket path (-s; one process can bind it at
    a time), else the export (-f: an inherited fd has no name of its own, and one export is served by
    one gateway)."""
    if opts.socket is not None:
        return os.path.abspath(opts.socket)
    return "fd-" + os.path.abspath(opts.path).lstrip("/")


def open_trail(opts: argparse.Namespace, policy: Policy, tenant: str) -> AuditWriter:
    """--audit-log, else the policy's audit.path, else /var/log/gateway/<tenant>@<channel>.jsonl (see
    trail_channel): never nowhere, and two gateways started alike never share a default.

    A trail another gateway holds is refused (AuditError), saying which option gives this one its own."""
    path = opts.audit_log or policy.audit_path  # None: the writer takes default_audit_path(tenant, channel)
    channel = trail_channel(opts)
    console = None
    if opts.console:
        from gateway.audit.console import start_console_renderer

        console = start_console_renderer()
    try:
        return AuditWriter.open(
            path,
            tenant=tenant,
            policy_hash=policy.hash,
            sync=opts.audit_sync,
            syslog=opts.audit_syslog,
            console=console,
            channel=channel,
            seal=open_seal_key(opts.audit_seal_key),  # opened now: before the sandbox
        )
    except AuditError as exc:
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise
        if opts.audit_log:
            hint = "give this gateway a trail of its own with --audit-log FILE"
        elif policy.audit_path:
            hint = (f"it is the policy's audit.path ({policy.audit_path}); give this gateway a trail of its "
                    "own with --audit-log FILE")  # fmt: skip
        else:
            hint = (f"it is the default trail of tenant {tenant!r} on {channel}; give this gateway a trail "
                    "of its own with --audit-log FILE, or another --tenant NAME")  # fmt: skip
        raise AuditError(exc.errno, f"{exc.strerror}: {hint}") from None


def open_policy_and_trail(
    opts: argparse.Namespace, prog: str
) -> tuple[Path, Policy, str, AuditWriter] | None:
    """The policy (its path), the tenant and the trail, for serve and virtiofsd alike; None once the
    refusal is on stderr. An invalid policy is never served, naming every problem (file:line: field),
    and nothing is served without its trail. The trail's notes (e.g. --audit-syslog without /dev/log)
    are said on stderr too, not only in a record."""
    try:
        policy_path = policy_location(opts)
        policy = load_policy(policy_path)
    except (OSError, PolicyError) as exc:
        print(f"{prog}: refusing to serve: {exc}", file=sys.stderr)
        return None
    tenant = opts.tenant or policy.tenant
    try:
        trail = open_trail(opts, policy, tenant)
    except (OSError, ValueError) as exc:
        print(f"{prog}: refusing to serve without an audit trail: {exc}", file=sys.stderr)
        return None
    for note in trail.notes:
        print(f"{prog}: warning: {note}", file=sys.stderr)
    return policy_path, policy, tenant, trail


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
        return load_policy_bytes(raw, source, loader.dir_reader(dir_fd))

    return reload, dir_fd


def start_reload_worker(server: Server) -> None:
    """SIGHUP's reload compiled in a thread of its own (gateway.reload_worker), started inside the sandbox.
    A 1 ms switch interval (CPython's default is 5 ms) bounds how long a request that arrives meanwhile
    waits for the interpreter."""
    assert server.reloader is not None
    server.reload_worker = ReloadWorker(server.reloader)
    sys.setswitchinterval(0.001)


def run(argv: list[str], prog: str = "gateway serve") -> int:
    # A reload or rotation signal that lands during start-up must neither kill the gateway (both
    # terminate by default) nor be lost: held until the server can act on it (gateway.signals). The
    # entry points have done so already, before their imports; this covers a caller of run() itself.
    signals.hold_reload_signals()
    activated = systemd.listen_fds()  # first: the variables describe fds this process was given
    try:
        opts = parse_options(argv, prog)
        check_export(opts.path)
    except UsageError as exc:
        if str(exc):
            print(str(exc), file=sys.stderr)
        if exc.show_usage:
            print(USAGE.format(prog=prog), end="", file=sys.stderr)
        return exc.status
    close_inherited_fds(keep={opts.fd, *activated})
    opened = open_policy_and_trail(opts, prog)
    if opened is None:
        return 1
    policy_path, policy, tenant, trail = opened

    # Everything that can fail for a reason the operator must hear about fails here, on stderr, before
    # the process detaches: the socket, the service manager's socket, syslog.
    try:
        endpoint = open_endpoint(
            socket_path=opts.socket, fd=opts.fd, uid=opts.uid, gid=opts.gid, activated=activated
        )
        notifier = systemd.Notifier.from_environ()
    except (StartupError, OSError) as exc:
        message = str(exc) if isinstance(exc, StartupError) else f"NOTIFY_SOCKET: {exc.strerror}"
        print(f"{prog}: {message}", file=sys.stderr)
        trail.lifecycle("stop", reason=message)
        return 1
    if not setup_logging(foreground=opts.nodaemon):
        print(f"{prog}: warning: /dev/log is not there: the daemon's log lines are lost", file=sys.stderr)

    # Everything the server will need is opened now, before the chroot and the filter.
    export = os.path.abspath(opts.path)
    root_fd = os.open(export, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    proc_fd = os.open("/proc/self/fd", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    executor = Executor(root_fd, proc_fd, getversion_supported=getversion_supported(root_fd))
    server = Server(None, executor, policy, trail)
    server.reloader, policy_dir_fd = policy_reloader(policy_path)
    server.wakeup_fd = signals.install(
        server.request_reload, server.request_reopen, server.request_wakeup, server.request_stop
    )
    grants = [
        (trail.dirfd, landlock.AUDIT_DIR, os.path.dirname(trail.path)),
        (policy_dir_fd, landlock.READ_ONLY, str(policy_path.parent)),
    ]
    if opts.seccomp == "none":
        log.warning("WARNING: --seccomp none: the gateway serves WITHOUT its system-call filter")
    null = -1 if opts.nodaemon else os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    release_startup_memory()
    # Confined before waiting: a gateway whose VM has not started yet is already what it will be while
    # serving (gateway inspect says so). accept() needs no path; the filter allows it on the listener only.
    # The walls a fork inherits go up before the daemon detaches, so that their failure is heard.
    config = SandboxConfig(
        export, seccomp=opts.seccomp, landlock=opts.landlock, grants=grants,
        accept_fd=endpoint.accept_fd, start_threads=lambda: start_reload_worker(server),
    )  # fmt: skip
    try:
        os.umask(0)
        state = build_walls(config, root_fd)
    except OSError as exc:
        print(f"{prog}: confinement failed: {exc}", file=sys.stderr)
        trail.lifecycle("stop", reason=f"confinement failed: {exc}")
        return 1
    if not opts.nodaemon:
        daemonize(null)
    log.info("Started")
    try:
        lock_down(config, state)  # threads, rlimits, the filter: after the fork, which they forbid
    except OSError as exc:
        log.critical("confinement failed %s", kv(error=str(exc)))
        trail.lifecycle("stop", reason=f"confinement failed: {exc}")
        return 1
    if not trail.lifecycle(
        "start", version=__version__, export=export, policy_source=str(policy_path), sandbox=state.as_dict(),
        data_plane=fastloop.build_info(), endpoint=endpoint.describe(), persist=opts.persist,
    ):  # fmt: skip
        log.critical("refusing to serve: the start record cannot be written %s", kv(trail=trail.path))
        return 1
    trail.lifecycle(
        "policy-load", source=str(policy_path), rules=len(policy.rules), enforcement=policy.enforcement
    )
    log.info(
        "serving %s", kv(export=export, policy=str(policy_path), endpoint=endpoint.describe(), sandbox=state)
    )
    label = f"tenant {tenant}" if tenant else "gateway"
    notifier.notify(READY=1, STATUS=f"{label}: waiting for a client on {endpoint.describe()}")
    sessions = 0
    stats = ServeStats()
    while not server.stop_requested:
        try:
            server.waiting_for_client = True  # a stop signal now raises StopRequested (once: it clears this)
            client = endpoint.next_client()
            server.waiting_for_client = False
        except StopRequested:
            break
        except OSError as exc:
            server.waiting_for_client = False
            log.critical("accept failed %s", kv(error=exc.strerror or str(exc)))
            trail.lifecycle("stop", reason=f"accept failed: {exc.strerror}", sessions=sessions)
            notifier.notify(STOPPING=1)
            return 1
        if not opts.persist:
            endpoint.close_listener()
        sessions += 1
        peer = peer_credentials(client)
        trail.lifecycle("session", session=sessions, peer=peer)
        notifier.notify(STATUS=f"{label}: serving client {sessions} ({_peer_text(peer)})")
        stats = server.serve_client(client)
        client.close()
        server.flush_limit_hits()
        if stats.end == "client closed the connection":
            trail.lifecycle("client-gone", requests=stats.requests, session=sessions)
        log.info("client done %s", kv(session=sessions, end=stats.end, requests=stats.requests))
        if not opts.persist:
            break
        notifier.notify(STATUS=f"{label}: {sessions} client(s) served, waiting for the next")
    if server.stop_requested:
        stats.end = STOPPED  # whenever it came: while waiting, serving, or between two clients
    notifier.notify(STOPPING=1, STATUS=f"{label}: stopping ({stats.end})")
    trail.lifecycle(
        "stop", reason=stats.end, requests=stats.requests, denied=stats.denied, malformed=stats.malformed,
        unknown=stats.unknown, sessions=sessions,
    )  # fmt: skip
    trail.close()
    log.info("Done %s", kv(end=stats.end, requests=stats.requests, sessions=sessions))
    return 0


def _peer_text(peer: dict[str, int] | None) -> str:
    return "peer unknown" if peer is None else f"pid {peer['pid']}, uid {peer['uid']}"
