"""`gateway demo`: a newcomer's first run, on built-in defaults.

A temporary export, a real `gateway serve` process (the annotated tour, examples/policy.yaml, shipped as
package data: gateway/examples/policy.yaml, so that an installed copy runs the same demo), a scripted
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

# Package data (pyproject's package-data), beside this module wherever the package is installed; the
# checkout's examples/ is a symlink to it.
DEFAULT_POLICY = Path(__file__).resolve().parent / "examples" / "policy.yaml"


@dataclass
class Step:
    what: str
    request: p.Request
    expect: str  # "allowed": performed; "denied": the policy said no; "refused": the kernel said no (escapes)
    check: Callable[[Reply], str] | None = None  # what the host sees afterwards


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--policy", type=Path, default=None, help="policy to serve (default: the shipped example)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary export and trail")


def _build_export(root: Path, host_id: Callable[[int], int]) -> Path:
    export = root / "export"
    for d in ("etc", "home/alice", "home/bob", "tmp", "usr/bin"):
        (export / d).mkdir(parents=True)
    os.chmod(export / "tmp", 0o1777)
    (export / "etc" / "hostname").write_text("demo-guest\n")
    (export / "etc" / "passwd").write_text(
        "root:x:0:0::/root:/bin/sh\nalice:x:1000:1000::/home/alice:/bin/sh\n"
    )
    (export / "home" / "alice" / "notes.txt").write_text("remember the milk\n")
    for path in (export / "home" / "alice", export / "home" / "alice" / "notes.txt"):
        os.chown(path, host_id(1000), host_id(1000))  # alice as the host stores her (after the id map)
    # A host secret next to the export: the escape attempts aim at it.
    (root / "host-secret").write_text(SECRET)
    return export


SECRET = "the host's private key\n"


def _script(export: Path) -> list[Step]:
    alice = export / "home" / "alice"

    def owner(path: Path) -> Callable[[Reply], str]:
        return lambda _r: f"{path.name}: host owner {os.lstat(path).st_uid}:{os.lstat(path).st_gid}"

    def mode(path: Path) -> Callable[[Reply], str]:
        return lambda _r: f"{path.name}: mode {oct(stat.S_IMODE(os.lstat(path).st_mode))}"

    def read_fd(r: Reply) -> str:
        if r.fd is None:
            return ""
        try:
            return repr(os.read(r.fd, 40).decode(errors="replace"))
        finally:
            os.close(r.fd)

    def exists(path: Path) -> Callable[[Reply], str]:
        return lambda _r: f"{path.name} exists: {path.exists()}"

    create = os.O_CREAT | os.O_EXCL | os.O_RDWR
    sda = stat.S_IFBLK | 0o660
    return [
        Step("QEMU's first request", p.Lstat(b"/"), "allowed"),
        Step("read a config file", p.Open(b"//etc/hostname", os.O_RDONLY), "allowed", read_fd),
        Step("alice creates a file", p.Create(b"/home/alice/todo.txt", create, 0o644, 1000, 1000), "allowed",
             owner(alice / "todo.txt")),
        Step("alice makes a directory", p.Mkdir(1000, 1000, b"/home/alice/src", 0o755), "allowed",
             owner(alice / "src")),
        Step("alice chmods her file", p.Chmod(b"/home/alice/todo.txt", 0o600), "allowed",
             mode(alice / "todo.txt")),
        Step("alice gives her notes to group 1001", p.Chown(b"/home/alice/notes.txt", 1000, 1001), "allowed",
             owner(alice / "notes.txt")),
        Step("alice links to her notes", p.Symlink(1000, 1000, b"notes.txt", b"/home/alice/latest"),
             "allowed"),
        Step("read the link", p.Readlink(b"/home/alice/latest", 256), "allowed",
             lambda r: repr(p.parse_string(r.payload).decode()) if r.ok else ""),
        Step("a setuid chmod", p.Chmod(b"/home/alice/todo.txt", 0o4755), "denied",
             mode(alice / "todo.txt")),
        Step("a block device node", p.Mknod(0, 0, b"/tmp/sda", sda, 2048), "denied",
             exists(export / "tmp" / "sda")),
        Step("write to /etc", p.Open(b"/etc/passwd", os.O_RDWR), "denied"),
        Step("escape: ../ out of the export", p.Open(b"/../../host-secret", os.O_RDONLY), "refused",
             read_fd),
        Step("escape: plant a host symlink", p.Symlink(1000, 1000, b"/../host-secret", b"/home/alice/x"),
             "denied", exists(alice / "x")),
        Step("escape: a host link already there", p.Open(b"/tmp/escape", os.O_RDONLY), "refused",
             read_fd),
        Step("escape: through /proc magic links", p.Open(b"/proc/self/root/etc/shadow", os.O_RDONLY),
             "refused"),
        Step("alice removes her file", p.Remove(b"/home/alice/todo.txt"), "allowed"),
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


def _outcome(step: Step, reply: Reply, record: dict[str, object]) -> tuple[str, bool]:
    """What happened, and whether it is what the step expected (the trail says who refused)."""
    decision = str(record.get("decision", "?"))
    if decision == "deny":
        return f"denied by {record.get('rule')}", step.expect == "denied"
    if reply.ok:
        return "performed", step.expect == "allowed"
    return (
        f"refused by the kernel ({errno.errorcode.get(reply.errno, reply.errno)})",
        step.expect == "refused",
    )


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from gateway.rules import PolicyError, load_policy

    console = Console()
    if os.geteuid() != 0:
        console.print("[red]gateway demo needs root[/] (the gateway chroots and acts as the guest's users)")
        return 1
    policy = args.policy or DEFAULT_POLICY
    try:
        ids = load_policy(policy).ids
    except (OSError, PolicyError) as exc:  # the shipped policy missing is a broken install: say so
        console.print(f"[red]{exc}[/]")
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="gateway-demo-"))
    export = _build_export(tmp, (lambda i: ids.uid_to_host(i) or i) if ids else (lambda i: i))
    os.symlink("/../host-secret", export / "tmp" / "escape")  # as if planted before the gateway ran
    trail = tmp / "audit.jsonl"
    console.rule("[bold]gateway demo")
    console.print(f"export  {export}\npolicy  {policy}\ntrail   {trail}\n")
    results = _run_session(export, policy, trail)
    records = [json.loads(line) for line in trail.read_text().splitlines() if line.strip()]
    requests = [r for r in records if r.get("event") == "request"]

    table = Table(title="A guest session over the 9p proxy protocol, every request decided and recorded")
    for col in ("#", "step", "request", "outcome", "host sees"):
        table.add_column(col)
    good = 0
    for i, ((step, reply, seen), record) in enumerate(zip(results, requests, strict=True), 1):
        outcome, as_expected = _outcome(step, reply, record)
        good += as_expected
        colour = "green" if reply.ok else ("red" if outcome.startswith("denied") else "yellow")
        mark = "" if as_expected else " [bold red](unexpected)[/]"
        req = f"{step.request.type.name} {step.request.path.decode(errors='replace')}"
        table.add_row(str(i), step.what, req, f"[{colour}]{outcome}[/]{mark}", seen)
    console.print(table)
    untouched = (tmp / "host-secret").read_text() == SECRET
    console.print(f"host secret untouched: [bold]{untouched}[/]")
    denied = [r for r in requests if r.get("decision") != "allow"]
    console.print(f"audit trail: {len(records)} records, {len(requests)} requests, {len(denied)} denied")
    console.print(f"\n{good} of {len(results)} steps went as expected")
    console.rule("[bold]the trail, as an auditor sees it")
    from gateway import audit_cli

    parser = argparse.ArgumentParser(prog="gateway audit")
    audit_cli.add_arguments(parser)
    audit_cli.run(parser.parse_args([str(trail), "--summary"]))
    verified = audit_cli.run(parser.parse_args([str(trail), "--verify"]))
    if args.keep:
        console.print(f"\nreview it yourself:  gateway audit {trail}  (--summary, --verify, --decision deny)")
    else:
        subprocess.run(["rm", "-rf", str(tmp)], check=False)
        console.print("\n(the export and trail were temporary; rerun with --keep to look around)")
    if good == len(results) and untouched and verified == 0:
        return 0
    console.print(
        f"[bold red]demo failed[/]: {len(results) - good} step(s) not as expected, host secret untouched: "
        f"{untouched}, trail verified: {verified == 0}"
    )
    return 1
