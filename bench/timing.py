"""How time, the copy-bandwidth ceiling and peak memory are measured.

Time
    On CUDA, :func:`triton.testing.do_bench`: CUDA events around each call, the L2 cache flushed
    before each call, warm-up and repetitions given in milliseconds; we take every per-call time
    (``return_mode="all"``) and report the median and the interquartile range.  On the CPU,
    ``time.perf_counter`` around each call after a warm-up, the implementations of a case taking
    turns in short blocks separated by idle gaps (so that bursts of load from other processes hit
    them all alike, and no implementation runs while another's thread pool is still spinning), each
    repeated until both a minimum count and a minimum total time are reached, with the garbage
    collector paused; again the median and IQR.  The returned outputs are dropped after the clock
    stops.

Copy ceiling
    ``dst.copy_(src)`` of a tensor much larger than the last-level cache, timed the same way;
    bandwidth = 2 x bytes (one read, one write) / median time.  That is the bandwidth a
    memory-bound op can hope for on the device, measured in the same run as the ops.

Peak memory
    On CUDA, ``torch.cuda.max_memory_allocated()`` during one call minus ``memory_allocated()``
    before it: the extra device memory the call needs (outputs and intermediates, as seen by
    PyTorch's caching allocator, through which Triton and CuPy outputs are allocated too).
    On the CPU there is no allocator statistic, so we measure the growth of the resident set: the
    peak RSS (``VmHWM``, reset through ``/proc/self/clear_refs``) during one call minus the RSS
    before it.  glibc would otherwise serve allocations from memory already resident, so first
    :func:`prepare_cpu_rss` pins glibc's mmap threshold to 64 KiB (every allocation of 64 KiB or
    more gets fresh pages and gives them back on free) and each measurement trims the heap first.
    This changes allocation costs, so it is done after all timings.  The figure is a good
    estimate of the call's extra memory for tensors of 64 KiB or more; smaller allocations reused
    from free lists, thread stacks and JIT caches are not seen, and the kernel's RSS counters are
    approximate to a few hundred KiB.
"""

from __future__ import annotations

import ctypes
import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class Budget:
    """How long to measure one (case, implementation) pair."""

    warmup_s: float  # CPU: warm-up time (and at least 2 calls)
    min_repeats: int  # CPU: at least this many timed calls ...
    min_time_s: float  # ... and at least this much timed time ...
    max_time_s: float  # ... but stop after this long (keeping at least 3 calls)
    max_repeats: int
    block_s: float  # CPU: length of one turn of an implementation ...
    gap_s: float  # ... and the idle time before it
    gpu_warmup_ms: int  # CUDA: do_bench's warmup and rep, in milliseconds
    gpu_rep_ms: int


BUDGETS = {
    "smoke": Budget(0.0, 3, 0.0, 0.5, 5, 0.05, 0.01, gpu_warmup_ms=5, gpu_rep_ms=10),
    "quick": Budget(0.1, 7, 0.4, 2.0, 500, 0.1, 0.02, gpu_warmup_ms=25, gpu_rep_ms=100),
    "full": Budget(0.3, 15, 2.0, 10.0, 2000, 0.25, 0.02, gpu_warmup_ms=50, gpu_rep_ms=500),
}


@dataclass(frozen=True)
class Timing:
    """Median, quartiles and minimum of the per-call times, in seconds, over ``repeats`` timed calls."""

    median_s: float
    q25_s: float
    q75_s: float
    min_s: float
    repeats: int

    @classmethod
    def from_samples(cls, seconds: list[float]) -> Timing:
        s = sorted(seconds)
        if len(s) >= 2:
            q25, _, q75 = statistics.quantiles(s, n=4, method="inclusive")
        else:
            q25 = q75 = s[0]
        return cls(statistics.median(s), q25, q75, s[0], len(s))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _do_bench_times(fn: Callable[[], object], budget: Budget) -> list[float]:
    """Per-call CUDA-event times in seconds from triton's do_bench."""
    from triton.testing import do_bench

    try:
        ms = do_bench(fn, warmup=budget.gpu_warmup_ms, rep=budget.gpu_rep_ms, return_mode="all")
    except AssertionError:  # a Triton without return_mode="all": fall back to its quartiles
        q = do_bench(fn, warmup=budget.gpu_warmup_ms, rep=budget.gpu_rep_ms, quantiles=[0.25, 0.5, 0.75])
        ms = list(q)
    return [t * 1e-3 for t in ms]


def _interleaved_perf_counter_times(
    fns: dict[str, Callable[[], object]], budget: Budget
) -> dict[str, list[float]]:
    """Per-call wall-clock times in seconds on the CPU, the functions taking turns in blocks.

    Each turn is a block of calls of one function lasting about ``block_s``, preceded by an idle
    gap of ``gap_s``: the thread pools of the previous function (torch's OpenMP, Numba's) stop
    spinning before the next one starts, so that no implementation is charged for another's idle
    threads, while turns spread bursts of load from other processes over all the implementations.
    A function leaves the rotation once it has ``min_repeats`` calls and ``min_time_s`` in total
    (or ``max_repeats``, or ``max_time_s``).
    """
    for fn in fns.values():  # warm-up, in blocks as well
        time.sleep(budget.gap_s)
        t0, calls = time.perf_counter(), 0
        while calls < 2 or time.perf_counter() - t0 < budget.warmup_s:
            fn()
            calls += 1
    times: dict[str, list[float]] = {name: [] for name in fns}
    totals = dict.fromkeys(fns, 0.0)
    active = list(fns)
    gc.collect()
    gc.disable()
    try:
        while active:
            for name in list(active):
                time.sleep(budget.gap_s)
                block = 0.0
                while True:
                    t0 = time.perf_counter()
                    out = fns[name]()
                    dt = time.perf_counter() - t0
                    del out
                    times[name].append(dt)
                    totals[name] += dt
                    block += dt
                    n = len(times[name])
                    enough = n >= budget.min_repeats and totals[name] >= budget.min_time_s
                    if enough or n >= budget.max_repeats or (totals[name] >= budget.max_time_s and n >= 3):
                        active.remove(name)
                        break
                    if block >= budget.block_s:
                        break
    finally:
        gc.enable()
    return times


