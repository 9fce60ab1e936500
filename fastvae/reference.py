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
``randn(seed, n)`` is the normal of element counter ``n`` (an int64 in [0, 2**63)): four elements
share one Philox call, with Triton's ``tl.randn4x`` transform of the words (``triton/language/random.py``).
With ``c = n >> 2`` and ``lane = n & 3``, Philox4x32-10 with the key 0 runs on the 128-bit counter
``(c_lo, c_hi, seed_lo, seed_hi)``: the seed selects a stream of counters, as cuRAND's and torch's
subsequences do, and the key schedule is a constant every kernel folds into its instructions.  The
four output words become uniforms ``u1..u4`` in [0, 1) exactly as ``uint_to_uniform_float`` does in
float32; Box-Muller on ``(u1, u2)`` gives ``r cos, r sin`` and on ``(u3, u4)`` gives ``r cos, r sin``;
the element takes normal number ``lane`` of those four.  (At seed 0 this is ``tl.randn4x(0, c)``
itself.)  The uniforms match the kernels bit for bit; the normals are computed here in float64 from the
float32 uniforms (and the float32 angle ``float32(2 pi) u``), so a float32 kernel lands within a few ulp.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "philox4x32",
    "uniform4",
    "randn4",
    "uniform_pair",
    "randn",
    "eps",
    "reparameterize",
    "reparameterize_backward",
    "bce_with_logits",
    "bce_with_logits_backward",
    "bce_with_logits_backward_target",
    "mse",
    "mse_backward",
    "mse_backward_target",
    "gaussian_nll",
    "gaussian_nll_backward",
    "cb_log_norm",
    "cb_log_norm_grad",
    "continuous_bernoulli",
    "continuous_bernoulli_backward",
    "kl_divergence",
    "kl_divergence_backward",
    "vae_loss",
    "vae_loss_gradients",
    "vae_loss_backward",
    "RECONS",
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


def _u64(value: int, name: str) -> int:
    value = int(value)
    if not 0 <= value < 2**64:
        raise ValueError(f"{name} must lie in [0, 2**64), got {value}")
    return value


def philox4x32(key: int, c0, c1, c2, c3, n_rounds: int = 10):
    """Philox4x32 with key ``(key & 0xffffffff, key >> 32)``; counters are uint32 arrays.

    Each round: ``c0' = hi(B*c2) ^ c1 ^ k0``, ``c2' = hi(A*c0) ^ c3 ^ k1``,
    ``c1' = lo(B*c2)``, ``c3' = lo(A*c0)``; then the key is bumped by the Weyl constants.
    The products of two 32-bit words are exact in uint64.
    """
    key = _u64(key, "key")
    k0 = np.uint64(key & 0xFFFFFFFF)
    k1 = np.uint64(key >> 32)
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


def _counters(offsets, name: str) -> np.ndarray:
    offsets = np.asarray(offsets, dtype=np.int64)
    if offsets.size and offsets.min() < 0:
        raise ValueError(f"{name} must be non-negative int64 values (in [0, 2**63))")
    return offsets


def uniform4(seed: int, counters) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The four float32 uniforms of Philox4x32-10 with key 0 at ``(c_lo, c_hi, seed_lo, seed_hi)``, made
    as ``tl.rand4x`` makes them (``tl.rand4x(0, counters)`` at seed 0)."""
    seed = _u64(seed, "seed")
    c = _counters(counters, "counters").astype(np.uint64)
    s = np.full_like(c, seed & 0xFFFFFFFF), np.full_like(c, seed >> 32)
    words = philox4x32(0, c & _MASK32, c >> _32, *s)
    return tuple(_uint_to_uniform_float32(w) for w in words)


def _box_muller(u1: np.ndarray, u2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Triton's ``pair_uniform_to_normal`` in float64 after its float32 steps:
    ``u1 = max(1e-7, u1)``, ``theta = float32(2 pi) * u2`` (a float32 product, as in the kernel),
    ``r = sqrt(-2 ln u1)``; returns ``(r cos theta, r sin theta)``."""
    u1 = np.maximum(U1_FLOOR_F32, u1).astype(np.float64)
    theta = (TWO_PI_F32 * u2).astype(np.float64)
    r = np.sqrt(-2.0 * np.log(u1))
    return r * np.cos(theta), r * np.sin(theta)


