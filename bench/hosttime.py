"""Host time per call on the CUDA code path, measured without a GPU (``python -m bench --host``).

On a GPU a small op is host-bound: what it costs is the Python, dispatch, autograd and launch work
on the CPU before the kernel is queued.  That work can be measured on any machine by replacing
only Triton's *driver* -- the layer that talks to libcuda -- with a stub, here, inside ``bench/``
(never in the package):

* the stub driver says the current device is 0, the current stream 0 and the target
  ``GPUTarget("cuda", 90, 32)`` (an H100/H200), so Triton really compiles fastvae's kernels for
  sm_90 (``ptxas`` ships in the triton wheel) and caches them like on a GPU;
* ``utils.load_binary`` returns fake module/function handles, and ``launcher_cls`` builds a
  launcher that does nothing (and counts its calls);
* everything above it is real: fastvae's public functions, its validation and op dispatch,
  autograd, its Python launchers, and ``JITFunction.run`` (argument binding, specialization, the
  kernel cache lookup, grid evaluation), on CPU tensors.  Outputs are garbage: only time counts.

Left out: the CUDA driver's own cost of a launch (``cuLaunchKernel``, a few microseconds), the
C launcher's argument packing, and the allocator's CUDA path (CPU tensors are allocated instead).
Branches in fastvae that test ``device.type`` take their CPU side; ``validate=False`` is passed to
``vae_loss`` because that is its default on CUDA.

Measured on one thread, after a warm-up, median of many calls, the implementations taking turns in
blocks (:func:`bench.timing.measure_many`):

* ``vae_loss`` fwd+bwd (``loss.backward()``) and ``reparameterize`` fwd+bwd (``seed=None``,
  ``z.backward(dz)``) at B=1, F=1, D=1 (pure overhead) and at 128 x 784 x 20 (the pytorch/examples
  batch), on fastvae's triton backend through the stub;
* the eager expressions' fwd+bwd on the CPU at B=1 in the same run:
  ``F.binary_cross_entropy_with_logits(x, t, reduction="sum") + KL`` and
  ``std = exp(0.5 * lv); mu + randn_like(std) * std``: the CPU cost of eager PyTorch's host work
  at a size where the arithmetic is negligible (on a GPU each of its ops also pays a real launch, so
  this is a lower bound of eager's host time there);
* the launches per call, and the time spent inside ``JITFunction.run`` per call (a second pass with
  a timing wrapper around it), so that the rest (fastvae's Python, dispatch, autograd,
  allocation) can be read off.

Runs in a subprocess with ``TRITON_INTERPRET`` unset (the kernels must be real ``JITFunction``\\ s,
not interpreted ones): ``python -m bench.hosttime --mode quick --json out.json``; :func:`run_host`
does that from ``python -m bench``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bench import timing

REPO = Path(__file__).resolve().parent.parent
SIZES = ((1, 1, 1), (128, 784, 20))  # (B, F, D)
TARGETS = {"vae_loss": 0.6, "reparameterize": 0.8}  # host time of fastvae / eager at B=1, at most
BUDGETS = {
    "smoke": timing.Budget(0.02, 20, 0.0, 0.2, 200, 0.05, 0.005, gpu_warmup_ms=0, gpu_rep_ms=0),
    "quick": timing.Budget(0.3, 500, 0.5, 4.0, 20_000, 0.1, 0.01, gpu_warmup_ms=0, gpu_rep_ms=0),
    "full": timing.Budget(1.0, 2_000, 2.0, 10.0, 100_000, 0.2, 0.01, gpu_warmup_ms=0, gpu_rep_ms=0),
}
METER_CALLS = {"smoke": 20, "quick": 500, "full": 2_000}
SUBPROCESS_TIMEOUT_S = 600


# ----------------------------------------------------------------------------------------------
# The stub driver
# ----------------------------------------------------------------------------------------------


class _FakeUtils:
    """The parts of ``CudaUtils`` that Triton's compiler and ``CompiledKernel`` call."""

    # sm_90's opt-in shared memory per block (227 KiB), SM count and registers of an H100/H200.
    PROPERTIES = {"max_shared_mem": 232_448, "multiprocessor_count": 132, "max_num_regs": 65_536}

    def load_binary(
        self, name: str, kernel: bytes, shared: int, device: int
    ) -> tuple[int, int, int, int, int]:
        """(module, function, registers, spills, max threads per block): fake handles, sm_90 limits."""
        return 1, 1, 0, 0, 1024

    def unload_module(self, module: int) -> None:
        return None

    def get_device_properties(self, device: int) -> dict[str, int]:
        return dict(self.PROPERTIES)


