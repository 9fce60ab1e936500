"""One VAE training step captured as a CUDA graph and replayed: no host work or sync per step.

A training step of a small VAE (MLPVAE 784-400-20 at batch 128) is ~40 kernel launches of a few
microseconds each; launched one by one from Python the GPU waits on the host most of the time.
:class:`GraphedStep` records the whole step once -- encoder, ``reparameterize`` (its key drawn on the
device), decoder, the fused loss, backward, gradient clipping and a capturable Adam step -- and replays
it with one ``cudaGraphLaunch`` per batch, following torch's whole-network capture recipe
(https://pytorch.org/docs/stable/notes/cuda.html#whole-network-capture).

What a replay may not do is read anything on the host or allocate outside the graph, so every quantity
that changes from step to step lives in a device tensor whose address never changes:

* the batch: a static input buffer ``x`` that :meth:`GraphedStep.step` copies each batch into;
* the noise: ``reparameterize(mu, logvar)`` with ``seed=None`` draws its 62-bit key with
  ``torch.randint`` on the device; inside a graph torch's philox generator hands each replay a fresh
  offset, so every replay draws a fresh key and fresh ``eps`` (and ``torch.manual_seed`` before a replay
  reproduces the eager step's key exactly);
* the KL weight: ``beta_t = beta * min(1, steps / kl_warmup)`` is computed from the device step counter
  ``steps`` inside the step, so the warm-up advances without a re-capture;
* the gradients and the optimizer state: the ``.grad`` tensors are zeroed in place
  (``zero_grad(set_to_none=False)``) and backward accumulates into them in place; Adam with
  ``capturable=True`` keeps its step count on the device;
* the result: a static ``[3]`` float32 tensor ``(objective, recon, kl)``.

The first ``warmup_iters`` calls of :meth:`GraphedStep.step` run the step eagerly on a side stream (the
recipe's warm-up: lazy initialisation, cuBLAS workspaces and Adam's state happen outside the capture);
they are ordinary training steps on their own batches.  The next call captures the step and replays
it once; later calls replay.  So every call is exactly one optimizer update, warm-up included.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .ops import reparameterize

__all__ = ["GraphedStep", "Objective"]

# objective(logits, x, mu, logvar, beta_t, free_bits) -> (loss, recon, kl), each summed over the batch;
# loss carries the gradient, recon and kl are detached; beta_t is a 0-d float32 tensor on the device.
Objective = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, float], tuple[Tensor, Tensor, Tensor]]


def _number(value: object, name: str, *, positive: bool = False) -> float:
    """``value`` as a finite float >= 0 (> 0 when ``positive``), or a ValueError/TypeError naming ``name``."""
    expected = f"{name} must be a finite number {'> 0' if positive else '>= 0'}"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{expected}; got {type(value).__name__} {value!r}")
    value = float(value)
    if not (math.isfinite(value) and (value > 0 if positive else value >= 0)):
        raise ValueError(f"{expected}; got {value!r}")
    return value


def _count(value: object, name: str, low: int = 0) -> int:
    """``value`` as an int >= ``low``, or a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def _resolve(device: torch.device | str) -> torch.device:
    """``device`` with a CUDA index filled in (``cuda`` -> ``cuda:<current>``), so it compares equal to a
    tensor's ``.device``."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be a torch.device such as 'cuda' or 'cpu', got {device!r}") from e
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


class GraphedStep:
    """One training step captured once per batch shape and replayed: forward, fused loss, backward, optimizer.

    Each call of :meth:`step` performs, on the batch ``x`` (copied into a static buffer)::

        grads = 0                                              (in place: the .grad tensors stay put)
        mu, logvar = model.encode(x)
        z = mu + exp(logvar / 2) * eps,   eps ~ N(0, I)        (fastvae.reparameterize, key drawn on device)
        logits = model.decode(z)
        beta_t = beta * min(1, steps / kl_warmup)              (beta when kl_warmup == 0; on the device)
        loss, recon, kl = objective(logits, x, mu, logvar, beta_t, free_bits)
        loss.backward();  clip_grad_norm_(params, grad_clip);  optimizer.step();  steps += 1

    With ``capture=True`` (CUDA only) the first ``warmup_iters`` calls run this eagerly on a side stream,
    the next call captures it as a CUDA graph and replays it, and later calls only replay; each call is one
    optimizer update.  With ``capture=False`` every call runs the same code eagerly on the same static
    buffers (the CPU path, and the reference the graph is tested against).

    Args:
        model: a VAE with ``encode(x) -> (mu, logvar)`` and ``decode(z) -> logits``, on ``device``.
        optimizer: the optimizer of ``model``'s parameters; for ``capture=True`` every parameter group
            must be capturable (``torch.optim.Adam(params, lr=..., capturable=True)``).
        objective: ``objective(logits, x, mu, logvar, beta_t, free_bits) -> (loss, recon, kl)``, each
            summed over the batch, ``recon`` and ``kl`` detached, with no host reads (for capture).
        batch_shape: the shape of every batch this step accepts (the static input buffer's shape).
        dtype: the dtype of every batch (e.g. ``torch.uint8`` pixels).
        device: the device of the model and the buffers.
        beta: the KL weight after warm-up, finite and >= 0.
        kl_warmup: steps of linear KL warm-up (0: none).
        free_bits: passed on to ``objective`` (nats per latent dimension; 0: none).
        grad_clip: clip the global gradient norm to this value, or None.
        start_step: the step counter's initial value (the optimizer steps already taken, on resume).
        capture: capture a CUDA graph (True) or run eagerly (False).
        warmup_iters: eager side-stream steps before the capture (>= 1 when ``capture``).

    After the first step the ``.grad`` tensors and the optimizer's state are the graph's static buffers:
    a ``.grad`` set to None (``zero_grad(set_to_none=True)`` by eager code in between) is put back, but a
    ``.grad`` replaced by another tensor or a new optimizer state (``optimizer.load_state_dict``) is
    refused with a RuntimeError -- build a new GraphedStep after loading a state.  Parameters loaded with
    ``model.load_state_dict`` are copied in place and are fine.  Autocast and DDP are not handled here.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        objective: Objective,
        *,
        batch_shape: tuple[int, ...],
        dtype: torch.dtype,
        device: torch.device,
        beta: float,
        kl_warmup: int,
        free_bits: float,
        grad_clip: float | None,
        start_step: int = 0,
        capture: bool = True,
        warmup_iters: int = 3,
    ) -> None:
        if not isinstance(model, nn.Module) or not (
            callable(getattr(model, "encode", None)) and callable(getattr(model, "decode", None))
        ):
            raise TypeError(
                "model must be an nn.Module with encode(x) -> (mu, logvar) and decode(z) -> logits, "
                f"got {type(model).__name__}"
            )
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not callable(objective):
            raise TypeError(
                "objective must be callable as objective(logits, x, mu, logvar, beta_t, free_bits) -> "
                f"(loss, recon, kl), got {type(objective).__name__}"
            )
        if (
            not isinstance(batch_shape, tuple | list | torch.Size)
            or not batch_shape
            or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in batch_shape)
        ):
            raise ValueError(f"batch_shape must be a non-empty tuple of integers >= 1, got {batch_shape!r}")
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype must be a torch.dtype such as torch.uint8, got {dtype!r}")
        if not isinstance(capture, bool):
            raise TypeError(f"capture must be True or False, got {capture!r}")
        self.beta = _number(beta, "beta")
        self.kl_warmup = _count(kl_warmup, "kl_warmup")
        self.free_bits = _number(free_bits, "free_bits")
        self.grad_clip = None if grad_clip is None else _number(grad_clip, "grad_clip", positive=True)
        start_step = _count(start_step, "start_step")
        self.warmup_iters = _count(warmup_iters, "warmup_iters", low=1 if capture else 0)
        if capture:
            # Torch's own check fires only inside the capture, after the warm-up steps: refuse up front.
            flags = [group.get("capturable", False) for group in optimizer.param_groups]
            if not all(flags):
                raise ValueError(
                    "capture=True needs a capturable optimizer, e.g. torch.optim.Adam(params, lr=..., "
                    f"capturable=True); got {type(optimizer).__name__} with capturable={flags}"
                )
        self.device = _resolve(device)
        if capture and self.device.type != "cuda":
            raise ValueError(
                f"capture=True records a CUDA graph and needs device='cuda', got device='{self.device}' "
                "(use capture=False to run the same step eagerly)"
            )
        self._params = [p for p in model.parameters() if p.requires_grad]
        if not self._params:
            raise ValueError("model has no parameters that require grad: there is nothing to train")
        elsewhere = sorted({str(p.device) for p in self._params if p.device != self.device})
        if elsewhere:
            raise ValueError(f"model parameters must be on device='{self.device}', found some on {elsewhere}")

        self.model, self.optimizer, self.objective = model, optimizer, objective
        self.capture = capture
        self.batch_shape = tuple(batch_shape)
        self.dtype = dtype
        # The static buffers every step reads and writes (a captured graph holds their addresses).
        self._x = torch.zeros(self.batch_shape, dtype=dtype, device=self.device)
        self._steps = torch.tensor(start_step, dtype=torch.int64, device=self.device)
        self._terms = torch.zeros(3, dtype=torch.float32, device=self.device)
        # beta in float64, so that beta_t rounds once to float32, as the host's beta * min(1, s / w) does
        # (MPS has no float64: float32 there).
        wide = torch.float32 if self.device.type == "mps" else torch.float64
        self._beta64 = torch.tensor(self.beta, dtype=wide, device=self.device)
        self._beta32 = torch.tensor(self.beta, dtype=torch.float32, device=self.device)
        self._calls = 0  # step() calls so far (host-side: decides warm-up, capture or replay)
        self._graph: torch.cuda.CUDAGraph | None = None
        self._side = torch.cuda.Stream(self.device) if capture else None
        self._grads: list[Tensor | None] | None = None  # the static .grad tensors, once recorded
        self._state: object = None  # the optimizer's state dict object, once recorded

    @property
    def steps(self) -> Tensor:
        """The device step counter (int64 0-d): optimizer steps taken, ``start_step`` included.

        The warm-up schedule reads it; an optimizer step taken outside this object (an eager last partial
        batch) should advance it in place, ``steps.add_(1)``, which a captured graph sees.
        """
        return self._steps

    def beta_t(self) -> Tensor:
        """``beta * min(1, steps / kl_warmup)`` (``beta`` when ``kl_warmup == 0``): a 0-d float32 tensor
        computed on the device from the step counter (float64 arithmetic, rounded once to float32)."""
        if self.kl_warmup == 0:
            return self._beta32
        ramp = (self._steps.to(self._beta64.dtype) / self.kl_warmup).clamp_(max=1.0)
        return (self._beta64 * ramp).float()

    def step(self, x: Tensor) -> Tensor:
        """Copy x into the static input, replay (or run the same code eagerly when capture=False), advance the
        device step counter; return a [3] float32 device tensor (objective, recon, kl), summed over the batch,
        valid until the next call (clone to keep it). No host sync."""
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if tuple(x.shape) != self.batch_shape:
            raise ValueError(
                f"x has shape {list(x.shape)} but this GraphedStep was built for batch_shape "
                f"{list(self.batch_shape)} (run other shapes eagerly, or build another GraphedStep)"
            )
        if x.dtype != self.dtype:
            raise ValueError(f"x has dtype {x.dtype} but this GraphedStep was built for dtype={self.dtype}")
        self._check_static()
        self._x.copy_(x, non_blocking=True)  # B * F * itemsize bytes, on the current stream
        if not self.capture:
            self._body()
        elif self._graph is not None:
            self._graph.replay()
        elif self._calls < self.warmup_iters:
            self._warmup()
        else:
            self._capture()
        if self._grads is None and (not self.capture or self._graph is not None):
            self._record_static()
        self._calls += 1
        return self._terms

    # ------------------------------------------------------------------ the step itself

    def _body(self) -> None:
        """The training step, on the static buffers: eager, or recorded by a capture."""
        self.optimizer.zero_grad(set_to_none=False)  # in place: the .grad addresses stay the same
        mu, logvar = self.model.encode(self._x)
        z = reparameterize(mu, logvar)  # seed=None: the key is drawn on the device (fresh each replay)
        logits = self.model.decode(z)
        loss, recon, kl = self.objective(logits, self._x, mu, logvar, self.beta_t(), self.free_bits)
        loss.backward()
        if self.grad_clip is not None:
            # g <- g * min(1, clip / (||g||_2 + 1e-6)), the norm over all gradients, kept on the device.
            nn.utils.clip_grad_norm_(self._params, self.grad_clip)
        self.optimizer.step()
        self._terms.copy_(torch.stack((loss.detach().float(), recon.float(), kl.float())))
        self._steps.add_(1)

    def _warmup(self) -> None:
        """One eager step on a side stream (torch's recipe: warm-up work stays off the capture stream)."""
        current = torch.cuda.current_stream(self.device)
        self._side.wait_stream(current)  # after the copy into the static input
        with torch.cuda.stream(self._side):
            self._body()
        current.wait_stream(self._side)

    def _capture(self) -> None:
        """Record the step as a CUDA graph, then replay it once: this call's update.

        The capture itself runs no kernel and draws no random number; Adam's state and the .grad tensors
        exist already (the warm-up steps made them), so the graph only updates them in place.
        """
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # synchronises first, so the copy of x has landed
            self._body()
        self._graph = graph
        graph.replay()

    # ------------------------------------------------------------------ static-buffer bookkeeping

    def _record_static(self) -> None:
        """Remember the .grad tensors and the optimizer's state object the step now writes in place."""
        self._grads = [p.grad for p in self._params]
        self._state = self.optimizer.state

    def _check_static(self) -> None:
        """Before a step: the buffers the graph (or the eager step) writes are the recorded ones.

        A .grad set to None in between is restored (the step zeroes it first); anything else replaced
        would leave a graph writing freed memory or stale state, so it is refused.
        """
        if self._grads is None:
            return
        if self.optimizer.state is not self._state:
            raise RuntimeError(
                "the optimizer's state was replaced (optimizer.load_state_dict?) after this GraphedStep "
                "recorded it: build a new GraphedStep after loading optimizer state"
            )
        for i, (p, g) in enumerate(zip(self._params, self._grads, strict=True)):
            if p.grad is None and g is not None:
                p.grad = g
            elif g is not None and p.grad is not g:
                raise RuntimeError(
                    f"the .grad of parameter {i} (shape {list(p.shape)}) was replaced by another tensor "
                    "after this GraphedStep recorded it; use zero_grad() (in place or set_to_none) instead"
                )
