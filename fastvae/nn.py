"""``torch.nn`` modules over the fused ops, and diffusers' posterior (:class:`DiagonalGaussian`)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fastvae.ops import VAELossTerms, kl_divergence, reparameterize, vae_loss

__all__ = ["DiagonalGaussian", "Reparameterize", "VAELoss"]


class Reparameterize(nn.Module):
    """``z = mu + exp(0.5 * logvar) * eps`` (see :func:`fastvae.reparameterize`).

    Samples in training and in evaluation alike (the ELBO needs a sample); use ``mu`` itself where
    a deterministic code is wanted.
    """

    def __init__(self, seed: int | None = None) -> None:
        super().__init__()
        self.seed = seed

    def forward(self, mu: Tensor, logvar: Tensor) -> Tensor:
        return reparameterize(mu, logvar, seed=self.seed)

    def extra_repr(self) -> str:
        return f"seed={self.seed}"


class VAELoss(nn.Module):
    """``recon(logits, target) + beta * KL`` in one pass (see :func:`fastvae.vae_loss`).

    With ``recon="gaussian"`` and ``learn_scale=`` a per-sample shape (``()`` for one scale, ``(C, 1, 1)``
    per channel, ``(C, H, W)`` per element), the module owns the decoder's log standard deviation as a
    parameter ``log_scale`` (initialised to 0, sigma = 1), trained with the model (sigma-VAE).
    """

    def __init__(
        self,
        *,
        beta: float = 1.0,
        reduction: str = "sum",
        recon: str = "bce",
        learn_scale: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__()
        self.beta, self.reduction, self.recon = beta, reduction, recon
        if learn_scale is not None and recon != "gaussian":
            raise ValueError(f"learn_scale needs recon='gaussian', got recon={recon!r}")
        self.log_scale = None if learn_scale is None else nn.Parameter(torch.zeros(learn_scale))

    def forward(
        self,
        logits: Tensor,
        target: Tensor,
        mu: Tensor | None = None,
        logvar: Tensor | None = None,
        *,
        prior_mu: Tensor | None = None,
        prior_logvar: Tensor | None = None,
        return_terms: bool = False,
    ) -> torch.Tensor | VAELossTerms:
        return vae_loss(
            logits,
            target,
            mu,
            logvar,
            beta=self.beta,
            reduction=self.reduction,
            recon=self.recon,
            log_scale=self.log_scale,
            prior_mu=prior_mu,
            prior_logvar=prior_logvar,
            return_terms=return_terms,
        )

    def extra_repr(self) -> str:
        scale = "" if self.log_scale is None else f", learn_scale={tuple(self.log_scale.shape)}"
        return f"beta={self.beta}, reduction={self.reduction!r}, recon={self.recon!r}{scale}"


# ----------------------------------------------------------------------------------------------
# diffusers' DiagonalGaussianDistribution over the fused ops
# ----------------------------------------------------------------------------------------------

_LOG_2PI = math.log(2.0 * math.pi)
_SEED_HIGH = 2**62  # seeds drawn from a torch.Generator: [0, 2**62), as fastvae draws its own keys
_KL_DIMS = (1, 2, 3)  # diffusers' kl() sums these dims


def _seed_from(generator: object, name: str = "generator") -> int:
    """One seed in ``[0, 2**62)`` drawn from ``generator`` on its own device (advances its state).

    The same generator state gives the same seed on every machine; on a CUDA generator reading it
    to the host is a synchronisation.
    """
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"{name} must be a torch.Generator (or None), got {type(generator).__name__}")
    draw = torch.randint(0, _SEED_HIGH, (1,), generator=generator, device=generator.device)
    return int(draw)


class DiagonalGaussian:
    r"""The posterior ``q(z | x) = N(mean, diag(exp(logvar)))`` of an encoder, with the interface of
    diffusers' ``DiagonalGaussianDistribution`` (``diffusers/models/autoencoders/vae.py``), backed by
    the fused ops.  A drop-in: ``posterior = DiagonalGaussian(moments)`` where a training script had
    ``DiagonalGaussianDistribution(moments)`` (``AutoencoderKL.encode`` returns it as ``latent_dist``).

    Built from the encoder's ``parameters`` tensor ``[B, 2C, ...]``::

        mean, logvar = parameters.chunk(2, dim=1)          # views of parameters (no copy)
        logvar       = clamp(logvar, -30, 20)              # d/dlogvar = 0 outside [-30, 20]
        std = exp(logvar / 2),  var = exp(logvar)          # computed on access

    ``sample()`` is :func:`fastvae.reparameterize` (eps drawn inside the kernel, never stored);
    ``kl()`` is :func:`fastvae.kl_divergence` (the KL and its gradients in one pass); ``nll()`` and
    ``mode()`` are diffusers' formulas.  With ``deterministic=True``, as in diffusers: ``std`` and
    ``var`` are zeros, ``sample()`` is the mean, ``kl()`` and ``nll()`` are ``torch.Tensor([0.0])``.

    Differences from diffusers, all deliberate: ``std`` and ``var`` are computed when read (the
    fused ops do not need them); ``kl()`` is accumulated and returned in float32 for fp16/bf16
    parameters (float64 for float64); ``sample(generator)`` draws a seed from the generator rather
    than the normals themselves, so its bits differ from ``randn_tensor``'s while the distribution
    is the same and the same generator state still gives the same sample.

    Args:
        parameters: ``[B, 2C, ...]`` floating-point tensor (fp32/fp16/bf16/fp64): mean and log-variance
            stacked along dim 1.
        deterministic: a point mass at the mean (see above).
    """

    def __init__(self, parameters: Tensor, deterministic: bool = False) -> None:
        if not isinstance(parameters, Tensor) or not parameters.is_floating_point():
            got = f"dtype {parameters.dtype}" if isinstance(parameters, Tensor) else type(parameters).__name__
            raise TypeError(f"parameters must be a floating-point torch.Tensor [B, 2C, ...], got {got}")
        if parameters.dim() < 2:
            raise ValueError(
                f"parameters must have at least 2 dims [B, 2C, ...] (mean and logvar along dim 1), "
                f"got shape {list(parameters.shape)}"
            )
        if parameters.shape[1] % 2:
            raise ValueError(
                f"parameters must have an even size along dim 1 (mean and logvar stacked: 2C), "
                f"got shape {list(parameters.shape)}"
            )
        self.parameters = parameters
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)  # views: no bytes move
        # One pass over the N latent elements (read N, write N); its backward passes the gradient
        # where -30 <= logvar <= 20 and writes 0 elsewhere.  diffusers also writes std and var here
        # (2 more passes); they are computed only when read.
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.deterministic = bool(deterministic)

    @property
    def std(self) -> Tensor:
        """``exp(logvar / 2)`` (zeros when deterministic)."""
        return torch.zeros_like(self.mean) if self.deterministic else torch.exp(0.5 * self.logvar)

    @property
    def var(self) -> Tensor:
        """``exp(logvar)`` (zeros when deterministic)."""
        return torch.zeros_like(self.mean) if self.deterministic else torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | list[torch.Generator] | None = None) -> Tensor:
        """``z = mean + exp(logvar / 2) * eps``, ``eps ~ N(0, I)`` drawn inside the kernel.

        Gradients reach ``parameters`` through ``mean`` (``dz``) and the clamped ``logvar``
        (``0.5 * dz * std * eps``, eps regenerated from its key).

        Args:
            generator: None: a fresh key from torch's generator on the tensors' device (so
                ``torch.manual_seed`` reproduces it, eager and compiled alike).  A ``torch.Generator``:
                the seed ``torch.randint(0, 2**62, (1,), generator=generator)`` is drawn on the
                generator's device (advancing it), so the same generator state gives the same sample.
                A list of one generator per sample (diffusers' pipelines pass these): row ``b`` is
                drawn with the seed from ``generator[b]``, independent of the rest of the batch.
                The bits differ from diffusers' ``randn_tensor`` (fastvae's Philox stream); the
                distribution is the same.  Reading the seed is a host synchronisation on a CUDA
                generator, and a graph break under ``torch.compile`` (pass None there).
        Returns:
            ``z``, contiguous, with the shape and dtype of ``mean``; ``mean`` itself (a copy) when
            deterministic.
        """
        if self.deterministic:
            return self.mean.clone(memory_format=torch.contiguous_format)  # mean + 0 * eps
        # reparameterize reads mean (first made contiguous: for B > 1 the chunk view is not) and
        # logvar and writes z; eps is never stored.  Its backward: dmean = dz, dlogvar from dz,
        # logvar and the regenerated eps.
        if generator is None:
            return reparameterize(self.mean, self.logvar)
        if isinstance(generator, list | tuple):
            if len(generator) == 1:
                generator = generator[0]
            else:
                if len(generator) != self.mean.shape[0]:
                    raise ValueError(
                        f"generator must be one torch.Generator or a list of {self.mean.shape[0]} "
                        f"(one per sample), got a list of {len(generator)}"
                    )
                seeds = [_seed_from(g, f"generator[{b}]") for b, g in enumerate(generator)]
                rows = [
                    reparameterize(self.mean[b : b + 1], self.logvar[b : b + 1], seed=s)
                    for b, s in enumerate(seeds)
                ]
                return torch.cat(rows)
        return reparameterize(self.mean, self.logvar, seed=_seed_from(generator))

    def mode(self) -> Tensor:
        """The mean (the mode of a Gaussian)."""
        return self.mean

    def kl(self, other: DiagonalGaussian | None = None) -> Tensor:
        """KL(self || other), summed over dims [1, 2, 3] as diffusers does::

            other None:  0.5 * sum(mean^2 + var - 1 - logvar)
            other:       0.5 * sum((mean - m_o)^2 / var_o + var / var_o - 1 - logvar + logvar_o)

        computed by :func:`fastvae.kl_divergence` with ``reduction="none"`` (and ``prior_mu=other.mean,
        prior_logvar=other.logvar``), which writes the gradients to mean and logvar in the same pass.
        4-D latents ``[B, C, H, W]`` give ``[B]``; for 5-D and up (video latents ``[B, C, T, H, W]``)
        the trailing dims are kept, ``[B, W, ...]``, exactly as diffusers' ``sum(dim=[1, 2, 3])``;
        2-D and 3-D latents are refused (diffusers' sum fails on them): call
        ``fastvae.kl_divergence(posterior.mean, posterior.logvar, reduction="none")`` there.

        Args:
            other: another diagonal Gaussian (anything with ``mean`` and ``logvar``, such as diffusers'
                own object), of the same shape or broadcastable to it; not deterministic (the KL
                against a point mass is infinite).
        Returns:
            ``torch.Tensor([0.0])`` when deterministic, else the KL in float32 (float64 for float64).
        """
        if self.deterministic:
            return torch.Tensor([0.0])
        if self.mean.dim() < 4:
            raise ValueError(
                f"kl() sums over dims {list(_KL_DIMS)} like diffusers, which needs parameters with at least "
                f"4 dims [B, 2C, H, W]; got shape {list(self.parameters.shape)}. For other ranks call "
                "fastvae.kl_divergence(posterior.mean, posterior.logvar, reduction='none')"
            )
        if other is None:
            # One fused pass reads mean (in place: each sample's features are contiguous in the chunk
            # view) and logvar, and writes d/dmean = mean and d/dlogvar = 0.5 (exp(logvar) - 1).
            return _sum_123(lambda m, lv: kl_divergence(m, lv, reduction="none"), self.mean, self.logvar)
        prior_mu, prior_logvar = getattr(other, "mean", None), getattr(other, "logvar", None)
        if not isinstance(prior_mu, Tensor) or not isinstance(prior_logvar, Tensor):
            raise TypeError(
                f"other must be a DiagonalGaussian (an object with mean and logvar tensors) or None, "
                f"got {type(other).__name__}"
            )
        if getattr(other, "deterministic", False):
            raise ValueError("other must not be deterministic: the KL against a point mass is infinite")
        try:
            shape = torch.broadcast_shapes(self.mean.shape, prior_mu.shape, prior_logvar.shape)
        except RuntimeError:
            raise ValueError(
                f"other's mean {list(prior_mu.shape)} and logvar {list(prior_logvar.shape)} must broadcast "
                f"with this distribution's latent shape {list(self.mean.shape)}"
            ) from None
        mean, logvar = self.mean.expand(shape), self.logvar.expand(shape)
        prior_mu, prior_logvar = prior_mu.expand(shape), prior_logvar.expand(shape)

        def kl_rows(m: Tensor, lv: Tensor, pm: Tensor, plv: Tensor) -> Tensor:
            return kl_divergence(m, lv, reduction="none", prior_mu=pm, prior_logvar=plv)

        return _sum_123(kl_rows, mean, logvar, prior_mu, prior_logvar)

    def nll(self, sample: Tensor, dims: Sequence[int] = _KL_DIMS) -> Tensor:
        """The negative log-likelihood of ``sample`` under the distribution, summed over ``dims``::

            0.5 * sum(log(2 pi) + logvar + (sample - mean)^2 / var)

        diffusers' formula in plain torch operations (with autograd).  ``torch.Tensor([0.0])`` when
        deterministic.
        """
        if self.deterministic:
            return torch.Tensor([0.0])
        dims = list(dims)
        if any(not -self.mean.dim() <= d < self.mean.dim() for d in dims):
            raise ValueError(
                f"dims must index the {self.mean.dim()} dims of the latent (shape {list(self.mean.shape)}), "
                f"got {dims}"
            )
        return 0.5 * torch.sum(_LOG_2PI + self.logvar + torch.pow(sample - self.mean, 2) / self.var, dim=dims)

    def __repr__(self) -> str:
        return (
            f"DiagonalGaussian(latent shape {list(self.mean.shape)}, dtype={self.parameters.dtype}, "
            f"deterministic={self.deterministic})"
        )


def _sum_123(per_sample, *tensors: Tensor) -> Tensor:
    """``per_sample`` (a fused op with ``reduction="none"``: [N, ...] -> [N]) summed over dims 1, 2, 3.

    4-D ``[B, C, H, W]`` -> ``[B]`` directly (each sample's features are read in place).  Above 4-D the
    trailing dims join the batch: ``[B, C, T, H, W, ...]`` -> ``[B, W, ..., C, T, H]`` (one copy of
    each input) -> ``[B * W..., C * T * H]`` -> ``[B, W, ...]``, as ``sum(dim=[1, 2, 3])`` leaves them.
    """
    ref = tensors[0]
    if ref.dim() == 4:
        return per_sample(*tensors)
    order = (0, *range(4, ref.dim()), 1, 2, 3)
    kept = (ref.shape[0], *ref.shape[4:])
    rows = [t.permute(order).reshape(-1, *ref.shape[1:4]) for t in tensors]
    return per_sample(*rows).reshape(kept)
