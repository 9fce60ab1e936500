"""ELBO parity (issue 12): pytorch/examples' loop against fastvae's ``Trainer``, one difference at a time.

One configurable training loop whose two ends reproduce ``bench/examples_loop.run_examples``
(``VARIANTS["loop"]``, bit for bit) and :class:`fastvae.trainer.Trainer` (``VARIANTS["trainer"]``, to
float32 summation order); in between, each knob swaps one component:

* ``loss``:  ``bce``     sigmoid + ``F.binary_cross_entropy(sum)`` + KLD (the example's) |
             ``fused``   ``ops.vae_loss(logits, x, mu, logvar, reduction="sum")`` (the Trainer's)
* ``adam``:  ``foreach`` torch's default | ``fused`` (the Trainer's)
* ``x``:     ``float``   ``x.float() / 255`` stored | ``uint8`` (the model divides by 255)
* ``noise``: ``randn``   ``eps = torch.randn_like(std)`` from the global generator |
             ``philox``  ``ops.reparameterize`` keyed per step from a generator seeded ``_mix_seed(seed, 1)``
* ``order``: ``loader``  ``DataLoader(shuffle=True)`` (epoch seed from the global generator) |
             ``perm``    ``data.iterate_batches`` with a generator seeded ``_mix_seed(seed, 1000 + epoch)``

``loss``, ``adam`` and ``x`` change only float rounding (runs stay paired: same weights, batches
and noise); ``noise`` and ``order`` change random streams (a reseed, not a different algorithm).
After the last epoch each model is scored three ways on the 1,000 held-out digits:

* ``loop_test``:    the example's ``test()``: one ``eps`` per image from the global generator;
* ``trainer_eval``: ``Trainer.evaluate()``: one ``eps`` per image from the fixed ``EVAL_SEED``;
* ``judge``:        the negative ELBO averaged over ``K = 64`` draws of ``eps`` per image (fixed seed),
                    ``-ELBO(x) = E_eps[BCE(x, decode(mu + sigma eps))] + KL(q(z|x) || N(0, I))``, the
                    same for every variant: held-out quality without the one-draw noise (about 0.15
                    nats on 1,000 images).

    python -m bench.elbo_parity --variants loop,trainer --seeds 1-8     # ~10-20 s per run on 1 core
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from fastvae import data, ops
from fastvae.models import MLPVAE
from fastvae.trainer import _SEED_MAX, _mix_seed, score_samples

__all__ = ["VARIANTS", "run", "loop_test", "judge", "summarise", "main"]

_LOOP = {"loss": "bce", "adam": "foreach", "x": "float", "noise": "randn", "order": "loader"}
# The chain from the loop to the Trainer, one knob per step, and the two stream changes alone.
VARIANTS: dict[str, dict[str, str]] = {
    "loop": _LOOP,
    "+fused-loss": {**_LOOP, "loss": "fused"},
    "+fused-adam": {**_LOOP, "loss": "fused", "adam": "fused"},
    "+uint8": {**_LOOP, "loss": "fused", "adam": "fused", "x": "uint8"},
    "+philox": {**_LOOP, "loss": "fused", "adam": "fused", "x": "uint8", "noise": "philox"},
    "trainer": {"loss": "fused", "adam": "fused", "x": "uint8", "noise": "philox", "order": "perm"},
    "loop+philox-only": {**_LOOP, "noise": "philox"},
    "loop+perm-only": {**_LOOP, "order": "perm"},
}
JUDGE_SEED, JUDGE_K = 424242, 64
LR, BATCH = 1e-3, 128


def loop_test(model: MLPVAE, test_f: torch.Tensor) -> float:
    """pytorch/examples' ``test()``: batches of 128, sigmoid + BCE(sum) + KLD, one ``eps`` per image from
    the global generator."""
    model.eval()
    total = 0.0
    with torch.no_grad():
        for (xb,) in DataLoader(TensorDataset(test_f), batch_size=BATCH, shuffle=False):
            mu, logvar = model.encode(xb)
            std = torch.exp(0.5 * logvar)
            z = mu + torch.randn_like(std) * std
            recon = torch.sigmoid(model.decode(z).reshape(-1, 784))
            bce = F.binary_cross_entropy(recon, xb.view(-1, 784), reduction="sum")
            kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
            total += (bce + kld).item()
    model.train()
    return total / test_f.shape[0]


def judge(model: MLPVAE, test_u8: torch.Tensor, k: int = JUDGE_K, seed: int = JUDGE_SEED) -> float:
    """Held-out negative ELBO per image, ``eps`` averaged over ``k`` fixed draws (``score_samples``)."""
    return float(score_samples(model, test_u8, seed=seed, samples=k).double().mean())


def run(seed: int, epochs: int = 10, **knobs: str) -> dict:
    """Train MLPVAE 784-400-20 (Adam 1e-3, batch 128) with ``knobs``; the three held-out figures."""
    cfg = {**_LOOP, **knobs}
    train_u8, _ = data.load_mnist("train")
    test_u8, _ = data.load_mnist("test")
    test_f = test_u8.float() / 255
    torch.manual_seed(seed)  # initial weights: the same as the example's VAE() for the same seed
    model = MLPVAE()
    params = list(model.parameters())
    fused = cfg["adam"] == "fused"
    opt = torch.optim.Adam(params, lr=LR, fused=True) if fused else torch.optim.Adam(params, lr=LR)
    train = train_u8 if cfg["x"] == "uint8" else train_u8.float() / 255
    loader = DataLoader(TensorDataset(train), batch_size=BATCH, shuffle=True)
    noise = torch.Generator().manual_seed(_mix_seed(seed, 1))
    t0 = time.perf_counter()
    for epoch in range(1, epochs + 1):
        if cfg["order"] == "loader":
            batches = (b for (b,) in loader)
        else:
            gen = torch.Generator().manual_seed(_mix_seed(seed, 1000 + epoch))
            batches = (b for b, _ in data.iterate_batches(train, None, BATCH, shuffle=True, generator=gen))
        train_sum = 0.0
        for xb in batches:
            opt.zero_grad(set_to_none=True)
            mu, logvar = model.encode(xb)
            if cfg["noise"] == "randn":
                std = torch.exp(0.5 * logvar)
                z = mu + torch.randn_like(std) * std
            else:
                key = int(torch.randint(0, _SEED_MAX, (1,), generator=noise))
                z = ops.reparameterize(mu, logvar, seed=key)
            logits = model.decode(z)
            if cfg["loss"] == "bce":
                xf = xb.float() / 255 if xb.dtype == torch.uint8 else xb
                recon = torch.sigmoid(logits).reshape(-1, 784)
                bce = F.binary_cross_entropy(recon, xf.reshape(-1, 784), reduction="sum")
                loss = bce - 0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
            else:
                target = xb.reshape(logits.shape)
                loss = ops.vae_loss(logits, target, mu, logvar, reduction="sum", validate=False)
            loss.backward()
            train_sum += loss.item()
            opt.step()
        # The example runs test() every epoch; it draws from the global generator, which the
        # example's next epoch (DataLoader seed, randn_like) continues from.
        held_out = loop_test(model, test_f)
    return {
        "seed": seed,
        "cfg": cfg,
        "epochs": epochs,
        "train": train_sum / train.shape[0],
        "loop_test": held_out,
        "trainer_eval": float(score_samples(model, test_u8).double().mean()),
        "judge": judge(model, test_u8),
        "seconds": time.perf_counter() - t0,
    }


def summarise(results: list[dict]) -> str:
    """Markdown table: per variant and metric, the values, mean and relative gap to the loop's mean."""
    by = {}
    for r in results:
        by.setdefault(r["variant"], {})[r["seed"]] = r
    seeds = sorted(set.intersection(*(set(v) for v in by.values())))
    lines = [f"seeds {seeds[0]}-{seeds[-1]} ({len(seeds)})", "", "| variant | metric | mean | sd | gap |"]
    lines.append("| --- | --- | --- | --- | --- |")
    for metric in ("loop_test", "trainer_eval", "judge"):
        ref = statistics.mean(by["loop"][s][metric] for s in seeds) if "loop" in by else None
        for name, runs in by.items():
            v = [runs[s][metric] for s in seeds]
            m = statistics.mean(v)
            sd = statistics.stdev(v) if len(v) > 1 else float("nan")
            gap = "" if ref is None else f"{100 * (m / ref - 1):+.2f}%"
            lines.append(f"| {name} | {metric} | {m:.3f} | {sd:.3f} | {gap} |")
    return "\n".join(lines)


def _seed_list(text: str) -> list[int]:
    if "-" in text:
        lo, hi = (int(v) for v in text.split("-"))
        return list(range(lo, hi + 1))
    return [int(v) for v in text.split(",")]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default="loop,trainer", help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--seeds", default="1-4", help="'1-8' or '1,2,3'")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument(
        "--threads", type=int, default=1, help="torch.set_num_threads (1: quiet on shared machines)"
    )
    p.add_argument("--out", default=None, help="append one JSON line per run to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {unknown}; expected names from {list(VARIANTS)}")
    results = []
    for name in names:
        for seed in _seed_list(args.seeds):
            r = {"variant": name, **run(seed, args.epochs, **VARIANTS[name])}
            results.append(r)
            print(
                f"{name:18s} seed {seed:3d}  loop_test {r['loop_test']:.3f}  trainer_eval "
                f"{r['trainer_eval']:.3f}  judge {r['judge']:.3f}  {r['seconds']:.1f} s",
                flush=True,
            )
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(r) + "\n")
    print(summarise(results))


if __name__ == "__main__":
    main()
