"""Float64 NumPy reference for every fastvae op, forward and backward.

This module is the contract: the Triton, Numba, torch and CuPy backends are all
tested against it.  It is written for clarity, not speed: plain NumPy, float64,
one formula per line.

Shapes follow the ops: every tensor is ``[B, ...]`` and the features of a sample
are everything after dim 0.  Reductions:

* ``"sum"``  -- sum over batch and features (pytorch/examples' convention),
* ``"mean"`` -- mean over the batch of the per-sample sums (per-sample negative ELBO),
* ``"none"`` -- the per-sample vector ``[B]``.

Random numbers
--------------
``randn(seed, offsets)`` is a port of Triton's ``tl.randn``
(``triton/language/random.py``): Philox4x32-10 keyed by the 64-bit seed, with the
64-bit element offset as the counter ``(lo, hi, 0, 0)``; the first two output words
become uniforms in [0, 1) exactly as ``uint_to_uniform_float`` does in float32, and
the first Box-Muller normal is returned.  The uniforms match the kernels bit for
bit; the normals are computed here in float64 from the float32 uniforms, so a
float32 kernel lands within a few ulp.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "philox4x32",
    "uniform_pair",
    "randn",
    "eps",
    "reparameterize",
    "reparameterize_backward",
    "bce_with_logits",
    "bce_with_logits_backward",
    "mse",
    "mse_backward",
    "kl_divergence",
    "kl_divergence_backward",
    "vae_loss",
    "vae_loss_backward",
    "REDUCTIONS",
]

REDUCTIONS = ("sum", "mean", "none")

# Philox4x32 constants (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3").
PHILOX_KEY_A = np.uint64(0x9E3779B9)
PHILOX_KEY_B = np.uint64(0xBB67AE85)
PHILOX_ROUND_A = np.uint64(0xD2511F53)
PHILOX_ROUND_B = np.uint64(0xCD9E8D57)
_MASK32 = np.uint64(0xFFFFFFFF)
_32 = np.uint64(32)

# Triton's uint_to_uniform_float scale for 32-bit words: the largest float32 s with
# (2**31 - 1) * s < 1 after rounding.
UNIFORM_SCALE = np.float32(4.6566127342e-10)
TWO_PI_F32 = np.float32(6.283185307179586)
U1_FLOOR_F32 = np.float32(1.0e-7)


def philox4x32(seed: int, c0, c1, c2, c3, n_rounds: int = 10):
    """Philox4x32 with key ``(seed & 0xffffffff, seed >> 32)``; counters are uint32 arrays.

    Each round: ``c0' = hi(B*c2) ^ c1 ^ k0``, ``c2' = hi(A*c0) ^ c3 ^ k1``,
    ``c1' = lo(B*c2)``, ``c3' = lo(A*c0)``; then the key is bumped by the Weyl constants.
    The products of two 32-bit words are exact in uint64.
    """
    seed = int(seed)
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must lie in [0, 2**64), got {seed}")
    k0 = np.uint64(seed & 0xFFFFFFFF)
    k1 = np.uint64(seed >> 32)
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint64) & _MASK32 for c in (c0, c1, c2, c3))
    for _ in range(n_rounds):
        prod_b = PHILOX_ROUND_B * c2
        prod_a = PHILOX_ROUND_A * c0
        c0, c1, c2, c3 = (
            (prod_b >> _32) ^ c1 ^ k0,
            prod_b & _MASK32,
            (prod_a >> _32) ^ c3 ^ k1,
            prod_a & _MASK32,
        )
        k0 = (k0 + PHILOX_KEY_A) & _MASK32
        k1 = (k1 + PHILOX_KEY_B) & _MASK32
    return tuple(c.astype(np.uint32) for c in (c0, c1, c2, c3))


def _uint_to_uniform_float32(x: np.ndarray) -> np.ndarray:
    """Triton's ``uint_to_uniform_float`` for 32-bit words, bit for bit (float32 result in [0, 1))."""
    signed = x.view(np.int32)
    signed = np.where(signed < 0, ~signed, signed)
    return signed.astype(np.float32) * UNIFORM_SCALE


