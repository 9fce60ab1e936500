"""The Numba CPU backend's vectorized float32 loss kernel against the float64 reference.

Covers the formulation in ``kernels/numba_cpu.py`` (polynomial exp / log1p, chunked float32 row sums,
float64 KL): awkward feature counts around the vector and chunk widths, fp32 and fp64, float and
uint8 targets, BCE and MSE, every reduction, extreme logits and log-variances, outputs that start
as NaN, the no-grad path, and bit-for-bit determinism across runs and thread counts.
"""

from __future__ import annotations

import itertools
import zlib

import numba
import numpy as np
import pytest
import torch
from conftest import rel_err, to_np
from fastvae.kernels import numba_cpu

import fastvae
from fastvae import reference as ref

BATCHES = (1, 3, 127)
FEATURES = (1, 7, 63, 64, 65, 784, 1025)
LATENT = 5
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


@pytest.fixture
def numba_backend():
    with fastvae.use_backend("numba"):
        yield


@pytest.fixture
def nan_buffers(monkeypatch):
    """Every buffer the launcher allocates (torch.empty, np.empty) starts as NaN: unwritten outputs show."""
    empty, np_empty = torch.empty, np.empty

    def t_empty(*a, **k):
        out = empty(*a, **k)
        return out.fill_(float("nan")) if out.is_floating_point() else out.fill_(0xAB)

    def n_empty(*a, **k):
        out = np_empty(*a, **k)
        out[...] = np.nan if np.issubdtype(out.dtype, np.floating) else 0xAB
        return out

    monkeypatch.setattr(torch, "empty", t_empty)
    monkeypatch.setattr(np, "empty", n_empty)
    yield


def make_inputs(g, B, F, dtype, target, scale=3.0):
    x = (torch.randn(B, F, generator=g, dtype=torch.float64) * scale).to(dtype)
    if target == "uint8":
        t = torch.randint(0, 256, (B, F), generator=g, dtype=torch.uint8)
    else:
        t = torch.rand(B, F, generator=g, dtype=torch.float64).to(dtype)
    mu = torch.randn(B, LATENT, generator=g, dtype=torch.float64).to(dtype)
    lv = (torch.randn(B, LATENT, generator=g, dtype=torch.float64) * 2).to(dtype)
    return x, t, mu, lv


def loss_and_grads(x, t, mu, lv, **kw):
    x, mu, lv = (a.clone().requires_grad_() for a in (x, mu, lv))
    loss = fastvae.vae_loss(x, t, mu, lv, **kw)
    loss.sum().backward()  # reduction "none": an incoming gradient of ones
    return loss.detach(), x.grad, mu.grad, lv.grad


def reference(x, t, mu, lv, beta=1.0, reduction="sum", recon="bce"):
    args = (to_np(x), to_np(t), to_np(mu), to_np(lv), beta, reduction, recon)
    grad = np.ones(x.shape[0]) if reduction == "none" else 1.0
    return ref.vae_loss(*args), ref.vae_loss_backward(*args, grad=grad)


