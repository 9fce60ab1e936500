"""The one-call GPU proof: everything a first GPU session must show, in at most 8 minutes, one JSON record.

On a lent GPU machine (torch + triton preinstalled, no network), from the repository root::

    python3 -m pip install -q --no-deps --no-build-isolation -e . &&
        PYTHONUNBUFFERED=1 python3 -m bench.gpu_proof

(one device ``run`` with ``timeout_s=600``: the install, then at most 8 minutes).

Steps, each with its time budget (``STEPS``; they sum to at most ``TOTAL_BUDGET_S`` = 480 s):

    env              device, driver, versions, clocks
    copy_bandwidth   device-to-device copy of 4 GiB: bytes read + written / median time (the ceiling)
    eps_reference    z = reparameterize(mu, logvar, seed, offset) over 2^20 and 2^16 x 68 elements (1-warp
                     and 4-warp programs) against the float64
                     NumPy reference (fastvae.reference), relative error < 1e-5; in float16 and
                     bfloat16 (the MUFU draw) within one rounding step (``half_precision_excess`` <= 1)
    big_reparameterize  forward and backward over 2^31 + 2^20 elements (int64 counters and addresses):
                     eps recovered from z at indices around 2^31 and random ones against the reference,
                     and its mean / variance over all elements within 6 sigma of N(0, 1)
    big_vae_loss     fused BCE + KL with gradients over 2739200 x 784 > 2^31 elements (uint8 targets):
                     sampled rows' losses and gradients against the reference, the total against a
                     float64 sum over all rows
    determinism      two runs bit-identical: vae_loss at 65536 x 784 and at 8 x 3*256*256 (split rows),
                     reparameterize at 65536 x 64
    tests            ``pytest tests`` on CUDA (no interpreter: tests/conftest.py sets it only without CUDA)
    bench            ``python -m bench --device cuda --quick`` (large and training sizes); its record is
                     embedded in this one

The record goes to ``$OUT/gpu_proof.json`` when ``OUT`` is set (the device tool's folder), else to
``bench/out/``; it is rewritten after every step, so a run stopped at its limit keeps what it did.
``--dry-run`` runs every step that needs no GPU on the CPU at small sizes (the reference checks, the
record, the step list and its budget) and lists the commands of the subprocess steps without running
them; CI runs it (tests/test_gpu_proof.py).  Exit status 0 when every step that ran passed.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
TOTAL_BUDGET_S = 480.0  # the 8 minutes
TWO31 = 2**31
SEED, OFFSET = 20261130, 12345


@dataclass
class Ctx:
    """What a step needs: the device, whether this is a dry run, the record's folder, the deadline."""

    device: str
    dry: bool
    out: Path
    deadline: float

    @property
    def gpu(self) -> bool:
        return self.device == "cuda"

    def remaining(self) -> float:
        return self.deadline - time.monotonic()


@dataclass(frozen=True)
class Step:
    name: str
    budget_s: float
    run: Callable[[Ctx], dict]
    needs_gpu_process: bool = False  # a subprocess step: listed, not run, in a dry run


class CheckFailed(AssertionError):
    """A proof check did not hold; the message says which and by how much."""


def check(ok: bool, what: str) -> None:
    if not ok:
        raise CheckFailed(what)


def rel_err(actual, expected) -> float:
    """||actual - expected|| / ||expected|| in float64 (NaN: infinite)."""
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    if not np.all(np.isfinite(a)):
        return math.inf
    return float(np.linalg.norm(a - e) / max(np.linalg.norm(e), 1e-300))


def _torch():
    import torch

    return torch


def _np(t) -> np.ndarray:
    """A tensor as NumPy: float64, or uint8 pixels kept (the reference reads them as t / 255)."""
    t = t.detach().cpu()
    return t.numpy() if t.dtype == _torch().uint8 else t.double().numpy()


def _sync(ctx: Ctx) -> None:
    if ctx.gpu:
        _torch().cuda.synchronize()


