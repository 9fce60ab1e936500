"""bench.elbo_parity: its two ends are pytorch/examples' loop and fastvae's Trainer (one epoch each)."""

from __future__ import annotations

import pytest
import torch

from bench import elbo_parity, examples_loop
from fastvae import data, models
from fastvae.trainer import Trainer


def test_loop_variant_is_the_examples_loop_bit_for_bit():
    ours = elbo_parity.run(3, 1, **elbo_parity.VARIANTS["loop"])
    theirs = examples_loop.run_examples(1, seed=3, verbose=False)[-1]
    assert ours["loop_test"] == theirs["val_loss"]
    assert ours["train"] == theirs["train_loss"]


def test_trainer_variant_is_the_trainer():
    ours = elbo_parity.run(3, 1, **elbo_parity.VARIANTS["trainer"])
    torch.manual_seed(3)
    trainer = Trainer(models.MLPVAE(), lr=1e-3, batch_size=128, device="cpu", seed=3, progress=False)
    record = trainer.fit(data.load_mnist("train"), 1, val=data.load_mnist("test"))[-1]
    # The same weights, batches and noise; only the float32 summation order of the metrics differs.
    assert ours["trainer_eval"] == pytest.approx(record["val_loss"], rel=1e-6)
    assert ours["train"] == pytest.approx(record["train_loss"], rel=1e-6)


def test_unknown_variant_is_refused(capsys):
    with pytest.raises(SystemExit):
        elbo_parity.main(["--variants", "loop,nope", "--epochs", "1"])
    assert "unknown ['nope']" in capsys.readouterr().err
