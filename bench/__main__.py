"""``python -m bench``: measure the ops and the training loop, write a JSON record, print the tables.

    python -m bench --quick                 # a few minutes on a 2-core CPU (< 3 min with warm caches)
    python -m bench                         # the full grid (long)
    python -m bench --device cuda --quick   # on a GPU
    python -m bench --smoke --out /tmp/x    # tiny sizes, few repeats, no torch.compile (CI)

The record goes to ``<out>/<device kind>-<YYYYmmdd-HHMMSS>.json``; after a quick or full run into
the default results folder, ``bench/README.md`` and the speed-up chart are regenerated from the
latest record of each device (``--no-readme`` skips that).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from bench import SCHEMA, machine, report, timing, training
from bench.cases import MAX_INPUT_SETS, cases_for
from bench.ops import run_ops


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a small subset around the headline case")
    size.add_argument("--smoke", action="store_true", help="tiny sizes, few repeats, no torch.compile (CI)")
    p.add_argument(
        "--device", default="auto", choices=("auto", "cpu", "cuda"), help="default: cuda if available"
    )
    p.add_argument("--out", type=Path, default=report.RESULTS, help="folder for the JSON record")
    p.add_argument("--filter", default="", help="only op cases whose id contains this text")
    p.add_argument(
        "--label",
        default="",
        help="tag of a variant run (e.g. numba-workqueue): added to the file name, kept apart in the README",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch and Numba threads (default: their defaults); e.g. 1 on a loaded machine, with --label",
    )
    p.add_argument("--no-ops", action="store_true", help="skip the op benchmarks")
    p.add_argument("--no-training", action="store_true", help="skip the training benchmarks")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile implementations")
    p.add_argument("--no-readme", action="store_true", help="do not regenerate bench/README.md and charts")
    return p.parse_args(argv)


def _device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    return torch.device(name)


def _warnings(device: torch.device, load: list[float] | None) -> list[str]:
    """Conditions that make the numbers less trustworthy, recorded with them."""
    out = []
    cores = machine.cpu_cores()
    if load is not None and load[0] > 0.5 * cores:
        out.append(
            f"load average {load[0]} on {cores} cores at the start: other processes competed for the CPU, "
            "so CPU timings (and GPU launch overheads) are inflated and noisy"
        )
    if os.environ.get("FASTVAE_BACKEND"):
        out.append(
            f"FASTVAE_BACKEND={os.environ['FASTVAE_BACKEND']} is set: the Trainer loops use that backend"
        )
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _parse(argv)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    device = _device(args.device)
    if args.threads:
        machine.set_threads(args.threads)
    started = time.perf_counter()
    now = datetime.now().astimezone()
    load = machine.load_average()
    record: dict[str, Any] = {
        "schema": SCHEMA,
        "mode": mode,
        "label": machine.slug(args.label),
        "date": now.isoformat(timespec="seconds"),
        "machine": machine.describe(device),
        "settings": {
            "budget": vars(timing.BUDGETS[mode]),
            "timer": "triton.testing.do_bench (CUDA events)"
            if device.type == "cuda"
            else "time.perf_counter",
            "compile": not (args.no_compile or mode == "smoke"),
            "filter": args.filter,
            "fastvae_backend_env": os.environ.get("FASTVAE_BACKEND"),
        },
        "load_average_start": load,
        "warnings": _warnings(device, load),
    }
    for w in record["warnings"]:
        print(f"WARNING: {w}", file=sys.stderr)
    print(f"fastvae benchmark, {mode} mode, on {record['machine']['device']['name']} ({device})")

    if not args.no_ops:
        cases = [c for c in cases_for(mode, device) if args.filter in c.id]
        record.update(
            run_ops(
                cases,
                device,
                timing.BUDGETS[mode],
                compile=record["settings"]["compile"],
                max_input_sets=2 if mode == "smoke" else MAX_INPUT_SETS,
            )
        )
    if not args.no_training:
        record["training"] = training.run_training(training.training_cases(mode), device, mode)

    record["settings"]["threads"] = machine.threads()
    record["load_average_end"] = machine.load_average()
    record["duration_s"] = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{report.record_key(record)}-{now:%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    print()
    report.print_tables(record)
    print(f"\nrecord: {path}")
    if mode != "smoke" and not args.no_readme and args.out.resolve() == report.RESULTS.resolve():
        for written in report.update():
            print(f"wrote {written}")
    return record


if __name__ == "__main__":
    main()
