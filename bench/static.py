"""Static roofline of the Triton kernels: what the sm_90 / sm_80 machine code allows, without a GPU.

``python -m bench.static`` (or ``python -m bench --static``) calls the production launchers of
``fastvae.kernels`` on CPU tensors with ``JITFunction.run`` replaced by a recorder, so every kernel
argument, constexpr, ``num_warps`` and grid comes from the launchers' own configuration rule.  Each
recorded launch is then specialized exactly as Triton's JIT does (its binder: pointer alignment and
integers divisible by 16 become ``tt.divisibility=16``, the attribute that allows 128-bit accesses),
compiled for ``GPUTarget("cuda", arch, 32)`` and disassembled with the ``cuobjdump`` shipped in the
Triton wheel.  No CUDA driver or GPU is needed.

Per kernel it reports registers, occupancy, stack / local memory / spill instructions, the widths of
the global loads and stores, and, in the steady-state loop (from the target of a backward branch to
the branch; the loop streaming the case's operands, see ``steady_state``), its SASS instructions:

    threads             = 32 * num_warps
    instr / elem        = loop instructions * threads / valid elements per iteration
    MUFU / elem         = loop MUFU instructions * threads / valid elements per iteration
    issue time / elem   = instr / elem / (32 lanes * SMs * 4 schedulers * clock)
                          (one warp instruction per scheduler per clock)
    memory time / elem  = bytes / elem / bandwidth      (bytes: the minimum traffic, each operand once)
    issue / memory      > 1 means the kernel cannot reach the bandwidth even with perfect latency hiding;
                          the ceiling is then 1 / ratio of it.

Occupancy (resident warps per SM / maximum) is the minimum over the register file (registers rounded
up to 8 per thread, i.e. 256 per warp), the thread limit, shared memory (plus 1 KiB reserved per
block) and the block limit.  The counts are static: code behind a forward branch is counted as if
run, except inline slow paths (a skipped block holding a loop and no data access, such as libdevice
cosf's reduction of large arguments), which are left out like code placed after EXIT.

Writes a JSON record (``bench/out/`` by default, ``bench/results/`` with ``--record``) and prints a
markdown table; ``--record`` also replaces the section of ``bench/README.md`` between
``<!-- static:begin -->`` and ``<!-- static:end -->``.  ``--variants`` instead compiles every
specialization a reparameterize call can pick and the fused-loss and gradient-scaling ones the cases
leave out (``reparameterize_variants``, ``loss_variants``), for the compile-only checks of
``tests/test_aot_sm90.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
OUT = ROOT / "bench" / "out"
README = ROOT / "bench" / "README.md"
BEGIN, END = "<!-- static:begin -->", "<!-- static:end -->"


@dataclass(frozen=True)
class Gpu:
    """Peak figures of one GPU: HBM bandwidth (bytes/s), SMs, clock (Hz); 4 schedulers per SM."""

    name: str
    bandwidth: float
    sms: int
    clock: float

    @property
    def lane_issue_rate(self) -> float:
        """Lane-instructions per second: 32 lanes x SMs x 4 schedulers x clock."""
        return 32 * self.sms * 4 * self.clock


@dataclass(frozen=True)
class Arch:
    """Per-SM limits of one compute capability (CUDA occupancy calculator figures)."""

    cc: int
    regs: int
    max_threads: int
    smem: int
    max_blocks: int
    gpus: tuple[Gpu, ...]


H100 = Gpu("H100", 3.35e12, 132, 1.755e9)
H200 = Gpu("H200", 4.8e12, 132, 1.98e9)
A100 = Gpu("A100", 2.039e12, 108, 1.41e9)
ARCHS = {
    90: Arch(90, 65536, 2048, 228 * 1024, 32, (H100, H200)),
    80: Arch(80, 65536, 2048, 164 * 1024, 32, (A100,)),
}
SMEM_RESERVED = 1024  # bytes of shared memory the driver reserves per block (sm_80 and later)


# ------------------------------------------------------------------------------------------------
# Cases: production calls of the launchers, and what a valid element costs in bytes.
# ------------------------------------------------------------------------------------------------


@dataclass
class Launch:
    """One recorded kernel launch: the JITFunction, its arguments and its grid."""

    fn: object
    args: tuple
    kwargs: dict
    grid: tuple


@dataclass
class Case:
    """A production call of a launcher (``run``).  Its first launch is the streaming kernel:
    ``bytes_per_elem`` is its minimum traffic per valid element of the streamed dimension,
    ``per_lane`` the (bytes loaded, bytes stored) of each lane of its steady-state loop (which picks
    that loop out and counts its lanes), and ``valid`` maps the launch to (lanes, valid elements) of
    one tile.  Further launches of the call (a separate finishing kernel) get the per-kernel figures
    only."""

    name: str
    run: Callable[[], None]
    bytes_per_elem: float
    per_lane: tuple[float, float]
    valid: Callable[[Launch], tuple[int, int]]
    elements: int = 0
    launches: list[Launch] = field(default_factory=list)


def _const(launch: Launch, name: str) -> int:
    v = launch.kwargs[name]
    return int(getattr(v, "value", v))


def _loss_valid(n: int, block: str = "BLOCK_F") -> Callable[[Launch], tuple[int, int]]:
    """A fused-loss / scale tile is BLOCK_B rows x ``block`` columns (BLOCK_F features, or BLOCK_D latent
    dims for the KL alone); min(n, block) of them are valid (the full-tile main loop runs only when
    n >= block: then all are)."""

    def valid(launch: Launch) -> tuple[int, int]:
        bb, bn = _const(launch, "BLOCK_B"), _const(launch, block)
        return bb * bn, bb * min(n, bn)

    return valid


def _flat_valid(launch: Launch) -> tuple[int, int]:
    block = _const(launch, "BLOCK")
    return block, block


def cases() -> list[Case]:
    """Fused loss fp32 / bf16 / uint8 target at F = 784 and 12288 (and a few long rows, which split),
    the Gaussian and continuous-Bernoulli likelihoods at F = 784, its gradient scaling, reparameterize
    forward and backward in fp32 and bf16."""
    import torch
    from fastvae.kernels import fused_loss as fl
    from fastvae.kernels import reparameterize as rp

    from fastvae import backend as be

    out: list[Case] = []
    size = {torch.float32: 4, torch.bfloat16: 2, torch.uint8: 1}
    # 5350 x 784: the fewest MNIST-sized rows of at least 2^22 elements (short rows, split in 3 chunks).
    for B, F, D in ((5350, 784, 20), (512, 12288, 128), (8, 3 * 256 * 256, 256)):
        for label, xt, tt in (
            ("fp32", torch.float32, torch.float32),
            ("u8", torch.float32, torch.uint8),
            ("bf16", torch.bfloat16, torch.bfloat16),
        ):
            if B == 8 and label != "fp32":
                continue
            p = be.LossProblem(B, F, D, be.RECON_BCE, be.REDUCE_MEAN, 1.0, 1.0 / B, True, torch.float32)

            def run(p=p, xt=xt, tt=tt) -> None:
                x = torch.empty(p.B, p.F, dtype=xt)
                t = torch.empty(p.B, p.F, dtype=tt)
                mu, lv = torch.empty(p.B, p.D, dtype=xt), torch.empty(p.B, p.D, dtype=xt)
                fl.fused_loss(p, x, t, mu, lv)

            # Reads logits and target, writes d logits; per row also mu, logvar, d mu, d logvar.
            bpe = 2 * size[xt] + size[tt] + 4 * size[xt] * D / F
            name = f"vae_loss {label} {B}x{F} D={D}"
            lane = (size[xt] + size[tt], size[xt])  # loads logits and target, stores d logits
            out.append(Case(name, run, bpe, lane, _loss_valid(F), elements=B * F))

    # The other likelihoods at F = 784: Gaussian with one scale (L = 1) and one per feature (L = F), each
    # writing d log_scale per element (4 bytes more); the continuous Bernoulli (reads and writes as BCE).
    B, F, D = 4096, 784, 20
    for label, recon, L in (
        ("gaussian", be.RECON_GAUSSIAN, 1),
        ("gaussian", be.RECON_GAUSSIAN, F),
        ("cb", be.RECON_CB, 0),
    ):
        p = be.LossProblem(B, F, D, recon, be.REDUCE_MEAN, 1.0, 1.0 / B, True, torch.float32, L > 0)

        def run_lik(p=p, L=L) -> None:
            x, t = torch.empty(p.B, p.F), torch.empty(p.B, p.F)
            mu, lv = torch.empty(p.B, p.D), torch.empty(p.B, p.D)
            fl.fused_loss(p, x, t, mu, lv, torch.empty(L) if L else None)

        bpe = 12 + (4 if L else 0) + 16 * D / F
        lane = (8 + (4 if L > 1 else 0), 8 if L else 4)  # per-feature scales are loaded per lane
        name = f"vae_loss {label} fp32 {B}x{F} D={D}" + (f" L={L}" if L else "")
        out.append(Case(name, run_lik, bpe, lane, _loss_valid(F), elements=B * F))

    # kl_divergence alone on a batch of 256 latents [4, 64, 64] (an image VAE's): rows split over D.
    B, D = 256, 4 * 64 * 64
    p = be.LossProblem(B, 0, D, be.RECON_NONE, be.REDUCE_MEAN, 1.0, 1.0 / B, True, torch.float32)

    def run_kl(p=p) -> None:
        fl.fused_loss(p, None, None, torch.empty(p.B, p.D), torch.empty(p.B, p.D))

    # Reads mu and logvar, writes d mu and d logvar.
    kl_valid = _loss_valid(D, "BLOCK_D")
    out.append(Case(f"kl_divergence fp32 {B}x{D}", run_kl, 16, (8, 8), kl_valid, elements=B * D))

    for label, dt, B, F, D in (
        ("fp32", torch.float32, 5350, 784, 20),
        ("fp32", torch.float32, 512, 12288, 128),
        ("bf16", torch.bfloat16, 5350, 784, 20),
    ):

        def run_scale(dt=dt, B=B, F=F, D=D) -> None:
            g = torch.tensor(0.5)
            fl.scale_grads_(
                g, torch.empty(B, F, dtype=dt), torch.empty(B, D, dtype=dt), torch.empty(B, D, dtype=dt)
            )

        # g != 1: every gradient is read and written once.
        bpe = 2 * size[dt] + 2 * 2 * size[dt] * D / F
        name = f"scale_grads {label} {B}x{F} D={D}"
        lane = (size[dt], size[dt])
        out.append(Case(name, run_scale, bpe, lane, _loss_valid(F), elements=B * F))

    shape = (65536, 64)
    for label, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        for direction, fn in (("fwd", rp.reparameterize), ("bwd", rp.reparameterize_backward)):

            def run_rep(dt=dt, fn=fn) -> None:
                a, lv = torch.empty(shape, dtype=dt), torch.empty(shape, dtype=dt)
                # seed=None draws the key on the device as a 1-element int64 tensor: the default path.
                fn(a, lv, torch.zeros(1, dtype=torch.int64), 0)

            # fwd reads mu, logvar, writes z; bwd reads dz, logvar, writes dlogvar.
            n = shape[0] * shape[1]
            name = f"reparameterize {direction} {label} {n}"
            lane = (2 * size[dt], size[dt])
            out.append(Case(name, run_rep, 3 * size[dt], lane, _flat_valid, elements=n))
    return out


@contextlib.contextmanager
def recording(into: list[Launch]) -> Iterator[None]:
    """Replace ``JITFunction.run`` by a recorder: launchers run on CPU tensors and launch nothing."""
    from triton.runtime.jit import JITFunction

    original = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        into.append(Launch(self, args, dict(kwargs), tuple(grid) if not callable(grid) else grid))
        return None

    JITFunction.run = record
    try:
        yield
    finally:
        JITFunction.run = original


def _compile_report(name: str, launch: Launch, cc: int) -> dict:
    """A variant's launch compiled for ``cc``: ``resources`` and its MUFU instructions."""
    _, code, rec = resources(launch, cc)
    return {"name": name, **rec, "mufu": sum(i.base == "MUFU" for i in code)}


