"""`gateway demo`, the newcomer's first command, runs green on built-in defaults."""

from __future__ import annotations

import subprocess
import sys

from helpers import require_root


def test_demo_runs_every_step_as_expected() -> None:
    require_root()
    out = subprocess.run(
        [sys.executable, "-m", "gateway", "demo"],
        capture_output=True,
        text=True,
        timeout=120,
        env={"COLUMNS": "160"},
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "16 of 16 steps went as expected" in out.stdout
    assert "denied by no-device-nodes" in out.stdout and "host secret untouched: True" in out.stdout
    assert "trail intact" in out.stdout
