"""Reference VAE architectures: pytorch/examples' MLP VAE and the Keras convolutional VAE.

Conventions shared by both models:

* inputs are ``[B, *in_shape]``, either ``uint8`` pixels (converted to ``x / 255`` inside
  :meth:`encode`) or floats in ``[0, 1]``;
* the decoder returns **logits** ``[B, *in_shape]`` (no sigmoid): the fused
  :func:`fastvae.vae_loss` applies BCE-with-logits, which is stable where ``sigmoid`` + BCE
  is not; :meth:`sample` and :meth:`reconstruct` apply the sigmoid for display;
* the encoder returns ``(mu, logvar)``, the mean and log-variance of the diagonal Gaussian
  ``q(z | x)``; :meth:`forward` draws ``z = mu + exp(logvar / 2) * eps`` with the fused
  :func:`fastvae.reparameterize` (always sampled, as the ELBO needs, also in eval mode);
* ``config()`` returns a JSON-able dict and :func:`build_model` rebuilds the model from it
  (weights are saved separately by the checkpoint code).

Typical training step::

    logits, mu, logvar = model(x)            # x uint8 [B, 1, 28, 28]
    loss = fastvae.vae_loss(logits, x, mu, logvar)   # negative ELBO, summed
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from .ops import reparameterize

__all__ = ["VAEBase", "MLPVAE", "ConvVAE", "build_model", "MODELS", "MAX_PARAMETERS", "MAX_LAYERS"]


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """``model.eval()`` and ``torch.no_grad()`` inside; the model's previous mode restored after (the
    Trainer's evaluation and the pictures)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


# Bounds checked before any layer is allocated, so that a config from an untrusted checkpoint
# (e.g. ``hidden: [400000000]``: 6.5e11 parameters, 2.6 TB of float32) is refused in one line instead
# of exhausting memory.  10**9 parameters are 4 GB of float32 weights (16 GB with Adam's two moments
# and the gradient); the reference models have 6.5e5 (MLP) and 1.3e5 (conv).
MAX_PARAMETERS = 10**9
MAX_LAYERS = 64  # hidden layers (MLP) or stride-2 stages (conv)


class VAEBase(nn.Module):
    """Shared input handling, sampling and reconstruction for the VAE models.

    Subclasses set ``in_shape``, ``latent``, ``hidden`` and implement :meth:`_encode` (float
    input ``[B, *in_shape]`` -> ``(mu, logvar)``) and :meth:`decode`.
    """

    kind: str = ""
    in_shape: tuple[int, ...]
    latent: int
    hidden: tuple[int, ...]

    @property
    def n_features(self) -> int:
        """Number of features per sample, ``prod(in_shape)``."""
        return math.prod(self.in_shape)

    def _param(self) -> torch.Tensor:
        return next(self.parameters())

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Check ``x`` is ``[B, *in_shape]``; convert it to the parameters' float dtype (uint8 -> x/255)."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{type(self).__name__} expects a torch.Tensor, got {type(x).__name__}")
        if x.ndim < 1 or tuple(x.shape[1:]) != self.in_shape:
            raise ValueError(
                f"{type(self).__name__} expects input of shape [B, {', '.join(map(str, self.in_shape))}] "
                f"(in_shape={self.in_shape}), got {tuple(x.shape)}"
            )
        dtype = self._param().dtype
        if x.dtype == torch.uint8:
            return x.to(dtype) / 255.0
        if not x.is_floating_point():
            raise TypeError(
                f"{type(self).__name__} expects uint8 pixels or floats in [0, 1], got dtype {x.dtype}"
            )
        return x.to(dtype)

    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` ``[B, *in_shape]`` (uint8 or float in [0, 1]) -> ``(mu, logvar)``, both ``[B, latent]``."""
        return self._encode(self._prepare(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """``z`` ``[B, latent]`` -> logits ``[B, *in_shape]`` (apply ``sigmoid`` for pixel means)."""
        raise NotImplementedError

    def _check_latent(self, z: torch.Tensor) -> None:
        if z.ndim != 2 or z.shape[1] != self.latent:
            raise ValueError(
                f"{type(self).__name__}.decode expects z of shape [B, {self.latent}] (latent={self.latent}), "
                f"got {tuple(z.shape)}"
            )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x`` -> ``(logits, mu, logvar)``: encode, draw ``z = mu + exp(logvar/2) * eps``, decode.

        ``z`` is drawn with :func:`fastvae.reparameterize` (``eps`` generated in the kernel from a
        seed taken from torch's default generator, so ``torch.manual_seed`` makes it reproducible).
        """
        mu, logvar = self.encode(x)
        z = reparameterize(mu, logvar)
        return self.decode(z), mu, logvar

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` images ``[n, *in_shape]`` in [0, 1] from the prior: ``sigmoid(decode(z))``, ``z ~ N(0, I)``.

        ``generator`` may live on the CPU for a model on the GPU (``z`` is then drawn on the CPU
        and moved).
        """
        if n < 0:
            raise ValueError(f"n must be non-negative, got {n}")
        p = self._param()
        gen_device = p.device if generator is None else generator.device
        z = torch.randn(n, self.latent, generator=generator, device=gen_device, dtype=p.dtype)
        return torch.sigmoid(self.decode(z.to(p.device)))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``[B, *in_shape]`` in [0, 1] decoded from the posterior mean: ``sigmoid(decode(mu(x)))``."""
        mu, _ = self.encode(x)
        return torch.sigmoid(self.decode(mu))

    def config(self) -> dict[str, Any]:
        """``{"model", "in_shape", "latent", "hidden"}``: what :func:`build_model` needs to rebuild it."""
        return {
            "model": self.kind,
            "in_shape": list(self.in_shape),
            "latent": self.latent,
            "hidden": list(self.hidden),
        }

    def extra_repr(self) -> str:
        return f"in_shape={self.in_shape}, latent={self.latent}, hidden={self.hidden}"


