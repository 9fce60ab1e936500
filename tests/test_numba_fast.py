"""The Numba CPU backend's loss kernels (``fused_loss``, ``scale_grads_``) against the float64 reference.

Called directly through the backend contract (:class:`fastvae.backend.Backend`): awkward feature
counts around the vector and chunk widths, fp32 and fp64, float and uint8 targets, BCE, MSE and KL
alone, every reduction, extreme logits and log-variances, strided and batch-broadcast rows, outputs
that start as NaN, the no-grad path, and bit-for-bit determinism across runs, thread counts and the
serial / parallel kernels.
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

from fastvae import reference as ref
from fastvae.backend import RECONS, REDUCTIONS, LossProblem

BATCHES = (1, 3, 127)
FEATURES = (1, 7, 63, 64, 65, 784, 1025)
LATENT = 5
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def problem(x, mu, beta=1.0, reduction="sum", recon="bce", need_grad=True) -> LossProblem:
    """The LossProblem fastvae.ops resolves for these operands (x or mu may be None)."""
    first = x if x is not None else mu
    B = first.shape[0]
    return LossProblem(
        B=B,
        F=x.shape[1] if x is not None else 0,
        D=mu.shape[1] if mu is not None else 0,
        recon=RECONS[recon] if x is not None else RECONS["none"],
        reduction=REDUCTIONS[reduction],
        beta=float(beta),
        grad_scale=1.0 / B if reduction == "mean" else 1.0,
        need_grad=need_grad,
        acc=torch.float64 if first.dtype == torch.float64 else torch.float32,
    )


def run(x, t, mu, lv, beta=1.0, reduction="sum", recon="bce", need_grad=True):
    """The launcher's (loss, dlogits, dmu, dlogvar): for reduction none, the gradients of loss.sum()."""
    out = numba_cpu.fused_loss(problem(x, mu, beta, reduction, recon, need_grad), x, t, mu, lv)
    loss, rec, kl = out[:3]
    assert rel_err(loss, to_np(rec) + beta * to_np(kl)) < 1e-6
    assert out[6].numel() == 0  # no log_scale gradient outside the Gaussian
    return (loss, *out[3:6])


def make_inputs(g, B, F, dtype, target, scale=3.0):
    x = (torch.randn(B, F, generator=g, dtype=torch.float64) * scale).to(dtype)
    if target == "uint8":
        t = torch.randint(0, 256, (B, F), generator=g, dtype=torch.uint8)
    else:
        t = torch.rand(B, F, generator=g, dtype=torch.float64).to(dtype)
    mu = torch.randn(B, LATENT, generator=g, dtype=torch.float64).to(dtype)
    lv = (torch.randn(B, LATENT, generator=g, dtype=torch.float64) * 2).to(dtype)
    return x, t, mu, lv


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
def test_matches_reference(poison, dtype, target, recon, reduction):
    g = torch.Generator().manual_seed(zlib.crc32(f"{dtype}{target}{recon}{reduction}".encode()))
    for B, F in itertools.product(BATCHES, FEATURES):
        x, t, mu, lv = make_inputs(g, B, F, dtype, target)
        got = run(x, t, mu, lv, beta=0.7, reduction=reduction, recon=recon)
        assert got[0].dtype == dtype and got[0].shape == ((B,) if reduction == "none" else ())
        assert all(d.dtype == dtype and d.is_contiguous() for d in got[1:])
        assert_close(got, reference(x, t, mu, lv, 0.7, reduction, recon), TOL[dtype], f"B={B} F={F}")


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_single_terms(poison, dtype, reduction):
    """KL alone (contiguous: the flat pass; row-strided: the row kernel) and a reconstruction alone."""
    g = torch.Generator().manual_seed(6)
    x, t, mu, lv = make_inputs(g, 127, 65, dtype, "uint8")
    grad = np.ones(127) if reduction == "none" else 1.0
    wide = torch.randn(127, 3 * LATENT, generator=g, dtype=dtype)
    for m, v in ((mu, lv), (wide[:, :LATENT], wide[:, 2 * LATENT :])):
        p = problem(None, m, 0.7, reduction)
        loss, rec, kl, dx, dmu, dlv, _ = numba_cpu.fused_loss(p, None, None, m, v)
        want = 0.7 * np.asarray(ref.kl_divergence(to_np(m), to_np(v), reduction))
        want_dmu, want_dlv = ref.kl_divergence_backward(to_np(m), to_np(v), reduction, grad)
        assert rel_err(loss, want) < TOL[dtype] and not rec.any() and dx.numel() == 0
        assert rel_err(dmu, 0.7 * want_dmu) < TOL[dtype] and rel_err(dlv, 0.7 * want_dlv) < TOL[dtype]
    for recon in ("bce", "mse"):
        loss, rec, kl, dx, dmu, dlv, _ = numba_cpu.fused_loss(
            problem(x, None, 1.0, reduction, recon), x, t, None, None
        )
        fwd, bwd = (
            (ref.bce_with_logits, ref.bce_with_logits_backward)
            if recon == "bce"
            else (ref.mse, ref.mse_backward)
        )
        assert rel_err(loss, np.asarray(fwd(to_np(x), to_np(t), reduction))) < TOL[dtype]
        assert rel_err(dx, bwd(to_np(x), to_np(t), reduction, grad)) < TOL[dtype]
        assert not kl.any() and dmu.numel() == 0 and dlv.numel() == 0