def measure_many(
    fns: dict[str, Callable[[], object]], device: torch.device, budget: Budget
) -> dict[str, Timing]:
    """Time each of ``fns`` (which must not synchronise) on ``device``; see the module docstring."""
    if device.type == "cuda":
        return {name: Timing.from_samples(_do_bench_times(fn, budget)) for name, fn in fns.items()}
    return {name: Timing.from_samples(t) for name, t in _interleaved_perf_counter_times(fns, budget).items()}


def measure(fn: Callable[[], object], device: torch.device, budget: Budget) -> Timing:
    """Time one function (see :func:`measure_many`)."""
    return measure_many({"fn": fn}, device, budget)["fn"]


# ----------------------------------------------------------------------------------------------
# The ceiling: a device-to-device copy
# ----------------------------------------------------------------------------------------------


def copy_bytes(device: torch.device, cache: int) -> int:
    """Size of the copied tensor: 1 GiB on a GPU, 8x the last-level cache (at least 256 MiB) on a CPU."""
    if device.type == "cuda":
        return 2**30
    return max(256 * 2**20, 8 * cache)


def copy_bandwidth(device: torch.device, budget: Budget, nbytes: int) -> dict[str, Any]:
    """Measure ``dst.copy_(src)`` of ``nbytes`` float32 bytes; bandwidth counts 2 x nbytes moved."""
    n = nbytes // 4
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch every page of dst before timing
    timing = measure(lambda: dst.copy_(src), device, budget)
    return {
        "bytes": n * 4,
        "moved_bytes": 2 * n * 4,
        "time": timing.to_dict(),
        "gbps": 2 * n * 4 / timing.median_s / 1e9,
        "how": "dst.copy_(src) of a float32 tensor; bandwidth = 2 x bytes / median time (1 GB = 1e9 B)",
    }


# ----------------------------------------------------------------------------------------------
# Peak memory
# ----------------------------------------------------------------------------------------------

_M_MMAP_THRESHOLD = -3  # mallopt parameter number (glibc malloc.h)
_MMAP_THRESHOLD_BYTES = 64 * 2**10
_libc: ctypes.CDLL | None = None


def _glibc() -> ctypes.CDLL | None:
    global _libc
    if _libc is None:
        try:
            lib = ctypes.CDLL("libc.so.6")
        except OSError:
            return None
        if not (hasattr(lib, "mallopt") and hasattr(lib, "malloc_trim")):  # glibc only
            return None
        _libc = lib
    return _libc


def _proc_status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def cpu_rss_method() -> str | None:
    """Why CPU peak memory cannot be measured here (None when it can)."""
    if _glibc() is None:
        return "needs glibc (mallopt, malloc_trim)"
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _proc_status_bytes("VmHWM")
    except (OSError, KeyError):
        return "needs Linux's /proc/self/clear_refs and VmHWM"
    return None


def prepare_cpu_rss() -> bool:
    """Pin glibc's mmap threshold (for the rest of the process: call after all timings)."""
    lib = _glibc()
    return (
        lib is not None
        and cpu_rss_method() is None
        and bool(lib.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES))
    )


def _cpu_peak_rss_growth(fn: Callable[[], object]) -> int:
    lib = _glibc()
    lib.malloc_trim(0)  # (no gc.collect() here: it costs 0.1-0.3 s; tensors are freed by refcount)
    before = _proc_status_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := current RSS
    out = fn()
    peak = _proc_status_bytes("VmHWM")
    del out
    return max(0, peak - before)


def _cuda_peak(fn: Callable[[], object], device: torch.device) -> int:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del out
    return peak - before


def peak_memory(fn: Callable[[], object], device: torch.device) -> int | None:
    """Extra memory one call of ``fn`` needs at its peak, in bytes (see the module docstring)."""
    if device.type == "cuda":
        return _cuda_peak(fn, device)
    if cpu_rss_method() is not None:
        return None
    return _cpu_peak_rss_growth(fn)


def memory_method(device: torch.device) -> str:
    """One line for the record: what the peak-memory figures mean on ``device``."""
    if device.type == "cuda":
        return (
            "torch.cuda.max_memory_allocated() during one call minus memory_allocated() before it: "
            "outputs and intermediates through PyTorch's caching allocator"
        )
    why = cpu_rss_method()
    if why is not None:
        return f"not measured: {why}"
    return (
        "growth of the resident set during one call (VmHWM reset via /proc/self/clear_refs, minus VmRSS "
        "before), with glibc's mmap threshold pinned to 64 KiB and the heap trimmed first, measured after "
        "all timings: outputs and intermediates of 64 KiB or more; approximate to a few hundred KiB"
    )
