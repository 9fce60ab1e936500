"""fastvae.nn.DiagonalGaussian against a faithful copy of diffusers' DiagonalGaussianDistribution."""

from __future__ import annotations

from typing import Optional, Tuple  # noqa: UP035 -- the copy below keeps diffusers' annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, rel_err, to_np
from torch import nn

import fastvae
from fastvae import reference
from fastvae.nn import DiagonalGaussian

# float32: both sides round; float64: only the order of the sums differs.
TOL = {torch.float32: 1e-6, torch.float64: 1e-12}


# ----------------------------------------------------------------------------------------------
# diffusers' class, copied verbatim from
# https://github.com/huggingface/diffusers/blob/main/src/diffusers/models/autoencoders/vae.py
# Copyright 2024 The HuggingFace Team. All rights reserved.
# Licensed under the Apache License, Version 2.0 (http://www.apache.org/licenses/LICENSE-2.0).
# Only ``randn_tensor`` is local: diffusers.utils.torch_utils.randn_tensor for one generator, which
# the tests replace to feed the copy the eps that fastvae drew.
# ----------------------------------------------------------------------------------------------


def randn_tensor(shape, generator=None, device=None, dtype=None):
    return torch.randn(shape, generator=generator, device=device, dtype=dtype)


class DiagonalGaussianDistribution(object):  # noqa: UP004
    def __init__(self, parameters: torch.Tensor, deterministic: bool = False):
        self.parameters = parameters
        self.mean, self.logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = torch.clamp(self.logvar, -30.0, 20.0)
        self.deterministic = deterministic
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)
        if self.deterministic:
            self.var = self.std = torch.zeros_like(
                self.mean, device=self.parameters.device, dtype=self.parameters.dtype
            )

    def sample(self, generator: Optional[torch.Generator] = None) -> torch.Tensor:  # noqa: UP045
        # make sure sample is on the same device as the parameters and has same dtype
        sample = randn_tensor(
            self.mean.shape,
            generator=generator,
            device=self.parameters.device,
            dtype=self.parameters.dtype,
        )
        x = self.mean + self.std * sample
        return x

    def kl(self, other: "DiagonalGaussianDistribution" = None) -> torch.Tensor:  # noqa: UP037
        if self.deterministic:
            return torch.Tensor([0.0])
        else:
            if other is None:
                return 0.5 * torch.sum(
                    torch.pow(self.mean, 2) + self.var - 1.0 - self.logvar,
                    dim=[1, 2, 3],
                )
            else:
                return 0.5 * torch.sum(
                    torch.pow(self.mean - other.mean, 2) / other.var
                    + self.var / other.var
                    - 1.0
                    - self.logvar
                    + other.logvar,
                    dim=[1, 2, 3],
                )

    def nll(self, sample: torch.Tensor, dims: Tuple[int, ...] = [1, 2, 3]) -> torch.Tensor:  # noqa: B006, UP006
        if self.deterministic:
            return torch.Tensor([0.0])
        logtwopi = np.log(2.0 * np.pi)
        return 0.5 * torch.sum(
            logtwopi + self.logvar + torch.pow(sample - self.mean, 2) / self.var,
            dim=dims,
        )

    def mode(self) -> torch.Tensor:
        return self.mean


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def moments(shape, dtype=torch.float32, seed=0, spread=True) -> torch.Tensor:
    """Encoder moments [B, 2C, ...]; with ``spread`` some logvars lie outside the clamp [-30, 20]."""
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(shape, generator=g, dtype=torch.float64)
    if spread:
        half = shape[1] // 2
        flat = p[:, half:].reshape(-1)
        flat[::7] *= 40.0  # logvars near +-40: the clamp's flat region (d/dlogvar = 0 there)
        p[:, half:] = flat.reshape(p[:, half:].shape).clamp(-45, 25)
    return p.to(dtype).to(DEVICE)


