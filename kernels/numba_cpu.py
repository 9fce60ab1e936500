"""Numba CPU backend: the four functions of :class:`fastvae.backend.Backend` on torch CPU tensors.

The kernels follow the Triton kernels' math.  NumPy has no bfloat16, so fp16/bf16 tensors are
computed through float32 copies (a CPU convenience; the GPU kernels read them natively).

Calls are lean: the launchers hand the jitted entry points data pointers and plain Python scalars
(Numba type-checks every argument of every call, and a tensor's ``.numpy()`` view costs more than
the kernel at training sizes), and the entries rebuild typed arrays with ``numba.carray``.  One
compiled entry exists per dtype combination (closures over NumPy dtypes, which Numba's cache keys).

Loss: each row's sum is computed by one thread in a fixed order (float32 over chunks of 256
elements, float64 across chunks, for float32 logits; float64 throughout for float64 logits), then the
rows are summed sequentially in float64, so results are bit-identical whatever the thread count.

Sampler: ``eps[i] = randn(key, offset + i)``, Philox4x32-10 and Box-Muller as in
``fastvae.reference`` (``tl.randn4x``'s transform: four normals a Philox call): the uniforms are
bit-identical to the Triton kernels'; the normals use polynomial log / sin / cos in float32 arithmetic
for float32 (fp16, bf16) inputs and in float64 for float64 inputs (a few ulp of that precision from
the reference), in one branch-free loop that LLVM vectorizes (see "Sampler").  A forward keeps its eps
for its backward (see "The eps memo").  Small problems run on the calling thread.
"""

from __future__ import annotations

import math
import operator
import threading

import numba
import numba.np.arrayobj  # noqa: F401  (see _np_empty)
import numpy as np
import torch
from llvmlite import ir
from numba import prange, types
from numba.extending import intrinsic

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

__all__ = ["fused_loss", "scale_grads_", "reparameterize", "reparameterize_backward"]

# Numba registers its NumPy implementations, keyed by the function objects, when numba.np.arrayobj
# is imported (else lazily, at the first compilation), and a kernel looks its globals up when it is
# compiled.  Importing arrayobj above and binding np.empty here, at import, keeps kernels compiled
# while a test's poison fixture has replaced np.empty (to fill host buffers) on NumPy's own.
_np_empty = np.empty


def _start_pool_keeping_torch_threads() -> None:
    """Start Numba's threading layer now, and give torch back its thread count.

    With the OpenMP layer, Numba's pool sets the process-wide OpenMP thread count when it starts, and
    torch shares that libgomp: torch's matmuls would switch from the user's thread count to Numba's at
    fastvae's first call, and so change their summation order mid-run (an exact resume, which starts
    a fresh process, would then differ in the last bit).  Started here once, with the count restored.
    """
    threads = torch.get_num_threads()
    from numba.np.ufunc import parallel

    parallel._launch_threads()
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


_start_pool_keeping_torch_threads()

_jit = numba.njit(cache=True, fastmath=False, nogil=True)
_pjit = numba.njit(cache=True, fastmath=False, nogil=True, parallel=True)


@intrinsic
def _voidptr(typingctx, addr):
    """The integer ``addr`` (a tensor's ``data_ptr()``) as a ``void*`` for ``numba.carray``."""
    if not isinstance(addr, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], ir.IntType(8).as_pointer())

    return types.voidptr(addr), codegen


@intrinsic
def _f32_from_bits(typingctx, bits):
    """The float32 whose bit pattern is the low 32 bits of the integer ``bits`` (an LLVM bitcast)."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        v = args[0]
        if bits.bitwidth > 32:
            v = builder.trunc(v, ir.IntType(32))
        elif bits.bitwidth < 32:
            v = builder.sext(v, ir.IntType(32))
        return builder.bitcast(v, ir.FloatType())

    return types.float32(bits), codegen


@intrinsic
def _bits_from_f32(typingctx, x):
    """The bit pattern of the float32 ``x`` as an int32 (an LLVM bitcast)."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.int32(x), codegen


@intrinsic
def _f64_from_bits(typingctx, bits):
    """The float64 whose bit pattern is the integer ``bits`` (64-bit)."""
    if not isinstance(bits, types.Integer) or bits.bitwidth != 64:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.DoubleType())

    return types.float64(bits), codegen


# ----------------------------------------------------------------------------------------------
# Fused loss, float32 logits: a vectorizable formulation
# ----------------------------------------------------------------------------------------------
#
# math.exp / math.log compile to scalar libm calls that LLVM cannot vectorize (Numba has no vector
# math library unless SVML is installed), so the float32 path evaluates the transcendentals itself,
# with straight-line float32 arithmetic LLVM turns into AVX2/AVX-512 code:
#
#   e = exp(-|x|)      |x| = k ln2 - r, |r| <= ln2/2: a degree-7 polynomial for e^r (Cephes expf),
#                      times 2^-k built from its bits (two factors, so that e goes down the
#                      subnormals exactly: 0 only past |x| ~ 103.97, where exp underflows anyway)
#   log1p(e)           e in [0, 1]: 2 atanh(s), s = e / (2 + e) in [0, 1/3], a minimax polynomial in s^2
#   sigmoid(x)         1 / (1 + e) for x >= 0, e / (1 + e) otherwise (both divisions share one)
#
# Each element is within a few float32 ulp; the per-row loss is summed in float32 over chunks of
# _CHUNK elements (vector lanes in a fixed, compile-time order) and the chunk sums in float64.
# KL terms are computed in float64 (1 + lv - e^lv cancels for lv ~ 0) with a float64 exp of the same
# shape.  NaN propagates (no 'nnan'/'ninf' fast-math flags); 'reassoc' only lets the compiler split
# the row sums into vector lanes, which is fixed at compile time: results do not depend on threads.

_FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}
_vjit = numba.njit(cache=True, fastmath=_FASTMATH, error_model="numpy", nogil=True)
_vpjit = numba.njit(cache=True, fastmath=_FASTMATH, error_model="numpy", nogil=True, parallel=True)
_CHUNK = 256
# Below this much work (elements, a KL element counted as 8) the kernel runs on the calling thread.
# A parallel launch saves at most half of ~0.6 ns per element on 2 cores, but afterwards Numba's
# OpenMP pool (not torch's: each ships its own libgomp) spins for a while and slows the torch ops
# that follow, e.g. the decoder's backward in a training step: 0.42 s vs 0.38 s per MNIST epoch at
# batch 128 (100k elements a call), measured interleaved.  From 2^18 elements (MNIST batch ~330)
# the halved kernel time outweighs that.
_PARALLEL_MIN_WORK = 1 << 18

_F0, _F1, _F2 = np.float32(0.0), np.float32(1.0), np.float32(2.0)
_LOG2E_F32 = np.float32(1.4426950408889634)
_LN2_HI_F32 = np.float32(0.693359375)  # 8 significant bits: k * _LN2_HI_F32 is exact
_LN2_LO_F32 = np.float32(-2.12194440e-4)
_EXP_NEG_CLAMP = np.float32(104.0)  # e^-104 rounds to 0 in float32
_ROUND_F32 = np.float32(0.5)
# e^r ~ 1 + r + r^2 (P0 + P1 r + ...), |r| <= ln2/2 (Cephes expf)
_EP0, _EP1, _EP2 = np.float32(5.0000001201e-1), np.float32(1.6666665459e-1), np.float32(4.1665795894e-2)
_EP3, _EP4, _EP5 = np.float32(8.3334519073e-3), np.float32(1.3981999507e-3), np.float32(1.9875691500e-4)
# atanh(s) / s ~ 1 + z (Q0 + Q1 z + Q2 z^2 + Q3 z^3), z = s^2 in [0, 1/9] (minimax, rel. error 4.5e-9)
_LQ0, _LQ1 = np.float32(0.3333320915699005), np.float32(0.2001076340675354)
_LQ2, _LQ3 = np.float32(0.14000901579856873), np.float32(0.14005997776985168)
_I127 = np.int32(127)
_I23 = np.int32(23)

_LOG2E_F64 = 1.4426950408889634
_LN2_F64 = 0.6931471805599453
_EXP_F64_OVERFLOW = 709.782712893384  # log(largest float64)
_EXP_F64_HI = 709.78
_EXP_F64_LO = -707.0
_I1022 = np.int64(1022)
_I52 = np.int64(52)
_K_BIAS = 2048.5  # floor(y + 0.5) = trunc(y + 2048.5) - 2048 for y > -2048


@numba.njit(cache=True, fastmath=_FASTMATH, error_model="numpy", inline="always")
def _exp_neg_f32(a):
    """e^-a for float32 a >= 0 (or NaN): a few ulp, exact subnormals, 0 from a = 104 on."""
    a = _EXP_NEG_CLAMP if a > _EXP_NEG_CLAMP else a  # keeps NaN
    ak = a if a == a else _F0  # a finite value to take k from
    k = np.int32(ak * _LOG2E_F32 + _ROUND_F32)  # round(a / ln2) in [0, 150]
    kf = np.float32(k)
    r = (kf * _LN2_HI_F32 - a) + kf * _LN2_LO_F32  # -a = -k ln2 + r, |r| <= ln2/2
    p = _EP5 * r + _EP4
    p = p * r + _EP3
    p = p * r + _EP2
    p = p * r + _EP1
    p = p * r + _EP0
    p = p * (r * r) + (r + _F1)
    k1 = k >> np.int32(1)
    s1 = _f32_from_bits((_I127 - k1) << _I23)  # 2^-k1 and 2^-(k - k1), both normal
    s2 = _f32_from_bits((_I127 - (k - k1)) << _I23)
    return (p * s1) * s2


