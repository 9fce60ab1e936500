"""pytest-benchmark tests of the ops: one per (case, implementation) of the ``--bench-mode`` grid.

Each test checks the implementation against the float64 reference first (a failure fails the test
and nothing is timed), then lets pytest-benchmark time calls rotating over the case's input sets.
``extra_info`` carries the case, the minimum bytes and the achieved GB/s.
"""

from __future__ import annotations

import pytest
import torch

from bench import cases, correctness, machine
from bench.impls import Impl, Rotation, call, compile_settings

_sets: dict[str, list[cases.Inputs]] = {}


def _input_sets(case: cases.Case, device: torch.device) -> list[cases.Inputs]:
    """The input sets of the case, kept while its implementations run (one case at a time)."""
    if case.id not in _sets:
        _sets.clear()
        _sets[case.id] = cases.input_sets(case, device, machine.cache_bytes(device))
    return _sets[case.id]


def test_op(benchmark, op_case: cases.Case, impl: Impl, bench_device: torch.device) -> None:
    why = impl.unsupported(op_case)
    if why is not None:
        pytest.skip(why)
    sets = _input_sets(op_case, bench_device)
    check_inputs = sets[0].with_moderate_logits() if impl.moderate_logits else sets[0]
    with compile_settings():
        out, grads = call(impl, op_case, check_inputs)
        result = correctness.check(impl, op_case, check_inputs, out, grads)
        assert result["passed"], f"{impl.name} fails the correctness check on {op_case.id}: {result}"
        del out, grads

        rotation = Rotation(impl, op_case, sets)
        if bench_device.type == "cuda":

            def fn():
                rotation()
                torch.cuda.synchronize(bench_device)
        else:
            fn = rotation
        benchmark.group = op_case.id
        benchmark(fn)
    median = benchmark.stats.stats.median
    nbytes = cases.min_bytes(op_case)
    benchmark.extra_info.update(case=op_case.to_dict(), min_bytes=nbytes, gbps=nbytes / median / 1e9)
