"""Several processes: the little that :class:`fastvae.trainer.Trainer` needs from ``torch.distributed``.

``torchrun --nproc-per-node=N -m fastvae train ...`` (or ``python -m torch.distributed.run ...``) sets
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in each process.
:func:`setup` reads them, joins the process group (``gloo`` on CPU, ``nccl`` on CUDA) and picks the
device of the process (``cuda:LOCAL_RANK`` on CUDA).  Without those variables, or with
``WORLD_SIZE=1``, it does nothing and the run is an ordinary single process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "env_world_size", "setup", "teardown", "shard_bounds"]


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``rank`` of ``world_size`` processes, ``local_rank`` on its node.

    ``owns_group`` is true when :func:`setup` created the process group (and so
    :func:`teardown` should destroy it).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        """True when training runs in more than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0, the process that writes checkpoints, metrics and pictures."""
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 when unset)."""
    return _env_int("WORLD_SIZE", 1)


def setup(device: torch.device) -> tuple[DistInfo, torch.device]:
    """Join the process group described by the environment; return ``(info, device)``.

    ``device`` is the device the caller resolved (``cpu`` or ``cuda``).  On CUDA each process takes
    ``cuda:LOCAL_RANK``.  An already initialised process group is used as it is.
    """
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = _env_int("LOCAL_RANK", rank)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local)
        return DistInfo(rank, world, local, owns_group=False), device
    world = env_world_size()
    if world <= 1:
        return DistInfo(), device
    if not dist.is_available():
        raise ValueError(
            f"WORLD_SIZE={world} asks for several processes, but torch.distributed is unavailable"
        )
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", rank)
    if not 0 <= rank < world:
        raise ValueError(f"environment variable RANK must lie in [0, {world}), got {rank}")
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return DistInfo(rank, world, local, owns_group=True), device


def teardown(info: DistInfo) -> None:
    """Destroy the process group if :func:`setup` created it."""
    if info.owns_group and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of a global batch of ``n`` rows that ``rank`` takes.

    Contiguous slices, the first ``n % world_size`` ranks one row longer: the split of
    ``torch.tensor_split(batch, world_size)``.
    """
    q, r = divmod(n, world_size)
    start = rank * q + min(rank, r)
    return start, start + q + (1 if rank < r else 0)
