"""``python -m bench``: measure the ops, the training step and loop, and the CUDA path's host time;
write a JSON record, print the tables.

    python -m bench --quick                 # a few minutes on a 2-core CPU
    python -m bench                         # the full grid (long)
    python -m bench --device cuda --quick   # on a GPU
    python -m bench --smoke                 # tiny sizes, few repeats, no torch.compile (CI)
    python -m bench --host                  # only the host time per call of the CUDA code path
    python -m bench --quick --record        # keep the record: bench/results/, README and chart
    python -m bench --static [ARGS]         # bench.static's own command line

By default the record goes to the untracked ``bench/out/<device kind>-<YYYYmmdd-HHMMSS>.json`` and the
checkout stays clean; ``--record`` (quick and full runs) writes it to ``bench/results/`` instead and
regenerates ``bench/README.md`` and the speed-up chart from the latest record of each device.
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

from bench import SCHEMA, hosttime, machine, report, step, timing, training
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
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--out", type=Path, default=None, help=f"folder for the JSON record (default: {_rel(report.OUT)})"
    )
    where.add_argument(
        "--record",
        action="store_true",
        help=f"keep the record: write it to {_rel(report.RESULTS)} and regenerate {_rel(report.README)} "
        "and the charts (quick and full runs)",
    )
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
    p.add_argument("--no-training", action="store_true", help="skip the training-epoch benchmarks")
    p.add_argument("--no-step", action="store_true", help="skip the training-step benchmark")
    p.add_argument("--no-host", action="store_true", help="skip the host time of the CUDA code path")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile implementations")
    p.add_argument(
        "--host",
        action="store_true",
        help="only the host time per call of the CUDA code path (Triton's driver stubbed; no GPU needed)",
    )
    p.add_argument(
        "--static",
        nargs=argparse.REMAINDER,
        metavar="ARGS",
        help="run bench.static with the arguments that follow (everything after --static is its own)",
    )
    args = p.parse_args(argv)
    if args.record and args.smoke:
        p.error("--record keeps quick and full records only; a smoke run is not a measurement")
    if args.host:
        args.no_ops = args.no_training = args.no_step = True
        args.no_host = False
    return args


def _rel(path: Path) -> str:
    root = report.BENCH.parent
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


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


def main(argv: list[str] | None = None) -> Any:
    """Run the benchmark (or ``bench.static``); returns the record (or what ``bench.static.main`` returns)."""
    args = _parse(argv)
    if args.static is not None:
        return _static(args.static)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    out = report.RESULTS if args.record else args.out or report.OUT
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
            "sections": [
                name
                for name, skip in (
                    ("ops", args.no_ops),
                    ("training", args.no_training),
                    ("step", args.no_step),
                    ("host", args.no_host),
                )
                if not skip
            ],
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
    if not args.no_step:
        record["step"] = step.run_step(mode, device, compile=record["settings"]["compile"])
    if not args.no_host:
        record["host"] = hosttime.run_host(mode)

    record["settings"]["threads"] = machine.threads()
    record["load_average_end"] = machine.load_average()
    record["duration_s"] = time.perf_counter() - started
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{report.record_key(record)}-{now:%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    print()
    report.print_tables(record)
    print(f"\nrecord: {path}")
    if args.record:
        for written in report.update():
            print(f"wrote {written}")
    return record


def _static(argv: list[str]) -> Any:
    """``bench.static.main(argv)``, imported only when asked for."""
    try:
        from bench import static
    except ImportError as e:
        raise SystemExit(f"--static: bench/static.py is not importable ({e})") from e
    return static.main(argv)


if __name__ == "__main__":
    result = main()
    if isinstance(result, int):  # bench.static's exit status
        sys.exit(result)
