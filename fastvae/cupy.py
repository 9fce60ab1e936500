"""CuPy backend: the CUDA C kernels in ``kernels/cuda/`` compiled at run time with NVRTC through CuPy.

Functional API on CuPy arrays (torch CUDA tensors are accepted too, through DLPack without copies,
and the results then come back as torch tensors)::

    loss, (dlogits, dmu, dlogvar) = fastvae.cupy.vae_loss(logits, target, mu, logvar, beta=1.0)
    loss, recon, kl, grads = fastvae.cupy.vae_loss_terms(logits, target, mu, logvar)
    z = fastvae.cupy.reparameterize(mu, logvar, seed=1234)
    dmu, dlogvar = fastvae.cupy.reparameterize_backward(dz, logvar, seed=1234)

and the glue used by the torch ops when ``FASTVAE_BACKEND=cupy`` (torch tensors in and out; the
outputs are allocated by torch so its caching allocator owns them, and the kernels run on torch's
current stream): :func:`torch_vae_loss`, :func:`torch_reparameterize`,
:func:`torch_reparameterize_backward`.

The math is ``fastvae.reference`` (the contract): eps is Triton's ``tl.randn(seed, flat index)``
(Philox4x32-10 + Box-Muller, uniforms bit for bit), the loss is computed per row in fp32 with the
gradients written in the same pass, and the batch reduction runs in a fixed order with no
floating-point atomics, so results are bit-identical run to run.

Importing this module never needs CuPy; calling a function without it raises ImportError with the
install hint.  Kernels are compiled once per (device, dtypes) and cached (CuPy also caches the
binaries on disk, keyed by the source text).
"""

from __future__ import annotations

import functools
import importlib.resources
import math
import re
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np

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
    "torch_vae_loss",
    "torch_reparameterize",
    "torch_reparameterize_backward",
    "REDUCTIONS",
    "RECONS",
]

REDUCTIONS = ("sum", "mean", "none")
RECONS = ("bce", "mse")

_INSTALL_HINT = (
    'fastvae.cupy needs CuPy: pip install "fastvae[cupy]" '
    "(or the cupy-cudaXXx wheel that matches your CUDA toolkit, e.g. cupy-cuda12x)"
)

# NVRTC options: C++17 and nothing that changes the math (no fast math: precise expf/logf/sqrtf,
# IEEE division, denormals kept).  CuPy adds -arch for the current device.
_NVRTC_OPTIONS = ("-std=c++17",)

_LOSS_THREADS = 256  # FV_LOSS_THREADS in vae_loss.cu
_FINALIZE_THREADS = 512  # FV_FINALIZE_THREADS in vae_loss.cu
_REPARAM_THREADS = 256
_MAX_GRID_X = 2**31 - 1
_MAX_GRID_Y = 65535
_RECON_ID = {"bce": 0, "mse": 1}  # FV_RECON_BCE / FV_RECON_MSE

# dtype name (numpy / cupy / torch, without the "torch." prefix) -> CUDA C storage type
_FLOAT_CTYPES = {"float32": "float", "float16": "fv_half", "bfloat16": "fv_bf16"}
_TARGET_CTYPES = {**_FLOAT_CTYPES, "uint8": "unsigned char"}
_ITEMSIZE = {"float": 4, "fv_half": 2, "fv_bf16": 2, "unsigned char": 1}


# ----------------------------------------------------------------------------------------------
# Sources and compilation
# ----------------------------------------------------------------------------------------------

_INCLUDE_RE = re.compile(r'^[ \t]*#[ \t]*include[ \t]+"([^"]+)"[ \t]*$', re.MULTILINE)
_PRAGMA_ONCE_RE = re.compile(r"^[ \t]*#[ \t]*pragma[ \t]+once[ \t]*$", re.MULTILINE)


def _cuda_dir():
    return importlib.resources.files("fastvae.kernels") / "cuda"


def kernel_source(name: str) -> str:
    """The CUDA C text of ``kernels/cuda/<name>`` as NVRTC compiles it.

    Local ``#include "..."`` lines are replaced by the files' text (each file once, recursively) and
    ``#pragma once`` is dropped, so NVRTC needs no include path and CuPy's on-disk cache, which is
    keyed by the source text, sees every change to a header.
    """
    cuda_dir = _cuda_dir()
    seen: set[str] = set()

    def expand(fname: str) -> str:
        if fname in seen:
            return ""
        seen.add(fname)
        path = cuda_dir / fname
        if not path.is_file():
            raise FileNotFoundError(f"fastvae CUDA source {fname!r} is missing from {cuda_dir}")
        text = _PRAGMA_ONCE_RE.sub("", path.read_text(encoding="utf-8"))
        return _INCLUDE_RE.sub(lambda m: f"// ---- {m.group(1)} ----\n" + expand(m.group(1)), text)

    return expand(name)


