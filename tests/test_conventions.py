"""The README's conventions table: each row's original loss, written as its project writes it, equals
the fastvae call in that row (loss and gradients, float64 and float32, on every backend).

Sources (the formulas below are copied from them; only the tensors' names are shared):

* pytorch/examples, vae/main.py: ``loss_function``.
* keras.io/examples/generative/vae: ``VAE.train_step`` (Keras 3; ``keras.losses.binary_crossentropy``
  is the mean over the last axis of the clipped BCE, as its torch backend computes it).
* AntixK/PyTorch-VAE, models/vanilla_vae.py: ``VanillaVAE.loss_function`` (``kld_weight = M_N``).
* huggingface/diffusers: ``DiagonalGaussianDistribution.kl`` (models/autoencoders/vae.py) and
  examples/research_projects/autoencoderkl/train_autoencoderkl.py (``nll_loss``, ``kl_loss``).
* clementchadebec/benchmark_VAE (pythae), src/pythae/models/vae/vae_model.py: ``VAE.loss_function``.
* orybkin/sigma-vae-pytorch, model.py: ``gaussian_nll``, ``softclip``, ``loss_function``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, rel_err, to_np
from torch.distributions import Normal

import fastvae
from fastvae.nn import DiagonalGaussian

# The two sides differ in the order of sums and in sigmoid-then-log against the stable form: seen at
# most 5e-16 (float64) and 4e-7 (float32, the originals' own rounding) over all rows and backends.
TOL = {torch.float64: 1e-13, torch.float32: 1e-6}
GRAD_TOL = {torch.float64: 1e-13, torch.float32: 2e-6}


@dataclass
class Convention:
    """One row: the leaf tensors, the original loss and the fastvae call, as functions of the leaves."""

    name: str
    make: Callable[[torch.Generator, torch.dtype], dict[str, torch.Tensor]]
    original: Callable[..., torch.Tensor]
    fastvae: Callable[..., torch.Tensor]


def randn(g, dtype, *shape, scale=1.0):
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(DEVICE)


def rand(g, dtype, *shape):
    return torch.rand(shape, generator=g, dtype=torch.float64).to(dtype).to(DEVICE)


def latents(g, dtype, *shape):
    return {"mu": randn(g, dtype, *shape), "logvar": randn(g, dtype, *shape, scale=0.7)}


def kld_sum(mu, logvar):
    """pytorch/examples (and sigma-VAE): KLD = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())."""
    return -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())


# ---- pytorch/examples: BCE(sum) + KLD(sum) -----------------------------------------------------


def examples_original(logits, x, mu, logvar):
    recon_x = torch.sigmoid(logits)  # the example's decode() ends in a sigmoid
    BCE = F.binary_cross_entropy(recon_x, x.view(-1, 97), reduction="sum")
    return BCE + kld_sum(mu, logvar)


def examples_fastvae(logits, x, mu, logvar):
    return fastvae.vae_loss(logits, x, mu, logvar)


# ---- Keras VAE example: batch mean of per-sample summed BCE + batch mean of per-sample KL -------


def keras_binary_crossentropy(y_true, y_pred, epsilon=1e-7):
    """keras.losses.binary_crossentropy (from_logits=False) on the torch backend: clip, BCE, mean(-1)."""
    output = torch.clip(y_pred, epsilon, 1.0 - epsilon)
    return torch.mean(F.binary_cross_entropy(output, y_true, reduction="none"), dim=-1)


def keras_original(logits, x, mu, logvar):
    z_mean, z_log_var, data = mu, logvar, x
    reconstruction = torch.sigmoid(logits)  # the decoder's last Conv2DTranspose has activation="sigmoid"
    reconstruction_loss = torch.mean(torch.sum(keras_binary_crossentropy(data, reconstruction), dim=(1, 2)))
    kl_loss = -0.5 * (1 + z_log_var - torch.square(z_mean) - torch.exp(z_log_var))
    kl_loss = torch.mean(torch.sum(kl_loss, dim=1))
    return reconstruction_loss + kl_loss


def keras_fastvae(logits, x, mu, logvar):
    return fastvae.vae_loss(logits, x, mu, logvar, reduction="mean")


# ---- AntixK PyTorch-VAE: mse_loss (mean over elements) + kld_weight * batch mean of KL ---------

KLD_WEIGHT = 0.00025  # configs/vae.yaml's kld_weight (M_N)


def antixk_original(recons, x, mu, log_var):
    kld_weight = KLD_WEIGHT
    recons_loss = F.mse_loss(recons, x)
    kld_loss = torch.mean(-0.5 * torch.sum(1 + log_var - mu**2 - log_var.exp(), dim=1), dim=0)
    return recons_loss + kld_weight * kld_loss


def antixk_fastvae(recons, x, mu, log_var):
    F_ = x[0].numel()  # features per sample
    return fastvae.vae_loss(recons, x, mu, log_var, recon="mse", reduction="mean", beta=KLD_WEIGHT * F_) / F_


# ---- diffusers AutoencoderKL: posterior.kl() per sample; the training script's losses ----------


def diffusers_kl(moments):
    """DiagonalGaussianDistribution(moments).kl(), diffusers' formula (clamped logvar)."""
    mean, logvar = torch.chunk(moments, 2, dim=1)
    logvar = torch.clamp(logvar, -30.0, 20.0)
    var = torch.exp(logvar)
    return 0.5 * torch.sum(torch.pow(mean, 2) + var - 1.0 - logvar, dim=[1, 2, 3])