def test_large_batch_fp32(poison):
    """The benchmark shape (parallel rows), float and uint8 targets: a sum of 3.2M elements within 1e-5."""
    g = torch.Generator().manual_seed(1)
    for target in ("float", "uint8"):
        x, t, mu, lv = make_inputs(g, 4096, 784, torch.float32, target)
        mu, lv = torch.randn(4096, 20, generator=g), torch.randn(4096, 20, generator=g)
        assert_close(run(x, t, mu, lv), reference(x, t, mu, lv), 1e-5, target)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_extreme_logits_and_logvar(poison, dtype):
    x = torch.tensor([[100.0, -100.0, 100.0, -100.0, 88.0, -88.0, 104.0, -104.0, 0.0, 1e-30]], dtype=dtype)
    t = torch.tensor([[1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.5, 0.5]], dtype=dtype)
    mu = torch.tensor([[0.0, 3.0, -3.0, 0.0]], dtype=dtype)
    lv = torch.tensor([[30.0, -30.0, 1e-3, -1e-3]], dtype=dtype)
    got = run(x, t, mu, lv, reduction="none")
    for v in got:
        assert torch.isfinite(v).all()
    assert_close(got, reference(x, t, mu, lv, reduction="none"), TOL[dtype], "extremes")

    # Element by element (one feature per row), the famous cases are exact.
    xs, ts = x.reshape(-1, 1), t.reshape(-1, 1)
    per_row, _, _, dx, _, _, _ = numba_cpu.fused_loss(problem(xs, None, reduction="none"), xs, ts, None, None)
    assert 0.0 <= per_row[0] < 1e-40 and dx[0, 0] == 0.0  # x = 100, t = 1
    assert per_row[1] == 100.0 and dx[1, 0] == -1.0  # x = -100, t = 1
    assert per_row[2] == 100.0 and dx[2, 0] == 1.0  # x = 100, t = 0
    assert 0.0 <= per_row[3] < 1e-40 and 0.0 <= dx[3, 0] < 1e-40  # x = -100, t = 0
    assert per_row[8] == pytest.approx(np.log(2.0), rel=3e-7) and dx[8, 0] == 0.0  # x = 0, t = 1/2
    want = ref.bce_with_logits(to_np(xs), to_np(ts), "none")
    np.testing.assert_allclose(to_np(per_row), want, rtol=1e-6, atol=1e-40)


def test_logit_sweep_elementwise():
    """Every float32 logit regime, one element per row: the loss within a few ulp of the reference."""
    x = torch.linspace(-110.0, 110.0, 44001).reshape(-1, 1)
    for tv in (0.0, 0.25, 1.0):
        t = torch.full_like(x, tv)
        per_row, _, _, dx, _, _, _ = numba_cpu.fused_loss(
            problem(x, None, reduction="none"), x, t, None, None
        )
        want = ref.bce_with_logits(to_np(x), to_np(t), "none")
        want_grad = ref.bce_with_logits_backward(to_np(x), to_np(t), "sum")
        np.testing.assert_allclose(to_np(per_row), want, rtol=1e-6, atol=1e-42)
        np.testing.assert_allclose(to_np(dx), want_grad, rtol=1e-6, atol=3e-7)


def test_no_grad(poison):
    g = torch.Generator().manual_seed(2)
    x, t, mu, lv = make_inputs(g, 127, 65, torch.float32, "uint8")
    out = numba_cpu.fused_loss(problem(x, mu, 0.5, "mean", need_grad=False), x, t, mu, lv)
    args = (to_np(x), to_np(t), to_np(mu), to_np(lv))
    assert rel_err(out[0], np.asarray(ref.vae_loss(*args, 0.5, "mean"))) < 1e-5
    assert rel_err(out[2], np.asarray(ref.kl_divergence(args[2], args[3], "mean"))) < 1e-6
    assert all(d.numel() == 0 for d in out[3:])


