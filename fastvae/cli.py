"""The ``fastvae`` command line: ``train``, ``sample``, ``encode`` and ``score``.

``fastvae train`` with no arguments trains pytorch/examples' MLP VAE (784-400-20) on the embedded
MNIST set (the first 9,000 images; the last 1,000 are held out) for 10 epochs, writes
``runs/<timestamp>/`` (``checkpoint.pt``, ``metrics.jsonl``, pictures) and prints the held-out
negative ELBO.  ``torchrun --nproc-per-node=N -m fastvae train ...`` trains on N processes
(DistributedDataParallel; ``--batch-size`` is the global batch).  ``sample``, ``encode`` and
``score`` write next to the checkpoint they read unless ``--out`` says otherwise, and print where.

Errors in the input (a bad path, data out of range, a corrupt checkpoint, a bad argument) are
reported as one line on stderr with a non-zero exit status; set ``FASTVAE_DEBUG=1`` for the
traceback.  Ctrl-C during training prints the command that continues the run (exit status 130).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from fastvae.config import SEED_MAX, RunConfig, TrainConfig, add_arguments, option_flag

__all__ = ["main", "build_parser", "DEFAULT_EPOCHS", "VAL_FRACTION", "SEED_MAX"]

DEFAULT_EPOCHS = RunConfig.epochs
VAL_FRACTION = RunConfig.val_fraction
_SPLITS = ("all", "train", "test")


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr (exit status 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to options that have a default; required options and None defaults get none."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.required or action.default is None or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


class CLIError(ValueError):
    """A usage error found after parsing (reported as one line)."""


class _Interrupted(KeyboardInterrupt):
    """Ctrl-C during training; the message says how to continue the run."""


# ---------------------------------------------------------------------- argument types


def _int_in(minimum: int, maximum: int | None, expected: str):
    """An argparse type: an integer in ``[minimum, maximum]``, refused with ``expected`` in the message."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


_positive_int = _int_in(1, None, "a positive integer")
_seed = _int_in(0, SEED_MAX, "an integer in [0, 2**63 - 1]")  # the bound of TrainConfig.seed


# ---------------------------------------------------------------------- the parser


def _version() -> str:
    import torch

    from fastvae import __version__

    where = Path(__file__).resolve().parent
    return f"fastvae {__version__} ({where}; torch {torch.__version__}, Python {platform.python_version()})"


_DEVICE_HELP = "auto = cuda if available, else cpu"
_SPLIT_HELP = (
    "which images of --data: all; train = the images a run trains on; test = the held-out ones "
    "(mnist: all 10,000 / the first 9,000 / the last 1,000; a file: all / all but the last "
    "val_fraction / the last val_fraction, with the run's val_fraction, default 0.1)"
)


