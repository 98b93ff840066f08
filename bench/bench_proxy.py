"""Round-trip throughput, latency and server CPU of the gateway against the reference virtfs-proxy-helper.

    .venv/bin/python bench/bench_proxy.py [--quick] [--seconds N] [--rounds N] [--json FILE]

Three servers run in the same invocation, each on its own fresh export and its own socketpair (``-f``),
all pinned to one CPU, the client (this process) pinned to another:

  reference            /usr/lib/qemu/virtfs-proxy-helper, as QEMU 7.2 ships it
  gateway@1000-rules   ``gateway serve --policy FILE`` with the 1,000-rule path-conditioned policy that
                       bench/policy_gen.py generates (``path_policy(1000)``, written to the bench's temp
                       dir): a fleet-shaped policy in which every rule has a path condition. This is the
                       configuration the targets are judged on. Before anything is measured, every request
                       of every workload is decided against it and must be allowed (reads by
                       ``read-anything``, writes by ``workload-trees``, which covers ``/bench/**``, where
                       the export's files are); at the end the trail is tallied by deciding rule.
  gateway@allow-all    ``gateway serve --policy policies/allow-all.yaml``: no rule, only the trail. The
                       difference between the two gateways is the policy's cost.

Both gateways write an audit trail (kept out of their exports) with the default sync. Every workload is
run on every server in alternating order (ref, gw@1000, gw@all, then gw@all, gw@1000, ref, ...) for
several rounds; throughput is the median over rounds and each gateway/reference ratio is the median of
the ratios of runs paired within a round, which cancels most of the noise a shared machine adds. Latency
percentiles pool every measured op; the server's own CPU time per op (all its threads, from
/proc/PID/task/*/schedstat, ns resolution) is printed for every server and workload.

The client is deliberately lean (pre-encoded frames, one recv_into per reply, no per-op objects) so
that the figures are dominated by the servers rather than by the client's Python; the frames are the
ones gateway.protocol encodes, with QEMU's trailing NUL in every path and the ``//dir/file`` form.

Workloads (an "op" is what one latency sample and one unit of ops/s count):
  lstat          LSTAT of an existing file one directory deep
  getversion     GETVERSION of an existing file (on ext2/3/4, btrfs, xfs: an open and an ioctl; elsewhere
                 both servers answer 0 without a call)
  statfs         STATFS of an existing file
  open           OPEN O_RDONLY of an existing file, then close() of the received fd on the client
  chmod          CHMOD of an existing file (0644 / 0600 alternately)
  create+remove  CREATE O_CREAT|O_EXCL|O_RDWR 0644 as uid 1000 gid 1000, close the fd, REMOVE: 1 op
  mixed          a guest-like cycle of 20 requests (lstat-heavy, with open, a missing name, create,
                 chmod, utime, readlink, remove); 1 op = 1 request

Before measuring, each server's replies are checked: CREATE as 1000:1000 makes a file owned by it,
GETVERSION answers the generation the host's own ioctl reads on that server's file (its low 32 bits:
the ioctl writes an int and the reference leaves the u64's upper half uninitialised; 0 where the file
system lacks the ioctl), and each gateway's STATFS reply agrees with the reference's on the fields that
do not move (type, bsize, blocks, files, fsid, namelen, frsize).

Targets, on gateway@1000-rules: lstat >= 0.8x, getversion >= 0.8x, mixed >= 1.0x, create+remove >= 1.5x
the reference's throughput; and every gateway's peak RSS (VmHWM) while serving < 30 MiB. PASS/MISS is
printed beside each.

This is a measurement, not a test: it asserts nothing about timing. It does stop with an error when a
server answers a request with something other than the expected status, because a wrong answer makes
its figures meaningless.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import datetime
import errno
import fcntl
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

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

from common import filesystem_of  # noqa: E402
from policy_gen import path_policy  # noqa: E402

from gateway import paths as gpaths  # noqa: E402
from gateway import protocol as p  # noqa: E402
from gateway.rules import Policy, decide, load_policy_text  # noqa: E402

REFERENCE_HELPER = "/usr/lib/qemu/virtfs-proxy-helper"
MIB = 1024 * 1024

# Reply kinds the lean client reads.
STATUS, PAYLOAD, FD = 0, 1, 2

N_FILES = 64  # files the read-only workloads rotate over
GUEST_UID = GUEST_GID = 1000

# The servers, in the order of a round (reversed every other run).
REFERENCE = "reference"
GW_RULES = "gateway@1000-rules"  # the default configuration: the targets are judged on it
GW_ALLOW = "gateway@allow-all"
GATEWAYS = (GW_RULES, GW_ALLOW)
N_RULES = 1000

# Targets (on GW_RULES): workload -> minimum gateway/reference throughput ratio; and the serve RSS ceiling
# (every gateway's VmHWM).
RATIO_TARGETS = {"lstat": 0.8, "getversion": 0.8, "mixed": 1.0, "create+remove": 1.5}
RSS_TARGET_MIB = 30.0

WORKLOADS = ("lstat", "getversion", "statfs", "open", "chmod", "create+remove", "mixed")
# The rules that must decide the workloads' requests under the generated policy (see policy_gen).
READ_RULE, WRITE_RULE = "read-anything", "workload-trees"


class BenchError(RuntimeError):
    """The bench cannot produce meaningful figures (a server failed, answered wrongly, or exited)."""


# ---------------------------------------------------------------------------------------------------------
# The lean client


class Wire:
    """One connection to a server: sends a pre-encoded frame, reads exactly one reply, returns its errno."""

    __slots__ = ("buf", "closed_fds", "cmsg_space", "size", "sock", "view")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray(p.HEADER_SIZE + p.MAX_PAYLOAD + 16)
        self.view = memoryview(self.buf)
        self.cmsg_space = socket.CMSG_SPACE(4 * 4)  # room for a few fds, so an extra one is seen and closed
        self.closed_fds = 0
        self.size = 0  # the last header-carrying reply's payload size

    def payload(self) -> bytes:
        """The payload of the last header-carrying reply (a copy)."""
        return bytes(self.buf[p.HEADER_SIZE : p.HEADER_SIZE + self.size])

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
        self.size = size
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
    w["getversion"] = [(_step(p.Getversion(_file(i))),) for i in range(N_FILES)]
    w["statfs"] = [(_step(p.Statfs(_file(i))),) for i in range(N_FILES)]
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


# STATFS fields that do not move between two calls on one file system (bfree, bavail, ffree do).
STATFS_STABLE = ("type", "bsize", "blocks", "files", "fsid0", "fsid1", "namelen", "frsize")
# File systems whose FS_IOC_GETVERSION both servers use (ext2/3/4, btrfs, reiserfs, xfs); elsewhere 0.
GETVERSION_MAGICS = {0xEF53, 0x9123683E, 0x52654973, 0x58465342}
FS_IOC_GETVERSION = 0x80087601


def host_generation(path: Path) -> int:
    """What GETVERSION should answer for path: the host's own ioctl, or 0 where neither server asks."""
    from gateway.syscalls import fstatfs

    fd = os.open(path, os.O_RDONLY)
    try:
        if fstatfs(fd)[0] not in GETVERSION_MAGICS:
            return 0
        return int.from_bytes(fcntl.ioctl(fd, FS_IOC_GETVERSION, bytes(8)), "little", signed=True)
    finally:
        os.close(fd)


