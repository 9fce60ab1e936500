"""Test set-up: Triton kernels run under the interpreter on machines without a GPU.

TRITON_INTERPRET must be set before any ``@triton.jit`` decorator runs, so it is set here, at the
top of the first module pytest imports.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _fma_f32(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """fma(a, b, c) of float32 arrays, rounded once, as the hardware does.

    The product of two float32 is exact in float64; TwoSum gives the exact error e of the float64 sum
    s (s + e = a b + c); rounding s to odd (to its odd neighbour toward e when inexact and even) and
    then to float32 rounds correctly, since round-to-odd at 53 bits makes a second rounding to 24 exact.
    """
    a, b, c = (np.asarray(v, dtype=np.float64) for v in np.broadcast_arrays(a, b, c))
    prod = a * b
    s = prod + c
    bv = s - prod
    e = (prod - (s - bv)) + (c - bv)
    even = (np.ascontiguousarray(s).view(np.uint64) & 1) == 0
    s = np.where((e != 0) & even, np.nextafter(s, np.where(e > 0, np.inf, -np.inf)), s)
    return s.astype(np.float32)


def _fix_triton36_interpreter() -> None:
    """Make Triton 3.6's interpreter agree with Triton 3.9's (and the GPU) where the kernels need it.

    1. A scalar argument (``F`` in ``range(0, F, BLOCK_F)``) is held as a 1-element array and made an
       integer with ``int(data)``; NumPy 2.4 made ``int()`` of an array with ndim > 0 a TypeError
       (deprecated since 1.25), so every kernel with a loop bounded by an argument failed.  Triton 3.9
       converts with ``int(data.squeeze())``: the same line is installed here.
    2. ``tl.fma`` on float32 was ``x * y + z``, rounded twice; the reparameterize kernel's Cody-Waite
       reduction (``fma(j, -PIO2_HI, theta)`` exact) then drifted by thousands of ulp near the zeros of
       cos.  Triton 3.9 rounds once, like the hardware: so does :func:`_fma_f32`.
    Both apply before Triton 3.9 only.  The interpreter runs in tests alone (on GPUs Triton compiles),
    so the fixes live here rather than as a NumPy pin that would hold back every user's NumPy.
    """
    try:
        import triton
        from triton.runtime import interpreter
    except ImportError:
        return
    major, minor = (int(v) for v in triton.__version__.split(".")[:2])
    patch_tensor = getattr(interpreter, "_patch_lang_tensor", None)
    builder = getattr(interpreter, "InterpreterBuilder", None)
    if (major, minor) >= (3, 9) or patch_tensor is None or builder is None:
        return

    def patched(tensor, scope) -> None:
        patch_tensor(tensor, scope)
        # The scope restores attributes last-in first-out, so this undoes cleanly after each launch.
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patched
    two_roundings = builder.create_fma

    def create_fma(self, x, y, z):
        if z.data.dtype != np.float32:
            return two_roundings(self, x, y, z)
        return interpreter.TensorHandle(_fma_f32(x.data, y.data, z.data), z.dtype.scalar)

    builder.create_fma = create_fma


_fix_triton36_interpreter()

# Every backend that can run in this process: on a CPU-only machine Triton runs interpreted.
CPU_BACKENDS = ("triton", "numba", "torch")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rel_err(actual, expected) -> float:
    """||actual - expected|| / ||expected|| in float64; NaN anywhere is an infinite error."""
    a = np.asarray(actual.detach().cpu().double() if isinstance(actual, torch.Tensor) else actual, np.float64)
    e = np.asarray(expected, dtype=np.float64)
    assert a.shape == e.shape, f"shape {a.shape} != expected {e.shape}"
    if not np.all(np.isfinite(a)):
        return float("inf")
    denom = np.linalg.norm(e)
    return float(np.linalg.norm(a - e) / (denom if denom > 0 else 1.0))


def to_np(t: torch.Tensor) -> np.ndarray:
    """The exact values a kernel sees (fp16/bf16 rounding included), as float64 (uint8 kept)."""
    t = t.detach().cpu()
    return t.numpy() if t.dtype == torch.uint8 else t.double().numpy()


class NoHostRead(torch.Tensor):
    """A key tensor whose value cannot be read on the host: what a CUDA-graph replay needs of a key."""

    def _refuse(self, *args, **kwargs):
        raise AssertionError("the key was read on the host")

    item = tolist = __int__ = __index__ = __float__ = __bool__ = _refuse


def device_only_key(value: int, device: str | torch.device = "cpu") -> torch.Tensor:
    """The 1-element int64 key tensor of the 64-bit ``value`` (as its two's-complement bits), unreadable
    on the host."""
    bits = value - 2**64 if value >= 2**63 else value
    return torch.tensor([bits], dtype=torch.int64, device=device).as_subclass(NoHostRead)


@pytest.fixture
def poison(monkeypatch):
    """Make every fresh torch/NumPy buffer NaN (floats) or 0xAB (integers), so unwritten outputs show."""
    empty, empty_like, np_empty = torch.empty, torch.empty_like, np.empty

    def fill(t):
        if isinstance(t, torch.Tensor):
            return (
                t.fill_(float("nan"))
                if t.is_floating_point()
                else t.fill_(0xAB if t.dtype == torch.uint8 else 7)
            )
        t[...] = np.nan if np.issubdtype(t.dtype, np.floating) else 7
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: fill(empty_like(*a, **k)))
    monkeypatch.setattr(np, "empty", lambda *a, **k: fill(np_empty(*a, **k)))
    yield


@pytest.fixture(params=CPU_BACKENDS if DEVICE == "cpu" else ("triton", "torch"))
def backend(request):
    """Run the test body on each backend in turn."""
    import fastvae

    with fastvae.use_backend(request.param):
        yield request.param
