"""The fused ops: validation, the eager fast path, torch.library registration, the public functions.

Every public op takes one of three routes, decided per call:

* **eager** (the common case): cheap validation, then a ``torch.autograd.Function`` that calls the
  backend's launcher directly -- about one launch of host time per op;
* **compiled** (``torch.compiler.is_compiling()``): the ``torch.library`` custom ops below
  (``fastvae::fused_loss``, ``fastvae::reparameterize``, ``fastvae::draw_key``, ...), with fake
  implementations and autograd formulas, so ``torch.compile(fullgraph=True)``, ``opcheck`` and fake
  tensors work;
* **functorch** (inside ``torch.func.grad`` / ``vmap`` / ``jvp``): the same math written with plain
  differentiable torch operations (``fastvae.kernels.composite``), which every transform supports.

Gradients of the fused loss are computed during its forward (the loss is the last node of a VAE's
graph); the backward only multiplies them by the incoming gradient.  A backward that builds a graph
(``create_graph=True``) instead evaluates the closed-form gradients with differentiable torch
operations, so second derivatives are the true ones, never silently zero.

Each op runs on the backend picked per call (:func:`backend_for`): Triton on CUDA tensors (and on
CPU tensors under ``TRITON_INTERPRET=1``), Numba on CPU tensors, plain composite torch anywhere, or
CuPy on CUDA tensors -- all behind the contract of :mod:`fastvae.backend`, on the tensors' device.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os
from collections.abc import Iterator
from types import SimpleNamespace
from typing import NamedTuple

import torch
from torch import Tensor

from fastvae.backend import (
    RECON_GAUSSIAN,
    RECON_MSE,
    RECON_NONE,
    RECONS,
    REDUCE_MEAN,
    REDUCTIONS,
    Key,
    LossProblem,
)

__all__ = [
    "BACKENDS",
    "VAELossTerms",
    "backend_for",
    "bce_with_logits",
    "kl_divergence",
    "reparameterize",
    "use_backend",
    "vae_loss",
]

BACKENDS = ("auto", "triton", "numba", "torch", "cupy")
_FLOATS = frozenset((torch.float32, torch.float16, torch.bfloat16, torch.float64))
_TARGETS = _FLOATS | {torch.uint8}
_SEED_LIMIT = 2**63
_KEY_LIMIT = 2**62  # keys drawn from torch's generator: [0, 2**62)
_RECON_NAMES = ("bce", "mse", "gaussian", "continuous_bernoulli")
_BOUNDED = ("bce", "continuous_bernoulli")  # likelihoods of targets in [0, 1]

# ----------------------------------------------------------------------------------------------
# Backends
# ----------------------------------------------------------------------------------------------

_forced_backend: str | None = None


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the ops on one backend inside a ``with`` block (overrides ``FASTVAE_BACKEND``)."""
    global _forced_backend
    _check_backend_name(name, "use_backend(name)")
    previous, _forced_backend = _forced_backend, name
    try:
        yield
    finally:
        _forced_backend = previous


def _check_backend_name(name: str, where: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"{where} must be one of {BACKENDS}, got {name!r}")


def backend_for(device: torch.device) -> str:
    """The backend that runs an op on ``device``: ``use_backend`` > ``FASTVAE_BACKEND`` > ``auto``.

    ``auto`` is Triton on CUDA and Numba on CPU.  ``triton`` on CPU tensors runs the real kernels
    under the Triton interpreter (``TRITON_INTERPRET=1``, which must be set before Triton kernels are
    first imported); that is how the kernels are tested without a GPU.
    """
    name = _forced_backend or os.environ.get("FASTVAE_BACKEND", "auto").strip().lower() or "auto"
    if name == "auto":
        return "triton" if device.type == "cuda" else "numba"
    _check_backend_name(name, "FASTVAE_BACKEND")
    if name == "numba" and device.type != "cpu":
        raise ValueError(f"the numba backend runs on CPU tensors only; got tensors on {device}")
    if name == "cupy" and device.type != "cuda":
        raise ValueError(f"the cupy backend runs on CUDA tensors only; got tensors on {device}")
    return name


def _check_triton_on_cpu() -> None:
    """Triton on CPU tensors is the interpreter; it must be on before the kernels are imported.

    (``bench/hosttime.py`` replaces this check to time the CUDA code path against a stubbed driver.)
    """
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the @triton.jit decorators run
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "the triton backend on CPU tensors needs TRITON_INTERPRET=1 set before fastvae's kernels are "
            "imported (this machine has a GPU, so it is not set automatically)"
        )


def _load_backend(name: str) -> SimpleNamespace:
    """The four functions of :class:`fastvae.backend.Backend` for one backend (imported on first use)."""
    if name == "triton":
        loss = importlib.import_module("fastvae.kernels.fused_loss")
        rep = importlib.import_module("fastvae.kernels.reparameterize")
    else:
        module = {
            "numba": "fastvae.kernels.numba_cpu",
            "torch": "fastvae.kernels.composite",
            "cupy": "fastvae.kernels.cupy_launch",
        }[name]
        loss = rep = importlib.import_module(module)
    return SimpleNamespace(
        fused_loss=loss.fused_loss,
        scale_grads_=loss.scale_grads_,
        reparameterize=rep.reparameterize,
        reparameterize_backward=rep.reparameterize_backward,
    )


