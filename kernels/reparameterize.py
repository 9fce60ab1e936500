"""Reparameterization sample in one pass: ``z = mu + exp(logvar / 2) * eps``, ``eps ~ N(0, 1)``.

``eps`` never exists in memory: each element draws it from Philox4x32-10 (``tl.randn``), keyed by
the 64-bit ``seed`` and counted by the element's flat int64 index, so the draw depends on neither the
block size nor the grid, and the backward can regenerate it instead of loading it.

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

BLOCK = 1024  # 8 elements a thread at 4 warps: two 128-bit loads of fp32 per operand.
NUM_WARPS = 4


@triton.jit
def reparameterize_kernel(
    mu_ptr,  # forward: mu; backward: dz (the incoming gradient)
    logvar_ptr,
    out_ptr,  # forward: z; backward: dlogvar
    seed,
    n_elements,
    BACKWARD: tl.constexpr,
    COMPUTE: tl.constexpr,  # float32, or float64 for float64 inputs
    BLOCK: tl.constexpr,
):
    # int64 offsets: the counter of the RNG and the address, correct past 2**31 elements.
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n_elements
    a = tl.load(mu_ptr + offsets, mask=mask, other=0.0)
    logvar = tl.load(logvar_ptr + offsets, mask=mask, other=0.0)
    std = tl.exp(0.5 * logvar.to(COMPUTE))
    eps = tl.randn(seed, offsets).to(COMPUTE)
    if BACKWARD:
        # dz/dlogvar = 0.5 * std * eps
        out = 0.5 * a.to(COMPUTE) * std * eps
    else:
        out = a.to(COMPUTE) + std * eps
    tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)


def _launch(a: torch.Tensor, logvar: torch.Tensor, seed: int, backward: bool) -> torch.Tensor:
    out = torch.empty_like(a, memory_format=torch.contiguous_format)
    n = a.numel()
    grid = (triton.cdiv(n, BLOCK),)
    compute = tl.float64 if a.dtype == torch.float64 else tl.float32
    reparameterize_kernel[grid](
        a, logvar, out, seed, n, BACKWARD=backward, COMPUTE=compute, BLOCK=BLOCK, num_warps=NUM_WARPS
    )
    return out


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, seed: int) -> torch.Tensor:
    """z = mu + exp(logvar / 2) * randn(seed, flat index); mu and logvar contiguous, same shape and dtype."""
    return _launch(mu, logvar, seed, backward=False)


def reparameterize_backward(dz: torch.Tensor, logvar: torch.Tensor, seed: int) -> torch.Tensor:
    """dlogvar = 0.5 * dz * exp(logvar / 2) * randn(seed, flat index) (dmu is dz itself)."""
    return _launch(dz, logvar, seed, backward=True)
