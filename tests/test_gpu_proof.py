"""The one-call GPU proof script, in its dry-run mode: every step that needs no GPU, on small CPU tensors."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from bench import gpu_proof

IN_PROCESS = ["env", "copy_bandwidth", "eps_reference", "big_reparameterize", "big_vae_loss", "determinism"]
SUBPROCESS = ["tests", "bench"]


def test_steps_fit_the_eight_minute_budget():
    assert [s.name for s in gpu_proof.STEPS] == IN_PROCESS + SUBPROCESS
    assert sum(s.budget_s for s in gpu_proof.STEPS) <= gpu_proof.TOTAL_BUDGET_S == 480
    assert [s.name for s in gpu_proof.STEPS if s.needs_gpu_process] == SUBPROCESS


def test_dry_run_checks_against_the_reference_and_writes_one_record(tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path))
    assert gpu_proof.main(["--dry-run"]) == 0
    files = list(tmp_path.glob("*.json"))
    assert [f.name for f in files] == ["gpu_proof-dry-run.json"]
    record = json.loads(files[0].read_text())
    assert record["kind"] == "gpu-proof" and record["dry_run"] and record["ok"]
    steps = {s["name"]: s for s in record["steps"]}
    assert list(steps) == IN_PROCESS + SUBPROCESS
    for name in IN_PROCESS:
        assert steps[name]["status"] == "ok", steps[name]
    for name in SUBPROCESS:
        assert steps[name]["status"] == "listed (dry run)"
        assert steps[name]["result"]["ran"] is False
    assert steps["tests"]["result"]["command"][1:5] == ["-m", "pytest", "-q", "tests"]
    assert steps["bench"]["result"]["command"][1:6] == ["-m", "bench", "--device", "cuda", "--quick"]
    # The reference checks really ran, at small sizes.
    assert steps["eps_reference"]["result"]["64x32"]["rel_err"] < 1e-5
    assert steps["big_vae_loss"]["result"]["grad_rel_err"] < 1e-5
    assert steps["big_reparameterize"]["result"]["z_rel_err"] < 1e-5
    assert all(v["bit_identical"] for v in steps["determinism"]["result"].values())


def test_a_failed_check_is_recorded_and_the_next_step_still_runs(tmp_path, monkeypatch):
    def broken(ctx):
        gpu_proof.check(False, "planted failure")

    steps = tuple(dataclasses.replace(s, run=broken) if s.name == "env" else s for s in gpu_proof.STEPS)
    monkeypatch.setattr(gpu_proof, "STEPS", steps)
    assert gpu_proof.main(["--dry-run", "--out", str(tmp_path), "--only", "env,copy_bandwidth"]) == 1
    record = json.loads((tmp_path / "gpu_proof-dry-run.json").read_text())
    status = {s["name"]: s["status"] for s in record["steps"]}
    assert status["env"] == "fail" and status["copy_bandwidth"] == "ok" and status["tests"] == "not selected"
    assert "planted failure" in record["steps"][0]["error"] and record["ok"] is False


def test_unknown_step_is_refused_by_name(capsys):
    with pytest.raises(SystemExit):
        gpu_proof.parse_args(["--only", "env,warp_drive"])
    assert "--only" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_a_real_run_needs_a_gpu(tmp_path):
    assert gpu_proof.main(["--out", str(tmp_path)]) == 2
