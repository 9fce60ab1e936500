"""Smoke test of the benchmark harness (``python -m bench --smoke``): runs, writes a valid record.

Tiny sizes, very few repeats, no torch.compile: it checks that the harness runs end to end in a
fresh process, that the JSON record has the documented schema (ops, training step, host time of
the CUDA code path through the stub Triton driver), that every implementation that ran passed its
correctness check, and that a run leaves the checkout as it found it.  It never asserts on timings.
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


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTVAE_BACKEND")}


def _bench(*args: str, timeout: int = 400) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "bench", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (
        f"python -m bench {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    return proc


def _run_smoke(device: str, out: Path) -> dict:
    _bench("--smoke", "--device", device, "--out", str(out))
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

    step = rec["step"]
    assert step["batch"] == 128
    for name in ("unchanged", "fastvae"):  # eager only: smoke mode does not compile
        r = step["results"][name]
        assert r["status"] == "ok", f"step {name}: {r.get('reason')}"
        assert math.isfinite(r["first_loss"]) and _positive(r["ms_per_step"])
    assert set(step["speedup"]) == {"eager"} and _positive(step["speedup"]["eager"]["median"])

    host = rec["host"]
    assert host["status"] == "ok", host.get("reason")
    assert host["threads"] == 1
    for name in ("vae_loss 1x1x1", "reparameterize 1x1", "vae_loss 128x784x20", "reparameterize 128x20"):
        r = host["results"][f"{name} fastvae"]
        assert _positive(r["time"]["median_s"]), name
        assert r["launches_per_call"] >= 1, f"{name}: no kernel launch went through the stub driver"
        # Each JITFunction.run launches once; fastvae may also launch compiled kernels without it.
        assert r["jit_run_calls_per_call"] <= r["launches_per_call"]
        assert r["jit_run_calls_per_call"] == 0 or _positive(r["jit_run_s_per_call"])
    for op in ("vae_loss", "reparameterize"):
        assert _positive(host["ratios"][op]["median"])


def _porcelain() -> set[str]:
    """``git status --porcelain`` lines of bench/ (untracked files one by one, ignored ones left out)."""
    proc = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all", "--", "bench"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    return set(proc.stdout.splitlines())


@pytest.mark.skipif(not (REPO / ".git").exists(), reason="not a git checkout")
def test_bench_default_output_leaves_the_checkout_clean() -> None:
    """``python -m bench`` without --out/--record writes its record under the ignored bench/out/ only
    (here a host-time-only smoke run: the part of the harness that does not need --out to be fast);
    bench/results/ and bench/README.md stay as they were."""
    before = _porcelain()
    out = REPO / "bench" / "out"
    existing = set(out.glob("*.json"))
    proc = _bench("--smoke", "--device", "cpu", "--no-ops", "--no-training", "--no-step", "--no-host")
    written = set(out.glob("*.json")) - existing
    try:
        assert len(written) == 1, f"expected one new record in bench/out, found {written}"
        assert f"record: {next(iter(written))}" in proc.stdout
        assert _porcelain() == before, "python -m bench changed bench/ outside its ignored out/ folder"
    finally:
        for path in written:
            path.unlink()


def test_bench_record_refuses_smoke_runs() -> None:
    """``--record`` (writes bench/results/ and bench/README.md) keeps quick and full records only."""
    cmd = [sys.executable, "-m", "bench", "--smoke", "--record"]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--record keeps quick and full records only" in proc.stderr