def loss_variants(cc: int = 90) -> list[dict]:
    """The fused loss and gradient-scaling specializations the static cases leave out, compiled for
    ``cc``: every likelihood, reduction, operand dtype (16-bit, float64, uint8 targets), without
    gradients, KL alone, split rows; ``scale_grads_`` with a scalar and a per-row factor."""
    import torch
    from fastvae.kernels import fused_loss as fl

    from fastvae import backend as be

    f32, f16, b16, f64, u8 = torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.uint8
    R, M = be.REDUCTIONS, be.RECONS
    # (recon, reduction, need_grad, logits dtype, target dtype, B, F, D, log-scale size, scale_grad)
    problems = [
        ("bce", "sum", True, f16, f16, 128, 784, 20, 0, False),
        ("bce", "none", False, b16, b16, 128, 784, 20, 0, False),
        ("bce", "mean", True, f32, u8, 8, 3 * 256 * 256, 256, 0, False),
        ("bce", "mean", True, f64, f64, 128, 784, 20, 0, False),
        ("mse", "mean", True, f32, f32, 128, 3072, 128, 0, False),
        ("mse", "sum", True, b16, b16, 8, 3 * 256 * 256, 256, 0, False),
        ("gaussian", "mean", True, f32, f32, 128, 784, 20, 784, True),
        ("gaussian", "none", True, b16, b16, 128, 784, 20, 784, False),
        ("gaussian", "mean", True, f64, f64, 128, 784, 20, 784, True),
        ("continuous_bernoulli", "mean", True, f32, u8, 128, 784, 20, 0, False),
        ("continuous_bernoulli", "sum", True, f64, f64, 128, 784, 20, 0, False),
        ("none", "mean", True, b16, None, 128, 0, 64, 0, False),
        ("none", "none", False, f32, None, 8, 0, 4 * 64 * 64, 0, False),
    ]
    out = []
    for recon, red, grad, xt, tt, B, F, D, L, sg in problems:
        acc = f64 if xt == f64 else f32
        scale = (1.0 / B) if red == "mean" else 1.0
        p = be.LossProblem(B, F, D, M[recon], R[red], 1.0, scale, grad, acc, sg)
        x = torch.empty(B, F, dtype=xt) if F else None
        t = torch.empty(B, F, dtype=tt) if F else None
        mu, lv = torch.empty(B, D, dtype=xt), torch.empty(B, D, dtype=xt)
        launches: list[Launch] = []
        fl._LOSS_LAUNCH.clear()
        with recording(launches):
            fl.fused_loss(p, x, t, mu, lv, torch.empty(L, dtype=acc) if L else None)
        name = f"vae_loss {recon} {red} grad={grad} {xt}/{tt} {B}x{F} D={D} L={L} scale_grad={sg}"
        out.append(_compile_report(name.replace("torch.", ""), launches[0], cc))
    for dt, per_row in ((b16, False), (f16, True), (f64, True)):
        B, F, D = 128, 784, 20
        g = torch.full((B,) if per_row else (), 0.5, dtype=f64 if dt == f64 else f32)
        launches = []
        fl._SCALE_LAUNCH.clear()
        with recording(launches):
            fl.scale_grads_(
                g, torch.empty(B, F, dtype=dt), torch.empty(B, D, dtype=dt), torch.empty(B, D, dtype=dt)
            )
        name = f"scale_grads {str(dt).removeprefix('torch.')} per_row={per_row} {B}x{F} D={D}"
        out.append(_compile_report(name, launches[0], cc))
    fl._LOSS_LAUNCH.clear()
    fl._SCALE_LAUNCH.clear()
    return out