def diffusers_kl_original(moments):
    return diffusers_kl(moments)


def diffusers_kl_fastvae(moments):
    posterior = DiagonalGaussian(moments)  # or diffusers' own posterior: its mean and clamped logvar
    return fastvae.kl_divergence(posterior.mean, posterior.logvar, reduction="none")


def diffusers_kl_mean_original(moments):
    kl_loss = diffusers_kl(moments)
    return torch.sum(kl_loss) / kl_loss.shape[0]  # train_autoencoderkl.py; = posterior.kl().mean()


def diffusers_kl_mean_fastvae(moments):
    posterior = DiagonalGaussian(moments)
    return fastvae.kl_divergence(posterior.mean, posterior.logvar, reduction="mean")


KL_RATE = 1e-3


def diffusers_train_original(reconstructions, targets, moments):
    # (the script casts both to float32 first: a no-op for float32, left out to test float64 too)
    rec_loss = torch.nn.functional.mse_loss(reconstructions, targets, reduction="none")
    nll_loss = rec_loss  # (+ lpips_rate * p_loss, not part of the VAE loss)
    nll_loss = torch.sum(nll_loss) / nll_loss.shape[0]
    kl_loss = diffusers_kl(moments)
    kl_loss = torch.sum(kl_loss) / kl_loss.shape[0]
    return nll_loss + KL_RATE * kl_loss


def diffusers_train_fastvae(reconstructions, targets, moments):
    posterior = DiagonalGaussian(moments)
    return fastvae.vae_loss(
        reconstructions,
        targets,
        posterior.mean,
        posterior.logvar,
        recon="mse",
        reduction="mean",
        beta=KL_RATE,
    )


# ---- pythae VAE: 0.5 * per-sample SSE (mse) or summed BCE, + KLD, batch mean ------------------


def pythae_original(recon_x, x, mu, log_var, reconstruction_loss):
    if reconstruction_loss == "mse":
        recon_loss = 0.5 * F.mse_loss(
            recon_x.reshape(x.shape[0], -1),
            x.reshape(x.shape[0], -1),
            reduction="none",
        ).sum(dim=-1)
    elif reconstruction_loss == "bce":
        recon_loss = F.binary_cross_entropy(
            recon_x.reshape(x.shape[0], -1),
            x.reshape(x.shape[0], -1),
            reduction="none",
        ).sum(dim=-1)
    KLD = -0.5 * torch.sum(1 + log_var - mu.pow(2) - log_var.exp(), dim=-1)
    return (recon_loss + KLD).mean(dim=0)


def pythae_mse_original(recon_x, x, mu, log_var):
    return pythae_original(recon_x, x, mu, log_var, "mse")


def pythae_mse_fastvae(recon_x, x, mu, log_var):
    return fastvae.vae_loss(recon_x, x, mu, log_var, recon="mse", beta=2.0, reduction="mean") / 2


