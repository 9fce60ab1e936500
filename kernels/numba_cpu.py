"""Numba CPU kernels: the same math as the Triton kernels, parallel over rows (``prange``).

Each function has the signature of its Triton twin in ``fused_loss.py`` / ``reparameterize.py`` and
takes torch CPU tensors.  NumPy has no bfloat16, so fp16/bf16 tensors are computed through a float32
copy (a CPU convenience; the GPU kernels read them natively).  Row sums are accumulated in float64,
then summed over rows in a fixed order, so results are deterministic whatever the thread count.

Philox4x32-10 and Box-Muller follow ``fastvae.reference`` (itself a port of ``tl.randn``): the uniforms
are bit-identical to the Triton kernels'.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch
from numba import prange

_M32 = np.uint64(0xFFFFFFFF)
_S32 = np.uint64(32)
_KEY_A = np.uint64(0x9E3779B9)
_KEY_B = np.uint64(0xBB67AE85)
_ROUND_A = np.uint64(0xD2511F53)
_ROUND_B = np.uint64(0xCD9E8D57)
_UNIFORM_SCALE = np.float32(4.6566127342e-10)
_TWO_PI_F32 = np.float32(6.283185307179586)
_U1_FLOOR = np.float32(1.0e-7)
_HALF_RANGE = np.uint64(0x80000000)

_jit = numba.njit(cache=True, fastmath=False, nogil=True)
_pjit = numba.njit(cache=True, fastmath=False, nogil=True, parallel=True)


@numba.njit(cache=True, inline="always")
def _uniform(word):
    """Triton's uint_to_uniform_float: the word as int32, negative -> ~x, to float32, times the scale."""
    x = word if word < _HALF_RANGE else _M32 - word  # ~x of a negative int32, as a non-negative integer
    return np.float32(np.int64(x)) * _UNIFORM_SCALE


@numba.njit(cache=True, inline="always")
def randn_at(k0, k1, offset):
    """tl.randn(seed, offset) for one offset: Philox4x32-10 on (lo, hi, 0, 0), then Box-Muller (float64)."""
    c0 = np.uint64(offset) & _M32
    c1 = np.uint64(offset) >> _S32
    c2 = np.uint64(0)
    c3 = np.uint64(0)
    for _ in range(10):
        prod_b = _ROUND_B * c2
        prod_a = _ROUND_A * c0
        c0 = (prod_b >> _S32) ^ c1 ^ k0
        c1 = prod_b & _M32
        c2 = (prod_a >> _S32) ^ c3 ^ k1
        c3 = prod_a & _M32
        k0 = (k0 + _KEY_A) & _M32
        k1 = (k1 + _KEY_B) & _M32
    u1 = max(_U1_FLOOR, _uniform(c0))
    theta = _TWO_PI_F32 * _uniform(c1)  # a float32 product, as in the kernel
    return math.sqrt(-2.0 * math.log(np.float64(u1))) * math.cos(np.float64(theta))


@_pjit
def _reparameterize_rows(a, logvar, out, k0, k1, backward):
    rows, cols = a.shape
    for b in prange(rows):
        for j in range(cols):
            eps = randn_at(k0, k1, np.int64(b) * cols + j)
            std = math.exp(0.5 * np.float64(logvar[b, j]))
            if backward:
                out[b, j] = 0.5 * np.float64(a[b, j]) * std * eps  # dlogvar = dz * std * eps / 2
            else:
                out[b, j] = np.float64(a[b, j]) + std * eps  # z = mu + std * eps


@_pjit
def _fused_loss_rows(
    x, t, mu, lv, dx, dmu, dlv, row_recon, row_kl, beta, grad_scale, t_scale, recon_kind, need_grad
):
    rows = row_recon.shape[0]
    features = x.shape[1]
    latent = mu.shape[1]
    kl_scale = beta * grad_scale
    for b in prange(rows):
        acc = 0.0
        if recon_kind == 1:  # BCE with logits: max(x,0) - x t + log1p(e^-|x|);  d/dx = sigmoid(x) - t
            for f in range(features):
                xv = np.float64(x[b, f])
                tv = np.float64(t[b, f]) * t_scale
                e = math.exp(-abs(xv))
                acc += max(xv, 0.0) - xv * tv + math.log1p(e)
                if need_grad:
                    sig = 1.0 / (1.0 + e) if xv >= 0 else e / (1.0 + e)
                    dx[b, f] = (sig - tv) * grad_scale
        elif recon_kind == 2:  # squared error: (x - t)^2;  d/dx = 2 (x - t)
            for f in range(features):
                diff = np.float64(x[b, f]) - np.float64(t[b, f]) * t_scale
                acc += diff * diff
                if need_grad:
                    dx[b, f] = 2.0 * diff * grad_scale
        row_recon[b] = acc
        acc = 0.0
        for d in range(latent):  # KL: -(1 + lv - mu^2 - e^lv)/2;  d/dmu = mu, d/dlv = (e^lv - 1)/2
            m = np.float64(mu[b, d])
            l = np.float64(lv[b, d])
            var = math.exp(l)
            acc += -0.5 * (1.0 + l - m * m - var)
            if need_grad:
                dmu[b, d] = m * kl_scale
                dlv[b, d] = 0.5 * (var - 1.0) * kl_scale
        row_kl[b] = acc


