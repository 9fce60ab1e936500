"""Tables, chart, targets and the generated part of ``bench/README.md``, from the JSON records.

``python -m bench.report [--results bench/results]`` regenerates ``bench/README.md`` (between its
``generated`` markers) and ``<results>/<device kind>-speedup.png`` from the latest quick or full
record of each device kind; ``python -m bench --record`` does the same after its run.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bench.cases import HEADLINE, REPARAMETERIZE_SHAPES
from bench.impls import BASELINES
from bench.training import BASELINES as TRAIN_BASELINES

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"  # committed records (python -m bench --record)
OUT = BENCH / "out"  # default output folder of python -m bench: untracked (.gitignore)
SECTIONS = ("training", "step", "host")  # measured apart from the ops; merged from the newest record
README = BENCH / "README.md"
BEGIN, END = "<!-- generated:start (python -m bench.report) -->", "<!-- generated:end -->"

# ----------------------------------------------------------------------------------------------
# Records
# ----------------------------------------------------------------------------------------------


def load(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def record_key(record: dict[str, Any]) -> str:
    """The device kind, with the run's label if it has one: names files and README sections."""
    kind = record["machine"]["device"]["kind"]
    return f"{kind}-{record['label']}" if record.get("label") else kind


def _has(record: dict[str, Any], section: str) -> bool:
    """Whether ``record`` measured ``section`` (training cases, step results, a host section that ran)."""
    data = record.get(section) or {}
    if section == "training":
        return bool(data.get("cases"))
    if section == "host":
        return data.get("status") == "ok"
    return bool(data.get("results"))


def latest_records(results: Path = RESULTS) -> dict[str, tuple[Path, dict[str, Any]]]:
    """Per device kind and label, the newest quick or full record with op results, its training, step
    and host sections each taken from the newest record that measured it (sections may be run
    separately, e.g. to stay within a GPU session's time limit per command); ``section_records``
    names the files they came from."""
    runs: dict[str, list[tuple[Path, dict[str, Any]]]] = {}
    for path in sorted(Path(results).glob("*.json")):
        try:
            rec = load(path)
        except (OSError, json.JSONDecodeError):
            continue
        if rec.get("mode") in ("quick", "full"):
            runs.setdefault(record_key(rec), []).append((path, rec))
    latest: dict[str, tuple[Path, dict[str, Any]]] = {}
    for key, items in sorted(runs.items()):
        items.sort(key=lambda item: item[1]["date"])
        with_ops = [it for it in items if it[1].get("ops")]
        path, record = (with_ops or items)[-1]
        record = dict(record)
        record["section_records"] = {}
        for section in SECTIONS:
            having = [it for it in items if _has(it[1], section)]
            if having and having[-1][0] != path:
                record[section] = having[-1][1][section]
                record["section_records"][section] = having[-1][0].name
        latest[key] = (path, record)
    return latest


# ----------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------


def _fmt_ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def _fmt_x(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}x"


def _fmt_mib(n: int | None) -> str:
    return "" if n is None else f"{n / 2**20:.1f}"


