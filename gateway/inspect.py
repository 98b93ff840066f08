"""`gateway inspect PID`: read a running gateway's confinement from /proc and compare it with what its
own command line promised. Exit 0 when it holds, 1 when it is weaker, 2 when PID is not a gateway."""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field

from gateway.sandbox import KEPT_CAPABILITIES

# Capability numbers to names (the kernel's, up to 40), for decoding the masks in /proc/PID/status.
CAP_NAMES = (
    "chown dac_override dac_read_search fowner fsetid kill setgid setuid setpcap linux_immutable "
    "net_bind_service net_broadcast net_admin net_raw ipc_lock ipc_owner sys_module sys_rawio sys_chroot "
    "sys_ptrace sys_pacct sys_admin sys_boot sys_nice sys_resource sys_time sys_tty_config mknod lease "
    "audit_write audit_control setfcap mac_override mac_admin syslog wake_alarm block_suspend audit_read "
    "perfmon bpf checkpoint_restore"
).split()
SECCOMP_MODES = {"0": "disabled", "1": "strict", "2": "filter"}


def cap_names(mask: int) -> list[str]:
    return [CAP_NAMES[i] if i < len(CAP_NAMES) else f"cap_{i}" for i in range(64) if mask >> i & 1]


@dataclass
class Finding:
    item: str
    seen: str
    promised: str
    ok: bool


@dataclass
class Inspection:
    pid: int
    command: list[str]
    findings: list[Finding] = field(default_factory=list)
    fds: list[tuple[int, str]] = field(default_factory=list)

    @property
    def holds(self) -> bool:
        return all(f.ok for f in self.findings)