@_pjit
def _scale_rows(g, per_row, grad):
    rows, cols = grad.shape
    for b in prange(rows):
        s = g[b] if per_row else g[0]
        if s != 1.0:  # loss.backward() passes g = 1: nothing to touch
            for j in range(cols):
                grad[b, j] *= s


# ----------------------------------------------------------------------------------------------
# Launchers (torch CPU tensors in and out)
# ----------------------------------------------------------------------------------------------

_NATIVE = (torch.float32, torch.float64)


def _as_numpy(t: torch.Tensor) -> np.ndarray:
    """A NumPy view (or, for fp16/bf16, a float32 copy) of a CPU tensor."""
    if t.dtype not in _NATIVE and t.dtype != torch.uint8:
        t = t.float()
    return t.detach().numpy()


def _grad_buffer(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    dtype = like.dtype if like.dtype in _NATIVE else torch.float32
    return torch.empty(shape, dtype=dtype)


def _split_seed(seed: int) -> tuple[np.uint64, np.uint64]:
    return np.uint64(seed & 0xFFFFFFFF), np.uint64((seed >> 32) & 0xFFFFFFFF)


def _reparameterize(a: torch.Tensor, logvar: torch.Tensor, seed: int, backward: bool) -> torch.Tensor:
    shape = a.shape
    a2, lv2 = a.reshape(shape[0] if a.dim() else 1, -1), logvar.reshape(shape[0] if a.dim() else 1, -1)
    out = _grad_buffer(tuple(a2.shape), a)
    k0, k1 = _split_seed(seed)
    _reparameterize_rows(_as_numpy(a2), _as_numpy(lv2), out.numpy(), k0, k1, backward)
    return out.to(a.dtype).reshape(shape)


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, seed: int) -> torch.Tensor:
    """z = mu + exp(logvar / 2) * randn(seed, flat index)."""
    return _reparameterize(mu, logvar, seed, backward=False)


def reparameterize_backward(dz: torch.Tensor, logvar: torch.Tensor, seed: int) -> torch.Tensor:
    """dlogvar = 0.5 * dz * exp(logvar / 2) * randn(seed, flat index)."""
    return _reparameterize(dz, logvar, seed, backward=True)


def fused_loss(logits, target, mu, logvar, beta: float, reduction: str, recon: str, need_grad: bool):
    """Same contract as ``fused_loss.fused_loss`` (Triton)."""
    ref = logits if logits is not None else mu
    B = ref.shape[0]
    F = logits.shape[1] if logits is not None else 0
    D = mu.shape[1] if mu is not None else 0
    acc_dtype = torch.float64 if ref.dtype == torch.float64 else torch.float32
    dummy = np.zeros((B, 0), dtype=np.float32)
    x = _as_numpy(logits) if F else dummy
    t = _as_numpy(target) if F else dummy
    m = _as_numpy(mu) if D else dummy
    lv = _as_numpy(logvar) if D else dummy
    dx = _grad_buffer((B, F), logits) if need_grad and F else None
    dmu = _grad_buffer((B, D), mu) if need_grad and D else None
    dlv = _grad_buffer((B, D), logvar) if need_grad and D else None
    row_recon = np.empty(B, dtype=np.float64)
    row_kl = np.empty(B, dtype=np.float64)
    grad_scale = 1.0 / B if reduction == "mean" else 1.0
    t_scale = 1.0 / 255.0 if F and target.dtype == torch.uint8 else 1.0
    _fused_loss_rows(
        x,
        t,
        m,
        lv,
        dx.numpy() if dx is not None else np.zeros((B, 0), dtype=x.dtype),
        dmu.numpy() if dmu is not None else np.zeros((B, 0), dtype=m.dtype),
        dlv.numpy() if dlv is not None else np.zeros((B, 0), dtype=lv.dtype),
        row_recon,
        row_kl,
        float(beta),
        grad_scale,
        t_scale,
        {"none": 0, "bce": 1, "mse": 2}[recon],
        need_grad,
    )

    def grad_out(buf, like):
        if buf is None:
            return torch.empty(0, dtype=ref.dtype)
        return buf.to(like.dtype)

    if reduction == "none":
        per_sample = row_recon + beta * row_kl
        terms = (per_sample, row_recon, row_kl)
    else:
        scale = 1.0 / B if reduction == "mean" else 1.0
        r, k = row_recon.sum() * scale, row_kl.sum() * scale  # NumPy's fixed pairwise order
        terms = (np.asarray(r + beta * k), np.asarray(r), np.asarray(k))
    loss, rec, kl = (torch.from_numpy(np.array(v, dtype=np.float64)).to(acc_dtype) for v in terms)
    return loss, rec, kl, grad_out(dx, logits), grad_out(dmu, mu), grad_out(dlv, logvar)


def scale_rows_(grad: torch.Tensor, dlogits: torch.Tensor, dmu: torch.Tensor, dlogvar: torch.Tensor) -> None:
    """In place: each saved gradient row *= g (scalar or per row), skipping rows where g == 1."""
    g = grad.detach().reshape(-1).to(torch.float64).numpy()
    for buf in (dlogits, dmu, dlogvar):
        if buf.numel() == 0:
            continue
        if buf.dtype in _NATIVE:
            _scale_rows(g, grad.dim() == 1, buf.numpy())
        else:
            tmp = buf.float()
            _scale_rows(g, grad.dim() == 1, tmp.numpy())
            buf.copy_(tmp)
