"""Memory of one `gateway serve` process, to size the systemd unit's MemoryHigh/MemoryMax.

    sudo .venv/bin/python bench/bench_memory.py [N_RULES ...]     (default: builtin 1000 10000)

For the built-in policy and bench/policy_gen.py policies of N rules: the resident size once serving
(VmRSS after one LSTAT), the peak of start-up (VmHWM: reading, validating and compiling the policy),
and the peak after a SIGHUP reload (the new policy is built while the old one still serves, so a reload
is the highest point of a gateway's life). A cgroup limit below the peak kills the gateway at start or
at its first reload.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from policy_gen import path_policy  # noqa: E402

from gateway import protocol as p  # noqa: E402


def status(pid: int) -> dict[str, float]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return fields


def measure(policy: Path | None, tmp: Path) -> dict[str, float]:
    export = tmp / "export"
    (export / "bench").mkdir(parents=True, exist_ok=True)
    trail = tmp / "trail.jsonl"
    trail.unlink(missing_ok=True)
    ours, theirs = socket.socketpair()
    cmd = [sys.executable, "-m", "gateway", "serve", "-p", str(export), "-f", str(theirs.fileno()), "-n",
           "--audit-log", str(trail)] + (["--policy", str(policy)] if policy else [])  # fmt: skip
    proc = subprocess.Popen(cmd, pass_fds=[theirs.fileno()], cwd=REPO, stderr=subprocess.DEVNULL)
    theirs.close()
    frame = p.encode_request(p.Lstat(b"bench"), nul=True)
    try:
        ours.sendall(frame)
        ours.recv(256)
        started = status(proc.pid)
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and b'"policy-reload"' not in trail.read_bytes():
            time.sleep(0.05)
        ours.sendall(frame)
        ours.recv(256)
        reloaded = status(proc.pid)
    finally:
        ours.close()
        proc.wait(60)
    return {"serving": started["VmRSS"], "start peak": started["VmHWM"], "reload peak": reloaded["VmHWM"],
            "after reload": reloaded["VmRSS"]}  # fmt: skip


def main() -> int:
    sizes = sys.argv[1:] or ["builtin", "1000", "10000"]
    print(f"{'policy':>10} {'serving':>9} {'start peak':>11} {'reload peak':>12} {'after reload':>13}  (MiB)")
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as d:
        tmp = Path(d)
        for size in sizes:
            policy = None
            if size != "builtin":
                policy = tmp / f"p{size}.yaml"
                policy.write_text(path_policy(int(size)))
            m = measure(policy, tmp)
            print(f"{size:>10} {m['serving']:>9.1f} {m['start peak']:>11.1f} {m['reload peak']:>12.1f} "
                  f"{m['after reload']:>13.1f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
