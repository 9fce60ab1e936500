"""The ``fastvae`` command line: train / sample / encode / score, --help, and one-line errors."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import types

import numpy as np
import pytest
import torch

import fastvae
from fastvae import data
from fastvae.cli import build_parser, main

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


def test_resume_says_where_it_continues_and_accepts_the_runs_own_settings(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["train", *TINY, "--seed", "3", "--out", str(out), "--no-plots"]) == 0
    assert "training mlp VAE (latent 4" in capsys.readouterr().out
    # Options equal to the run's own (seed 3, its data, limit, model, out) are accepted ...
    same = ["--seed", "3", "--data", "mnist", "--limit", "256", "--hidden", "32", "--latent", "4"]
    argv = ["train", "--resume", str(out), "--epochs", "2", *same, "--out", str(out), "--no-progress"]
    assert main([*argv, "--no-plots"]) == 0
    stdout = capsys.readouterr().out
    assert f"resuming {out} from its checkpoint of epoch 1: training epochs 2 to 2" in stdout
    assert "held-out negative ELBO after epoch 2" in stdout
    # ... conflicting ones are refused, each named with both values.
    assert main(["train", "--resume", str(out), "--seed", "4", "--lr", "0.1", "--hidden", "32"]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "--seed 4 (the run's: 3)" in line and "--lr 0.1 (the run's: 0.001)" in line, line
    assert "--hidden" not in line and "a resumed run keeps its own settings" in line
    assert main(["train", "--resume", str(out), "--out", str(tmp_path / "elsewhere")]) == 1
    assert "--out" in one_error_line(capsys.readouterr().err)
    assert main(["train", "--resume", str(out), "--no-progress"]) == 0  # already at its target: says so
    assert "already has 2 of 2 epochs: nothing to train" in capsys.readouterr().out


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


def test_outputs_default_to_the_run_directory(run_dir, small_npy, capsys):
    """sample/encode/score write next to the checkpoint by default and print where; encode saves labels."""
    assert main(["sample", "--checkpoint", str(run_dir / "checkpoint.pt"), "--n", "4", "--seed", "7"]) == 0
    assert f"to {run_dir / 'samples-seed7.png'}" in capsys.readouterr().out
    assert (run_dir / "samples-seed7.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    test_x, test_y = data.load_mnist("test")
    for split, rows in (("test", 1000), ("train", 9000)):
        assert main(["encode", "--checkpoint", str(run_dir), "--split", split]) == 0
        codes, labels = run_dir / f"latents-mnist-{split}.npy", run_dir / f"latents-mnist-{split}.labels.npy"
        stdout = capsys.readouterr().out
        assert f"to {codes}, labels to {labels}" in stdout and f"{rows:,} MNIST images" in stdout
        assert np.load(codes).shape == (rows, 4) and np.load(labels).shape == (rows,)
    assert np.array_equal(np.load(run_dir / "latents-mnist-test.labels.npy"), test_y.numpy())
    with torch.no_grad():  # the codes are the posterior means of the last 1,000 images, in order
        from fastvae.checkpoint import load_model

        mu = load_model(run_dir).encode(test_x[:3])[0]
    assert np.allclose(np.load(run_dir / "latents-mnist-test.npy")[:3], mu.numpy(), atol=1e-5)

    # A file: the run's val_fraction (0.1) splits it; no labels, so no labels file.
    assert main(["score", "--checkpoint", str(run_dir), "--data", str(small_npy), "--split", "test"]) == 0
    stdout = capsys.readouterr().out
    scores = run_dir / "scores-digits-test.npy"
    assert f"to {scores} (the data have no labels)" in stdout and "the last 5 samples" in stdout
    assert np.load(scores).shape == (5,) and not (run_dir / "scores-digits-test.labels.npy").exists()


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


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_on_a_terminal_only(monkeypatch, capsys):
    """On a terminal: a per-step bar with steps, loss and samples/s; in logs (not a tty): no bar."""
    from fastvae.progress import postfix, progress_bar

    assert progress_bar(71, "epoch 1/10", True) is None  # capsys's stderr is not a terminal
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    bar = progress_bar(71, "epoch 1/10", True)
    assert bar is not None
    bar.update(8)
    bar.set_postfix_str(postfix([0.0, 1000.0, 100.0], 8, 2500.0))  # [objective, recon, kl] summed
    bar.close()
    text = terminal.getvalue()
    assert "epoch 1/10" in text and "8/71" in text and "step" in text
    assert "loss=137.50 recon=125.00 kl=12.50 samples/s=2,500" in text


def test_logs_get_one_line_per_epoch(tmp_path, capsys):
    assert main(["train", *TINY[:-1], "--epochs", "2", "--no-plots", "--out", str(tmp_path / "r")]) == 0
    lines = capsys.readouterr().err.splitlines()
    assert [line.split("  ")[0] for line in lines] == ["epoch 1/2", "epoch 2/2"], lines
    assert all(" train " in line and " val " in line and "samples/s" in line for line in lines)


@pytest.mark.parametrize("command", [[], ["train"], ["sample"], ["encode"], ["score"]])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([*command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: fastvae" in out and "(default: None)" not in out
    if command and command != ["train"]:
        (line,) = [x for x in out.splitlines() if x.strip().startswith("--checkpoint")]
        assert "default" not in line  # required: no default to show
        assert "auto = cuda if available, else cpu (default: auto)" in " ".join(out.split())


@pytest.mark.parametrize("command", ["sample", "encode", "score"])
def test_device_defaults_to_auto(command):
    args = build_parser().parse_args([command, "--checkpoint", "run"])
    assert args.device == "auto" and args.out is None


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"fastvae {fastvae.__version__} (") and f"torch {torch.__version__}" in out


def test_a_folder_named_fastvae_in_the_current_directory_is_explained(tmp_path, monkeypatch, capsys):
    """A namespace or regular package from the current directory shadows the install: one clear line."""
    shadow = tmp_path / "fastvae"
    shadow.mkdir()
    fake = types.ModuleType("fastvae")
    fake.__path__ = [str(shadow)]  # what Python makes of a folder without __init__.py
    monkeypatch.setitem(sys.modules, "fastvae", fake)
    assert main(["--version"]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert f"the folder {shadow.resolve()} hides the installed fastvae package" in line
    assert "run from another directory" in line


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
    cases.append((["train", "--data", str(bad_range), "--no-progress"], 1, "must lie in [0, 1]"))
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
    a_file = tmp_path / "afile"
    a_file.write_text("not a directory")
    cases.append(
        (["sample", "--checkpoint", str(run_dir), "--out", str(a_file / "x.png")], 1, f"{a_file} is a file")
    )
    cases.append((["train", "--out", str(a_file / "run"), "--no-progress"], 1, f"{a_file} is a file"))
    cases.append((["train", "--out", str(a_file), "--no-progress"], 1, "is a file, not a directory"))
    cases.append((["sample", "--checkpoint", str(run_dir), "--out", str(tmp_path)], 1, "is a directory"))
    cases.append((["train", "--seed", str(2**64)], 2, "--seed: expected an integer in [0, 2**63 - 1]"))
    cases.append((["score", "--checkpoint", "x", "--seed", "-1"], 2, "--seed: expected an integer in"))
    cases.append(
        (["encode", "--checkpoint", str(run_dir), "--split", "val"], 2, "--split: invalid choice: 'val'")
    )
    cases.append((["train", "--epochs", "many"], 2, "--epochs: expected an integer"))
    cases.append((["train", "--lr", "-1"], 2, "--lr: expected a positive finite number, got '-1'"))
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
        assert pattern in line, (pattern, line)


def test_library_failures_are_one_line(run_dir, tmp_path, capsys):
    """A run directory in use, an oversized model config on --resume, random bytes as a checkpoint."""
    from fastvae.checkpoint import lock_run_dir

    busy = tmp_path / "busy"
    with lock_run_dir(busy):  # another training holds it
        assert main(["train", *TINY, "--no-plots", "--out", str(busy)]) == 1
    assert "is in use" in one_error_line(capsys.readouterr().err)

    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    state["config"]["model"]["hidden"] = [400_000_000]  # 1.2 TB of weights if it were built
    big = tmp_path / "big"
    big.mkdir()
    torch.save(state, big / "checkpoint.pt")
    assert main(["train", "--resume", str(big), "--no-progress"]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert f"checkpoint file {big / 'checkpoint.pt'} has an unusable model config" in line, line

    noise = tmp_path / "noise.pt"
    noise.write_bytes(np.random.default_rng(0).bytes(4096))
    assert main(["sample", "--checkpoint", str(noise), "--out", str(tmp_path / "s.png")]) == 1
    assert "is not a fastvae checkpoint" in one_error_line(capsys.readouterr().err)


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


def _editable_install() -> bool:
    """setuptools' editable finder is on sys.meta_path (it maps fastvae.* to the checkout)."""
    return any(getattr(f, "__module__", "").startswith("__editable__") for f in sys.meta_path)


