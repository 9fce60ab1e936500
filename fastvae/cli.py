"""The ``fastvae`` command line: ``train``, ``sample``, ``encode`` and ``score``.

``fastvae train`` with no arguments trains pytorch/examples' MLP VAE (784-400-20) on the embedded
MNIST set (the first 9,000 images; the last 1,000 are held out) for 10 epochs, writes
``runs/<timestamp>/`` (``checkpoint.pt``, ``metrics.jsonl``, pictures) and prints the held-out
negative ELBO.  ``torchrun --nproc-per-node=N -m fastvae train ...`` trains on N processes
(DistributedDataParallel; ``--batch-size`` is the global batch).

Errors in the input (a bad path, data out of range, a corrupt checkpoint, a bad argument) are
reported as one line on stderr with a non-zero exit status; set ``FASTVAE_DEBUG=1`` for the
traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

__all__ = ["main", "build_parser", "DEFAULT_EPOCHS", "VAL_FRACTION"]

DEFAULT_EPOCHS = 10
VAL_FRACTION = 0.1
_TRAIN_DEFAULTS: dict[str, Any] = {
    "data": "mnist",
    "model": "mlp",
    "latent": None,
    "hidden": None,
    "epochs": DEFAULT_EPOCHS,
    "batch_size": 128,
    "lr": 1e-3,
    "beta": 1.0,
    "kl_warmup": 0,
    "free_bits": 0.0,
    "grad_clip": None,
    "seed": 0,
    "limit": None,
    "val_fraction": VAL_FRACTION,
}
# What a resumed run takes from its checkpoint (and so may not be given again with --resume).
_FIXED_ON_RESUME = ("data", "model", "latent", "hidden", "batch_size", "lr", "beta", "kl_warmup")
_FIXED_ON_RESUME += ("free_bits", "grad_clip", "seed", "limit", "val_fraction", "amp", "out")


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr (exit status 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class CLIError(ValueError):
    """A usage error found after parsing (reported as one line)."""


# ---------------------------------------------------------------------- argument types


def _int_at_least(minimum: int, expected: str):
    """An argparse type: an integer >= ``minimum``, refused with ``expected`` in the message."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


_positive_int = _int_at_least(1, "a positive integer")
_nonneg_int = _int_at_least(0, "an integer >= 0")


def _float_at_least(low: float, strict: bool):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        bad = value != value or value in (float("inf"), float("-inf"))
        bad = bad or (value <= low if strict else value < low)
        if bad:
            raise argparse.ArgumentTypeError(
                f"expected a finite number {'>' if strict else '>='} {low}, got {text!r}"
            )
        return value

    return parse


def _fraction(text: str) -> float:
    value = _float_at_least(0.0, strict=False)(text)
    if value >= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), got {text!r}")
    return value


# ---------------------------------------------------------------------- the parser


