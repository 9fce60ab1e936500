"""CI checks of the CUDA C sources in kernels/cuda/ -- no GPU needed.

1. Every ``.cu`` compiles with the machine's nvcc for sm_90 and sm_80, exactly as NVRTC will see it
   (``fastvae.kernels.cupy_launch.kernel_source``: headers inlined) with every template instantiated
   (``-DFASTVAE_INSTANTIATE_ALL``), with no warning of any kind, and with no local memory: every
   kernel must report 0 bytes stack frame and 0 bytes spill stores / loads.  Skipped only when
   nvcc is absent or broken.
2. The per-element math of ``kernels/cuda/fastvae_math.cuh`` -- the very header the kernels
   include -- is built on the host (g++, or nvcc as a host compiler) into a small harness
   (tests/cuda_harness/math_harness.cpp) and compared with ``fastvae.reference``: Philox words and
   uniforms bit for bit, normals within 4 ulp, BCE / MSE / KL values and gradients within 1e-6
   relative (see ``_check_rel`` for the only allowances: cancellations inherent in the formula).
3. The kernels themselves, unchanged, run on the CPU under a small CUDA execution-model emulator
   (tests/cuda_harness/kernel_emulator.cpp: fibers for threads, rounds for barriers), launched with
   the grid / vector / group-size choices of ``fastvae.kernels.cupy_launch``: awkward shapes, every
   dtype triple, sliced and misaligned rows, NaN-poisoned outputs, random counters at offsets that
   cross 2^32 with the key by value or read through a pointer, and the in-place gradient scale
   (rows whose factor is 1 must keep their exact bits), compared with the reference.
4. The CuPy backend end to end on CPU tensors: ``fastvae.kernels.cupy_launch`` with CuPy's kernel
   launches replaced by tests/cuda_harness/kernel_lib.cpp (the same kernels under the same emulator,
   as a shared library taking cuLaunchKernel-style argument arrays), so the launchers' argument
   order, pointers, layouts and key pointer are checked against the reference without a GPU.

Run ``python tests/test_cuda_sources.py`` to print the per-kernel resource usage table.
"""

from __future__ import annotations

import concurrent.futures
import importlib.resources
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fastvae.kernels import cupy_launch as cl
from fastvae.kernels.cupy_launch import kernel_source

from fastvae import reference as ref
from fastvae.backend import RECONS, REDUCTIONS

CUDA_DIR = Path(str(importlib.resources.files("fastvae.kernels") / "cuda"))
HARNESS_SRC = Path(__file__).parent / "cuda_harness" / "math_harness.cpp"
EXPECTED_FILES = ("fastvae_math.cuh", "fastvae_vec.cuh", "reparameterize.cu", "scale_grads.cu", "vae_loss.cu")
# Kernels each file must produce under FASTVAE_INSTANTIATE_ALL (a dropped instantiation fails too).
EXPECTED_KERNELS = {"reparameterize.cu": 6, "scale_grads.cu": 9, "vae_loss.cu": 41}
ARCHS = ("sm_90", "sm_80")
NVCC_FLAGS = (
    "-cubin",
    "-std=c++17",
    "-DFASTVAE_INSTANTIATE_ALL",
    "-Werror",
    "all-warnings",
    "-Xptxas",
    "-warn-spills,-warn-lmem-usage",
    "--resource-usage",
)

F32_TINY = float(np.finfo(np.float32).tiny)
EPS32 = 2.0**-24  # unit roundoff of fp32


# ----------------------------------------------------------------------------------------------
# Toolchain discovery
# ----------------------------------------------------------------------------------------------


def _find_nvcc() -> str | None:
    for cand in (shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc", "/usr/local/bin/nvcc"):
        if cand and os.path.exists(cand):
            try:
                res = subprocess.run([cand, "--version"], capture_output=True, text=True, timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                continue
            if res.returncode == 0 and "release" in res.stdout:
                return cand
    return None


NVCC = _find_nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (or `nvcc --version` failed)")


def test_expected_sources_present():
    missing = [f for f in EXPECTED_FILES if not (CUDA_DIR / f).is_file()]
    assert not missing, f"missing CUDA sources in {CUDA_DIR}: {missing}"
    # NVRTC gets the inlined text: no local include may survive.
    for name in EXPECTED_KERNELS:
        assert not re.search(r'#\s*include\s+"', kernel_source(name)), name


# ----------------------------------------------------------------------------------------------
# 1. nvcc: warnings, local memory, spills
# ----------------------------------------------------------------------------------------------

_PROPS_RE = re.compile(
    r"Function properties for (\S+)\s*\n\s*(\d+) bytes stack frame, (\d+) bytes spill stores, "
    r"(\d+) bytes spill loads"
)
_USED_RE = re.compile(r"Compiling entry function '(\S+)' for '(\w+)'.*?Used (\d+) registers", re.DOTALL)


def _compile(src: Path, arch: str, out_dir: Path) -> tuple[int, str]:
    return _run_cmd(
        [NVCC, f"-arch={arch}", *NVCC_FLAGS, "-o", str(out_dir / f"{src.stem}.{arch}.cubin"), str(src)]
    )


def _run_cmd(cmd: list[str]) -> tuple[int, str]:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    return res.returncode, res.stdout + res.stderr


def _host_cxx() -> str | None:
    return shutil.which("g++") or shutil.which("c++")


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """Starts every build of this module at once (they overlap on a multi-core machine).

    Returns {key: (future, output path)}: "emulator", "kernel_lib" and "harness" (host C++), and one
    (file, arch) key per .cu x architecture for nvcc (the cubin is not used further).
    """
    out = tmp_path_factory.mktemp("builds")
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2))
    jobs = {}
    cxx = _host_cxx()
    if cxx:  # the slowest host build first
        exe = out / "kernel_emulator"
        cmd = [cxx, "-std=c++17", "-O1", "-fno-strict-aliasing", "-Wall", "-Wextra", "-Werror"]
        jobs["emulator"] = (
            pool.submit(_run_cmd, cmd + ["-I", str(CUDA_DIR), str(EMULATOR_SRC), "-o", str(exe)]),
            exe,
        )
        lib = out / "kernel_lib.so"
        lib_cmd = cmd + ["-fPIC", "-shared", "-I", str(CUDA_DIR), str(KERNEL_LIB_SRC), "-o", str(lib)]
        jobs["kernel_lib"] = (pool.submit(_run_cmd, lib_cmd), lib)
    exe = out / "math_harness"
    if cxx:
        cmd = [cxx, "-std=c++17", "-O2", "-ffp-contract=off", "-Wall", "-Wextra", "-Werror"]
    elif NVCC:
        cmd = [NVCC, "-x", "cu", "-std=c++17", "-O2", "-Werror", "all-warnings"]
    if cxx or NVCC:
        jobs["harness"] = (
            pool.submit(_run_cmd, cmd + ["-I", str(CUDA_DIR), str(HARNESS_SRC), "-o", str(exe)]),
            exe,
        )
    if NVCC:
        for cu in sorted(CUDA_DIR.glob("*.cu")):
            src = out / cu.name  # what NVRTC compiles: the .cu with its headers inlined
            src.write_text(kernel_source(cu.name), encoding="utf-8")
            for arch in ARCHS:
                jobs[(cu.name, arch)] = (pool.submit(_compile, src, arch, out), None)
    pool.shutdown(wait=False)
    yield jobs
    for future, _ in jobs.values():
        future.cancel()


