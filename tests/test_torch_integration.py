"""The ops as torch citizens: opcheck, torch.compile(fullgraph=True), gradcheck, modules, AMP."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE

import fastvae
from fastvae.ops import (
    _fused_loss_op,
    _reparameterize_backward_op,
    _reparameterize_op,
    _scale_grads_op,
)


def _loss_args(B=6, F=10, D=3, *, dtype=torch.float32, grad=True):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, F, generator=g, dtype=dtype).to(DEVICE).requires_grad_(grad)
    t = torch.rand(B, F, generator=g, dtype=dtype).to(DEVICE)
    mu = torch.randn(B, D, generator=g, dtype=dtype).to(DEVICE).requires_grad_(grad)
    lv = torch.randn(B, D, generator=g, dtype=dtype).to(DEVICE).requires_grad_(grad)
    return x, t, mu, lv


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("recon", ["bce", "mse", "gaussian", "continuous_bernoulli"])
def test_opcheck_fused_loss(backend, reduction, recon):
    x, t, mu, lv = _loss_args()
    ls = None
    if recon == "gaussian":  # one scale per feature, learnable
        ls = torch.linspace(-1.0, 0.5, x.shape[1], device=DEVICE).requires_grad_()
    t2 = t.clone().requires_grad_()  # a target with a gradient
    torch.library.opcheck(_fused_loss_op, (x, t2, mu, lv, ls, 0.5, reduction, recon, True, ls is not None))
    torch.library.opcheck(
        _fused_loss_op, (x.detach(), t, mu.detach(), lv.detach(), ls, 0.5, reduction, recon, False, False)
    )
    torch.library.opcheck(_fused_loss_op, (x, t, None, None, ls, 1.0, reduction, recon, True, ls is not None))
    torch.library.opcheck(_fused_loss_op, (None, None, mu, lv, None, 1.0, reduction, "none", True, False))
    if recon == "gaussian":  # one scale for everything
        one = torch.tensor([0.3], device=DEVICE, requires_grad=True)
        torch.library.opcheck(_fused_loss_op, (x, t, mu, lv, one, 0.5, reduction, recon, True, True))


def test_opcheck_reparameterize_and_scale(backend):
    mu, lv = (
        torch.randn(5, 4, device=DEVICE, requires_grad=True),
        torch.randn(5, 4, device=DEVICE, requires_grad=True),
    )
    for key, offset in ((torch.tensor(42), 0), (torch.tensor([2**40 + 7], device=DEVICE), 13)):
        torch.library.opcheck(_reparameterize_op, (mu, lv, key, offset))
        dz = torch.randn(5, 4, device=DEVICE)
        torch.library.opcheck(_reparameterize_backward_op, (dz, lv.detach(), key, offset))
    bufs = [
        torch.randn(5, 7, device=DEVICE),
        torch.randn(5, 4, device=DEVICE),
        torch.randn(5, 4, device=DEVICE),
    ]
    torch.library.opcheck(_scale_grads_op, (torch.tensor(3.0, device=DEVICE), *bufs))
    torch.library.opcheck(_scale_grads_op, (torch.rand(5, device=DEVICE), *bufs))


def test_gradcheck_float64(backend):
    """Finite differences in float64 on every backend (each computes in float64 for float64 inputs)."""
    x, t, mu, lv = _loss_args(dtype=torch.float64)
    for reduction in ("sum", "mean"):
        f = lambda x, mu, lv: fastvae.vae_loss(x, t, mu, lv, beta=0.7, reduction=reduction)  # noqa: B023
        assert torch.autograd.gradcheck(f, (x, mu, lv), fast_mode=True)
    g = lambda mu, lv: fastvae.reparameterize(mu, lv, seed=3)
    assert torch.autograd.gradcheck(g, (mu, lv), fast_mode=True)


class PlainVAE(torch.nn.Module):
    """pytorch/examples' VAE, decoder returning logits, with fastvae's ops."""

    def __init__(self, features=784, hidden=400, latent=20):
        super().__init__()
        self.fc1, self.fc21, self.fc22 = (
            torch.nn.Linear(features, hidden),
            torch.nn.Linear(hidden, latent),
            torch.nn.Linear(hidden, latent),
        )
        self.fc3, self.fc4 = torch.nn.Linear(latent, hidden), torch.nn.Linear(hidden, features)

    def forward(self, x, seed=None):
        h = torch.relu(self.fc1(x))
        mu, logvar = self.fc21(h), self.fc22(h)
        z = fastvae.reparameterize(mu, logvar, seed=seed)
        return self.fc4(torch.relu(self.fc3(z))), mu, logvar


def test_torch_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    model = PlainVAE(64, 32, 4).to(DEVICE)
    x = torch.rand(16, 64, device=DEVICE)

    def loss_fn(x):
        logits, mu, logvar = model(x, seed=7)
        return fastvae.vae_loss(logits, x, mu, logvar, reduction="mean")

    eager = loss_fn(x)
    eager.backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(loss_fn, fullgraph=True)(x)
    compiled.backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    for p, g in zip(model.parameters(), eager_grads, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)
    # seed=None inside a compiled graph: the seed is drawn as a traced tensor, no graph break
    torch.compile(lambda x: model(x)[0].sum(), fullgraph=True)(x)


def test_modules():
    mu, lv = torch.randn(8, 3, device=DEVICE), torch.randn(8, 3, device=DEVICE)
    rep = fastvae.nn.Reparameterize(seed=5)
    assert torch.equal(rep(mu, lv), fastvae.reparameterize(mu, lv, seed=5))
    x, t = torch.randn(8, 12, device=DEVICE), torch.rand(8, 12, device=DEVICE)
    crit = fastvae.nn.VAELoss(beta=0.5, reduction="mean")
    assert torch.equal(crit(x, t, mu, lv), fastvae.vae_loss(x, t, mu, lv, beta=0.5, reduction="mean"))
    assert "beta=0.5" in repr(crit)


def test_autocast_bf16_model():
    """Under autocast the decoder emits bf16 logits; the loss takes them and returns fp32."""
    torch.manual_seed(0)
    model = PlainVAE(64, 32, 4).to(DEVICE)
    x = torch.rand(16, 64, device=DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        logits, mu, logvar = model(x, seed=1)
        loss = fastvae.vae_loss(logits, x, mu, logvar)
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
