"""Tests for fastvae.models: shapes, dtypes, ranges, config round trip, errors, gradients."""

from __future__ import annotations

import pytest
import torch

import fastvae
from fastvae.models import MAX_LAYERS, MAX_PARAMETERS, MLPVAE, MODELS, ConvVAE, build_model

SHAPES = [(1, 28, 28), (1, 32, 32), (3, 32, 32)]


def make(kind: str, in_shape, latent: int = 3):
    torch.manual_seed(0)
    if kind == "mlp":
        return MLPVAE(in_shape=in_shape, hidden=(64, 32), latent=latent)
    return ConvVAE(in_shape=in_shape, latent=latent, hidden=(8, 16, 12))


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_defaults_are_the_reference_architectures():
    mlp = MLPVAE()
    # pytorch/examples vae: fc1 784->400, fc21/fc22 400->20, fc3 20->400, fc4 400->784
    assert (mlp.in_shape, mlp.hidden, mlp.latent) == ((1, 28, 28), (400,), 20)
    assert n_params(mlp) == (784 * 400 + 400) + 2 * (400 * 20 + 20) + (20 * 400 + 400) + (400 * 784 + 784)
    conv = ConvVAE()
    # Keras example: encoder 69,076 parameters, decoder 65,089
    encoder = [conv.encoder, conv.fc_mu, conv.fc_logvar]
    decoder = [conv.fc_decode, conv.decoder]
    assert sum(n_params(m) for m in encoder) == 69_076
    assert sum(n_params(m) for m in decoder) == 65_089
    assert (conv.in_shape, conv.latent) == ((1, 28, 28), 2)