def build_parser() -> argparse.ArgumentParser:
    """The ``fastvae`` argument parser (sub-commands ``train``, ``sample``, ``encode``, ``score``)."""
    parser = _Parser(
        prog="fastvae",
        description="Train and use variational autoencoders with fused Triton/Numba kernels.",
        epilog="Run 'fastvae COMMAND --help' for the options of a command.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    t = sub.add_parser(
        "train",
        help="train a VAE (default: MLP 784-400-20 on the embedded MNIST set)",
        description=(
            "Train a VAE.  Defaults: pytorch/examples' MLP VAE (784-400-20), Adam 1e-3, batch 128, "
            f"{DEFAULT_EPOCHS} epochs on the embedded MNIST set (first 9,000 images; the last 1,000 are held "
            "out).  Writes checkpoint.pt, metrics.jsonl and pictures to --out (default runs/<timestamp>) "
            "and prints the held-out negative ELBO.  Under torchrun, --batch-size is the global batch."
        ),
        argument_default=argparse.SUPPRESS,  # to tell given options from defaults (--resume)
    )
    t.add_argument(
        "--data",
        metavar="mnist|PATH",
        help="'mnist' (embedded set) or a .npy/.npz/.pt/IDX file or folder; the last "
        "--val-fraction of a file is held out (default: mnist)",
    )
    t.add_argument("--model", choices=("mlp", "conv"), help="architecture (default: mlp)")
    t.add_argument(
        "--latent", type=_positive_int, metavar="N", help="latent dimensions (default: 20 mlp, 2 conv)"
    )
    t.add_argument(
        "--hidden",
        type=_positive_int,
        nargs="+",
        metavar="N",
        help="hidden widths (mlp, default 400) or conv channels then dense width (conv, default 32 64 16)",
    )
    t.add_argument(
        "--epochs", type=_nonneg_int, metavar="N", help=f"total epochs (default: {DEFAULT_EPOCHS})"
    )
    t.add_argument("--batch-size", type=_positive_int, metavar="N", help="(global) batch size (default: 128)")
    t.add_argument(
        "--lr", type=_float_at_least(0.0, strict=True), metavar="X", help="Adam lr (default: 1e-3)"
    )
    t.add_argument(
        "--beta", type=_float_at_least(0.0, strict=False), metavar="X", help="KL weight (default: 1)"
    )
    t.add_argument(
        "--kl-warmup", type=_nonneg_int, metavar="N", help="linear KL warm-up over N steps (default: 0, off)"
    )
    t.add_argument(
        "--free-bits",
        type=_float_at_least(0.0, strict=False),
        metavar="X",
        help="KL floor in nats per latent dimension (default: 0, off)",
    )
    t.add_argument(
        "--grad-clip", type=_float_at_least(0.0, strict=True), metavar="X", help="clip the gradient norm to X"
    )
    t.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), help="auto = cuda if available, else cpu (default: auto)"
    )
    t.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA only)")
    t.add_argument("--compile", action="store_true", help="torch.compile the encoder and decoder")
    t.add_argument("--seed", type=_nonneg_int, metavar="N", help="random seed (default: 0)")
    t.add_argument("--out", metavar="DIR", help="output directory (default: runs/<timestamp>)")
    t.add_argument(
        "--resume",
        metavar="DIR",
        help="continue the run in DIR from its checkpoint (settings come from the checkpoint; "
        "--epochs sets a new total)",
    )
    t.add_argument(
        "--limit", type=_positive_int, metavar="N", help="train on the first N training images only"
    )
    t.add_argument(
        "--val-fraction",
        type=_fraction,
        metavar="F",
        help="held-out fraction of a data file (default: 0.1; mnist uses its fixed 9000/1000 split)",
    )
    t.add_argument("--no-progress", action="store_true", help="no progress bar or per-epoch lines")
    t.add_argument("--no-plots", action="store_true", help="do not write the pictures")

    s = sub.add_parser(
        "sample",
        help="draw images from a trained model's prior",
        description="Decode z ~ N(0, I) with a trained model and save the images as a grid (PNG).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    s.add_argument("--checkpoint", required=True, metavar="DIR", help="run directory or checkpoint file")
    s.add_argument("--n", type=_positive_int, default=64, metavar="N", help="number of samples")
    s.add_argument("--out", default="samples.png", metavar="FILE.png", help="image file to write")
    s.add_argument("--seed", type=_nonneg_int, default=0, metavar="N", help="random seed")
    s.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu", help="device")

    e = sub.add_parser(
        "encode",
        help="write the posterior means of data to a .npy file",
        description="Encode data with a trained model; saves the means mu(x) as float32 [N, latent].",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    e.add_argument("--checkpoint", required=True, metavar="DIR", help="run directory or checkpoint file")
    e.add_argument("--data", default="mnist", metavar="mnist|PATH", help="data to encode")
    e.add_argument("--out", default="latents.npy", metavar="FILE.npy", help="output file")
    e.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu", help="device")

    c = sub.add_parser(
        "score",
        help="per-sample negative ELBO (anomaly scores) to a .npy file",
        description=(
            "Score data with a trained model: the per-sample negative ELBO in nats "
            "(fastvae.vae_loss(reduction='none'), z sampled with a fixed seed; high = unusual).  "
            "Saves float32 [N]."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    c.add_argument("--checkpoint", required=True, metavar="DIR", help="run directory or checkpoint file")
    c.add_argument("--data", default="mnist", metavar="mnist|PATH", help="data to score")
    c.add_argument("--out", default="scores.npy", metavar="FILE.npy", help="output file")
    c.add_argument(
        "--samples", type=_positive_int, default=1, metavar="K", help="z draws averaged per sample"
    )
    c.add_argument("--seed", type=_nonneg_int, default=0, metavar="N", help="seed of the z draws")
    c.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu", help="device")
    return parser


# ---------------------------------------------------------------------- helpers


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda was asked for, but CUDA is not available on this machine")
    return torch.device(name)


def _load_training_data(source: str, limit: int | None, val_fraction: float):
    """``(train_images, train_labels, val_images, val_labels, description)``."""
    from fastvae import data

    if source.lower() == "mnist":
        train_x, train_y = data.load_mnist("train")
        val_x, val_y = data.load_mnist("test")
        desc = f"the last {val_x.shape[0]} MNIST images"
    else:
        images, labels = data.load_data(source)
        if images.shape[0] < 2 and val_fraction > 0:
            raise CLIError(
                f"--data {source} holds {images.shape[0]} sample(s); need at least 2 to hold some out"
            )
        train_x, train_y, val_x, val_y = data.split_train_val(images, labels, val_fraction)
        if val_x.shape[0] == 0:
            val_x = val_y = None
            desc = ""
        else:
            desc = f"the last {val_x.shape[0]} samples of {source}"
    if limit is not None:
        train_x = train_x[:limit]
        train_y = None if train_y is None else train_y[:limit]
    return train_x, train_y, val_x, val_y, desc


def _build_model(kind: str, in_shape: tuple[int, ...], latent: int | None, hidden: Sequence[int] | None):
    from fastvae import models

    config: dict[str, Any] = {"model": kind, "in_shape": list(in_shape)}
    if latent is not None:
        config["latent"] = latent
    if hidden is not None:
        config["hidden"] = list(hidden)
    return models.build_model(config)


def _new_run_dir() -> Path:
    base = Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    path, k = base, 1
    while path.exists():
        path = base.with_name(f"{base.name}-{k}")
        k += 1
    return path


def _broadcast_path(trainer, path: Path | None) -> Path:
    """Rank 0's ``path`` on every rank (a timestamp differs between processes)."""
    if not trainer.dist.enabled:
        assert path is not None
        return path
    import torch.distributed as dist

    box = [str(path) if trainer.dist.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return Path(box[0])


# ---------------------------------------------------------------------- commands


def _cmd_train(args: argparse.Namespace) -> int:
    import torch

    from fastvae.checkpoint import CHECKPOINT_NAME, load_checkpoint
    from fastvae.trainer import Trainer

    given = vars(args)
    opts = {**_TRAIN_DEFAULTS, **{k: v for k, v in given.items() if k in _TRAIN_DEFAULTS}}
    progress = not given.get("no_progress", False)
    device = given.get("device", "auto")
    compile_ = given.get("compile", False)
    amp = "bf16" if given.get("amp", False) else None
    resume = given.get("resume")

    if resume is not None:
        clash = [k for k in _FIXED_ON_RESUME if k in given]
        if clash:
            flags = ", ".join("--" + k.replace("_", "-") for k in clash)
            raise CLIError(
                f"{flags} cannot be given with --resume: a resumed run keeps the settings of {resume}"
            )
        state = load_checkpoint(resume)
        config = state["config"]
        meta, hp, model_cfg = config.get("meta", {}), config.get("trainer", {}), config.get("model")
        if not model_cfg or "data" not in meta:
            raise CLIError(f"{resume} was not written by 'fastvae train' (no data source in its config)")
        opts.update({k: meta[k] for k in ("data", "limit", "val_fraction") if k in meta})
        opts.update(
            {k: hp[k] for k in ("lr", "batch_size", "beta", "kl_warmup", "free_bits", "grad_clip", "seed")}
        )
        amp = hp.get("amp")
        if "epochs" not in given:
            opts["epochs"] = int(meta.get("epochs", state["epoch"]))
        out: Path | None = Path(resume) if Path(resume).is_dir() else Path(resume).parent
        del state
    else:
        out = None if given.get("out") is None else Path(given["out"])
        if out is not None and (out / CHECKPOINT_NAME).exists():
            raise CLIError(f"--out {out} already holds a checkpoint; continue it with --resume {out}")

    train_x, train_y, val_x, val_y, val_desc = _load_training_data(
        opts["data"], opts["limit"], opts["val_fraction"]
    )
    torch.manual_seed(opts["seed"])
    if resume is not None:
        from fastvae import models

        model = models.build_model(model_cfg)
    else:
        model = _build_model(opts["model"], tuple(train_x.shape[1:]), opts["latent"], opts["hidden"])

    trainer = Trainer(
        model,
        lr=opts["lr"],
        batch_size=opts["batch_size"],
        beta=opts["beta"],
        kl_warmup=opts["kl_warmup"],
        free_bits=opts["free_bits"],
        grad_clip=opts["grad_clip"],
        device=device,
        amp=amp,
        compile=compile_,
        seed=opts["seed"],
        progress=progress,
    )
    try:
        source = opts["data"] if opts["data"].lower() == "mnist" else str(Path(opts["data"]).resolve())
        trainer.metadata = {
            "data": source,
            "limit": opts["limit"],
            "val_fraction": opts["val_fraction"],
            "epochs": opts["epochs"],
        }
        out = _broadcast_path(trainer, out if out is not None or not trainer.dist.is_main else _new_run_dir())
        val = None if val_x is None else (val_x, val_y)
        history = trainer.fit(
            (train_x, train_y), opts["epochs"], val=val, out=out, plots=not given.get("no_plots", False)
        )
    finally:
        trainer.close()
    if trainer.dist.is_main:
        last = history[-1] if history else None
        if last is None:
            print(f"no epochs trained (--epochs {opts['epochs']}); files in {out}")
        elif last["val_loss"] is not None:
            print(
                f"held-out negative ELBO after epoch {last['epoch']}: {last['val_loss']:.2f} nats per sample "
                f"(recon {last['val_recon']:.2f} + KL {last['val_kl']:.2f}; {val_desc})"
            )
        else:
            print(
                f"training negative ELBO after epoch {last['epoch']}: "
                f"{last['train_loss']:.2f} nats per sample"
            )
        files = ", ".join(sorted(p.name for p in out.iterdir() if not p.name.startswith(".")))
        print(f"files: {out}/ ({files})")
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from fastvae import plots
    from fastvae.checkpoint import load_model

    device = _device(args.device)
    model = load_model(args.checkpoint, map_location=device)
    out = Path(args.out)
    if out.parent and not out.parent.exists():
        raise CLIError(f"--out {out}: directory {out.parent} does not exist")
    gen = torch.Generator(device="cpu")
    gen.manual_seed(args.seed)
    path = plots.plot_samples(model, out, n=args.n, generator=gen)
    print(f"wrote {args.n} samples to {path}")
    return 0


def _load_eval_data(source: str):
    from fastvae import data

    images, _ = data.load_data(source)
    return images


def _check_out(path: str, suffix: str) -> Path:
    out = Path(path)
    if out.suffix.lower() != suffix:
        raise CLIError(f"--out must name a {suffix} file, got {path!r}")
    if not out.parent.exists():
        raise CLIError(f"--out {path}: directory {out.parent} does not exist")
    return out


def _cmd_encode(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from fastvae.checkpoint import load_model

    out = _check_out(args.out, ".npy")
    device = _device(args.device)
    model = load_model(args.checkpoint, map_location=device)
    images = _load_eval_data(args.data)
    means = []
    with torch.no_grad():
        for start in range(0, images.shape[0], 1024):
            mu, _ = model.encode(images[start : start + 1024].to(device))
            means.append(mu.float().cpu())
    array = torch.cat(means).numpy()
    np.save(out, array)
    print(f"wrote the posterior means of {array.shape[0]} samples, shape {list(array.shape)}, to {out}")
    return 0


def _cmd_score(args: argparse.Namespace) -> int:
    import numpy as np

    from fastvae.checkpoint import load_model
    from fastvae.trainer import score_samples

    out = _check_out(args.out, ".npy")
    device = _device(args.device)
    model = load_model(args.checkpoint, map_location=device)
    images = _load_eval_data(args.data)
    scores = score_samples(model, images, seed=args.seed, samples=args.samples, device=device).numpy()
    np.save(out, scores)
    print(
        f"wrote {scores.shape[0]} per-sample negative ELBOs (nats; mean {scores.mean():.2f}, "
        f"max {scores.max():.2f}) to {out}"
    )
    return 0


_COMMANDS = {"train": _cmd_train, "sample": _cmd_sample, "encode": _cmd_encode, "score": _cmd_score}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fastvae`` console script and of ``python -m fastvae``; returns the exit status."""
    args = build_parser().parse_args(argv)
    from fastvae.checkpoint import CheckpointError
    from fastvae.trainer import TrainingDivergedError

    expected = (CLIError, CheckpointError, TrainingDivergedError, ValueError, TypeError, KeyError, OSError)
    show = warnings.showwarning

    def one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
        print(f"fastvae {args.command}: warning: {message}", file=sys.stderr)

    warnings.showwarning = one_line_warning
    try:
        return _COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print(f"fastvae {args.command}: interrupted", file=sys.stderr)
        return 130
    except expected as e:
        if os.environ.get("FASTVAE_DEBUG"):
            raise
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        message = " ".join(str(message).split()) or type(e).__name__
        print(f"fastvae {args.command}: error: {message}", file=sys.stderr)
        return 1
    finally:
        warnings.showwarning = show


if __name__ == "__main__":
    sys.exit(main())
