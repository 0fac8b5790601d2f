"""`orchestrate compare`: which method reaches the target fastest, and with the least memory, read
back from MLflow (the child runs of one sweep invocation).

    report = compare(uri, "hybrid-bbc")          # the latest parent run; or parent_run_id=...
    write_report(report, uri=uri)                # table on stdout; CSV/JSON/PNG to the parent run

Seeds are repeats, not configurations: trials whose params differ only in `seed` form one group,
and a group's time-to-quality is the median over the seeds that reached the target, with min /
max and the interquartile range as the spread (the paper runs three seeds). Each method's best
group reaches the target in the most seeds, then soonest, then with the best final metric. Where
`full` ran, every number is also given as a ratio to full fine-tuning's best group: the paper's
"2.1x faster" is ttq_vs_full = 0.48, its "50% memory" is memory_vs_full = 0.5.

Plots use matplotlib's Agg canvas directly (no pyplot, no global backend change): PNG for people;
CSV / JSON carry the same numbers for programs.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import statistics
import sys
import tempfile
from typing import Any

from methods.config import ConfigError

STATS = ("time_to_quality_s", "peak_memory_mb", "final_metric", "trainable_params")
RATIOS = {"time_to_quality_s": "ttq_vs_full", "peak_memory_mb": "memory_vs_full",
          "final_metric": "metric_vs_full", "trainable_params": "params_vs_full"}


def _num(x) -> float | None:
    """A finite number or None: MLflow stores a diverged trial's +-inf as +-1.8e308."""
    return float(x) if x is not None and abs(float(x)) < 1e300 else None


def _parent_run(client, experiment_id: str, parent_run_id: str | None):
    if parent_run_id:
        return client.get_run(parent_run_id)
    runs = client.search_runs([experiment_id], "tags.orchestrator.kind = 'sweep'", order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        raise ConfigError("no sweep (parent) run in this experiment yet")
    return runs[0]


def _trial_row(client, run, target: dict) -> dict[str, Any]:
    m, tags = run.data.metrics, run.data.tags
    metric = m.get("final_metric", m.get(target["metric"]))
    return {"run_id": run.info.run_id, "name": run.info.run_name, "method": run.data.params.get("method", "?"),
            "status": tags.get("status", run.info.status), "stop_reason": tags.get("stop_reason", ""),
            "seed": run.data.params.get("seed"), "params": dict(run.data.params),
            "time_to_quality_s": _num(m.get("time_to_quality_s")), "peak_memory_mb": _num(m.get("peak_memory_mb")),
            "final_metric": _num(metric), "trainable_params": _num(m.get("trainable_params")),
            "elapsed_s": _num(m.get("elapsed_s")), "failed": run.info.status == "FAILED"}


def _curve(client, run_id: str, metric: str) -> dict[str, list]:
    """The metric against wall-clock time (elapsed_s), joined on the report's step."""
    clock = {h.step: h.value for h in client.get_metric_history(run_id, "elapsed_s")}
    points = sorted((clock[h.step], h.value) for h in client.get_metric_history(run_id, metric)
                    if h.step in clock and _num(h.value) is not None)
    return {"elapsed_s": [p[0] for p in points], metric: [p[1] for p in points]}


def _group(rows: list[dict]) -> dict[str, Any]:
    """One configuration over its seeds."""
    ttq = sorted(r["time_to_quality_s"] for r in rows if r["time_to_quality_s"] is not None)
    ok = [r for r in rows if not r["failed"]]

    def median(key):
        vals = [r[key] for r in ok if r[key] is not None]
        return statistics.median(vals) if vals else None

    q1, q3 = (statistics.quantiles(ttq, n=4, method="inclusive")[::2] if len(ttq) > 1 else (ttq or [None]) * 2)
    return {"method": rows[0]["method"], "config": re.sub(r"-seed\d+$", "", rows[0]["name"] or ""),
            "params": {k: v for k, v in rows[0]["params"].items() if k != "seed"},
            "seeds": len(rows), "reached": len(ttq), "failed": sum(r["failed"] for r in rows),
            "trials": [r["name"] for r in rows],
            "time_to_quality_s": statistics.median(ttq) if ttq else None, "ttq_min": ttq[0] if ttq else None,
            "ttq_max": ttq[-1] if ttq else None, "ttq_q1": q1, "ttq_q3": q3,
            **{k: median(k) for k in STATS[1:]}}


def _rank(g: dict, mode: str) -> tuple:
    quality = (g["final_metric"] if mode == "max" else -g["final_metric"]) if g["final_metric"] is not None else -math.inf
    return (g["reached"] / g["seeds"], -(g["time_to_quality_s"] or 0), quality)


def compare(uri: str, experiment: str, parent_run_id: str | None = None) -> dict[str, Any]:
    """Per method: the best configuration, time-to-quality over seeds, memory, quality, size and
    ratios to full fine-tuning; plus every trial, the curves and the hybrid's gate history."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ConfigError(f"experiment {experiment!r}: not found at {uri}")
    parent = _parent_run(client, exp.experiment_id, parent_run_id)
    p = parent.data.params
    target = {"metric": p["target_metric"], "mode": p.get("target_mode", "max"), "value": float(p["target_value"])}
    runs = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'", max_results=5000)
    trials = sorted((_trial_row(client, r, target) for r in runs), key=lambda r: r["name"] or "")
    groups: dict[tuple, list[dict]] = {}
    for t in trials:
        key = (t["method"], tuple(sorted((k, v) for k, v in t["params"].items() if k != "seed")))
        groups.setdefault(key, []).append(t)
    rows = [_group(g) for g in groups.values()]
    best: dict[str, dict] = {}
    for g in rows:
        if g["method"] not in best or _rank(g, target["mode"]) > _rank(best[g["method"]], target["mode"]):
            best[g["method"]] = g
    full = best.get("full")
    for g in best.values():
        for key, ratio in RATIOS.items():
            g[ratio] = g[key] / full[key] if full and g[key] is not None and full[key] else None
    curves = {t["name"]: {"method": t["method"], **_curve(client, t["run_id"], target["metric"])} for t in trials}
    return {"experiment": experiment, "parent_run_id": parent.info.run_id, "target": target, "trials": trials,
            "groups": rows, "methods": dict(sorted(best.items())), "curves": curves,
            "gates": _gates(client, best.get("hybrid"), trials)}


def _gates(client, group: dict | None, trials: list[dict]) -> dict | None:
    """gates.json of the best hybrid configuration's first seed that logged one."""
    import mlflow.exceptions

    for name in (group or {}).get("trials", []):
        run_id = next(t["run_id"] for t in trials if t["name"] == name)
        with tempfile.TemporaryDirectory() as d:
            try:
                with open(client.download_artifacts(run_id, "gates.json", d)) as f:
                    return {"trial": name, **json.load(f)}
            except (mlflow.exceptions.MlflowException, OSError):
                continue
    return None


# ----------------------------------------------------------------------------- the report


def _fmt(x, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}g}" if isinstance(x, float) else str(x)


