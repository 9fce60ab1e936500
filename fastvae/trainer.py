"""Training loop for fastvae models: fused loss, on-device batches, atomic checkpoints, exact resume.

The loss of a step is pytorch/examples' convention, the negative ELBO summed over the batch::

    logits, mu, logvar = model(x)      # x: the uint8 (or float [0, 1]) batch, z sampled
    loss = fastvae.vae_loss(logits, x, mu, logvar, beta=beta_t, reduction="sum")

and every metric is reported per sample (nats).  Speed comes from what the loop does *not* do:
the training set moves to the device once (``uint8`` pixels stay ``uint8``: the fused loss reads
them as ``t / 255``), batches are device-side gathers with a per-epoch permutation
(:func:`fastvae.data.iterate_batches`), no ``DataLoader``, and the per-step losses stay on the
device until the progress bar or the end of the epoch reads them (on CUDA there is no host sync
per step).

Reproducibility: the permutation of epoch ``e`` comes from a generator seeded with a mix of
``(seed, e)``, and each step's reparameterization seed is drawn from the trainer's own CPU
generator, so two runs with the same seed on the same machine give bit-identical metrics on the
CPU, and a run killed and resumed from its checkpoint ends exactly like an uninterrupted one.

Several processes (``torchrun``): see :mod:`fastvae.distributed`.  ``batch_size`` is the global
batch; each rank takes its contiguous shard.  Each rank's loss is the *sum* over its shard times
``world_size``: DDP averages gradients over ranks, so the gradient applied is exactly the gradient
of the global batch sum, as in a single process.  The reparameterization noise of a sample is the
same as in a single process too (each rank draws the noise of its rows of the global batch), so a
run on N processes matches a single-process run with the same global batch up to float rounding
(the order of the gradient sums differs).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import distributed, ops
from .checkpoint import (
    CHECKPOINT_NAME,
    FORMAT,
    VERSION,
    CheckpointError,
    RunLock,
    RunLockedError,
    atomic_write,
    check_model_state,
    check_optimizer_state,
    check_rng_state,
    load_checkpoint,
    lock_run_dir,
    save_checkpoint,
)

__all__ = [
    "Trainer",
    "TrainingDivergedError",
    "score_samples",
    "METRICS_NAME",
    "EVAL_SEED",
    "TIMING_KEYS",
    "BETA_MAX",
]

METRICS_NAME = "metrics.jsonl"
EVAL_SEED = 0x5EED_E7A1  # fixed seed of the evaluation noise: evaluate() is a deterministic function
EVAL_BATCH = 1024  # evaluation chunk; fixed so that evaluate() does not depend on the training batch
_SEED_MAX = 2**62
TIMING_KEYS = ("seconds", "samples_per_s")  # the metrics that differ between identical runs
# Largest beta (and free_bits floor) accepted: beta * KL must stay far from float32's 3.4e38 for any
# realistic KL (beta = 1e308 made every loss inf); beta-VAEs use beta up to a few hundred.
BETA_MAX = 1e6


class TrainingDivergedError(FloatingPointError):
    """The loss (or the parameters) became NaN or infinite; ``epoch`` and ``step`` say where.

    ``step`` is the global optimizer step (1-based) whose loss was not finite.  Training stops
    before anything is saved: the last checkpoint on disk is the last good state.
    """

    def __init__(self, message: str, *, epoch: int, step: int) -> None:
        super().__init__(message)
        self.epoch = epoch
        self.step = step


def _mix_seed(seed: int, salt: int) -> int:
    """A 63-bit seed from ``(seed, salt)`` (splitmix64 finaliser), so nearby seeds do not share streams."""
    x = (seed * 0x9E3779B97F4A7C15 + salt + 0x632BE59BD9B4E019) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (x ^ (x >> 31)) & 0x7FFFFFFFFFFFFFFF


def _split_data(data: Any, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(images, labels)`` from a tuple/list ``(images, labels)`` or a bare image tensor."""
    if isinstance(data, torch.Tensor):
        images, labels = data, None
    elif isinstance(data, tuple | list) and len(data) in (1, 2):
        images = data[0]
        labels = data[1] if len(data) == 2 else None
    else:
        raise TypeError(
            f"{name} must be an image tensor or an (images, labels) tuple, got {type(data).__name__}"
        )
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name} images must be a torch.Tensor, got {type(images).__name__}")
    if images.ndim < 2 or images.shape[0] == 0:
        raise ValueError(f"{name} images must be [N, ...] with N >= 1, got shape {tuple(images.shape)}")
    if images.device.type == "meta":
        raise ValueError(f"{name} images are a meta tensor (shape {list(images.shape)}, no data)")
    if images.dtype != torch.uint8 and not images.is_floating_point():
        raise TypeError(f"{name} images must be uint8 pixels or floats in [0, 1], got dtype {images.dtype}")
    if labels is not None and (not isinstance(labels, torch.Tensor) or labels.shape[0] != images.shape[0]):
        raise ValueError(f"{name} labels must be a tensor with one entry per image ({images.shape[0]})")
    return images, labels


