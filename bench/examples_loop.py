"""pytorch/examples' VAE training loop (``vae/main.py``) on fastvae's MNIST split, for comparison.

The model, loss, optimizer and loops are those of https://github.com/pytorch/examples/blob/main/vae/main.py:
fc1 784->400, fc21/fc22 400->20, fc3 20->400, fc4 400->784 with a sigmoid, the loss
``F.binary_cross_entropy(recon, x, reduction="sum") + KLD``, Adam(1e-3), batch 128, a
``DataLoader`` over the images (here a ``TensorDataset`` of float images in [0, 1], which is what
``transforms.ToTensor()`` yields), ``loss.item()`` every step, and a test loop that reports the
summed test loss divided by the number of test images (z sampled, as in the example).  The data
are fastvae's embedded MNIST split: the first 9,000 images for training, the last 1,000 held out.

Run ``python bench/examples_loop.py --epochs 10`` for the example alone, or add ``--trainer`` to
train :class:`fastvae.trainer.Trainer` with the same settings afterwards and print both side by side
(held-out negative ELBO per epoch and seconds per training epoch).  ``--interleave`` times the two
loops alternating epoch by epoch, which compares them fairly on a machine with background load.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn, optim
from torch.utils.data import DataLoader, TensorDataset

__all__ = [
    "VAE",
    "loss_function",
    "make_loaders",
    "train_epoch",
    "test",
    "run_examples",
    "run_trainer",
    "compare_interleaved",
]


class VAE(nn.Module):
    """pytorch/examples' VAE, verbatim."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(784, 400)
        self.fc21 = nn.Linear(400, 20)
        self.fc22 = nn.Linear(400, 20)
        self.fc3 = nn.Linear(20, 400)
        self.fc4 = nn.Linear(400, 784)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h1 = F.relu(self.fc1(x))
        return self.fc21(h1), self.fc22(h1)

    def reparameterize(self, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        std = torch.exp(0.5 * logvar)
        eps = torch.randn_like(std)
        return mu + eps * std

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        h3 = F.relu(self.fc3(z))
        return torch.sigmoid(self.fc4(h3))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, logvar = self.encode(x.view(-1, 784))
        z = self.reparameterize(mu, logvar)
        return self.decode(z), mu, logvar


def loss_function(
    recon_x: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor
) -> torch.Tensor:
    """Reconstruction + KL divergence losses summed over all elements and batch (the example's)."""
    bce = F.binary_cross_entropy(recon_x, x.view(-1, 784), reduction="sum")
    kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    return bce + kld


def make_loaders(batch_size: int = 128) -> tuple[DataLoader, DataLoader]:
    """Train/test DataLoaders over float images in [0, 1] of fastvae's 9,000 / 1,000 MNIST split."""
    from fastvae import data

    train_x, train_y = data.load_mnist("train")
    test_x, test_y = data.load_mnist("test")
    train = TensorDataset(train_x.float() / 255, train_y)
    test_set = TensorDataset(test_x.float() / 255, test_y)
    return (
        DataLoader(train, batch_size=batch_size, shuffle=True),
        DataLoader(test_set, batch_size=batch_size, shuffle=False),
    )


def train_epoch(
    model: VAE, optimizer: optim.Optimizer, loader: DataLoader, device: torch.device | str = "cpu"
) -> float:
    """One training epoch, as the example's ``train()`` (each batch moved with ``data.to(device)``);
    returns the average loss per sample."""
    model.train()
    train_loss = 0.0
    for data, _ in loader:
        data = data.to(device)
        optimizer.zero_grad()
        recon_batch, mu, logvar = model(data)
        loss = loss_function(recon_batch, data, mu, logvar)
        loss.backward()
        train_loss += loss.item()
        optimizer.step()
    return train_loss / len(loader.dataset)


def test(model: VAE, loader: DataLoader) -> float:
    """The example's ``test()``: summed test loss over the test set / number of test images."""
    model.eval()
    test_loss = 0.0
    with torch.no_grad():
        for data, _ in loader:
            recon_batch, mu, logvar = model(data)
            test_loss += loss_function(recon_batch, data, mu, logvar).item()
    return test_loss / len(loader.dataset)


def run_examples(epochs: int = 10, seed: int = 1, batch_size: int = 128, verbose: bool = True) -> list[dict]:
    """Train the example; one ``{"epoch", "train_loss", "val_loss", "seconds"}`` per epoch."""
    torch.manual_seed(seed)
    train_loader, test_loader = make_loaders(batch_size)
    model = VAE()
    optimizer = optim.Adam(model.parameters(), lr=1e-3)
    history = []
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        train_loss = train_epoch(model, optimizer, train_loader)
        seconds = time.perf_counter() - t0
        val_loss = test(model, test_loader)
        history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "seconds": seconds})
        if verbose:
            print(
                f"examples epoch {epoch:3d}  train {train_loss:8.3f}  held-out {val_loss:8.3f}  "
                f"{seconds:6.3f} s"
            )
    return history