def uniform_pair(seed: int, offsets) -> tuple[np.ndarray, np.ndarray]:
    """The two float32 uniforms that ``tl.randn(seed, offsets)`` feeds to Box-Muller."""
    offsets = np.asarray(offsets, dtype=np.int64)
    if offsets.size and offsets.min() < 0:
        raise ValueError("offsets must be non-negative")
    lo = offsets.astype(np.uint64) & _MASK32
    hi = offsets.astype(np.uint64) >> _32
    zero = np.zeros_like(lo)
    w0, w1, _, _ = philox4x32(seed, lo, hi, zero, zero)
    return _uint_to_uniform_float32(w0), _uint_to_uniform_float32(w1)


def randn(seed: int, offsets) -> np.ndarray:
    """Standard normals as drawn by ``tl.randn(seed, offsets)``, in float64.

    Box-Muller on the first two Philox words: ``u1 = max(1e-7, u1)``,
    ``theta = 2*pi*u2`` (a float32 product, as in the kernel),
    ``n = sqrt(-2 ln u1) * cos(theta)``.
    """
    u1, u2 = uniform_pair(seed, offsets)
    u1 = np.maximum(U1_FLOOR_F32, u1).astype(np.float64)
    theta = (TWO_PI_F32 * u2).astype(np.float64)
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(theta)


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def _rows(a) -> np.ndarray:
    """``[B, ...]`` -> float64 ``[B, F]``; uint8 is read as pixels, ``t / 255``."""
    a = np.asarray(a)
    scale = 1.0 / 255.0 if a.dtype == np.uint8 else 1.0
    a = a.astype(np.float64) * scale if scale != 1.0 else a.astype(np.float64)
    return a.reshape(a.shape[0], -1)


def _reduce(per_sample: np.ndarray, reduction: str):
    if reduction == "sum":
        return per_sample.sum()
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "none":
        return per_sample
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _grad_scale(grad, reduction: str, batch: int) -> np.ndarray:
    """d(reduced loss)/d(per-sample loss), as a ``[B, 1]`` column times the incoming gradient."""
    g = np.asarray(grad, dtype=np.float64)
    if reduction == "none":
        return np.broadcast_to(g.reshape(-1), (batch,)).reshape(batch, 1)
    if reduction == "mean":
        g = g / batch
    elif reduction != "sum":
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return np.full((batch, 1), float(g))


# ----------------------------------------------------------------------------------------------
# Reparameterization: z = mu + exp(0.5 * logvar) * eps,  eps = randn(seed, flat index)
# ----------------------------------------------------------------------------------------------


def eps(seed: int, shape, offset: int = 0) -> np.ndarray:
    """The eps of a call: ``eps[i] = randn(seed, offset + i)`` over the flat (C-order) index ``i``."""
    size = int(np.prod(shape, dtype=np.int64))
    return randn(seed, offset + np.arange(size, dtype=np.int64)).reshape(shape)


def reparameterize(mu, logvar, seed: int, offset: int = 0) -> np.ndarray:
    """``z = mu + exp(logvar / 2) * eps`` with ``eps[i] = randn(seed, offset + i)`` (flat C-order ``i``)."""
    mu = np.asarray(mu, dtype=np.float64)
    logvar = np.asarray(logvar, dtype=np.float64)
    return mu + np.exp(0.5 * logvar) * eps(seed, mu.shape, offset)


