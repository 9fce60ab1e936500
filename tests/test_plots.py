"""Tests for fastvae.plots: every figure is written as a non-empty PNG, the model's mode is restored."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib.patches import Ellipse

from fastvae.data import load_mnist
from fastvae.models import MLPVAE, ConvVAE
from fastvae.plots import (
    FILENAMES,
    _loss_figure,
    _manifold_figure,
    _pca_plane,
    plot_latent,
    plot_loss,
    plot_manifold,
    plot_reconstructions,
    plot_samples,
    save_all,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
HISTORY = [
    {"epoch": 1, "train_loss": 210.0, "val_loss": 190.0},
    {"epoch": 2, "train_loss": 170.0, "val_loss": 165.0},
    {"epoch": 3, "train_loss": 160.0},  # no held-out value this epoch
]


def assert_png(path) -> None:
    raw = path.read_bytes()
    assert raw[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert len(raw) > 1000, f"{path} is suspiciously small ({len(raw)} bytes)"


@pytest.fixture(scope="module")
def mnist_val():
    x, y = load_mnist("test")
    return x[:300], y[:300]


@pytest.mark.parametrize(
    "model_fn,latent",
    [(lambda: ConvVAE(latent=2, hidden=(8, 16, 16)), 2), (lambda: MLPVAE(hidden=(64,), latent=20), 20)],
    ids=["conv-latent2", "mlp-latent20"],
)
def test_save_all_writes_pngs(tmp_path, mnist_val, model_fn, latent):
    torch.manual_seed(0)
    model = model_fn()
    model.train()
    x, y = mnist_val
    paths = save_all(model, tmp_path / "figs", val_images=x, val_labels=y, history=HISTORY)
    names = [p.name for p in paths]
    expected = ["reconstructions", "samples", "latent", "manifold", "loss"]
    assert names == [FILENAMES[k] for k in expected]
    for p in paths:
        assert p.parent == tmp_path / "figs"
        assert_png(p)
    assert model.training, "save_all must restore the training mode"
    assert all(p.grad is None for p in model.parameters())


def test_eval_mode_is_restored(tmp_path, mnist_val):
    model = MLPVAE(hidden=(32,), latent=2).eval()
    x, y = mnist_val
    plot_reconstructions(model, x, tmp_path / "r.png", n=20)
    plot_samples(model, tmp_path / "s.png", n=10, generator=torch.Generator().manual_seed(0))
    plot_latent(model, x, y, tmp_path / "l.png")
    assert plot_manifold(model, tmp_path / "m.png", n=5, span=2.0) == tmp_path / "m.png"
    assert not model.training
    for name in ("r", "s", "l", "m"):
        assert_png(tmp_path / f"{name}.png")


def test_manifold_needs_a_plane(tmp_path, mnist_val):
    """latent > 2 decodes the principal plane of the images' means; latent 1 or no images: nothing."""
    model = MLPVAE(hidden=(32,), latent=3)
    assert plot_manifold(model, tmp_path / "m.png") is None
    assert not (tmp_path / "m.png").exists()
    assert plot_manifold(MLPVAE(hidden=(32,), latent=1), tmp_path / "m.png", images=mnist_val[0]) is None
    assert plot_manifold(model, tmp_path / "m.png", n=4, images=mnist_val[0]) == tmp_path / "m.png"
    assert_png(tmp_path / "m.png")


def test_latent_plot_variants(tmp_path, mnist_val):
    x, y = mnist_val
    for latent in (1, 2, 5):
        model = MLPVAE(hidden=(32,), latent=latent)
        assert_png(plot_latent(model, x, y, tmp_path / f"with-{latent}.png"))
        assert_png(plot_latent(model, x, None, tmp_path / f"without-{latent}.png"))
    continuous = torch.rand(x.shape[0])  # non-integer "labels" get a continuous colour bar
    assert_png(plot_latent(MLPVAE(hidden=(32,), latent=2), x, continuous, tmp_path / "cont.png"))
    with pytest.raises(ValueError, match="labels has 3 entries"):
        plot_latent(MLPVAE(hidden=(32,), latent=2), x, y[:3], tmp_path / "bad.png")


