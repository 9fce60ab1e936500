"""CuPy-array API of the CUDA C kernels in ``kernels/cuda/`` (compiled at run time by NVRTC through CuPy).

Functional API on CuPy arrays (torch CUDA tensors are accepted too, through DLPack without copies,
and the results then come back as torch tensors)::

    loss, (dlogits, dmu, dlogvar) = fastvae.cupy.vae_loss(logits, target, mu, logvar, beta=1.0)
    loss, recon, kl, grads = fastvae.cupy.vae_loss_terms(logits, target, mu, logvar)
    z = fastvae.cupy.reparameterize(mu, logvar, seed=1234)            # eps[i] = randn(seed, i)
    z = fastvae.cupy.reparameterize(mu, logvar, seed=1234, offset=n)  # eps[i] = randn(seed, n + i)
    dmu, dlogvar = fastvae.cupy.reparameterize_backward(dz, logvar, seed=1234)

The launches (compilation cache, row views, launch configurations) live next to the CUDA sources in
``fastvae.kernels.cupy_launch``, which is also the torch backend (``FASTVAE_BACKEND=cupy``): this
module only validates CuPy arrays, allocates the outputs with CuPy and launches on CuPy's current
device and stream.

The math is ``fastvae.reference`` (the contract): eps is ``randn4(seed, n >> 2)[n & 3]`` for
n = offset + flat index (Philox4x32-10 + Box-Muller, uniforms bit for bit), the loss is computed
per row in fp32 with the gradients written in the same pass, and the batch reduction runs in a
fixed order with no
floating-point atomics, so results are bit-identical run to run.

Importing this module never needs CuPy; calling a function without it raises ImportError with the
install hint.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from fastvae.backend import RECONS as _RECON_IDS
from fastvae.backend import REDUCTIONS as _REDUCTION_IDS
from fastvae.kernels.cupy_launch import (
    FLOAT_CTYPES,
    TARGET_CTYPES,
    _cupy,
    _flat_layout,
    _row_layout,
    _Rows,
    is_available,
    kernel_source,
    launch_reparam,
    launch_vae_loss,
)

__all__ = [
    "is_available",
    "kernel_source",
    "vae_loss",
    "vae_loss_terms",
    "bce_with_logits",
    "mse",
    "kl_divergence",
    "reparameterize",
    "reparameterize_backward",
    "REDUCTIONS",
    "RECONS",
]

REDUCTIONS = ("sum", "mean", "none")
RECONS = ("bce", "mse")


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------


def _check_options(reduction: str, recon: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if recon not in RECONS:
        raise ValueError(f"recon must be one of {RECONS}, got {recon!r}")


def _check_int(name: str, value: Any) -> int:
    """An int (or NumPy integer) in [0, 2**64), else a TypeError / ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int in [0, 2**64), got {type(value).__name__}")
    value = int(value)
    if not 0 <= value < 2**64:
        raise ValueError(f"{name} must lie in [0, 2**64), got {value}")
    return value


def _check_seed(seed: Any) -> int:
    return _check_int("seed", seed)


def _ctype(name: str, dtype_name: str, table: dict[str, str]) -> str:
    try:
        return table[dtype_name]
    except KeyError:
        raise TypeError(
            f"{name}: dtype {dtype_name} is not supported (expected one of {tuple(table)})"
        ) from None


def _check_loss_shapes(shapes: dict[str, tuple[int, ...]]) -> tuple[int, int, int]:
    """Same rules as the torch ops; returns (B, F, D)."""
    for name, shape in shapes.items():
        if len(shape) < 1:
            raise ValueError(f"{name}: expected a [B, ...] array, got a 0-d one")
    lshape, tshape = shapes["logits"], shapes["target"]
    B, F = lshape[0], math.prod(lshape[1:])
    if B < 1:
        raise ValueError(f"logits: the batch is empty (shape {lshape})")
    if tshape[0] != B or math.prod(tshape[1:]) != F:
        raise ValueError(
            f"target: expected batch size {B} and {F} features per row like logits {lshape}, "
            f"got shape {tshape}"
        )
    mshape, vshape = shapes["mu"], shapes["logvar"]
    if mshape[0] != B:
        raise ValueError(f"mu: expected batch size {B} like logits {lshape}, got shape {mshape}")
    if vshape != mshape:
        raise ValueError(f"logvar: expected the shape of mu {mshape}, got {vshape}")
    return B, F, math.prod(mshape[1:])