def _status(pid: int, tid: int | None = None) -> dict[str, str]:
    out: dict[str, str] = {}
    with open(f"/proc/{pid}/status" if tid is None else f"/proc/{pid}/task/{tid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            out[key] = value.strip()
    return out


def _serve_args(cmdline: list[str]) -> argparse.Namespace | None:
    """The serve options in a gateway's command line (None when it is not a gateway serve or a gateway
    virtiofsd), with what it promises: ``capabilities`` kept and whether it chroots."""
    from gateway.serve import build_parser

    for marker in ("serve", "gateway-proxy-helper"):
        for i, arg in enumerate(cmdline):
            if arg == marker or arg.endswith("/" + marker):
                try:
                    opts = build_parser().parse_args(cmdline[i + 1 :])
                except Exception:
                    return None
                opts.capabilities, opts.chroot = KEPT_CAPABILITIES, True
                return opts
    if "gateway" in " ".join(cmdline[:3]) and "virtiofsd" in cmdline[1:4]:
        return _virtiofsd_args(cmdline[cmdline.index("virtiofsd") + 1 :])
    return None


def _virtiofsd_args(argv: list[str]) -> argparse.Namespace | None:
    """A `gateway virtiofsd`'s options, in the names _confinement reads."""
    from gateway.sandbox import VIRTIOFS_CAPABILITIES
    from gateway.virtiofs.cli import add_arguments as virtiofsd_arguments

    parser = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    virtiofsd_arguments(parser)
    try:
        args = parser.parse_args(argv)
    except (Exception, SystemExit):
        return None
    shared = args.shared_dir
    for group in args.options:
        for opt in group.split(","):
            if opt.startswith("source="):
                shared = opt[len("source="):]
    return argparse.Namespace(path=shared, seccomp=args.seccomp, landlock=args.landlock,
                              capabilities=VIRTIOFS_CAPABILITIES, chroot=args.sandbox != "none")


def inspect_pid(pid: int) -> Inspection | None:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        cmdline = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    opts = _serve_args(cmdline)
    if opts is None:
        return None
    status = _status(pid)
    result = Inspection(pid, cmdline)
    as_root = status.get("Uid", "").split()[:1] == ["0"]
    result.findings += _confinement(status, opts, as_root)
    # Capabilities, no_new_privs and the filter are per thread: every thread (the reload worker too) must
    # hold what the process promised, and the weakest one is what an attacker would use.
    threads = sorted((int(t) for t in os.listdir(f"/proc/{pid}/task")), key=lambda t: t != pid)
    for tid in threads[1:]:
        try:
            theirs = _confinement(_status(pid, tid), opts, as_root)
        except OSError:
            continue  # gone meanwhile
        for i, finding in enumerate(theirs):
            if not finding.ok and result.findings[i].ok:
                seen = f"thread {tid}: {finding.seen}"
                result.findings[i] = Finding(finding.item, seen, finding.promised, False)
    result.findings.append(Finding("threads", str(len(threads)), "each as confined as the process", True))

    def add(item: str, seen: str, promised: str, ok: bool) -> None:
        result.findings.append(Finding(item, seen, promised, ok))

    root = os.readlink(f"/proc/{pid}/root")
    export = os.path.realpath(opts.path) if opts.path else "?"
    if not opts.chroot:
        add("root", root, "(--sandbox none: no chroot)", True)
    else:
        add("root", root, export if as_root else "(not root: no chroot)", root == export or not as_root)
    add("uid/gid", f"{status.get('Uid', '?').split()[0]}/{status.get('Gid', '?').split()[0]}", "0/0", True)
    add("landlock", "not visible in /proc", "on" if opts.landlock else "off", True)
    for name in sorted(os.listdir(f"/proc/{pid}/fd"), key=int):
        try:
            result.fds.append((int(name), os.readlink(f"/proc/{pid}/fd/{name}")))
        except OSError:
            continue
    return result


def _confinement(status: dict[str, str], opts: argparse.Namespace, as_root: bool) -> list[Finding]:
    """The per-thread findings (capabilities, no_new_privs, seccomp) of one thread's status."""
    findings: list[Finding] = []
    kept = sorted(opts.capabilities)
    kept_mask = sum(1 << v for v in opts.capabilities.values())

    def add(item: str, seen: str, promised: str, ok: bool) -> None:
        findings.append(Finding(item, seen, promised, ok))

    for key, label in (("CapEff", "effective"), ("CapPrm", "permitted"), ("CapBnd", "bounding")):
        mask = int(status.get(key, "0"), 16)
        # effective may be smaller than the seven (trimmed while acting as a guest user), never larger
        ok = mask == kept_mask if key != "CapEff" else mask & ~kept_mask == 0
        add(f"capabilities {label}", ", ".join(cap_names(mask)) or "none", ", ".join(kept), ok or not as_root)
    for key, label in (("CapInh", "inheritable"), ("CapAmb", "ambient")):
        mask = int(status.get(key, "0"), 16)
        add(f"capabilities {label}", ", ".join(cap_names(mask)) or "none", "none", mask == 0)
    add("no_new_privs", status.get("NoNewPrivs", "?"), "1", status.get("NoNewPrivs") == "1")
    want_seccomp = "0" if opts.seccomp == "none" else "2"
    seen = status.get("Seccomp", "?")
    add(
        "seccomp",
        f"{SECCOMP_MODES.get(seen, seen)} ({status.get('Seccomp_filters', '?')} filters)",
        f"{SECCOMP_MODES[want_seccomp]} ({opts.seccomp})",
        seen == want_seccomp,
    )
    return findings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pid", type=int, help="a running `gateway serve` or `gateway virtiofsd` process")
    parser.add_argument("--format", choices=["table", "json"], default="table")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    try:
        result = inspect_pid(args.pid)
    except OSError as exc:
        console.print(f"[red]cannot read /proc/{args.pid}: {exc.strerror}[/]")
        return 2
    if result is None:
        console.print(f"[red]process {args.pid} is not a `gateway serve` or `gateway virtiofsd`[/]")
        return 2
    if args.format == "json":
        print(
            json.dumps(
                {
                    "pid": result.pid,
                    "holds": result.holds,
                    "findings": [f.__dict__ for f in result.findings],
                    "fds": [{"fd": fd, "target": t} for fd, t in result.fds],
                }
            )
        )
        return 0 if result.holds else 1
    table = Table(title=f"gateway {result.pid}: confinement", title_justify="left")
    for col in ("", "item", "seen in /proc", "promised"):
        table.add_column(col)
    for f in result.findings:
        table.add_row("[green]ok[/]" if f.ok else "[red]WEAKER[/]", f.item, f.seen, f.promised)
    console.print(table)
    fds = Table(title="open file descriptors", title_justify="left")
    fds.add_column("fd", justify="right")
    fds.add_column("target")
    for fd, target in result.fds:
        fds.add_row(str(fd), target)
    console.print(fds)
    console.print("[green]confinement holds[/]" if result.holds else "[red]weaker than promised[/]")
    return 0 if result.holds else 1