@numba.njit(cache=True, fastmath=_FASTMATH, error_model="numpy", inline="always")
def _bce_terms_f32(x, t):
    """(max(x,0) - x t + log1p(e^-|x|), sigmoid(x) - t) in float32."""
    e = _exp_neg_f32(abs(x))
    u = _F1 + e
    w = _F2 + e
    q = _F1 / (u * w)  # one division for both 1/u and e/w
    s = e * u * q  # e / (2 + e)
    z = s * s
    poly = ((_LQ3 * z + _LQ2) * z + _LQ1) * z + _LQ0
    log1p_e = (s + s) + (s + s) * (z * poly)
    m = x if x > _F0 else _F0
    loss = (m - x * t) + log1p_e
    inv_u = w * q
    sig = inv_u if x >= _F0 else e * inv_u
    return loss, sig - t


@numba.njit(cache=True, fastmath=_FASTMATH, error_model="numpy", inline="always")
def _exp_f64(v):
    """e^v in float64: ~1 ulp for v in [-707, 709.78], inf above, 0 below -707 (no subnormals)."""
    c = _EXP_F64_HI if v > _EXP_F64_HI else v  # NaN stays NaN
    c = _EXP_F64_LO if c < _EXP_F64_LO else c
    ck = c if c == c else 0.0  # a finite value to take k from
    k = np.int64(ck * _LOG2E_F64 + _K_BIAS) - np.int64(2048)  # round(c / ln2) in [-1020, 1024]
    r = c - np.float64(k) * _LN2_F64  # |r| <= ln2/2 (+ rounding)
    p = 1.0 / 479001600.0  # Taylor to r^12: truncation < 2e-16
    p = p * r + 1.0 / 39916800.0
    p = p * r + 1.0 / 3628800.0
    p = p * r + 1.0 / 362880.0
    p = p * r + 1.0 / 40320.0
    p = p * r + 1.0 / 5040.0
    p = p * r + 1.0 / 720.0
    p = p * r + 1.0 / 120.0
    p = p * r + 1.0 / 24.0
    p = p * r + 1.0 / 6.0
    p = p * r + 0.5
    p = p * (r * r) + (r + 1.0)
    y = (p * _f64_from_bits((k + _I1022) << _I52)) * 2.0  # 2^(k-1) is normal for every k here
    if v > _EXP_F64_OVERFLOW:
        y = np.inf
    if v < _EXP_F64_LO:
        y = 0.0
    return y


# The chunk loops index from 0 (slices, not offsets): Numba then knows the index is non-negative and
# emits plain loads and stores, with no negative-index wraparound select that would turn them into
# gathers and scatters.
@_vjit
def _bce_chunk_f32(x, t, dx, t_scale, grad_scale):
    """BCE of a chunk (float32 sum) and its gradient into ``dx``.  One loop whether or not the gradient
    is wanted (without, ``dx`` is a scratch row): the vectorized sum then has one order, and the loss
    is bit-identical with and without gradients."""
    acc = _F0
    for f in range(x.shape[0]):
        loss, grad = _bce_terms_f32(x[f], np.float32(t[f]) * t_scale)
        acc += loss
        dx[f] = grad * grad_scale
    return acc


@_vjit
def _sse_chunk_f32(x, t, dx, t_scale, grad_scale):
    """Squared error of a chunk and its gradient into ``dx`` (one loop: see ``_bce_chunk_f32``)."""
    acc = _F0
    two_scale = _F2 * grad_scale
    for f in range(x.shape[0]):
        diff = x[f] - np.float32(t[f]) * t_scale
        acc += diff * diff
        dx[f] = diff * two_scale
    return acc


# Gaussian: with w = e^(-2s) precomputed per feature (the scale is shared by every row), an element
# is 0.5 (x - t)^2 w + s + 0.5 log(2 pi); the row's sum of s + 0.5 log(2 pi) is one constant added
# once per row, so the chunk sums q = (x - t)^2 w only.  d/dx = (x - t) w, d/ds = 1 - q.
_HALF_LOG_2PI = 0.9189385332046727  # log(2 pi) / 2


@_vjit
def _gauss_chunk_f32(x, t, w, dx, ds, t_scale, grad_scale):
    """Sum of ``(x - t)^2 w`` over a chunk (float32); d/dx into ``dx`` and d/ds into ``ds`` (scratch rows
    when not wanted: one loop, one summation order)."""
    acc = _F0
    for f in range(x.shape[0]):
        diff = x[f] - np.float32(t[f]) * t_scale
        r = diff * w[f]
        q = diff * r
        acc += q
        dx[f] = r * grad_scale
        ds[f] = (_F1 - q) * grad_scale
    return acc


# Continuous Bernoulli: softplus(x) - x t - log C(x), log C(x) = log(x / tanh(x / 2)), evaluated as
# x (1/2 - t) + K(x) with K(x) = softplus(x) - x/2 - log C(x) = log(sinh(x/2) / (x/2)), so the two ~ln 2
# terms never cancel near x = 0 (see fastvae.reference); d/dx = 1/2 - t + K'(x).  With a = |x|, e = e^-a:
#   |x| >= 1:  K = a/2 - log a + log1p(-e),  K' = sign(x) (1/2 - 1/a + e / (1 - e))
#              log1p(-e) = 2 atanh(s), s = -e / (2 - e), |s| <= 0.226: the log1p polynomial above;
#              log a from the float32 bits (2^k m) and the same polynomial
#   |x| < 1:   K = sum_k c_k x^(2k), K' = sum_k 2k c_k x^(2k-1) (radius 2 pi; 6 terms: < 1e-9 relative)
# Both branches are computed and one selected, so the loop stays branch-free and vectorizes.
_SQRT2_CB = np.float32(1.4142135623730951)
_CB_MANT = np.int32(0x007FFFFF)
_CB_ONE = np.int32(0x3F800000)
_F_HALF_CB = np.float32(0.5)
_CBK1, _CBK2, _CBK3 = np.float32(1 / 24), np.float32(-1 / 2880), np.float32(1 / 181440)
_CBK4, _CBK5, _CBK6 = np.float32(-1 / 9676800), np.float32(1 / 479001600), np.float32(-691 / 15692092416000)
_CBD1, _CBD2, _CBD3 = np.float32(2 / 24), np.float32(-4 / 2880), np.float32(6 / 181440)
_CBD4, _CBD5, _CBD6 = (
    np.float32(-8 / 9676800),
    np.float32(10 / 479001600),
    np.float32(-12 * 691 / 15692092416000),
)


@numba.njit(cache=True, fastmath=_FASTMATH, error_model="numpy", inline="always")
def _atanh2_f32(s):
    """2 atanh(s) = log((1 + s) / (1 - s)) for |s| <= 1/3 (the minimax polynomial of log1p above)."""
    z = s * s
    poly = ((_LQ3 * z + _LQ2) * z + _LQ1) * z + _LQ0
    return (s + s) + (s + s) * (z * poly)


@numba.njit(cache=True, fastmath=_FASTMATH, error_model="numpy", inline="always")
def _log_pos_f32(y):
    """log(y) in float32 for a normal y > 0: y = 2^k m, m in [sqrt(1/2), sqrt(2)),
    log m = 2 atanh((m - 1) / (m + 1)) with |(m - 1) / (m + 1)| <= 0.172 (a few ulp)."""
    bits = _bits_from_f32(y)
    k = (bits >> _I23) - _I127
    m = _f32_from_bits((bits & _CB_MANT) | _CB_ONE)  # [1, 2), exact
    big = m > _SQRT2_CB
    m = m * _F_HALF_CB if big else m
    kf = np.float32(k + (np.int32(1) if big else np.int32(0)))
    return kf * _LN2_HI_F32 + (kf * _LN2_LO_F32 + _atanh2_f32((m - _F1) / (m + _F1)))


@numba.njit(cache=True, fastmath=_FASTMATH, error_model="numpy", inline="always")
def _cb_terms_f32(x, t):
    """(x (1/2 - t) + K(x), 1/2 - t + K'(x)) in float32: the continuous-Bernoulli NLL and d/dx."""
    a = abs(x)
    e = _exp_neg_f32(a)
    ac = a if a >= _F1 else _F1  # the closed forms' lane never sees a < 1 (there e <= 1/e)
    q = _F1 / ((_F2 - e) * (_F1 - e))  # one division for e / (2 - e) and e / (1 - e)
    k_closed = (_F_HALF_CB * ac - _log_pos_f32(ac)) + _atanh2_f32(-e * (_F1 - e) * q)
    dk_closed = (_F_HALF_CB - _F1 / ac) + e * (_F2 - e) * q
    z = x * x
    k_series = z * (((((_CBK6 * z + _CBK5) * z + _CBK4) * z + _CBK3) * z + _CBK2) * z + _CBK1)
    dk_series = a * (((((_CBD6 * z + _CBD5) * z + _CBD4) * z + _CBD3) * z + _CBD2) * z + _CBD1)
    small = a < _F1
    k = k_series if small else k_closed
    dk = dk_series if small else dk_closed
    dk = dk if x >= _F0 else -dk  # K' is odd
    half_t = _F_HALF_CB - t
    return x * half_t + k, half_t + dk


@_vjit
def _cb_chunk_f32(x, t, dx, t_scale, grad_scale):
    """Continuous-Bernoulli NLL of a chunk (float32 sum) and its gradient into ``dx`` (one loop)."""
    acc = _F0
    for f in range(x.shape[0]):
        loss, grad = _cb_terms_f32(x[f], np.float32(t[f]) * t_scale)
        acc += loss
        dx[f] = grad * grad_scale
    return acc


