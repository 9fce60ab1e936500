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

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from fastvae.backend import (
    RECON_BCE,
    RECON_CB,
    RECON_GAUSSIAN,
    RECON_MSE,
    RECON_NONE,
    REDUCE_MEAN,
    REDUCE_NONE,
    Key,
    LossProblem,
)
from fastvae.reference import _CB_K_SERIES

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


def _philox4(key: Key, counters: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The four words of Philox4x32-10 with the key 0 at the counters (lo, hi, key_lo, key_hi), as int64:
    the 64-bit key selects the stream (``fastvae.reference.uniform4``)."""
    if isinstance(key, Tensor):
        key = key.reshape(()).to(device=counters.device, dtype=torch.int64)
    k0, k1 = 0, 0
    c0, c1 = counters & _M32, counters >> 32
    c2 = torch.zeros_like(counters) + (key & _M32)
    c3 = torch.zeros_like(counters) + ((key >> 32) & _M32)
    for _ in range(10):
        hi_b, lo_b = _mul_hi_lo(_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _M32, (k1 + _KEY_B) & _M32
    return c0, c1, c2, c3


def _uniform(word: Tensor) -> Tensor:
    """Triton's uint_to_uniform_float of a 32-bit word held in an int64: as int32, negative -> ~x."""
    x = torch.where(word >= 2**31, _M32 - word, word)
    return x.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32)


def _box_muller(wa: Tensor, wb: Tensor) -> tuple[Tensor, Tensor]:
    """(r cos theta, r sin theta) in float64 from two Philox words: u1 = max(1e-7, u_a),
    theta = float32(2 pi) u_b (a float32 product, as in the kernels), r = sqrt(-2 ln u1)."""
    u1 = torch.clamp(_uniform(wa), min=torch.tensor(1.0e-7, dtype=torch.float32).item()).double()
    theta = (torch.tensor(6.283185307179586, dtype=torch.float32) * _uniform(wb)).double()
    r = torch.sqrt(-2.0 * torch.log(u1))
    return r * torch.cos(theta), r * torch.sin(theta)


def randn(key: Key, counters: Tensor) -> Tensor:
    """The normal of each element counter n (int64, >= 0) in float64, uniforms bit-identical to the
    kernels': ``reference.randn4(key, n >> 2)[n & 3]``, i.e. Box-Muller on the Philox words (w1, w2) for lanes
    0, 1 and (w3, w4) for lanes 2, 3: u1 = max(1e-7, u_a), theta = float32(2 pi) u_b,
    n = sqrt(-2 ln u1) (cos theta for even lanes, sin theta for odd)."""
    w1, w2, w3, w4 = _philox4(key, counters >> 2)
    second = (counters & 2) != 0
    n_cos, n_sin = _box_muller(torch.where(second, w3, w1), torch.where(second, w4, w2))
    return torch.where((counters & 1) != 0, n_sin, n_cos)


def eps(like: Tensor, key: Key, offset: int) -> Tensor:
    """The eps of a call: ``eps[i] = randn(key, offset + i)`` over the flat index of ``like`` (float64).

    The counters offset .. offset + n - 1 lie in the Philox counters q = offset >> 2 .. (offset + n - 1)
    >> 2: one Philox call and two Box-Mullers per q give its 4 normals, laid out [q, lane] and sliced
    from lane offset & 3."""
    n = like.numel()
    first = offset >> 2
    quads = first + torch.arange((offset + n + 3) // 4 - first, dtype=torch.int64, device=like.device)
    w1, w2, w3, w4 = _philox4(key, quads)
    n1, n2 = _box_muller(w1, w2)
    n3, n4 = _box_muller(w3, w4)
    normals = torch.stack((n1, n2, n3, n4), dim=1).reshape(-1)
    return normals[offset & 3 : (offset & 3) + n].reshape(like.shape)


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
    """The target as ``dtype``: uint8 pixels read as ``t / 255``."""
    return target.to(dtype) / 255.0 if target.dtype == torch.uint8 else target.to(dtype)


_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)
# Continuous Bernoulli: softplus(x) - x t - log C(x) = x (1/2 - t) + K(x) with the even part
# K(x) = log(sinh(x/2) / (x/2)) (the two ~ln 2 terms of softplus and log C never cancel near 0; see
# fastvae.reference), d/dx = 1/2 - t + K'(x).  |x| >= 1: K = |x|/2 - log|x| + log(1 - e^-|x|),
# K' = sign(x) (1/2 - 1/|x| + e^-|x| / (1 - e^-|x|)); |x| < 1: K = sum_k c_k x^(2k) (radius 2 pi, 10 terms:
# truncation < 1e-17 relative; the coefficients are fastvae.reference's), K' = sum_k 2k c_k x^(2k-1).


