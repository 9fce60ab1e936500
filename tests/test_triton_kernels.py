"""The Triton launchers against the float64 reference, called directly through the backend contract.

``fastvae.kernels.fused_loss`` (``fused_loss``, ``scale_grads_``) and ``fastvae.kernels.reparameterize``
(``reparameterize``, ``reparameterize_backward``), under the interpreter on CPU machines.  Shapes are
chosen so that every code path runs (tails, several rows a program, rows split into chunks, the
last-program finish) while the file stays fast under the interpreter.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import triton
import triton.language as tl
from conftest import device_only_key, rel_err, to_np
from fastvae.kernels import fused_loss as fl
from fastvae.kernels import reparameterize as rp

from bench.gpu_proof import half_precision_excess
from fastvae import reference
from fastvae.backend import (
    RECON_BCE,
    RECON_CB,
    RECON_GAUSSIAN,
    RECON_MSE,
    RECON_NONE,
    RECONS,
    REDUCTIONS,
    LossProblem,
)

TOL = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 2e-2, torch.float64: 1e-12}
NAMES = {v: k for k, v in RECONS.items()}
RED_NAMES = {v: k for k, v in REDUCTIONS.items()}


def _problem(
    B, F, D, recon, reduction, beta=0.7, need_grad=True, dtype=torch.float32, scale_grad=False
) -> LossProblem:
    grad_scale = 1.0 / B if reduction == REDUCTIONS["mean"] and B else 1.0
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return LossProblem(B, F, D, recon, reduction, beta, grad_scale, need_grad, acc, scale_grad)


def _inputs(B, F, D, dtype=torch.float32, target_dtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(B, F, generator=g) * 3).to(dtype) if F else None
    if F and target_dtype == torch.uint8:
        t = torch.randint(0, 256, (B, F), generator=g, dtype=torch.uint8)
    elif F:
        t = torch.rand(B, F, generator=g).to(dtype)
    else:
        t = None
    mu = torch.randn(B, D, generator=g).to(dtype) if D else None
    lv = (torch.randn(B, D, generator=g) * 0.5).to(dtype) if D else None
    return x, t, mu, lv


def _expected(p: LossProblem, x, t, mu, lv, log_scale=None):
    """(loss, recon, kl, dlogits, dmu, dlogvar, dlog_scale) from fastvae.reference, float64.

    dlog_scale is the kernel's per-element ``grad_scale (1 - (x - t)^2 exp(-2 s))``, whose sum over the
    rows (and the features, for one scale) is checked against ``reference.gaussian_nll_backward``.
    """
    red = RED_NAMES[p.reduction]
    recon = kl = 0.0
    dx = dmu = dlv = ds = None
    if p.recon == RECON_GAUSSIAN:
        s = to_np(log_scale)
        recon = reference.gaussian_nll(to_np(x), to_np(t), s, red)
        dx, _, ds_sum = reference.gaussian_nll_backward(to_np(x), to_np(t), s, red)
        tf = to_np(t) / 255.0 if t.dtype == torch.uint8 else to_np(t)
        ds = p.grad_scale * (1.0 - (to_np(x) - tf) ** 2 * np.exp(-2.0 * s))
        assert rel_err(ds.sum(axis=0) if s.size > 1 else ds.sum().reshape(1), ds_sum) < 1e-12
    elif p.recon == RECON_CB:
        recon = reference.continuous_bernoulli(to_np(x), to_np(t), red)
        dx = reference.continuous_bernoulli_backward(to_np(x), to_np(t), red)[0]
    elif p.F:
        name = NAMES[p.recon]
        fwd, bwd = (
            (reference.bce_with_logits, reference.bce_with_logits_backward)
            if name == "bce"
            else (reference.mse, reference.mse_backward)
        )
        recon = fwd(to_np(x), to_np(t), red)
        dx = bwd(to_np(x), to_np(t), red)
    if p.D:
        kl = reference.kl_divergence(to_np(mu), to_np(lv), red)
        dmu, dlv = (p.beta * g for g in reference.kl_divergence_backward(to_np(mu), to_np(lv), red))
    if p.reduction == REDUCTIONS["none"]:
        recon = recon if p.F else np.zeros(p.B)
        kl = kl if p.D else np.zeros(p.B)
    return np.asarray(recon + p.beta * kl), np.asarray(recon), np.asarray(kl), dx, dmu, dlv, ds


def _check(p, x, t, mu, lv, tol, log_scale=None):
    out = fl.fused_loss(p, x, t, mu, lv, log_scale)
    exp = _expected(p, x, t, mu, lv, log_scale)
    assert len(out) == 7
    shape = (p.B,) if p.reduction == REDUCTIONS["none"] else ()
    for name, a, e in zip(("loss", "recon", "kl"), out[:3], exp[:3], strict=True):
        assert a.shape == shape and a.dtype == p.acc, name
        assert rel_err(a, e) < tol, (name, rel_err(a, e))
    d_scale_src = torch.empty(p.B, p.F, dtype=p.acc)  # dlog_scale: [B, F] in the accumulator dtype
    grads = zip(
        ("dlogits", "dmu", "dlogvar", "dlog_scale"), out[3:], exp[3:], (x, mu, lv, d_scale_src), strict=True
    )
    for name, a, e, src in grads:
        if e is None or not p.need_grad or (name == "dlog_scale" and not p.scale_grad):
            assert a.numel() == 0, name
            continue
        assert a.shape == src.shape and a.dtype == src.dtype and a.is_contiguous(), name
        assert rel_err(a, e) < tol, (name, rel_err(a, e))
    assert len({id(o) for o in out}) == 7
    return out


# (B, F, D): every B in {1, 3, 127, 1000}, F in {1, 7, 784, 1025}, D in {1, 20, 129}, at sizes the
# interpreter runs quickly.
SHAPES = [(1, 1, 1), (3, 784, 20), (127, 7, 129), (1000, 1, 20), (3, 1025, 1), (1, 1025, 129)]
CASES = [(*shape, reduction) for shape in SHAPES for reduction in REDUCTIONS] + [(127, 784, 1, "mean")]


@pytest.mark.parametrize("B,F,D,reduction", CASES)
def test_fused_loss_bce_kl(poison, B, F, D, reduction):
    p = _problem(B, F, D, RECON_BCE, REDUCTIONS[reduction])
    _check(p, *_inputs(B, F, D), TOL[torch.float32])


@pytest.mark.parametrize("B,F,D", [(3, 784, 20), (1000, 7, 1), (1, 1025, 129)])
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_fused_loss_mse_kl(poison, B, F, D, reduction):
    p = _problem(B, F, D, RECON_MSE, REDUCTIONS[reduction], beta=0.25)
    _check(p, *_inputs(B, F, D), TOL[torch.float32])


@pytest.mark.parametrize("B,D", [(1, 1), (3, 129), (127, 20), (1000, 20)])
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_kl_only(poison, B, D, reduction):
    p = _problem(B, 0, D, RECON_NONE, REDUCTIONS[reduction], beta=1.0)
    _check(p, *_inputs(B, 0, D), TOL[torch.float32])


@pytest.mark.parametrize("recon", [RECON_BCE, RECON_MSE])
@pytest.mark.parametrize("B,F", [(3, 784), (127, 7), (1, 1025)])
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_recon_only(poison, recon, B, F, reduction):
    p = _problem(B, F, 0, recon, REDUCTIONS[reduction])
    _check(p, *_inputs(B, F, 0), TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_loss_dtypes(poison, dtype, reduction):
    B, F, D = 3, 784, 20
    p = _problem(B, F, D, RECON_BCE, REDUCTIONS[reduction], dtype=dtype)
    _check(p, *_inputs(B, F, D, dtype), TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("recon", [RECON_BCE, RECON_MSE])
def test_uint8_target(poison, dtype, recon):
    B, F, D = 3, 784, 20
    p = _problem(B, F, D, recon, REDUCTIONS["sum"], dtype=dtype)
    _check(p, *_inputs(B, F, D, dtype, target_dtype=torch.uint8), TOL[dtype])


def test_strided_rows(poison):
    """Row-strided views (stride(1) == 1): a slice of a wider buffer, and mu / logvar = h.chunk(2, 1)."""
    B, F, D = 5, 784, 20
    x, t, _, _ = _inputs(B, F + 16, 0)
    h = torch.randn(B, 2 * D + 3)[:, : 2 * D]
    mu, lv = h.chunk(2, dim=1)
    x, t = x[:, 8 : 8 + F], t[:, :F]
    assert x.stride(0) == F + 16 and mu.stride(0) == 2 * D + 3
    for reduction in ("mean", "none"):
        _check(_problem(B, F, D, RECON_BCE, REDUCTIONS[reduction]), x, t, mu, lv * 0.5, TOL[torch.float32])


def test_no_grad_gives_distinct_empty_gradients(poison):
    B, F, D = 3, 784, 20
    p = _problem(B, F, D, RECON_BCE, REDUCTIONS["sum"], need_grad=False)
    out = _check(p, *_inputs(B, F, D), TOL[torch.float32])
    assert all(g.numel() == 0 for g in out[3:])


# (B, F, chunks): 9000 = 8 * 1024 + 808 (the 808 a chunk of its own), 784 = 256 + 256 + 272 (the
# 16-wide tail joins the last chunk), 511 = 256 + 255 (a tail chunk), 1279 = 1024 + 255 (one chunk).
SPLITS = [(2, 9000, 9), (5, 784, 3), (6, 511, 2), (3, 1279, 1)]


@pytest.mark.parametrize("reduction", ["sum", "none"])
@pytest.mark.parametrize("B, F, chunks", SPLITS)
def test_split_rows(poison, reduction, B, F, chunks):
    """Few rows of 2 tiles or more: each row is cut into chunks (several programs a row), the last
    ending the row, and finished in one launch."""
    D = 20
    cfg = fl.loss_config(B, F, D, 4)
    assert cfg[5] == chunks and (chunks == 1 or cfg[6] % cfg[1] == 0)  # n_split, f_chunk whole tiles
    _check(_problem(B, F, D, RECON_BCE, REDUCTIONS[reduction]), *_inputs(B, F, D), TOL[torch.float32])
    # KL-only rows split over the latent dims, with the same rule
    assert fl.loss_config(B, 0, F, 4)[5] == chunks
    _check(_problem(B, 0, F, RECON_NONE, REDUCTIONS[reduction]), *_inputs(B, 0, F), TOL[torch.float32])


def test_image_vae_shapes(poison):
    """The issue's image-VAE shapes, split and finished in one launch, against the reference: the loss
    on [8, 3, 256, 256] logits with [8, 4 * 64 * 64] latents (192 chunks a row, the mean over 1536
    programs' partials), then its gradients scaled per row by scale_grads_; the KL alone on
    [8, 4, 64, 64] latents per row (16 chunks a row)."""
    B, F, D = 8, 3 * 256 * 256, 4 * 64 * 64
    assert fl.loss_config(B, F, D, 4)[5] == 192 and fl.loss_config(B, 0, D, 4)[5] == 16
    out = _check(_problem(B, F, D, RECON_BCE, REDUCTIONS["mean"]), *_inputs(B, F, D), TOL[torch.float32])
    g = torch.linspace(0.5, 2.0, B)
    want = [grad * g[:, None] for grad in out[3:6]]
    fl.scale_grads_(g, *out[3:6])
    assert all(torch.equal(a, w) for a, w in zip(out[3:6], want, strict=True))
    _check(_problem(B, 0, D, RECON_NONE, REDUCTIONS["none"]), *_inputs(B, 0, D), TOL[torch.float32])


def test_launch_config_rule():
    """Tiles that waste no lanes on common widths, and enough programs for few long rows."""
    assert fl._tile(784) == (256, 16)
    assert fl._tile(3072) == (1024, 0)
    assert fl._tile(12288) == (1024, 0)
    assert fl._tile(1025) == (1024, 1)
    assert fl._tile(7) == (8, 8)
    bb, bf, tf, bd, td, n_split, f_chunk, d_chunk, n_prog, warps = fl.loss_config(8, 3 * 256 * 256, 4, 4)
    assert n_prog >= 2 * 132 and f_chunk % bf == 0
    bb, bf, tf, bd, td, n_split, f_chunk, d_chunk, n_prog, warps = fl.loss_config(8, 0, 4 * 64 * 64, 4)
    assert n_prog >= 32 and d_chunk % bd == 0
    # Long rows of at least 2^22 elements in all: 2 waves even at 16 resident programs an SM.
    for B, F, size in ((512, 12288, 2), (512, 12288, 4), (64, 3 * 256 * 256, 4), (8, 4 * 512 * 512, 2)):
        assert fl.loss_config(B, F, 128, size)[8] >= 2 * 16 * 132, (B, F, size)
    # Every row width of a shape of 2^22 elements (the fewest rows): at least 2 waves of the 48 warps an
    # SM holds at 40 registers a thread (every fused-loss specialization uses 40 or more,
    # tests/test_aot_sm90.py), for the loss and for the KL alone.
    for F in [*range(1, 2100), *range(2100, 40000, 97)]:
        B = -(-(2**22) // F)
        for size, u8 in ((4, False), (2, False), (4, True), (8, False)):
            cfg = fl.loss_config(B, F, 20, size, u8)
            assert cfg[8] * cfg[9] >= 2 * 48 * 132, (B, F, size, u8, cfg)
        cfg = fl.loss_config(B, 0, F, 4)
        assert cfg[8] * cfg[9] >= 2 * 48 * 132, (B, F, cfg)
        # the gradient scaling (32 registers): 2 waves even at the most programs an SM holds (64
        # warps, at most 32 programs); float32 keeps the forward's tiles
        cfg = fl.scale_config(B, F, 20, 4)
        assert cfg[8] * cfg[9] >= 2 * 64 * 132 and cfg[:9] == fl.loss_config(B, F, 20, 4)[:9], (B, F, cfg)
        cfg = fl.scale_config(B, F, 20, 2)
        assert cfg[8] >= 2 * 132 * min(32, 64 // cfg[9]), (B, F, cfg)
    assert fl.loss_config(5350, 784, 20, 4)[5:9] == (3, 256, 16, 4014)
    assert fl.loss_config(128, 784, 20, 4) == fl.loss_config(128, 784, 20, 4)
    assert fl.loss_config(4096, 784, 20, 4)[-1] == 4 and fl.loss_config(4096, 784, 20, 4, True)[-1] == 8


def _fp32_bce_model(x: np.ndarray, rsqrt_err: float, exp_err: float):
    """The float32 formula of ``_bce_with_logits`` in NumPy (fused multiply-adds as one rounding of
    the float64 result), with MUFU.RSQ / MUFU.EX2 off by the given relative errors."""
    f = np.float32
    rnd = lambda a: np.asarray(a, np.float64).astype(f)
    e = rnd(np.exp2(rnd(-np.abs(x) * f(1.4426950408889634)).astype(np.float64)) * (1 + exp_err))
    v = rnd(f(2) + e)
    rs = rnd(1 / np.sqrt(rnd((f(1) + e) * v).astype(np.float64)) * (1 + rsqrt_err))
    r = rnd(rs * rs)
    sig_abs = rnd(v * r)
    s = rnd(rnd(e.astype(np.float64) * e + e) * r)
    w = rnd(s * s)
    p = rnd(w.astype(np.float64) * f(0.3398355543613434) + f(0.39635971188545227))
    p = rnd(w.astype(np.float64) * p + f(0.6667348146438599))
    log1p_e = rnd(s * rnd(w.astype(np.float64) * p + 2.0))
    return log1p_e, np.where(x >= 0, sig_abs, rnd(e * sig_abs)), e


@pytest.mark.parametrize("rsqrt_err", [0.0, 2**-21.9, -(2**-21.9)])
def test_fp32_bce_math_within_budget(rsqrt_err):
    """log1p(exp(-|x|)) and sigmoid(x) of the float32 kernel math stay within 1.5e-6 relative of float64
    for every x (the interpreter's rsqrt is exact; MUFU.RSQ is within 2^-21.9, MUFU.EX2 2^-22.5)."""
    x = np.concatenate([np.linspace(-80, 80, 400001), -np.logspace(-30, 1.9, 2000)]).astype(np.float32)
    exp_err = 2**-22.5 if rsqrt_err >= 0 else -(2**-22.5)
    log1p_e, sigmoid, e = _fp32_bce_model(x, rsqrt_err, exp_err)
    e64 = e.astype(np.float64)  # judge the formula on the e it was given: exp's own error is x's rounding
    assert np.max(np.abs(log1p_e - np.log1p(e64)) / np.log1p(e64)) < 1.5e-6
    sig64 = np.where(x >= 0, 1 / (1 + e64), e64 / (1 + e64))
    assert np.max(np.abs(sigmoid - sig64) / sig64) < 1.5e-6


def test_nan_propagates(poison):
    B, F, D = 3, 784, 20
    x, t, mu, lv = _inputs(B, F, D)
    x[1, 5] = float("nan")
    lv[2, 3] = float("nan")
    loss, recon, kl, dx, dmu, dlv, _ = fl.fused_loss(
        _problem(B, F, D, RECON_BCE, REDUCTIONS["none"]), x, t, mu, lv
    )
    assert torch.isnan(recon[1]) and not torch.isnan(recon[0]) and torch.isnan(kl[2])
    assert torch.isnan(dx[1, 5]) and torch.isnan(dx).sum() == 1 and torch.isnan(dlv).sum() == 1
    loss = fl.fused_loss(_problem(B, F, D, RECON_BCE, REDUCTIONS["sum"]), x, t, mu, lv)[0]
    assert torch.isnan(loss)


def test_empty_batch():
    p = _problem(0, 784, 20, RECON_BCE, REDUCTIONS["mean"])
    loss, recon, kl, dx, dmu, dlv, _ = fl.fused_loss(p, *_inputs(0, 784, 20))
    assert torch.isnan(loss) and dx.shape == (0, 784) and dmu.shape == (0, 20)
    p = _problem(0, 784, 20, RECON_BCE, REDUCTIONS["sum"])
    assert fl.fused_loss(p, *_inputs(0, 784, 20))[0] == 0


def test_deterministic_and_ticket_reset():
    """Bit-identical on two runs through the multi-program finish; the ticket is back at 0."""
    B, F, D = 9, 784, 20  # 3 programs a launch, finished by the last
    p = _problem(B, F, D, RECON_BCE, REDUCTIONS["sum"])
    args = _inputs(B, F, D)
    a = fl.fused_loss(p, *args)
    b = fl.fused_loss(p, *args)
    for u, v in zip(a, b, strict=True):
        assert torch.equal(u, v)
    assert int(fl._ticket(torch.device("cpu"))) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # bf16: 1-warp tiles of 256, split
@pytest.mark.parametrize("per_row", [False, True])
def test_scale_grads(poison, per_row, dtype):
    B, F, D = 13, 784, 20
    p = _problem(B, F, D, RECON_BCE, REDUCTIONS["none" if per_row else "sum"])
    x, t, mu, lv = _inputs(B, F, D, dtype)
    _, _, _, dx, dmu, dlv, _ = fl.fused_loss(p, x, t, mu, lv)
    assert dx.dtype == dtype
    before = [g.clone() for g in (dx, dmu, dlv)]
    if per_row:
        g = torch.linspace(-2.0, 3.0, B)
        g[::3] = 1.0  # rows left untouched
    else:
        g = torch.tensor(-0.75)
    fl.scale_grads_(g, dx, dmu, dlv)
    col = g.reshape(-1, 1).double()
    for a, b in zip((dx, dmu, dlv), before, strict=True):
        want = to_np(b) * to_np(col)
        if dtype == torch.float32:
            assert rel_err(a, want) < 1e-6
        else:  # within one bfloat16 step (the interpreter's conversion to bfloat16 truncates)
            assert (np.abs(to_np(a) - want) <= np.ldexp(1.0, np.frexp(want)[1] - 8)).all()
        if per_row:
            assert torch.equal(a[::3], b[::3])


def test_scale_grads_expanded_and_one(poison):
    """An expanded (stride-0) per-row gradient needs no copy; g == 1 everywhere leaves every bit alone."""
    B, F, D = 3, 784, 20
    _, _, _, dx, dmu, dlv, _ = fl.fused_loss(
        _problem(B, F, D, RECON_BCE, REDUCTIONS["none"]), *_inputs(B, F, D)
    )
    before = [g.clone() for g in (dx, dmu, dlv)]
    fl.scale_grads_(torch.tensor(1.0).expand(B), dx, dmu, dlv)
    assert all(torch.equal(a, b) for a, b in zip((dx, dmu, dlv), before, strict=True))
    fl.scale_grads_(torch.tensor(2.0).expand(B), dx, dmu, dlv)
    assert all(torch.equal(a, 2 * b) for a, b in zip((dx, dmu, dlv), before, strict=True))
    empty = torch.empty(0)
    fl.scale_grads_(torch.tensor(3.0), dx, empty, empty.clone())  # KL gradients absent
    assert torch.equal(dx, 6 * before[0])


# ----------------------------------------------------------------------------------------------
# Gaussian and continuous-Bernoulli likelihoods
# ----------------------------------------------------------------------------------------------

# Logits where the continuous Bernoulli's normalizer needs care: 0, tiny, its series branch, both sides
# of the branch cut (|x| = 2 in float32, 1 in float64), large.
CB_LOGITS = (0.0, 1e-4, -1e-4, 0.5, -0.5, 0.999, -1.001, 1.999, 2.0, -2.001, 30.0, -30.0)


def _cb_inputs(B, F, D, dtype=torch.float32, target_dtype=None):
    """_inputs with CB_LOGITS written over the first logits."""
    x, t, mu, lv = _inputs(B, F, D, dtype, target_dtype)
    n = min(len(CB_LOGITS), B * F)
    x.view(-1)[:n] = torch.tensor(CB_LOGITS[:n]).to(dtype)
    return x, t, mu, lv


def _log_scale(L, s, acc=torch.float32):
    """L log-scales: all s, or (s None) drawn uniformly from [-3, 2), a fixed seed."""
    if s is not None:
        return torch.full((L,), s, dtype=acc)
    g = torch.Generator().manual_seed(3)
    return (torch.rand(L, generator=g) * 5.0 - 3.0).to(acc)


# (B, F, D, L, s, reduction): B in {1, 3, 127}, F in {1, 7, 784, 1025}, one scale or one per feature,
# s in {-3, 0, 2} or spread, each reduction, with and without KL.
GAUSS_CASES = [
    (1, 1, 0, 1, 0.0, "sum"),
    (3, 784, 20, 1, -3.0, "mean"),
    (3, 784, 20, 784, None, "none"),
    (127, 7, 20, 7, None, "sum"),
    (127, 7, 1, 1, 2.0, "none"),
    (1, 1025, 129, 1025, None, "mean"),
    (3, 1025, 0, 1, 2.0, "sum"),
    (127, 1, 20, 1, -3.0, "mean"),
]


@pytest.mark.parametrize("B,F,D,L,s,reduction", GAUSS_CASES)
def test_gaussian(poison, B, F, D, L, s, reduction):
    p = _problem(B, F, D, RECON_GAUSSIAN, REDUCTIONS[reduction], beta=0.5, scale_grad=True)
    _check(p, *_inputs(B, F, D), TOL[torch.float32], _log_scale(L, s))


@pytest.mark.parametrize("need_grad", [False, True])
def test_gaussian_without_scale_gradient(poison, need_grad):
    """scale_grad False (a fixed scale) or no gradients at all: dlog_scale is empty, the rest as before."""
    B, F, D = 3, 784, 20
    p = _problem(B, F, D, RECON_GAUSSIAN, REDUCTIONS["sum"], need_grad=need_grad, scale_grad=not need_grad)
    out = _check(p, *_inputs(B, F, D), TOL[torch.float32], _log_scale(F, None))
    assert out[6].numel() == 0


# (B, F, D, reduction): the awkward sizes and each reduction, with and without KL.
CB_CASES = [
    (1, 1, 1, "sum"),
    (3, 784, 20, "mean"),
    (127, 7, 129, "none"),
    (3, 1025, 0, "sum"),
    (1, 1025, 20, "none"),
    (127, 784, 1, "mean"),
]


@pytest.mark.parametrize("B,F,D,reduction", CB_CASES)
def test_continuous_bernoulli(poison, B, F, D, reduction):
    p = _problem(B, F, D, RECON_CB, REDUCTIONS[reduction])
    _check(p, *_cb_inputs(B, F, D), TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("recon", [RECON_GAUSSIAN, RECON_CB])
def test_likelihood_dtypes(poison, dtype, recon):
    B, F, D = 3, 784, 20
    p = _problem(B, F, D, recon, REDUCTIONS["mean"], dtype=dtype, scale_grad=recon == RECON_GAUSSIAN)
    if recon == RECON_GAUSSIAN:
        _check(p, *_inputs(B, F, D, dtype), TOL[dtype], _log_scale(F, None, p.acc))
    else:
        _check(p, *_cb_inputs(B, F, D, dtype), TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("recon", [RECON_GAUSSIAN, RECON_CB])
def test_likelihood_uint8_target(poison, dtype, recon):
    B, F, D = 3, 784, 20
    p = _problem(B, F, D, recon, REDUCTIONS["none"], dtype=dtype, scale_grad=True)
    log_scale = _log_scale(1, 0.0) if recon == RECON_GAUSSIAN else None
    _check(p, *_cb_inputs(B, F, D, dtype, target_dtype=torch.uint8), TOL[dtype], log_scale)


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_likelihood_split_rows(poison, reduction):
    """Few long rows, cut into chunks and finished in one launch: per-feature scales follow the chunks."""
    B, F, D = 2, 9000, 20
    assert fl.loss_config(B, F, D, 4)[5] > 1  # n_split
    p = _problem(B, F, D, RECON_GAUSSIAN, REDUCTIONS[reduction], scale_grad=True)
    _check(p, *_inputs(B, F, D), TOL[torch.float32], _log_scale(F, None))
    _check(_problem(B, F, D, RECON_CB, REDUCTIONS[reduction]), *_cb_inputs(B, F, D), TOL[torch.float32])


def test_likelihoods_deterministic():
    """Bit-identical on two runs through the multi-program finish; the ticket is back at 0."""
    B, F, D = 9, 784, 20
    for p, args, log_scale in (
        (_problem(B, F, D, RECON_GAUSSIAN, 0, scale_grad=True), _inputs(B, F, D), _log_scale(F, None)),
        (_problem(B, F, D, RECON_GAUSSIAN, 0, scale_grad=True), _inputs(B, F, D), _log_scale(1, 2.0)),
        (_problem(B, F, D, RECON_CB, 0), _cb_inputs(B, F, D), None),
    ):
        a = fl.fused_loss(p, *args, log_scale)
        b = fl.fused_loss(p, *args, log_scale)
        assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    assert int(fl._ticket(torch.device("cpu"))) == 0


def test_log_scale_refused_by_name():
    B, F, D = 3, 7, 0
    x, t, _, _ = _inputs(B, F, D)
    p = _problem(B, F, D, RECON_GAUSSIAN, REDUCTIONS["sum"])
    bad = (None, torch.zeros(2), torch.zeros(F, dtype=torch.float64), torch.zeros(2 * F)[::2])
    for log_scale in bad:
        with pytest.raises(ValueError, match="log_scale: expected a contiguous torch.float32 tensor"):
            fl.fused_loss(p, x, t, None, None, log_scale)
    with pytest.raises(ValueError, match="log_scale: expected None"):
        fl.fused_loss(_problem(B, F, D, RECON_BCE, REDUCTIONS["sum"]), x, t, None, None, torch.zeros(1))


@triton.jit
def _cb_probe_kernel(x_ptr, k_ptr, dk_ptr, N, BLOCK: tl.constexpr):
    """The fused loss's K(x) = log(sinh(x/2) / (x/2)) and K'(x), element by element."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    k, dk = fl._cb_even(tl.load(x_ptr + offs, mask=m, other=0.0))
    tl.store(k_ptr + offs, k, mask=m)
    tl.store(dk_ptr + offs, dk, mask=m)


@pytest.mark.parametrize(
    "dtype,cut,tol_k,tol_dk", [(torch.float32, 2.0, 2e-6, 1e-6), (torch.float64, 1.0, 2e-14, 1e-14)]
)
def test_cb_even_both_branches(dtype, cut, tol_k, tol_dk):
    """K(x) = log(sinh(x/2) / (x/2)) and K'(x) = coth(x/2)/2 - 1/x of the kernel against mpmath (80 digits)
    at many points on both sides of the branch cut, near 0 and far out, by relative error.  float32:
    K within 2e-6 (measured 8.5e-7 under the interpreter, just above the cut where K = a/2 + log((1 - e)/a)
    cancels 6x), K' within 1e-6 (3.6e-7); float64: 2e-14 (6.9e-15) and 1e-14 (2.2e-15).  Values of K
    below float32's smallest normal (x = 1e-30) come back as 0 or a denormal.  K and K' are 0 at x = 0.
    """
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 80
    np_dtype = np.float32 if dtype == torch.float32 else np.float64
    x = np.concatenate(
        [
            [0.0, 1e-30, 1e-6, 1e-4, 1e-3, 1e-2, 0.25, 0.5, 1.0, 2.0, 30.0, 80.0, 1e4, 1e30],
            np.linspace(0.9 * cut, 1.1 * cut, 401),
            np.nextafter(np.full(2, cut, np_dtype), np.array([0.0, 4.0], np_dtype)),  # the cut's neighbours
            np.logspace(-4, 2, 300),
        ]
    )
    x = torch.tensor(np.concatenate([x, -x]), dtype=dtype)
    k, dk = torch.empty_like(x), torch.empty_like(x)
    _cb_probe_kernel[(triton.cdiv(x.numel(), 256),)](x, k, dk, x.numel(), BLOCK=256)

    def exact(v: float) -> tuple[float, float]:
        if v == 0.0:
            return 0.0, 0.0
        h = mpmath.mpf(v) / 2
        return float(mpmath.log(mpmath.sinh(h) / h)), float(mpmath.coth(h) / 2 - 1 / (2 * h))

    want = np.array([exact(v) for v in x.tolist()])
    got = np.stack([to_np(k), to_np(dk)], axis=1)
    normal = np.abs(want) >= np.finfo(np_dtype).tiny
    assert np.all(np.abs(got[~normal]) <= np.finfo(np_dtype).tiny)  # 0 at x = 0, underflow at 1e-30
    for j, tol in ((0, tol_k), (1, tol_dk)):
        m = normal[:, j]
        assert np.max(np.abs(got[m, j] - want[m, j]) / np.abs(want[m, j])) < tol, j


def test_cb_series_coefficients():
    """The Taylor series the small-|x| branch sums: K(x) = sum_k c_k x^(2k), c_k = B_2k / (2k (2k)!) =
    1/24, -1/2880, 1/181440, -1/9676800, 1/479001600, -691/15692092416000, ... (K' = sum_k 2k c_k x^(2k-1)),
    checked against mpmath's Taylor coefficients of log(sinh(x/2) / (x/2)) and against softplus(x) - x/2 -
    log C(x), the form the loss was written in."""
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 60
    K = lambda v: mpmath.log(mpmath.sinh(v / 2) / (v / 2)) if v else mpmath.mpf(0)
    c = [mpmath.bernoulli(2 * k) / (2 * k * mpmath.factorial(2 * k)) for k in range(1, 11)]
    taylor = mpmath.taylor(K, 0, 20)
    assert all(abs(taylor[2 * k] - c[k - 1]) < 1e-40 for k in range(1, 11))
    assert all(abs(taylor[2 * k + 1]) < 1e-40 for k in range(10))
    want_c = [1 / 24, -1 / 2880, 1 / 181440, -1 / 9676800, 1 / 479001600, -691 / 15692092416000]
    assert np.allclose([float(v) for v in c[:6]], want_c, rtol=1e-15, atol=0)
    for v in (mpmath.mpf("1e-3"), mpmath.mpf("0.7"), mpmath.mpf(-2), mpmath.mpf("35.5")):
        cb_form = mpmath.log(1 + mpmath.exp(v)) - v / 2 - mpmath.log(v / mpmath.tanh(v / 2))
        assert abs(cb_form - K(v)) < 1e-50
    # ... and the float64 kernel at small x equals that series (next term: c_11 x^22, 2.5e-19 x^22).
    x = torch.tensor([1e-3, -0.01, 0.05, -0.1, 0.6, -0.99], dtype=torch.float64)
    out_k, out_dk = torch.empty_like(x), torch.empty_like(x)
    _cb_probe_kernel[(1,)](x, out_k, out_dk, x.numel(), BLOCK=8)
    xs = to_np(x)
    coef = [float(v) for v in c]
    series_k = sum(ck * xs ** (2 * k) for k, ck in enumerate(coef, start=1))
    series_dk = sum(2 * k * ck * xs ** (2 * k - 1) for k, ck in enumerate(coef, start=1))
    assert np.allclose(to_np(out_k), series_k, rtol=1e-15, atol=0)
    assert np.allclose(to_np(out_dk), series_dk, rtol=1e-15, atol=0)


@pytest.mark.parametrize("t_kind", ["half", "random"])
def test_continuous_bernoulli_logits_near_zero(poison, t_kind):
    """Rows made only of logits with |x| <= 1e-3, where softplus(x) - log C(x) would cancel (both ~log 2;
    the loss ~ x^2/24 ~ 4e-8 at t = 1/2): each row's loss and each d logit within 1e-5 relative of the
    float64 reference, float32, no reduction (so no row hides behind another)."""
    B, F, D = 5, 300, 0
    g = torch.Generator().manual_seed(11)
    x = (torch.rand(B, F, generator=g) * 2e-3 - 1e-3).to(torch.float32)
    x[0, :4] = torch.tensor([1e-3, -1e-3, 1e-7, 0.0])
    t = torch.full((B, F), 0.5) if t_kind == "half" else torch.rand(B, F, generator=g)
    p = _problem(B, F, D, RECON_CB, REDUCTIONS["none"])
    loss, recon, _, dx = fl.fused_loss(p, x, t, None, None)[:4]
    want = reference.continuous_bernoulli(to_np(x), to_np(t), "none")
    want_dx = reference.continuous_bernoulli_backward(to_np(x), to_np(t), "none")[0]
    for got in (loss, recon):
        assert np.max(np.abs(to_np(got) - want) / np.abs(want)) < 1e-5
    nz = want_dx != 0
    assert np.max(np.abs(to_np(dx)[nz] - want_dx[nz]) / np.abs(want_dx[nz])) < 1e-5
    assert np.all(to_np(dx)[~nz] == 0)


# ----------------------------------------------------------------------------------------------
# reparameterize
# ----------------------------------------------------------------------------------------------


def _rep_inputs(shape, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype), (torch.randn(shape, generator=g) * 0.5).to(dtype)


@pytest.fixture(params=["1-warp", "4-warp"])
def programs(request, monkeypatch):
    """Both program sizes of ``rp.launch_config``: calls under ``FOUR_WARPS_FROM`` elements run 1-warp
    programs of 256 elements; the 4-warp ones (1024) run here from 1024 elements on."""
    if request.param == "4-warp":
        monkeypatch.setattr(rp, "FOUR_WARPS_FROM", 1024)
    monkeypatch.setattr(rp, "_LAUNCH", {})
    return request.param


def test_reparameterize_launch_rule():
    """8 elements a thread (4 of float64); every call of at least 2^22 elements runs at least 2 waves on
    132 SMs even at the most programs an SM can hold (64 warps, at most 32 programs)."""
    four = rp.FOUR_WARPS_FROM
    sizes = (1, 255, 256, 4096, 2**22 - 1, 2**22, four - 1, four, 2**24, 2**31 + 5)
    for n, dtype in itertools.product(sizes, (torch.float32, torch.bfloat16, torch.float64)):
        block, warps = rp.launch_config(n, dtype)
        assert block == 32 * warps * (4 if dtype == torch.float64 else 8)
        assert warps == (4 if n >= rp.FOUR_WARPS_FROM else 1)
        if n >= 2**22:
            assert -(-n // block) >= 2 * 132 * min(32, 64 // warps), (n, dtype)


# (64, 64): whole tiles (EVEN, no masks) at offset 0
@pytest.mark.parametrize("shape", [(1, 1), (3, 20), (127, 129), (1000, 7), (64, 64)])
@pytest.mark.parametrize("offset", [0, 12345])
def test_reparameterize(poison, programs, shape, offset):
    mu, lv = _rep_inputs(shape)
    seed = 2024
    z = rp.reparameterize(mu, lv, seed, offset)
    assert z.shape == mu.shape and z.dtype == mu.dtype and z.is_contiguous()
    assert rel_err(z, reference.reparameterize(to_np(mu), to_np(lv), seed, offset)) < 1e-5
    dz = torch.randn(shape)
    dlv = rp.reparameterize_backward(dz, lv, seed, offset)
    assert rel_err(dlv, reference.reparameterize_backward(to_np(dz), to_np(lv), seed, offset)[1]) < 1e-5
    n = shape[0] * shape[1]
    launch = rp._LAUNCH[(n, torch.float32, True, False, offset & 3, True)]
    block = launch.kwargs["BLOCK"]
    assert block == (1024 if programs == "4-warp" and n >= 1024 else 256)
    assert launch.kwargs["EVEN"] == (n % block == 0 and offset % 4 == 0)


def test_reparameterize_key_tensor_never_read_on_host(poison):
    mu, lv = _rep_inputs((5, 33))
    seed, offset = 2**40 + 17, 2**33 + 5  # both past 32 bits: the high words matter
    key = device_only_key(seed)
    z = rp.reparameterize(mu, lv, key, offset)
    assert torch.equal(z, rp.reparameterize(mu, lv, seed, offset))
    assert rel_err(z, reference.reparameterize(to_np(mu), to_np(lv), seed, offset)) < 1e-5
    dlv = rp.reparameterize_backward(mu, lv, key, offset)
    assert torch.equal(dlv, rp.reparameterize_backward(mu, lv, seed, offset))


def test_reparameterize_offset_continues_the_stream():
    """Two calls at offsets 0 and n draw the eps of one call over 2n elements."""
    mu, lv = _rep_inputs((2, 64))
    whole = rp.reparameterize(mu.reshape(1, -1), lv.reshape(1, -1), 7, 0).reshape(2, 64)
    assert torch.equal(rp.reparameterize(mu[1:], lv[1:], 7, 64), whole[1:])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_reparameterize_dtypes(poison, dtype):
    mu, lv = _rep_inputs((3, 129), dtype)
    z = rp.reparameterize(mu, lv, 5, 3)
    assert z.dtype == dtype
    assert rel_err(z, reference.reparameterize(to_np(mu), to_np(lv), 5, 3)) < (
        1e-5 if dtype == torch.float64 else 2e-2
    )


@triton.jit
def _rand4x_kernel(out_ptr, seed, first, N: tl.constexpr):
    c = first + tl.arange(0, N).to(tl.int64)
    u1, u2, u3, u4 = tl.rand4x(seed, c)
    n1, n2, n3, n4 = tl.randn4x(seed, c)
    i = tl.arange(0, N)
    tl.store(out_ptr + i, u1)
    tl.store(out_ptr + N + i, u2)
    tl.store(out_ptr + 2 * N + i, u3)
    tl.store(out_ptr + 3 * N + i, u4)
    tl.store(out_ptr + 4 * N + i, n1)
    tl.store(out_ptr + 5 * N + i, n2)
    tl.store(out_ptr + 6 * N + i, n3)
    tl.store(out_ptr + 7 * N + i, n4)


def test_reference_randn4_is_triton_randn4x():
    """fastvae.reference.uniform4 / randn4 port Triton's own tl.rand4x / tl.randn4x (libdevice log, cos
    and sin): at seed 0 (the stream whose counter words 2 and 3 are 0) uniforms bit for bit, normals
    within a few float32 ulp; the counters cross 2^32."""
    n, seed, first = 64, 0, 2**32 - 5
    out = torch.empty(8, n)
    _rand4x_kernel[(1,)](out, seed, first, N=n)
    counters = first + np.arange(n)
    for got, want in zip(out[:4].numpy(), reference.uniform4(seed, counters), strict=True):
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
    for got, want in zip(out[4:].numpy(), reference.randn4(seed, counters), strict=True):
        ulp = np.spacing(np.abs(want).astype(np.float32)).astype(np.float64)
        assert (np.abs(got - want) / ulp).max() <= 4


@triton.jit
def _log_sincos_kernel(u_ptr, t_ptr, log_ptr, cos_ptr, sin_ptr, N: tl.constexpr):
    i = tl.arange(0, N)
    tl.store(log_ptr + i, rp._log_normal(tl.load(u_ptr + i)))
    c, s = rp._sincos_0_2pi(tl.load(t_ptr + i))
    tl.store(cos_ptr + i, c)
    tl.store(sin_ptr + i, s)


def test_box_muller_log_and_sincos_within_ulps():
    """The kernel's branch-free log on every kind of u1 it can see (the uniforms k * 4.6566127342e-10,
    k < 2**31, floored at 1e-7: near 1e-7, across the 2/3 reduction boundary and next to 1) within
    1 ulp, and its sine and cosine on theta = float32(2 pi) u2 within 1.5 ulp of float64."""
    n = 1 << 17
    gen = np.random.default_rng(3)
    k = np.concatenate(
        [gen.integers(0, 2**31, n - 4096), np.arange(2**31 - 2048, 2**31), np.arange(215, 215 + 1024)]
    )
    # and u2 next to the zeros and extrema of sin and cos (theta near j pi / 2)
    near = [2**31 * j / 4 + np.arange(-256, 256) for j in (1, 2, 3)] + [2**31 * 2 / 3 + np.arange(-512, 512)]
    k = np.concatenate([np.concatenate(near), k]).astype(np.int64)[:n]
    u = np.maximum(np.float32(1e-7), k.astype(np.float32) * reference.UNIFORM_SCALE).astype(np.float32)
    theta = (reference.TWO_PI_F32 * (k.astype(np.float32) * reference.UNIFORM_SCALE)).astype(np.float32)
    outs = [torch.empty(n) for _ in range(3)]
    _log_sincos_kernel[(1,)](torch.from_numpy(u), torch.from_numpy(theta), *outs, N=n)
    for got, want, bound in (
        (outs[0], np.log(u.astype(np.float64)), 1.0),
        (outs[1], np.cos(theta.astype(np.float64)), 1.5),
        (outs[2], np.sin(theta.astype(np.float64)), 1.5),
    ):
        ulps = np.abs(got.numpy() - want) / np.spacing(np.abs(want).astype(np.float32)).astype(np.float64)
        assert ulps.max() <= bound, (ulps.max(), int(np.argmax(ulps)))


# ----------------------------------------------------------------------------------------------
# The GPU's code path (its PTX lines; the MUFU draw of 16-bit outputs): here with the PTX emulated.
# ----------------------------------------------------------------------------------------------


def _lg2_worst(x, y):
    """lg2.approx's documented worst case (CUDA's __log2f): 2^-22 absolute on [1/2, 2], else 2 ulp; lg2(0)
    is -inf exactly (PTX ISA)."""
    ulps = 2.0 * np.spacing(np.abs(np.where(np.isfinite(y), y, 0.0)).astype(np.float32))
    return np.where((x >= 0.5) & (x <= 2.0), 2.0**-22, np.where(np.isfinite(y), ulps, 0.0))


# The documented worst-case absolute errors of the MUFU lines (PTX ISA; CUDA's __log2f).
MUFU_WORST = {"lg2": _lg2_worst, "sin": lambda x, y: 2.0**-20.5, "cos": lambda x, y: 2.0**-20.5}


class _PtxEmulation:
    """The interpreter's ``create_inline_asm`` for the PTX lines of the reparameterize kernel.

    - ``lg2`` / ``sin`` / ``cos .approx.ftz.f32``: float64 values rounded to float32, plus ``error``
      times the instruction's documented worst case, with signs alternating over the elements.
    - ``mul.wide.u32`` (Philox's products) and the bfloat16 widening (``shl.b32`` / ``and.b32``): exact,
      on the bits, as the PTX defines them."""

    error = 0.0

    def __call__(self, asm, constraints, values, *rest):
        from types import SimpleNamespace

        from triton.runtime import interpreter

        op = asm.split(".")[0]
        if op == "mul":
            a, b = (v.data.astype(np.uint64) for v in values)
            out = interpreter.TensorHandle(a * b, tl.uint64)
        elif op == "shl":  # bfloat16 bits (the interpreter stores them as uint16) to float32 bits
            bits = values[0].data.astype(np.uint32) << 16
            out = interpreter.TensorHandle(bits.view(np.float32), tl.float32)
        else:
            x = values[0].data.astype(np.float64)
            y = {"lg2": np.log2, "sin": np.sin, "cos": np.cos}[op](x)
            sign = np.where(np.arange(y.size).reshape(y.shape) % 2 == 0, 1.0, -1.0)
            y = (y + sign * self.error * MUFU_WORST[op](x, y)).astype(np.float32)
            out = interpreter.TensorHandle(y, tl.float32)
        return SimpleNamespace(get_result=lambda i: out)


@pytest.fixture
def mufu(monkeypatch):
    """Launches take the GPU's code path (``PTX``; 16-bit ones the MUFU draw), its PTX emulated
    (``_PtxEmulation``)."""
    if rp._COMPILED:
        pytest.skip("compiled kernels run the PTX itself (bench/gpu_proof.py checks them on a GPU)")
    from triton.runtime import interpreter

    emulation = _PtxEmulation()
    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_inline_asm", emulation)
    monkeypatch.setattr(rp, "_COMPILED", True)
    monkeypatch.setattr(rp, "_LAUNCH", {})
    return emulation


@triton.jit
def _box_muller_mufu_kernel(w1_ptr, w2_ptr, cos_ptr, sin_ptr, N: tl.constexpr):
    i = tl.arange(0, N)
    log2_r, c, s = rp._box_muller_mufu(tl.load(w1_ptr + i), tl.load(w2_ptr + i))
    r = tl.exp2(log2_r)
    tl.store(cos_ptr + i, r * c)
    tl.store(sin_ptr + i, r * s)


# The MUFU draw's bound (kernels/reparameterize.py::_box_muller_mufu), for a normal n of radius r.
def _mufu_bound(n, r):
    return 2.0**-16 * np.abs(n) + 2.0**-19 * r


@pytest.mark.parametrize("error", [0.0, 1.0, 2.0])
def test_box_muller_mufu_within_its_bound(mufu, error):
    """2^(log2 r) cos, 2^(log2 r) sin within 2^-16 |n| + 2^-19 r of the float64 Box-Muller n of the same
    float32 uniforms, for words of every kind: u1 at its 1e-7 floor, on both sides of the 1 - 2^-6
    switch between MUFU.LG2 and the series, next to 1 (r -> 0), negative and positive; with every
    approximation exact, at its documented worst or at twice that."""
    mufu.error = error
    n = 1 << 15
    gen = np.random.default_rng(5)
    near = lambda v, k: np.concatenate([v + np.arange(-k, k), -(v + np.arange(-k, k)) - 1])
    floor, switch, top = near(0, 600), near(2**31 - 2**25, 2000), near(2**31 - 2000, 2000)
    x1 = np.concatenate([floor, switch, top, gen.integers(-(2**31), 2**31, n)])[:n]
    x1 = np.clip(x1, -(2**31), 2**31 - 1).astype(np.int32)
    x2 = np.concatenate([near(2**29 * j, 256) for j in range(1, 4)] + [gen.integers(-(2**31), 2**31, n)])[:n]
    x2 = x2.astype(np.int32)
    got_c, got_s = torch.empty(n), torch.empty(n)
    _box_muller_mufu_kernel[(1,)](torch.from_numpy(x1), torch.from_numpy(x2), got_c, got_s, N=n)
    u1 = reference._uint_to_uniform_float32(x1.view(np.uint32))
    u2 = reference._uint_to_uniform_float32(x2.view(np.uint32))
    want_c, want_s = reference._box_muller(u1, u2)
    r = np.hypot(want_c, want_s)
    for got, want in ((got_c, want_c), (got_s, want_s)):
        excess = np.abs(got.numpy() - want) / _mufu_bound(want, r)
        assert excess.max() <= 1.0, (excess.max(), int(np.argmax(excess)), x1[np.argmax(excess)])


@pytest.mark.parametrize("error", [0.0, 2.0])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reparameterize_mufu_path_within_one_step(poison, mufu, programs, dtype, error):
    """The 16-bit kernel as a GPU runs it: z and dlogvar within one rounding step of the output type of
    the float64 reference (plus the draw's bound scaled by sigma), at offsets of every phase mod 4 and
    past 2^32, forward and backward, with the MUFU lines exact or at twice their worst case."""
    mufu.error = error
    for n, offset in itertools.product((1029, 2048), (0, 1, 2, 3, 2**32 - 3)):  # 2048, 0: EVEN
        mu, lv = _rep_inputs((n,), dtype, seed=offset % 97)
        mu64, lv64 = to_np(mu), to_np(lv)
        sigma, eps = np.exp(0.5 * lv64), reference.eps(11, (n,), offset)
        name = str(dtype).removeprefix("torch.")
        z = to_np(rp.reparameterize(mu, lv, 11, offset))
        assert half_precision_excess(z, mu64 + sigma * eps, sigma, eps, name) <= 1.0, offset
        # dlogvar = 0.5 dz sigma eps = sigma eps with dz = 2
        dlv = to_np(rp.reparameterize_backward(torch.full((n,), 2.0, dtype=dtype), lv, 11, offset))
        assert half_precision_excess(dlv, sigma * eps, sigma, eps, name) <= 1.0, offset
    assert any(key[1] == dtype for key in rp._LAUNCH)  # through the MUFU launch configuration


@pytest.mark.parametrize("shape", [(1,), (5,), (1029,)])  # 1029: 5 one-warp programs, 2 four-warp ones
def test_reparameterize_ptx_philox_is_the_same_draw(poison, mufu, programs, shape):
    """float32 on the GPU's path (Philox's products as ``mul.wide.u32``) gives the interpreter's bits,
    forward and backward, at offsets of every phase mod 4 and past 2^32."""
    mu, lv = _rep_inputs(shape)
    for offset in (0, 1, 2, 3, 2**32 - 3):
        rp._COMPILED = True
        z, dlv = rp.reparameterize(mu, lv, 11, offset), rp.reparameterize_backward(mu, lv, 11, offset)
        assert all(launch.kwargs["PTX"] for launch in rp._LAUNCH.values())
        rp._COMPILED = False
        rp._LAUNCH.clear()
        assert torch.equal(z, rp.reparameterize(mu, lv, 11, offset)), offset
        assert torch.equal(dlv, rp.reparameterize_backward(mu, lv, 11, offset)), offset
        rp._LAUNCH.clear()


def test_interpreter_draws_16_bit_outputs_exactly():
    """No PTX under the interpreter: 16-bit launches take the exact draw (MUFU off); compiled ones take
    MUFU (tests/test_aot_sm90.py reads it in their specialization)."""
    if rp._COMPILED:
        pytest.skip("compiled kernels")
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        rp.reparameterize(torch.zeros(5, dtype=dtype), torch.zeros(5, dtype=dtype), 3, 0)
    launchers = [launch for key, launch in rp._LAUNCH.items() if key[0] == 5]
    assert len(launchers) >= 3
    assert not any(launch.kwargs["MUFU"] or launch.kwargs["PTX"] for launch in launchers)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_reparameterize_eps_at_every_offset_phase(poison, programs, dtype):
    """eps[i] = randn(key, offset + i) for offsets in every phase mod 4 (the quad of counters a Philox
    call serves) and past 2**32 and 2**62, sizes around the quad and the block, forward and backward."""
    # eps is a float32 draw for every dtype (float64 inputs: float64 std and product); bf16 rounds once
    # more (the interpreter's float32 -> bf16 conversion truncates: up to one bf16 ulp)
    tol = 2**-7 if dtype == torch.bfloat16 else 2e-6
    for offset in (0, 1, 2, 3, 5, 2**32 - 3, 2**62 + 1):
        for n in (1, 3, 4, 5, 127, 1029):  # 1029: across blocks of 256 and of 1024
            zero = torch.zeros(n, dtype=dtype)
            eps = reference.eps(11, (n,), offset)
            z = rp.reparameterize(zero, zero, 11, offset)
            assert np.allclose(to_np(z), eps, rtol=tol, atol=tol * 1e-2), (offset, n)
            dlv = rp.reparameterize_backward(torch.full((n,), 2.0, dtype=dtype), zero, 11, offset)
            assert np.allclose(to_np(dlv), eps, rtol=tol, atol=tol * 1e-2), (offset, n)


def test_reparameterize_deterministic_and_empty():
    mu, lv = _rep_inputs((127, 20))
    assert torch.equal(rp.reparameterize(mu, lv, 3, 0), rp.reparameterize(mu, lv, 3, 0))
    assert not torch.equal(rp.reparameterize(mu, lv, 3, 0), rp.reparameterize(mu, lv, 4, 0))
    assert rp.reparameterize(torch.empty(0, 20), torch.empty(0, 20), 3, 0).shape == (0, 20)