def pythae_bce_original(logits, x, mu, log_var):
    return pythae_original(torch.sigmoid(logits), x, mu, log_var, "bce")


def pythae_bce_fastvae(logits, x, mu, log_var):
    return fastvae.vae_loss(logits, x, mu, log_var, reduction="mean")


# ---- sigma-VAE: Gaussian decoder with a learned log-scale ----------------------------------------


def gaussian_nll(mu, log_sigma, x):
    return 0.5 * torch.pow((x - mu) / log_sigma.exp(), 2) + log_sigma + 0.5 * np.log(2 * np.pi)


def softclip(tensor, min):
    """Clips the tensor values at the minimum value min in a softway. Taken from Handful of Trials"""
    result_tensor = min + F.softplus(tensor - min)
    return result_tensor


def sigma_original(x_hat, x, mu, logvar, log_sigma):
    log_sigma = softclip(log_sigma, -6)
    rec = gaussian_nll(x_hat, log_sigma, x).sum()
    kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    return rec + kl


def sigma_fastvae(x_hat, x, mu, logvar, log_sigma):
    return fastvae.vae_loss(x_hat, x, mu, logvar, recon="gaussian", log_scale=softclip(log_sigma, -6))


def normal_original(x_hat, x, mu, logvar, s):
    """The same likelihood as torch.distributions writes it, with a per-channel log-scale [C, 1, 1]."""
    return -Normal(x_hat, torch.exp(s)).log_prob(x).sum() + kld_sum(mu, logvar)


def normal_fastvae(x_hat, x, mu, logvar, s):
    return fastvae.vae_loss(x_hat, x, mu, logvar, recon="gaussian", log_scale=s)


def _moments(g, dtype, *shape):
    m = randn(g, dtype, *shape)
    half = shape[1] // 2
    m[:, half:, 0, 0] = 25.0  # logvars beyond the clamp: zero gradient there, on both sides
    m[:, half:, 1, 0] = -33.0
    return m


CONVENTIONS = [
    Convention(
        "pytorch/examples",
        lambda g, d: {"logits": randn(g, d, 5, 97, scale=2.0), "x": rand(g, d, 5, 97), **latents(g, d, 5, 7)},
        examples_original,
        examples_fastvae,
    ),
    Convention(
        "keras",
        lambda g, d: {
            "logits": randn(g, d, 5, 11, 9, 1, scale=2.0),
            "x": rand(g, d, 5, 11, 9, 1),
            **latents(g, d, 5, 3),
        },
        keras_original,
        keras_fastvae,
    ),
    Convention(
        "antixk",
        lambda g, d: {
            "recons": torch.tanh(randn(g, d, 5, 3, 8, 6)),
            "x": randn(g, d, 5, 3, 8, 6).clamp(-1, 1),
            "mu": randn(g, d, 5, 13),
            "log_var": randn(g, d, 5, 13, scale=0.7),
        },
        antixk_original,
        antixk_fastvae,
    ),
    Convention(
        "diffusers-kl",
        lambda g, d: {"moments": _moments(g, d, 5, 8, 3, 5)},
        diffusers_kl_original,
        diffusers_kl_fastvae,
    ),
    Convention(
        "diffusers-kl-mean",
        lambda g, d: {"moments": _moments(g, d, 5, 8, 3, 5)},
        diffusers_kl_mean_original,
        diffusers_kl_mean_fastvae,
    ),
    Convention(
        "diffusers-train",
        lambda g, d: {
            "reconstructions": randn(g, d, 5, 3, 6, 10),
            "targets": randn(g, d, 5, 3, 6, 10).clamp(-1, 1),
            "moments": _moments(g, d, 5, 8, 3, 5),
        },
        diffusers_train_original,
        diffusers_train_fastvae,
    ),
    Convention(
        "pythae-mse",
        lambda g, d: {
            "recon_x": rand(g, d, 5, 1, 7, 9),
            "x": rand(g, d, 5, 1, 7, 9),
            "mu": randn(g, d, 5, 6),
            "log_var": randn(g, d, 5, 6, scale=0.7),
        },
        pythae_mse_original,
        pythae_mse_fastvae,
    ),
    Convention(
        "pythae-bce",
        lambda g, d: {
            "logits": randn(g, d, 5, 1, 7, 9, scale=2.0),
            "x": rand(g, d, 5, 1, 7, 9),
            "mu": randn(g, d, 5, 6),
            "log_var": randn(g, d, 5, 6, scale=0.7),
        },
        pythae_bce_original,
        pythae_bce_fastvae,
    ),
    Convention(
        "sigma-vae",
        lambda g, d: {
            "x_hat": randn(g, d, 5, 3, 4, 6),
            "x": randn(g, d, 5, 3, 4, 6),
            **latents(g, d, 5, 7),
            "log_sigma": randn(g, d, scale=0.5),  # a 0-d learned parameter, as in sigma-vae-pytorch
        },
        sigma_original,
        sigma_fastvae,
    ),
    Convention(
        "normal-log-prob",
        lambda g, d: {
            "x_hat": randn(g, d, 5, 3, 4, 6),
            "x": randn(g, d, 5, 3, 4, 6),
            **latents(g, d, 5, 7),
            "s": randn(g, d, 3, 1, 1, scale=0.5),  # one learned log-scale per channel
        },
        normal_original,
        normal_fastvae,
    ),
]

