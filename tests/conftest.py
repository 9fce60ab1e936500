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


def _fix_triton36_interpreter_index() -> None:
    """Let Triton 3.6's interpreter use a scalar kernel argument as an integer under NumPy >= 2.4.

    The interpreter holds a scalar argument (``F`` in ``range(0, F, BLOCK_F)``) as a 1-element array
    and converts it with ``int(data)``; NumPy 2.4 made ``int()`` of an array with ndim > 0 a TypeError
    (deprecated since 1.25), so every kernel with a loop bounded by an argument failed.  Triton 3.9
    converts with ``int(data.squeeze())``; this installs that same line before 3.9 (harmless where a
    version already has it).  The interpreter only runs in tests (on GPUs Triton compiles), so the fix
    lives here rather than as a NumPy pin that would hold back every user's NumPy.
    """
    try:
        import triton
        from triton.runtime import interpreter
    except ImportError:
        return
    major, minor = (int(v) for v in triton.__version__.split(".")[:2])
    patch_tensor = getattr(interpreter, "_patch_lang_tensor", None)
    if (major, minor) >= (3, 9) or patch_tensor is None:
        return

    def patched(tensor, scope) -> None:
        patch_tensor(tensor, scope)
        # The scope restores attributes last-in first-out, so this undoes cleanly after each launch.
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patched


_fix_triton36_interpreter_index()

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