def seed_of(generator: torch.Generator) -> int:
    """The seed DiagonalGaussian.sample draws from ``generator`` (its documented contract), without
    advancing it."""
    clone = torch.Generator(device=generator.device).set_state(generator.get_state())
    return int(torch.randint(0, 2**62, (1,), generator=clone, device=clone.device))


def feed_eps(monkeypatch, eps: torch.Tensor) -> None:
    """Make the copy's randn_tensor return ``eps``."""

    def fixed(shape, generator=None, device=None, dtype=None):
        assert tuple(shape) == tuple(eps.shape)
        return eps.to(device=device, dtype=dtype)

    monkeypatch.setitem(globals(), "randn_tensor", fixed)


def grads(out_fn, p: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """d/dp of sum(weights * out_fn(p)) (weights make every element's gradient distinct)."""
    p = p.detach().requires_grad_(True)
    out = out_fn(p)
    (g,) = torch.autograd.grad((out * weights.to(out.dtype)).sum(), p)
    return g


SHAPES = [(3, 10, 5, 7), (1, 2, 1, 1), (4, 8, 3, 1)]


# ----------------------------------------------------------------------------------------------
# Values: mean, logvar, std, var, mode, kl, kl(other), nll
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_attributes_equal_diffusers(shape, dtype):
    p = moments(shape, dtype)
    ours, theirs = DiagonalGaussian(p), DiagonalGaussianDistribution(p)
    assert ours.parameters is p
    for name in ("mean", "logvar", "std", "var"):
        a, b = getattr(ours, name), getattr(theirs, name)
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), name
    assert torch.equal(ours.mode(), theirs.mode())
    assert ours.logvar.min() >= -30 and ours.logvar.max() <= 20
    assert ours.deterministic is False


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_kl_and_nll_equal_diffusers(backend, shape, dtype, poison):
    p = moments(shape, dtype)
    ours, theirs = DiagonalGaussian(p), DiagonalGaussianDistribution(p)
    kl = ours.kl()
    assert kl.shape == (shape[0],) and kl.dtype == dtype
    assert rel_err(kl, to_np(theirs.kl())) < TOL[dtype]
    x = moments((shape[0], shape[1] // 2, *shape[2:]), dtype, seed=5, spread=False)
    assert rel_err(ours.nll(x), to_np(theirs.nll(x))) < TOL[dtype]
    assert rel_err(ours.nll(x, dims=[1, 3]), to_np(theirs.nll(x, dims=[1, 3]))) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("prior_batch", ["same", "one"])
def test_kl_other_equals_diffusers(backend, dtype, prior_batch, poison):
    shape = (3, 10, 5, 7)
    p = moments(shape, dtype)
    q = moments((shape[0] if prior_batch == "same" else 1, *shape[1:]), dtype, seed=9, spread=False)
    ours = DiagonalGaussian(p).kl(DiagonalGaussian(q))
    theirs = DiagonalGaussianDistribution(p).kl(DiagonalGaussianDistribution(q))
    assert ours.shape == (3,)
    assert rel_err(ours, to_np(theirs)) < TOL[dtype]
    # diffusers' own object as ``other`` (duck-typed: mean and logvar)
    assert rel_err(DiagonalGaussian(p).kl(DiagonalGaussianDistribution(q)), to_np(theirs)) < TOL[dtype]


def test_kl_five_dims_keeps_the_trailing_dims_as_diffusers(backend):
    p = moments((2, 6, 3, 4, 5), torch.float64)  # video latents [B, 2C, T, H, W]
    ours, theirs = DiagonalGaussian(p).kl(), DiagonalGaussianDistribution(p).kl()
    assert ours.shape == theirs.shape == (2, 5)
    assert rel_err(ours, to_np(theirs)) < 1e-12


def test_half_precision_kl_accumulates_in_float32(backend):
    p = moments((2, 8, 6, 6), torch.float32).to(torch.bfloat16)
    kl = DiagonalGaussian(p).kl()
    assert kl.dtype == torch.float32
    want = DiagonalGaussianDistribution(p.double()).kl()  # the same bf16 values, summed in float64
    assert rel_err(kl, to_np(want)) < 1e-6


# ----------------------------------------------------------------------------------------------
# Gradients to parameters
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kl_and_nll_gradients_equal_diffusers(backend, dtype):
    shape = (3, 10, 5, 7)
    p = moments(shape, dtype)
    w = torch.rand(shape[0], dtype=torch.float64, device=DEVICE) + 0.5
    got = grads(lambda t: DiagonalGaussian(t).kl(), p, w)
    want = grads(lambda t: DiagonalGaussianDistribution(t).kl(), p, w)
    assert rel_err(got, to_np(want)) < 10 * TOL[dtype]
    half = shape[1] // 2
    assert torch.all(got[:, half:][(p[:, half:] < -30) | (p[:, half:] > 20)] == 0)  # the clamp's flat region
    x = moments((shape[0], half, *shape[2:]), dtype, seed=5, spread=False)
    got = grads(lambda t: DiagonalGaussian(t).nll(x), p, w)
    want = grads(lambda t: DiagonalGaussianDistribution(t).nll(x), p, w)
    assert rel_err(got, to_np(want)) < 10 * TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kl_other_gradients_reach_both_parameters(backend, dtype):
    shape = (3, 10, 5, 7)
    p, q = moments(shape, dtype), moments(shape, dtype, seed=9, spread=False)
    w = torch.rand(shape[0], dtype=torch.float64, device=DEVICE) + 0.5

    def both(cls):
        pp, qq = p.detach().requires_grad_(True), q.detach().requires_grad_(True)
        out = cls(pp).kl(cls(qq))
        return torch.autograd.grad((out * w.to(out.dtype)).sum(), (pp, qq))

    for got, want in zip(both(DiagonalGaussian), both(DiagonalGaussianDistribution), strict=True):
        assert rel_err(got, to_np(want)) < 10 * TOL[dtype]


# ----------------------------------------------------------------------------------------------
# sample(): the same eps gives diffusers' sample; generators reproduce it
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_sample_and_its_gradient_equal_diffusers_with_the_same_eps(backend, monkeypatch, shape, dtype):
    p = moments(shape, dtype)
    g = torch.Generator(device=DEVICE).manual_seed(1234)
    seed = seed_of(g)
    w = torch.rand(p[:, : shape[1] // 2].shape, dtype=torch.float64, device=DEVICE) + 0.5

    ours = DiagonalGaussian(p).sample(g)
    # eps as fastvae's reference draws it for that seed (Philox; normals within float32 rounding)
    eps_ref = torch.from_numpy(reference.eps(seed, ours.shape)).to(DEVICE)
    feed_eps(monkeypatch, eps_ref)
    assert ours.dtype == dtype and ours.shape == eps_ref.shape
    assert rel_err(ours, to_np(DiagonalGaussianDistribution(p).sample())) < 1e-6
    # the op's own eps (mu = 0, logvar = 0 gives z = eps) makes the copy agree to the dtype's rounding
    zeros = torch.zeros(ours.shape, dtype=dtype, device=DEVICE)
    feed_eps(monkeypatch, fastvae.reparameterize(zeros, zeros, seed=seed))
    assert rel_err(ours, to_np(DiagonalGaussianDistribution(p).sample())) < TOL[dtype]

    got = grads(lambda t: DiagonalGaussian(t).sample(torch.Generator(device=DEVICE).manual_seed(1234)), p, w)
    want = grads(lambda t: DiagonalGaussianDistribution(t).sample(), p, w)
    assert rel_err(got, to_np(want)) < 10 * TOL[dtype]


def test_generator_reproduces_and_advances(backend):
    p = moments((3, 10, 5, 7))
    post = DiagonalGaussian(p)
    g = torch.Generator(device=DEVICE).manual_seed(7)
    first, second = post.sample(g), post.sample(g)
    assert not torch.equal(first, second)  # the generator advanced
    g.manual_seed(7)
    assert torch.equal(post.sample(g), first) and torch.equal(post.sample(g), second)
    state = g.get_state()
    a = post.sample(g)
    g.set_state(state)
    assert torch.equal(post.sample(g), a)
    assert not torch.equal(post.sample(torch.Generator(device=DEVICE).manual_seed(8)), first)


def test_sample_without_generator_follows_torch_manual_seed(backend):
    p = moments((3, 10, 5, 7))
    post = DiagonalGaussian(p)
    torch.manual_seed(3)
    got = post.sample()
    torch.manual_seed(3)
    assert torch.equal(got, fastvae.reparameterize(post.mean, post.logvar))
    assert not torch.equal(post.sample(), got)  # fresh eps on every call


def test_a_list_of_generators_gives_each_sample_its_own_stream(backend):
    p = moments((3, 10, 5, 7))
    post = DiagonalGaussian(p)
    z = post.sample([torch.Generator(device=DEVICE).manual_seed(s) for s in (1, 2, 3)])
    for b, s in enumerate((1, 2, 3)):
        alone = DiagonalGaussian(p[b : b + 1]).sample(torch.Generator(device=DEVICE).manual_seed(s))
        assert torch.equal(z[b : b + 1], alone)
    one = torch.Generator(device=DEVICE).manual_seed(4)
    assert torch.equal(post.sample([one]), post.sample(torch.Generator(device=DEVICE).manual_seed(4)))


# ----------------------------------------------------------------------------------------------
# deterministic=True
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_deterministic_is_diffusers_point_mass(dtype):
    p = moments((3, 10, 5, 7), dtype)
    ours, theirs = (
        DiagonalGaussian(p, deterministic=True),
        DiagonalGaussianDistribution(p, deterministic=True),
    )
    assert ours.deterministic is True
    for name in ("mean", "logvar", "std", "var"):
        a, b = getattr(ours, name), getattr(theirs, name)
        assert a.dtype == b.dtype and torch.equal(a, b), name
    z = ours.sample(torch.Generator(device=DEVICE).manual_seed(0))
    assert torch.equal(z, theirs.sample()) and torch.equal(z, ours.mean)
    assert z.data_ptr() != p.data_ptr()  # a new tensor, as mean + 0 * eps is
    for a, b in ((ours.kl(), theirs.kl()), (ours.nll(z), theirs.nll(z))):
        assert a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)
    q = p.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(DiagonalGaussian(q, deterministic=True).sample().sum(), q)
    assert torch.equal(g[:, :5], torch.ones_like(g[:, :5])) and torch.equal(
        g[:, 5:], torch.zeros_like(g[:, 5:])
    )


# ----------------------------------------------------------------------------------------------
# A diffusers-style training step, and torch.compile
# ----------------------------------------------------------------------------------------------


class TinyKL(nn.Module):
    """AutoencoderKL in miniature: conv encoder -> moments [B, 2C, h, w]; conv decoder."""

    def __init__(self, latent: int = 3):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.SiLU(), nn.Conv2d(8, 8, 3, padding=1)
        )
        self.quant_conv = nn.Conv2d(8, 2 * latent, 1)
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(latent, 8, 4, stride=2, padding=1), nn.SiLU(), nn.Conv2d(8, 3, 3, padding=1)
        )

    def encode(self, x, cls):
        return cls(self.quant_conv(self.encoder(x)))


def training_step(model, x, cls, generator, kl_weight=1e-3):
    """diffusers' train_autoencoderkl.py pattern: MSE + kl_weight * posterior.kl().mean()."""
    posterior = model.encode(x, cls)
    z = posterior.sample(generator=generator)
    rec = model.decoder(z)
    kl_loss = posterior.kl().mean()
    return F.mse_loss(rec, x) + kl_weight * kl_loss


def test_diffusers_training_step(backend, monkeypatch):
    torch.manual_seed(0)
    model = TinyKL().double().to(DEVICE)
    x = torch.rand(2, 3, 10, 14, dtype=torch.float64, device=DEVICE) * 2 - 1
    params = list(model.parameters())

    g = torch.Generator(device=DEVICE).manual_seed(11)
    seed = seed_of(g)
    loss = training_step(model, x, DiagonalGaussian, g)
    # a gradient for a penalty or a balancing weight first, then the ordinary backward
    first = torch.autograd.grad(loss, params, retain_graph=True)
    loss.backward()
    for p, a in zip(params, first, strict=True):
        assert torch.equal(p.grad, a)
    ours = [p.grad.clone() for p in params]
    model.zero_grad()

    zeros = torch.zeros(2, 3, 5, 7, dtype=torch.float64, device=DEVICE)
    feed_eps(monkeypatch, fastvae.reparameterize(zeros, zeros, seed=seed))
    want_loss = training_step(model, x, DiagonalGaussianDistribution, None)
    want_loss.backward()
    assert rel_err(loss, to_np(want_loss)) < 1e-12
    for got, p in zip(ours, params, strict=True):
        assert rel_err(got, to_np(p.grad)) < 1e-10


def test_torch_compile_fullgraph_matches_eager():
    p = moments((2, 6, 4, 5)).requires_grad_(True)
    q = moments((1, 6, 4, 5), seed=3, spread=False).requires_grad_(True)  # a learned prior

    def step(params, prior):
        posterior = DiagonalGaussian(params)
        z = posterior.sample()
        kl = posterior.kl().mean() + posterior.kl(DiagonalGaussian(prior)).mean()
        return (z * z).mean() + 1e-2 * kl + posterior.mode().sum()

    torch.manual_seed(5)
    eager = step(p, q)
    g_eager = torch.autograd.grad(eager, (p, q))
    compiled = torch.compile(step, fullgraph=True)
    torch.manual_seed(5)
    got = compiled(p, q)
    g_got = torch.autograd.grad(got, (p, q))
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_got, g_eager, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "parameters, error, pattern",
    [
        (np.zeros((2, 4)), TypeError, "parameters must be a floating-point torch.Tensor"),
        (torch.zeros(2, 4, dtype=torch.int64), TypeError, "parameters must be a floating-point.*int64"),
        (torch.zeros(4), ValueError, "parameters must have at least 2 dims"),
        (torch.zeros(2, 3, 4, 4), ValueError, "parameters must have an even size along dim 1"),
    ],
)
def test_bad_parameters(parameters, error, pattern):
    with pytest.raises(error, match=pattern):
        DiagonalGaussian(parameters)


