"""The three-line change to pytorch/examples' VAE gives the same loss and parameter gradients."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from conftest import DEVICE, rel_err
from torch import nn

import fastvae
import fastvae.data
from fastvae import reference


class ExamplesVAE(nn.Module):
    """pytorch/examples/vae/main.py, verbatim but for an explicit eps and a logits switch."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(784, 400)
        self.fc21 = nn.Linear(400, 20)
        self.fc22 = nn.Linear(400, 20)
        self.fc3 = nn.Linear(20, 400)
        self.fc4 = nn.Linear(400, 784)

    def encode(self, x):
        h1 = F.relu(self.fc1(x))
        return self.fc21(h1), self.fc22(h1)

    def decode(self, z, logits=False):
        h3 = F.relu(self.fc3(z))
        out = self.fc4(h3)
        return out if logits else torch.sigmoid(out)


def original_loss(recon_x, x, mu, logvar):
    BCE = F.binary_cross_entropy(recon_x, x.view(-1, 784), reduction="sum")
    KLD = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    return BCE + KLD


def test_examples_vae_same_loss_and_gradients(backend):
    torch.manual_seed(0)
    model = ExamplesVAE().to(DEVICE)
    x = fastvae.data.load_mnist("test")[0][:128].to(DEVICE)
    x_float = x.float().div(255).view(-1, 784)
    seed = 31337

    # original: sigmoid decoder, eps from torch (here: the same Philox eps, materialised)
    mu, logvar = model.encode(x_float)
    eps = torch.from_numpy(reference.randn(seed, np.arange(mu.numel())).reshape(mu.shape)).float().to(DEVICE)
    z = mu + eps * torch.exp(0.5 * logvar)
    loss_orig = original_loss(model.decode(z), x_float, mu, logvar)
    loss_orig.backward()
    grads_orig = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    # fastvae: decoder returns logits, reparameterize and vae_loss replace the three lines
    mu, logvar = model.encode(x_float)
    z = fastvae.reparameterize(mu, logvar, seed=seed)
    loss_fast = fastvae.vae_loss(model.decode(z, logits=True), x, mu, logvar)  # uint8 pixels as the target
    loss_fast.backward()

    assert rel_err(loss_fast, loss_orig.detach().double().cpu().numpy()) < 1e-5
    for p, g in zip(model.parameters(), grads_orig, strict=True):
        assert rel_err(p.grad, g.double().cpu().numpy()) < 1e-4