def _cupy():
    try:
        import cupy
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(_INSTALL_HINT) from exc
    return cupy


def is_available() -> bool:
    """True when CuPy imports and sees at least one CUDA device."""
    try:
        cp = _cupy()
        return cp.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def _loss_name(tx: str, tt: str, tm: str, recon: str, need_grad: bool) -> str:
    return f"fastvae_vae_loss_rows<{tx}, {tt}, {tm}, {_RECON_ID[recon]}, {'true' if need_grad else 'false'}>"


@functools.cache
def _loss_module(device_id: int, tx: str, tt: str, tm: str):
    """The four loss-row kernels (bce/mse x grad/no grad) and the finalize kernel for one dtype triple."""
    cp = _cupy()
    names = [_loss_name(tx, tt, tm, r, g) for r in RECONS for g in (True, False)]
    names.append("fastvae_vae_loss_finalize")
    with cp.cuda.Device(device_id):
        module = cp.RawModule(
            code=kernel_source("vae_loss.cu"), options=_NVRTC_OPTIONS, name_expressions=names
        )
        return {name: module.get_function(name) for name in names}


@functools.cache
def _reparam_module(device_id: int, t: str):
    cp = _cupy()
    names = [f"fastvae_reparameterize_fwd<{t}>", f"fastvae_reparameterize_bwd<{t}>"]
    with cp.cuda.Device(device_id):
        module = cp.RawModule(
            code=kernel_source("reparameterize.cu"), options=_NVRTC_OPTIONS, name_expressions=names
        )
        return {"fwd": module.get_function(names[0]), "bwd": module.get_function(names[1])}


# ----------------------------------------------------------------------------------------------
# Array views: everything the kernels need is a pointer, a row count, a row length and a row stride
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Rows:
    """A [rows, cols] view with contiguous features: ``ptr`` (bytes), ``stride`` (elements)."""

    ptr: int
    rows: int
    cols: int
    stride: int
    ctype: str

    @property
    def itemsize(self) -> int:
        return _ITEMSIZE[self.ctype]

    def aligned(self, nbytes: int) -> bool:
        """Base pointer and every row start aligned to ``nbytes``."""
        return self.ptr % nbytes == 0 and (self.rows <= 1 or (self.stride * self.itemsize) % nbytes == 0)


def _row_layout(shape: tuple[int, ...], strides: tuple[int, ...]) -> tuple[int, int, int] | None:
    """``(rows, cols, row_stride)`` in elements for ``[B, ...]`` viewed as ``[B, prod(...)]``.

    None when the features of a row are not one contiguous run (then the caller copies).
    """
    rows = shape[0]
    cols = math.prod(shape[1:])
    expected = 1
    for size, stride in zip(reversed(shape[1:]), reversed(strides[1:]), strict=True):
        if size != 1 and stride != expected:
            return None
        expected *= size
    row_stride = strides[0] if rows > 1 else cols
    if row_stride < 0:
        return None
    return rows, cols, row_stride


def _flat_layout(shape: tuple[int, ...], strides: tuple[int, ...]) -> tuple[int, int, int] | None:
    """Like :func:`_row_layout`, but one row of ``size`` elements when the whole array is contiguous."""
    layout = _row_layout(shape, strides)
    if layout is None:
        return None
    rows, cols, row_stride = layout
    if row_stride == cols:
        return 1, rows * cols, rows * cols
    return layout


# ----------------------------------------------------------------------------------------------
# Kernel launches (raw pointers; shared by the CuPy API and the torch glue)
# ----------------------------------------------------------------------------------------------


