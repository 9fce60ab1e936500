"""PNG figures for a trained VAE: reconstructions, prior samples, latent space, 2-D manifold, loss curves.

Figures are built on :class:`matplotlib.figure.Figure` objects rendered by the Agg backend,
never through ``pyplot``'s global state, so they work headless and from threads.  Every
function runs the model in eval mode under ``torch.no_grad()`` and restores its training
mode afterwards.

Display conventions:

* image-like ``in_shape`` ``(C, H, W)`` with ``C`` in {1, 3} is shown as greyscale / RGB
  images (values ``sigmoid(logits)`` in [0, 1]; ``uint8`` inputs are shown as ``x / 255``);
* flat data ``(F,)`` (or any other shape) is shown as a square greyscale image when ``F`` is a
  perfect square (e.g. flattened MNIST), and otherwise as line plots (reconstructions) or a
  heat map of samples by feature (samples, manifold is skipped).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.colors import BoundaryNorm, ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Ellipse
from matplotlib.ticker import MaxNLocator
from torch import nn

from .models import evaluating

__all__ = [
    "plot_reconstructions",
    "plot_samples",
    "plot_latent",
    "plot_manifold",
    "plot_loss",
    "save_all",
    "FILENAMES",
]

FILENAMES = {
    "reconstructions": "reconstructions.png",
    "samples": "samples.png",
    "latent": "latent.png",
    "manifold": "manifold.png",
    "loss": "loss.png",
}

_DPI = 100
_ENCODE_CHUNK = 2048

PathLike = str | os.PathLike


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _save(fig: Figure, path: PathLike) -> Path:
    """Write ``fig`` as a PNG, creating missing folders; a file where a folder should be is named."""
    path = Path(path)
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise NotADirectoryError(f"cannot write {path}: {parent} is a file, not a directory")
            break
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=_DPI, format="png")
    return path


def _display_shape(in_shape: Sequence[int]) -> tuple[int, int, int] | None:
    """``(C, H, W)`` to show a sample as an image, or None when it is not image-like."""
    shape = tuple(in_shape)
    if len(shape) == 3 and shape[0] in (1, 3):
        return shape  # type: ignore[return-value]
    if len(shape) == 2:
        return (1, shape[0], shape[1])
    n = math.prod(shape)
    side = math.isqrt(n)
    if side * side == n and side > 1:
        return (1, side, side)
    return None


def _to_unit(x: torch.Tensor) -> np.ndarray:
    """uint8 pixels -> x / 255; floats clipped to [0, 1]; float64 numpy on the host."""
    x = x.detach().cpu()
    x = x.double() / 255.0 if x.dtype == torch.uint8 else x.double()
    return x.clamp(0.0, 1.0).numpy()


def _grid(images: np.ndarray, shape: tuple[int, int, int], ncols: int, pad: int = 1) -> np.ndarray:
    """Tile ``[n, ...]`` images into one ``[rows*(H+pad)+pad, cols*(W+pad)+pad(, 3)]`` array (pad = 1.0)."""
    c, h, w = shape
    n = images.shape[0]
    images = images.reshape(n, c, h, w)
    ncols = max(1, min(ncols, n))
    nrows = max(1, math.ceil(n / ncols))
    canvas = np.ones((c, nrows * (h + pad) + pad, ncols * (w + pad) + pad))
    for i in range(n):
        r, q = divmod(i, ncols)
        y, x = pad + r * (h + pad), pad + q * (w + pad)
        canvas[:, y : y + h, x : x + w] = images[i]
    return canvas[0] if c == 1 else canvas.transpose(1, 2, 0)


def _imshow(ax: Any, grid: np.ndarray, **kwargs: Any) -> Any:
    cmap = "gray" if grid.ndim == 2 else None
    im = ax.imshow(grid, cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest", **kwargs)
    ax.set_xticks([])
    ax.set_yticks([])
    return im


def _encode_means(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Posterior means ``[N, latent]`` on the host, encoded in chunks on the model's device."""
    device = _device(model)
    out = [
        model.encode(images[i : i + _ENCODE_CHUNK].to(device))[0].float().cpu()
        for i in range(0, images.shape[0], _ENCODE_CHUNK)
    ]
    return torch.cat(out)