@_vjit
def _kl_row_f64(mu, lv, dmu, dlv, kl_scale):
    """-(1 + lv - mu^2 - e^lv) / 2 summed over a row in float64; d/dmu = mu, d/dlv = (e^lv - 1) / 2 into
    ``dmu``, ``dlv`` (scratch rows without gradients: one loop, so one summation order)."""
    acc = 0.0
    for d in range(mu.shape[0]):
        m = np.float64(mu[d])
        l = np.float64(lv[d])
        var = _exp_f64(l)
        acc += -0.5 * ((1.0 + l) - m * m - var)
        dmu[d] = m * kl_scale
        dlv[d] = 0.5 * (var - 1.0) * kl_scale
    return acc


# Operands are 1-D views of [B, n] tensors whose rows are contiguous and start at b * stride (a
# stride may be anything, 0 for a batch-broadcast target); the gradients are C-contiguous [B, n]
# flattened, or empty without need_grad (slicing an empty array gives an empty array: never read).
# ``rows[0, b]`` / ``rows[1, b]`` receive the float64 reconstruction / KL sums of row b.
@_vjit
def _loss_row_f32(
    b, x, t, mu, lv, dx, dmu, dlv, rows, F, D, xs, ts, ms, ls, kl_scale, gs, tsc, recon, need_grad
):
    acc = 0.0
    if recon != RECON_NONE:
        x0, t0, g0 = b * xs, b * ts, b * F
        scratch = dx if need_grad else _np_empty(min(F, _CHUNK), np.float32)
        for f0 in range(0, F, _CHUNK):
            f1 = min(f0 + _CHUNK, F)
            xc, tc = x[x0 + f0 : x0 + f1], t[t0 + f0 : t0 + f1]
            dc = dx[g0 + f0 : g0 + f1] if need_grad else scratch[: f1 - f0]
            if recon == RECON_BCE:
                acc += np.float64(_bce_chunk_f32(xc, tc, dc, tsc, gs))
            elif recon == RECON_MSE:
                acc += np.float64(_sse_chunk_f32(xc, tc, dc, tsc, gs))
            else:
                acc += np.float64(_cb_chunk_f32(xc, tc, dc, tsc, gs))
    rows[0, b] = acc
    kl = 0.0
    if D:
        m0, l0, g0 = b * ms, b * ls, b * D
        dm = dmu[g0 : g0 + D] if need_grad else _np_empty(D, dmu.dtype)
        dl = dlv[g0 : g0 + D] if need_grad else _np_empty(D, dlv.dtype)
        kl = _kl_row_f64(mu[m0 : m0 + D], lv[l0 : l0 + D], dm, dl, kl_scale)
    rows[1, b] = kl


# The Gaussian's row is its own function, so that the rows of the other terms are called with the
# arguments they always had (each array argument costs a reference-count round trip per call).
# ``w`` is e^(-2s) per feature (length F), ``gconst`` the row's sum of s + 0.5 log(2 pi), ``ds`` the
# [B, F] d/ds when ``need_ds`` (else empty).  The KL term comes from _loss_row_f32 with no recon.
@_vjit
def _gauss_row_f32(
    b, x, t, mu, lv, dx, dmu, dlv, rows, F, D, xs, ts, ms, ls, kl_scale, gs, tsc, need_grad,
    w, ds, gconst, need_ds,
):  # fmt: skip
    _loss_row_f32(
        b, x, t, mu, lv, dx, dmu, dlv, rows, F, D, xs, ts, ms, ls, kl_scale, gs, tsc, RECON_NONE, need_grad
    )
    x0, t0, g0 = b * xs, b * ts, b * F
    scratch = dx if need_grad else _np_empty(min(F, _CHUNK), np.float32)
    ds_scratch = ds if need_ds else _np_empty(min(F, _CHUNK), np.float32)
    acc = 0.0
    for f0 in range(0, F, _CHUNK):
        f1 = min(f0 + _CHUNK, F)
        xc, tc = x[x0 + f0 : x0 + f1], t[t0 + f0 : t0 + f1]
        dc = dx[g0 + f0 : g0 + f1] if need_grad else scratch[: f1 - f0]
        dsc = ds[g0 + f0 : g0 + f1] if need_ds else ds_scratch[: f1 - f0]
        acc += np.float64(_gauss_chunk_f32(xc, tc, w[f0:f1], dc, dsc, tsc, gs))
    rows[0, b] = 0.5 * acc + gconst


@_vjit
def _loss_rows_f32(
    x, t, mu, lv, dx, dmu, dlv, rows, F, D, xs, ts, ms, ls, kl_scale, gs, tsc, recon, need_grad,
    w, ds, gconst, need_ds,
):  # fmt: skip
    """float32 logits (any target dtype; KL in float64 whatever mu/logvar's dtype), on this thread."""
    for b in range(rows.shape[1]):
        if recon == RECON_GAUSSIAN:
            _gauss_row_f32(
                b, x, t, mu, lv, dx, dmu, dlv, rows, F, D, xs, ts, ms, ls, kl_scale, gs, tsc, need_grad,
                w, ds, gconst, need_ds,
            )  # fmt: skip
        else:
            _loss_row_f32(
                b, x, t, mu, lv, dx, dmu, dlv, rows, F, D, xs, ts, ms, ls, kl_scale, gs, tsc, recon, need_grad
            )


@_vpjit
def _loss_rows_f32_par(
    x, t, mu, lv, dx, dmu, dlv, rows, F, D, xs, ts, ms, ls, kl_scale, gs, tsc, recon, need_grad,
    w, ds, gconst, need_ds,
):  # fmt: skip
    """The same, rows in parallel: each row is summed by one thread, in the same order."""
    for b in prange(rows.shape[1]):
        if recon == RECON_GAUSSIAN:
            _gauss_row_f32(
                b, x, t, mu, lv, dx, dmu, dlv, rows, F, D, xs, ts, ms, ls, kl_scale, gs, tsc, need_grad,
                w, ds, gconst, need_ds,
            )  # fmt: skip
        else:
            _loss_row_f32(
                b, x, t, mu, lv, dx, dmu, dlv, rows, F, D, xs, ts, ms, ls, kl_scale, gs, tsc, recon, need_grad
            )


@_vjit
def _kl_alone_flat(mu, lv, dmu, dlv, rows, D, kl_scale, need_grad):
    """KL alone (``kl_divergence``), C-contiguous mu / logvar: one vectorizable pass over all B*D
    elements, then the row sums in order.  Row by row, the per-row set-up costs more than a row's ~20
    elements (0.9 ms vs eager's 0.16 ms at 4,096 x 20).  Float64 arithmetic as in the rows."""
    n = rows.shape[1] * D
    terms = _np_empty(n)
    for i in range(n):
        m = np.float64(mu[i])
        l = np.float64(lv[i])
        var = _exp_f64(l)
        terms[i] = -0.5 * ((1.0 + l) - m * m - var)
        if need_grad:
            dmu[i] = m * kl_scale
            dlv[i] = 0.5 * (var - 1.0) * kl_scale
    for b in range(rows.shape[1]):
        acc = 0.0
        for d in range(D):
            acc += terms[b * D + d]
        rows[0, b] = 0.0
        rows[1, b] = acc


# Continuous Bernoulli in float64, as fastvae.reference: x (1/2 - t) + K(x), K = log(sinh(x/2) / (x/2)),
# the closed forms from |x| = 1, below it 10 terms of the series in x^2 (truncation < 1e-17 relative;
# the coefficients are the reference's).


@_jit
def _cb_even_f64(x):
    """(K(x), K'(x)): K = |x|/2 - log|x| + log1p(-e^-|x|), K' = sign(x) (1/2 - 1/|x| + 1/(e^|x| - 1))."""
    a = abs(x)
    if a >= 1.0:
        em1 = -math.expm1(-a)  # 1 - e^-a
        k = 0.5 * a - math.log(a) + math.log(em1)
        dk = 0.5 - 1.0 / a + math.exp(-a) / em1
    else:
        z = x * x
        k = 0.0
        dk = 0.0
        for j in range(len(_CB_K_SERIES) - 1, -1, -1):
            k = k * z + _CB_K_SERIES[j]
            dk = dk * z + 2.0 * (j + 1) * _CB_K_SERIES[j]
        k *= z
        dk *= a
    return k, (dk if x >= 0 else -dk)


# The plain scalar kernel: float64 logits (libm exp/log1p in float64 are as exact as the reference).
@_jit
def _loss_row_f64(
    b, x, t, mu, lv, dx, dmu, dlv, rows, F, D, xs, ts, ms, ls, kl_scale, gs, tsc, recon, need_grad
):
    acc = 0.0
    if recon == RECON_BCE:  # BCE with logits: max(x,0) - x t + log1p(e^-|x|);  d/dx = sigmoid(x) - t
        for f in range(F):
            xv = np.float64(x[b * xs + f])
            tv = np.float64(t[b * ts + f]) * tsc
            e = math.exp(-abs(xv))
            acc += max(xv, 0.0) - xv * tv + math.log1p(e)
            if need_grad:
                sig = 1.0 / (1.0 + e) if xv >= 0 else e / (1.0 + e)
                dx[b * F + f] = (sig - tv) * gs
    elif recon == RECON_MSE:  # squared error: (x - t)^2;  d/dx = 2 (x - t)
        for f in range(F):
            diff = np.float64(x[b * xs + f]) - np.float64(t[b * ts + f]) * tsc
            acc += diff * diff
            if need_grad:
                dx[b * F + f] = 2.0 * diff * gs
    elif recon == RECON_CB:  # x (1/2 - t) + K(x) = BCE - log C(x);  d/dx = 1/2 - t + K'(x)
        for f in range(F):
            xv = np.float64(x[b * xs + f])
            tv = np.float64(t[b * ts + f]) * tsc
            k, dk = _cb_even_f64(xv)
            acc += xv * (0.5 - tv) + k
            if need_grad:
                dx[b * F + f] = (0.5 - tv + dk) * gs
    rows[0, b] = acc
    acc = 0.0
    for d in range(D):  # KL: -(1 + lv - mu^2 - e^lv)/2;  d/dmu = mu, d/dlv = (e^lv - 1)/2
        m = np.float64(mu[b * ms + d])
        l = np.float64(lv[b * ls + d])
        var = math.exp(l)
        acc += -0.5 * (1.0 + l - m * m - var)
        if need_grad:
            dmu[b * D + d] = m * kl_scale
            dlv[b * D + d] = 0.5 * (var - 1.0) * kl_scale
    rows[1, b] = acc


