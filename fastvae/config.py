"""The training options in one place: :class:`TrainConfig` (the Trainer's) and :class:`RunConfig` (the run's).

Each option is a field of a frozen dataclass with its default, its type, its allowed range and its
help text (in ``field.metadata``).  Everything else is generated from these fields:

* ``__post_init__`` validates every field: a bad value raises ``ValueError`` naming the field and
  the expected value (``lr must be a positive finite number, got 0``);
* the ``fastvae train`` options and their ``--help`` text (:func:`add_arguments`);
* the settings a resumed run keeps (``resume="fixed"`` fields: :meth:`TrainConfig.fixed`), compared
  field by field with the checkpoint's own;
* the metadata written with a run (``dataclasses.asdict``: the checkpoint's ``config["trainer"]``
  and ``config["meta"]``).

This module imports neither torch nor numpy, so that ``fastvae --help`` stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "BETA_MAX",
    "SEED_MAX",
    "DEVICES",
    "OptionError",
    "TrainConfig",
    "RunConfig",
    "add_arguments",
    "option_flag",
    "split_options",
    "check_device",
]

# Largest beta (and free_bits floor) accepted: beta * KL must stay far from float32's 3.4e38 for any
# realistic KL (beta = 1e308 made every loss inf); beta-VAEs use beta up to a few hundred.
BETA_MAX = 1e6
SEED_MAX = 2**63 - 1  # torch.Generator.manual_seed takes [-2**63, 2**64); the seed mixing needs >= 0
DEVICES = ("auto", "cpu", "cuda")  # and "cuda:N"


class OptionError(ValueError):
    """A bad option value: ``{name} must be {expected}, got {value!r}`` (``expected`` kept for the CLI)."""

    def __init__(self, name: str, expected: str, value: Any) -> None:
        super().__init__(f"{name} must be {expected}, got {value!r}")
        self.name, self.expected, self.value = name, expected, value


# ---------------------------------------------------------------------- checks
# A check takes (name, value) and returns the normalised value or raises OptionError.

Check = Callable[[str, Any], Any]


def _is_number(v: Any) -> bool:
    """A real Python number (bools, strings and tensors are refused: ``beta="1"`` is not a number)."""
    return isinstance(v, int | float) and not isinstance(v, bool)


def _integer(low: int, high: int | None, expected: str) -> Check:
    def check(name: str, v: Any) -> int:
        if not isinstance(v, int) or isinstance(v, bool) or v < low or (high is not None and v > high):
            raise OptionError(name, expected, v)
        return v

    return check


def _real(low: float, *, strict: bool, high: float | None = None, expected: str) -> Check:
    """A finite float in ``(low, high]`` (``strict``) or ``[low, high]``; above ``high``: "at most high"."""

    def check(name: str, v: Any) -> float:
        if not _is_number(v) or not math.isfinite(v) or (v <= low if strict else v < low):
            raise OptionError(name, expected, v)
        if high is not None and v > high:
            raise OptionError(name, f"at most {high:g}", v)
        return float(v)

    return check


def _optional(check: Check) -> Check:
    return lambda name, v: None if v is None else check(name, v)


def _choice(choices: tuple[str, ...]) -> Check:
    def check(name: str, v: Any) -> str:
        if v not in choices:
            raise OptionError(name, f"one of {', '.join(map(repr, choices))}", v)
        return v

    return check


def _flag(name: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise OptionError(name, "True or False", v)
    return v


def _text(name: str, v: Any) -> str:
    if not isinstance(v, str) or not v:
        raise OptionError(name, "a non-empty string", v)
    return v


def check_device(name: str, v: Any) -> str:
    """``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` (a ``torch.device`` is taken as its string)."""
    torch = sys.modules.get("torch")  # not imported here; a torch.device exists only if torch is loaded
    text = str(v) if torch is not None and isinstance(v, torch.device) else v
    ok = isinstance(text, str) and (text in DEVICES or (text.startswith("cuda:") and text[5:].isdigit()))
    if not ok:
        raise OptionError(name, "'auto', 'cpu', 'cuda' or 'cuda:N'", v)
    return text


def _amp(name: str, v: Any) -> str | None:
    """``None``/``False``: fp32; ``True``/``"bf16"``: bf16 autocast (stored as ``"bf16"``)."""
    if v is None or v is False:
        return None
    if v is True or v == "bf16":
        return "bf16"
    raise OptionError(name, "None, False, True or 'bf16'", v)


def _widths(name: str, v: Any) -> tuple[int, ...] | None:
    if v is None:
        return None
    if not isinstance(v, list | tuple) or not v:
        raise OptionError(name, "a non-empty list of positive integers", v)
    return tuple(_positive_int(f"{name}[{i}]", w) for i, w in enumerate(v))


_positive_int = _integer(1, None, "a positive integer")
_count = _integer(0, None, "an integer >= 0")
_positive = _real(0.0, strict=True, expected="a positive finite number")
_weight = _real(0.0, strict=False, high=BETA_MAX, expected="a finite number >= 0")


def _fraction(name: str, v: Any) -> float:
    if not _is_number(v) or not 0.0 <= v < 1.0:
        raise OptionError(name, "a fraction in [0, 1)", v)
    return float(v)


def _option(
    default: Any,
    help: str,
    check: Check,
    *,
    resume: str,
    parse: type | None = None,
    metavar: str | None = None,
    flag: str | None = None,
    action: str | None = None,
    choices: tuple[str, ...] | None = None,
    nargs: str | None = None,
    shown_default: str | None = None,
) -> Any:
    """A dataclass field with its CLI and resume metadata.

    ``resume``: ``"fixed"`` (a resumed run keeps the checkpoint's value; a different one is refused)
    or ``"free"`` (may change on resume).  ``parse``: ``int``/``float``/``str`` for a ``--flag VALUE``
    option; ``action``: ``"store_true"``/``"store_false"`` for a switch; ``flag`` overrides the option
    name (default ``--field-name``); ``parse=None`` and ``action=None``: not a command-line option.
    """
    meta = {"help": help, "check": check, "resume": resume, "parse": parse, "metavar": metavar}
    meta.update(flag=flag, action=action, choices=choices, nargs=nargs, shown_default=shown_default)
    return field(default=default, metadata=meta)


class _Validated:
    """``__post_init__`` for the frozen configs: each field through its check (normalised in place)."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, f.metadata["check"](f.name, getattr(self, f.name)))

    @classmethod
    def fixed(cls) -> tuple[str, ...]:
        """The fields a resumed run keeps from its checkpoint (a different value is refused)."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.metadata["resume"] == "fixed")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """All field names, in order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    def to_dict(self) -> dict[str, Any]:
        """``dataclasses.asdict`` with tuples as lists (what a checkpoint and JSON hold)."""
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


@dataclass(frozen=True)
class TrainConfig(_Validated):
    """The options of :class:`fastvae.trainer.Trainer` (frozen; validated at construction).

    The objective of a step, summed over the batch ``B`` (``beta_t`` the KL weight after ``step``
    optimizer steps)::

        beta_t    = beta * min(1, step / kl_warmup)             (beta when kl_warmup == 0)
        objective = recon + beta_t * KL                        (free_bits == 0)
        objective = recon + beta_t * B * sum_d max(free_bits, mean_batch KL_d)   (free_bits > 0)
    """

    lr: float = _option(1e-3, "Adam learning rate", _positive, resume="fixed", parse=float, metavar="X")
    batch_size: int = _option(
        128,
        "(global) batch size; under torchrun split over the processes",
        _positive_int,
        resume="fixed",
        parse=int,
        metavar="N",
    )
    beta: float = _option(
        1.0, f"KL weight (beta-VAE), at most {BETA_MAX:g}", _weight, resume="fixed", parse=float, metavar="X"
    )
    kl_warmup: int = _option(
        0, "linear KL warm-up over N optimizer steps (0: off)", _count, resume="fixed", parse=int, metavar="N"
    )
    free_bits: float = _option(
        0.0,
        "KL floor in nats per latent dimension (Kingma et al. 2016; 0: off)",
        _weight,
        resume="fixed",
        parse=float,
        metavar="X",
    )
    grad_clip: float | None = _option(
        None,
        "clip the global gradient norm to X (default: no clipping)",
        _optional(_positive),
        resume="fixed",
        parse=float,
        metavar="X",
    )
    seed: int = _option(
        0,
        "seed of the data order and the noise (the CLI also seeds the initial weights with it)",
        _integer(0, SEED_MAX, "an integer in [0, 2**63 - 1]"),
        resume="fixed",
        parse=int,
        metavar="N",
    )
    amp: str | None = _option(
        None,
        "bf16 autocast (CUDA only; on the CPU a warning, and fp32)",
        _amp,
        resume="fixed",
        action="store_true",
    )
    device: str = _option(
        "auto",
        "auto = cuda if available, else cpu",
        check_device,
        resume="free",
        parse=str,
        choices=DEVICES,
    )
    compile: bool = _option(
        False, "torch.compile the encoder and decoder", _flag, resume="free", action="store_true"
    )
    cuda_graphs: bool = _option(
        False,
        "capture each full-batch training step in a CUDA graph and replay it (CUDA only)",
        _flag,
        resume="free",
        action="store_true",
    )
    progress: bool = _option(
        True,
        "no progress bar or per-epoch lines (the bar shows only on a terminal; logs get one line per epoch)",
        _flag,
        resume="free",
        action="store_false",
        flag="--no-progress",
    )

    def hyperparameters(self) -> dict[str, Any]:
        """The fields that define the run (:meth:`fixed`): checked on resume, stored in checkpoints."""
        d = self.to_dict()
        return {k: d[k] for k in self.fixed()}


@dataclass(frozen=True)
class RunConfig(_Validated):
    """The options of a ``fastvae train`` run besides the Trainer's: data, architecture, epochs."""

    data: str = _option(
        "mnist",
        "'mnist' (embedded set) or a .npy/.npz/.pt/IDX file or folder; the last --val-fraction "
        "of a file is held out",
        _text,
        resume="fixed",
        parse=str,
        metavar="mnist|PATH",
    )
    model: str = _option(
        "mlp", "architecture", _choice(("mlp", "conv")), resume="fixed", parse=str, choices=("mlp", "conv")
    )
    latent: int | None = _option(
        None,
        "latent dimensions",
        _optional(_positive_int),
        resume="fixed",
        parse=int,
        metavar="N",
        shown_default="20 mlp, 2 conv",
    )
    hidden: tuple[int, ...] | None = _option(
        None,
        "hidden widths (mlp) or conv channels then dense width (conv)",
        _widths,
        resume="fixed",
        parse=int,
        metavar="N",
        nargs="+",
        shown_default="400 mlp, 32 64 16 conv",
    )
    epochs: int = _option(
        10, "total epochs (on --resume: the new total)", _count, resume="free", parse=int, metavar="N"
    )
    limit: int | None = _option(
        None,
        "train on the first N training images only",
        _optional(_positive_int),
        resume="fixed",
        parse=int,
        metavar="N",
    )
    val_fraction: float = _option(
        0.1,
        "held-out fraction of a data file (mnist uses its fixed 9000/1000 split)",
        _fraction,
        resume="fixed",
        parse=float,
        metavar="F",
    )


# ---------------------------------------------------------------------- the command line


def _arg_type(f: dataclasses.Field) -> Callable[[str], Any]:
    """An argparse ``type``: text -> ``parse`` -> the field's check; a refusal says what was expected."""
    parse, check = f.metadata["parse"], f.metadata["check"]

    def convert(text: str) -> Any:
        try:
            value = parse(text)
        except ValueError:
            value = text
        try:
            return check(f.name, value) if f.metadata["nargs"] is None else check(f.name, [value])[0]
        except OptionError as e:
            raise argparse.ArgumentTypeError(f"expected {e.expected}, got {text!r}") from None

    return convert


def add_arguments(parser: argparse.ArgumentParser, configs: Iterable[type]) -> None:
    """Add one option per command-line field of ``configs`` (with ``argparse.SUPPRESS`` defaults).

    The help text is the field's, followed by ``(default: ...)``; a switch (``--compile``) stores the
    value that differs from the default.  Parsed values are already checked.
    """
    for config in configs:
        for f in dataclasses.fields(config):
            meta = f.metadata
            if meta["parse"] is None and meta["action"] is None:
                continue
            flag = option_flag(f.name)
            if meta["action"] is not None:
                parser.add_argument(flag, dest=f.name, action=meta["action"], help=meta["help"])
                continue
            shown = meta["shown_default"] if meta["shown_default"] is not None else f.default
            help_text = meta["help"] if shown is None else f"{meta['help']} (default: {shown})"
            kwargs: dict[str, Any] = {"dest": f.name, "help": help_text}
            if meta["choices"] is not None:
                kwargs["choices"] = meta["choices"]
            else:
                kwargs.update(type=_arg_type(f), metavar=meta["metavar"], nargs=meta["nargs"])
            parser.add_argument(flag, **kwargs)


def option_flag(name: str) -> str:
    """The command-line flag of field ``name`` (``--batch-size``; ``--no-progress`` for ``progress``)."""
    for config in (TrainConfig, RunConfig):
        for f in dataclasses.fields(config):
            if f.name == name and f.metadata["flag"] is not None:
                return f.metadata["flag"]
    return "--" + name.replace("_", "-")


def split_options(given: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``given`` (parsed options) split into ``(TrainConfig kwargs, RunConfig kwargs)``."""
    train = {k: v for k, v in given.items() if k in TrainConfig.names()}
    run = {k: v for k, v in given.items() if k in RunConfig.names()}
    return train, run
