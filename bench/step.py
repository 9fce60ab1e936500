"""One training step of pytorch/examples' VAE, unchanged and with the README's three-line change.

The model is ``bench/examples_loop.py``'s :class:`~bench.examples_loop.VAE` (784-400-20-400-784,
pytorch/examples' ``vae/main.py``) at batch 128 on fastvae's MNIST training images (float pixels in
[0, 1], what the example's ``ToTensor`` gives), with Adam(1e-3).  A step is what the example's loop
does per batch, without its ``loss.item()``: ``zero_grad``, forward, loss, ``backward``, ``step``.

Variants (all four in one process, from the same initial weights, on the same batches):

* ``unchanged``: the example as it is: ``mu + randn_like(std) * std``, a sigmoid decoder and
  ``F.binary_cross_entropy(recon, x, reduction="sum") + KL``;
* ``fastvae``: the README's change: ``fastvae.reparameterize(mu, logvar)``, the decoder returns
  logits, ``fastvae.vae_loss(logits, x, mu, logvar)``;
* ``unchanged-compile`` and ``fastvae-compile``: the same, with the forward and the loss (one
  function of the batch) under ``torch.compile(dynamic=False)``; backward and Adam stay eager.

The variants take turns in blocks of steps (:func:`bench.timing.measure_many`: ``perf_counter``
on the CPU, CUDA events on a GPU); each reports the median ms per step, and the fastvae variants
their speed-up over the unchanged one in the same mode (issue 9's targets: >= 1.05x eager,
>= 1.0x compiled).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from bench import timing
from bench.examples_loop import VAE, loss_function

BATCH = 128
LR = 1e-3
SEED = 1  # the example's default seed
TARGETS = {"eager": 1.05, "compile": 1.0}  # fastvae step / unchanged step speed-up, at least
BUDGETS = {
    "smoke": timing.Budget(0.0, 3, 0.0, 0.5, 5, 0.05, 0.01, gpu_warmup_ms=5, gpu_rep_ms=10),
    "quick": timing.Budget(0.5, 150, 1.5, 5.0, 2_000, 0.15, 0.02, gpu_warmup_ms=50, gpu_rep_ms=300),
    "full": timing.Budget(1.0, 500, 5.0, 15.0, 10_000, 0.25, 0.02, gpu_warmup_ms=100, gpu_rep_ms=1000),
}
WARMUP_STEPS = {"smoke": 1, "quick": 5, "full": 10}  # before timing (JIT, torch.compile, allocator)


class FastVAEExample(VAE):
    """pytorch/examples' VAE with the README's change: fastvae's sampler, a decoder returning logits."""

    def reparameterize(self, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        import fastvae

        return fastvae.reparameterize(mu, logvar)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.fc4(F.relu(self.fc3(z)))  # logits: the loss applies the sigmoid


def fastvae_loss_function(
    logits: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor
) -> torch.Tensor:
    """The README's loss: BCE on logits + KL, summed, in one fused op."""
    import fastvae

    return fastvae.vae_loss(logits, x, mu, logvar)


def batches(device: torch.device, count: int) -> list[torch.Tensor]:
    """``count`` batches of 128 float training images [128, 1, 28, 28] in [0, 1] on ``device``
    (a fixed shuffle of fastvae's MNIST training split)."""
    from fastvae.data import load_mnist

    images = load_mnist("train")[0]
    gen = torch.Generator().manual_seed(SEED)
    order = torch.randperm(images.shape[0], generator=gen)[: count * BATCH]
    x = images[order].float().div_(255).reshape(count, BATCH, 1, 28, 28)
    return [b.to(device) for b in x.unbind(0)]


class Step:
    """One variant: its own model (same initial weights for all), Adam, and a rotating batch index.
    Calling it trains one step and returns the loss (not synchronised)."""

    def __init__(self, name: str, device: torch.device, data: list[torch.Tensor]) -> None:
        self.name = name
        torch.manual_seed(SEED)
        self.model = (FastVAEExample() if name.startswith("fastvae") else VAE()).to(device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=LR)
        loss_fn = fastvae_loss_function if name.startswith("fastvae") else loss_function

        def forward_loss(x: torch.Tensor) -> torch.Tensor:
            out, mu, logvar = self.model(x)
            return loss_fn(out, x, mu, logvar)

        self.forward_loss: Callable[[torch.Tensor], torch.Tensor] = forward_loss
        if name.endswith("compile"):
            self.forward_loss = torch.compile(forward_loss, dynamic=False)
        self.data, self.i = data, 0

    def __call__(self) -> torch.Tensor:
        x = self.data[self.i]
        self.i = (self.i + 1) % len(self.data)
        self.optimizer.zero_grad()
        loss = self.forward_loss(x)
        loss.backward()
        self.optimizer.step()
        return loss.detach()


def variants(compile: bool) -> list[str]:
    return ["unchanged", "fastvae"] + (["unchanged-compile", "fastvae-compile"] if compile else [])


def run_step(mode: str, device: torch.device, *, compile: bool, log: Callable[[str], None] = print) -> dict:
    """The record's ``"step"`` section: per variant its status, ms per step and first loss, and the
    speed-ups of the fastvae variants over the unchanged ones (``{"status": "FAILED", "reason"}`` when
    the data cannot be loaded)."""
    try:
        data = batches(device, 8 if mode == "smoke" else 64)
    except Exception as e:  # fastvae.data broken or absent: the rest of the record is still worth keeping
        log(f"step skipped: {type(e).__name__}: {e}")
        return {"status": "FAILED", "reason": f"{type(e).__name__}: {e}"[:500]}
    results: dict[str, dict[str, Any]] = {}
    steps: dict[str, Step] = {}
    for name in variants(compile):
        t0 = time.perf_counter()
        try:
            step = Step(name, device, data)
            first = float(step())
            for _ in range(WARMUP_STEPS[mode]):
                step()
            steps[name] = step
            results[name] = {"status": "ok", "first_loss": first, "setup_s": time.perf_counter() - t0}
        except Exception as e:  # a variant that cannot run (e.g. torch.compile failing) is reported
            results[name] = {"status": "FAILED", "reason": f"{type(e).__name__}: {e}"[:500]}
        log(f"step {name}: set up and warmed up in {time.perf_counter() - t0:.1f} s")
    for name, t in timing.measure_many(steps, device, BUDGETS[mode]).items():
        results[name]["time"] = t.to_dict()
        results[name]["ms_per_step"] = t.median_s * 1e3
    speedup = {}
    pairs = (("eager", "unchanged", "fastvae"), ("compile", "unchanged-compile", "fastvae-compile"))
    for kind, base, fast in pairs:
        a, b = results.get(base, {}), results.get(fast, {})
        if "time" in a and "time" in b:
            speedup[kind] = {
                "median": a["time"]["median_s"] / b["time"]["median_s"],
                "min": a["time"]["min_s"] / b["time"]["min_s"],
                "target": TARGETS[kind],
            }
    for name, r in results.items():
        log(f"step {name}: " + (f"{r['ms_per_step']:.3f} ms" if "time" in r else r["status"]))
    return {
        "status": "ok",
        "model": "pytorch/examples VAE 784-400-20",
        "batch": BATCH,
        "device": str(device),
        "results": results,
        "speedup": speedup,
    }