class NoOpLauncher:
    """What ``launcher_cls`` builds: called with the grid, stream, function and kernel arguments
    for each launch; does nothing but count."""

    launches = 0

    def __init__(self, src: Any, metadata: Any) -> None:
        return None

    def __call__(self, *args: Any) -> None:
        NoOpLauncher.launches += 1


def _fake_driver() -> Any:
    """A Triton driver for device 0 / stream 0 / sm_90 whose launches do nothing."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase

    class FakeCudaDriver(DriverBase):
        launcher_cls = NoOpLauncher

        def __init__(self) -> None:
            self.utils = _FakeUtils()

        @classmethod
        def is_active(cls) -> bool:
            return False  # never chosen by Triton's own driver discovery

        def map_python_to_cpp_type(self, ty: str) -> str:
            from triton.backends.nvidia.driver import ty_to_cpp

            return ty_to_cpp(ty)

        def get_current_target(self) -> Any:
            return GPUTarget("cuda", 90, 32)

        def get_current_device(self) -> int:
            return 0

        def set_current_device(self, device: int) -> None:
            return None

        def get_current_stream(self, device: int | None = None) -> int:
            return 0

        def get_device_capability(self, device: int = 0) -> tuple[int, int]:
            return 9, 0

        def get_active_torch_device(self) -> torch.device:
            return torch.device("cpu")  # where the tensors of this run live

        def get_benchmarker(self) -> Callable[..., Any]:
            raise RuntimeError("the stub driver has no benchmarker")

    return FakeCudaDriver()


def install_stub() -> None:
    """Make the stub Triton's active driver, and let fastvae run its triton backend on CPU tensors
    without the interpreter.  Call before the first kernel is launched, with ``TRITON_INTERPRET``
    unset (it is read when fastvae's kernels are decorated)."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("bench.hosttime needs TRITON_INTERPRET unset: the kernels must not be interpreted")
    from triton.runtime.driver import driver

    import fastvae.ops

    driver.set_active(_fake_driver())
    fastvae.ops._check_triton_on_cpu = lambda *args, **kwargs: None


class LaunchMeter:
    """Counts and times the calls of ``JITFunction.run`` (a kernel's ``kernel[grid](...)``)."""

    def __init__(self) -> None:
        self.calls = 0
        self.seconds = 0.0

    @contextlib.contextmanager
    def installed(self) -> Iterator[LaunchMeter]:
        from triton.runtime.jit import JITFunction

        original = JITFunction.run

        def run(fn: Any, *args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return original(fn, *args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0
                self.calls += 1

        JITFunction.run = run
        try:
            yield self
        finally:
            JITFunction.run = original


# ----------------------------------------------------------------------------------------------
# What is timed
# ----------------------------------------------------------------------------------------------


def _leaf(*shape: int, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape) * scale).requires_grad_(True)


def _calls(B: int, F_: int, D: int) -> dict[str, Callable[[], object]]:
    """fwd+bwd of each op at (B, F, D): fastvae (triton backend) and, at B=1, the eager expressions.

    Every call resets the leaves' ``.grad`` first, so each backward writes fresh gradients (no
    accumulation), for fastvae and eager alike.
    """
    import fastvae

    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(B, F_, generator=gen) * 2).requires_grad_(True)
    t = torch.rand(B, F_, generator=gen)
    mu = torch.randn(B, D, generator=gen).requires_grad_(True)
    lv = (torch.randn(B, D, generator=gen) * 0.5).requires_grad_(True)
    dz = torch.randn(B, D, generator=gen)

    def reset() -> None:
        x.grad = mu.grad = lv.grad = None

    def fastvae_loss() -> None:
        reset()
        fastvae.vae_loss(x, t, mu, lv, validate=False).backward()

    def fastvae_reparameterize() -> None:
        reset()
        fastvae.reparameterize(mu, lv).backward(dz)

    def eager_loss() -> None:
        reset()
        bce = F.binary_cross_entropy_with_logits(x, t, reduction="sum")
        (bce + -0.5 * torch.sum(1 + lv - mu.pow(2) - lv.exp())).backward()

    def eager_reparameterize() -> None:
        reset()
        std = torch.exp(0.5 * lv)
        (mu + torch.randn_like(std) * std).backward(dz)

    size = f"{B}x{F_}x{D}"
    calls: dict[str, Callable[[], object]] = {
        f"vae_loss {size} fastvae": fastvae_loss,
        f"reparameterize {B}x{D} fastvae": fastvae_reparameterize,
    }
    if (B, F_, D) == (1, 1, 1):
        calls[f"vae_loss {size} eager"] = eager_loss
        calls[f"reparameterize {B}x{D} eager"] = eager_reparameterize
    return calls


def measure(mode: str) -> dict[str, Any]:
    """Install the stub, time every call (see the module docstring); the record's ``"host"`` section."""
    torch.set_num_threads(1)
    # Triton 3.9 warns once that its FP-fusion default will change; the package's default is kept.
    warnings.filterwarnings("ignore", "TRITON_DEFAULT_FP_FUSION is unset")
    install_stub()
    import fastvae

    budget = BUDGETS[mode]
    calls: dict[str, Callable[[], object]] = {}
    for B, F_, D in SIZES:
        calls.update(_calls(B, F_, D))
    results: dict[str, dict[str, Any]] = {}
    with fastvae.use_backend("triton"):
        for name, fn in calls.items():  # first call: compile for sm_90 (or load from Triton's cache)
            t0 = time.perf_counter()
            fn()
            results[name] = {"first_call_s": time.perf_counter() - t0}
        for name, t in timing.measure_many(calls, torch.device("cpu"), budget).items():
            results[name]["time"] = t.to_dict()
        for name, fn in calls.items():
            if not name.endswith("fastvae"):
                continue
            launches, meter = NoOpLauncher.launches, LaunchMeter()
            with meter.installed():
                for _ in range(METER_CALLS[mode]):
                    fn()
            n = METER_CALLS[mode]
            results[name].update(
                launches_per_call=(NoOpLauncher.launches - launches) / n,
                jit_run_calls_per_call=meter.calls / n,
                jit_run_s_per_call=meter.seconds / n,
            )
    return {
        "status": "ok",
        "mode": mode,
        "threads": torch.get_num_threads(),
        "target": "GPUTarget('cuda', 90, 32) through a stub Triton driver (launches are no-ops)",
        "results": results,
        "ratios": ratios(results),
    }


def ratios(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """fastvae's host time over the eager expression's at B=1 (median and fastest call), per op,
    with the issue's target (at most this ratio)."""
    out = {}
    for op, size in (("vae_loss", "1x1x1"), ("reparameterize", "1x1")):
        fv, eager = results.get(f"{op} {size} fastvae"), results.get(f"{op} {size} eager")
        if fv and eager and "time" in fv and "time" in eager:
            out[op] = {
                "median": fv["time"]["median_s"] / eager["time"]["median_s"],
                "min": fv["time"]["min_s"] / eager["time"]["min_s"],
                "target": TARGETS[op],
            }
    return out


# ----------------------------------------------------------------------------------------------
# Running it from python -m bench
# ----------------------------------------------------------------------------------------------


def clean_env() -> dict[str, str]:
    """The environment of the subprocess: no interpreter, no forced backend, one thread."""
    drop = ("TRITON_INTERPRET", "FASTVAE_BACKEND")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1")
    return env


def run_host(mode: str, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run :func:`measure` in a fresh subprocess; its section, or ``{"status": "FAILED", "reason"}``."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "host.json"
        cmd = [sys.executable, "-m", "bench.hosttime", "--mode", mode, "--json", str(out)]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(
                cmd, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S
            )
        except subprocess.TimeoutExpired:
            return {"status": "FAILED", "reason": f"timed out after {SUBPROCESS_TIMEOUT_S} s"}
        if proc.returncode != 0 or not out.exists():
            tail = (proc.stderr or proc.stdout)[-1500:]
            return {"status": "FAILED", "reason": f"exit {proc.returncode}: {tail}"}
        section = json.loads(out.read_text())
    section["duration_s"] = time.perf_counter() - t0
    for name, r in section["results"].items():
        log(f"host {name}: {r['time']['median_s'] * 1e6:.1f} us")
    return section


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.hosttime", description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", default="quick", choices=tuple(BUDGETS))
    p.add_argument("--json", type=Path, required=True, help="where to write the section (JSON)")
    args = p.parse_args(argv)
    args.json.write_text(json.dumps(measure(args.mode), indent=1) + "\n")


if __name__ == "__main__":
    main()
