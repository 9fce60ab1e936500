"""Trainer: the loss falls, runs are bit-identical, NaNs stop training cleanly, options behave."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fastvae import data, models
from fastvae.checkpoint import load_checkpoint
from fastvae.trainer import (
    BETA_MAX,
    METRICS_NAME,
    TIMING_KEYS,
    Trainer,
    TrainingDivergedError,
    _reparameterize_rows,
    score_samples,
)

N_TRAIN, N_VAL = 512, 256


@pytest.fixture(scope="module")
def mnist_small():
    x, y = data.load_mnist("train")
    vx, vy = data.load_mnist("test")
    return (x[:N_TRAIN], y[:N_TRAIN]), (vx[:N_VAL], vy[:N_VAL])


def small_model(seed: int = 0) -> models.MLPVAE:
    torch.manual_seed(seed)
    return models.MLPVAE(hidden=(64,), latent=8)


def strip_timing(history):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in history]


def test_loss_falls(mnist_small):
    train, val = mnist_small
    trainer = Trainer(small_model(), lr=3e-3, batch_size=64, device="cpu", progress=False)
    history = trainer.fit(train, 4, val=val)
    assert [r["epoch"] for r in history] == [1, 2, 3, 4]
    assert history[-1]["step"] == 4 * (N_TRAIN // 64)
    assert history[-1]["train_loss"] < history[0]["train_loss"] - 50
    assert history[-1]["val_loss"] < history[0]["val_loss"] - 50
    for r in history:
        assert r["train_loss"] == pytest.approx(r["train_recon"] + r["train_kl"])
        assert r["val_loss"] == pytest.approx(r["val_recon"] + r["val_kl"])
        assert r["samples_per_s"] > 0 and r["beta"] == 1.0
    ev = trainer.evaluate(val)
    assert ev["loss"] == history[-1]["val_loss"]  # deterministic evaluation


def test_two_runs_bit_identical(mnist_small):
    train, val = mnist_small
    runs = []
    for _ in range(2):
        trainer = Trainer(small_model(), batch_size=100, device="cpu", seed=7, progress=False)
        runs.append((strip_timing(trainer.fit(train, 2, val=val)), trainer.model.state_dict()))
    (h1, s1), (h2, s2) = runs
    assert h1 == h2
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    other = Trainer(small_model(), batch_size=100, device="cpu", seed=8, progress=False)
    assert strip_timing(other.fit(train, 1, val=val))[0] != h1[0]  # the seed matters


def test_fit_epochs_is_a_total_and_continues_exactly(mnist_small):
    train, val = mnist_small
    straight = Trainer(small_model(), device="cpu", progress=False)
    h_straight = strip_timing(straight.fit(train, 3, val=val))
    split = Trainer(small_model(), device="cpu", progress=False)
    split.fit(train, 2, val=val)
    assert len(split.fit(train, 2, val=val)) == 2  # already done: nothing to train
    assert strip_timing(split.fit(train, 3, val=val)) == h_straight


def test_evaluate_is_sampled_and_deterministic(mnist_small):
    _, val = mnist_small
    trainer = Trainer(small_model(), device="cpu", progress=False)
    a, b = trainer.evaluate(val), trainer.evaluate(val[0])
    assert a == b
    assert a["loss"] == pytest.approx(a["recon"] + a["kl"])
    # z is sampled: decoding the mean instead gives a different (lower-variance) number
    model = trainer.model
    with torch.no_grad():
        mu, logvar = model.encode(val[0])
        from fastvae import ops

        mean_loss = ops.vae_loss(model.decode(mu), val[0], mu, logvar).item() / val[0].shape[0]
    assert mean_loss != pytest.approx(a["loss"], rel=1e-6)
    scores = score_samples(model, val[0])
    assert scores.shape == (N_VAL,) and torch.isfinite(scores).all()
    assert scores.double().mean().item() == pytest.approx(a["loss"], rel=1e-4)
    assert torch.equal(scores, score_samples(model, val[0]))


def test_float_data_trains_and_out_of_range_is_refused(mnist_small):
    (x, _), _ = mnist_small
    xf = x.float() / 255
    trainer = Trainer(small_model(), device="cpu", progress=False)
    assert math.isfinite(trainer.fit(xf, 1)[0]["train_loss"])
    bad = Trainer(small_model(), device="cpu", progress=False)
    with pytest.raises(ValueError, match=r"train images must lie in \[0, 1\]"):
        bad.fit(x.float(), 1)
    with pytest.raises(ValueError, match="non-finite"):
        bad.fit(torch.full((8, 1, 28, 28), float("nan")), 1)


class PoisonedVAE(models.MLPVAE):
    """An MLP VAE whose weights turn to NaN at the ``poison_at``-th training forward pass."""

    def __init__(self, poison_at: int) -> None:
        super().__init__(hidden=(32,), latent=4)
        self.poison_at, self.calls = poison_at, 0

    def encode(self, x):
        if self.training:
            self.calls += 1
            if self.calls == self.poison_at:
                with torch.no_grad():
                    self.fc_mu.weight[0, 0] = float("nan")
        return super().encode(x)


@pytest.mark.parametrize("eager", [True, False], ids=["checked-each-step", "checked-per-epoch"])
def test_nan_stops_training_and_keeps_last_good_checkpoint(mnist_small, tmp_path, eager):
    train, val = mnist_small
    torch.manual_seed(0)
    trainer = Trainer(PoisonedVAE(poison_at=7), batch_size=128, device="cpu", progress=False)
    trainer._eager_checks = eager  # False: the deferred check used on CUDA and under DDP
    with pytest.raises(TrainingDivergedError, match=r"epoch 2, step 7") as info:
        trainer.fit(train, 4, val=val, out=tmp_path, plots=False)
    err = info.value
    assert isinstance(err, FloatingPointError) and (err.epoch, err.step) == (2, 7)
    assert str(tmp_path / "checkpoint.pt") in str(err) and "kept" in str(err)
    state = load_checkpoint(tmp_path)
    assert state["epoch"] == 1 and state["step"] == 4
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    lines = (tmp_path / METRICS_NAME).read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1]


def test_nan_without_out_names_the_step(mnist_small):
    train, _ = mnist_small
    torch.manual_seed(0)
    trainer = Trainer(PoisonedVAE(poison_at=2), batch_size=128, device="cpu", progress=False)
    with pytest.raises(TrainingDivergedError, match=r"epoch 1, step 2.*no checkpoint was written"):
        trainer.fit(train, 1)


def test_kl_warmup_free_bits_and_clipping(mnist_small):
    train, val = mnist_small
    trainer = Trainer(
        small_model(),
        batch_size=128,
        beta=2.0,
        kl_warmup=8,
        free_bits=0.25,
        grad_clip=5.0,
        device="cpu",
        progress=False,
    )
    assert trainer.beta_at(0) == 0.0 and trainer.beta_at(4) == 1.0 and trainer.beta_at(100) == 2.0
    history = trainer.fit(train, 3, val=val)
    assert [r["beta"] for r in history] == [1.0, 2.0, 2.0]
    assert all(math.isfinite(r["train_loss"]) for r in history)
    # free bits: with q = prior the KL is 0 and the objective holds B * latent * free_bits nats of floor
    logits = torch.zeros(4, 1, 28, 28, requires_grad=True)
    mu = torch.zeros(4, 8, requires_grad=True)
    logvar = torch.zeros(4, 8, requires_grad=True)
    x = torch.zeros(4, 1, 28, 28, dtype=torch.uint8)
    objective, recon, kl = trainer._loss(logits, x, mu, logvar, beta=1.0)
    assert kl.item() == 0.0
    assert objective.item() == pytest.approx(recon.item() + 4 * 8 * 0.25)
    objective.backward()
    assert torch.all(mu.grad == 0) and torch.all(logvar.grad == 0)  # below the floor: no KL gradient


def test_shard_noise_matches_the_global_batch():
    mu, logvar = torch.randn(10, 3), torch.randn(10, 3)
    full = _reparameterize_rows(mu, logvar, 123, 0, 10)
    part = _reparameterize_rows(mu[4:7], logvar[4:7], 123, 4, 10)
    assert torch.equal(part, full[4:7])


def test_checkpoint_holds_everything_and_loads_weights_only(mnist_small, tmp_path):
    train, val = mnist_small
    trainer = Trainer(small_model(), device="cpu", progress=False)
    trainer.metadata = {"note": "test"}
    history = trainer.fit(train, 2, val=val, out=tmp_path, plots=False)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert set(state) >= {"model", "optimizer", "rng", "epoch", "step", "history", "config"}
    assert state["epoch"] == 2 and state["step"] == history[-1]["step"]
    assert state["config"]["model"] == trainer.model.config()
    assert state["config"]["trainer"]["lr"] == 1e-3 and state["config"]["meta"] == {"note": "test"}
    lines = [json.loads(line) for line in (tmp_path / METRICS_NAME).read_text().splitlines()]
    assert lines == history == state["history"]
    # a different learning rate may not continue this run
    other = Trainer(small_model(), lr=1e-2, device="cpu", progress=False)
    with pytest.raises(ValueError, match=r"lr=0.001 \(this run: 0.01\)"):
        other.fit(train, 3, out=tmp_path)


def test_plots_written_at_the_end(mnist_small, tmp_path):
    train, val = mnist_small
    trainer = Trainer(small_model(), device="cpu", progress=False)
    trainer.fit(train, 1, val=val, out=tmp_path)
    for name in ("reconstructions.png", "samples.png", "latent.png", "loss.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_bad_arguments_are_named():
    model = small_model()
    with pytest.raises(ValueError, match="lr must be a positive"):
        Trainer(model, lr=0)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        Trainer(model, batch_size=0)
    with pytest.raises(ValueError, match="free_bits"):
        Trainer(model, free_bits=-1)
    with pytest.raises(ValueError, match="device must be"):
        Trainer(model, device="tpu")
    with pytest.raises(ValueError, match="amp must be"):
        Trainer(model, amp="fp8")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            Trainer(model, device="cuda")
        with pytest.warns(RuntimeWarning, match="needs a CUDA device"):
            assert Trainer(model, amp="bf16", device="cpu").amp is None
    with pytest.raises(TypeError, match="train must be an image tensor"):
        Trainer(model, device="cpu").fit("mnist", 1)
    meta = torch.zeros(4, 1, 28, 28, dtype=torch.uint8, device="meta")
    with pytest.raises(
        ValueError, match=r"train images are a meta tensor \(shape \[4, 1, 28, 28\], no data\)"
    ):
        Trainer(model, device="cpu").fit(meta, 1)


def test_progress_bar_runs(mnist_small, capsys):
    train, val = mnist_small
    Trainer(small_model(), device="cpu", progress=True).fit(train, 1, val=val)
    err = capsys.readouterr().err
    assert "epoch 1/1" in err and "val" in err


@pytest.mark.parametrize("name", ["beta", "free_bits"])
def test_beta_and_free_bits_must_be_bounded_numbers(name):
    model = small_model()
    for bad in ("1", True, None, torch.tensor(1.0), float("nan"), -1.0):
        with pytest.raises(ValueError, match=rf"{name} must be a finite number >= 0, got "):
            Trainer(model, device="cpu", **{name: bad})
    for big in (1e308, BETA_MAX * 1.001):  # 1e308 made every loss inf
        with pytest.raises(ValueError, match=rf"{name} must be at most 1e\+06, got "):
            Trainer(model, device="cpu", **{name: big})
    assert getattr(Trainer(model, device="cpu", **{name: BETA_MAX}), name) == 1e6
    assert getattr(Trainer(model, device="cpu", **{name: 2}), name) == 2.0