def median_time(ctx: Ctx, fn: Callable[[], object], reps: int) -> float:
    """Median seconds of ``fn`` after one warm-up: CUDA events on the GPU, the host clock on the CPU."""
    torch = _torch()
    fn()
    _sync(ctx)
    times = []
    for _ in range(reps):
        if ctx.gpu:
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _free(ctx: Ctx) -> None:
    """Return a finished step's device memory (its tensors died with its frame) to the driver, so the
    subprocess steps find the GPU empty."""
    gc.collect()
    if ctx.gpu:
        _torch().cuda.empty_cache()


# ------------------------------------------------------------------------------------------------
# Steps
# ------------------------------------------------------------------------------------------------


def step_env(ctx: Ctx) -> dict:
    torch = _torch()
    info: dict = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "cuda_available": torch.cuda.is_available(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if ctx.gpu:
        props = torch.cuda.get_device_properties(0)
        info.update(
            name=props.name,
            sms=props.multi_processor_count,
            memory_bytes=props.total_memory,
            capability=f"{props.major}.{props.minor}",
            cuda=torch.version.cuda,
        )
        if shutil.which("nvidia-smi"):
            q = "name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.draw,temperature.gpu"
            smi = subprocess.run(
                ["nvidia-smi", f"--query-gpu={q}", "--format=csv"], capture_output=True, text=True, timeout=20
            )
            info["nvidia_smi"] = smi.stdout.strip()
    info["interpreter"] = os.environ.get("TRITON_INTERPRET") == "1"
    check(not (ctx.gpu and info["interpreter"]), "TRITON_INTERPRET=1 on a GPU run: kernels would not compile")
    return info


def step_copy_bandwidth(ctx: Ctx) -> dict:
    """Bytes read + written by ``dst.copy_(src)`` over the median time: the memory ceiling."""
    torch = _torch()
    n = 2**30 if ctx.gpu else 2**20  # 4 GiB of fp32 on the GPU
    src = torch.rand(n, device=ctx.device)
    dst = torch.empty_like(src)
    t = median_time(ctx, lambda: dst.copy_(src), reps=20 if ctx.gpu else 3)
    check(torch.equal(dst, src), "copy_ result differs from its source")
    moved = 2 * src.numel() * src.element_size()
    return {"bytes_moved": moved, "seconds": t, "GBps": moved / t / 1e9}


# (mantissa bits, smallest normal exponent) of the 16-bit types.
HALF_FORMATS = {"float16": (10, -14), "bfloat16": (7, -126)}


def half_precision_excess(got, want, sigma, eps, dtype: str) -> float:
    """max |got - want| / (one rounding step of ``dtype`` at the larger of |got|, |want| + sigma
    (2^-15 |eps| + 2^-16)): at most 1 for a 16-bit reparameterize (``z`` or ``dlogvar / (dz / 2)``)
    whose sigma eps is within twice the MUFU draw's bound (``_box_muller_mufu``: sigma (2^-16 |eps| +
    2^-19 r), r <= 5.7) of the exact one."""
    mant, emin = HALF_FORMATS[dtype]
    mag = np.maximum(np.maximum(np.abs(got), np.abs(want)), 2.0**emin)
    step = 2.0 ** (np.floor(np.log2(mag)) - mant)
    return float(np.max(np.abs(got - want) / (step + sigma * (2.0**-15 * np.abs(eps) + 2.0**-16))))


def step_eps_reference(ctx: Ctx) -> dict:
    """A seeded draw at an offset against the float64 reference, element by element; the same in
    float16 and bfloat16 (on a GPU the MUFU draw) to within one rounding step.  On a GPU at 2^20
    elements (1-warp programs) and at 2^16 x 68 (4-warp ones: ``reparameterize.launch_config``)."""
    import fastvae
    from fastvae import reference

    torch = _torch()
    out = {}
    for i, shape in enumerate([(2**14, 64), (2**16, 68)] if ctx.gpu else [(64, 32)]):
        gen = torch.Generator(device="cpu").manual_seed(1 + i)
        mu = torch.randn(shape, generator=gen).to(ctx.device)
        lv = (0.5 * torch.randn(shape, generator=gen)).to(ctx.device)
        z = fastvae.reparameterize(mu, lv, seed=SEED, offset=OFFSET)
        ref = reference.reparameterize(_np(mu), _np(lv), SEED, OFFSET)
        err = rel_err(_np(z), ref)
        check(err < 1e-5, f"{shape} z vs reference: relative error {err:.3g} >= 1e-5")
        eps_ref = reference.eps(SEED, shape, OFFSET)
        eps = (_np(z) - _np(mu)) / np.exp(0.5 * _np(lv))
        max_abs = float(np.max(np.abs(eps - eps_ref)))
        row = {"elements": int(np.prod(shape)), "offset": OFFSET, "rel_err": err, "eps_max_abs_err": max_abs}
        for name in HALF_FORMATS:
            mu16, lv16 = mu.to(getattr(torch, name)), lv.to(getattr(torch, name))
            z16 = fastvae.reparameterize(mu16, lv16, seed=SEED, offset=OFFSET)
            sigma = np.exp(0.5 * _np(lv16))
            excess = half_precision_excess(_np(z16), _np(mu16) + sigma * eps_ref, sigma, eps_ref, name)
            check(excess <= 1.0, f"{shape} {name} z vs reference: {excess:.3g} rounding steps (+ bound) > 1")
            row[f"{name}_excess"] = excess
        out[f"{shape[0]}x{shape[1]}"] = row
    return out


def _sample_indices(n: int, rng: np.random.Generator, around: int, k: int) -> np.ndarray:
    """First, last, a few around ``around`` (the 2^31 boundary), and ``k`` random indices below ``n``."""
    fixed = [0, 1, around - 2, around - 1, around, around + 1, n - 2, n - 1]
    idx = np.concatenate([np.array([i for i in fixed if 0 <= i < n]), rng.integers(0, n, k)])
    return np.unique(idx)


def step_big_reparameterize(ctx: Ctx) -> dict:
    """z and dlogvar over more than 2^31 elements, checked at sampled indices and by moments."""
    import fastvae
    from fastvae import reference

    torch = _torch()
    n = TWO31 + 2**20 if ctx.gpu else 4096
    shape = (n // 64, 64)
    gen = torch.Generator(device=ctx.device).manual_seed(2)
    mu = torch.randn(shape, device=ctx.device, generator=gen).mul_(0.5).requires_grad_()
    lv = torch.randn(shape, device=ctx.device, generator=gen).mul_(0.5).requires_grad_()
    z = fastvae.reparameterize(mu, lv, seed=SEED, offset=OFFSET)
    z.backward(torch.ones_like(z))
    _sync(ctx)

    idx = _sample_indices(n, np.random.default_rng(3), TWO31 if ctx.gpu else n // 2, 4096)
    flat = lambda t: t.detach().reshape(-1)
    it = torch.as_tensor(idx, device=ctx.device)
    m, v = flat(mu)[it].double().cpu().numpy(), flat(lv)[it].double().cpu().numpy()
    eps_ref = reference.randn(SEED, OFFSET + idx)
    z_err = rel_err(flat(z)[it].double().cpu().numpy(), m + np.exp(0.5 * v) * eps_ref)
    dlv_err = rel_err(flat(lv.grad)[it].double().cpu().numpy(), 0.5 * np.exp(0.5 * v) * eps_ref)
    dmu_ok = bool((mu.grad == 1.0).all())

    # Moments of eps = (z - mu) / std over every element, accumulated in float64 chunk by chunk.
    s1 = s2 = 0.0
    chunk = 2**26
    zf, mf, vf = flat(z), flat(mu), flat(lv)
    for i in range(0, n, chunk):
        e = ((zf[i : i + chunk] - mf[i : i + chunk]) * torch.exp(-0.5 * vf[i : i + chunk])).double()
        s1 += float(e.sum())
        s2 += float((e * e).sum())
    mean, var = s1 / n, s2 / n - (s1 / n) ** 2
    tol_mean, tol_var = 6 / math.sqrt(n), 6 * math.sqrt(2 / n)
    check(z_err < 1e-5, f"z at sampled indices: relative error {z_err:.3g} >= 1e-5")
    check(dlv_err < 1e-5, f"dlogvar at sampled indices: relative error {dlv_err:.3g} >= 1e-5")
    check(dmu_ok, "dmu is not dz (= 1)")
    check(abs(mean) < tol_mean, f"eps mean {mean:.3g} beyond 6 sigma ({tol_mean:.3g})")
    check(abs(var - 1) < tol_var, f"eps variance {var:.6f} beyond 6 sigma of 1 ({tol_var:.3g})")
    return {
        "elements": n,
        "over_2_31": n > TWO31,
        "sampled": len(idx),
        "z_rel_err": z_err,
        "dlogvar_rel_err": dlv_err,
        "eps_mean": mean,
        "eps_var": var,
    }


def _bce_kl_total_f64(x, t, mu, lv) -> float:
    """sum BCE(x, t) + KL(mu, lv) in float64 over row chunks (uint8 t read as t / 255): the total's
    reference, computed on the device."""
    torch = _torch()
    total = 0.0
    rows = max(1, 2**26 // x.shape[1])
    for r in range(0, x.shape[0], rows):
        xs = x[r : r + rows].double()
        ts = t[r : r + rows].double() / (255.0 if t.dtype == torch.uint8 else 1.0)
        total += float((xs.clamp(min=0) - xs * ts + torch.log1p(torch.exp(-xs.abs()))).sum())
    m, v = mu.double(), lv.double()
    return total + float((-0.5 * (1 + v - m * m - torch.exp(v))).sum())


def step_big_vae_loss(ctx: Ctx) -> dict:
    """Fused BCE + KL over more than 2^31 logits, with gradients; rows and total against float64."""
    import fastvae
    from fastvae import reference

    torch = _torch()
    F, D = 784, 20
    B = 2_739_200 if ctx.gpu else 64  # 2739200 * 784 = 2147532800 > 2^31
    gen = torch.Generator(device=ctx.device).manual_seed(4)
    x = torch.randn(B, F, device=ctx.device, generator=gen).mul_(3.0).requires_grad_()
    t = torch.randint(0, 256, (B, F), device=ctx.device, dtype=torch.uint8, generator=gen)
    mu = torch.randn(B, D, device=ctx.device, generator=gen).requires_grad_()
    lv = torch.randn(B, D, device=ctx.device, generator=gen).mul_(0.5).requires_grad_()

    loss = fastvae.vae_loss(x, t, mu, lv, reduction="sum")
    loss.backward()
    with torch.no_grad():
        per_row = fastvae.vae_loss(x, t, mu, lv, reduction="none")
    _sync(ctx)

    rows = _sample_indices(B, np.random.default_rng(5), TWO31 // F if ctx.gpu else B // 2, 64)
    ri = torch.as_tensor(rows, device=ctx.device)
    xr, tr, mr, vr = (_np(a.detach()[ri]) for a in (x, t, mu, lv))
    row_err = rel_err(_np(per_row[ri]), reference.vae_loss(xr, tr, mr, vr, reduction="none"))
    gx, gm, gv = reference.vae_loss_backward(xr, tr, mr, vr, reduction="sum")
    grad_err = max(rel_err(_np(x.grad[ri]), gx), rel_err(_np(mu.grad[ri]), gm), rel_err(_np(lv.grad[ri]), gv))
    total_ref = _bce_kl_total_f64(x.detach(), t, mu.detach(), lv.detach())
    total_err = abs(float(loss.detach()) - total_ref) / abs(total_ref)
    rows_sum_err = abs(float(per_row.double().sum()) - total_ref) / abs(total_ref)
    check(row_err < 1e-5, f"per-row losses at sampled rows: relative error {row_err:.3g} >= 1e-5")
    check(grad_err < 1e-5, f"gradients at sampled rows: relative error {grad_err:.3g} >= 1e-5")
    # The kernel's total sums some 7e5 per-program fp32 partials (256 lanes, about 2700 each, in a
    # fixed order): rounding grows like sqrt(terms) * 2^-24, near 1e-5 at worst there, so the total
    # gets 1e-4; rows, gradients and the float64 sum of the fp32 rows keep 1e-5.
    check(total_err < 1e-4, f"total loss vs float64: relative error {total_err:.3g} >= 1e-4")
    check(rows_sum_err < 1e-5, f"sum of per-row losses vs float64: relative error {rows_sum_err:.3g}")
    return {
        "shape": [B, F, D],
        "elements": B * F,
        "over_2_31": B * F > TWO31,
        "sampled_rows": len(rows),
        "row_rel_err": row_err,
        "grad_rel_err": grad_err,
        "total_rel_err": total_err,
        "rows_sum_rel_err": rows_sum_err,
    }


def step_determinism(ctx: Ctx) -> dict:
    """The same inputs twice: losses and gradients bit-identical (no atomics, fixed summation order)."""
    import fastvae

    torch = _torch()
    shapes = [(65536, 784), (8, 3 * 256 * 256)] if ctx.gpu else [(64, 784), (2, 3 * 32 * 32)]
    out = {}
    for B, F in shapes:
        gen = torch.Generator(device=ctx.device).manual_seed(6)
        x = torch.randn(B, F, device=ctx.device, generator=gen).requires_grad_()
        t = torch.rand(B, F, device=ctx.device, generator=gen)
        mu = torch.randn(B, 20, device=ctx.device, generator=gen).requires_grad_()
        lv = torch.randn(B, 20, device=ctx.device, generator=gen).requires_grad_()
        runs = []
        for _ in range(2):
            x.grad = mu.grad = lv.grad = None
            loss = fastvae.vae_loss(x, t, mu, lv, reduction="mean")
            loss.backward()
            runs.append([loss.detach().clone(), x.grad.clone(), mu.grad.clone(), lv.grad.clone()])
        same = all(torch.equal(a, b) for a, b in zip(*runs, strict=True))
        ref = _bce_kl_total_f64(x.detach(), t, mu.detach(), lv.detach()) / B
        err = abs(float(runs[0][0]) - ref) / abs(ref)
        out[f"vae_loss {B}x{F}"] = {"bit_identical": same, "loss_rel_err": err}
        check(same, f"vae_loss {B}x{F}: two runs differ")
        check(err < 1e-5, f"vae_loss {B}x{F}: relative error {err:.3g} vs float64")
    shape = (65536, 64) if ctx.gpu else (64, 64)
    mu = torch.randn(shape, device=ctx.device)
    lv = torch.randn(shape, device=ctx.device)
    same = torch.equal(fastvae.reparameterize(mu, lv, seed=SEED), fastvae.reparameterize(mu, lv, seed=SEED))
    out[f"reparameterize {shape[0]}x{shape[1]}"] = {"bit_identical": same}
    check(same, "reparameterize: two runs with one seed differ")
    return out


def _subprocess_step(ctx: Ctx, cmd: list[str], budget_s: float, env: dict | None = None) -> dict:
    """Run ``cmd`` from the repository root within the step's budget; its output tail is kept."""
    if ctx.dry:
        return {"command": cmd, "ran": False}
    timeout = max(1.0, min(budget_s, ctx.remaining()))
    start = time.monotonic()
    try:
        proc = subprocess.run(
            cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env or dict(os.environ)
        )
    except subprocess.TimeoutExpired as e:
        tail = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else e.stdout or ""
        raise CheckFailed(f"{' '.join(cmd[1:])}: timed out after {timeout:.0f} s; {tail[-3000:]}") from None
    return {
        "command": cmd,
        "ran": True,
        "returncode": proc.returncode,
        "seconds": round(time.monotonic() - start, 1),
        "output_tail": (proc.stdout + proc.stderr)[-4000:],
    }


def step_tests(ctx: Ctx) -> dict:
    """The whole test suite on CUDA; over 8 workers, one test file each, when pytest-xdist is there
    (module-scoped fixtures such as the AOT compile then run once)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "tests"]
    try:
        import xdist  # noqa: F401

        cmd += ["-n", "8", "--dist", "loadfile"]
    except ImportError:
        pass
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = _subprocess_step(ctx, cmd, STEP_BUDGET["tests"], env)
    if result["ran"]:
        summary = [line for line in result["output_tail"].splitlines() if " in " in line and "passed" in line]
        result["summary"] = summary[-1] if summary else None
        check(result["returncode"] == 0, f"pytest exited {result['returncode']}: {result['summary']}")
    return result


def step_bench(ctx: Ctx) -> dict:
    """``python -m bench --device cuda --quick`` into a scratch folder; its JSON record is embedded
    in this one (so the proof stays one file)."""
    with tempfile.TemporaryDirectory() as folder:
        cmd = [sys.executable, "-m", "bench", "--device", "cuda", "--quick", "--out", folder]
        result = _subprocess_step(ctx, cmd, STEP_BUDGET["bench"])
        records = sorted(Path(folder).glob("*.json"), key=lambda p: p.stat().st_mtime)
        result["record"] = json.loads(records[-1].read_text()) if records else None
    if result["ran"]:
        check(result["returncode"] == 0, f"bench exited {result['returncode']}")
        check(result["record"] is not None, "bench wrote no JSON record")
    return result


STEPS: tuple[Step, ...] = (
    Step("env", 15, step_env),
    Step("copy_bandwidth", 15, step_copy_bandwidth),
    Step("eps_reference", 25, step_eps_reference),
    Step("big_reparameterize", 45, step_big_reparameterize),
    Step("big_vae_loss", 60, step_big_vae_loss),
    Step("determinism", 30, step_determinism),
    Step("tests", 150, step_tests, needs_gpu_process=True),
    Step("bench", 140, step_bench, needs_gpu_process=True),
)
STEP_BUDGET = {s.name: s.budget_s for s in STEPS}


# ------------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------------


def _commit() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def write_record(record: dict, path: Path) -> None:
    """Write atomically (a run killed mid-write leaves the previous complete record)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1, default=str) + "\n")
    tmp.replace(path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_proof", description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, small sizes, no subprocess steps (CI)")
    ap.add_argument("--out", type=Path, help="folder of the record (default: $OUT, else bench/out)")
    ap.add_argument(
        "--only", default="", help=f"comma-separated steps to run (default all: {', '.join(STEP_BUDGET)})"
    )
    args = ap.parse_args(argv)
    args.steps = [s for s in args.only.split(",") if s] or list(STEP_BUDGET)
    unknown = [s for s in args.steps if s not in STEP_BUDGET]
    if unknown:
        ap.error(f"--only: unknown step(s) {unknown}; expected some of {list(STEP_BUDGET)}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the steps in order within TOTAL_BUDGET_S, rewriting the record after each; 0 if all passed."""
    args = parse_args(argv)
    assert sum(STEP_BUDGET.values()) <= TOTAL_BUDGET_S, STEP_BUDGET
    torch = _torch()
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_proof: no CUDA device; use --dry-run on a machine without a GPU", file=sys.stderr)
        return 2
    out = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "bench" / "out")
    out.mkdir(parents=True, exist_ok=True)
    path = out / ("gpu_proof-dry-run.json" if args.dry_run else "gpu_proof.json")
    ctx = Ctx("cpu" if args.dry_run else "cuda", args.dry_run, out, time.monotonic() + TOTAL_BUDGET_S)
    record: dict = {
        "kind": "gpu-proof",
        "dry_run": args.dry_run,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": _commit(),
        "budget_s": TOTAL_BUDGET_S,
        "steps": [],
    }
    for step in STEPS:
        entry: dict = {"name": step.name, "budget_s": step.budget_s}
        record["steps"].append(entry)
        if step.name not in args.steps:
            entry["status"] = "not selected"
            continue
        if ctx.remaining() < 1:
            entry["status"] = "skipped: out of time"
            continue
        start = time.monotonic()
        try:
            entry["result"] = step.run(ctx)
            entry["status"] = "listed (dry run)" if args.dry_run and step.needs_gpu_process else "ok"
        except Exception as e:  # a failed step is recorded and the next one still runs
            entry["status"] = "fail"
            entry["error"] = f"{type(e).__name__}: {e}"
            entry["traceback"] = traceback.format_exc()[-3000:]
        _free(ctx)
        entry["seconds"] = round(time.monotonic() - start, 2)
        print(f"gpu_proof: {step.name:<20} {entry['status']:<18} {entry['seconds']:7.1f} s", flush=True)
        write_record(record, path)
    failed = [s["name"] for s in record["steps"] if s["status"] == "fail"]
    record["ok"] = not failed
    write_record(record, path)
    print(f"gpu_proof: {'all passed' if not failed else 'FAILED: ' + ', '.join(failed)}; record {path}")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
