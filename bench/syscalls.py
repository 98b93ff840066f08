"""System calls per request type: the reference virtfs-proxy-helper against the gateway, counted by strace.

    .venv/bin/python bench/syscalls.py [-k 200] [--types LSTAT,CREATE,...] [--json FILE] [--keep DIR]

Each server runs on its own fresh export (same layout, same options: ``-p EXPORT -f FD -n``; the gateway
with ``--policy policies/allow-all.yaml`` and an audit trail beside the export) under
``strace -f -qq -s 160 -o TRACE``. For every request type in turn the client sends W warm-up requests,
a begin marker (an LSTAT of a name that is not there), 1 + K "identical-ish" requests (the same request,
or the same one on names of the same length where each must act on a new object: CREATE, MKDIR,
REMOVE, ...), and an end marker. Every request must succeed: a count of an error path is meaningless.

How the burst is isolated from the trace, whatever the serving loop looks like:
  - the begin marker's request is the first read-family call (read, recv*, readv) whose data shows the
    marker's name; its fd (the socket) and pid are the ones that matter;
  - the burst starts after the last reply write (write, send*, writev on that fd) before the next read
    on the socket, i.e. after the begin marker's reply; it ends with the last reply write before the
    read that shows the end marker;
  - the replies written in between must be 1 + K (or m*(1 + K) when a reply takes m writes); the trace
    is cut after each reply, so one request's cycle is everything from just after the previous reply up
    to and including its own: what the previous request did after its reply (closing the fd it sent),
    the wait (poll), the receive(s), the work, the trail record, the reply. The first cycle follows the
    marker's reply, not one of its own kind, so it is left out: K cycles are counted.
calls/request is the burst's total over K (per syscall name too); the per-request cycles also give the
steady count (the low median of the cycles' totals), which rare events (a timed fdatasync of the trail, a
fallocate every few hundred records, an allocator's mmap) do not move. Every process and thread the
server has is counted (strace -f), the client's calls never (the client is this process, untraced).

This is a measurement, not a test; tests/test_syscall_counts.py uses it to hold the gateway to a
ceiling per request type.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from gateway import protocol as p  # noqa: E402
from gateway.client import Client  # noqa: E402

REFERENCE_HELPER = "/usr/lib/qemu/virtfs-proxy-helper"
ALLOW_ALL = REPO / "policies" / "allow-all.yaml"
GUEST_UID = GUEST_GID = 1000
UTIME_NOW = (1 << 30) - 1
CREATE_FLAGS = os.O_CREAT | os.O_EXCL | os.O_RDWR
XATTR, XVALUE = b"user.k", b"value"

REQUEST_TYPES = (
    "LSTAT", "GETVERSION", "STATFS", "OPEN", "CREATE", "REMOVE", "CHMOD", "CHOWN", "UTIME", "READLINK",
    "MKDIR", "RENAME", "TRUNCATE", "LGETXATTR", "LLISTXATTR", "LSETXATTR", "LREMOVEXATTR", "SYMLINK",
    "LINK", "MKNOD",
)  # fmt: skip

READ_CALLS = frozenset({"read", "readv", "recv", "recvfrom", "recvmsg", "recvmmsg"})
WRITE_CALLS = frozenset({"write", "writev", "send", "sendto", "sendmsg", "sendmmsg"})


class SyscallError(RuntimeError):
    """The counts cannot be trusted (a server failed, answered wrongly, or the trace cannot be cut)."""


# ---------------------------------------------------------------------------------------------------------
# The requests


def _n(prefix: str, i: int) -> bytes:
    return b"//sc/%s/n%05d" % (prefix.encode(), i)  # the same length for every i: identical-ish requests


# Per request type: i -> the i-th request (i < count). Objects a request acts on are made by prepare().
REQUESTS: dict[str, Callable[[int], p.Request]] = {
    "LSTAT": lambda i: p.Lstat(b"//sc/file"),
    "GETVERSION": lambda i: p.Getversion(b"//sc/file"),
    "STATFS": lambda i: p.Statfs(b"//sc/file"),
    "OPEN": lambda i: p.Open(b"//sc/file", os.O_RDONLY),
    "CREATE": lambda i: p.Create(_n("create", i), CREATE_FLAGS, 0o644, GUEST_UID, GUEST_GID),
    "REMOVE": lambda i: p.Remove(_n("remove", i)),
    "CHMOD": lambda i: p.Chmod(b"//sc/file", 0o644),
    "CHOWN": lambda i: p.Chown(b"//sc/file", GUEST_UID, GUEST_GID),
    "UTIME": lambda i: p.Utime(b"//sc/file", 0, UTIME_NOW, 0, UTIME_NOW),
    "READLINK": lambda i: p.Readlink(b"//sc/link", 4096),
    "MKDIR": lambda i: p.Mkdir(GUEST_UID, GUEST_GID, _n("mkdir", i), 0o755),
    "RENAME": lambda i: p.Rename(_n("rename", i), b"//sc/rename/m%05d" % i),
    "TRUNCATE": lambda i: p.Truncate(b"//sc/file", 100),
    "LGETXATTR": lambda i: p.Lgetxattr(256, b"//sc/file", XATTR),
    "LLISTXATTR": lambda i: p.Llistxattr(256, b"//sc/file"),
    "LSETXATTR": lambda i: p.Lsetxattr(b"//sc/file", b"user.s", XVALUE, len(XVALUE), 0),
    "LREMOVEXATTR": lambda i: p.Lremovexattr(_n("rmxattr", i), XATTR),
    "SYMLINK": lambda i: p.Symlink(GUEST_UID, GUEST_GID, b"../file", _n("symlink", i)),
    "LINK": lambda i: p.Link(b"//sc/file", _n("hardlink", i)),
    "MKNOD": lambda i: p.Mknod(GUEST_UID, GUEST_GID, _n("mknod", i), 0o010644, 0),  # a FIFO
}
# Types whose requests need an object of their own, made on the host before the server starts.
NEEDS_FILE = {"REMOVE": "remove", "RENAME": "rename", "LREMOVEXATTR": "rmxattr"}


def prepare(export: Path, types: Iterable[str], count: int) -> None:
    """The export's layout: /sc/file (100 bytes, an xattr), /sc/link -> file, a directory per type that
    makes names, and the objects that REMOVE, RENAME and LREMOVEXATTR consume."""
    sc = export / "sc"
    sc.mkdir(parents=True)
    (sc / "file").write_bytes(b"x" * 100)
    os.chmod(sc / "file", 0o644)
    os.setxattr(sc / "file", XATTR, XVALUE)
    os.symlink("file", sc / "link")
    for rtype in types:
        dirname = {
            "CREATE": "create", "MKDIR": "mkdir", "SYMLINK": "symlink", "LINK": "hardlink", "MKNOD": "mknod",
            **NEEDS_FILE,
        }.get(rtype)  # fmt: skip
        if dirname is None:
            continue
        (sc / dirname).mkdir()
        if rtype in NEEDS_FILE:
            for i in range(count):
                f = sc / dirname / f"n{i:05d}"
                f.write_bytes(b"")
                if rtype == "LREMOVEXATTR":
                    os.setxattr(f, XATTR, XVALUE)


def marker(rtype: str, which: str) -> bytes:
    return f"//zz-syscalls-{rtype}-{which}".encode()


# ---------------------------------------------------------------------------------------------------------
# Running a server under strace


def strace_argv(trace: Path) -> list[str]:
    strace = shutil.which("strace")
    if strace is None:
        raise SyscallError("strace is not installed (apt-get install strace; scripts/setup.sh --full does)")
    # -qq: no attach/exit chatter; -s 160: a marker's name is inside the printed part of its frame.
    return [strace, "-f", "-qq", "-s", "160", "-o", str(trace), "--"]


def gateway_argv(trail: Path, policy: Path = ALLOW_ALL, extra: Iterable[str] = ()) -> list[str]:
    return [
        sys.executable,
        "-m",
        "gateway",
        "serve",
        "--policy",
        str(policy),
        "--audit-log",
        str(trail),
        *extra,
    ]


def drive(server_argv: list[str], export: Path, trace: Path, types: Iterable[str], k: int, warmup: int,
          log: Path) -> None:  # fmt: skip
    """Run server_argv on export under strace and send every type's warm-up, markers and burst."""
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    argv = [*strace_argv(trace), *server_argv, "-p", str(export), "-f", str(theirs.fileno()), "-n"]
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            argv, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env
        )
    theirs.close()
    mine.settimeout(60)
    client = Client(mine)
    try:
        _expect(client, p.Lstat(b"/"), 0, log)  # as QEMU's first request; returns once the server serves
        for rtype in types:
            make = REQUESTS[rtype]
            for i in range(warmup):
                _expect(client, make(i), 0, log)
            _expect(client, p.Lstat(marker(rtype, "begin")), 2, log)  # ENOENT
            for i in range(warmup, warmup + 1 + k):  # the first of them is not counted (see cut_burst)
                _expect(client, make(i), 0, log)
            _expect(client, p.Lstat(marker(rtype, "end")), 2, log)
    finally:
        client.close()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        raise SyscallError(f"{server_argv[0]} exited with status {proc.returncode}\n{_tail(log)}")