def build_parser() -> argparse.ArgumentParser:
    """The ``fastvae`` argument parser (sub-commands ``train``, ``sample``, ``encode``, ``score``)."""
    parser = _Parser(
        prog="fastvae",
        description="Train and use variational autoencoders with fused Triton/Numba kernels.",
        epilog="Run 'fastvae COMMAND --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=_version())
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
    add_arguments(t, (RunConfig, TrainConfig))  # one option per field, help and checks from the field
    t.add_argument("--out", metavar="DIR", help="output directory (default: runs/<timestamp>)")
    t.add_argument(
        "--resume",
        metavar="DIR",
        help="continue the run in DIR from its checkpoint (settings come from the checkpoint: other "
        "options must equal the run's; --epochs sets a new total)",
    )
    t.add_argument("--no-plots", action="store_true", help="do not write the pictures")

    s = sub.add_parser(
        "sample",
        help="draw images from a trained model's prior",
        description="Decode z ~ N(0, I) with a trained model and save the images as a grid (PNG).",
        formatter_class=_Formatter,
    )
    s.add_argument("--checkpoint", required=True, metavar="DIR", help="run directory or checkpoint file")
    s.add_argument("--n", type=_positive_int, default=64, metavar="N", help="number of samples")
    s.add_argument(
        "--out",
        metavar="FILE.png",
        help="image file to write (default: samples-seed<N>.png next to the checkpoint)",
    )
    s.add_argument("--seed", type=_seed, default=0, metavar="N", help="random seed")
    s.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help=_DEVICE_HELP)

    e = sub.add_parser(
        "encode",
        help="write the posterior means of data (and their labels) to .npy files",
        description=(
            "Encode data with a trained model: saves the posterior means mu(x) as float32 [N, latent] and, "
            "when the data have labels (mnist does), the labels as int64 [N] in FILE.labels.npy beside it."
        ),
        formatter_class=_Formatter,
    )
    e.add_argument("--checkpoint", required=True, metavar="DIR", help="run directory or checkpoint file")
    e.add_argument("--data", default="mnist", metavar="mnist|PATH", help="data to encode")
    e.add_argument("--split", choices=_SPLITS, default="all", help=_SPLIT_HELP)
    e.add_argument(
        "--out",
        metavar="FILE.npy",
        help="output file (default: latents-<data>-<split>.npy next to the checkpoint)",
    )
    e.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help=_DEVICE_HELP)

    c = sub.add_parser(
        "score",
        help="per-sample negative ELBO (anomaly scores) to a .npy file",
        description=(
            "Score data with a trained model: the per-sample negative ELBO in nats "
            "(fastvae.vae_loss(reduction='none'), z sampled with a fixed seed; high = unusual).  "
            "Saves float32 [N], and the labels as int64 [N] in FILE.labels.npy when the data have them."
        ),
        formatter_class=_Formatter,
    )
    c.add_argument("--checkpoint", required=True, metavar="DIR", help="run directory or checkpoint file")
    c.add_argument("--data", default="mnist", metavar="mnist|PATH", help="data to score")
    c.add_argument("--split", choices=_SPLITS, default="all", help=_SPLIT_HELP)
    c.add_argument(
        "--out",
        metavar="FILE.npy",
        help="output file (default: scores-<data>-<split>.npy next to the checkpoint)",
    )
    c.add_argument(
        "--samples", type=_positive_int, default=1, metavar="K", help="z draws averaged per sample"
    )
    c.add_argument("--seed", type=_seed, default=0, metavar="N", help="seed of the z draws")
    c.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help=_DEVICE_HELP)
    return parser


# ---------------------------------------------------------------------- helpers


def _shadowing_folder() -> str | None:
    """The folder that hides this installation's ``fastvae`` package, or None when there is none.

    ``python -m fastvae`` puts the current directory first on ``sys.path``, so a folder named
    ``fastvae`` there is imported instead of the installed package (an editable install then still
    finds this module, but not the package's ``__init__``).
    """
    pkg = sys.modules.get("fastvae")
    here = Path(__file__).resolve().parent
    where = getattr(pkg, "__file__", None)
    if where is not None and Path(where).resolve().parent == here:
        return None
    paths = [str(Path(p).resolve()) for p in getattr(pkg, "__path__", [])]
    return paths[0] if paths else str(where)


def _device(name: str):
    """``--device`` as a torch.device (:func:`fastvae.trainer.resolve_device`: the one device resolver)."""
    from fastvae.trainer import resolve_device

    return resolve_device(name)


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


def _check_no_file_above(path: Path, flag: str) -> None:
    """Refuse ``path`` when its nearest existing ancestor is a file (mkdir would say "File exists")."""
    for parent in path.parents:
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                raise CLIError(f"{flag} {path}: {parent} is a file, not a directory")
            return


def _check_out_file(path: Path, suffix: str) -> Path:
    """Check an output file name: ``suffix``, not a directory, in an existing directory."""
    if path.is_dir():
        raise CLIError(f"--out {path} is a directory; name a file in it, such as {path / ('out' + suffix)}")
    if path.suffix.lower() != suffix:
        raise CLIError(f"--out must name a {suffix} file, got {str(path)!r}")
    _check_no_file_above(path, "--out")
    if not path.parent.exists():
        raise CLIError(f"--out {path}: directory {path.parent} does not exist")
    return path


def _run_dir(checkpoint: str) -> Path:
    """The directory of a checkpoint: the run directory itself, or the folder holding the file."""
    path = Path(checkpoint)
    return path if path.is_dir() else path.parent


def _data_name(source: str) -> str:
    """A short name for ``--data`` in default file names: ``mnist`` or the file's name without suffixes."""
    if source.lower() == "mnist":
        return "mnist"
    name = Path(source).name
    for suffix in (".gz", ".npy", ".npz", ".pt", ".pth"):
        name = name.removesuffix(suffix)
    return name or "data"


def _labels_path(out: Path) -> Path:
    """``latents.npy`` -> ``latents.labels.npy``: where the labels of ``out``'s rows go."""
    return out.with_name(out.stem + ".labels.npy")


