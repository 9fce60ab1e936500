"""The public likelihoods and priors (issue 11): Gaussian with a learned log-scale, continuous Bernoulli,
targets with gradients, no-KL losses, KL against a diagonal Gaussian prior, a tensor beta.

Each is checked on every backend against the formula written independently in float64 torch (losses
and every gradient by autograd of that formula), at awkward shapes, and its bad input against one clear
error.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import DEVICE
from conftest import rel_err as _rel_err

import fastvae


def rel_err(a, b) -> float:
    return _rel_err(a.detach().cpu() if isinstance(a, torch.Tensor) else a, b.detach().cpu())


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _log_c(x: torch.Tensor) -> torch.Tensor:
    """log C(sigmoid(x)) = log(x / tanh(x / 2)) in float64, by a series near 0 (independent of the code)."""
    x = x.double()
    small = x.abs() < 1e-3
    xs = torch.where(small, torch.ones_like(x), x)
    big = torch.log(xs / torch.tanh(xs / 2))
    return torch.where(small, math.log(2.0) + x * x / 12 - 7 * x**4 / 1440, big)


def _recon_rows(recon: str, x, t, s=None):
    """Per-sample reconstruction terms in float64 torch (differentiable)."""
    x, t = x.double(), t.double()
    if recon == "bce":
        e = torch.nn.functional.binary_cross_entropy_with_logits(x, t, reduction="none")
    elif recon == "mse":
        e = (x - t) ** 2
    elif recon == "gaussian":
        e = -torch.distributions.Normal(x, torch.exp(s.double())).log_prob(t)
    else:
        e = torch.nn.functional.binary_cross_entropy_with_logits(x, t, reduction="none") - _log_c(x)
    return e.flatten(1).sum(1)


def _kl_rows(mu, lv, pm=None, plv=None):
    mu, lv = mu.double(), lv.double()
    if pm is None:
        k = -0.5 * (1 + lv - mu**2 - lv.exp())
    else:
        pm, plv = pm.double(), plv.double()
        k = 0.5 * (torch.exp(lv - plv) + (mu - pm) ** 2 * torch.exp(-plv) - 1 - lv + plv)
    return k.flatten(1).sum(1)


def _reduce(rows, reduction):
    return {"sum": rows.sum(), "mean": rows.mean(), "none": rows}[reduction]


def _check(got_loss, want_loss, got_leaves, want_leaves, tol):
    assert rel_err(got_loss, want_loss) < tol
    w = torch.randn(got_loss.shape, generator=_gen(9), dtype=torch.float64).to(DEVICE)
    got = torch.autograd.grad((got_loss.double() * w).sum(), got_leaves, allow_unused=True)
    want = torch.autograd.grad((want_loss * w).sum(), want_leaves, allow_unused=True)
    for a, b in zip(got, want, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.shape == b.shape
            assert rel_err(a, b) < tol


_SCALES = {
    "none": None,
    "float": -0.4,
    "scalar": (),
    "one": (1,),
    "channel": (3, 1, 1),
    "column": (1, 5),
    "element": (3, 4, 5),
    "batch1": (1, 3, 4, 5),
}


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("scale", list(_SCALES))
def test_gaussian_with_learned_log_scale(backend, dtype, tol, reduction, scale):
    """``-Normal(x, exp(s)).log_prob(t).sum()`` + KL, with gradients to logits, target, mu, logvar, s."""
    g = _gen(1)
    B, shape = 3, (3, 4, 5)
    x = (torch.randn(B, *shape, generator=g) * 2).to(DEVICE, dtype).requires_grad_()
    t = torch.randn(B, *shape, generator=g).to(DEVICE, dtype).requires_grad_()
    mu = torch.randn(B, 7, generator=g).to(DEVICE, dtype).requires_grad_()
    lv = torch.randn(B, 7, generator=g).to(DEVICE, dtype).requires_grad_()
    spec = _SCALES[scale]
    if spec is None or isinstance(spec, float):
        s, s_ref, leaves = spec, torch.tensor(spec or 0.0, dtype=torch.float64), (x, t, mu, lv)
    else:
        s = (torch.rand(spec, generator=g) * 3 - 2).to(DEVICE, dtype).requires_grad_()
        s_ref, leaves = s, (x, t, mu, lv, s)
    got = fastvae.vae_loss(x, t, mu, lv, recon="gaussian", log_scale=s, beta=0.7, reduction=reduction)
    want = _reduce(_recon_rows("gaussian", x, t, s_ref) + 0.7 * _kl_rows(mu, lv), reduction)
    _check(got, want, leaves, leaves, tol)


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_continuous_bernoulli(backend, reduction, dtype, tol):
    """BCE minus the log-normaliser, near x = 0 (the Taylor branch) and far from it."""
    g = _gen(2)
    special = torch.tensor([0.0, 1e-4, -1e-4, 1e-3, -2e-3, 0.05, 0.5, -0.5, 3.0, 30.0, -30.0, 80.0])
    x = (
        torch.cat([special, torch.randn(37, generator=g) * 4])
        .reshape(7, 7)
        .to(DEVICE, dtype)
        .requires_grad_()
    )
    t = torch.rand(7, 7, generator=g).to(DEVICE, dtype).requires_grad_()
    got = fastvae.vae_loss(x, t, recon="continuous_bernoulli", reduction=reduction)
    want = _reduce(_recon_rows("cb", x, t), reduction)
    _check(got, want, (x, t), (x, t), tol)


def test_continuous_bernoulli_is_normalised_and_matches_torch():
    """The density integrates to 1 over t in [0, 1]; torch.distributions agrees away from x = 0."""
    x = torch.tensor([[-6.0, -1.0, -0.01, 0.0, 0.3, 2.5, 9.0]], dtype=torch.float64)
    t = torch.linspace(0, 1, 20001, dtype=torch.float64)
    xs, ts = x.expand(t.numel(), -1).contiguous(), t[:, None].expand(-1, x.shape[1]).contiguous()
    nll = fastvae.vae_loss(
        xs.reshape(-1, 1), ts.reshape(-1, 1), recon="continuous_bernoulli", reduction="none"
    )
    density = torch.exp(-nll).reshape(t.numel(), -1)
    assert torch.allclose(
        torch.trapezoid(density, t, dim=0), torch.ones(x.shape[1], dtype=torch.float64), atol=1e-6
    )
    keep = x.abs() > 0.05
    want = -torch.distributions.ContinuousBernoulli(logits=xs).log_prob(ts).reshape(t.numel(), -1)
    assert rel_err(nll.reshape(t.numel(), -1)[:, keep[0]], want[:, keep[0]]) < 1e-10


@pytest.mark.parametrize("recon", ["bce", "mse", "gaussian", "continuous_bernoulli"])
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_target_with_gradient(backend, recon, reduction):
    """A denoising / teacher target: d/dt in the same call, for every likelihood and reduction."""
    g = _gen(3)
    x = torch.randn(5, 9, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()
    t = torch.rand(5, 9, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()
    mu = torch.randn(5, 2, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()
    lv = torch.randn(5, 2, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()
    s = torch.tensor(0.3, dtype=torch.float64, device=DEVICE) if recon == "gaussian" else None
    got = fastvae.vae_loss(x, t, mu, lv, recon=recon, log_scale=s, reduction=reduction)
    want = _reduce(
        _recon_rows(recon if recon != "continuous_bernoulli" else "cb", x, t, s) + _kl_rows(mu, lv), reduction
    )
    _check(got, want, (x, t, mu, lv), (x, t, mu, lv), 1e-10)
    # Only the target requires grad (a frozen decoder output):
    got = fastvae.vae_loss(x.detach(), t, recon=recon, log_scale=s, reduction=reduction)
    want = _reduce(
        _recon_rows(recon if recon != "continuous_bernoulli" else "cb", x.detach(), t, s), reduction
    )
    _check(got, want, (t,), (t,), 1e-10)


@pytest.mark.parametrize("recon", ["mse", "gaussian", "bce"])
def test_no_kl_term(backend, recon):
    g = _gen(4)
    x = torch.randn(6, 11, generator=g).to(DEVICE).requires_grad_()
    t = torch.rand(6, 11, generator=g).to(DEVICE)
    got = fastvae.vae_loss(x, t, recon=recon, reduction="mean")
    want = _reduce(_recon_rows(recon, x, t, torch.tensor(0.0, dtype=torch.float64)), "mean")
    _check(got, want, (x,), (x,), 1e-5)
    terms = fastvae.vae_loss(x, t, recon=recon, return_terms=True, beta=torch.tensor(2.0))
    assert terms.kl.item() == 0 and rel_err(terms.loss, terms.recon) == 0


@pytest.mark.parametrize("prior_shape", ["full", "row", "vector"])
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_kl_against_diagonal_gaussian_prior(backend, prior_shape, reduction, dtype, tol):
    g = _gen(5)
    B, D = 5, 13
    mu = torch.randn(B, D, generator=g).to(DEVICE, dtype).requires_grad_()
    lv = torch.randn(B, D, generator=g).to(DEVICE, dtype).requires_grad_()
    shape = {"full": (B, D), "row": (1, D), "vector": (D,)}[prior_shape]
    pm = torch.randn(shape, generator=g).to(DEVICE, dtype).requires_grad_()
    plv = torch.randn(shape, generator=g).to(DEVICE, dtype).requires_grad_()
    got = fastvae.kl_divergence(mu, lv, reduction=reduction, prior_mu=pm, prior_logvar=plv)
    want = _reduce(_kl_rows(mu, lv, pm, plv), reduction)
    _check(got, want, (mu, lv, pm, plv), (mu, lv, pm, plv), tol)
    # The same prior through vae_loss, and the standard prior as N(0, 1) given explicitly:
    x = torch.randn(B, 4, generator=g).to(DEVICE, dtype)
    t = torch.rand(B, 4, generator=g).to(DEVICE, dtype)
    got = fastvae.vae_loss(x, t, mu, lv, prior_mu=pm, prior_logvar=plv, beta=0.3, reduction=reduction)
    want = _reduce(_recon_rows("bce", x, t) + 0.3 * _kl_rows(mu, lv, pm, plv), reduction)
    _check(got, want, (mu, lv, pm, plv), (mu, lv, pm, plv), tol)
    zero = torch.zeros(D, dtype=dtype, device=DEVICE)
    std = fastvae.kl_divergence(mu, lv, reduction=reduction)
    assert (
        rel_err(fastvae.kl_divergence(mu, lv, reduction=reduction, prior_mu=zero, prior_logvar=zero), std)
        < tol
    )


def test_prior_kl_second_derivatives(backend):
    g = _gen(6)
    mu, lv, pm, plv = (
        torch.randn(3, 4, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_() for _ in range(4)
    )
    assert torch.autograd.gradgradcheck(
        lambda *a: fastvae.kl_divergence(a[0], a[1], prior_mu=a[2], prior_logvar=a[3]), (mu, lv, pm, plv)
    )


def test_gaussian_and_cb_second_derivatives(backend):
    g = _gen(7)
    x = torch.randn(3, 5, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()
    t = torch.rand(3, 5, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()
    s = torch.randn(5, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()
    assert torch.autograd.gradgradcheck(
        lambda x, t, s: fastvae.vae_loss(x, t, recon="gaussian", log_scale=s, reduction="mean"), (x, t, s)
    )
    assert torch.autograd.gradgradcheck(
        lambda x, t: fastvae.vae_loss(x, t, recon="continuous_bernoulli"), (x, t)
    )


def test_tensor_beta_gradient_and_value(backend):
    g = _gen(8)
    x = torch.randn(4, 6, generator=g).to(DEVICE).requires_grad_()
    t = torch.rand(4, 6, generator=g).to(DEVICE)
    mu, lv = (torch.randn(4, 3, generator=g).to(DEVICE).requires_grad_() for _ in range(2))
    beta = torch.tensor([0.25], device=DEVICE, requires_grad=True)
    for reduction in ("sum", "mean", "none"):
        got = fastvae.vae_loss(x, t, mu, lv, beta=beta, reduction=reduction)
        want = fastvae.vae_loss(x, t, mu, lv, beta=0.25, reduction=reduction)
        assert rel_err(got, want) < 1e-6
        (db,) = torch.autograd.grad(got.sum(), beta)
        kl = fastvae.kl_divergence(mu, lv, reduction=reduction).sum()
        assert db.shape == beta.shape and rel_err(db[0], kl) < 1e-6


def test_compiled_new_signatures(backend):
    """torch.compile(fullgraph=True) over a Gaussian decoder with a learned scale, a learned prior and a
    tensor beta (which the compiled graph never reads on the host)."""
    g = _gen(10)
    x = torch.randn(4, 2, 3, generator=g).to(DEVICE).requires_grad_()
    t = torch.rand(4, 2, 3, generator=g).to(DEVICE)
    mu, lv = (torch.randn(4, 5, generator=g).to(DEVICE).requires_grad_() for _ in range(2))
    s = torch.zeros(2, 1, device=DEVICE, requires_grad=True)
    pm, plv = (torch.randn(5, generator=g).to(DEVICE).requires_grad_() for _ in range(2))
    beta = torch.tensor(0.5, device=DEVICE, requires_grad=True)

    def f(x, t, mu, lv, s, pm, plv, beta):
        a = fastvae.vae_loss(
            x, t, mu, lv, recon="gaussian", log_scale=s, prior_mu=pm, prior_logvar=plv, beta=beta
        )
        return a + fastvae.vae_loss(x, t, recon="continuous_bernoulli", reduction="mean")

    args = (x, t, mu, lv, s, pm, plv, beta)
    leaves = (x, mu, lv, s, pm, plv, beta)
    want = f(*args)
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(*args)
    assert rel_err(got, want) < 1e-6
    for a, b in zip(torch.autograd.grad(got, leaves), torch.autograd.grad(want, leaves), strict=True):
        assert rel_err(a, b) < 1e-5


def test_functorch_new_likelihoods(backend):
    g = _gen(11)
    x = torch.randn(3, 4, generator=g, dtype=torch.float64).to(DEVICE)
    t = torch.rand(3, 4, generator=g, dtype=torch.float64).to(DEVICE)
    s = torch.tensor([0.1, -0.2, 0.3, 0.0], dtype=torch.float64, device=DEVICE)

    def f(x, s):
        return fastvae.vae_loss(x, t, recon="gaussian", log_scale=s) + fastvae.vae_loss(
            x, t, recon="continuous_bernoulli"
        )

    got = torch.func.grad(f, argnums=(0, 1))(x, s)
    xx, ss = x.clone().requires_grad_(), s.clone().requires_grad_()
    want = torch.autograd.grad(f(xx, ss), (xx, ss))
    for a, b in zip(got, want, strict=True):
        assert rel_err(a, b) < 1e-12


def test_bad_input_errors():
    x, t = torch.randn(2, 3, 4), torch.rand(2, 3, 4)
    mu, lv = torch.randn(2, 5), torch.randn(2, 5)
    with pytest.raises(ValueError, match=r"log_scale must be broadcastable to the per-sample shape \[3, 4\]"):
        fastvae.vae_loss(x, t, mu, lv, recon="gaussian", log_scale=torch.zeros(4, 3))
    with pytest.raises(ValueError, match=r"log_scale must be broadcastable.*got shape \[2, 3, 4\]"):
        fastvae.vae_loss(x, t, recon="gaussian", log_scale=torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="log_scale is only used with recon='gaussian', got recon='bce'"):
        fastvae.vae_loss(x, t, mu, lv, log_scale=torch.zeros(()))
    with pytest.raises(TypeError, match="log_scale must be a float or a floating-point tensor"):
        fastvae.vae_loss(x, t, recon="gaussian", log_scale=torch.zeros(3, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="prior_mu was given without prior_logvar"):
        fastvae.kl_divergence(mu, lv, prior_mu=torch.zeros(5))
    with pytest.raises(ValueError, match="prior_logvar was given without prior_mu"):
        fastvae.vae_loss(x, t, mu, lv, prior_logvar=torch.zeros(5))
    with pytest.raises(
        ValueError, match=r"prior_mu must be broadcastable to the shape of mu \[2, 5\], got \[3\]"
    ):
        fastvae.kl_divergence(mu, lv, prior_mu=torch.zeros(3), prior_logvar=torch.zeros(3))
    with pytest.raises(ValueError, match=r"beta must be a finite number.*shape \[3\]"):
        fastvae.vae_loss(x, t, mu, lv, beta=torch.ones(3))
    with pytest.raises(ValueError, match=r"target must lie in \[0, 1\] for recon='continuous_bernoulli'"):
        fastvae.vae_loss(x, t * 2, mu, lv, recon="continuous_bernoulli")
    with pytest.raises(ValueError, match="mu and logvar must be given together"):
        fastvae.vae_loss(x, t, mu)
    with pytest.raises(ValueError, match="prior_mu and prior_logvar need mu and logvar"):
        fastvae.vae_loss(x, t, prior_mu=torch.zeros(5), prior_logvar=torch.zeros(5))
    with pytest.raises(ValueError, match="recon must be one of"):
        fastvae.vae_loss(x, t, recon="laplace")


def test_vae_loss_module_learns_the_scale():
    """``fastvae.nn.VAELoss(recon="gaussian", learn_scale=...)`` owns log sigma and trains it to the MLE."""
    g = _gen(12)
    x = torch.randn(64, 2, 3, generator=g)
    t = x + 0.5 * torch.randn(64, 2, 3, generator=g) * torch.tensor([1.0, 3.0]).reshape(2, 1)
    loss_fn = fastvae.nn.VAELoss(recon="gaussian", learn_scale=(2, 1), reduction="mean")
    assert [n for n, _ in loss_fn.named_parameters()] == ["log_scale"]
    opt = torch.optim.Adam(loss_fn.parameters(), lr=0.05)
    for _ in range(400):
        opt.zero_grad()
        loss_fn(x, t).backward()
        opt.step()
    mle = 0.5 * torch.log(((x - t) ** 2).mean(dim=(0, 2))).reshape(2, 1)
    assert torch.allclose(loss_fn.log_scale.detach(), mle, atol=1e-3)
    with pytest.raises(ValueError, match="learn_scale needs recon='gaussian'"):
        fastvae.nn.VAELoss(learn_scale=())