def _tail(log: Path) -> str:
    try:
        return log.read_text(errors="replace")[-2000:]
    except OSError:
        return ""


def _expect(client: Client, request: p.Request, want: int, log: Path) -> None:
    try:
        reply = client.call(request)
    except OSError as exc:
        raise SyscallError(f"{request!r}: no reply ({exc})\n{_tail(log)}") from None
    if reply.fd is not None:
        os.close(reply.fd)
    if reply.errno != want:
        got = os.strerror(reply.errno) if reply.errno else "success"
        raise SyscallError(f"{request!r} answered {got}, expected {os.strerror(want) if want else 'success'}")


# ---------------------------------------------------------------------------------------------------------
# Reading the trace

# "PID name(args..." (complete, or "<unfinished ...>"): one call. "<... name resumed>", "--- SIG... ---"
# and "+++ exited +++" lines are not calls.
_CALL = re.compile(r"^(?:(\d+)\s+)?([a-z_][a-z0-9_]*)\((-?\d+)?")


@dataclass(frozen=True, slots=True)
class Call:
    pid: int
    name: str
    fd: int | None  # the first argument when it is a number
    line: str


def parse_trace(lines: Iterable[str]) -> list[Call]:
    calls = []
    for line in lines:
        m = _CALL.match(line)
        if m is None:
            continue
        pid, name, fd = m.groups()
        calls.append(Call(int(pid or 0), name, int(fd) if fd is not None else None, line))
    return calls