# ----------------------------------------------------------------------------------------------
# CuPy front end
# ----------------------------------------------------------------------------------------------


def _is_torch(a: Any) -> bool:
    return type(a).__module__.split(".")[0] == "torch"


def _to_cupy(name: str, a: Any):
    cp = _cupy()
    if isinstance(a, cp.ndarray):
        return a
    if _is_torch(a):
        if not a.is_cuda:
            raise ValueError(f"{name}: expected a CUDA tensor, got one on {a.device}")
        try:
            return cp.from_dlpack(a)
        except Exception as exc:
            raise TypeError(
                f"{name}: cannot import this torch tensor ({a.dtype}) into CuPy through DLPack: {exc}. "
                "Use the torch ops with FASTVAE_BACKEND=cupy for bfloat16 torch tensors."
            ) from exc
    raise TypeError(f"{name}: expected a cupy.ndarray or a torch CUDA tensor, got {type(a).__name__}")


def _from_cupy(a, as_torch: bool):
    if a is None or not as_torch:
        return a
    import torch

    return torch.from_dlpack(a)


def _cupy_rows(name: str, a, table: dict[str, str], flat: bool = False):
    """(_Rows, array actually used): a copy only when a row's features are not contiguous."""
    cp = _cupy()
    ctype = _ctype(name, a.dtype.name, table)
    itemsize = a.dtype.itemsize
    if any(s % itemsize for s in a.strides):
        a = cp.ascontiguousarray(a)
    strides = tuple(s // itemsize for s in a.strides)
    layout = (_flat_layout if flat else _row_layout)(a.shape, strides)
    if layout is None:
        a = cp.ascontiguousarray(a)
        layout = (_flat_layout if flat else _row_layout)(a.shape, tuple(s // itemsize for s in a.strides))
    rows, cols, stride = layout
    return _Rows(a.data.ptr, rows, cols, stride, ctype), a


def _same_device(arrays: dict[str, Any]) -> int:
    devices = {name: a.device.id for name, a in arrays.items()}
    first_name, first = next(iter(devices.items()))
    for name, dev in devices.items():
        if dev != first:
            raise ValueError(f"{name}: on device {dev}, but {first_name} is on device {first}")
    return first


def vae_loss_terms(
    logits,
    target,
    mu,
    logvar,
    beta: float = 1.0,
    reduction: str = "sum",
    recon: str = "bce",
    need_grad: bool = True,
    validate: bool = False,
):
    """Fused negative ELBO: ``(loss, recon, kl, (dlogits, dmu, dlogvar))``.

    ``loss = recon + beta * kl`` with one reduction for both terms.  For "sum"/"mean" the three
    values are 0-d float32 arrays, for "none" ``[B]`` ones (views of one float32 buffer).
    The gradients are those of the reduced loss for an incoming gradient of 1 (for "none", of
    ``loss.sum()``), in the dtypes and shapes of logits / mu / logvar, or None when
    ``need_grad=False``.  ``target`` may be float (any of fp32/fp16/bf16) or uint8 pixels (read as
    ``t / 255``).  ``validate=True`` also checks that float BCE targets lie in [0, 1] (this syncs).
    Torch CUDA tensors are accepted (DLPack, no copy) and then torch tensors are returned.
    """
    cp = _cupy()
    _check_options(reduction, recon)
    as_torch = any(_is_torch(a) for a in (logits, target, mu, logvar))
    arrays = {
        name: _to_cupy(name, a)
        for name, a in (("logits", logits), ("target", target), ("mu", mu), ("logvar", logvar))
    }
    B, F, D = _check_loss_shapes({name: a.shape for name, a in arrays.items()})
    device_id = _same_device(arrays)
    if arrays["logvar"].dtype != arrays["mu"].dtype:
        raise TypeError(
            f"logvar: expected the dtype of mu ({arrays['mu'].dtype}), got {arrays['logvar'].dtype}"
        )
    with cp.cuda.Device(device_id):
        x, xa = _cupy_rows("logits", arrays["logits"], FLOAT_CTYPES)
        t, ta = _cupy_rows("target", arrays["target"], TARGET_CTYPES)
        m, ma = _cupy_rows("mu", arrays["mu"], FLOAT_CTYPES)
        v, va = _cupy_rows("logvar", arrays["logvar"], FLOAT_CTYPES)
        if validate and recon == "bce" and t.ctype != "unsigned char" and ta.size:
            lo, hi = float(ta.min()), float(ta.max())
            if not (0.0 <= lo and hi <= 1.0):
                raise ValueError(f"target: BCE targets must lie in [0, 1], got values in [{lo}, {hi}]")
        dlogits = dmu = dlogvar = None
        if need_grad:
            dlogits = cp.empty(xa.shape, dtype=xa.dtype)
            dmu = cp.empty(ma.shape, dtype=ma.dtype)
            dlogvar = cp.empty(va.shape, dtype=va.dtype)
        # One float32 buffer for the terms: [recon_b, kl_b, loss_b] (none) or [recon_b, kl_b, 3 sums].
        terms = cp.empty(3 * B if reduction == "none" else 2 * B + 3, dtype=cp.float32)
        grad_ptrs = (0, 0, 0)
        if need_grad:
            grad_ptrs = (dlogits.data.ptr, dmu.data.ptr if D else 0, dlogvar.data.ptr if D else 0)
        launch_vae_loss(
            device_id, None, x, t, m, v, grad_ptrs, terms.data.ptr,
            _RECON_IDS[recon], _REDUCTION_IDS[reduction], float(beta),
            1.0 / B if reduction == "mean" else 1.0, need_grad,
        )  # fmt: skip
    if reduction == "none":
        rec, kl, loss = terms[:B], terms[B : 2 * B], terms[2 * B :]
    else:
        loss, rec, kl = terms[2 * B], terms[2 * B + 1], terms[2 * B + 2]
    grads = tuple(_from_cupy(g, as_torch) for g in (dlogits, dmu, dlogvar))
    return _from_cupy(loss, as_torch), _from_cupy(rec, as_torch), _from_cupy(kl, as_torch), grads


def vae_loss(
    logits,
    target,
    mu,
    logvar,
    beta: float = 1.0,
    reduction: str = "sum",
    recon: str = "bce",
    need_grad: bool = True,
    validate: bool = False,
):
    """Fused negative ELBO ``recon + beta * KL``: ``(loss, (dlogits, dmu, dlogvar))``.

    See :func:`vae_loss_terms` (which also returns the two terms) for the arguments.
    """
    loss, _, _, grads = vae_loss_terms(
        logits, target, mu, logvar, beta, reduction, recon, need_grad, validate
    )
    return loss, grads


def _empty_latent(a):
    """A [B, 0] array on ``a``'s device so the fused kernel can run with no KL term."""
    cp = _cupy()
    with cp.cuda.Device(a.device.id):
        return cp.empty((a.shape[0], 0), dtype=cp.float32)


def bce_with_logits(logits, target, reduction: str = "sum", validate: bool = False):
    """``sum_f max(x, 0) - x t + log1p(exp(-|x|))`` per sample, reduced (forward only)."""
    x = _to_cupy("logits", logits)
    z = _empty_latent(x)
    _, rec, _, _ = vae_loss_terms(x, _to_cupy("target", target), z, z, 0.0, reduction, "bce", False, validate)
    return _from_cupy(rec, _is_torch(logits) or _is_torch(target))


def mse(output, target, reduction: str = "sum"):
    """``sum_f (x - t)^2`` per sample, reduced (forward only)."""
    x = _to_cupy("output", output)
    z = _empty_latent(x)
    _, rec, _, _ = vae_loss_terms(x, _to_cupy("target", target), z, z, 0.0, reduction, "mse", False)
    return _from_cupy(rec, _is_torch(output) or _is_torch(target))


def kl_divergence(mu, logvar, reduction: str = "sum"):
    """``-0.5 * sum_d (1 + logvar - mu^2 - exp(logvar))`` per sample, reduced (forward only)."""
    cp = _cupy()
    m = _to_cupy("mu", mu)
    if m.ndim == 0:
        raise ValueError("mu: expected a [B, ...] array, got a 0-d one")
    with cp.cuda.Device(m.device.id):
        empty = cp.empty((m.shape[0], 0), dtype=cp.float32)
    _, _, kl, _ = vae_loss_terms(empty, empty, m, _to_cupy("logvar", logvar), 1.0, reduction, "bce", False)
    return _from_cupy(kl, _is_torch(mu) or _is_torch(logvar))


def _cupy_reparam(name_a: str, a, logvar, seed: int, offset: int, backward: bool):
    """One launch of the reparameterize kernel on ``a`` (mu, or dz for the backward) and ``logvar``."""
    cp = _cupy()
    seed = _check_seed(seed)
    offset = _check_int("offset", offset)
    as_torch = _is_torch(a) or _is_torch(logvar)
    arrays = {name_a: _to_cupy(name_a, a), "logvar": _to_cupy("logvar", logvar)}
    x, v = arrays[name_a], arrays["logvar"]
    if v.shape != x.shape:
        raise ValueError(f"logvar: expected the shape of {name_a} {x.shape}, got {v.shape}")
    if v.dtype != x.dtype:
        raise TypeError(f"logvar: expected the dtype of {name_a} ({x.dtype}), got {v.dtype}")
    device_id = _same_device(arrays)
    with cp.cuda.Device(device_id):
        x2, v2 = (x.reshape(1, -1), v.reshape(1, -1)) if x.ndim == 0 else (x, v)
        rx, x2 = _cupy_rows(name_a, x2, FLOAT_CTYPES, flat=True)
        rv, v2 = _cupy_rows("logvar", v2, FLOAT_CTYPES, flat=True)
        if rv.rows != rx.rows:  # one is fully contiguous, the other only row-contiguous
            rx, x2 = _cupy_rows(name_a, x2, FLOAT_CTYPES)
            rv, v2 = _cupy_rows("logvar", v2, FLOAT_CTYPES)
        out = cp.empty(x.shape, dtype=x.dtype)
        ro = _Rows(out.data.ptr, rx.rows, rx.cols, rx.cols, rx.ctype)
        launch_reparam(device_id, None, backward, rx, rv, ro, 0, seed, offset)
    return _from_cupy(out, as_torch)


def reparameterize(mu, logvar, seed: int, offset: int = 0):
    """``z = mu + exp(logvar / 2) * eps``, ``eps[i] = randn4(seed, n >> 2)[n & 3]`` with
    ``n = offset + i`` over the flat C-order index ``i`` (see :mod:`fastvae.backend`)."""
    return _cupy_reparam("mu", mu, logvar, seed, offset, backward=False)


def reparameterize_backward(dz, logvar, seed: int, offset: int = 0):
    """``(dmu, dlogvar)`` with ``dmu = dz`` (the same array, not a copy) and
    ``dlogvar = 0.5 * dz * exp(logvar / 2) * eps``, eps replayed from ``(seed, offset)``."""
    dlogvar = _cupy_reparam("dz", dz, logvar, seed, offset, backward=True)
    return (dz if _is_torch(dz) or _is_torch(logvar) else _to_cupy("dz", dz)), dlogvar
