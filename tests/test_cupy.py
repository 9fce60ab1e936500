"""The CuPy backend against fastvae.reference: fastvae.cupy (CuPy arrays) and
fastvae.kernels.cupy_launch (the fastvae.backend.Backend contract on torch CUDA tensors).

The GPU tests skip with a reason when CuPy is not installed or no CUDA device is visible.  The tests
at the top run everywhere: import without CuPy, layout helpers, and the torch backend's host side
with the launches stubbed (what each launch receives; the random key is never read on the host).

On a GPU: vae_loss and reparameterize on fresh random inputs at awkward sizes, fp32 / fp16 (and
bf16 through torch when torch has CUDA), float and uint8 targets, extreme values, sliced inputs,
outputs poisoned with NaN before each run (every output element must be written), determinism
(two runs bit-identical), eps equal to the reference normals at offsets, torch tensors through
DLPack, the backend contract (fused_loss, scale_grads_, reparameterize with an int key or a device
key tensor) on a side stream and on a non-current device, and (marked slow) more than 2^31 elements.
"""

from __future__ import annotations

import re
import sys

import numpy as np
import pytest
from conftest import NoHostRead
from fastvae.kernels import cupy_launch as cl

import fastvae.cupy as fc
from fastvae import reference as ref
from fastvae.backend import RECONS as RECON_IDS
from fastvae.backend import REDUCTIONS as REDUCTION_IDS
from fastvae.backend import LossProblem

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
    assert cl._row_layout((4, 3, 5), (15, 5, 1)) == (4, 15, 15)
    assert cl._row_layout((4, 3, 5), (40, 5, 1)) == (4, 15, 40)  # sliced rows: no copy
    assert cl._row_layout((4, 3, 5), (15, 1, 3)) is None  # features not contiguous: copy
    assert cl._row_layout((4, 1, 5), (10, 99, 1)) == (4, 5, 10)  # size-1 dims have any stride
    assert cl._row_layout((4, 7), (-7, 1)) is None
    assert cl._row_layout((1, 7), (123, 1)) == (1, 7, 7)
    assert cl._flat_layout((4, 3, 5), (15, 5, 1)) == (1, 60, 60)
    assert cl._flat_layout((4, 15), (16, 1)) == (4, 15, 16)
    assert cl._flat_layout((9,), (1,)) == (1, 9, 9)


