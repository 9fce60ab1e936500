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

# The training API pulls in tqdm and matplotlib: imported on first use, not with the ops.
_LAZY_MODULES = ("data", "models", "trainer", "checkpoint", "plots", "config", "graphs")
_LAZY_NAMES = {"Trainer": "trainer", "TrainingDivergedError": "trainer", "TrainConfig": "config"}


def __getattr__(name: str):
    import importlib

    if name in _LAZY_MODULES:
        return importlib.import_module(f"fastvae.{name}")
    if name in _LAZY_NAMES:
        return getattr(importlib.import_module(f"fastvae.{_LAZY_NAMES[name]}"), name)
    raise AttributeError(f"module 'fastvae' has no attribute {name!r}")


__all__ = [
    "BACKENDS",
    "TrainConfig",
    "Trainer",
    "TrainingDivergedError",
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
