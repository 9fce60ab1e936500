"""The implementations compared: each computes the same loss (or sample) and the same gradients.

* ``fastvae``: the public ops on the default backend of the device (``auto``: Numba on CPU, Triton on
  CUDA) with default arguments -- on the CPU that includes the BCE target range check (one
  ``aminmax`` pass over float targets);
* ``fastvae[validate=False]``: the same without the range check (CPU, float targets), so the cost
  of the check can be read off;
* ``fastvae[<backend>]``: the other backends that run on the device (``torch``: the composite
  PyTorch backend; ``cupy`` on CUDA when CuPy is installed).  The Triton interpreter on the CPU is
  a testing tool, not a speed backend, and is not benchmarked;
* ``eager-seed``: PyTorch as the tutorials (pytorch/examples' ``vae/main.py``) write it: ``torch.sigmoid``
  then ``F.binary_cross_entropy(reduction="sum")``, the KL expression
  ``-0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())`` and ``mu + torch.randn_like(std) * std``;
* ``eager-best``: PyTorch in its best eager form: ``F.binary_cross_entropy_with_logits(reduction="sum")``
  + the same KL, and ``torch.addcmul(mu, torch.randn_like(std), std)``;
* ``compile``: ``torch.compile`` of the best form (and on CUDA also with
  ``mode="max-autotune-no-cudagraphs"``).

uint8 targets are handed to the PyTorch forms converted as a user would (``t.to(dtype) / 255``,
inside the timed call); fastvae reads them as they are.  The eager forms return the loss in the
input dtype (bf16 for bf16 inputs), fastvae in fp32.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F

import fastvae
from bench.cases import Case, Inputs

BASELINES = ("eager-seed", "eager-best", "compile")  # the columns of the speed-up ratios
_ARGS = {
    "vae_loss": ("logits", "target", "mu", "logvar"),
    "bce_with_logits": ("logits", "target"),
    "kl_divergence": ("mu", "logvar"),
    "reparameterize": ("mu", "logvar"),
}


# ----------------------------------------------------------------------------------------------
# The PyTorch forms (module-level functions: torch.compile caches its graphs on their code)
# ----------------------------------------------------------------------------------------------


def _float_target(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> floats in [0, 1] in the logits' dtype, as a user would convert them."""
    return target.to(logits.dtype) / 255 if target.dtype == torch.uint8 else target


def kl_expression(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """pytorch/examples' KL term (the same in both eager forms)."""
    return -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())


def seed_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy(torch.sigmoid(logits), _float_target(logits, target), reduction="sum")


def best_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, _float_target(logits, target), reduction="sum")


def seed_vae_loss(logits, target, mu, logvar) -> torch.Tensor:
    return seed_bce(logits, target) + kl_expression(mu, logvar)


def best_vae_loss(logits, target, mu, logvar) -> torch.Tensor:
    return best_bce(logits, target) + kl_expression(mu, logvar)