# --------------------------------------------------------------------------------------------


def plot_reconstructions(model: nn.Module, images: torch.Tensor, path: PathLike, n: int = 8) -> Path:
    """Save the first ``n`` inputs (top row(s)) above their reconstructions ``sigmoid(decode(mu(x)))``.

    More than 16 images wrap onto several rows in each block.  Non-image data without a square
    feature count are drawn as line plots (at most 8), input (grey) against reconstruction (red).
    Returns the path written.
    """
    if n < 1:
        raise ValueError(f"n must be a positive integer, got {n}")
    if images.shape[0] == 0:
        raise ValueError("plot_reconstructions needs at least one image, got an empty tensor")
    x = images[:n]
    n = x.shape[0]
    with evaluating(model):
        recon = model.reconstruct(x.to(_device(model)))
    inputs, outputs = _to_unit(x), _to_unit(recon)
    shape = _display_shape(model.in_shape)
    if shape is None:
        n = min(n, 8)
        fig = Figure(figsize=(2.2 * min(n, 4), 1.8 * math.ceil(n / 4)), layout="constrained")
        axes = fig.subplots(math.ceil(n / 4), min(n, 4), squeeze=False)
        for i, ax in enumerate(axes.flat):
            if i >= n:
                ax.set_visible(False)
                continue
            ax.plot(inputs[i].reshape(-1), color="0.4", lw=1, label="input")
            ax.plot(outputs[i].reshape(-1), color="tab:red", lw=1, label="reconstruction")
            ax.set_ylim(-0.05, 1.05)
            ax.tick_params(labelsize=6)
        axes.flat[0].legend(fontsize=6, loc="upper right")
        fig.suptitle("inputs and reconstructions")
        return _save(fig, path)
    ncols = min(n, 16)
    nrows = math.ceil(n / ncols)
    c, h, w = shape
    cell = max(0.5, min(1.0, 12.0 / ncols))
    fig = Figure(figsize=(ncols * cell * w / h + 0.4, 2 * nrows * cell + 0.8), layout="constrained")
    top, bottom = fig.subplots(2, 1)
    _imshow(top, _grid(inputs, shape, ncols))
    top.set_title("input", fontsize=10)
    _imshow(bottom, _grid(outputs, shape, ncols))
    bottom.set_title("reconstruction (decoded posterior mean)", fontsize=10)
    return _save(fig, path)


def plot_samples(
    model: nn.Module, path: PathLike, n: int = 64, generator: torch.Generator | None = None
) -> Path:
    """Save a grid of ``n`` samples from the prior, ``sigmoid(decode(z))`` with ``z ~ N(0, I)``.

    Non-image data without a square feature count are drawn as a heat map (sample x feature).
    Returns the path written.
    """
    if n < 1:
        raise ValueError(f"n must be a positive integer, got {n}")
    with evaluating(model):
        samples = _to_unit(model.sample(n, generator=generator))
    shape = _display_shape(model.in_shape)
    if shape is None:
        fig = Figure(figsize=(8, min(8.0, 2 + 0.1 * n)), layout="constrained")
        ax = fig.subplots()
        im = ax.imshow(
            samples.reshape(n, -1), aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest"
        )
        ax.set_xlabel("feature")
        ax.set_ylabel("sample")
        fig.colorbar(im, ax=ax)
        ax.set_title(f"{n} samples from the prior")
        return _save(fig, path)
    ncols = math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    _, h, w = shape
    fig = Figure(
        figsize=(min(10.0, 0.6 * ncols * w / h) + 0.2, min(10.0, 0.6 * nrows) + 0.5), layout="constrained"
    )
    ax = fig.subplots()
    _imshow(ax, _grid(samples, shape, ncols))
    ax.set_title(f"samples from the prior, z ~ N(0, I) (latent={model.latent})", fontsize=10)
    return _save(fig, path)