_FIXED_ON_RESUME = (*RunConfig.fixed(), *TrainConfig.fixed(), "out")  # a resumed run keeps these
_FREE_ON_RESUME = [
    option_flag(k) for k in (*RunConfig.names(), *TrainConfig.names()) if k not in _FIXED_ON_RESUME
]


def _given_settings(given: dict[str, Any], device) -> dict[str, Any]:
    """The resume-fixed options given on the command line, normalised as a run stores them."""
    settings = {k: given[k] for k in _FIXED_ON_RESUME if k in given}
    if "data" in settings and settings["data"].lower() != "mnist":
        settings["data"] = str(Path(settings["data"]).resolve())
    elif "data" in settings:
        settings["data"] = "mnist"
    if "hidden" in settings:
        settings["hidden"] = list(settings["hidden"])
    if "amp" in settings:  # --amp on a CPU trains in fp32, and the run stores None
        settings["amp"] = "bf16" if device.type == "cuda" else None
    if "out" in settings:
        settings["out"] = str(Path(settings["out"]).resolve())
    return settings


def _run_settings(resume: str, state: dict) -> dict[str, Any]:
    """The resume-fixed settings of the run in ``resume``, by field name, from its checkpoint's config.

    The architecture comes from ``config["model"]``, the Trainer's settings from ``config["trainer"]``,
    the data from ``config["meta"]``; a checkpoint that lacks them was not written by ``fastvae train``.
    """
    config = state["config"]
    meta, hp, model_cfg = config.get("meta"), config.get("trainer"), config.get("model")
    if not isinstance(model_cfg, dict) or not isinstance(meta, dict) or "data" not in meta:
        raise CLIError(f"{resume} was not written by 'fastvae train' (no data source in its config)")
    lacking = [k for k in TrainConfig.fixed() if not isinstance(hp, dict) or k not in hp]
    if lacking:
        raise CLIError(f"{resume} is not a complete 'fastvae train' checkpoint: its config lacks {lacking}")
    run = {k: meta.get(k) for k in RunConfig.fixed()}
    run.update({k: model_cfg.get(k) for k in ("model", "latent", "hidden")})
    run.update({k: hp[k] for k in TrainConfig.fixed()}, out=str(_run_dir(resume).resolve()))
    return run


def _conflicts(given: dict[str, Any], run: dict[str, Any]) -> list[str]:
    """``--seed 4 (the run's: 3)`` for every given setting that differs from the run's own."""
    out = []
    for key, value in given.items():
        if value != run.get(key):
            if key == "amp":  # a flag: its value is what this device makes of it
                out.append(f"--amp (amp={value} here; the run's: amp={run.get(key)})")
                continue
            shown = " ".join(map(str, value)) if isinstance(value, list) else value
            out.append(f"{option_flag(key)} {shown} (the run's: {run.get(key)})")
    return out


# ---------------------------------------------------------------------- commands


