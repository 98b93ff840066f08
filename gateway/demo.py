"""`gateway demo`: a newcomer's first run, on built-in defaults.

A temporary export, a real `gateway serve` process (examples/policy.yaml when it is there), a scripted
guest session over the real protocol through the client (creates, reads, chmod, chown, a symlink, denied
requests, escape attempts), then a short rich summary of what happened and what the trail recorded.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gateway import protocol as p
from gateway.client import Client, Reply

REPO = Path(__file__).resolve().parent.parent
DEFAULT_POLICY = REPO / "examples" / "policy.yaml"


@dataclass
class Step:
    what: str
    request: p.Request
    expect: str  # "ok", "denied" or "refused" (the kernel/executor said no: an escape that failed)
    check: Callable[[Reply], str] | None = None  # what the host sees afterwards


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--policy", type=Path, default=None, help="policy to serve (default: examples/policy.yaml)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary export and trail")


def _build_export(root: Path) -> Path:
    export = root / "export"
    for d in ("etc", "home/alice", "home/bob", "tmp", "usr/bin"):
        (export / d).mkdir(parents=True)
    (export / "etc" / "hostname").write_text("demo-guest\n")
    (export / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\nalice:x:1000:1000::/home/alice:/bin/sh\n")
    (export / "home" / "alice" / "notes.txt").write_text("remember the milk\n")
    os.chown(export / "home" / "alice", 1000, 1000)
    os.chown(export / "home" / "alice" / "notes.txt", 1000, 1000)
    # A host secret next to the export: the escape attempts aim at it.
    (root / "host-secret").write_text("the host's private key\n")
    return export


def _script(export: Path) -> list[Step]:
    alice = export / "home" / "alice"

    def owner(path: Path) -> Callable[[Reply], str]:
        return lambda _r: f"{path.name} owned {os.lstat(path).st_uid}:{os.lstat(path).st_gid}"

    def mode(path: Path) -> Callable[[Reply], str]:
        return lambda _r: f"{path.name} mode {oct(stat.S_IMODE(os.lstat(path).st_mode))}"

    def read_fd(r: Reply) -> str:
        if r.fd is None:
            return ""
        try:
            return repr(os.read(r.fd, 40).decode(errors="replace"))
        finally:
            os.close(r.fd)

    create = os.O_CREAT | os.O_EXCL | os.O_RDWR
    return [
        Step("QEMU's first request", p.Lstat(b"/"), "ok"),
        Step("read a config file", p.Open(b"//etc/hostname", os.O_RDONLY), "ok", read_fd),
        Step("alice creates a file", p.Create(b"/home/alice/todo.txt", create, 0o644, 1000, 1000), "ok",
             owner(alice / "todo.txt")),
        Step("alice makes a directory", p.Mkdir(1000, 1000, b"/home/alice/src", 0o755), "ok", owner(alice / "src")),
        Step("alice chmods her file", p.Chmod(b"/home/alice/todo.txt", 0o600), "ok", mode(alice / "todo.txt")),
        Step("root chowns a file", p.Chown(b"/home/alice/notes.txt", 1000, 100), "ok", owner(alice / "notes.txt")),
        Step("alice links to her notes", p.Symlink(1000, 1000, b"notes.txt", b"/home/alice/latest"), "ok"),
        Step("read the link", p.Readlink(b"/home/alice/latest", 256), "ok",
             lambda r: repr(p.parse_string(r.payload).decode()) if r.ok else ""),
        Step("a setuid chmod", p.Chmod(b"/home/alice/todo.txt", 0o4755), "denied", mode(alice / "todo.txt")),
        Step("a device node", p.Mknod(0, 0, b"/tmp/sda", stat.S_IFBLK | 0o660, os.makedev(8, 0)), "denied",
             lambda _r: f"/tmp/sda exists: {(export / 'tmp' / 'sda').exists()}"),
        Step("write to /etc", p.Open(b"/etc/passwd", os.O_RDWR), "denied"),
        Step("escape: ../ out of the export", p.Open(b"/../../host-secret", os.O_RDONLY), "refused", read_fd),
        Step("escape: plant a symlink to the host", p.Symlink(0, 0, b"/../host-secret", b"/tmp/escape"), "ok"),
        Step("escape: follow it", p.Open(b"/tmp/escape", os.O_RDONLY), "refused", read_fd),
        Step("escape: through /proc magic links", p.Open(b"/proc/self/root/etc/shadow", os.O_RDONLY), "refused"),
        Step("alice removes her file", p.Remove(b"/home/alice/todo.txt"), "ok"),
    ]  # fmt: skip


def _run_session(export: Path, policy: Path | None, trail: Path) -> list[tuple[Step, Reply, str]]:
    ours, theirs = socket.socketpair()
    ours.settimeout(10)
    cmd = [sys.executable, "-m", "gateway", "serve", "-p", str(export), "-f", str(theirs.fileno()), "-n"]
    if policy is not None:
        cmd += ["--policy", str(policy)]
    cmd += ["--audit-log", str(trail)]
    proc = subprocess.Popen(cmd, pass_fds=[theirs.fileno()], stderr=subprocess.DEVNULL)
    theirs.close()
    client = Client(ours)
    results = []
    try:
        for step in _script(export):
            reply = client.call(step.request)
            seen = step.check(reply) if step.check else ""
            results.append((step, reply, seen))
    finally:
        client.close()
        proc.wait(10)
    return results


def _outcome(step: Step, reply: Reply) -> tuple[str, bool]:
    if reply.ok:
        return "performed", step.expect == "ok"
    name = errno.errorcode.get(reply.errno, str(reply.errno))
    if step.expect == "denied":
        return f"denied ({name})", reply.errno in (errno.EACCES, errno.EPERM, errno.EROFS)
    return f"refused ({name})", step.expect == "refused"


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if os.geteuid() != 0:
        console.print("[red]gateway demo needs root[/] (the gateway chroots and acts as the guest's users)")
        return 1
    policy = args.policy or (DEFAULT_POLICY if DEFAULT_POLICY.exists() else None)
    tmp = Path(tempfile.mkdtemp(prefix="gateway-demo-"))
    export = _build_export(tmp)
    trail = tmp / "audit.jsonl"
    console.rule("[bold]gateway demo")
    console.print(f"export  {export}\npolicy  {policy or 'built-in baseline'}\ntrail   {trail}\n")
    results = _run_session(export, policy, trail)

    table = Table(title="A guest session over the 9p proxy protocol", show_lines=False)
    for col in ("#", "step", "request", "outcome", "host sees"):
        table.add_column(col)
    good = 0
    for i, (step, reply, seen) in enumerate(results, 1):
        outcome, as_expected = _outcome(step, reply)
        good += as_expected
        colour = "green" if reply.ok else ("red" if "denied" in outcome else "yellow")
        req = f"{step.request.type.name} {step.request.path.decode(errors='replace')}"
        table.add_row(str(i), step.what, req, f"[{colour}]{outcome}[/]", seen)
    console.print(table)
    secret = (tmp / "host-secret").read_text()
    console.print(f"host secret untouched: [bold]{secret == 'the host' + chr(39) + 's private key' + chr(10)}[/]")
    if trail.exists():
        records = [json.loads(line) for line in trail.read_text().splitlines() if line.strip()]
        decided = [r for r in records if r.get("event") == "request"]
        denied = [r for r in decided if r.get("decision") != "allow"]
        console.print(f"audit trail: {len(records)} records, {len(decided)} requests, {len(denied)} denied")
        console.print(f"review it:   gateway audit {trail}   (or --summary, --verify)")
    console.print(f"\n{good} of {len(results)} steps went as expected")
    if not args.keep:
        console.print(f"(kept nothing; rerun with --keep to look around {tmp})")
        subprocess.run(["rm", "-rf", str(tmp)], check=False)
    return 0 if good == len(results) else 1
