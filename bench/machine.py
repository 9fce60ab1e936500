"""What ran a benchmark: device, CPU, memory, library versions, git commit and machine load.

Everything here goes into the ``"machine"`` section of a result record, so that a number can be
traced back to the hardware and the code that produced it.  :func:`device_kind` names the record
files (``cpu-amd-epyc-2c-...json``, ``nvidia-h200-...json``).
"""

from __future__ import annotations

import hashlib
import importlib
import os
import platform
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent

# CPU flags worth knowing when reading CPU timings (vector width and bf16 support).
_CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16")


def _cpuinfo() -> dict[str, str]:
    """The first processor's block of /proc/cpuinfo (empty off Linux)."""
    info: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.split("\n\n")[0].splitlines():
        key, _, value = line.partition(":")
        info[key.strip()] = value.strip()
    return info


def cpu_model() -> str:
    """The CPU's marketing name (``"AMD EPYC"`` under some hypervisors, which hide the exact SKU)."""
    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


def cpu_cores() -> int:
    """The cores this process may run on (the affinity mask, not the host's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _parse_size(text: str) -> int:
    """``"32768K"`` / ``"32M"`` (sysfs cache sizes) -> bytes."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMG]?)\s*", text)
    if not m:
        return 0
    return int(m.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[m.group(2)]


def cpu_last_level_cache_bytes() -> int:
    """Size of the CPU's last-level cache as sysfs reports it for cpu0 (32 MiB if unknown)."""
    best_level, size = -1, 0
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            level = int((index / "level").read_text())
            kind = (index / "type").read_text().strip()
            if kind != "Instruction" and level > best_level:
                best_level, size = level, _parse_size((index / "size").read_text())
        except (OSError, ValueError):
            continue
    return size or 32 * 2**20


def cache_bytes(device: torch.device) -> int:
    """The cache that rotated inputs must overflow: the GPU's L2, or the CPU's last-level cache."""
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20))
    return cpu_last_level_cache_bytes()


def memory_bytes() -> int | None:
    """Physical memory of the host (None if unknown)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def slug(text: str) -> str:
    """Lower case, runs of other characters as single dashes: safe in file names."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def device_kind(device: torch.device) -> str:
    """A file-name-safe name of the device: ``cpu-amd-epyc-2c`` or ``nvidia-h100-80gb-hbm3``."""
    if device.type == "cuda":
        return slug(torch.cuda.get_device_name(device))
    return f"cpu-{slug(cpu_model())}-{cpu_cores()}c"


def device_info(device: torch.device) -> dict[str, Any]:
    """Name and the properties that bound the benchmark: memory, cache, compute units."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {
            "type": "cuda",
            "name": torch.cuda.get_device_name(device),
            "kind": device_kind(device),
            "capability": f"{props.major}.{props.minor}",
            "memory_bytes": int(props.total_memory),
            "l2_cache_bytes": cache_bytes(device),
            "multiprocessors": int(props.multi_processor_count),
            "cuda_runtime": torch.version.cuda,
        }
    return {
        "type": "cpu",
        "name": cpu_model(),
        "kind": device_kind(device),
        "memory_bytes": memory_bytes(),
        "last_level_cache_bytes": cache_bytes(device),
    }


def cpu_info() -> dict[str, Any]:
    """The host CPU: model (with family/model numbers, since hypervisors may hide the name) and flags."""
    info = _cpuinfo()
    flags = set(info.get("flags", "").split())
    return {
        "model": cpu_model(),
        "vendor": info.get("vendor_id"),
        "family": info.get("cpu family"),
        "model_number": info.get("model"),
        "cores": cpu_cores(),
        "flags": [f for f in _CPU_FLAGS if f in flags],
        "last_level_cache_bytes": cpu_last_level_cache_bytes(),
        "memory_bytes": memory_bytes(),
    }


def _version(module: str) -> str | None:
    try:
        return str(importlib.import_module(module).__version__)
    except Exception:  # not installed, or broken: record it as absent
        return None


def versions() -> dict[str, str | None]:
    """Versions of everything that changes the numbers (None: not importable)."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "numba": _version("numba"),
        "numpy": _version("numpy"),
        "cupy": _version("cupy"),
        "fastvae": _version("fastvae"),
    }


def git_info() -> dict[str, Any]:
    """The commit, whether tracked files have uncommitted changes (None outside git), and a digest of
    fastvae's sources (so that two runs of a dirty tree can be told apart)."""

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30, check=True
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip()

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {
        "commit": commit,
        "dirty": None if status is None else bool(status),
        "source_sha256": source_digest(),
    }


def source_digest() -> str:
    """SHA-256 (first 16 hex digits) of fastvae's Python sources: identifies a dirty tree's code."""
    h = hashlib.sha256()
    for path in sorted([*REPO.glob("fastvae/*.py"), *REPO.glob("kernels/*.py")]):
        h.update(path.relative_to(REPO).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def load_average() -> list[float] | None:
    """1, 5 and 15-minute load averages: other processes competing for the cores skew CPU timings."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


_THREAD_ENV = (
    "OMP_NUM_THREADS",
    "OMP_WAIT_POLICY",
    "NUMBA_NUM_THREADS",
    "NUMBA_THREADING_LAYER",
    "MKL_NUM_THREADS",
)


def set_threads(n: int) -> None:
    """Use ``n`` threads in torch and in Numba's parallel kernels."""
    torch.set_num_threads(n)
    try:
        import numba

        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    except ImportError:
        pass


def threads() -> dict[str, Any]:
    """Thread pools in use: torch's intra-op threads, Numba's threads and threading layer (OpenMP,
    TBB or workqueue; known once a parallel kernel has run), and the environment variables that set them."""
    info: dict[str, Any] = {"torch": torch.get_num_threads(), "numba": None, "numba_layer": None}
    try:
        import numba

        info["numba"] = numba.get_num_threads()
        info["numba_layer"] = numba.threading_layer()
    except (ImportError, ValueError):  # ValueError: no parallel Numba kernel has run yet
        pass
    info["env"] = {k: os.environ[k] for k in _THREAD_ENV if k in os.environ}
    return info


def describe(device: torch.device) -> dict[str, Any]:
    """The ``"machine"`` section of a record."""
    return {
        "device": device_info(device),
        "cpu": cpu_info(),
        "versions": versions(),
        "git": git_info(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "executable": sys.executable,
    }
