"""fastvae.cupy (the CUDA C kernels through CuPy/NVRTC) against fastvae.reference.

The GPU tests skip with a reason when CuPy is not installed or no CUDA device is visible; the few
tests at the top (import without CuPy, layout helpers) run everywhere.

On a GPU: vae_loss and reparameterize on fresh random inputs at awkward sizes, fp32 / fp16 (and
bf16 through torch when torch has CUDA), float and uint8 targets, extreme values, sliced inputs,
outputs poisoned with NaN before each run (every output element must be written), determinism
(two runs bit-identical), eps equal to the reference normals, torch tensors through DLPack and the
torch_* glue, and (marked slow) more than 2^31 elements.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

import fastvae.cupy as fc
from fastvae import reference as ref

try:
    import cupy as cp
except ImportError:  # pragma: no cover - depends on the environment
    cp = None

try:
    import torch

    TORCH_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    torch = None
    TORCH_CUDA = False


def _gpu_reason() -> str | None:
    if cp is None:
        return "CuPy is not installed (pip install 'fastvae[cupy]')"
    if not fc.is_available():
        return "no CUDA device visible to CuPy"
    return None


_REASON = _gpu_reason()
gpu = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")
needs_torch_cuda = pytest.mark.skipif(not TORCH_CUDA, reason="torch without CUDA")


# ----------------------------------------------------------------------------------------------
# No GPU needed
# ----------------------------------------------------------------------------------------------


def test_import_without_cupy_raises_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # `import cupy` now raises ImportError
    with pytest.raises(ImportError, match=r"fastvae\[cupy\]"):
        fc.vae_loss(None, None, None, None)
    with pytest.raises(ImportError, match=r"fastvae\[cupy\]"):
        fc.reparameterize(None, None, seed=0)
    assert fc.is_available() is False


def test_row_layouts():
    assert fc._row_layout((4, 3, 5), (15, 5, 1)) == (4, 15, 15)
    assert fc._row_layout((4, 3, 5), (40, 5, 1)) == (4, 15, 40)  # sliced rows: no copy
    assert fc._row_layout((4, 3, 5), (15, 1, 3)) is None  # features not contiguous: copy
    assert fc._row_layout((4, 1, 5), (10, 99, 1)) == (4, 5, 10)  # size-1 dims have any stride
    assert fc._row_layout((4, 7), (-7, 1)) is None
    assert fc._row_layout((1, 7), (123, 1)) == (1, 7, 7)
    assert fc._flat_layout((4, 3, 5), (15, 5, 1)) == (1, 60, 60)
    assert fc._flat_layout((4, 15), (16, 1)) == (4, 15, 16)
    assert fc._flat_layout((9,), (1,)) == (1, 9, 9)


def test_group_size_heuristic():
    # threads per row G = 32 << log2, about two vector chunks per thread, 32 <= G <= 256
    assert [fc._group_log2(c) for c in (0, 1, 64, 65, 128, 196, 256, 257, 10_000)] == [
        0,
        0,
        0,
        1,
        1,
        2,
        2,
        3,
        3,
    ]


def test_validation_helpers_name_the_argument():
    shapes = {"logits": (4, 784), "target": (4, 1, 28, 28), "mu": (4, 20), "logvar": (4, 20)}
    assert fc._check_loss_shapes(shapes) == (4, 784, 20)
    for bad, match in (
        ({"target": (3, 784)}, "target"),
        ({"target": (4, 783)}, "target"),
        ({"mu": (5, 20), "logvar": (5, 20)}, "mu"),
        ({"logvar": (4, 19)}, "logvar"),
        ({"logits": (0, 784), "target": (0, 784)}, "logits"),
        ({"mu": ()}, "mu"),
    ):
        with pytest.raises(ValueError, match=match):
            fc._check_loss_shapes({**shapes, **bad})
    with pytest.raises(ValueError, match="reduction"):
        fc._check_options("avg", "bce")
    with pytest.raises(ValueError, match="recon"):
        fc._check_options("sum", "l1")
    assert fc._check_seed(np.uint64(2**64 - 1)) == 2**64 - 1
    for seed, exc in ((-1, ValueError), (2**64, ValueError), (1.5, TypeError), (True, TypeError)):
        with pytest.raises(exc, match="seed"):
            fc._check_seed(seed)
    with pytest.raises(TypeError, match="logits: dtype float64"):
        fc._ctype("logits", "float64", fc._FLOAT_CTYPES)


def test_kernel_source_inlines_headers():
    src = fc.kernel_source("vae_loss.cu")
    assert "fv_philox4x32_10" in src and "fv_pack" in src and '#include "' not in src
    with pytest.raises(FileNotFoundError):
        fc.kernel_source("no_such_file.cu")


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------

RECONS = ("bce", "mse")
REDUCTIONS = ("sum", "mean", "none")
# awkward sizes: (B, F, D) covering B in {1, 3, 127, 1000}, F in {1, 7, 784, 1025}, D in {1, 2, 20, 129}
SHAPES = [
    (1, 1, 1),
    (3, 7, 2),
    (127, 784, 20),
    (1000, 1025, 129),
    (1000, 7, 1),
    (3, 1025, 129),
    (127, 1, 2),
    (1, 784, 20),
]
EPS16 = 2.0**-11  # fp16 unit roundoff


@pytest.fixture
def poison(monkeypatch):
    """Every array fastvae.cupy allocates starts out as NaN (floats) so unwritten outputs show."""
    if cp is None:
        return
    real_empty = cp.empty

    def empty(shape, dtype=float, *args, **kwargs):
        a = real_empty(shape, dtype, *args, **kwargs)
        if cp.dtype(dtype).kind == "f":
            a.fill(np.nan)
        return a

    monkeypatch.setattr(cp, "empty", empty)
    if TORCH_CUDA:
        real_torch_empty = torch.empty

        def torch_empty(*args, **kwargs):
            t = real_torch_empty(*args, **kwargs)
            if t.is_floating_point():
                t.fill_(float("nan"))
            return t

        monkeypatch.setattr(torch, "empty", torch_empty)


def _inputs(B, F, D, dtype, target_kind, seed=0, extreme=False):
    gen = np.random.default_rng(seed)
    logits = gen.normal(0.0, 3.0, (B, F))
    mu = gen.normal(0.0, 1.5, (B, D))
    logvar = gen.normal(0.0, 1.5, (B, D))
    if target_kind == "uint8":
        target = gen.integers(0, 256, (B, F)).astype(np.uint8)
    else:
        target = gen.uniform(0.0, 1.0, (B, F))
        target[gen.uniform(size=(B, F)) < 0.2] = 1.0
        target[gen.uniform(size=(B, F)) < 0.2] = 0.0
        target = target.astype(dtype)
    if extreme:
        flat = logits.reshape(-1)
        flat[::5], flat[1::5] = 100.0, -100.0
        mflat, lflat = mu.reshape(-1), logvar.reshape(-1)
        mflat[::3], lflat[::3], lflat[1::3] = 100.0, 30.0, -30.0
    return logits.astype(dtype), target, mu.astype(dtype), logvar.astype(dtype)


def _f64(a) -> np.ndarray:
    if cp is not None and isinstance(a, cp.ndarray):
        a = cp.asnumpy(a)
    if torch is not None and isinstance(a, torch.Tensor):
        a = a.detach().float().cpu().numpy()
    return np.asarray(a).astype(np.float64)


def _assert_close(name, got, want, rtol, atol=0.0):
    """|got - want| <= atol + rtol |want| elementwise (atol may be an array); equal infinities pass."""
    got, want = _f64(got), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
    assert not np.isnan(got).any(), f"{name}: NaN in the output (an element was not written?)"
    with np.errstate(invalid="ignore"):
        ok = (got == want) | (np.abs(got - want) <= atol + rtol * np.abs(want))
    if not ok.all():
        bad = np.flatnonzero(~ok.reshape(-1))
        i = bad[0]
        pytest.fail(
            f"{name}: {bad.size} of {ok.size} elements off, first at flat index {i}: "
            f"got {got.reshape(-1)[i]!r}, want {want.reshape(-1)[i]!r}"
        )


def _reference(logits, target, mu, logvar, beta, reduction, recon):
    x = logits.astype(np.float64)
    t = target if target.dtype == np.uint8 else target.astype(np.float64)
    m, v = mu.astype(np.float64), logvar.astype(np.float64)
    rec = (ref.bce_with_logits if recon == "bce" else ref.mse)(x, t, reduction)
    kl = ref.kl_divergence(m, v, reduction)
    grad = np.ones(x.shape[0]) if reduction == "none" else 1.0
    grads = ref.vae_loss_backward(x, t, m, v, beta, reduction, recon, grad)
    return rec + beta * kl, rec, kl, grads


def _grad_tol(dtype):
    # fp32 math, then one rounding to the output dtype; atol covers fp16 subnormals
    return (EPS16 * 2, 2.0**-24) if dtype == np.float16 else (1e-5, 1e-30)


def _dlogits_atol(reduction, B, uint8_target):
    """Absolute slack for dlogits: sigmoid(x) - t and x - t cancel, so the fp32 result is good to a
    few ulp of the operands (<= 1), not of the difference; uint8 targets are read as k * (1/255)
    in fp32, up to 2^-22 from k / 255.  Both scale with the reduction's 1/B."""
    scale = 1.0 / B if reduction == "mean" else 1.0
    return scale * (2.0**-20 + (2.0**-20 if uint8_target else 0.0))