def test_kl_refuses_ranks_diffusers_cannot_sum():
    for shape in ((3, 8), (3, 8, 5)):
        with pytest.raises(ValueError, match=r"kl\(\) sums over dims \[1, 2, 3\].*at least 4 dims"):
            DiagonalGaussian(torch.zeros(shape)).kl()
    assert DiagonalGaussian(torch.zeros(3, 8)).sample().shape == (3, 4)  # the rest works at any rank


def test_bad_nll_dims_other_and_generator():
    post = DiagonalGaussian(torch.zeros(2, 4, 3, 3))
    with pytest.raises(ValueError, match=r"dims must index the 4 dims"):
        post.nll(torch.zeros(2, 2, 3, 3), dims=[1, 4])
    with pytest.raises(TypeError, match="other must be a DiagonalGaussian"):
        post.kl(torch.zeros(2, 4, 3, 3))
    with pytest.raises(ValueError, match=r"other's mean \[2, 2, 4, 3\] and logvar .* must broadcast"):
        post.kl(DiagonalGaussian(torch.zeros(2, 4, 4, 3)))
    with pytest.raises(ValueError, match="other must not be deterministic"):
        post.kl(DiagonalGaussian(torch.zeros(2, 4, 3, 3), deterministic=True))
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        post.sample(generator=3)
    with pytest.raises(ValueError, match="a list of 2 .one per sample., got a list of 3"):
        post.sample([torch.Generator() for _ in range(3)])
