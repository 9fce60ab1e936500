"""The VAE loss in one pass over the data: reconstruction + beta * KL, with its gradients, in one launch.

Per sample b (features f, latent dims d), with x = logits, t = target, sg = sigmoid, s = log_scale[f]
(one s for every f, or one per feature) and w = exp(-2 s):

    BCE(x, t)  = sum_f  max(x, 0) - x t + log1p(exp(-|x|))      d/dx = sg(x) - t
    SSE(x, t)  = sum_f  (x - t)^2                                d/dx = 2 (x - t)
    NLL(x, t)  = sum_f  (x - t)^2 w / 2 + s + log(2 pi) / 2      d/dx = (x - t) w,  d/ds = 1 - (x - t)^2 w
    CB(x, t)   = sum_f  BCE_f(x, t) - log C(x),  log C(x) = log(x / tanh(x / 2)) (log 2 at x = 0)
               = sum_f  x (1/2 - t) + K(x),      K(x) = log(sinh(x/2) / (x/2))   (no cancellation at x ~ 0)
                                                                 d/dx = sg(x) - t - (1/x - 1/sinh(x))
                                                                      = 1/2 - t + K'(x)
    KL(mu, lv) = -1/2 sum_d (1 + lv - mu^2 - exp(lv))            d/dmu = mu,  d/dlv = (exp(lv) - 1) / 2
    loss_b     = recon_b + beta * KL_b

NLL is the Gaussian decoder's negative log-likelihood with sigma = exp(s); CB the continuous Bernoulli
(Loaiza-Ganem and Cunningham 2019) on logits, whose normalizer C(lambda) = 2 atanh(1 - 2 lambda) /
(1 - 2 lambda) at lambda = sg(x) is x / tanh(x / 2).

The loss is the last node of a VAE's graph, so its gradient is known during the forward: each program
streams its rows (or its chunk of a row) once and writes d logits, d mu, d logvar (already scaled by
beta and by 1/B for the "mean" reduction) next to its partial sums.  The backward (``scale_grads_``)
then only multiplies by the incoming gradient g and skips rows whose g is exactly 1
(``loss.backward()``): masked loads and stores move no bytes, so the common case costs a launch and
no traffic, with no host sync.

The reduction is finished inside the same launch.  Every program writes its partials to its own slots;
then it takes a ticket (an int32 ``atomic_add``); the program that draws the last ticket sums all the
partials in index order and resets the ticket to 0.  No floating-point atomics and a summation order
fixed by the launch configuration, a fixed rule of (B, F, D, whether the target is uint8): the same inputs
give bit-identical losses and gradients on every run.

Bytes (B rows, F features, D latent; s = element size, s_t = 1 for uint8 targets, P programs):
    forward   reads logits, target, mu, logvar; writes dlogits, dmu, dlogvar
              = B F (2 s + s_t) + 4 B D s, plus 8 P partial bytes written and read once
              Gaussian: + 4 L read from DRAM (L = 1 or F log-scales; per feature, every row of a tile
              re-reads its columns' scales from L1) and + 4 B F written when d log_scale is asked
              for (``p.scale_grad``); continuous Bernoulli: as BCE
    backward  0 when g == 1, else reads and writes each gradient once
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from fastvae.kernels.launch import SMS, Launcher
from fastvae.kernels.reparameterize import _log_normal  # one copy of the branch-free logf
from torch import Tensor

from fastvae.backend import RECON_GAUSSIAN, REDUCE_MEAN, REDUCE_NONE, LossProblem

__all__ = ["fused_loss", "scale_grads_", "loss_config", "scale_config"]

TILE = 1024  # elements a program holds per operand and iteration: 8 fp32 a thread at 4 warps (2 x LDG.128)
MIN_BLOCK = 16  # narrowest main-loop tile; narrower rows run as one masked tail tile
TARGET_PROGRAMS = 2 * 16 * SMS  # split rows into chunks up to 2 waves of 16 resident programs an SM
FINISH_BLOCK = tl.constexpr(256)  # partials summed per step by the finishing program


# ----------------------------------------------------------------------------------------------
# Per-element math
# ----------------------------------------------------------------------------------------------


@triton.jit
def _exp_fast(x):
    """exp(x) = 2^(x log2 e) for x <= 0: one FMUL and one MUFU.EX2 in float32 (as ``tl.exp``, without
    its denormal fix-up: results below 2^-126 flush to 0).  Relative error 2 ulp + |x| 2^-24 ln 2 from
    rounding x log2 e: for BCE's e = exp(-|x|) that is below 1e-6 of e wherever e is not negligible
    next to the loss.  libdevice in float64."""
    if x.dtype == tl.float64:
        return tl.exp(x)
    else:
        return tl.exp2(x * 1.4426950408889634)


@triton.jit
def _exp(x):
    """exp(x) to a few ulp for any x (KL's exp(logvar), which can reach e^30 and dominate the loss):
    n = rint(x / ln 2), r = x - n ln 2 by Cody-Waite (ln 2 = C1 + C2, n C1 exact), exp(x) =
    2^(r log2 e) 2^n with |r| <= ln 2 / 2, so rounding r log2 e costs under 2^-25.  Three FMAs, a
    FRND, an FMUL and two MUFU.EX2 (2^n is exact).  libdevice in float64."""
    if x.dtype == tl.float64:
        return tl.exp(x)
    else:
        n = tl.floor(x * 1.4426950408889634 + 0.5)
        r = tl.fma(n, -0.693359375, x)
        r = tl.fma(n, 2.12194440e-4, r)
        return tl.exp2(r * 1.4426950408889634) * tl.exp2(n)


@triton.jit
def _bce_with_logits(x, t):
    """Per-element BCE on logits and its gradient, stable for any x.

    e = exp(-|x|) lies in (0, 1], so nothing overflows; sigmoid(|x|) = 1 / (1 + e) and
    sigmoid(x) = e / (1 + e) for x < 0.
    float32: log1p(e) = 2 atanh(s) = s (2 + w P(w)), s = e / (2 + e) in (0, 1/3], w = s^2, P of degree
    2 (truncation 2e-7 relative).  Both quotients come from one reciprocal r = 1 / ((1 + e)(2 + e)),
    q = (1 + e)(2 + e) in (2, 6] so rsqrt(q)^2 needs no range fix-up (MUFU.RSQ, 2^-21.9 relative):
    1 / (1 + e) = (2 + e) r and s = (e + e^2) r.  Modelled in float32 with the MUFU errors:
    log1p(e) and sigmoid within 1.5e-6 relative (budget 1e-5; tests/test_triton_kernels.py).
    MUFU: EX2 and RSQ; no libdevice log, no division.
    float64 (gradcheck): log1p(e) = log(u) e / (u - 1) with u = 1 + e (Goldberg), exact divisions.
    """
    if x.dtype == tl.float64:
        e = tl.exp(-tl.abs(x))
        u = 1.0 + e
        log1p_e = tl.where(u == 1.0, e, tl.log(u) * (e / (u - 1.0)))
        sig_abs = 1.0 / u
    else:
        e = _exp_fast(-tl.abs(x))
        v = 2.0 + e
        rs = tl.math.rsqrt((1.0 + e) * v)
        r = rs * rs
        sig_abs = v * r
        s = (e * e + e) * r
        w = s * s
        p = 0.3398355543613434 * w + 0.39635971188545227
        p = p * w + 0.6667348146438599  # 2 atanh(s) / s = 2 + 2 w / 3 + 2 w^2 / 5 + ...
        log1p_e = s * (2.0 + w * p)
    loss = tl.maximum(x, 0.0) - x * t + log1p_e
    sigmoid = tl.where(x >= 0, sig_abs, e * sig_abs)
    return loss, sigmoid - t


@triton.jit
def _cb_even(x):
    """(K(x), K'(x)), K(x) = log(sinh(x/2) / (x/2)): the continuous Bernoulli's loss is x (1/2 - t) + K(x),
    its derivative 1/2 - t + K'(x).  These equal softplus(x) - x t - log C(x) and sigmoid(x) - t -
    (1/x - 1/sinh(x)) exactly (softplus(x) - x/2 = log(2 cosh(x/2)), log C(x) = log(x / tanh(x/2))), without
    their cancellation near x = 0, where softplus and log C both tend to log 2 and K ~ x^2/24.

        |x| <  cut:  K = z P(z), K' = x Q(z), z = x^2, P = sum_k c_k z^(k-1), Q = sum_k 2k c_k z^(k-1),
                     c_k = B_2k / (2k (2k)!) = 1/24, -1/2880, 1/181440, -1/9676800, ... (radius 2 pi)
        |x| >= cut:  a = |x|, e = exp(-a), r = 1 / (a (1 - e)):
                     K = a/2 - log a + log(1 - e) = a/2 + log((1 - e)^2 r)
                     K' = sign(x) (1/2 - 1/a + e / (1 - e)) = sign(x) (1/2 + (a e - (1 - e)) r)
    The closed forms' lane runs at |x| = cut when |x| < cut (the select discards it: no inf or NaN).
    Both cancel at the cut: K = 0.16 at a = 2 against a/2 = 1 (6x), K' = 0.16 against 1/2 (3x).
    float32: cut 2, 7 terms (truncation c_8 x^14 / K < 2e-8 at |x| = 2).  MUFU: one EX2 and one RSQ:
    r = rsqrt(v)^2, v = a (1 - e) >= 1.7, refined by one Newton step r (2 - v r) (squares RSQ's 2^-21.9
    in r away; four instructions against the division's eight with its range checks).  The log is
    ``_log_normal``: its argument (1 - e)^2 r lies in [0.86/a, 0.44], normal below |x| = 8e37 (beyond, a
    denormal argument is off by a few tens, against K ~ |x|/2).  Against mpmath with the interpreter's
    exact exp and rsqrt (tests/test_triton_kernels.py): K within 8.5e-7 relative, K' within 3.6e-7 (both
    worst just above the cut; 1.6e-7 below it).  float64: cut 1, 10 terms (truncation < 2e-17), exact
    division, libdevice exp and log (the closed forms lose ~12 eps at the cut; measured 6.9e-15).
    """
    a = tl.abs(x)
    if x.dtype == tl.float64:
        small = a < 1.0
        ac = tl.maximum(a, 1.0)
        az = tl.minimum(a, 1.0)  # the series only matter below the cut: no overflow past it
        z = az * az
        p = -174611.0 / 16057153253965824000000.0 * z + 43867.0 / 91963695909076992000.0
        p = p * z - 3617.0 / 170729965486080000.0
        p = p * z + 1.0 / 1046139494400.0
        p = p * z - 691.0 / 15692092416000.0
        q = -174611.0 / 802857662698291200000.0 * z + 43867.0 / 5109094217170944000.0
        q = q * z - 3617.0 / 10670622842880000.0
        q = q * z + 1.0 / 74724249600.0
        q = q * z - 691.0 / 1307674368000.0
        e = tl.exp(-ac)
        one_m_e = 1.0 - e
        r = 1.0 / (ac * one_m_e)
        log_ratio = tl.log(one_m_e * one_m_e * r)  # log((1 - e) / a)
    else:
        small = a < 2.0
        ac = tl.maximum(a, 2.0)
        az = tl.minimum(a, 2.0)
        z = az * az
        p = 1.0 / 1046139494400.0 * z - 691.0 / 15692092416000.0
        q = 1.0 / 74724249600.0 * z - 691.0 / 1307674368000.0
        e = _exp_fast(-ac)
        one_m_e = 1.0 - e
        v = ac * one_m_e
        rs = tl.math.rsqrt(v)
        r = rs * rs
        r = tl.fma(r, tl.fma(-v, r, 1.0), r)  # Newton: r (2 - v r), the error squared
        log_ratio = _log_normal(one_m_e * one_m_e * r)
    p = p * z + 1.0 / 479001600.0
    p = p * z - 1.0 / 9676800.0
    p = p * z + 1.0 / 181440.0
    p = p * z - 1.0 / 2880.0
    p = p * z + 1.0 / 24.0
    q = q * z + 1.0 / 47900160.0
    q = q * z - 1.0 / 1209600.0
    q = q * z + 1.0 / 30240.0
    q = q * z - 1.0 / 720.0
    q = q * z + 1.0 / 12.0
    k_closed = 0.5 * ac + log_ratio
    dk_closed = 0.5 + (ac * e - one_m_e) * r  # K' at a: odd, sign restored below
    dk_closed = tl.where(x < 0, -dk_closed, dk_closed)
    return tl.where(small, z * p, k_closed), tl.where(small, x * q, dk_closed)


@triton.jit
def _gauss_coefs(s, grad_scale):
    """(w / 2, w grad_scale, s + log(2 pi) / 2) of log-scale(s) s, w = exp(-2 s)."""
    w = _exp(-2.0 * s)
    return 0.5 * w, w * grad_scale, s + 0.9189385332046727


@triton.jit
def _recon_tile(
    x_ptr,
    t_ptr,
    dx_ptr,
    ls_ptr,
    dls_ptr,
    rows,
    row_mask,
    cols,
    F,
    stride_x,
    stride_t,
    grad_scale,
    s_one,
    RECON: tl.constexpr,
    TARGET_U8: tl.constexpr,
    NEED_GRAD: tl.constexpr,
    SCALE_PER_F: tl.constexpr,
    SCALE_GRAD: tl.constexpr,
    COMPUTE: tl.constexpr,
    MASK_COLS: tl.constexpr,
):
    """Loss of one [rows, cols] tile (masked elements give 0 only when MASK_COLS); stores d logits (and,
    Gaussian with SCALE_GRAD, d log_scale).  Gaussian: ``s_one`` is the program's one log-scale, or with
    SCALE_PER_F the tile's log-scales are loaded here, one per column."""
    if MASK_COLS:
        mask = row_mask[:, None] & (cols < F)[None, :]
    else:
        mask = row_mask[:, None]  # one predicate per row: loads and stores stay 128-bit
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(COMPUTE)
    t = tl.load(t_ptr + rows[:, None] * stride_t + cols[None, :], mask=mask, other=0).to(COMPUTE)
    if TARGET_U8:
        t = t * (1.0 / 255.0)  # pixels read as t / 255: the data set stays uint8 in memory
    if RECON == 1:
        loss, grad = _bce_with_logits(x, t)
    elif RECON == 2:
        diff = x - t
        loss = diff * diff
        grad = 2.0 * diff
    elif RECON == 3:
        if SCALE_PER_F:
            # s[f] loaded in the tile's own layout (row stride 0: each thread reads the scales of its
            # own columns, L1 hits after the first row) and exp(-2 s) taken per element: a thread
            # holds one row of a tile, so a [BLOCK_F] vector would save no exp and would cost a layout
            # conversion through shared memory (2 BAR.SYNC a tile; 24.7 against 23.1 SASS instructions
            # an element at sm_90, F = 784).
            s_ptrs = ls_ptr + (rows[:, None] * 0 + cols[None, :])
            s = tl.load(s_ptrs, mask=mask, other=0.0).to(COMPUTE)
            half_w, w_g, c = _gauss_coefs(s, grad_scale)
        else:
            half_w, w_g, c = _gauss_coefs(s_one, grad_scale)  # loop-invariant: hoisted by the compiler
        diff = x - t
        sq = diff * diff
        loss = sq * half_w + c
        grad = diff * w_g  # already times grad_scale: (x - t) w g
        if NEED_GRAD and SCALE_GRAD:
            # d/ds = 1 - (x - t)^2 w, times grad_scale: g - (x - t)^2 (w g)
            tl.store(
                dls_ptr + rows[:, None] * F + cols[None, :],
                (grad_scale - sq * w_g).to(dls_ptr.dtype.element_ty),
                mask=mask,
            )
    else:
        k, dk = _cb_even(x)  # continuous Bernoulli: x (1/2 - t) + K(x), d/dx = 1/2 - t + K'(x)
        half_m_t = 0.5 - t
        loss = x * half_m_t + k
        grad = half_m_t + dk
    if NEED_GRAD:
        if RECON == 3:
            dx = grad
        else:
            dx = grad * grad_scale
        tl.store(dx_ptr + rows[:, None] * F + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
    if MASK_COLS:
        loss = tl.where(mask, loss, 0.0)
    return loss


@triton.jit
def _kl_tile(
    mu_ptr,
    lv_ptr,
    dmu_ptr,
    dlv_ptr,
    rows,
    row_mask,
    cols,
    D,
    stride_mu,
    stride_lv,
    kl_grad_scale,
    NEED_GRAD: tl.constexpr,
    COMPUTE: tl.constexpr,
    MASK_COLS: tl.constexpr,
):
    """KL of one [rows, cols] tile (masked elements give 0 only when MASK_COLS); stores d mu, d logvar."""
    if MASK_COLS:
        mask = row_mask[:, None] & (cols < D)[None, :]
    else:
        mask = row_mask[:, None]
    mu = tl.load(mu_ptr + rows[:, None] * stride_mu + cols[None, :], mask=mask, other=0.0).to(COMPUTE)
    lv = tl.load(lv_ptr + rows[:, None] * stride_lv + cols[None, :], mask=mask, other=0.0).to(COMPUTE)
    var = _exp(lv)
    kl = -0.5 * (1.0 + lv - mu * mu - var)
    if NEED_GRAD:
        offs = rows[:, None] * D + cols[None, :]
        tl.store(dmu_ptr + offs, (mu * kl_grad_scale).to(dmu_ptr.dtype.element_ty), mask=mask)
        tl.store(dlv_ptr + offs, (0.5 * (var - 1.0) * kl_grad_scale).to(dlv_ptr.dtype.element_ty), mask=mask)
    if MASK_COLS:
        kl = tl.where(mask, kl, 0.0)
    return kl


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def fused_loss_kernel(
    x_ptr,
    t_ptr,
    mu_ptr,
    lv_ptr,
    dx_ptr,
    dmu_ptr,
    dlv_ptr,
    out_ptr,
    part_ptr,
    ticket_ptr,
    B,
    F,
    D,
    stride_x,
    stride_t,
    stride_mu,
    stride_lv,
    n_split,
    f_chunk,
    d_chunk,
    beta: tl.float64,  # float64 arguments: exact for float64 inputs (gradcheck), rounded once for float32
    grad_scale: tl.float64,
    ls_ptr,  # Gaussian only (after the others, so the other modes' parameters keep their offsets)
    dls_ptr,
    RECON: tl.constexpr,
    HAS_KL: tl.constexpr,
    TARGET_U8: tl.constexpr,
    NEED_GRAD: tl.constexpr,
    SCALE_PER_F: tl.constexpr,
    SCALE_GRAD: tl.constexpr,
    REDUCTION: tl.constexpr,
    FINISH: tl.constexpr,
    COMPUTE: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_F: tl.constexpr,
    TAIL_F: tl.constexpr,
    BLOCK_D: tl.constexpr,
    TAIL_D: tl.constexpr,
):
    """Program p takes rows [rb * BLOCK_B, (rb + 1) * BLOCK_B) and chunk c of their columns, with
    rb = p // n_split and c = p % n_split (features [c f_chunk, (c + 1) f_chunk), latent dims
    [c d_chunk, (c + 1) d_chunk); chunks are multiples of BLOCK_F / BLOCK_D, so only the last chunk of a
    row has a partial tile, handled by one TAIL_F / TAIL_D-wide masked tile; TAIL_* = 0: none).

    out_ptr: [loss, recon, kl] (sum / mean) or [3, B] rows (none).  FINISH = 0: this program owns the
    whole result and writes out_ptr itself.  FINISH = 1: it writes its partials to part_ptr
    (sum / mean: recon at [p], KL at [P + p]; none: per row at [c B + row] and [(n_split + c) B + row])
    and the program drawing the last ticket sums them in index order.

    Gaussian (RECON = 3): ls_ptr holds F log-scales (SCALE_PER_F) or one, loaded here once; dls_ptr is
    the [B, F] d log_scale, written when SCALE_GRAD (and NEED_GRAD).
    """
    kl_grad_scale = tl.full([], beta * grad_scale, COMPUTE)
    beta = tl.full([], beta, COMPUTE)
    grad_scale = tl.full([], grad_scale, COMPUTE)
    if RECON == 3 and not SCALE_PER_F:
        s_one = tl.load(ls_ptr).to(COMPUTE)  # the one log-scale: a scalar, once a program
    else:
        s_one = 0.0  # unused: per-feature log-scales come with each tile, other recons have none
    pid = tl.program_id(0)
    rb = pid // n_split
    chunk = pid % n_split
    # Rows are int64 so that row * stride never wraps past 2**31 elements.
    rows = rb.to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < B

    recon = tl.zeros([BLOCK_B], COMPUTE)
    if RECON != 0:
        f_lo = tl.minimum(chunk * f_chunk, F)
        f_hi = tl.where(chunk == n_split - 1, F, tl.minimum(f_lo + f_chunk, F))  # the last chunk ends the row
        f_full = f_lo + ((f_hi - f_lo) // BLOCK_F) * BLOCK_F
        acc = tl.zeros([BLOCK_B, BLOCK_F], COMPUTE)
        for f0 in range(f_lo, f_full, BLOCK_F):
            acc += _recon_tile(
                x_ptr, t_ptr, dx_ptr, ls_ptr, dls_ptr, rows, row_mask, f0 + tl.arange(0, BLOCK_F), F,
                stride_x, stride_t, grad_scale, s_one, RECON, TARGET_U8, NEED_GRAD, SCALE_PER_F,
                SCALE_GRAD, COMPUTE, False,
            )  # fmt: skip
        recon = tl.sum(acc, axis=1)
        if TAIL_F > 0:
            if f_full < f_hi:
                tail = _recon_tile(
                    x_ptr, t_ptr, dx_ptr, ls_ptr, dls_ptr, rows, row_mask, f_full + tl.arange(0, TAIL_F), F,
                    stride_x, stride_t, grad_scale, s_one, RECON, TARGET_U8, NEED_GRAD, SCALE_PER_F,
                    SCALE_GRAD, COMPUTE, True,
                )  # fmt: skip
                recon += tl.sum(tail, axis=1)

    kl = tl.zeros([BLOCK_B], COMPUTE)
    if HAS_KL:
        d_lo = tl.minimum(chunk * d_chunk, D)
        d_hi = tl.where(chunk == n_split - 1, D, tl.minimum(d_lo + d_chunk, D))
        d_full = d_lo + ((d_hi - d_lo) // BLOCK_D) * BLOCK_D
        acc_kl = tl.zeros([BLOCK_B, BLOCK_D], COMPUTE)
        for d0 in range(d_lo, d_full, BLOCK_D):
            acc_kl += _kl_tile(
                mu_ptr, lv_ptr, dmu_ptr, dlv_ptr, rows, row_mask, d0 + tl.arange(0, BLOCK_D), D, stride_mu,
                stride_lv, kl_grad_scale, NEED_GRAD, COMPUTE, False,
            )  # fmt: skip
        kl = tl.sum(acc_kl, axis=1)
        if TAIL_D > 0:
            if d_full < d_hi:
                tail_kl = _kl_tile(
                    mu_ptr, lv_ptr, dmu_ptr, dlv_ptr, rows, row_mask, d_full + tl.arange(0, TAIL_D), D,
                    stride_mu, stride_lv, kl_grad_scale, NEED_GRAD, COMPUTE, True,
                )  # fmt: skip
                kl += tl.sum(tail_kl, axis=1)

    # Rows past B loaded zeros (unmasked columns): their sums are dropped here, once per row.
    recon = tl.where(row_mask, recon, 0.0)
    kl = tl.where(row_mask, kl, 0.0)
    out_ty = out_ptr.dtype.element_ty
    if FINISH == 0:
        if REDUCTION == 2:
            tl.store(out_ptr + rows, (recon + beta * kl).to(out_ty), mask=row_mask)
            tl.store(out_ptr + B + rows, recon.to(out_ty), mask=row_mask)
            tl.store(out_ptr + 2 * B + rows, kl.to(out_ty), mask=row_mask)
        else:
            recon_sum = tl.sum(recon, axis=0) * grad_scale
            kl_sum = tl.sum(kl, axis=0) * grad_scale
            tl.store(out_ptr, (recon_sum + beta * kl_sum).to(out_ty))
            tl.store(out_ptr + 1, recon_sum.to(out_ty))
            tl.store(out_ptr + 2, kl_sum.to(out_ty))
    else:
        n_prog = tl.num_programs(0)
        if REDUCTION == 2:
            tl.store(part_ptr + chunk.to(tl.int64) * B + rows, recon, mask=row_mask)
            tl.store(part_ptr + (n_split + chunk).to(tl.int64) * B + rows, kl, mask=row_mask)
        else:
            tl.store(part_ptr + pid, tl.sum(recon, axis=0))
            tl.store(part_ptr + n_prog + pid, tl.sum(kl, axis=0))
        # Memory ordering of the last-program finish (PTX memory model):
        # 1. the barrier orders every thread's partial stores before thread 0's ticket (CTA scope);
        # 2. the ticket is an acq_rel atomic at GPU scope: its release half makes those stores (cumulative
        #    through the barrier) visible to whichever program later acquires the counter, and its
        #    acquire half, in the program that draws n_prog - 1, orders its loads after every release;
        # 3. that program reads the partials with .cg loads (L2, never a stale L1 line of this SM) after
        #    the barrier that broadcasts the ticket to all its threads.
        # The counter returns to 0 before the kernel ends, so the next launch on this stream (the ticket
        # buffer is per device and stream; see _ticket) starts from 0.  Launches on two streams never
        # share a ticket; under CUDA-graph capture each launch gets its own zeroed ticket in the graph.
        tl.debug_barrier()
        ticket = tl.atomic_add(ticket_ptr, 1, sem="acq_rel", scope="gpu")
        if ticket == n_prog - 1:
            tl.debug_barrier()
            idx = tl.arange(0, FINISH_BLOCK)
            if REDUCTION == 2:
                for r0 in range(0, B, FINISH_BLOCK):
                    r = r0 + idx.to(tl.int64)
                    m = r < B
                    acc_r = tl.zeros([FINISH_BLOCK], COMPUTE)
                    acc_k = tl.zeros([FINISH_BLOCK], COMPUTE)
                    for c in range(0, n_split):
                        acc_r += tl.load(part_ptr + c * B + r, mask=m, other=0.0, cache_modifier=".cg")
                        acc_k += tl.load(
                            part_ptr + (n_split + c) * B + r, mask=m, other=0.0, cache_modifier=".cg"
                        )
                    tl.store(out_ptr + r, (acc_r + beta * acc_k).to(out_ty), mask=m)
                    tl.store(out_ptr + B + r, acc_r.to(out_ty), mask=m)
                    tl.store(out_ptr + 2 * B + r, acc_k.to(out_ty), mask=m)
            else:
                acc_r = tl.zeros([FINISH_BLOCK], COMPUTE)
                acc_k = tl.zeros([FINISH_BLOCK], COMPUTE)
                for i0 in range(0, n_prog, FINISH_BLOCK):
                    i = i0 + idx
                    m = i < n_prog
                    acc_r += tl.load(part_ptr + i, mask=m, other=0.0, cache_modifier=".cg")
                    acc_k += tl.load(part_ptr + n_prog + i, mask=m, other=0.0, cache_modifier=".cg")
                recon_sum = tl.sum(acc_r, axis=0) * grad_scale
                kl_sum = tl.sum(acc_k, axis=0) * grad_scale
                tl.store(out_ptr, (recon_sum + beta * kl_sum).to(out_ty))
                tl.store(out_ptr + 1, recon_sum.to(out_ty))
                tl.store(out_ptr + 2, kl_sum.to(out_ty))
            tl.store(ticket_ptr, 0)


@triton.jit
def _scale_tile(ptr, rows, row_mask, cols, n_cols, g, COMPUTE: tl.constexpr, MASK_COLS: tl.constexpr):
    """In place: ptr[rows, cols] *= g[rows] (a contiguous [*, n_cols] gradient)."""
    if MASK_COLS:
        mask = row_mask[:, None] & (cols < n_cols)[None, :]
    else:
        mask = row_mask[:, None]
    ptrs = ptr + rows[:, None] * n_cols + cols[None, :]
    v = tl.load(ptrs, mask=mask, other=0.0).to(COMPUTE)
    tl.store(ptrs, (v * g[:, None]).to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def scale_grads_kernel(
    g_ptr,
    dx_ptr,
    dmu_ptr,
    dlv_ptr,
    B,
    F,
    D,
    stride_g,
    n_split,
    f_chunk,
    d_chunk,
    HAS_X: tl.constexpr,
    HAS_KL: tl.constexpr,
    COMPUTE: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_F: tl.constexpr,
    TAIL_F: tl.constexpr,
    BLOCK_D: tl.constexpr,
    TAIL_D: tl.constexpr,
):
    """In place: grad[b, :] *= g[b * stride_g] (stride_g = 0: the scalar g), for the rows where g != 1 only.

    d loss / d input = g * (d loss_b / d input), and the forward stored the second factor.  The tiles,
    chunks and program numbering are those of ``fused_loss_kernel``.  Bytes: 2 s per gradient element of
    the rows with g != 1; rows with g == 1 (``loss.backward()``) are masked out and move nothing.
    """
    pid = tl.program_id(0)
    rb = pid // n_split
    chunk = pid % n_split
    rows = rb.to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    g = tl.load(g_ptr + rows * stride_g, mask=rows < B, other=1.0).to(COMPUTE)
    row_mask = (rows < B) & (g != 1.0)
    if HAS_X:
        f_lo = tl.minimum(chunk * f_chunk, F)
        f_hi = tl.where(chunk == n_split - 1, F, tl.minimum(f_lo + f_chunk, F))  # the last chunk ends the row
        f_full = f_lo + ((f_hi - f_lo) // BLOCK_F) * BLOCK_F
        for f0 in range(f_lo, f_full, BLOCK_F):
            _scale_tile(dx_ptr, rows, row_mask, f0 + tl.arange(0, BLOCK_F), F, g, COMPUTE, False)
        if TAIL_F > 0:
            if f_full < f_hi:
                _scale_tile(dx_ptr, rows, row_mask, f_full + tl.arange(0, TAIL_F), F, g, COMPUTE, True)
    if HAS_KL:
        d_lo = tl.minimum(chunk * d_chunk, D)
        d_hi = tl.where(chunk == n_split - 1, D, tl.minimum(d_lo + d_chunk, D))
        d_full = d_lo + ((d_hi - d_lo) // BLOCK_D) * BLOCK_D
        for d0 in range(d_lo, d_full, BLOCK_D):
            _scale_tile(dmu_ptr, rows, row_mask, d0 + tl.arange(0, BLOCK_D), D, g, COMPUTE, False)
            _scale_tile(dlv_ptr, rows, row_mask, d0 + tl.arange(0, BLOCK_D), D, g, COMPUTE, False)
        if TAIL_D > 0:
            if d_full < d_hi:
                _scale_tile(dmu_ptr, rows, row_mask, d_full + tl.arange(0, TAIL_D), D, g, COMPUTE, True)
                _scale_tile(dlv_ptr, rows, row_mask, d_full + tl.arange(0, TAIL_D), D, g, COMPUTE, True)


# ----------------------------------------------------------------------------------------------
# Launch configuration: a fixed rule of (B, F, D, element size), never timing, so the summation order
# of a shape never changes under a user.  Computed once per shape with plain integer arithmetic.
# ----------------------------------------------------------------------------------------------


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2_ceil(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 1 else 1


def _tile(n: int, tile: int = TILE) -> tuple[int, int]:
    """(BLOCK, TAIL) for rows of n elements: n // BLOCK unmasked tiles, then one TAIL-wide masked tile
    (TAIL = next power of two of n % BLOCK; 0 when BLOCK divides n).  BLOCK is the widest power of two
    <= tile whose lanes (n // BLOCK * BLOCK + TAIL) exceed n by at most n / 32: 784 = 3 * 256 + 16,
    1025 = 1024 + 1, 3072 = 3 * 1024; rows narrower than MIN_BLOCK are one masked tile."""
    if n < MIN_BLOCK:
        block = _pow2_ceil(max(n, 1))
        return block, (block if n % block else 0)
    block = min(tile, 1 << (n.bit_length() - 1))
    while True:
        rem = n % block
        tail = _pow2_ceil(rem) if rem else 0
        if block == MIN_BLOCK or n // block * block + tail <= n + n // 32:
            return block, tail
        block //= 2


def loss_config(
    B: int,
    F: int,
    D: int,
    element_size: int,
    target_u8: bool = False,
    per_thread: int = 0,
    tile: int = 0,
    target: int = TARGET_PROGRAMS,
) -> tuple[int, ...]:
    """(BLOCK_B, BLOCK_F, TAIL_F, BLOCK_D, TAIL_D, n_split, f_chunk, d_chunk, n_programs, num_warps).

    Tiles of about TILE elements (TILE / 2 for float64, whose 1024-wide tiles needed 168 registers and a
    stack): BLOCK_B rows a program for short rows.  8 elements a thread (two 128-bit fp32 accesses);
    4 with a uint8 target (its loads then take the layout of the fp32 gradient store: Triton gives loads
    up to tile / threads elements a thread but stores at most 128 bits, and with 8 a thread the gradient
    went through shared memory, 2 BAR.SYNC an iteration) and for float64.

    ``per_thread``, ``tile`` and ``target`` override the elements a thread, the tile width and the program
    target (``scale_config``).  When there are fewer row blocks than ``target`` programs and rows span at
    least 2 tiles, each row is cut into n_split chunks of whole tiles, the last one ending the row:
    [8, 3 * 256 * 256] runs 8 * 192
    programs, [512, 12288] 512 * 12, [5350, 784] 1338 * 3 (chunks of 256, 256 and 272).  Every shape of
    at least 2^22 elements then runs at least 2 waves at the kernels' occupancy (tests/test_aot_sm90.py).
    """
    tile = tile or (TILE // 2 if element_size == 8 else TILE)
    per_thread = per_thread or (4 if target_u8 or element_size == 8 else 8)
    block_f, tail_f = _tile(F, tile)
    block_d, tail_d = _tile(D, tile)
    width = max(block_f if F else 1, block_d if D else 1)
    block_b = min(_pow2_ceil(max(B, 1)), max(1, tile // width))
    n_rb = _cdiv(max(B, 1), block_b)
    row, blk = (F, block_f) if F else (D, block_d)
    # Tiles of a row, a partial tail counted when at least a quarter tile (784 = 3 * 256 + 16: 3).
    n_tiles = row // blk + (4 * (row % blk) >= blk)
    n_split, chunk = 1, row
    if n_rb < target and n_tiles >= 2:
        n_split = min(_cdiv(target, n_rb), n_tiles)
        chunk = max(1, row // n_split // blk) * blk  # whole tiles, rounded down
        # A remainder under a quarter tile joins the last chunk (which always ends the row), else it is
        # a chunk of its own.
        n_split = row // chunk + (4 * (row % chunk) >= blk)
    if F:
        f_chunk = chunk
        d_chunk = _cdiv(_cdiv(D, n_split), block_d) * block_d if D else 0
    else:
        f_chunk, d_chunk = 0, chunk
    num_warps = max(1, block_b * width // (32 * per_thread))
    return block_b, block_f, tail_f, block_d, tail_d, n_split, f_chunk, d_chunk, n_rb * n_split, num_warps


def scale_config(B: int, F: int, D: int, element_size: int) -> tuple[int, ...]:
    """``loss_config``'s rule for scale_grads_ (elementwise: its tiles never change a bit) with one
    128-bit access a thread.  The scaling kernel holds about 32 registers, so an SM holds all 64 warps.
    float32 and float64 keep the forward's tiles (8-warp programs: 8 an SM; [5350, 784], 2^22 elements,
    runs 3.8 waves; with two accesses a thread, 4-warp programs, it ran 1.9).  16-bit gradients take
    8 elements a thread, and 4-warp programs of 1024 would hold 16 an SM and run 1.9 waves: they take
    1-warp tiles of 256, split to 2 waves of the 32 programs an SM holds (the block limit; 50%
    occupancy): [5350, 784] runs 16050 programs, 3.8 waves."""
    if element_size == 2:
        return loss_config(B, F, D, 2, per_thread=8, tile=256, target=2 * 32 * SMS)
    return loss_config(B, F, D, element_size, per_thread=16 // element_size)


_COMPUTE = {torch.float64: tl.float64}  # every other dtype computes in float32
_LOSS_LAUNCH: dict[tuple, tuple] = {}
_SCALE_LAUNCH: dict[tuple, tuple] = {}
_TICKETS: dict[tuple, Tensor] = {}
# The current CUDA stream's handle: the private binding is what Triton's launcher reads (fast); CPU-only
# builds of torch lack it, and there no CUDA tensor reaches this module.
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None) or (
    lambda index: torch.cuda.current_stream(index).cuda_stream
)


def _ticket(device: torch.device) -> Tensor:
    """The int32 ticket counter of this device and current stream (0 between launches).

    Per stream, because two launches running at once on two streams must not share a counter.  While
    a CUDA graph is being captured, a fresh zeroed counter: its zero-fill is recorded in the graph, so
    each replay starts from 0, and the graph never shares a counter with eager launches or another graph.
    """
    if device.type == "cuda":
        if torch.cuda.is_current_stream_capturing():
            return torch.zeros(1, dtype=torch.int32, device=device)
        key = (device.index, _raw_stream(device.index))
    else:
        key = (device.type, device.index)
    ticket = _TICKETS.get(key)
    if ticket is None:
        ticket = _TICKETS[key] = torch.zeros(1, dtype=torch.int32, device=device)
    return ticket


def _loss_launch(p: LossProblem, t_dtype: torch.dtype | None, esize: int, scale_per_f: bool) -> tuple:
    """(launcher, n_out, n_part, n_split, f_chunk, d_chunk, finish) for one problem; ``scale_per_f``:
    a Gaussian with one log-scale per feature."""
    target_u8 = t_dtype == torch.uint8
    bb, bf, tf, bd, td, n_split, f_chunk, d_chunk, n_prog, warps = loss_config(
        p.B, p.F, p.D, esize, target_u8
    )
    per_row = p.reduction == REDUCE_NONE
    finish = n_split > 1 if per_row else n_prog > 1
    n_out = 3 * p.B if per_row else 3
    n_part = (2 * n_split * p.B if per_row else 2 * n_prog) if finish else 0
    kw = dict(
        RECON=p.recon,
        HAS_KL=p.D > 0,
        TARGET_U8=target_u8,
        NEED_GRAD=p.need_grad,
        SCALE_PER_F=scale_per_f,
        SCALE_GRAD=p.recon == RECON_GAUSSIAN and p.need_grad and p.scale_grad,
        REDUCTION=p.reduction,
        FINISH=int(finish),
        COMPUTE=_COMPUTE.get(p.acc, tl.float32),
        BLOCK_B=bb,
        BLOCK_F=bf,
        TAIL_F=tf,
        BLOCK_D=bd,
        TAIL_D=td,
        num_warps=warps,
    )
    return Launcher(fused_loss_kernel, (n_prog,), kw), n_out, n_part, n_split, f_chunk, d_chunk, finish


def fused_loss(
    p: LossProblem,
    logits: Tensor | None,
    target: Tensor | None,
    mu: Tensor | None,
    logvar: Tensor | None,
    log_scale: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(loss, recon, kl, dlogits, dmu, dlogvar, dlog_scale)`` of ``loss_b = recon_b + beta * KL_b``
    (see the module docstring), reduced per ``p.reduction``; the contract of
    ``fastvae.backend.Backend.fused_loss``.

    loss / recon / kl are views of one ``p.acc`` buffer (0-d, or ``[B]`` for none); gradients are new
    contiguous tensors, or distinct empty tensors where the term is absent or ``not p.need_grad``.
    ``log_scale`` (Gaussian only): contiguous, ``p.acc``, 1 or F elements; ``dlog_scale`` is the
    ``[B, F]`` ``p.acc`` tensor of ``grad_scale (1 - (x - t)^2 exp(-2 s))`` when ``p.need_grad and
    p.scale_grad``, else empty.
    """
    ref = logits if p.F else mu
    device = ref.device
    B, F, D = p.B, p.F, p.D
    gauss = p.recon == RECON_GAUSSIAN
    if gauss and (
        log_scale is None
        or log_scale.numel() not in (1, F)
        or log_scale.dtype != p.acc
        or not log_scale.is_contiguous()
    ):
        got = None if log_scale is None else (tuple(log_scale.shape), log_scale.dtype)
        raise ValueError(
            f"log_scale: expected a contiguous {p.acc} tensor of 1 or F = {F} elements, got {got}"
        )
    if not gauss and log_scale is not None:
        raise ValueError(f"log_scale: expected None for recon {p.recon} (only Gaussian has a scale)")
    scale_per_f = gauss and log_scale.numel() > 1
    key = (
        B, F, D, p.recon, p.reduction, p.need_grad, p.acc,
        logits.dtype if F else None, target.dtype if F else None, mu.dtype if D else None,
        scale_per_f, gauss and p.scale_grad,
    )  # fmt: skip
    launch = _LOSS_LAUNCH.get(key)
    if launch is None:
        launch = _LOSS_LAUNCH[key] = _loss_launch(p, key[8], ref.element_size(), scale_per_f)
    kernel, n_out, n_part, n_split, f_chunk, d_chunk, finish = launch

    buf = torch.empty(n_out + n_part, device=device, dtype=p.acc)
    grad_x = p.need_grad and F > 0
    grad_kl = p.need_grad and D > 0
    dlogits = torch.empty((B, F), device=device, dtype=logits.dtype) if grad_x else ref.new_empty(0)
    dmu = torch.empty((B, D), device=device, dtype=mu.dtype) if grad_kl else ref.new_empty(0)
    dlogvar = torch.empty((B, D), device=device, dtype=logvar.dtype) if grad_kl else ref.new_empty(0)
    grad_s = gauss and p.need_grad and p.scale_grad
    dlog_scale = torch.empty((B, F), device=device, dtype=p.acc) if grad_s else ref.new_empty(0, dtype=p.acc)
    if B == 0:
        buf.fill_(float("nan") if p.reduction == REDUCE_MEAN else 0.0)  # the mean of nothing is 0 / 0
    else:
        kernel(
            logits if F else buf,
            target if F else buf,
            mu if D else buf,
            logvar if D else buf,
            dlogits if grad_x else buf,
            dmu if grad_kl else buf,
            dlogvar if grad_kl else buf,
            buf,
            buf[n_out:] if finish else buf,
            _ticket(device) if finish else buf,
            B,
            F,
            D,
            logits.stride(0) if F else 0,
            target.stride(0) if F else 0,
            mu.stride(0) if D else 0,
            logvar.stride(0) if D else 0,
            n_split,
            f_chunk,
            d_chunk,
            p.beta,
            p.grad_scale,
            log_scale if gauss else buf,
            dlog_scale if grad_s else buf,
        )
    if p.reduction == REDUCE_NONE:
        loss, recon, kl = buf[:n_out].view(3, B).unbind(0)
    else:
        loss, recon, kl = buf[:3].unbind(0)
    return loss, recon, kl, dlogits, dmu, dlogvar, dlog_scale


def scale_grads_(grad: Tensor, dlogits: Tensor, dmu: Tensor, dlogvar: Tensor) -> None:
    """In place: every gradient row ``b *= grad`` (0-d) or ``grad[b]`` (``[B]``, reduction none), in one
    launch that moves no bytes for rows whose factor is exactly 1; empty gradients are skipped."""
    F = dlogits.shape[1] if dlogits.numel() else 0
    D = dmu.shape[1] if dmu.numel() else 0
    ref = dlogits if F else dmu
    if F == 0 and D == 0:
        return
    B = ref.shape[0]
    key = (B, F, D, ref.dtype)
    launch = _SCALE_LAUNCH.get(key)
    if launch is None:
        bb, bf, tf, bd, td, n_split, f_chunk, d_chunk, n_prog, warps = scale_config(
            B, F, D, ref.element_size()
        )
        kw = dict(
            HAS_X=F > 0,
            HAS_KL=D > 0,
            COMPUTE=_COMPUTE.get(ref.dtype, tl.float32),
            BLOCK_B=bb,
            BLOCK_F=bf,
            TAIL_F=tf,
            BLOCK_D=bd,
            TAIL_D=td,
            num_warps=warps,
        )
        launch = _SCALE_LAUNCH[key] = (Launcher(scale_grads_kernel, (n_prog,), kw), n_split, f_chunk, d_chunk)
    kernel, n_split, f_chunk, d_chunk = launch
    kernel(
        grad,
        dlogits if F else ref,
        dmu if D else ref,
        dlogvar if D else ref,
        B,
        F,
        D,
        grad.stride(0) if grad.dim() else 0,
        n_split,
        f_chunk,
        d_chunk,
    )