def _group_log2(chunks_per_row: int) -> int:
    """Threads per row G = 32 << log2: about two chunks per thread, from a warp up to the block.

    A warp per row when rows are short (no block barrier, 8 rows per block, few idle lanes); more
    threads for long rows so a row's loads are spread over a whole block.
    """
    g = 32
    while g < _LOSS_THREADS and 2 * g < chunks_per_row:
        g *= 2
    return int(math.log2(g // 32))


def _loss_config(x: _Rows, t: _Rows, dx_ptr: int | None) -> tuple[bool, int, int]:
    """(vec, group_log2, grid) for the row kernel; ``dx_ptr`` None when no gradient is written.

    vec: logits, target and dlogits (contiguous [B, F]) aligned for VEC = 16 / sizeof(logits)
    elements per access, at the base and at every row start.
    """
    vec_elems = 16 // x.itemsize
    t_align = min(16, vec_elems * t.itemsize)
    vec = x.aligned(16) and t.aligned(t_align)
    if dx_ptr is not None:
        vec = vec and _Rows(dx_ptr, x.rows, x.cols, x.cols, x.ctype).aligned(16)
    chunks = -(-x.cols // vec_elems) if vec else x.cols
    glog2 = _group_log2(chunks)
    rows_per_block = _LOSS_THREADS // (32 << glog2)
    grid = min(-(-x.rows // rows_per_block), _MAX_GRID_X)
    return vec, glog2, grid


def _launch_vae_loss(
    device_id: int,
    x: _Rows,
    t: _Rows,
    mu: _Rows,
    lv: _Rows,
    dx_ptr: int,
    dmu_ptr: int,
    dlv_ptr: int,
    recon_rows_ptr: int,
    kl_rows_ptr: int,
    loss_rows_ptr: int,
    out3_ptr: int,
    beta: float,
    reduction: str,
    recon: str,
    need_grad: bool,
) -> None:
    """Row kernel, then (for "sum"/"mean") the fixed-order finalize kernel, on the current CuPy stream.

    Gradient outputs are contiguous ``[B, F]`` / ``[B, D]``; ``loss_rows_ptr`` is 0 unless
    reduction is "none", ``out3_ptr`` (loss, recon, kl) is 0 when it is.
    """
    kernels = _loss_module(device_id, x.ctype, t.ctype, mu.ctype)
    B, F, D = x.rows, x.cols, mu.cols
    vec, glog2, grid = _loss_config(x, t, dx_ptr if need_grad else None)
    grad_scale = 1.0 / B if reduction == "mean" else 1.0
    i64, f32, u64 = np.int64, np.float32, np.uint64
    kernels[_loss_name(x.ctype, t.ctype, mu.ctype, recon, need_grad)](
        (grid,),
        (_LOSS_THREADS,),
        (
            u64(x.ptr), i64(x.stride), u64(t.ptr), i64(t.stride),
            u64(mu.ptr), i64(mu.stride), u64(lv.ptr), i64(lv.stride),
            u64(dx_ptr), i64(F), u64(dmu_ptr), i64(D), u64(dlv_ptr), i64(D),
            u64(recon_rows_ptr), u64(kl_rows_ptr), u64(loss_rows_ptr),
            i64(B), i64(F), i64(D), f32(beta), f32(grad_scale), np.int32(glog2), np.int32(vec),
        ),
    )  # fmt: skip
    if reduction != "none":
        kernels["fastvae_vae_loss_finalize"](
            (1,),
            (_FINALIZE_THREADS,),
            (
                u64(recon_rows_ptr), u64(kl_rows_ptr), i64(B), f32(beta),
                np.int32(reduction == "mean"), u64(out3_ptr),
            ),
        )  # fmt: skip


def _reparam_config(a: _Rows, lv: _Rows, out: _Rows) -> tuple[bool, int, int]:
    """(vec, grid_x, grid_y): blockIdx.y strides over rows, blockIdx.x over a row's VEC chunks."""
    vec = all(r.aligned(16) for r in (a, lv, out))
    chunks = -(-a.cols // (16 // a.itemsize)) if vec else a.cols
    grid_x = max(1, min(-(-chunks // _REPARAM_THREADS), 65535))
    grid_y = max(1, min(a.rows, _MAX_GRID_Y))
    return vec, grid_x, grid_y


def _launch_reparam(device_id: int, backward: bool, a: _Rows, lv: _Rows, out: _Rows, seed: int) -> None:
    """z = mu + exp(lv/2) eps (a = mu) or dlogvar = 0.5 dz exp(lv/2) eps (a = dz), eps from (seed, index)."""
    if a.rows * a.cols == 0:
        return
    kernel = _reparam_module(device_id, a.ctype)["bwd" if backward else "fwd"]
    vec, grid_x, grid_y = _reparam_config(a, lv, out)
    i64 = np.int64
    kernel(
        (grid_x, grid_y),
        (_REPARAM_THREADS,),
        (
            np.uint64(a.ptr), i64(a.stride), np.uint64(lv.ptr), i64(lv.stride),
            np.uint64(out.ptr), i64(out.stride), i64(a.rows), i64(a.cols),
            np.uint64(seed), np.int32(vec),
        ),
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Validation shared by both front ends
# ----------------------------------------------------------------------------------------------


def _check_options(reduction: str, recon: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if recon not in RECONS:
        raise ValueError(f"recon must be one of {RECONS}, got {recon!r}")


def _check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int in [0, 2**64), got {type(seed).__name__}")
    seed = int(seed)
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must lie in [0, 2**64), got {seed}")
    return seed


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
                "Use fastvae.cupy.torch_vae_loss / torch_reparameterize for bfloat16 torch tensors."
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
    values are 0-d float32 arrays (views of one 3-element buffer); for "none" they are ``[B]``.
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
        x, xa = _cupy_rows("logits", arrays["logits"], _FLOAT_CTYPES)
        t, ta = _cupy_rows("target", arrays["target"], _TARGET_CTYPES)
        m, ma = _cupy_rows("mu", arrays["mu"], _FLOAT_CTYPES)
        v, va = _cupy_rows("logvar", arrays["logvar"], _FLOAT_CTYPES)
        if validate and recon == "bce" and t.ctype != "unsigned char" and ta.size:
            lo, hi = float(ta.min()), float(ta.max())
            if not (0.0 <= lo and hi <= 1.0):
                raise ValueError(f"target: BCE targets must lie in [0, 1], got values in [{lo}, {hi}]")
        dlogits = dmu = dlogvar = None
        if need_grad:
            dlogits = cp.empty(xa.shape, dtype=xa.dtype)
            dmu = cp.empty(ma.shape, dtype=ma.dtype)
            dlogvar = cp.empty(va.shape, dtype=va.dtype)
        recon_rows = cp.empty(B, dtype=cp.float32)
        kl_rows = cp.empty(B, dtype=cp.float32)
        loss_rows = cp.empty(B, dtype=cp.float32) if reduction == "none" else None
        out3 = cp.empty(3, dtype=cp.float32) if reduction != "none" else None
        _launch_vae_loss(
            device_id, x, t, m, v,
            dlogits.data.ptr if need_grad else 0,
            dmu.data.ptr if need_grad and D else 0,
            dlogvar.data.ptr if need_grad and D else 0,
            recon_rows.data.ptr, kl_rows.data.ptr,
            loss_rows.data.ptr if loss_rows is not None else 0,
            out3.data.ptr if out3 is not None else 0,
            float(beta), reduction, recon, need_grad,
        )  # fmt: skip
    if reduction == "none":
        loss, rec, kl = loss_rows, recon_rows, kl_rows
    else:
        loss, rec, kl = out3[0], out3[1], out3[2]
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


def _cupy_reparam(name_a: str, a, logvar, seed: int, backward: bool):
    """One launch of the reparameterize kernel on ``a`` (mu, or dz for the backward) and ``logvar``."""
    cp = _cupy()
    seed = _check_seed(seed)
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
        rx, x2 = _cupy_rows(name_a, x2, _FLOAT_CTYPES, flat=True)
        rv, v2 = _cupy_rows("logvar", v2, _FLOAT_CTYPES, flat=True)
        if rv.rows != rx.rows:  # one is fully contiguous, the other only row-contiguous
            rx, x2 = _cupy_rows(name_a, x2, _FLOAT_CTYPES)
            rv, v2 = _cupy_rows("logvar", v2, _FLOAT_CTYPES)
        out = cp.empty(x.shape, dtype=x.dtype)
        ro = _Rows(out.data.ptr, rx.rows, rx.cols, rx.cols, rx.ctype)
        _launch_reparam(device_id, backward, rx, rv, ro, seed)
    return _from_cupy(out, as_torch)


def reparameterize(mu, logvar, seed: int):
    """``z = mu + exp(logvar / 2) * eps``, ``eps[i] = tl.randn(seed, i)`` over the flat C-order index."""
    return _cupy_reparam("mu", mu, logvar, seed, backward=False)


def reparameterize_backward(dz, logvar, seed: int):
    """``(dmu, dlogvar)`` with ``dmu = dz`` (the same array, not a copy) and
    ``dlogvar = 0.5 * dz * exp(logvar / 2) * eps``, eps replayed from ``seed``."""
    dlogvar = _cupy_reparam("dz", dz, logvar, seed, backward=True)
    return (dz if _is_torch(dz) or _is_torch(logvar) else _to_cupy("dz", dz)), dlogvar


# ----------------------------------------------------------------------------------------------
# torch glue (FASTVAE_BACKEND=cupy): torch CUDA tensors in and out, raw pointers to the kernels
# ----------------------------------------------------------------------------------------------


def _torch_rows(name: str, t, table: dict[str, str], flat: bool = False):
    """(_Rows, tensor actually used) for a torch CUDA tensor; a copy only when rows are not contiguous."""
    if not t.is_cuda:
        raise ValueError(f"{name}: expected a CUDA tensor, got one on {t.device}")
    ctype = _ctype(name, str(t.dtype).removeprefix("torch."), table)
    if t.dim() == 0:
        t = t.reshape(1, 1)
    layout = (_flat_layout if flat else _row_layout)(tuple(t.shape), tuple(t.stride()))
    if layout is None:
        t = t.contiguous()
        layout = (_flat_layout if flat else _row_layout)(tuple(t.shape), tuple(t.stride()))
    rows, cols, stride = layout
    return _Rows(t.data_ptr(), rows, cols, stride, ctype), t


def _torch_launch_context(device):
    """CuPy's device and current stream set to the tensor's device and torch's current stream."""
    import contextlib

    import torch

    cp = _cupy()
    stack = contextlib.ExitStack()
    stack.enter_context(cp.cuda.Device(device.index))
    stream = torch.cuda.current_stream(device)
    stack.enter_context(cp.cuda.ExternalStream(stream.cuda_stream, device.index))
    return stack


def torch_vae_loss(
    logits2d, target2d, mu2d, logvar2d, beta: float, reduction: str, recon: str, need_grad: bool
):
    """The fused VAE loss on torch CUDA tensors: ``(loss, recon, kl, dlogits, dmu, dlogvar)``.

    Inputs are ``[B, F]`` / ``[B, D]`` (any ``[B, ...]`` works) whose rows have contiguous features;
    row strides are passed to the kernel, so sliced views are not copied.  ``target2d`` may be
    float32/float16/bfloat16 or uint8.  Outputs are allocated by torch on the inputs' device: loss,
    recon and kl are 0-d float32 tensors (views of one [3] buffer) for "sum"/"mean" and ``[B]``
    float32 for "none"; ``dlogits`` / ``dmu`` / ``dlogvar`` are contiguous, in the dtypes and shapes
    of the inputs (None when ``need_grad`` is False) and are the gradients of the reduced loss for
    an incoming gradient of 1 (the autograd backward multiplies by the real one: a scalar, or row b
    by ``grad[b]`` for "none").  The kernels run on ``torch.cuda.current_stream()``.
    """
    import torch

    _check_options(reduction, recon)
    named = {"logits": logits2d, "target": target2d, "mu": mu2d, "logvar": logvar2d}
    B, F, D = _check_loss_shapes({n: tuple(t.shape) if t.dim() else () for n, t in named.items()})
    device = logits2d.device
    for name, t in named.items():
        if t.device != device:
            raise ValueError(f"{name}: on {t.device}, but logits is on {device}")
    if logvar2d.dtype != mu2d.dtype:
        raise TypeError(f"logvar: expected the dtype of mu ({mu2d.dtype}), got {logvar2d.dtype}")
    # (the *_used tensors keep any contiguous copy alive until the launch is queued)
    x, x_used = _torch_rows("logits", logits2d, _FLOAT_CTYPES)
    t, t_used = _torch_rows("target", target2d, _TARGET_CTYPES)
    m, m_used = _torch_rows("mu", mu2d, _FLOAT_CTYPES)
    v, v_used = _torch_rows("logvar", logvar2d, _FLOAT_CTYPES)
    dlogits = dmu = dlogvar = None
    if need_grad:
        dlogits = torch.empty(x_used.shape, dtype=x_used.dtype, device=device)
        dmu = torch.empty(m_used.shape, dtype=m_used.dtype, device=device)
        dlogvar = torch.empty(m_used.shape, dtype=m_used.dtype, device=device)
    rows = torch.empty((3 if reduction == "none" else 2, B), dtype=torch.float32, device=device)
    out3 = None if reduction == "none" else torch.empty(3, dtype=torch.float32, device=device)
    with _torch_launch_context(device):
        _launch_vae_loss(
            device.index, x, t, m, v,
            dlogits.data_ptr() if need_grad else 0,
            dmu.data_ptr() if need_grad and D else 0,
            dlogvar.data_ptr() if need_grad and D else 0,
            rows[0].data_ptr(), rows[1].data_ptr(),
            rows[2].data_ptr() if reduction == "none" else 0,
            out3.data_ptr() if out3 is not None else 0,
            float(beta), reduction, recon, need_grad,
        )  # fmt: skip
    del t_used, v_used
    if reduction == "none":
        return rows[2], rows[0], rows[1], dlogits, dmu, dlogvar
    return out3[0], out3[1], out3[2], dlogits, dmu, dlogvar


def _torch_reparam(name_a: str, a, logvar, seed: int, backward: bool):
    import torch

    seed = _check_seed(seed)
    if tuple(logvar.shape) != tuple(a.shape):
        raise ValueError(
            f"logvar: expected the shape of {name_a} {tuple(a.shape)}, got {tuple(logvar.shape)}"
        )
    if logvar.dtype != a.dtype:
        raise TypeError(f"logvar: expected the dtype of {name_a} ({a.dtype}), got {logvar.dtype}")
    if logvar.device != a.device:
        raise ValueError(f"logvar: on {logvar.device}, but {name_a} is on {a.device}")
    ra, a2 = _torch_rows(name_a, a, _FLOAT_CTYPES, flat=True)
    rv, v2 = _torch_rows("logvar", logvar, _FLOAT_CTYPES, flat=True)
    if ra.rows != rv.rows:
        ra, _ = _torch_rows(name_a, a2, _FLOAT_CTYPES)
        rv, _ = _torch_rows("logvar", v2, _FLOAT_CTYPES)
    out = torch.empty(a.shape, dtype=a.dtype, device=a.device)
    ro = _Rows(out.data_ptr(), ra.rows, ra.cols, ra.cols, ra.ctype)
    with _torch_launch_context(a.device):
        _launch_reparam(a.device.index, backward, ra, rv, ro, seed)
    return out


def torch_reparameterize(mu2d, logvar2d, seed: int):
    """``z = mu + exp(logvar / 2) * eps`` on torch CUDA tensors (eps = tl.randn(seed, flat index)).

    Any ``[B, ...]`` shape whose rows have contiguous features; ``z`` is a new contiguous tensor
    of mu's shape and dtype, computed on torch's current stream.
    """
    return _torch_reparam("mu", mu2d, logvar2d, seed, backward=False)


def torch_reparameterize_backward(dz, logvar, seed: int):
    """``dlogvar = 0.5 * dz * exp(logvar / 2) * eps`` with eps replayed from ``seed`` (dmu is dz itself)."""
    return _torch_reparam("dz", dz, logvar, seed, backward=True)


# ----------------------------------------------------------------------------------------------
# The backend contract of fastvae.ops (FASTVAE_BACKEND=cupy): the four launchers every backend has
# ----------------------------------------------------------------------------------------------


def _torch_fused_loss(logits, target, mu, logvar, beta: float, reduction: str, recon: str, need_grad: bool):
    """``fastvae.ops``' fused-loss contract on the CUDA C kernels (one term may be absent: a [B, 0] side)."""
    import torch

    ref = logits if logits is not None else mu
    empty = ref.new_empty((ref.shape[0], 0), dtype=torch.float32)
    x, t = (logits, target) if logits is not None else (empty, empty)
    m, v = (mu, logvar) if mu is not None else (empty, empty)
    loss, rec, kl, dx, dmu, dlv = torch_vae_loss(
        x, t, m, v, beta, reduction, recon if recon != "none" else "bce", need_grad
    )
    # The terms are views of one buffer; a custom op's outputs may not alias each other.
    terms = tuple(term.clone() for term in (loss, rec, kl))

    def grad(g, present: bool):
        return g if need_grad and present else ref.new_empty(0)

    return (*terms, grad(dx, logits is not None), grad(dmu, mu is not None), grad(dlv, mu is not None))


def torch_kernels() -> SimpleNamespace:
    """The four launchers of a fastvae backend (see ``fastvae.ops._kernels``), for torch CUDA tensors.

    The backward's in-place scale is backend-independent and runs the Triton kernel.
    """
    from fastvae.kernels.fused_loss import scale_rows_

    _cupy()  # fail early, with the install hint, when CuPy is missing
    return SimpleNamespace(
        fused_loss=_torch_fused_loss,
        scale_rows_=scale_rows_,
        reparameterize=torch_reparameterize,
        reparameterize_backward=torch_reparameterize_backward,
    )
