"""fastvae.graphs.GraphedStep: the captured training step against the same step written out eagerly.

On the CPU the step runs with ``capture=False``: the identical code on the same static buffers, so the
buffers, the device-side warm-up schedule, the step counter and the RNG advance are all tested here.
The tests marked ``gpu`` capture a real CUDA graph and compare its replays with eager steps.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from conftest import NoHostRead, rel_err, to_np

import fastvae
from fastvae import ops, reference
from fastvae.graphs import GraphedStep
from fastvae.models import MLPVAE

CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")

# Awkward sizes: 7 rows of 1x5x6 = 30 features, 11 hidden units, 3 latent dimensions.
SHAPE = (7, 1, 5, 6)


def objective(logits, x, mu, logvar, beta_t, free_bits):
    """The Trainer's objective: negative ELBO, or with free bits ``recon + beta * sum_d max(KL_d, fb) * B``
    (KL_d the batch-mean KL of latent dimension d); all summed over the batch, recon and kl detached."""
    target = x.reshape(logits.shape)
    if free_bits <= 0:
        return fastvae.vae_loss(logits, target, mu, logvar, beta=beta_t, return_terms=True, validate=False)
    recon_loss, recon, kl = fastvae.vae_loss(
        logits, target, mu, logvar, beta=0.0, return_terms=True, validate=False
    )
    mu2, lv2 = mu.float().flatten(1), logvar.float().flatten(1)
    kl_d = 0.5 * (mu2.square() + lv2.exp() - 1.0 - lv2).mean(0)
    return recon_loss + beta_t * kl_d.clamp(min=free_bits).sum() * mu2.shape[0], recon, kl


def make(device: str = "cpu", capturable: bool = False, lr: float = 1e-2):
    """A small MLPVAE and its Adam, the same weights for the same call."""
    torch.manual_seed(0)
    model = MLPVAE(in_shape=SHAPE[1:], hidden=(11,), latent=3).to(device)
    return model, torch.optim.Adam(model.parameters(), lr=lr, capturable=capturable)


def batches(n: int, device: str = "cpu") -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, SHAPE, generator=gen, dtype=torch.uint8).to(device) for _ in range(n)]


def graphed(model, opt, on: str = "cpu", step_objective=objective, **kw) -> GraphedStep:
    """The GraphedStep of the tests (eager, no warm-up, no clipping) with ``kw`` overriding its arguments."""
    args = dict(
        batch_shape=SHAPE,
        dtype=torch.uint8,
        device=torch.device(on),
        beta=1.0,
        kl_warmup=0,
        free_bits=0.0,
        grad_clip=None,
        capture=False,
    )
    return GraphedStep(model, opt, step_objective, **{**args, **kw})


def beta_host(beta: float, kl_warmup: int, step: int) -> float:
    """The Trainer's host-side schedule ``beta * min(1, step / kl_warmup)``."""
    return beta if kl_warmup <= 0 else beta * min(1.0, step / kl_warmup)


def eager_steps(model, opt, xs, *, beta, kl_warmup, free_bits, grad_clip, seeds) -> list[torch.Tensor]:
    """The training step written out by hand, one per batch; returns each step's (objective, recon, kl)."""
    out = []
    for i, (x, seed) in enumerate(zip(xs, seeds, strict=True)):
        torch.manual_seed(seed)
        opt.zero_grad()
        mu, logvar = model.encode(x)
        z = fastvae.reparameterize(mu, logvar)
        logits = model.decode(z)
        beta_t = torch.tensor(beta_host(beta, kl_warmup, i), dtype=torch.float32, device=x.device)
        loss, recon, kl = objective(logits, x, mu, logvar, beta_t, free_bits)
        loss.backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        out.append(torch.stack([loss.detach().float(), recon.float(), kl.float()]))
    return out


def assert_same_training(model_a, opt_a, model_b, opt_b, tol: float) -> None:
    """Parameters and Adam state (step, exp_avg, exp_avg_sq) agree to ``tol`` relative error."""
    for (name, a), b in zip(model_a.named_parameters(), model_b.parameters(), strict=True):
        assert rel_err(a, to_np(b)) <= tol, name
        sa, sb = opt_a.state[a], opt_b.state[b]
        assert float(sa["step"]) == float(sb["step"]), name
        for key in ("exp_avg", "exp_avg_sq"):
            assert rel_err(sa[key], to_np(sb[key])) <= tol, (name, key)