def sanity_check(servers: list[Server]) -> None:
    """Every server must do what the workloads assume and answer what the reference answers: CREATE as
    1000:1000 makes a file owned by it; GETVERSION gives the generation the host reads on that server's
    own file; STATFS agrees with the reference's reply on the fields that do not move."""
    statfs: dict[str, p.StatfsReply] = {}
    for server in servers:
        wire = server.wire
        assert wire is not None
        name = b"//bench/owner-check"
        err = wire.call(FD, _frame(p.Create(name, CREATE_FLAGS, 0o644, GUEST_UID, GUEST_GID)))
        if err:
            raise BenchError(
                f"{server.name}: CREATE as {GUEST_UID}:{GUEST_GID} failed: {errno.errorcode[err]}"
            )
        st = os.lstat(server.export / "bench" / "owner-check")
        if (st.st_uid, st.st_gid) != (GUEST_UID, GUEST_GID):
            raise BenchError(f"{server.name}: CREATE made a file owned by {st.st_uid}:{st.st_gid}")
        if wire.call(STATUS, _frame(p.Remove(name))):
            raise BenchError(f"{server.name}: REMOVE failed")

        for i in (0, 1):
            err = wire.call(PAYLOAD, _frame(p.Getversion(_file(i))))
            if err or wire.size != 8:
                raise BenchError(f"{server.name}: GETVERSION answered {errno.errorcode.get(err, err)}")
            # The ioctl writes an int: the reference leaves the upper half of its u64 uninitialised (stack
            # bytes), the gateway zeroes it. The generation is the low 32 bits.
            got = p.parse_u64(wire.payload()) & 0xFFFFFFFF
            want = host_generation(server.export / "bench" / f"f{i:02d}") & 0xFFFFFFFF
            if got != want:
                raise BenchError(
                    f"{server.name}: GETVERSION of f{i:02d} answered {got}, the host reads {want}"
                )

        err = wire.call(PAYLOAD, _frame(p.Statfs(_file(0))))
        if err or wire.size != 88:
            raise BenchError(f"{server.name}: STATFS answered {errno.errorcode.get(err, err)}")
        statfs[server.name] = p.parse_statfs(wire.payload())
    ref = statfs[REFERENCE]
    for name, reply in statfs.items():
        differ = [f for f in STATFS_STABLE if getattr(reply, f) != getattr(ref, f)]
        if differ:
            detail = ", ".join(f"{f} {getattr(reply, f)} (reference {getattr(ref, f)})" for f in differ)
            raise BenchError(f"{name}: STATFS differs from the reference's: {detail}")


