"""Trainer: the loss falls, runs are bit-identical, NaNs stop training cleanly, options behave."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fastvae import data, models
from fastvae.checkpoint import load_checkpoint
from fastvae.config import RunConfig, TrainConfig
from fastvae.trainer import (
    BETA_MAX,
    METRICS_NAME,
    TIMING_KEYS,
    Trainer,
    TrainingDivergedError,
    _reparameterize_rows,
    objective,
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
    assert scores.double().sum().item() / N_VAL == a["loss"]  # one evaluation loop: the same numbers
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
    loss, recon, kl = objective(logits, x, mu, logvar, beta=1.0, free_bits=0.25)
    assert kl.item() == 0.0
    assert loss.item() == pytest.approx(recon.item() + 4 * 8 * 0.25)
    loss.backward()
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
            assert Trainer(model, amp="bf16", device="cpu").config.amp is None
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
    assert getattr(Trainer(model, device="cpu", **{name: BETA_MAX}).config, name) == 1e6
    assert getattr(Trainer(model, device="cpu", **{name: 2}).config, name) == 2.0


def test_the_config_is_one_frozen_validated_dataclass(mnist_small):
    import dataclasses

    config = TrainConfig(lr=3e-3, batch_size=64, device="cpu", progress=False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.lr = 1.0  # type: ignore[misc]
    a, b = (
        Trainer(small_model(), config),
        Trainer(small_model(), lr=3e-3, batch_size=64, device="cpu", progress=False),
    )
    assert a.config == b.config == config  # keywords build the same config
    with pytest.raises(TypeError, match="not both"):
        Trainer(small_model(), config, lr=1e-2)
    with pytest.raises(TypeError, match="unexpected keyword argument 'learning_rate'"):
        Trainer(small_model(), learning_rate=1e-2)
    # hyperparameters() and the checkpoint's config come from the fields
    assert tuple(a.hyperparameters()) == TrainConfig.fixed()
    assert a.hyperparameters() == {
        k: v for k, v in dataclasses.asdict(config).items() if k in TrainConfig.fixed()
    }
    assert a.checkpoint_config()["trainer"] == {**dataclasses.asdict(config), "world_size": 1}
    # every field refuses a bad value naming itself and the expected value
    bad = {
        "lr": (0, "a positive finite number"),
        "batch_size": (1.5, "a positive integer"),
        "kl_warmup": (-1, "an integer >= 0"),
        "grad_clip": ("1", "a positive finite number"),
        "seed": (2**63, r"an integer in \[0, 2\*\*63 - 1\]"),
        "device": ("tpu", "'auto', 'cpu', 'cuda' or 'cuda:N'"),
        "compile": ("yes", "True or False"),
    }
    for name, (value, expected) in bad.items():
        with pytest.raises(
            ValueError, match=rf"^{name} must be {expected}, got {value!r}$".replace("(", r"\(")
        ):
            TrainConfig(**{name: value})
    assert TrainConfig(amp=True).amp == "bf16" and TrainConfig(device=torch.device("cpu")).device == "cpu"
    with pytest.raises(ValueError, match=r"hidden\[1\] must be a positive integer, got 0"):
        RunConfig(hidden=[4, 0])
    with pytest.raises(ValueError, match=r"val_fraction must be a fraction in \[0, 1\), got 1.0"):
        RunConfig(val_fraction=1.0)
    with pytest.raises(ValueError, match="epochs must be an integer >= 0, got -1"):
        a.fit(mnist_small[0], -1)


def test_the_library_never_seeds_torch(mnist_small):
    """Trainer construction, fit and evaluate leave torch's global generator as the caller set it."""
    train, val = mnist_small
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    trainer = Trainer(small_model(), batch_size=128, device="cpu", seed=9, progress=False)
    torch.set_rng_state(before)  # small_model() seeded and drew the weights: start from the same state
    trainer.fit(train, 1, val=val)
    trainer.evaluate(val)
    assert torch.equal(torch.get_rng_state(), before)


def test_a_checkpoint_with_the_old_trainer_keys_still_loads(mnist_small):
    train, _ = mnist_small
    trainer = Trainer(small_model(), batch_size=128, device="cpu", progress=False)
    trainer.fit(train, 1)
    state = trainer.state_dict()
    old = ("lr", "batch_size", "beta", "kl_warmup", "free_bits", "grad_clip", "seed", "amp", "world_size")
    state["config"]["trainer"] = {k: state["config"]["trainer"][k] for k in old}  # written before TrainConfig
    fresh = Trainer(small_model(), batch_size=128, device="cpu", progress=False)
    fresh.load_state_dict(state)
    assert fresh.step == trainer.step and fresh.history == trainer.history
    other = Trainer(small_model(), batch_size=64, device="cpu", progress=False)
    with pytest.raises(ValueError, match=r"batch_size=128 \(this run: 64\)"):
        other.load_state_dict(state)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only refusal")
def test_cuda_graphs_needs_a_cuda_device():
    with pytest.raises(ValueError, match=r"^cuda_graphs=True needs a CUDA device; this machine has no CUDA"):
        Trainer(small_model(), cuda_graphs=True)
    with pytest.raises(ValueError, match=r"^cuda_graphs=True needs a CUDA device; this machine has no CUDA"):
        Trainer(small_model(), TrainConfig(device="cpu", cuda_graphs=True))


def test_cuda_graphs_runs_full_batches_through_the_graphed_step(mnist_small, monkeypatch):
    """The Trainer's graph path on the CPU: fastvae.graphs.GraphedStep with capture=False (the same code
    the graph records) for the full batches, the eager step for the last partial one, one counter."""
    from fastvae import graphs
    from fastvae import trainer as trainer_module

    made = []

    class Eager(graphs.GraphedStep):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "capture": False})
            made.append(self)

    monkeypatch.setattr(graphs, "GraphedStep", Eager)
    monkeypatch.setattr(trainer_module, "_check_graphable", lambda *a: None)  # the CUDA checks
    train, val = mnist_small
    x = train[0][:300]  # 2 full batches of 128 and one of 44
    trainer = Trainer(
        small_model(), batch_size=128, kl_warmup=4, cuda_graphs=True, device="cpu", progress=False
    )
    history = trainer.fit(x, 2, val=val)
    (step,) = made  # captured once, for the full batch shape
    assert step.batch_shape == (128, 1, 28, 28) and int(step.steps) == trainer.step == 6
    assert history[-1]["train_loss"] < history[0]["train_loss"] and history[-1]["beta"] == 1.0
    assert all(math.isfinite(r["val_loss"]) for r in history)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphs_trains_and_resumes_on_cuda(mnist_small, tmp_path):
    train, val = mnist_small
    x = train[0][:300]  # 2 full batches (graph replays) and one of 44 (eager) per epoch

    def make() -> Trainer:
        return Trainer(
            small_model(), batch_size=128, kl_warmup=4, cuda_graphs=True, device="cuda", progress=False
        )

    first = make()
    history = first.fit(x, 2, val=val, out=tmp_path, plots=False)
    assert all(math.isfinite(r["train_loss"]) and math.isfinite(r["val_loss"]) for r in history)
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert first.step == 6 and int(first._graph.steps) == 6  # the eager partial steps advanced it too
    resumed = make()
    assert len(resumed.fit(x, 3, val=val, out=tmp_path, plots=False)) == 3
    assert resumed.step == 9 and int(resumed._graph.steps) == 9
