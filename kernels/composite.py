"""Plain composite PyTorch implementation of the fused ops (``FASTVAE_BACKEND=torch``).

The same contract as the Triton launchers, written with ordinary torch operations, so it runs on any
device and serves as a comparison point.  Philox4x32-10 is reproduced with int64 tensor arithmetic,
so ``reparameterize`` draws exactly the eps of the Triton and Numba kernels.
"""

from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57


def _mul_hi_lo(const: int, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of const * c for 32-bit words, in int64 without overflow.

    With c = ch 2^16 + cl:  hi = (const ch + (const cl >> 16)) >> 16; every partial stays below 2^49.
    """
    ch, cl = c >> 16, c & 0xFFFF
    p_hi, p_lo = const * ch, const * cl
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = ((p_hi & 0xFFFF) << 16) + p_lo
    return hi & _M32, lo & _M32


def randn(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """tl.randn(seed, offsets) in float64 (uniforms bit-identical to the kernels')."""
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    c0, c1 = offsets & _M32, offsets >> 32
    c2 = torch.zeros_like(offsets)
    c3 = torch.zeros_like(offsets)
    for _ in range(10):
        hi_b, lo_b = _mul_hi_lo(_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _M32, (k1 + _KEY_B) & _M32

    def uniform(word: torch.Tensor) -> torch.Tensor:
        x = torch.where(word >= 2**31, _M32 - word, word)  # int32 view, negative -> ~x
        return x.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32)

    u1 = torch.clamp(uniform(c0), min=torch.tensor(1.0e-7, dtype=torch.float32).item()).double()
    theta = (torch.tensor(6.283185307179586, dtype=torch.float32) * uniform(c1)).double()
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(theta)


def _eps(like: torch.Tensor, seed: int) -> torch.Tensor:
    offsets = torch.arange(like.numel(), dtype=torch.int64, device=like.device)
    return randn(seed, offsets).reshape(like.shape)


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, seed: int) -> torch.Tensor:
    """z = mu + exp(logvar / 2) * eps."""
    z = mu.double() + torch.exp(0.5 * logvar.double()) * _eps(mu, seed)
    return z.to(mu.dtype)


def reparameterize_backward(dz: torch.Tensor, logvar: torch.Tensor, seed: int) -> torch.Tensor:
    """dlogvar = 0.5 * dz * exp(logvar / 2) * eps."""
    return (0.5 * dz.double() * torch.exp(0.5 * logvar.double()) * _eps(dz, seed)).to(dz.dtype)


def fused_loss(logits, target, mu, logvar, beta: float, reduction: str, recon: str, need_grad: bool):
    """Same contract as ``fused_loss.fused_loss`` (Triton), in float32 (float64 for float64 inputs)."""
    ref = logits if logits is not None else mu
    B, device = ref.shape[0], ref.device
    acc = torch.float64 if ref.dtype == torch.float64 else torch.float32
    grad_scale = 1.0 / B if reduction == "mean" else 1.0
    zeros = torch.zeros(B, dtype=acc, device=device)
    recon_rows, kl_rows = zeros, zeros.clone()
    dlogits, dmu, dlogvar = (torch.empty(0, dtype=ref.dtype, device=device) for _ in range(3))
    if logits is not None:
        x = logits.to(acc)
        t = target.to(acc) / 255.0 if target.dtype == torch.uint8 else target.to(acc)
        if recon == "bce":
            recon_rows = (x.clamp(min=0) - x * t + torch.log1p(torch.exp(-x.abs()))).sum(1)
            grad = torch.sigmoid(x) - t
        else:
            recon_rows = ((x - t) ** 2).sum(1)
            grad = 2.0 * (x - t)
        if need_grad:
            dlogits = (grad * grad_scale).to(logits.dtype)
    if mu is not None:
        m, lv = mu.to(acc), logvar.to(acc)
        var = torch.exp(lv)
        kl_rows = (-0.5 * (1.0 + lv - m * m - var)).sum(1)
        if need_grad:
            dmu = (m * (beta * grad_scale)).to(mu.dtype)
            dlogvar = (0.5 * (var - 1.0) * (beta * grad_scale)).to(logvar.dtype)
    if reduction == "none":
        return recon_rows + beta * kl_rows, recon_rows, kl_rows, dlogits, dmu, dlogvar
    scale = 1.0 / B if reduction == "mean" else 1.0
    r, k = recon_rows.sum() * scale, kl_rows.sum() * scale
    return r + beta * k, r, k, dlogits, dmu, dlogvar


def scale_rows_(grad: torch.Tensor, dlogits: torch.Tensor, dmu: torch.Tensor, dlogvar: torch.Tensor) -> None:
    """In place: saved gradient rows *= g (scalar, or [B] for reduction "none")."""
    g = grad.reshape(-1, 1) if grad.dim() == 1 else grad
    for buf in (dlogits, dmu, dlogvar):
        if buf.numel():
            buf.copy_(buf * g)