def canonical(request: p.Request) -> p.Request:
    """The request as the gateway decides it: its path(s) normalised (the export has no symlinked dirs)."""
    changes = {"path": gpaths.normalise_bytes(request.path)}  # type: ignore[union-attr]
    if hasattr(request, "path2"):
        changes["path2"] = gpaths.normalise_bytes(request.path2)
    return dataclasses.replace(request, **changes)  # type: ignore[type-var]


def _is_write(request: p.Request) -> bool:
    if isinstance(request, p.Open):
        return request.flags & os.O_ACCMODE != os.O_RDONLY or bool(
            request.flags & (os.O_TRUNC | os.O_APPEND | os.O_CREAT)
        )
    return p.reply_shape(request.type) is not p.ReplyShape.PAYLOAD


def check_policy_covers(policy: Policy, workloads: dict[str, list[Op]]) -> dict[str, int]:
    """Every distinct request the bench sends, decided against the policy as the gateway decides it, must
    be allowed: reads by READ_RULE, writes by WRITE_RULE (whose paths must cover the export's /bench/...).
    Otherwise the gateway would answer EACCES, or be measured deciding something else. Returns the number
    of distinct requests each rule decided."""
    frames = {frame for ops in workloads.values() for op in ops for _kind, frame, _expect in op}
    frames |= {
        _frame(p.Lstat(b"/")),
        _frame(p.Create(b"//bench/owner-check", CREATE_FLAGS, 0o644, GUEST_UID, GUEST_GID)),
        _frame(p.Remove(b"//bench/owner-check")),
    }
    tally: collections.Counter[str] = collections.Counter()
    for frame in sorted(frames):
        decoder = p.Decoder()
        decoder.feed(frame)
        request = decoder.next_event()
        assert isinstance(request, tuple(cls for cls, _codes in p.LAYOUTS.values())), request
        decided = canonical(request)  # type: ignore[arg-type]
        decision = decide(decided, policy, lambda _path: None)
        want = WRITE_RULE if _is_write(decided) else READ_RULE
        if decision.outcome != "allow" or decision.rule != want:
            raise BenchError(
                f"the {N_RULES}-rule policy does not decide {decided!r} as the bench needs "
                f"(allow by {want}): {decision.outcome} by {decision.rule}: {decision.reason}"
            )
        tally[want] += 1
    return dict(tally)


def trail_rules(trail: Path) -> dict[str, int]:
    """The trail's request records counted by decision and deciding rule ("allow:read-anything", ...)."""
    tally: collections.Counter[str] = collections.Counter()
    with contextlib.suppress(FileNotFoundError), open(trail, "rb") as f:
        for line in f:
            record = json.loads(line)
            if record.get("event") == "request":
                tally[f"{record.get('decision')}:{record.get('rule')}"] += 1
    return dict(tally)


# ---------------------------------------------------------------------------------------------------------
# Reporting


def verdict(ok: bool) -> str:
    return "[bold green]PASS[/]" if ok else "[bold red]MISS[/]"


