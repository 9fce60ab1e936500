"""kernels.launch.Launcher: the direct launch hands the C launcher exactly what JITFunction.run would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parent.parent


def test_direct_launch_matches_jit_run_on_a_stub_driver():
    """Compiled for sm_90 against a stub driver (no GPU): the same compiled kernel (function handle),
    grid, stream and arguments as JITFunction.run, one cached kernel per Triton specialization
    (alignment, int 1 / multiple of 16 / int64)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    script = Path(__file__).with_name("launch_check.py")
    out = subprocess.run([sys.executable, script], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["direct_equals_jit"] and all(report["direct_equals_jit_each"]), report
    assert report["launcher_kernels"] == report["triton_kernels"] == 5, report
