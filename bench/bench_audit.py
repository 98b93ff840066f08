"""Audit trail benchmarks: the writer's cost per record on the request path, and `gateway audit`
over a million records.

    .venv/bin/python bench/bench_audit.py [--records 1000000] [--keep DIR] [--skip-writer]

Targets (issue 12, on a 1M-record trail, one process is fine): --summary under 5 s, --verify (with the
verification key: every seal checked) under 5 s, a filtered query under 3 s; each printed with PASS or
MISS (never a test: the machine is shared and noisy). The million-record trail is written by the writer
itself, sealed (a checkpoint every 1,000 records), so its chain and seals are real and --verify walks
them; that also measures the writer over a long run.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gateway import protocol as p
from gateway.audit import AuditWriter

DRAIN = """
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
s.bind(sys.argv[1])
print("ready", flush=True)
n = 0
while s.recv(65536) != b"END":
    n += 1
print(n)
"""


def requests(seed: int = 42) -> Iterator[tuple[p.Request, str, str | None, str, str]]:
    """An endless, repeatable mix: mostly reads and home-directory writes, some denials."""
    rng = random.Random(seed)
    dirs = [f"/home/user{u}/{d}" for u in range(40) for d in ("src", "docs", ".cache", "mail", "tmp")]
    names = [f"file{i}.{ext}" for i in range(120) for ext in ("txt", "py", "o")]
    system = [
        "/etc/passwd",
        "/etc/shadow",
        "/etc/hosts",
        "/usr/bin/sudo",
        "/usr/lib/libc.so.6",
        "/etc/ssh/sshd_config",
    ]
    while True:
        roll = rng.random()
        path = (rng.choice(dirs) + "/" + rng.choice(names)).encode()
        if roll < 0.35:
            yield p.Lstat(path), "allow", "read-anything", "allowed by rule read-anything", "ok"
        elif roll < 0.55:
            yield p.Open(path, os.O_RDONLY), "allow", "read-anything", "allowed by rule read-anything", "ok"
        elif roll < 0.70:
            req = p.Create(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644, 1000, 1000)
            yield req, "allow", "homes", "allowed by rule homes", "ok"
        elif roll < 0.78:
            yield p.Rename(path, path + b".bak"), "allow", "homes", "allowed by rule homes", "ok"
        elif roll < 0.84:
            yield p.Utime(path, 1, 2, 3, 4), "allow", "homes", "allowed by rule homes", "ENOENT"
        elif roll < 0.94:
            target = rng.choice(system).encode()
            yield (
                p.Open(target, os.O_RDWR),
                "deny",
                "system-read-only",
                "denied by rule system-read-only",
                "EROFS",
            )
        elif roll < 0.97:
            yield (
                p.Chmod(path, 0o4755),
                "would-deny",
                "no-setid-bits",
                "would be denied by no-setid-bits",
                "ok",
            )
        else:
            yield (
                p.Mknod(1000, 1000, path, 0o20644, 0x0501),
                "deny",
                "no-device-nodes",
                "denied by rule no-device-nodes",
                "EPERM",
            )


def write_records(writer: AuditWriter, count: int, sample_every: int = 0) -> tuple[float, list[float]]:
    """(mean µs a record over the whole run, sampled single-record times in µs)."""
    source = requests()
    batch = [next(source) for _ in range(4096)]
    samples: list[float] = []
    perf = time.perf_counter
    record = writer.request
    start = perf()
    for i in range(count):
        req, decision, rule, reason, result = batch[i & 4095]
        if sample_every and not i % sample_every:
            t0 = perf()
            record(req, decision=decision, rule=rule, reason=reason, result=result, us=12.5)
            samples.append((perf() - t0) * 1e6)
        else:
            record(req, decision=decision, rule=rule, reason=reason, result=result, us=12.5)
    return (perf() - start) / count * 1e6, samples


def report(label: str, mean: float, samples: list[float]) -> None:
    if samples:
        samples.sort()
        p50 = statistics.median(samples)
        p99 = samples[int(len(samples) * 0.99)]
        print(f"  {label:<34} mean {mean:7.2f} µs   p50 {p50:7.2f} µs   p99 {p99:8.2f} µs")
    else:
        print(f"  {label:<34} mean {mean:7.2f} µs")


def writer_costs(tmp: str) -> None:
    print("writer: per-record cost on the request path (request() returns after os.write)")
    for sync, count in (("never", 200_000), ("interval", 200_000), ("every", 2_000)):
        path = os.path.join(tmp, f"w-{sync}.jsonl")
        with AuditWriter.open(path, tenant="bench", policy_hash="ab" * 32, sync=sync) as writer:
            writer.lifecycle("start", version="bench")
            mean, samples = write_records(writer, count, sample_every=10)
        report(f"sync={sync}", mean, samples)

    # syslog: a datagram socket bound and drained by another process stands in for /dev/log (a
    # thread here would compete with the writer for the GIL and measure that instead)
    address = os.path.join(tmp, "log.sock")
    drainer = subprocess.Popen([sys.executable, "-c", DRAIN, address], stdout=subprocess.PIPE, text=True)
    assert drainer.stdout is not None
    assert drainer.stdout.readline().strip() == "ready"
    with AuditWriter.open(
        os.path.join(tmp, "w-syslog.jsonl"), tenant="bench", policy_hash="ab" * 32, syslog=address
    ) as writer:
        mean, samples = write_records(writer, 100_000, sample_every=10)
        dropped = writer.syslog_dropped
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as end:
        end.sendto(b"END", address)
    received = int(drainer.communicate(timeout=60)[0])
    report("sync=never + syslog", mean, samples)
    try:
        with open("/proc/sys/net/unix/max_dgram_qlen") as f:
            qlen = f.read().strip()
    except OSError:
        qlen = "?"
    print(
        f"  {'':<34} ({received:,} datagrams received, {dropped:,} dropped: the queue of "
        f"net.unix.max_dgram_qlen={qlen} was full)"
    )

    from gateway.audit.console import start_console_renderer, wait_console_renderer

    devnull = os.open(os.devnull, os.O_WRONLY)
    fd = start_console_renderer(output=devnull)
    os.close(devnull)
    with AuditWriter.open(
        os.path.join(tmp, "w-console.jsonl"), tenant="bench", policy_hash="ab" * 32, console=fd
    ) as writer:
        mean, samples = write_records(writer, 100_000, sample_every=10)
        dropped = writer.console_dropped
    wait_console_renderer(fd, timeout=120)
    report("sync=never + console pipe", mean, samples)
    print(f"  {'':<34} ({dropped:,} lines dropped from the console while the renderer was behind)")


def timed(label: str, fn: Callable[[], int]) -> float:
    start = time.perf_counter()
    status = fn()
    elapsed = time.perf_counter() - start
    print(f"  {label:<44} {elapsed:6.2f} s   (exit {status})")
    return elapsed


def run_cli(argv: list[str]) -> int:
    from gateway.audit_cli import add_arguments, run

    parser = argparse.ArgumentParser(prog="gateway audit")
    add_arguments(parser)
    args = parser.parse_args(argv)
    saved = sys.stdout
    sink = open(os.devnull, "w")  # noqa: SIM115
    sys.stdout = io.TextIOWrapper(open(os.devnull, "wb"), encoding="utf-8")  # noqa: SIM115
    try:
        return run(args)
    finally:
        sys.stdout.flush()
        sys.stdout = saved
        sink.close()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--keep", metavar="DIR", help="write the trail here and keep it")
    parser.add_argument("--skip-writer", action="store_true", help="only the review benchmarks")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-audit-") as tmp:
        if not args.skip_writer:
            writer_costs(tmp)
        where = args.keep or tmp
        os.makedirs(where, exist_ok=True)
        trail = os.path.join(where, "trail.jsonl")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(trail)
        print(f"\ngenerating {args.records:,} records with the writer, sealed ({trail})")
        from gateway.audit.seal import SealKey, keygen

        seal, verify_key = os.path.join(where, "bench.seal"), os.path.join(where, "bench.verify")
        for key_file in (seal, verify_key):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(key_file)
        keygen(seal, verify_key)
        with AuditWriter.open(trail, tenant="guest-42", policy_hash="cd" * 32, seal=SealKey.open(seal),
                              checkpoint_seconds=0) as writer:  # (by count only: the same trail each run)
            writer.lifecycle("start", version="bench", export="/srv/guest-42")
            mean, _ = write_records(writer, args.records - 2 - args.records // 1000)
            writer.lifecycle("stop", reason="bench done")
        size = os.path.getsize(trail)
        per = size / args.records
        print(f"  written at {mean:.2f} µs a record (checkpoints included); {size / 1e6:.0f} MB, "
              f"{per:.0f} bytes a record")
        print("\ngateway audit over the trail (output to /dev/null, so review prints one line per record):")
        scale = args.records / 1_000_000
        results: list[tuple[str, float, float]] = []

        def run(label: str, argv: list[str], target: float | None = None) -> None:
            elapsed = timed(label, lambda: run_cli([trail, *argv, "--no-progress"]))
            if target is not None:
                results.append((label, elapsed, target * scale))

        run("--summary", ["--summary"], 5.0)
        run("--verify --key (chain and every seal)", ["--verify", "--key", verify_key], 5.0)
        run("--verify (chain only)", ["--verify"])
        run("--decision deny --path '/etc/**' (lines)", ["--decision", "deny", "--path", "/etc/**"], 3.0)
        run("--format json --path '/etc/**' --decision deny",
            ["--format", "json", "--path", "/etc/**", "--decision", "deny"], 3.0)  # fmt: skip
        run("--format csv --rule no-device-nodes", ["--format", "csv", "--rule", "no-device-nodes"], 3.0)
        run("--summary --decision deny --op write", ["--summary", "--decision", "deny", "--op", "write"], 3.0)
        run("--by path --failed", ["--by", "path", "--failed"])
        run("--last 20", ["--last", "20"], 3.0)
        run("--reverse --last 20 --decision would-deny",
            ["--reverse", "--last", "20", "--decision", "would-deny"])  # fmt: skip
        print(f"\ntargets ({args.records:,} records; scaled from 1M):")
        for label, elapsed, target in results:
            verdict = "PASS" if elapsed < target else "MISS"
            print(f"  {verdict}  {label:<46} {elapsed:6.2f} s  (target {target:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