# ---------------------------------------------------------------------------------------------- CPU


@pytest.mark.parametrize(
    "free_bits, grad_clip, kl_warmup", [(0.0, None, 0), (0.0, 0.5, 3), (0.05, 2.0, 2)], ids=str
)
def test_eager_mode_equals_hand_written_steps(backend, poison, free_bits, grad_clip, kl_warmup):
    n, beta = 4, 0.7
    xs, seeds = batches(n), [100 + i for i in range(n)]
    model, opt = make()
    ref_model, ref_opt = make()
    step = graphed(model, opt, beta=beta, kl_warmup=kl_warmup, free_bits=free_bits, grad_clip=grad_clip)
    got = []
    for x, seed in zip(xs, seeds, strict=True):
        torch.manual_seed(seed)
        got.append(step.step(x).clone())
    want = eager_steps(
        ref_model,
        ref_opt,
        xs,
        beta=beta,
        kl_warmup=kl_warmup,
        free_bits=free_bits,
        grad_clip=grad_clip,
        seeds=seeds,
    )
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.dtype == torch.float32 and g.shape == (3,)
        assert rel_err(g, to_np(w)) <= 1e-6, (i, g, w)
    assert_same_training(model, opt, ref_model, ref_opt, tol=1e-6)
    assert step.steps.dtype == torch.int64 and step.steps.dim() == 0 and int(step.steps) == n


def test_first_step_terms_match_float64_reference(backend):
    """(objective, recon, kl) of a step against fastvae.reference in float64, with the key the step draws."""
    model, opt = make()
    x = batches(1)[0]
    step = graphed(model, opt, beta=0.4)
    ref = copy.deepcopy(model).double()
    torch.manual_seed(5)
    key = int(torch.randint(0, ops._KEY_LIMIT, (1,), dtype=torch.int64))  # the draw reparameterize makes
    with torch.no_grad():
        mu, logvar = ref.encode(x)
        z = reference.reparameterize(to_np(mu), to_np(logvar), key)
        logits = ref.decode(torch.from_numpy(z))
    recon = reference.bce_with_logits(to_np(logits).reshape(7, -1), to_np(x).reshape(7, -1) / 255.0)
    kl = reference.kl_divergence(to_np(mu), to_np(logvar))
    torch.manual_seed(5)
    terms = step.step(x)
    assert rel_err(terms, [recon + 0.4 * kl, recon, kl]) <= 1e-5


@pytest.mark.parametrize("beta, kl_warmup, start_step", [(2.0, 4, 0), (0.3, 7, 2), (1.5, 0, 5), (0.3, 1, 0)])
def test_warmup_schedule_on_device(beta, kl_warmup, start_step):
    """beta_t = beta * min(1, steps / kl_warmup) from the device counter: at steps 0, 1, k, > kl_warmup."""
    seen = []

    def recording(logits, x, mu, logvar, beta_t, free_bits):
        seen.append(beta_t.detach().clone())
        return objective(logits, x, mu, logvar, beta_t, free_bits)

    model, opt = make()
    step = graphed(model, opt, beta=beta, kl_warmup=kl_warmup, start_step=start_step)
    step.objective = recording
    n = 9
    for i, x in enumerate(batches(n)):
        assert int(step.steps) == start_step + i
        step.step(x)
    assert int(step.steps) == start_step + n
    for i, b in enumerate(seen):
        assert b.dtype == torch.float32 and b.dim() == 0 and b.device == step.steps.device
        assert float(b) == np.float32(beta_host(beta, kl_warmup, start_step + i)), (i, float(b))
    if kl_warmup > 0:  # the ramp is seen, then the plateau
        assert float(seen[0]) < beta and float(seen[-1]) == np.float32(beta)


def test_counter_and_schedule_are_never_read_on_the_host():
    """The step counter and beta_t stay device values (what a graph replay needs): a counter whose value
    cannot be read on the host still drives the warm-up."""
    seen = []

    def plain(logits, x, mu, logvar, beta_t, free_bits):  # the objective may read beta_t (on the CPU)
        beta_t = beta_t.as_subclass(torch.Tensor)
        seen.append(float(beta_t))
        return objective(logits, x, mu, logvar, beta_t, free_bits)

    model, opt = make()
    step = graphed(model, opt, beta=2.0, kl_warmup=2)
    step._steps = torch.tensor(0).as_subclass(NoHostRead)
    step.objective = plain
    for x in batches(3):
        step.step(x)
    assert int(step.steps.as_subclass(torch.Tensor)) == 3 and seen == [0.0, 1.0, 2.0]