_loaded: dict[str, SimpleNamespace] = {}


def _backend(device: torch.device) -> SimpleNamespace:
    name = backend_for(device)
    if name == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        _check_triton_on_cpu()
    kernels = _loaded.get(name)
    if kernels is None:
        kernels = _loaded[name] = _load_backend(name)
    return kernels


_NO_GUARD = contextlib.nullcontext()  # reusable


def _on(device: torch.device) -> contextlib.AbstractContextManager:
    """Launch on ``device``: Triton and CuPy launch on the *current* CUDA device and its current stream."""
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return _NO_GUARD


def _functorch_active() -> bool:
    """Inside a torch.func transform (grad, vmap, jvp): the kernels cannot see through its wrappers."""
    return torch._C._functorch.maybe_current_level() is not None


# ----------------------------------------------------------------------------------------------
# Random keys: eps[i] = randn(key, offset + i)  (the RNG contract, fastvae.backend)
# ----------------------------------------------------------------------------------------------


def _draw_key(device: torch.device) -> Tensor:
    """A fresh 62-bit key drawn on ``device`` from torch's generator for that device.

    It stays on the device and is read by the kernel, so nothing is read on the host: inside a
    captured CUDA graph torch's generator advances on every replay, and so does the key.
    """
    return torch.randint(0, _KEY_LIMIT, (1,), device=device, dtype=torch.int64)


