"""fastvae: fused Triton kernels for variational autoencoders.

The three lines that change in an existing PyTorch VAE::

    logits = model.decode(z)                             # the decoder returns logits (no sigmoid)
    z = fastvae.reparameterize(mu, logvar)               # eps drawn in-kernel
    loss = fastvae.vae_loss(logits, x, mu, logvar)       # BCE + KL and their gradients in one pass
"""

from fastvae import nn
from fastvae.ops import (
    BACKENDS,
    VAELossTerms,
    backend_for,
    bce_with_logits,
    kl_divergence,
    reparameterize,
    use_backend,
    vae_loss,
)

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "VAELossTerms",
    "__version__",
    "backend_for",
    "bce_with_logits",
    "kl_divergence",
    "nn",
    "reparameterize",
    "use_backend",
    "vae_loss",
]
