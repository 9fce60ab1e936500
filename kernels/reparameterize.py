"""Reparameterization sample in one pass: ``z = mu + exp(logvar / 2) * eps``, ``eps ~ N(0, 1)``.

``eps`` never exists in memory: element i draws ``eps[i] = randn(key, offset + i)`` from
Philox4x32-10 (``tl.randn``'s mapping: the first two 32-bit words as uniforms, one Box-Muller normal,
with a short-range cosine instead of libdevice ``cosf``), keyed by
the 64-bit ``key`` and counted by the int64 ``offset + i``, so the draw depends on neither the block
size nor the grid, and the backward regenerates it instead of loading it.  ``key`` is a Python int
(an explicit seed, passed by value) or a 1-element int64 tensor that the kernel loads: the host never
reads it, so a replayed CUDA graph draws with whatever key the device holds at replay time.

Bytes (N elements, s bytes each):
    forward   reads mu, logvar          writes z         = 3 N s
    backward  reads dz, logvar          writes dlogvar   = 3 N s
              (dmu = dz needs no pass; replaying eps costs arithmetic, not bytes, and is exact:
               0.5 * dz * (z - mu) would read z and mu, and loses the low bits of std * eps when
               |mu| >> std.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from fastvae.kernels.launch import Launcher
from torch import Tensor

from fastvae.backend import Key

__all__ = ["reparameterize", "reparameterize_backward"]

BLOCK = 1024  # 8 elements a thread at 4 warps: two 128-bit loads of fp32 per operand.
NUM_WARPS = 4
MAXNREG = 64  # 8 Philox streams a thread want 68 registers; 64 (no spill) keeps 50% occupancy on sm_90


@triton.jit
def _cos_0_2pi(theta):
    """cos(theta) for float32 theta in [0, 2 pi] (2 pi u for a uniform u), within 1.5 ulp of cos(theta).

    j = rint(theta / (pi / 2)) in {0, ..., 4}; y = theta - j pi / 2 by Cody-Waite: fma(-j, PIO2_HI,
    theta) is exact (the exact difference is a multiple of 2^-23 below 1), then the low part of pi / 2;
    |y| <= pi / 4.  cos(theta) = cos(y), -sin(y), -cos(y), sin(y) for j mod 4 = 0, 1, 2, 3, with the
    Cephes minimax polynomials of cosf / sinf on [-pi / 4, pi / 4].  Straight-line code (about 20
    instructions): no libdevice cosf, whose slow path for large arguments (never taken here) puts a
    32-byte stack in the kernel under Triton 3.6.
    """
    j = tl.floor(theta * 0.6366197723675814 + 0.5)
    y = tl.fma(j, -1.5707963705062866, theta)  # PIO2_HI = float32(pi / 2)
    y = tl.fma(j, 4.371139000186243e-08, y)  # PIO2_LO = pi / 2 - PIO2_HI, negated
    z = y * y
    c = tl.fma(z, 2.443315711809948e-5, -1.388731625493765e-3)
    c = tl.fma(z, c, 4.166664568298827e-2)
    c = tl.fma(z, c, -0.5)
    c = tl.fma(z, c, 1.0)
    s = tl.fma(z, -1.9515295891e-4, 8.3321608736e-3)
    s = tl.fma(z, s, -1.6666654611e-1)
    s = tl.fma(y * z, s, y)
    q = j.to(tl.int32) & 3
    v = tl.where((q & 1) == 1, s, c)
    return tl.where((q == 1) | (q == 2), -v, v)


@triton.jit
def _philox_first_two_words(seed, counter):
    """Words 0 and 1 of Philox4x32-10 with key (seed_lo, seed_hi) and counter (lo, hi, 0, 0): the same
    numbers as ``tl.randint4x``.  Each round's two 32 x 32-bit products are taken as one 64-bit product
    (hi and lo from one IMAD.WIDE.U32) instead of ``umulhi`` plus a separate low multiply."""
    seed = seed.to(tl.uint64)
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = (seed >> 32).to(tl.uint32)
    c0 = counter.to(tl.uint32)
    c1 = (counter >> 32).to(tl.uint32)
    c2 = tl.zeros_like(c0)
    c3 = tl.zeros_like(c0)
    for _ in tl.static_range(10):
        pa = c0.to(tl.uint64) * 0xD2511F53
        pb = c2.to(tl.uint64) * 0xCD9E8D57
        c0 = (pb >> 32).to(tl.uint32) ^ c1 ^ k0
        c2 = (pa >> 32).to(tl.uint32) ^ c3 ^ k1
        c1 = pb.to(tl.uint32)
        c3 = pa.to(tl.uint32)
        k0 = (k0.to(tl.uint64) + 0x9E3779B9).to(tl.uint32)
        k1 = (k1.to(tl.uint64) + 0xBB67AE85).to(tl.uint32)
    return c0, c1


@triton.jit
def _randn(seed, counter):
    """``tl.randn(seed, counter)`` with a short-range cosine: the same Philox4x32-10 words and uniforms
    bit for bit, u1 = max(1e-7, u1), theta = float32(2 pi) u2, n = sqrt(-2 log u1) cos(theta)."""
    w1, w2 = _philox_first_two_words(seed, counter)
    # Triton's uint_to_uniform_float for 32-bit words: int32 x -> (x < 0 ? ~x : x) * 4.6566127342e-10.
    x1 = w1.to(tl.int32, bitcast=True)
    x2 = w2.to(tl.int32, bitcast=True)
    u1 = tl.where(x1 < 0, ~x1, x1).to(tl.float32) * 4.6566127342e-10
    u2 = tl.where(x2 < 0, ~x2, x2).to(tl.float32) * 4.6566127342e-10
    u1 = tl.maximum(1.0e-7, u1)
    theta = 6.283185307179586 * u2
    return tl.sqrt(-2.0 * tl.log(u1)) * _cos_0_2pi(theta)


@triton.jit(do_not_specialize=["key", "offset"])
def reparameterize_kernel(
    a_ptr,  # forward: mu; backward: dz (the incoming gradient)
    logvar_ptr,
    out_ptr,  # forward: z; backward: dlogvar
    key,  # KEY_IS_PTR: pointer to the int64 key; else the key itself
    offset,
    n_elements,
    BACKWARD: tl.constexpr,
    KEY_IS_PTR: tl.constexpr,
    COMPUTE: tl.constexpr,  # float32, or float64 for float64 inputs
    BLOCK: tl.constexpr,
):
    """forward: out = a + exp(lv / 2) eps;  backward: out = d z/d lv * dz = 0.5 a exp(lv / 2) eps."""
    # int64 indices: the counter of the RNG and the address, correct past 2**31 elements.
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n_elements
    if KEY_IS_PTR:
        seed = tl.load(key)
    else:
        seed = key
    a = tl.load(a_ptr + idx, mask=mask, other=0.0)
    logvar = tl.load(logvar_ptr + idx, mask=mask, other=0.0).to(COMPUTE)
    if COMPUTE == tl.float64:
        std = tl.exp(0.5 * logvar)
    else:
        # exp(lv / 2) = 2^(lv log2(e) / 2): one FMUL and one MUFU.EX2, relative error 2 ulp + |lv| 2^-25
        std = tl.exp2(logvar * 0.7213475204444817)
    eps = _randn(seed, idx + offset).to(COMPUTE)
    if BACKWARD:
        out = 0.5 * a.to(COMPUTE) * std * eps
    else:
        out = a.to(COMPUTE) + std * eps
    tl.store(out_ptr + idx, out.to(out_ptr.dtype.element_ty), mask=mask)


_LAUNCH: dict[tuple, tuple] = {}


def _launch(a: Tensor, logvar: Tensor, key: Key, offset: int, backward: bool) -> Tensor:
    device = a.device
    out = torch.empty(a.shape, device=device, dtype=a.dtype)
    n = a.numel()
    if n == 0:
        return out
    key_is_ptr = isinstance(key, Tensor)
    cfg = (n, a.dtype, backward, key_is_ptr)
    launch = _LAUNCH.get(cfg)
    if launch is None:
        fp64 = a.dtype == torch.float64
        # float64 (gradcheck): half the elements a thread and no register cap, so nothing spills.
        block = BLOCK // 2 if fp64 else BLOCK
        kw = dict(BACKWARD=backward, KEY_IS_PTR=key_is_ptr, BLOCK=block, num_warps=NUM_WARPS)
        if fp64:
            kw["COMPUTE"] = tl.float64
        else:
            kw.update(COMPUTE=tl.float32, maxnreg=MAXNREG)
        launch = _LAUNCH[cfg] = Launcher(reparameterize_kernel, ((n + block - 1) // block,), kw)
    launch(a, logvar, out, key, offset, n)
    return out


def reparameterize(mu: Tensor, logvar: Tensor, key: Key, offset: int) -> Tensor:
    """``z = mu + exp(logvar / 2) * eps``, ``eps[i] = randn(key, offset + i)`` over the flat index i;
    mu and logvar contiguous, of one shape and dtype; z new and contiguous."""
    return _launch(mu, logvar, key, offset, backward=False)


def reparameterize_backward(dz: Tensor, logvar: Tensor, key: Key, offset: int) -> Tensor:
    """``dlogvar = 0.5 * dz * exp(logvar / 2) * eps`` with the forward's eps (dmu is dz itself)."""
    return _launch(dz, logvar, key, offset, backward=True)
