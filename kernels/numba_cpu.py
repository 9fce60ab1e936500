"""Numba CPU kernels: the same math as the Triton kernels, parallel over rows (``prange``).

Each function has the signature of its Triton twin in ``fused_loss.py`` / ``reparameterize.py`` and
takes torch CPU tensors.  NumPy has no bfloat16, so fp16/bf16 tensors are computed through a float32
copy (a CPU convenience; the GPU kernels read them natively).  Each row's sum is computed by one
thread in a fixed order (float32 over chunks of 256 elements, float64 across chunks, for float32
logits; float64 throughout for float64 logits), then the rows are summed in a fixed order, so results
are bit-identical whatever the thread count.  Small problems run on the calling thread.

The float32 loss kernel is written so that LLVM vectorizes it (AVX2/AVX-512): exp and log1p are
polynomials rather than libm calls, which Numba cannot vectorize (see "Fused loss, float32 logits").

Philox4x32-10 and Box-Muller follow ``fastvae.reference`` (itself a port of ``tl.randn``): the uniforms
are bit-identical to the Triton kernels'.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch
from llvmlite import ir
from numba import prange, types
from numba.extending import intrinsic

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


@_jit
def _reparameterize_row(a, logvar, out, k0, k1, backward, b):
    cols = a.shape[1]
    for j in range(cols):
        eps = randn_at(k0, k1, np.int64(b) * cols + j)
        std = math.exp(0.5 * np.float64(logvar[b, j]))
        if backward:
            out[b, j] = 0.5 * np.float64(a[b, j]) * std * eps  # dlogvar = dz * std * eps / 2
        else:
            out[b, j] = np.float64(a[b, j]) + std * eps  # z = mu + std * eps


@_pjit
def _reparameterize_rows(a, logvar, out, k0, k1, backward):
    for b in prange(a.shape[0]):
        _reparameterize_row(a, logvar, out, k0, k1, backward, b)


@_jit
def _reparameterize_rows_serial(a, logvar, out, k0, k1, backward):
    for b in range(a.shape[0]):
        _reparameterize_row(a, logvar, out, k0, k1, backward, b)


# Philox costs ~18 ns an element: the pool pays for itself from far fewer elements than the loss.
_PARALLEL_MIN_DRAWS = 1 << 14


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
def _f64_from_bits(typingctx, bits):
    """The float64 whose bit pattern is the integer ``bits`` (64-bit)."""
    if not isinstance(bits, types.Integer) or bits.bitwidth != 64:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.DoubleType())

    return types.float64(bits), codegen


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
def _bce_chunk_f32(x, t, dx, t_scale, grad_scale, need_grad):
    acc = _F0
    if need_grad:
        for f in range(x.shape[0]):
            loss, grad = _bce_terms_f32(x[f], np.float32(t[f]) * t_scale)
            acc += loss
            dx[f] = grad * grad_scale
    else:
        for f in range(x.shape[0]):
            loss, grad = _bce_terms_f32(x[f], np.float32(t[f]) * t_scale)
            acc += loss
    return acc


@_vjit
def _sse_chunk_f32(x, t, dx, t_scale, grad_scale, need_grad):
    acc = _F0
    two_scale = _F2 * grad_scale
    if need_grad:
        for f in range(x.shape[0]):
            diff = x[f] - np.float32(t[f]) * t_scale
            acc += diff * diff
            dx[f] = diff * two_scale
    else:
        for f in range(x.shape[0]):
            diff = x[f] - np.float32(t[f]) * t_scale
            acc += diff * diff
    return acc


@_vjit
def _kl_row_f64(mu, lv, dmu, dlv, kl_scale, need_grad):
    """-(1 + lv - mu^2 - e^lv) / 2 summed over a row in float64; d/dmu = mu, d/dlv = (e^lv - 1) / 2."""
    acc = 0.0
    if need_grad:
        for d in range(mu.shape[0]):
            m = np.float64(mu[d])
            l = np.float64(lv[d])
            var = _exp_f64(l)
            acc += -0.5 * ((1.0 + l) - m * m - var)
            dmu[d] = m * kl_scale
            dlv[d] = 0.5 * (var - 1.0) * kl_scale
    else:
        for d in range(mu.shape[0]):
            m = np.float64(mu[d])
            l = np.float64(lv[d])
            acc += -0.5 * ((1.0 + l) - m * m - _exp_f64(l))
    return acc


@_vjit
def _loss_row_f32(b, x, t, mu, lv, dx, dmu, dlv, row_recon, row_kl, dims, kl_scale, gs, ts, recon, need_grad):
    features, latent = dims[0], dims[1]
    x_stride, t_stride, mu_stride, lv_stride = dims[2], dims[3], dims[4], dims[5]
    acc = 0.0
    if recon != 0:
        x0, t0 = b * x_stride, b * t_stride
        for f0 in range(0, features, _CHUNK):
            f1 = min(f0 + _CHUNK, features)
            xc, tc = x[x0 + f0 : x0 + f1], t[t0 + f0 : t0 + f1]
            dc = dx[b, f0:f1] if need_grad else dx[b]  # dx is [B, 0] without need_grad
            if recon == 1:
                acc += np.float64(_bce_chunk_f32(xc, tc, dc, ts, gs, need_grad))
            else:
                acc += np.float64(_sse_chunk_f32(xc, tc, dc, ts, gs, need_grad))
    row_recon[b] = acc
    kl = 0.0
    if latent:
        m0, l0 = b * mu_stride, b * lv_stride
        kl = _kl_row_f64(mu[m0 : m0 + latent], lv[l0 : l0 + latent], dmu[b], dlv[b], kl_scale, need_grad)
    row_kl[b] = kl


@_vpjit
def _fused_loss_rows_f32(
    x, t, mu, lv, dx, dmu, dlv, row_recon, row_kl, dims, beta, grad_scale, t_scale, recon_kind, need_grad
):
    """float32 logits (any target dtype; KL in float64 whatever mu/logvar's dtype), rows in parallel.

    x, t, mu, lv are 1-D contiguous views of [B, n] operands whose rows are contiguous (row b starts
    at b * stride): a C-contiguous slice of them is what LLVM vectorizes, with no gathers.  ``dims`` is
    (features, latent, x_stride, t_stride, mu_stride, lv_stride); the gradients are C-contiguous [B, n].
    """
    kl_scale, gs, ts = beta * grad_scale, np.float32(grad_scale), np.float32(t_scale)
    for b in prange(row_recon.shape[0]):
        _loss_row_f32(
            b, x, t, mu, lv, dx, dmu, dlv, row_recon, row_kl, dims, kl_scale, gs, ts, recon_kind, need_grad
        )


@_vjit
def _fused_loss_rows_f32_serial(
    x, t, mu, lv, dx, dmu, dlv, row_recon, row_kl, dims, beta, grad_scale, t_scale, recon_kind, need_grad
):
    """The same on the calling thread: small problems, where a parallel launch costs more than it saves."""
    kl_scale, gs, ts = beta * grad_scale, np.float32(grad_scale), np.float32(t_scale)
    for b in range(row_recon.shape[0]):
        _loss_row_f32(
            b, x, t, mu, lv, dx, dmu, dlv, row_recon, row_kl, dims, kl_scale, gs, ts, recon_kind, need_grad
        )


@_vjit
def _kl_alone_flat(mu, lv, dmu, dlv, row_kl, latent, kl_scale, need_grad):
    """KL alone (``kl_divergence``): one vectorizable pass over all B*D elements, then the row sums in
    order.  Row by row, the per-row set-up costs more than a row's ~20 elements (0.9 ms vs eager's
    0.16 ms at 4,096 x 20).  Inputs are flat C-contiguous views; float64 arithmetic as in the rows."""
    n = mu.shape[0]
    terms = np.empty(n)
    for i in range(n):
        m = np.float64(mu[i])
        l = np.float64(lv[i])
        var = _exp_f64(l)
        terms[i] = -0.5 * ((1.0 + l) - m * m - var)
        if need_grad:
            dmu[i] = m * kl_scale
            dlv[i] = 0.5 * (var - 1.0) * kl_scale
    for b in range(row_kl.shape[0]):
        acc = 0.0
        for d in range(latent):
            acc += terms[b * latent + d]
        row_kl[b] = acc


# The plain scalar kernel: float64 logits (libm exp/log1p in float64 are as exact as the reference).
@_jit
def _loss_row_plain(
    b, x, t, mu, lv, dx, dmu, dlv, row_recon, row_kl, beta, grad_scale, t_scale, recon, need_grad
):
    features = x.shape[1]
    latent = mu.shape[1]
    kl_scale = beta * grad_scale
    acc = 0.0
    if recon == 1:  # BCE with logits: max(x,0) - x t + log1p(e^-|x|);  d/dx = sigmoid(x) - t
        for f in range(features):
            xv = np.float64(x[b, f])
            tv = np.float64(t[b, f]) * t_scale
            e = math.exp(-abs(xv))
            acc += max(xv, 0.0) - xv * tv + math.log1p(e)
            if need_grad:
                sig = 1.0 / (1.0 + e) if xv >= 0 else e / (1.0 + e)
                dx[b, f] = (sig - tv) * grad_scale
    elif recon == 2:  # squared error: (x - t)^2;  d/dx = 2 (x - t)
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
def _fused_loss_rows(
    x, t, mu, lv, dx, dmu, dlv, row_recon, row_kl, beta, grad_scale, t_scale, recon_kind, need_grad
):
    for b in prange(row_recon.shape[0]):
        _loss_row_plain(
            b, x, t, mu, lv, dx, dmu, dlv, row_recon, row_kl, beta, grad_scale, t_scale, recon_kind, need_grad
        )


@_jit
def _fused_loss_rows_serial(
    x, t, mu, lv, dx, dmu, dlv, row_recon, row_kl, beta, grad_scale, t_scale, recon_kind, need_grad
):
    for b in range(row_recon.shape[0]):
        _loss_row_plain(
            b, x, t, mu, lv, dx, dmu, dlv, row_recon, row_kl, beta, grad_scale, t_scale, recon_kind, need_grad
        )


@_jit
def _scale_row(g, per_row, grad, b):
    s = g[b] if per_row else g[0]
    if s != 1.0:  # loss.backward() passes g = 1: nothing to touch
        row = grad[b]
        for j in range(row.shape[0]):
            row[j] *= s


@_pjit
def _scale_rows(g, per_row, grad):
    for b in prange(grad.shape[0]):
        _scale_row(g, per_row, grad, b)


@_jit
def _scale_rows_serial(g, per_row, grad):
    for b in range(grad.shape[0]):
        _scale_row(g, per_row, grad, b)


# ----------------------------------------------------------------------------------------------
# Launchers (torch CPU tensors in and out)
# ----------------------------------------------------------------------------------------------

_NATIVE = (torch.float32, torch.float64)


def _as_numpy(t: torch.Tensor) -> np.ndarray:
    """A NumPy view (or, for fp16/bf16, a float32 copy) of a CPU tensor."""
    if t.dtype not in _NATIVE and t.dtype != torch.uint8:
        t = t.float()
    return t.detach().numpy()


def _flat_rows(a: np.ndarray) -> tuple[np.ndarray, int]:
    """A [B, n] array whose rows are contiguous, as a 1-D contiguous view from its first element to its
    last, and the row stride in elements (n when C-contiguous; anything, even 0, for strided rows)."""
    rows, n = a.shape
    if a.flags.c_contiguous:
        return a.reshape(-1), n
    if n > 1 and a.strides[1] != a.itemsize:
        a = np.ascontiguousarray(a)  # not reached through fastvae.ops, whose rows are contiguous
        return a.reshape(-1), n
    stride = a.strides[0] // a.itemsize
    length = (rows - 1) * stride + n if n else 0
    return np.lib.stride_tricks.as_strided(a, shape=(length,), strides=(a.itemsize,)), stride


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
    kernel = _reparameterize_rows if a2.numel() >= _PARALLEL_MIN_DRAWS else _reparameterize_rows_serial
    kernel(_as_numpy(a2), _as_numpy(lv2), out.numpy(), k0, k1, backward)
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
    # Absent operands are empty [B, 0] arrays of the present one's dtype (fewer specialisations).
    dummy = np.zeros((B, 0), dtype=np.float64 if ref.dtype == torch.float64 else np.float32)
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
    # float32 logits (fp16/bf16 arrive here as float32 copies) take the vectorized kernel; float64
    # logits the scalar one, whose libm exp/log1p are as exact as the float64 reference.
    parallel = B > 1 and B * (F + 8 * D) >= _PARALLEL_MIN_WORK
    dx_np = dx.numpy() if dx is not None else np.zeros((B, 0), dtype=x.dtype)
    dmu_np = dmu.numpy() if dmu is not None else np.zeros((B, 0), dtype=m.dtype)
    dlv_np = dlv.numpy() if dlv is not None else np.zeros((B, 0), dtype=lv.dtype)
    scalars = (float(beta), grad_scale, t_scale, {"none": 0, "bce": 1, "mse": 2}[recon], need_grad)
    if not F:
        row_recon.fill(0.0)
        flat = lambda a: np.ascontiguousarray(a).reshape(-1)  # noqa: E731
        kl_scale = float(beta) * grad_scale
        _kl_alone_flat(flat(m), flat(lv), flat(dmu_np), flat(dlv_np), row_kl, D, kl_scale, need_grad)
    elif x.dtype == np.float32:
        (xf, xs), (tf, ts), (mf, ms), (lf, ls) = (_flat_rows(a) for a in (x, t, m, lv))
        dims = np.array([F, D, xs, ts, ms, ls], dtype=np.int64)
        kernel = _fused_loss_rows_f32 if parallel else _fused_loss_rows_f32_serial
        kernel(xf, tf, mf, lf, dx_np, dmu_np, dlv_np, row_recon, row_kl, dims, *scalars)
    else:
        kernel = _fused_loss_rows if parallel else _fused_loss_rows_serial
        kernel(x, t, m, lv, dx_np, dmu_np, dlv_np, row_recon, row_kl, *scalars)

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
    if (g == 1.0).all():  # loss.backward(): nothing to do, and no parallel launch to pay for
        return
    per_row = grad.dim() == 1
    for buf in (dlogits, dmu, dlogvar):
        if buf.numel() == 0:
            continue
        kernel = _scale_rows if buf.shape[0] > 1 and buf.numel() >= _PARALLEL_MIN_WORK else _scale_rows_serial
        if buf.dtype in _NATIVE:
            kernel(g, per_row, buf.numpy())
        else:
            tmp = buf.float()
            kernel(g, per_row, tmp.numpy())
            buf.copy_(tmp)