def test_half_precision_and_strided_rows(poison):
    g = torch.Generator().manual_seed(3)
    x, t, mu, lv = make_inputs(g, 127, 784, torch.float32, "float")
    for dtype in (torch.float16, torch.bfloat16):
        xh, th, muh, lvh = (a.to(dtype) for a in (x, t, mu, lv))
        got = run(xh, th, muh, lvh)
        assert got[0].dtype == torch.float32 and all(d.dtype == dtype for d in got[1:])
        assert_close(got, reference(xh, th, muh, lvh), 2e-2, str(dtype))
        got = run(xh, (t * 255).round().to(torch.uint8), muh, lvh, reduction="none")
        assert_close(
            got, reference(xh, (t * 255).round().to(torch.uint8), muh, lvh, reduction="none"), 2e-2, "u8"
        )
    # Row-strided views (rows contiguous, padded): the kernel reads them in place.
    wide = torch.randn(127, 1000, generator=g) * 3
    t_wide = torch.rand(127, 900, generator=g)
    mu_wide = torch.randn(127, 2 * LATENT, generator=g)
    xs, ts, mus = wide[:, 100:884], t_wide[:, 50:834], mu_wide[:, LATENT:]
    assert xs.stride() == (1000, 1) and ts.stride() == (900, 1) and mus.stride() == (2 * LATENT, 1)
    for reduction in ("none", "mean"):
        assert_close(
            run(xs, ts, mus, lv, reduction=reduction),
            reference(xs, ts, mus, lv, reduction=reduction),
            1e-5,
            "strided",
        )
    # A batch-broadcast target (row stride 0) is read in place too.
    t_row = torch.rand(1, 784, generator=g).expand(127, 784)
    assert t_row.stride() == (0, 1)
    assert_close(run(x, t_row, mu, lv), reference(x, t_row, mu, lv), 1e-5, "broadcast target")
    u8_row = torch.randint(0, 256, (1, 784), generator=g, dtype=torch.uint8).expand(127, 784)
    assert_close(run(x, u8_row, mu, lv), reference(x, u8_row, mu, lv), 1e-5, "broadcast uint8 target")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16], ids=["fp32", "fp64", "fp16"])
def test_scale_grads(dtype):
    g = torch.Generator().manual_seed(4)
    x, t, mu, lv = make_inputs(g, 127, 63, dtype, "float")
    grads = run(x, t, mu, lv, reduction="none")[1:]
    w = torch.rand(127, generator=g, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    w[5] = 1.0
    scaled = [d.clone() for d in grads]
    numba_cpu.scale_grads_(w, *scaled)
    wants = ref.vae_loss_backward(to_np(x), to_np(t), to_np(mu), to_np(lv), 1.0, "none", "bce", grad=to_np(w))
    for got, before, want in zip(scaled, grads, wants, strict=True):
        assert rel_err(got, want) < (TOL[dtype] if dtype in TOL else 2e-2)
        assert torch.equal(got[5], before[5])
    # An expanded incoming gradient (loss.sum().backward() of reduction none), a 0-d one, and 1.
    scaled = [d.clone() for d in grads]
    numba_cpu.scale_grads_(torch.tensor(3.0, dtype=w.dtype).expand(127), *scaled)
    numba_cpu.scale_grads_(torch.tensor(0.5, dtype=w.dtype), *scaled)
    numba_cpu.scale_grads_(torch.tensor(1.0, dtype=w.dtype), *scaled)
    for got, before in zip(scaled, grads, strict=True):
        assert rel_err(got, 1.5 * to_np(before)) < (1e-3 if dtype == torch.float16 else 1e-6)
    # Only some gradients present (KL alone, reconstruction alone).
    empty = torch.empty(0, dtype=dtype)
    dx = grads[0].clone()
    numba_cpu.scale_grads_(torch.tensor(2.0), dx, empty, empty)
    dmu, dlv = grads[1].clone(), grads[2].clone()
    numba_cpu.scale_grads_(torch.tensor(2.0), empty, dmu, dlv)
    for got, before in zip((dx, dmu, dlv), grads, strict=True):
        assert torch.equal(got, 2 * before)


def test_nan_propagates():
    x = torch.tensor([[float("nan"), 1.0], [0.5, 1.0]])
    loss, _, _, dx, _, _, _ = numba_cpu.fused_loss(
        problem(x, None, reduction="none"), x, torch.full((2, 2), 0.5), None, None
    )
    assert torch.isnan(loss[0]) and torch.isfinite(loss[1])
    assert torch.isnan(dx[0, 0]) and torch.isfinite(dx[0, 1]) and torch.isfinite(dx[1]).all()


def test_deterministic_across_runs_threads_and_kernels(monkeypatch):
    g = torch.Generator().manual_seed(5)
    x, t, mu, lv = make_inputs(g, 1000, 1025, torch.float32, "float")
    assert 1000 * (1025 + 8 * LATENT) >= numba_cpu._PARALLEL_MIN_WORK  # the parallel kernel
    p = problem(x, mu)
    runs = []
    threads = numba.get_num_threads()
    try:
        for n in (threads, 1, threads):
            numba.set_num_threads(n)
            runs.append(numba_cpu.fused_loss(p, x, t, mu, lv))
    finally:
        numba.set_num_threads(threads)
    monkeypatch.setattr(numba_cpu, "_PARALLEL_MIN_WORK", 1 << 62)  # the serial kernel
    runs.append(numba_cpu.fused_loss(p, x, t, mu, lv))
    for other in runs[1:]:
        for a, b in zip(runs[0], other, strict=True):
            assert torch.equal(a, b), "results differ between runs, thread counts or kernels"


def test_bad_rows_raise():
    x = torch.randn(4, 6)
    p = problem(x, None)
    with pytest.raises(ValueError, match="logits"):
        numba_cpu.fused_loss(p, x.t(), torch.rand(6, 4).t(), None, None)