@pytest.mark.parametrize("kind", ["mlp", "conv"])
@pytest.mark.parametrize("in_shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_forward_shapes(kind, in_shape, dtype):
    model = make(kind, in_shape)
    x = torch.randint(0, 256, (4, *in_shape), dtype=torch.uint8)
    if dtype != torch.uint8:
        x = x.to(dtype) / 255
    logits, mu, logvar = model(x)
    assert logits.shape == (4, *in_shape) and logits.dtype == torch.float32
    assert mu.shape == logvar.shape == (4, 3)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_uint8_input_is_read_as_pixels_over_255(kind):
    model = make(kind, (1, 28, 28))
    x = torch.randint(0, 256, (5, 1, 28, 28), dtype=torch.uint8)
    mu_u8, lv_u8 = model.encode(x)
    mu_f, lv_f = model.encode(x.float() / 255)
    torch.testing.assert_close(mu_u8, mu_f)
    torch.testing.assert_close(lv_u8, lv_f)
    mu_d, _ = model.encode(x.double() / 255)  # float64 input is cast to the parameters' dtype
    torch.testing.assert_close(mu_d, mu_f)


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_encode_decode_sample_reconstruct(kind):
    model = make(kind, (3, 32, 32), latent=4)
    x = torch.rand(6, 3, 32, 32)
    mu, logvar = model.encode(x)
    assert mu.shape == logvar.shape == (6, 4)
    logits = model.decode(mu)
    assert logits.shape == (6, 3, 32, 32)
    assert logits.min() < 0 < logits.max() or True  # logits are unbounded (no sigmoid)
    samples = model.sample(7)
    assert samples.shape == (7, 3, 32, 32) and not samples.requires_grad
    assert 0 <= samples.min() and samples.max() <= 1
    recon = model.reconstruct(x)
    assert recon.shape == x.shape and not recon.requires_grad
    assert 0 <= recon.min() and recon.max() <= 1
    torch.testing.assert_close(recon, torch.sigmoid(model.decode(mu)))
    # seeded sampling is reproducible
    s1 = model.sample(3, generator=torch.Generator().manual_seed(5))
    s2 = model.sample(3, generator=torch.Generator().manual_seed(5))
    assert torch.equal(s1, s2)
    assert model.sample(0).shape == (0, 3, 32, 32)


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_forward_samples_z_with_fastvae_reparameterize(kind):
    model = make(kind, (1, 28, 28))
    x = torch.rand(3, 1, 28, 28)
    torch.manual_seed(11)
    logits1, mu, logvar = model(x)
    torch.manual_seed(11)
    logits2, _, _ = model(x)
    assert torch.equal(logits1, logits2)  # seed drawn from torch's default generator
    torch.manual_seed(11)
    z = fastvae.reparameterize(mu, logvar)
    torch.testing.assert_close(logits1, model.decode(z))
    logits3, _, _ = model(x)
    assert not torch.equal(logits1, logits3)  # sampled, also in eval mode
    model.eval()
    assert not torch.equal(model(x)[0], model(x)[0])


@pytest.mark.parametrize("kind", ["mlp", "conv"])
@pytest.mark.parametrize("in_shape", [(1, 28, 28), (3, 32, 32)])
def test_config_round_trip(kind, in_shape):
    model = make(kind, in_shape, latent=5)
    config = model.config()
    assert config == {
        "model": kind,
        "in_shape": list(in_shape),
        "latent": 5,
        "hidden": [64, 32] if kind == "mlp" else [8, 16, 12],
    }
    rebuilt = build_model(config)
    assert type(rebuilt) is MODELS[kind] and rebuilt.config() == config
    rebuilt.load_state_dict(model.state_dict())
    x = torch.rand(2, *in_shape)
    torch.testing.assert_close(rebuilt.encode(x), model.encode(x))
    # JSON-like values (lists) are accepted, and missing keys use the defaults
    assert build_model({"model": "mlp"}).config() == MLPVAE().config()
    assert build_model({"model": "conv"}).config() == ConvVAE().config()


def test_build_model_errors():
    with pytest.raises(ValueError, match=r"config\['model'\] must be one of \['conv', 'mlp'\], got 'gan'"):
        build_model({"model": "gan"})
    with pytest.raises(ValueError, match=r"unknown model config keys \['latnet'\]"):
        build_model({"model": "mlp", "latnet": 3})
    with pytest.raises(ValueError, match="with a 'model' key"):
        build_model({"latent": 3})


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_wrong_input_shape_names_the_expected_shape(kind):
    model = make(kind, (1, 28, 28))
    for bad in (
        torch.rand(2, 1, 32, 32),
        torch.rand(2, 28, 28),
        torch.rand(2, 784),
        torch.rand(2, 3, 28, 28),
    ):
        with pytest.raises(ValueError, match=r"expects input of shape \[B, 1, 28, 28\]"):
            model(bad)
    with pytest.raises(TypeError, match=r"uint8 pixels or floats in \[0, 1\], got dtype torch.int64"):
        model.encode(torch.zeros(2, 1, 28, 28, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"expects z of shape \[B, 3\]"):
        model.decode(torch.zeros(2, 4))


def test_constructor_validation():
    with pytest.raises(ValueError, match=r"H and W divisible by 4, got in_shape=\(1, 30, 28\)"):
        ConvVAE(in_shape=(1, 30, 28))
    with pytest.raises(ValueError, match=r"divisible by 8"):
        ConvVAE(in_shape=(1, 28, 28), hidden=(8, 8, 8, 16))
    with pytest.raises(ValueError, match=r"ConvVAE needs in_shape=\(C, H, W\)"):
        ConvVAE(in_shape=(784,))
    with pytest.raises(ValueError, match="latent must be a positive integer"):
        MLPVAE(latent=0)
    with pytest.raises(ValueError, match="hidden must be a sequence of positive integers"):
        MLPVAE(hidden=(400, -1))


def test_mlp_flat_features_and_deep_hidden():
    model = MLPVAE(in_shape=(10,), hidden=(32, 16, 8), latent=2)
    linear_widths = [(m.in_features, m.out_features) for m in model.decoder if isinstance(m, torch.nn.Linear)]
    assert linear_widths == [(2, 8), (8, 16), (16, 32), (32, 10)]
    logits, mu, _ = model(torch.rand(5, 10))
    assert logits.shape == (5, 10) and mu.shape == (5, 2)
    linear = MLPVAE(in_shape=(6,), hidden=(), latent=2)
    assert linear(torch.rand(3, 6))[0].shape == (3, 6)


def test_conv_other_sizes():
    model = ConvVAE(in_shape=(1, 16, 24), latent=3, hidden=(4, 4, 8, 6))
    logits, mu, _ = model(torch.rand(2, 1, 16, 24))
    assert logits.shape == (2, 1, 16, 24) and mu.shape == (2, 3)


@pytest.mark.parametrize("kind", ["mlp", "conv"])
@pytest.mark.parametrize("in_shape", [(1, 28, 28), (3, 32, 32)])
def test_backward_gives_finite_gradients_everywhere(kind, in_shape):
    model = make(kind, in_shape)
    x = torch.randint(0, 256, (8, *in_shape), dtype=torch.uint8)
    logits, mu, logvar = model(x)
    loss = fastvae.vae_loss(logits, x, mu, logvar)
    assert torch.isfinite(loss)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} has no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has non-finite gradients"
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


def test_a_few_steps_reduce_the_loss():
    from fastvae.data import load_mnist

    x, _ = load_mnist("test")
    x = x[:256]
    torch.manual_seed(0)
    model = MLPVAE(hidden=(128,), latent=8)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        logits, mu, logvar = model(x)
        loss = fastvae.vae_loss(logits, x, mu, logvar, reduction="mean")
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0]


