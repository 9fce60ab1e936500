"""Training loop for fastvae models: fused loss, on-device batches, atomic checkpoints, exact resume.

The loss of a step is pytorch/examples' convention, the negative ELBO summed over the batch
(:func:`objective`)::

    mu, logvar = model.encode(x)                         # x: the uint8 (or float [0, 1]) batch
    z = fastvae.reparameterize(mu, logvar, seed=...)     # the trainer's own seed per step
    loss = fastvae.vae_loss(model.decode(z), x, mu, logvar, beta=beta_t, reduction="sum")

and every metric is reported per sample (nats).  The options live in one frozen dataclass,
:class:`fastvae.config.TrainConfig` (``Trainer(model, lr=3e-3)`` builds one from keywords).  Speed
comes from what the loop does *not* do: the training set moves to the device once (``uint8`` pixels
stay ``uint8``: the fused loss reads them as ``t / 255``), batches are device-side gathers with a
per-epoch permutation (:func:`fastvae.data.iterate_batches`), no ``DataLoader``, and the per-step
losses stay on the device until the progress bar or the end of the epoch reads them (on CUDA there
is no host sync per step).  With ``cuda_graphs=True`` each full-batch step is one CUDA graph replay
(:class:`fastvae.graphs.GraphedStep`); the last partial batch runs eagerly.

Reproducibility: the library never seeds torch's global generator (the caller seeds the initial
weights; ``fastvae train`` does it once, from ``--seed``).  The permutation of epoch ``e`` comes
from a generator seeded with a mix of ``(seed, e)``, and each step's reparameterization seed is drawn
from the trainer's own CPU generator, so two runs with the same seed and the same initial weights on
the same machine give bit-identical metrics on the CPU, and a run killed and resumed from its
checkpoint ends exactly like an uninterrupted one.

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
import dataclasses
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import checkpoint as ckpt
from . import data as _data
from . import distributed, ops
from .checkpoint import METRICS_NAME, CheckpointError, RunLock, RunLockedError
from .config import BETA_MAX, RunConfig, TrainConfig, check_device
from .models import evaluating
from .progress import EpochBar, print_epoch

__all__ = [
    "Trainer",
    "TrainConfig",
    "TrainingDivergedError",
    "objective",
    "sampled_terms",
    "score_samples",
    "resolve_device",
    "METRICS_NAME",
    "EVAL_SEED",
    "TIMING_KEYS",
    "BETA_MAX",
]

EVAL_SEED = 0x5EED_E7A1  # fixed seed of the evaluation noise: evaluate() is a deterministic function
EVAL_BATCH = 1024  # evaluation chunk; fixed so that evaluate() does not depend on the training batch
_SEED_MAX = 2**62
TIMING_KEYS = ("seconds", "samples_per_s")  # the metrics that differ between identical runs


class TrainingDivergedError(FloatingPointError):
    """The loss (or the parameters) became NaN or infinite; ``epoch`` and ``step`` say where.

    ``step`` is the global optimizer step (1-based) whose loss was not finite.  Training stops
    before anything is saved: the last checkpoint on disk is the last good state.
    """

    def __init__(self, message: str, *, epoch: int, step: int) -> None:
        super().__init__(message)
        self.epoch = epoch
        self.step = step


# ---------------------------------------------------------------------- the objective


def objective(
    logits: torch.Tensor,
    x: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    beta: float | torch.Tensor,
    free_bits: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(objective, recon, kl)`` summed over the batch ``B``; ``recon`` and ``kl`` are detached.

    ``free_bits == 0``: ``objective = recon + beta * KL``, one fused pass of :func:`fastvae.vae_loss`
    (its gradients to ``logits``, ``mu``, ``logvar`` are written in the same pass).  ``free_bits > 0``
    (Kingma et al. 2016, "Improved variational inference with inverse autoregressive flow")::

        KL_d      = mean_batch 0.5 * (mu_d^2 + exp(logvar_d) - 1 - logvar_d)
        objective = recon + beta * B * sum_d max(free_bits, KL_d)

    (a dimension below its floor gets no KL gradient); ``kl`` is the true, unclamped KL.  ``beta``
    is a float, or a 0-d device tensor (CUDA graphs: never read on the host).
    """
    target = x.reshape(logits.shape)
    if free_bits <= 0:
        loss, recon, kl = ops.vae_loss(
            logits, target, mu, logvar, beta=beta, return_terms=True, validate=False
        )
        return loss, recon, kl
    recon_loss, recon, kl = ops.vae_loss(
        logits, target, mu, logvar, beta=0.0, return_terms=True, validate=False
    )
    mu2, lv2 = mu.float().flatten(1), logvar.float().flatten(1)
    kl_d = 0.5 * (mu2.square() + lv2.exp() - 1.0 - lv2).mean(0)
    return recon_loss + beta * (kl_d.clamp(min=free_bits).sum() * mu2.shape[0]), recon, kl