def _pca_plane(mu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """The plane of the first two principal components of ``[N, D]`` latent means (SVD, centred).

    Signs are fixed (largest loading of each component positive) so the figures are deterministic.
    Returns the centre ``[D]``, the components ``[2, D]`` (unit rows), the standard deviation of the
    means along each ``[2]`` and the axis labels with the explained variance.
    """
    centre = mu.double().mean(0)
    centred = mu.double() - centre
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)
    comps = vh[:2]
    signs = torch.sign(comps.gather(1, comps.abs().argmax(1, keepdim=True)))
    comps = comps * torch.where(signs == 0, torch.ones_like(signs), signs)
    var = s**2
    share = (var[:2] / var.sum().clamp_min(1e-300)).tolist()
    labels = [f"PC{i + 1} of the latent means ({100 * share[i]:.0f}% of variance)" for i in range(2)]
    std = (var[:2] / max(mu.shape[0] - 1, 1)).sqrt()
    return centre, comps, std, labels


def _principal_components(mu: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
    """Project ``[N, D]`` onto its first two principal components; returns ``[N, 2]`` and axis labels."""
    centre, comps, _, labels = _pca_plane(mu)
    return ((mu.double() - centre) @ comps.T).float(), labels


def plot_latent(model: nn.Module, images: torch.Tensor, labels: torch.Tensor | None, path: PathLike) -> Path:
    """Scatter the posterior means ``mu(x)`` of ``images`` (held-out data), coloured by label.

    ``latent == 2``: the two coordinates; ``latent > 2``: the first two principal components
    (SVD of the centred means, explained variance in the axis labels); ``latent == 1``: the
    coordinate against the label (or a histogram without labels).  Integer labels with at most
    20 classes get a discrete colour bar; ``labels=None`` draws one colour.  Returns the path.
    """
    if images.shape[0] == 0:
        raise ValueError("plot_latent needs at least one image, got an empty tensor")
    if labels is not None and labels.shape[0] != images.shape[0]:
        raise ValueError(f"labels has {labels.shape[0]} entries but images has {images.shape[0]}")
    with evaluating(model):
        mu = _encode_means(model, images)
    latent = mu.shape[1]
    y = None if labels is None else labels.detach().cpu().numpy()
    fig = Figure(figsize=(6.4, 5.4), layout="constrained")
    ax = fig.subplots()
    if latent == 1:
        if y is None:
            ax.hist(mu[:, 0].numpy(), bins=50, color="tab:blue")
            ax.set_ylabel("count")
        else:
            ax.scatter(mu[:, 0].numpy(), y, s=4, alpha=0.5, c=y, cmap="tab10")
            ax.set_ylabel("label")
        ax.set_xlabel("z[0] (posterior mean)")
        ax.set_title("latent means of held-out data")
        return _save(fig, path)
    if latent == 2:
        coords, axis_labels = mu, ["z[0] (posterior mean)", "z[1] (posterior mean)"]
        title = "latent means of held-out data"
    else:
        coords, axis_labels = _principal_components(mu)
        title = f"latent means of held-out data (latent={latent}, PCA to 2-D)"
    xy = coords.numpy()
    if y is None:
        ax.scatter(xy[:, 0], xy[:, 1], s=4, alpha=0.6, color="tab:blue")
    else:
        classes, index = np.unique(y, return_inverse=True)
        if np.issubdtype(y.dtype, np.integer) and len(classes) <= 20:
            base = colormaps["tab10" if len(classes) <= 10 else "tab20"]
            cmap = ListedColormap([base(i) for i in range(len(classes))])
            norm = BoundaryNorm(np.arange(-0.5, len(classes)), cmap.N)
            sc = ax.scatter(xy[:, 0], xy[:, 1], c=index, s=4, alpha=0.7, cmap=cmap, norm=norm)
            bar = fig.colorbar(sc, ax=ax, ticks=np.arange(len(classes)))
            bar.set_ticklabels([str(c) for c in classes])
        else:
            sc = ax.scatter(xy[:, 0], xy[:, 1], c=y, s=4, alpha=0.7, cmap="viridis")
            bar = fig.colorbar(sc, ax=ax)
        bar.set_label("label")
    ax.set_xlabel(axis_labels[0])
    ax.set_ylabel(axis_labels[1])
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def plot_manifold(
    model: nn.Module,
    path: PathLike,
    n: int = 20,
    span: float = 3.0,
    images: torch.Tensor | None = None,
) -> Path | None:
    """Save the decoded ``n x n`` grid over a 2-D latent plane.

    ``latent == 2``: the plane itself, ``[-span, span]^2`` in prior units.  ``latent > 2`` (needs
    ``images``): the plane of the first two principal components of the images' latent means,
    through their centre (the mean code ``c``; the other ``latent - 2`` directions stay at ``c``),
    ``span`` standard deviations of the means each way.  Cell ``(row i, column j)`` shows
    ``sigmoid(decode(z_ij))`` centred on its coordinates, with the first axis increasing to the right
    and the second upwards, like the latent scatter plot.

    In more than two dimensions the codes of real images lie on a shell away from ``c`` (the norm of
    a sum of ``latent`` independent parts), so the grid's centre falls where no image is encoded and
    decodes to a faint blend of digits.  A dashed ellipse marks the points nearer ``c`` than every
    encoded image, ``||z - c|| < min_i ||mu_i - c||``, and the title gives that distance.

    Returns ``None`` (writes nothing) for a latent of 1, for ``latent > 2`` without images, and for
    outputs that are not images.
    """
    fig = _manifold_figure(model, n, span, images)
    return None if fig is None else _save(fig, path)


def _manifold_figure(model: nn.Module, n: int, span: float, images: torch.Tensor | None) -> Figure | None:
    """The figure of :func:`plot_manifold`, or None when there is no plane to draw."""
    shape = _display_shape(model.in_shape)
    if shape is None or model.latent < 2 or (model.latent > 2 and images is None):
        return None
    if n < 1:
        raise ValueError(f"n must be a positive integer, got {n}")
    if not span > 0:
        raise ValueError(f"span must be positive, got {span}")
    ticks = (
        torch.linspace(-span, span, n, dtype=torch.float64) if n > 1 else torch.zeros(1, dtype=torch.float64)
    )
    ys, xs = torch.meshgrid(ticks.flip(0), ticks, indexing="ij")
    plane = torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=1)  # [n*n, 2]
    hole = None
    if model.latent == 2:
        z, labels = plane, ["z[0]", "z[1]"]
        title = f"decoded latent plane, {n}x{n} grid over [-{span:g}, {span:g}]^2"
    else:
        with evaluating(model):
            mu = _encode_means(model, images).double()
        centre, comps, std, labels = _pca_plane(mu)
        z = centre + (plane * std) @ comps
        nearest = float((mu - centre).norm(dim=1).min())
        median = float((mu - centre).norm(dim=1).median())
        if float(std.min()) > 0:
            hole = (2 * nearest / float(std[0]), 2 * nearest / float(std[1]))
        title = (
            f"decoded plane of the first two principal components (latent={model.latent}), +-{span:g} std;\n"
            f"the other {model.latent - 2} directions at the mean code c.  No encoded image lies within "
            f"{nearest:.2f} of c (median {median:.2f}):\ninside the dashed line the decoder blends digits, "
            "so they fade"
        )
    param = next(model.parameters())
    with evaluating(model):
        decoded = _to_unit(torch.sigmoid(model.decode(z.to(device=param.device, dtype=param.dtype))))
    grid = _grid(decoded, shape, n, pad=0)
    fig = Figure(figsize=(8, 8), layout="constrained")
    ax = fig.subplots()
    cmap = "gray" if grid.ndim == 2 else None
    # Cell (i, j) is centred on the point it decodes: the image reaches half a cell beyond the ticks.
    half = float(ticks[1] - ticks[0]) / 2 if n > 1 else span
    lo, hi = float(ticks[0]) - half, float(ticks[-1]) + half
    extent = (lo, hi, lo, hi)
    ax.imshow(grid, cmap=cmap, vmin=0, vmax=1, extent=extent, interpolation="nearest")
    if hole is not None:
        ax.add_patch(Ellipse((0.0, 0.0), *hole, fill=False, color="tab:red", lw=1.2, ls="--"))
    ax.set_xlabel(labels[0])
    ax.set_ylabel(labels[1])
    ax.set_title(title, fontsize=9)
    return fig