DATA = ("x", "targets")  # the data: no gradient


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("conv", CONVENTIONS, ids=[c.name for c in CONVENTIONS])
def test_convention(conv: Convention, dtype, backend):
    g = torch.Generator().manual_seed(sum(map(ord, conv.name)))
    leaves = conv.make(g, dtype)
    results = []
    for fn in (conv.original, conv.fastvae):
        inputs = {k: v.detach().requires_grad_(k not in DATA) for k, v in leaves.items()}
        loss = fn(**inputs)
        wrt = [v for k, v in inputs.items() if k not in DATA]
        weight = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype, device=loss.device).reshape(
            loss.shape
        )
        results.append((loss, torch.autograd.grad((loss * weight).sum(), wrt)))
    (want, want_grads), (got, got_grads) = results
    assert got.shape == want.shape
    assert rel_err(got, to_np(want)) < TOL[dtype], conv.name
    for name, a, b in zip([k for k in leaves if k not in DATA], got_grads, want_grads, strict=True):
        assert rel_err(a, to_np(b)) < GRAD_TOL[dtype], f"{conv.name}: d/d{name}"


def test_diffusers_training_script_nll_grad_then_backward(backend):
    """train_autoencoderkl.py takes autograd.grad(nll_loss, last_layer, retain_graph=True) before the
    total backward: the split fastvae calls (no-KL reconstruction term, KL term) support it."""
    g = torch.Generator().manual_seed(1)
    w = randn(g, torch.float64, 3, 3, 1, 1).requires_grad_(True)  # the "last layer" (1x1 conv weight)
    h = randn(g, torch.float64, 4, 3, 6, 5)
    targets = randn(g, torch.float64, 4, 3, 6, 5).clamp(-1, 1)
    moments = _moments(g, torch.float64, 4, 8, 3, 5).requires_grad_(True)

    def losses(fast: bool):
        reconstructions = F.conv2d(h, w)
        if fast:
            posterior = DiagonalGaussian(moments)
            nll = fastvae.vae_loss(reconstructions, targets, recon="mse", reduction="mean")
            kl = fastvae.kl_divergence(posterior.mean, posterior.logvar, reduction="mean")
        else:
            nll = torch.sum(F.mse_loss(reconstructions, targets, reduction="none")) / reconstructions.shape[0]
            kl_loss = diffusers_kl(moments)
            kl = torch.sum(kl_loss) / kl_loss.shape[0]
        (nll_grads,) = torch.autograd.grad(nll, w, retain_graph=True)
        loss = nll + KL_RATE * kl
        loss.backward()
        out = (loss.detach(), nll_grads, w.grad.clone(), moments.grad.clone())
        w.grad = moments.grad = None
        return out

    for a, b in zip(losses(True), losses(False), strict=True):
        assert rel_err(a, to_np(b)) < 1e-12