@dataclass
class Burst:
    """One request type's burst of K requests, cut into one cycle per request."""

    rtype: str
    k: int
    cycles: list[collections.Counter[str]]
    totals: collections.Counter[str] = field(init=False)

    def __post_init__(self) -> None:
        self.totals = collections.Counter()
        for cycle in self.cycles:
            self.totals.update(cycle)

    @property
    def per_request(self) -> float:
        """The burst's total calls over K."""
        return sum(self.totals.values()) / self.k

    @property
    def steady(self) -> int:
        """A request's count in steady state: the low median of the cycles' totals (rare events aside)."""
        return int(statistics.median_low(sum(c.values()) for c in self.cycles))

    def breakdown(self) -> dict[str, float]:
        """calls/request per syscall name, most frequent first."""
        return {name: n / self.k for name, n in sorted(self.totals.items(), key=lambda kv: (-kv[1], kv[0]))}

    def as_json(self) -> dict[str, object]:
        totals = [sum(c.values()) for c in self.cycles]
        return {
            "k": self.k,
            "per_request": round(self.per_request, 3),
            "steady": self.steady,
            "cycle_min": min(totals),
            "cycle_max": max(totals),
            "breakdown": {name: round(v, 3) for name, v in self.breakdown().items()},
        }


def _find_marker(calls: list[Call], name: bytes, start: int) -> int:
    text = name.decode()
    for i in range(start, len(calls)):
        c = calls[i]
        if c.name in READ_CALLS and text in c.line:
            return i
    raise SyscallError(f"no read of the marker {text} in the trace (is strace's -s too short?)")


def cut_burst(calls: list[Call], rtype: str, k: int, start: int = 0) -> tuple[Burst, int]:
    """The burst of rtype between its markers, from calls[start:]; returns it and where it ended."""
    b = _find_marker(calls, marker(rtype, "begin"), start)
    pid, fd = calls[b].pid, calls[b].fd

    def on_socket(c: Call, names: frozenset[str]) -> bool:
        return c.pid == pid and c.fd == fd and c.name in names

    # The begin marker's reply ends at the last write on the socket before the next read from it.
    i = b + 1
    while i < len(calls) and not on_socket(calls[i], WRITE_CALLS):
        i += 1
    while i < len(calls) and not on_socket(calls[i], READ_CALLS):
        i += 1
    s0 = max(j for j in range(b + 1, i) if on_socket(calls[j], WRITE_CALLS))
    e = _find_marker(calls, marker(rtype, "end"), i)
    replies = [j for j in range(s0 + 1, e) if on_socket(calls[j], WRITE_CALLS)]
    if not replies or len(replies) % (k + 1):
        raise SyscallError(f"{rtype}: {len(replies)} reply writes on fd {fd} for {k + 1} requests")
    per = len(replies) // (k + 1)
    ends = replies[per - 1 :: per]
    cycles = []
    for prev, end in itertools.pairwise(ends):  # the first request's cycle is left out
        cycles.append(collections.Counter(c.name for c in calls[prev + 1 : end + 1]))
    return Burst(rtype, k, cycles), e


def count(trace: Path, types: Iterable[str], k: int) -> dict[str, Burst]:
    with open(trace, errors="replace") as f:
        calls = parse_trace(f)
    bursts: dict[str, Burst] = {}
    pos = 0
    for rtype in types:
        bursts[rtype], pos = cut_burst(calls, rtype, k, pos)
    return bursts