def run_trainer(epochs: int = 10, seed: int = 0, batch_size: int = 128, verbose: bool = True) -> list[dict]:
    """fastvae's Trainer with the example's settings (MLPVAE 784-400-20, Adam 1e-3) on the same split."""
    from fastvae import data, models
    from fastvae.trainer import Trainer

    torch.manual_seed(seed)
    model = models.MLPVAE()
    trainer = Trainer(model, lr=1e-3, batch_size=batch_size, device="cpu", seed=seed, progress=False)
    history = []
    train, val = data.load_mnist("train"), data.load_mnist("test")
    for epoch in range(1, epochs + 1):
        record = trainer.fit(train, epoch, val=val)[-1]
        history.append(
            {
                "epoch": epoch,
                "train_loss": record["train_loss"],
                "val_loss": record["val_loss"],
                "seconds": record["seconds"],
            }
        )
        if verbose:
            print(
                f"fastvae  epoch {epoch:3d}  train {record['train_loss']:8.3f}  "
                f"held-out {record['val_loss']:8.3f}  {record['seconds']:6.3f} s"
            )
    return history


def compare_interleaved(epochs: int = 10, seed: int = 1, batch_size: int = 128) -> dict[str, list[float]]:
    """Alternate one epoch of the example and one of fastvae's Trainer; per-epoch training seconds of each.

    Alternating exposes both loops to the same background load (a shared machine), so their minima
    and medians compare fairly.
    """
    from fastvae import data, models
    from fastvae.trainer import Trainer

    torch.manual_seed(seed)
    train_loader, _ = make_loaders(batch_size)
    model = VAE()
    optimizer = optim.Adam(model.parameters(), lr=1e-3)
    torch.manual_seed(seed)
    trainer = Trainer(models.MLPVAE(), batch_size=batch_size, device="cpu", seed=seed, progress=False)
    train = data.load_mnist("train")
    times: dict[str, list[float]] = {"examples": [], "fastvae": []}
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        train_epoch(model, optimizer, train_loader)
        times["examples"].append(time.perf_counter() - t0)
        times["fastvae"].append(trainer.fit(train, epoch)[-1]["seconds"])
        print(
            f"epoch {epoch:3d}  examples {times['examples'][-1]:6.3f} s  "
            f"fastvae {times['fastvae'][-1]:6.3f} s"
        )
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1, help="the example's default seed is 1")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--trainer", action="store_true", help="also run fastvae's Trainer and compare")
    parser.add_argument(
        "--interleave", action="store_true", help="only time both loops, alternating epochs (shared machines)"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.interleave:
        times = compare_interleaved(args.epochs, args.seed, args.batch_size)
        ex_t, fv_t = (sorted(times[k][1:] or times[k]) for k in ("examples", "fastvae"))
        ex_med, fv_med = ex_t[len(ex_t) // 2], fv_t[len(fv_t) // 2]
        print(
            f"training epoch seconds (first excluded): examples min {ex_t[0]:.3f} median {ex_med:.3f}; "
            f"fastvae min {fv_t[0]:.3f} median {fv_med:.3f}; speed-up {ex_t[0] / fv_t[0]:.2f}x (min)"
        )
        return
    ex = run_examples(args.epochs, args.seed, args.batch_size)
    if not args.trainer:
        return
    fv = run_trainer(args.epochs, args.seed, args.batch_size)

    def stats(h: list[dict]) -> tuple[float, float]:
        times = sorted(r["seconds"] for r in (h[1:] or h))  # the first epoch pays for warm-up
        return times[0], times[len(times) // 2]

    (ex_min, ex_med), (fv_min, fv_med) = stats(ex), stats(fv)
    print(
        f"\nafter {args.epochs} epochs: held-out negative ELBO examples {ex[-1]['val_loss']:.2f}, "
        f"fastvae {fv[-1]['val_loss']:.2f} nats ({100 * (fv[-1]['val_loss'] / ex[-1]['val_loss'] - 1):+.2f}%)"
    )
    print(
        f"training epoch seconds (first excluded): examples min {ex_min:.3f} median {ex_med:.3f}; "
        f"fastvae min {fv_min:.3f} median {fv_med:.3f}; speed-up {ex_min / fv_min:.2f}x (min), "
        f"{ex_med / fv_med:.2f}x (median)"
    )


if __name__ == "__main__":
    main()
