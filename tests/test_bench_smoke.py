"""Smoke test of the benchmark harness (``python -m bench --smoke``): runs, writes a valid record.

Tiny sizes, very few repeats, no torch.compile: it checks that the harness runs end to end in a
fresh process, that the JSON record has the documented schema, and that every implementation that
ran passed its correctness check.  It never asserts on timings.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _run_smoke(device: str, out: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTVAE_BACKEND")}
    cmd = [sys.executable, "-m", "bench", "--smoke", "--device", device, "--out", str(out), "--no-readme"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, (
        f"python -m bench --smoke failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    files = list(out.glob("*.json"))
    assert len(files) == 1, f"expected one record in {out}, found {files}"
    assert re.fullmatch(r"[a-z0-9-]+-\d{8}-\d{6}\.json", files[0].name), files[0].name
    return json.loads(files[0].read_text())


def _positive(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


@pytest.mark.parametrize("device", DEVICES)
def test_bench_smoke_record(tmp_path: Path, device: str) -> None:
    rec = _run_smoke(device, tmp_path)

    assert rec["schema"].startswith("fastvae-bench/")
    assert rec["mode"] == "smoke"
    m = rec["machine"]
    assert m["device"]["type"] == device and m["device"]["name"] and m["device"]["kind"]
    assert m["cpu"]["model"] and m["cpu"]["cores"] >= 1
    for lib in ("python", "torch", "triton", "numba", "numpy", "cupy", "fastvae"):
        assert lib in m["versions"]
    assert {"commit", "dirty", "source_sha256"} <= set(m["git"])
    assert _positive(rec["copy"]["gbps"]) and _positive(rec["copy"]["time"]["median_s"])
    assert rec["memory_method"]
    assert "date" in rec and "duration_s" in rec and "load_average_start" in rec

    assert rec["ops"], "no op cases ran"
    ops_seen = set()
    for entry in rec["ops"]:
        case = entry["case"]
        assert {"id", "op", "mode", "batch", "features", "latent", "dtype", "target"} <= set(case)
        assert "skipped" not in entry, f"{case['id']} skipped: {entry.get('skipped')}"
        assert entry["min_bytes"] > 0 and entry["input_sets"] >= 1
        ops_seen.add(case["op"])
        results = entry["results"]
        for name in ("fastvae", "eager-seed", "eager-best"):
            assert results[name]["status"] == "ok", f"{name} on {case['id']}: {results[name]}"
        for name, r in results.items():
            assert r["status"] in ("ok", "skipped"), f"{name} on {case['id']}: {r.get('reason')}"
            if r["status"] == "skipped":
                assert r["reason"]
                continue
            check = r["check"]
            assert check["passed"] is True, f"{name} on {case['id']}: {check}"
            assert check["out_rel_err"] < check["tolerance"]
            assert check["grad_rel_err"] is None or check["grad_rel_err"] < check["tolerance"]
            t = r["time"]
            assert {"median_s", "q25_s", "q75_s", "min_s", "repeats"} <= set(t) and t["repeats"] >= 1
            assert _positive(t["median_s"]) and _positive(r["gbps"]) and _positive(r["pct_copy"])
            assert set(r["speedup"]) == {"eager-seed", "eager-best"}  # compile is off in smoke mode
            assert r["peak_bytes"] is None or r["peak_bytes"] >= 0
    assert ops_seen == {"vae_loss", "bce_with_logits", "kl_divergence", "reparameterize"}