def _cmd_train(args: argparse.Namespace) -> int:
    import torch

    from fastvae.checkpoint import (
        CHECKPOINT_NAME,
        build_checkpoint_model,
        load_checkpoint,
        resolve_checkpoint_path,
    )
    from fastvae.config import split_options
    from fastvae.trainer import Trainer, resolve_device

    given = vars(args)  # only the options given on the command line (argparse.SUPPRESS defaults)
    train_opts, run_opts = split_options(given)
    resume = given.get("resume")
    done = 0
    if resume is not None:
        state = load_checkpoint(resume)
        stored = _run_settings(resume, state)
        device = resolve_device(given.get("device", TrainConfig.device))
        clash = _conflicts(_given_settings(given, device), stored)
        if clash:
            them = "it" if len(clash) == 1 else "them"
            raise CLIError(
                f"{', '.join(clash)}: a resumed run keeps its own settings (only "
                f"{', '.join(_FREE_ON_RESUME)} and --no-plots may change); leave {them} out to continue "
                f"{resume}, or start a new run with --out"
            )
        run_opts = {**{k: stored[k] for k in RunConfig.fixed()}, **run_opts}
        run_opts.setdefault("epochs", int(state["config"]["meta"].get("epochs", state["epoch"])))
        train_opts = {**{k: stored[k] for k in TrainConfig.fixed()}, **train_opts}
        done = int(state["epoch"])
        out: Path | None = _run_dir(resume)
        model = build_checkpoint_model(state, resolve_checkpoint_path(resume))  # weights: fit loads them
        del state
    else:
        out = None if given.get("out") is None else Path(given["out"])
        if out is not None:
            _check_no_file_above(out, "--out")
            if out.exists() and not out.is_dir():
                raise CLIError(f"--out {out} is a file, not a directory")
            if (out / CHECKPOINT_NAME).exists():
                raise CLIError(f"--out {out} already holds a checkpoint; continue it with --resume {out}")
    run, config = RunConfig(**run_opts), TrainConfig(**train_opts)

    train_x, train_y, val_x, val_y, val_desc = _load_training_data(run.data, run.limit, run.val_fraction)
    if resume is None:
        torch.manual_seed(config.seed)  # the initial weights: the one seeding of torch's global generator
        model = _build_model(run.model, tuple(train_x.shape[1:]), run.latent, run.hidden)

    trainer = Trainer(model, config)
    try:
        source = run.data if run.data.lower() == "mnist" else str(Path(run.data).resolve())
        trainer.metadata = {**run.to_dict(), "data": source}  # stored with each checkpoint (config["meta"])
        out = _broadcast_path(trainer, out if out is not None or not trainer.dist.is_main else _new_run_dir())
        if trainer.dist.is_main:
            print(_start_line(model, trainer, train_x.shape[0], val_desc, run.epochs, out, resume, done))
            sys.stdout.flush()
        val = None if val_x is None else (val_x, val_y)
        try:
            history = trainer.fit(
                (train_x, train_y),
                run.epochs,
                val=val,
                out=out,
                plots=not given.get("no_plots", False),
                resume=resume is not None,  # decided under the run directory's lock
            )
        except KeyboardInterrupt:
            if not trainer.dist.is_main:
                raise
            raise _Interrupted(_resume_hint(out, trainer.epoch, run.epochs)) from None
    finally:
        trainer.close()
    if trainer.dist.is_main:
        last = history[-1] if history else None
        if last is None:
            print(f"no epochs trained (--epochs {run.epochs}); files in {out}")
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


def _start_line(
    model, trainer, n_train: int, val_desc: str, epochs: int, out: Path, resume, done: int
) -> str:
    """What is about to happen: the model, the data, the epochs and where the files go."""
    import math

    cfg = model.config() if callable(getattr(model, "config", None)) else {}
    params = sum(p.numel() for p in model.parameters())
    what = f"{cfg.get('model', type(model).__name__)} VAE (latent {cfg.get('latent')}, {params:,} parameters)"
    batch = trainer.config.batch_size
    steps = math.ceil(n_train / batch)
    held = f", held out: {val_desc}" if val_desc else ""
    if resume is not None:
        if done >= epochs:
            return (
                f"{out} already has {done} of {epochs} epochs: nothing to train "
                f"(give --epochs N with N > {done} to continue it)"
            )
        return (
            f"resuming {out} from its checkpoint of epoch {done}: training epochs {done + 1} to {epochs} "
            f"of {what} on {n_train:,} images{held}, {steps} steps of {batch} per epoch, "
            f"on {trainer.device}"
        )
    # Numba compiles the CPU kernels at their first call (then caches them on disk): the first steps of
    # a new install wait for it, with the bar at 0.
    first = (
        "; the first steps of a new install compile the CPU kernels" if trainer.device.type == "cpu" else ""
    )
    return (
        f"training {what} on {n_train:,} images{held}: {epochs} epoch{'s' if epochs != 1 else ''} of "
        f"{steps} steps of {batch}, on {trainer.device}, into {out}/{first}"
    )


def _resume_hint(out: Path, completed: int, epochs: int) -> str:
    """The line printed on Ctrl-C: which epoch was interrupted and the command that continues the run."""
    from fastvae.checkpoint import CHECKPOINT_NAME

    where = f"interrupted in epoch {completed + 1} of {epochs}"
    if not (out / CHECKPOINT_NAME).exists():
        return f"{where}, before the first checkpoint: nothing was saved in {out}"
    return f"{where}; continue from the last checkpoint with: fastvae train --resume {out}"


def _cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from fastvae import plots
    from fastvae.checkpoint import load_model

    default = _run_dir(args.checkpoint) / f"samples-seed{args.seed}.png"
    out = _check_out_file(Path(args.out) if args.out is not None else default, ".png")
    device = _device(args.device)
    model = load_model(args.checkpoint, map_location=device)
    gen = torch.Generator(device="cpu")
    gen.manual_seed(args.seed)
    path = plots.plot_samples(model, out, n=args.n, generator=gen)
    print(f"wrote {args.n} samples to {path}")
    return 0