def assert_close(got, want, tol, what):
    loss, dx, dmu, dlv = got
    want_loss, (want_dx, want_dmu, want_dlv) = want
    errs = {
        "loss": rel_err(loss, np.asarray(want_loss)),
        "dlogits": rel_err(dx, want_dx),
        "dmu": rel_err(dmu, want_dmu),
        "dlogvar": rel_err(dlv, want_dlv),
    }
    bad = {k: v for k, v in errs.items() if not v < tol}
    assert not bad, f"{what}: relative errors above {tol}: {bad}"


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("recon", ["bce", "mse"])
@pytest.mark.parametrize("target", ["float", "uint8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_matches_reference(numba_backend, nan_buffers, dtype, target, recon, reduction):
    g = torch.Generator().manual_seed(zlib.crc32(f"{dtype}{target}{recon}{reduction}".encode()))
    for B, F in itertools.product(BATCHES, FEATURES):
        x, t, mu, lv = make_inputs(g, B, F, dtype, target)
        got = loss_and_grads(x, t, mu, lv, beta=0.7, reduction=reduction, recon=recon)
        assert got[0].dtype == dtype
        assert_close(got, reference(x, t, mu, lv, 0.7, reduction, recon), TOL[dtype], f"B={B} F={F}")


def test_large_batch_fp32(numba_backend, nan_buffers):
    """The benchmark shape, float and uint8 targets: the sum over 3.2M elements stays within 1e-5."""
    g = torch.Generator().manual_seed(1)
    for target in ("float", "uint8"):
        x, t, mu, lv = make_inputs(g, 4096, 784, torch.float32, target)
        mu, lv = torch.randn(4096, 20, generator=g), torch.randn(4096, 20, generator=g)
        assert_close(loss_and_grads(x, t, mu, lv), reference(x, t, mu, lv), 1e-5, target)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_extreme_logits_and_logvar(numba_backend, nan_buffers, dtype):
    x = torch.tensor([[100.0, -100.0, 100.0, -100.0, 88.0, -88.0, 104.0, -104.0, 0.0, 1e-30]], dtype=dtype)
    t = torch.tensor([[1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.5, 0.5]], dtype=dtype)
    mu = torch.tensor([[0.0, 3.0, -3.0, 0.0]], dtype=dtype)
    lv = torch.tensor([[30.0, -30.0, 1e-3, -1e-3]], dtype=dtype)
    got = loss_and_grads(x, t, mu, lv, reduction="none")
    for v in got:
        assert torch.isfinite(v).all()
    assert_close(got, reference(x, t, mu, lv, reduction="none"), TOL[dtype], "extremes")

    # Element by element (one feature per row), the famous cases are exact.
    xs, ts = x.reshape(-1, 1), t.reshape(-1, 1)
    with torch.no_grad():
        per_row = fastvae.bce_with_logits(xs, ts, reduction="none")
    xg = xs.clone().requires_grad_()
    fastvae.bce_with_logits(xg, ts, reduction="sum").backward()
    assert 0.0 <= per_row[0] < 1e-40 and xg.grad[0, 0] == 0.0  # x = 100, t = 1
    assert per_row[1] == 100.0 and xg.grad[1, 0] == -1.0  # x = -100, t = 1
    assert per_row[2] == 100.0 and xg.grad[2, 0] == 1.0  # x = 100, t = 0
    assert 0.0 <= per_row[3] < 1e-40 and 0.0 <= xg.grad[3, 0] < 1e-40  # x = -100, t = 0
    assert per_row[8] == pytest.approx(np.log(2.0), rel=3e-7) and xg.grad[8, 0] == 0.0  # x = 0, t = 1/2
    want = ref.bce_with_logits(to_np(xs), to_np(ts), "none")
    np.testing.assert_allclose(to_np(per_row), want, rtol=1e-6, atol=1e-40)


def test_logit_sweep_elementwise(numba_backend):
    """Every float32 logit regime, one element per row: the loss within a few ulp of the reference."""
    x = torch.linspace(-110.0, 110.0, 44001).reshape(-1, 1)
    for tv in (0.0, 0.25, 1.0):
        t = torch.full_like(x, tv)
        xg = x.clone().requires_grad_()
        per_row = fastvae.bce_with_logits(xg, t, reduction="none")
        per_row.sum().backward()
        want = ref.bce_with_logits(to_np(x), to_np(t), "none")
        want_grad = ref.bce_with_logits_backward(to_np(x), to_np(t), "sum")
        np.testing.assert_allclose(to_np(per_row), want, rtol=1e-6, atol=1e-42)
        np.testing.assert_allclose(to_np(xg.grad), want_grad, rtol=1e-6, atol=3e-7)


def test_no_grad_and_single_terms(numba_backend, nan_buffers):
    g = torch.Generator().manual_seed(2)
    x, t, mu, lv = make_inputs(g, 127, 65, torch.float32, "uint8")
    with torch.no_grad():
        loss = fastvae.vae_loss(x, t, mu, lv, reduction="mean")
        bce = fastvae.bce_with_logits(x, t, reduction="none")
        kl = fastvae.kl_divergence(mu, lv, reduction="sum")
    args = (to_np(x), to_np(t), to_np(mu), to_np(lv))
    assert rel_err(loss, np.asarray(ref.vae_loss(*args, 1.0, "mean"))) < 1e-5
    assert rel_err(bce, ref.bce_with_logits(args[0], args[1], "none")) < 1e-5
    assert rel_err(kl, np.asarray(ref.kl_divergence(args[2], args[3], "sum"))) < 1e-6


def test_half_precision_and_strided_logits(numba_backend, nan_buffers):
    g = torch.Generator().manual_seed(3)
    x, t, mu, lv = make_inputs(g, 127, 784, torch.float32, "float")
    for dtype in (torch.float16, torch.bfloat16):
        xh, th, muh, lvh = (a.to(dtype) for a in (x, t, mu, lv))
        got = loss_and_grads(xh, th, muh, lvh)
        assert got[1].dtype == dtype
        assert_close(got, reference(xh, th, muh, lvh), 2e-2, str(dtype))
    # Row-strided views (rows contiguous, padded): the kernel reads them in place.
    wide = (torch.randn(127, 1000, generator=g) * 3).requires_grad_()
    t_wide = torch.rand(127, 900, generator=g)
    mu_wide = torch.randn(127, 2 * LATENT, generator=g).requires_grad_()
    xs, ts, mus = wide[:, 100:884], t_wide[:, 50:834], mu_wide[:, LATENT:]
    assert xs.stride() == (1000, 1) and ts.stride() == (900, 1) and mus.stride() == (2 * LATENT, 1)
    loss = fastvae.vae_loss(xs, ts, mus, lv, reduction="none")
    loss.sum().backward()
    got = (loss.detach(), wide.grad[:, 100:884], mu_wide.grad[:, LATENT:], None)
    want_loss, (want_dx, want_dmu, _) = reference(xs, ts, mus, lv, reduction="none")
    assert rel_err(got[0], want_loss) < 1e-5
    assert rel_err(got[1], want_dx) < 1e-5 and rel_err(got[2], want_dmu) < 1e-5
    assert not wide.grad[:, :100].any() and not wide.grad[:, 884:].any()
    # A batch-broadcast target (row stride 0) is read in place too.
    t_row = torch.rand(1, 784, generator=g).expand(127, 784)
    assert t_row.stride() == (0, 1)
    assert_close(loss_and_grads(x, t_row, mu, lv), reference(x, t_row, mu, lv), 1e-5, "broadcast target")


def test_incoming_gradient_scales(numba_backend, nan_buffers):
    g = torch.Generator().manual_seed(4)
    x, t, mu, lv = make_inputs(g, 127, 63, torch.float32, "float")
    xg, mug, lvg = (a.clone().requires_grad_() for a in (x, mu, lv))
    w = torch.rand(127, generator=g)
    (fastvae.vae_loss(xg, t, mug, lvg, reduction="none") * w).sum().backward()
    args = (to_np(x), to_np(t), to_np(mu), to_np(lv), 1.0, "none", "bce")
    wants = ref.vae_loss_backward(*args, grad=w.double().numpy())
    for got, want in zip((xg.grad, mug.grad, lvg.grad), wants, strict=True):
        assert rel_err(got, want) < 1e-5
    xg.grad = None
    (3.0 * fastvae.bce_with_logits(xg, t)).backward()
    assert rel_err(xg.grad, 3.0 * ref.bce_with_logits_backward(args[0], args[1], "sum")) < 1e-5


def test_nan_propagates(numba_backend):
    x = torch.tensor([[float("nan"), 1.0], [0.5, 1.0]]).requires_grad_()
    loss = fastvae.bce_with_logits(x, torch.full((2, 2), 0.5), reduction="none", validate=False)
    loss.sum().backward()
    assert torch.isnan(loss[0]) and torch.isfinite(loss[1])
    assert torch.isnan(x.grad[0, 0]) and torch.isfinite(x.grad[0, 1]) and torch.isfinite(x.grad[1]).all()


def test_deterministic_across_runs_and_threads(numba_backend):
    g = torch.Generator().manual_seed(5)
    x, t, mu, lv = make_inputs(g, 1000, 1025, torch.float32, "float")
    runs = []
    threads = numba.get_num_threads()
    try:
        for n in (threads, 1, threads):
            numba.set_num_threads(n)
            runs.append(numba_cpu.fused_loss(x, t, mu, lv, 1.0, "sum", "bce", True))
    finally:
        numba.set_num_threads(threads)
    for other in runs[1:]:
        for a, b in zip(runs[0], other, strict=True):
            assert torch.equal(a, b), "results differ between runs or thread counts"
