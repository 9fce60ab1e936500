"""Full autograd: higher derivatives, torch.func transforms and a learnable beta, never silently wrong."""

from __future__ import annotations

import pytest
import torch
import torch.func as tf
import torch.nn.functional as F
from conftest import DEVICE
from fastvae.kernels import composite

import fastvae


def _inputs(B=4, Fe=6, D=3, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, Fe, generator=g, dtype=dtype).to(DEVICE).requires_grad_()
    t = torch.rand(B, Fe, generator=g, dtype=dtype).to(DEVICE)
    mu = torch.randn(B, D, generator=g, dtype=dtype).to(DEVICE).requires_grad_()
    lv = torch.randn(B, D, generator=g, dtype=dtype).to(DEVICE).requires_grad_()
    return x, t, mu, lv


def _eager_loss(x, t, mu, lv, beta=1.0, reduction="sum", recon="bce"):
    """The same negative ELBO written as plain PyTorch (the formula users know)."""
    r = F.binary_cross_entropy_with_logits(x, t, reduction="none") if recon == "bce" else (x - t) ** 2
    k = -0.5 * (1 + lv - mu.pow(2) - lv.exp())
    rows = r.sum(1) + beta * k.sum(1)
    return {"sum": rows.sum(), "mean": rows.mean(), "none": rows}[reduction]


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("recon", ["bce", "mse"])
def test_gradgradcheck_vae_loss(backend, reduction, recon):
    x, t, mu, lv = _inputs()

    def f(x, mu, lv):
        return fastvae.vae_loss(x, t, mu, lv, beta=0.7, reduction=reduction, recon=recon)

    assert torch.autograd.gradgradcheck(f, (x, mu, lv))


def test_gradgradcheck_single_terms_and_reparameterize(backend):
    x, t, mu, lv = _inputs()
    assert torch.autograd.gradgradcheck(lambda x: fastvae.bce_with_logits(x, t, reduction="mean"), (x,))
    assert torch.autograd.gradgradcheck(lambda mu, lv: fastvae.kl_divergence(mu, lv), (mu, lv))
    assert torch.autograd.gradgradcheck(lambda mu, lv: fastvae.reparameterize(mu, lv, seed=4), (mu, lv))


def test_gradient_penalty_through_create_graph(backend):
    """d/dmu of |d loss / d mu|^2: a gradient penalty must see the true second derivatives."""
    x, t, mu, lv = _inputs()

    def penalty(loss_fn):
        (gmu,) = torch.autograd.grad(loss_fn(x, t, mu, lv), mu, create_graph=True)
        return torch.autograd.grad(gmu.pow(2).sum(), (x, mu, lv), allow_unused=True)

    got = penalty(lambda *a: fastvae.vae_loss(*a, beta=0.5))
    want = penalty(lambda *a: _eager_loss(*a, beta=0.5))
    for a, b in zip(got, want, strict=True):
        if b is None:
            assert a is None or torch.count_nonzero(a) == 0
        else:
            torch.testing.assert_close(a, b)


def test_second_derivative_of_bce_is_not_zero(backend):
    x = torch.tensor([[0.3, -1.2]], dtype=torch.float64, device=DEVICE, requires_grad=True)
    t = torch.tensor([[1.0, 0.0]], dtype=torch.float64, device=DEVICE)
    (g,) = torch.autograd.grad(fastvae.bce_with_logits(x, t), x, create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), x)
    s = torch.sigmoid(x.detach())
    torch.testing.assert_close(h, s * (1 - s))


def test_plain_backward_stays_on_the_fast_path(backend, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a plain backward must not evaluate the differentiable forms")

    monkeypatch.setattr(composite, "loss_gradients", refuse)
    x, t, mu, lv = _inputs(dtype=torch.float32)
    fastvae.vae_loss(x, t, mu, lv).backward()
    assert x.grad is not None and mu.grad is not None


def test_torch_func_grad_vmap_and_jvp(backend):
    x, t, mu, lv = (a.detach() for a in _inputs())
    grads = tf.grad(lambda x, mu, lv: fastvae.vae_loss(x, t, mu, lv), argnums=(0, 1, 2))(x, mu, lv)
    want = tf.grad(lambda x, mu, lv: _eager_loss(x, t, mu, lv), argnums=(0, 1, 2))(x, mu, lv)
    for a, b in zip(grads, want, strict=True):
        torch.testing.assert_close(a, b)
    # per-sample gradients
    per = tf.vmap(tf.grad(lambda x, t: fastvae.bce_with_logits(x[None], t[None])))(x, t)
    torch.testing.assert_close(per, torch.sigmoid(x) - t)
    _, tangent = tf.jvp(lambda x: fastvae.vae_loss(x, t, mu, lv), (x,), (torch.ones_like(x),))
    torch.testing.assert_close(tangent, (torch.sigmoid(x) - t).sum())
    z = tf.grad(lambda mu: fastvae.reparameterize(mu, lv, seed=2).sum())(mu)
    torch.testing.assert_close(z, torch.ones_like(mu))


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_learnable_beta_gets_the_kl_term(backend, reduction):
    x, t, mu, lv = _inputs()
    beta = torch.tensor(0.3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    loss = fastvae.vae_loss(x, t, mu, lv, beta=beta, reduction=reduction)
    want = _eager_loss(x, t, mu, lv, beta=beta, reduction=reduction)
    torch.testing.assert_close(loss, want)
    (loss.sum() if reduction == "none" else loss).backward()
    kl = fastvae.kl_divergence(mu.detach(), lv.detach(), reduction=reduction)
    torch.testing.assert_close(beta.grad, kl.sum().to(beta.grad.dtype))
    assert torch.autograd.gradcheck(
        lambda b, mu: fastvae.vae_loss(x, t, mu, lv, beta=b, reduction="mean"), (beta, mu)
    )


def test_bad_beta():
    x, t, mu, lv = _inputs(dtype=torch.float32)
    with pytest.raises(TypeError, match="beta must be a finite number >= 0"):
        fastvae.vae_loss(x, t, mu, lv, beta="1")
    with pytest.raises(ValueError, match=r"1-element floating-point tensor\); got a tensor of shape \[2\]"):
        fastvae.vae_loss(x, t, mu, lv, beta=torch.ones(2))
    with pytest.raises(ValueError, match="got -1.0"):
        fastvae.vae_loss(x, t, mu, lv, beta=torch.tensor(-1.0))