# ---------------------------------------------------------------------- the sampled forward pass


def _mix_seed(seed: int, salt: int) -> int:
    """A 63-bit seed from ``(seed, salt)`` (splitmix64 finaliser), so nearby seeds do not share streams."""
    x = (seed * 0x9E3779B97F4A7C15 + salt + 0x632BE59BD9B4E019) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (x ^ (x >> 31)) & 0x7FFFFFFFFFFFFFFF


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
    called as ``model(x)`` under ``torch.random.fork_rng`` seeded from ``seed`` (the caller's global
    generator is left as it was).
    """

    def __init__(self, model: nn.Module, compile: bool = False) -> None:
        super().__init__()
        self.model = model
        self.explicit = callable(getattr(model, "encode", None)) and callable(getattr(model, "decode", None))
        wrap = torch.compile if compile else (lambda f: f)
        if self.explicit:
            self._encode, self._decode = wrap(model.encode), wrap(model.decode)
        else:
            self._call = wrap(model)

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


def sampled_terms(
    forward: nn.Module,
    images: torch.Tensor,
    device: torch.device,
    *,
    seed: int = EVAL_SEED,
    samples: int = 1,
    batch_size: int = EVAL_BATCH,
) -> torch.Tensor:
    """Per-sample ``[negative ELBO, recon, KL]`` (``beta = 1``), ``float32 [N, 3]`` on ``device``.

    The one evaluation loop (:meth:`Trainer.evaluate`, :func:`score_samples`, the held-out figure of
    every epoch).  ``forward`` is a :class:`_SampledForward`; chunk ``i`` of ``batch_size`` rows moves
    to ``device`` (one copy of its bytes; a no-op for data already there) and its ``z`` is drawn
    ``samples`` times with seeds ``mix(seed, i * samples + s)``; the terms are averaged over the draws.
    Call it in eval mode under ``no_grad`` (:func:`evaluating`).
    """
    out = []
    for i, start in enumerate(range(0, images.shape[0], batch_size)):
        x = _to_device(images[start : start + batch_size], device)
        acc = torch.zeros(x.shape[0], 3, device=device)
        for s in range(samples):
            logits, mu, logvar = forward(x, _mix_seed(seed, i * samples + s))
            t = ops.vae_loss(
                logits,
                x.reshape(logits.shape),
                mu,
                logvar,
                reduction="none",
                return_terms=True,
                validate=False,
            )
            acc += torch.stack([t.loss, t.recon, t.kl], 1).float()
        out.append(acc / samples)  # exact for samples == 1
    return torch.cat(out)


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
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be a positive integer, got {samples!r}")
    images, _ = _split_data(images, "images")
    where = next(model.parameters()).device if device is None else resolve_device(device)
    with evaluating(model):
        terms = sampled_terms(
            _SampledForward(model), images, where, seed=seed, samples=samples, batch_size=batch_size
        )
    return terms[:, 0].cpu()


# ---------------------------------------------------------------------- data and devices


def _split_data(data: Any, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(images, labels)`` from a tuple/list ``(images, labels)`` or a bare image tensor, checked once.

    The images must be ``[N, ...]`` with ``N >= 1``, with data (not ``meta``), ``uint8`` pixels or
    floats in ``[0, 1]`` (:func:`fastvae.data.check_unit_range`: the one range check of the data).
    """
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
    _data.check_unit_range(images, f"{name} images")
    return images, labels