def test_flat_and_rgb_data(tmp_path):
    flat = MLPVAE(in_shape=(10,), hidden=(16,), latent=2)
    x = torch.rand(50, 10)
    paths = save_all(flat, tmp_path / "flat", val_images=x, history=None)
    assert [p.name for p in paths] == ["reconstructions.png", "samples.png", "latent.png"]
    for p in paths:
        assert_png(p)
    square = MLPVAE(in_shape=(784,), hidden=(16,), latent=2)  # flattened MNIST is shown as 28x28
    paths = save_all(square, tmp_path / "square", val_images=torch.rand(20, 784))
    assert "manifold.png" in [p.name for p in paths]
    rgb = ConvVAE(in_shape=(3, 32, 32), latent=2, hidden=(4, 8, 8))
    paths = save_all(rgb, tmp_path / "rgb", val_images=torch.rand(20, 3, 32, 32), history=HISTORY)
    assert len(paths) == 5
    for p in paths:
        assert_png(p)


def test_plot_loss_edge_cases(tmp_path):
    assert_png(plot_loss([], tmp_path / "empty.png"))
    assert_png(plot_loss([{"train_loss": 3.0}, {"train_loss": 2.0}], tmp_path / "noval.png"))
    nan_val = [{"epoch": 1, "train_loss": 1.0, "val_loss": float("nan")}, {"epoch": 2, "train_loss": 0.5}]
    assert_png(plot_loss(nan_val, tmp_path / "nan.png"))


def test_argument_errors(tmp_path):
    model = MLPVAE(hidden=(16,), latent=2)
    with pytest.raises(ValueError, match="n must be a positive integer"):
        plot_samples(model, tmp_path / "s.png", n=0)
    with pytest.raises(ValueError, match="at least one image"):
        plot_reconstructions(model, torch.zeros(0, 1, 28, 28), tmp_path / "r.png")


@pytest.mark.parametrize("epochs", [[1, 2], [3, 4, 5, 6], list(range(1, 11)), [1, 2, 3] + list(range(4, 21))])
def test_loss_ticks_are_whole_epochs(epochs):
    """Epochs are whole numbers: no 1.5 or 2.5 ticks, whatever the range (a resumed run's history too)."""
    history = [{"epoch": e, "train_loss": 200.0 / e, "val_loss": 210.0 / e} for e in epochs]
    ax = _loss_figure(history).axes[0]
    lo, hi = ax.get_xlim()
    shown = [t for t in ax.get_xticks() if lo <= t <= hi]
    assert len(shown) >= 2 and all(float(t).is_integer() for t in shown), shown


def test_manifold_cells_are_centred_on_the_points_they_decode():
    """n=3, span=2: cells decode z in {-2, 0, 2}^2 and are drawn centred there (extent +-3)."""
    torch.manual_seed(0)
    model = MLPVAE(hidden=(16,), latent=2).eval()
    ax = _manifold_figure(model, 3, 2.0, None).axes[0]
    (image,) = ax.images
    assert tuple(image.get_extent()) == (-3.0, 3.0, -3.0, 3.0)
    grid = np.asarray(image.get_array())
    with torch.no_grad():
        centre = torch.sigmoid(model.decode(torch.zeros(1, 2))).reshape(28, 28).double().numpy()
        top_left = torch.sigmoid(model.decode(torch.tensor([[-2.0, 2.0]]))).reshape(28, 28).double().numpy()
    assert np.allclose(grid[28:56, 28:56], centre, atol=1e-6)  # the middle cell is z = (0, 0)
    assert np.allclose(grid[:28, :28], top_left, atol=1e-6)  # first axis right, second up


def test_manifold_above_two_dimensions_marks_where_no_image_is_encoded(mnist_val):
    """latent > 2: the title says how far the nearest code is from the mean code; an ellipse marks it."""
    torch.manual_seed(0)
    model = MLPVAE(hidden=(32,), latent=6).eval()
    x = mnist_val[0]
    fig = _manifold_figure(model, 5, 3.0, x)
    ax = fig.axes[0]
    with torch.no_grad():
        mu = model.encode(x)[0].double()
    centre, _, std, _ = _pca_plane(mu)
    nearest = float((mu - centre).norm(dim=1).min())
    title = ax.get_title()
    assert f"No encoded image lies within {nearest:.2f} of c" in title and "the other 4 directions" in title
    (ellipse,) = [p for p in ax.patches if isinstance(p, Ellipse)]
    assert ellipse.width == pytest.approx(2 * nearest / float(std[0]), rel=1e-5)
    assert ellipse.height == pytest.approx(2 * nearest / float(std[1]), rel=1e-5)


def test_a_file_in_the_way_of_the_output_folder_is_named(tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    with pytest.raises(NotADirectoryError, match=f"{blocker} is a file, not a directory"):
        plot_samples(MLPVAE(hidden=(16,), latent=2), blocker / "sub" / "s.png", n=4)
