"""The ``fastvae`` command line: train / sample / encode / score, --help, and one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from fastvae import data
from fastvae.cli import main

TINY = ["--limit", "256", "--epochs", "1", "--hidden", "32", "--latent", "4", "--no-progress"]


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", *TINY, "--limit", "1024", "--lr", "3e-3", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def small_npy(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "digits.npy"
    np.save(path, data.load_mnist("test")[0][:50].numpy())
    return path


def test_train_writes_the_run_and_reports_the_held_out_elbo(run_dir, capsys):
    names = {p.name for p in run_dir.iterdir()}
    assert {"checkpoint.pt", "metrics.jsonl", "reconstructions.png", "samples.png", "latent.png"} <= names
    (record,) = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert state["config"]["model"] == {"model": "mlp", "in_shape": [1, 28, 28], "latent": 4, "hidden": [32]}
    assert state["config"]["meta"]["data"] == "mnist" and state["config"]["meta"]["limit"] == 1024
    assert record["epoch"] == 1 and record["step"] == 8 and record["val_loss"] > 0


def test_train_prints_the_result(tmp_path, capsys):
    out = tmp_path / "r"
    assert (
        main(
            ["train", *TINY, "--model", "conv", "--hidden", "4", "8", "16", "--latent", "2"]
            + ["--out", str(out), "--no-plots"]
        )
        == 0
    )
    stdout = capsys.readouterr().out
    assert "held-out negative ELBO after epoch 1:" in stdout and "the last 1000 MNIST images" in stdout
    assert f"files: {out}/" in stdout and "checkpoint.pt" in stdout
    assert torch.load(out / "checkpoint.pt", weights_only=True)["config"]["model"]["model"] == "conv"


def test_resume_continues_to_the_new_total(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["train", *TINY, "--out", str(out), "--no-plots"]) == 0
    assert main(["train", "--resume", str(out), "--epochs", "2", "--no-progress", "--no-plots"]) == 0
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]
    capsys.readouterr()
    assert main(["train", *TINY, "--out", str(out)]) == 1  # would overwrite a run
    assert "--resume" in one_error_line(capsys.readouterr().err)
    assert main(["train", "--resume", str(out), "--lr", "0.1"]) == 1
    assert "--lr cannot be given with --resume" in one_error_line(capsys.readouterr().err)


def test_user_data_file_holds_out_the_last_tenth(tmp_path, small_npy, capsys):
    out = tmp_path / "r"
    assert (
        main(
            ["train", "--data", str(small_npy), "--epochs", "1", "--hidden", "16", "--no-progress"]
            + ["--no-plots", "--out", str(out)]
        )
        == 0
    )
    assert "the last 5 samples of" in capsys.readouterr().out
    assert json.loads((out / "metrics.jsonl").read_text())["step"] == 1  # 45 training images, one batch


def test_default_output_directory_is_runs_timestamp(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", *TINY, "--epochs", "0"]) == 0
    (run,) = (tmp_path / "runs").iterdir()
    assert run.name[:8].isdigit() and "no epochs trained" in capsys.readouterr().out


def test_sample_encode_score(run_dir, small_npy, tmp_path, capsys):
    png = tmp_path / "s.png"
    assert main(["sample", "--checkpoint", str(run_dir), "--n", "9", "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    lat = tmp_path / "latents.npy"
    assert (
        main(
            ["encode", "--checkpoint", str(run_dir / "checkpoint.pt"), "--data", str(small_npy)]
            + ["--out", str(lat)]
        )
        == 0
    )
    means = np.load(lat)
    assert means.shape == (50, 4) and means.dtype == np.float32 and np.isfinite(means).all()

    scores_path = tmp_path / "scores.npy"
    args = ["score", "--checkpoint", str(run_dir), "--data", str(small_npy), "--out", str(scores_path)]
    assert main(args) == 0
    scores = np.load(scores_path)
    assert scores.shape == (50,) and np.isfinite(scores).all() and (scores > 0).all()
    assert main(args) == 0
    assert np.array_equal(np.load(scores_path), scores)  # fixed seed: deterministic
    # anomalies score higher: noise images are far less likely than digits
    noise = tmp_path / "noise.npy"
    np.save(noise, np.random.default_rng(0).integers(0, 256, (20, 1, 28, 28), dtype=np.uint8))
    assert main(["score", "--checkpoint", str(run_dir), "--data", str(noise), "--out", str(scores_path)]) == 0
    assert np.load(scores_path).mean() > scores.mean() + 50
    assert "per-sample negative ELBOs" in capsys.readouterr().out


@pytest.mark.parametrize("command", [[], ["train"], ["sample"], ["encode"], ["score"]])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([*command, "--help"])
    assert info.value.code == 0
    assert "usage: fastvae" in capsys.readouterr().out


def test_errors_are_one_line(run_dir, tmp_path, capsys):
    cases = []
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes((run_dir / "checkpoint.pt").read_bytes()[:1000])
    cases.append(
        (
            ["sample", "--checkpoint", str(corrupt), "--out", str(tmp_path / "a.png")],
            1,
            "truncated or corrupt",
        )
    )
    cases.append((["score", "--checkpoint", str(tmp_path / "missing")], 1, "not found"))
    cases.append((["train", "--data", str(tmp_path / "nope.npy"), "--no-progress"], 1, "does not exist"))
    bad_range = tmp_path / "bad.npy"
    np.save(bad_range, np.full((10, 1, 28, 28), 3.5, dtype=np.float32))
    cases.append((["train", "--data", str(bad_range), "--no-progress"], 1, r"must lie in \[0, 1\]"))
    cases.append(
        (
            [
                "encode",
                "--checkpoint",
                str(run_dir),
                "--data",
                str(bad_range),
                "--out",
                str(tmp_path / "x.npy"),
            ],
            1,
            "[0, 1]",
        )
    )
    cases.append(
        (["encode", "--checkpoint", str(run_dir), "--out", str(tmp_path / "x.txt")], 1, "must name a .npy")
    )
    cases.append((["train", "--epochs", "many"], 2, "--epochs: expected an integer"))
    cases.append((["train", "--lr", "-1"], 2, "--lr: expected a finite number > 0"))
    cases.append((["train", "--model", "rnn"], 2, "invalid choice"))
    cases.append((["fly"], 2, "invalid choice"))
    for argv, code, pattern in cases:
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse errors
            rc = e.code
        assert rc == code, argv
        line = one_error_line(capsys.readouterr().err)
        assert line.startswith("fastvae"), line
        assert pattern in line or __import__("re").search(pattern, line), (pattern, line)


def test_python_dash_m_and_console_script(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "fastvae", "score", "--checkpoint", str(tmp_path / "none")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "checkpoint file not found" in one_error_line(proc.stderr)
    script = shutil.which("fastvae")
    if script is None:
        pytest.skip("the fastvae console script is not on PATH")
    proc = subprocess.run([script, "--help"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0 and "train" in proc.stdout
