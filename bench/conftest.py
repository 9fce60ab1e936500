"""pytest-benchmark set-up for ``pytest bench/ --benchmark-only``.

Options: ``--bench-device auto|cpu|cuda`` (default: cuda if available) and ``--bench-mode
smoke|quick|full`` (default quick), which choose the op grid of :mod:`bench.cases` and the training
cases of :mod:`bench.training`.  ``pytest tests`` never collects this folder (``testpaths``).

pytest-benchmark times with ``time.perf_counter``; on CUDA the benchmarked function synchronises
at its end, so its numbers include launch overheads and are not the CUDA-event times of
``python -m bench``, which is the reference run; these tests are for ``--benchmark-compare`` across
commits, with the same correctness check before timing.
"""

from __future__ import annotations

import pytest
import torch

from bench import cases, impls, training


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("fastvae bench")
    group.addoption("--bench-device", default="auto", choices=("auto", "cpu", "cuda"))
    group.addoption("--bench-mode", default="quick", choices=("smoke", "quick", "full"))


def _device(config: pytest.Config) -> torch.device | None:
    """The device asked for (None: CUDA asked for but absent, so there is nothing to run)."""
    name = config.getoption("--bench-device")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        return None
    return torch.device(name)


_impls: dict[str, list[impls.Impl]] = {}


def implementations(device: torch.device) -> list[impls.Impl]:
    """The implementations of ``device``, built once per session."""
    if str(device) not in _impls:
        _impls[str(device)] = impls.implementations(device)[0]
    return _impls[str(device)]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    config = metafunc.config
    device = _device(config)
    mode = config.getoption("--bench-mode")
    if "op_case" in metafunc.fixturenames:
        grid = (
            []
            if device is None
            else [c for c in cases.cases_for(mode, device) if cases.fits_on(c, device) is None]
        )
        names = [] if device is None else [i.name for i in implementations(device)]
        metafunc.parametrize("op_case", grid, ids=[c.id.replace(" ", "-") for c in grid])
        metafunc.parametrize("impl_name", names)
    if "train_case" in metafunc.fixturenames:
        grid = [] if device is None else training.training_cases(mode)
        metafunc.parametrize("train_case", grid, ids=[c.id.replace(" ", "-") for c in grid])
        metafunc.parametrize("loop", [] if device is None else training.variants(mode, device))


@pytest.fixture(scope="session")
def bench_device(pytestconfig: pytest.Config) -> torch.device:
    device = _device(pytestconfig)
    if device is None:
        pytest.skip("--bench-device cuda: no CUDA device")
    return device


@pytest.fixture(scope="session")
def bench_mode(pytestconfig: pytest.Config) -> str:
    return pytestconfig.getoption("--bench-mode")


@pytest.fixture
def impl(impl_name: str, bench_device: torch.device) -> impls.Impl:
    return next(i for i in implementations(bench_device) if i.name == impl_name)
