"""Multi-tenant figures: a policy's request rate held (the guest slowed, never failed) and the resident
memory of twenty gateways serving at once.

    python bench/bench_tenants.py [--seconds S]      (as root)

Prints, for a few rates, the rate the guest achieved flat out, how many requests failed (must be 0), the
'limit' records in the trail; then the RSS of twenty gateways, each with its own export and policy.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway import protocol as p  # noqa: E402
from gateway.client import Client  # noqa: E402

SERVE = [sys.executable, "-m", "gateway", "serve"]


def _start(export: Path, trail: Path, policy: Path) -> tuple[subprocess.Popen[bytes], Client]:
    ours, theirs = socket.socketpair()
    ours.settimeout(30)
    proc = subprocess.Popen(
        [*SERVE, "-p", str(export), "-f", str(theirs.fileno()), "-n", "--policy", str(policy),
         "--audit-log", str(trail)],
        pass_fds=[theirs.fileno()],
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    theirs.close()
    return proc, Client(ours)


def rate_run(tmp: Path, rate: int, burst: int, seconds: float) -> dict[str, float]:
    export = tmp / f"rate-{rate}"
    export.mkdir()
    (export / "f").write_text("x")
    policy = tmp / f"rate-{rate}.yaml"
    policy.write_text(
        f"version: 1\ntenant: rate-{rate}\ndefault: allow\nrules: []\n"
        f"limits:\n  rate: {{requests_per_second: {rate}, burst: {burst}}}\n"
    )
    trail = tmp / f"rate-{rate}.jsonl"
    proc, client = _start(export, trail, policy)
    frame = p.encode_request(p.Lstat(b"//f"), nul=True)
    done = failed = 0
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        client.send_raw(frame)
        if not client.read_reply(p.RequestType.LSTAT).ok:
            failed += 1
        done += 1
    elapsed = time.monotonic() - start
    client.close()
    proc.wait(30)
    records = [json.loads(line) for line in trail.read_text().splitlines()]
    limits = [r for r in records if r.get("event") == "limit"]
    return {
        "rate": rate,
        "burst": burst,
        "achieved": done / elapsed,
        "expected": (burst + rate * elapsed) / elapsed,
        "failed": failed,
        "limit_records": len(limits),
        "delayed": sum(int(r.get("delayed", 0)) for r in limits),
    }


def rss_run(tmp: Path, tenants: int) -> list[int]:
    policy_dir = tmp / "tenants"
    policy_dir.mkdir()
    running = []
    for i in range(tenants):
        export = tmp / f"guest-{i}"
        export.mkdir()
        (policy_dir / f"guest-{i}.yaml").write_text(
            f'version: 1\ntenant: guest-{i}\ndefault: allow\nrules:\n  - id: lock-{i}\n    effect: deny\n'
            f'    ops: [write]\n    paths: ["/locked-{i}/**"]\n'
        )
        running.append(_start(export, tmp / f"guest-{i}.jsonl", policy_dir / f"guest-{i}.yaml"))
    rss = []
    for proc, client in running:
        client.lstat(b"/")
        with open(f"/proc/{proc.pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f)
        rss.append(int(fields["VmHWM"].split()[0]))
    for proc, client in running:
        client.close()
        proc.wait(30)
    return rss


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--tenants", type=int, default=20)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench_tenants: run as root (the gateway chroots)", file=sys.stderr)
        return 2
    console = Console()
    with tempfile.TemporaryDirectory(prefix="bench-tenants-") as tmpdir:
        tmp = Path(tmpdir)
        table = Table(title=f"limits.rate held: a guest sending LSTATs flat out for {args.seconds:g} s")
        for col in ("rate/s", "burst", "achieved/s", "expected/s", "failed", "delayed", "limit records"):
            table.add_column(col, justify="right")
        for rate, burst in ((200, 20), (1000, 100), (3000, 300)):
            r = rate_run(tmp, rate, burst, args.seconds)
            table.add_row(
                str(rate), str(burst), f"{r['achieved']:.0f}", f"{r['expected']:.0f}", str(r["failed"]),
                str(r["delayed"]), str(r["limit_records"]),
            )  # fmt: skip
        console.print(table)
        console.print("expected = (burst + rate x elapsed) / elapsed: the most the bucket allows")
        rss = rss_run(tmp, args.tenants)
        console.print(
            f"\n{args.tenants} gateways serving at once: peak RSS max {max(rss) / 1024:.1f} MiB, "
            f"median {sorted(rss)[len(rss) // 2] / 1024:.1f} MiB, total {sum(rss) / 1024:.0f} MiB "
            f"(target: under 30 MiB each: {'PASS' if max(rss) < 30 * 1024 else 'MISS'})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
