"""Two processes with gloo on the CPU (torchrun) match a single process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch.distributed as dist

from fastvae.cli import main

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

ARGS = ["train", "--limit", "500", "--epochs", "2", "--batch-size", "64", "--hidden", "48", "--latent", "6"]
ARGS += ["--lr", "3e-3", "--device", "cpu", "--no-progress", "--no-plots"]


def read_metrics(directory):
    return [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]


def test_two_gloo_processes_match_one(tmp_path):
    ddp_out, single_out = tmp_path / "ddp", tmp_path / "single"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
        + ["-m", "fastvae", *ARGS, "--out", str(ddp_out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("held-out negative ELBO") == 1  # rank 0 alone reports (and writes)
    assert main([*ARGS, "--out", str(single_out)]) == 0

    ddp, single = read_metrics(ddp_out), read_metrics(single_out)
    assert [r["step"] for r in ddp] == [r["step"] for r in single] == [8, 16]  # 500 / 64 -> 8 steps
    for a, b in zip(ddp, single, strict=True):
        for key in ("train_loss", "train_recon", "train_kl", "val_loss", "val_recon", "val_kl"):
            assert a[key] == pytest.approx(b[key], rel=2e-5, abs=1e-4), key
    assert {p.name for p in ddp_out.iterdir() if not p.name.startswith(".")} == {
        "checkpoint.pt",
        "metrics.jsonl",
    }
