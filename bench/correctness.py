"""The check every implementation passes before it is timed.

The output (loss, or ``z`` for reparameterize) and the gradients of one call on input set 0 are
compared with a float64 reference computed from the same input values:

* ``fastvae.reference`` (NumPy, float64) when the case has at most 2^24 elements per tensor;
* above that (large GPU cases, where NumPy would take minutes), the best PyTorch form evaluated in
  float64 on the device, in chunks of rows -- an independent implementation, upcast.

Errors are relative: ``|out - ref| / |ref|`` for a scalar loss and ``||g - ref|| / ||ref||`` (2-norm
over all elements) for a tensor; an implementation passes when every error is below
:data:`TOLERANCES` (1e-4 for fp32, 2e-2 for bf16) and everything is finite.

reparameterize: fastvae's backends draw eps from Philox at a counter of the seed and the element index, so
``z`` and the gradients are compared value for value with ``fastvae.reference``.  PyTorch's forms
draw eps from torch's generator, so they are checked on what must hold whatever eps is: the implied
``eps = (z - mu) / exp(logvar / 2)`` has mean 0 and standard deviation 1 (within 6 standard errors),
``dmu = dz`` and ``dlogvar = dz * (z - mu) / 2``.

The eager-seed form (sigmoid, then BCE) clamps ``log`` at -100 and its sigmoid saturates early in
bf16, so it is checked on moderate logits (halved: N(0, 1)); the timing inputs are the same for all.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from bench.cases import Case, Inputs
from bench.impls import BEST_FORM, Impl
from fastvae import reference as ref

TOLERANCES = {"fp32": 1e-4, "bf16": 2e-2}
NUMPY_MAX_ELEMENTS = 2**24
_CHUNK_ELEMENTS = 2**24


def _np(t: torch.Tensor) -> np.ndarray:
    """The exact values an implementation saw or produced, as float64 (uint8 kept: pixels)."""
    t = t.detach().cpu()
    return t.numpy() if t.dtype == torch.uint8 else t.double().numpy()


def _rel(actual: Any, expected: Any) -> float:
    """Relative error in the 2-norm; infinite if ``actual`` has a NaN or an infinity."""
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    if a.shape != e.shape:
        raise ValueError(f"shape {a.shape} != expected {e.shape}")
    if not np.all(np.isfinite(a)):
        return math.inf
    # Sums of squares, not np.linalg.norm: BLAS would start a third thread pool in the process.
    denom = math.sqrt(float(np.sum(e * e)))
    return math.sqrt(float(np.sum((a - e) ** 2))) / (denom if denom > 0 else 1.0)


class _NormAccumulator:
    """||a - e|| / ||e|| accumulated over chunks (for references computed chunk by chunk)."""

    def __init__(self) -> None:
        self.diff2 = self.ref2 = 0.0
        self.finite = True

    def add(self, a: torch.Tensor, e: torch.Tensor) -> None:
        a = a.detach().double()
        self.finite &= bool(torch.isfinite(a).all())
        self.diff2 += float(((a - e) ** 2).sum())
        self.ref2 += float((e**2).sum())

    def value(self) -> float:
        if not self.finite:
            return math.inf
        return math.sqrt(self.diff2) / (math.sqrt(self.ref2) if self.ref2 > 0 else 1.0)


def _numpy_reference(case: Case, i: Inputs) -> tuple[Any, list[np.ndarray]]:
    """(output, gradients) from fastvae.reference in float64; gradients in ``call``'s order."""
    bwd = case.mode == "fwd+bwd"
    if case.op == "vae_loss":
        args = (_np(i.logits), _np(i.target), _np(i.mu), _np(i.logvar))
        return ref.vae_loss(*args), list(ref.vae_loss_backward(*args)) if bwd else []
    if case.op == "bce_with_logits":
        args = (_np(i.logits), _np(i.target))
        return ref.bce_with_logits(*args), [ref.bce_with_logits_backward(*args)] if bwd else []
    if case.op == "kl_divergence":
        args = (_np(i.mu), _np(i.logvar))
        return ref.kl_divergence(*args), list(ref.kl_divergence_backward(*args)) if bwd else []
    z = ref.reparameterize(_np(i.mu), _np(i.logvar), i.seed)
    return z, list(ref.reparameterize_backward(_np(i.dz), _np(i.logvar), i.seed)) if bwd else []