@_jit
def _gauss_row_f64(
    b, x, t, mu, lv, dx, dmu, dlv, rows, F, D, xs, ts, ms, ls, kl_scale, gs, tsc, need_grad,
    w, ds, gconst, need_ds,
):  # fmt: skip
    """The Gaussian (see _gauss_row_f32): 0.5 (x - t)^2 w + s + log(2 pi)/2, w = e^-2s;
    d/dx = (x - t) w, d/ds = 1 - (x - t)^2 w.  The KL term from _loss_row_f64 with no recon."""
    _loss_row_f64(
        b, x, t, mu, lv, dx, dmu, dlv, rows, F, D, xs, ts, ms, ls, kl_scale, gs, tsc, RECON_NONE, need_grad
    )
    acc = 0.0
    for f in range(F):
        diff = np.float64(x[b * xs + f]) - np.float64(t[b * ts + f]) * tsc
        r = diff * w[f]
        q = diff * r
        acc += q
        if need_grad:
            dx[b * F + f] = r * gs
            if need_ds:
                ds[b * F + f] = (1.0 - q) * gs
    rows[0, b] = 0.5 * acc + gconst


@_jit
def _loss_rows_f64(
    x, t, mu, lv, dx, dmu, dlv, rows, F, D, xs, ts, ms, ls, kl_scale, gs, tsc, recon, need_grad,
    w, ds, gconst, need_ds,
):  # fmt: skip
    for b in range(rows.shape[1]):
        if recon == RECON_GAUSSIAN:
            _gauss_row_f64(
                b, x, t, mu, lv, dx, dmu, dlv, rows, F, D, xs, ts, ms, ls, kl_scale, gs, tsc, need_grad,
                w, ds, gconst, need_ds,
            )  # fmt: skip
        else:
            _loss_row_f64(
                b, x, t, mu, lv, dx, dmu, dlv, rows, F, D, xs, ts, ms, ls, kl_scale, gs, tsc, recon, need_grad
            )


@_pjit
def _loss_rows_f64_par(
    x, t, mu, lv, dx, dmu, dlv, rows, F, D, xs, ts, ms, ls, kl_scale, gs, tsc, recon, need_grad,
    w, ds, gconst, need_ds,
):  # fmt: skip
    for b in prange(rows.shape[1]):
        if recon == RECON_GAUSSIAN:
            _gauss_row_f64(
                b, x, t, mu, lv, dx, dmu, dlv, rows, F, D, xs, ts, ms, ls, kl_scale, gs, tsc, need_grad,
                w, ds, gconst, need_ds,
            )  # fmt: skip
        else:
            _loss_row_f64(
                b, x, t, mu, lv, dx, dmu, dlv, rows, F, D, xs, ts, ms, ls, kl_scale, gs, tsc, recon, need_grad
            )


@_jit
def _finish(rows, out, reduction, beta, scale):
    """The loss terms from the row sums, in ``out``'s dtype: ``out`` is (loss, recon, kl), each ``[B]``
    for reduction none, else one value each summed over rows in order (times ``scale`` = 1/B for the
    mean): ``loss = recon + beta * kl``."""
    B = rows.shape[1]
    if reduction == REDUCE_NONE:
        for b in range(B):
            r, k = rows[0, b], rows[1, b]
            out[b] = r + beta * k
            out[B + b] = r
            out[2 * B + b] = k
    else:
        r = 0.0
        k = 0.0
        for b in range(B):
            r += rows[0, b]
            k += rows[1, b]
        r *= scale
        k *= scale
        out[0] = r + beta * k
        out[1] = r
        out[2] = k


@_jit
def _strided_len(B, n, stride):
    """Elements spanned by B rows of n contiguous elements, row b starting at b * stride."""
    return (B - 1) * stride + n if n and B else 0


def _make_loss_entry(X, T, M, G, O, vector: bool):
    """The jitted entry for one dtype combination: logits X, target T, mu/logvar M, logit gradient G
    (mu/logvar gradients are M), losses O.  ``vector``: the float32 kernel, else the float64 one."""

    @_jit
    def entry(
        xp, tp, mp, lp, dxp, dmp, dlp, outp, B, F, D, xs, ts, ms, ls, recon, reduction, flags, beta, gs, tsc,
        sp, L, dsp,
    ):  # fmt: skip
        # flags: 1 = need_grad, 2 = parallel, 4 = d/d(log_scale).  Pointers of absent operands are 0 with
        # length 0.  sp: the Gaussian's L log-scales (L = 1 or F), dsp: its [B, F] gradient.
        need_grad = (flags & 1) != 0
        need_ds = (flags & 4) != 0
        x = numba.carray(_voidptr(xp), _strided_len(B, F, xs), X)
        t = numba.carray(_voidptr(tp), _strided_len(B, F, ts), T)
        mu = numba.carray(_voidptr(mp), _strided_len(B, D, ms), M)
        lv = numba.carray(_voidptr(lp), _strided_len(B, D, ls), M)
        dx = numba.carray(_voidptr(dxp), B * F if need_grad else 0, G)
        dmu = numba.carray(_voidptr(dmp), B * D if need_grad else 0, M)
        dlv = numba.carray(_voidptr(dlp), B * D if need_grad else 0, M)
        out = numba.carray(_voidptr(outp), 3 * B if reduction == REDUCE_NONE else 3, O)
        ds = numba.carray(_voidptr(dsp), B * F if need_ds else 0, O)
        s = numba.carray(_voidptr(sp), L, O)
        # w = e^(-2s) per feature (read once for all rows); gconst = sum_f s_f + F log(2 pi) / 2.
        w = _np_empty(F if recon == RECON_GAUSSIAN else 0, G)
        gconst = 0.0
        for f in range(w.shape[0]):
            sf = np.float64(s[f if L > 1 else 0])
            w[f] = math.exp(-2.0 * sf)
            gconst += sf + _HALF_LOG_2PI
        rows = _np_empty((2, B))
        kl_scale = beta * gs
        if vector:
            if F == 0 and ms == D and ls == D:
                _kl_alone_flat(mu, lv, dmu, dlv, rows, D, kl_scale, need_grad)
            elif flags & 2:
                _loss_rows_f32_par(
                    x, t, mu, lv, dx, dmu, dlv, rows, F, D, xs, ts, ms, ls, kl_scale,
                    np.float32(gs), np.float32(tsc), recon, need_grad, w, ds, gconst, need_ds,
                )  # fmt: skip
            else:
                _loss_rows_f32(
                    x, t, mu, lv, dx, dmu, dlv, rows, F, D, xs, ts, ms, ls, kl_scale,
                    np.float32(gs), np.float32(tsc), recon, need_grad, w, ds, gconst, need_ds,
                )  # fmt: skip
        elif flags & 2:
            _loss_rows_f64_par(
                x, t, mu, lv, dx, dmu, dlv, rows, F, D, xs, ts, ms, ls, kl_scale, gs, tsc, recon, need_grad,
                w, ds, gconst, need_ds,
            )  # fmt: skip
        else:
            _loss_rows_f64(
                x, t, mu, lv, dx, dmu, dlv, rows, F, D, xs, ts, ms, ls, kl_scale, gs, tsc, recon, need_grad,
                w, ds, gconst, need_ds,
            )  # fmt: skip
        _finish(rows, out, reduction, beta, gs if reduction == REDUCE_MEAN else 1.0)

    return entry


@_jit
def _scale_rows(g, per_row, buf, B, n):
    """``buf[b, :] *= g[b]`` (per_row) or ``g[0]``, skipping rows whose factor is exactly 1."""
    for b in range(B):
        s = g[b] if per_row else g[0]
        if s != 1.0:  # loss.backward() passes g = 1: nothing to touch
            for j in range(b * n, (b + 1) * n):
                buf[j] *= s


@_pjit
def _scale_rows_par(g, per_row, buf, B, n):
    for b in prange(B):
        s = g[b] if per_row else g[0]
        if s != 1.0:
            for j in range(b * n, (b + 1) * n):
                buf[j] *= s


def _make_scale_entry(Gd, X, M):
    """The jitted in-place scaling for gradient dtype Gd, logit gradients X and mu/logvar gradients M."""

    @_jit
    def entry(gp, per_row, dxp, dmp, dlp, B, F, D, parallel):
        g = numba.carray(_voidptr(gp), B if per_row else 1, Gd)
        dx = numba.carray(_voidptr(dxp), B * F, X)
        dmu = numba.carray(_voidptr(dmp), B * D, M)
        dlv = numba.carray(_voidptr(dlp), B * D, M)
        if parallel:
            _scale_rows_par(g, per_row, dx, B, F)
            _scale_rows_par(g, per_row, dmu, B, D)
            _scale_rows_par(g, per_row, dlv, B, D)
        else:
            _scale_rows(g, per_row, dx, B, F)
            _scale_rows(g, per_row, dmu, B, D)
            _scale_rows(g, per_row, dlv, B, D)

    return entry