def plot_loss(history: Sequence[dict[str, Any]], path: PathLike) -> Path:
    """Save training and held-out loss per epoch from ``history`` (a list of per-epoch dicts).

    Reads ``"epoch"`` (defaults to 1, 2, ...), ``"train_loss"`` and ``"val_loss"``; entries
    whose value is missing, ``None`` or NaN are skipped (e.g. no validation set).  An empty
    history gives a figure that says so.  Returns the path written.
    """
    return _save(_loss_figure(history), path)


def _loss_figure(history: Sequence[dict[str, Any]]) -> Figure:
    """The figure of :func:`plot_loss`; epochs are whole numbers, so are the ticks (also after a resume)."""
    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.subplots()
    epochs = [float(h.get("epoch", i + 1)) for i, h in enumerate(history)]
    drawn = False
    for key, label, color in (("train_loss", "train", "tab:blue"), ("val_loss", "held-out", "tab:orange")):
        pts = [
            (e, float(h[key]))
            for e, h in zip(epochs, history, strict=True)
            if h.get(key) is not None and math.isfinite(float(h[key]))
        ]
        if pts:
            ex, ly = zip(*pts, strict=True)
            ax.plot(ex, ly, marker="o" if len(pts) <= 30 else None, ms=3, color=color, label=label)
            drawn = True
    if drawn:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no loss recorded yet", ha="center", va="center", transform=ax.transAxes)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss (negative ELBO)")
    ax.grid(alpha=0.3)
    ax.set_title("training curve", fontsize=10)
    return fig