def measure(
    server_argv: list[str], workdir: Path, name: str, types: Iterable[str], k: int, warmup: int
) -> dict[str, Burst]:
    """Prepare a fresh export in workdir, run the server on it under strace, return its bursts."""
    types = list(types)
    export = workdir / f"{name}-export"
    prepare(export, types, warmup + 1 + k)
    trace = workdir / f"{name}.trace"
    drive(server_argv, export, trace, types, k, warmup, workdir / f"{name}.log")
    return count(trace, types, k)


# ---------------------------------------------------------------------------------------------------------


def fmt_breakdown(burst: Burst) -> str:
    """name:calls/request pairs, most frequent first; a fraction to 3 decimals (1.005: a rare extra)."""
    return " ".join(f"{name}:{f'{v:.3f}'.rstrip('0').rstrip('.')}" for name, v in burst.breakdown().items())


def render(ref: dict[str, Burst] | None, gw: dict[str, Burst], k: int) -> str:
    """The table: per request type, calls/request of each server (mean: the burst's total over K; steady:
    the cycles' low median) and the gateway's calls per syscall name; then the reference's."""
    out = [
        f"system calls per request, {k} requests a type (mean: the burst's total / {k}; "
        "steady: a request's own count, the low median of the per-request cycles)",
        "",
        f"{'request':<13} {'ref mean':>8} {'steady':>6} {'gw mean':>8} {'steady':>6}  "
        "gateway per syscall (mean calls/request)",
    ]
    for rtype, burst in gw.items():
        r = ref[rtype] if ref is not None else None
        rm, rs = (f"{r.per_request:.2f}", f"{r.steady}") if r is not None else ("-", "-")
        out.append(
            f"{rtype:<13} {rm:>8} {rs:>6} {burst.per_request:>8.2f} {burst.steady:>6}  {fmt_breakdown(burst)}"
        )
    if ref is not None:
        out += ["", f"{'request':<13} {'ref mean':>8}  reference per syscall (mean calls/request)"]
        for rtype, burst in ref.items():
            out.append(f"{rtype:<13} {burst.per_request:>8.2f}  {fmt_breakdown(burst)}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-k", type=int, default=200, help="requests in each type's burst (default 200)")
    ap.add_argument("--warmup", type=int, default=20, help="unmeasured requests before each burst (20)")
    ap.add_argument("--types", default=",".join(REQUEST_TYPES), help="comma-separated request types")
    ap.add_argument("--reference", default=REFERENCE_HELPER, help="the reference helper's path")
    ap.add_argument("--no-reference", action="store_true", help="count the gateway only")
    ap.add_argument("--policy", type=Path, default=ALLOW_ALL, help="the gateway's policy (allow-all)")
    ap.add_argument("--gateway-arg", action="append", default=[], metavar="ARG", help="extra serve argument")
    ap.add_argument("--json", metavar="FILE", help="also write the counts as JSON")
    ap.add_argument("--keep", type=Path, metavar="DIR", help="keep the exports, traces and logs in DIR")
    args = ap.parse_args(argv)
    types = [t.strip().upper() for t in args.types.split(",") if t.strip()]
    unknown = set(types) - set(REQUEST_TYPES)
    if unknown:
        ap.error(f"unknown request types: {', '.join(sorted(unknown))}")
    if os.geteuid() != 0:
        print("syscalls needs root: both helpers chroot into their export and switch fs ids", file=sys.stderr)
        return 2
    use_ref = not args.no_reference
    if use_ref and not os.access(args.reference, os.X_OK):
        print(f"{args.reference} is missing (apt-get install qemu-system-common)", file=sys.stderr)
        return 2
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="syscalls-", dir=args.keep))
    try:
        ref = measure([args.reference], workdir, "reference", types, args.k, args.warmup) if use_ref else None
        gw_argv = gateway_argv(workdir / "gateway-trail.jsonl", args.policy, args.gateway_arg)
        gw = measure(gw_argv, workdir, "gateway", types, args.k, args.warmup)
    except SyscallError as exc:
        print(f"syscalls: {exc}", file=sys.stderr)
        return 1
    finally:
        if args.keep is None:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"exports, traces and logs kept in {workdir}", file=sys.stderr)
    print(render(ref, gw, args.k))
    if args.json:
        data = {
            "k": args.k,
            "warmup": args.warmup,
            "gateway_argv": [a.replace(str(workdir), "<tmp>") for a in gw_argv],
            "reference": {t: b.as_json() for t, b in ref.items()} if ref is not None else None,
            "gateway": {t: b.as_json() for t, b in gw.items()},
        }
        Path(args.json).write_text(json.dumps(data, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
