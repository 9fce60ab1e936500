"""The CuPy backend: the CUDA C kernels of ``kernels/cuda/`` compiled at run time by NVRTC through CuPy.

For torch CUDA tensors this module is a :class:`fastvae.backend.Backend` (``FASTVAE_BACKEND=cupy``)::

    fused_loss(p, logits, target, mu, logvar)         vae_loss.cu (row kernel + fixed-order finalize)
    scale_grads_(grad, dlogits, dmu, dlogvar)          scale_grads.cu (in place; rows with factor 1 skipped)
    reparameterize(mu, logvar, key, offset)            reparameterize.cu, forward
    reparameterize_backward(dz, logvar, key, offset)   reparameterize.cu, backward

B / F / D, the gradient scale, the recon kind and the reduction come resolved in the
:class:`~fastvae.backend.LossProblem` (numbering of :mod:`fastvae.backend`, which the kernels share).
Every launch runs on the tensors' device (the current CUDA device is switched for the launch and
restored) and on torch's current stream of that device; outputs are allocated by torch, so its
caching allocator owns them.  The random key is an ``int`` or a 1-element int64 CUDA tensor that
the kernel reads on the device (its pointer is passed; it is never read on the host).  Nothing
synchronizes with the host; no float atomics: results are bit-identical run to run.

The compilation cache, the ``[rows, cols]`` views (:class:`_Rows`), the launch configurations and
the raw launches are shared with the CuPy-array API, :mod:`fastvae.cupy`.  Importing this module
never needs CuPy; launching without it raises ImportError with the install hint.  Kernels are
compiled once per (device, dtypes) and cached (CuPy also caches binaries on disk, keyed by the
source text).
"""

from __future__ import annotations

import functools
import importlib.resources
import math
import re
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from fastvae.backend import (
    RECON_BCE,
    RECON_MSE,
    RECON_NONE,
    RECONS,
    REDUCE_MEAN,
    REDUCE_NONE,
    Key,
    LossProblem,
)

__all__ = [
    "fused_loss",
    "scale_grads_",
    "reparameterize",
    "reparameterize_backward",
    "is_available",
    "kernel_source",
]

_INSTALL_HINT = (
    'the cupy backend needs CuPy: pip install "fastvae[cupy]" '
    "(or the cupy-cudaXXx wheel that matches your CUDA toolkit, e.g. cupy-cuda12x)"
)

# NVRTC options: C++17 and nothing that changes the math (no fast math: precise expf/logf/sqrtf,
# IEEE division, denormals kept).  CuPy adds -arch for the current device.
_NVRTC_OPTIONS = ("-std=c++17",)

_LOSS_THREADS = 256  # FV_LOSS_THREADS in vae_loss.cu
_FINALIZE_THREADS = 512  # FV_FINALIZE_THREADS in vae_loss.cu
_REPARAM_THREADS = 256  # __launch_bounds__ of reparameterize.cu
_SCALE_THREADS = 256  # FV_SCALE_THREADS in scale_grads.cu
_MAX_GRID_X = 2**31 - 1
_MAX_GRID_Y = 65535

# dtype name (numpy / cupy / torch without "torch.") -> CUDA C storage type
FLOAT_CTYPES = {"float32": "float", "float16": "fv_half", "bfloat16": "fv_bf16"}
TARGET_CTYPES = {**FLOAT_CTYPES, "uint8": "unsigned char"}
_ITEMSIZE = {"float": 4, "fv_half": 2, "fv_bf16": 2, "unsigned char": 1}
_TORCH_FLOAT = {torch.float32: "float", torch.float16: "fv_half", torch.bfloat16: "fv_bf16"}
_TORCH_TARGET = {**_TORCH_FLOAT, torch.uint8: "unsigned char"}


