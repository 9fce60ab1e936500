"""``torch.nn`` modules over the fused ops, for models built from modules."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fastvae.ops import VAELossTerms, reparameterize, vae_loss

__all__ = ["Reparameterize", "VAELoss"]


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
    """``recon(logits, target) + beta * KL`` in one pass (see :func:`fastvae.vae_loss`)."""

    def __init__(self, *, beta: float = 1.0, reduction: str = "sum", recon: str = "bce") -> None:
        super().__init__()
        self.beta, self.reduction, self.recon = beta, reduction, recon

    def forward(
        self, logits: Tensor, target: Tensor, mu: Tensor, logvar: Tensor, *, return_terms: bool = False
    ) -> torch.Tensor | VAELossTerms:
        return vae_loss(
            logits,
            target,
            mu,
            logvar,
            beta=self.beta,
            reduction=self.reduction,
            recon=self.recon,
            return_terms=return_terms,
        )

    def extra_repr(self) -> str:
        return f"beta={self.beta}, reduction={self.reduction!r}, recon={self.recon!r}"