@pytest.mark.parametrize(
    ("kind", "in_shape", "hidden", "latent"),
    [
        ("mlp", (1, 28, 28), (400,), 20),
        ("mlp", (5,), (), 3),
        ("mlp", (2, 3), (7, 5, 4), 2),
        ("conv", (1, 28, 28), (32, 64, 16), 2),
        ("conv", (3, 32, 32), (4, 8, 6, 5), 3),
        ("conv", (2, 8, 4), (3, 7), 1),
    ],
)
def test_parameter_count_is_computed_without_building(kind, in_shape, hidden, latent):
    cls = MODELS[kind]
    model = cls(in_shape=in_shape, hidden=hidden, latent=latent)
    assert cls.num_parameters(in_shape, hidden, latent) == sum(p.numel() for p in model.parameters())


def test_oversized_configs_are_refused_before_allocating():
    # hidden: [400000000] in a checkpoint's config used to try to allocate 2.5 TB
    with pytest.raises(ValueError, match=r"would have 6\.32e\+11 parameters .*MAX_PARAMETERS=1e\+09"):
        build_model({"model": "mlp", "hidden": [400000000], "latent": 3})
    with pytest.raises(ValueError, match=r"more than the bound MAX_PARAMETERS"):
        build_model({"model": "mlp", "in_shape": [1, 10**6, 10**6]})
    with pytest.raises(ValueError, match=r"more than the bound MAX_PARAMETERS"):
        build_model({"model": "conv", "in_shape": [1, 2**20, 2**20], "hidden": [1, 1]})
    with pytest.raises(ValueError, match=r"config has 65 hidden layers, more than the bound MAX_LAYERS=64"):
        build_model({"model": "mlp", "hidden": [1] * 65})
    with pytest.raises(ValueError, match=r"config has 100 hidden layers"):
        build_model({"model": "conv", "hidden": [1] * 101})
    with pytest.raises(ValueError, match=r"config\['hidden'\] must be a list of positive integers, got 400"):
        build_model({"model": "mlp", "hidden": 400})
    assert MAX_PARAMETERS == 10**9 and MAX_LAYERS == 64
    build_model({"model": "mlp", "hidden": [1] * 64, "in_shape": [4]})  # at the bound: fine
