"""Smoke test of bench/bench_guest.py: one quick round boots a guest per helper and reports every figure.

It judges only that the bench runs end to end and reports what it should (no timing is asserted): about
20 s here (two TCG boots).

    cd /work/wt-guest && .venv/bin/pytest tests/test_bench_guest.py -v
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

try:
    from guest import harness
except ImportError:  # pragma: no cover - depends on the layout of tests/
    from tests.guest import harness  # type: ignore[no-redef]

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_guest.py"


@pytest.mark.guest
@pytest.mark.root
@pytest.mark.reference
def test_bench_guest_quick_round(tmp_path: Path) -> None:
    try:
        harness.check_prerequisites(harness.REFERENCE_HELPER)
    except harness.GuestSetupError as e:
        pytest.fail(str(e), pytrace=False)
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--rounds", "1", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, f"bench_guest failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    results = json.loads(out.read_text())
    assert results["config"]["order"] == ["ref", "gw"]
    assert set(results["workloads"]) == {"cloop", "walk", "dd_write", "dd_read"}
    for name, data in results["workloads"].items():
        for helper in ("reference", "gateway"):
            assert len(data[helper]["rounds"]) == 1 and data[helper]["median"] > 0, (name, helper)
        assert isinstance(data["pass"], bool)
    trail = results["trail"]
    # Every iteration of the C loop creates and removes one file: the trail shows exactly that many.
    iterations = results["config"]["sizes"]["iterations"] * results["config"]["sizes"]["repeats"]
    assert trail["ops"]["create"]["cloop"] == iterations
    assert trail["ops"]["remove"]["cloop"] == iterations
    assert trail["ops"]["lstat"]["walk"] >= results["config"]["sizes"]["files"]
    assert set(trail["decisions"]) == {"allow"}, trail["decisions"]
    assert trail["records_per_boot"] == trail["helper_requests_per_boot"]
