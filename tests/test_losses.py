"""vae_loss, bce_with_logits and kl_divergence on every backend against the float64 reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import DEVICE, rel_err, to_np

import fastvae
from fastvae import reference as ref

# (B, F, D): every awkward size of the issue appears at least once, with the large ones paired.
SHAPES = [
    (1, 1, 1),
    (3, 7, 2),
    (127, 784, 20),
    (1000, 1025, 129),
    (1000, 1, 2),
    (3, 1025, 1),
    (127, 7, 129),
    (1, 784, 20),
]
TOL = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 2e-2, torch.float64: 1e-10}


def make_inputs(B, F, D, dtype=torch.float32, target="float", gen_seed=None):
    g = torch.Generator().manual_seed(gen_seed if gen_seed is not None else int(torch.randint(1 << 30, ())))
    logits = (torch.randn(B, F, generator=g) * 3).to(dtype)
    if target == "uint8":
        tgt = torch.randint(0, 256, (B, F), generator=g, dtype=torch.uint8)
    else:
        tgt = torch.rand(B, F, generator=g).to(dtype if dtype != torch.float64 else torch.float64)
    mu = torch.randn(B, D, generator=g).to(dtype)
    logvar = (torch.randn(B, D, generator=g) * 1.5).to(dtype)
    return [t.to(DEVICE) for t in (logits, tgt, mu, logvar)]


def run_vae_loss(logits, target, mu, logvar, grad=None, **kw):
    """Loss and the three gradients through autograd, with an incoming gradient ``grad``."""
    leaves = [t.detach().clone().requires_grad_() for t in (logits, mu, logvar)]
    loss = fastvae.vae_loss(leaves[0], target, leaves[1], leaves[2], **kw)
    loss.backward(grad if grad is not None else torch.ones_like(loss))
    return loss.detach(), [t.grad for t in leaves]


def check_vae_loss(logits, target, mu, logvar, *, beta=1.0, reduction="sum", recon="bce", grad=None, tol):
    loss, (gx, gm, gl) = run_vae_loss(
        logits, target, mu, logvar, grad=grad, beta=beta, reduction=reduction, recon=recon
    )
    args = [to_np(t) for t in (logits, target, mu, logvar)]
    g = 1.0 if grad is None else to_np(grad)
    want = ref.vae_loss(*args, beta=beta, reduction=reduction, recon=recon)
    want_gx, want_gm, want_gl = ref.vae_loss_backward(
        *args, beta=beta, reduction=reduction, recon=recon, grad=g
    )
    assert loss.dtype == (torch.float64 if logits.dtype == torch.float64 else torch.float32)
    assert gx.dtype == logits.dtype and gx.shape == logits.shape
    for name, got, exp in [
        ("loss", loss, want),
        ("dlogits", gx, want_gx),
        ("dmu", gm, want_gm),
        ("dlogvar", gl, want_gl),
    ]:
        err = rel_err(got, exp)
        assert err < tol, f"{name}: relative error {err:.3g} >= {tol}"


@pytest.mark.parametrize("B,F,D", SHAPES)
def test_vae_loss_fp32_matches_reference(backend, poison, B, F, D):
    inputs = make_inputs(B, F, D)
    # Every reduction where it is cheap; the largest case once (the interpreter runs it in seconds).
    for reduction in ("sum", "mean", "none") if B * F < 200_000 else ("mean",):
        check_vae_loss(*inputs, beta=0.7, reduction=reduction, tol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,F,D", [(3, 7, 2), (127, 784, 20), (1000, 1, 129)])
def test_vae_loss_half_precision(backend, poison, dtype, B, F, D):
    check_vae_loss(*make_inputs(B, F, D, dtype), reduction="mean", tol=2e-2)


def test_vae_loss_float64(backend):
    check_vae_loss(*make_inputs(9, 33, 5, torch.float64), reduction="sum", tol=1e-10)


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_incoming_gradient_is_applied(backend, poison, reduction):
    inputs = make_inputs(17, 40, 6)
    grad = torch.rand(17) + 0.5 if reduction == "none" else torch.tensor(2.5)
    if reduction == "none":
        grad[3] = 1.0  # rows whose gradient is 1 are skipped by the scale kernel: must still be right
    check_vae_loss(*inputs, reduction=reduction, grad=grad.to(DEVICE), tol=1e-5)


@pytest.mark.parametrize("B,F,D", [(3, 7, 2), (127, 784, 20)])
def test_uint8_targets(backend, poison, B, F, D):
    check_vae_loss(*make_inputs(B, F, D, target="uint8"), reduction="sum", tol=1e-5)


def test_mse_reconstruction(backend, poison):
    logits, _, mu, logvar = make_inputs(31, 100, 8)
    target = torch.randn(31, 100).to(DEVICE) * 4  # unbounded data is fine for MSE
    for reduction in ("sum", "none"):
        check_vae_loss(logits, target, mu, logvar, recon="mse", beta=2.0, reduction=reduction, tol=1e-5)


def test_image_shaped_inputs(backend, poison):
    """[B, 1, 28, 28] logits and targets; gradients come back in the input's shape."""
    logits, target, mu, logvar = make_inputs(5, 784, 20)
    logits, target = logits.reshape(5, 1, 28, 28), target.reshape(5, 1, 28, 28)
    check_vae_loss(logits, target, mu, logvar, tol=1e-5)
    # a flat decoder output against image-shaped data: same features per sample
    check_vae_loss(logits.reshape(5, 784), target, mu, logvar, tol=1e-5)