def _positive_ints(values: Sequence[int] | int, name: str) -> tuple[int, ...]:
    values = (values,) if isinstance(values, int) else tuple(values)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
        raise ValueError(f"{name} must be a sequence of positive integers, got {values!r}")
    return tuple(int(v) for v in values)


def _check_latent_size(latent: int) -> int:
    if not isinstance(latent, int) or isinstance(latent, bool) or latent < 1:
        raise ValueError(f"latent must be a positive integer, got {latent!r}")
    return int(latent)


def _check_size(kind: str, n_params: int, layers: int, desc: str) -> None:
    """Refuse a model with more than :data:`MAX_PARAMETERS` parameters or :data:`MAX_LAYERS` layers."""
    if layers > MAX_LAYERS:
        raise ValueError(
            f"{kind} config has {layers} hidden layers, more than the bound MAX_LAYERS={MAX_LAYERS}"
        )
    if n_params > MAX_PARAMETERS:
        raise ValueError(
            f"{kind} {desc} would have {n_params:.3g} parameters ({4 * n_params / 1e9:.3g} GB of float32), "
            f"more than the bound MAX_PARAMETERS={MAX_PARAMETERS:.0e}; refusing to allocate it"
        )


def _linear_parameters(widths: Sequence[int]) -> int:
    """Parameters of ``Linear(w0, w1), Linear(w1, w2), ...``: ``sum(a * b + b)`` (weight and bias)."""
    return sum(a * b + b for a, b in zip(widths[:-1], widths[1:], strict=True))