def table(report: dict) -> str:
    from orchestrator.progress import format_table

    header = ["method", "best config", "reached", "ttq_s median [min-max]", "peak_mb", report["target"]["metric"],
              "trainable", "ttq/full", "mem/full"]
    rows = [[m, g["config"], f"{g['reached']}/{g['seeds']}",
             f"{_fmt(g['time_to_quality_s'])} [{_fmt(g['ttq_min'])}-{_fmt(g['ttq_max'])}]" if g["reached"] else "-",
             _fmt(g["peak_memory_mb"], 5), _fmt(g["final_metric"]), _fmt(g["trainable_params"], 6),
             _fmt(g["ttq_vs_full"], 3), _fmt(g["memory_vs_full"], 3)] for m, g in report["methods"].items()]
    t = report["target"]
    return f"target {t['metric']} {'>=' if t['mode'] == 'max' else '<='} {t['value']}\n" + format_table(rows, header)


def _figure(size=(8, 5)):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=100)
    FigureCanvasAgg(fig)
    return fig, fig.subplots()


def _colors(report: dict) -> dict[str, Any]:
    from matplotlib import colormaps

    methods = sorted({t["method"] for t in report["trials"]})
    return {m: colormaps["tab10"](i % 10) for i, m in enumerate(methods)}


def plot_curves(report: dict, path: str) -> None:
    """The target metric against wall-clock time, one line per trial, coloured by method."""
    fig, ax = _figure()
    colors, metric, seen = _colors(report), report["target"]["metric"], set()
    for name, c in report["curves"].items():
        if c["elapsed_s"]:
            ax.plot(c["elapsed_s"], c[metric], marker=".", color=colors[c["method"]],
                    label=None if c["method"] in seen else c["method"], alpha=0.8)
            seen.add(c["method"])
    ax.axhline(report["target"]["value"], color="k", linestyle="--", label="target")
    ax.set(xlabel="wall-clock time (s)", ylabel=metric, title=f"{metric} vs time per method")
    ax.legend()
    fig.savefig(path)