def reparameterize_variants(cc: int = 90) -> list[dict]:
    """Every reparameterize specialization a call can pick (dtype, direction, key as a tensor or an int,
    offset phase, whole or partial tiles, 1-warp and 4-warp programs), compiled for ``cc``: registers,
    stack, local memory, spill instructions (STL / LDL) and MUFU instructions.  The static cases measure
    four of them in depth; a GPU compiles whichever a call picks, so each must at least compile, without
    a stack or a spill."""
    import torch
    from fastvae.kernels import reparameterize as rp

    out = []
    # whole tiles at offset 0 (EVEN); a tail at phase 1; a tail past 2^32 at phase 3 (int64 counters);
    # each in 1-warp programs, in 4-warp ones (from FOUR_WARPS_FROM, a multiple of 1024) and past 2^31
    # elements (int64 indices; meta tensors: nothing is allocated)
    small = [("tensor", 4096, 0), ("int", 4099, 1), ("tensor", 4100, 2**32 + 3)]
    bases = (4096, rp.FOUR_WARPS_FROM, 2**31)
    calls = [(k, base + n - 4096, offset) for base in bases for k, n, offset in small]
    for dt in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        for direction, fn in (("fwd", rp.reparameterize), ("bwd", rp.reparameterize_backward)):
            for key_kind, n, offset in calls:
                key = torch.zeros(1, dtype=torch.int64) if key_kind == "tensor" else 7
                launches: list[Launch] = []
                rp._LAUNCH.clear()
                device = "meta" if n >= 2**31 else "cpu"
                a, lv = torch.empty(n, dtype=dt, device=device), torch.empty(n, dtype=dt, device=device)
                with recording(launches):
                    fn(a, lv, key, offset)
                dtype = str(dt).removeprefix("torch.")
                name = f"reparameterize {direction} {dtype} key={key_kind} n={n} offset={offset}"
                out.append(_compile_report(name, launches[0], cc))
    rp._LAUNCH.clear()
    return out