def seed_reparameterize(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    std = torch.exp(0.5 * logvar)
    eps = torch.randn_like(std)
    return mu + eps * std


def best_reparameterize(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    std = torch.exp(0.5 * logvar)
    return torch.addcmul(mu, torch.randn_like(std), std)


SEED_FORM = {
    "vae_loss": seed_vae_loss,
    "bce_with_logits": seed_bce,
    "kl_divergence": kl_expression,
    "reparameterize": seed_reparameterize,
}
BEST_FORM = {
    "vae_loss": best_vae_loss,
    "bce_with_logits": best_bce,
    "kl_divergence": kl_expression,
    "reparameterize": best_reparameterize,
}


# ----------------------------------------------------------------------------------------------
# Implementations
# ----------------------------------------------------------------------------------------------


class Impl:
    """One way of computing the ops.  ``forward(op, inputs)`` returns the loss (or ``z``)."""

    name: str = ""
    kind: str = ""
    description: str = ""
    #: True when reparameterize draws eps from fastvae's Philox stream (comparable value for value
    #: with fastvae.reference); False for torch's generator (checked statistically).
    philox_eps: bool = False
    #: Check on moderate logits (see Inputs.with_moderate_logits).
    moderate_logits: bool = False

    def unsupported(self, case: Case) -> str | None:
        """Why this implementation does not run ``case`` (None if it does)."""
        return None

    def context(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def forward(self, op: str, inputs: Inputs) -> torch.Tensor:
        raise NotImplementedError

    def info(self) -> dict[str, Any]:
        return {"kind": self.kind, "description": self.description}


class FastVAE(Impl):
    """fastvae's public ops on one backend (``"auto"``: the device's default)."""

    kind = "fastvae"
    philox_eps = True

    def __init__(self, device: torch.device, backend: str = "auto", validate: bool | None = None) -> None:
        self.backend_name = backend
        self.validate = validate
        with fastvae.use_backend(backend):
            self.backend = fastvae.backend_for(device)
        suffix = [] if backend == "auto" else [backend]
        suffix += [] if validate is None else [f"validate={validate}"]
        self.name = "fastvae" + (f"[{','.join(suffix)}]" if suffix else "")
        self.description = f"fastvae ops, {self.backend} backend" + (
            "" if validate is None else f", validate={validate}"
        )

    def unsupported(self, case: Case) -> str | None:
        if self.validate is not None and not (case.has_recon and case.target == "float"):
            return "the range check applies to float targets only"
        return None

    def context(self) -> contextlib.AbstractContextManager:
        return fastvae.use_backend(self.backend_name)

    def forward(self, op: str, inputs: Inputs) -> torch.Tensor:
        i = inputs
        if op == "vae_loss":
            return fastvae.vae_loss(i.logits, i.target, i.mu, i.logvar, validate=self.validate)
        if op == "bce_with_logits":
            return fastvae.bce_with_logits(i.logits, i.target, validate=self.validate)
        if op == "kl_divergence":
            return fastvae.kl_divergence(i.mu, i.logvar)
        return fastvae.reparameterize(i.mu, i.logvar, seed=i.seed)

    def info(self) -> dict[str, Any]:
        return {**super().info(), "backend": self.backend, "validate": self.validate}


class Eager(Impl):
    """A PyTorch form, run eagerly: ``"seed"`` (tutorial) or ``"best"``."""

    kind = "eager"

    def __init__(self, form: str) -> None:
        self.form = form
        self.name = f"eager-{form}"
        self.functions = SEED_FORM if form == "seed" else BEST_FORM
        self.moderate_logits = form == "seed"
        self.description = (
            "torch.sigmoid + F.binary_cross_entropy + KL expression; mu + randn_like(std) * std"
            if form == "seed"
            else "F.binary_cross_entropy_with_logits + KL expression; addcmul(mu, randn_like(std), std)"
        )

    def forward(self, op: str, inputs: Inputs) -> torch.Tensor:
        return self.functions[op](*(getattr(inputs, a) for a in _ARGS[op]))


_compiled: dict[tuple[str, str | None], Callable[..., torch.Tensor]] = {}


@contextlib.contextmanager
def compile_settings() -> Iterator[None]:
    """Room for one graph per case (each case is a new static shape) instead of dynamo's fallback to
    eager after a few recompilations; restored on exit, so that other code in the process (the
    Trainer's torch.compile) keeps dynamo's defaults."""
    names = (
        "recompile_limit",
        "accumulated_recompile_limit",
        "cache_size_limit",
        "accumulated_cache_size_limit",
    )
    present = [n for n in names if hasattr(torch._dynamo.config, n)]
    limits = {n: 4096 for n in present[:2]}  # the current names if present, else the older ones
    with torch._dynamo.config.patch(limits):
        yield


class Compiled(Impl):
    """``torch.compile`` (static shapes) of the best PyTorch form."""

    kind = "compile"

    def __init__(self, mode: str | None = None) -> None:
        self.mode = mode
        self.name = "compile" if mode is None else f"compile[{mode}]"
        self.description = (
            f"torch.compile(best form, dynamic=False{'' if mode is None else f', mode={mode!r}'})"
        )

    def unsupported(self, case: Case) -> str | None:
        if not case.compile:
            return "not compiled in this mode (compile time); the full grid compiles every case"
        return None

    def forward(self, op: str, inputs: Inputs) -> torch.Tensor:
        key = (op, self.mode)
        if key not in _compiled:
            _compiled[key] = torch.compile(BEST_FORM[op], dynamic=False, mode=self.mode)
        return _compiled[key](*(getattr(inputs, a) for a in _ARGS[op]))


def _cupy_unavailable() -> str | None:
    try:
        cupy_mod = importlib.import_module("fastvae.cupy")
    except ImportError as e:
        return f"fastvae.cupy not importable: {e}"
    return None if cupy_mod.is_available() else "CuPy is not installed (pip install fastvae[cupy])"


def implementations(device: torch.device, *, compile: bool = True) -> tuple[list[Impl], dict[str, str]]:
    """The implementations that run on ``device``, and those left out with the reason why."""
    impls: list[Impl] = [FastVAE(device)]
    skipped: dict[str, str] = {}
    if device.type == "cpu":
        impls += [FastVAE(device, validate=False), FastVAE(device, backend="torch")]
        skipped["fastvae[triton]"] = "the Triton interpreter on the CPU is a test tool, not a speed backend"
    else:
        impls.append(FastVAE(device, backend="torch"))
        why = _cupy_unavailable()
        if why is None:
            impls.append(FastVAE(device, backend="cupy"))
        else:
            skipped["fastvae[cupy]"] = why
    impls += [Eager("seed"), Eager("best")]
    modes = [None] + (["max-autotune-no-cudagraphs"] if device.type == "cuda" else [])
    for mode in modes:
        if compile:
            impls.append(Compiled(mode))
        else:
            skipped[Compiled(mode).name] = "torch.compile disabled for this run"
    return impls, skipped


# ----------------------------------------------------------------------------------------------
# One call: what is timed
# ----------------------------------------------------------------------------------------------


def call(impl: Impl, case: Case, inputs: Inputs) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Forward (under ``no_grad``) or forward + backward; returns the output and the gradients.

    Gradients are taken with ``torch.autograd.grad`` (nothing accumulates into ``.grad``): with
    respect to (logits, mu, logvar) for vae_loss, (logits,) for bce_with_logits, (mu, logvar) for
    kl_divergence and reparameterize (whose upstream gradient is ``inputs.dz``).
    """
    with impl.context():
        if case.mode == "fwd":
            with torch.no_grad():
                return impl.forward(case.op, inputs), ()
        out = impl.forward(case.op, inputs)
        if case.op == "reparameterize":
            return out, torch.autograd.grad(out, (inputs.mu, inputs.logvar), grad_outputs=inputs.dz)
        return out, torch.autograd.grad(out, inputs.grad_inputs())


class Rotation:
    """``fn()`` calls ``impl`` on the next input set each time (what the timers call)."""

    def __init__(self, impl: Impl, case: Case, sets: list[Inputs]) -> None:
        self.impl, self.case, self.sets, self.i = impl, case, sets, 0

    def __call__(self) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        inputs = self.sets[self.i]
        self.i = (self.i + 1) % len(self.sets)
        return call(self.impl, self.case, inputs)