# ----------------------------------------------------------------------------------------------
# Sources, CuPy and compilation
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
        return _cupy().cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def loss_kernel_name(tx: str, tt: str, tm: str, recon: int, need_grad: bool) -> str:
    """The C++ name of a row-kernel instantiation; ``recon`` is RECON_BCE or RECON_MSE."""
    return f"fastvae_vae_loss_rows<{tx}, {tt}, {tm}, {recon}, {'true' if need_grad else 'false'}>"


def _module(device_id: int, source: str, names: list[str]) -> dict:
    """{name: CuPy RawKernel} of one NVRTC compile of ``kernels/cuda/<source>`` on ``device_id``."""
    cp = _cupy()
    with cp.cuda.Device(device_id):
        module = cp.RawModule(code=kernel_source(source), options=_NVRTC_OPTIONS, name_expressions=names)
        return {name: module.get_function(name) for name in names}


@functools.cache
def _loss_kernels(device_id: int, tx: str, tt: str, tm: str) -> dict:
    """The four row kernels (bce/mse x grad/no grad) and the finalize kernel for one dtype triple."""
    names = [loss_kernel_name(tx, tt, tm, r, g) for r in (RECON_BCE, RECON_MSE) for g in (True, False)]
    return _module(device_id, "vae_loss.cu", [*names, "fastvae_vae_loss_finalize"])


@functools.cache
def _reparam_kernels(device_id: int, t: str) -> tuple:
    """(forward, backward) reparameterize kernels for one dtype."""
    names = [f"fastvae_reparameterize_fwd<{t}>", f"fastvae_reparameterize_bwd<{t}>"]
    kernels = _module(device_id, "reparameterize.cu", names)
    return kernels[names[0]], kernels[names[1]]


@functools.cache
def _scale_kernel(device_id: int, tx: str, tm: str):
    """The in-place gradient scale for dlogits of ``tx`` and dmu / dlogvar of ``tm``."""
    name = f"fastvae_scale_grads<{tx}, {tm}>"
    return _module(device_id, "scale_grads.cu", [name])[name]


# ----------------------------------------------------------------------------------------------
# Views: everything the kernels need is a pointer, a row count, a row length and a row stride
# ----------------------------------------------------------------------------------------------