def _check_loss(out, logits, target, mu, logvar, beta, reduction, recon):
    loss, rec, kl, (dx, dmu, dlv) = out
    r_loss, r_rec, r_kl, (r_dx, r_dmu, r_dlv) = _reference(logits, target, mu, logvar, beta, reduction, recon)
    _assert_close("loss", loss, r_loss, 1e-5, 1e-30)
    _assert_close("recon", rec, r_rec, 1e-5, 1e-30)
    _assert_close("kl", kl, r_kl, 1e-5, 1e-30)
    rtol, atol = _grad_tol(logits.dtype)
    dx_atol = atol + _dlogits_atol(reduction, logits.shape[0], target.dtype == np.uint8)
    for name, got, want, a in (
        ("dlogits", dx, r_dx, dx_atol),
        ("dmu", dmu, r_dmu, atol),
        ("dlogvar", dlv, r_dlv, atol),
    ):
        # compare with the reference gradient rounded to the output dtype
        _assert_close(name, got, want.astype(logits.dtype).astype(np.float64), rtol, a)


# ----------------------------------------------------------------------------------------------
# vae_loss
# ----------------------------------------------------------------------------------------------


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("recon", RECONS)
@pytest.mark.parametrize("target_kind", ["float", "uint8"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"B{b}-F{f}-D{d}" for b, f, d in SHAPES])
def test_vae_loss_matches_reference(poison, shape, dtype, target_kind, recon, reduction):
    B, F, D = shape
    logits, target, mu, logvar = _inputs(B, F, D, dtype, target_kind, seed=B * 7919 + F * 31 + D)
    beta = 0.75
    args = [cp.asarray(a) for a in (logits, target, mu, logvar)]
    out = fc.vae_loss_terms(*args, beta=beta, reduction=reduction, recon=recon)
    _check_loss(out, logits, target, mu, logvar, beta, reduction, recon)
    # fused API agrees with the split one
    loss2, grads2 = fc.vae_loss(*args, beta=beta, reduction=reduction, recon=recon)
    assert cp.array_equal(loss2, out[0]) and all(
        cp.array_equal(a, b) for a, b in zip(grads2, out[3], strict=True)
    )


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("recon", RECONS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_vae_loss_extreme_values(poison, recon, reduction):
    logits, target, mu, logvar = _inputs(127, 1025, 129, np.float32, "float", seed=5, extreme=True)
    args = [cp.asarray(a) for a in (logits, target, mu, logvar)]
    out = fc.vae_loss_terms(*args, beta=2.0, reduction=reduction, recon=recon)
    _check_loss(out, logits, target, mu, logvar, 2.0, reduction, recon)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_vae_loss_mixed_dtypes(poison, reduction):
    """fp16 logits with fp32 targets and fp32 latents (each dtype triple has its own kernels)."""
    logits, _, _, _ = _inputs(127, 784, 20, np.float16, "float", seed=11)
    _, target, mu, logvar = _inputs(127, 784, 20, np.float32, "float", seed=12)
    args = [cp.asarray(a) for a in (logits, target, mu, logvar)]
    loss, rec, kl, (dx, dmu, dlv) = fc.vae_loss_terms(*args, reduction=reduction)
    r_loss, r_rec, r_kl, (r_dx, r_dmu, r_dlv) = _reference(logits, target, mu, logvar, 1.0, reduction, "bce")
    _assert_close("loss", loss, r_loss, 1e-5)
    _assert_close(
        "dlogits", dx, r_dx.astype(np.float16), 2 * EPS16, 2.0**-24 + _dlogits_atol(reduction, 127, False)
    )
    _assert_close("dmu", dmu, r_dmu, 1e-5, 1e-30)
    _assert_close("dlogvar", dlv, r_dlv, 1e-5, 1e-30)
    assert dx.dtype == cp.float16 and dmu.dtype == cp.float32


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("offset", [0, 1, 4], ids=["aligned", "misaligned", "aligned-offset"])
def test_vae_loss_sliced_inputs(poison, offset):
    """Row-strided views (features contiguous) go to the kernel without copies, aligned or not."""
    B, F, D = 127, 784, 20
    logits, target, mu, logvar = _inputs(B, F, D, np.float32, "uint8", seed=3)
    wide_x = cp.zeros((B, F + 12), cp.float32)
    wide_x[:, offset : offset + F] = cp.asarray(logits)
    wide_t = cp.zeros((B, F + 32), cp.uint8)
    wide_t[:, offset : offset + F] = cp.asarray(target)
    lat = cp.zeros((B, 3 * D), cp.float32)
    lat[:, :D], lat[:, D : 2 * D] = cp.asarray(mu), cp.asarray(logvar)
    xv, tv, mv, vv = (
        wide_x[:, offset : offset + F],
        wide_t[:, offset : offset + F],
        lat[:, :D],
        lat[:, D : 2 * D],
    )
    out = fc.vae_loss_terms(xv, tv, mv, vv, reduction="mean")
    _check_loss(out, logits, target, mu, logvar, 1.0, "mean", "bce")
    assert out[3][0].shape == (B, F) and out[3][0].flags.c_contiguous


@gpu
@pytest.mark.gpu
def test_vae_loss_deterministic():
    logits, target, mu, logvar = _inputs(1000, 1025, 129, np.float32, "float", seed=9)
    args = [cp.asarray(a) for a in (logits, target, mu, logvar)]
    for reduction in REDUCTIONS:
        a = fc.vae_loss_terms(*args, reduction=reduction)
        b = fc.vae_loss_terms(*args, reduction=reduction)
        for x, y in zip((*a[:3], *a[3]), (*b[:3], *b[3]), strict=True):
            assert x.tobytes() == y.tobytes(), "two identical runs differ"


@gpu
@pytest.mark.gpu
def test_vae_loss_need_grad_false_and_thin_wrappers(poison):
    logits, target, mu, logvar = _inputs(127, 784, 20, np.float32, "float", seed=21)
    args = [cp.asarray(a) for a in (logits, target, mu, logvar)]
    loss, rec, kl, grads = fc.vae_loss_terms(*args, need_grad=False)
    assert grads == (None, None, None)
    r_loss, r_rec, r_kl, _ = _reference(logits, target, mu, logvar, 1.0, "sum", "bce")
    _assert_close("loss", loss, r_loss, 1e-5)
    x64, t64 = logits.astype(np.float64), target.astype(np.float64)
    _assert_close(
        "bce", fc.bce_with_logits(args[0], args[1], "mean"), ref.bce_with_logits(x64, t64, "mean"), 1e-5
    )
    _assert_close("mse", fc.mse(args[0], args[1], "none"), ref.mse(x64, t64, "none"), 1e-5)
    _assert_close("kl", fc.kl_divergence(args[2], args[3], "sum"), r_kl, 1e-5)


@gpu
@pytest.mark.gpu
def test_vae_loss_validation():
    logits, target, mu, logvar = (cp.asarray(a) for a in _inputs(4, 10, 3, np.float32, "float"))
    with pytest.raises(ValueError, match="target"):
        fc.vae_loss(logits, target[:3], mu, logvar)
    with pytest.raises(ValueError, match="target"):
        fc.vae_loss(logits, target[:, :9], mu, logvar)
    with pytest.raises(ValueError, match="mu"):
        fc.vae_loss(logits, target, mu[:2], logvar[:2])
    with pytest.raises(ValueError, match="logvar"):
        fc.vae_loss(logits, target, mu, logvar[:, :2])
    with pytest.raises(TypeError, match="logvar"):
        fc.vae_loss(logits, target, mu, logvar.astype(cp.float16))
    with pytest.raises(TypeError, match="logits"):
        fc.vae_loss(logits.astype(cp.float64), target, mu, logvar)
    with pytest.raises(ValueError, match="reduction"):
        fc.vae_loss(logits, target, mu, logvar, reduction="avg")
    with pytest.raises(ValueError, match="recon"):
        fc.vae_loss(logits, target, mu, logvar, recon="l1")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        fc.vae_loss(logits, target + 1.0, mu, logvar, validate=True)
    fc.vae_loss(logits, target + 1.0, mu, logvar, recon="mse", validate=True)  # MSE: any target


# ----------------------------------------------------------------------------------------------
# reparameterize
# ----------------------------------------------------------------------------------------------

LATENT_SHAPES = [(1, 1), (3, 2), (127, 20), (1000, 129), (7, 3, 5)]
SEEDS = [0, 1234, 2**32 + 17, 2**64 - 1]


def _ulps(got, want):
    ulp = np.spacing(np.abs(want).astype(np.float32)).astype(np.float64)
    return np.abs(_f64(got) - want) / ulp


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", LATENT_SHAPES, ids=str)
def test_eps_matches_reference_normals(poison, shape, seed):
    """mu = 0, logvar = 0 gives z = eps exactly: Triton's tl.randn(seed, flat index) within 4 ulp.

    (The uniforms are bit-exact on the host harness, tests/test_cuda_sources.py, from the same
    header; on the device only logf can round differently.)
    """
    zeros = cp.zeros(shape, cp.float32)
    z = fc.reparameterize(zeros, zeros, seed=seed)
    want = ref.randn(seed, np.arange(int(np.prod(shape)))).reshape(shape)
    assert _ulps(z, want).max() <= 4.0


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", LATENT_SHAPES, ids=str)
def test_reparameterize_matches_reference(poison, shape, dtype):
    gen = np.random.default_rng(sum(shape))
    mu = gen.normal(0, 2, shape).astype(dtype)
    logvar = gen.normal(0, 2, shape).astype(dtype)
    logvar.reshape(-1)[::7] = 30.0 if dtype == np.float32 else 15.0
    logvar.reshape(-1)[1::7] = -30.0
    dz = gen.normal(0, 1, shape).astype(dtype)
    seed = 2**40 + 3
    m64, v64, g64 = mu.astype(np.float64), logvar.astype(np.float64), dz.astype(np.float64)
    eps = ref.randn(seed, np.arange(mu.size)).reshape(shape)
    std = np.exp(0.5 * v64)
    u = 2.0**-20 if dtype == np.float32 else 2 * EPS16  # ~16 fp32 ulp: eps, exp, 2 roundings
    tiny = 1e-30 if dtype == np.float32 else 2.0**-24  # fp16 subnormal spacing

    z = fc.reparameterize(cp.asarray(mu), cp.asarray(logvar), seed=seed)
    assert z.dtype == mu.dtype and z.shape == mu.shape
    _assert_close(
        "z", z, ref.reparameterize(m64, v64, seed), 0.0, u * (np.abs(m64) + std * np.abs(eps)) + tiny
    )

    dmu, dlogvar = fc.reparameterize_backward(cp.asarray(dz), cp.asarray(logvar), seed=seed)
    r_dmu, r_dlv = ref.reparameterize_backward(g64, v64, seed)
    _assert_close("dmu", dmu, r_dmu, 0.0)
    _assert_close("dlogvar", dlogvar, r_dlv, 2 * u, tiny)


@gpu
@pytest.mark.gpu
def test_reparameterize_sliced_and_deterministic(poison):
    gen = np.random.default_rng(5)
    lat = cp.asarray(gen.normal(0, 1, (1000, 2 * 129 + 3)).astype(np.float32))
    mu, logvar = lat[:, 1:130], lat[:, 130:259]  # row-strided, misaligned views
    z1 = fc.reparameterize(mu, logvar, seed=77)
    z2 = fc.reparameterize(cp.ascontiguousarray(mu), cp.ascontiguousarray(logvar), seed=77)
    assert z1.tobytes() == z2.tobytes() == fc.reparameterize(mu, logvar, seed=77).tobytes()
    assert z1.tobytes() != fc.reparameterize(mu, logvar, seed=78).tobytes()
    g1 = fc.reparameterize_backward(mu, logvar, seed=77)[1]
    g2 = fc.reparameterize_backward(cp.ascontiguousarray(mu), cp.ascontiguousarray(logvar), seed=77)[1]
    assert g1.tobytes() == g2.tobytes()


@gpu
@pytest.mark.gpu
def test_reparameterize_validation():
    a = cp.zeros((4, 3), cp.float32)
    with pytest.raises(ValueError, match="logvar"):
        fc.reparameterize(a, a[:, :2], seed=0)
    with pytest.raises(TypeError, match="logvar"):
        fc.reparameterize(a, a.astype(cp.float16), seed=0)
    with pytest.raises(ValueError, match="seed"):
        fc.reparameterize(a, a, seed=-1)
    with pytest.raises(ValueError, match="seed"):
        fc.reparameterize(a, a, seed=2**64)
    with pytest.raises(TypeError, match="seed"):
        fc.reparameterize(a, a, seed=1.5)


# ----------------------------------------------------------------------------------------------
# torch through DLPack, and the torch_* glue
# ----------------------------------------------------------------------------------------------


@gpu
@needs_torch_cuda
@pytest.mark.gpu
def test_torch_tensors_through_dlpack(poison):
    logits, target, mu, logvar = _inputs(127, 784, 20, np.float32, "uint8", seed=8)
    t_args = [torch.from_numpy(a).cuda() for a in (logits, target, mu, logvar)]
    c_args = [cp.asarray(a) for a in (logits, target, mu, logvar)]
    t_out = fc.vae_loss_terms(*t_args, reduction="mean")
    c_out = fc.vae_loss_terms(*c_args, reduction="mean")
    assert isinstance(t_out[0], torch.Tensor) and t_out[3][0].is_cuda
    for a, b in zip((*t_out[:3], *t_out[3]), (*c_out[:3], *c_out[3]), strict=True):
        assert a.cpu().numpy().tobytes() == cp.asnumpy(b).tobytes()
    z = fc.reparameterize(t_args[2], t_args[3], seed=5)
    assert isinstance(z, torch.Tensor)
    assert z.cpu().numpy().tobytes() == cp.asnumpy(fc.reparameterize(c_args[2], c_args[3], seed=5)).tobytes()


@gpu
@needs_torch_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("tdtype", ["float32", "float16", "bfloat16"])
def test_torch_glue(poison, tdtype, reduction):
    dt = getattr(torch, tdtype)
    B, F, D = 127, 1025, 20
    logits, target, mu, logvar = _inputs(B, F, D, np.float32, "float", seed=13)
    # round the inputs to the tested dtype first, so the reference sees the same values
    tl, tt, tm, tv = (torch.from_numpy(a).to(dt).cuda() for a in (logits, target, mu, logvar))
    n_l, n_t, n_m, n_v = (a.float().cpu().numpy() for a in (tl, tt, tm, tv))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # the glue must launch on torch's current stream
        loss, rec, kl, dx, dmu, dlv = fc.torch_vae_loss(tl, tt, tm, tv, 0.5, reduction, "bce", True)
    stream.synchronize()
    r_loss, r_rec, r_kl, (r_dx, r_dmu, r_dlv) = _reference(n_l, n_t, n_m, n_v, 0.5, reduction, "bce")
    _assert_close("loss", loss, r_loss, 1e-5)
    _assert_close("recon", rec, r_rec, 1e-5)
    _assert_close("kl", kl, r_kl, 1e-5)
    assert dx.dtype == dt and dx.shape == tl.shape and dmu.dtype == dt
    rtol = {"float32": 1e-5, "float16": 2 * EPS16, "bfloat16": 2.0**-7}[tdtype]

    def rounded(a):
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(dt).float().numpy()

    dx_atol = 2.0**-24 + _dlogits_atol(reduction, B, False)
    for name, got, want, atol in (
        ("dlogits", dx, r_dx, dx_atol),
        ("dmu", dmu, r_dmu, 2.0**-24),
        ("dlogvar", dlv, r_dlv, 2.0**-24),
    ):
        _assert_close(name, got, rounded(want), rtol, atol)

    z = fc.torch_reparameterize(tm, tv, seed=99)
    eps = ref.randn(99, np.arange(B * D)).reshape(B, D)
    z_ref = n_m + np.exp(0.5 * n_v.astype(np.float64)) * eps
    _assert_close(
        "z", z, rounded(z_ref), 0.0, 4 * rtol * (np.abs(n_m) + np.exp(0.5 * n_v) * np.abs(eps)) + 1e-30
    )
    dlogvar = fc.torch_reparameterize_backward(tm, tv, seed=99)
    _assert_close("dlogvar", dlogvar, rounded(0.5 * n_m * np.exp(0.5 * n_v) * eps), 4 * rtol, 1e-30)


# ----------------------------------------------------------------------------------------------
# More than 2^31 elements (int64 indexing)
# ----------------------------------------------------------------------------------------------


@gpu
@pytest.mark.gpu
@pytest.mark.slow
def test_more_than_2_31_elements():
    free, _ = cp.cuda.runtime.memGetInfo()
    B, F, D, R = 2**21 + 3, 1025, 2, 61  # B * F > 2^31; rows repeat with period R
    if free < 16 * 2**30:
        pytest.skip("needs about 16 GiB of free GPU memory")
    logits, target, mu, logvar = _inputs(R, F, D, np.float16, "uint8", seed=17)
    rows = cp.arange(B) % R
    x, t = cp.asarray(logits)[rows], cp.asarray(target)[rows]
    m, v = cp.asarray(mu)[rows], cp.asarray(logvar)[rows]
    assert x.size > 2**31
    loss, rec, kl, (dx, _, _) = fc.vae_loss_terms(x, t, m, v, reduction="none")
    r_loss, _, _, (r_dx, _, _) = _reference(logits, target, mu, logvar, 1.0, "none", "bce")
    idx = np.r_[0:R, B - 2 * R : B]  # first rows and rows past 2^31 elements
    _assert_close("loss rows", cp.asnumpy(loss)[idx], r_loss[idx % R], 1e-5)
    _assert_close(
        "dlogits rows",
        cp.asnumpy(dx[-R:]),
        r_dx[np.arange(B - R, B) % R].astype(np.float16),
        2 * EPS16,
        2.0**-24 + _dlogits_atol("none", B, True),
    )
    del x, t, dx
    total = fc.vae_loss(cp.asarray(logits)[rows], cp.asarray(target)[rows], m, v, need_grad=False)[0]
    _assert_close("sum", total, r_loss[np.arange(B) % R].sum(), 1e-5)

    # reparameterize: eps at flat offsets beyond 2^31 (and 2^32 / F rows in)
    n = 2**31 + 2**20 + 5
    zeros = cp.zeros(n, cp.float16)
    z = fc.reparameterize(zeros, zeros, seed=2**33 + 1)
    offs = np.r_[0:1000, n - 1000 : n]
    want = ref.randn(2**33 + 1, offs).astype(np.float16).astype(np.float64)
    _assert_close("eps", z[cp.asarray(offs)], want, 2 * EPS16, 2.0**-24)