def test_static_buffers_are_reused():
    model, opt = make()
    step = graphed(model, opt)
    xs = batches(3)
    out = step.step(xs[0])
    x_ptr, steps = step._x.data_ptr(), step.steps
    grads = [p.grad.data_ptr() for p in model.parameters()]
    state = [opt.state[p]["exp_avg"].data_ptr() for p in model.parameters()]
    assert torch.equal(step._x, xs[0])
    opt.zero_grad(set_to_none=True)  # what eager code in between may do: the step puts the buffers back
    for x in xs[1:]:
        assert step.step(x) is out
        assert torch.equal(step._x, x)
    assert step._x.data_ptr() == x_ptr and step.steps is steps
    assert [p.grad.data_ptr() for p in model.parameters()] == grads
    assert [opt.state[p]["exp_avg"].data_ptr() for p in model.parameters()] == state


def test_each_step_draws_fresh_noise():
    """Two steps on the same batch with unchanging weights (lr=0) see different z, hence logits."""
    model, opt = make(lr=0.0)
    seen = []

    def recording(logits, x, mu, logvar, beta_t, free_bits):
        seen.append(logits.detach().clone())
        return objective(logits, x, mu, logvar, beta_t, free_bits)

    step = graphed(model, opt)
    step.objective = recording
    x = batches(1)[0]
    a, b = step.step(x).clone(), step.step(x).clone()
    assert not torch.equal(seen[0], seen[1]) and not torch.equal(a, b)
    torch.manual_seed(3)
    c = step.step(x).clone()
    torch.manual_seed(3)
    assert torch.equal(step.step(x), c)  # the same generator state: the same key


def test_batch_of_another_shape_or_dtype_is_refused():
    model, opt = make()
    step = graphed(model, opt)
    x = batches(1)[0]
    with pytest.raises(ValueError, match=r"shape \[5, 1, 5, 6\].*batch_shape \[7, 1, 5, 6\]"):
        step.step(x[:5])
    with pytest.raises(ValueError, match="dtype torch.float32.*dtype=torch.uint8"):
        step.step(x.float() / 255)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        step.step(x.numpy())
    assert int(step.steps) == 0 and all(p.grad is None for p in model.parameters())


def test_capture_needs_cuda():
    model, opt = make()
    with pytest.raises(ValueError, match="capture=True .* needs device='cuda', got device='cpu'"):
        graphed(model, torch.optim.Adam(model.parameters(), capturable=True), capture=True)


def test_capture_needs_a_capturable_optimizer():
    model, opt = make(capturable=False)
    with pytest.raises(
        ValueError, match=r"capturable optimizer.*capturable=True.*Adam with capturable=\[False\]"
    ):
        graphed(model, opt, capture=True)
    with pytest.raises(ValueError, match="capturable"):
        graphed(model, torch.optim.SGD(model.parameters(), lr=0.1), capture=True)


