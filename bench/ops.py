"""Run the op cases: for each case, check every implementation, then time those that passed
together (interleaved on the CPU); after all cases, peak memory.

The result of a case (one entry of the record's ``"ops"`` list)::

    {"case": {...Case fields, "id"}, "min_bytes": int, "input_sets": n, "input_set_bytes": int,
     "load_average": [1, 5, 15 min] when the case started,
     "results": {impl name: {
         "status": "ok" | "FAILED" | "skipped", "reason": str (FAILED / skipped),
         "info": {"kind", "description", "backend"?, "validate"?},
         "check": {"passed", "out_rel_err", "grad_rel_err", "tolerance", "reference", "inputs"},
         "first_call_s": seconds of the first call (JIT / torch.compile included),
         "time": {"median_s", "q25_s", "q75_s", "min_s", "repeats"},
         "gbps": min_bytes / median (1e9 B/s), "pct_copy": 100 * gbps / copy gbps,
         "speedup": {baseline: baseline median / this median},
         "peak_bytes": extra memory of one call (see bench.timing)}}}

A case that does not fit on the device is kept with ``"skipped": reason`` and no results.
"""

from __future__ import annotations

import functools
import gc
import time
from collections.abc import Callable
from typing import Any

import torch

from bench import cases as cases_mod
from bench import correctness, machine, timing
from bench.cases import Case
from bench.impls import BASELINES, Impl, Rotation, call, compile_settings, implementations


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _check_impl(impl: Impl, case: Case, sets: list[cases_mod.Inputs], device: torch.device) -> dict[str, Any]:
    """Run ``impl`` once on input set 0 (moderate logits for eager-seed) and check it.

    Returns the implementation's result so far: ``status`` "skipped" or "FAILED" (with the reason),
    or "checked" (to be timed).
    """
    result: dict[str, Any] = {"info": impl.info()}
    why = impl.unsupported(case)
    if why is not None:
        return {**result, "status": "skipped", "reason": why}
    check_inputs = sets[0].with_moderate_logits() if impl.moderate_logits else sets[0]
    try:
        t0 = time.perf_counter()
        out, grads = call(impl, case, check_inputs)
        _sync(device)
        result["first_call_s"] = time.perf_counter() - t0
        result["check"] = correctness.check(impl, case, check_inputs, out, grads)
        del out, grads
    except Exception as e:  # an implementation that cannot run the case fails it
        return {**result, "status": "FAILED", "reason": f"{type(e).__name__}: {e}"[:500]}
    if not result["check"]["passed"]:
        c = result["check"]
        reason = f"check failed: output rel err {c['out_rel_err']:.3g}, gradient rel err {c['grad_rel_err']}"
        return {**result, "status": "FAILED", "reason": reason}
    return {**result, "status": "checked"}


def summarize(entry: dict[str, Any], copy_gbps: float) -> None:
    """Add bandwidth, % of the copy bandwidth and the speed-ups over the baselines to ``entry``."""
    results = entry["results"]
    medians = {n: r["time"]["median_s"] for n, r in results.items() if r.get("status") == "ok"}
    for name, median in medians.items():
        r = results[name]
        r["gbps"] = entry["min_bytes"] / median / 1e9
        r["pct_copy"] = 100 * r["gbps"] / copy_gbps
        r["speedup"] = {b: medians[b] / median for b in BASELINES if b in medians}


def _measure_memory(entries: list[dict[str, Any]], impls: list[Impl], device: torch.device) -> None:
    """Peak memory of one call per (case, implementation that passed), after all timings."""
    if device.type == "cpu":
        timing.prepare_cpu_rss()
    by_name = {i.name: i for i in impls}
    for entry in entries:
        if "results" not in entry:
            continue
        case = Case(**{k: v for k, v in entry["case"].items() if k != "id"})
        inputs = cases_mod.make_inputs(case, device, 0)
        gc.collect()
        for name, r in entry["results"].items():
            if r.get("status") == "ok":  # every implementation timed has run many times: warm
                r["peak_bytes"] = timing.peak_memory(
                    functools.partial(call, by_name[name], case, inputs), device
                )
        del inputs


def _run_case(
    case: Case,
    impls: list[Impl],
    skipped: dict[str, str],
    device: torch.device,
    budget: timing.Budget,
    cache: int,
    max_input_sets: int,
) -> dict[str, Any]:
    """Check every implementation on the case, then time those that passed, together."""
    sets = cases_mod.input_sets(case, device, cache, max_sets=max_input_sets)
    results: dict[str, Any] = {}
    entry: dict[str, Any] = {
        "case": case.to_dict(),
        "min_bytes": cases_mod.min_bytes(case),
        "input_sets": len(sets),
        "input_set_bytes": sets[0].nbytes,
        "load_average": machine.load_average(),
        "results": results,
    }
    for impl in impls:
        results[impl.name] = _check_impl(impl, case, sets, device)
    to_time = {i.name: Rotation(i, case, sets) for i in impls if results[i.name]["status"] == "checked"}
    for name, t in timing.measure_many(to_time, device, budget).items():
        results[name].update(status="ok", time=t.to_dict())
    for name, reason in skipped.items():
        results[name] = {"status": "skipped", "reason": reason}
    del sets, to_time
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return entry


def run_ops(
    cases: list[Case],
    device: torch.device,
    budget: timing.Budget,
    *,
    compile: bool = True,
    max_input_sets: int = cases_mod.MAX_INPUT_SETS,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Measure the copy ceiling and every case; returns the record's ``"copy"``, ``"ops"`` and notes."""
    cache = machine.cache_bytes(device)
    copy = timing.copy_bandwidth(device, budget, timing.copy_bytes(device, cache))
    log(f"copy ceiling: {copy['gbps']:.1f} GB/s ({copy['bytes'] / 2**20:.0f} MiB dst.copy_(src))")
    impls, skipped = implementations(device, compile=compile)
    entries: list[dict[str, Any]] = []
    with compile_settings():
        for case in cases:
            why = cases_mod.fits_on(case, device)
            if why is not None:
                log(f"skip {case.id}: {why}")
                entries.append({"case": case.to_dict(), "skipped": why})
                continue
            t0 = time.perf_counter()
            entry = _run_case(case, impls, skipped, device, budget, cache, max_input_sets)
            summarize(entry, copy["gbps"])
            entries.append(entry)
            log(_case_line(entry, time.perf_counter() - t0))
        t0 = time.perf_counter()
        _measure_memory(entries, impls, device)
    log(f"peak memory measured in {time.perf_counter() - t0:.1f} s")
    return {"copy": copy, "ops": entries, "memory_method": timing.memory_method(device)}


def _case_line(entry: dict[str, Any], seconds: float) -> str:
    """One progress line: each implementation's median (or status)."""
    parts = []
    for name, r in entry["results"].items():
        if r["status"] == "ok":
            parts.append(f"{name} {r['time']['median_s'] * 1e3:.3g} ms")
        elif r["status"] == "FAILED":
            parts.append(f"{name} FAILED")
    return f"{entry['case']['id']} [{seconds:.0f} s]: " + ", ".join(parts)
