"""Whole-epoch training throughput (samples/s) on MNIST-shaped data.

Loops compared, all training the same kind of model with Adam(1e-3) on fastvae's 9,000 training
images of the embedded MNIST set:

* ``examples``: pytorch/examples' ``vae/main.py`` loop (``bench/examples_loop.py``): a ``DataLoader``
  over float images, a sigmoid decoder with ``F.binary_cross_entropy`` + KL, ``loss.item()`` every
  step.  For the MLP this is the example's own model; for the ConvVAE the same loop runs
  fastvae's ConvVAE architecture behind a sigmoid (:class:`ExamplesStyle`);
* ``plain``: no fastvae, the data resident on the device as uint8 with a per-epoch device
  permutation (what fastvae's Trainer does), eager best-form loss; ``plain-compile``: the same
  with the forward and loss under ``torch.compile``.  These separate the gain of the data path
  from the gain of the fused ops;
* ``trainer``: ``fastvae.trainer.Trainer`` with its defaults; ``trainer-compile``: ``compile=True``;
  ``trainer-amp-bf16`` (CUDA): ``amp="bf16"``; ``trainer-cuda-graphs`` (CUDA): ``cuda_graphs=True``
  (each full-batch step one CUDA graph replay).

Each loop trains warm-up epochs first (JIT, torch.compile, allocator), then the loops take turns,
epoch by epoch, for the measured epochs (quick: 1 + 2, full: 1 + 3); samples/s = training images /
median epoch time (and the best epoch's, which on a loaded machine is closer to the uncontended
figure).  Evaluation is not timed.
"""

from __future__ import annotations

import importlib
import inspect
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from bench.impls import best_reparameterize, best_vae_loss

LR = 1e-3
SEED = 0
BASELINES = ("examples", "plain-compile")  # the speed-up columns
EPOCH_GAP_S = 0.05  # idle time before each measured epoch


@dataclass(frozen=True)
class TrainCase:
    model: str  # "mlp" (784-400-20, pytorch/examples) or "conv" (the Keras example's ConvVAE)
    batch: int

    @property
    def id(self) -> str:
        return f"{self.model} batch {self.batch}"


def training_cases(mode: str) -> list[TrainCase]:
    """Quick: the MLP at batch 128; full: MLP and ConvVAE at batch 128 and 1,024; smoke: none."""
    if mode == "smoke":
        return []
    if mode == "quick":
        return [TrainCase("mlp", 128)]
    return [TrainCase(m, b) for m in ("mlp", "conv") for b in (128, 1024)]


def variants(mode: str, device: torch.device) -> list[str]:
    """The loops run in ``mode`` on ``device`` (quick mode on a CPU keeps those of the CPU target)."""
    gpu = device.type == "cuda"
    if mode == "quick" and not gpu:
        return ["examples", "trainer", "trainer-compile"]
    names = ["examples", "plain", "plain-compile", "trainer", "trainer-compile"]
    if mode == "quick":
        names.remove("plain")
    return names + (["trainer-amp-bf16", "trainer-cuda-graphs"] if gpu else [])


def epochs_for(mode: str) -> tuple[int, int]:
    """(warm-up epochs, measured epochs)."""
    return (1, 2) if mode == "quick" else (1, 3)


def missing_modules() -> str | None:
    """Why the training benchmarks cannot run (None when fastvae's trainer, models and data import)."""
    for name in ("fastvae.models", "fastvae.trainer", "fastvae.data"):
        try:
            importlib.import_module(name)
        except Exception as e:  # ImportError while the modules are being written, or a broken one
            return f"{name} is not importable ({type(e).__name__}: {e})"
    return None


def _new_model(kind: str) -> nn.Module:
    from fastvae.models import MLPVAE, ConvVAE

    torch.manual_seed(SEED)
    return MLPVAE() if kind == "mlp" else ConvVAE()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Skip(Exception):
    """A loop that cannot run here (the reason is the message)."""


class Loop:
    """One training loop, trained an epoch at a time: ``epoch()`` -> (seconds, train loss per sample)."""

    images: int = 0

    def epoch(self) -> tuple[float, float]:
        raise NotImplementedError


# ----------------------------------------------------------------------------------------------
# pytorch/examples' loop
# ----------------------------------------------------------------------------------------------


