"""Round-trip throughput and latency of the gateway against the reference virtfs-proxy-helper.

    /tmp/v/bin/python bench/bench_proxy.py [--quick] [--seconds N] [--rounds N] [--json FILE]

Both servers run in the same invocation, each on its own fresh export and its own socketpair (``-f``),
both pinned to one CPU, the client (this process) pinned to another. Every workload is run on both
servers in alternating order (ref, gw, gw, ref, ...) for several rounds; throughput is the median over
rounds and the gateway/reference ratio is the median of the ratios of adjacent (paired) runs, which
cancels most of the noise a shared machine adds. Latency percentiles pool every measured op; the
server's own CPU time per op comes from /proc/PID/task/*/schedstat (ns resolution).

The client is deliberately lean (pre-encoded frames, one recv_into per reply, no per-op objects) so
that the figures are dominated by the servers rather than by the client's Python; the frames are the
ones gateway.protocol encodes, with QEMU's trailing NUL in every path and the ``//dir/file`` form.

Workloads (an "op" is what one latency sample and one unit of ops/s count):
  lstat          LSTAT of an existing file one directory deep
  open           OPEN O_RDONLY of an existing file, then close() of the received fd on the client
  chmod          CHMOD of an existing file (0644 / 0600 alternately)
  create+remove  CREATE O_CREAT|O_EXCL|O_RDWR 0644 as uid 1000 gid 1000, close the fd, REMOVE: 1 op
  mixed          a guest-like cycle of 20 requests (lstat-heavy, with open, a missing name, create,
                 chmod, utime, readlink, remove); 1 op = 1 request

This is a measurement, not a test: it asserts nothing about timing. It does stop with an error when a
server answers a request with something other than the expected status, because a wrong answer makes
its figures meaningless. Targets are printed as PASS/MISS next to the ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import errno
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from gateway import protocol as p  # noqa: E402

REFERENCE_HELPER = "/usr/lib/qemu/virtfs-proxy-helper"
MIB = 1024 * 1024

# Reply kinds the lean client reads.
STATUS, PAYLOAD, FD = 0, 1, 2

N_FILES = 64  # files the read-only workloads rotate over
GUEST_UID = GUEST_GID = 1000

# Targets: workload -> minimum gateway/reference throughput ratio; and the serve RSS ceiling.
RATIO_TARGETS = {"mixed": 1.0, "lstat": 0.75, "create+remove": 1.5}
RSS_TARGET_MIB = 30.0

WORKLOADS = ("lstat", "open", "chmod", "create+remove", "mixed")


class BenchError(RuntimeError):
    """The bench cannot produce meaningful figures (a server failed, answered wrongly, or exited)."""


# ---------------------------------------------------------------------------------------------------------
# The lean client


class Wire:
    """One connection to a server: sends a pre-encoded frame, reads exactly one reply, returns its errno."""

    __slots__ = ("buf", "closed_fds", "cmsg_space", "sock", "view")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray(p.HEADER_SIZE + p.MAX_PAYLOAD + 16)
        self.view = memoryview(self.buf)
        self.cmsg_space = socket.CMSG_SPACE(4 * 4)  # room for a few fds, so an extra one is seen and closed
        self.closed_fds = 0

    def call(self, kind: int, frame: bytes) -> int:
        sock = self.sock
        sock.sendall(frame)
        if kind == FD:
            data, ancdata, _flags, _addr = sock.recvmsg(4, self.cmsg_space)
            got_fd = False
            for level, ctype, cdata in ancdata:
                if level == socket.SOL_SOCKET and ctype == socket.SCM_RIGHTS:
                    for i in range(0, len(cdata) - len(cdata) % 4, 4):
                        os.close(int.from_bytes(cdata[i : i + 4], "little", signed=True))
                        got_fd = True
            if len(data) != 4:
                raise BenchError(f"short OPEN/CREATE reply ({len(data)} bytes)")
            value = int.from_bytes(data, "little", signed=True)
            if value == p.FD_VALID:
                if not got_fd:
                    raise BenchError("OPEN/CREATE success without an fd")
                return 0
            return -value if value < 0 else errno.EIO
        view = self.view
        n = sock.recv_into(view)
        while n < p.HEADER_SIZE:
            got = sock.recv_into(view[n:])
            if not got:
                raise BenchError("server closed the connection")
            n += got
        rtype, size = p.HEADER.unpack_from(self.buf, 0)
        while n < p.HEADER_SIZE + size:
            got = sock.recv_into(view[n:])
            if not got:
                raise BenchError("server closed the connection inside a reply")
            n += got
        if rtype == p.T_ERROR:
            return -int.from_bytes(self.buf[8:12], "little", signed=True)
        if kind == STATUS:
            status = int.from_bytes(self.buf[8:12], "little", signed=True)
            return -status if status < 0 else 0
        return 0


# A step is (reply kind, frame, expected errno); an op is a tuple of steps timed together.
Step = tuple[int, bytes, int]
Op = tuple[Step, ...]


def _frame(request: p.Request) -> bytes:
    return p.encode_request(request, nul=True)  # as QEMU sends it: strings count a trailing NUL


def _shape(request: p.Request) -> int:
    return {p.ReplyShape.FD: FD, p.ReplyShape.PAYLOAD: PAYLOAD, p.ReplyShape.STATUS: STATUS}[
        p.reply_shape(request.type)
    ]


def _step(request: p.Request, expect: int = 0) -> Step:
    return (_shape(request), _frame(request), expect)


def _file(i: int) -> bytes:
    return b"//bench/f%02d" % (i % N_FILES)


CREATE_FLAGS = os.O_CREAT | os.O_EXCL | os.O_RDWR


def build_workloads() -> dict[str, list[Op]]:
    now = (1 << 30) - 1  # UTIME_NOW in the nsec fields
    omit = (1 << 30) - 2  # UTIME_OMIT
    w: dict[str, list[Op]] = {}
    w["lstat"] = [(_step(p.Lstat(_file(i))),) for i in range(N_FILES)]
    w["open"] = [(_step(p.Open(_file(i), os.O_RDONLY)),) for i in range(N_FILES)]
    w["chmod"] = [(_step(p.Chmod(_file(i), 0o644 if i % 2 else 0o600)),) for i in range(2 * N_FILES)]
    w["create+remove"] = [
        (
            _step(p.Create(b"//bench/new%02d" % i, CREATE_FLAGS, 0o644, GUEST_UID, GUEST_GID)),
            _step(p.Remove(b"//bench/new%02d" % i)),
        )
        for i in range(N_FILES)
    ]
    mixed: list[Op] = []
    for c in range(8):  # 8 cycles of 20 requests over different files, the same shape each time
        f = [_file(c * 8 + k) for k in range(8)]
        tmp = b"//bench/tmp%d" % c
        cycle: list[Step] = [
            _step(p.Lstat(b"//bench")),
            _step(p.Lstat(f[0])),
            _step(p.Lstat(f[1])),
            _step(p.Open(f[1], os.O_RDONLY)),
            _step(p.Lstat(b"//bench/missing%d" % c), errno.ENOENT),  # a lookup of a name that is not there
            _step(p.Lstat(f[2])),
            _step(p.Create(tmp, CREATE_FLAGS, 0o644, GUEST_UID, GUEST_GID)),
            _step(p.Lstat(tmp)),
            _step(p.Chmod(tmp, 0o600)),
            _step(p.Utime(f[3], 0, now, 0, omit)),
            _step(p.Lstat(f[3])),
            _step(p.Lstat(b"//bench/link")),
            _step(p.Readlink(b"//bench/link", 4096)),
            _step(p.Lstat(f[4])),
            _step(p.Open(b"//bench", os.O_RDONLY | os.O_DIRECTORY)),  # a directory opened for readdir
            _step(p.Lstat(f[5])),
            _step(p.Remove(tmp)),
            _step(p.Lstat(f[6])),
            _step(p.Open(f[6], os.O_RDONLY)),
            _step(p.Lstat(f[7])),
        ]
        mixed += [(s,) for s in cycle]
    w["mixed"] = mixed
    return w


def make_export(root: Path) -> None:
    bench = root / "bench"
    bench.mkdir(parents=True)
    for i in range(N_FILES):
        (bench / f"f{i:02d}").write_bytes(b"x" * 100)
    os.symlink("f00", bench / "link")


# ---------------------------------------------------------------------------------------------------------
# Servers


@dataclass
class Server:
    name: str
    argv: list[str]
    export: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    wire: Wire | None = None
    sock: socket.socket | None = None
    memory: dict[str, dict[str, float]] = field(default_factory=dict)

    def start(self, cpu: int | None, cwd: Path, env: dict[str, str]) -> None:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        argv = [*self.argv, "-p", str(self.export), "-f", str(theirs.fileno()), "-n"]

        def pin() -> None:
            if cpu is not None:
                os.sched_setaffinity(0, {cpu})

        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                argv,
                pass_fds=(theirs.fileno(),),
                preexec_fn=pin,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=cwd,
                env=env,
            )
        theirs.close()
        mine.settimeout(30)
        self.sock = mine
        self.wire = Wire(mine)
        # The first request (as QEMU's) doubles as the readiness check: it returns once the server serves.
        try:
            err = self.wire.call(PAYLOAD, _frame(p.Lstat(b"/")))
        except (OSError, BenchError) as exc:
            raise BenchError(f"{self.name} did not answer its first request: {exc}\n{self.log()}") from None
        if err:
            raise BenchError(f"{self.name}: LSTAT / failed with {errno.errorcode.get(err, err)}")
        mine.settimeout(None)
        self.memory["start"] = self.read_memory()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def cpu_ns(self) -> int:
        """CPU time of all the server's threads, in ns (first field of /proc/PID/task/TID/schedstat)."""
        total = 0
        for tid in os.listdir(f"/proc/{self.pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{self.pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        return total

    def read_memory(self) -> dict[str, float]:
        fields = {}
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                    fields[key] = int(value.split()[0]) / 1024  # kB -> MiB
        return fields

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise BenchError(f"{self.name} exited with status {self.proc.returncode}\n{self.log()}")

    def stop(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# ---------------------------------------------------------------------------------------------------------
# Measuring


@dataclass
class Run:
    ops: int
    seconds: float
    server_cpu_ns: int
    latencies_ns: list[int]

    @property
    def ops_per_s(self) -> float:
        return self.ops / self.seconds


def wrong_answer(server: Server, frame: bytes, err: int, expect: int) -> BenchError:
    def name(e: int) -> str:
        return errno.errorcode.get(e, str(e)) if e else "success"

    rtype = int.from_bytes(frame[:4], "little")
    return BenchError(f"{server.name}: request type {rtype} answered {name(err)}, expected {name(expect)}")


def run_workload(server: Server, ops: list[Op], seconds: float, warmup_ops: int) -> Run:
    wire = server.wire
    assert wire is not None
    call = wire.call
    n = len(ops)

    def execute(op: Op) -> None:
        for kind, frame, expect in op:
            err = call(kind, frame)
            if err != expect:
                raise wrong_answer(server, frame, err, expect)

    for i in range(warmup_ops - warmup_ops % n + n):  # warm up, ending on a whole cycle
        execute(ops[i % n])
    latencies: list[int] = []
    append = latencies.append
    clock = time.perf_counter_ns
    cpu_before = server.cpu_ns()
    start = clock()
    deadline = start + int(seconds * 1e9)
    i = 0
    while True:
        op = ops[i % n]
        t0 = clock()
        for kind, frame, expect in op:
            err = call(kind, frame)
            if err != expect:
                raise wrong_answer(server, frame, err, expect)
        t1 = clock()
        append(t1 - t0)
        i += 1
        if t1 >= deadline and i % n == 0:  # whole cycles only: every created name has been removed
            break
    elapsed = clock() - start
    cpu = server.cpu_ns() - cpu_before
    return Run(ops=i, seconds=elapsed / 1e9, server_cpu_ns=cpu, latencies_ns=latencies)


def percentile(sorted_values: list[int], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = (len(sorted_values) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


def summarise(runs: list[Run]) -> dict[str, object]:
    pooled = sorted(v for r in runs for v in r.latencies_ns)
    total_ops = sum(r.ops for r in runs)
    return {
        "ops_per_s_median": statistics.median(r.ops_per_s for r in runs),
        "ops_per_s_best": max(r.ops_per_s for r in runs),
        "ops_per_s_rounds": [round(r.ops_per_s, 1) for r in runs],
        "p50_us": percentile(pooled, 0.50) / 1000,
        "p99_us": percentile(pooled, 0.99) / 1000,
        "server_cpu_us_per_op": sum(r.server_cpu_ns for r in runs) / total_ops / 1000,
        "ops": total_ops,
    }


def sanity_check(server: Server) -> None:
    """Both servers must do what the workloads assume: CREATE as 1000:1000 makes a file owned by it."""
    assert server.wire is not None
    name = b"//bench/owner-check"
    err = server.wire.call(FD, _frame(p.Create(name, CREATE_FLAGS, 0o644, GUEST_UID, GUEST_GID)))
    if err:
        raise BenchError(f"{server.name}: CREATE as {GUEST_UID}:{GUEST_GID} failed: {errno.errorcode[err]}")
    st = os.lstat(server.export / "bench" / "owner-check")
    if (st.st_uid, st.st_gid) != (GUEST_UID, GUEST_GID):
        raise BenchError(f"{server.name}: CREATE made a file owned by {st.st_uid}:{st.st_gid}")
    if server.wire.call(STATUS, _frame(p.Remove(name))):
        raise BenchError(f"{server.name}: REMOVE failed")


# ---------------------------------------------------------------------------------------------------------
# Reporting


def verdict(ok: bool) -> str:
    return "[bold green]PASS[/]" if ok else "[bold red]MISS[/]"


def render(results: dict[str, object]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 150)
    cfg = results["config"]
    assert isinstance(cfg, dict)
    console.print(
        f"[bold]bench_proxy[/]: {cfg['rounds']} rounds x {cfg['seconds']} s per run, servers on CPU "
        f"{cfg['server_cpu']}, client on CPU {cfg['client_cpu']}, gateway {cfg['gateway_version']}, "
        f"{cfg['started']}\nexports: {cfg['exports']}; load average at the end: "
        f"{' '.join(f'{x:.2f}' for x in cfg['loadavg_at_end'])}\n"
        f"gateway serve {' '.join(cfg['gateway_args'])}: "
        f"{cfg['audit_trail_bytes'] / MIB:.1f} MiB of audit trail written in the run"
    )
    wl = results["workloads"]
    assert isinstance(wl, dict)
    table = Table(title="Round-trip throughput and latency (reference = virtfs-proxy-helper, QEMU 7.2)")
    for col, just in (
        ("workload", "left"),
        ("ref ops/s", "right"),
        ("gw ops/s", "right"),
        ("gw/ref", "right"),
        ("ratio range", "right"),
        ("target", "right"),
        ("", "center"),
        ("ref p50 µs", "right"),
        ("gw p50 µs", "right"),
        ("ref p99 µs", "right"),
        ("gw p99 µs", "right"),
        ("ref CPU µs/op", "right"),
        ("gw CPU µs/op", "right"),
    ):
        table.add_column(col, justify=just, no_wrap=col == "workload")  # type: ignore[arg-type]
    for name, data in wl.items():
        ref, gw = data["reference"], data["gateway"]
        target = RATIO_TARGETS.get(name)
        ratio = data["ratio"]
        table.add_row(
            name,
            f"{ref['ops_per_s_median']:,.0f}",
            f"{gw['ops_per_s_median']:,.0f}",
            f"{ratio:.2f}x",
            f"{min(data['ratio_rounds']):.2f}-{max(data['ratio_rounds']):.2f}",
            f">= {target:.2f}x" if target else "",
            verdict(ratio >= target) if target else "",
            f"{ref['p50_us']:.1f}",
            f"{gw['p50_us']:.1f}",
            f"{ref['p99_us']:.1f}",
            f"{gw['p99_us']:.1f}",
            f"{ref['server_cpu_us_per_op']:.1f}",
            f"{gw['server_cpu_us_per_op']:.1f}",
        )
    table.caption = (
        "ops/s: median over rounds; gw/ref: median of paired-run ratios (>1: the gateway is faster), range: "
        "min-max of them; p50/p99: all measured ops pooled; CPU µs/op: the server process's own CPU time. "
        "create+remove: 1 op = CREATE + close + REMOVE; mixed: 1 op = 1 request of a 20-request guest cycle."
    )
    console.print(table)

    mem = results["memory"]
    assert isinstance(mem, dict)
    mt = Table(title="Server memory (/proc/PID/status, MiB)")
    for col in ("server", "VmRSS at start", "VmRSS after", "VmHWM after", "RssAnon after", "target", ""):
        mt.add_column(col, justify="left" if col == "server" else "right")
    for name, m in mem.items():
        start, after = m["start"], m["after"]
        is_gw = name == "gateway"
        mt.add_row(
            name,
            f"{start['VmRSS']:.1f}",
            f"{after['VmRSS']:.1f}",
            f"{after['VmHWM']:.1f}",
            f"{after.get('RssAnon', float('nan')):.1f}",
            f"< {RSS_TARGET_MIB:.0f}" if is_gw else "",
            verdict(after["VmHWM"] < RSS_TARGET_MIB) if is_gw else "",
        )
    mt.caption = "target applies to the gateway's peak (VmHWM) while serving"
    console.print(mt)
    targets = results["targets"]
    assert isinstance(targets, dict)
    met = sum(1 for t in targets.values() if t["pass"])
    console.print(f"targets met: {met}/{len(targets)}")


# ---------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 rounds of 0.3 s (a smoke run; noisier)")
    ap.add_argument("--seconds", type=float, help="seconds per measured run (default 1.0, --quick 0.3)")
    ap.add_argument("--rounds", type=int, help="rounds per workload and server (default 5, --quick 3)")
    ap.add_argument("--warmup", type=int, default=300, help="unmeasured ops before each run (default 300)")
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated subset")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    ap.add_argument("--reference", default=REFERENCE_HELPER, help="the reference helper's path")
    ap.add_argument(
        "--gateway-tree",
        type=Path,
        default=REPO,
        help="a source tree whose `python -m gateway serve` to run (default: this checkout)",
    )
    ap.add_argument(
        "--export-dir",
        type=Path,
        help="where the two fresh exports are made (default: the system temp dir, $TMPDIR or /tmp)",
    )
    ap.add_argument(
        "--gateway-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="an extra argument for `gateway serve` (repeatable), e.g. --gateway-arg=--audit-sync=never",
    )
    ap.add_argument("--server-cpu", type=int, help="CPU both servers are pinned to (default: the first)")
    ap.add_argument("--client-cpu", type=int, help="CPU this client is pinned to (default: the second)")
    args = ap.parse_args(argv)
    args.seconds = args.seconds or (0.3 if args.quick else 1.0)
    args.rounds = args.rounds or (3 if args.quick else 5)
    args.workloads = [w for w in args.workloads.split(",") if w]
    unknown = set(args.workloads) - set(WORKLOADS)
    if unknown:
        ap.error(f"unknown workloads: {', '.join(sorted(unknown))}")
    return args


def pick_cpus(args: argparse.Namespace) -> tuple[int | None, int | None, str]:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None, None, f"only CPU {cpus} available: nothing pinned"
    server = args.server_cpu if args.server_cpu is not None else cpus[0]
    client = args.client_cpu if args.client_cpu is not None else next(c for c in cpus if c != server)
    return server, client, ""


def filesystem_of(path: Path) -> str:
    """The type of the file system path is on (from /proc/self/mounts: the longest matching mount point)."""
    best, fstype = "", "?"
    real = os.path.realpath(path)
    with open("/proc/self/mounts") as f:
        for line in f:
            _dev, mnt, kind = line.split()[:3]
            mnt = mnt.replace("\\040", " ")
            inside = real == mnt or real.startswith(mnt.rstrip("/") + "/")
            if inside and len(mnt) > len(best):
                best, fstype = mnt, kind
    return f"{fstype} ({best})"


def gateway_version(tree: Path) -> str:
    try:
        git = ["git", "-C", str(tree)]
        head = subprocess.run(
            [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "--", "gateway"], capture_output=True, text=True
        ).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return f"tree {tree}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = datetime.datetime.now().isoformat(timespec="seconds")
    if not os.path.exists(args.reference):
        print(f"the reference helper {args.reference} is not installed (apt-get install qemu-system-common)")
        return 2
    if os.geteuid() != 0:
        print("bench_proxy needs root: both helpers chroot into their export and switch fs ids")
        return 2
    server_cpu, client_cpu, pin_note = pick_cpus(args)
    all_workloads = build_workloads()
    workloads = {name: all_workloads[name] for name in args.workloads}

    tmp = Path(tempfile.mkdtemp(prefix="bench-proxy-", dir=args.export_dir))
    export_fs = filesystem_of(tmp)
    audit_log = tmp / "audit" / "gateway-audit.jsonl"
    audit_log.parent.mkdir()
    env = dict(os.environ)
    env["PYTHONPATH"] = str(args.gateway_tree) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    servers = [
        Server("reference", [args.reference], tmp / "ref-export", tmp / "reference.log"),
        Server(
            "gateway",
            # As deployed (its default policy, an audit trail), the trail kept out of the export.
            [sys.executable, "-m", "gateway", "serve", "--audit-log", str(audit_log), *args.gateway_arg],
            tmp / "gw-export",
            tmp / "gateway.log",
        ),
    ]
    runs: dict[str, dict[str, list[Run]]] = {w: {s.name: [] for s in servers} for w in workloads}
    results: dict[str, object] = {}
    try:
        for s in servers:
            make_export(s.export)
            s.start(server_cpu, args.gateway_tree, env)
        if client_cpu is not None:
            os.sched_setaffinity(0, {client_cpu})
        for s in servers:
            sanity_check(s)
        if pin_note:
            print(pin_note, file=sys.stderr)

        # One unmeasured pass of everything, so neither server meets a cold cache in round 0.
        for ops in workloads.values():
            for s in servers:
                run_workload(s, ops, min(args.seconds, 0.2), args.warmup)
        for r in range(args.rounds):
            for wi, (name, ops) in enumerate(workloads.items()):
                order = servers if (r + wi) % 2 == 0 else servers[::-1]
                for s in order:
                    runs[name][s.name].append(run_workload(s, ops, args.seconds, args.warmup))
                    s.check_alive()
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)

        memory = {}
        for s in servers:
            s.memory["after"] = s.read_memory()
            memory[s.name] = s.memory
        audit_bytes = audit_log.stat().st_size if audit_log.exists() else 0
    finally:
        for s in servers:
            s.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    wl_results: dict[str, dict[str, object]] = {}
    for name in workloads:
        ref_runs, gw_runs = runs[name]["reference"], runs[name]["gateway"]
        paired = [g.ops_per_s / r.ops_per_s for r, g in zip(ref_runs, gw_runs, strict=True)]
        wl_results[name] = {
            "reference": summarise(ref_runs),
            "gateway": summarise(gw_runs),
            "ratio": statistics.median(paired),
            "ratio_rounds": [round(x, 3) for x in paired],
        }
    targets: dict[str, dict[str, object]] = {}
    for name, minimum in RATIO_TARGETS.items():
        if name in wl_results:
            value = wl_results[name]["ratio"]
            assert isinstance(value, float)
            targets[f"{name} throughput ratio"] = {"value": value, "min": minimum, "pass": value >= minimum}
    hwm = memory["gateway"]["after"]["VmHWM"]
    targets["gateway serve VmHWM MiB"] = {"value": hwm, "max": RSS_TARGET_MIB, "pass": hwm < RSS_TARGET_MIB}
    results.update(
        config={
            "rounds": args.rounds,
            "seconds": args.seconds,
            "warmup_ops": args.warmup,
            "server_cpu": server_cpu,
            "client_cpu": client_cpu,
            "reference": args.reference,
            "gateway_tree": str(args.gateway_tree),
            "gateway_args": ["--audit-log", "<tmp>/gateway-audit.jsonl", *args.gateway_arg],
            "audit_trail_bytes": audit_bytes,
            "exports": f"{tmp} on {export_fs}",
            "gateway_version": gateway_version(args.gateway_tree),
            "python": sys.version.split()[0],
            "kernel": platform.release(),
            "loadavg_at_end": os.getloadavg(),
            "started": started,
        },
        workloads=wl_results,
        memory=memory,
        targets=targets,
    )
    render(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        print(f"results written to {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except BenchError as exc:
        print(f"bench_proxy: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