class MLPVAE(VAEBase):
    """Fully connected VAE; the defaults are pytorch/examples' ``vae/main.py`` model.

    Encoder: flatten, ``Linear(F, h1)`` ReLU ... ``Linear(h_{k-1}, h_k)`` ReLU, then
    ``Linear(h_k, latent)`` twice (``mu`` and ``logvar``).  The decoder mirrors it:
    ``Linear(latent, h_k)`` ReLU ... ``Linear(h_1, F)`` -> logits, reshaped to ``in_shape``.
    With ``in_shape=(1, 28, 28), hidden=(400,), latent=20`` this is fc1 784->400, fc21/fc22
    400->20, fc3 20->400, fc4 400->784.  ``in_shape`` may be any shape, e.g. ``(F,)`` for flat
    feature vectors; ``hidden=()`` gives a linear encoder and decoder.
    """

    kind = "mlp"

    def __init__(
        self, in_shape: Sequence[int] = (1, 28, 28), hidden: Sequence[int] = (400,), latent: int = 20
    ) -> None:
        super().__init__()
        self.in_shape = _positive_ints(in_shape, "in_shape")
        if not self.in_shape:
            raise ValueError("in_shape must have at least one dimension, e.g. (1, 28, 28) or (784,)")
        self.hidden = _positive_ints(hidden, "hidden") if hidden else ()
        self.latent = _check_latent_size(latent)
        _check_size(
            "MLPVAE",
            self.num_parameters(self.in_shape, self.hidden, self.latent),
            len(self.hidden),
            f"in_shape={self.in_shape} hidden={self.hidden} latent={self.latent}",
        )

        widths = [self.n_features, *self.hidden]
        enc: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:], strict=True):
            enc += [nn.Linear(a, b), nn.ReLU()]
        self.encoder = nn.Sequential(*enc)
        self.fc_mu = nn.Linear(widths[-1], self.latent)
        self.fc_logvar = nn.Linear(widths[-1], self.latent)

        widths_dec = [self.latent, *reversed(self.hidden), self.n_features]
        dec: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(widths_dec[:-1], widths_dec[1:], strict=True)):
            dec.append(nn.Linear(a, b))
            if i < len(widths_dec) - 2:
                dec.append(nn.ReLU())
        self.decoder = nn.Sequential(*dec)

    @staticmethod
    def num_parameters(in_shape: Sequence[int], hidden: Sequence[int], latent: int) -> int:
        """Parameter count, computed without building: encoder ``F -> h1 -> ... -> hk``, two heads
        ``hk -> latent``, decoder ``latent -> hk -> ... -> h1 -> F`` (``F = prod(in_shape)``), each
        ``Linear(a, b)`` holding ``a * b + b``."""
        f = math.prod(in_shape)
        enc = [f, *hidden]
        return (
            _linear_parameters(enc)
            + 2 * _linear_parameters([enc[-1], latent])
            + _linear_parameters([latent, *reversed(hidden), f])
        )

    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x.reshape(x.shape[0], -1))
        return self.fc_mu(h), self.fc_logvar(h)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """``z`` ``[B, latent]`` -> logits ``[B, *in_shape]``."""
        self._check_latent(z)
        return self.decoder(z).reshape(z.shape[0], *self.in_shape)