class ExamplesStyle(nn.Module):
    """A fastvae model behind pytorch/examples' interface.

    ``forward(x) -> (sigmoid(decoder output) [B, F], mu, logvar)``, z drawn with ``torch.randn_like``.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, logvar = self.model.encode(x)
        std = torch.exp(0.5 * logvar)
        z = mu + torch.randn_like(std) * std
        return torch.sigmoid(self.model.decode(z)).reshape(x.shape[0], -1), mu, logvar


class ExamplesLoop(Loop):
    """``bench/examples_loop.py``'s ``train_epoch`` (the MLP is the example's own model)."""

    def __init__(self, case: TrainCase, device: torch.device) -> None:
        try:
            self.ex = importlib.import_module("bench.examples_loop")
        except ImportError as e:
            raise Skip(f"bench/examples_loop.py is not importable: {e}") from e
        takes_device = "device" in inspect.signature(self.ex.train_epoch).parameters
        if device.type != "cpu" and not takes_device:
            raise Skip(
                "examples_loop.train_epoch has no device argument (pytorch/examples moves each batch with "
                "data.to(device))"
            )
        torch.manual_seed(SEED)
        model = self.ex.VAE() if case.model == "mlp" else ExamplesStyle(_new_model("conv"))
        self.model = model.to(device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=LR)
        self.loader, _ = self.ex.make_loaders(case.batch)
        self.images = len(self.loader.dataset)
        self.kwargs = {"device": device} if takes_device else {}
        self.device = device

    def epoch(self) -> tuple[float, float]:
        t0 = time.perf_counter()
        loss = self.ex.train_epoch(self.model, self.optimizer, self.loader, **self.kwargs)
        _sync(self.device)
        return time.perf_counter() - t0, loss


# ----------------------------------------------------------------------------------------------
# fastvae-less loop with device-resident data
# ----------------------------------------------------------------------------------------------


def plain_loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The negative ELBO summed over the batch, without fastvae: encode, sample, decode, best-form loss."""
    mu, logvar = model.encode(x)
    logits = model.decode(best_reparameterize(mu, logvar))
    return best_vae_loss(logits, x.reshape(logits.shape), mu, logvar)


class PlainLoop(Loop):
    """No fastvae: uint8 images resident on the device, a device permutation per epoch, best-form loss
    (eager, or the forward and loss under ``torch.compile``), one synchronisation per epoch."""

    def __init__(self, case: TrainCase, device: torch.device, compile: bool) -> None:
        from fastvae.data import load_mnist

        self.model = _new_model(case.model).to(device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=LR)
        self.data = load_mnist("train")[0].to(device)
        self.images = self.data.shape[0]
        self.batch = case.batch
        self.loss_fn: Callable[[torch.Tensor], torch.Tensor] = lambda x: plain_loss(self.model, x)
        if compile:
            self.loss_fn = torch.compile(self.loss_fn, dynamic=False)
        self.gen = torch.Generator(device=device)
        self.gen.manual_seed(SEED)
        self.device = device

    def epoch(self) -> tuple[float, float]:
        t0 = time.perf_counter()
        perm = torch.randperm(self.images, device=self.device, generator=self.gen)
        total = torch.zeros((), device=self.device)
        for start in range(0, self.images, self.batch):
            loss = self.loss_fn(self.data[perm[start : start + self.batch]])
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            total += loss.detach()
        mean = float(total) / self.images  # the epoch's one synchronisation
        return time.perf_counter() - t0, mean


# ----------------------------------------------------------------------------------------------
# fastvae's Trainer
# ----------------------------------------------------------------------------------------------


class TrainerLoop(Loop):
    """``fastvae.trainer.Trainer`` (options: compile, amp, cuda_graphs); an epoch is one more ``fit``
    epoch, whose time is the Trainer's own per-epoch ``seconds`` (data preparation in ``fit`` excluded)."""

    def __init__(self, case: TrainCase, device: torch.device, **options: Any) -> None:
        from fastvae.data import load_mnist
        from fastvae.trainer import Trainer

        self.trainer = Trainer(
            _new_model(case.model),
            lr=LR,
            batch_size=case.batch,
            device=device,
            seed=SEED,
            progress=False,
            **options,
        )
        self.train = load_mnist("train")
        self.images = self.train[0].shape[0]
        self.done = 0

    def epoch(self) -> tuple[float, float]:
        self.done += 1
        record = self.trainer.fit(self.train, epochs=self.done)[-1]
        return record["seconds"], record["train_loss"]