@pytest.mark.parametrize(
    "kw, error, message",
    [
        (dict(beta=-1.0), ValueError, "beta must be a finite number >= 0; got -1.0"),
        (dict(beta=math.inf), ValueError, "beta must be a finite number >= 0; got inf"),
        (dict(beta="1"), TypeError, "beta must be a finite number >= 0; got str '1'"),
        (dict(free_bits=math.nan), ValueError, "free_bits must be a finite number >= 0"),
        (dict(grad_clip=0.0), ValueError, "grad_clip must be a finite number > 0; got 0.0"),
        (dict(kl_warmup=-1), ValueError, "kl_warmup must be an integer >= 0, got -1"),
        (dict(kl_warmup=2.0), ValueError, "kl_warmup must be an integer >= 0, got 2.0"),
        (dict(start_step=True), ValueError, "start_step must be an integer >= 0, got True"),
        (
            dict(batch_shape=(7, 0, 5, 6)),
            ValueError,
            "batch_shape must be a non-empty tuple of integers >= 1",
        ),
        (dict(batch_shape=()), ValueError, "batch_shape must be a non-empty tuple"),
        (dict(dtype="uint8"), TypeError, "dtype must be a torch.dtype"),
        (dict(device="gpu"), ValueError, "device must be a torch.device"),
        (
            dict(device="meta"),
            ValueError,
            r"model parameters must be on device='meta', found some on \['cpu'\]",
        ),
        (dict(capture=1), TypeError, "capture must be True or False"),
        (dict(capture=True, warmup_iters=0), ValueError, "warmup_iters must be an integer >= 1, got 0"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_arguments_are_named(kw, error, message):
    model, opt = make()
    with pytest.raises(error, match=message):
        graphed(model, opt, **kw)


def test_bad_model_optimizer_objective():
    model, opt = make()
    with pytest.raises(TypeError, match="model must be an nn.Module with encode"):
        graphed(torch.nn.Linear(2, 2), opt)
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer, got dict"):
        graphed(model, {})
    with pytest.raises(TypeError, match="objective must be callable"):
        graphed(model, opt, step_objective=None)


def test_replaced_buffers_are_refused():
    """A graph writes the recorded addresses: a new optimizer state or a swapped .grad must not be ignored."""
    model, opt = make()
    step = graphed(model, opt)
    xs = batches(3)
    step.step(xs[0])
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    with pytest.raises(RuntimeError, match="optimizer's state was replaced"):
        step.step(xs[1])

    model, opt = make()
    step = graphed(model, opt)
    step.step(xs[0])
    model.fc_mu.weight.grad = torch.zeros_like(model.fc_mu.weight)
    with pytest.raises(RuntimeError, match=r"\.grad of parameter 2 \(shape \[3, 11\]\) was replaced"):
        step.step(xs[1])


# ---------------------------------------------------------------------------------------------- GPU


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("warmup_iters", [1, 3])
def test_graph_replay_equals_eager_steps(warmup_iters):
    """Warm-up steps, the capture and the replays give the hand-written eager steps' losses and weights;
    every call is one optimizer update."""
    n, beta, kl_warmup = 8, 0.7, 5
    xs, seeds = batches(n, "cuda"), [200 + i for i in range(n)]
    model, opt = make("cuda", capturable=True)
    ref_model, ref_opt = make("cuda", capturable=True)
    step = graphed(
        model,
        opt,
        "cuda",
        beta=beta,
        kl_warmup=kl_warmup,
        grad_clip=1.0,
        capture=True,
        warmup_iters=warmup_iters,
    )
    got = []
    for x, seed in zip(xs, seeds, strict=True):
        torch.manual_seed(seed)
        got.append(step.step(x).clone())
    assert step._graph is not None
    want = eager_steps(
        ref_model, ref_opt, xs, beta=beta, kl_warmup=kl_warmup, free_bits=0.0, grad_clip=1.0, seeds=seeds
    )
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert rel_err(g, to_np(w)) <= 1e-5, (i, g, w)
    assert_same_training(model, opt, ref_model, ref_opt, tol=1e-5)
    assert int(step.steps) == n


@gpu
@pytest.mark.gpu
def test_graph_replays_draw_fresh_noise():
    """With the weights fixed (lr=0), two replays on the same batch decode different z."""
    model, opt = make("cuda", capturable=True, lr=0.0)
    logits_seen = torch.zeros(SHAPE, device="cuda")

    def recording(logits, x, mu, logvar, beta_t, free_bits):
        logits_seen.copy_(logits.detach())  # captured: the copy runs on every replay
        return objective(logits, x, mu, logvar, beta_t, free_bits)

    step = graphed(model, opt, "cuda", capture=True, warmup_iters=1)
    step.objective = recording
    x = batches(1, "cuda")[0]
    step.step(x)  # warm-up
    step.step(x)  # capture and replay
    a = logits_seen.clone()
    step.step(x)  # replay
    assert not torch.equal(a, logits_seen)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("capture", [True, False])
def test_steps_do_not_synchronise(capture):
    """After the warm-up and the capture, a step neither waits for the GPU nor reads it on the host
    (torch's sync debug mode turns any synchronising call into an error)."""
    model, opt = make("cuda", capturable=True)
    step = graphed(model, opt, "cuda", kl_warmup=4, grad_clip=1.0, capture=capture, warmup_iters=2)
    xs = batches(6, "cuda")
    for x in xs[:3]:  # warm-up steps and the capture
        step.step(x)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for x in xs[3:]:
            out = step.step(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert int(step.steps) == 6 and bool(torch.isfinite(out).all())
