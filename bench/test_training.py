"""pytest-benchmark tests of whole-epoch training: one per (training case, loop).

Each test runs the loop's warm-up and measured epochs once (``benchmark.pedantic``, one round) and
records samples/s in ``extra_info``.  Skipped, with the reason, while fastvae's trainer, models or
data modules (or ``bench/examples_loop.py``) are missing.
"""

from __future__ import annotations

import pytest
import torch

from bench import training


def test_training_epoch(
    benchmark, train_case: training.TrainCase, loop: str, bench_device: torch.device, bench_mode: str
):
    why = training.missing_modules()
    if why is not None:
        pytest.skip(why)
    benchmark.group = f"train {train_case.id}"
    result = benchmark.pedantic(
        training.run_variant, args=(loop, train_case, bench_device, bench_mode), rounds=1, iterations=1
    )
    if result["status"] == "skipped":
        pytest.skip(result["reason"])
    assert result["status"] == "ok", result.get("reason")
    benchmark.extra_info.update(samples_per_s=result["samples_per_s"], epoch_s=result["epoch_s"])