# ----------------------------------------------------------------------------------------------
# Sampler: Philox4x32-10 + Box-Muller, vectorized
# ----------------------------------------------------------------------------------------------
#
# Element counter n = offset + i takes normal n & 3 of Philox counter n >> 2 (reference.randn): per block of
# _EPS_BLOCK elements, one loop over the quads of counters draws 4 normals each into an L1-resident
# scratch buffer, with no branches and no libm calls, which LLVM vectorizes (8 lanes of 64 bits in a
# zmm register; 4 in ymm); the elementwise loop then reads the block's eps at (b & 3) + i:
#
#   Philox     32-bit words held in uint64 lanes; a round's two 32 x 32 -> 64-bit products are
#              uint64 multiplies of values whose high halves are known zero (vpmuludq), hi = p >> 32,
#              lo = p & 0xffffffff; the key schedule is constant (key 0) and the seed words are the
#              same for every lane (round 0's second product is hoisted).  All four output words are used.
#   uniforms   Triton's uint_to_uniform_float, bit for bit: the word as int32, negative -> ~x (a
#              select), to float32, times 4.6566127342e-10 in float32; u1 floored at 1e-7.
#   log(u1)    u1 = 2^e m (bits of the float32), m in [sqrt(1/2), sqrt(2)), f = m - 1:
#              log(1 + f) = f - f^2/2 + s (f^2/2 + R(s^2)), s = f / (2 + f) (fdlibm's e_log.c: < 1 ulp)
#   sin, cos   theta = float32(2 pi u2) in [0, 2 pi): k = round(theta / (pi/2)), r = theta - k pi/2
#              with pi/2 in two parts (theta - k * PIO2_1 is exact), then cos(r) and sin(r) swapped
#              and negated by k (fdlibm's k_cos.c / k_sin.c polynomials on |r| <= pi/4: < 1 ulp)
#   eps        r = sqrt(-2 log u1); (r cos theta, r sin theta) of (u1, u2), then of (u3, u4), in
#              float64: a few float64 ulp from fastvae.reference.randn
#   float32    for float32 inputs the same steps run in float32 after the uniforms (FreeBSD logf,
#              Cephes sinf / cosf / expf polynomials): within 3 float32 ulp of the reference, with
#              the floating-point part in 8 float32 lanes.
#
# The generated code was checked (inspect_asm of _sample_span_f32): the Philox products are vpmuludq
# on zmm registers (19 of them, and 2 vpmullq) and the float32 Box-Muller runs on ymm (vsqrtps).
#
# fastmath: only 'contract' (FMA); the compensated sums of the polynomials must not be reassociated.

_SAMPLER_FM = {"contract"}
_sjit = numba.njit(cache=True, fastmath=_SAMPLER_FM, error_model="numpy", nogil=True)
_spjit = numba.njit(cache=True, fastmath=_SAMPLER_FM, error_model="numpy", nogil=True, parallel=True)
_sinline = numba.njit(cache=True, fastmath=_SAMPLER_FM, error_model="numpy", inline="always")

_U0 = np.uint64(0)
_M32 = np.uint64(0xFFFFFFFF)
_S32 = np.uint64(32)
_KEY_A = np.uint64(0x9E3779B9)
_KEY_B = np.uint64(0xBB67AE85)
_ROUND_A = np.uint64(0xD2511F53)
_ROUND_B = np.uint64(0xCD9E8D57)
_HALF_RANGE = np.uint64(0x80000000)
_UNIFORM_SCALE = np.float32(4.6566127342e-10)
_TWO_PI_F32 = np.float32(6.283185307179586)
_U1_FLOOR = np.float32(1.0e-7)

_I8M = np.int32(0x007FFFFF)  # float32 mantissa bits
_I_ONE = np.int32(0x3F800000)  # float32 1.0
_SQRT2_F32 = np.float32(1.4142135)
_LN2_HI = 6.93147180369123816490e-01  # fdlibm e_log.c
_LN2_LO = 1.90821492927058770002e-10
_LG1, _LG2 = 6.666666666666735130e-01, 3.999999999940941908e-01
_LG3, _LG4 = 2.857142874366239149e-01, 2.222219843214978396e-01
_LG5, _LG6, _LG7 = 1.818357216161805012e-01, 1.531383769920937332e-01, 1.479819860511658591e-01
_TWO_OVER_PI = 6.36619772367581382433e-01
_PIO2_1 = 1.57079632673412561417e00  # first 33 bits of pi/2 (fdlibm e_rem_pio2.c)
_PIO2_1T = 6.07710050650619224932e-11  # pi/2 - _PIO2_1
_S1, _S2 = -1.66666666666666324348e-01, 8.33333333332248946124e-03  # fdlibm k_sin.c
_S3, _S4 = -1.98412698298579493134e-04, 2.75573137070700676789e-06
_S5, _S6 = -2.50507602534068634195e-08, 1.58969099521155010221e-10
_C1, _C2 = 4.16666666666666019037e-02, -1.38888888888741095749e-03  # fdlibm k_cos.c
_C3, _C4 = 2.48015872894767294178e-05, -2.75573143513906633035e-07
_C5, _C6 = 2.08757232129817482790e-09, -1.13596475577881948265e-11

# float32 Box-Muller (float32 inputs): FreeBSD's e_logf.c (|error| < 2^-34 in the polynomial) and
# Cephes sinf / cosf on |r| <= pi/4, pi/2 in three parts (Cephes DP1..3, doubled).
_LN2_HI_F = np.float32(float.fromhex("0x1.62e300p-1"))  # 6.9313812256e-01
_LN2_LO_F = np.float32(float.fromhex("0x1.2fefa2p-17"))  # 9.0580006145e-06
_LGF1, _LGF2 = np.float32(float.fromhex("0xaaaaaa.0p-24")), np.float32(float.fromhex("0xccce13.0p-25"))
_LGF3, _LGF4 = np.float32(float.fromhex("0x91e9ee.0p-25")), np.float32(float.fromhex("0xf89e26.0p-26"))
_F_HALF, _F_ONE, _F_TWO, _F_M2 = np.float32(0.5), np.float32(1.0), np.float32(2.0), np.float32(-2.0)
_TWO_OVER_PI_F = np.float32(6.36619772367581382433e-01)
_PIO2_A, _PIO2_B = np.float32(1.5703125), np.float32(4.837512969970703125e-4)
_PIO2_C = np.float32(7.54978995489188216e-8)
_SF1, _SF2, _SF3 = np.float32(-1.6666654611e-1), np.float32(8.3321608736e-3), np.float32(-1.9515295891e-4)
_CF1, _CF2 = np.float32(4.166664568298827e-2), np.float32(-1.388731625493765e-3)
_CF3 = np.float32(2.443315711809948e-5)
_EXP_HI_F, _EXP_LO_F = np.float32(90.0), np.float32(-104.0)  # e^90 overflows, e^-104 underflows
_K_BIAS_F = np.float32(256.5)  # floor(y + 0.5) = trunc(y + 256.5) - 256 for y > -256


@_sinline
def _uniform(word):
    """Triton's uint_to_uniform_float of a 32-bit word (in a uint64): as int32, negative -> ~x."""
    x = word if word < _HALF_RANGE else _M32 - word  # ~x of a negative int32, as a non-negative integer
    return np.float32(np.int32(x)) * _UNIFORM_SCALE


@_sinline
def _log_f32_arg(u):
    """log(u) in float64 for a positive normal float32 u (fdlibm's reduction and polynomial)."""
    bits = _bits_from_f32(u)
    e = np.int32(bits >> 23) - np.int32(127)
    m = _f32_from_bits((bits & _I8M) | _I_ONE)  # u = 2^e m, m in [1, 2): exact
    big = m > _SQRT2_F32
    f = np.float64(m) * (0.5 if big else 1.0) - 1.0  # m in [sqrt(1/2), sqrt(2)): exact
    k = np.float64(e + (1 if big else 0))
    s = f / (2.0 + f)
    z = s * s
    r = z * (_LG1 + z * (_LG2 + z * (_LG3 + z * (_LG4 + z * (_LG5 + z * (_LG6 + z * _LG7))))))
    hfsq = 0.5 * f * f
    return k * _LN2_HI - ((hfsq - (s * (hfsq + r) + k * _LN2_LO)) - f)


@_sinline
def _sincos_0_2pi(theta):
    """(cos theta, sin theta) in float64 for theta in [0, 2 pi] (quadrant reduction, fdlibm kernels)."""
    k = np.int64(theta * _TWO_OVER_PI + 0.5)  # nearest multiple of pi/2: 0..4
    kf = np.float64(k)
    r = (theta - kf * _PIO2_1) - kf * _PIO2_1T  # |r| <= pi/4; the first difference is exact
    z = r * r
    sin_r = r + (z * r) * (_S1 + z * (_S2 + z * (_S3 + z * (_S4 + z * (_S5 + z * _S6)))))
    hz = 0.5 * z
    w = 1.0 - hz
    cos_r = w + (((1.0 - w) - hz) + (z * z) * (_C1 + z * (_C2 + z * (_C3 + z * (_C4 + z * (_C5 + z * _C6))))))
    # cos(r + k pi/2) = cos r, -sin r, -cos r, sin r;  sin(r + k pi/2) = sin r, cos r, -sin r, -cos r
    cv = sin_r if k & 1 else cos_r
    sv = cos_r if k & 1 else sin_r
    return (-cv if (k + 1) & 2 else cv), (-sv if k & 2 else sv)