def randn4(seed: int, counters) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The four normals of ``uniform4(seed, counters)`` in float64 (``tl.randn4x``'s transform):
    Box-Muller on ``(u1, u2)`` and on ``(u3, u4)``,
    ``(n1, n2, n3, n4) = (r12 cos t2, r12 sin t2, r34 cos t4, r34 sin t4)``."""
    u1, u2, u3, u4 = uniform4(seed, counters)
    return (*_box_muller(u1, u2), *_box_muller(u3, u4))


def uniform_pair(seed: int, offsets) -> tuple[np.ndarray, np.ndarray]:
    """The two float32 uniforms whose Box-Muller gives the normal of element counter ``n``:
    ``(u1, u2)`` of Philox counter ``n >> 2`` for lanes ``n & 3`` in {0, 1}, ``(u3, u4)`` for {2, 3}."""
    n = _counters(offsets, "offsets")
    u1, u2, u3, u4 = uniform4(seed, n >> 2)
    second = (n & 2) != 0
    return np.where(second, u3, u1), np.where(second, u4, u2)


def randn(seed: int, offsets) -> np.ndarray:
    """The standard normal of each element counter ``n`` in ``offsets``, in float64:
    ``randn4(seed, n >> 2)[n & 3]`` (lane 0: r cos, 1: r sin of (u1, u2); 2, 3: the same of (u3, u4))."""
    n = _counters(offsets, "offsets")
    u1, u2 = uniform_pair(seed, n)
    r_cos, r_sin = _box_muller(u1, u2)
    return np.where((n & 1) != 0, r_sin, r_cos)


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
    """The eps of a call: ``eps[i] = randn(seed, offset + i)`` over the flat (C-order) index ``i``, i.e.
    normal ``(offset + i) & 3`` of the Philox counter ``(offset + i) >> 2``."""
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


def bce_with_logits_backward_target(logits, target, reduction: str = "sum", grad=1.0) -> np.ndarray:
    """``d/dt = -x`` (of ``softplus(x) - x t``), scaled by the reduction and the incoming gradient."""
    x = _rows(logits)
    d = -x * _grad_scale(grad, reduction, x.shape[0])
    return d.reshape(np.shape(target))


def mse(output, target, reduction: str = "sum"):
    """``sum_f (x - t)^2`` per sample (sum of squared errors on the raw decoder output)."""
    x, t = _rows(output), _rows(target)
    return _reduce(((x - t) ** 2).sum(axis=1), reduction)


def mse_backward(output, target, reduction: str = "sum", grad=1.0) -> np.ndarray:
    """``d/dx = 2 (x - t)``, scaled by the reduction and the incoming gradient."""
    x, t = _rows(output), _rows(target)
    d = 2.0 * (x - t) * _grad_scale(grad, reduction, x.shape[0])
    return d.reshape(np.shape(output))


def mse_backward_target(output, target, reduction: str = "sum", grad=1.0) -> np.ndarray:
    """``d/dt = -2 (x - t)``, scaled by the reduction and the incoming gradient."""
    x, t = _rows(output), _rows(target)
    d = -2.0 * (x - t) * _grad_scale(grad, reduction, x.shape[0])
    return d.reshape(np.shape(target))


HALF_LOG_2PI = 0.5 * np.log(2.0 * np.pi)


def _sum_to(a: np.ndarray, shape: tuple) -> np.ndarray:
    """Sum ``a`` down to ``shape`` (the adjoint of broadcasting ``shape`` up to ``a.shape``)."""
    lead = a.ndim - len(shape)
    a = a.sum(axis=tuple(range(lead))) if lead > 0 else a
    keep = tuple(i for i, n in enumerate(shape) if n == 1 and a.shape[i] != 1)
    return a.sum(axis=keep, keepdims=True).reshape(shape) if keep else a.reshape(shape)


def _log_scale_row(log_scale, sample_shape: tuple) -> np.ndarray:
    """``log_scale`` broadcast to one sample's shape, flattened to a float64 ``[1, F]`` row."""
    s = np.asarray(log_scale, dtype=np.float64)
    try:
        s = np.broadcast_to(s, sample_shape) if s.ndim <= len(sample_shape) else None
    except ValueError:
        s = None
    if s is None:
        raise ValueError(
            f"log_scale must be broadcastable to the per-sample shape {tuple(sample_shape)}, "
            f"got shape {np.shape(log_scale)}"
        )
    return s.reshape(1, -1)


def gaussian_nll(output, target, log_scale, reduction: str = "sum"):
    """Gaussian negative log-likelihood with a learned scale ``sigma = exp(s)``, summed per sample::

        sum_f 0.5 (x - t)^2 exp(-2 s) + s + 0.5 log(2 pi)

    ``log_scale`` (``s``) is any array broadcastable to one sample's shape ``output.shape[1:]``: a
    scalar, one per feature, or one per element.
    """
    x, t = _rows(output), _rows(target)
    s = _log_scale_row(log_scale, np.shape(output)[1:])
    per_elem = 0.5 * (x - t) ** 2 * np.exp(-2.0 * s) + s + HALF_LOG_2PI
    return _reduce(per_elem.sum(axis=1), reduction)


def gaussian_nll_backward(
    output, target, log_scale, reduction: str = "sum", grad=1.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(dx, dt, ds)`` of :func:`gaussian_nll`, scaled by the reduction and the incoming gradient::

        d/dx = (x - t) e^(-2s),   d/dt = -(x - t) e^(-2s),   d/ds = 1 - (x - t)^2 e^(-2s)

    ``ds`` is summed over the batch and over every axis ``log_scale`` was broadcast along, so it has
    ``log_scale``'s shape.
    """
    x, t = _rows(output), _rows(target)
    s = _log_scale_row(log_scale, np.shape(output)[1:])
    g = _grad_scale(grad, reduction, x.shape[0])
    r = (x - t) * np.exp(-2.0 * s)
    ds = ((1.0 - (x - t) * r) * g).sum(axis=0).reshape(np.shape(output)[1:])
    return (
        (r * g).reshape(np.shape(output)),
        (-r * g).reshape(np.shape(target)),
        _sum_to(ds, np.shape(log_scale)),
    )


# log C(x) - log 2 and its derivative 1/x - 1/sinh(x) are even / odd power series in x (radius pi);
# below _CB_TAYLOR they replace the closed forms, whose two ~1/x terms cancel near 0 (the float64
# rounding of the closed form is ~eps / x^2 relative; the truncated series is below 1e-15 there).
_CB_TAYLOR = 0.25
_LOGC_SERIES = (1 / 12, -7 / 1440, 31 / 90720, -127 / 4838400, 73 / 34214400, -1414477 / 7846046208000)
_DLOGC_SERIES = (
    1 / 6,
    -7 / 360,
    31 / 15120,
    -127 / 604800,
    73 / 3421440,
    -1414477 / 653837184000,
    8191 / 37362124800,
)


def _horner(coeffs: tuple, y: np.ndarray) -> np.ndarray:
    """``sum_k coeffs[k] y^k``."""
    acc = np.zeros_like(y)
    for c in reversed(coeffs):
        acc = acc * y + c
    return acc


def cb_log_norm(x) -> np.ndarray:
    """Log-normalizer of the continuous Bernoulli on logits, ``log C(x) = log(x / tanh(x / 2))``.

    ``C(lambda) = 2 artanh(1 - 2 lambda) / (1 - 2 lambda)`` at ``lambda = sigmoid(x)`` (Loaiza-Ganem and
    Cunningham, 2019) is ``x / tanh(x / 2)``; ``log 2`` at ``x = 0``.  Near 0 the series
    ``log 2 + x^2/12 - 7 x^4/1440 + 31 x^6/90720 - ...``.
    """
    x = np.asarray(x, dtype=np.float64)
    small = np.abs(x) < _CB_TAYLOR
    xs = np.where(small, 1.0, x)  # the closed form never sees 0, the series never a large x
    xt = np.where(small, x, 0.0)
    closed = np.log(xs / np.tanh(0.5 * xs))
    series = np.log(2.0) + xt * xt * _horner(_LOGC_SERIES, xt * xt)
    return np.where(small, series, closed)


def cb_log_norm_grad(x) -> np.ndarray:
    """``d log C / dx = 1/x - 1/sinh(x)``: 0 at ``x = 0``, near 0 ``x/6 - 7 x^3/360 + 31 x^5/15120 - ...``"""
    x = np.asarray(x, dtype=np.float64)
    small = np.abs(x) < _CB_TAYLOR
    xs = np.where(small, 1.0, x)
    xt = np.where(small, x, 0.0)
    # 1/sinh(x) = 2 e^-|x| / (1 - e^-2|x|) sign(x): no overflow at large |x|.
    e = np.exp(-np.abs(xs))
    closed = 1.0 / xs - np.sign(xs) * 2.0 * e / (1.0 - e * e)
    series = xt * _horner(_DLOGC_SERIES, xt * xt)
    return np.where(small, series, closed)


def _unit_target(target) -> np.ndarray:
    t = _rows(target)
    if t.size and not (np.all(t >= 0.0) and np.all(t <= 1.0)):
        raise ValueError(
            f"target must lie in [0, 1] for the continuous Bernoulli, got values in [{t.min()}, {t.max()}]"
        )
    return t


# The loss is evaluated as x (1/2 - t) + K(x) with the even part K(x) = softplus(x) - x/2 - log C(x)
# = log(sinh(x/2) / (x/2)) >= 0: near x = 0 softplus(x) and log C(x) are both ~ln 2 and their
# difference would cancel (an absolute error of ~eps, while the loss itself is ~x^2/24 + x (1/2 - t)).
# K is a power series in x^2 with radius 2 pi (sinh(x/2)/(x/2) has its first zeros at +-2 pi i), used
# below |x| = 1 (10 terms: truncation < 1e-17 relative); above, K = |x|/2 - log|x| + log1p(-e^-|x|)
# (cancellation ~12 eps at |x| = 1).  K'(x) = (coth(x/2) - 2/x) / 2 = sigmoid(x) - 1/2 - (1/x - 1/sinh(x)).
_CB_K_SERIES = (
    1 / 24,
    -1 / 2880,
    1 / 181440,
    -1 / 9676800,
    1 / 479001600,
    -691 / 15692092416000,
    1 / 1046139494400,
    -3617 / 170729965486080000,
    43867 / 91963695909076992000,
    -174611 / 16057153253965824000000,
)
_CB_K_SWITCH = 1.0


def _cb_even(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(K(x), K'(x))``: ``K = log(sinh(x/2) / (x/2))``, ``K' = sign(x) (1/2 - 1/|x| + 1/(e^|x| - 1))``."""
    a = np.abs(x)
    small = a < _CB_K_SWITCH
    ac = np.where(small, 1.0, a)  # the closed forms never see |x| < 1
    em1 = -np.expm1(-ac)  # 1 - e^-|x|
    k_closed = 0.5 * ac - np.log(ac) + np.log(em1)
    dk_closed = np.sign(x) * (0.5 - 1.0 / ac + np.exp(-ac) / em1)
    xt = np.where(small, x, 0.0)  # the series never sees a large x
    z = xt * xt
    k_series = z * _horner(_CB_K_SERIES, z)
    dk_series = xt * _horner(tuple(2 * (k + 1) * c for k, c in enumerate(_CB_K_SERIES)), z)
    return np.where(small, k_series, k_closed), np.where(small, dk_series, dk_closed)


def continuous_bernoulli(logits, target, reduction: str = "sum"):
    """Continuous-Bernoulli negative log-likelihood on logits, summed per sample::

        sum_f softplus(x) - x t - log C(x),   log C(x) = log(x / tanh(x / 2))

    (BCE on logits minus the log-normalizer, :func:`cb_log_norm`); targets in [0, 1].  Evaluated as
    ``x (1/2 - t) + log(sinh(x/2) / (x/2))``, the same function without the cancellation at x ~ 0.
    """
    x, t = _rows(logits), _unit_target(target)
    per_elem = x * (0.5 - t) + _cb_even(x)[0]
    return _reduce(per_elem.sum(axis=1), reduction)


def continuous_bernoulli_backward(
    logits, target, reduction: str = "sum", grad=1.0
) -> tuple[np.ndarray, np.ndarray]:
    """``(dx, dt)`` of :func:`continuous_bernoulli`, scaled by the reduction and the incoming gradient::

    d/dx = sigmoid(x) - t - (1/x - 1/sinh(x)) = 1/2 - t + (coth(x/2) - 2/x) / 2,   d/dt = -x
    """
    x, t = _rows(logits), _unit_target(target)
    g = _grad_scale(grad, reduction, x.shape[0])
    dx = (0.5 - t + _cb_even(x)[1]) * g
    return dx.reshape(np.shape(logits)), (-x * g).reshape(np.shape(target))


# ----------------------------------------------------------------------------------------------
# KL( N(mu, exp(logvar)) || N(prior_mu, exp(prior_logvar)) ), the prior N(0, I) by default
# ----------------------------------------------------------------------------------------------


def _prior(mu, prior_mu, prior_logvar) -> tuple[np.ndarray, np.ndarray] | None:
    """The prior's mean and log-variance broadcast to ``mu``'s shape as float64 ``[B, D]``, or None."""
    if prior_mu is None and prior_logvar is None:
        return None
    if prior_mu is None or prior_logvar is None:
        missing = "prior_mu" if prior_mu is None else "prior_logvar"
        raise ValueError(f"prior_mu and prior_logvar must be given together; {missing} is None")
    out = []
    for name, p in (("prior_mu", prior_mu), ("prior_logvar", prior_logvar)):
        p = np.asarray(p, dtype=np.float64)
        try:
            out.append(np.broadcast_to(p, np.shape(mu)) if p.ndim <= np.ndim(mu) else None)
        except ValueError:
            out.append(None)
        if out[-1] is None:
            raise ValueError(f"{name} must be broadcastable to mu's shape {np.shape(mu)}, got {p.shape}")
    return tuple(a.reshape(np.shape(mu)[0], -1) for a in out)


def kl_divergence(mu, logvar, reduction: str = "sum", prior_mu=None, prior_logvar=None):
    """KL of ``N(mu, e^lv)`` from the prior, summed per sample.  N(0, I)::

        -0.5 * sum_d (1 + lv - mu^2 - e^lv)

    and with ``prior_mu = pm``, ``prior_logvar = plv`` (both or neither, broadcastable to ``mu``)::

        0.5 * sum_d (e^(lv - plv) + (mu - pm)^2 e^(-plv) - 1 - lv + plv)
    """
    m, lv = _rows(mu), _rows(logvar)
    prior = _prior(mu, prior_mu, prior_logvar)
    if prior is None:
        per_elem = -0.5 * (1.0 + lv - m * m - np.exp(lv))
    else:
        pm, plv = prior
        per_elem = 0.5 * (np.exp(lv - plv) + (m - pm) ** 2 * np.exp(-plv) - 1.0 - lv + plv)
    return _reduce(per_elem.sum(axis=1), reduction)


def kl_divergence_backward(
    mu, logvar, reduction: str = "sum", grad=1.0, prior_mu=None, prior_logvar=None
) -> tuple[np.ndarray, ...]:
    """Gradients of :func:`kl_divergence`.  N(0, I): ``(dmu, dlogvar) = (mu, 0.5 (e^lv - 1))``.

    With a prior, four gradients (the prior's summed down to the prior's shapes)::

        d/dmu = (mu - pm) e^(-plv)       d/dlv  = 0.5 (e^(lv - plv) - 1)
        d/dpm = -(mu - pm) e^(-plv)      d/dplv = 0.5 (1 - e^(lv - plv) - (mu - pm)^2 e^(-plv))
    """
    m, lv = _rows(mu), _rows(logvar)
    s = _grad_scale(grad, reduction, m.shape[0])
    prior = _prior(mu, prior_mu, prior_logvar)
    if prior is None:
        return (m * s).reshape(np.shape(mu)), (0.5 * (np.exp(lv) - 1.0) * s).reshape(np.shape(logvar))
    pm, plv = prior
    ratio = np.exp(lv - plv)
    r = (m - pm) * np.exp(-plv)
    dplv = 0.5 * (1.0 - ratio - (m - pm) * r) * s
    return (
        (r * s).reshape(np.shape(mu)),
        (0.5 * (ratio - 1.0) * s).reshape(np.shape(logvar)),
        _sum_to((-r * s).reshape(np.shape(mu)), np.shape(prior_mu)),
        _sum_to(dplv.reshape(np.shape(mu)), np.shape(prior_logvar)),
    )


# ----------------------------------------------------------------------------------------------
# The fused VAE loss: reconstruction + beta * KL
# ----------------------------------------------------------------------------------------------

RECONS = ("bce", "mse", "gaussian", "continuous_bernoulli", "none")


def _recon_terms(recon: str, logits, target, log_scale, reduction: str, grad):
    """``(loss, dlogits, dtarget, dlog_scale)`` of one reconstruction term (no gradients if grad is None)."""
    if recon not in RECONS:
        raise ValueError(f"recon must be one of {RECONS}, got {recon!r}")
    if recon == "none":
        return 0.0, None, None, None
    if (log_scale is not None) != (recon == "gaussian"):
        raise ValueError(f"log_scale must be given for recon='gaussian' and only then, got recon={recon!r}")
    if recon == "gaussian":
        loss = gaussian_nll(logits, target, log_scale, reduction)
        grads = None if grad is None else gaussian_nll_backward(logits, target, log_scale, reduction, grad)
        return (loss, *(grads or (None,) * 3))
    if recon == "continuous_bernoulli":
        loss = continuous_bernoulli(logits, target, reduction)
        grads = None if grad is None else continuous_bernoulli_backward(logits, target, reduction, grad)
        return (loss, *(grads or (None,) * 2), None)
    fwd, bwd, bwd_t = {
        "bce": (bce_with_logits, bce_with_logits_backward, bce_with_logits_backward_target),
        "mse": (mse, mse_backward, mse_backward_target),
    }[recon]
    loss = fwd(logits, target, reduction)
    if grad is None:
        return loss, None, None, None
    return loss, bwd(logits, target, reduction, grad), bwd_t(logits, target, reduction, grad), None


def vae_loss(
    logits,
    target,
    mu,
    logvar,
    beta: float = 1.0,
    reduction: str = "sum",
    recon: str = "bce",
    log_scale=None,
    prior_mu=None,
    prior_logvar=None,
):
    """Negative ELBO: ``recon(logits, target) + beta * KL(mu, logvar || prior)`` with one reduction.

    ``recon`` is one of :data:`RECONS` (``"none"``: no reconstruction term); ``log_scale`` goes with
    ``"gaussian"`` only; ``mu``/``logvar`` None: no KL term; the prior is N(0, I) unless ``prior_mu`` and
    ``prior_logvar`` are given.
    """
    loss, *_ = _recon_terms(recon, logits, target, log_scale, reduction, None)
    if mu is not None:
        loss = loss + beta * kl_divergence(mu, logvar, reduction, prior_mu, prior_logvar)
    return loss


def vae_loss_gradients(
    logits,
    target,
    mu,
    logvar,
    beta: float = 1.0,
    reduction: str = "sum",
    recon: str = "bce",
    grad=1.0,
    log_scale=None,
    prior_mu=None,
    prior_logvar=None,
) -> dict[str, np.ndarray]:
    """Every gradient of :func:`vae_loss`, by input name: ``logits``, ``target``, ``log_scale``, ``mu``,
    ``logvar``, ``prior_mu``, ``prior_logvar`` and ``beta`` (``d/dbeta = KL`` with the reduction, times
    ``grad``), each present only where its input is."""
    _, dx, dt, ds = _recon_terms(recon, logits, target, log_scale, reduction, grad)
    out = {"logits": dx, "target": dt, "log_scale": ds}
    if mu is not None:
        kl_grads = kl_divergence_backward(mu, logvar, reduction, grad, prior_mu, prior_logvar)
        for name, d in zip(("mu", "logvar", "prior_mu", "prior_logvar"), kl_grads, strict=False):
            out[name] = beta * d
        kl = kl_divergence(mu, logvar, reduction, prior_mu, prior_logvar)
        out["beta"] = np.sum(np.asarray(grad, dtype=np.float64) * kl)  # beta is one number: summed over B
    return {k: v for k, v in out.items() if v is not None}


def vae_loss_backward(
    logits,
    target,
    mu,
    logvar,
    beta: float = 1.0,
    reduction: str = "sum",
    recon: str = "bce",
    grad=1.0,
    log_scale=None,
    prior_mu=None,
    prior_logvar=None,
) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """Gradients of :func:`vae_loss` with respect to ``logits``, ``mu`` and ``logvar`` (None where the
    term is absent); :func:`vae_loss_gradients` has the others."""
    d = vae_loss_gradients(
        logits, target, mu, logvar, beta, reduction, recon, grad, log_scale, prior_mu, prior_logvar
    )
    return d.get("logits"), d.get("mu"), d.get("logvar")
