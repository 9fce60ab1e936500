"""The Triton launchers against the float64 reference, called directly through the backend contract.

``fastvae.kernels.fused_loss`` (``fused_loss``, ``scale_grads_``) and ``fastvae.kernels.reparameterize``
(``reparameterize``, ``reparameterize_backward``), under the interpreter on CPU machines.  Shapes are
chosen so that every code path runs (tails, several rows a program, rows split into chunks, the
last-program finish) while the file stays fast under the interpreter.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import device_only_key, rel_err, to_np
from fastvae.kernels import fused_loss as fl
from fastvae.kernels import reparameterize as rp

from fastvae import reference
from fastvae.backend import RECON_BCE, RECON_MSE, RECON_NONE, RECONS, REDUCTIONS, LossProblem

TOL = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 2e-2, torch.float64: 1e-12}
NAMES = {v: k for k, v in RECONS.items()}
RED_NAMES = {v: k for k, v in REDUCTIONS.items()}


def _problem(B, F, D, recon, reduction, beta=0.7, need_grad=True, dtype=torch.float32) -> LossProblem:
    grad_scale = 1.0 / B if reduction == REDUCTIONS["mean"] and B else 1.0
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return LossProblem(B, F, D, recon, reduction, beta, grad_scale, need_grad, acc)


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


def _expected(p: LossProblem, x, t, mu, lv):
    """(loss, recon, kl, dlogits, dmu, dlogvar) from fastvae.reference, float64."""
    red = RED_NAMES[p.reduction]
    recon = kl = 0.0
    dx = dmu = dlv = None
    if p.F:
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
    return np.asarray(recon + p.beta * kl), np.asarray(recon), np.asarray(kl), dx, dmu, dlv


def _check(p, x, t, mu, lv, tol):
    out = fl.fused_loss(p, x, t, mu, lv)
    exp = _expected(p, x, t, mu, lv)
    shape = (p.B,) if p.reduction == REDUCTIONS["none"] else ()
    for name, a, e in zip(("loss", "recon", "kl"), out[:3], exp[:3], strict=True):
        assert a.shape == shape and a.dtype == p.acc, name
        assert rel_err(a, e) < tol, (name, rel_err(a, e))
    for name, a, e, src in zip(("dlogits", "dmu", "dlogvar"), out[3:], exp[3:], (x, mu, lv), strict=True):
        if e is None or not p.need_grad:
            assert a.numel() == 0, name
            continue
        assert a.shape == src.shape and a.dtype == src.dtype and a.is_contiguous(), name
        assert rel_err(a, e) < tol, (name, rel_err(a, e))
    assert len({id(o) for o in out}) == 6
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


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_split_rows(poison, reduction):
    """Few long rows: each row is cut into chunks (several programs a row) and finished in one launch."""
    B, F, D = 2, 9000, 20  # 9000 = 8 * 1024 + 808: chunks of whole tiles, the last with a tail
    cfg = fl.loss_config(B, F, D, 4)
    assert cfg[5] > 1  # n_split
    _check(_problem(B, F, D, RECON_BCE, REDUCTIONS[reduction]), *_inputs(B, F, D), TOL[torch.float32])
    B, D = 3, 8200  # KL-only rows split over the latent dims
    assert fl.loss_config(B, 0, D, 4)[5] > 1
    _check(_problem(B, 0, D, RECON_NONE, REDUCTIONS[reduction]), *_inputs(B, 0, D), TOL[torch.float32])


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
    loss, recon, kl, dx, dmu, dlv = fl.fused_loss(
        _problem(B, F, D, RECON_BCE, REDUCTIONS["none"]), x, t, mu, lv
    )
    assert torch.isnan(recon[1]) and not torch.isnan(recon[0]) and torch.isnan(kl[2])
    assert torch.isnan(dx[1, 5]) and torch.isnan(dx).sum() == 1 and torch.isnan(dlv).sum() == 1
    loss = fl.fused_loss(_problem(B, F, D, RECON_BCE, REDUCTIONS["sum"]), x, t, mu, lv)[0]
    assert torch.isnan(loss)


def test_empty_batch():
    p = _problem(0, 784, 20, RECON_BCE, REDUCTIONS["mean"])
    loss, recon, kl, dx, dmu, dlv = fl.fused_loss(p, *_inputs(0, 784, 20))
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


@pytest.mark.parametrize("per_row", [False, True])
def test_scale_grads(poison, per_row):
    B, F, D = 13, 784, 20
    p = _problem(B, F, D, RECON_BCE, REDUCTIONS["none" if per_row else "sum"])
    x, t, mu, lv = _inputs(B, F, D)
    _, _, _, dx, dmu, dlv = fl.fused_loss(p, x, t, mu, lv)
    before = [g.clone() for g in (dx, dmu, dlv)]
    if per_row:
        g = torch.linspace(-2.0, 3.0, B)
        g[::3] = 1.0  # rows left untouched
    else:
        g = torch.tensor(-0.75)
    fl.scale_grads_(g, dx, dmu, dlv)
    col = g.reshape(-1, 1).double()
    for a, b in zip((dx, dmu, dlv), before, strict=True):
        assert rel_err(a, to_np(b) * to_np(col)) < 1e-6
        if per_row:
            assert torch.equal(a[::3], b[::3])


def test_scale_grads_expanded_and_one(poison):
    """An expanded (stride-0) per-row gradient needs no copy; g == 1 everywhere leaves every bit alone."""
    B, F, D = 3, 784, 20
    _, _, _, dx, dmu, dlv = fl.fused_loss(_problem(B, F, D, RECON_BCE, REDUCTIONS["none"]), *_inputs(B, F, D))
    before = [g.clone() for g in (dx, dmu, dlv)]
    fl.scale_grads_(torch.tensor(1.0).expand(B), dx, dmu, dlv)
    assert all(torch.equal(a, b) for a, b in zip((dx, dmu, dlv), before, strict=True))
    fl.scale_grads_(torch.tensor(2.0).expand(B), dx, dmu, dlv)
    assert all(torch.equal(a, 2 * b) for a, b in zip((dx, dmu, dlv), before, strict=True))
    empty = torch.empty(0)
    fl.scale_grads_(torch.tensor(3.0), dx, empty, empty.clone())  # KL gradients absent
    assert torch.equal(dx, 6 * before[0])


# ----------------------------------------------------------------------------------------------
# reparameterize
# ----------------------------------------------------------------------------------------------


def _rep_inputs(shape, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype), (torch.randn(shape, generator=g) * 0.5).to(dtype)


@pytest.mark.parametrize("shape", [(1, 1), (3, 20), (127, 129), (1000, 7)])
@pytest.mark.parametrize("offset", [0, 12345])
def test_reparameterize(poison, shape, offset):
    mu, lv = _rep_inputs(shape)
    seed = 2024
    z = rp.reparameterize(mu, lv, seed, offset)
    assert z.shape == mu.shape and z.dtype == mu.dtype and z.is_contiguous()
    assert rel_err(z, reference.reparameterize(to_np(mu), to_np(lv), seed, offset)) < 1e-5
    dz = torch.randn(shape)
    dlv = rp.reparameterize_backward(dz, lv, seed, offset)
    assert rel_err(dlv, reference.reparameterize_backward(to_np(dz), to_np(lv), seed, offset)[1]) < 1e-5


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


def test_reparameterize_deterministic_and_empty():
    mu, lv = _rep_inputs((127, 20))
    assert torch.equal(rp.reparameterize(mu, lv, 3, 0), rp.reparameterize(mu, lv, 3, 0))
    assert not torch.equal(rp.reparameterize(mu, lv, 3, 0), rp.reparameterize(mu, lv, 4, 0))
    assert rp.reparameterize(torch.empty(0, 20), torch.empty(0, 20), 3, 0).shape == (0, 20)