def _prepare_images(images: torch.Tensor, device: torch.device, name: str) -> torch.Tensor:
    """Check float data once and move the whole set to ``device`` (uint8 stays uint8, floats become fp32)."""
    from . import data as _data

    if images.is_floating_point():
        _data.check_unit_range(images, name)
        images = images.to(device=device, dtype=torch.float32)
    else:
        images = images.to(device)
    return images.contiguous()


def _reparameterize_rows(
    mu: torch.Tensor, logvar: torch.Tensor, seed: int, row_start: int, total_rows: int
) -> torch.Tensor:
    """``fastvae.reparameterize`` of rows ``[row_start, row_start + B)`` of a ``total_rows`` batch.

    The fused op draws the noise of element ``i`` from ``(seed, offset + i)``: a shard of a global
    batch starts its counter at its first element, so each sample gets the noise it would get in a
    single process.  (``total_rows`` is the global batch; the shard needs only its start.)
    """
    return ops.reparameterize(mu, logvar, seed=seed, offset=row_start * mu[0].numel())


class _SampledForward(nn.Module):
    """``x -> (logits, mu, logvar)`` with ``z`` drawn from an explicit seed.

    Uses the model's ``encode`` and ``decode`` (the model's ``forward`` draws its seed from torch's
    default generator; here the trainer chooses it).  A model without ``encode``/``decode`` is
    called as ``model(x)`` with torch's default generator seeded from ``seed``.
    """

    def __init__(self, model: nn.Module, compile: bool = False) -> None:
        super().__init__()
        self.model = model
        self.explicit = callable(getattr(model, "encode", None)) and callable(getattr(model, "decode", None))
        if compile:
            if self.explicit:
                self._encode = torch.compile(model.encode)
                self._decode = torch.compile(model.decode)
            else:
                self._call = torch.compile(model)
        else:
            if self.explicit:
                self._encode, self._decode = model.encode, model.decode
            else:
                self._call = model

    def forward(
        self, x: torch.Tensor, seed: int, row_start: int = 0, total_rows: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.explicit:
            mu, logvar = self._encode(x)
            total = x.shape[0] if total_rows is None else total_rows
            z = _reparameterize_rows(mu, logvar, seed, row_start, total)
            return self._decode(z), mu, logvar
        devices = [x.device] if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            return self._call(x)


def score_samples(
    model: nn.Module,
    images: torch.Tensor,
    *,
    seed: int = EVAL_SEED,
    samples: int = 1,
    batch_size: int = EVAL_BATCH,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Per-sample negative ELBO in nats (``ops.vae_loss(reduction="none")``), ``float32 [N]`` on the CPU.

    ``z`` is sampled (``samples`` draws averaged), with noise from the fixed ``seed``: the scores
    are deterministic.  High scores mark inputs the model explains badly (anomaly detection).
    """
    if samples < 1:
        raise ValueError(f"samples must be a positive integer, got {samples}")
    images, _ = _split_data(images, "images")
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    fwd = _SampledForward(model)
    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.no_grad():
            for i, start in enumerate(range(0, images.shape[0], batch_size)):
                x = _prepare_images(images[start : start + batch_size], device, "images")
                acc = torch.zeros(x.shape[0], device=device)
                for s in range(samples):
                    logits, mu, logvar = fwd(x, _mix_seed(seed, i * samples + s))
                    acc += ops.vae_loss(
                        logits, x.reshape(logits.shape), mu, logvar, reduction="none", validate=False
                    )
                out.append((acc / samples).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)


class Trainer:
    """Train a VAE with the fused fastvae ops.

    Parameters
    ----------
    model:
        A VAE: ``model(x) -> (logits, mu, logvar)``; with ``encode(x) -> (mu, logvar)`` and
        ``decode(z) -> logits`` (as :mod:`fastvae.models` has) the trainer draws ``z`` itself with
        an explicit per-step seed.  ``model.config()`` (if present) is stored in checkpoints.
    lr:
        Adam learning rate.
    batch_size:
        The (global) batch size.
    beta:
        Weight of the KL term (beta-VAE); 1 is the ELBO.  A number in ``[0, BETA_MAX]`` (1e6; larger
        values overflow the float32 loss); bools and strings are refused.
    kl_warmup:
        Linear KL warm-up over this many optimizer steps: ``beta_t = beta * min(1, step / kl_warmup)``
        with ``step`` the number of steps already taken (0 disables warm-up).
    free_bits:
        KL floor in nats per latent dimension (Kingma et al. 2016, "Improved variational inference
        with inverse autoregressive flow"): when > 0 the objective is
        ``recon + beta_t * B * sum_d max(free_bits, mean_batch KL_d)``, the reconstruction coming from
        ``fastvae.vae_loss(..., beta=0)``.  The reported KL is the true (unclamped) KL.  Under DDP the
        batch mean is over each rank's shard.  At most ``BETA_MAX`` (1e6).
    grad_clip:
        Clip the global gradient norm to this value (``None``: no clipping).
    device:
        ``"auto"`` (CUDA if available, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    amp:
        ``None``/``False``: fp32; ``True``/``"bf16"``: bf16 autocast, CUDA only (on the CPU a warning
        is given and training runs in fp32).
    compile:
        ``torch.compile`` the model's encoder and decoder (the fused ops stay as they are).
    seed:
        Seeds torch (``torch.manual_seed(seed)`` at construction), the data permutations and the
        reparameterization noise.
    progress:
        Show a tqdm bar (loss, recon, KL per sample and samples/s) on stderr.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        lr: float = 1e-3,
        batch_size: int = 128,
        beta: float = 1.0,
        kl_warmup: int = 0,
        free_bits: float = 0.0,
        grad_clip: float | None = None,
        device: str | torch.device = "auto",
        amp: bool | str | None = None,
        compile: bool = False,
        seed: int = 0,
        progress: bool = True,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.lr = _positive_float(lr, "lr")
        self.batch_size = _positive_int(batch_size, "batch_size")
        self.beta = _nonneg_float(beta, "beta", BETA_MAX)
        self.kl_warmup = _nonneg_int(kl_warmup, "kl_warmup")
        self.free_bits = _nonneg_float(free_bits, "free_bits", BETA_MAX)
        self.grad_clip = None if grad_clip is None else _positive_float(grad_clip, "grad_clip")
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
            raise ValueError(f"seed must be an integer in [0, 2**63), got {seed!r}")
        self.seed = seed
        self.progress = bool(progress)
        self.compile = bool(compile)
        self.metadata: dict[str, Any] = {}  # stored in checkpoints under config["meta"] (e.g. by the CLI)

        device = _resolve_device(device)
        self.dist, self.device = distributed.setup(device)
        if self.dist.enabled and self.batch_size % self.dist.world_size:
            raise ValueError(
                f"batch_size={self.batch_size} is the global batch and must be divisible by the number of "
                f"processes (WORLD_SIZE={self.dist.world_size})"
            )
        self.amp = _resolve_amp(amp, self.device)

        torch.manual_seed(seed)
        self.model = model.to(self.device)
        self.model.train()
        self._forward = _SampledForward(self.model, compile=self.compile)
        self._train_forward: nn.Module = self._forward
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self._train_forward = DistributedDataParallel(self._forward, device_ids=ids)
        self.optimizer = _adam(self.model, self.lr)
        self._noise = torch.Generator(device="cpu")
        self._noise.manual_seed(_mix_seed(seed, 1))
        # On the CPU a finiteness check costs nothing (no device to wait for): check every step, before
        # the bad gradient is applied.  On CUDA (and under DDP, where all ranks must agree) the check
        # runs on the accumulated step losses when the bar refreshes and at the end of the epoch.
        self._eager_checks = self.device.type == "cpu" and not self.dist.enabled
        self.epoch = 0  # completed epochs
        self.step = 0  # completed optimizer steps
        self.history: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ configuration and state

    def hyperparameters(self) -> dict[str, Any]:
        """The hyperparameters that define the run (checked on resume)."""
        return {
            "lr": self.lr,
            "batch_size": self.batch_size,
            "beta": self.beta,
            "kl_warmup": self.kl_warmup,
            "free_bits": self.free_bits,
            "grad_clip": self.grad_clip,
            "seed": self.seed,
            "amp": self.amp,
        }

    def config(self) -> dict[str, Any]:
        """``{"model": model.config(), "trainer": hyperparameters, "meta": metadata}``."""
        model_config = self.model.config() if callable(getattr(self.model, "config", None)) else None
        return {
            "model": model_config,
            "trainer": {**self.hyperparameters(), "world_size": self.dist.world_size},
            "meta": dict(self.metadata),
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything a checkpoint holds (tensors and plain containers only: ``weights_only`` loads it)."""
        cuda = None
        if self.device.type == "cuda":
            cuda = torch.cuda.get_rng_state_all()
        return {
            "format": FORMAT,
            "version": VERSION,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "cuda": cuda, "noise": self._noise.get_state()},
            "epoch": self.epoch,
            "step": self.step,
            "history": [dict(h) for h in self.history],
            "config": self.config(),
        }

    def load_state_dict(self, state: dict[str, Any], *, source: str = "checkpoint") -> None:
        """Restore a :meth:`state_dict`; ``source`` (e.g. ``"checkpoint file PATH"``) begins each error.

        Everything is checked before anything changes, and a mismatch raises
        :class:`fastvae.checkpoint.CheckpointError` (a ``ValueError``) in one line: the model config
        and hyperparameters must match this trainer's, every weight must have its tensor's shape,
        every optimizer-state tensor its parameter's shape, dtype and device (a wrong shape would
        make the fused Adam write out of bounds), the RNG states must be valid generator states, and
        ``epoch``/``step``/``history`` must be consistent counts.
        """
        if not isinstance(state, dict):
            raise CheckpointError(f"{source}: expected a dict, got {type(state).__name__}")
        config = state.get("config", {})
        if not isinstance(config, dict):
            raise CheckpointError(f"{source}: 'config' is a {type(config).__name__}, expected a dict")
        saved_model = config.get("model")
        mine = self.config()["model"]
        if saved_model is not None and mine is not None and saved_model != mine:
            raise ValueError(f"{source} was written for model {saved_model}, but this model is {mine}")
        saved_hp = config.get("trainer", {})
        if not isinstance(saved_hp, dict):
            raise CheckpointError(
                f"{source}: config['trainer'] is a {type(saved_hp).__name__}, expected a dict"
            )
        diff = [
            f"{k}={saved_hp[k]!r} (this run: {v!r})"
            for k, v in self.hyperparameters().items()
            if k in saved_hp and saved_hp[k] != v
        ]
        if diff:
            raise ValueError(f"{source} was written with different settings: {', '.join(diff)}")
        counts = {k: state.get(k) for k in ("epoch", "step")}
        for key, value in counts.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise CheckpointError(f"{source}: '{key}' is {value!r}, expected an integer >= 0")
        history = state.get("history")
        if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
            raise CheckpointError(f"{source}: 'history' is not a list of dicts (one per epoch)")
        if len(history) != counts["epoch"]:
            raise CheckpointError(
                f"{source}: 'history' has {len(history)} records, expected one per completed epoch "
                f"({counts['epoch']})"
            )
        check_model_state(self.model, state.get("model"), source)
        names = {id(p): name for name, p in self.model.named_parameters()}
        check_optimizer_state(
            self.optimizer, state.get("optimizer"), source, param_names=names, max_step=counts["step"]
        )
        rng = state.get("rng") or {}
        check_rng_state(rng, source, cuda=self.device.type == "cuda")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if rng.get("torch") is not None:
            torch.set_rng_state(rng["torch"].cpu())
        if rng.get("cuda") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state_all([s.cpu() for s in rng["cuda"]])
        if rng.get("noise") is not None:
            self._noise.set_state(rng["noise"].cpu())
        self.epoch = counts["epoch"]
        self.step = counts["step"]
        self.history = [dict(h) for h in history]

    # ------------------------------------------------------------------ the loss

    def beta_at(self, step: int) -> float:
        """``beta_t`` after ``step`` completed optimizer steps (linear KL warm-up)."""
        if self.kl_warmup <= 0:
            return self.beta
        return self.beta * min(1.0, step / self.kl_warmup)

    def _loss(
        self, logits: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, beta: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(objective, recon, kl)``, all summed over the batch; recon and kl are detached."""
        target = x.reshape(logits.shape)
        if self.free_bits <= 0:
            loss, recon, kl = ops.vae_loss(
                logits, target, mu, logvar, beta=beta, return_terms=True, validate=False
            )
            return loss, recon, kl
        recon_loss, recon, kl = ops.vae_loss(
            logits, target, mu, logvar, beta=0.0, return_terms=True, validate=False
        )
        mu2, lv2 = mu.float().flatten(1), logvar.float().flatten(1)
        kl_d = 0.5 * (mu2.square() + lv2.exp() - 1.0 - lv2).mean(0)
        floored = kl_d.clamp(min=self.free_bits).sum() * mu2.shape[0]
        return recon_loss + beta * floored, recon, kl

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, data: Any) -> dict[str, float]:
        """Held-out ``{"loss", "recon", "kl"}`` in nats per sample; ``loss`` is the negative ELBO.

        ``z`` is sampled (one draw per sample, as in training and in pytorch/examples' test loop),
        with noise from the fixed :data:`EVAL_SEED`, in eval mode under ``torch.no_grad``: the
        result is a deterministic function of the weights and the data.
        """
        images, _ = _split_data(data, "data")
        return self._evaluate(_prepare_images(images, self.device, "data"))

    def _evaluate(self, images: torch.Tensor) -> dict[str, float]:
        """:meth:`evaluate` on images already on the device."""
        n = images.shape[0]
        was_training = self.model.training
        self.model.eval()
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        try:
            with torch.no_grad():
                for i, start in enumerate(range(0, n, EVAL_BATCH)):
                    x = images[start : start + EVAL_BATCH]
                    logits, mu, logvar = self._forward(x, _mix_seed(EVAL_SEED, i))
                    loss, recon, kl = ops.vae_loss(
                        logits,
                        x.reshape(logits.shape),
                        mu,
                        logvar,
                        beta=1.0,
                        return_terms=True,
                        validate=False,
                    )
                    sums += torch.stack([loss, recon, kl]).double()
        finally:
            self.model.train(was_training)
        loss, recon, kl = (v / n for v in sums.tolist())
        return {"loss": loss, "recon": recon, "kl": kl}

    # ------------------------------------------------------------------ training

    def fit(
        self,
        train: Any,
        epochs: int,
        *,
        val: Any = None,
        out: str | os.PathLike | None = None,
        plots: bool = True,
        resume: bool | None = None,
    ) -> list[dict[str, Any]]:
        """Train until ``epochs`` epochs are completed (a total, not a count to add); return the history.

        ``train`` and ``val`` are ``(images, labels)`` tuples or image tensors (``uint8`` pixels or
        floats in [0, 1]).  With ``out``, the directory receives ``checkpoint.pt`` (atomically, every
        epoch), ``metrics.jsonl`` (one JSON line per epoch) and, at the end, the pictures of
        :func:`fastvae.plots.save_all` (``plots=False`` skips them).  If ``out`` already holds a
        checkpoint, training resumes from it (same model and hyperparameters required).  ``resume``
        decides under the directory's lock, so that two runs cannot both start fresh in one
        directory: ``None`` resumes when a checkpoint exists, ``False`` refuses a directory that holds
        one (``FileExistsError``), ``True`` requires one (``FileNotFoundError``).

        Each history record (and ``metrics.jsonl`` line) holds ``epoch``, ``step`` (optimizer steps so
        far), ``train_loss``/``train_recon``/``train_kl`` (per sample, averaged over the epoch's
        steps; ``train_loss`` is the negative ELBO ``recon + kl`` whatever ``beta``), ``val_loss``/
        ``val_recon``/``val_kl`` (:meth:`evaluate` on ``val``, or None), ``seconds`` and
        ``samples_per_s`` of the training steps, and ``beta`` (``beta_t`` after the epoch).

        Raises :class:`TrainingDivergedError` if the loss becomes NaN or infinite; nothing is saved
        after the last finite epoch.  ``out`` is locked for the whole call
        (:func:`fastvae.checkpoint.lock_run_dir`, by rank 0 under DDP): a second training into the
        same directory raises :class:`fastvae.checkpoint.RunLockedError` (an ``OSError``) on every
        rank.  A full disk raises :class:`fastvae.checkpoint.CheckpointWriteError` and keeps the last
        checkpoint.
        """
        epochs = _nonneg_int(epochs, "epochs")
        images, labels = _split_data(train, "train")
        val_images, val_labels = (None, None) if val is None else _split_data(val, "val")
        if resume not in (None, True, False):
            raise ValueError(f"resume must be None, True or False, got {resume!r}")
        out_dir = None if out is None else Path(out)
        lock = None if out_dir is None else self._lock_run_dir(out_dir)
        try:
            return self._fit(images, labels, val_images, val_labels, epochs, out_dir, plots, resume)
        finally:
            if lock is not None:
                lock.release()

    def _lock_run_dir(self, out_dir: Path) -> RunLock | None:
        """Rank 0 takes ``out_dir``'s lock; under DDP every rank learns whether it succeeded."""
        lock, error = None, None
        if self.dist.is_main:
            try:
                lock = lock_run_dir(out_dir)
            except OSError as e:  # RunLockedError, or e.g. a read-only directory
                error = e
        if self.dist.enabled:  # the other ranks must fail too, not wait at the next barrier
            failed = torch.tensor([0 if error is None else 1], device=self.device)
            torch.distributed.broadcast(failed, src=0)
            if error is None and bool(failed.item()):
                raise RunLockedError(
                    f"run directory {out_dir}: rank 0 could not lock it (see rank 0's error)"
                )
        if error is not None:
            raise error
        return lock

    def _fit(
        self,
        images: torch.Tensor,
        labels: torch.Tensor | None,
        val_images: torch.Tensor | None,
        val_labels: torch.Tensor | None,
        epochs: int,
        out_dir: Path | None,
        plots: bool,
        resume: bool | None = None,
    ) -> list[dict[str, Any]]:
        """:meth:`fit` after its argument checks, with ``out_dir`` locked."""
        main = self.dist.is_main
        ckpt_path = None if out_dir is None else out_dir / CHECKPOINT_NAME
        if out_dir is not None:
            if resume is False and ckpt_path.exists():
                raise FileExistsError(
                    f"run directory {out_dir} already holds a checkpoint ({ckpt_path}); resume it or "
                    "choose another directory"
                )
            if resume is True and not ckpt_path.exists():
                raise FileNotFoundError(f"no checkpoint to resume in run directory {out_dir}: {ckpt_path}")
            if ckpt_path.exists():
                self.load_state_dict(load_checkpoint(ckpt_path), source=f"checkpoint file {ckpt_path}")
            if main:  # metrics.jsonl always equals the history of the checkpoint it goes with
                _write_metrics(out_dir / METRICS_NAME, self.history)
                for name in (CHECKPOINT_NAME, METRICS_NAME):  # temporary files left by a killed writer
                    for stale in out_dir.glob(f".{name}.*.tmp"):
                        stale.unlink(missing_ok=True)
            if self.dist.enabled:
                torch.distributed.barrier()

        todo = self.epoch < epochs
        train_x = _prepare_images(images, self.device, "train images") if todo else None
        val_x = None
        if val_images is not None and todo:
            val_x = _prepare_images(val_images, self.device, "val images")

        while self.epoch < epochs:
            epoch = self.epoch + 1
            t0 = time.perf_counter()
            sums, steps = self._train_epoch(train_x, epoch, epochs, ckpt_path)
            seconds = time.perf_counter() - t0
            n = train_x.shape[0]
            record: dict[str, Any] = {
                "epoch": epoch,
                "step": self.step,
                "train_loss": (sums[1] + sums[2]) / n,
                "train_recon": sums[1] / n,
                "train_kl": sums[2] / n,
                "val_loss": None,
                "val_recon": None,
                "val_kl": None,
                "seconds": seconds,
                "samples_per_s": n / seconds if seconds > 0 else None,
                "beta": self.beta_at(self.step),
            }
            if val_x is not None:
                ev = self._evaluate(val_x)
                record.update(val_loss=ev["loss"], val_recon=ev["recon"], val_kl=ev["kl"])
            self.history.append(record)
            self.epoch = epoch
            if main and self.progress:
                _print_epoch(record, epochs)
            if ckpt_path is not None and main:
                save_checkpoint(ckpt_path, self.state_dict())
                _write_metrics(out_dir / METRICS_NAME, self.history)

        if out_dir is not None and main and plots and self.history:
            from . import plots as _plots

            if val_images is not None:
                pv, pl = val_images, val_labels
            else:
                pv, pl = images[:1000], None if labels is None else labels[:1000]
            _plots.save_all(self.model, out_dir, val_images=pv, val_labels=pl, history=self.history)
        return self.history

    def _train_epoch(
        self, images: torch.Tensor, epoch: int, epochs: int, ckpt_path: Path | None
    ) -> tuple[list[float], int]:
        """One epoch; returns the summed ``[objective, recon, kl]`` over the (global) training set."""
        from . import data as _data

        n = images.shape[0]
        bs, world, rank = self.batch_size, self.dist.world_size, self.dist.rank
        max_steps = math.ceil(n / bs)
        gen = torch.Generator(device=self.device)
        gen.manual_seed(_mix_seed(self.seed, 1000 + epoch))
        batches = _data.iterate_batches(
            images, None, bs, shuffle=True, generator=gen, drop_last=False, rank=rank, world_size=world
        )
        terms = torch.zeros(max_steps, 3, device=self.device)
        check_each_step = self._eager_checks
        bar = _progress_bar(max_steps, f"epoch {epoch}/{epochs}", self.progress and self.dist.is_main)
        refresh = max(1, min(16, max_steps // 8 or 1))
        first_step = self.step
        t0 = time.perf_counter()
        autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16) if self.amp == "bf16" else contextlib.nullcontext()
        )
        i, local_rows = -1, 0
        for i, (x, _) in enumerate(batches):
            rows = min(bs, n - i * bs)
            start, _stop = distributed.shard_bounds(rows, rank, world)
            seed = int(torch.randint(0, _SEED_MAX, (1,), generator=self._noise))
            beta_t = self.beta_at(self.step)
            with autocast:
                logits, mu, logvar = self._train_forward(x, seed, start, rows)
                loss, recon, kl = self._loss(logits, x, mu, logvar, beta_t)
            if check_each_step and not math.isfinite(loss.item()):
                self._diverged(epoch, self.step + 1, float(loss.item()), ckpt_path)
            (loss * world if world > 1 else loss).backward()
            if self.grad_clip is not None:
                nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            terms[i] = torch.stack([loss.detach().float(), recon.float(), kl.float()])
            self.step += 1
            local_rows += x.shape[0]
            if bar is not None:
                bar.update(1)
                if (i + 1) % refresh == 0 or i == 0:
                    part = terms[: i + 1]
                    if not self.dist.enabled:
                        self._check_finite(part, epoch, first_step, ckpt_path, params=False)
                    rate = local_rows * world / max(time.perf_counter() - t0, 1e-9)
                    bar.set_postfix_str(
                        _postfix(part.double().sum(0).tolist(), local_rows, rate), refresh=False
                    )
        steps = i + 1
        if self.dist.enabled:
            torch.distributed.all_reduce(terms)
        self._check_finite(terms[:steps], epoch, first_step, ckpt_path)
        sums = terms[:steps].double().sum(0).tolist()
        if bar is not None:
            elapsed = time.perf_counter() - t0
            bar.set_postfix_str(
                _postfix(sums, n, n / elapsed if elapsed > 0 else float("nan")), refresh=False
            )
            bar.close()
        return sums, steps

    def _check_finite(
        self, terms: torch.Tensor, epoch: int, first_step: int, ckpt_path: Path | None, params: bool = True
    ) -> None:
        """Raise :class:`TrainingDivergedError` at the first non-finite step loss (or non-finite weights)."""
        bad = ~torch.isfinite(terms).all(1)
        if bool(bad.any()):
            idx = int(bad.nonzero()[0, 0])
            self._diverged(epoch, first_step + idx + 1, float(terms[idx, 0]), ckpt_path)
        if params:
            flags = torch.stack([torch.isfinite(p).all() for p in self.model.parameters()])
            if not bool(flags.all()):
                self._diverged(epoch, self.step, None, ckpt_path)

    def _diverged(self, epoch: int, step: int, value: float | None, ckpt_path: Path | None) -> None:
        what = "the parameters became non-finite" if value is None else f"the loss is {value}"
        if ckpt_path is not None and ckpt_path.exists():
            kept = f"the last good checkpoint {ckpt_path} (epoch {self.epoch}) is kept"
        elif ckpt_path is not None:
            kept = f"no checkpoint was written to {ckpt_path.parent} (no epoch completed)"
        else:
            kept = "no checkpoint was written (out=None)"
        raise TrainingDivergedError(
            f"training diverged at epoch {epoch}, step {step}: {what}; {kept}. "
            "Try a lower lr, grad_clip, or kl_warmup.",
            epoch=epoch,
            step=step,
        )

    def close(self) -> None:
        """Leave the process group if this trainer created it (several processes)."""
        distributed.teardown(self.dist)


# ---------------------------------------------------------------------- helpers


def _positive_float(v: Any, name: str) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {v!r}")
    return float(v)


def _nonneg_float(v: Any, name: str, high: float = math.inf) -> float:
    """``v`` as a float in ``[0, high]``; bools, strings and other non-numbers are refused."""
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
    if v > high:
        raise ValueError(f"{name} must be at most {high:g}, got {v!r}")
    return float(v)


def _positive_int(v: Any, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")
    return v


def _nonneg_int(v: Any, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {v!r}")
    return v


def _adam(model: nn.Module, lr: float) -> torch.optim.Adam:
    """Adam with the fused (single-kernel) implementation where torch has it: 3x faster steps on the CPU."""
    params = list(model.parameters())
    if params and all(p.is_floating_point() for p in params):
        try:
            return torch.optim.Adam(params, lr=lr, fused=True)
        except (RuntimeError, TypeError, ValueError):  # an older torch or an unsupported device
            pass
    return torch.optim.Adam(params, lr=lr)


def _resolve_device(device: str | torch.device) -> torch.device:
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was asked for, but CUDA is not available on this machine")
    return dev


def _resolve_amp(amp: bool | str | None, device: torch.device) -> str | None:
    if amp is None or amp is False:
        return None
    if amp is True or amp == "bf16":
        if device.type != "cuda":
            warnings.warn(
                f"amp='bf16' needs a CUDA device; training on {device} in fp32", RuntimeWarning, stacklevel=3
            )
            return None
        return "bf16"
    raise ValueError(f"amp must be None, False, True or 'bf16', got {amp!r}")


def _progress_bar(total: int, desc: str, enabled: bool):
    """A per-step tqdm bar on stderr (steps done/total, steps/s, then the postfix: loss and samples/s).

    ``disable=None``: no bar when stderr is not a terminal (logs, CI), where the one line per epoch of
    :func:`_print_epoch` is the record; ``leave=False`` clears the bar when that line is printed.
    """
    if not enabled:
        return None
    from tqdm.auto import tqdm

    bar = tqdm(
        total=total, desc=desc, unit="step", leave=False, dynamic_ncols=True, file=sys.stderr, disable=None
    )
    return None if bar.disable else bar


def _postfix(sums: list[float], n: float, rate: float) -> str:
    """The bar's postfix from ``sums = [objective, recon, kl]`` summed over ``n`` samples so far.

    ``loss = (recon + kl) / n`` is the negative ELBO per sample whatever ``beta`` (the objective
    ``recon + beta * kl`` is not shown), then the two terms per sample and ``rate`` in samples/s.
    """
    n = max(n, 1)
    loss, recon, kl = (sums[1] + sums[2]) / n, sums[1] / n, sums[2] / n
    return f"loss={loss:.2f} recon={recon:.2f} kl={kl:.2f} samples/s={rate:,.0f}"


def _print_epoch(record: dict[str, Any], epochs: int) -> None:
    """One line per epoch on stderr (terminal or log): train and held-out negative ELBO, time, samples/s."""
    val = "" if record["val_loss"] is None else f"  val {record['val_loss']:.2f}"
    rate = record["samples_per_s"] or float("nan")
    print(
        f"epoch {record['epoch']}/{epochs}  train {record['train_loss']:.2f} "
        f"(recon {record['train_recon']:.2f}, kl {record['train_kl']:.2f}){val}  "
        f"{record['seconds']:.2f}s, {rate:,.0f} samples/s",
        file=sys.stderr,
        flush=True,
    )


def _write_metrics(path: Path, history: list[dict[str, Any]]) -> None:
    """Rewrite ``metrics.jsonl`` (one JSON line per epoch) from ``history`` with the atomic writer.

    Rewritten whole after every checkpoint (a few hundred bytes per epoch), so that it always
    equals the history of the checkpoint next to it, also on resume and after a full disk.
    """
    text = "".join(json.dumps(record) + "\n" for record in history).encode("utf-8")
    atomic_write(path, lambda f: f.write(text), what="metrics file")
