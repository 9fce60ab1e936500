"""The RNG contract: eps[i] = randn(key, offset + i); graph-safe keys that are never read on the host."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from conftest import DEVICE, device_only_key, rel_err, to_np

import fastvae
from fastvae import ops
from fastvae import reference as ref


def _fixed_key(value: int):
    return lambda device: device_only_key(value, device)


def test_seed_none_never_reads_the_key_on_the_host(backend, monkeypatch):
    """With seed=None the key stays a tensor down to the kernel, forward and backward."""
    key = 2**40 + 99
    monkeypatch.setattr(ops, "_draw_key", _fixed_key(key))
    g = torch.Generator().manual_seed(1)
    mu = torch.randn(7, 5, generator=g).to(DEVICE).requires_grad_()
    logvar = torch.randn(7, 5, generator=g).to(DEVICE).requires_grad_()
    z = fastvae.reparameterize(mu, logvar, offset=3)
    dz = torch.randn(7, 5, generator=g).to(DEVICE)
    z.backward(dz)
    assert rel_err(z.as_subclass(torch.Tensor), ref.reparameterize(to_np(mu), to_np(logvar), key, 3)) < 1e-5
    want = ref.reparameterize_backward(to_np(dz), to_np(logvar), key, 3)[1]
    assert rel_err(logvar.grad.as_subclass(torch.Tensor), want) < 1e-5


def test_seed_none_draws_on_the_device_from_torch_generator():
    torch.manual_seed(5)
    k1 = ops._draw_key(torch.device(DEVICE))
    torch.manual_seed(5)
    k2 = ops._draw_key(torch.device(DEVICE))
    assert k1.device.type == DEVICE and k1.dtype == torch.int64 and k1.shape == (1,)
    assert torch.equal(k1, k2)
    assert not torch.equal(k1, ops._draw_key(torch.device(DEVICE)))


def test_fresh_eps_each_call_and_manual_seed_reproduces(backend):
    mu, logvar = torch.zeros(64, 8, device=DEVICE), torch.zeros(64, 8, device=DEVICE)
    torch.manual_seed(0)
    a, b = fastvae.reparameterize(mu, logvar), fastvae.reparameterize(mu, logvar)
    torch.manual_seed(0)
    c = fastvae.reparameterize(mu, logvar)
    assert not torch.equal(a, b)
    assert torch.equal(a, c)


@pytest.mark.parametrize("seed", [0, 7, 2**62 + 5])
def test_offset_is_the_counter_shift(backend, seed):
    """A shard of rows with offset = first_row * features draws the full batch's eps (data parallel)."""
    mu, logvar = torch.randn(10, 6, device=DEVICE), torch.randn(10, 6, device=DEVICE)
    full = fastvae.reparameterize(mu, logvar, seed=seed)
    part = fastvae.reparameterize(mu[4:7], logvar[4:7], seed=seed, offset=4 * 6)
    assert torch.equal(part, full[4:7])
    want = ref.reparameterize(to_np(mu[4:7]), to_np(logvar[4:7]), seed, 24)
    assert rel_err(part, want) < 1e-5


def test_offsets_past_2_32(backend):
    mu, logvar = torch.zeros(3, 4, device=DEVICE), torch.zeros(3, 4, device=DEVICE)
    offset = 2**32 - 5  # the counter's low word wraps inside the call
    z = fastvae.reparameterize(mu, logvar, seed=11, offset=offset)
    assert rel_err(z, ref.eps(11, (3, 4), offset)) < 1e-5


def test_compiled_draws_the_same_eps_as_eager_for_the_same_manual_seed():
    mu, logvar = torch.randn(16, 4, device=DEVICE), torch.randn(16, 4, device=DEVICE)

    def sample(mu, logvar):
        return fastvae.reparameterize(mu, logvar) * 1.0

    torch.manual_seed(3)
    eager = [sample(mu, logvar) for _ in range(2)]
    compiled = torch.compile(sample, fullgraph=True)
    torch.manual_seed(3)
    got = [compiled(mu, logvar) for _ in range(2)]
    assert torch.equal(got[0], eager[0]) and torch.equal(got[1], eager[1])
    assert not torch.equal(got[0], got[1])  # a fresh key on every call of the compiled function


@pytest.mark.parametrize(
    "seed, offset, pattern",
    [(-1, 0, "seed must be"), (2**63, 0, "seed must be"), (True, 0, "seed must be"),
     (1, -1, "offset must be"), (1, 2**63, "offset must be"), (1, 1.0, "offset must be")],
)  # fmt: skip
def test_bad_seed_and_offset(seed, offset, pattern):
    mu = torch.zeros(2, 2)
    with pytest.raises(ValueError, match=pattern):
        fastvae.reparameterize(mu, mu, seed=seed, offset=offset)


def test_device_guard(monkeypatch):
    """Triton and CuPy launch on the current device: ops makes it the tensors' device when it differs."""
    entered = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext(entered.append(d)))
    with ops._on(torch.device("cuda", 1)):
        pass
    with ops._on(torch.device("cuda", 0)), ops._on(torch.device("cpu")):
        pass
    assert entered == [torch.device("cuda", 1)]


def test_reference_eps_is_randn_at_offset_plus_index():
    e = ref.eps(3, (2, 5), 10)
    np.testing.assert_array_equal(e.reshape(-1), ref.randn(3, np.arange(10, 20)))


def test_reference_eps_known_answers():
    """eps of seed 1234 at counters 0..7, pinned: normal n & 3 of Philox4x32-10 with the key 0 at the
    counter (n >> 2, 0, 1234, 0), so counters 0-3 are (r cos, r sin) of Philox words (0, 1) and (2, 3)
    of quad 0.  A silent change of the mapping fails here.  At seed 0 and quad 0 the words are
    Random123's known answer for the zero key and counter."""
    want = [
        -0.334124377538322, 0.5384289297465571, 0.8551954343419081, -0.3157132064012912,
        0.25087680887013697, 0.4230383184599284, 0.1264460319786655, -0.12181253470008174,
    ]  # fmt: skip
    np.testing.assert_allclose(ref.eps(1234, (8,), 0), want, rtol=1e-13, atol=0)
    quad = np.stack(ref.randn4(1234, [0, 1]), axis=1).ravel()  # [counter, lane]
    np.testing.assert_array_equal(quad, ref.eps(1234, (8,), 0))
    words = np.array([0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8], dtype=np.uint32)
    signed = words.view(np.int32)
    kat = np.where(signed < 0, ~signed, signed).astype(np.float32) * np.float32(4.6566127342e-10)
    np.testing.assert_array_equal(np.concatenate(ref.uniform4(0, [0])), kat)


@pytest.mark.parametrize("offset", [0, 1, 2, 3, 5, 2**32 - 3, 2**62 + 1])
def test_eps_at_every_offset_phase_on_every_backend(backend, offset):
    """Every backend draws reference.eps for offsets in each phase mod 4 (the four normals of a Philox
    call), past 2**32 and 2**62, at sizes around a quad and a block; bit-identical on a second run."""
    for n in (1, 3, 4, 5, 127, 4099):
        mu, logvar = torch.zeros(n, device=DEVICE), torch.zeros(n, device=DEVICE)
        z = fastvae.reparameterize(mu, logvar, seed=1234, offset=offset)
        assert rel_err(z, ref.eps(1234, (n,), offset)) < 1e-5, n
        assert torch.equal(z, fastvae.reparameterize(mu, logvar, seed=1234, offset=offset)), n
