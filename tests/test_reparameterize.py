"""reparameterize: the in-kernel Philox eps against the NumPy port, on every backend."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import CPU_BACKENDS, DEVICE, rel_err, to_np

import fastvae
from fastvae import reference as ref

SHAPES = [(1, 1), (3, 2), (127, 20), (1000, 129), (5, 1, 28, 28)]


@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference_forward_and_backward(backend, poison, shape):
    g = torch.Generator().manual_seed(sum(shape))
    mu = torch.randn(shape, generator=g).to(DEVICE).requires_grad_()
    logvar = (torch.randn(shape, generator=g) * 2).to(DEVICE).requires_grad_()
    seed = 2**40 + 12345
    z = fastvae.reparameterize(mu, logvar, seed=seed)
    dz = torch.randn(shape, generator=g).to(DEVICE)
    z.backward(dz)
    assert z.shape == mu.shape and z.dtype == mu.dtype
    assert rel_err(z, ref.reparameterize(to_np(mu), to_np(logvar), seed)) < 1e-5
    want_dmu, want_dlv = ref.reparameterize_backward(to_np(dz), to_np(logvar), seed)
    assert rel_err(mu.grad, want_dmu) < 1e-6
    assert rel_err(logvar.grad, want_dlv) < 1e-5
    # the backward formula of the issue: dlogvar = 0.5 * dz * (z - mu)
    assert rel_err(logvar.grad, 0.5 * to_np(dz) * (to_np(z) - to_np(mu))) < 1e-4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(backend, poison, dtype):
    mu = torch.randn(64, 20).to(dtype).to(DEVICE).requires_grad_()
    logvar = torch.randn(64, 20).to(dtype).to(DEVICE).requires_grad_()
    z = fastvae.reparameterize(mu, logvar, seed=9)
    z.backward(torch.ones_like(z))
    assert z.dtype == dtype and logvar.grad.dtype == dtype
    assert rel_err(z, ref.reparameterize(to_np(mu), to_np(logvar), 9)) < 2e-2
    assert rel_err(logvar.grad, ref.reparameterize_backward(np.ones((64, 20)), to_np(logvar), 9)[1]) < 2e-2


def test_extreme_logvar(backend):
    mu = torch.tensor([[0.5, -2.0, 1.0, 0.0]]).repeat(8, 1).to(DEVICE)
    logvar = torch.tensor([[30.0, -30.0, 0.0, 10.0]]).repeat(8, 1).to(DEVICE)
    z = fastvae.reparameterize(mu, logvar, seed=5)
    assert torch.isfinite(z).all()
    assert rel_err(z, ref.reparameterize(to_np(mu), to_np(logvar), 5)) < 1e-5


def test_same_seed_same_z_on_every_backend():
    mu, logvar = torch.randn(33, 17).to(DEVICE), torch.randn(33, 17).to(DEVICE)
    zs = {}
    for name in CPU_BACKENDS if DEVICE == "cpu" else ("triton", "torch"):
        with fastvae.use_backend(name):
            zs[name] = fastvae.reparameterize(mu, logvar, seed=123)
    base = zs.pop("torch")
    for name, z in zs.items():
        assert rel_err(z, to_np(base)) < 1e-5, name


def test_uniforms_bit_exact_and_normals_within_ulps(backend):
    """With mu = 0 and logvar = 0, z is eps itself: compare with the NumPy port of tl.randn."""
    n = 4099
    seed = 2**33 + 7
    eps = fastvae.reparameterize(torch.zeros(n, 1).to(DEVICE), torch.zeros(n, 1).to(DEVICE), seed=seed)
    want = ref.randn(seed, np.arange(n))
    ulp = np.spacing(np.abs(want).astype(np.float32)).astype(np.float64)
    err_ulps = np.abs(to_np(eps).ravel() - want) / ulp
    assert err_ulps.max() <= 8, f"eps differs from the reference by {err_ulps.max():.1f} ulp"


def test_different_seeds_differ(backend):
    mu, logvar = torch.zeros(100, 10).to(DEVICE), torch.zeros(100, 10).to(DEVICE)
    a = fastvae.reparameterize(mu, logvar, seed=1)
    b = fastvae.reparameterize(mu, logvar, seed=2)
    assert not torch.equal(a, b)
    assert torch.corrcoef(torch.stack([a.ravel(), b.ravel()]))[0, 1].abs() < 0.1


def test_manual_seed_reproducibility(backend):
    mu, logvar = torch.randn(50, 8).to(DEVICE), torch.randn(50, 8).to(DEVICE)
    torch.manual_seed(0)
    a, b = fastvae.reparameterize(mu, logvar), fastvae.reparameterize(mu, logvar)
    torch.manual_seed(0)
    c = fastvae.reparameterize(mu, logvar)
    assert torch.equal(a, c)
    assert not torch.equal(a, b)


@pytest.mark.parametrize("name", ["triton", "numba"])
def test_eps_is_standard_normal(name):
    """Kolmogorov-Smirnov over 1e6 draws; mean and variance within their sampling error."""
    stats = pytest.importorskip("scipy.stats")
    if DEVICE == "cuda" and name == "numba":
        pytest.skip("numba runs on CPU tensors")
    n = 1_000_000
    with fastvae.use_backend(name):
        eps = fastvae.reparameterize(torch.zeros(n, 1).to(DEVICE), torch.zeros(n, 1).to(DEVICE), seed=2024)
    eps = to_np(eps).ravel()
    assert stats.kstest(eps, "norm").pvalue > 1e-3
    assert abs(eps.mean()) < 5 / np.sqrt(n) and abs(eps.var() - 1) < 5 * np.sqrt(2 / n)


def test_non_contiguous_inputs(backend):
    h = torch.randn(40, 2 * 9).to(DEVICE)
    mu, logvar = h.chunk(2, dim=1)
    z = fastvae.reparameterize(mu, logvar, seed=11)
    assert rel_err(z, ref.reparameterize(to_np(mu), to_np(logvar), 11)) < 1e-5


def test_reference_philox_known_answers():
    """Random123's published Philox4x32-10 test vectors."""
    cases = [
        ((0, 0, 0, 0), 0, (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, 0xFFFFFFFFFFFFFFFF, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0x299F31D0 << 32) | 0xA4093822,
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ]
    for counter, seed, expected in cases:
        words = ref.philox4x32(seed, *(np.array([c], dtype=np.uint64) for c in counter))
        assert tuple(int(w[0]) for w in words) == expected