def save_all(
    model: nn.Module,
    out_dir: PathLike,
    *,
    val_images: torch.Tensor,
    val_labels: torch.Tensor | None = None,
    history: Sequence[dict[str, Any]] | None = None,
    n_reconstructions: int = 16,
    n_samples: int = 64,
    generator: torch.Generator | None = None,
) -> list[Path]:
    """Write every figure to ``out_dir`` and return the paths written, in this order:

    ``reconstructions.png`` (first ``n_reconstructions`` held-out images), ``samples.png``,
    ``latent.png`` (held-out means coloured by ``val_labels``), ``manifold.png`` (the latent
    plane, or for ``latent > 2`` the plane of the means' first two principal components; not for a
    latent of 1 or non-image data) and ``loss.png`` (only when ``history`` is
    given).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [
        plot_reconstructions(model, val_images, out / FILENAMES["reconstructions"], n=n_reconstructions),
        plot_samples(model, out / FILENAMES["samples"], n=n_samples, generator=generator),
        plot_latent(model, val_images, val_labels, out / FILENAMES["latent"]),
    ]
    manifold = plot_manifold(model, out / FILENAMES["manifold"], images=val_images)
    if manifold is not None:
        paths.append(manifold)
    if history is not None:
        paths.append(plot_loss(history, out / FILENAMES["loss"]))
    return paths
