"""The benchmark suite runs: `benchmarks/run.py --quick` on moto measures every figure.

Only that each figure got a number is checked; how fast is for people to read (see
benchmarks/README.md), never a test's assertion.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from mount_helper import fuse_available

RUN = Path(__file__).resolve().parent.parent / "benchmarks" / "run.py"


def test_help_names_every_option() -> None:
    result = subprocess.run([sys.executable, str(RUN), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for option in ("--server", "--json", "--quick", "--only"):
        assert option in result.stdout


@pytest.mark.skipif(os.geteuid() != 0 or not fuse_available(), reason="needs root and FUSE")
def test_quick_run_measures_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.Popen([sys.executable, str(RUN), "--quick", "--server", "moto", "--json", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # not kill: the run unmounts and stops its servers on SIGTERM
        stdout, stderr = proc.communicate(timeout=60)
        pytest.fail(f"benchmarks/run.py --quick took over 300 s:\n{stderr[-3000:]}")
    assert proc.returncode == 0, stderr[-3000:]
    figures = json.loads(out.read_text())["figures"]
    assert {f["figure"] for f in figures} >= {"1a", "1b", "2a", "2b", "2c", "2d", "2e", "3a", "3b", "3c", "3d",
                                             "4a", "4b", "5a", "5b", "6a", "6b", "6c", "6d", "7"}
    for f in figures:  # n/a only where the machine cannot do it (drop_caches in a container)
        assert f["value"] is not None or f["note"].startswith("n/a"), f
    assert "cold read" in stdout