def _cb_split(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(|x| < 1, x for the closed forms, x for the series): each branch's input is made harmless where
    the other is selected (1 and 0), so no inf or NaN reaches a gradient through ``torch.where``."""
    small = x.abs() < 1.0
    return small, torch.where(small, torch.ones_like(x), x), torch.where(small, x, torch.zeros_like(x))


def cb_even(x: Tensor) -> Tensor:
    """``K(x) = softplus(x) - x/2 - log C(x) = log(sinh(x/2) / (x/2))``, ``log C(x) = log(x / tanh(x/2))``:
    differentiable to any order, exact derivatives at and near 0."""
    small, xc, xs = _cb_split(x)
    a = xc.abs()
    closed = 0.5 * a - torch.log(a) + torch.log(-torch.expm1(-a))
    z = xs * xs
    series = torch.zeros_like(z)
    for c in reversed(_CB_K_SERIES):
        series = series * z + c
    return torch.where(small, z * series, closed)


def cb_even_grad(x: Tensor) -> Tensor:
    """``K'(x) = (coth(x/2) - 2/x) / 2 = sigmoid(x) - 1/2 - (1/x - 1/sinh(x))``, differentiable."""
    small, xc, xs = _cb_split(x)
    a = xc.abs()
    closed = torch.sign(xc) * (0.5 - 1.0 / a + torch.exp(-a) / -torch.expm1(-a))
    z = xs * xs
    series = torch.zeros_like(z)
    for k in reversed(range(len(_CB_K_SERIES))):
        series = series * z + 2 * (k + 1) * _CB_K_SERIES[k]
    return torch.where(small, xs * series, closed)


def _recon_loss(recon: int, x: Tensor, t: Tensor, s: Tensor | None) -> Tensor:
    """The per-element loss of a reconstruction term (``s``: the Gaussian's log_scale)."""
    if recon == RECON_MSE:
        return (x - t) ** 2
    if recon == RECON_GAUSSIAN:
        return 0.5 * (x - t) ** 2 * torch.exp(-2.0 * s) + s + _HALF_LOG_2PI
    if recon == RECON_BCE:
        return x.clamp(min=0) - x * t + torch.log1p(torch.exp(-x.abs()))
    return x * (0.5 - t) + cb_even(x)


def _recon_grad(recon: int, x: Tensor, t: Tensor, s: Tensor | None) -> Tensor:
    """d/dx of :func:`_recon_loss`: ``2 (x - t)``, ``(x - t) e^(-2s)``, ``sigmoid(x) - t``,
    ``1/2 - t + K'(x)``."""
    if recon == RECON_MSE:
        return 2.0 * (x - t)
    if recon == RECON_GAUSSIAN:
        return (x - t) * torch.exp(-2.0 * s)
    if recon == RECON_BCE:
        return torch.sigmoid(x) - t
    return 0.5 - t + cb_even_grad(x)


def fused_loss(p: LossProblem, logits, target, mu, logvar, log_scale=None):
    """The contract of :class:`fastvae.backend.Backend` in float32 (float64 for float64 inputs):
    ``(loss, recon, kl, dlogits, dmu, dlogvar, dlog_scale)``, the per-element formulas there."""
    B, device, acc = p.B, (logits if logits is not None else mu).device, p.acc
    ref_dtype = (logits if logits is not None else mu).dtype
    recon_rows = torch.zeros(B, dtype=acc, device=device)
    kl_rows = torch.zeros(B, dtype=acc, device=device)
    dlogits, dmu, dlogvar = (torch.empty(0, dtype=ref_dtype, device=device) for _ in range(3))
    dlog_scale = torch.empty(0, dtype=acc, device=device)
    if log_scale is not None and p.recon != RECON_GAUSSIAN:
        raise ValueError(
            f"log_scale is only read by the Gaussian (recon {RECON_GAUSSIAN}), got recon {p.recon}"
        )
    if p.recon != RECON_NONE:
        x, t = logits.to(acc), _float_target(target, acc)
        s = None
        if p.recon == RECON_GAUSSIAN:
            if log_scale is None or log_scale.dim() != 1 or log_scale.numel() not in (1, p.F):
                got = None if log_scale is None else tuple(log_scale.shape)
                raise ValueError(f"log_scale must be a 1-D tensor of 1 or F = {p.F} elements, got {got}")
            s = log_scale.to(acc)
        recon_rows = _recon_loss(p.recon, x, t, s).sum(1)
        if p.need_grad:
            grad = _recon_grad(p.recon, x, t, s)
            dlogits = (grad * p.grad_scale).to(logits.dtype)
            if p.scale_grad and s is not None:  # d/ds = 1 - (x - t)^2 e^(-2s) = 1 - (x - t) d/dx
                dlog_scale = (1.0 - (x - t) * grad) * p.grad_scale
    if p.D:
        m, lv = mu.to(acc), logvar.to(acc)
        var = torch.exp(lv)
        kl_rows = (-0.5 * (1.0 + lv - m * m - var)).sum(1)
        if p.need_grad:
            dmu = (m * (p.beta * p.grad_scale)).to(mu.dtype)
            dlogvar = (0.5 * (var - 1.0) * (p.beta * p.grad_scale)).to(logvar.dtype)
    if p.reduction == REDUCE_NONE:
        return recon_rows + p.beta * kl_rows, recon_rows, kl_rows, dlogits, dmu, dlogvar, dlog_scale
    scale = 1.0 / B if p.reduction == REDUCE_MEAN else 1.0
    r, k = recon_rows.sum() * scale, kl_rows.sum() * scale
    return r + p.beta * k, r, k, dlogits, dmu, dlogvar, dlog_scale


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


def loss_terms(
    logits, target, mu, logvar, beta, reduction: int, recon: int, log_scale=None
) -> tuple[Tensor, Tensor, Tensor]:
    """``(recon + beta * kl, recon, kl)`` as differentiable torch operations (any transform applies).

    Differentiable in every tensor: logits, a float target, mu, logvar, ``log_scale`` (Gaussian: ``s``
    broadcastable to ``[B, F]``, e.g. 1 or F elements) and ``beta`` (a float or a tensor).  BCE goes
    through ``F.binary_cross_entropy_with_logits``, whose derivative is exactly ``sigmoid(x) - t`` at
    every x (a hand-written ``max(x, 0) + log1p(e^-|x|)`` would be differentiated to ``1 - t`` at
    x = 0); the continuous Bernoulli is ``x (1/2 - t) + K(x)`` (:func:`cb_even`, exact derivatives at
    and near 0); the Gaussian is ``0.5 (x - t)^2 e^(-2s) + s + 0.5 log(2 pi)``.
    """
    ref = logits if logits is not None else mu
    acc = torch.float64 if ref.dtype == torch.float64 else torch.float32
    rows_r = rows_k = None
    if recon != RECON_NONE:
        x, t = logits.to(acc), _float_target(target, acc)
        if recon == RECON_BCE:
            elems = F.binary_cross_entropy_with_logits(x, t, reduction="none")
        else:
            elems = _recon_loss(recon, x, t, None if log_scale is None else log_scale.to(acc))
        rows_r = elems.sum(1)
    if mu is not None:
        m, lv = mu.to(acc), logvar.to(acc)
        rows_k = (-0.5 * (1.0 + lv - m * m - torch.exp(lv))).sum(1)
    if rows_r is None:
        rows_r = torch.zeros_like(rows_k)
    if rows_k is None:
        rows_k = torch.zeros_like(rows_r)
    r, k = _reduce(rows_r, reduction), _reduce(rows_k, reduction)
    return r + beta * k, r, k


def loss_gradients(p: LossProblem, logits, target, mu, logvar, g: Tensor, log_scale=None):
    """``(gx, gt, gmu, glv, gls)``: d(loss)/d(logits, target, mu, logvar, log_scale) times the incoming
    ``g``, as differentiable operations (a second backward differentiates them exactly).

    The closed forms, each times the reduction's scale: d/dx ``sigmoid(x) - t`` (BCE), ``2 (x - t)``
    (MSE), ``(x - t) e^(-2s)`` (Gaussian), ``sigmoid(x) - t - (1/x - 1/sinh(x))`` (continuous Bernoulli);
    d/dt ``-x`` (BCE, continuous Bernoulli) or ``-d/dx`` (MSE, Gaussian); d/ds
    ``1 - (x - t)^2 e^(-2s)`` summed over the batch to ``log_scale``'s 1-D shape; ``beta mu`` and
    ``beta (e^lv - 1) / 2``.  None where the input is absent or does not require grad (``gt``: unless
    ``target`` is a float tensor that requires grad).
    """
    gcol = (g.reshape(-1, 1) if g.dim() == 1 else g) * p.grad_scale
    gx = gt = gmu = glv = gls = None
    if logits is not None:
        want_t = target.is_floating_point() and target.requires_grad
        want_s = log_scale is not None and log_scale.requires_grad
        if logits.requires_grad or want_t or want_s:
            x = logits
            t = _float_target(target, x.dtype)
            s = log_scale.to(x.dtype) if p.recon == RECON_GAUSSIAN else None
            if p.recon == RECON_GAUSSIAN and x.dtype in (torch.float16, torch.bfloat16):
                x, t, s = x.float(), t.float(), s.float()  # e^(-2s) and its square in float32
            d = _recon_grad(p.recon, x, t, s)
            if logits.requires_grad:
                gx = (d * gcol).to(logits.dtype)
            if want_t:
                dt = -x if p.recon in (RECON_BCE, RECON_CB) else -d
                gt = (dt * gcol).to(target.dtype)
            if want_s:
                ds = ((1.0 - (x - t) * d) * gcol).sum(0)
                gls = (ds if log_scale.numel() > 1 else ds.sum().reshape(1)).to(log_scale.dtype)
    if mu is not None:
        kcol = gcol * p.beta
        if mu.requires_grad:
            gmu = (mu * kcol).to(mu.dtype)
        if logvar.requires_grad:
            glv = (0.5 * (torch.exp(logvar) - 1.0) * kcol).to(logvar.dtype)
    return gx, gt, gmu, glv, gls


def reparameterize_differentiable(mu: Tensor, logvar: Tensor, key: Key, offset: int) -> Tensor:
    """``mu + exp(logvar / 2) * eps`` as differentiable torch operations (the kernels' eps)."""
    e = eps(mu, key, offset).to(mu.dtype)
    return mu + torch.exp(0.5 * logvar) * e