def pareto_front(points: list[tuple[float, float]], mode: str) -> list[tuple[float, float]]:
    """Points (memory, quality) that no other point beats on both: less memory and better quality."""
    front: list[tuple[float, float]] = []
    for mem, q in sorted(points, key=lambda p: (p[0], -p[1] if mode == "max" else p[1])):
        if not front or (q > front[-1][1] if mode == "max" else q < front[-1][1]):
            front.append((mem, q))
    return front


def plot_pareto(report: dict, path: str) -> None:
    fig, ax = _figure()
    """Final quality against peak memory per finished trial; the front joins the undominated ones."""
    ok = [t for t in report["trials"] if not t["failed"] and None not in (t["peak_memory_mb"], t["final_metric"])]
    colors = _colors(report)
    for m in sorted({t["method"] for t in ok}):
        pts = [t for t in ok if t["method"] == m]
        ax.scatter([t["peak_memory_mb"] for t in pts], [t["final_metric"] for t in pts], color=colors[m], label=m)
    front = pareto_front([(t["peak_memory_mb"], t["final_metric"]) for t in ok], report["target"]["mode"])
    if front:
        ax.plot([p[0] for p in front], [p[1] for p in front], "k-", drawstyle="steps-post", marker="o",
                markerfacecolor="none", markersize=12, label="Pareto front")
    ax.axhline(report["target"]["value"], color="grey", linestyle="--", label="target")
    ax.set(xlabel="peak memory (MB)", ylabel=report["target"]["metric"], title="quality vs peak memory")
    ax.legend()
    fig.savefig(path)


def plot_gates(gates: dict, path: str) -> None:
    """The hybrid's gate lambda (BOFT share of each layer) over the reports: layers x steps."""
    layers = list(gates["layers"])
    values = [[math.nan if v is None else v for v in gates["layers"][k]] for k in layers]
    fig, ax = _figure((9, max(3, 0.35 * len(layers) + 1.5)))
    im = ax.imshow(values, aspect="auto", vmin=0, vmax=1, cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(layers)), [k if len(k) < 40 else "..." + k[-37:] for k in layers], fontsize=7)
    step_ticks = range(0, len(gates["steps"]), max(1, len(gates["steps"]) // 10))
    ax.set_xticks(list(step_ticks), [str(gates["steps"][i]) for i in step_ticks])
    ax.set(xlabel="step", title=f"hybrid gate lambda per layer ({gates['trial']})")
    fig.colorbar(im, ax=ax, label="lambda (BOFT share)")
    fig.tight_layout()
    fig.savefig(path)


def write_report(report: dict, out_dir: str, uri: str | None = None, stream=None) -> dict[str, str]:
    """Print the table; write compare.csv / trials.csv / compare.json and the PNGs to out_dir;
    with `uri`, also log them to the sweep's parent run under `report/`. Returns name -> path."""
    os.makedirs(out_dir, exist_ok=True)
    print(table(report), file=stream or sys.stdout, flush=True)
    files = {name: os.path.join(out_dir, name) for name in ("compare.csv", "trials.csv", "compare.json", "curves.png", "pareto.png")}
    columns = ["method", "config", "seeds", "reached", "failed", "time_to_quality_s", "ttq_min", "ttq_max", "ttq_q1",
               "ttq_q3", *STATS[1:], *RATIOS.values()]
    _csv(files["compare.csv"], columns, list(report["methods"].values()))
    _csv(files["trials.csv"], ["name", "method", "seed", "status", "stop_reason", *STATS, "elapsed_s", "run_id"], report["trials"])
    with open(files["compare.json"], "w") as f:
        json.dump(report, f, indent=2)
    plot_curves(report, files["curves.png"])
    plot_pareto(report, files["pareto.png"])
    if report.get("gates"):
        files["gates.png"] = os.path.join(out_dir, "gates.png")
        plot_gates(report["gates"], files["gates.png"])
    if uri:
        from mlflow import MlflowClient

        client = MlflowClient(uri)
        for path in files.values():
            client.log_artifact(report["parent_run_id"], path, "report")
    return files


def _csv(path: str, columns: list[str], rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