# ------------------------------------------------------------------------------------------------
# Compile as the JIT would, and read the machine code.
# ------------------------------------------------------------------------------------------------


def compile_launch(launch: Launch, cc: int):
    """The CompiledKernel the JIT would build for this launch on a ``cc`` GPU (binder + _pack_args)."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.fn
    target = GPUTarget("cuda", cc, 32)
    backend = make_backend(target)
    kwargs = dict(launch.kwargs)
    # What JITFunction.run adds before binding (the knobs it reads differ between Triton versions).
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    for name in ("instrumentation_mode", "fpsan_homomorphic_casts"):
        if hasattr(knobs.compilation, name):
            kwargs[name] = getattr(knobs.compilation, name)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    src = ASTSource(fn, signature, constexprs, attrs)
    return triton.compile(src, target=target, options=options.__dict__)


def cuobjdump() -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def disassemble(cubin: bytes) -> tuple[dict[str, int], str]:
    """(resource usage {REG, STACK, SHARED, LOCAL}, SASS text) of a cubin."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        run = lambda flag: (
            subprocess.run(
                [str(cuobjdump()), flag, str(path)], capture_output=True, text=True, check=True
            ).stdout
        )
        res, sass = run("-res-usage"), run("-sass")
    usage = {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", res)}
    return usage, sass


_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


@dataclass(frozen=True)
class Instr:
    addr: int
    op: str  # full opcode with modifiers, e.g. LDG.E.128.CONSTANT
    operands: str

    @property
    def base(self) -> str:
        return self.op.split(".")[0]


def parse_sass(sass: str) -> list[Instr]:
    return [Instr(int(a, 16), op, rest.strip()) for a, _, op, rest in _INSTR.findall(sass)]


def access_bits(i: Instr) -> int | None:
    """Width in bits of a global load or store (LDG / STG), None for any other instruction."""
    if i.base not in ("LDG", "STG"):
        return None
    widths = {"64": 64, "128": 128, "U8": 8, "S8": 8, "U16": 16, "S16": 16}
    return next((widths[m] for m in i.op.split(".")[1:] if m in widths), 32)


def _branch_target(i: Instr) -> int | None:
    m = re.match(r"`?\(?(0x[0-9a-f]+)", i.operands) if i.base == "BRA" else None
    return int(m.group(1), 16) if m else None


def loops(code: list[Instr]) -> list[tuple[int, int]]:
    """(first, last) index ranges of the loops: a BRA whose target lies before it."""
    index = {i.addr: k for k, i in enumerate(code)}
    found = []
    for k, i in enumerate(code):
        target = _branch_target(i)
        if target is not None and target < i.addr and target in index:
            found.append((index[target], k))
    return found


def slow_paths(code: list[Instr]) -> set[int]:
    """Indices of inline slow paths: code a forward branch skips that holds a loop and no global
    access (libdevice's Payne-Hanek reduction for cosf of large arguments is such a block)."""
    index = {i.addr: k for k, i in enumerate(code)}
    back = loops(code)
    slow: set[int] = set()
    for k, i in enumerate(code):
        target = _branch_target(i)
        if target is None or target <= i.addr or target not in index:
            continue
        lo, hi = k + 1, index[target]
        has_loop = any(lo <= a and b < hi for a, b in back)
        # LDG.E.CONSTANT (read-only cache) there are the slow path's table lookups, not data.
        data = any(c.base == "STG" or (c.base == "LDG" and "CONSTANT" not in c.op) for c in code[lo:hi])
        if has_loop and not data:
            slow.update(range(lo, hi))
    return slow


def body_stats(body: list[Instr]) -> dict:
    """Counts over ``body``: instructions, MUFU, BAR.SYNC, shared-memory accesses, global access
    widths and the bytes its global loads and stores move per thread."""
    loads = [access_bits(i) for i in body if i.base == "LDG"]
    stores = [access_bits(i) for i in body if i.base == "STG"]
    return {
        "instructions": len(body),
        "mufu": sum(i.base == "MUFU" for i in body),
        "bar_sync": sum(i.op.startswith("BAR.SYNC") for i in body),
        "shared_accesses": sum(i.base in ("LDS", "STS") for i in body),
        "load_bits": sorted(set(loads)),
        "store_bits": sorted(set(stores)),
        "loaded_bytes": sum(loads) // 8,
        "stored_bytes": sum(stores) // 8,
    }


def steady_state(
    code: list[Instr], slow: set[int], per_lane: tuple[float, float] | None = None
) -> tuple[dict, bool, list[dict]]:
    """(stats of the steady-state code, whether it is a loop, stats of every loop).

    ``per_lane`` = (bytes loaded, bytes stored) per lane of the case's streaming loop.  The
    steady-state loop is, among the loops whose loads and stores are in that ratio, the one moving
    the most bytes (ties: the longer): the reconstruction loop of a fused loss (8 : 4 in fp32) is so
    told from its KL loop (8 : 8) and its finishing sum (loads only), whatever the unrolling.
    ``matches_case`` says whether some loop had the ratio (None without ``per_lane``; then the loop
    moving the most bytes).  In a kernel whose loops move no bytes, the steady state is the code up
    to the last EXIT (slow paths placed after it are not counted).  The indices in ``slow``
    (:func:`slow_paths`) are left out of both.
    """
    keep = lambda a, b: [code[k] for k in range(a, b + 1) if k not in slow]
    bodies = [(code[a].addr, keep(a, b)) for a, b in loops(code) if a not in slow]
    every = [{"start": hex(addr), **body_stats(body)} for addr, body in bodies]
    moved = lambda st: st["loaded_bytes"] + st["stored_bytes"]
    streams = [st for st in every if moved(st) > 0]
    if streams:
        match = None
        if per_lane is not None:
            load, store = per_lane
            ratio = [
                st
                for st in streams
                if st["loaded_bytes"] and math.isclose(st["loaded_bytes"] * store, st["stored_bytes"] * load)
            ]
            match, streams = bool(ratio), ratio or streams
        best = max(streams, key=lambda st: (moved(st), st["instructions"]))
        return {**best, "matches_case": match, "slow_path_instructions": len(slow)}, True, every
    last_exit = max((k for k, i in enumerate(code) if i.base == "EXIT"), default=len(code) - 1)
    straight = body_stats(keep(0, last_exit))
    head = {"start": hex(code[0].addr), "matches_case": None, "slow_path_instructions": len(slow)}
    return {**head, **straight}, False, every


def occupancy(arch: Arch, regs: int, warps: int, smem: int) -> tuple[int, int]:
    """(resident blocks per SM, resident warps per SM)."""
    regs_per_warp = math.ceil(max(regs, 1) / 8) * 8 * 32
    limits = [
        arch.regs // (regs_per_warp * warps),
        arch.max_threads // (32 * warps),
        arch.max_blocks,
    ]
    if smem:
        limits.append(arch.smem // (smem + SMEM_RESERVED))
    blocks = max(0, min(limits))
    return blocks, blocks * warps


def resources(launch: Launch, cc: int) -> tuple[Any, list[Instr], dict]:
    """(compiled kernel, SASS, figures) of a launch compiled for ``cc``: the kernel's name, registers,
    stack and local bytes, spill instructions (STL / LDL) and the launch's constexprs."""
    kernel = compile_launch(launch, cc)
    usage, sass = disassemble(kernel.asm["cubin"])
    code = parse_sass(sass)
    rec = {
        "kernel": launch.fn.__name__,
        "registers": usage.get("REG", -1),
        "stack_bytes": usage.get("STACK", -1),
        "local_bytes": usage.get("LOCAL", -1),
        "spill_instructions": sum(i.base in ("STL", "LDL") for i in code),
        "constexprs": {k: str(getattr(v, "value", v)) for k, v in launch.kwargs.items()},
    }
    return kernel, code, rec


def analyze(case: Case, launch: Launch, cc: int) -> dict:
    """Every figure of one kernel launch of ``case`` compiled for ``cc``."""
    arch = ARCHS[cc]
    kernel, code, res = resources(launch, cc)
    warps = int(kernel.metadata.num_warps)
    smem = int(getattr(kernel.metadata, "shared", 0) or 0)
    regs = res["registers"]
    blocks, warps_sm = occupancy(arch, regs, warps, smem)
    programs = math.prod(launch.grid) if isinstance(launch.grid, tuple) else None
    slow = slow_paths(code)
    every = body_stats([i for k, i in enumerate(code) if k not in slow])
    threads = 32 * warps
    main = launch is case.launches[0]
    loop, has_loop, all_loops = steady_state(code, slow, case.per_lane if main else None)
    rec = {
        "case": case.name,
        "elements": case.elements,
        "kernel": res["kernel"],
        "arch": f"sm_{cc}",
        "num_warps": warps,
        "programs": programs,
        "waves": round(programs / (arch.gpus[0].sms * blocks), 2) if programs and blocks else None,
        "registers": regs,
        "shared_bytes": smem,
        "stack_bytes": res["stack_bytes"],
        "local_bytes": res["local_bytes"],
        "spill_instructions": res["spill_instructions"],
        "blocks_per_sm": blocks,
        "warps_per_sm": warps_sm,
        "occupancy": round(warps_sm / (arch.max_threads // 32), 3),
        "load_bits": every["load_bits"],
        "store_bits": every["store_bits"],
        "constexprs": res["constexprs"],
        "streaming": False,
        "has_loop": has_loop,
        "loop": loop,
        "loops": all_loops,
        "bar_sync_total": every["bar_sync"],
    }
    if not main:
        return rec
    # Lanes an iteration streams, from its loads (so an unrolled loop counts all its tiles); valid
    # ones in the proportion of the launch's tile.  Straight-line code handles one tile.
    tile_lanes, tile_valid = case.valid(launch)
    lanes = loop["loaded_bytes"] * threads / case.per_lane[0] if has_loop else tile_lanes
    n_valid = lanes * tile_valid / tile_lanes
    unroll = lanes / tile_lanes
    if loop["matches_case"] and unroll != int(unroll):
        loop["matches_case"] = False  # an iteration must stream whole tiles
    ipe = loop["instructions"] * threads / n_valid
    rec.update(
        streaming=True,
        tiles_per_iteration=round(unroll, 3),
        lanes_per_iteration=round(lanes, 1),
        valid_per_iteration=round(n_valid, 1),
        valid_fraction=round(n_valid / lanes, 4),
        instructions_per_element=round(ipe, 2),
        mufu_per_element=round(loop["mufu"] * threads / n_valid, 3),
        loop_loaded_bytes_per_lane=round(loop["loaded_bytes"] * threads / lanes, 3),
        loop_stored_bytes_per_lane=round(loop["stored_bytes"] * threads / lanes, 3),
        bytes_per_element=round(case.bytes_per_elem, 3),
    )
    for gpu in arch.gpus:
        t_issue = ipe / gpu.lane_issue_rate
        t_mem = case.bytes_per_elem / gpu.bandwidth
        rec[f"issue_over_memory_{gpu.name}"] = round(t_issue / t_mem, 3)
        rec[f"bandwidth_ceiling_{gpu.name}"] = round(min(1.0, t_mem / t_issue), 3)
    return rec


def collect(cc_list: list[int], select: str = "") -> list[dict]:
    """Record every case's launches (those whose name contains ``select``) and analyze each for
    every compute capability in ``cc_list``."""
    records = []
    for case in cases():
        if select and select not in case.name:
            continue
        with recording(case.launches):
            case.run()
        if not case.launches:
            raise RuntimeError(f"{case.name}: the launcher launched no kernel")
        for cc in cc_list:
            for launch in case.launches:
                records.append(analyze(case, launch, cc))
    return records


# ------------------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------------------


def _bits(xs: list[int]) -> str:
    return "/".join(map(str, xs)) or "-"


def table(records: list[dict], cc: int) -> str:
    gpus = ARCHS[cc].gpus
    head = [
        "case",
        "kernel",
        "warps",
        "regs",
        "occupancy",
        "programs (waves)",
        "stack/local/spills",
        "loop LDG/STG bits",
        "valid lanes",
        "instr/elem",
        "MUFU/elem",
        "BAR in loop",
        "bytes/elem",
    ] + [f"issue/mem {g.name} (ceiling)" for g in gpus]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        if r["arch"] != f"sm_{cc}":
            continue
        lp = r["loop"]
        row = [
            r["case"],
            r["kernel"],
            str(r["num_warps"]),
            str(r["registers"]),
            f"{r['occupancy']:.0%}",
            f"{r['programs']} ({r['waves']})" if r["programs"] else "-",
            f"{r['stack_bytes']}/{r['local_bytes']}/{r['spill_instructions']}",
            f"{_bits(lp['load_bits'])} / {_bits(lp['store_bits'])}",
        ]
        if r["streaming"]:
            row += [
                f"{r['valid_fraction']:.0%}",
                f"{r['instructions_per_element']:.1f}",
                f"{r['mufu_per_element']:.2f}",
                str(lp["bar_sync"]),
                f"{r['bytes_per_element']:.2f}",
            ]
            row += [
                f"{r[f'issue_over_memory_{g.name}']:.2f} ({r[f'bandwidth_ceiling_{g.name}']:.0%})"
                for g in gpus
            ]
        else:
            row += ["-"] * (5 + len(gpus))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def budget_row(r: dict) -> str:
    """One kernel's row of ``tests/test_aot_sm90.py``'s BUDGETS table: (registers, instructions per
    element, loop load bits, loop store bits, BAR.SYNC in the loop)."""
    lp = r["loop"]
    return (
        f'"{r["case"]}": ({r["registers"]}, {r["instructions_per_element"]}, {lp["load_bits"]}, '
        f"{lp['store_bits']}, {lp['bar_sync']}),"
    )


def meta(cc_list: list[int]) -> dict:
    import numpy
    import torch
    import triton

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=ROOT,
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
        )
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = None, None
    return {
        "kind": "static-roofline",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
        "dirty": dirty,
        "versions": {
            "python": platform.python_version(),
            "triton": triton.__version__,
            "torch": torch.__version__,
            "numpy": numpy.__version__,
        },
        "archs": [f"sm_{cc}" for cc in cc_list],
        "gpus": {
            f"sm_{cc}": [
                {"name": g.name, "bandwidth_Bps": g.bandwidth, "sms": g.sms, "clock_Hz": g.clock}
                for g in ARCHS[cc].gpus
            ]
            for cc in cc_list
        },
        "method": __doc__.split("\n\n")[2].strip(),
    }


def markdown(record: dict) -> str:
    """The README section: how the figures were made, then one table per architecture."""
    v = record["versions"]
    dirty = " (uncommitted changes)" if record["dirty"] else ""
    parts = [
        "## Static roofline (machine code, no GPU)",
        "",
        f"`python -m bench --static --record`, {record['date'][:10]}, triton {v['triton']}, commit "
        f"{str(record['commit'])[:7]}{dirty}: the SASS of the production specializations. "
        "instr/elem = steady-state loop instructions x threads / valid elements per iteration; "
        "issue/mem = issue time / memory time (> 1: the kernel cannot reach the bandwidth; in brackets "
        "the fraction of it reachable; issue 10's target: <= 0.7 at H200 figures); waves = programs / "
        "(SMs x resident programs per SM). Method and formulas: `bench/static.py`; budgets: "
        "`tests/test_aot_sm90.py`.",
    ]
    for arch in record["archs"]:
        gpus = ", ".join(g["name"] for g in record["gpus"][arch])
        parts += ["", f"### {arch} ({gpus} figures)", "", table(record["kernels"], int(arch[3:]))]
    return "\n".join(parts)


def update_readme(text: str, path: Path = README) -> None:
    """Replace the marked section of ``path`` (markers appended at the end when absent)."""
    doc = path.read_text() if path.exists() else ""
    section = f"{BEGIN}\n{text}\n{END}"
    if BEGIN in doc and END in doc:
        head, rest = doc.split(BEGIN, 1)
        doc = head + section + rest.split(END, 1)[1]
    else:
        doc = doc.rstrip("\n") + ("\n\n" if doc else "") + section + "\n"
    path.write_text(doc)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.static", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--arch",
        default="90,80",
        help="compute capabilities to compile for, comma separated (default 90,80; known: 90, 80)",
    )
    ap.add_argument("--record", action="store_true", help="write bench/results/ and bench/README.md")
    ap.add_argument("--json", type=Path, help="write the record to this path (default bench/out/...)")
    ap.add_argument("--select", default="", help="only the cases whose name contains this text")
    ap.add_argument(
        "--budget-rows", action="store_true", help="also print the budget rows of tests/test_aot_sm90.py"
    )
    ap.add_argument(
        "--variants",
        action="store_true",
        help="instead: compile every reparameterize specialization and the other fused-loss ones for the "
        "first --arch; write (or print) their registers, stack, local memory, spills, MUFU count as JSON",
    )
    args = ap.parse_args(argv)
    try:
        args.cc = [int(a) for a in args.arch.split(",") if a.strip()]
    except ValueError:
        ap.error(f"--arch: expected comma-separated integers such as 90,80, got {args.arch!r}")
    unknown = [cc for cc in args.cc if cc not in ARCHS]
    if unknown or not args.cc:
        ap.error(f"--arch: expected some of {sorted(ARCHS)}, got {args.arch!r}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Compile, analyze, write the record and print the tables; 0 on success."""
    args = parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        # Kernels decorated under the interpreter are not JITFunctions: run in a clean process.
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        cmd = [sys.executable, "-m", "bench.static", *(sys.argv[1:] if argv is None else argv)]
        return subprocess.run(cmd, env=env, cwd=ROOT).returncode
    if args.variants:
        text = json.dumps(reparameterize_variants(args.cc[0]) + loss_variants(args.cc[0]), indent=1) + "\n"
        if args.json:
            args.json.write_text(text)
        else:
            print(text, end="")
        return 0
    record = meta(args.cc)
    record["kernels"] = collect(args.cc, args.select)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d")
    name = f"static-sm{args.cc[0]}-{stamp}.json"
    path = args.json or (RESULTS if args.record else OUT) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")
    text = markdown(record)
    print(text)
    print(f"\nrecord: {path}")
    if args.budget_rows:
        version = ".".join(record["versions"]["triton"].split(".")[:2])
        rows = [budget_row(r) for r in record["kernels"] if r["streaming"] and r["arch"] == "sm_90"]
        print(f'    "{version}": {{\n' + "\n".join("        " + row for row in rows) + "\n    },")
    if args.record:
        update_readme(text)
        print(f"updated: {README}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
