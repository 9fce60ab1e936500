"""Plain composite PyTorch implementation of the fused ops (``FASTVAE_BACKEND=torch``), and their
differentiable forms.

Two uses of the same math, written with ordinary torch operations so it runs on any device:

* the backend contract of :mod:`fastvae.backend` (``fused_loss``, ``scale_grads_``, ``reparameterize``,
  ``reparameterize_backward``): a comparison point for the kernels;
* differentiable forms used by :mod:`fastvae.ops` where a kernel cannot serve: inside ``torch.func``
  transforms (:func:`loss_terms`, :func:`reparameterize_differentiable`) and for a backward that builds
  a graph (:func:`loss_gradients`, ``create_graph=True``), whose second derivatives must be the true ones.

Philox4x32-10 is reproduced with int64 tensor arithmetic, so ``eps`` is exactly the kernels' (the key
may be an int or a device tensor: it is never read on the host).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastvae.backend import RECON_BCE, RECON_NONE, REDUCE_MEAN, REDUCE_NONE, Key, LossProblem

_M32 = 0xFFFFFFFF
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57


def _mul_hi_lo(const: int, c: Tensor) -> tuple[Tensor, Tensor]:
    """High and low 32-bit words of const * c for 32-bit words, in int64 without overflow.

    With c = ch 2^16 + cl:  hi = (const ch + (const cl >> 16)) >> 16; every partial stays below 2^49.
    """
    ch, cl = c >> 16, c & 0xFFFF
    p_hi, p_lo = const * ch, const * cl
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = ((p_hi & 0xFFFF) << 16) + p_lo
    return hi & _M32, lo & _M32


def randn(key: Key, counters: Tensor) -> Tensor:
    """tl.randn(key, counters) in float64 (uniforms bit-identical to the kernels')."""
    if isinstance(key, Tensor):
        key = key.reshape(()).to(device=counters.device, dtype=torch.int64)
    k0, k1 = key & _M32, (key >> 32) & _M32
    c0, c1 = counters & _M32, counters >> 32
    c2 = torch.zeros_like(counters)
    c3 = torch.zeros_like(counters)
    for _ in range(10):
        hi_b, lo_b = _mul_hi_lo(_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _M32, (k1 + _KEY_B) & _M32

    def uniform(word: Tensor) -> Tensor:
        x = torch.where(word >= 2**31, _M32 - word, word)  # int32 view, negative -> ~x
        return x.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32)

    u1 = torch.clamp(uniform(c0), min=torch.tensor(1.0e-7, dtype=torch.float32).item()).double()
    theta = (torch.tensor(6.283185307179586, dtype=torch.float32) * uniform(c1)).double()
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(theta)


def eps(like: Tensor, key: Key, offset: int) -> Tensor:
    """The eps of a call: ``eps[i] = randn(key, offset + i)`` over the flat index of ``like`` (float64)."""
    counters = offset + torch.arange(like.numel(), dtype=torch.int64, device=like.device)
    return randn(key, counters).reshape(like.shape)


# ----------------------------------------------------------------------------------------------
# The backend contract
# ----------------------------------------------------------------------------------------------


def reparameterize(mu: Tensor, logvar: Tensor, key: Key, offset: int) -> Tensor:
    """z = mu + exp(logvar / 2) * eps."""
    z = mu.double() + torch.exp(0.5 * logvar.double()) * eps(mu, key, offset)
    return z.to(mu.dtype)


def reparameterize_backward(dz: Tensor, logvar: Tensor, key: Key, offset: int) -> Tensor:
    """dlogvar = 0.5 * dz * exp(logvar / 2) * eps."""
    return (0.5 * dz.double() * torch.exp(0.5 * logvar.double()) * eps(dz, key, offset)).to(dz.dtype)


def _float_target(target: Tensor, dtype: torch.dtype) -> Tensor:
    return target.to(dtype) / 255.0 if target.dtype == torch.uint8 else target.to(dtype)


def fused_loss(p: LossProblem, logits, target, mu, logvar):
    """The contract of :class:`fastvae.backend.Backend`, in float32 (float64 for float64 inputs)."""
    B, device, acc = p.B, (logits if logits is not None else mu).device, p.acc
    ref_dtype = (logits if logits is not None else mu).dtype
    recon_rows = torch.zeros(B, dtype=acc, device=device)
    kl_rows = torch.zeros(B, dtype=acc, device=device)
    dlogits, dmu, dlogvar = (torch.empty(0, dtype=ref_dtype, device=device) for _ in range(3))
    if p.recon != RECON_NONE:
        x, t = logits.to(acc), _float_target(target, acc)
        if p.recon == RECON_BCE:
            recon_rows = (x.clamp(min=0) - x * t + torch.log1p(torch.exp(-x.abs()))).sum(1)
            grad = torch.sigmoid(x) - t
        else:
            recon_rows = ((x - t) ** 2).sum(1)
            grad = 2.0 * (x - t)
        if p.need_grad:
            dlogits = (grad * p.grad_scale).to(logits.dtype)
    if p.D:
        m, lv = mu.to(acc), logvar.to(acc)
        var = torch.exp(lv)
        kl_rows = (-0.5 * (1.0 + lv - m * m - var)).sum(1)
        if p.need_grad:
            dmu = (m * (p.beta * p.grad_scale)).to(mu.dtype)
            dlogvar = (0.5 * (var - 1.0) * (p.beta * p.grad_scale)).to(logvar.dtype)
    if p.reduction == REDUCE_NONE:
        return recon_rows + p.beta * kl_rows, recon_rows, kl_rows, dlogits, dmu, dlogvar
    scale = 1.0 / B if p.reduction == REDUCE_MEAN else 1.0
    r, k = recon_rows.sum() * scale, kl_rows.sum() * scale
    return r + p.beta * k, r, k, dlogits, dmu, dlogvar


def scale_grads_(grad: Tensor, dlogits: Tensor, dmu: Tensor, dlogvar: Tensor) -> None:
    """In place: saved gradient rows *= g (scalar, or [B] for reduction "none")."""
    g = grad.reshape(-1, 1) if grad.dim() == 1 else grad
    for buf in (dlogits, dmu, dlogvar):
        if buf.numel():
            buf.copy_(buf * g)


# ----------------------------------------------------------------------------------------------
# Differentiable forms (torch.func transforms, create_graph=True)
# ----------------------------------------------------------------------------------------------


def _reduce(rows: Tensor, reduction: int) -> Tensor:
    if reduction == REDUCE_NONE:
        return rows
    return rows.mean() if reduction == REDUCE_MEAN else rows.sum()


def loss_terms(logits, target, mu, logvar, beta, reduction: int, recon: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(recon + beta * kl, recon, kl)`` as differentiable torch operations (any transform applies).

    ``beta`` may be a float or a tensor.  BCE goes through ``F.binary_cross_entropy_with_logits``, whose
    derivative is exactly ``sigmoid(x) - t`` at every x (a hand-written ``max(x, 0) + log1p(e^-|x|)``
    would be differentiated to ``1 - t`` at x = 0).
    """
    ref = logits if logits is not None else mu
    acc = torch.float64 if ref.dtype == torch.float64 else torch.float32
    rows_r = rows_k = None
    if recon != RECON_NONE:
        x, t = logits.to(acc), _float_target(target, acc)
        if recon == RECON_BCE:
            rows_r = F.binary_cross_entropy_with_logits(x, t, reduction="none").sum(1)
        else:
            rows_r = ((x - t) ** 2).sum(1)
    if mu is not None:
        m, lv = mu.to(acc), logvar.to(acc)
        rows_k = (-0.5 * (1.0 + lv - m * m - torch.exp(lv))).sum(1)
    if rows_r is None:
        rows_r = torch.zeros_like(rows_k)
    if rows_k is None:
        rows_k = torch.zeros_like(rows_r)
    r, k = _reduce(rows_r, reduction), _reduce(rows_k, reduction)
    return r + beta * k, r, k


def loss_gradients(p: LossProblem, logits, target, mu, logvar, g: Tensor):
    """d(loss)/d(logits, mu, logvar) times the incoming ``g``, as differentiable operations.

    The closed forms (``sigmoid(x) - t``, ``2 (x - t)``, ``beta mu``, ``beta (e^lv - 1) / 2``, each times
    the reduction's scale) in the inputs' own dtype, so a second backward differentiates them exactly.
    """
    gcol = (g.reshape(-1, 1) if g.dim() == 1 else g) * p.grad_scale
    gx = gmu = glv = None
    if logits is not None and logits.requires_grad:
        t = _float_target(target, logits.dtype)
        d = torch.sigmoid(logits) - t if p.recon == RECON_BCE else 2.0 * (logits - t)
        gx = (d * gcol).to(logits.dtype)
    if mu is not None:
        kcol = gcol * p.beta
        if mu.requires_grad:
            gmu = (mu * kcol).to(mu.dtype)
        if logvar.requires_grad:
            glv = (0.5 * (torch.exp(logvar) - 1.0) * kcol).to(logvar.dtype)
    return gx, gmu, glv


def reparameterize_differentiable(mu: Tensor, logvar: Tensor, key: Key, offset: int) -> Tensor:
    """``mu + exp(logvar / 2) * eps`` as differentiable torch operations (the kernels' eps)."""
    e = eps(mu, key, offset).to(mu.dtype)
    return mu + torch.exp(0.5 * logvar) * e
