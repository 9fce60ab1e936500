"""The fused ops: validation, torch.library registration (fake + autograd) and the public functions.

Three custom ops carry all the work:

* ``fastvae::reparameterize(mu, logvar, seed) -> z`` and ``fastvae::reparameterize_backward``;
* ``fastvae::fused_loss(logits?, target?, mu?, logvar?, beta, reduction, recon, need_grad)
  -> (loss, recon, kl, dlogits, dmu, dlogvar)``: ``vae_loss``, ``bce_with_logits`` and
  ``kl_divergence`` are this op with one or the other term absent;
* ``fastvae::scale_grads_``: the backward of ``fused_loss``, an in-place multiply by the incoming
  gradient that moves no bytes when that gradient is 1.

Each op runs on the backend picked per call (see :func:`backend_for`): Triton on CUDA tensors
(and on CPU tensors under ``TRITON_INTERPRET=1``), Numba on CPU tensors, a plain composite torch
implementation anywhere, or CuPy on CUDA tensors.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import Tensor

from fastvae.reference import REDUCTIONS

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
RECONS = ("bce", "mse")
_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_SEED_LIMIT = 2**63

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
    _check_backend_name(name, "FASTVAE_BACKEND")
    if name == "auto":
        return "triton" if device.type == "cuda" else "numba"
    if name == "numba" and device.type != "cpu":
        raise ValueError(f"the numba backend runs on CPU tensors only; got tensors on {device}")
    if name == "cupy" and device.type != "cuda":
        raise ValueError(f"the cupy backend runs on CUDA tensors only; got tensors on {device}")
    return name


class _Kernels(NamedTuple):
    fused_loss: object
    scale_rows_: object
    reparameterize: object
    reparameterize_backward: object


_loaded: dict[str, _Kernels] = {}


def _kernels(device: torch.device) -> _Kernels:
    name = backend_for(device)
    if name == "triton" and device.type == "cpu":
        if not torch.cuda.is_available():
            os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the @triton.jit decorators run
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                "the triton backend on CPU tensors needs TRITON_INTERPRET=1 set before fastvae's kernels are "
                "imported (this machine has a GPU, so it is not set automatically)"
            )
    if name not in _loaded:
        if name == "triton":
            loss_mod = importlib.import_module("fastvae.kernels.fused_loss")
            rep_mod = importlib.import_module("fastvae.kernels.reparameterize")
        elif name == "cupy":
            loss_mod = rep_mod = importlib.import_module("fastvae.cupy").torch_kernels()
        else:
            loss_mod = rep_mod = importlib.import_module(
                {"numba": "fastvae.kernels.numba_cpu", "torch": "fastvae.kernels.composite"}[name]
            )
        _loaded[name] = _Kernels(
            loss_mod.fused_loss, loss_mod.scale_rows_, rep_mod.reparameterize, rep_mod.reparameterize_backward
        )
    return _loaded[name]


# ----------------------------------------------------------------------------------------------
# Custom ops: the real kernels, their fake (meta) versions and their autograd formulas
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("fastvae::reparameterize", mutates_args=())
def _reparameterize_op(mu: Tensor, logvar: Tensor, seed: Tensor) -> Tensor:
    return _kernels(mu.device).reparameterize(mu, logvar, int(seed))


@_reparameterize_op.register_fake
def _(mu: Tensor, logvar: Tensor, seed: Tensor) -> Tensor:
    return torch.empty_like(mu, memory_format=torch.contiguous_format)


@torch.library.custom_op("fastvae::reparameterize_backward", mutates_args=())
def _reparameterize_backward_op(dz: Tensor, logvar: Tensor, seed: Tensor) -> Tensor:
    return _kernels(dz.device).reparameterize_backward(dz, logvar, int(seed))


@_reparameterize_backward_op.register_fake
def _(dz: Tensor, logvar: Tensor, seed: Tensor) -> Tensor:
    return torch.empty_like(dz, memory_format=torch.contiguous_format)


def _reparameterize_setup(ctx, inputs, output) -> None:
    _, logvar, seed = inputs
    ctx.save_for_backward(logvar, seed)


def _reparameterize_grad(ctx, dz: Tensor):
    # dz/dmu = 1;  dz/dlogvar = exp(logvar / 2) * eps / 2, with eps replayed from the seed.
    logvar, seed = ctx.saved_tensors
    dlogvar = None
    if ctx.needs_input_grad[1]:
        dlogvar = _reparameterize_backward_op(dz.contiguous(), logvar, seed)
    return dz, dlogvar, None


_reparameterize_op.register_autograd(_reparameterize_grad, setup_context=_reparameterize_setup)


@torch.library.custom_op("fastvae::fused_loss", mutates_args=())
def _fused_loss_op(
    logits: Tensor | None,
    target: Tensor | None,
    mu: Tensor | None,
    logvar: Tensor | None,
    beta: float,
    reduction: str,
    recon: str,
    need_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    device = (logits if logits is not None else mu).device
    return _kernels(device).fused_loss(logits, target, mu, logvar, beta, reduction, recon, need_grad)


@_fused_loss_op.register_fake
def _(logits, target, mu, logvar, beta, reduction, recon, need_grad):
    ref = logits if logits is not None else mu
    acc = torch.float64 if ref.dtype == torch.float64 else torch.float32
    shape = (ref.shape[0],) if reduction == "none" else ()
    terms = [ref.new_empty(shape, dtype=acc) for _ in range(3)]

    def grad(x: Tensor | None) -> Tensor:
        return x.new_empty(x.shape) if need_grad and x is not None else ref.new_empty(0)

    return (*terms, grad(logits), grad(mu), grad(logvar))


@torch.library.custom_op("fastvae::scale_grads_", mutates_args=("dlogits", "dmu", "dlogvar"))
def _scale_grads_op(grad: Tensor, dlogits: Tensor, dmu: Tensor, dlogvar: Tensor) -> None:
    """dlogits, dmu, dlogvar *= grad in place (grad is a scalar, or [B] for reduction "none")."""
    _kernels(grad.device).scale_rows_(grad, dlogits, dmu, dlogvar)


@_scale_grads_op.register_fake
def _(grad, dlogits, dmu, dlogvar) -> None:
    return None


def _fused_loss_setup(ctx, inputs, output) -> None:
    ctx.mark_non_differentiable(*output[1:])  # only the loss carries a gradient
    ctx.set_materialize_grads(False)  # no zero-filled [B, F] gradients for the unused outputs
    # The gradient buffers are kept as plain attributes, not saved tensors: the backward scales them
    # in place, which a saved tensor's version check would refuse.  The inputs (references, as
    # BCE-with-logits itself keeps) serve a rare second backward through the same graph.
    ctx.grads = output[3:]
    ctx.save_for_backward(*inputs[:4])
    ctx.options = inputs[4:7]
    ctx.has_logits, ctx.has_kl = inputs[0] is not None, inputs[2] is not None
    ctx.consumed = False


def _fused_loss_grad(ctx, grad_loss: Tensor, *unused):
    # The forward stored d(loss)/d(inputs) for an incoming gradient of 1: the chain rule only multiplies
    # by the real one.  The first eager backward does it in place on buffers nobody else holds (no
    # bytes move when the gradient is 1).  Traced graphs must not mutate saved forward outputs, and a
    # second backward (retain_graph=True, gradcheck) finds the buffers already handed out, so those
    # multiply out of place, the latter after recomputing the gradients from the saved inputs.
    if grad_loss is None:
        return (None,) * 8
    dlogits, dmu, dlogvar = ctx.grads
    inputs = ctx.saved_tensors
    traced = torch.compiler.is_compiling() or type(grad_loss) is not torch.Tensor
    if ctx.consumed and not traced:
        dlogits, dmu, dlogvar = _fused_loss_op(*inputs, *ctx.options, True)[3:]
    if traced or ctx.consumed:
        g = grad_loss.reshape(-1, 1) if grad_loss.dim() == 1 else grad_loss
        dlogits, dmu, dlogvar = ((t * g).to(t.dtype) if t.numel() else t for t in (dlogits, dmu, dlogvar))
    else:
        ctx.consumed = True
        # On CPU reading the gradient is free: skip even the dispatch in the common case of 1.
        if not (grad_loss.device.type == "cpu" and grad_loss.dim() == 0 and grad_loss.item() == 1.0):
            _scale_grads_op(grad_loss.detach(), dlogits, dmu, dlogvar)
    grads = (dlogits if ctx.has_logits else None, None) + ((dmu, dlogvar) if ctx.has_kl else (None, None))
    return grads + (None,) * 4


_fused_loss_op.register_autograd(_fused_loss_grad, setup_context=_fused_loss_setup)


# ----------------------------------------------------------------------------------------------
# Validation: every message names the argument and what was expected
# ----------------------------------------------------------------------------------------------


def _check_tensor(x: object, name: str, *, allow_uint8: bool = False) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    allowed = _FLOATS + ((torch.uint8,) if allow_uint8 else ())
    if x.dtype not in allowed:
        kinds = "float32, float16, bfloat16 or float64" + (" (or uint8 pixels)" if allow_uint8 else "")
        raise TypeError(f"{name} must be a floating-point tensor ({kinds}), got dtype {x.dtype}")
    if x.dim() == 0:
        raise ValueError(f"{name} must have a batch dimension: shape [B, ...], got a 0-d tensor")
    if x.shape[0] == 0:
        raise ValueError(f"{name} has an empty batch (shape {list(x.shape)}); expected at least one sample")
    return x


def _check_same_device(named: dict[str, Tensor]) -> None:
    (first, ref), *rest = named.items()
    for name, x in rest:
        if x.device != ref.device:
            raise ValueError(f"{name} is on {x.device} but {first} is on {ref.device}; expected one device")


def _check_choice(value: str, name: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _check_latent(mu: Tensor, logvar: Tensor) -> None:
    _check_tensor(mu, "mu")
    _check_tensor(logvar, "logvar")
    if mu.shape != logvar.shape:
        raise ValueError(
            f"mu and logvar must have the same shape, got mu {list(mu.shape)} and logvar {list(logvar.shape)}"
        )


def _check_pair(logits: Tensor, target: Tensor) -> None:
    _check_tensor(logits, "logits")
    _check_tensor(target, "target", allow_uint8=True)
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
    if target.requires_grad:
        raise ValueError("target must not require grad: fastvae's losses treat the target as data")


_RANGE_HINT = (
    "Data standardised with a mean and std (e.g. transforms.Normalize((0.1307,), (0.3081,))) gives "
    "silently negative losses; scale images to [0, 1] instead (x / 255), pass uint8 pixels, "
    "or use recon='mse' for unbounded data"
)


def _check_target_range(target: Tensor) -> None:
    """Targets of a Bernoulli likelihood are probabilities: refuse values outside [0, 1] (and NaN)."""
    if target.dtype == torch.uint8:
        return
    lo, hi = torch.aminmax(target.detach())
    if torch.compiler.is_compiling():
        # No host-side branch on data in a traced graph: a runtime assert (a RuntimeError) instead.
        message = f"target must lie in [0, 1] for the BCE loss. {_RANGE_HINT}"
        torch._assert_async((lo >= 0) & (hi <= 1), message)
        return
    lo, hi = float(lo), float(hi)
    if not (0.0 <= lo and hi <= 1.0):  # also False for NaN
        raise ValueError(
            f"target must lie in [0, 1] for the BCE reconstruction loss, got values in [{lo:.4g}, {hi:.4g}]. "
            + _RANGE_HINT
        )


def _rows(x: Tensor) -> Tensor:
    """[B, ...] -> [B, F] with contiguous features (a view when possible, so row-strided slices stay free)."""
    x2 = x.reshape(x.shape[0], -1)
    return x2 if x2.stride(1) == 1 or x2.shape[1] <= 1 else x2.contiguous()


def _needs_grad(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _resolve_validate(validate: bool | None, device: torch.device) -> bool:
    # The range check reads the target and brings two numbers to the host: free on CPU, a
    # synchronisation on CUDA, so there it is opt-in (fastvae's data loaders check data sets once).
    return device.type != "cuda" if validate is None else bool(validate)


def _check_beta(beta: float) -> float:
    beta = float(beta)
    if not (beta >= 0.0 and beta != float("inf")):
        raise ValueError(f"beta must be a finite number >= 0, got {beta}")
    return beta


# ----------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------


class VAELossTerms(NamedTuple):
    """``loss = recon + beta * kl``; ``recon`` and ``kl`` are detached, with the same reduction."""

    loss: Tensor
    recon: Tensor
    kl: Tensor


def _draw_seed() -> Tensor:
    # From torch's default CPU generator, so torch.manual_seed makes runs reproducible; kept a
    # CPU tensor so that torch.compile traces it and no device synchronises.
    return torch.randint(0, 2**62, (), dtype=torch.int64)


def reparameterize(mu: Tensor, logvar: Tensor, *, seed: int | None = None) -> Tensor:
    """Sample ``z = mu + exp(0.5 * logvar) * eps`` with ``eps ~ N(0, 1)`` drawn inside the kernel.

    ``eps`` comes from Philox4x32-10 keyed by ``seed`` and each element's flat (C-order) index, so it
    is never stored, does not depend on block sizes, and is identical on every backend.  With
    ``seed=None`` a seed is drawn from torch's default generator (``torch.manual_seed`` reproduces it).

    Gradients: ``dmu = dz``, ``dlogvar = 0.5 * dz * (z - mu) = 0.5 * dz * exp(0.5 * logvar) * eps``
    (eps is regenerated from the seed, which reads less than ``z`` and ``mu`` and loses no bits).

    Args:
        mu, logvar: ``[B, ...]`` tensors of one shape and floating dtype (fp32, fp16, bf16, fp64).
        seed: an integer in ``[0, 2**63)``, or None.
    Returns:
        ``z``, contiguous, with the shape and dtype of ``mu``.
    """
    _check_latent(mu, logvar)
    _check_same_device({"mu": mu, "logvar": logvar})
    if mu.dtype != logvar.dtype:
        raise TypeError(f"mu and logvar must have the same dtype, got {mu.dtype} and {logvar.dtype}")
    if seed is None:
        seed_t = _draw_seed()
    else:
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < _SEED_LIMIT:
            raise ValueError(f"seed must be an int in [0, 2**63) or None, got {seed!r}")
        seed_t = torch.tensor(seed, dtype=torch.int64)
    return _reparameterize_op(mu.contiguous(), logvar.contiguous(), seed_t)


def _fused(logits, target, mu, logvar, beta, reduction, recon, validate) -> VAELossTerms:
    _check_choice(reduction, "reduction", REDUCTIONS)
    need_grad = _needs_grad(logits, mu, logvar)
    ref = logits if logits is not None else mu
    if logits is not None and recon == "bce" and _resolve_validate(validate, ref.device):
        _check_target_range(target)
    args = [_rows(x) if x is not None else None for x in (logits, target, mu, logvar)]
    loss, rec, kl, *_ = _fused_loss_op(*args, beta, reduction, recon, need_grad)
    return VAELossTerms(loss, rec.detach(), kl.detach())


def vae_loss(
    logits: Tensor,
    target: Tensor,
    mu: Tensor,
    logvar: Tensor,
    *,
    beta: float = 1.0,
    reduction: str = "sum",
    recon: str = "bce",
    return_terms: bool = False,
    validate: bool | None = None,
) -> Tensor | VAELossTerms:
    """The negative ELBO in one kernel pass: ``recon(logits, target) + beta * KL(q(z|x) || N(0, I))``.

    Per sample, with ``x = logits`` (the decoder's output before any sigmoid) and ``t = target``::

        bce:  sum_f max(x, 0) - x t + log1p(exp(-|x|))      (= BCE(sigmoid(x), t), computed stably)
        mse:  sum_f (x - t)^2                               (on the raw decoder output)
        KL:   -0.5 * sum_d (1 + logvar - mu^2 - exp(logvar))

    The gradients with respect to logits, mu and logvar are computed in the same pass; the backward
    only multiplies them by the incoming gradient.

    Args:
        logits: ``[B, ...]`` decoder output, fp32/fp16/bf16/fp64.
        target: the data, same batch and number of features as ``logits``: floats in [0, 1] for bce,
            or uint8 pixels read as ``t / 255`` inside the kernel.
        mu, logvar: ``[B, ...]`` encoder outputs of one shape.
        beta: weight of the KL term (beta-VAE; KL warm-up).
        reduction: ``"sum"`` over batch and features (pytorch/examples), ``"mean"`` over the batch of
            per-sample sums (per-sample negative ELBO), ``"none"`` the per-sample vector ``[B]``.
        recon: ``"bce"`` (Bernoulli decoder) or ``"mse"`` (sum of squared errors).
        return_terms: also return the detached reconstruction and KL terms.
        validate: check that float targets lie in [0, 1] (bce).  Default: on CPU yes; on CUDA no,
            since it synchronises the host (pass True to check there; the data loaders check once).
    Returns:
        The loss (fp32; fp64 for fp64 inputs): a scalar, or ``[B]`` for ``reduction="none"``; or
        :class:`VAELossTerms` with ``return_terms=True``.
    """
    _check_pair(logits, target)
    _check_latent(mu, logvar)
    _check_same_device({"logits": logits, "target": target, "mu": mu, "logvar": logvar})
    if mu.shape[0] != logits.shape[0]:
        raise ValueError(
            f"mu has batch size {mu.shape[0]} but logits has {logits.shape[0]}; expected the same"
        )
    _check_choice(recon, "recon", RECONS)
    terms = _fused(logits, target, mu, logvar, _check_beta(beta), reduction, recon, validate)
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
    _check_same_device({"logits": logits, "target": target})
    return _fused(logits, target, None, None, 1.0, reduction, "bce", validate).loss


def kl_divergence(mu: Tensor, logvar: Tensor, *, reduction: str = "sum") -> Tensor:
    """``KL(N(mu, exp(logvar)) || N(0, I)) = -0.5 * sum_d (1 + logvar - mu^2 - exp(logvar))`` per sample.

    Gradients ``mu`` and ``0.5 * (exp(logvar) - 1)`` are written in the same pass.  Reductions as in
    :func:`vae_loss`.
    """
    _check_latent(mu, logvar)
    _check_same_device({"mu": mu, "logvar": logvar})
    return _fused(None, None, mu, logvar, 1.0, reduction, "none", False).loss
