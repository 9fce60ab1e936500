"""The backend contract: what every implementation of the fused ops provides, defined once.

A backend is a module (``fastvae.kernels.fused_loss`` + ``reparameterize`` for Triton,
``fastvae.kernels.numba_cpu``, ``fastvae.kernels.composite``, ``fastvae.kernels.cupy_launch``) with
the four functions of :class:`Backend`.  Everything that does not depend on the backend (shapes,
B / F / D, the accumulator dtype, the gradient scale of the reduction, the recon kind, whether a
gradient is stored, the random-number key) is resolved once in :mod:`fastvae.ops` and handed over as
a :class:`LossProblem` and plain arguments, so no backend repeats that prologue.

Numbering shared by every backend (and the kernels' constexprs)::

    recon:      RECON_NONE = 0 (KL only), RECON_BCE = 1, RECON_MSE = 2, RECON_GAUSSIAN = 3,
                RECON_CB = 4 (continuous Bernoulli)
    reduction:  REDUCE_SUM = 0, REDUCE_MEAN = 1, REDUCE_NONE = 2

Random numbers (the RNG contract, also in the README): ``eps[i] = randn(key, offset + i)`` for the
flat C-order index ``i`` of the call, where ``randn(key, n)`` is normal ``n & 3`` of one
Philox4x32-10 call with the key 0 at the counter ``(c_lo, c_hi, key_lo, key_hi)``, ``c = n >> 2`` (the
64-bit ``key`` selects the stream; the key schedule is a constant); its four words made uniforms
``u1..u4`` as ``tl.rand4x`` does and Box-Muller on ``(u1, u2)`` -> ``r cos, r sin`` and on ``(u3, u4)``
-> ``r cos, r sin`` (``fastvae.reference.randn``; four elements share a Philox call).  ``key`` is either a
Python ``int`` (an explicit ``seed=``) or a 1-element ``int64`` tensor on the ops' device, drawn there
from torch's generator and read *inside* the kernel, never on the host (graph-safe: a captured CUDA
graph draws a fresh key on each replay).
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch
from torch import Tensor

__all__ = [
    "RECON_NONE",
    "RECON_BCE",
    "RECON_MSE",
    "RECON_GAUSSIAN",
    "RECON_CB",
    "RECONS",
    "REDUCE_SUM",
    "REDUCE_MEAN",
    "REDUCE_NONE",
    "REDUCTIONS",
    "Key",
    "LossProblem",
    "Backend",
]

RECON_NONE, RECON_BCE, RECON_MSE, RECON_GAUSSIAN, RECON_CB = 0, 1, 2, 3, 4
RECONS = {
    "none": RECON_NONE,
    "bce": RECON_BCE,
    "mse": RECON_MSE,
    "gaussian": RECON_GAUSSIAN,
    "continuous_bernoulli": RECON_CB,
}
REDUCE_SUM, REDUCE_MEAN, REDUCE_NONE = 0, 1, 2
REDUCTIONS = {"sum": REDUCE_SUM, "mean": REDUCE_MEAN, "none": REDUCE_NONE}

#: An explicit seed (int in [0, 2**63)) or a 1-element int64 tensor on the ops' device.
Key = int | Tensor


class LossProblem(NamedTuple):
    """One fused-loss call, resolved by :mod:`fastvae.ops` before any backend runs.

    ``B`` rows; ``F`` reconstruction features (0: no reconstruction term, ``recon == RECON_NONE``);
    ``D`` latent dims (0: no KL term).  ``grad_scale`` is d(reduced loss)/d(per-sample loss) for an
    incoming gradient of 1: ``1 / B`` for the mean, else 1.  ``beta`` weights the KL term.
    ``need_grad``: write d(loss)/d(logits, mu, logvar) during the forward.  ``acc`` is the dtype of
    the losses (float32; float64 for float64 inputs).  ``scale_grad`` (Gaussian only, with
    ``need_grad``): also write d(loss)/d(log_scale) per element.
    """

    B: int
    F: int
    D: int
    recon: int
    reduction: int
    beta: float
    grad_scale: float
    need_grad: bool
    acc: torch.dtype
    scale_grad: bool = False


class Backend(Protocol):
    """The four functions of a backend.  Tensors arrive validated, on one device, and that device is the
    current one (``fastvae.ops`` makes it so): a backend launches on the current device's current stream.

    ``logits``/``target`` are ``[B, F]`` and ``mu``/``logvar`` ``[B, D]`` views whose features are
    contiguous (``stride(1) == 1``; rows may be strided), or None when the term is absent.  ``target``
    may be uint8 pixels, read as ``t / 255``.
    """

    def fused_loss(
        self,
        p: LossProblem,
        logits: Tensor | None,
        target: Tensor | None,
        mu: Tensor | None,
        logvar: Tensor | None,
        log_scale: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """``(loss, recon, kl, dlogits, dmu, dlogvar, dlog_scale)``.

        Per element (``x`` logits, ``t`` target, ``s`` log_scale, ``sigma = exp(s)``)::

            bce:                  softplus(x) - x t                      d/dx = sigmoid(x) - t
            mse:                  (x - t)^2                              d/dx = 2 (x - t)
            gaussian:             0.5 (x - t)^2 e^(-2s) + s + 0.5 log(2 pi)
                                  d/dx = (x - t) e^(-2s),   d/ds = 1 - (x - t)^2 e^(-2s)
            continuous_bernoulli: softplus(x) - x t - log C(x),  log C(x) = log(x / tanh(x / 2))
                                  (log 2 at x = 0),  d/dx = sigmoid(x) - t - (1/x - 1/sinh(x))

        ``log_scale`` is None unless ``p.recon == RECON_GAUSSIAN``; then a contiguous 1-D tensor in
        ``p.acc`` with 1 element (one scale) or ``F`` (one per feature).  ``dlog_scale`` is ``[B, F]`` in
        ``p.acc``, d(reduced loss)/d(s) per element (times ``p.grad_scale`` like the other gradients; the
        caller sums it down to the scale's shape) when ``p.need_grad and p.scale_grad``, else empty.

        ``loss = recon + beta * kl`` with ``p.reduction`` applied to both terms, each in ``p.acc``:
        0-d for sum/mean (they may be views of one buffer), ``[B]`` for none.  The gradients are those
        of the reduced loss for an incoming gradient of 1 (for none, of ``loss.sum()``), contiguous
        ``[B, F]`` / ``[B, D]`` in the dtype of logits / mu / logvar; an empty tensor (``numel() == 0``)
        where the term is absent or ``not p.need_grad``.  Deterministic: bit-identical on every run.
        """
        ...

    def scale_grads_(self, grad: Tensor, dlogits: Tensor, dmu: Tensor, dlogvar: Tensor) -> None:
        """In place: every gradient row ``b *= grad`` (a 0-d tensor) or ``grad[b]`` (``[B]``, reduction
        none).  Empty gradients are skipped; rows whose factor is exactly 1 are not touched."""
        ...

    def reparameterize(self, mu: Tensor, logvar: Tensor, key: Key, offset: int) -> Tensor:
        """``z = mu + exp(logvar / 2) * eps``, ``eps[i] = randn(key, offset + i)``; inputs contiguous,
        of one shape and dtype; ``z`` new, contiguous, of that shape and dtype."""
        ...

    def reparameterize_backward(self, dz: Tensor, logvar: Tensor, key: Key, offset: int) -> Tensor:
        """``dlogvar = 0.5 * dz * exp(logvar / 2) * eps`` with the eps of the forward (``dmu = dz``)."""
        ...