def make_loop(name: str, case: TrainCase, device: torch.device) -> Loop:
    """The loop called ``name`` (see :func:`variants`), set up and ready for its first epoch."""
    if name == "examples":
        return ExamplesLoop(case, device)
    if name in ("plain", "plain-compile"):
        return PlainLoop(case, device, compile=name == "plain-compile")
    options = {
        "trainer": {},
        "trainer-compile": {"compile": True},
        "trainer-amp-bf16": {"amp": "bf16"},
        "trainer-cuda-graphs": {"cuda_graphs": True},
    }
    return TrainerLoop(case, device, **options[name])


# ----------------------------------------------------------------------------------------------
# Running the loops of a case in turns
# ----------------------------------------------------------------------------------------------


def _failed(e: Exception) -> dict[str, Any]:
    return {"status": "FAILED", "reason": f"{type(e).__name__}: {e}"[:500]}


def run_case(
    case: TrainCase, names: list[str], device: torch.device, mode: str, log: Callable[[str], None] = print
) -> dict[str, dict[str, Any]]:
    """Train every loop of ``names`` on ``case``: warm-up epochs, then measured epochs in turns.

    The loops take turns epoch by epoch, with an idle gap before each epoch, so that bursts of load
    from other processes are spread over all of them and no loop starts while another's thread pool
    is still spinning.
    """
    warmup, epochs = epochs_for(mode)
    results: dict[str, dict[str, Any]] = {}
    loops: dict[str, Loop] = {}
    for name in names:
        t0 = time.perf_counter()
        try:
            loops[name] = loop = make_loop(name, case, device)
            for _ in range(warmup):
                loop.epoch()
        except Skip as e:
            results[name] = {"status": "skipped", "reason": str(e)}
        except Exception as e:
            results[name] = _failed(e)
        log(f"train {case.id} {name}: set up and warmed up in {time.perf_counter() - t0:.0f} s")
    seconds: dict[str, list[float]] = {n: [] for n in loops if n not in results}
    losses: dict[str, float] = {}
    for _ in range(epochs):
        for name in list(seconds):
            time.sleep(EPOCH_GAP_S)
            try:
                dt, losses[name] = loops[name].epoch()
                seconds[name].append(dt)
            except Exception as e:
                results[name] = _failed(e)
                del seconds[name]
    for name, secs in seconds.items():
        n = loops[name].images
        results[name] = {
            "status": "ok",
            "images": n,
            "epoch_s": secs,
            "samples_per_s": n / statistics.median(secs),
            "best_samples_per_s": n / min(secs),
            "last_train_loss": losses[name],
        }
    return {name: results[name] for name in names}


def run_variant(name: str, case: TrainCase, device: torch.device, mode: str) -> dict[str, Any]:
    """Train one loop on one case (pytest-benchmark's unit); returns its result."""
    return run_case(case, [name], device, mode, log=lambda _: None)[name]


def run_training(
    cases: list[TrainCase], device: torch.device, mode: str, *, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """The record's ``"training"`` section: one entry per case, one result per loop."""
    warmup, epochs = epochs_for(mode)
    section: dict[str, Any] = {"warmup_epochs": warmup, "epochs": epochs, "cases": []}
    why = missing_modules()
    if why is not None and cases:
        log(f"training benchmarks skipped: {why}")
        section["skipped"] = why
        return section
    for case in cases:
        results = run_case(case, variants(mode, device), device, mode, log)
        for name, r in results.items():
            what = f"{r['samples_per_s']:,.0f} samples/s" if r["status"] == "ok" else r["status"]
            log(f"train {case.id} {name}: {what} {r.get('reason', '')}")
            if r["status"] == "ok":
                r["speedup"] = {
                    b: r["samples_per_s"] / results[b]["samples_per_s"]
                    for b in BASELINES
                    if results.get(b, {}).get("status") == "ok"
                }
        section["cases"].append({**asdict(case), "id": case.id, "results": results})
    return section
