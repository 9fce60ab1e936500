"""Checkpoints: atomic writes, clear errors for damaged files, exact resume after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from fastvae import checkpoint as ckpt
from fastvae import models
from fastvae.checkpoint import CheckpointError, load_checkpoint, load_model, save_checkpoint
from fastvae.trainer import TIMING_KEYS


def make_state(model=None) -> dict:
    model = model or models.MLPVAE(hidden=(16,), latent=3)
    return {
        "format": ckpt.FORMAT,
        "version": ckpt.VERSION,
        "model": model.state_dict(),
        "optimizer": {},
        "rng": {"torch": torch.get_rng_state(), "cuda": None, "noise": torch.Generator().get_state()},
        "epoch": 3,
        "step": 42,
        "history": [{"epoch": 1, "val_loss": 1.5, "val_kl": None}],
        "config": {"model": model.config(), "trainer": {"lr": 1e-3, "grad_clip": None}, "meta": {}},
    }


def test_round_trip_weights_only(tmp_path):
    state = make_state()
    path = save_checkpoint(tmp_path / "sub" / "checkpoint.pt", state)
    assert path.exists() and [p.name for p in path.parent.iterdir()] == ["checkpoint.pt"]  # no temp files
    plain = torch.load(path, weights_only=True)
    assert plain["epoch"] == 3 and plain["history"] == state["history"]
    loaded = load_checkpoint(tmp_path / "sub")  # a run directory works too
    assert all(torch.equal(loaded["model"][k], v) for k, v in state["model"].items())


def test_load_model_rebuilds_the_architecture(tmp_path):
    torch.manual_seed(3)
    model = models.ConvVAE(latent=2, hidden=(4, 8, 16))
    save_checkpoint(tmp_path / "checkpoint.pt", make_state(model))
    rebuilt = load_model(tmp_path)
    assert isinstance(rebuilt, models.ConvVAE) and not rebuilt.training
    assert all(
        torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), rebuilt.state_dict().values(), strict=True)
    )


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, make_state())
    before = path.read_bytes()

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, make_state())
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "zeroed-header"])
def test_damaged_checkpoint_names_the_file(tmp_path, damage):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, make_state())
    raw = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "garbage":
        path.write_bytes(os.urandom(len(raw)))
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        path.write_bytes(b"\0" * 64 + raw[64:])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError)
    with pytest.raises(CheckpointError, match=str(path)):
        load_model(tmp_path)


def test_missing_and_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"checkpoint file not found: .*nope\.pt"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(FileNotFoundError, match="no checkpoint in directory"):
        load_checkpoint(tmp_path)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a fastvae checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    torch.save({"format": ckpt.FORMAT, "obj": Path("x")}, tmp_path / "pickled.pt")  # needs a pickled class
    with pytest.raises(CheckpointError, match=r"truncated or corrupt.*weights_only=True"):
        load_checkpoint(tmp_path / "pickled.pt")


TRAIN_SCRIPT = textwrap.dedent(
    """
    import sys
    import time
    import torch
    from fastvae import data, models
    from fastvae.trainer import Trainer

    out, epochs, slow = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "slow"
    if slow:  # stretch each epoch (after its training steps) so that the kill lands mid-run
        evaluate = Trainer._evaluate
        Trainer._evaluate = lambda self, x: (time.sleep(0.4), evaluate(self, x))[1]
    x, y = data.load_mnist("train")
    vx, vy = data.load_mnist("test")
    torch.manual_seed(0)
    model = models.MLPVAE(hidden=(32,), latent=4)
    trainer = Trainer(model, batch_size=64, device="cpu", seed=5, progress=False)
    trainer.fit((x[:256], y[:256]), epochs, val=(vx[:128], vy[:128]), out=out, plots=False)
    """
)


def _metrics(directory: Path) -> list[dict]:
    lines = (directory / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS} for line in lines]


def test_sigkill_and_resume_matches_an_uninterrupted_run(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(TRAIN_SCRIPT)
    epochs = 6
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    full, killed = tmp_path / "full", tmp_path / "killed"
    run = lambda out, mode: subprocess.Popen(
        [sys.executable, str(script), str(out), str(epochs), mode], env=env
    )  # noqa: E731
    uninterrupted, victim = run(full, "fast"), run(killed, "slow")
    try:
        deadline = time.monotonic() + 120
        while not (killed / "checkpoint.pt").exists():
            assert victim.poll() is None, "the run ended before writing a checkpoint"
            assert time.monotonic() < deadline, "no checkpoint after 120 s"
            time.sleep(0.005)
        time.sleep(0.6)  # inside epoch 2 or 3: after some optimizer steps, before the next checkpoint
        assert victim.poll() is None, "the run finished before it could be killed"
        victim.send_signal(signal.SIGKILL)
        victim.wait()
    finally:
        if victim.poll() is None:
            victim.kill()
    assert victim.returncode == -signal.SIGKILL
    done = load_checkpoint(killed)["epoch"]
    assert 1 <= done < epochs
    assert uninterrupted.wait(timeout=300) == 0
    resumed = run(killed, "fast")
    assert resumed.wait(timeout=300) == 0
    assert len(_metrics(full)) == epochs
    assert _metrics(killed) == _metrics(full)
    a, b = load_checkpoint(full), load_checkpoint(killed)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["step"] == b["step"] and a["epoch"] == b["epoch"] == epochs
