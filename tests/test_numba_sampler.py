"""The Numba CPU sampler (``reparameterize`` / ``reparameterize_backward``) against the float64 reference.

Covers the vectorized Philox4x32-10 + Box-Muller of ``kernels/numba_cpu.py`` (four normals a Philox
call): the uniforms bit for bit against ``reference.uniform_pair`` (counters above 2^32, offsets in
every phase mod 4, keys above 2^63), the normals
within a few float64 ulp of ``reference.randn``, keys as ints and as tensors the host never reads,
z and dlogvar in every dtype over awkward shapes, serial and parallel paths bit for bit, poisoned
outputs and the errors on bad arguments.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from conftest import device_only_key, rel_err, to_np
from fastvae.kernels import numba_cpu

from fastvae import reference as ref

TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 2e-2, torch.bfloat16: 2e-2}
SHAPES = ((1,), (7,), (3, 5), (1000, 129), (5, 1, 28, 28), (0, 4))
KEYS = (0, 1, 0x1234_5678_9ABC, 2**63 + 12345, 2**64 - 1)
# (offset, n): offsets in every phase mod 4 (the lane of the first element in its Philox call)
COUNTERS = ((0, 4099), (2**32 - 2000, 4001), (2**40 + 3, 1025), (2**62 + 17, 513))
COUNTERS += ((2, 1), (2**32 - 3, 9), (5, 4))


@pytest.mark.parametrize("key", KEYS)
def test_uniforms_bit_for_bit_and_normals_within_ulps(key):
    for offset, n in COUNTERS:
        u1, u2, eps, eps32 = numba_cpu.sample_eps(key, offset, n)
        counters = offset + np.arange(n, dtype=np.int64)
        want1, want2 = ref.uniform_pair(key, counters)
        assert u1.dtype == np.float32 and np.array_equal(u1.view(np.uint32), want1.view(np.uint32))
        assert np.array_equal(u2.view(np.uint32), want2.view(np.uint32))
        want = ref.randn(key, counters)
        ulps = np.abs(eps - want) / np.spacing(np.abs(want))
        assert ulps.max() <= 4.0, f"offset {offset}: normals {ulps.max()} float64 ulp from the reference"
        ulps32 = np.abs(eps32 - want) / np.spacing(np.abs(want).astype(np.float32))
        assert eps32.dtype == np.float32 and ulps32.max() <= 4.0, (
            f"offset {offset}: {ulps32.max()} float32 ulp"
        )


def test_key_int_and_tensor_agree_and_tensor_is_never_read_on_the_host():
    mu = torch.randn(37, 11, dtype=torch.float64)
    lv = torch.randn(37, 11, dtype=torch.float64)
    for key in KEYS:
        want = numba_cpu.reparameterize(mu, lv, key, 5)
        for tkey in (
            device_only_key(key),
            device_only_key(key).reshape(()),
            torch.tensor([key - 2**64 * (key >= 2**63)]),
        ):
            assert torch.equal(numba_cpu.reparameterize(mu, lv, tkey, 5), want)
        dz = torch.randn(37, 11, dtype=torch.float64)
        assert torch.equal(
            numba_cpu.reparameterize_backward(dz, lv, device_only_key(key), 5),
            numba_cpu.reparameterize_backward(dz, lv, key, 5),
        )
        assert rel_err(want, ref.reparameterize(to_np(mu), to_np(lv), key, 5)) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(poison, dtype, shape):
    g = torch.Generator().manual_seed(sum(shape) * 31 + len(str(dtype)))
    mu = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    lv = (torch.randn(shape, generator=g, dtype=torch.float64) * 2).to(dtype)
    dz = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    for key, offset in ((42, 0), (2**63 + 7, 2**32 - 3)):
        z = numba_cpu.reparameterize(mu, lv, key, offset)
        dlv = numba_cpu.reparameterize_backward(dz, lv, device_only_key(key), offset)
        assert z.dtype == dtype and z.shape == mu.shape and z.is_contiguous()
        assert dlv.dtype == dtype and dlv.shape == mu.shape
        want_z = ref.reparameterize(to_np(mu), to_np(lv), key, offset)
        _, want_dlv = ref.reparameterize_backward(to_np(dz), to_np(lv), key, offset)
        assert rel_err(z, want_z) < TOL[dtype], f"z, key {key}, offset {offset}"
        assert rel_err(dlv, want_dlv) < TOL[dtype], f"dlogvar, key {key}, offset {offset}"


def test_offset_continues_the_stream():
    """A call at offset k draws exactly the eps a call from 0 draws at flat index k onwards."""
    mu = torch.zeros(5000)
    lv = torch.zeros(5000)
    whole = numba_cpu.reparameterize(mu, lv, 9, 0)
    for k in (1, 7, 4096, 4999):
        assert torch.equal(numba_cpu.reparameterize(mu[k:], lv[k:], 9, k), whole[k:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_serial_and_parallel_bit_for_bit(monkeypatch, dtype):
    shape = (513, 131)  # 67,203 draws: above the parallel threshold, not a multiple of the task size
    assert shape[0] * shape[1] >= numba_cpu._PARALLEL_MIN_DRAWS
    g = torch.Generator().manual_seed(8)
    mu, lv, dz = (torch.randn(shape, generator=g, dtype=dtype) for _ in range(3))
    key = device_only_key(2**40 + 1)
    par = (numba_cpu.reparameterize(mu, lv, key, 3), numba_cpu.reparameterize_backward(dz, lv, key, 3))
    monkeypatch.setattr(numba_cpu, "_PARALLEL_MIN_DRAWS", 1 << 62)
    ser = (numba_cpu.reparameterize(mu, lv, key, 3), numba_cpu.reparameterize_backward(dz, lv, key, 3))
    for a, b in zip(par, ser, strict=True):
        assert torch.equal(a, b)
    assert rel_err(par[0], ref.reparameterize(to_np(mu), to_np(lv), 2**40 + 1, 3)) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape", [(64, 40), (513, 131)], ids=["serial", "parallel"])
def test_eps_memo_is_invisible(monkeypatch, dtype, shape):
    """A backward after its forward (eps kept), after another key's forward (kept eps of the wrong
    key: drawn again), and with the memo off: the same bits."""
    g = torch.Generator().manual_seed(9)
    mu, lv, dz = (torch.randn(shape, generator=g).to(dtype) for _ in range(3))
    key, other = device_only_key(77), device_only_key(78)
    numba_cpu.reparameterize(mu, lv, key, 11)
    kept = numba_cpu._memo[-1]
    assert kept[1:3] == (11, mu.numel()) and kept[0] == (
        torch.float64 if dtype == torch.float64 else torch.float32
    )
    after_forward = numba_cpu.reparameterize_backward(dz, lv, key, 11)
    numba_cpu.reparameterize(mu, lv, other, 11)  # the newest kept eps now belong to another key
    after_other = numba_cpu.reparameterize_backward(dz, lv, key, 11)
    monkeypatch.setattr(numba_cpu, "_MEMO_MIN", 1 << 62)
    drawn = numba_cpu.reparameterize_backward(dz, lv, key, 11)
    assert torch.equal(after_forward, drawn) and torch.equal(after_other, drawn)
    _, want = ref.reparameterize_backward(to_np(dz), to_np(lv), 77, 11)
    assert rel_err(drawn, want) < TOL[dtype]


def test_eps_memo_across_threads():
    """Forwards and backwards of different keys interleaved on 4 threads: each backward is exact."""
    g = torch.Generator().manual_seed(10)
    mu, lv, dz = (torch.randn(96, 50, generator=g) for _ in range(3))

    def work(key: int) -> bool:
        ok = True
        for step in range(20):
            numba_cpu.reparameterize(mu, lv, key + step, 0)
            got = numba_cpu.reparameterize_backward(dz, lv, key + step, 0)
            _, want = ref.reparameterize_backward(to_np(dz), to_np(lv), key + step, 0)
            ok &= rel_err(got, want) < 1e-5
        return ok

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(work, (1000, 2000, 3000, 4000)))


def test_bad_arguments_name_the_argument():
    mu, lv = torch.zeros(4, 3), torch.zeros(4, 3)
    with pytest.raises(ValueError, match="key"):
        numba_cpu.reparameterize(mu, lv, -1, 0)
    with pytest.raises(ValueError, match="key"):
        numba_cpu.reparameterize(mu, lv, 2**64, 0)
    with pytest.raises(ValueError, match="key"):
        numba_cpu.reparameterize(mu, lv, torch.tensor([1], dtype=torch.int32), 0)
    with pytest.raises(ValueError, match="key"):
        numba_cpu.reparameterize(mu, lv, torch.tensor([1, 2]), 0)
    with pytest.raises(TypeError):
        numba_cpu.reparameterize(mu, lv, 1.5, 0)
    with pytest.raises(ValueError, match="offset"):
        numba_cpu.reparameterize(mu, lv, 1, -1)
    with pytest.raises(ValueError, match="logvar"):
        numba_cpu.reparameterize(mu, lv[:3], 1, 0)
    with pytest.raises(ValueError, match="logvar"):
        numba_cpu.reparameterize(mu, lv.double(), 1, 0)
    with pytest.raises(ValueError, match="contiguous"):
        numba_cpu.reparameterize_backward(mu.t(), lv.t(), 1, 0)
