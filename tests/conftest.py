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