class ConvVAE(VAEBase):
    """Convolutional VAE; the defaults are the Keras example's model (``keras.io/examples/generative/vae``).

    With ``hidden=(32, 64, 16)`` (conv channels, then the dense width):

    * encoder: ``Conv2d(C, 32, 3, stride=2, padding=1)`` ReLU, ``Conv2d(32, 64, 3, 2, 1)`` ReLU,
      flatten, ``Linear(64*H/4*W/4, 16)`` ReLU, then ``Linear(16, latent)`` for ``mu`` and for
      ``logvar``;
    * decoder: ``Linear(latent, 64*H/4*W/4)`` ReLU, reshape, ``ConvTranspose2d(64, 64, 3, 2, 1,
      output_padding=1)`` ReLU, ``ConvTranspose2d(64, 32, 3, 2, 1, output_padding=1)`` ReLU,
      ``ConvTranspose2d(32, C, 3, padding=1)`` -> logits.

    ``hidden = (c_1, ..., c_k, dense)`` generalises to ``k`` stride-2 stages; ``H`` and ``W``
    must then be divisible by ``2**k`` (4 for the default), so that the decoder's transposed
    convolutions land exactly on ``in_shape``.
    """

    kind = "conv"

    def __init__(
        self, in_shape: Sequence[int] = (1, 28, 28), latent: int = 2, hidden: Sequence[int] = (32, 64, 16)
    ) -> None:
        super().__init__()
        self.in_shape = _positive_ints(in_shape, "in_shape")
        self.hidden = _positive_ints(hidden, "hidden")
        self.latent = _check_latent_size(latent)
        if len(self.in_shape) != 3:
            raise ValueError(f"ConvVAE needs in_shape=(C, H, W), got {self.in_shape}")
        if len(self.hidden) < 2:
            raise ValueError(
                f"ConvVAE hidden must be (conv channels..., dense width) with at least one conv stage, "
                f"got {self.hidden}"
            )
        c, h, w = self.in_shape
        channels, dense = self.hidden[:-1], self.hidden[-1]
        if len(channels) > MAX_LAYERS:
            _check_size("ConvVAE", 0, len(channels), f"hidden={self.hidden}")
        factor = 2 ** len(channels)
        if h % factor or w % factor:
            raise ValueError(
                f"ConvVAE with {len(channels)} stride-2 stages needs H and W divisible by {factor}, "
                f"got in_shape={self.in_shape}"
            )
        _check_size(
            "ConvVAE",
            self.num_parameters(self.in_shape, self.hidden, self.latent),
            len(channels),
            f"in_shape={self.in_shape} hidden={self.hidden} latent={self.latent}",
        )
        self._bottleneck = (channels[-1], h // factor, w // factor)
        flat = math.prod(self._bottleneck)

        enc: list[nn.Module] = []
        for a, b in zip((c, *channels[:-1]), channels, strict=True):
            enc += [nn.Conv2d(a, b, 3, stride=2, padding=1), nn.ReLU()]
        enc += [nn.Flatten(), nn.Linear(flat, dense), nn.ReLU()]
        self.encoder = nn.Sequential(*enc)
        self.fc_mu = nn.Linear(dense, self.latent)
        self.fc_logvar = nn.Linear(dense, self.latent)

        self.fc_decode = nn.Linear(self.latent, flat)
        rev = tuple(reversed(channels))
        dec: list[nn.Module] = []
        for a, b in zip((rev[0], *rev[:-1]), rev, strict=True):
            dec += [nn.ConvTranspose2d(a, b, 3, stride=2, padding=1, output_padding=1), nn.ReLU()]
        dec.append(nn.ConvTranspose2d(rev[-1], c, 3, padding=1))
        self.decoder = nn.Sequential(*dec)

    @staticmethod
    def num_parameters(in_shape: Sequence[int], hidden: Sequence[int], latent: int) -> int:
        """Parameter count, computed without building (``in_shape = (C, H, W)``, ``hidden`` as above).

        A 3x3 (transposed) convolution ``a -> b`` holds ``9 a b + b``; with ``k`` stages the
        bottleneck is ``flat = c_k * (H / 2^k) * (W / 2^k)``.  Encoder convs ``C -> c_1 -> ... -> c_k``,
        ``Linear(flat, dense)``, two heads ``Linear(dense, latent)``, ``Linear(latent, flat)``, decoder
        convs ``c_k -> c_k -> c_{k-1} -> ... -> c_1`` and ``c_1 -> C``.
        """
        c, h, w = in_shape
        channels, dense = tuple(hidden[:-1]), hidden[-1]
        factor = 2 ** len(channels)
        flat = channels[-1] * (h // factor) * (w // factor)
        conv = lambda a, b: 9 * a * b + b  # noqa: E731
        rev = tuple(reversed(channels))
        enc = sum(conv(a, b) for a, b in zip((c, *channels[:-1]), channels, strict=True))
        dec = sum(conv(a, b) for a, b in zip((rev[0], *rev[:-1]), rev, strict=True)) + conv(rev[-1], c)
        heads = 2 * _linear_parameters([dense, latent])
        return enc + _linear_parameters([flat, dense]) + heads + _linear_parameters([latent, flat]) + dec

    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x)
        return self.fc_mu(h), self.fc_logvar(h)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """``z`` ``[B, latent]`` -> logits ``[B, C, H, W]``."""
        self._check_latent(z)
        h = torch.relu(self.fc_decode(z)).reshape(z.shape[0], *self._bottleneck)
        return self.decoder(h)


MODELS: dict[str, type[VAEBase]] = {"mlp": MLPVAE, "conv": ConvVAE}


def build_model(config: dict[str, Any]) -> VAEBase:
    """Rebuild a model from ``model.config()``: ``{"model": "mlp"|"conv", "in_shape", "latent", "hidden"}``.

    ``in_shape``, ``latent`` and ``hidden`` are optional (the class defaults apply); unknown
    keys are refused so that a typo does not silently fall back to a default.  A config of more
    than :data:`MAX_PARAMETERS` parameters or :data:`MAX_LAYERS` layers is refused (``ValueError``)
    before anything is allocated.  The returned model has freshly initialised weights: load the
    state dict separately.
    """
    if not isinstance(config, dict) or "model" not in config:
        raise ValueError(f"config must be a dict with a 'model' key ({sorted(MODELS)}), got {config!r}")
    kind = config["model"]
    if kind not in MODELS:
        raise ValueError(f"config['model'] must be one of {sorted(MODELS)}, got {kind!r}")
    allowed = {"model", "in_shape", "latent", "hidden"}
    unknown = set(config) - allowed
    if unknown:
        raise ValueError(f"unknown model config keys {sorted(unknown)}; allowed keys are {sorted(allowed)}")
    kwargs = {k: config[k] for k in ("in_shape", "latent", "hidden") if k in config}
    for key in ("in_shape", "hidden"):
        if key in kwargs:
            if not isinstance(kwargs[key], list | tuple):
                raise ValueError(f"config['{key}'] must be a list of positive integers, got {kwargs[key]!r}")
            kwargs[key] = tuple(kwargs[key])
    return MODELS[kind](**kwargs)