def render(results: dict[str, object]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 160)
    cfg = results["config"]
    assert isinstance(cfg, dict)
    console.print(
        f"[bold]bench_proxy[/]: {cfg['rounds']} rounds x {cfg['seconds']} s per run, servers on CPU "
        f"{cfg['server_cpu']}, client on CPU {cfg['client_cpu']}, gateway {cfg['gateway_version']}, "
        f"{cfg['started']}\nexports: {cfg['exports']}; load average at the end: "
        f"{' '.join(f'{x:.2f}' for x in cfg['loadavg_at_end'])}"
    )
    for name, gcfg in cfg["gateways"].items():
        console.print(
            f"{name}: gateway serve {' '.join(gcfg['args'])}: {gcfg['audit_trail_bytes'] / MIB:.1f} MiB of "
            f"trail; its request records by decision:rule: {gcfg['trail_rules']}"
        )
    wl = results["workloads"]
    assert isinstance(wl, dict)
    table = Table(
        title="Round-trip throughput, latency and server CPU (reference = virtfs-proxy-helper, QEMU 7.2)"
    )
    for col, just in (
        ("workload", "left"),
        ("ref ops/s", "right"),
        ("gw policy", "left"),
        ("gw ops/s", "right"),
        ("gw/ref", "right"),
        ("range", "right"),
        ("target", "left"),
        ("ref p50 µs", "right"),
        ("gw p50 µs", "right"),
        ("ref p99 µs", "right"),
        ("gw p99 µs", "right"),
        ("ref CPU µs/op", "right"),
        ("gw CPU µs/op", "right"),
    ):
        # Figures never wrap; the headers may, onto a second line.
        table.add_column(
            col,
            justify=just,  # type: ignore[arg-type]
            no_wrap=col in ("workload", "gw policy", "target"),
            min_width=9 if col == "range" else None,
        )
    for name, data in wl.items():
        ref = data[REFERENCE]
        for i, gw_name in enumerate(GATEWAYS):
            gw = data[gw_name]
            target = RATIO_TARGETS.get(name) if gw_name == GW_RULES else None
            ratio = gw["ratio"]
            first = i == 0
            table.add_row(
                name if first else "",
                f"{ref['ops_per_s_median']:,.0f}" if first else "",
                gw_name.removeprefix("gateway@"),
                f"{gw['ops_per_s_median']:,.0f}",
                f"{ratio:.2f}x",
                f"{min(gw['ratio_rounds']):.2f}-{max(gw['ratio_rounds']):.2f}",
                f">= {target:.2f}x {verdict(ratio >= target)}" if target else "",
                f"{ref['p50_us']:.1f}" if first else "",
                f"{gw['p50_us']:.1f}",
                f"{ref['p99_us']:.1f}" if first else "",
                f"{gw['p99_us']:.1f}",
                f"{ref['server_cpu_us_per_op']:.1f}" if first else "",
                f"{gw['server_cpu_us_per_op']:.1f}",
                end_section=i == len(GATEWAYS) - 1,
            )
    table.caption = (
        "Per workload, line 1: the reference and gateway@1000-rules (the targets' configuration), line 2: "
        "gateway@allow-all against the same reference runs. ops/s: median over rounds; gw/ref: median of "
        "the ratios of runs paired within a round (>1: the gateway is faster), range: min-max of them; "
        "p50/p99: all measured ops pooled; CPU µs/op: the server process's own CPU time (all threads). "
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
        is_gw = name in GATEWAYS
        mt.add_row(
            name,
            f"{start['VmRSS']:.1f}",
            f"{after['VmRSS']:.1f}",
            f"{after['VmHWM']:.1f}",
            f"{after.get('RssAnon', float('nan')):.1f}",
            f"< {RSS_TARGET_MIB:.0f}" if is_gw else "",
            verdict(after["VmHWM"] < RSS_TARGET_MIB) if is_gw else "",
        )
    mt.caption = "the target applies to each gateway's peak (VmHWM) while serving"
    console.print(mt)
    targets = results["targets"]
    assert isinstance(targets, dict)
    met = sum(1 for t in targets.values() if t["pass"])
    console.print(
        f"targets met: {met}/{len(targets)}"
        + "".join(
            f"\n  {'PASS' if t['pass'] else 'MISS'}  {name}: {t['value']:.2f}" for name, t in targets.items()
        )
    )


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
    (tmp / "audit").mkdir()
    # The default configuration: the fleet-shaped 1,000-rule policy, checked to allow what the bench does.
    rules_policy = tmp / f"policy-{N_RULES}.yaml"
    rules_text = path_policy(N_RULES)
    rules_policy.write_text(rules_text)
    decided_by = check_policy_covers(load_policy_text(rules_text, str(rules_policy)), all_workloads)
    allow_all = args.gateway_tree / "policies" / "allow-all.yaml"
    if not allow_all.exists():
        allow_all = REPO / "policies" / "allow-all.yaml"
    policies = {GW_RULES: rules_policy, GW_ALLOW: allow_all}
    env = dict(os.environ)
    env["PYTHONPATH"] = str(args.gateway_tree) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    trails = {name: tmp / "audit" / f"{name.removeprefix('gateway@')}.jsonl" for name in GATEWAYS}
    gateway_args = {
        name: ["--audit-log", str(trails[name]), "--policy", str(policies[name]), *args.gateway_arg]
        for name in GATEWAYS
    }
    servers = [Server(REFERENCE, [args.reference], tmp / "ref-export", tmp / "reference.log")]
    for name in GATEWAYS:
        tag = name.removeprefix("gateway@")
        # As deployed: a policy and an audit trail, the trail kept out of the export.
        argv = [sys.executable, "-m", "gateway", "serve", *gateway_args[name]]
        servers.append(Server(name, argv, tmp / f"gw-{tag}-export", tmp / f"gateway-{tag}.log"))
    runs: dict[str, dict[str, list[Run]]] = {w: {s.name: [] for s in servers} for w in workloads}
    results: dict[str, object] = {}
    try:
        for s in servers:
            make_export(s.export)
            s.start(server_cpu, args.gateway_tree, env)
        if client_cpu is not None:
            os.sched_setaffinity(0, {client_cpu})
        sanity_check(servers)
        if pin_note:
            print(pin_note, file=sys.stderr)

        # One unmeasured pass of everything, so no server meets a cold cache in round 0.
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
    finally:
        for s in servers:
            s.stop()
        trail_bytes = {name: trail.stat().st_size if trail.exists() else 0 for name, trail in trails.items()}
        tallies = {name: trail_rules(trail) for name, trail in trails.items()}
        shutil.rmtree(tmp, ignore_errors=True)

    # Every request the 1000-rule gateway served must have been allowed by one of the two workload rules.
    stray = {
        k: v for k, v in tallies[GW_RULES].items() if k not in (f"allow:{READ_RULE}", f"allow:{WRITE_RULE}")
    }
    if stray:
        raise BenchError(f"{GW_RULES} decided requests other than as the bench needs: {stray}")

    wl_results: dict[str, dict[str, object]] = {}
    for name in workloads:
        ref_runs = runs[name][REFERENCE]
        entry: dict[str, object] = {REFERENCE: summarise(ref_runs)}
        for gw_name in GATEWAYS:
            gw_runs = runs[name][gw_name]
            paired = [g.ops_per_s / r.ops_per_s for r, g in zip(ref_runs, gw_runs, strict=True)]
            entry[gw_name] = {
                **summarise(gw_runs),
                "ratio": statistics.median(paired),
                "ratio_rounds": [round(x, 3) for x in paired],
            }
        wl_results[name] = entry
    targets: dict[str, dict[str, object]] = {}
    for name, minimum in RATIO_TARGETS.items():
        if name in wl_results:
            value = wl_results[name][GW_RULES]["ratio"]  # type: ignore[index]
            assert isinstance(value, float)
            targets[f"{name} throughput ratio ({GW_RULES})"] = {
                "value": value,
                "min": minimum,
                "pass": value >= minimum,
            }
    for gw_name in GATEWAYS:
        hwm = memory[gw_name]["after"]["VmHWM"]
        targets[f"{gw_name} serve VmHWM MiB"] = {
            "value": hwm,
            "max": RSS_TARGET_MIB,
            "pass": hwm < RSS_TARGET_MIB,
        }
    results.update(
        config={
            "rounds": args.rounds,
            "seconds": args.seconds,
            "warmup_ops": args.warmup,
            "server_cpu": server_cpu,
            "client_cpu": client_cpu,
            "reference": args.reference,
            "gateway_tree": str(args.gateway_tree),
            "gateways": {
                name: {
                    "args": [a.replace(str(tmp), "<tmp>") for a in gateway_args[name]],
                    "audit_trail_bytes": trail_bytes[name],
                    "trail_rules": tallies[name],
                }
                for name in GATEWAYS
            },
            "policy_check": f"{N_RULES} rules; distinct requests decided by rule: {decided_by}",
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