@torch.library.custom_op("fastvae::draw_key", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
def _draw_key_op(like: Tensor) -> Tensor:
    """:func:`_draw_key` as an opaque op: compiled code draws from torch's generator exactly as eager
    code does (inductor would otherwise substitute its own random numbers), and is never CSE'd."""
    return _draw_key(like.device)


@_draw_key_op.register_fake
def _(like: Tensor) -> Tensor:
    return like.new_empty((1,), dtype=torch.int64)


def _kernel_key(key: Tensor, device: torch.device) -> Key:
    # An explicit seed reaches the compiled path as a CPU scalar tensor: free to read on the host.
    return int(key) if key.device.type == "cpu" and device.type != "cpu" else key


# ----------------------------------------------------------------------------------------------
# Custom ops (the compiled route): kernels, fake versions, autograd formulas
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("fastvae::reparameterize", mutates_args=())
def _reparameterize_op(mu: Tensor, logvar: Tensor, key: Tensor, offset: int) -> Tensor:
    with _on(mu.device):
        return _backend(mu.device).reparameterize(mu, logvar, _kernel_key(key, mu.device), offset)


@_reparameterize_op.register_fake
def _(mu: Tensor, logvar: Tensor, key: Tensor, offset: int) -> Tensor:
    return torch.empty_like(mu, memory_format=torch.contiguous_format)


@torch.library.custom_op("fastvae::reparameterize_backward", mutates_args=())
def _reparameterize_backward_op(dz: Tensor, logvar: Tensor, key: Tensor, offset: int) -> Tensor:
    with _on(dz.device):
        return _backend(dz.device).reparameterize_backward(dz, logvar, _kernel_key(key, dz.device), offset)


@_reparameterize_backward_op.register_fake
def _(dz: Tensor, logvar: Tensor, key: Tensor, offset: int) -> Tensor:
    return torch.empty_like(dz, memory_format=torch.contiguous_format)


def _reparameterize_setup(ctx, inputs, output) -> None:
    _, logvar, key, offset = inputs
    ctx.save_for_backward(logvar, key)
    ctx.offset = offset


def _reparameterize_grad(ctx, dz: Tensor):
    logvar, key = ctx.saved_tensors
    dlogvar = None
    if ctx.needs_input_grad[1]:
        dlogvar = _reparameterize_backward_op(dz.contiguous(), logvar, key, ctx.offset)
    return dz, dlogvar, None, None


_reparameterize_op.register_autograd(_reparameterize_grad, setup_context=_reparameterize_setup)


def _problem(
    logits: Tensor | None,
    mu: Tensor | None,
    beta: float,
    reduction: str,
    recon: str,
    need_grad: bool,
    scale_grad: bool = False,
) -> LossProblem:
    """Everything a backend needs besides the tensors, resolved once (the backends' shared prologue)."""
    ref = logits if logits is not None else mu
    B = ref.shape[0]
    red = REDUCTIONS[reduction]
    return LossProblem(
        B=B,
        F=logits.shape[1] if logits is not None else 0,
        D=mu.shape[1] if mu is not None else 0,
        recon=RECONS[recon] if logits is not None else RECON_NONE,
        reduction=red,
        beta=beta,
        grad_scale=1.0 / B if red == REDUCE_MEAN else 1.0,
        need_grad=need_grad,
        acc=torch.float64 if ref.dtype == torch.float64 else torch.float32,
        scale_grad=scale_grad,
    )


@torch.library.custom_op("fastvae::fused_loss", mutates_args=())
def _fused_loss_op(
    logits: Tensor | None,
    target: Tensor | None,
    mu: Tensor | None,
    logvar: Tensor | None,
    log_scale: Tensor | None,
    beta: float,
    reduction: str,
    recon: str,
    need_grad: bool,
    scale_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    p = _problem(logits, mu, beta, reduction, recon, need_grad, scale_grad)
    device = (logits if logits is not None else mu).device
    with _on(device):
        out = _backend(device).fused_loss(p, logits, target, mu, logvar, log_scale)
    # A backend may return loss/recon/kl as views of one buffer; a custom op's outputs may not alias.
    terms = out[:3]
    if len({t.untyped_storage().data_ptr() for t in terms}) < 3:
        terms = tuple(t.clone() for t in terms)
    return (*terms, *out[3:])


@_fused_loss_op.register_fake
def _(logits, target, mu, logvar, log_scale, beta, reduction, recon, need_grad, scale_grad):
    ref = logits if logits is not None else mu
    acc = torch.float64 if ref.dtype == torch.float64 else torch.float32
    shape = (ref.shape[0],) if reduction == "none" else ()
    terms = [ref.new_empty(shape, dtype=acc) for _ in range(3)]

    def grad(x: Tensor | None) -> Tensor:
        return x.new_empty(x.shape) if need_grad and x is not None else ref.new_empty(0)

    dls = ref.new_empty(0, dtype=acc)
    if need_grad and scale_grad and log_scale is not None:
        dls = logits.new_empty(logits.shape, dtype=acc)
    return (*terms, grad(logits), grad(mu), grad(logvar), dls)


@torch.library.custom_op("fastvae::scale_grads_", mutates_args=("dlogits", "dmu", "dlogvar"))
def _scale_grads_op(grad: Tensor, dlogits: Tensor, dmu: Tensor, dlogvar: Tensor) -> None:
    """dlogits, dmu, dlogvar *= grad in place (grad is a scalar, or [B] for reduction "none")."""
    with _on(grad.device):
        _backend(grad.device).scale_grads_(grad, dlogits, dmu, dlogvar)


@_scale_grads_op.register_fake
def _(grad, dlogits, dmu, dlogvar) -> None:
    return None


def _fused_loss_setup(ctx, inputs, output) -> None:
    ctx.mark_non_differentiable(*output[1:])  # only the loss carries a gradient
    ctx.set_materialize_grads(False)  # no zero-filled [B, F] gradients for the unused outputs
    # The gradient buffers are plain attributes, not saved tensors: the first backward scales them in
    # place, which a saved tensor's version check would refuse.
    ctx.grads = output[3:]
    ctx.save_for_backward(*inputs[:5])
    ctx.problem = _problem(inputs[0], inputs[2], *inputs[5:8], True, inputs[9])
    ctx.consumed = False


def _fused_loss_grad(ctx, grad_loss: Tensor | None, *unused):
    return _loss_backward(ctx, grad_loss) + (None,) * 5


_fused_loss_op.register_autograd(_fused_loss_grad, setup_context=_fused_loss_setup)


# ----------------------------------------------------------------------------------------------
# The eager route: autograd.Functions that call the launchers directly
# ----------------------------------------------------------------------------------------------


_Grads = tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None, Tensor | None]


def _loss_backward(ctx, g: Tensor | None) -> _Grads:
    """d(loss)/d(logits, target, mu, logvar, log_scale) from the gradients the forward stored (for g = 1).

    * first plain backward: multiply in place (no bytes move where g == 1; on the CPU, where reading
      g is free, not even a call);
    * traced (torch.compile) or a second backward through the same graph (``retain_graph``): out of
      place, the latter from gradients recomputed with the saved inputs;
    * a backward that builds a graph (``create_graph=True``): the closed forms in differentiable torch
      operations, so that the second derivatives are right.

    The target's gradient, when it requires one, follows from the same numbers: d/dt is ``-x`` per
    element for BCE and the continuous Bernoulli (their log-normaliser does not depend on t) and
    ``-d/dx`` for the squared error and the Gaussian.  d/d(log_scale) is summed over the batch here.
    """
    if g is None:
        return None, None, None, None, None
    logits, target, mu, logvar, log_scale = ctx.saved_tensors
    p = ctx.problem
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        from fastvae.kernels import composite

        return composite.loss_gradients(p, logits, target, mu, logvar, g, log_scale)
    traced = torch.compiler.is_compiling() or type(g) is not Tensor
    kernels = getattr(ctx, "kernels", None) or _backend(g.device)  # the forward's backend
    second = ctx.consumed and not traced
    if second:  # a second backward: the first one handed the buffers over
        with _on(g.device):
            grads = kernels.fused_loss(p, logits, target, mu, logvar, log_scale)[3:]
    else:
        grads = ctx.grads
        ctx.grads = None  # hand the buffers over: a reference kept here makes autograd copy them into .grad
        ctx.consumed = True
    dlogits, dmu, dlogvar, dls = grads
    gg = g.reshape(-1, 1) if g.dim() == 1 else g
    if traced or second:
        dlogits, dmu, dlogvar, dls = ((t * gg).to(t.dtype) if t.numel() else t for t in grads)
    elif not (g.device.type == "cpu" and g.dim() == 0 and g.item() == 1.0):
        with _on(g.device):
            kernels.scale_grads_(g.detach(), dlogits, dmu, dlogvar)
            if dls.numel():
                kernels.scale_grads_(g.detach(), dls, dls.new_empty(0), dls.new_empty(0))
    dtarget = None
    if target is not None and target.requires_grad:
        if p.recon in (RECON_MSE, RECON_GAUSSIAN):
            dtarget = (-dlogits).to(target.dtype)
        else:
            dtarget = (-(logits.to(p.acc) * (gg * p.grad_scale))).to(target.dtype)
    dlog_scale = None
    if log_scale is not None and log_scale.requires_grad and dls.numel():
        dlog_scale = dls.sum(0) if log_scale.numel() > 1 else dls.sum().reshape(1)
    return (
        dlogits if logits is not None and logits.requires_grad else None,
        dtarget,
        dmu if mu is not None else None,
        dlogvar if mu is not None else None,
        dlog_scale,
    )


class _FusedLoss(torch.autograd.Function):
    """Eager ``fastvae::fused_loss``: (logits, target, mu, logvar, log_scale) -> (loss, recon, kl)."""

    @staticmethod
    def forward(ctx, logits, target, mu, logvar, log_scale, p: LossProblem, kernels, device):
        with _on(device):
            loss, rec, kl, *grads = kernels.fused_loss(p, logits, target, mu, logvar, log_scale)
        ctx.mark_non_differentiable(rec, kl)
        ctx.set_materialize_grads(False)
        ctx.grads = grads
        ctx.kernels = kernels
        ctx.save_for_backward(logits, target, mu, logvar, log_scale)
        ctx.problem = p._replace(need_grad=True)
        ctx.consumed = False
        return loss, rec, kl

    @staticmethod
    def backward(ctx, g, _rec, _kl):
        return _loss_backward(ctx, g) + (None, None, None)


def _reparameterize_grad_eager(ctx, dz: Tensor) -> tuple[Tensor, Tensor | None]:
    logvar = ctx.saved_tensors[0]
    key = ctx.key if ctx.key is not None else ctx.saved_tensors[1]
    if not ctx.needs_input_grad[1]:
        return dz, None
    if torch.is_grad_enabled():
        # create_graph: dlogvar = 0.5 dz exp(logvar/2) eps as differentiable operations (eps from the
        # kernel: mu = 0, logvar = 0 gives z = eps), so that higher derivatives are the true ones.
        zeros = torch.zeros_like(logvar, memory_format=torch.contiguous_format)
        with torch.no_grad(), _on(dz.device):
            eps = ctx.kernels.reparameterize(zeros, zeros, key, ctx.offset)
        return dz, 0.5 * dz * torch.exp(0.5 * logvar) * eps
    with _on(dz.device):
        return dz, ctx.kernels.reparameterize_backward(dz.contiguous(), logvar, key, ctx.offset)


class _Reparameterize(torch.autograd.Function):
    """Eager ``fastvae::reparameterize``: z = mu + exp(logvar / 2) * eps, eps replayed in the backward."""

    @staticmethod
    def forward(ctx, mu, logvar, key, offset: int, kernels, device):
        with _on(device):
            z = kernels.reparameterize(mu, logvar, key, offset)
        ctx.kernels, ctx.offset = kernels, offset
        if isinstance(key, Tensor):  # a device key is saved like any tensor; an int seed is kept as is
            ctx.key = None
            ctx.save_for_backward(logvar, key)
        else:
            ctx.key = key
            ctx.save_for_backward(logvar)
        return z

    @staticmethod
    def backward(ctx, dz):
        return _reparameterize_grad_eager(ctx, dz) + (None, None, None, None)


# ----------------------------------------------------------------------------------------------
# Validation: every message names the argument and what was expected
# ----------------------------------------------------------------------------------------------


def _check_tensor(x: object, name: str, allowed: frozenset = _FLOATS) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in allowed:
        kinds = "float32, float16, bfloat16 or float64" + (
            " (or uint8 pixels)" if allowed is _TARGETS else ""
        )
        raise TypeError(f"{name} must be a floating-point tensor ({kinds}), got dtype {x.dtype}")
    if x.dim() == 0:
        raise ValueError(f"{name} must have a batch dimension: shape [B, ...], got a 0-d tensor")
    if x.shape[0] == 0:
        raise ValueError(f"{name} has an empty batch (shape {list(x.shape)}); expected at least one sample")


def _check_same_device(named: dict[str, Tensor]) -> None:
    (first, ref), *rest = named.items()
    for name, x in rest:
        if x.device != ref.device:
            raise ValueError(f"{name} is on {x.device} but {first} is on {ref.device}; expected one device")


def _check_choice(value: object, name: str, choices: tuple[str, ...] | dict) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def _check_latent(mu: Tensor, logvar: Tensor) -> None:
    _check_tensor(mu, "mu")
    _check_tensor(logvar, "logvar")
    if mu.shape != logvar.shape:
        raise ValueError(
            f"mu and logvar must have the same shape, got mu {list(mu.shape)} and logvar {list(logvar.shape)}"
        )


def _check_pair(logits: Tensor, target: Tensor) -> None:
    _check_tensor(logits, "logits")
    _check_tensor(target, "target", _TARGETS)
    if target.shape[0] != logits.shape[0]:
        raise ValueError(
            f"target has batch size {target.shape[0]} but logits has {logits.shape[0]}; "
            "expected the same batch"
        )
    if target.numel() != logits.numel():
        raise ValueError(
            f"target has {target[0].numel()} features per sample (shape {list(target.shape)}) but logits has "
            f"{logits[0].numel()} (shape {list(logits.shape)}); expected the same number of features"
        )


_RANGE_HINT = (
    "Data standardised with a mean and std (e.g. transforms.Normalize((0.1307,), (0.3081,))) gives "
    "silently negative losses; scale images to [0, 1] instead (x / 255), pass uint8 pixels, "
    "or use recon='mse' for unbounded data"
)


def _check_target_range(target: Tensor, recon: str = "bce") -> None:
    """Targets of a (continuous) Bernoulli likelihood lie in [0, 1]: refuse values outside (and NaN)."""
    if target.dtype == torch.uint8 or target.numel() == 0 or target.device.type == "meta":
        return
    compiling = torch.compiler.is_compiling()
    while not compiling and torch._C._functorch.is_functorch_wrapped_tensor(target):
        target = torch._C._functorch.get_unwrapped(target)  # under a torch.func transform: check the data
    lo, hi = torch.aminmax(target.detach())
    if compiling:
        # No host-side branch on data in a traced graph: a runtime assert (a RuntimeError) instead.
        message = f"target must lie in [0, 1] for recon={recon!r}. {_RANGE_HINT}"
        torch._assert_async((lo >= 0) & (hi <= 1), message)
        return
    lo, hi = float(lo), float(hi)
    if not (0.0 <= lo and hi <= 1.0):  # also False for NaN
        raise ValueError(
            f"target must lie in [0, 1] for recon={recon!r}, got values in [{lo:.4g}, {hi:.4g}]. "
            + _RANGE_HINT
        )


def _rows(x: Tensor) -> Tensor:
    """[B, ...] -> [B, F] with contiguous features (a view when possible, so row-strided slices stay free)."""
    if x.dim() == 2 and (x.stride(1) == 1 or x.shape[1] <= 1):
        return x
    x2 = x.reshape(x.shape[0], -1)
    return x2 if x2.stride(1) == 1 or x2.shape[1] <= 1 else x2.contiguous()


def _resolve_validate(validate: bool | None, device: torch.device) -> bool:
    # The range check reads the target and brings two numbers to the host: free on CPU, a
    # synchronisation on CUDA, so there it is opt-in (fastvae's data loaders check data sets once).
    return device.type == "cpu" if validate is None else bool(validate)


_BETA_HINT = "beta must be a finite number >= 0 (a float, or a 1-element floating-point tensor)"


def _check_beta(beta: object) -> float | Tensor:
    """A float, or a 1-element floating-point tensor (kept a tensor: it may require grad, and on CUDA it
    is never read on the host; on the CPU its value is checked, which costs nothing there)."""
    if isinstance(beta, Tensor):
        if beta.numel() != 1 or not beta.is_floating_point():
            raise ValueError(f"{_BETA_HINT}; got a tensor of shape {list(beta.shape)} and dtype {beta.dtype}")
        if beta.device.type == "cpu" and not torch.compiler.is_compiling() and not _functorch_active():
            value = float(beta.detach())
            if not (0.0 <= value < math.inf):
                raise ValueError(f"{_BETA_HINT}; got {value}")
        return beta
    if isinstance(beta, bool) or not isinstance(beta, int | float):
        raise TypeError(f"{_BETA_HINT}; got {type(beta).__name__} {beta!r}")
    beta = float(beta)
    if not (0.0 <= beta < math.inf):
        raise ValueError(f"{_BETA_HINT}; got {beta}")
    return beta


def _check_log_scale(log_scale: object, logits: Tensor, recon: str) -> Tensor | None:
    """The Gaussian decoder's log standard deviation as the backends take it: a 1-D tensor of 1 element
    (one scale) or F (one per feature, broadcast over the per-sample shape), in the loss's dtype.
    The broadcast and the cast are differentiable, so the gradient reaches ``log_scale``'s own shape."""
    if recon != "gaussian":
        if log_scale is not None:
            raise ValueError(f"log_scale is only used with recon='gaussian', got recon={recon!r}")
        return None
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    if log_scale is None:  # unit variance
        return torch.zeros(1, dtype=acc, device=logits.device)
    if isinstance(log_scale, int | float) and not isinstance(log_scale, bool):
        if not math.isfinite(log_scale):
            raise ValueError(f"log_scale must be finite, got {log_scale}")
        return torch.full((1,), float(log_scale), dtype=acc, device=logits.device)
    if not isinstance(log_scale, Tensor) or not log_scale.is_floating_point():
        kind = f"dtype {log_scale.dtype}" if isinstance(log_scale, Tensor) else type(log_scale).__name__
        raise TypeError(f"log_scale must be a float or a floating-point tensor, got {kind}")
    if log_scale.device != logits.device:
        _check_same_device({"logits": logits, "log_scale": log_scale})
    per_sample = tuple(logits.shape[1:])
    shape = tuple(log_scale.shape)
    if len(shape) == logits.dim() and shape[0] == 1:
        shape = shape[1:]  # a leading batch dimension of 1 is allowed
    try:
        fits = torch.broadcast_shapes(shape, per_sample) == torch.Size(per_sample)
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(
            f"log_scale must be broadcastable to the per-sample shape {list(per_sample)} of logits "
            f"(a scalar, per feature or per element; one scale for every sample), got shape "
            f"{list(log_scale.shape)}"
        )
    if log_scale.numel() == 1:
        return log_scale.reshape(1).to(acc)
    return log_scale.reshape(shape).expand(per_sample).reshape(-1).to(acc).contiguous()


def _prior_latent(
    mu: Tensor, logvar: Tensor, prior_mu: Tensor | None, prior_logvar: Tensor | None
) -> tuple[Tensor, Tensor]:
    """KL(N(mu, e^lv) || N(pm, e^plv)) as the standard-normal KL of ``((mu - pm) e^(-plv/2), lv - plv)``.

    Per dimension 0.5 (e^(lv - plv) + (mu - pm)^2 e^(-plv) - 1 - lv + plv) is exactly the N(0, 1) KL
    0.5 (e^lv' + mu'^2 - 1 - lv') of the shifted and scaled latent, so the fused KL kernel computes it
    and autograd carries its gradients through these two element-wise lines to all four tensors.
    """
    if prior_mu is None and prior_logvar is None:
        return mu, logvar
    if prior_mu is None or prior_logvar is None:
        given, missing = (
            ("prior_mu", "prior_logvar") if prior_mu is not None else ("prior_logvar", "prior_mu")
        )
        raise ValueError(
            f"{given} was given without {missing}: pass both (a diagonal Gaussian prior) or neither"
        )
    for name, x in (("prior_mu", prior_mu), ("prior_logvar", prior_logvar)):
        if not isinstance(x, Tensor) or not x.is_floating_point():
            kind = f"dtype {x.dtype}" if isinstance(x, Tensor) else type(x).__name__
            raise TypeError(f"{name} must be a floating-point tensor, got {kind}")
        if x.device != mu.device:
            _check_same_device({"mu": mu, name: x})
        try:
            fits = torch.broadcast_shapes(x.shape, mu.shape) == mu.shape
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(
                f"{name} must be broadcastable to the shape of mu {list(mu.shape)}, got {list(x.shape)}"
            )
    acc = torch.float64 if mu.dtype == torch.float64 else torch.float32
    plv = prior_logvar.to(acc)
    mu2 = (mu.to(acc) - prior_mu.to(acc)) * torch.exp(-0.5 * plv)
    return mu2, logvar.to(acc) - plv


# ----------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------


class VAELossTerms(NamedTuple):
    """``loss = recon + beta * kl``; ``recon`` and ``kl`` are detached, with the same reduction."""

    loss: Tensor
    recon: Tensor
    kl: Tensor


def _check_seed_offset(seed: object, offset: object) -> None:
    if seed is not None and (
        isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < _SEED_LIMIT
    ):
        raise ValueError(f"seed must be an int in [0, 2**63) or None, got {seed!r}")
    if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset < _SEED_LIMIT:
        raise ValueError(f"offset must be an int in [0, 2**63), got {offset!r}")


def reparameterize(mu: Tensor, logvar: Tensor, *, seed: int | None = None, offset: int = 0) -> Tensor:
    """Sample ``z = mu + exp(0.5 * logvar) * eps`` with ``eps ~ N(0, 1)`` drawn inside the kernel.

    ``eps[i] = randn(key, offset + i)`` over the flat (C-order) index ``i`` of ``mu``: normal ``n & 3``
    (``n = offset + i``) of Philox4x32-10 at the counter ``(n >> 2, key)`` with two Box-Mullers
    (four elements share a Philox call), so eps is never stored, does not depend on block sizes,
    and is identical on every backend (``fastvae.reference.eps``).  ``key`` is ``seed`` when given;
    with ``seed=None`` a fresh key is drawn on the tensors' device from torch's generator (so
    ``torch.manual_seed`` reproduces runs, eager and compiled alike) and read by the kernel on the
    device: each replay of a captured CUDA graph draws a fresh one.  ``offset`` shifts the counter
    (e.g. a data-parallel rank takes ``offset = first_row * features`` of a shared key).

    Gradients: ``dmu = dz``, ``dlogvar = 0.5 * dz * exp(0.5 * logvar) * eps`` (eps regenerated from the
    key, which reads less than ``z`` and ``mu`` and loses no bits); higher derivatives are supported.

    Args:
        mu, logvar: ``[B, ...]`` tensors of one shape and floating dtype (fp32, fp16, bf16, fp64).
        seed: an integer in ``[0, 2**63)``, or None.
        offset: an integer in ``[0, 2**63)``.
    Returns:
        ``z``, contiguous, with the shape and dtype of ``mu``.
    """
    _check_latent(mu, logvar)
    if mu.device != logvar.device:
        _check_same_device({"mu": mu, "logvar": logvar})
    if mu.dtype != logvar.dtype:
        raise TypeError(f"mu and logvar must have the same dtype, got {mu.dtype} and {logvar.dtype}")
    _check_seed_offset(seed, offset)
    mu, logvar = mu.contiguous(), logvar.contiguous()
    device = mu.device
    if torch.compiler.is_compiling():
        key = _draw_key_op(mu) if seed is None else torch.tensor(seed, dtype=torch.int64)
        return _reparameterize_op(mu, logvar, key, offset)
    key = _draw_key(device) if seed is None else seed
    if _functorch_active():
        from fastvae.kernels import composite

        return composite.reparameterize_differentiable(mu, logvar, key, offset)
    return _Reparameterize.apply(mu, logvar, key, offset, _backend(device), device)


def _fused(logits, target, mu, logvar, beta, reduction, recon, validate, log_scale=None) -> VAELossTerms:
    """The shared body of the three loss functions (arguments checked; ``log_scale`` as the backends
    take it, see :func:`_check_log_scale`)."""
    ref = logits if logits is not None else mu
    device = ref.device
    if logits is not None and recon in _BOUNDED and _resolve_validate(validate, device):
        _check_target_range(target, recon)
    if isinstance(beta, Tensor):
        # Never read on the host (no synchronisation, graph-capturable; it may require grad): the
        # reconstruction and the KL are two launches and ``loss = recon + beta * kl`` is computed with
        # tensor operations, so d(loss)/d(beta) = kl with its reduction, and higher derivatives follow.
        r = k = None
        if logits is not None:
            r = _fused(logits, target, None, None, 1.0, reduction, recon, False, log_scale)
        if mu is not None:
            k = _fused(None, None, mu, logvar, 1.0, reduction, "none", False)
        if r is None:
            return VAELossTerms(beta.reshape(()).to(k.loss.dtype) * k.loss, torch.zeros_like(k.kl), k.kl)
        if k is None:
            return r
        return VAELossTerms(r.loss + beta.reshape(()).to(k.loss.dtype) * k.loss, r.recon, k.kl)
    logits, target = (_rows(logits), _rows(target)) if logits is not None else (None, None)
    mu, logvar = (_rows(mu), _rows(logvar)) if mu is not None else (None, None)
    need_grad = torch.is_grad_enabled() and (
        (logits is not None and (logits.requires_grad or target.requires_grad))
        or (mu is not None and (mu.requires_grad or logvar.requires_grad))
        or (log_scale is not None and log_scale.requires_grad)
    )
    scale_grad = need_grad and log_scale is not None and log_scale.requires_grad
    if torch.compiler.is_compiling():
        loss, rec, kl, *_ = _fused_loss_op(
            logits, target, mu, logvar, log_scale, beta, reduction, recon, need_grad, scale_grad
        )
    elif _functorch_active():
        from fastvae.kernels import composite

        loss, rec, kl = composite.loss_terms(
            logits, target, mu, logvar, beta, REDUCTIONS[reduction], RECONS[recon], log_scale
        )
    else:
        p = _problem(logits, mu, beta, reduction, recon, need_grad, scale_grad)
        loss, rec, kl = _FusedLoss.apply(logits, target, mu, logvar, log_scale, p, _backend(device), device)
    return VAELossTerms(loss, rec.detach(), kl.detach())


def vae_loss(
    logits: Tensor,
    target: Tensor,
    mu: Tensor | None = None,
    logvar: Tensor | None = None,
    *,
    beta: float | Tensor = 1.0,
    reduction: str = "sum",
    recon: str = "bce",
    log_scale: float | Tensor | None = None,
    prior_mu: Tensor | None = None,
    prior_logvar: Tensor | None = None,
    return_terms: bool = False,
    validate: bool | None = None,
) -> Tensor | VAELossTerms:
    """The negative ELBO in one kernel pass: ``recon(logits, target) + beta * KL(q(z|x) || p(z))``.

    Per sample, with ``x = logits`` (the decoder's output before any sigmoid), ``t = target`` and
    ``s = log_scale``::

        bce:                  sum_f max(x, 0) - x t + log1p(exp(-|x|))   (= BCE(sigmoid(x), t), stably)
        mse:                  sum_f (x - t)^2                            (on the raw decoder output)
        gaussian:             sum_f 0.5 ((x - t) / sigma)^2 + log sigma + 0.5 log(2 pi),  sigma = e^s
        continuous_bernoulli: bce - sum_f log C(x),  log C(x) = log(x / tanh(x / 2))  (log 2 at x = 0;
                              Loaiza-Ganem and Cunningham 2019: the normalised likelihood of t in [0, 1])
        KL:                   -0.5 * sum_d (1 + logvar - mu^2 - exp(logvar))                 (p = N(0, I))
                              0.5 * sum_d (e^(lv - plv) + (mu - pm)^2 e^(-plv) - 1 - lv + plv)
                              (p = N(prior_mu, exp(prior_logvar)))

    The gradients with respect to logits, mu and logvar (and log_scale) are computed in the same pass;
    the backward only multiplies them by the incoming gradient.  A target that requires grad gets
    ``-x`` (bce, continuous Bernoulli) or ``-d/dx`` (mse, gaussian) times the reduction's scale.

    Args:
        logits: ``[B, ...]`` decoder output, fp32/fp16/bf16/fp64.
        target: the data, same batch and number of features as ``logits``: floats (in [0, 1] for bce
            and the continuous Bernoulli), or uint8 pixels read as ``t / 255`` inside the kernel.
        mu, logvar: ``[B, ...]`` encoder outputs of one shape, or both None: no KL term (a plain
            reconstruction likelihood).
        beta: weight of the KL term (beta-VAE; KL warm-up): a float, or a 1-element tensor, which may
            require grad (``d loss / d beta`` is the KL term, with its reduction) and is never read on
            the host on CUDA (graph-capturable; the KL is then a second, small launch).
        reduction: ``"sum"`` over batch and features (pytorch/examples), ``"mean"`` over the batch of
            per-sample sums (per-sample negative ELBO), ``"none"`` the per-sample vector ``[B]``.
        recon: ``"bce"`` (Bernoulli decoder), ``"mse"`` (sum of squared errors), ``"gaussian"``
            (full Gaussian negative log-likelihood with ``log_scale``) or ``"continuous_bernoulli"``.
        log_scale: ``recon="gaussian"`` only: ``log sigma``, a float or a tensor broadcastable to the
            per-sample shape ``logits.shape[1:]`` (a scalar, per channel, per feature or per element;
            learnable: it gets its gradient).  Default 0 (unit variance).
        prior_mu, prior_logvar: a diagonal Gaussian prior (learned priors, hierarchical VAEs), both or
            neither, broadcastable to ``mu``'s shape (e.g. one prior for the whole batch); gradients
            reach all four latent tensors.
        return_terms: also return the detached reconstruction and KL terms.
        validate: check that float targets lie in [0, 1] (bce, continuous Bernoulli).  Default: on CPU
            yes; on CUDA no, since it synchronises the host (pass True to check there).
    Returns:
        The loss (fp32; fp64 for fp64 inputs): a scalar, or ``[B]`` for ``reduction="none"``; or
        :class:`VAELossTerms` with ``return_terms=True``.
    """
    _check_pair(logits, target)
    device = logits.device
    if target.device != device:
        _check_same_device({"logits": logits, "target": target})
    if (mu is None) != (logvar is None):
        raise ValueError("mu and logvar must be given together (a KL term) or both be None (no KL term)")
    if mu is not None:
        _check_latent(mu, logvar)
        if mu.device != device or logvar.device != device:
            _check_same_device({"logits": logits, "mu": mu, "logvar": logvar})
        if mu.shape[0] != logits.shape[0]:
            raise ValueError(
                f"mu has batch size {mu.shape[0]} but logits has {logits.shape[0]}; expected the same"
            )
        mu, logvar = _prior_latent(mu, logvar, prior_mu, prior_logvar)
    elif prior_mu is not None or prior_logvar is not None:
        raise ValueError("prior_mu and prior_logvar need mu and logvar (the KL term they define)")
    _check_choice(recon, "recon", _RECON_NAMES)
    _check_choice(reduction, "reduction", REDUCTIONS)
    log_scale = _check_log_scale(log_scale, logits, recon)
    terms = _fused(logits, target, mu, logvar, _check_beta(beta), reduction, recon, validate, log_scale)
    return terms if return_terms else terms.loss


def bce_with_logits(
    logits: Tensor, target: Tensor, *, reduction: str = "sum", validate: bool | None = None
) -> Tensor:
    """Binary cross-entropy on logits: ``sum_f max(x, 0) - x t + log1p(exp(-|x|))`` per sample.

    Equal to ``F.binary_cross_entropy(torch.sigmoid(x), t)`` without its overflow, in one pass that
    also writes the gradient ``sigmoid(x) - t``.  ``target`` is floats in [0, 1] or uint8 pixels
    (read as ``t / 255``).  Reductions and ``validate`` as in :func:`vae_loss`.
    """
    _check_pair(logits, target)
    if target.device != logits.device:
        _check_same_device({"logits": logits, "target": target})
    _check_choice(reduction, "reduction", REDUCTIONS)
    return _fused(logits, target, None, None, 1.0, reduction, "bce", validate).loss


def kl_divergence(
    mu: Tensor,
    logvar: Tensor,
    *,
    reduction: str = "sum",
    prior_mu: Tensor | None = None,
    prior_logvar: Tensor | None = None,
) -> Tensor:
    """``KL(N(mu, exp(logvar)) || N(0, I)) = -0.5 * sum_d (1 + logvar - mu^2 - exp(logvar))`` per sample.

    With a diagonal Gaussian prior ``N(prior_mu, exp(prior_logvar))`` (both or neither, broadcastable
    to ``mu``): ``0.5 * sum_d (e^(lv - plv) + (mu - pm)^2 e^(-plv) - 1 - lv + plv)``, with gradients to
    all four.  Gradients ``mu`` and ``0.5 * (exp(logvar) - 1)`` (standard prior) are written in the same
    pass.  Reductions as in :func:`vae_loss`.
    """
    _check_latent(mu, logvar)
    if mu.device != logvar.device:
        _check_same_device({"mu": mu, "logvar": logvar})
    _check_choice(reduction, "reduction", REDUCTIONS)
    mu, logvar = _prior_latent(mu, logvar, prior_mu, prior_logvar)
    return _fused(None, None, mu, logvar, 1.0, reduction, "none", False).loss
