"""Gaussian and continuous-Bernoulli likelihoods and the KL against a Gaussian prior (issue 11).

1. ``fastvae.reference`` itself against independent formulas: mpmath (50 digits) for the
   continuous-Bernoulli log-normalizer and its derivative, ``torch.distributions`` (Normal,
   ContinuousBernoulli, kl_divergence) in float64 with torch autograd for every gradient.
2. The Numba and torch (composite) backends' ``fused_loss`` against the reference at awkward sizes,
   every reduction, float and uint8 targets, fp32 and fp64, outputs that start as NaN; continuous
   Bernoulli logits at and near 0 and far out; Gaussian log-scales of 1 and F elements at -3, 0 and 2.
3. ``composite.loss_terms`` (gradgradcheck in float64, torch.func.grad and vmap over it) and
   ``composite.loss_gradients`` (equal to the autograd gradient of ``loss_terms``, and itself
   differentiable: gradcheck).
"""

from __future__ import annotations

import itertools
import zlib

import mpmath
import numpy as np
import pytest
import torch
from conftest import rel_err, to_np
from fastvae.kernels import composite, numba_cpu

from fastvae import reference as ref
from fastvae.backend import RECON_CB, RECON_GAUSSIAN, RECONS, REDUCTIONS, LossProblem

BATCHES = (1, 3, 127)
FEATURES = (1, 7, 784, 1025)
LATENT = 5
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}
BACKENDS = {"numba": numba_cpu, "torch": composite}
CB_LOGITS = (0.0, 1e-4, -1e-4, 0.5, -0.5, 30.0, -30.0)
LOG_SCALES = (-3.0, 0.0, 2.0)


# ----------------------------------------------------------------------------------------------
# 1. The reference against independent formulas
# ----------------------------------------------------------------------------------------------


def _mp_log_c(x: float) -> mpmath.mpf:
    x = mpmath.mpf(x)
    return mpmath.log(2) if x == 0 else mpmath.log(x / mpmath.tanh(x / 2))


@pytest.mark.parametrize(
    "x", [0.0, 1e-12, 1e-4, -1e-4, 0.1, 0.2499, 0.25, -0.2501, 0.5, -1.0, 1.0, 3.0, 30.0, -30.0, 700.0]
)
def test_reference_cb_log_norm_matches_mpmath(x):
    """log C(x) = log(x / tanh(x / 2)) and d/dx = 1/x - 1/sinh(x), to float64 rounding (50-digit mpmath,
    the derivative by mpmath's numerical differentiation of log C itself)."""
    with mpmath.workdps(50):
        want = _mp_log_c(x)
        want_d = mpmath.diff(_mp_log_c, x) if x != 0 else mpmath.mpf(0)
        assert abs(ref.cb_log_norm(np.array([x]))[0] - want) <= 1e-15 * abs(want)
        assert abs(ref.cb_log_norm_grad(np.array([x]))[0] - want_d) <= 1e-14 * abs(want_d) + 1e-300


def test_reference_cb_matches_torch_distribution_and_mpmath():
    """The continuous-Bernoulli NLL is -ContinuousBernoulli(logits=x).log_prob(t) (torch's own
    implementation, probs-based, so checked where it is accurate: |x| in [0.05, 10]); the gradients are
    mpmath's derivatives of the per-element loss."""
    g = np.random.default_rng(0)
    x = g.uniform(0.05, 10.0, (4, 6)) * g.choice([-1.0, 1.0], (4, 6))
    t = g.uniform(0.0, 1.0, (4, 6))
    xt, tt = torch.tensor(x), torch.tensor(t)
    want = -torch.distributions.ContinuousBernoulli(logits=xt).log_prob(tt).sum(1).numpy()
    np.testing.assert_allclose(ref.continuous_bernoulli(x, t, "none"), want, rtol=1e-12)
    x = np.array([[0.0, 1e-4, -1e-4, 0.5, -0.5, 30.0, -30.0, 0.25]])
    t = np.array([[0.5, 0.0, 1.0, 0.3, 0.9, 0.2, 1.0, 0.7]])
    dx, dt = ref.continuous_bernoulli_backward(x, t, "sum")
    with mpmath.workdps(40):
        for f in range(x.shape[1]):

            def nll(v, tv=float(t[0, f])):
                return mpmath.log1p(mpmath.exp(v)) - v * tv - _mp_log_c(v)

            assert abs(dx[0, f] - mpmath.diff(nll, x[0, f])) < 1e-15
    np.testing.assert_array_equal(dt, -x)
    with pytest.raises(ValueError, match=r"target must lie in \[0, 1\]"):
        ref.continuous_bernoulli(x, t + 0.5)