def test_non_contiguous_inputs(backend, poison):
    """Row-strided slices (an encoder's h.chunk(2)), transposes and step slices."""
    B, F, D = 37, 90, 12
    h = torch.randn(B, 2 * D).to(DEVICE)
    mu, logvar = h.chunk(2, dim=1)
    assert not mu.is_contiguous()
    wide = (torch.randn(B, 2 * F) * 3).to(DEVICE)
    logits = wide[:, ::2]  # stride 2 along features
    target = torch.rand(F, B).to(DEVICE).t()  # transposed
    check_vae_loss(logits, target, mu, logvar, reduction="mean", tol=1e-5)
    rows = torch.randn(2 * B, F).to(DEVICE)[::2]  # every other row
    check_vae_loss(rows, target, mu, logvar, tol=1e-5)


def test_extreme_values_are_finite_and_exact(backend, poison):
    """Logits of +-100 and logvar of +-30: no overflow, and exact where the math is finite."""
    logits = torch.tensor([[100.0, -100.0, 100.0, -100.0, 0.0, 30.0]]).repeat(4, 1).to(DEVICE)
    target = torch.tensor([[1.0, 1.0, 0.0, 0.0, 0.5, 1.0]]).repeat(4, 1).to(DEVICE)
    mu = torch.tensor([[0.0, 3.0, -50.0]]).repeat(4, 1).to(DEVICE)
    logvar = torch.tensor([[30.0, -30.0, 0.0]]).repeat(4, 1).to(DEVICE)
    loss, grads = run_vae_loss(logits, target, mu, logvar, reduction="none")
    assert torch.isfinite(loss).all() and all(torch.isfinite(g).all() for g in grads)
    check_vae_loss(logits, target, mu, logvar, reduction="none", tol=1e-6)
    # per element: x = -100 with t = 1 costs exactly 100 nats and has gradient -1
    bce = fastvae.bce_with_logits(logits[:, 1:2], target[:, 1:2], reduction="none")
    assert torch.allclose(bce.cpu(), torch.full((4,), 100.0), rtol=1e-7)


def test_bce_with_logits_and_kl_alone(backend, poison):
    logits, target, mu, logvar = make_inputs(127, 784, 20)
    for reduction in ("sum", "mean", "none"):
        x = logits.clone().requires_grad_()
        loss = fastvae.bce_with_logits(x, target, reduction=reduction)
        loss.backward(torch.ones_like(loss))
        assert rel_err(loss, ref.bce_with_logits(to_np(logits), to_np(target), reduction)) < 1e-5
        assert rel_err(x.grad, ref.bce_with_logits_backward(to_np(logits), to_np(target), reduction)) < 1e-5
        m, lv = mu.clone().requires_grad_(), logvar.clone().requires_grad_()
        kl = fastvae.kl_divergence(m, lv, reduction=reduction)
        kl.backward(torch.ones_like(kl))
        want_m, want_lv = ref.kl_divergence_backward(to_np(mu), to_np(logvar), reduction)
        assert rel_err(kl, ref.kl_divergence(to_np(mu), to_np(logvar), reduction)) < 1e-5
        assert rel_err(m.grad, want_m) < 1e-5 and rel_err(lv.grad, want_lv) < 1e-5


