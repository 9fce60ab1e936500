"""The VAE loss in one pass over the data: reconstruction + beta * KL, with its gradients.

Per sample b (features f, latent dims d), with x = logits, t = target, s = sigmoid:

    BCE(x, t)  = sum_f  max(x, 0) - x t + log1p(exp(-|x|))      d/dx = s(x) - t
    SSE(x, t)  = sum_f  (x - t)^2                                d/dx = 2 (x - t)
    KL(mu, lv) = -1/2 sum_d (1 + lv - mu^2 - exp(lv))            d/dmu = mu,  d/dlv = (exp(lv) - 1) / 2
    loss_b     = recon_b + beta * KL_b

The loss is the last node of a VAE's graph, so its gradient is known during the forward: each program
takes BLOCK_B rows, streams them once, and writes d logits, d mu, d logvar (already scaled by beta and
by 1/B for the "mean" reduction) next to the per-row partial sums.  The backward then only multiplies
by the incoming gradient g, and skips rows whose g is exactly 1 (``loss.backward()``): masked loads
and stores move no bytes, so the common case costs a launch and no traffic, with no host sync.

Bytes (B rows, F features, D latent; s = element size, s_t = 1 for uint8 targets):
    forward   reads logits, target, mu, logvar; writes dlogits, dmu, dlogvar
              = B F (2 s + s_t) + 4 B D s + 8 B (row partials)
    sum       reads 2 B fp32 partials, writes 3 scalars (one program, fixed order: deterministic)
    backward  0 when g == 1, else reads and writes each gradient once

No floating-point atomics anywhere: the same inputs give bit-identical losses and gradients.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

RECON_NONE, RECON_BCE, RECON_SSE = 0, 1, 2
TILE = 4096  # elements a program holds per operand and iteration (16 KiB of fp32)
SUM_BLOCK = 1024


@triton.jit
def _bce_with_logits(x, t):
    """Per-element BCE on logits and its gradient, stable for any x.

    e = exp(-|x|) lies in (0, 1], so nothing overflows.  log1p(e) is computed as
    log(u) * e / (u - 1) with u = 1 + e (Goldberg's trick: exact to a few ulp without a log1p).
    """
    e = tl.exp(-tl.abs(x))
    u = 1.0 + e
    log1p_e = tl.where(u == 1.0, e, tl.log(u) * (e / (u - 1.0)))
    loss = tl.maximum(x, 0.0) - x * t + log1p_e
    inv_u = 1.0 / u
    sigmoid = tl.where(x >= 0, inv_u, e * inv_u)
    return loss, sigmoid - t


@triton.jit
def fused_loss_kernel(
    x_ptr,
    t_ptr,
    mu_ptr,
    lv_ptr,
    dx_ptr,
    dmu_ptr,
    dlv_ptr,
    row_loss_ptr,
    row_recon_ptr,
    row_kl_ptr,
    B,
    F,
    D,
    stride_x,
    stride_t,
    stride_mu,
    stride_lv,
    beta,
    grad_scale,
    RECON: tl.constexpr,
    HAS_KL: tl.constexpr,
    TARGET_U8: tl.constexpr,
    NEED_GRAD: tl.constexpr,
    WRITE_ROW_LOSS: tl.constexpr,
    COMPUTE: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_F: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # Rows are int64 so that row * stride never wraps past 2**31 elements.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < B

    recon = tl.zeros([BLOCK_B], COMPUTE)
    if RECON != 0:
        acc = tl.zeros([BLOCK_B, BLOCK_F], COMPUTE)
        for f0 in range(0, F, BLOCK_F):
            cols = f0 + tl.arange(0, BLOCK_F)
            mask = row_mask[:, None] & (cols < F)[None, :]
            x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(COMPUTE)
            t = tl.load(t_ptr + rows[:, None] * stride_t + cols[None, :], mask=mask, other=0).to(COMPUTE)
            if TARGET_U8:
                t = t * (1.0 / 255.0)  # pixels read as t / 255: the data set stays uint8 in memory
            if RECON == 1:
                loss, grad = _bce_with_logits(x, t)
            else:
                diff = x - t
                loss = diff * diff
                grad = 2.0 * diff
            acc += tl.where(mask, loss, 0.0)
            if NEED_GRAD:
                tl.store(
                    dx_ptr + rows[:, None] * F + cols[None, :],
                    (grad * grad_scale).to(dx_ptr.dtype.element_ty),
                    mask=mask,
                )
        recon = tl.sum(acc, axis=1)

    kl = tl.zeros([BLOCK_B], COMPUTE)
    if HAS_KL:
        acc_kl = tl.zeros([BLOCK_B, BLOCK_D], COMPUTE)
        kl_grad_scale = beta * grad_scale
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            mask = row_mask[:, None] & (cols < D)[None, :]
            mu = tl.load(mu_ptr + rows[:, None] * stride_mu + cols[None, :], mask=mask, other=0.0).to(COMPUTE)
            lv = tl.load(lv_ptr + rows[:, None] * stride_lv + cols[None, :], mask=mask, other=0.0).to(COMPUTE)
            var = tl.exp(lv)
            acc_kl += tl.where(mask, -0.5 * (1.0 + lv - mu * mu - var), 0.0)
            if NEED_GRAD:
                offs = rows[:, None] * D + cols[None, :]
                tl.store(dmu_ptr + offs, (mu * kl_grad_scale).to(dmu_ptr.dtype.element_ty), mask=mask)
                tl.store(
                    dlv_ptr + offs,
                    (0.5 * (var - 1.0) * kl_grad_scale).to(dlv_ptr.dtype.element_ty),
                    mask=mask,
                )
        kl = tl.sum(acc_kl, axis=1)

    tl.store(row_recon_ptr + rows, recon.to(row_recon_ptr.dtype.element_ty), mask=row_mask)
    tl.store(row_kl_ptr + rows, kl.to(row_kl_ptr.dtype.element_ty), mask=row_mask)
    if WRITE_ROW_LOSS:
        tl.store(row_loss_ptr + rows, (recon + beta * kl).to(row_loss_ptr.dtype.element_ty), mask=row_mask)


@triton.jit
def sum_rows_kernel(
    row_recon_ptr, row_kl_ptr, loss_ptr, recon_ptr, kl_ptr, B, beta, scale, BLOCK: tl.constexpr
):
    """One program sums the per-row partials in a fixed order: loss = scale * (sum recon + beta * sum KL)."""
    acc_recon = tl.zeros([BLOCK], row_recon_ptr.dtype.element_ty)
    acc_kl = tl.zeros([BLOCK], row_kl_ptr.dtype.element_ty)
    for b0 in range(0, B, BLOCK):
        idx = b0 + tl.arange(0, BLOCK)
        mask = idx < B
        acc_recon += tl.load(row_recon_ptr + idx, mask=mask, other=0.0)
        acc_kl += tl.load(row_kl_ptr + idx, mask=mask, other=0.0)
    recon = tl.sum(acc_recon, axis=0) * scale
    kl = tl.sum(acc_kl, axis=0) * scale
    tl.store(recon_ptr, recon)
    tl.store(kl_ptr, kl)
    tl.store(loss_ptr, recon + beta * kl)


@triton.jit
def scale_rows_kernel(
    g_ptr,
    dx_ptr,
    dmu_ptr,
    dlv_ptr,
    B,
    F,
    D,
    G_PER_ROW: tl.constexpr,
    HAS_X: tl.constexpr,
    HAS_KL: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_F: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """In place: grad[b, :] *= g[b] (or the scalar g), for the rows where g != 1 only."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    if G_PER_ROW:
        g = tl.load(g_ptr + rows, mask=rows < B, other=1.0).to(tl.float32)
    else:
        g = tl.zeros([BLOCK_B], tl.float32) + tl.load(g_ptr).to(tl.float32)
    # Rows whose gradient is already right are masked out: their bytes are never loaded or stored.
    row_mask = (rows < B) & (g != 1.0)
    if HAS_X:
        for f0 in range(0, F, BLOCK_F):
            cols = f0 + tl.arange(0, BLOCK_F)
            mask = row_mask[:, None] & (cols < F)[None, :]
            ptrs = dx_ptr + rows[:, None] * F + cols[None, :]
            v = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
            tl.store(ptrs, (v * g[:, None]).to(dx_ptr.dtype.element_ty), mask=mask)
    if HAS_KL:
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            mask = row_mask[:, None] & (cols < D)[None, :]
            offs = rows[:, None] * D + cols[None, :]
            v = tl.load(dmu_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(dmu_ptr + offs, (v * g[:, None]).to(dmu_ptr.dtype.element_ty), mask=mask)
            v = tl.load(dlv_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(dlv_ptr + offs, (v * g[:, None]).to(dlv_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Launchers.  Inputs are 2-D [B, F] / [B, D] views whose features are contiguous (stride(1) == 1);
# rows may be strided, so slices such as ``mu, logvar = h.chunk(2, dim=1)`` need no copy.
# ----------------------------------------------------------------------------------------------


def block_sizes(batch: int, features: int, latent: int) -> tuple[int, int, int, int]:
    """(BLOCK_B, BLOCK_F, BLOCK_D, num_warps): a TILE-element tile; several rows a program for short rows."""
    block_f = min(triton.next_power_of_2(max(features, 1)), TILE)
    block_d = min(triton.next_power_of_2(max(latent, 1)), TILE)
    block_b = max(1, min(TILE // max(block_f, block_d), triton.next_power_of_2(batch)))
    num_warps = 4 if block_b * max(block_f, block_d) <= 4096 else 8
    return block_b, block_f, block_d, num_warps


def fused_loss(
    logits: torch.Tensor | None,
    target: torch.Tensor | None,
    mu: torch.Tensor | None,
    logvar: torch.Tensor | None,
    beta: float,
    reduction: str,
    recon: str,
    need_grad: bool,
):
    """Returns (loss, recon, kl, dlogits, dmu, dlogvar); gradients are empty tensors when not needed.

    ``recon`` is "bce", "mse" or "none" (KL only); mu/logvar None means no KL term.
    """
    ref = logits if logits is not None else mu
    device = ref.device
    B = ref.shape[0]
    F = logits.shape[1] if logits is not None else 0
    D = mu.shape[1] if mu is not None else 0
    compute = tl.float64 if ref.dtype == torch.float64 else tl.float32
    acc_dtype = torch.float64 if ref.dtype == torch.float64 else torch.float32

    def grad_buffer(like: torch.Tensor | None, cols: int) -> torch.Tensor:
        # Distinct empty tensors when no gradient is stored: outputs of a custom op may not alias.
        if need_grad and cols:
            return torch.empty((B, cols), device=device, dtype=like.dtype)
        return torch.empty(0, device=device, dtype=ref.dtype)

    dlogits, dmu, dlogvar = grad_buffer(logits, F), grad_buffer(mu, D), grad_buffer(logvar, D)
    row_recon = torch.empty(B, device=device, dtype=acc_dtype)
    row_kl = torch.empty(B, device=device, dtype=acc_dtype)
    per_row = reduction == "none"
    row_loss = torch.empty(B, device=device, dtype=acc_dtype) if per_row else row_recon

    block_b, block_f, block_d, num_warps = block_sizes(B, F, D)
    grid = (triton.cdiv(B, block_b),)
    grad_scale = 1.0 / B if reduction == "mean" else 1.0
    fused_loss_kernel[grid](
        logits if F else ref,
        target if F else ref,
        mu if D else ref,
        logvar if D else ref,
        dlogits if need_grad and F else ref,
        dmu if need_grad and D else ref,
        dlogvar if need_grad and D else ref,
        row_loss,
        row_recon,
        row_kl,
        B,
        F,
        D,
        logits.stride(0) if F else 0,
        target.stride(0) if F else 0,
        mu.stride(0) if D else 0,
        logvar.stride(0) if D else 0,
        float(beta),
        grad_scale,
        RECON={"none": RECON_NONE, "bce": RECON_BCE, "mse": RECON_SSE}[recon],
        HAS_KL=D > 0,
        TARGET_U8=F > 0 and target.dtype == torch.uint8,
        NEED_GRAD=need_grad,
        WRITE_ROW_LOSS=per_row,
        COMPUTE=compute,
        BLOCK_B=block_b,
        BLOCK_F=block_f,
        BLOCK_D=block_d,
        num_warps=num_warps,
    )
    if per_row:
        return row_loss, row_recon, row_kl, dlogits, dmu, dlogvar
    loss, recon_sum, kl_sum = (torch.empty((), device=device, dtype=acc_dtype) for _ in range(3))
    scale = 1.0 / B if reduction == "mean" else 1.0
    sum_rows_kernel[(1,)](row_recon, row_kl, loss, recon_sum, kl_sum, B, float(beta), scale, BLOCK=SUM_BLOCK)
    return loss, recon_sum, kl_sum, dlogits, dmu, dlogvar


def scale_rows_(grad: torch.Tensor, dlogits: torch.Tensor, dmu: torch.Tensor, dlogvar: torch.Tensor) -> None:
    """Multiply the saved gradients in place by the incoming gradient (a scalar, or [B] for "none")."""
    B = max(dlogits.shape[0] if dlogits.numel() else 0, dmu.shape[0] if dmu.numel() else 0)
    F = dlogits.shape[1] if dlogits.numel() else 0
    D = dmu.shape[1] if dmu.numel() else 0
    if B == 0:
        return
    block_b, block_f, block_d, num_warps = block_sizes(B, F, D)
    anchor = dlogits if F else dmu
    scale_rows_kernel[(triton.cdiv(B, block_b),)](
        grad.contiguous(),
        dlogits if F else anchor,
        dmu if D else anchor,
        dlogvar if D else anchor,
        B,
        F,
        D,
        G_PER_ROW=grad.dim() == 1,
        HAS_X=F > 0,
        HAS_KL=D > 0,
        BLOCK_B=block_b,
        BLOCK_F=block_f,
        BLOCK_D=block_d,
        num_warps=num_warps,
    )