def _built(builds, key: str, what: str) -> Path:
    if key not in builds:
        pytest.skip(f"no compiler to build the {what}")
    rc, log = builds[key][0].result()
    assert rc == 0, f"{what} build failed:\n{log}"
    return builds[key][1]


@pytest.fixture(scope="module")
def nvcc_results(builds):
    """{(file, arch): (returncode, log)} for every .cu x arch."""
    if NVCC is None:
        pytest.skip("nvcc not found (or `nvcc --version` failed)")
    return {key: job.result() for key, (job, _) in builds.items() if isinstance(key, tuple)}


@needs_nvcc
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", sorted(EXPECTED_KERNELS))
def test_nvcc_clean(nvcc_results, name, arch):
    rc, log = nvcc_results[(name, arch)]
    assert rc == 0, f"nvcc failed for {name} ({arch}):\n{log}"
    bad_lines = [ln for ln in log.splitlines() if re.search(r"warning|error", ln, re.IGNORECASE)]
    assert not bad_lines, f"{name} ({arch}) compiled with diagnostics:\n" + "\n".join(bad_lines)
    props = _PROPS_RE.findall(log)
    assert len(props) == EXPECTED_KERNELS[name], f"{name} ({arch}): {len(props)} kernels compiled\n{log}"
    lmem = [p for p in props if any(int(v) for v in p[1:])]
    assert not lmem, f"{name} ({arch}): local memory (stack frame / spill stores / spill loads) in {lmem}"


@needs_nvcc
def test_every_cu_file_is_checked(nvcc_results):
    """A new .cu file must compile clean too (and be added to EXPECTED_KERNELS)."""
    for (name, arch), (rc, log) in nvcc_results.items():
        assert rc == 0, f"nvcc failed for {name} ({arch}):\n{log}"
        assert name in EXPECTED_KERNELS, f"add {name} to EXPECTED_KERNELS in {__file__}"


# ----------------------------------------------------------------------------------------------
# 2. Host harness vs fastvae.reference
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def harness(builds) -> Path:
    return _built(builds, "harness", "math harness (tests/cuda_harness/math_harness.cpp)")


def _run(harness: Path, mode: str, inputs: list[np.ndarray], out_dtypes: list[str]) -> list[np.ndarray]:
    n = len(inputs[0])
    assert all(len(a) == n for a in inputs)
    workdir = harness.parent
    fin, fout = workdir / f"{mode}.in", workdir / f"{mode}.out"
    with open(fin, "wb") as f:
        np.array([n], np.int64).tofile(f)
        for a in inputs:
            np.ascontiguousarray(a).tofile(f)
    subprocess.run([str(harness), mode, str(fin), str(fout)], check=True, timeout=300)
    raw = fout.read_bytes()
    res, pos = [], 0
    for dt in map(np.dtype, out_dtypes):
        res.append(np.frombuffer(raw, dt, n, pos))
        pos += n * dt.itemsize
    assert pos == len(raw), "harness wrote an unexpected number of bytes"
    return res


SEEDS = [0, 1, 0xDEADBEEF, 2**32 - 1, 2**32, 2**32 + 12345, 2**63 + 5, 2**64 - 1]
SPECIAL_OFFSETS = [0, 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**32 + 1, 2**40 + 3, 2**62, 2**63 - 1]


