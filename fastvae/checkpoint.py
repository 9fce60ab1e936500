"""Checkpoints: atomic writes, safe loads, and rebuilding a model from a run directory.

A checkpoint is a plain dictionary of tensors and Python containers (no pickled classes), so that
``torch.load(path, weights_only=True)`` reads it.  :class:`fastvae.trainer.Trainer` writes
``out/checkpoint.pt`` with the keys

* ``format``     -- ``"fastvae-checkpoint"``, ``version`` -- an int,
* ``model``      -- the model's ``state_dict``,
* ``optimizer``  -- the optimizer's ``state_dict``,
* ``rng``        -- ``{"torch": ByteTensor, "cuda": [ByteTensor, ...] | None, "noise": ByteTensor}``,
* ``epoch``, ``step`` -- completed epochs and optimizer steps,
* ``history``    -- the per-epoch metrics (list of dicts),
* ``config``     -- ``{"model": model.config(), "trainer": {hyperparameters}, "meta": {...}}``.

:func:`save_checkpoint` never leaves a half-written file under the final name: it writes a temporary
file in the same directory, flushes and fsyncs it, renames it over the target with ``os.replace``
and fsyncs the directory.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CHECKPOINT_NAME",
    "CheckpointError",
    "resolve_checkpoint_path",
    "save_checkpoint",
    "load_checkpoint",
    "load_model",
]

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT = "fastvae-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint file exists but cannot be read: truncated, corrupt, or not a fastvae checkpoint."""


def resolve_checkpoint_path(path: str | os.PathLike) -> Path:
    """``path`` itself for a file, ``path/checkpoint.pt`` for a directory (a run directory)."""
    p = Path(path)
    if p.is_dir():
        return p / CHECKPOINT_NAME
    return p


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. platforms that cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically; return the path written.

    The data goes to a temporary file in the same directory, which is flushed, fsynced and then
    renamed over ``path`` (``os.replace``); the directory is fsynced last.  A crash at any moment
    leaves either the previous checkpoint or the new one, never a truncated file.
    """
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict, got {type(state).__name__}")
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except OSError:
            pass
        raise
    _fsync_dir(directory)
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint (a file, or a run directory holding ``checkpoint.pt``) with ``weights_only=True``.

    Raises :class:`FileNotFoundError` naming the file when it does not exist, and
    :class:`CheckpointError` naming the file when it is truncated, corrupt, or not a fastvae
    checkpoint.
    """
    file = resolve_checkpoint_path(path)
    if not file.exists():
        if Path(path).is_dir():
            raise FileNotFoundError(f"no checkpoint in directory {path}: {file} does not exist")
        raise FileNotFoundError(f"checkpoint file not found: {file}")
    if file.stat().st_size == 0:
        raise CheckpointError(f"checkpoint file {file} is truncated or corrupt: it is empty")
    try:
        state = torch.load(file, map_location=map_location, weights_only=True)
    except (OSError, MemoryError) as e:
        if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError)):
            raise
        raise CheckpointError(f"checkpoint file {file} is truncated or corrupt: {_one_line(e)}") from e
    except Exception as e:  # RuntimeError, UnpicklingError, EOFError, ... from a damaged archive
        if "weights only load failed" in str(e).lower():
            raise CheckpointError(
                f"checkpoint file {file} is truncated or corrupt, or not a fastvae checkpoint: it does not "
                "load with torch.load(weights_only=True) (it looks like pickled Python objects)"
            ) from e
        raise CheckpointError(f"checkpoint file {file} is truncated or corrupt: {_one_line(e)}") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint file {file} is not a fastvae checkpoint (no 'format': '{FORMAT}')")
    missing = [k for k in ("model", "config", "epoch", "step", "history") if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint file {file} is corrupt: missing keys {missing}")
    return state


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def load_model(checkpoint: str | os.PathLike, map_location: str | torch.device = "cpu") -> torch.nn.Module:
    """Rebuild the model stored in a checkpoint (file or run directory), in eval mode on ``map_location``.

    The architecture comes from ``config["model"]`` through :func:`fastvae.models.build_model`.
    """
    from fastvae import models

    state = load_checkpoint(checkpoint, map_location=map_location)
    file = resolve_checkpoint_path(checkpoint)
    config = state["config"].get("model") if isinstance(state["config"], dict) else None
    if not isinstance(config, dict):
        raise CheckpointError(f"checkpoint file {file} is corrupt: config['model'] is missing")
    try:
        model = models.build_model(config)
    except (TypeError, KeyError, ValueError) as e:
        raise CheckpointError(f"checkpoint file {file} has an unusable model config {config}: {e}") from e
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise CheckpointError(
            f"checkpoint file {file}: weights do not fit the model config: {_one_line(e)}"
        ) from e
    return model.to(map_location).eval()