class _Rows(NamedTuple):
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
# Launch configurations (plain integer arithmetic on the host)
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def _group_log2(chunks_per_row: int) -> int:
    """Threads per row G = 32 << log2: about two chunks per thread, from a warp up to the block.

    A warp per row when rows are short (no block barrier, 8 rows per block, few idle lanes); more
    threads for long rows so a row's loads are spread over a whole block.
    """
    g = 32
    while g < _LOSS_THREADS and 2 * g < chunks_per_row:
        g *= 2
    return (g // 32).bit_length() - 1


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


def _reparam_config(a: _Rows, lv: _Rows, out: _Rows) -> tuple[bool, int, int]:
    """(vec, grid_x, grid_y): blockIdx.y strides over rows, blockIdx.x over a row's VEC chunks."""
    vec = a.aligned(16) and lv.aligned(16) and out.aligned(16)
    chunks = -(-a.cols // (16 // a.itemsize)) if vec else a.cols
    grid_x = max(1, min(-(-chunks // _REPARAM_THREADS), 65535))
    grid_y = max(1, min(a.rows, _MAX_GRID_Y))
    return vec, grid_x, grid_y


def _scale_config(B: int, F: int, D: int, dx: _Rows | None) -> tuple[bool, int, int]:
    """(vec, group_log2, grid) of the gradient scale: a group of G threads per row, as the loss.

    vec: dlogits (contiguous [B, F]) 16-byte aligned at the base and at every row start.
    """
    vec = dx is not None and dx.aligned(16)
    chunks = -(-F // (16 // dx.itemsize)) if vec else F
    glog2 = _group_log2(max(chunks, D))
    rows_per_block = _SCALE_THREADS // (32 << glog2)
    return vec, glog2, min(-(-B // rows_per_block), _MAX_GRID_X)


# ----------------------------------------------------------------------------------------------
# Raw launches (pointers and sizes; shared by the torch backend below and fastvae.cupy).  `stream`
# None launches on CuPy's current stream, else on that CuPy stream object; CuPy's current device
# must be `device_id`.
# ----------------------------------------------------------------------------------------------

_u64, _i64, _f32, _i32 = np.uint64, np.int64, np.float32, np.int32


def launch_vae_loss(
    device_id: int,
    stream,
    x: _Rows,
    t: _Rows,
    mu: _Rows,
    lv: _Rows,
    grads: tuple[int, int, int],
    terms_ptr: int,
    recon: int,
    reduction: int,
    beta: float,
    grad_scale: float,
    need_grad: bool,
) -> None:
    """The fused loss: row kernel, then (sum / mean) the fixed-order finalize kernel.

    ``x``/``t`` are the [B, F] logits / target (F = 0: no reconstruction term), ``mu``/``lv`` the
    [B, D] latents (D = 0: no KL term).  ``grads``: pointers of the contiguous dlogits, dmu, dlogvar
    (0 when not written).  ``terms_ptr``: a float32 buffer laid out ``[recon_b (B), kl_b (B),
    loss_b (B)]`` for reduction none, ``[recon_b (B), kl_b (B), loss, recon, kl]`` otherwise.
    Bytes moved: see vae_loss.cu (each input read once, each gradient written once, 8-12 bytes a row).
    """
    B, F, D = x.rows, x.cols, mu.cols
    kernels = _loss_kernels(device_id, x.ctype, t.ctype, mu.ctype)
    vec, glog2, grid = _loss_config(x, t, grads[0] if need_grad else None)
    kl_ptr, third_ptr = terms_ptr + 4 * B, terms_ptr + 8 * B
    none = reduction == REDUCE_NONE
    kernel_recon = RECON_BCE if recon == RECON_NONE else recon  # KL only: the BCE kernel with F = 0
    kernels[loss_kernel_name(x.ctype, t.ctype, mu.ctype, kernel_recon, need_grad)](
        (grid,),
        (_LOSS_THREADS,),
        (
            _u64(x.ptr), _i64(x.stride), _u64(t.ptr), _i64(t.stride),
            _u64(mu.ptr), _i64(mu.stride), _u64(lv.ptr), _i64(lv.stride),
            _u64(grads[0]), _i64(F), _u64(grads[1]), _i64(D), _u64(grads[2]), _i64(D),
            _u64(terms_ptr), _u64(kl_ptr), _u64(third_ptr if none else 0),
            _i64(B), _i64(F), _i64(D), _f32(beta), _f32(grad_scale), _i32(glog2), _i32(vec),
        ),
        stream=stream,
    )  # fmt: skip
    if not none:
        kernels["fastvae_vae_loss_finalize"](
            (1,),
            (_FINALIZE_THREADS,),
            (
                _u64(terms_ptr), _u64(kl_ptr), _i64(B), _f32(beta), _i32(reduction == REDUCE_MEAN),
                _u64(third_ptr),
            ),
            stream=stream,
        )  # fmt: skip


def launch_reparam(
    device_id: int,
    stream,
    backward: bool,
    a: _Rows,
    lv: _Rows,
    out: _Rows,
    key_ptr: int,
    key: int,
    offset: int,
) -> None:
    """``z = mu + exp(lv / 2) eps`` (a = mu) or ``dlogvar = 0.5 dz exp(lv / 2) eps`` (a = dz).

    ``eps`` of element (r, c) is ``randn(key, offset + r * a.cols + c)``, the key read on the device
    from ``key_ptr`` (an int64) when it is not 0, else ``key``.  Bytes: 3 sizeof(T) per element.
    """
    if a.rows * a.cols == 0:
        return
    kernel = _reparam_kernels(device_id, a.ctype)[1 if backward else 0]
    vec, grid_x, grid_y = _reparam_config(a, lv, out)
    kernel(
        (grid_x, grid_y),
        (_REPARAM_THREADS,),
        (
            _u64(a.ptr), _i64(a.stride), _u64(lv.ptr), _i64(lv.stride), _u64(out.ptr), _i64(out.stride),
            _i64(a.rows), _i64(a.cols), _u64(key_ptr), _u64(key), _u64(offset), _i32(vec),
        ),
        stream=stream,
    )  # fmt: skip


def launch_scale(
    device_id: int,
    stream,
    g_ptr: int,
    g_stride: int,
    B: int,
    dx: _Rows | None,
    dmu_ptr: int,
    dlv_ptr: int,
    D: int,
    tm: str,
) -> None:
    """In place: row b of dlogits (``dx``, contiguous [B, F]), dmu and dlogvar (contiguous [B, D],
    pointers 0 when absent) times the float32 ``g[b * g_stride]``; rows whose factor is 1 untouched."""
    F = dx.cols if dx is not None else 0
    vec, glog2, grid = _scale_config(B, F, D, dx)
    kernel = _scale_kernel(device_id, dx.ctype if dx is not None else tm, tm)
    kernel(
        (grid,),
        (_SCALE_THREADS,),
        (
            _u64(g_ptr), _i64(g_stride), _u64(dx.ptr if dx is not None else 0), _i64(F),
            _u64(dmu_ptr), _u64(dlv_ptr), _i64(D), _i64(B), _i32(glog2), _i32(vec),
        ),
        stream=stream,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Device guard: the tensors' device current for the launch, torch's current stream of it
# ----------------------------------------------------------------------------------------------

_STREAMS: dict[tuple[int, int], object] = {}  # (device, raw stream) -> the CuPy stream object


class _RawStream:
    """A raw ``cudaStream_t`` in the CUDA stream protocol (what ``cupy.cuda.Stream.from_external`` takes)."""

    __slots__ = ("ptr",)

    def __init__(self, ptr: int) -> None:
        self.ptr = ptr

    def __cuda_stream__(self) -> tuple[int, int]:
        return 0, self.ptr


def _cupy_stream(ptr: int, index: int):
    """A CuPy stream object for torch's raw stream ``ptr`` on device ``index`` (made once, then cached)."""
    cp = _cupy()
    from_external = getattr(cp.cuda.Stream, "from_external", None)
    if from_external is not None:  # CuPy >= 14, where ExternalStream is deprecated
        return from_external(_RawStream(ptr))
    return cp.cuda.ExternalStream(ptr, index)


@functools.cache
def _raw_stream_fn():
    """torch's current raw stream of a device: the C call Triton uses, or the public API."""
    fn = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    return fn if fn is not None else (lambda index: torch.cuda.current_stream(index).cuda_stream)


class _OnDevice:
    """``with _OnDevice(i) as stream:`` CUDA device ``i`` current (restored after), ``stream`` the
    CuPy handle of torch's current stream on ``i``.  Costs a cudaGetDevice and two dict look-ups
    when ``i`` is already current (a cudaSetDevice each way otherwise)."""

    __slots__ = ("index", "prev", "runtime")

    def __init__(self, index: int) -> None:
        self.index = index
        self.runtime = _cupy().cuda.runtime

    def __enter__(self):
        self.prev = self.runtime.getDevice()
        if self.prev != self.index:
            self.runtime.setDevice(self.index)
        key = (self.index, _raw_stream_fn()(self.index))
        stream = _STREAMS.get(key)
        if stream is None:
            if len(_STREAMS) > 1024:  # user-created streams come and go: keep the cache bounded
                _STREAMS.clear()
            stream = _STREAMS[key] = _cupy_stream(key[1], self.index)
        return stream

    def __exit__(self, *exc) -> None:
        if self.prev != self.index:
            self.runtime.setDevice(self.prev)


# ----------------------------------------------------------------------------------------------
# The backend contract (fastvae.backend.Backend) for torch CUDA tensors
# ----------------------------------------------------------------------------------------------


def _ctype(name: str, t: Tensor, table: dict) -> str:
    ctype = table.get(t.dtype)
    if ctype is None:
        expected = ", ".join(str(d).removeprefix("torch.") for d in table)
        raise TypeError(
            f"{name}: dtype {t.dtype} is not supported by the cupy backend (expected one of {expected})"
        )
    return ctype


def _device_index(name: str, t: Tensor) -> int:
    index = t.get_device()
    if index < 0:
        raise ValueError(f"{name}: the cupy backend runs on CUDA tensors, got one on {t.device}")
    return index


def _torch_rows(name: str, t: Tensor, table: dict, index: int, alive: list) -> _Rows:
    """The _Rows of a [B, F] view; a copy only if its features are strided.  The tensor actually read
    goes into ``alive``, which the caller keeps until the launch is queued: a copy freed earlier could
    be handed by the caching allocator to an output of that very launch.

    Rows may be strided (a sliced batch), even stride 0 (a broadcast row): inputs are only read.
    """
    ctype = _ctype(name, t, table)
    if t.dim() != 2:
        raise ValueError(f"{name}: expected a [B, F] view, got shape {tuple(t.shape)}")
    if t.get_device() != index:
        raise ValueError(f"{name}: on {t.device}, but the other inputs are on cuda:{index}")
    rows, cols = t.shape
    row_stride, col_stride = t.stride()
    if col_stride != 1 and cols > 1:
        t = t.contiguous()
        row_stride = cols
    alive.append(t)
    return _Rows(t.data_ptr(), rows, cols, row_stride if rows > 1 else cols, ctype)


def fused_loss(
    p: LossProblem,
    logits: Tensor | None,
    target: Tensor | None,
    mu: Tensor | None,
    logvar: Tensor | None,
    log_scale: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(loss, recon, kl, dlogits, dmu, dlogvar, dlog_scale)`` of ``loss = recon + beta * kl`` (see
    :meth:`fastvae.backend.Backend.fused_loss`), in one row kernel plus, for sum / mean, one
    single-block finalize kernel (fp64 partial sums in a fixed order).  BCE and MSE only: the CUDA C
    kernels have no Gaussian or continuous-Bernoulli likelihood (``dlog_scale`` is always empty).

    ``recon_b = sum_f bce(x, t)`` or ``sum_f (x - t)^2``; ``kl_b = -0.5 sum_d (1 + lv - mu^2 - e^lv)``;
    gradients ``grad_scale * (sigmoid(x) - t)`` or ``grad_scale * 2 (x - t)``,
    ``grad_scale * beta * mu`` and ``grad_scale * beta * (e^lv - 1) / 2``, written in the same pass.
    The three terms are views of one float32 buffer.  Losses are float32 (fp32 math).
    """
    if p.recon not in (RECON_NONE, RECON_BCE, RECON_MSE):
        name = next(k for k, v in RECONS.items() if v == p.recon)
        raise NotImplementedError(
            f"recon={name!r} is not implemented in the cupy backend (bce and mse are); "
            "use the triton backend (fastvae.use_backend('triton')) for it"
        )
    B, F, D = p.B, p.F, p.D
    anchor = logits if logits is not None else mu
    index = _device_index("logits" if logits is not None else "mu", anchor)
    device = anchor.device
    alive: list[Tensor] = []  # the tensors the kernel reads, alive until it is queued
    if logits is not None:
        x = _torch_rows("logits", logits, _TORCH_FLOAT, index, alive)
        t = _torch_rows("target", target, _TORCH_TARGET, index, alive)
    if mu is not None:
        m = _torch_rows("mu", mu, _TORCH_FLOAT, index, alive)
        v = _torch_rows("logvar", logvar, _TORCH_FLOAT, index, alive)
        if v.ctype != m.ctype:
            raise TypeError(f"logvar: expected the dtype of mu ({mu.dtype}), got {logvar.dtype}")
    else:  # no KL term: D = 0 latents of the logits' dtype (nothing is read)
        m = v = _Rows(0, B, 0, 0, x.ctype)
    if logits is None:  # KL only: F = 0 recon operands of the latents' dtype (nothing is read)
        x = t = _Rows(0, B, 0, 0, m.ctype)
    if p.acc != torch.float32:
        raise TypeError(f"the cupy backend accumulates in float32, got acc={p.acc}")
    # One float32 buffer for every loss term: [recon_b, kl_b, loss_b] (none) or [recon_b, kl_b, 3 sums].
    none = p.reduction == REDUCE_NONE
    terms = torch.empty(3 * B if none else 2 * B + 3, dtype=torch.float32, device=device)
    want_dx = p.need_grad and logits is not None
    want_dm = p.need_grad and mu is not None
    dlogits = torch.empty((B, F), dtype=logits.dtype, device=device) if want_dx else anchor.new_empty(0)
    dmu = torch.empty((B, D), dtype=mu.dtype, device=device) if want_dm else anchor.new_empty(0)
    dlogvar = torch.empty((B, D), dtype=mu.dtype, device=device) if want_dm else anchor.new_empty(0)
    grads = (
        dlogits.data_ptr() if want_dx else 0,
        dmu.data_ptr() if want_dm else 0,
        dlogvar.data_ptr() if want_dm else 0,
    )
    with _OnDevice(index) as stream:
        launch_vae_loss(
            index, stream, x, t, m, v, grads, terms.data_ptr(),
            p.recon, p.reduction, p.beta, p.grad_scale, p.need_grad,
        )  # fmt: skip
    del alive
    dls = terms.new_empty(0)
    if none:
        return terms[2 * B :], terms[:B], terms[B : 2 * B], dlogits, dmu, dlogvar, dls
    return terms[2 * B], terms[2 * B + 1], terms[2 * B + 2], dlogits, dmu, dlogvar, dls


def _grad_rows(name: str, g: Tensor, index: int) -> tuple[int, int]:
    """(B, cols) of a gradient written in place: contiguous, on the device."""
    if not g.is_contiguous():
        raise ValueError(f"{name}: a gradient scaled in place must be contiguous, got strides {g.stride()}")
    if g.get_device() != index:
        raise ValueError(f"{name}: on {g.device}, but the gradient is on cuda:{index}")
    B = g.shape[0]
    return B, g.numel() // B


def scale_grads_(grad: Tensor, dlogits: Tensor, dmu: Tensor, dlogvar: Tensor) -> None:
    """In place: ``dlogits[b] *= s_b``, ``dmu[b] *= s_b``, ``dlogvar[b] *= s_b`` with ``s_b = grad``
    (0-d) or ``grad[b]`` ([B], any stride, 0 included); empty gradients skipped, rows whose factor is
    exactly 1 not touched (``loss.backward()`` moves no gradient bytes).  One launch, no host sync."""
    present = [g for g in (dlogits, dmu, dlogvar) if g.numel() != 0]
    if not present:
        return
    index = _device_index("grad", grad)
    B, F = _grad_rows("dlogits", dlogits, index) if dlogits.numel() else (present[0].shape[0], 0)
    D = 0
    for name, g in (("dmu", dmu), ("dlogvar", dlogvar)):
        if g.numel():
            B_g, D = _grad_rows(name, g, index)
            if B_g != B:
                raise ValueError(f"{name}: expected {B} rows like dlogits, got shape {tuple(g.shape)}")
    if grad.dim() == 0:
        g_stride = 0
    elif grad.shape == (B,):
        g_stride = grad.stride(0)
    else:
        raise ValueError(f"grad: expected a 0-d tensor or shape ({B},), got shape {tuple(grad.shape)}")
    if grad.dtype != torch.float32:  # the kernel reads a float32 factor (the cupy losses are float32)
        grad = grad.to(torch.float32)
    dx = _Rows(dlogits.data_ptr(), B, F, F, _ctype("dlogits", dlogits, _TORCH_FLOAT)) if F else None
    latent = dmu if dmu.numel() else dlogvar
    tm = _ctype("dmu", latent, _TORCH_FLOAT) if D else dx.ctype
    with _OnDevice(index) as stream:
        launch_scale(
            index,
            stream,
            grad.data_ptr(),
            g_stride,
            B,
            dx,
            dmu.data_ptr() if dmu.numel() else 0,
            dlogvar.data_ptr() if dlogvar.numel() else 0,
            D,
            tm,
        )


def _key_args(key: Key, index: int) -> tuple[int, int]:
    """(key_ptr, key): a seed int is passed by value; a key tensor by its device pointer (never read here)."""
    if isinstance(key, Tensor):
        if key.dtype != torch.int64 or key.numel() != 1 or key.get_device() != index:
            raise ValueError(
                f"key: expected a 1-element int64 tensor on cuda:{index}, got {key.dtype} of shape "
                f"{tuple(key.shape)} on {key.device}"
            )
        return key.data_ptr(), 0
    if isinstance(key, bool) or not isinstance(key, int):
        raise TypeError(
            f"key: expected an int seed or a 1-element int64 CUDA tensor, not {type(key).__name__}"
        )
    if not 0 <= key < 2**64:
        raise ValueError(f"key: a seed must lie in [0, 2**64), got {key}")
    return 0, key


def _reparam(name: str, backward: bool, a: Tensor, logvar: Tensor, key: Key, offset: int) -> Tensor:
    """One launch of reparameterize.cu over the flat contiguous ``a`` (mu or dz) and ``logvar``."""
    index = _device_index(name, a)
    ctype = _ctype(name, a, _TORCH_FLOAT)
    if logvar.dtype != a.dtype or logvar.shape != a.shape:
        raise ValueError(
            f"logvar: expected the shape and dtype of {name} ({tuple(a.shape)}, {a.dtype}), "
            f"got ({tuple(logvar.shape)}, {logvar.dtype})"
        )
    if logvar.get_device() != index:
        raise ValueError(f"logvar: on {logvar.device}, but {name} is on {a.device}")
    if not 0 <= offset < 2**64:
        raise ValueError(f"offset: expected a counter offset in [0, 2**64), got {offset}")
    key_ptr, key_val = _key_args(key, index)
    a = a if a.is_contiguous() else a.contiguous()
    logvar = logvar if logvar.is_contiguous() else logvar.contiguous()
    out = torch.empty(a.shape, dtype=a.dtype, device=a.device)
    n = a.numel()
    if n:
        with _OnDevice(index) as stream:
            launch_reparam(
                index,
                stream,
                backward,
                _Rows(a.data_ptr(), 1, n, n, ctype),
                _Rows(logvar.data_ptr(), 1, n, n, ctype),
                _Rows(out.data_ptr(), 1, n, n, ctype),
                key_ptr,
                key_val,
                offset,
            )
    return out


def reparameterize(mu: Tensor, logvar: Tensor, key: Key, offset: int) -> Tensor:
    """``z = mu + exp(logvar / 2) * eps``, ``eps[i] = randn(key, offset + i)`` over the flat C-order
    index: one kernel, 3 sizeof(T) bytes per element, ``z`` new and contiguous."""
    return _reparam("mu", False, mu, logvar, key, offset)


def reparameterize_backward(dz: Tensor, logvar: Tensor, key: Key, offset: int) -> Tensor:
    """``dlogvar = 0.5 * dz * exp(logvar / 2) * eps`` with the forward's eps replayed from
    ``(key, offset)`` (d z / d logvar = eps exp(logvar / 2) / 2; ``dmu = dz`` needs no kernel)."""
    return _reparam("dz", True, dz, logvar, key, offset)