def test_group_size_heuristic():
    # threads per row G = 32 << log2, about two vector chunks per thread, 32 <= G <= 256
    assert [cl._group_log2(c) for c in (0, 1, 64, 65, 128, 196, 256, 257, 10_000)] == [
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
        fc._ctype("logits", "float64", cl.FLOAT_CTYPES)


def test_kernel_source_inlines_headers():
    src = fc.kernel_source("vae_loss.cu")
    assert "fv_philox4x32_10" in src and "fv_pack" in src and '#include "' not in src
    with pytest.raises(FileNotFoundError):
        fc.kernel_source("no_such_file.cu")


def test_kernel_sources_for_every_backend_kernel():
    assert "fastvae_scale_grads" in cl.kernel_source("scale_grads.cu")
    # the kernels share fastvae.backend's numbering of the recon kinds
    src = cl.kernel_source("vae_loss.cu")
    for name in ("none", "bce", "mse"):  # the kinds the CUDA C implements
        assert f"FV_RECON_{name.upper()} = {RECON_IDS[name]}" in src


@pytest.mark.parametrize("recon", ["gaussian", "continuous_bernoulli"])
def test_likelihoods_without_cuda_c_are_refused(recon):
    """The CUDA C kernels have BCE and MSE only: the other likelihoods get one clear error, not a number."""
    p = _problem(4, 6, 2, recon)
    with pytest.raises(NotImplementedError, match=f"recon={recon!r} is not implemented in the cupy backend"):
        cl.fused_loss(p, torch.zeros(4, 6), torch.zeros(4, 6), torch.zeros(4, 2), torch.zeros(4, 2))


# ----------------------------------------------------------------------------------------------
# The torch backend's host side, launches stubbed (no GPU, no CuPy): what each kernel receives
# ----------------------------------------------------------------------------------------------


class _NoHostRead(NoHostRead):
    """The suite's unreadable key, which must not even be viewed as a NumPy array: the CuPy launcher
    passes the key's device pointer only."""

    numpy = NoHostRead._refuse


class _NoDevice:
    """Stands in for cupy_launch._OnDevice on CPU tensors: records the device, yields a fake stream."""

    entered: list = []

    def __init__(self, index):
        self.entered.append(("device", index))

    def __enter__(self):
        return "stream"

    def __exit__(self, *exc):
        return None


@pytest.fixture
def launches(monkeypatch):
    """Runs the backend's host code on CPU tensors: device index -1 for all, launches recorded."""
    calls = []
    monkeypatch.setattr(_NoDevice, "entered", calls)
    monkeypatch.setattr(cl, "_OnDevice", _NoDevice)
    monkeypatch.setattr(cl, "_device_index", lambda name, t: t.get_device())
    for name in ("launch_vae_loss", "launch_reparam", "launch_scale"):
        monkeypatch.setattr(cl, name, lambda *args, _name=name: calls.append((_name, args)))
    return calls


def _problem(B, F, D, recon="bce", reduction="sum", need_grad=True, beta=0.5):
    red = REDUCTION_IDS[reduction]
    return LossProblem(
        B, F, D, RECON_IDS[recon] if F else 0, red, beta, 1.0 / B if reduction == "mean" else 1.0, need_grad,
        torch.float32,
    )  # fmt: skip


@pytest.mark.skipif(torch is None, reason="needs torch")
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_backend_fused_loss_host_side(launches, reduction):
    B, F, D = 5, 12, 3
    wide = torch.randn(B, F + 4)
    logits, target = wide[:, 2 : 2 + F], torch.randint(0, 256, (B, F), dtype=torch.uint8)
    lat = torch.randn(B, 2 * D, dtype=torch.float16)
    mu, logvar = lat[:, :D], lat[:, D:]
    loss, rec, kl, dx, dmu, dlv, _ = cl.fused_loss(
        _problem(B, F, D, "mse", reduction), logits, target, mu, logvar
    )
    ((name, args),) = [c for c in launches if c[0] != "device"]
    _, stream, x, t, m, v, grads, terms_ptr, recon, red, beta, grad_scale, need_grad = args
    assert name == "launch_vae_loss" and stream == "stream" and ("device", -1) in launches
    # row-strided views reach the kernel without copies
    assert x == cl._Rows(logits.data_ptr(), B, F, F + 4, "float") and t.ctype == "unsigned char"
    assert m == cl._Rows(mu.data_ptr(), B, D, 2 * D, "fv_half") and v.ptr == logvar.data_ptr()
    assert (recon, red, beta, need_grad) == (RECON_IDS["mse"], REDUCTION_IDS[reduction], 0.5, True)
    assert grad_scale == (1.0 / B if reduction == "mean" else 1.0)
    assert grads == (dx.data_ptr(), dmu.data_ptr(), dlv.data_ptr())
    assert dx.shape == (B, F) and dx.dtype == torch.float32 and dx.is_contiguous()
    assert dmu.shape == dlv.shape == (B, D) and dmu.dtype == dlv.dtype == torch.float16
    # the terms: one float32 buffer [recon_b, kl_b, loss_b] or [recon_b, kl_b, loss, recon, kl]
    assert rec.dtype == kl.dtype == loss.dtype == torch.float32
    if reduction == "none":
        assert [a.data_ptr() - terms_ptr for a in (rec, kl, loss)] == [0, 4 * B, 8 * B]
        assert rec.shape == kl.shape == loss.shape == (B,)
    else:
        assert [a.data_ptr() - terms_ptr for a in (loss, rec, kl)] == [8 * B, 8 * B + 4, 8 * B + 8]
        assert rec.shape == kl.shape == loss.shape == ()


@pytest.mark.skipif(torch is None, reason="needs torch")
def test_backend_fused_loss_one_term_host_side(launches):
    B, D = 4, 6
    mu, logvar = torch.randn(B, D, dtype=torch.bfloat16), torch.randn(B, D, dtype=torch.bfloat16)
    out = cl.fused_loss(_problem(B, 0, D), None, None, mu, logvar)
    args = launches[-1][1]
    assert args[2] == args[3] == cl._Rows(0, B, 0, 0, "fv_bf16")  # KL only: F = 0, nothing read
    assert args[8] == 0 and out[3].numel() == 0 and out[4].shape == (B, D)
    logits, target = torch.randn(B, 7), torch.rand(B, 7)
    out = cl.fused_loss(_problem(B, 7, 0, need_grad=False), logits, target, None, None)
    args = launches[-1][1]
    assert args[4] == args[5] == cl._Rows(0, B, 0, 0, "float")  # no KL term: D = 0
    assert args[6] == (0, 0, 0) and all(g.numel() == 0 for g in out[3:])


@pytest.mark.skipif(torch is None, reason="needs torch")
def test_backend_fused_loss_copies_strided_features_only(launches):
    B, F, D = 3, 7, 2
    logits, target, mu = torch.randn(B, 2 * F)[:, ::2], torch.rand(B, F), torch.randn(B, D)
    cl.fused_loss(_problem(B, F, D), logits, target, mu, mu)
    x, t = launches[-1][1][2:4]
    assert x.ptr != logits.data_ptr() and (x.rows, x.cols, x.stride) == (B, F, F)  # a contiguous copy
    assert t.ptr == target.data_ptr()  # the others as they are


@pytest.mark.skipif(torch is None, reason="needs torch")
def test_backend_fused_loss_rejects_what_the_kernels_cannot_run(launches):
    B, F, D = 2, 3, 1
    x, t, m = torch.randn(B, F), torch.rand(B, F), torch.randn(B, D)
    with pytest.raises(TypeError, match="logits: dtype torch.float64"):
        cl.fused_loss(_problem(B, F, D), x.double(), t, m, m)
    with pytest.raises(TypeError, match="logvar"):
        cl.fused_loss(_problem(B, F, D), x, t, m, m.half())
    with pytest.raises(TypeError, match="acc"):
        cl.fused_loss(_problem(B, F, D)._replace(acc=torch.float64), x, t, m, m)
    with pytest.raises(ValueError, match=r"target: expected a \[B, F\] view"):
        cl.fused_loss(_problem(B, F, D), x, t.reshape(B, F, 1), m, m)
    assert not [c for c in launches if c[0] != "device"]


@pytest.mark.skipif(torch is None, reason="needs torch")
@pytest.mark.parametrize("grad_kind", ["scalar", "rows", "broadcast", "float64"])
def test_backend_scale_grads_host_side(launches, grad_kind):
    B, F, D = 6, 10, 4
    dx, dmu, dlv = torch.randn(B, F, dtype=torch.float16), torch.randn(B, D), torch.randn(B, D)
    grad = {
        "scalar": torch.tensor(2.0),
        "rows": torch.randn(2 * B)[::2],
        "broadcast": torch.ones(()).expand(B),  # what loss.sum().backward() passes for reduction none
        "float64": torch.tensor(3.0, dtype=torch.float64),
    }[grad_kind]
    cl.scale_grads_(grad, dx, dmu, dlv)
    ((name, args),) = [c for c in launches if c[0] != "device"]
    _, stream, g_ptr, g_stride, B_, x, dmu_ptr, dlv_ptr, D_, tm = args
    assert name == "launch_scale" and (B_, D_, tm) == (B, D, "float")
    assert x == cl._Rows(dx.data_ptr(), B, F, F, "fv_half") and (dmu_ptr, dlv_ptr) == (
        dmu.data_ptr(),
        dlv.data_ptr(),
    )
    assert g_stride == {"scalar": 0, "rows": 2, "broadcast": 0, "float64": 0}[grad_kind]
    assert (g_ptr == grad.data_ptr()) == (grad_kind != "float64")  # the kernel reads a float32 factor


@pytest.mark.skipif(torch is None, reason="needs torch")
def test_backend_scale_grads_skips_and_checks(launches):
    B, D = 3, 5
    empty = torch.empty(0)
    cl.scale_grads_(torch.tensor(2.0), empty, empty, empty)  # nothing to scale: no launch
    assert launches == []
    dmu = torch.randn(B, D, dtype=torch.bfloat16)
    cl.scale_grads_(torch.tensor(2.0), empty, dmu, empty)  # only dmu present
    args = launches[-1][1]
    assert args[5] is None and args[6:] == (dmu.data_ptr(), 0, D, "fv_bf16")
    with pytest.raises(ValueError, match="grad: expected a 0-d tensor or shape"):
        cl.scale_grads_(torch.ones(B + 1), empty, dmu, empty)
    with pytest.raises(ValueError, match="dmu: a gradient scaled in place must be contiguous"):
        cl.scale_grads_(torch.tensor(2.0), empty, torch.randn(D, B).t(), empty)


@pytest.mark.skipif(torch is None, reason="needs torch")
@pytest.mark.parametrize("backward", [False, True])
def test_backend_reparameterize_key_stays_on_device(launches, backward):
    """A key tensor goes to the kernel as a pointer: its value is never read on the host."""
    mu, logvar = torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    key = torch.tensor([1234], dtype=torch.int64).as_subclass(_NoHostRead)
    fn = cl.reparameterize_backward if backward else cl.reparameterize
    out = fn(mu, logvar, key, 2**32 - 7)
    ((name, args),) = [c for c in launches if c[0] != "device"]
    _, stream, bwd, a, lv, o, key_ptr, key_val, offset = args
    assert name == "launch_reparam" and bwd is backward and stream == "stream"
    assert (key_ptr, key_val, offset) == (key.data_ptr(), 0, 2**32 - 7)
    assert a == cl._Rows(mu.data_ptr(), 1, 60, 60, "float") and lv.ptr == logvar.data_ptr()
    assert o.ptr == out.data_ptr() and out.shape == mu.shape and out.is_contiguous()
    fn(mu, logvar, 2**64 - 1, 0)  # an explicit seed goes by value
    assert launches[-1][1][6:] == (0, 2**64 - 1, 0)


@pytest.mark.skipif(torch is None, reason="needs torch")
def test_backend_reparameterize_validation(launches):
    mu = torch.randn(4, 3)
    for key, exc, match in (
        (torch.tensor([1, 2]), ValueError, "key: expected a 1-element int64"),
        (torch.tensor([1], dtype=torch.int32), ValueError, "key: expected a 1-element int64"),
        (True, TypeError, "key"),
        (1.5, TypeError, "key"),
        (-1, ValueError, "key"),
        (2**64, ValueError, "key"),
    ):
        with pytest.raises(exc, match=match):
            cl.reparameterize(mu, mu, key, 0)
    with pytest.raises(ValueError, match="offset"):
        cl.reparameterize(mu, mu, 1, -1)
    with pytest.raises(ValueError, match="logvar"):
        cl.reparameterize(mu, mu[:, :2].contiguous(), 1, 0)
    with pytest.raises(TypeError, match="mu: dtype torch.float64"):
        cl.reparameterize(mu.double(), mu.double(), 1, 0)
    empty = cl.reparameterize(mu[:0], mu[:0], 1, 0)  # nothing to draw: no launch
    assert empty.shape == (0, 3) and not [c for c in launches if c[0] != "device"]


def test_device_guard_switches_and_restores(monkeypatch):
    """_OnDevice makes the tensors' device current only for the launch and hands out a cached CuPy
    handle of torch's current stream of that device (fake CuPy runtime: no GPU needed)."""
    from types import SimpleNamespace

    log, current = [], [0]

    def set_device(i):
        log.append(("set", i))
        current[0] = i

    made = []

    def from_external(obj):
        made.append(obj.__cuda_stream__())
        return SimpleNamespace(ptr=obj.__cuda_stream__()[1])

    runtime = SimpleNamespace(getDevice=lambda: current[0], setDevice=set_device)
    fake = SimpleNamespace(
        cuda=SimpleNamespace(runtime=runtime, Stream=SimpleNamespace(from_external=from_external))
    )
    monkeypatch.setattr(cl, "_cupy", lambda: fake)
    monkeypatch.setattr(cl, "_raw_stream_fn", lambda: lambda index: 1000 + index)
    monkeypatch.setattr(cl, "_STREAMS", {})
    with cl._OnDevice(1) as stream:
        assert current[0] == 1 and stream.ptr == 1001  # torch's current stream of device 1
    assert current[0] == 0 and log == [("set", 1), ("set", 0)]
    log.clear()
    for _ in range(3):
        with cl._OnDevice(0) as stream:
            assert stream.ptr == 1000
    assert log == [] and made == [(0, 1001), (0, 1000)]  # no device switch; one handle per stream
    with pytest.raises(RuntimeError), cl._OnDevice(1):
        raise RuntimeError("a failed launch")
    assert current[0] == 0  # restored on errors too


def _kernel_params(source: str) -> dict[str, list[str]]:
    """{kernel name: its parameters' C types} from the definitions in ``kernels/cuda/<source>``."""
    text = re.sub(r"//[^\n]*", "", cl.kernel_source(source))
    params = {}
    for name, plist in re.findall(r"\b(fastvae_\w+)\s*\(([^)]*)\)\s*\{", text):
        params[name] = [" ".join(p.split()[:-1]) for p in plist.split(",")]
    return params


# The NumPy scalar each C parameter type must be passed as (CuPy passes it by its bytes).
_C_TO_NUMPY = {"fv_i64": np.int64, "fv_u64": np.uint64, "float": np.float32, "int": np.int32}


@pytest.mark.skipif(torch is None, reason="needs torch")
def test_launch_arguments_match_the_kernel_signatures(monkeypatch):
    """Every launch passes one NumPy scalar of the right width and kind per kernel parameter
    (pointers as uint64), so a reordered or retyped parameter fails here, without a GPU."""
    sigs = {**_kernel_params("vae_loss.cu"), **_kernel_params("reparameterize.cu")}
    sigs.update(_kernel_params("scale_grads.cu"))
    calls = []

    class Kernel:
        def __init__(self, name):
            self.name = name

        def __call__(self, grid, block, args, stream=None):
            calls.append((self.name, grid, block, args, stream))

    rows, fin = Kernel("fastvae_vae_loss_rows"), Kernel("fastvae_vae_loss_finalize")
    loss_kernels = {
        cl.loss_kernel_name("float", "float", "float", r, g): rows for r in (1, 2) for g in (True, False)
    }
    monkeypatch.setattr(cl, "_loss_kernels", lambda *a: {**loss_kernels, "fastvae_vae_loss_finalize": fin})
    fwd, bwd = Kernel("fastvae_reparameterize_fwd"), Kernel("fastvae_reparameterize_bwd")
    monkeypatch.setattr(cl, "_reparam_kernels", lambda *a: (fwd, bwd))
    monkeypatch.setattr(cl, "_scale_kernel", lambda *a: Kernel("fastvae_scale_grads"))
    monkeypatch.setattr(cl, "_device_index", lambda name, t: t.get_device())
    monkeypatch.setattr(cl, "_OnDevice", _NoDevice)
    monkeypatch.setattr(_NoDevice, "entered", [])
    B, F, D = 3, 8, 2
    x, t, m = torch.randn(B, F), torch.rand(B, F), torch.randn(B, D)
    for reduction in ("sum", "none"):
        out = cl.fused_loss(_problem(B, F, D, "bce", reduction), x, t, m, m)
    cl.scale_grads_(torch.tensor(2.0), out[3], out[4], out[5])
    cl.reparameterize(m, m, torch.tensor([3]), 5)
    cl.reparameterize_backward(m, m, 3, 0)
    launched = [c[0] for c in calls]
    assert launched == [
        "fastvae_vae_loss_rows", "fastvae_vae_loss_finalize", "fastvae_vae_loss_rows",
        "fastvae_scale_grads", "fastvae_reparameterize_fwd", "fastvae_reparameterize_bwd",
    ]  # fmt: skip
    for name, grid, block, args, stream in calls:
        want = [np.uint64 if "*" in c else _C_TO_NUMPY[c.replace("const", "").strip()] for c in sigs[name]]
        assert [type(a) for a in args] == want, name
        assert stream == "stream" and all(isinstance(n, int) and n >= 1 for n in (*grid, *block)), name


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
@pytest.mark.parametrize("offset", [0, 2**32 - 50], ids=["offset0", "offset-crossing-2^32"])
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", LATENT_SHAPES, ids=str)
def test_eps_matches_reference_normals(poison, shape, seed, offset):
    """mu = 0, logvar = 0 gives z = eps exactly: randn4x(seed, n >> 2)[n & 3], n = offset + flat
    index, within 4 ulp.

    (The uniforms are bit-exact on the host harness, tests/test_cuda_sources.py, from the same
    header; on the device only logf can round differently.)
    """
    zeros = cp.zeros(shape, cp.float32)
    z = fc.reparameterize(zeros, zeros, seed=seed, offset=offset)
    want = ref.randn(seed, offset + np.arange(int(np.prod(shape)))).reshape(shape)
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
    with pytest.raises(ValueError, match="offset"):
        fc.reparameterize(a, a, seed=0, offset=-1)


# ----------------------------------------------------------------------------------------------
# torch through DLPack
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


# ----------------------------------------------------------------------------------------------
# The backend contract on torch CUDA tensors (fastvae.kernels.cupy_launch)
# ----------------------------------------------------------------------------------------------


@gpu
@needs_torch_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("tdtype", ["float32", "float16", "bfloat16"])
def test_backend_fused_loss(poison, tdtype, reduction):
    dt = getattr(torch, tdtype)
    B, F, D = 127, 1025, 20
    logits, target, mu, logvar = _inputs(B, F, D, np.float32, "float", seed=13)
    # round the inputs to the tested dtype first, so the reference sees the same values
    tl, tt, tm, tv = (torch.from_numpy(a).to(dt).cuda() for a in (logits, target, mu, logvar))
    n_l, n_t, n_m, n_v = (a.float().cpu().numpy() for a in (tl, tt, tm, tv))
    lat = torch.cat([tm, tv], 1)  # mu / logvar as row-strided views of one [B, 2D] tensor
    p = _problem(B, F, D, "bce", reduction)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # the backend must launch on torch's current stream
        loss, rec, kl, dx, dmu, dlv, _ = cl.fused_loss(p, tl, tt, lat[:, :D], lat[:, D:])
    stream.synchronize()
    r_loss, r_rec, r_kl, (r_dx, r_dmu, r_dlv) = _reference(n_l, n_t, n_m, n_v, 0.5, reduction, "bce")
    _assert_close("loss", loss, r_loss, 1e-5)
    _assert_close("recon", rec, r_rec, 1e-5)
    _assert_close("kl", kl, r_kl, 1e-5)
    assert dx.dtype == dt and dx.shape == tl.shape and dmu.dtype == dt and dlv.shape == (B, D)
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
    # deterministic: a second call is bit-identical
    again = cl.fused_loss(p, tl, tt, lat[:, :D], lat[:, D:])
    for a, b in zip((loss, rec, kl, dx, dmu, dlv), again, strict=True):
        assert torch.equal(a, b)


@gpu
@needs_torch_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("grad_kind", ["one", "scalar", "rows", "broadcast"])
@pytest.mark.parametrize("tdtype", ["float32", "float16"])
def test_backend_scale_grads(grad_kind, tdtype):
    dt = getattr(torch, tdtype)
    B, F, D = 129, 784, 20
    gen = torch.Generator(device="cuda").manual_seed(3)
    dx = torch.randn(B, F, device="cuda", generator=gen).to(dt)
    dmu, dlv = (torch.randn(B, D, device="cuda", generator=gen) for _ in range(2))
    factors = 1.0 - 1.75 * (torch.arange(B, device="cuda") % 3 != 0).float()  # 1 (untouched) or -0.75
    grad = {
        "one": torch.ones((), device="cuda"),  # what loss.backward() passes: nothing may move
        "scalar": torch.full((), 65536.0, device="cuda"),  # a loss scaler
        "rows": factors,
        "broadcast": torch.full((), 0.5, device="cuda").expand(B),
    }[grad_kind]
    s = grad.float().expand(B)[:, None]
    want = [(g.float() * s).to(g.dtype) for g in (dx, dmu, dlv)]
    cl.scale_grads_(grad, dx, dmu, dlv)
    for got, w in zip((dx, dmu, dlv), want, strict=True):
        assert torch.equal(got, w)  # one fp32 product rounded once: torch's own result, bit for bit
    cl.scale_grads_(grad, dx, torch.empty(0, device="cuda"), torch.empty(0, device="cuda"))  # dlogits alone
    assert torch.equal(dx, (want[0].float() * s).to(dt))


@gpu
@needs_torch_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("offset", [0, 2**32 - 100])
def test_backend_reparameterize_key_tensor_and_offset(poison, offset):
    B, D = 129, 20
    gen = np.random.default_rng(4)
    mu, logvar = (torch.from_numpy(gen.normal(0, 1, (B, D)).astype(np.float32)).cuda() for _ in range(2))
    seed = 2**63 + 11  # an int64 key tensor holds its bits (negative)
    key = torch.tensor([seed - 2**64], dtype=torch.int64, device="cuda")
    z = cl.reparameterize(mu, logvar, key, offset)
    assert torch.equal(z, cl.reparameterize(mu, logvar, seed, offset))
    eps = ref.randn(seed, offset + np.arange(B * D)).reshape(B, D)
    m64, v64 = mu.double().cpu().numpy(), logvar.double().cpu().numpy()
    std = np.exp(0.5 * v64)
    _assert_close("z", z, m64 + std * eps, 0.0, 2.0**-20 * (np.abs(m64) + std * np.abs(eps)) + 1e-30)
    dz = torch.ones_like(mu)
    dlv = cl.reparameterize_backward(dz, logvar, key, offset)
    _assert_close("dlogvar", dlv, 0.5 * std * eps, 2.0**-19, 1e-30)


@gpu
@needs_torch_cuda
@pytest.mark.gpu
def test_backend_key_read_at_graph_replay():
    """A captured graph reads the key tensor on each replay: new key contents, new eps."""
    mu, logvar = torch.zeros(64, 20, device="cuda"), torch.zeros(64, 20, device="cuda")
    key = torch.tensor([7], dtype=torch.int64, device="cuda")
    cl.reparameterize(mu, logvar, key, 0)  # compile and warm up outside the capture
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        cl.reparameterize(mu, logvar, key, 0)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        z = cl.reparameterize(mu, logvar, key, 0)
    for seed in (7, 8, 2**40 + 1):
        key.fill_(seed)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(z, cl.reparameterize(mu, logvar, seed, 0)), f"replay with key {seed}"


@gpu
@needs_torch_cuda
@pytest.mark.gpu
@pytest.mark.skipif(TORCH_CUDA and torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_backend_launches_on_the_tensors_device():
    """Tensors on cuda:1 while cuda:0 is current: the kernels run there, the current device stays."""
    B, F, D = 33, 784, 20
    logits, target, mu, logvar = _inputs(B, F, D, np.float32, "uint8", seed=2)
    args1 = [torch.from_numpy(a).to("cuda:1") for a in (logits, target, mu, logvar)]
    torch.cuda.set_device(0)
    p = _problem(B, F, D, "bce", "mean")
    out1 = cl.fused_loss(p, *args1)
    assert torch.cuda.current_device() == 0 and all(o.device == torch.device("cuda:1") for o in out1)
    out0 = cl.fused_loss(p, *(a.to("cuda:0") for a in args1))
    for a, b in zip(out1, out0, strict=True):
        assert torch.equal(a.cpu(), b.cpu())
    z1 = cl.reparameterize(args1[2], args1[3], torch.tensor([5], device="cuda:1"), 3)
    assert torch.equal(z1.cpu(), cl.reparameterize(args1[2].to("cuda:0"), args1[3].to("cuda:0"), 5, 3).cpu())
    cl.scale_grads_(torch.full((), 2.0, device="cuda:1"), out1[3], out1[4], out1[5])
    assert torch.equal(out1[3].cpu(), 2 * out0[3].cpu()) and torch.cuda.current_device() == 0


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