def _compare_numpy(case: Case, i: Inputs, out: torch.Tensor, grads: tuple) -> tuple[float, float | None, str]:
    expected_out, expected_grads = _numpy_reference(case, i)
    out_err = _rel(_np(out), expected_out)
    grad_err = max((_rel(_np(g), e) for g, e in zip(grads, expected_grads, strict=True)), default=None)
    return out_err, grad_err, "fastvae.reference (float64 NumPy)"


def _compare_chunked_float64(
    case: Case, i: Inputs, out: torch.Tensor, grads: tuple
) -> tuple[float, float | None, str]:
    """The best PyTorch form in float64 on the device, row chunk by row chunk (sum reduction)."""
    names = [n for n in ("logits", "target", "mu", "logvar") if getattr(i, n) is not None]
    rows = max(1, _CHUNK_ELEMENTS // max(case.features, case.latent, 1))
    bwd = case.mode == "fwd+bwd"
    total = 0.0
    accs = [_NormAccumulator() for _ in grads]
    for start in range(0, case.batch, rows):
        sl = slice(start, start + rows)
        args = []
        for n in names:
            x = getattr(i, n)[sl].detach()
            x = x.double() if x.dtype != torch.uint8 else x.double() / 255
            args.append(x.requires_grad_(bwd and n != "target"))
        with torch.enable_grad() if bwd else torch.no_grad():
            loss = BEST_FORM[case.op](*args)
            if bwd:
                chunk_grads = torch.autograd.grad(
                    loss, [a for a, n in zip(args, names, strict=True) if n != "target"]
                )
                for acc, g, e in zip(accs, grads, chunk_grads, strict=True):
                    acc.add(g[sl], e)
        total += float(loss)
    out_err = _rel(float(out), total)
    grad_err = max((a.value() for a in accs), default=None)
    return out_err, grad_err, "best PyTorch form in float64 on the device (case above 2^24 elements)"


def _check_torch_rng_sample(
    case: Case, i: Inputs, z: torch.Tensor, grads: tuple
) -> tuple[float, float | None, str]:
    """reparameterize with torch's generator: eps statistics and self-consistent gradients."""
    mu, lv, zz = _np(i.mu), _np(i.logvar), _np(z)
    eps = (zz - mu) / np.exp(0.5 * lv)
    n = eps.size
    # Errors scaled so that 1.0 means "6 standard errors off" (against tolerance-sized errors).
    stat_err = max(
        abs(float(eps.mean())) / (6 / math.sqrt(n)), abs(float(eps.std()) - 1) / (6 / math.sqrt(2 * n))
    )
    out_err = 0.0 if stat_err <= 1.0 else stat_err
    grad_err = None
    if grads:
        dz = _np(i.dz)
        grad_err = max(_rel(_np(grads[0]), dz), _rel(_np(grads[1]), 0.5 * dz * (zz - mu)))
    return (
        out_err,
        grad_err,
        "eps statistics (mean 0, std 1 within 6 standard errors); dmu = dz, dlogvar = dz (z - mu) / 2",
    )


def check(impl: Impl, case: Case, inputs: Inputs, out: torch.Tensor, grads: tuple) -> dict[str, Any]:
    """Compare one call's output and gradients with the reference; returns the record's ``"check"``."""
    tol = TOLERANCES[case.dtype]
    if case.op == "reparameterize" and not impl.philox_eps:
        out_err, grad_err, how = _check_torch_rng_sample(case, inputs, out, grads)
        passed_out = out_err == 0.0
    else:
        big = case.elements > NUMPY_MAX_ELEMENTS
        compare = _compare_chunked_float64 if big else _compare_numpy
        out_err, grad_err, how = compare(case, inputs, out, grads)
        passed_out = out_err < tol
    passed = passed_out and (grad_err is None or grad_err < tol)
    return {
        "passed": bool(passed),
        "out_rel_err": out_err,
        "grad_rel_err": grad_err,
        "tolerance": tol,
        "reference": how,
        "inputs": "moderate logits N(0, 1)" if impl.moderate_logits and case.has_recon else "input set 0",
    }