@_sinline
def _log_f32(u):
    """log(u) in float32 for a positive normal float32 u (FreeBSD's e_logf.c reduction and polynomial)."""
    bits = _bits_from_f32(u)
    e = np.int32(bits >> 23) - np.int32(127)
    m = _f32_from_bits((bits & _I8M) | _I_ONE)  # u = 2^e m, m in [1, 2): exact
    big = m > _SQRT2_F32
    f = m * (_F_HALF if big else _F_ONE) - _F_ONE  # m in [sqrt(1/2), sqrt(2)): exact
    k = np.float32(e + (1 if big else 0))
    s = f / (_F_TWO + f)
    z = s * s
    w = z * z
    r = z * (_LGF1 + w * _LGF3) + w * (_LGF2 + w * _LGF4)
    hfsq = _F_HALF * f * f
    return k * _LN2_HI_F - ((hfsq - (s * (hfsq + r) + k * _LN2_LO_F)) - f)


@_sinline
def _sincos_f32(theta):
    """(cos theta, sin theta) in float32 for theta in [0, 2 pi] (quadrant reduction, Cephes polynomials)."""
    k = np.int32(theta * _TWO_OVER_PI_F + _F_HALF)  # nearest multiple of pi/2: 0..4
    kf = np.float32(k)
    r = ((theta - kf * _PIO2_A) - kf * _PIO2_B) - kf * _PIO2_C  # |r| <= pi/4; the first step is exact
    z = r * r
    sin_r = ((_SF3 * z + _SF2) * z + _SF1) * z * r + r
    cos_r = ((_CF3 * z + _CF2) * z + _CF1) * z * z - _F_HALF * z + _F_ONE
    # cos(r + k pi/2) = cos r, -sin r, -cos r, sin r;  sin(r + k pi/2) = sin r, cos r, -sin r, -cos r
    cv = sin_r if k & 1 else cos_r
    sv = cos_r if k & 1 else sin_r
    return (-cv if (k + 1) & 2 else cv), (-sv if k & 2 else sv)


@_sinline
def _exp_f32(v):
    """e^v in float32: a few ulp; inf above 88.7, 0 (through the subnormals) below -103.9; NaN stays."""
    c = _EXP_HI_F if v > _EXP_HI_F else v  # NaN stays NaN
    c = _EXP_LO_F if c < _EXP_LO_F else c
    ck = c if c == c else _F0  # a finite value to take k from
    k = np.int32(ck * _LOG2E_F32 + _K_BIAS_F) - np.int32(256)  # round(c / ln2) in [-150, 130]
    kf = np.float32(k)
    r = (c - kf * _LN2_HI_F32) - kf * _LN2_LO_F32  # |r| <= ln2/2 (+ rounding)
    p = _EP5 * r + _EP4
    p = p * r + _EP3
    p = p * r + _EP2
    p = p * r + _EP1
    p = p * r + _EP0
    p = p * (r * r) + (r + _F1)
    k1 = k >> np.int32(1)
    s1 = _f32_from_bits((_I127 + k1) << _I23)  # 2^k1 and 2^(k - k1), both normal
    s2 = _f32_from_bits((_I127 + (k - k1)) << _I23)
    return (p * s1) * s2


@_sinline
def _philox4(s0, s1, counter):
    """The four words of Philox4x32-10 with the key 0 at the counter (lo, hi, s0, s1): the seed words
    select the stream (``fastvae.reference.uniform4``)."""
    c0 = counter & _M32
    c1 = counter >> _S32
    c2 = s0 & _M32  # known 32-bit values: every product is a 32 x 32 -> 64-bit vpmuludq, no vpmullq
    c3 = s1 & _M32
    k0 = _U0
    k1 = _U0
    for _ in range(10):
        prod_b = _ROUND_B * c2
        prod_a = _ROUND_A * c0
        c0 = (prod_b >> _S32) ^ c1 ^ k0
        c1 = prod_b & _M32
        c2 = (prod_a >> _S32) ^ c3 ^ k1
        c3 = prod_a & _M32
        k0 = (k0 + _KEY_A) & _M32
        k1 = (k1 + _KEY_B) & _M32
    return c0, c1, c2, c3


@_sinline
def _box_muller(wa, wb):
    """Triton's pair_uniform_to_normal of two Philox words in float64 after the float32 uniforms:
    u1 = max(1e-7, u_a), theta = float32(2 pi) u_b, r = sqrt(-2 log u1); (r cos theta, r sin theta)."""
    u1 = _uniform(wa)
    u1 = u1 if u1 > _U1_FLOOR else _U1_FLOOR
    theta = np.float64(_TWO_PI_F32 * _uniform(wb))  # a float32 product, as in the kernel
    r = math.sqrt(-2.0 * _log_f32_arg(u1))
    c, s = _sincos_0_2pi(theta)
    return r * c, r * s


@_sinline
def _box_muller_f32(wa, wb):
    """The same in float32 after the (identical) float32 uniforms: a few float32 ulp."""
    u1 = _uniform(wa)
    u1 = u1 if u1 > _U1_FLOOR else _U1_FLOOR
    r = np.sqrt(_F_M2 * _log_f32(u1))
    c, s = _sincos_f32(_TWO_PI_F32 * _uniform(wb))
    return r * c, r * s


