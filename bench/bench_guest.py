"""Real-guest benchmark: a QEMU guest's 9p workloads through the reference helper and through the gateway.

    .venv/bin/python bench/bench_guest.py [--quick] [--rounds N] [--json FILE]

(run it from the worktree, as root, with the guest kernel in ``.cache/guest``: see tests/guest/harness.py
and scripts/fetch-guest-kernel.sh). Each round boots one guest per helper (QEMU 7.2 under TCG, the 9p share
on ``-fsdev proxy``, the helper in socket mode ``-p EXPORT -s SOCK -u 0 -g 0 -n``); the helpers alternate
(ref, gw, gw, ref, ...), so a drift of the shared machine's speed hits both about equally. One boot runs
every workload, each timed inside the guest with the guest's CLOCK_MONOTONIC (``gtool``):

  cloop     gtool's C loop of open(O_CREAT|O_EXCL)+close, stat, unlink on the mount, N times: iterations/s
  walk      ``ls -lR`` over a tree of F files (spread over directories, made on the host before the first
            boot): files/s (the seconds are in the JSON)
  dd_write  ``dd if=/dev/zero bs=1M`` of S MiB to a file on the mount: MiB/s
  dd_read   the guest page cache dropped, the same file read back with ``dd bs=1M``: MiB/s

Sizes: N=500, F=5,000 (50 directories), S=64 by default; ``--quick`` uses N=100, F=500 (10 directories),
S=8 for a smoke run (still both helpers, every workload). The gateway runs as deployed, with exactly the
reference's options after ``serve`` plus a 1,000-rule path-conditioned policy (bench/policy_gen.py, a temp
file), its audit trail on (one file per boot, in a temp directory outside the export) and its default
sandbox. The figures are medians over rounds; the gateway/reference ratio is the median of the per-round
paired ratios (>1: the gateway is faster), judged PASS/MISS against 0.9x on each workload.

From the trail it reports the request records per op (the JSON lines' "op", "event":"request"), per
workload: before each workload the guest looks up a missing name ``/.bench-mark-WORKLOAD`` (one LSTAT),
and the records between two markers are that workload's.

Note that the data of dd does not pass through either helper: QEMU reads and writes the fd the helper
opened, so dd_write/dd_read mostly measure QEMU and the guest and should come out near 1.0x.

This is a measurement, not a test: it asserts nothing about timing. It stops with an error when a guest
workload fails (a STEP FAIL line, a missing result, a wrong file count or size), the guest does not finish,
or a helper dies.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.common import filesystem_of  # noqa: E402
from bench.policy_gen import path_policy  # noqa: E402
from tests.guest import harness  # noqa: E402

REFERENCE_HELPER = "/usr/lib/qemu/virtfs-proxy-helper"
MIB = 1024 * 1024
RATIO_TARGET = 0.9
POLICY_RULES = 1000
MARK = ".bench-mark-"

# name -> (unit, what one unit is); every figure is a rate, so a ratio > 1 always means "gateway faster".
WORKLOADS: dict[str, tuple[str, str]] = {
    "cloop": ("it/s", "create+stat+unlink iterations per second (gtool cloop)"),
    "walk": ("files/s", "files listed per second by ls -lR over the tree"),
    "dd_write": ("MiB/s", "dd if=/dev/zero bs=1M to the mount"),
    "dd_read": ("MiB/s", "dd bs=1M of the file back, guest page cache dropped"),
}


class BenchError(RuntimeError):
    """The bench cannot produce meaningful figures (a guest workload failed, a helper died, ...)."""


@dataclass(frozen=True)
class Sizes:
    iterations: int  # cloop
    files: int  # walk: regular files in the tree
    dirs: int  # walk: directories they are spread over
    dd_mib: int  # dd_write / dd_read
    repeats: int  # repetitions of every workload inside one boot (the fastest one counts)


FULL = Sizes(iterations=500, files=5000, dirs=50, dd_mib=64, repeats=3)
QUICK = Sizes(iterations=100, files=500, dirs=10, dd_mib=8, repeats=2)


# ---------------------------------------------------------------------------------------------------------
# The export and the guest script


def make_export(root: Path, sizes: Sizes) -> None:
    """The tree for the walk (under /tree, as the generated policy's workload trees expect) and /work."""
    root.mkdir(mode=0o755)
    os.chmod(root, 0o755)
    tree = root / "tree"
    tree.mkdir()
    per_dir = -(-sizes.files // sizes.dirs)
    for i in range(sizes.files):
        d = tree / f"d{i // per_dir:03d}"
        if i % per_dir == 0:
            d.mkdir()
        (d / f"f{i:05d}").write_bytes(b"x" * (i % 200))
    (root / "work").mkdir()
    (root / "work" / "loop").mkdir()


def check_export_clean(root: Path) -> None:
    """After a boot: the guest removed what it made, so the next boot starts from the same state."""
    left = sorted(str(p.relative_to(root)) for p in (root / "work").rglob("*") if p.name != "loop")
    if left:
        raise BenchError(f"the guest left files in the export: {left[:10]}")


def guest_script(sizes: Sizes) -> str:
    """busybox sh sourced by the guest's /init with the share on $M (see tests/guest/init.sh).

    The workloads run in turn, sizes.repeats times over (cloop, walk, dd_write, dd_read, cloop, ...), so a
    burst of load from a neighbour hits one repetition of a workload rather than all of them.
    """
    dd_bytes = sizes.dd_mib * MIB
    reps = " ".join(str(i) for i in range(1, sizes.repeats + 1))
    return f"""
# bench_guest.py's workloads. mark NAME: one LSTAT of a missing name, a boundary in the gateway's trail.
mark() {{ ls "$M/{MARK}$1" >/dev/null 2>&1; return 0; }}
drop() {{ sync; echo 3 >/proc/sys/vm/drop_caches; }}
step info eval 'grep " 9p " /proc/mounts; cat /sys/devices/system/clocksource/clocksource0/current_clock*'
for r in {reps}; do
    drop
    mark cloop-$r
    step cloop.$r gtool cloop "$M/work/loop" {sizes.iterations}
    drop
    mark walk-$r
    step walk.$r gtool timeit sh -c 'ls -lR "$M/tree" >/tmp/walk.txt'
    mark walk_done-$r
    step walk_count.$r eval 'grep -c "^-" /tmp/walk.txt'
    drop
    mark dd_write-$r
    step dd_write.$r gtool timeit dd if=/dev/zero of="$M/work/dd.bin" bs=1M count={sizes.dd_mib}
    mark dd_write_done-$r
    step dd_size.$r has_stat "$M/work/dd.bin" type=reg size={dd_bytes}
    drop
    mark dd_read-$r
    step dd_read.$r gtool timeit dd if="$M/work/dd.bin" of=/dev/null bs=1M
    mark cleanup-$r
    step cleanup.$r rm -f "$M/work/dd.bin"
done
"""


def expected_steps(sizes: Sizes) -> list[str]:
    """Every step the script reports (mount/umount come from init.sh)."""
    per_rep = ("cloop", "walk", "walk_count", "dd_write", "dd_size", "dd_read", "cleanup")
    reps = range(1, sizes.repeats + 1)
    return ["mount", "info", *(f"{name}.{r}" for r in reps for name in per_rep), "umount"]


_ELAPSED_RE = re.compile(r"\belapsed_ns=(\d+)\b")
_DD_RECORDS_RE = re.compile(r"^(\d+)\+(\d+) records (in|out)$")


# ---------------------------------------------------------------------------------------------------------
# One boot


@dataclass
class Boot:
    helper: str  # "reference" or "gateway"
    round: int
    rates: dict[str, float]  # workload -> rate in its unit: the fastest of the boot's repetitions
    rep_rates: dict[str, list[float]]  # workload -> rate of every repetition, in order
    rep_seconds: dict[str, list[float]]  # workload -> guest-timed seconds of every repetition
    elapsed: float  # host seconds from starting QEMU to its end (boot + workloads + power-off)
    mount: str  # the guest's /proc/mounts line of the share
    clocksource: str
    trail: Path | None = None
    trail_counts: dict[str, dict[str, int]] = field(default_factory=dict)  # segment -> op -> count
    decisions: dict[str, int] = field(default_factory=dict)
    trail_us: dict[str, float] = field(default_factory=dict)  # op -> sum of the records' "us"
    helper_requests: int | None = None  # the gateway's own "Done ... requests=N" at the end


def _elapsed(step: harness.Step) -> float:
    for line in reversed(step.output):
        m = _ELAPSED_RE.search(line)
        if m:
            return int(m[1]) / 1e9
    raise BenchError(f"guest step {step.name} printed no elapsed_ns: {step.output}")


def _check_dd(step: harness.Step, mib: int) -> None:
    """busybox dd's own record counts must show every 1 MiB block copied (no short read or write)."""
    counts = {m[3]: (int(m[1]), int(m[2])) for line in step.output if (m := _DD_RECORDS_RE.match(line))}
    want = {"in": (mib, 0), "out": (mib, 0)}
    if counts != want:
        raise BenchError(f"guest {step.name}: dd reported {counts}, want {mib}+0 in and out: {step.output}")


def run_boot(
    name: str,
    helper_cmd: list[str],
    round_no: int,
    export: Path,
    sizes: Sizes,
    script: str,
    timeout: float,
    trail: Path | None,
) -> Boot:
    result = harness.run_guest(helper_cmd, "s", export, script=script, timeout=timeout)
    what = f"{name} (round {round_no + 1})"
    if result.timed_out:
        raise BenchError(f"{what}: the guest did not finish within {timeout:.0f} s\n{result.describe(30)}")
    if result.helper_returncode not in (0, None):
        raise BenchError(
            f"{what}: the helper exited with status {result.helper_returncode}\n{result.describe(30)}"
        )
    if "Traceback" in result.helper_log:
        raise BenchError(f"{what}: the helper logged a traceback\n{result.describe(10)}")
    try:
        result.assert_ok(expected_steps(sizes))
    except AssertionError as exc:
        raise BenchError(f"{what}: a guest workload failed:\n{exc}") from None
    steps = result.steps
    units = {
        "cloop": sizes.iterations,
        "walk": sizes.files,
        "dd_write": sizes.dd_mib,
        "dd_read": sizes.dd_mib,
    }
    rep_seconds: dict[str, list[float]] = {w: [] for w in WORKLOADS}
    for r in range(1, sizes.repeats + 1):
        for w in WORKLOADS:
            rep_seconds[w].append(_elapsed(steps[f"{w}.{r}"]))
        cloop = steps[f"cloop.{r}"].output
        if not cloop or f"iterations={sizes.iterations} " not in cloop[-1]:
            raise BenchError(f"{what}: cloop.{r} did not report {sizes.iterations} iterations: {cloop}")
        listed = steps[f"walk_count.{r}"].output
        if listed != [str(sizes.files)]:
            raise BenchError(f"{what}: ls -lR (walk.{r}) listed {listed} regular files, want {sizes.files}")
        _check_dd(steps[f"dd_write.{r}"], sizes.dd_mib)
        _check_dd(steps[f"dd_read.{r}"], sizes.dd_mib)
    check_export_clean(export)
    rep_rates = {w: [units[w] / t for t in rep_seconds[w]] for w in WORKLOADS}
    info = steps["info"].output
    boot = Boot(
        helper=name,
        round=round_no,
        rates={w: max(rates) for w, rates in rep_rates.items()},
        rep_rates=rep_rates,
        rep_seconds=rep_seconds,
        elapsed=result.elapsed,
        mount=info[0] if info else "?",
        clocksource=info[1] if len(info) > 1 else "?",
        trail=trail,
    )
    if trail is not None:
        boot.trail_counts, boot.decisions, boot.trail_us = read_trail(trail)
        m = re.search(r"\bDone\b.*?\brequests=(\d+)", result.helper_log)  # its last line, key=value
        boot.helper_requests = int(m[1]) if m else None
    return boot


# ---------------------------------------------------------------------------------------------------------
# The gateway's trail

SEGMENTS = ("boot", "cloop", "walk", "dd_write", "dd_read", "other")
# A marker's name -> the segment the records after it belong to (the *_done markers close a workload, so
# its checks, e.g. the has_stat after dd, do not count as the workload's requests).
_MARK_SEGMENT = {
    "cloop": "cloop",
    "walk": "walk",
    "walk_done": "other",
    "dd_write": "dd_write",
    "dd_write_done": "other",
    "dd_read": "dd_read",
    "cleanup": "other",
}


def read_trail(path: Path) -> tuple[dict[str, dict[str, int]], dict[str, int], dict[str, float]]:
    """Request records per segment and op (markers in a segment of their own), per decision, and the sum
    of the records' "us" (the gateway's own time for the request) per op."""
    counts: dict[str, collections.Counter[str]] = {s: collections.Counter() for s in (*SEGMENTS, "markers")}
    decisions: collections.Counter[str] = collections.Counter()
    us: dict[str, float] = collections.defaultdict(float)
    segment = "boot"
    if not path.exists():
        raise BenchError(f"the gateway wrote no audit trail at {path}")
    with path.open(encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise BenchError(f"{path}:{n}: not a JSON line ({exc})") from None
            if record.get("event") != "request":
                continue
            op = str(record.get("op", "?"))
            decisions[str(record.get("decision", "?"))] += 1
            us[op] += float(record.get("us") or 0.0)
            where = str(record.get("path", ""))
            if MARK in where:
                counts["markers"][op] += 1
                segment = _MARK_SEGMENT.get(where.rsplit(MARK, 1)[1].rsplit("-", 1)[0], "other")
                continue
            counts[segment][op] += 1
    return {s: dict(c) for s, c in counts.items()}, dict(decisions), dict(us)


def trail_summary(boots: list[Boot], sizes: Sizes) -> dict[str, Any]:
    """Per op and segment: the median count over the gateway's boots, plus totals over all of them."""
    gw = [b for b in boots if b.helper == "gateway"]
    segments = (*SEGMENTS, "markers")
    ops = sorted({op for b in gw for seg in b.trail_counts.values() for op in seg})
    per_op: dict[str, dict[str, Any]] = {}
    for op in ops:
        row: dict[str, Any] = {}
        for seg in segments:
            row[seg] = statistics.median(b.trail_counts.get(seg, {}).get(op, 0) for b in gw)
        per_boot = [sum(b.trail_counts.get(seg, {}).get(op, 0) for seg in segments) for b in gw]
        row["per_boot"] = per_boot
        row["all_boots"] = sum(per_boot)
        row["mean_us"] = sum(b.trail_us.get(op, 0.0) for b in gw) / max(1, row["all_boots"])
        per_op[op] = row
    decisions: collections.Counter[str] = collections.Counter()
    for b in gw:
        decisions.update(b.decisions)
    runs = {"cloop": sizes.iterations * sizes.repeats, "walk": sizes.files * sizes.repeats}
    per_unit = {w: {op: row[w] / n for op, row in per_op.items() if row[w]} for w, n in runs.items()}
    return {
        "boots": len(gw),
        "ops": per_op,
        "per_unit": per_unit,
        "records_per_boot": [sum(sum(seg.values()) for seg in b.trail_counts.values()) for b in gw],
        "helper_requests_per_boot": [b.helper_requests for b in gw],
        "decisions": dict(decisions),
    }


# ---------------------------------------------------------------------------------------------------------
# Reporting


def verdict(ok: bool) -> str:
    return "[bold green]PASS[/]" if ok else "[bold red]MISS[/]"


def render(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 150)
    cfg = results["config"]
    s = cfg["sizes"]
    console.print(
        f"[bold]bench_guest[/]: {cfg['rounds']} rounds (boots in order {' '.join(cfg['order'])}), "
        f"{cfg['started']}\n"
        f"sizes: cloop {s['iterations']} iterations, walk {s['files']:,} files in {s['dirs']} directories, "
        f"dd {s['dd_mib']} MiB; each {s['repeats']}x per boot, interleaved, the fastest counts; "
        f"export {cfg['export']}\n"
        f"guest: kernel {cfg['guest_kernel']}, {cfg['qemu']}, TCG, 1 vCPU, 512 MiB, clocksource "
        f"{cfg['guest_clocksource']}; mount: {cfg['guest_mount']}\n"
        f"host: kernel {cfg['host_kernel']}, {cfg['cpus']} CPUs, load average at the end "
        f"{' '.join(f'{x:.2f}' for x in cfg['loadavg_at_end'])}; python {cfg['python']}\n"
        f"reference: {cfg['reference']} ({cfg['reference_package']}) {' '.join(cfg['helper_args'])}\n"
        f"gateway {cfg['gateway_version']}: python -m gateway serve {' '.join(cfg['gateway_args'])} "
        f"{' '.join(cfg['helper_args'])}\n"
        f"  policy: {cfg['policy_rules']} rules (bench/policy_gen.py path_policy), trail on, default "
        f"sandbox; {cfg['audit_trail_bytes'] / MIB:.1f} MiB of trail written over the run"
    )
    table = Table(title="Real guest (QEMU 7.2 TCG, 9p proxy): reference virtfs-proxy-helper vs gateway")
    for col, just in (
        ("workload", "left"),
        ("unit", "left"),
        ("ref", "right"),
        ("gw", "right"),
        ("gw/ref", "right"),
        ("ratio range", "right"),
        ("target", "right"),
        ("", "center"),
        ("ref rounds", "right"),
        ("gw rounds", "right"),
    ):
        table.add_column(col, justify=just, no_wrap=True)  # type: ignore[arg-type]
    for name, data in results["workloads"].items():
        ratios = data["ratio_rounds"]
        table.add_row(
            name,
            data["unit"],
            f"{data['reference']['median']:,.1f}",
            f"{data['gateway']['median']:,.1f}",
            f"{data['ratio']:.2f}x",
            f"{min(ratios):.2f}-{max(ratios):.2f}",
            f">= {RATIO_TARGET:.2f}x",
            verdict(data["pass"]),
            " ".join(f"{x:,.1f}" for x in data["reference"]["rounds"]),
            " ".join(f"{x:,.1f}" for x in data["gateway"]["rounds"]),
        )
    table.caption = (
        "timed in the guest (CLOCK_MONOTONIC); a boot's figure: its fastest repetition; ref/gw: median over "
        "rounds (rounds: each boot's figure); gw/ref: median of the per-round paired ratios (>1: the gateway "
        "is faster), range: min-max of them"
    )
    console.print(table)

    trail = results["trail"]
    tt = Table(title=f"Gateway trail: request records per op (median per boot over {trail['boots']} boots)")
    segments = (*SEGMENTS, "markers")
    for col in ("op", *segments, "per boot", "all boots", "per cloop it.", "per walk file", "mean us"):
        tt.add_column(col, justify="left" if col == "op" else "right", no_wrap=True)
    per_unit = trail["per_unit"]
    totals = collections.Counter[str]()
    for op, row in sorted(trail["ops"].items(), key=lambda kv: -kv[1]["all_boots"]):
        cells = []
        for seg in segments:
            totals[seg] += row[seg]
            cells.append(f"{row[seg]:,.0f}" if row[seg] else "")
        per_boot = row["per_boot"]
        pb = f"{per_boot[0]:,}" if len(set(per_boot)) == 1 else f"{min(per_boot):,}-{max(per_boot):,}"
        tt.add_row(
            op,
            *cells,
            pb,
            f"{row['all_boots']:,}",
            f"{per_unit['cloop'].get(op, 0):.2f}",
            f"{per_unit['walk'].get(op, 0):.2f}",
            f"{row['mean_us']:.1f}",
        )
    rpb = trail["records_per_boot"]
    tt.add_row(
        "[bold]all[/]",
        *(f"{totals[seg]:,.0f}" for seg in segments),
        f"{min(rpb):,}-{max(rpb):,}" if len(set(rpb)) > 1 else f"{rpb[0]:,}",
        f"{sum(rpb):,}",
        f"{sum(per_unit['cloop'].values()):.2f}",
        f"{sum(per_unit['walk'].values()):.2f}",
        "",
    )
    tt.caption = (
        f"counts per boot ({cfg['sizes']['repeats']} repetitions of each workload), split by the guest's "
        "marker lookups (/.bench-mark-*); boot: QEMU's start, the mount and the info step; other: checks "
        "between workloads, cleanup and umount; per cloop iteration / walk file: the workload's count over "
        "its iterations or files; mean us: the records' us field (the gateway's own time per request). "
        "decisions: "
        + ", ".join(f"{k} {v:,}" for k, v in sorted(trail["decisions"].items()))
        + "; the gateway's own request counts per boot: "
        + " ".join(str(x) for x in trail["helper_requests_per_boot"])
    )
    console.print(tt)
    targets = results["targets"]
    met = sum(1 for t in targets.values() if t["pass"])
    console.print(f"targets met: {met}/{len(targets)}")


# ---------------------------------------------------------------------------------------------------------
# Config


def _run(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def gateway_version() -> str:
    from gateway import __version__ as version

    head = _run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = _run(["git", "-C", str(REPO), "status", "--porcelain", "--", "gateway"])
    return f"{version} ({head}{'+dirty' if dirty and dirty != '?' else ''})"


def qemu_version() -> str:
    return _run([harness.QEMU, "--version"]).splitlines()[0]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run; both helpers still)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds, one boot per helper each (default 3)")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    ap.add_argument("--iterations", type=int, help="cloop iterations (default 500, --quick 100)")
    ap.add_argument("--files", type=int, help="files in the walk's tree (default 5000, --quick 500)")
    ap.add_argument("--dd-mib", type=int, help="MiB dd writes and reads (default 64, --quick 8)")
    ap.add_argument(
        "--repeats",
        type=int,
        help="repetitions of each workload in a boot, the fastest counts (default 3, --quick 2)",
    )
    ap.add_argument("--timeout", type=float, help="seconds a boot may take (default 900, --quick 300)")
    ap.add_argument("--reference", default=REFERENCE_HELPER, help="the reference helper's path")
    ap.add_argument(
        "--export-dir",
        type=Path,
        help="where the temp directory with the export is made (default: the system temp dir)",
    )
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    base = QUICK if args.quick else FULL
    files = args.files or base.files
    args.sizes = Sizes(
        iterations=args.iterations or base.iterations,
        files=files,
        dirs=max(1, min(base.dirs, files // 50)),  # 100 files a directory by default, 50 with --quick
        dd_mib=args.dd_mib or base.dd_mib,
        repeats=args.repeats or base.repeats,
    )
    if min(args.sizes.iterations, args.sizes.files, args.sizes.dd_mib, args.sizes.repeats) < 1:
        ap.error("sizes must be positive")
    args.timeout = args.timeout or (300.0 if args.quick else 900.0)
    return args


# ---------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes: Sizes = args.sizes
    started = datetime.datetime.now().isoformat(timespec="seconds")
    reference_cmd = [args.reference]
    try:
        harness.check_prerequisites(reference_cmd)
    except harness.GuestSetupError as exc:
        print(f"bench_guest: {exc}", file=sys.stderr)
        return 2
    # Build gtool and the base initramfs now, so the first boot does not pay for gcc.
    harness.build_base_initramfs()

    tmp = Path(tempfile.mkdtemp(prefix="bench-guest-", dir=args.export_dir))
    boots: list[Boot] = []
    order: list[str] = []
    try:
        export = tmp / "export"
        audit_dir = tmp / "audit"
        audit_dir.mkdir()
        policy = tmp / f"policy-{POLICY_RULES}.yaml"
        policy.write_text(path_policy(POLICY_RULES))
        make_export(export, sizes)
        script = guest_script(sizes)
        t_start = time.monotonic()
        for r in range(args.rounds):
            helpers = ("reference", "gateway") if r % 2 == 0 else ("gateway", "reference")
            for name in helpers:
                trail: Path | None = None
                if name == "reference":
                    cmd = reference_cmd
                else:
                    trail = audit_dir / f"gateway-round{r + 1}.jsonl"
                    cmd = [
                        sys.executable,
                        "-m",
                        "gateway",
                        "serve",
                        "--policy",
                        str(policy),
                        "--audit-log",
                        str(trail),
                    ]
                t0 = time.monotonic()
                boot = run_boot(name, cmd, r, export, sizes, script, args.timeout, trail)
                boots.append(boot)
                order.append("ref" if name == "reference" else "gw")
                figures = ", ".join(f"{w} {boot.rates[w]:,.1f} {WORKLOADS[w][0]}" for w in WORKLOADS)
                print(
                    f"round {r + 1}/{args.rounds} {name}: {figures} (boot {time.monotonic() - t0:.0f} s, "
                    f"{time.monotonic() - t_start:.0f} s so far)",
                    file=sys.stderr,
                )
        audit_bytes = sum(p.stat().st_size for p in audit_dir.glob("*.jsonl"))
        trail = trail_summary(boots, sizes)
        export_fs = filesystem_of(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    workloads: dict[str, dict[str, Any]] = {}
    targets: dict[str, dict[str, Any]] = {}
    for w, (unit, what) in WORKLOADS.items():
        ref = [b for b in boots if b.helper == "reference"]
        gw = [b for b in boots if b.helper == "gateway"]
        ratios = [g.rates[w] / rb.rates[w] for rb, g in zip(ref, gw, strict=True)]  # same round: paired
        ratio = statistics.median(ratios)
        workloads[w] = {
            "unit": unit,
            "what": what,
            "reference": {
                "median": statistics.median(b.rates[w] for b in ref),
                "rounds": [round(b.rates[w], 3) for b in ref],
                "best_seconds": [round(min(b.rep_seconds[w]), 6) for b in ref],
            },
            "gateway": {
                "median": statistics.median(b.rates[w] for b in gw),
                "rounds": [round(b.rates[w], 3) for b in gw],
                "best_seconds": [round(min(b.rep_seconds[w]), 6) for b in gw],
            },
            "ratio": ratio,
            "ratio_rounds": [round(x, 4) for x in ratios],
            "target": RATIO_TARGET,
            "pass": ratio >= RATIO_TARGET,
        }
        targets[f"{w} gw/ref ratio"] = {"value": ratio, "min": RATIO_TARGET, "pass": ratio >= RATIO_TARGET}
    first = boots[0]
    results: dict[str, Any] = {
        "config": {
            "rounds": args.rounds,
            "quick": args.quick,
            "order": order,
            "sizes": {
                "iterations": sizes.iterations,
                "files": sizes.files,
                "dirs": sizes.dirs,
                "dd_mib": sizes.dd_mib,
                "repeats": sizes.repeats,
            },
            "guest_kernel": (harness.CACHE / "kernel-version").read_text().strip(),
            "guest_mount": first.mount,
            "guest_clocksource": first.clocksource,
            "qemu": qemu_version(),
            "reference": args.reference,
            "reference_package": _run(["dpkg-query", "-W", "-f=${Package} ${Version}", "qemu-system-common"]),
            "helper_args": ["-p", "EXPORT", "-s", "SOCK", "-u", "0", "-g", "0", "-n"],
            "gateway_version": gateway_version(),
            "gateway_args": [
                "--policy",
                f"<tmp>/policy-{POLICY_RULES}.yaml",
                "--audit-log",
                "<tmp>/audit/gateway-roundN.jsonl",
            ],
            "policy_rules": POLICY_RULES,
            "audit_trail_bytes": audit_bytes,
            "export": f"{tmp}/export on {export_fs}",
            "host_kernel": platform.release(),
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "loadavg_at_end": os.getloadavg(),
            "started": started,
        },
        "workloads": workloads,
        "trail": trail,
        "boots": [
            {
                "helper": b.helper,
                "round": b.round + 1,
                "rates": b.rates,
                "repetitions": {w: [round(x, 3) for x in b.rep_rates[w]] for w in WORKLOADS},
                "repetition_seconds": {w: [round(x, 6) for x in b.rep_seconds[w]] for w in WORKLOADS},
                "qemu_seconds": round(b.elapsed, 2),
                "trail_counts": b.trail_counts,
            }
            for b in boots
        ],
        "targets": targets,
    }
    render(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        print(f"results written to {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except (BenchError, RuntimeError) as exc:
        print(f"bench_guest: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