def reparameterize_backward(dz, logvar, seed: int, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``dmu = dz``; ``dlogvar = 0.5 * dz * exp(logvar / 2) * eps`` (= ``0.5 * dz * (z - mu)``)."""
    dz = np.asarray(dz, dtype=np.float64)
    logvar = np.asarray(logvar, dtype=np.float64)
    return dz.copy(), 0.5 * dz * np.exp(0.5 * logvar) * eps(seed, dz.shape, offset)


# ----------------------------------------------------------------------------------------------
# Reconstruction terms
# ----------------------------------------------------------------------------------------------


def bce_with_logits(logits, target, reduction: str = "sum"):
    """``sum_f max(x, 0) - x t + log1p(exp(-|x|))`` per sample: BCE(sigmoid(x), t), computed stably."""
    x, t = _rows(logits), _rows(target)
    per_elem = np.maximum(x, 0.0) - x * t + np.log1p(np.exp(-np.abs(x)))
    return _reduce(per_elem.sum(axis=1), reduction)


def bce_with_logits_backward(logits, target, reduction: str = "sum", grad=1.0) -> np.ndarray:
    """``d/dx = sigmoid(x) - t``, scaled by the reduction and the incoming gradient."""
    x, t = _rows(logits), _rows(target)
    sig = 0.5 * (1.0 + np.tanh(0.5 * x))  # overflow-free sigmoid
    d = (sig - t) * _grad_scale(grad, reduction, x.shape[0])
    return d.reshape(np.shape(logits))


def mse(output, target, reduction: str = "sum"):
    """``sum_f (x - t)^2`` per sample (sum of squared errors on the raw decoder output)."""
    x, t = _rows(output), _rows(target)
    return _reduce(((x - t) ** 2).sum(axis=1), reduction)


def mse_backward(output, target, reduction: str = "sum", grad=1.0) -> np.ndarray:
    """``d/dx = 2 (x - t)``, scaled by the reduction and the incoming gradient."""
    x, t = _rows(output), _rows(target)
    d = 2.0 * (x - t) * _grad_scale(grad, reduction, x.shape[0])
    return d.reshape(np.shape(output))


# ----------------------------------------------------------------------------------------------
# KL( N(mu, exp(logvar)) || N(0, I) )
# ----------------------------------------------------------------------------------------------


def kl_divergence(mu, logvar, reduction: str = "sum"):
    """``-0.5 * sum_d (1 + logvar - mu^2 - exp(logvar))`` per sample."""
    m, lv = _rows(mu), _rows(logvar)
    per_elem = -0.5 * (1.0 + lv - m * m - np.exp(lv))
    return _reduce(per_elem.sum(axis=1), reduction)


def kl_divergence_backward(mu, logvar, reduction: str = "sum", grad=1.0) -> tuple[np.ndarray, np.ndarray]:
    """``dKL/dmu = mu``; ``dKL/dlogvar = 0.5 * (exp(logvar) - 1)``."""
    m, lv = _rows(mu), _rows(logvar)
    s = _grad_scale(grad, reduction, m.shape[0])
    return (m * s).reshape(np.shape(mu)), (0.5 * (np.exp(lv) - 1.0) * s).reshape(np.shape(logvar))


# ----------------------------------------------------------------------------------------------
# The fused VAE loss: reconstruction + beta * KL
# ----------------------------------------------------------------------------------------------

_RECON = {"bce": (bce_with_logits, bce_with_logits_backward), "mse": (mse, mse_backward)}


def _recon_fns(recon: str):
    try:
        return _RECON[recon]
    except KeyError:
        raise ValueError(f"recon must be one of {tuple(_RECON)}, got {recon!r}") from None


def vae_loss(logits, target, mu, logvar, beta: float = 1.0, reduction: str = "sum", recon: str = "bce"):
    """Negative ELBO: ``recon(logits, target) + beta * KL(mu, logvar)`` with one reduction for both."""
    fwd, _ = _recon_fns(recon)
    return fwd(logits, target, reduction) + beta * kl_divergence(mu, logvar, reduction)


def vae_loss_backward(
    logits, target, mu, logvar, beta: float = 1.0, reduction: str = "sum", recon: str = "bce", grad=1.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of :func:`vae_loss` with respect to ``logits``, ``mu`` and ``logvar``."""
    _, bwd = _recon_fns(recon)
    dmu, dlogvar = kl_divergence_backward(mu, logvar, reduction, grad)
    return bwd(logits, target, reduction, grad), beta * dmu, beta * dlogvar