def test_python_dash_m_beside_a_fastvae_folder(tmp_path):
    """``python -m fastvae`` from a directory holding a ``fastvae`` folder: one line saying so, exit 1."""
    if not _editable_install():
        pytest.skip("only an editable install reaches fastvae's own code past a shadowing folder")
    (tmp_path / "fastvae").mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "fastvae", "--version"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    line = one_error_line(proc.stderr)
    assert f"the folder {(tmp_path / 'fastvae').resolve()} hides the installed fastvae package" in line


def test_ctrl_c_prints_the_resume_command(tmp_path, capsys):
    """SIGINT after the first checkpoint: exit 130 and the command that continues the run (which works)."""
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "fastvae", "train", *TINY, "--epochs", "100000", "--no-plots"]
    proc = subprocess.Popen(
        [*argv, "--out", str(out)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoint.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert (out / "checkpoint.pt").exists(), "no checkpoint written within 120 s"
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    line = one_error_line(stderr)
    assert line.startswith("fastvae train: interrupted in epoch ")
    assert line.endswith(f"continue from the last checkpoint with: fastvae train --resume {out}")
    assert "training mlp VAE" in stdout
    done = torch.load(out / "checkpoint.pt", weights_only=True)["epoch"]
    assert main(["train", "--resume", str(out), "--epochs", str(done + 1), "--no-progress"]) == 0
    assert f"from its checkpoint of epoch {done}" in capsys.readouterr().out


def test_train_options_come_from_the_config_fields(capsys):
    """Every TrainConfig/RunConfig field is a `fastvae train` option with the field's help text."""
    import dataclasses

    from fastvae.config import RunConfig, TrainConfig, option_flag, split_options

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = "".join(capsys.readouterr().out.split())  # argparse wraps lines (and at hyphens)
    for config in (RunConfig, TrainConfig):
        for f in dataclasses.fields(config):
            assert option_flag(f.name) in text and "".join(f.metadata["help"].split()) in text, f.name
    assert vars(build_parser().parse_args(["train"])) == {"command": "train"}  # only the options given
    argv = ["train", "--lr", "3e-3", "--no-progress", "--amp", "--cuda-graphs", "--hidden", "8", "4"]
    train, run = split_options(vars(build_parser().parse_args(argv)))
    assert TrainConfig(**train) == TrainConfig(lr=3e-3, progress=False, amp="bf16", cuda_graphs=True)
    assert RunConfig(**run) == RunConfig(hidden=(8, 4))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only refusal")
def test_cuda_graphs_without_cuda_is_one_line(tmp_path, capsys):
    assert main(["train", *TINY, "--cuda-graphs", "--out", str(tmp_path / "r")]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(
        "fastvae train: error: cuda_graphs=True needs a CUDA device; this machine has no CUDA"
    )
    assert not (tmp_path / "r").exists()