def _load_split(source: str, split: str, checkpoint: str):
    """``(images, labels or None, description)`` of ``split`` of ``source`` (see ``--split``)."""
    from fastvae import data
    from fastvae.checkpoint import load_checkpoint

    if source.lower() == "mnist":
        images, labels = data.load_mnist(split)
        part = {"all": "all", "train": "the first", "test": "the last (held-out)"}[split]
        return images, labels, f"{part} {images.shape[0]:,} MNIST images"
    images, labels = data.load_data(source)
    if split == "all":
        return images, labels, f"all {images.shape[0]:,} samples of {source}"
    config = load_checkpoint(checkpoint)["config"]
    meta = config.get("meta", {}) if isinstance(config, dict) else {}
    fraction = meta.get("val_fraction", VAL_FRACTION) if isinstance(meta, dict) else VAL_FRACTION
    train_x, train_y, val_x, val_y = data.split_train_val(images, labels, fraction)
    if split == "train":
        return (
            train_x,
            train_y,
            f"the first {train_x.shape[0]:,} samples of {source} (val_fraction {fraction})",
        )
    if val_x.shape[0] == 0:
        raise CLIError(f"--split test: the run holds out nothing of {source} (val_fraction {fraction})")
    return val_x, val_y, f"the last {val_x.shape[0]:,} samples of {source} (val_fraction {fraction})"


def _save_with_labels(out: Path, array, labels) -> str:
    """Save ``array`` to ``out`` and the labels (if any) beside it; returns the sentence naming the files."""
    import numpy as np

    np.save(out, array)
    if labels is None:
        stale = _labels_path(out)
        stale.unlink(missing_ok=True)  # a labels file from an earlier run would no longer match the rows
        return f"to {out} (the data have no labels)"
    np.save(_labels_path(out), labels.numpy().astype(np.int64))
    return f"to {out}, labels to {_labels_path(out)}"


def _cmd_encode(args: argparse.Namespace) -> int:
    import torch

    from fastvae.checkpoint import load_model

    default = _run_dir(args.checkpoint) / f"latents-{_data_name(args.data)}-{args.split}.npy"
    out = _check_out_file(Path(args.out) if args.out is not None else default, ".npy")
    device = _device(args.device)
    model = load_model(args.checkpoint, map_location=device)
    images, labels, desc = _load_split(args.data, args.split, args.checkpoint)
    means = []
    with torch.no_grad():
        for start in range(0, images.shape[0], 1024):
            mu, _ = model.encode(images[start : start + 1024].to(device))
            means.append(mu.float().cpu())
    array = torch.cat(means).numpy()
    where = _save_with_labels(out, array, labels)
    print(f"wrote the posterior means of {desc}, shape {list(array.shape)}, {where}")
    return 0


def _cmd_score(args: argparse.Namespace) -> int:
    from fastvae.checkpoint import load_model
    from fastvae.trainer import score_samples

    default = _run_dir(args.checkpoint) / f"scores-{_data_name(args.data)}-{args.split}.npy"
    out = _check_out_file(Path(args.out) if args.out is not None else default, ".npy")
    device = _device(args.device)
    model = load_model(args.checkpoint, map_location=device)
    images, labels, desc = _load_split(args.data, args.split, args.checkpoint)
    scores = score_samples(model, images, seed=args.seed, samples=args.samples, device=device).numpy()
    where = _save_with_labels(out, scores, labels)
    print(
        f"wrote the per-sample negative ELBOs of {desc} (nats; mean {scores.mean():.2f}, "
        f"max {scores.max():.2f}) {where}"
    )
    return 0


_COMMANDS = {"train": _cmd_train, "sample": _cmd_sample, "encode": _cmd_encode, "score": _cmd_score}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fastvae`` console script and of ``python -m fastvae``; returns the exit status."""
    shadow = _shadowing_folder()
    if shadow is not None:
        print(
            f"fastvae: error: the folder {shadow} hides the installed fastvae package "
            f"({Path(__file__).resolve().parent}): 'python -m' and scripts look in the current directory "
            "first; run from another directory, rename that folder, or use the 'fastvae' command",
            file=sys.stderr,
        )
        return 1
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
    except KeyboardInterrupt as e:
        detail = str(e) if isinstance(e, _Interrupted) else "interrupted"
        print(f"\nfastvae {args.command}: {detail}", file=sys.stderr)
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
