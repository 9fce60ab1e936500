"""pytorch/examples' VAE before and after the three-line change: the numbers in docs/using-fastvae.md.

    python docs/dropin_example.py             # loss and gradient equality on one batch (seconds)
    python docs/dropin_example.py --epochs 2  # also train both versions and compare the held-out ELBO

Part 1 feeds both versions the same noise (the original's eps is fastvae's Philox stream,
materialised with ``fastvae.reference.randn``), so their losses and parameter gradients must agree
to float32 rounding.  Part 2 trains each version with its own noise (torch.randn_like for the
original, the in-kernel Philox draw for fastvae) from the same initial weights and the same batch
order, and reports the held-out negative ELBO per sample of each: equal up to the noise.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import fastvae
import fastvae.data
from fastvae import reference


class VAE(nn.Module):
    """pytorch/examples/vae/main.py's model; ``fast=True`` is the version after the change."""

    def __init__(self, fast: bool = False):
        super().__init__()
        self.fast = fast
        self.fc1 = nn.Linear(784, 400)
        self.fc21 = nn.Linear(400, 20)
        self.fc22 = nn.Linear(400, 20)
        self.fc3 = nn.Linear(20, 400)
        self.fc4 = nn.Linear(400, 784)

    def encode(self, x):
        h1 = F.relu(self.fc1(x))
        return self.fc21(h1), self.fc22(h1)

    def reparameterize(self, mu, logvar):
        if self.fast:
            return fastvae.reparameterize(mu, logvar)  # change 1: eps drawn inside the kernel
        std = torch.exp(0.5 * logvar)
        eps = torch.randn_like(std)
        return mu + eps * std

    def decode(self, z):
        h3 = F.relu(self.fc3(z))
        return self.fc4(h3) if self.fast else torch.sigmoid(self.fc4(h3))  # change 2: logits

    def forward(self, x):
        mu, logvar = self.encode(x.view(-1, 784))
        z = self.reparameterize(mu, logvar)
        return self.decode(z), mu, logvar


def loss_function(recon_x, x, mu, logvar):
    """The original: BCE on probabilities + KL, summed over the batch."""
    BCE = F.binary_cross_entropy(recon_x, x.view(-1, 784), reduction="sum")
    KLD = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    return BCE + KLD


def fast_loss_function(logits, x, mu, logvar):
    """Change 3: BCE on logits + KL and their gradients in one pass (x may stay uint8 pixels)."""
    return fastvae.vae_loss(logits, x, mu, logvar)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def same_batch(seed: int = 31337) -> None:
    torch.manual_seed(0)
    original, fast = VAE(), VAE(fast=True)
    fast.load_state_dict(original.state_dict())
    pixels = fastvae.data.load_mnist("test")[0][:128]  # uint8 [128, 1, 28, 28]
    x = pixels.float().div(255).view(-1, 784)

    mu, logvar = original.encode(x)
    eps = torch.from_numpy(reference.randn(seed, np.arange(mu.numel())).reshape(mu.shape)).float()
    loss_a = loss_function(original.decode(mu + eps * torch.exp(0.5 * logvar)), x, mu, logvar)
    loss_a.backward()

    mu, logvar = fast.encode(x)
    z = fastvae.reparameterize(mu, logvar, seed=seed)
    loss_b = fast_loss_function(fast.decode(z), pixels, mu, logvar)
    loss_b.backward()

    print(
        f"loss, batch of 128: original {loss_a.item():.4f}  fastvae {loss_b.item():.4f}  "
        f"relative difference {rel(loss_b, loss_a):.1e}"
    )
    worst = max(
        (rel(pb.grad, pa.grad), name)
        for (name, pa), pb in zip(original.named_parameters(), fast.parameters(), strict=True)
    )
    print(f"parameter gradients: largest relative difference {worst[0]:.1e} ({worst[1]})")


def train_both(epochs: int) -> None:
    train_x, _ = fastvae.data.load_mnist("train")
    test_x, _ = fastvae.data.load_mnist("test")
    torch.manual_seed(1)
    original, fast = VAE(), VAE(fast=True)
    fast.load_state_dict(original.state_dict())
    results = {}
    for name, model, loss_fn in (
        ("original", original, loss_function),
        ("fastvae", fast, fast_loss_function),
    ):
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        order = torch.Generator().manual_seed(2)
        torch.manual_seed(3)  # the noise: torch.randn_like (original) or fastvae's seed draw
        for _ in range(epochs):
            for idx in torch.randperm(train_x.shape[0], generator=order).split(128):
                pixels = train_x[idx]
                target = pixels if model.fast else pixels.float().div(255)
                out, mu, logvar = model(pixels.float().div(255))
                loss = loss_fn(out, target, mu, logvar)
                opt.zero_grad()
                loss.backward()
                opt.step()
        with torch.no_grad():
            torch.manual_seed(4)
            out, mu, logvar = model(test_x.float().div(255))
            target = test_x if model.fast else test_x.float().div(255)
            results[name] = loss_fn(out, target, mu, logvar).item() / test_x.shape[0]
    print(
        f"held-out negative ELBO after {epochs} epoch(s), nats per image (last 1,000 embedded MNIST images): "
        + ", ".join(f"{k} {v:.2f}" for k, v in results.items())
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=0, help="also train both versions for N epochs")
    args = parser.parse_args()
    same_batch()
    if args.epochs > 0:
        train_both(args.epochs)
