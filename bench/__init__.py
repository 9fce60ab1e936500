"""Benchmarks of fastvae's fused ops and training loop against the PyTorch ways of writing them.

Entry points:

* ``python -m bench [--quick] [--device cpu|cuda] [--record]``: the whole harness; writes one JSON
  record per run (into the untracked ``bench/out/``; with ``--record`` into ``bench/results/``, and then
  regenerates ``bench/README.md`` and the charts) and prints the tables;
* ``pytest bench/ --benchmark-only``: the same op cases as pytest-benchmark tests (for
  ``--benchmark-compare`` between commits).

Modules, one concept each:

* :mod:`bench.machine`   -- what ran the benchmark (device, CPU, versions, git commit, load);
* :mod:`bench.timing`    -- how time, bandwidth and peak memory are measured;
* :mod:`bench.cases`     -- the grid of op cases, their inputs and their minimum bytes;
* :mod:`bench.impls`     -- the implementations compared, and their correctness check;
* :mod:`bench.ops`       -- runs the op cases (check, time, memory) into result dicts;
* :mod:`bench.training`  -- whole-epoch training throughput;
* :mod:`bench.step`      -- one pytorch/examples training step, unchanged and with fastvae's ops;
* :mod:`bench.hosttime`  -- host time per call of the CUDA code path, Triton's driver stubbed;
* :mod:`bench.report`    -- tables, README, chart and the targets;
* ``bench/examples_loop.py`` -- pytorch/examples' training loop (the training baseline).
"""

SCHEMA = "fastvae-bench/1"
