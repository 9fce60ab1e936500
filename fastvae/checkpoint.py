"""Checkpoints and run-directory I/O: atomic writes, safe loads, validation, the run lock.

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

Writes (:func:`atomic_write`, used for ``checkpoint.pt`` and, by :func:`write_metrics`, for
``metrics.jsonl``) never leave a half-written file under the final name: the data go to a temporary
file in the same directory, which is flushed, fsynced and renamed over the target with
``os.replace``; the directory is fsynced last.  Files are created with mode ``0o666`` minus the
umask, like any other file.  A full disk raises :class:`CheckpointWriteError` ("no space left on
device") and keeps the previous file.  :func:`remove_temp_files` deletes the temporary files a
killed writer left.

A checkpoint is untrusted input: ``weights_only=True`` stops code execution, but a tensor of the
wrong shape in the optimizer state makes the fused Adam kernel write out of bounds (heap
corruption).  :func:`check_model_state`, :func:`check_optimizer_state` and :func:`check_rng_state`
refuse such files with one line naming the tensor, before anything is loaded.

:func:`lock_run_dir` holds an exclusive ``flock`` on ``<run dir>/.lock`` for the life of a training,
so that two trainings never write into one directory; the kernel drops the lock when its process
dies, so a killed run never blocks its resume.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import secrets
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import torch

__all__ = [
    "CHECKPOINT_NAME",
    "METRICS_NAME",
    "LOCK_NAME",
    "CheckpointError",
    "CheckpointWriteError",
    "RunLockedError",
    "RunLock",
    "resolve_checkpoint_path",
    "atomic_write",
    "save_checkpoint",
    "write_metrics",
    "remove_temp_files",
    "load_torch_file",
    "load_checkpoint",
    "load_model",
    "build_checkpoint_model",
    "lock_run_dir",
    "check_model_state",
    "check_optimizer_state",
    "check_rng_state",
]

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"
LOCK_NAME = ".lock"
FORMAT = "fastvae-checkpoint"
VERSION = 1
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default format is a zip archive
_NO_SPACE = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG)


class CheckpointError(ValueError):
    """A checkpoint file exists but cannot be used: truncated, corrupt, inconsistent, or not a checkpoint."""


class CheckpointWriteError(OSError):
    """Writing a checkpoint (or another run file) failed, e.g. the disk is full; the old file is kept.

    ``errno`` is the operating system's error number (``errno.ENOSPC`` for a full disk) when known.
    """

    def __init__(self, message: str, errno_: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno_


class RunLockedError(OSError):
    """Another process is training into the same run directory (it holds the directory's lock)."""

    def __init__(self, message: str, pid: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno.EWOULDBLOCK
        self.pid = pid


def resolve_checkpoint_path(path: str | os.PathLike) -> Path:
    """``path`` itself for a file, ``path/checkpoint.pt`` for a directory (a run directory)."""
    p = Path(path)
    if p.is_dir():
        return p / CHECKPOINT_NAME
    return p


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


# ---------------------------------------------------------------------- writing


def _fsync_dir(directory: Path) -> None:
    """fsync ``directory`` so that a rename inside it survives a power cut (a no-op where unsupported)."""
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


def _in_chain(e: BaseException, kind: type[BaseException]) -> BaseException | None:
    """The first ``kind`` among ``e`` and its causes/contexts (torch.save's zip writer wraps them)."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, kind):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None], *, what: str = "file") -> Path:
    """Write ``path`` atomically with ``write(f)`` (``f`` a binary file); return the path written.

    Steps: create ``.<name>.<random>.tmp`` next to ``path`` (mode ``0o666`` minus the umask), call
    ``write``, flush, fsync, ``os.replace`` it over ``path``, fsync the directory.  A failure at any
    step removes the temporary file and leaves the previous ``path`` untouched.  A write error
    (``OSError``, or the ``RuntimeError`` that torch.save's zip writer raises on top of one) becomes
    :class:`CheckpointWriteError`, one line naming ``path``; on a full disk it says
    "no space left on device".
    """
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    directory.mkdir(parents=True, exist_ok=True)
    existed = path.exists()
    tmp: Path | None = None
    try:
        while True:  # O_EXCL: a fresh name, created with 0o666 & ~umask like any other file
            tmp = directory / f".{path.name}.{secrets.token_hex(6)}.tmp"
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
                break
            except FileExistsError:
                continue
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except BaseException as e:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        interrupt = _in_chain(e, KeyboardInterrupt)
        if interrupt is not None and interrupt is not e:
            # Ctrl-C inside torch.save: its zip writer's clean-up raises a RuntimeError on top of it.
            raise KeyboardInterrupt from None
        os_error = _in_chain(e, OSError) if isinstance(e, OSError | RuntimeError) else None
        if os_error is None or isinstance(e, CheckpointWriteError):
            raise
        kept = f"the previous {path.name} is kept" if existed else f"no {path.name} was written"
        if os_error.errno in _NO_SPACE:
            reason = f"no space left on device ({os.strerror(os_error.errno)})"
        else:
            reason = _one_line(os_error) if os_error.strerror is None else os_error.strerror
        raise CheckpointWriteError(f"cannot write {what} {path}: {reason}; {kept}", os_error.errno) from e
    _fsync_dir(directory)
    return path


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically with ``torch.save`` (see :func:`atomic_write`); return the path.

    A crash at any moment leaves either the previous checkpoint or the new one, never a truncated
    file; a full disk raises :class:`CheckpointWriteError` and keeps the previous checkpoint.
    """
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict, got {type(state).__name__}")
    return atomic_write(path, lambda f: torch.save(state, f), what="checkpoint")


def write_metrics(directory: str | os.PathLike, history: list[dict[str, Any]]) -> Path:
    """Rewrite ``directory/metrics.jsonl`` (one JSON line per epoch) from ``history``, atomically.

    Rewritten whole after every checkpoint (a few hundred bytes per epoch), so that it always
    equals the history of the checkpoint next to it, also on resume and after a full disk.
    """
    text = "".join(json.dumps(record) + "\n" for record in history).encode("utf-8")
    return atomic_write(Path(directory) / METRICS_NAME, lambda f: f.write(text), what="metrics file")


def remove_temp_files(directory: str | os.PathLike) -> None:
    """Delete the ``.checkpoint.pt.*.tmp`` / ``.metrics.jsonl.*.tmp`` files a killed writer left behind.

    Call it only while holding the directory's lock (:func:`lock_run_dir`): then no writer is active.
    """
    for name in (CHECKPOINT_NAME, METRICS_NAME):
        for stale in Path(directory).glob(f".{name}.*.tmp"):
            stale.unlink(missing_ok=True)


# ---------------------------------------------------------------------- the run lock


class RunLock:
    """An exclusive ``flock`` on a run directory's lock file; :meth:`release` (or ``with``) drops it."""

    def __init__(self, fd: int | None, path: Path) -> None:
        self._fd = fd
        self.path = path

    def release(self) -> None:
        """Drop the lock (closing the file releases the ``flock``); idempotent."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_run_dir(directory: str | os.PathLike) -> RunLock:
    """Take the exclusive lock of run directory ``directory`` (created if needed) without waiting.

    The lock is ``fcntl.flock(LOCK_EX | LOCK_NB)`` on ``directory/.lock``, which then holds the pid
    of the owner.  The kernel releases it when the owner's file is closed or its process dies
    (even by SIGKILL), so a stale lock file never blocks a resume.  Raises :class:`RunLockedError`
    naming the directory and the owner's pid when another open file (another process, or another
    trainer in this one) holds it.  Where ``fcntl`` does not exist (Windows) no lock is taken.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_NAME
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        return RunLock(None, path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        text = b""
        try:
            text = os.pread(fd, 32, 0)
        except OSError:
            pass
        os.close(fd)
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        owner = text.decode("ascii", "replace").strip()
        pid = int(owner) if owner.isdigit() else None
        held = f"process {pid}" if pid is not None else "another process"
        raise RunLockedError(
            f"run directory {directory} is in use: {held} is training into it (it holds {path}); "
            "wait for it to finish or choose another output directory",
            pid,
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return RunLock(fd, path)


# ---------------------------------------------------------------------- reading


def load_torch_file(
    path: str | os.PathLike,
    *,
    map_location: str | torch.device = "cpu",
    what: str = "file",
    error: type[ValueError] = ValueError,
    require_zip: bool = False,
) -> Any:
    """``torch.load(path, weights_only=True)`` with one-line errors of type ``error`` naming ``what path``.

    * a file holding pickled Python objects (classes, functions) is refused naming the first
      global it needs (``weights_only=True`` runs no code; the file is not loaded);
    * with ``require_zip`` (checkpoints), a file that is not a zip archive (torch.save's format) is
      refused as "not a fastvae checkpoint (not a torch zip archive)" before ``torch.load`` sees it;
    * anything else that fails to load is "truncated or corrupt", with torch's first line.

    ``FileNotFoundError``, ``PermissionError`` and ``IsADirectoryError`` pass through unchanged.
    """
    file = Path(path)
    with open(file, "rb") as f:
        head = f.read(4)
    if require_zip and head != _ZIP_MAGIC:
        kind = "it is empty" if not head else "it is truncated, corrupt or another kind of file"
        raise error(f"{what} {file} is not a fastvae checkpoint (not a torch zip archive): {kind}")
    try:
        return torch.load(file, map_location=map_location, weights_only=True)
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise
    except Exception as e:  # UnpicklingError, RuntimeError, EOFError, OSError, ... from a damaged file
        text = str(e)
        found = re.search(r"GLOBAL ([\w.]+)", text)
        if found is not None:
            raise error(
                f"{what} {file} holds pickled Python objects ({found.group(1)}), which "
                "torch.load(weights_only=True) refuses to run; save plain tensors, lists and dicts instead"
            ) from None
        marker = "WeightsUnpickler error:"  # torch's reason follows it, inside a long advice text
        if marker in text:
            after = text.split(marker, 1)[1].strip().splitlines()
            text = f"{type(e).__name__}: {after[0].strip() if after else ''}"
        else:
            text = _one_line(e)
        if head != _ZIP_MAGIC:
            raise error(f"{what} {file} is truncated or corrupt, or not a torch file: {text}") from None
        raise error(f"{what} {file} is truncated or corrupt: {text}") from None


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
    state = load_torch_file(
        file, map_location=map_location, what="checkpoint file", error=CheckpointError, require_zip=True
    )
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint file {file} is not a fastvae checkpoint (no 'format': '{FORMAT}')")
    missing = [k for k in ("model", "config", "epoch", "step", "history") if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint file {file} is corrupt: missing keys {missing}")
    if not isinstance(state["config"], dict):
        raise CheckpointError(
            f"checkpoint file {file} is corrupt: 'config' is a {type(state['config']).__name__}, "
            "expected a dict"
        )
    return state


# ---------------------------------------------------------------------- validation


def _shape(t: torch.Tensor) -> list[int]:
    return list(t.shape)


def _check_tensor_like(
    value: Any, like: torch.Tensor, name: str, source: str, *, same_dtype: bool, what: str
) -> None:
    """Refuse ``value`` unless it is a tensor of ``like``'s shape, a compatible dtype and a usable device.

    The device must be the CPU or CUDA (where ``map_location`` puts checkpoint tensors) or
    ``like``'s device type: a ``meta`` tensor (which ``map_location`` leaves alone) has no data.
    """
    if not isinstance(value, torch.Tensor):
        raise CheckpointError(f"{source}: {name} is a {type(value).__name__}, expected a tensor like {what}")
    if value.shape != like.shape:
        raise CheckpointError(
            f"{source}: {name} has shape {_shape(value)}, expected {_shape(like)} like {what}"
        )
    if same_dtype and value.dtype != like.dtype:
        raise CheckpointError(f"{source}: {name} has dtype {value.dtype}, expected {like.dtype} like {what}")
    if value.is_floating_point() != like.is_floating_point() or value.is_complex() != like.is_complex():
        raise CheckpointError(f"{source}: {name} has dtype {value.dtype}, expected {like.dtype} like {what}")
    if value.device.type not in ("cpu", "cuda", like.device.type):  # e.g. "meta": no data to copy
        raise CheckpointError(
            f"{source}: {name} is on device {value.device}, expected cpu or cuda like {what}"
        )


def check_model_state(model: torch.nn.Module, saved: Any, source: str) -> None:
    """Refuse a model ``state_dict`` that ``model.load_state_dict`` would reject or misread, in one line.

    Every tensor of ``model.state_dict()`` must be present with the same shape (the message names
    the first tensor that differs and both shapes), a float dtype where the model's is float and a
    CPU (or the model's) device; extra keys are refused.  ``source`` starts the message.
    """
    if not isinstance(saved, Mapping):
        raise CheckpointError(f"{source}: 'model' is a {type(saved).__name__}, expected a state_dict (dict)")
    expected = model.state_dict()
    describe = model.config() if callable(getattr(model, "config", None)) else type(model).__name__
    missing = [k for k in expected if k not in saved]
    unexpected = [k for k in saved if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors {missing[:4]}{' ...' if len(missing) > 4 else ''}")
        if unexpected:
            parts.append(f"unexpected tensors {unexpected[:4]}{' ...' if len(unexpected) > 4 else ''}")
        raise CheckpointError(f"{source}: the weights do not fit the model {describe}: {'; '.join(parts)}")
    bad = [
        k for k, v in expected.items() if not isinstance(saved[k], torch.Tensor) or saved[k].shape != v.shape
    ]
    if bad:
        k = bad[0]
        more = f" (and {len(bad) - 1} more tensors differ)" if len(bad) > 1 else ""
        got = saved[k]
        got_text = f"shape {_shape(got)}" if isinstance(got, torch.Tensor) else f"a {type(got).__name__}"
        raise CheckpointError(
            f"{source}: model tensor {k} has {got_text} in the checkpoint, but the model {describe} "
            f"expects shape {_shape(expected[k])}{more}"
        )
    for k, v in expected.items():
        _check_tensor_like(saved[k], v, f"model tensor {k}", source, same_dtype=False, what="the model's")


def _is_real(v: Any) -> bool:
    if isinstance(v, torch.Tensor):
        return v.numel() == 1 and not v.is_complex() and v.device.type != "meta" and math.isfinite(float(v))
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _check_group_hyperparameters(group: Mapping[str, Any], index: int, source: str) -> None:
    """Adam's numbers in a saved group: ``lr > 0``, ``betas`` in ``[0, 1)``, ``eps > 0``, ``wd >= 0``."""
    name = f"optimizer param_groups[{index}]"
    checks = {
        "lr": lambda v: _is_real(v) and float(v) > 0,
        "eps": lambda v: _is_real(v) and float(v) > 0,
        "weight_decay": lambda v: _is_real(v) and float(v) >= 0,
        "betas": lambda v: (
            isinstance(v, list | tuple) and len(v) == 2 and all(_is_real(b) and 0 <= float(b) < 1 for b in v)
        ),
    }
    expected = {
        "lr": "a finite number > 0",
        "eps": "a finite number > 0",
        "weight_decay": "a finite number >= 0",
        "betas": "two numbers in [0, 1)",
    }
    for key, ok in checks.items():
        if key in group and not ok(group[key]):
            raise CheckpointError(f"{source}: {name}.{key} is {group[key]!r}, expected {expected[key]}")
    for key in ("amsgrad", "maximize"):
        if key in group and not isinstance(group[key], bool):
            raise CheckpointError(f"{source}: {name}.{key} is {group[key]!r}, expected True or False")


def check_optimizer_state(
    optimizer: torch.optim.Optimizer,
    saved: Any,
    source: str,
    *,
    param_names: Mapping[int, str] | None = None,
    max_step: int | None = None,
) -> None:
    """Refuse an optimizer ``state_dict`` that does not fit ``optimizer``, before it is loaded.

    ``optimizer.load_state_dict`` checks only the number of parameters per group; a state tensor
    of the wrong shape is then read and written out of bounds by the fused Adam kernel (heap
    corruption).  Checked here: the param-group count and sizes, the ids, every state entry's keys
    (Adam: ``step``, ``exp_avg``, ``exp_avg_sq``, plus ``max_exp_avg_sq`` with ``amsgrad``), each
    moment tensor's shape and dtype (those of its parameter) and device (CPU or the parameter's),
    ``step`` (one finite integer in ``[0, max_step]``) and Adam's group hyperparameters.
    ``param_names`` maps ``id(param)`` to a name used in messages (e.g. ``decoder.2.weight``).
    """
    if not isinstance(saved, Mapping) or not isinstance(saved.get("state"), Mapping):
        raise CheckpointError(f"{source}: 'optimizer' is not an optimizer state_dict (no 'state' dict)")
    groups, mine = saved.get("param_groups"), optimizer.param_groups
    if not isinstance(groups, list) or not all(isinstance(g, Mapping) for g in groups):
        raise CheckpointError(f"{source}: optimizer 'param_groups' is not a list of dicts")
    if len(groups) != len(mine):
        raise CheckpointError(
            f"{source}: the optimizer state has {len(groups)} param groups, expected {len(mine)}"
        )
    params: dict[
        Any, tuple[int, torch.Tensor, Mapping[str, Any]]
    ] = {}  # saved id -> (position, param, group)
    position = 0
    for gi, (group, own) in enumerate(zip(groups, mine, strict=True)):
        ids = group.get("params")
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise CheckpointError(f"{source}: optimizer param_groups[{gi}].params is not a list of integers")
        if len(ids) != len(own["params"]):
            raise CheckpointError(
                f"{source}: optimizer param_groups[{gi}] has {len(ids)} parameters, expected "
                f"{len(own['params'])}"
            )
        _check_group_hyperparameters(group, gi, source)
        for i, p in zip(ids, own["params"], strict=True):
            if i in params:
                raise CheckpointError(f"{source}: optimizer parameter id {i} appears twice in param_groups")
            params[i] = (position, p, group)
            position += 1
    adam = isinstance(optimizer, torch.optim.Adam)
    for key, entry in saved["state"].items():
        if key not in params:
            raise CheckpointError(
                f"{source}: optimizer state[{key!r}] belongs to no parameter of param_groups"
            )
        pos, p, group = params[key]
        label = f"parameter {pos}" + (
            f" ({param_names[id(p)]})" if param_names and id(p) in param_names else ""
        )
        if not isinstance(entry, Mapping):
            raise CheckpointError(
                f"{source}: optimizer state[{key}] is a {type(entry).__name__}, expected a dict"
            )
        if adam:
            need = {"step", "exp_avg", "exp_avg_sq"} | ({"max_exp_avg_sq"} if group.get("amsgrad") else set())
            absent, extra = sorted(need - set(entry)), sorted(set(entry) - need)
            if absent or extra:
                raise CheckpointError(
                    f"{source}: optimizer state[{key}] of {label} has keys {sorted(entry)}, "
                    f"expected {sorted(need)}"
                )
        for name, value in entry.items():
            where = f"optimizer state[{key}].{name}"
            if name == "step":
                ok = _is_real(value) and float(value) >= 0 and float(value) == int(float(value))
                ok = ok and (max_step is None or float(value) <= max_step)
                if not ok:
                    bound = "" if max_step is None else f" <= {max_step} (the checkpoint's step)"
                    shown = value.tolist() if isinstance(value, torch.Tensor) and value.numel() < 8 else value
                    shown = (
                        f"a tensor of shape {_shape(value)}"
                        if isinstance(shown, torch.Tensor)
                        else repr(shown)
                    )
                    raise CheckpointError(f"{source}: {where} is {shown}, expected one integer >= 0{bound}")
            elif isinstance(value, torch.Tensor) or adam:
                _check_tensor_like(value, p, where, source, same_dtype=True, what=label)


def check_rng_state(rng: Any, source: str, *, cuda: bool) -> None:
    """Refuse RNG states that ``torch.set_rng_state``/``Generator.set_state`` would reject.

    ``rng["torch"]`` and ``rng["noise"]`` must be CPU ``uint8`` tensors of the size of
    ``torch.get_rng_state()`` holding a valid Mersenne-twister state (tried on a scratch
    generator); with ``cuda``, ``rng["cuda"]`` must be a list of at most ``device_count()`` such
    tensors of the CUDA generator's state size.  ``None`` entries (or no ``rng``) are allowed.
    """
    if rng is None:
        return
    if not isinstance(rng, Mapping):
        raise CheckpointError(f"{source}: 'rng' is a {type(rng).__name__}, expected a dict")
    size = torch.get_rng_state().numel()

    def check_bytes(t: Any, name: str, numel: int) -> None:
        if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.device.type != "cpu":
            got = f"dtype {t.dtype} on {t.device}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise CheckpointError(
                f"{source}: {name} is {got}, expected a uint8 CPU tensor (a generator state)"
            )
        if t.ndim != 1 or t.numel() != numel:
            raise CheckpointError(
                f"{source}: {name} has shape {_shape(t)}, expected [{numel}] (a generator state)"
            )

    for key in ("torch", "noise"):
        t = rng.get(key)
        if t is None:
            continue
        check_bytes(t, f"rng['{key}']", size)
        try:
            torch.Generator().set_state(t)
        except (RuntimeError, TypeError, ValueError) as e:
            raise CheckpointError(
                f"{source}: rng['{key}'] is not a valid generator state: {_one_line(e)}"
            ) from None
    states = rng.get("cuda")
    if states is None or not cuda:
        return
    if not isinstance(states, list | tuple) or len(states) > torch.cuda.device_count():
        raise CheckpointError(
            f"{source}: rng['cuda'] must be a list of at most {torch.cuda.device_count()} generator states"
        )
    numel = torch.cuda.get_rng_state(0).numel()
    for i, t in enumerate(states):
        check_bytes(t, f"rng['cuda'][{i}]", numel)


def build_checkpoint_model(state: Mapping[str, Any], file: str | os.PathLike) -> torch.nn.Module:
    """A freshly initialised model of the architecture in ``state["config"]["model"]`` (no weights loaded).

    :func:`fastvae.models.build_model` bounds the size before allocating anything; a missing or
    unusable config (unknown kind, more than ``MAX_PARAMETERS`` parameters, ...) raises
    :class:`CheckpointError` naming ``file``.
    """
    from fastvae import models

    config = state["config"].get("model") if isinstance(state.get("config"), Mapping) else None
    if not isinstance(config, dict):
        raise CheckpointError(f"checkpoint file {file} is corrupt: config['model'] is missing")
    try:
        return models.build_model(config)
    except (TypeError, KeyError, ValueError) as e:
        raise CheckpointError(f"checkpoint file {file} has an unusable model config: {e}") from e


def load_model(checkpoint: str | os.PathLike, map_location: str | torch.device = "cpu") -> torch.nn.Module:
    """Rebuild the model stored in a checkpoint (file or run directory), in eval mode on ``map_location``.

    The architecture comes from ``config["model"]`` through :func:`fastvae.models.build_model`
    (which bounds the model's size before building it); the weights are checked with
    :func:`check_model_state` (a mismatch names the tensor and both shapes).
    """
    state = load_checkpoint(checkpoint, map_location=map_location)
    file = resolve_checkpoint_path(checkpoint)
    model = build_checkpoint_model(state, file)
    check_model_state(model, state["model"], f"checkpoint file {file}")
    model.load_state_dict(state["model"])
    return model.to(map_location).eval()