def test_return_terms_add_up(backend):
    inputs = make_inputs(20, 50, 4)
    terms = fastvae.vae_loss(*inputs, beta=0.3, return_terms=True)
    assert torch.allclose(terms.loss, terms.recon + 0.3 * terms.kl, rtol=1e-6)
    args = [to_np(t) for t in inputs]
    assert rel_err(terms.recon, ref.bce_with_logits(args[0], args[1])) < 1e-5
    assert rel_err(terms.kl, ref.kl_divergence(args[2], args[3])) < 1e-5
    assert not terms.recon.requires_grad and not terms.kl.requires_grad


def test_deterministic_bit_identical(backend):
    inputs = make_inputs(300, 784, 20)
    first = run_vae_loss(*inputs)
    second = run_vae_loss(*inputs)
    assert torch.equal(first[0], second[0])
    assert all(torch.equal(a, b) for a, b in zip(first[1], second[1], strict=True))


def test_evaluation_skips_gradients(backend):
    """Under no_grad the kernel is compiled without gradient stores and returns the same loss."""
    inputs = make_inputs(64, 100, 10)
    with torch.no_grad():
        loss_eval = fastvae.vae_loss(*inputs)
    loss_train, _ = run_vae_loss(*inputs)
    assert torch.equal(loss_eval, loss_train)


def test_backends_agree():
    inputs = make_inputs(50, 200, 16)
    results = {}
    for name in ("triton", "numba", "torch") if DEVICE == "cpu" else ("triton", "torch"):
        with fastvae.use_backend(name):
            results[name] = run_vae_loss(*inputs)
    base = results.pop("torch")
    for name, (loss, grads) in results.items():
        assert rel_err(loss, to_np(base[0])) < 1e-6, name
        for g, b in zip(grads, base[1], strict=True):
            assert rel_err(g, to_np(b)) < 1e-6, name


def test_backward_twice_through_the_same_loss(backend):
    """retain_graph=True: the second backward recomputes; both are right, the first is not disturbed."""
    logits, target, mu, logvar = make_inputs(6, 10, 2)
    x, m = logits.clone().requires_grad_(), mu.clone().requires_grad_()
    loss = fastvae.vae_loss(x, target, m, logvar, reduction="none")
    g1, g2 = torch.rand(6).to(DEVICE) + 0.5, torch.rand(6).to(DEVICE) + 0.5
    first = torch.autograd.grad(loss, (x, m), g1, retain_graph=True)
    second = torch.autograd.grad(loss, (x, m), g2)
    args = [to_np(t) for t in (logits, target, mu, logvar)]
    for g, grads in ((g1, first), (g2, second)):
        want_x, want_m, _ = ref.vae_loss_backward(*args, reduction="none", grad=to_np(g))
        assert rel_err(grads[0], want_x) < 1e-5 and rel_err(grads[1], want_m) < 1e-5


def test_reference_matches_torch_autograd_float64():
    """The reference's hand-written derivatives agree with autograd on its own formulas."""
    g = torch.Generator().manual_seed(3)
    x, t = (
        torch.randn(6, 11, generator=g, dtype=torch.float64) * 4,
        torch.rand(6, 11, generator=g, dtype=torch.float64),
    )
    mu, lv = (
        torch.randn(6, 3, generator=g, dtype=torch.float64),
        torch.randn(6, 3, generator=g, dtype=torch.float64),
    )
    xs, mus, lvs = (a.clone().requires_grad_() for a in (x, mu, lv))
    loss = torch.nn.functional.binary_cross_entropy_with_logits(
        xs, t, reduction="sum"
    ) - 0.5 * 0.4 * torch.sum(1 + lvs - mus**2 - lvs.exp())
    loss.backward()
    assert np.isclose(
        ref.vae_loss(x.numpy(), t.numpy(), mu.numpy(), lv.numpy(), beta=0.4), loss.item(), rtol=1e-12
    )
    want = ref.vae_loss_backward(x.numpy(), t.numpy(), mu.numpy(), lv.numpy(), beta=0.4)
    for got, exp in zip((xs.grad, mus.grad, lvs.grad), want, strict=True):
        np.testing.assert_allclose(got.numpy(), exp, rtol=1e-12, atol=1e-14)