@_sinline
def _fill_eps(scr, s0, s1, first):
    """``scr[4 q + l]`` = normal l of ``reference.randn4(key, first + q)``, float64 Box-Muller: one Philox
    call and two Box-Mullers (r cos, r sin of (u1, u2), then of (u3, u4)) per 4 normals."""
    for q in range(scr.shape[0] // 4):
        w1, w2, w3, w4 = _philox4(s0, s1, first + np.uint64(q))
        n1, n2 = _box_muller(w1, w2)
        n3, n4 = _box_muller(w3, w4)
        scr[4 * q] = n1
        scr[4 * q + 1] = n2
        scr[4 * q + 2] = n3
        scr[4 * q + 3] = n4


@_sinline
def _fill_eps_f32(scr, s0, s1, first):
    """The same in float32 arithmetic after the uniforms."""
    for q in range(scr.shape[0] // 4):
        w1, w2, w3, w4 = _philox4(s0, s1, first + np.uint64(q))
        n1, n2 = _box_muller_f32(w1, w2)
        n3, n4 = _box_muller_f32(w3, w4)
        scr[4 * q] = n1
        scr[4 * q + 1] = n2
        scr[4 * q + 2] = n3
        scr[4 * q + 3] = n4


# What a sampling span computes (``mode``); 2 and 3 are the eps memo's (see _memo below).
_Z, _DLOGVAR, _Z_KEEP, _DLOGVAR_KEPT = 0, 1, 2, 3
# Elements whose eps one fill draws into a scratch buffer (4 or 8 KiB: stays in L1) before the
# elementwise loop reads them.
_EPS_BLOCK = 1024


@_sjit
def _sample_span_f32(a, lv, out, kept, s0, s1, base, mode):
    """float32 arrays, float32 arithmetic, ``eps[i] = randn(key, base + i)``, ``std = exp(lv[i] / 2)``:

    _Z             z = a + std eps (a = mu)                    12 bytes an element moved
    _DLOGVAR       dlogvar = a std eps / 2 (a = dz)            12 bytes
    _Z_KEEP        z, and kept[i] = eps                        16 bytes
    _DLOGVAR_KEPT  dlogvar with eps = kept[i]: no Philox       16 bytes

    Element counter n = base + i is normal n & 3 of Philox counter n >> 2: per block of _EPS_BLOCK
    elements starting at counter b, the quads from b >> 2 are drawn into ``scr`` (4 normals each) and
    element i of the block reads ``scr[(b & 3) + i]``.
    """
    n = out.shape[0]
    if mode == _DLOGVAR_KEPT:
        for i in range(n):
            out[i] = _F_HALF * a[i] * _exp_f32(_F_HALF * lv[i]) * kept[i]
        return
    scr = _np_empty(_EPS_BLOCK + 4, np.float32)
    for s in range(0, n, _EPS_BLOCK):
        m = min(n - s, _EPS_BLOCK)
        b = base + np.uint64(s)
        shift = np.int64(b & np.uint64(3))
        _fill_eps_f32(scr[: (m + shift + 3) & ~3], s0, s1, b >> np.uint64(2))
        if mode == _Z:
            for i in range(m):
                out[s + i] = a[s + i] + _exp_f32(_F_HALF * lv[s + i]) * scr[shift + i]
        elif mode == _DLOGVAR:
            for i in range(m):
                out[s + i] = _F_HALF * a[s + i] * _exp_f32(_F_HALF * lv[s + i]) * scr[shift + i]
        else:
            for i in range(m):
                eps = scr[shift + i]
                kept[s + i] = eps
                out[s + i] = a[s + i] + _exp_f32(_F_HALF * lv[s + i]) * eps


@_sjit
def _sample_span(a, lv, out, kept, s0, s1, base, mode):
    """The same for float64 arrays, in float64 arithmetic after the float32 uniforms (twice the bytes)."""
    n = out.shape[0]
    if mode == _DLOGVAR_KEPT:
        for i in range(n):
            out[i] = 0.5 * a[i] * _exp_f64(0.5 * lv[i]) * kept[i]
        return
    scr = _np_empty(_EPS_BLOCK + 4, np.float64)
    for s in range(0, n, _EPS_BLOCK):
        m = min(n - s, _EPS_BLOCK)
        b = base + np.uint64(s)
        shift = np.int64(b & np.uint64(3))
        _fill_eps(scr[: (m + shift + 3) & ~3], s0, s1, b >> np.uint64(2))
        if mode == _Z:
            for i in range(m):
                out[s + i] = a[s + i] + _exp_f64(0.5 * lv[s + i]) * scr[shift + i]
        elif mode == _DLOGVAR:
            for i in range(m):
                out[s + i] = 0.5 * a[s + i] * _exp_f64(0.5 * lv[s + i]) * scr[shift + i]
        else:
            for i in range(m):
                eps = scr[shift + i]
                kept[s + i] = eps
                out[s + i] = a[s + i] + _exp_f64(0.5 * lv[s + i]) * eps


@_sjit
def _eps_span(u1, u2, eps, eps32, s0, s1, base):
    """The sampler alone (tests, benchmarks), at the element counters ``n = base + i``: the uniform pair
    of each element's Box-Muller (u1, u2 of Philox counter n >> 2 for lanes n & 3 = 0, 1; u3, u4 for
    2, 3), and eps in float64 and float32 arithmetic through the sampler's own fills."""
    n = eps.shape[0]
    for i in range(n):
        c = base + np.uint64(i)
        w1, w2, w3, w4 = _philox4(s0, s1, c >> np.uint64(2))
        second = (c & np.uint64(2)) != _U0
        u1[i] = _uniform(w3 if second else w1)
        u2[i] = _uniform(w4 if second else w2)
    shift = np.int64(base & np.uint64(3))
    size = (n + shift + 3) & ~3
    scr = _np_empty(size, np.float64)
    scr32 = _np_empty(size, np.float32)
    _fill_eps(scr, s0, s1, base >> np.uint64(2))
    _fill_eps_f32(scr32, s0, s1, base >> np.uint64(2))
    for i in range(n):
        eps[i] = scr[shift + i]
        eps32[i] = scr32[shift + i]


@_jit
def _key_bits(kp, key_bits):
    """The 64-bit key: read at ``kp`` (an int64 tensor's data) when not 0, else ``key_bits``."""
    if kp:
        return numba.carray(_voidptr(kp), 1, np.int64)[0]
    return key_bits


@_jit
def _key_words(bits):
    """The seed words (lo, hi) of a 64-bit key: Philox counter words 2 and 3."""
    k = np.uint64(bits)
    return k & _M32, k >> _S32


# Elements per parallel task (a multiple of the vector width): large enough to amortize a task.
_SAMPLE_CHUNK = 4096
# A draw costs about what torch's own normal_ does per element (measured interleaved, one thread),
# some 30x an elementwise op: from 2^15 draws the halved time outweighs waking Numba's OpenMP pool,
# whose spin afterwards slows the torch ops that follow (see _PARALLEL_MIN_WORK).
_PARALLEL_MIN_DRAWS = 1 << 15


def _make_sampler(dt):
    """The jitted reparameterize entries (serial, parallel) for inputs and output of dtype ``dt``.

    ``kp`` points at the key tensor's int64 (0: the key is ``key_bits``).  ``ep`` (0: none) points at
    an eps memo buffer: its first 8 bytes hold the key (int64) and then ``n`` eps of dtype ``dt``.
    _Z_KEEP fills it; _DLOGVAR_KEPT reads it if it holds this key, else draws eps again (_DLOGVAR).
    """
    single = dt == np.float32

    @_jit
    def serial(ap, lp, op, n, kp, key_bits, offset, mode, ep):
        bits = _key_bits(kp, key_bits)
        s0, s1 = _key_words(bits)
        a = numba.carray(_voidptr(ap), n, dt)
        lv = numba.carray(_voidptr(lp), n, dt)
        out = numba.carray(_voidptr(op), n, dt)
        kept = numba.carray(_voidptr(ep + 8 if ep else 0), n if ep else 0, dt)
        if ep:
            box = numba.carray(_voidptr(ep), 1, np.int64)
            if mode == _Z_KEEP:
                box[0] = bits
            elif box[0] != bits:
                mode = _DLOGVAR
        if single:
            _sample_span_f32(a, lv, out, kept, s0, s1, np.uint64(offset), mode)
        else:
            _sample_span(a, lv, out, kept, s0, s1, np.uint64(offset), mode)

    @_pjit
    def parallel(ap, lp, op, n, kp, key_bits, offset, mode, ep):
        bits = _key_bits(kp, key_bits)
        s0, s1 = _key_words(bits)
        a = numba.carray(_voidptr(ap), n, dt)
        lv = numba.carray(_voidptr(lp), n, dt)
        out = numba.carray(_voidptr(op), n, dt)
        kept = numba.carray(_voidptr(ep + 8 if ep else 0), n if ep else 0, dt)
        if ep:
            box = numba.carray(_voidptr(ep), 1, np.int64)
            if mode == _Z_KEEP:
                box[0] = bits
            elif box[0] != bits:
                mode = _DLOGVAR
        for c in prange((n + _SAMPLE_CHUNK - 1) // _SAMPLE_CHUNK):
            s = c * _SAMPLE_CHUNK
            e = min(s + _SAMPLE_CHUNK, n)
            k = kept[s:e] if ep else kept
            if single:
                _sample_span_f32(a[s:e], lv[s:e], out[s:e], k, s0, s1, np.uint64(offset) + np.uint64(s), mode)
            else:
                _sample_span(a[s:e], lv[s:e], out[s:e], k, s0, s1, np.uint64(offset) + np.uint64(s), mode)

    return serial, parallel


# ----------------------------------------------------------------------------------------------
# Launchers (torch CPU tensors in and out)
# ----------------------------------------------------------------------------------------------

_NATIVE = (torch.float32, torch.float64)
_TARGETS = (torch.float32, torch.float64, torch.uint8)
_NP = {torch.float32: np.float32, torch.float64: np.float64, torch.uint8: np.uint8}
_SAMPLERS = {dt: _make_sampler(_NP[dt]) for dt in _NATIVE}
_LOSS_ENTRIES: dict = {}
_SCALE_ENTRIES: dict = {}
_KEY_HELP = "an int in [0, 2**64) or a 1-element int64 CPU tensor"


def _rows_of(a: torch.Tensor, name: str) -> tuple[int, int]:
    """(data pointer, row stride) of a [B, n] CPU tensor whose rows are contiguous."""
    st = a.stride()
    if len(st) != 2 or (st[1] != 1 and a.shape[1] > 1) or not a.is_cpu:
        raise ValueError(f"{name} must be a [B, n] CPU tensor with contiguous rows, got {tuple(a.shape)}")
    return a.data_ptr(), st[0]


def fused_loss(
    p: LossProblem,
    logits: torch.Tensor | None,
    target: torch.Tensor | None,
    mu: torch.Tensor | None,
    logvar: torch.Tensor | None,
    log_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, recon, kl, dlogits, dmu, dlogvar, dlog_scale)`` of ``recon(logits, target) + beta * KL``.

    Per element: BCE ``max(x, 0) - x t + log1p(e^-|x|)`` (d/dx = sigmoid(x) - t); squared error
    ``(x - t)^2`` (d/dx = 2 (x - t)); Gaussian ``0.5 (x - t)^2 e^(-2s) + s + 0.5 log(2 pi)``
    (d/dx = (x - t) e^(-2s), d/ds = 1 - (x - t)^2 e^(-2s)); continuous Bernoulli BCE ``- log C(x)``,
    ``log C(x) = log(x / tanh(x / 2))`` (d/dx = sigmoid(x) - t - (1/x - 1/sinh(x))); KL
    ``-(1 + lv - mu^2 - e^lv) / 2`` (d/dmu = mu, d/dlv = (e^lv - 1) / 2); gradients times
    ``p.grad_scale`` (KL's times ``beta`` too).  One pass reads logits, target, mu, logvar once and
    writes the gradients once (and the [B, F] d/ds in ``p.acc`` when ``p.need_grad and p.scale_grad``);
    the losses are one buffer of 3 (or 3 x B) values in ``p.acc``.  See :class:`fastvae.backend.Backend`.
    """
    B, F, D = p.B, p.F, p.D
    sp = L = 0
    s = None
    if p.recon == RECON_GAUSSIAN:
        if log_scale is None or log_scale.dim() != 1 or log_scale.numel() not in (1, F):
            got = None if log_scale is None else tuple(log_scale.shape)
            raise ValueError(f"log_scale must be a 1-D tensor of 1 or F = {F} elements, got {got}")
        s = log_scale.to(p.acc).contiguous()  # a no-op for what fastvae.ops passes
        sp, L = s.data_ptr(), s.numel()
    elif log_scale is not None:
        raise ValueError(
            f"log_scale is only read by the Gaussian (recon {RECON_GAUSSIAN}), got recon {p.recon}"
        )
    if F:
        x = logits if logits.dtype in _NATIVE else logits.float()
        t = target if target.dtype in _TARGETS else target.float()
        (xp, xs), (tp, ts) = _rows_of(x, "logits"), _rows_of(t, "target")
        X, T = x.dtype, t.dtype
        tsc = 1.0 / 255.0 if T == torch.uint8 else 1.0
    else:
        xp = xs = tp = ts = 0
        tsc = 1.0
    if D:
        m = mu if mu.dtype in _NATIVE else mu.float()
        lv = logvar if logvar.dtype == m.dtype else logvar.to(m.dtype)
        (mp, ms), (lp, ls) = _rows_of(m, "mu"), _rows_of(lv, "logvar")
        M = m.dtype
        if not F:
            X = T = M
    else:
        mp = ms = lp = ls = 0
        M = X
    need = p.need_grad
    dx = torch.empty((B, F), dtype=X) if need and F else None
    dmu = torch.empty((B, D), dtype=M) if need and D else None
    dlv = torch.empty((B, D), dtype=M) if need and D else None
    need_ds = need and p.scale_grad and s is not None
    dls = torch.empty((B, F) if need_ds else 0, dtype=p.acc)
    none = p.reduction == REDUCE_NONE
    out = torch.empty(3 * B if none else 3, dtype=p.acc)
    key = (X, T, M, p.acc)
    entry = _LOSS_ENTRIES.get(key)
    if entry is None:
        entry = _LOSS_ENTRIES[key] = _make_loss_entry(
            _NP[X], _NP[T], _NP[M], _NP[X], _NP[p.acc], X == torch.float32
        )
    parallel = B > 1 and B * (F + 8 * D) >= _PARALLEL_MIN_WORK
    entry(
        xp, tp, mp, lp,
        dx.data_ptr() if dx is not None else 0,
        dmu.data_ptr() if dmu is not None else 0,
        dlv.data_ptr() if dlv is not None else 0,
        out.data_ptr(), B, F, D, xs, ts, ms, ls, p.recon, p.reduction,
        (1 if need else 0) | (2 if parallel else 0) | (4 if need_ds else 0), p.beta, p.grad_scale, tsc,
        sp, L, dls.data_ptr() if need_ds else 0,
    )  # fmt: skip
    loss, rec, kl = out.view(3, B).unbind(0) if none else out.unbind(0)
    # Gradients in their operand's dtype (fp16 / bf16 were computed in float32), or empty.
    dtype = (logits if F else mu).dtype
    dx = torch.empty(0, dtype=dtype) if dx is None else dx if X == logits.dtype else dx.to(logits.dtype)
    if dmu is None:
        dmu, dlv = torch.empty(0, dtype=dtype), torch.empty(0, dtype=dtype)
    elif M != mu.dtype or M != logvar.dtype:
        dmu, dlv = dmu.to(mu.dtype), dlv.to(logvar.dtype)
    return loss, rec, kl, dx, dmu, dlv, dls


def scale_grads_(grad: torch.Tensor, dlogits: torch.Tensor, dmu: torch.Tensor, dlogvar: torch.Tensor) -> None:
    """In place: every gradient row ``b *= grad`` (0-d) or ``grad[b]`` ([B]); rows with factor 1 are
    not touched (each touched element read and written once)."""
    per_row = grad.dim() == 1
    g = (grad if grad.dtype in _NATIVE else grad.float()).contiguous()
    kernel = []  # (buffer, in the jitted kernel?) of each non-empty gradient
    for buf in (dlogits, dmu, dlogvar):
        if buf.numel() == 0:
            kernel.append(False)
        elif buf.dtype in _NATIVE and buf.is_contiguous():
            kernel.append(True)
        else:  # fp16 / bf16: through float32, one rounding
            buf.copy_(buf.float() * (g.reshape(-1, 1) if per_row else g).float())
            kernel.append(False)
    has_x, has_m = kernel[0], kernel[1] and kernel[2]
    if not (has_x or has_m):
        return
    B = (dlogits if has_x else dmu).shape[0]
    F = dlogits.shape[1] if has_x else 0
    D = dmu.shape[1] if has_m else 0
    if per_row and g.shape[0] != B:
        raise ValueError(f"grad must be 0-d or [B] with B = {B}, got {tuple(grad.shape)}")
    X = dlogits.dtype if has_x else dmu.dtype
    M = dmu.dtype if has_m else X
    key = (g.dtype, X, M)
    entry = _SCALE_ENTRIES.get(key)
    if entry is None:
        entry = _SCALE_ENTRIES[key] = _make_scale_entry(_NP[g.dtype], _NP[X], _NP[M])
    entry(
        g.data_ptr(),
        per_row,
        dlogits.data_ptr() if has_x else 0,
        dmu.data_ptr() if has_m else 0,
        dlogvar.data_ptr() if has_m else 0,
        B,
        F,
        D,
        B > 1 and B * (F + 2 * D) >= _PARALLEL_MIN_WORK,
    )


def _key_args(key: Key) -> tuple[int, int]:
    """(pointer, bits): a tensor key is read by the kernel at its pointer (never on the host); an int
    key travels as its 64 bits in an int64."""
    if isinstance(key, torch.Tensor):
        if key.dtype != torch.int64 or key.numel() != 1 or not key.is_cpu:
            raise ValueError(f"key must be {_KEY_HELP}, got a {key.dtype} tensor of shape {tuple(key.shape)}")
        return key.data_ptr(), 0
    bits = operator.index(key)
    if not 0 <= bits < 1 << 64:
        raise ValueError(f"key must be {_KEY_HELP}, got {bits}")
    return 0, bits - (1 << 64) if bits >= 1 << 63 else bits


# The eps memo.  The backward needs the eps its forward drew; drawing them again costs as much as
# the forward (Philox + Box-Muller), while keeping them costs one more store in the forward and
# turns the backward into an elementwise pass (about a fifth of the forward's time, measured
# interleaved at 82k draws): eager PyTorch keeps its eps tensor for the same reason.  A forward of
# _MEMO_MIN.._MEMO_MAX draws keeps its eps, with the key the kernel read, in a fresh buffer; the
# last _MEMO_SLOTS buffers are kept, found by (dtype, offset, n).  The backward's kernel uses a
# buffer only if it holds the same key (compared in the kernel: a tensor key is never read on the
# host), else it draws eps again, so results are bit-identical either way (eps depends on key,
# offset and index only).  Buffers are never written after they are listed, so threads may share
# them; at most _MEMO_SLOTS * _MEMO_MAX eps are held.
_MEMO_MIN = 1 << 11  # below this, drawing again costs less than the bookkeeping
_MEMO_MAX = 1 << 20
_MEMO_SLOTS = 4
_memo: list[tuple[torch.dtype, int, int, torch.Tensor]] = []
_memo_lock = threading.Lock()


def _memo_find(dtype: torch.dtype, offset: int, n: int) -> torch.Tensor | None:
    with _memo_lock:
        for d, o, m, buf in reversed(_memo):
            if m == n and o == offset and d == dtype:
                return buf
    return None


def _memo_keep(entry: tuple[torch.dtype, int, int, torch.Tensor]) -> None:
    with _memo_lock:
        _memo.append(entry)
        if len(_memo) > _MEMO_SLOTS:
            del _memo[0]


def _sample(a: torch.Tensor, logvar: torch.Tensor, key: Key, offset: int, backward: bool, name: str):
    kp, bits = _key_args(key)
    if offset < 0:
        raise ValueError(f"offset must be an int >= 0, got {offset}")
    dtype = a.dtype
    if logvar.dtype != dtype or logvar.shape != a.shape:
        raise ValueError(f"logvar must have {name}'s shape and dtype {tuple(a.shape)} {dtype}")
    if not (a.is_contiguous() and logvar.is_contiguous()) or not a.is_cpu:
        raise ValueError(f"{name} and logvar must be contiguous CPU tensors")
    n = a.numel()
    kernels = _SAMPLERS.get(dtype)
    cdtype = dtype if kernels is not None else torch.float32  # fp16 / bf16: through float32
    if kernels is None:
        kernels = _SAMPLERS[torch.float32]
        a, logvar = a.float(), logvar.float()
    out = torch.empty(a.shape, dtype=cdtype)
    kept = None
    mode = _DLOGVAR if backward else _Z
    parallel = n >= _PARALLEL_MIN_DRAWS
    if _MEMO_MIN <= n <= _MEMO_MAX:
        if backward:
            kept = _memo_find(cdtype, offset, n)
            if kept is not None:
                mode = _DLOGVAR_KEPT
                parallel = n >= _PARALLEL_MIN_WORK  # elementwise now, unless the key differs
        else:
            kept = torch.empty(n + (2 if cdtype == torch.float32 else 1), dtype=cdtype)  # key + eps
            mode = _Z_KEEP
    kernels[parallel](
        a.data_ptr(),
        logvar.data_ptr(),
        out.data_ptr(),
        n,
        kp,
        bits,
        offset,
        mode,
        kept.data_ptr() if kept is not None else 0,
    )
    if mode == _Z_KEEP:
        _memo_keep((cdtype, offset, n, kept))
    return out if cdtype == dtype else out.to(dtype)


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, key: Key, offset: int) -> torch.Tensor:
    """``z = mu + exp(logvar / 2) * eps``, ``eps[i] = randn(key, offset + i)`` over the flat index.

    Reads mu and logvar once, writes z once (3 x 4 bytes an element in float32)."""
    return _sample(mu, logvar, key, offset, False, "mu")


def reparameterize_backward(dz: torch.Tensor, logvar: torch.Tensor, key: Key, offset: int) -> torch.Tensor:
    """``dlogvar = dz * exp(logvar / 2) * eps / 2`` with the forward's eps (d z / d logvar; dmu = dz)."""
    return _sample(dz, logvar, key, offset, True, "dz")


def sample_eps(key: Key, offset: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The sampler alone, for tests and benchmarks: ``(u1, u2, eps, eps32)`` of the counters
    ``offset + i``, ``i < n``: the two float32 uniforms (``reference.uniform_pair``) and the normal in
    float64 arithmetic (float64 inputs) and in float32 arithmetic (float32, fp16, bf16 inputs)."""
    kp, bits = _key_args(key)
    s0, s1 = _key_words(_key_bits(kp, bits))
    u1, u2, eps, eps32 = (np.empty(n, dt) for dt in (np.float32, np.float32, np.float64, np.float32))
    _eps_span(u1, u2, eps, eps32, np.uint64(s0), np.uint64(s1), np.uint64(offset))
    return u1, u2, eps, eps32