def _torch_gaussian(x, t, s):
    return -torch.distributions.Normal(x, torch.exp(s)).log_prob(t)


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("scale_shape", [(), (1,), (1, 1, 1), (2, 1, 1), (1, 3, 4), (2, 3, 4), (4,)])
def test_reference_gaussian_matches_torch(reduction, scale_shape):
    """Loss = -Normal(x, e^s).log_prob(t) summed per sample; every gradient equals torch autograd's,
    d/ds summed to log_scale's own (broadcast) shape."""
    g = torch.Generator().manual_seed(zlib.crc32(f"{reduction}{scale_shape}".encode()))
    x = torch.randn(3, 2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.rand(3, 2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    s = torch.randn(scale_shape, generator=g, dtype=torch.float64, requires_grad=True)
    rows = _torch_gaussian(x, t, s).reshape(3, -1).sum(1)
    want = {"sum": rows.sum(), "mean": rows.mean(), "none": rows}[reduction]
    w = torch.rand(3, generator=g, dtype=torch.float64) if reduction == "none" else torch.tensor(0.7)
    got = ref.gaussian_nll(x.detach().numpy(), t.detach().numpy(), s.detach().numpy(), reduction)
    np.testing.assert_allclose(got, want.detach().numpy(), rtol=1e-13)
    wx, wt, ws = torch.autograd.grad(want, (x, t, s), w.to(want.dtype).expand(want.shape))
    dx, dt, ds = ref.gaussian_nll_backward(*(a.detach().numpy() for a in (x, t, s)), reduction, w.numpy())
    assert ds.shape == tuple(scale_shape)
    for got, want in ((dx, wx), (dt, wt), (ds, ws)):
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-12, atol=1e-14)


def test_reference_gaussian_bad_log_scale():
    x = np.zeros((2, 3, 4))
    for bad in (np.zeros(3), np.zeros((2, 3, 4, 1)), np.zeros((2, 2, 3, 4))):
        with pytest.raises(
            ValueError, match=r"log_scale must be broadcastable to the per-sample shape \(3, 4\)"
        ):
            ref.gaussian_nll(x, x, bad)


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("prior_shape", [(1, 6), (6,), (4, 6), (1, 1)])
def test_reference_kl_prior_matches_torch(reduction, prior_shape):
    """KL(N(mu, e^lv) || N(pm, e^plv)) = torch.distributions.kl_divergence per element, summed per
    sample; the four gradients equal torch autograd's (the prior's summed to its shape)."""
    g = torch.Generator().manual_seed(zlib.crc32(f"{reduction}{prior_shape}".encode()))
    mu, lv = (torch.randn(4, 6, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    pm, plv = (
        torch.randn(prior_shape, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2)
    )
    N = torch.distributions.Normal
    per = torch.distributions.kl_divergence(N(mu, torch.exp(0.5 * lv)), N(pm, torch.exp(0.5 * plv)))
    rows = per.sum(1)
    want = {"sum": rows.sum(), "mean": rows.mean(), "none": rows}[reduction]
    np_args = [a.detach().numpy() for a in (mu, lv)]
    prior = {"prior_mu": pm.detach().numpy(), "prior_logvar": plv.detach().numpy()}
    np.testing.assert_allclose(
        ref.kl_divergence(*np_args, reduction, **prior), want.detach().numpy(), rtol=1e-13
    )
    w = torch.rand(want.shape, generator=g, dtype=torch.float64)
    wants = torch.autograd.grad(want, (mu, lv, pm, plv), w)
    grads = ref.kl_divergence_backward(*np_args, reduction, w.numpy(), **prior)
    assert len(grads) == 4
    for got, want in zip(grads, wants, strict=True):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-12, atol=1e-14)
    # The N(0, I) prior given explicitly is the default one.
    zeros = {"prior_mu": np.zeros(6), "prior_logvar": np.zeros(6)}
    np.testing.assert_allclose(
        ref.kl_divergence(*np_args, reduction, **zeros), ref.kl_divergence(*np_args, reduction), rtol=1e-14
    )
    assert len(ref.kl_divergence_backward(*np_args, reduction)) == 2


def test_reference_kl_prior_bad_input():
    mu = np.zeros((4, 6))
    with pytest.raises(ValueError, match="prior_mu and prior_logvar must be given together; prior_logvar"):
        ref.kl_divergence(mu, mu, prior_mu=np.zeros(6))
    with pytest.raises(ValueError, match=r"prior_logvar must be broadcastable to mu's shape \(4, 6\)"):
        ref.kl_divergence(mu, mu, prior_mu=np.zeros(6), prior_logvar=np.zeros(5))


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("recon", ["bce", "mse", "gaussian", "continuous_bernoulli", "none"])
def test_reference_vae_loss_matches_torch_autograd(recon, reduction):
    """vae_loss and vae_loss_gradients (every input: logits, target, log_scale, mu, logvar, the prior,
    beta) against torch float64 autograd of the same sum written with torch.distributions."""
    g = torch.Generator().manual_seed(zlib.crc32(f"{recon}{reduction}".encode()))
    B, F, D = 3, 7, 4

    def leaf(*shape, rand=False):
        draw = torch.rand if rand else torch.randn
        return draw(shape, generator=g, dtype=torch.float64).requires_grad_(True)

    x, t, s = leaf(B, F), leaf(B, F, rand=True), leaf(F)
    mu, lv, pm, plv, beta = leaf(B, D), leaf(B, D), leaf(D), leaf(D), leaf()
    N = torch.distributions.Normal
    if recon == "bce":
        elems = torch.nn.functional.binary_cross_entropy_with_logits(x, t, reduction="none")
    elif recon == "mse":
        elems = (x - t) ** 2
    elif recon == "gaussian":
        elems = _torch_gaussian(x, t, s)
    elif recon == "continuous_bernoulli":
        elems = -torch.distributions.ContinuousBernoulli(logits=x).log_prob(t)
    else:
        elems = torch.zeros(B, F, dtype=torch.float64)
    rows = elems.sum(1) + beta * torch.distributions.kl_divergence(
        N(mu, torch.exp(0.5 * lv)), N(pm, torch.exp(0.5 * plv))
    ).sum(1)
    want = {"sum": rows.sum(), "mean": rows.mean(), "none": rows}[reduction]
    w = torch.rand(want.shape, generator=g, dtype=torch.float64)
    kw = {
        "log_scale": s.detach().numpy() if recon == "gaussian" else None,
        "prior_mu": pm.detach().numpy(),
        "prior_logvar": plv.detach().numpy(),
    }
    args = [a.detach().numpy() for a in (x, t, mu, lv)] + [beta.item(), reduction, recon]
    np.testing.assert_allclose(ref.vae_loss(*args, **kw), want.detach().numpy(), rtol=1e-12)
    got = ref.vae_loss_gradients(*args, w.numpy(), **kw)
    names = {"logits": x, "target": t, "mu": mu, "logvar": lv, "prior_mu": pm, "prior_logvar": plv}
    names["beta"] = beta
    if recon == "gaussian":
        names["log_scale"] = s
    if recon == "none":
        del names["logits"], names["target"]
    assert set(got) == set(names)
    wants = torch.autograd.grad(want, list(names.values()), w, allow_unused=True)
    for (name, _), want_g in zip(names.items(), wants, strict=True):
        np.testing.assert_allclose(got[name], want_g.numpy(), rtol=1e-11, atol=1e-13, err_msg=name)
    dx, dmu, dlv = ref.vae_loss_backward(*args, w.numpy(), **kw)
    np.testing.assert_array_equal(dmu, got["mu"])
    np.testing.assert_array_equal(dlv, got["logvar"])
    assert (dx is None) if recon == "none" else np.array_equal(dx, got["logits"])


def test_reference_vae_loss_bad_input():
    x = np.zeros((2, 3))
    with pytest.raises(ValueError, match="log_scale must be given for recon='gaussian' and only then"):
        ref.vae_loss(x, x, x, x, recon="gaussian")
    with pytest.raises(ValueError, match="log_scale must be given"):
        ref.vae_loss(x, x, x, x, recon="bce", log_scale=np.zeros(3))
    with pytest.raises(ValueError, match="recon must be one of"):
        ref.vae_loss(x, x, x, x, recon="laplace")
    assert ref.vae_loss(x, x, None, None, recon="mse") == 0.0  # no KL term without latents


# ----------------------------------------------------------------------------------------------
# 2. The Numba and torch backends' fused_loss against the reference
# ----------------------------------------------------------------------------------------------


def problem(x, mu, beta, reduction, recon, need_grad=True, scale_grad=True) -> LossProblem:
    """The LossProblem fastvae.ops resolves for these operands."""
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
        scale_grad=scale_grad,
    )


def make_inputs(g, B, F, dtype, target, recon):
    """Logits (the continuous Bernoulli's first elements are CB_LOGITS), target, mu and logvar."""
    x = torch.randn(B, F, generator=g, dtype=torch.float64) * 3
    if recon == "continuous_bernoulli":
        flat = x.view(-1)
        flat[: min(flat.numel(), len(CB_LOGITS))] = torch.tensor(CB_LOGITS, dtype=torch.float64)[
            : flat.numel()
        ]
    if target == "uint8":
        t = torch.randint(0, 256, (B, F), generator=g, dtype=torch.uint8)
    else:
        t = torch.rand(B, F, generator=g, dtype=torch.float64).to(dtype)
    mu = torch.randn(B, LATENT, generator=g, dtype=torch.float64).to(dtype)
    lv = (torch.randn(B, LATENT, generator=g, dtype=torch.float64) * 2).to(dtype)
    return x.to(dtype), t, mu, lv


def log_scales(F: int, acc: torch.dtype) -> list[torch.Tensor]:
    """One scale at each of -3, 0, 2, and one per feature cycling through them."""
    per_feature = torch.tensor(LOG_SCALES, dtype=acc).repeat(F // 3 + 1)[:F].contiguous()
    return [torch.tensor([v], dtype=acc) for v in LOG_SCALES] + [per_feature]


def check(backend, x, t, mu, lv, s, beta, reduction, recon, tol, what):
    """fused_loss against the reference: the three loss terms, the three gradients and, for the
    Gaussian, the per-element d/ds (the formula) and its batch sum (the reference's d/ds)."""
    p = problem(x, mu, beta, reduction, recon)
    loss, rec, kl, dx, dmu, dlv, dls = BACKENDS[backend].fused_loss(p, x, t, mu, lv, s)
    npx, npt, npm, npv = to_np(x), to_np(t), to_np(mu), to_np(lv)
    nps = None if s is None else to_np(s)
    grad = np.ones(x.shape[0]) if reduction == "none" else 1.0
    want = ref.vae_loss(npx, npt, npm, npv, beta, reduction, recon, log_scale=nps)
    grads = ref.vae_loss_gradients(npx, npt, npm, npv, beta, reduction, recon, grad, log_scale=nps)
    kw = {"log_scale": nps} if recon == "gaussian" else {}
    fwd = {"gaussian": ref.gaussian_nll, "continuous_bernoulli": ref.continuous_bernoulli}.get(recon)
    want_rec = fwd(npx, npt, reduction=reduction, **kw) if fwd else None
    errs = {
        "loss": rel_err(loss, np.asarray(want)),
        "kl": rel_err(kl, np.asarray(ref.kl_divergence(npm, npv, reduction))),
        "dlogits": rel_err(dx, grads["logits"]),
        "dmu": rel_err(dmu, grads["mu"]),
        "dlogvar": rel_err(dlv, grads["logvar"]),
    }
    if want_rec is not None:
        errs["recon"] = rel_err(rec, np.asarray(want_rec))
    assert dx.dtype == x.dtype and dx.shape == x.shape and dmu.shape == mu.shape
    if recon == "gaussian":
        assert dls.shape == x.shape and dls.dtype == p.acc
        xt = npx - (npt / 255.0 if t.dtype == torch.uint8 else npt)
        per_elem = (1.0 - xt * xt * np.exp(-2.0 * nps)) * p.grad_scale
        errs["dlog_scale"] = rel_err(dls, np.broadcast_to(per_elem, x.shape))
        summed = dls.double().sum(0) if s.numel() > 1 else dls.double().sum().reshape(1)
        errs["dlog_scale summed"] = rel_err(summed, grads["log_scale"])
    else:
        assert dls.numel() == 0
    bad = {k: v for k, v in errs.items() if not v < tol}
    assert not bad, f"{backend} {what}: relative errors above {tol}: {bad}"


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("recon", ["gaussian", "continuous_bernoulli"])
@pytest.mark.parametrize("target", ["float", "uint8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_fused_loss_matches_reference(poison, backend, dtype, target, recon, reduction):
    g = torch.Generator().manual_seed(zlib.crc32(f"{backend}{dtype}{target}{recon}{reduction}".encode()))
    for B, F in itertools.product(BATCHES, FEATURES):
        x, t, mu, lv = make_inputs(g, B, F, dtype, target, recon)
        scales = log_scales(F, dtype) if recon == "gaussian" else [None]
        for s in scales:
            what = f"B={B} F={F} L={None if s is None else s.numel()} s={None if s is None else s[0].item()}"
            check(backend, x, t, mu, lv, s, 0.7, reduction, recon, TOL[dtype], what)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_cb_special_logits_elementwise(poison, backend, dtype):
    """One element per row: logits 0, +-1e-4, +-0.5, +-30 and a sweep over the Taylor / closed-form
    seams (0.25 and 1) against the reference, loss and gradient, element by element."""
    sweep = np.concatenate([CB_LOGITS, np.linspace(-3.0, 3.0, 6001), [0.25, -0.25, 1.0, -1.0, 89.0, -89.0]])
    x = torch.tensor(sweep, dtype=dtype).reshape(-1, 1)
    for tv in (0.0, 0.5, 1.0, 0.3):
        t = torch.full_like(x, tv)
        p = problem(x, None, 1.0, "none", "continuous_bernoulli")
        per_row, _, _, dx, _, _, dls = BACKENDS[backend].fused_loss(p, x, t, None, None)
        want = ref.continuous_bernoulli(to_np(x), to_np(t), "none")
        want_dx, want_dt = ref.continuous_bernoulli_backward(to_np(x), to_np(t), "sum")
        rtol, atol = (1e-6, 3e-7) if dtype == torch.float32 else (1e-13, 1e-15)
        np.testing.assert_allclose(to_np(per_row), want, rtol=rtol, atol=atol)
        np.testing.assert_allclose(to_np(dx), want_dx, rtol=rtol, atol=atol)
        assert dls.numel() == 0
    # At x = 0 exactly: loss = log 2 - log 2 = 0 for t = 1/2 (any t: softplus(0) - log C(0) = 0) and
    # d/dx = 1/2 - t (d log C / dx = 0 there).
    x0 = torch.zeros(3, 1, dtype=dtype)
    t0 = torch.tensor([[0.0], [0.5], [1.0]], dtype=dtype)
    per_row, _, _, dx, _, _, _ = BACKENDS[backend].fused_loss(
        problem(x0, None, 1.0, "none", "continuous_bernoulli"), x0, t0, None, None
    )
    assert torch.all(per_row.abs() < 1e-7) and torch.equal(dx, 0.5 - t0)


@pytest.mark.parametrize("recon", ["gaussian", "continuous_bernoulli"])
@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_half_precision_strided_and_broadcast_rows(poison, backend, recon):
    """fp16 / bf16 logits (computed in float32, gradients in their dtype); row-strided views and a
    batch-broadcast target (row stride 0) read in place."""
    g = torch.Generator().manual_seed(zlib.crc32(f"{backend}{recon}".encode()))
    x, t, mu, lv = make_inputs(g, 127, 784, torch.float32, "float", recon)
    s = torch.linspace(-1.0, 1.0, 784) if recon == "gaussian" else None
    for dtype in (torch.float16, torch.bfloat16):
        xh, th, muh, lvh = (a.to(dtype) for a in (x, t, mu, lv))
        out = BACKENDS[backend].fused_loss(problem(xh, muh, 0.7, "sum", recon), xh, th, muh, lvh, s)
        assert out[0].dtype == torch.float32 and out[3].dtype == dtype and out[4].dtype == dtype
        check(backend, xh, th, muh, lvh, s, 0.7, "sum", recon, 2e-2, str(dtype))
    wide = torch.randn(127, 1000, generator=g) * 3
    t_wide = torch.rand(127, 900, generator=g)
    xs, ts = wide[:, 100:884], t_wide[:, 50:834]
    assert xs.stride() == (1000, 1) and ts.stride() == (900, 1)
    check(backend, xs, ts, mu, lv, s, 0.7, "none", recon, 1e-5, "strided")
    t_row = torch.rand(1, 784, generator=g).expand(127, 784)
    check(backend, x, t_row, mu, lv, s, 0.7, "mean", recon, 1e-5, "broadcast target")


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_no_grad_and_no_scale_grad(poison, backend):
    """need_grad False: every gradient empty; scale_grad False: d/ds empty, the rest unchanged."""
    g = torch.Generator().manual_seed(11)
    x, t, mu, lv = make_inputs(g, 127, 784, torch.float32, "float", "gaussian")
    s = torch.full((784,), 0.3)
    full = BACKENDS[backend].fused_loss(problem(x, mu, 0.5, "mean", "gaussian"), x, t, mu, lv, s)
    out = BACKENDS[backend].fused_loss(
        problem(x, mu, 0.5, "mean", "gaussian", need_grad=False), x, t, mu, lv, s
    )
    assert all(d.numel() == 0 for d in out[3:]) and torch.equal(out[0], full[0])
    out = BACKENDS[backend].fused_loss(
        problem(x, mu, 0.5, "mean", "gaussian", scale_grad=False), x, t, mu, lv, s
    )
    assert out[6].numel() == 0 and all(torch.equal(a, b) for a, b in zip(out[:6], full[:6], strict=True))


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_bad_log_scale_raises(backend):
    x = torch.randn(4, 6)
    p = problem(x, None, 1.0, "sum", "gaussian")
    for bad in (None, torch.zeros(5), torch.zeros(2, 3)):
        with pytest.raises(ValueError, match=r"log_scale must be a 1-D tensor of 1 or F = 6 elements"):
            BACKENDS[backend].fused_loss(p, x, x, None, None, bad)
    with pytest.raises(ValueError, match="log_scale is only read by the Gaussian"):
        BACKENDS[backend].fused_loss(p._replace(recon=RECON_CB), x, x.sigmoid(), None, None, torch.zeros(1))


@pytest.mark.parametrize("recon", ["gaussian", "continuous_bernoulli"])
def test_numba_deterministic_serial_and_parallel(monkeypatch, recon):
    """Bit-identical losses and gradients from the serial and the parallel row kernels."""
    g = torch.Generator().manual_seed(12)
    x, t, mu, lv = make_inputs(g, 127, 1025, torch.float32, "float", recon)
    s = torch.tensor([0.5]) if recon == "gaussian" else None
    p = problem(x, mu, 0.7, "sum", recon)
    monkeypatch.setattr(numba_cpu, "_PARALLEL_MIN_WORK", 1 << 62)
    serial = numba_cpu.fused_loss(p, x, t, mu, lv, s)
    monkeypatch.setattr(numba_cpu, "_PARALLEL_MIN_WORK", 0)
    parallel = numba_cpu.fused_loss(p, x, t, mu, lv, s)
    for a, b in zip(serial, parallel, strict=True):
        assert torch.equal(a, b)


def test_backends_agree_on_bce_and_mse_seventh_output(poison):
    """The existing recons through the 7-output contract: d/ds is empty, the rest as before."""
    g = torch.Generator().manual_seed(13)
    for recon in ("bce", "mse"):
        x, t, mu, lv = make_inputs(g, 3, 7, torch.float64, "float", recon)
        for backend in BACKENDS:
            check(backend, x, t, mu, lv, None, 0.7, "mean", recon, 1e-12, recon)


# ----------------------------------------------------------------------------------------------
# 3. The differentiable forms: loss_terms (gradgradcheck) and loss_gradients
# ----------------------------------------------------------------------------------------------


def _leaves(recon: str, B: int = 3, F: int = 5, D: int = 2, L: int = 5):
    g = torch.Generator().manual_seed(zlib.crc32(recon.encode()))
    x = torch.randn(B, F, generator=g, dtype=torch.float64) * 2
    if recon == "continuous_bernoulli":  # at and near 0, at the float64 seam 0.25, far out
        x.view(-1)[:7] = torch.tensor([0.0, 1e-4, -1e-4, 0.25, -0.5, 30.0, -0.2], dtype=torch.float64)
    t = torch.rand(B, F, generator=g, dtype=torch.float64)
    mu, lv = (torch.randn(B, D, generator=g, dtype=torch.float64) for _ in range(2))
    s = torch.tensor([-3.0, 0.0, 2.0, 0.5, -1.0], dtype=torch.float64)[:L].clone()
    beta = torch.tensor(0.7, dtype=torch.float64)
    return [a.requires_grad_(True) for a in (x, t, mu, lv, s, beta)]


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("recon", ["gaussian", "continuous_bernoulli"])
def test_loss_terms_gradgradcheck(recon, reduction):
    """loss_terms is twice differentiable in logits, target, mu, logvar, log_scale and beta (float64);
    the continuous Bernoulli at logits 0 and +-1e-4 included (no NaN leaks through the branch select)."""
    rc, rd = RECONS[recon], REDUCTIONS[reduction]
    x, t, mu, lv, s, beta = _leaves(recon)
    if recon == "gaussian":

        def f(x, t, mu, lv, s, beta):
            return composite.loss_terms(x, t, mu, lv, beta, rd, rc, s)[0]

        inputs = (x, t, mu, lv, s, beta)
    else:

        def f(x, t, mu, lv, beta):
            return composite.loss_terms(x, t, mu, lv, beta, rd, rc)[0]

        inputs = (x, t, mu, lv, beta)
    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


@pytest.mark.parametrize("L", [1, 5])
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("recon", ["bce", "mse", "gaussian", "continuous_bernoulli"])
def test_loss_gradients_equal_autograd_and_are_differentiable(recon, reduction, L):
    """loss_gradients' (gx, gt, gmu, glv, gls) equal torch.autograd.grad of loss_terms, and are
    themselves differentiable (gradcheck: their own derivatives are the true second derivatives)."""
    rc, rd = RECONS[recon], REDUCTIONS[reduction]
    x, t, mu, lv, s, _ = _leaves(recon, L=L)
    s = s if recon == "gaussian" else None
    beta = 0.7
    p = LossProblem(3, 5, 2, rc, rd, beta, 1 / 3 if reduction == "mean" else 1.0, True, torch.float64, True)
    g = torch.rand(3 if reduction == "none" else (), dtype=torch.float64, requires_grad=True)
    loss = composite.loss_terms(x, t, mu, lv, beta, rd, rc, s)[0]
    inputs = [a for a in (x, t, mu, lv, s) if a is not None]
    want = torch.autograd.grad(loss, inputs, g)
    got = [a for a in composite.loss_gradients(p, x, t, mu, lv, g, s) if a is not None]
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-12, atol=1e-14)

    def grads(*args):
        return tuple(
            a for a in composite.loss_gradients(p, *args[:4], args[-1], *args[4:-1]) if a is not None
        )

    assert torch.autograd.gradcheck(grads, (*inputs, g))


def test_loss_gradients_only_what_requires_grad():
    x, t, mu, lv, s, _ = _leaves("gaussian")
    p = LossProblem(3, 5, 2, RECON_GAUSSIAN, REDUCTIONS["sum"], 1.0, 1.0, True, torch.float64, True)
    one = torch.tensor(1.0, dtype=torch.float64)
    gx, gt, gmu, glv, gls = composite.loss_gradients(p, x, t.detach(), mu, lv, one, s.detach())
    assert gt is None and gls is None and gx is not None and gmu is not None
    u8 = (t.detach() * 255).to(torch.uint8)
    p = p._replace(recon=RECON_CB)
    gx, gt, *_ = composite.loss_gradients(p, x, u8, mu, lv, one)
    assert gt is None and gx is not None


@pytest.mark.parametrize("recon", ["gaussian", "continuous_bernoulli"])
def test_loss_terms_under_torch_func(recon):
    """torch.func.grad (a tensor beta among the arguments) and vmap over grad (per-sample gradients)
    go through loss_terms: the per-sample logit gradients are the rows of the batch gradient."""
    rc, rd = RECONS[recon], REDUCTIONS["sum"]
    x, t, mu, lv, s, beta = (a.detach() for a in _leaves(recon))
    s = s[:1] if recon == "gaussian" else None

    def f(x, t, mu, lv, beta):
        return composite.loss_terms(x, t, mu, lv, beta, rd, rc, s)[0]

    gx, gt, gbeta = torch.func.grad(f, argnums=(0, 1, 4))(x, t, mu, lv, beta)
    want = torch.autograd.grad(f(*(a.requires_grad_(True) for a in (x, t, mu, lv, beta))), (x, t, beta))
    for a, b in zip((gx, gt, gbeta), want, strict=True):
        assert torch.allclose(a, b, rtol=1e-13, atol=0)

    def per_sample(xi, ti, mi, li):
        return torch.func.grad(f)(xi[None], ti[None], mi[None], li[None], beta)[0]

    rows = torch.func.vmap(per_sample)(*(a.detach() for a in (x, t, mu, lv)))
    assert torch.allclose(rows, gx, rtol=1e-13, atol=0)