def _markdown(header: list[str], rows: Iterable[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def ops_rows(record: dict[str, Any]) -> list[list[str]]:
    """One row per (case, implementation that ran or failed)."""
    rows = []
    for entry in record.get("ops", []):
        case_id = entry["case"]["id"]
        if "skipped" in entry:
            continue
        for name, r in entry["results"].items():
            if r["status"] == "skipped":
                continue
            if r["status"] != "ok":
                rows.append([case_id, name, f"FAILED: {r.get('reason', '')}"] + [""] * 7)
                continue
            t = r["time"]
            sp = r.get("speedup", {})
            rows.append(
                [
                    case_id,
                    name,
                    f"{_fmt_ms(t['median_s'])} ({_fmt_ms(t['q25_s'])}-{_fmt_ms(t['q75_s'])})",
                    _fmt_ms(t["min_s"]),
                    *(_fmt_x(sp.get(b)) for b in BASELINES),
                    f"{r['gbps']:.1f}",
                    f"{r['pct_copy']:.0f}%",
                    _fmt_mib(r.get("peak_bytes")),
                ]
            )
    return rows


OPS_HEADER = [
    "case",
    "implementation",
    "median ms (IQR)",
    "min ms",
    "vs eager-seed",
    "vs eager-best",
    "vs compile",
    "GB/s",
    "% copy",
    "peak MiB",
]


def training_rows(record: dict[str, Any]) -> list[list[str]]:
    rows = []
    for entry in record.get("training", {}).get("cases", []):
        for name, r in entry["results"].items():
            if r["status"] != "ok":
                rows.append([entry["id"], name, f"{r['status']}: {r.get('reason', '')}"] + [""] * 5)
                continue
            sp = r.get("speedup", {})
            median = sorted(r["epoch_s"])[len(r["epoch_s"]) // 2]
            rows.append(
                [
                    entry["id"],
                    name,
                    f"{r['samples_per_s']:,.0f}",
                    f"{r.get('best_samples_per_s', r['images'] / min(r['epoch_s'])):,.0f}",
                    *(_fmt_x(sp.get(b)) for b in TRAIN_BASELINES),
                    f"{median:.3f}",
                    f"{r['last_train_loss']:.2f}",
                ]
            )
    return rows


TRAINING_HEADER = [
    "model, batch",
    "loop",
    "samples/s",
    "best epoch samples/s",
    "vs examples",
    "vs plain-compile",
    "epoch s",
    "train loss",
]


def _fmt_us(seconds: float) -> str:
    return f"{seconds * 1e6:.1f}"


def step_rows(record: dict[str, Any]) -> list[list[str]]:
    """One row per variant of the training step: ms per step and the speed-up in the same mode."""
    step = record.get("step", {})
    rows = []
    for name, r in step.get("results", {}).items():
        if "time" not in r:
            rows.append([name, f"{r['status']}: {r.get('reason', '')}", "", "", ""])
            continue
        t = r["time"]
        kind = "compile" if name.endswith("compile") else "eager"
        sp = step.get("speedup", {}).get(kind) if name.startswith("fastvae") else None
        rows.append(
            [
                name,
                f"{_fmt_ms(t['median_s'])} ({_fmt_ms(t['q25_s'])}-{_fmt_ms(t['q75_s'])})",
                _fmt_ms(t["min_s"]),
                ""
                if sp is None
                else f"{sp['median']:.2f}x (fastest {sp['min']:.2f}x; target {sp['target']})",
                f"{r['first_loss']:.1f}",
            ]
        )
    return rows


STEP_HEADER = ["variant", "median ms per step (IQR)", "min ms", "vs unchanged", "first loss"]


def host_rows(record: dict[str, Any]) -> list[list[str]]:
    """One row per timed call: median and fastest microseconds, launches and JITFunction.run time."""
    host = record["host"]
    rows = []
    for name, r in host["results"].items():
        t = r["time"]
        op = name.split()[0]
        ratio = host.get("ratios", {}).get(op) if name.endswith("fastvae") and " 1x" in name else None
        launch = r.get("jit_run_s_per_call")
        rows.append(
            [
                name,
                f"{_fmt_us(t['median_s'])} ({_fmt_us(t['q25_s'])}-{_fmt_us(t['q75_s'])})",
                _fmt_us(t["min_s"]),
                "" if "launches_per_call" not in r else f"{r['launches_per_call']:g}",
                "" if launch is None else _fmt_us(launch),
                "" if launch is None else _fmt_us(t["median_s"] - launch),
                "" if ratio is None else f"{ratio['median']:.2f}x (target <= {ratio['target']}x)",
            ]
        )
    return rows


HOST_HEADER = [
    "call (fwd+bwd)",
    "median us (IQR)",
    "min us",
    "launches",
    "JITFunction.run us",
    "rest us",
    "vs eager at B=1",
]


def summary(record: dict[str, Any]) -> str:
    """Where and how a record was measured, in a few lines."""
    m = record["machine"]
    dev, cpu, v, git = m["device"], m["cpu"], m["versions"], m["git"]
    lines = [
        f"- device: **{dev['name']}** ({dev['kind']}); CPU {cpu['model']} (family {cpu['family']}, "
        f"model {cpu['model_number']}), {cpu['cores']} cores; torch threads {m['torch_threads']}",
        f"- mode **{record['mode']}**, {record['date']}, {record['duration_s']:.0f} s; "
        f"git {str(git['commit'])[:10]}"
        f"{' (dirty, sources ' + str(git.get('source_sha256')) + ')' if git['dirty'] else ''}; "
        f"load average at start {record.get('load_average_start')}, "
        f"end {record.get('load_average_end')}",
        f"- python {v['python']}, torch {v['torch']}, triton {v['triton']}, numba {v['numba']}, "
        f"numpy {v['numpy']}, cupy {v['cupy']}",
    ]
    if "copy" in record:
        c = record["copy"]
        lines.append(
            f"- copy ceiling: **{c['gbps']:.1f} GB/s** ({c['bytes'] / 2**20:.0f} MiB `dst.copy_(src)`, "
            f"median {c['time']['median_s'] * 1e3:.2f} ms)"
        )
    if record.get("warnings"):
        lines += [f"- **warning**: {w}" for w in record["warnings"]]
    return "\n".join(lines)


def tables(record: dict[str, Any]) -> str:
    """The markdown of one record: summary, op table, training table."""
    parts = [summary(record)]
    if record.get("ops"):
        parts += ["", _markdown(OPS_HEADER, ops_rows(record))]
        skipped = sorted(
            {
                f"{n}: {r['reason']}"
                for e in record["ops"]
                for n, r in e.get("results", {}).items()
                if r["status"] == "skipped"
            }
        )
        if skipped:
            parts += ["", "Not run: " + "; ".join(skipped) + "."]
    training = record.get("training", {})
    if training.get("cases"):
        parts += ["", _markdown(TRAINING_HEADER, training_rows(record))]
    elif training.get("skipped"):
        parts += ["", f"Training not measured: {training['skipped']}"]
    st = record.get("step")
    if st and st.get("results"):
        parts += ["", f"Training step, {st['model']}, batch {st['batch']}, {st['device']}:", ""]
        parts.append(_markdown(STEP_HEADER, step_rows(record)))
    elif st:
        parts += ["", f"Training step not measured: {st.get('reason', st.get('status'))}"]
    host = record.get("host")
    if host and host.get("status") == "ok":
        what = f"stub Triton driver, {host['threads']} thread"
        parts += ["", f"Host time per call on the CUDA code path ({what}):"]
        parts += ["", _markdown(HOST_HEADER, host_rows(record))]
    elif host:
        parts += ["", f"Host time not measured: {host.get('reason', host.get('status'))}"]
    return "\n".join(parts)


def print_tables(record: dict[str, Any]) -> None:
    """The tables of a record on stdout (markdown, readable as text)."""
    print(tables(record))


# ----------------------------------------------------------------------------------------------
# Targets
# ----------------------------------------------------------------------------------------------


def _ops_entry(record: dict[str, Any], case_id: str) -> dict[str, Any] | None:
    return next((e for e in record.get("ops", []) if e["case"]["id"] == case_id and "results" in e), None)


def _largest_vae_case(record: dict[str, Any]) -> dict[str, Any] | None:
    """The largest fp32 / float-target vae_loss fwd+bwd case that fastvae ran."""
    best = None
    for e in record.get("ops", []):
        c = e["case"]
        ok = e.get("results", {}).get("fastvae", {}).get("status") == "ok"
        if (
            ok
            and c["op"] == "vae_loss"
            and c["mode"] == "fwd+bwd"
            and c["dtype"] == "fp32"
            and c["target"] == "float"
        ):
            if best is None or e["min_bytes"] > best["min_bytes"]:
                best = e
    return best


Pair = tuple[float, float]  # a figure from the medians, and the same from the fastest calls / epochs


def _ratio(entry: dict[str, Any] | None, impl: str, baselines: tuple[str, ...]) -> tuple[Pair | None, str]:
    """Speed-up of ``impl`` over the fastest of ``baselines`` that ran (by medians, and by minimum
    times), and which baseline that was."""
    if entry is None or entry["results"].get(impl, {}).get("status") != "ok":
        return None, ""
    res = entry["results"]
    ok = [b for b in baselines if res.get(b, {}).get("status") == "ok"]
    if not ok:
        return None, ""
    fastest = min(ok, key=lambda b: res[b]["time"]["median_s"])
    t, base = res[impl]["time"], res[fastest]["time"]
    return (base["median_s"] / t["median_s"], base["min_s"] / t["min_s"]), fastest


def _pct_copy(record: dict[str, Any], entry: dict[str, Any] | None, impl: str) -> Pair | None:
    """% of the copy bandwidth by the median and by the fastest call."""
    if entry is None or entry["results"].get(impl, {}).get("status") != "ok":
        return None
    r = entry["results"][impl]
    return r["pct_copy"], 100 * entry["min_bytes"] / r["time"]["min_s"] / 1e9 / record["copy"]["gbps"]


def _train_ratio(record: dict[str, Any] | None, loop: str, baseline: str) -> Pair | None:
    """samples/s of ``loop`` over ``baseline`` (MLP, batch 128) by median epochs and by best epochs."""
    for entry in (record or {}).get("training", {}).get("cases", []):
        if entry["model"] == "mlp" and entry["batch"] == 128:
            a, b = entry["results"].get(loop, {}), entry["results"].get(baseline, {})
            if a.get("status") == "ok" and b.get("status") == "ok":
                best = lambda r: r["images"] / min(r["epoch_s"])  # noqa: E731
                return a["samples_per_s"] / b["samples_per_s"], best(a) / best(b)
    return None


def _target_row(
    name: str, values: Pair | None, goal: float, unit: str, where: str, *, at_most: bool = False
) -> list[str]:
    """``met`` when the figure meets the goal (at least ``goal``, or at most with ``at_most``) by
    medians and by the fastest calls; ``not met`` when neither does; otherwise inconclusive (load
    from other processes moved the medians)."""
    if values is None:
        return [name, "not measured", ""]
    fmt = (lambda v: f"{v:.1f}%") if unit == "%" else (lambda v: f"{v:.2f}x")
    median, best = values
    shown = f"{fmt(median)} (fastest: {fmt(best)}; {where})"
    meets = (lambda v: v <= goal) if at_most else (lambda v: v >= goal)
    if meets(median) and meets(best):
        status = "met"
    elif not meets(median) and not meets(best):
        status = "**not met**"
    else:
        status = "inconclusive: the median and the fastest disagree (machine load)"
    return [name, shown, status]


def _section_pair(section: dict[str, Any] | None, key: str) -> Pair | None:
    """(median, fastest) of a step speed-up or a host-time ratio."""
    value = (section or {}).get(key)
    return None if value is None else (value["median"], value["min"])


def target_rows(records: dict[str, tuple[Path, dict[str, Any]]]) -> list[list[str]]:
    """The issues' targets with the latest unlabelled CPU and GPU records' figures (the newest record of
    each device type when several machines have records)."""
    plain = [r for _, r in records.values() if not r.get("label")]  # labelled runs are variants
    plain.sort(key=lambda r: r["date"], reverse=True)
    cpu = next((r for r in plain if r["machine"]["device"]["type"] == "cpu"), None)
    gpu = next((r for r in plain if r["machine"]["device"]["type"] == "cuda"), None)
    rows = []
    kind = cpu["machine"]["device"]["kind"] if cpu else ""
    head = _ops_entry(cpu, HEADLINE.id) if cpu else None
    where = f"{HEADLINE.id}, {kind}" if cpu else ""
    for goal, baseline in ((1.2, "compile"), (1.5, "eager-best"), (3.0, "eager-seed")):
        value, _ = _ratio(head, "fastvae", (baseline,))
        name = f"CPU: vae_loss fwd+bwd 4,096 x 784 fp32 >= {goal}x {baseline}"
        rows.append(_target_row(name, value, goal, "x", where))
    batch128 = "vae_loss fwd+bwd 128x784 D=20 fp32 float"
    entry = _ops_entry(cpu, batch128) if cpu else None
    for goal, baseline in ((1.5, "eager-best"), (1.0, "compile")):
        value, _ = _ratio(entry, "fastvae", (baseline,))
        name = f"CPU: vae_loss fwd+bwd 128 x 784 fp32 >= {goal}x {baseline}"
        rows.append(_target_row(name, value, goal, "x", f"{batch128}, {kind}"))
    for (B, D), goal in zip(REPARAMETERIZE_SHAPES, (1.5, 2.0, 2.0), strict=True):
        case_id = f"reparameterize fwd+bwd {B} D={D} fp32"
        entry = _ops_entry(cpu, case_id) if cpu else None
        value, which = _ratio(entry, "fastvae", ("eager-seed", "eager-best"))
        name = f"CPU: reparameterize fwd+bwd {B:,} x {D} >= {goal}x eager"
        rows.append(_target_row(name, value, goal, "x", f"vs {which}, {kind}"))
    host = (cpu or {}).get("host") if (cpu or {}).get("host", {}).get("status") == "ok" else None
    for op, goal in (("vae_loss", 0.6), ("reparameterize", 0.8)):
        name = f"CUDA code path, host time of {op} fwd+bwd <= {goal}x the eager expression's at B=1"
        value = _section_pair((host or {}).get("ratios"), op)
        rows.append(_target_row(name, value, goal, "x", "stub Triton driver, 1 thread", at_most=True))
    step = (cpu or {}).get("step", {}).get("speedup")
    for mode, goal in (("eager", 1.05), ("compile", 1.0)):
        name = f"CPU: pytorch/examples step, batch 128, README's change >= {goal}x unchanged ({mode})"
        rows.append(_target_row(name, _section_pair(step, mode), goal, "x", f"{kind}"))
    name = "CPU: training epoch, batch 128 >= 1.3x pytorch/examples"
    rows.append(_target_row(name, _train_ratio(cpu, "trainer", "examples"), 1.3, "x", "MLP, Trainer()"))

    large = _largest_vae_case(gpu) if gpu else None
    where = large["case"]["id"] if large else ""
    name = "GPU: vae_loss fwd+bwd >= 85% of copy bandwidth (large)"
    rows.append(_target_row(name, _pct_copy(gpu, large, "fastvae") if gpu else None, 85.0, "%", where))
    compiled = tuple(n for n in (large or {}).get("results", {}) if n.startswith("compile"))
    value, which = _ratio(large, "fastvae", compiled)
    rows.append(
        _target_row("GPU: vae_loss fwd+bwd >= 1.4x torch.compile", value, 1.4, "x", f"{where} vs {which}")
    )
    value, _ = _ratio(large, "fastvae", ("eager-best",))
    rows.append(_target_row("GPU: vae_loss fwd+bwd >= 3x eager-best", value, 3.0, "x", where))
    for goal, baseline, label in (
        (20.0, "examples", "pytorch/examples"),
        (1.5, "plain-compile", "fastvae-less torch.compile"),
    ):
        value = _train_ratio(gpu, "trainer", baseline)
        rows.append(_target_row(f"GPU: training epoch >= {goal}x {label}", value, goal, "x", "MLP batch 128"))
    return rows


# ----------------------------------------------------------------------------------------------
# Chart
# ----------------------------------------------------------------------------------------------


def speedup_chart(record: dict[str, Any], path: Path) -> Path | None:
    """fastvae's speed-up over each baseline (left) and achieved GB/s (right) vs size, vae_loss fwd+bwd."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = [
        e
        for e in record.get("ops", [])
        if "results" in e
        and e["case"]["op"] == "vae_loss"
        and e["case"]["mode"] == "fwd+bwd"
        and e["case"]["dtype"] == "fp32"
        and e["case"]["target"] == "float"
        and e["case"]["latent"] == 20
    ]
    if not entries:
        return None
    features = sorted({e["case"]["features"] for e in entries})
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    markers = dict(zip(features, "os^", strict=False))
    colors = {"eager-seed": "tab:red", "eager-best": "tab:orange", "compile": "tab:green"}
    impl_colors = {"fastvae": "tab:blue", **colors, "fastvae[torch]": "tab:purple"}
    for F in features:
        series = sorted((e for e in entries if e["case"]["features"] == F), key=lambda e: e["min_bytes"])
        for b, color in colors.items():
            pts = [
                (e["min_bytes"] / 1e6, e["results"]["fastvae"]["speedup"][b])
                for e in series
                if e["results"].get("fastvae", {}).get("speedup", {}).get(b)
            ]
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax1.plot(xs, ys, marker=markers[F], color=color, label=f"vs {b}, F={F}")
        for impl, color in impl_colors.items():
            pts = [
                (e["min_bytes"] / 1e6, e["results"][impl]["gbps"])
                for e in series
                if e["results"].get(impl, {}).get("status") == "ok"
            ]
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax2.plot(xs, ys, marker=markers[F], color=color, label=f"{impl}, F={F}")
    ax1.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax2.axhline(record["copy"]["gbps"], color="black", lw=1, ls=":", label="copy ceiling")
    for ax in (ax1, ax2):
        ax.set_xscale("log")
        ax.set_xlabel("minimum bytes moved (MB)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    from matplotlib.ticker import FuncFormatter, LogLocator

    for ax in (ax1, ax2):
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    ax1.set_ylabel("speed-up of fastvae (x)")
    ax1.set_title("vae_loss fwd+bwd, fp32, D=20: fastvae speed-up")
    ax2.set_ylabel("achieved GB/s (minimum bytes / median time)")
    ax2.set_title("achieved bandwidth")
    dev = record["machine"]["device"]
    fig.suptitle(f"{dev['name']} ({dev['kind']}), {record['mode']} run {record['date']}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------
# README
# ----------------------------------------------------------------------------------------------


def generated_section(records: dict[str, tuple[Path, dict[str, Any]]], readme: Path = README) -> str:
    """The markdown between the README's markers: targets, then per device the tables and chart."""
    parts = [BEGIN, "", "## Targets", ""]
    parts.append(_markdown(["target", "measured", "status"], target_rows(records)))
    parts += ["", "## Latest results", ""]
    if not records:
        parts.append("No results yet: run `python -m bench --quick`.")
    for kind, (path, record) in records.items():
        rel = path.relative_to(readme.parent) if path.is_relative_to(readme.parent) else path
        parts += [f"### {kind}", "", f"Record: [`{rel}`]({rel})"]
        for section, name in record.get("section_records", {}).items():
            srel = rel.parent / name
            parts[-1] += f"; {section}: [`{srel}`]({srel})"
        parts += ["", tables(record), ""]
        chart = path.parent / f"{kind}-speedup.png"
        if chart.exists():
            crel = chart.relative_to(readme.parent) if chart.is_relative_to(readme.parent) else chart
            parts += [f"![fastvae speed-up, {kind}]({crel})", ""]
    parts.append(END)
    return "\n".join(parts)


def update(results: Path = RESULTS, readme: Path = README) -> list[Path]:
    """Regenerate the charts and the README's generated section; returns the files written."""
    records = latest_records(results)
    written = []
    for kind, (path, record) in records.items():
        chart = speedup_chart(record, path.parent / f"{kind}-speedup.png")
        if chart is not None:
            written.append(chart)
    text = readme.read_text() if readme.exists() else ""
    section = generated_section(records, readme)
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    readme.write_text(text)
    written.append(readme)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Regenerate bench/README.md and the charts from the records")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--readme", type=Path, default=README)
    args = parser.parse_args(argv)
    for path in update(args.results, args.readme):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