def _to_device(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``images`` on ``device``, contiguous: ``uint8`` stays ``uint8`` (1 byte a pixel), floats go fp32."""
    dtype = torch.float32 if images.is_floating_point() else images.dtype
    return images.to(device=device, dtype=dtype).contiguous()


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` -> ``cuda`` when available, else ``cpu``; ``"cpu"``, ``"cuda"``, ``"cuda:N"`` as given.

    Raises ``ValueError`` for another name, or for CUDA on a machine without it.
    """
    name = check_device("device", device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} was asked for, but CUDA is not available on this machine")
    return torch.device(name)


def _resolve_amp(amp: str | None, device: torch.device) -> str | None:
    """``"bf16"`` on CUDA; on another device a warning, and fp32 (``None``)."""
    if amp is not None and device.type != "cuda":
        warnings.warn(
            f"amp='{amp}' needs a CUDA device; training on {device} in fp32", RuntimeWarning, stacklevel=3
        )
        return None
    return amp


def _adam(model: nn.Module, lr: float, capturable: bool = False) -> torch.optim.Adam:
    """Adam with the fused (single-kernel) implementation where torch has it: 3x faster steps on the CPU.

    ``capturable``: the step counter and the bias corrections stay on the device (CUDA graphs).
    """
    params = list(model.parameters())
    extra = {"capturable": True} if capturable else {}
    if params and all(p.is_floating_point() for p in params):
        try:
            return torch.optim.Adam(params, lr=lr, fused=True, **extra)
        except (RuntimeError, TypeError, ValueError):  # an older torch or an unsupported device
            pass
    return torch.optim.Adam(params, lr=lr, **extra)


def _check_graphable(model: nn.Module, device: torch.device, several: bool, config: TrainConfig) -> None:
    """``cuda_graphs=True`` needs CUDA, one process, fp32 eager modules and a model with encode/decode."""
    where = "this machine has no CUDA" if not torch.cuda.is_available() else f"the device is {device}"
    explicit = callable(getattr(model, "encode", None)) and callable(getattr(model, "decode", None))
    needs = [
        (device.type == "cuda", f"a CUDA device; {where}"),
        (not several, "a single process (not torchrun)"),
        (config.amp is None and not config.compile, "fp32 eager modules (no amp, no compile)"),
        (explicit, "a model with encode(x) and decode(z)"),
    ]
    for ok, need in needs:
        if not ok:
            raise ValueError(f"cuda_graphs=True needs {need}; set cuda_graphs=False")


# ---------------------------------------------------------------------- the trainer


class Trainer:
    """Train a VAE with the fused fastvae ops.

    ``Trainer(model, config=TrainConfig(...))``, or ``Trainer(model, lr=3e-3, batch_size=64, ...)``:
    keyword options build the :class:`~fastvae.config.TrainConfig` (its fields, defaults, ranges and
    meanings are listed there); not both.  ``model``: a VAE, ``model(x) -> (logits, mu, logvar)``;
    with ``encode(x) -> (mu, logvar)`` and ``decode(z) -> logits`` (as :mod:`fastvae.models` has) the
    trainer draws ``z`` itself with an explicit per-step seed.  ``model.config()`` (if present) is
    stored in checkpoints.  The trainer does not seed torch: the initial weights are the caller's.

    ``self.config`` is the config with ``amp`` resolved for the device (``None`` on the CPU);
    ``self.device`` the device used; ``self.metadata`` a dict stored with checkpoints (the CLI puts
    its data source there); ``self.epoch``/``self.step`` the completed epochs and optimizer steps.
    """

    def __init__(self, model: nn.Module, config: TrainConfig | None = None, **options: Any) -> None:
        if config is None:
            config = TrainConfig(**options)
        elif options:
            raise TypeError(
                f"pass either config or keyword options, not both (got config and {sorted(options)})"
            )
        elif not isinstance(config, TrainConfig):
            raise TypeError(f"config must be a fastvae.config.TrainConfig, got {type(config).__name__}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.dist, self.device = distributed.setup(resolve_device(config.device))
        if self.dist.enabled and config.batch_size % self.dist.world_size:
            raise ValueError(
                f"batch_size={config.batch_size} is the global batch and must be divisible by the number of "
                f"processes (WORLD_SIZE={self.dist.world_size})"
            )
        self.config = dataclasses.replace(config, amp=_resolve_amp(config.amp, self.device))
        if config.cuda_graphs:
            _check_graphable(model, self.device, self.dist.enabled, self.config)
        self.metadata: dict[str, Any] = {}  # stored in checkpoints under config["meta"] (e.g. by the CLI)
        self.model = model.to(self.device)
        self.model.train()
        self._forward = _SampledForward(self.model, compile=config.compile)
        self._train_forward: nn.Module = self._forward
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self._train_forward = DistributedDataParallel(self._forward, device_ids=ids)
        self.optimizer = _adam(self.model, config.lr, capturable=config.cuda_graphs)
        self._graph: Any = None  # fastvae.graphs.GraphedStep of the full batch, made at the first one
        self._noise = torch.Generator(device="cpu")  # the per-step reparameterization seeds
        self._noise.manual_seed(_mix_seed(config.seed, 1))
        # On the CPU a finiteness check costs nothing (no device to wait for): check every step, before
        # the bad gradient is applied.  On CUDA (and under DDP, where all ranks must agree) the check
        # runs on the accumulated step losses when the bar refreshes and at the end of the epoch.
        self._eager_checks = self.device.type == "cpu" and not self.dist.enabled
        self._ckpt_path: Path | None = None  # the checkpoint of the fit in progress (error messages)
        self.epoch = 0  # completed epochs
        self.step = 0  # completed optimizer steps
        self.history: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ configuration and state

    def hyperparameters(self) -> dict[str, Any]:
        """The settings that define the run (checked on resume): the config's ``resume="fixed"`` fields."""
        return self.config.hyperparameters()

    def checkpoint_config(self) -> dict[str, Any]:
        """``{"model": model.config(), "trainer": asdict(config) + world_size, "meta": metadata}``."""
        model_config = self.model.config() if callable(getattr(self.model, "config", None)) else None
        return {
            "model": model_config,
            "trainer": {**self.config.to_dict(), "world_size": self.dist.world_size},
            "meta": dict(self.metadata),
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything a checkpoint holds (tensors and plain containers only: ``weights_only`` loads it)."""
        cuda = torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None
        return {
            "format": ckpt.FORMAT,
            "version": ckpt.VERSION,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "cuda": cuda, "noise": self._noise.get_state()},
            "epoch": self.epoch,
            "step": self.step,
            "history": [dict(h) for h in self.history],
            "config": self.checkpoint_config(),
        }

    def load_state_dict(self, state: dict[str, Any], *, source: str = "checkpoint") -> None:
        """Restore a :meth:`state_dict`; ``source`` (e.g. ``"checkpoint file PATH"``) begins each error.

        Everything is checked before anything changes, and a mismatch raises
        :class:`fastvae.checkpoint.CheckpointError` (a ``ValueError``) in one line: the model config
        and the run-defining settings must match this trainer's (field by field; settings a
        checkpoint lacks are not compared), every weight must have its tensor's shape, every
        optimizer-state tensor its parameter's shape, dtype and device (a wrong shape would make the
        fused Adam write out of bounds), the RNG states must be valid generator states, and
        ``epoch``/``step``/``history`` must be consistent counts.  The RNG states restored are the
        trainer's noise generator and torch's global ones (a model with dropout resumes exactly).
        """
        if not isinstance(state, dict):
            raise CheckpointError(f"{source}: expected a dict, got {type(state).__name__}")
        config = state.get("config", {})
        if not isinstance(config, dict):
            raise CheckpointError(f"{source}: 'config' is a {type(config).__name__}, expected a dict")
        saved_model, mine = config.get("model"), self.checkpoint_config()["model"]
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
        ckpt.check_model_state(self.model, state.get("model"), source)
        names = {id(p): name for name, p in self.model.named_parameters()}
        ckpt.check_optimizer_state(
            self.optimizer, state.get("optimizer"), source, param_names=names, max_step=counts["step"]
        )
        rng = state.get("rng") or {}
        ckpt.check_rng_state(rng, source, cuda=self.device.type == "cuda")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if rng.get("torch") is not None:
            torch.set_rng_state(rng["torch"].cpu())
        if rng.get("cuda") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state_all([s.cpu() for s in rng["cuda"]])
        if rng.get("noise") is not None:
            self._noise.set_state(rng["noise"].cpu())
        self.epoch, self.step = counts["epoch"], counts["step"]
        self.history = [dict(h) for h in history]
        self._graph = None  # a captured step holds the old optimizer state: capture again

    def beta_at(self, step: int) -> float:
        """``beta_t = beta * min(1, step / kl_warmup)`` after ``step`` steps (``beta`` without warm-up)."""
        if self.config.kl_warmup <= 0:
            return self.config.beta
        return self.config.beta * min(1.0, step / self.config.kl_warmup)

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, data: Any) -> dict[str, float]:
        """Held-out ``{"loss", "recon", "kl"}`` in nats per sample; ``loss`` is the negative ELBO.

        ``z`` is sampled (one draw per sample, as in training and in pytorch/examples' test loop),
        with noise from the fixed :data:`EVAL_SEED`, in eval mode under ``torch.no_grad``: the
        result is a deterministic function of the weights and the data (:func:`sampled_terms`).
        """
        images, _ = _split_data(data, "data")
        return self._evaluate(images)

    def _evaluate(self, images: torch.Tensor) -> dict[str, float]:
        """:meth:`evaluate` of checked images: the per-sample terms summed in float64, over ``N``."""
        with evaluating(self.model):
            terms = sampled_terms(self._forward, images, self.device)
        loss, recon, kl = (v / images.shape[0] for v in terms.double().sum(0).tolist())
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
        epochs = RunConfig(epochs=epochs).epochs  # "epochs must be an integer >= 0, got ..."
        images, labels = _split_data(train, "train")
        val_images, val_labels = (None, None) if val is None else _split_data(val, "val")
        if resume not in (None, True, False):
            raise ValueError(f"resume must be None, True or False, got {resume!r}")
        out_dir = None if out is None else Path(out)
        lock = None if out_dir is None else self._lock_run_dir(out_dir)
        try:
            if out_dir is not None:
                self._open_run_dir(out_dir, resume)
            train_x = _to_device(images, self.device) if self.epoch < epochs else None
            val_x = None if val_images is None or train_x is None else _to_device(val_images, self.device)
            while self.epoch < epochs:
                self._run_epoch(train_x, val_x, epochs, out_dir)
            if out_dir is not None and self.dist.is_main and plots and self.history:
                from . import plots as _plots

                if val_images is None:
                    val_images, val_labels = images[:1000], None if labels is None else labels[:1000]
                _plots.save_all(
                    self.model, out_dir, val_images=val_images, val_labels=val_labels, history=self.history
                )
        finally:
            self._ckpt_path = None
            if lock is not None:
                lock.release()
        return self.history

    def _lock_run_dir(self, out_dir: Path) -> RunLock | None:
        """Rank 0 takes ``out_dir``'s lock; under DDP every rank learns whether it succeeded."""
        lock, error = None, None
        if self.dist.is_main:
            try:
                lock = ckpt.lock_run_dir(out_dir)
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

    def _open_run_dir(self, out_dir: Path, resume: bool | None) -> None:
        """Under the lock: resume from ``out_dir``'s checkpoint (or refuse, per ``resume``); tidy files."""
        path = self._ckpt_path = out_dir / ckpt.CHECKPOINT_NAME
        if resume is False and path.exists():
            raise FileExistsError(
                f"run directory {out_dir} already holds a checkpoint ({path}); resume it or choose "
                "another directory"
            )
        if resume is True and not path.exists():
            raise FileNotFoundError(f"no checkpoint to resume in run directory {out_dir}: {path}")
        if path.exists():
            self.load_state_dict(ckpt.load_checkpoint(path), source=f"checkpoint file {path}")
        if self.dist.is_main:  # metrics.jsonl always equals the history of the checkpoint it goes with
            ckpt.write_metrics(out_dir, self.history)
            ckpt.remove_temp_files(out_dir)
        if self.dist.enabled:
            torch.distributed.barrier()

    def _run_epoch(
        self, train_x: torch.Tensor, val_x: torch.Tensor | None, epochs: int, out_dir: Path | None
    ) -> None:
        """Train one epoch, evaluate, append the record, write the checkpoint and the metrics (rank 0)."""
        epoch, n = self.epoch + 1, train_x.shape[0]
        t0 = time.perf_counter()
        _, recon, kl = self._train_epoch(train_x, f"epoch {epoch}/{epochs}")
        seconds = time.perf_counter() - t0
        val = self._evaluate(val_x) if val_x is not None else {"loss": None, "recon": None, "kl": None}
        record = {
            "epoch": epoch,
            "step": self.step,
            "train_loss": (recon + kl) / n,
            "train_recon": recon / n,
            "train_kl": kl / n,
            **{f"val_{k}": v for k, v in val.items()},
            "seconds": seconds,
            "samples_per_s": n / seconds if seconds > 0 else None,
            "beta": self.beta_at(self.step),
        }
        self.history.append(record)
        self.epoch = epoch
        if self.dist.is_main and self.config.progress:
            print_epoch(record, epochs)
        if out_dir is not None and self.dist.is_main:
            ckpt.save_checkpoint(out_dir / ckpt.CHECKPOINT_NAME, self.state_dict())
            ckpt.write_metrics(out_dir, self.history)

    def _train_epoch(self, images: torch.Tensor, desc: str) -> list[float]:
        """One epoch of steps; returns the summed ``[objective, recon, kl]`` over the (global) training set.

        The step losses stay on the device in ``terms`` (``[steps, 3]``); the host reads them when the
        bar refreshes and once at the end (all-reduced over the ranks: each rank summed its shard).
        """
        n, bs, world, rank = images.shape[0], self.config.batch_size, self.dist.world_size, self.dist.rank
        gen = torch.Generator(device=self.device)
        gen.manual_seed(_mix_seed(self.config.seed, 1000 + self.epoch + 1))
        batches = _data.iterate_batches(images, None, bs, generator=gen, rank=rank, world_size=world)
        terms = torch.zeros(math.ceil(n / bs), 3, device=self.device)
        bar = EpochBar(terms, desc, self.config.progress and self.dist.is_main, world)
        first_step, steps = self.step, 0
        for steps, (x, _) in enumerate(batches, 1):
            # rows of the global batch: the noise of a row is the same whichever rank takes it
            rows = min(bs, n - (steps - 1) * bs)
            terms[steps - 1] = self._step(x, distributed.shard_bounds(rows, rank, world)[0], rows)
            self.step += 1
            if bar.update(steps, x.shape[0]) and not self.dist.enabled:
                self._check_finite(terms[:steps], first_step, params=False)
        if self.dist.enabled:
            torch.distributed.all_reduce(terms)
        self._check_finite(terms[:steps], first_step)
        sums = terms[:steps].double().sum(0).tolist()
        bar.close(sums, n)
        return sums

    def _step(self, x: torch.Tensor, row_start: int, rows: int) -> torch.Tensor:
        """One optimizer step on ``x``, rows ``[row_start, row_start + len(x))`` of a global batch of ``rows``

        Returns the detached ``[objective, recon, kl]`` batch sums (float32, on the device).
        """
        if self._graphed(x):
            return self._graph.step(x)  # forward, loss, backward, Adam: one CUDA graph replay
        seed = int(torch.randint(0, _SEED_MAX, (1,), generator=self._noise))
        with self._autocast():
            logits, mu, logvar = self._train_forward(x, seed, row_start, rows)
            loss, recon, kl = objective(logits, x, mu, logvar, self.beta_at(self.step), self.config.free_bits)
        if self._eager_checks and not math.isfinite(loss.item()):  # before the bad gradient is applied
            self._diverged(self.step + 1, loss.item())
        (loss * self.dist.world_size).backward()  # DDP averages over ranks: the gradient of the global sum
        if self.config.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=self._graph is None)  # a captured graph keeps its .grad buffers
        if self._graph is not None:
            self._graph.steps.add_(1)  # the graph's warm-up counter counts this eager step too
        return torch.stack([loss.detach().float(), recon.float(), kl.float()])

    def _graphed(self, x: torch.Tensor) -> bool:
        """With ``cuda_graphs``: whether ``x`` is a full batch, capturing its step at the first one."""
        if not self.config.cuda_graphs or x.shape[0] != self.config.batch_size:
            return False
        if self._graph is None:
            from .graphs import GraphedStep

            c = self.config
            self._graph = GraphedStep(
                self.model,
                self.optimizer,
                objective,
                batch_shape=tuple(x.shape),
                dtype=x.dtype,
                device=self.device,
                beta=c.beta,
                kl_warmup=c.kl_warmup,
                free_bits=c.free_bits,
                grad_clip=c.grad_clip,
                start_step=self.step,
            )
        return True

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.config.amp == "bf16":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _check_finite(self, terms: torch.Tensor, first_step: int, params: bool = True) -> None:
        """Raise :class:`TrainingDivergedError` at the first non-finite step loss (or non-finite weights)."""
        bad = ~torch.isfinite(terms).all(1)
        if bool(bad.any()):
            idx = int(bad.nonzero()[0, 0])
            self._diverged(first_step + idx + 1, float(terms[idx, 0]))
        if params:
            flags = torch.stack([torch.isfinite(p).all() for p in self.model.parameters()])
            if not bool(flags.all()):
                self._diverged(self.step, None)

    def _diverged(self, step: int, value: float | None) -> None:
        epoch, path = self.epoch + 1, self._ckpt_path
        what = "the parameters became non-finite" if value is None else f"the loss is {value}"
        if path is not None and path.exists():
            kept = f"the last good checkpoint {path} (epoch {self.epoch}) is kept"
        elif path is not None:
            kept = f"no checkpoint was written to {path.parent} (no epoch completed)"
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