def _rng_inputs(per_seed: int = 6000):
    gen = np.random.default_rng(20240611)
    seeds, offsets = [], []
    for s in SEEDS:
        off = np.concatenate(
            [
                np.arange(per_seed // 2),
                gen.integers(0, 2**63 - 1, per_seed // 2 - len(SPECIAL_OFFSETS), dtype=np.int64),
                SPECIAL_OFFSETS,
            ]
        ).astype(np.int64)
        offsets.append(off)
        seeds.append(np.full(off.size, s, dtype=np.uint64))
    return np.concatenate(seeds), np.concatenate(offsets)


def test_philox_words_and_uniforms_bit_exact(harness):
    seeds, offsets = _rng_inputs()
    w0, w1, w2, w3, u1, u2, _ = _run(harness, "rng", [seeds, offsets], ["u4"] * 4 + ["f4"] * 3)
    for s in SEEDS:
        m = seeds == np.uint64(s)
        off = offsets[m].astype(np.uint64)
        lo, hi = np.full_like(off, s & 0xFFFFFFFF), np.full_like(off, s >> 32)
        expect = ref.philox4x32(0, off & np.uint64(0xFFFFFFFF), off >> np.uint64(32), lo, hi)
        for k, (got, want) in enumerate(zip((w0, w1, w2, w3), expect, strict=True)):
            bad = np.flatnonzero(got[m] != want)
            assert bad.size == 0, f"seed {s}: Philox word {k} differs at offsets {offsets[m][bad[:5]]}"
        ru1, ru2 = ref.uniform_pair(s, offsets[m])
        for name, got, want in (("u1", u1[m], ru1), ("u2", u2[m], ru2)):
            bad = np.flatnonzero(got.view(np.uint32) != want.view(np.uint32))
            assert bad.size == 0, f"seed {s}: {name} not bit-exact at offsets {offsets[m][bad[:5]]}"


def _ulps(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    """|got - want| in units of the fp32 ulp at |want| (want in fp64)."""
    ulp = np.spacing(np.abs(want).astype(np.float32)).astype(np.float64)
    return np.abs(got.astype(np.float64) - want) / ulp


def test_normals_within_4_ulp(harness):
    seeds, offsets = _rng_inputs()
    *_, normal = _run(harness, "rng", [seeds, offsets], ["u4"] * 4 + ["f4"] * 3)
    for s in SEEDS:
        m = seeds == np.uint64(s)
        err = _ulps(normal[m], ref.randn(s, offsets[m]))
        worst = int(np.argmax(err))
        assert err[worst] <= 4.0, (
            f"seed {s} offset {offsets[m][worst]}: normal {normal[m][worst]!r} is {err[worst]:.2f} ulp "
            f"from the reference"
        )


def test_sincos_small_within_2_ulp(harness):
    """The Box-Muller cosine and sine on [0, 2 pi), including the floats nearest the zeros and extrema."""
    gen = np.random.default_rng(7)
    specials = []
    for c in np.pi * np.arange(9) / 4:
        f = np.float32(c)
        specials += [np.nextafter(f, np.float32(-1)), f, np.nextafter(f, np.float32(10))]
    # every theta the kernels can produce is 2 pi_f32 * u2; take u2 on a grid of uniforms too
    u2 = (np.arange(0, 2**31, 4099, dtype=np.int64).astype(np.float32) * ref.UNIFORM_SCALE).astype(np.float32)
    a = np.concatenate([gen.uniform(0, 2 * np.pi, 200_000), (ref.TWO_PI_F32 * u2), np.abs(specials)]).astype(
        np.float32
    )
    got_cos, got_sin = _run(harness, "cos", [a], ["f4", "f4"])
    for name, got, fn in (("cos", got_cos, np.cos), ("sin", got_sin, np.sin)):
        err = _ulps(got, fn(a.astype(np.float64)))
        worst = int(np.argmax(err))
        assert err[worst] <= 2.0, f"{name}({a[worst]!r}) = {got[worst]!r}: {err[worst]:.2f} ulp off"


def _check_rel(name: str, got: np.ndarray, want: np.ndarray, atol: np.ndarray | float = 0.0, **ctx):
    """|got - want| <= 1e-6 |want| + atol (fp32 denormal results get a FLT_MIN * 1e-6 floor)."""
    got = got.astype(np.float64)
    tol = 1e-6 * np.maximum(np.abs(want), F32_TINY) + atol
    err = np.abs(got - want)
    bad = np.flatnonzero(~(err <= tol))
    if bad.size:
        i = bad[np.argmax((err / tol)[bad])]
        where = ", ".join(f"{k}={v[i]!r}" for k, v in ctx.items())
        pytest.fail(
            f"{name}: {bad.size} elements off, worst at {where}: got {got[i]!r}, reference {want[i]!r}"
        )


def _loss_inputs():
    gen = np.random.default_rng(1234)
    n = 60_000
    extreme_x = [100.0, -100.0, 0.0, -0.0, 1e-8, -1e-8, 30.0, -30.0, 88.0, -88.0, 89.0, -89.0, 1e-30, 15.0]
    x = np.concatenate([gen.normal(0, 4, n - len(extreme_x)), extreme_x]).astype(np.float32)
    t = gen.uniform(0, 1, n).astype(np.float32)
    t[::7], t[::11] = 0.0, 1.0
    t[-len(extreme_x) :: 2], t[-len(extreme_x) + 1 :: 2] = 1.0, 0.0
    extreme_mu = [0.0, 1e-20, 100.0, -100.0, 1e-3, 5.0]
    mu = np.concatenate([gen.normal(0, 2, n - len(extreme_mu)), extreme_mu]).astype(np.float32)
    extreme_lv = [30.0, -30.0, 0.0, 1e-7, -1e-7, 0.999, -1.0, 1.0, np.nextafter(1.0, 0.0), -1e-30]
    lv = np.concatenate(
        [
            gen.normal(0, 3, n // 2),
            gen.uniform(-1.5, 1.5, n - n // 2 - len(extreme_lv)),  # around the series / expm1 switch
            extreme_lv,
        ]
    ).astype(np.float32)
    k = gen.integers(0, 256, n).astype(np.uint8)
    k[:6] = [0, 255, 1, 254, 128, 127]
    return x, t, mu, lv, k


def test_loss_elements_match_reference(harness):
    x, t, mu, lv, k = _loss_inputs()
    out = dict(
        zip(
            "bce dbce mse dmse bce_u8 dbce_u8 mse_u8 dmse_u8 kl dlv".split(),
            _run(harness, "loss", [x, t, mu, lv, k], ["f4"] * 10),
            strict=True,
        )
    )
    X, T, K = x.astype(np.float64)[:, None], t.astype(np.float64)[:, None], k[:, None]
    M, L = mu.astype(np.float64)[:, None], lv.astype(np.float64)[:, None]
    x64, t64, tk = X[:, 0], T[:, 0], k.astype(np.float64) / 255.0
    ctx = {"x": x, "t": t, "k": k}

    # Inherent conditioning of sigmoid(x) - t: the fp32 kernel forms (1 - t) - q (x >= 0) or q - t
    # (x < 0) with q = sigmoid(-|x|); each operand is good to ~1 ulp, so the difference is good to a
    # few ulp *of the operands*, not of the (possibly cancelled) result.  1e-15: the fp64 reference
    # sigmoid, 0.5 (1 + tanh(x/2)), is itself only absolutely accurate (it returns 0 at x = -88).
    def sigmoid_atol(tt):
        q = 0.5 * (1.0 + np.tanh(-0.5 * np.abs(x64)))
        return 4 * EPS32 * (q + np.where(x64 >= 0, np.abs(1.0 - tt), np.abs(tt))) + 1e-15

    _check_rel("bce", out["bce"], np.asarray(ref.bce_with_logits(X, T, "none")), **ctx)
    _check_rel(
        "dbce", out["dbce"], ref.bce_with_logits_backward(X, T, "none")[:, 0], sigmoid_atol(t64), **ctx
    )
    _check_rel("mse", out["mse"], np.asarray(ref.mse(X, T, "none")), **ctx)
    _check_rel("dmse", out["dmse"], ref.mse_backward(X, T, "none")[:, 0], **ctx)

    # uint8 targets are read as t = k * (1/255) in fp32 (within 2 ulp of k/255; 1 - t is formed as
    # (255 - k) * (1/255)), which moves a result by up to 2^-22 |d result / d t|.
    tread = 2.0**-22
    _check_rel(
        "bce_u8", out["bce_u8"], np.asarray(ref.bce_with_logits(X, K, "none")), tread * np.abs(x64), **ctx
    )
    _check_rel(
        "dbce_u8",
        out["dbce_u8"],
        ref.bce_with_logits_backward(X, K, "none")[:, 0],
        sigmoid_atol(tk) + tread,
        **ctx,
    )
    _check_rel(
        "mse_u8", out["mse_u8"], np.asarray(ref.mse(X, K, "none")), tread * 2 * np.abs(x64 - tk), **ctx
    )
    _check_rel("dmse_u8", out["dmse_u8"], ref.mse_backward(X, K, "none")[:, 0], 2 * tread, **ctx)

    # The fp64 reference forms 1 + lv - mu^2 - exp(lv) directly, which cancels for lv -> 0 (the fp32
    # kernel evaluates exp(lv) - 1 - lv by its series there): allow the reference's own rounding.
    kctx = {"mu": mu, "lv": lv}
    ref_atol = 4 * 2.0**-53 * (1.0 + np.abs(L[:, 0]) + np.exp(L[:, 0]) + M[:, 0] ** 2)
    _check_rel("kl", out["kl"], np.asarray(ref.kl_divergence(M, L, "none")), ref_atol, **kctx)
    _, r_dlv = ref.kl_divergence_backward(M, L, "none")
    _check_rel("dlogvar", out["dlv"], r_dlv[:, 0], 2 * 2.0**-53 * np.exp(L[:, 0]), **kctx)


def _f32_to_bf16_bits_torch(x: np.ndarray) -> np.ndarray:
    torch = pytest.importorskip("torch")
    return torch.from_numpy(x.copy()).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def test_dtype_conversions(harness):
    gen = np.random.default_rng(3)
    h16 = np.arange(65536, dtype=np.uint32).astype(np.uint16)  # every 16-bit pattern
    n = h16.size
    f16_vals = h16.view(np.float16).astype(np.float32)
    bf16_vals = (h16.astype(np.uint32) << 16).view(np.float32)
    # fp32 inputs: exact 16-bit values, their midpoints (ties) and neighbours, and random magnitudes
    finite16 = (
        np.isfinite(f16_vals[:-1]) & np.isfinite(f16_vals[1:]) & (np.abs(np.diff(h16.astype(np.int64))) == 1)
    )
    mids = ((f16_vals[:-1][finite16].astype(np.float64) + f16_vals[1:][finite16]) / 2).astype(np.float32)
    specials = np.array(
        [65504, 65519, 65519.996, 65520, 1e5, np.inf, -np.inf, 6e-8, 2.98e-8, 2.99e-8], np.float32
    )
    pool = np.concatenate(
        [
            f16_vals,
            bf16_vals,
            mids,
            np.nextafter(mids, np.float32(np.inf)),
            np.nextafter(mids, np.float32(-np.inf)),
            (gen.normal(size=40_000) * 10.0 ** gen.uniform(-45, 38, 40_000)).astype(np.float32),
        ]
    )
    x = np.concatenate([specials, -specials, gen.permutation(pool)])[:n].astype(np.float32)
    to_half, to_bf16, from_half, from_bf16 = _run(harness, "conv", [x, h16], ["u2", "u2", "f4", "f4"])

    finite = ~np.isnan(x)
    with np.errstate(over="ignore"):
        want_half = x.astype(np.float16).view(np.uint16)
    bad = np.flatnonzero(finite & (to_half != want_half))
    assert bad.size == 0, f"fp32 -> fp16 differs from numpy for {x[bad[:5]]}"
    want_bf16 = _f32_to_bf16_bits_torch(x)
    bad = np.flatnonzero(finite & (to_bf16 != want_bf16))
    assert bad.size == 0, f"fp32 -> bf16 differs from torch for {x[bad[:5]]}"
    assert np.all(np.isnan(to_half[~finite].view(np.float16)))

    nan16 = np.isnan(f16_vals)
    assert np.array_equal(from_half[~nan16].view(np.uint32), f16_vals[~nan16].view(np.uint32))
    assert np.all(np.isnan(from_half[nan16]))
    assert np.array_equal(from_bf16.view(np.uint32), bf16_vals.view(np.uint32))


# ----------------------------------------------------------------------------------------------
# 3. The kernels under the CPU emulator
# ----------------------------------------------------------------------------------------------

EMULATOR_SRC = Path(__file__).parent / "cuda_harness" / "kernel_emulator.cpp"
KERNEL_LIB_SRC = Path(__file__).parent / "cuda_harness" / "kernel_lib.cpp"
_DTYPE_CODE = {"float32": 0, "float16": 1, "bfloat16": 2, "uint8": 3}
_CTYPE = {"float32": "float", "float16": "fv_half", "bfloat16": "fv_bf16", "uint8": "unsigned char"}


@pytest.fixture(scope="module")
def emulator(builds) -> Path:
    return _built(builds, "emulator", "kernel emulator (tests/cuda_harness/kernel_emulator.cpp)")


def _bf16_round(a: np.ndarray) -> np.ndarray:
    """fp32 -> bf16 (round to nearest even) -> fp32, for finite values."""
    u = np.asarray(a, np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16 << 16).astype(np.uint32).view(np.float32)


def _storage(a: np.ndarray, dtype: str) -> np.ndarray:
    """Values (already representable) -> the raw buffer the kernels read."""
    if dtype == "bfloat16":
        return (np.asarray(a, np.float32).view(np.uint32) >> 16).astype(np.uint16)
    return np.asarray(a).astype(dtype)


def _from_storage(raw: bytes, dtype: str, n: int, pos: int) -> tuple[np.ndarray, int]:
    if dtype == "bfloat16":
        bits = np.frombuffer(raw, np.uint16, n, pos)
        return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64), pos + 2 * n
    a = np.frombuffer(raw, dtype, n, pos)
    return a.astype(np.float64), pos + n * a.itemsize


def _representable(a: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return _bf16_round(a).astype(np.float64)
    if dtype == "uint8":
        return a
    return np.asarray(a).astype(dtype).astype(np.float64)


def _padded(a2d: np.ndarray, dtype: str, offset: int, stride: int):
    """A [B, F] array embedded in a buffer at ``offset`` with row ``stride``; padding poisoned."""
    B, F = a2d.shape
    stride = max(stride, F)
    n = offset + (B - 1) * stride + F if B else offset
    fill = 255 if dtype == "uint8" else np.nan
    buf = np.full(n, fill, np.float64 if dtype != "uint8" else np.uint8)
    for b in range(B):
        buf[offset + b * stride : offset + b * stride + F] = a2d[b]
    return _storage(buf, dtype), stride


def _emu_loss(emu, xs, ts, ms, vs, dtypes, B, F, D, beta, reduction, recon, need_grad):
    """Run the loss kernels in the emulator; ``xs`` etc. are (buffer, offset, stride)."""
    tx, tt, tm = dtypes
    rows = {}
    for name, (_, off, stride), dt, cols in (
        ("x", xs, tx, F), ("t", ts, tt, F), ("m", ms, tm, D), ("v", vs, tm, D)
    ):  # fmt: skip
        itemsize = 1 if dt == "uint8" else (4 if dt == "float32" else 2)
        rows[name] = cl._Rows(off * itemsize, B, cols, stride, _CTYPE[dt])
    vec, glog2, grid = cl._loss_config(rows["x"], rows["t"], 0 if need_grad else None)
    header = [_DTYPE_CODE[tx], _DTYPE_CODE[tt], _DTYPE_CODE[tm], RECONS[recon], int(need_grad)]
    header += [REDUCTIONS[reduction], B, F, D]
    for buf, off, stride in (xs, ts, ms, vs):
        header += [off, stride, buf.size]
    header += [glog2, int(vec), grid]
    job = emu.parent / "loss.job"
    with open(job, "wb") as f:
        np.array(header, np.int64).tofile(f)
        np.array([beta], np.float64).tofile(f)
        for buf, _, _ in (xs, ts, ms, vs):
            np.ascontiguousarray(buf).tofile(f)
    res = subprocess.run(
        [str(emu), "loss", str(job), str(emu.parent / "loss.out")], capture_output=True, timeout=600
    )
    assert res.returncode == 0, res.stderr.decode()
    raw = (emu.parent / "loss.out").read_bytes()
    out, pos = {}, 0
    out["recon_rows"], pos = _from_storage(raw, "float32", B, pos)
    out["kl_rows"], pos = _from_storage(raw, "float32", B, pos)
    out["loss"], pos = _from_storage(raw, "float32", B if reduction == "none" else 3, pos)
    if need_grad:
        out["dlogits"], pos = _from_storage(raw, tx, B * F, pos)
        out["dmu"], pos = _from_storage(raw, tm, B * D, pos)
        out["dlogvar"], pos = _from_storage(raw, tm, B * D, pos)
    assert pos == len(raw)
    return out, (vec, glog2, grid)


# (B, F, D, (logits, target, latent dtypes), recon, reduction, need_grad,
#  (logits offset, row stride), (target offset, row stride)) -- stride 0: contiguous
LOSS_CASES = [
    (1, 1, 1, ("float32", "float32", "float32"), "bce", "sum", True, (0, 0), (0, 0)),
    (3, 7, 2, ("float32", "float32", "float32"), "bce", "sum", True, (0, 0), (0, 0)),
    (5, 784, 20, ("float32", "uint8", "float32"), "bce", "mean", True, (0, 0), (0, 0)),
    (40, 1025, 129, ("float32", "float32", "float32"), "mse", "none", True, (0, 0), (0, 0)),
    (300, 7, 1, ("float32", "uint8", "float32"), "mse", "sum", True, (0, 0), (0, 0)),
    (1, 4099, 20, ("float32", "float32", "float32"), "bce", "mean", True, (0, 0), (0, 0)),
    (6, 784, 20, ("float16", "float16", "float16"), "bce", "sum", True, (0, 0), (0, 0)),
    (7, 1000, 3, ("float16", "uint8", "float16"), "mse", "mean", False, (0, 0), (0, 0)),
    (3, 520, 129, ("bfloat16", "bfloat16", "bfloat16"), "bce", "none", True, (0, 0), (0, 0)),
    (4, 256, 2, ("float16", "float32", "float32"), "bce", "sum", True, (8, 264), (4, 260)),
    (4, 256, 2, ("bfloat16", "float32", "float32"), "mse", "none", True, (0, 0), (0, 0)),
    (9, 784, 20, ("float32", "uint8", "float32"), "bce", "sum", True, (4, 800), (4, 800)),  # strided, vec
    (9, 784, 20, ("float32", "uint8", "float32"), "bce", "mean", True, (1, 790), (3, 801)),  # misaligned
    (9, 784, 20, ("float32", "uint8", "float32"), "mse", "sum", False, (0, 0), (0, 0)),
    # one term only, as the cupy backend launches them: F = 0 (KL only) or D = 0 (no KL)
    (5, 0, 20, ("float32", "float32", "float32"), "bce", "sum", True, (0, 0), (0, 0)),
    (6, 33, 0, ("float16", "uint8", "float16"), "mse", "mean", True, (0, 0), (0, 0)),
]


@pytest.mark.parametrize(
    "case", LOSS_CASES, ids=lambda c: f"B{c[0]}-F{c[1]}-D{c[2]}-{'-'.join(c[3])}-{c[4]}-{c[5]}"
)
def test_emulated_vae_loss(emulator, case):
    B, F, D, dtypes, recon, reduction, need_grad, (x_off, x_stride), (t_off, t_stride) = case
    tx, tt, tm = dtypes
    gen = np.random.default_rng(B * 1000 + F + D)
    x = _representable(gen.normal(0, 3, (B, F)), tx)
    x.reshape(-1)[::11] = 100.0 if tx == "float32" else 30.0
    if tt == "uint8":
        t = gen.integers(0, 256, (B, F)).astype(np.uint8)
    else:
        t = _representable(np.where(gen.uniform(size=(B, F)) < 0.3, 1.0, gen.uniform(0, 1, (B, F))), tt)
    mu = _representable(gen.normal(0, 1.5, (B, D)), tm)
    lv = _representable(gen.normal(0, 1.5, (B, D)), tm)
    lv.reshape(-1)[::5] = 30.0 if tm == "float32" else 10.0
    beta = 0.7
    xs = (*_padded(x, tx, x_off, x_stride),)
    ts = (*_padded(t, tt, t_off, t_stride),)
    ms = _padded(mu, tm, 2, D + 3)
    vs = _padded(lv, tm, 0, 0)
    out, config = _emu_loss(
        emulator, (xs[0], x_off, xs[1]), (ts[0], t_off, ts[1]), (ms[0], 2, ms[1]), (vs[0], 0, vs[1]),
        dtypes, B, F, D, beta, reduction, recon, need_grad,
    )  # fmt: skip
    for k, v in out.items():
        assert not np.isnan(v).any(), f"{k}: NaN (unwritten element or a read outside a row) with {config=}"
    rec_fn = ref.bce_with_logits if recon == "bce" else ref.mse
    r_rec, r_kl = np.asarray(rec_fn(x, t, "none")), np.asarray(ref.kl_divergence(mu, lv, "none"))
    np.testing.assert_allclose(out["recon_rows"], r_rec, rtol=1e-5, err_msg=f"recon rows {config=}")
    np.testing.assert_allclose(out["kl_rows"], r_kl, rtol=1e-5, err_msg=f"kl rows {config=}")
    r_loss = ref.vae_loss(x, t, mu, lv, beta, reduction, recon)
    if reduction == "none":
        np.testing.assert_allclose(out["loss"], r_loss, rtol=1e-5)
    else:
        red = (lambda a: a.mean()) if reduction == "mean" else (lambda a: a.sum())
        np.testing.assert_allclose(out["loss"], [r_loss, red(r_rec), red(r_kl)], rtol=1e-5)
    if need_grad:
        grad = np.ones(B) if reduction == "none" else 1.0
        r_dx, r_dmu, r_dlv = ref.vae_loss_backward(x, t, mu, lv, beta, reduction, recon, grad)
        # uint8 targets are read as k * (1/255) in fp32: up to 2^-22 off, so t - x may move by that much
        t_read = 2.0**-21 if tt == "uint8" else 0.0
        for name, got, want, dt, atol in (
            ("dlogits", out["dlogits"], r_dx, tx, 2.0**-24 + t_read),
            ("dmu", out["dmu"], r_dmu, tm, 2.0**-24),
            ("dlogvar", out["dlogvar"], r_dlv, tm, 2.0**-24),
        ):
            rtol = {"float32": 1e-5, "float16": 2.0**-10, "bfloat16": 2.0**-7}[dt]
            want = _representable(want.reshape(-1), dt) if dt != "float32" else want.reshape(-1)
            np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=f"{name} {config=}")


# (dtype, backward, rows, cols, offset, row stride)
REPARAM_CASES = [
    ("float32", False, 1, 1000, 0, 1000),
    ("float32", True, 1, 1003, 0, 1003),
    ("float16", False, 1, 481, 0, 481),
    ("float32", False, 5, 129, 1, 136),  # sliced, misaligned: scalar path
    ("float32", True, 5, 128, 4, 132),  # sliced, aligned: vector path with row strides
    ("float32", False, 3, 130, 0, 132),  # vector path; row counters 0, 130, 260: quads and single draws
    ("bfloat16", True, 3, 20, 0, 20),
    ("float16", False, 70, 3, 0, 3),
]


# (key, counter offset, key read through a pointer): offsets whose counters cross 2^32 inside a call
# (in the vector part and in the scalar tail), keys with the top bit set (negative as an int64)
REPARAM_KEYS = [
    (2**40 + 3, 0, False),
    (2**64 - 1, 2**32 - 300, True),
    (0x0123456789ABCDEF, 2**33 - 7, False),
    (2**63 + 5, 2**62 + 2**32 - 1, True),
]


@pytest.mark.parametrize("case", REPARAM_CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize(
    "key", REPARAM_KEYS, ids=lambda k: f"key{k[0]:x}-off{k[1]}-{'ptr' if k[2] else 'val'}"
)
def test_emulated_reparameterize(emulator, case, key):
    dtype, backward, rows, cols, off, stride = case
    seed, offset, in_memory = key
    gen = np.random.default_rng(rows * cols)
    a = _representable(gen.normal(0, 2, (rows, cols)), dtype)
    lv = _representable(gen.normal(0, 2, (rows, cols)), dtype)
    abuf, stride = _padded(a, dtype, off, stride)
    vbuf, _ = _padded(lv, dtype, off, stride)
    itemsize = 4 if dtype == "float32" else 2
    ra = cl._Rows(off * itemsize, rows, cols, stride, _CTYPE[dtype])
    ro = cl._Rows(0, rows, cols, cols, _CTYPE[dtype])
    vec, gx, gy = cl._reparam_config(ra, ra, ro)
    header = [_DTYPE_CODE[dtype], int(backward), rows, cols, off, stride, abuf.size, off, stride, vbuf.size]
    header += [int(vec), gx, gy, np.array(seed, np.uint64).view(np.int64), offset, int(in_memory)]
    job = emulator.parent / "reparam.job"
    with open(job, "wb") as f:
        np.array(header, np.int64).tofile(f)
        abuf.tofile(f)
        vbuf.tofile(f)
    res = subprocess.run(
        [str(emulator), "reparam", str(job), str(job) + ".out"], capture_output=True, timeout=600
    )
    assert res.returncode == 0, res.stderr.decode()
    raw = Path(str(job) + ".out").read_bytes()
    got, _ = _from_storage(raw, dtype, rows * cols, 0)
    got = got.reshape(rows, cols)
    assert not np.isnan(got).any(), f"unwritten elements ({vec=}, {gx=}, {gy=})"
    # the contract: eps[i] = randn(key, offset + i) over the flat C-order index i
    eps = ref.randn(seed, offset + np.arange(rows * cols, dtype=np.int64)).reshape(rows, cols)
    std = np.exp(0.5 * lv)
    u = 2.0**-20 if dtype == "float32" else (2.0**-10 if dtype == "float16" else 2.0**-7)
    if backward:
        want = 0.5 * a * std * eps
        scale = np.abs(want)
    else:
        want = a + std * eps
        scale = np.abs(a) + std * np.abs(eps)
    assert np.all(np.abs(got - want) <= u * scale + 1e-30), f"({vec=}, {gx=}, {gy=})"
    if offset == 0:  # the reference's own functions agree (eps at counters 0, 1, ...)
        ref_fn = ref.reparameterize_backward if backward else ref.reparameterize
        np.testing.assert_allclose(want, ref_fn(a, lv, seed)[1] if backward else ref_fn(a, lv, seed))


def _round_to(a: np.ndarray, dtype: str) -> np.ndarray:
    """fp32 values rounded (nearest even) to ``dtype``, as float64."""
    return _bf16_round(a).astype(np.float64) if dtype == "bfloat16" else a.astype(dtype).astype(np.float64)


# (dlogits dtype or None, latents dtype or None, B, F, D, grad: "scalar" | "rows" | "rows-strided" |
#  "rows-broadcast", dlogits offset in elements)
SCALE_CASES = [
    ("float32", "float32", 5, 784, 20, "rows", 0),
    ("float32", "float32", 3, 7, 2, "scalar", 0),
    ("float32", "float32", 4, 784, 20, "scalar-one", 0),
    ("float32", "float32", 9, 1025, 129, "rows-strided", 1),  # misaligned: scalar path
    ("float16", "float16", 6, 520, 3, "rows", 0),
    ("float16", "float32", 3, 256, 20, "rows-broadcast", 8),
    ("bfloat16", "bfloat16", 70, 3, 1, "rows", 0),
    ("bfloat16", "float32", 2, 4099, 20, "scalar", 0),
    (None, "float32", 11, 0, 20, "rows", 0),  # KL only
    ("float16", None, 7, 33, 0, "rows", 0),  # no KL term
]


@pytest.mark.parametrize("case", SCALE_CASES, ids=lambda c: "-".join(map(str, c)))
def test_emulated_scale_grads(emulator, case):
    """The in-place backward scale: exact fp32 products rounded once; rows with factor 1 keep their
    exact bits (they hold signalling NaNs, which any arithmetic would quiet), so nothing touched them."""
    tx, tm, B, F, D, kind, x_off = case
    gen = np.random.default_rng(B * F + D)
    factors = gen.choice(np.float32([1.0, -0.5, 3.0, 1e-3, 1.0, 0.0]), B).astype(np.float32)
    factors[0] = 1.0
    if kind.startswith("scalar"):
        g, g_stride, row_factor = np.float32([1.0 if kind == "scalar-one" else 2.5]), 0, None
    elif kind == "rows-broadcast":
        g, g_stride, row_factor = np.float32([0.25]), 0, None
    elif kind == "rows-strided":
        g, g_stride, row_factor = np.repeat(factors, 3), 3, factors
    else:
        g, g_stride, row_factor = factors, 1, factors
    s = np.broadcast_to(g[0] if row_factor is None else row_factor, (B,)).astype(np.float32)
    ones = s == 1.0
    snan = {"float32": np.uint32(0x7FA00001), "float16": np.uint16(0x7C01), "bfloat16": np.uint16(0x7F81)}

    def grad_buffer(dtype: str, rows: int, cols: int, lead: int = 0):
        vals = _representable(gen.normal(0, 3, (rows, cols)), dtype)
        raw = _storage(vals, dtype).reshape(rows, cols).copy()
        raw.view(np.uint32 if dtype == "float32" else np.uint16)[ones] = snan[dtype]
        pad = np.zeros(lead, raw.dtype)
        return vals, np.concatenate([pad, raw.reshape(-1)])

    bufs, expect = [], []
    if tx is not None:
        vals, buf = grad_buffer(tx, B, F, x_off)
        bufs.append(buf)
        expect.append((tx, buf[x_off:], vals))
    for _ in range(2 if tm is not None else 0):
        vals, buf = grad_buffer(tm, B, D)
        bufs.append(buf)
        expect.append((tm, buf, vals))
    dx = cl._Rows(x_off * (4 if tx == "float32" else 2), B, F, F, _CTYPE[tx]) if tx else None
    vec, glog2, grid = cl._scale_config(B, F, D, dx)
    header = [_DTYPE_CODE[tx or tm], _DTYPE_CODE[tm or tx], B, F, D, g_stride, g.size]
    header += [x_off if tx else -1, int(tm is not None), int(tm is not None), glog2, int(vec), grid]
    job = emulator.parent / "scale.job"
    with open(job, "wb") as f:
        np.array(header, np.int64).tofile(f)
        g.astype(np.float32).tofile(f)
        for buf in bufs:
            buf.tofile(f)
    res = subprocess.run(
        [str(emulator), "scale", str(job), str(job) + ".out"], capture_output=True, timeout=600
    )
    assert res.returncode == 0, res.stderr.decode()
    raw, pos = Path(str(job) + ".out").read_bytes(), 0
    for dtype, before, vals in expect:
        n = before.size
        got_raw = np.frombuffer(raw, before.dtype, n, pos)
        pos += n * before.itemsize
        bits = np.uint32 if dtype == "float32" else np.uint16
        rows, rows_before = got_raw.view(bits).reshape(B, -1), before.view(bits).reshape(B, -1)
        assert np.array_equal(rows[ones], rows_before[ones]), f"a factor-1 row was touched ({vec=})"
        with np.errstate(invalid="ignore"):  # the signalling NaNs of the factor-1 rows
            got, _ = _from_storage(got_raw.tobytes(), dtype, n, 0)
        want = _round_to((vals.astype(np.float32) * s[:, None]).astype(np.float32), dtype)
        np.testing.assert_array_equal(
            got.reshape(B, -1)[~ones], want[~ones], err_msg=f"{dtype} {vec=} {glog2=}"
        )
    assert pos == len(raw)


# ----------------------------------------------------------------------------------------------
# 4. The cupy backend end to end on the CPU: fastvae.kernels.cupy_launch with CuPy's launches
#    replaced by tests/cuda_harness/kernel_lib.cpp, which runs the named kernel on host buffers with
#    the argument bytes cupy_launch passes -- argument order, pointers, sizes, the terms layout, the
#    key read through its pointer, all checked against the reference on CPU torch tensors.
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kernel_lib(builds):
    import ctypes

    lib = ctypes.CDLL(str(_built(builds, "kernel_lib", "kernel library (tests/cuda_harness/kernel_lib.cpp)")))
    lib.fv_emu_launch.argtypes = [
        ctypes.c_char_p,
        ctypes.c_uint,
        ctypes.c_uint,
        ctypes.c_uint,
        ctypes.c_void_p,
    ]
    lib.fv_emu_launch.restype = ctypes.c_int
    return lib


class _HostKernel:
    """What cupy_launch calls as a CuPy RawKernel, run by kernel_lib on host memory instead."""

    def __init__(self, lib, name: str):
        self.lib, self.name = lib, name

    def __call__(self, grid, block, args, stream=None):
        import ctypes

        cells = [np.array(a) for a in args]  # each parameter's bytes, as CuPy marshals them
        argv = (ctypes.c_void_p * len(cells))(*[c.ctypes.data for c in cells])
        grid = (*grid, 1)
        rc = self.lib.fv_emu_launch(self.name.encode(), grid[0], grid[1], block[0], argv)
        assert rc == 0, f"{self.name}: kernel_lib returned {rc}"


class _NoDevice:
    def __init__(self, index):
        assert index == -1  # CPU tensors

    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return None


@pytest.fixture
def on_host(kernel_lib, monkeypatch):
    """fastvae.kernels.cupy_launch, running its kernels through kernel_lib on CPU tensors."""

    def loss_kernels(device, tx, tt, tm):
        names = [cl.loss_kernel_name(tx, tt, tm, r, g) for r in (1, 2) for g in (True, False)]
        return {n: _HostKernel(kernel_lib, n) for n in [*names, "fastvae_vae_loss_finalize"]}

    def reparam_kernels(device, t):
        return tuple(_HostKernel(kernel_lib, f"fastvae_reparameterize_{d}<{t}>") for d in ("fwd", "bwd"))

    monkeypatch.setattr(cl, "_loss_kernels", loss_kernels)
    monkeypatch.setattr(cl, "_reparam_kernels", reparam_kernels)
    monkeypatch.setattr(
        cl, "_scale_kernel", lambda d, tx, tm: _HostKernel(kernel_lib, f"fastvae_scale_grads<{tx}, {tm}>")
    )
    monkeypatch.setattr(cl, "_device_index", lambda name, t: t.get_device())
    monkeypatch.setattr(cl, "_OnDevice", _NoDevice)
    return cl


def _problem(B, F, D, recon, reduction, need_grad=True, beta=0.7):
    from fastvae.backend import LossProblem

    torch = pytest.importorskip("torch")
    red = REDUCTIONS[reduction]
    scale = 1.0 / B if reduction == "mean" else 1.0
    return LossProblem(B, F, D, RECONS[recon] if F else 0, red, beta, scale, need_grad, torch.float32)


# (B, F, D, logits dtype, target dtype, latents dtype, recon, reduction)
BACKEND_CASES = [
    (5, 37, 3, "float32", "uint8", "float32", "bce", "sum"),
    (9, 64, 20, "float32", "float32", "float32", "mse", "mean"),
    (3, 40, 4, "float16", "uint8", "float16", "bce", "none"),
    (4, 24, 2, "bfloat16", "bfloat16", "float32", "mse", "sum"),
    (6, 0, 5, None, None, "float32", "bce", "mean"),  # KL only
    (7, 33, 0, "float32", "uint8", None, "bce", "none"),  # no KL term
]


@pytest.mark.parametrize("case", BACKEND_CASES, ids=lambda c: "-".join(map(str, c)))
def test_backend_end_to_end_on_host(on_host, poison, case):
    """fused_loss, then scale_grads_ with a per-row / scalar incoming gradient, against the reference."""
    torch = pytest.importorskip("torch")
    B, F, D, tx, tt, tm, recon, reduction = case
    gen = torch.Generator().manual_seed(B * 100 + F + D)
    logits = target = mu = logvar = None
    if tx:
        wide = torch.randn(B, F + 3, generator=gen).mul_(3).to(getattr(torch, tx))
        logits = wide[:, 1 : 1 + F]  # a row-strided view, misaligned: passed as it is
        target = (
            torch.randint(0, 256, (B, F), generator=gen, dtype=torch.uint8)
            if tt == "uint8"
            else torch.rand(B, F, generator=gen).to(getattr(torch, tt))
        )
    if tm:
        lat = torch.randn(B, 2 * D, generator=gen).mul_(1.5).to(getattr(torch, tm))
        mu, logvar = lat[:, :D], lat[:, D:]
    p = _problem(B, F, D, recon, reduction)
    loss, rec, kl, dx, dmu, dlv, _ = on_host.fused_loss(p, logits, target, mu, logvar)

    def np64(t):
        return t.numpy() if t.dtype == torch.uint8 else t.double().numpy()

    x = np64(logits) if tx else np.zeros((B, 0))
    t = np64(target) if tx else np.zeros((B, 0))
    m = np64(mu) if tm else np.zeros((B, 0))
    v = np64(logvar) if tm else np.zeros((B, 0))
    r_rec = (ref.bce_with_logits if recon == "bce" else ref.mse)(x, t, reduction)
    r_kl = ref.kl_divergence(m, v, reduction)
    for name, got, want in (("recon", rec, r_rec), ("kl", kl, r_kl), ("loss", loss, r_rec + 0.7 * r_kl)):
        np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-5, atol=1e-30, err_msg=name)
    # the incoming gradient: a scalar, or per row with every other row exactly 1 (left untouched)
    grad_loss = (
        torch.full((), 2.5) if reduction != "none" else torch.where(torch.arange(B) % 2 == 0, 1.0, -3.0)
    )
    on_host.scale_grads_(grad_loss, dx, dmu, dlv)
    g = grad_loss.double().numpy()
    r_dx, r_dmu, r_dlv = ref.vae_loss_backward(x, t, m, v, 0.7, reduction, recon, g)
    rtol = {"float32": 1e-5, "float16": 2.0**-9, "bfloat16": 2.0**-6, None: 0}
    scale = 2.5 / B if reduction == "mean" else 3.0
    for name, got, want, dt in (
        ("dlogits", dx, r_dx, tx),
        ("dmu", dmu, r_dmu, tm),
        ("dlogvar", dlv, r_dlv, tm),
    ):
        if dt is None:
            assert got.numel() == 0, name
            continue
        assert got.dtype == getattr(torch, dt) and got.shape == want.shape and got.is_contiguous(), name
        atol = scale * 2.0**-20 if name == "dlogits" else 1e-30  # sigmoid(x) - t, (x - t): cancellation
        np.testing.assert_allclose(got.double().numpy(), want, rtol=rtol[dt], atol=atol, err_msg=name)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_backend_reparameterize_end_to_end_on_host(on_host, poison, dtype):
    """eps[i] = randn(key, offset + i) with the key read through its pointer (a host int64 here),
    counters crossing 2^32, forward and backward, against the reference."""
    torch = pytest.importorskip("torch")
    B, D, offset, seed = 7, 45, 2**32 - 100, 2**63 + 9
    gen = torch.Generator().manual_seed(11)
    mu, logvar, dz = (torch.randn(B, D, generator=gen).to(getattr(torch, dtype)) for _ in range(3))
    key = torch.tensor([seed - 2**64], dtype=torch.int64)  # the int64 holding the key's bits
    z = on_host.reparameterize(mu, logvar, key, offset)
    dlogvar = on_host.reparameterize_backward(dz, logvar, key, offset)
    assert torch.equal(z, on_host.reparameterize(mu, logvar, seed, offset))  # the same key by value
    m, v, g = (t.double().numpy() for t in (mu, logvar, dz))
    eps = ref.randn(seed, offset + np.arange(B * D, dtype=np.int64)).reshape(B, D)
    u = {"float32": 2.0**-20, "float16": 2.0**-10, "bfloat16": 2.0**-7}[dtype]
    std = np.exp(0.5 * v)
    assert np.all(np.abs(z.double().numpy() - (m + std * eps)) <= u * (np.abs(m) + std * np.abs(eps)) + 1e-30)
    want = 0.5 * g * std * eps
    assert np.all(np.abs(dlogvar.double().numpy() - want) <= u * np.abs(want) + 1e-30)


# ----------------------------------------------------------------------------------------------
# Resource usage table (python tests/test_cuda_sources.py)
# ----------------------------------------------------------------------------------------------


def _print_resource_usage() -> int:
    import tempfile

    if NVCC is None:
        print("nvcc not found")
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        status = 0
        for cu in sorted(CUDA_DIR.glob("*.cu")):
            src = out / cu.name
            src.write_text(kernel_source(cu.name), encoding="utf-8")
            for arch in ARCHS:
                rc, log = _compile(src, arch, out)
                status |= rc
                regs = {name: int(r) for name, _, r in _USED_RE.findall(log)}
                for name, *lm in _PROPS_RE.findall(log):
                    usage = f"regs {regs.get(name, -1):3d} stack/spill {'/'.join(lm)}"
                    print(f"{arch} {cu.name:20s} {usage}  {name}")
    return status


if __name__ == "__main__":
    sys.exit(_print_resource_usage())
