"""`orchestrate compare`: which method reaches the target fastest, and with the least memory, read
back from MLflow (the child runs of one sweep invocation).

    report = compare(uri, "hybrid-bbc")          # the latest parent run; or parent_run_id=...
    write_report(report, uri=uri)                # table on stdout; CSV/JSON/PNG to the parent run

Seeds are repeats, not configurations: trials whose params differ only in `seed` form one group.
A group's time-to-quality is a censored median over all its seeds (a seed that never reached the
target counts as +inf, so 1 reached of 3 never looks fast), with min / max and the interquartile
range of the seeds that reached as the spread (the paper runs three seeds). Each method's best
group follows `report.rank_key`: reached share, then training time-to-quality, then the final
metric. Where `full` ran, every number is also a ratio to full fine-tuning's best group: the
paper's "2.1x faster" is train_ttq_vs_full = 0.48, its "50% memory" is memory_vs_full = 0.5.
Where the compared groups trained beside different numbers of other trials, a note says their
times are not comparable.

Plots use matplotlib's Agg canvas directly (no pyplot, no global backend change): PNG for people;
CSV / JSON carry the same numbers for programs. (Over 350 lines: the report, its table and its
four plots; the plots share the report's grouping.)
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
from orchestrator import report as schema

# Per trial and per group of seeds (medians), in table order: the report fields declared
# `compared` (the training time-to-quality first), then the target metric's final value; the
# times are censored medians, and some are also a ratio to full fine-tuning's best group.
STATS = (schema.TIME_TO_QUALITY, *(f.name for f in schema.FIELDS.values() if f.compared and f.name != schema.TIME_TO_QUALITY),
         "final_metric")  # the training time-to-quality first wherever it is declared: its spread follows it
TIMES = (schema.TIME_TO_QUALITY, "time_to_quality_s", "samples_to_quality")  # censored: +inf when not reached
RATIOS = {schema.TIME_TO_QUALITY: "train_ttq_vs_full", "time_to_quality_s": "wall_ttq_vs_full",
          "peak_memory_mb": "memory_vs_full", "final_metric": "metric_vs_full", "trainable_params": "params_vs_full"}


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
    row = {"run_id": run.info.run_id, "name": run.info.run_name, "method": run.data.params.get("method", "?"),
           "status": tags.get("status", run.info.status), "stop_reason": tags.get("stop_reason", ""),
           "seed": run.data.params.get("seed"), "params": dict(run.data.params), "failed": run.info.status == "FAILED",
           "elapsed_s": schema.finite(m.get("elapsed_s"))}
    row.update({k: schema.finite(m.get(k)) for k in STATS if k != "final_metric"})
    row["final_metric"] = schema.finite(metric)
    return row


def _curve(client, run_id: str, metric: str) -> dict[str, list]:
    """The metric against the training clock (method_init_s + train_s + eval_s), the wall clock
    (elapsed_s) and the samples consumed, joined on the report's step."""
    def history(key):
        return {h.step: h.value for h in client.get_metric_history(run_id, key)}

    wall, samples = history("elapsed_s"), history("samples_seen")
    parts = [history(k) for k in ("method_init_s", "train_s", "eval_s")]
    points = sorted((h.step, sum(p.get(h.step, 0.0) for p in parts), wall[h.step], samples.get(h.step), h.value)
                    for h in client.get_metric_history(run_id, metric) if h.step in wall and schema.finite(h.value) is not None)
    return {key: [p[i] for p in points] for i, key in enumerate(("step", "train_s", "elapsed_s", "samples_seen", metric))}


def retarget(row: dict, curve: dict[str, list], target: dict) -> None:
    """A trial's times to quality for another target value, read from its logged history: the
    first evaluation at or beyond the new target (a trial stopped at the sweep's own target has no
    history past it, so a harder target can only be reached where it ran on)."""
    better = (lambda v: v >= target["value"]) if target["mode"] == "max" else (lambda v: v <= target["value"])
    hit = next((i for i, v in enumerate(curve[target["metric"]]) if better(v)), None)
    for key, series in ((schema.TIME_TO_QUALITY, "train_s"), ("time_to_quality_s", "elapsed_s"),
                        ("samples_to_quality", "samples_seen")):
        row[key] = None if hit is None else curve[series][hit]


def _group(rows: list[dict]) -> dict[str, Any]:
    """One configuration over its seeds. Times are censored medians: a seed that never reached the
    target counts as +inf, so a group that reached in 1 of 3 seeds has an infinite median."""
    ok = [r for r in rows if not r["failed"]]
    reached = [r for r in rows if r[schema.TIME_TO_QUALITY] is not None]

    def median(key):
        vals = [r[key] for r in ok if r[key] is not None]
        return statistics.median(vals) if vals else None

    ttq = sorted(r[schema.TIME_TO_QUALITY] for r in reached)
    q1, q3 = (statistics.quantiles(ttq, n=4, method="inclusive")[::2] if len(ttq) > 1 else (ttq or [None]) * 2)
    out = {"method": rows[0]["method"], "config": re.sub(r"-seed\d+$", "", rows[0]["name"] or ""),
           "params": {k: v for k, v in rows[0]["params"].items() if k != "seed"},
           "seeds": len(rows), "reached": len(reached), "failed": sum(r["failed"] for r in rows),
           "trials": [r["name"] for r in rows],
           "ttq_min": ttq[0] if ttq else None, "ttq_max": ttq[-1] if ttq else None, "ttq_q1": q1, "ttq_q3": q3,
           **{k: median(k) for k in STATS if k not in TIMES}}
    for key in TIMES:
        value = schema.censored_median(r[key] for r in rows)
        out[key] = value if math.isfinite(value) else math.inf
    out["concurrent_trials"] = max((r["concurrent_trials"] or 0 for r in rows), default=0)
    return out


def _rank(g: dict, mode: str) -> tuple:
    return schema.rank_key(g["reached"], g["seeds"], g[schema.TIME_TO_QUALITY], g["final_metric"], mode)


def contention_note(groups: dict[str, dict]) -> str | None:
    """A warning when the compared groups' trials trained beside different numbers of other trials
    on their node: their times measure the machine's sharing, not only the method."""
    levels = {m: int(g.get("concurrent_trials") or 0) for m, g in groups.items()}
    if len(set(levels.values())) <= 1:
        return None
    shown = ", ".join(f"{m} beside {n}" for m, n in sorted(levels.items()))
    return (f"warning: times are not comparable across methods: trials ran beside different numbers of other "
            f"trials on their node ({shown}); rerun with one trial at a time (tune.max_concurrent_trials: 1)")


def budget_note(parent) -> str | None:
    """A warning when the sweep's time budget ended it before every planned trial ran: a method or
    configuration missing from the comparison may only have been waiting for its turn."""
    if parent.data.tags.get("ended_by") != "time_budget":
        return None
    n = int(parent.data.metrics.get("not_run", 0))
    return (f"note: the sweep ended by its time budget (tune.time_budget_s); {n} planned trial(s) never ran "
            f"(named in the sweep's summary.json, not_run), so this compares only what ran")


def compare(uri: str, experiment: str, parent_run_id: str | None = None, target_value: float | None = None) -> dict[str, Any]:
    """Per method: the best configuration, time-to-quality over seeds, memory, quality, size and
    ratios to full fine-tuning; plus every trial, the curves and the hybrid's gate history.
    `target_value` replaces the sweep's target value (same metric): every time to quality is then
    re-read from the trials' logged histories (`retarget`)."""
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
    curves = {t["name"]: {"method": t["method"], **_curve(client, t["run_id"], target["metric"])} for t in trials}
    notes = []
    if target_value is not None and target_value != target["value"]:
        notes.append(f"target changed from the sweep's {target['value']} to {target_value}: times to quality re-read "
                     "from each trial's evaluations (trials that stopped at the sweep's target have no history past it)")
        target["value"] = float(target_value)
        for t in trials:
            retarget(t, curves[t["name"]], target)
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
            g[ratio] = _ratio(g[key], full[key]) if full else None
    methods = dict(sorted(best.items()))
    ranking = sorted(methods, key=lambda m: _rank(methods[m], target["mode"]), reverse=True)  # best first
    layers = {m: found for m, g in methods.items() if (found := _layers(client, g, trials))}
    return {"experiment": experiment, "parent_run_id": parent.info.run_id, "target": target,
            "retargeted": bool(notes), "trials": trials,
            "groups": rows, "methods": methods, "ranking": ranking, "curves": curves, "layers": layers,
            "notes": notes + [n for n in (contention_note(methods), budget_note(parent)) if n]}


def _ratio(x: float | None, full: float | None) -> float | None:
    """x / full; +inf when x never reached the target and full did; None when full never did."""
    if x is None or full is None or not math.isfinite(full) or full == 0:
        return None
    return x / full


def _layers(client, group: dict, trials: list[dict]) -> dict | None:
    """Per-layer diagnostics (layers.json) of the group's first seed that logged them."""
    import mlflow.exceptions

    from orchestrator.tracking import LAYERS_ARTIFACT

    for name in group["trials"]:
        run_id = next(t["run_id"] for t in trials if t["name"] == name)
        with tempfile.TemporaryDirectory() as d:
            try:
                with open(client.download_artifacts(run_id, LAYERS_ARTIFACT, d)) as f:
                    return {"trial": name, **json.load(f)}
            except (mlflow.exceptions.MlflowException, OSError):
                continue
    return None


# ----------------------------------------------------------------------------- the report


def _fmt(x, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}g}" if isinstance(x, float) else str(x)


def table(report: dict) -> str:
    from orchestrator.progress import format_table

    header = ["method", "best config", "reached", "train_ttq_s median [min-max]", "wall_ttq_s", "peak_mb",
              report["target"]["metric"], "trainable", "train_ttq/full", "mem/full"]
    rows = [[m, g["config"], f"{g['reached']}/{g['seeds']}",
             f"{_fmt(g[schema.TIME_TO_QUALITY])} [{_fmt(g['ttq_min'])}-{_fmt(g['ttq_max'])}]" if g["reached"] else "not reached",
             _fmt(g["time_to_quality_s"]), _fmt(g["peak_memory_mb"], 5), _fmt(g["final_metric"]),
             _fmt(g["trainable_params"], 6), _fmt(g["train_ttq_vs_full"], 3), _fmt(g["memory_vs_full"], 3)]
            for m, g in ((m, report["methods"][m]) for m in report.get("ranking", report["methods"]))]
    t = report["target"]
    notes = "".join(f"\n{n}" for n in report.get("notes", []))
    return (f"target {t['metric']} {'>=' if t['mode'] == 'max' else '<='} {t['value']}; best first (share of seeds "
            f"that reached, then time); times are medians over seeds, a seed that never reached counted as inf\n"
            + format_table(rows, header) + notes)


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
    """The target metric against the training clock (left) and the wall clock (right), one line
    per trial, coloured by method."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 5), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, sharey=True)
    colors, metric = _colors(report), report["target"]["metric"]
    for ax, clock, label in zip(axes, ("train_s", "elapsed_s"), ("training time (s): init + steps + evals",
                                                               "wall-clock time (s) since worker start")):
        seen = set()
        for c in report["curves"].values():
            if c.get(clock):
                ax.plot(c[clock], c[metric], marker=".", color=colors[c["method"]],
                        label=None if c["method"] in seen else c["method"], alpha=0.8)
                seen.add(c["method"])
        ax.axhline(report["target"]["value"], color="k", linestyle="--", label="target")
        ax.set(xlabel=label, title=f"{metric} vs {clock.removesuffix('_s').replace('elapsed', 'wall')} time")
    axes[0].set_ylabel(metric)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path)


def pareto_front(points: list[tuple[float, float]], mode: str) -> list[tuple[float, float]]:
    """Points (memory, quality) that no other point beats on both: less memory and better quality."""
    front: list[tuple[float, float]] = []
    for mem, q in sorted(points, key=lambda p: (p[0], -p[1] if mode == "max" else p[1])):
        if not front or (q > front[-1][1] if mode == "max" else q < front[-1][1]):
            front.append((mem, q))
    return front


def plot_pareto(report: dict, path: str) -> None:
    """Final quality against peak memory per finished trial; the front joins the undominated ones."""
    fig, ax = _figure()
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


def plot_layers(method: str, layers: dict, path: str) -> None:
    """Every per-layer series a method reports (layers.json), one heatmap each: layers x steps.
    A series in [0, 1] (the hybrid's gate: its BOFT share) keeps that scale; norms are log10."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(layers["layers"])
    keys = sorted({k for d in layers["layers"].values() for k in d})
    fig = Figure(figsize=(9, len(keys) * max(2.5, 0.3 * len(names) + 1.2)), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(keys), 1, squeeze=False)[:, 0]
    steps = layers["steps"]
    ticks = list(range(0, len(steps), max(1, len(steps) // 10)))
    for ax, key in zip(axes, keys):
        values = [[math.nan if v is None else v for v in layers["layers"][n].get(key, [None] * len(steps))] for n in names]
        flat = [v for row in values for v in row if math.isfinite(v)]
        unit = bool(flat) and min(flat) >= 0 and max(flat) <= 1
        if not unit:
            values = [[math.log10(v) if math.isfinite(v) and v > 0 else math.nan for v in row] for row in values]
        im = ax.imshow(values, aspect="auto", cmap="viridis", interpolation="nearest",
                       **({"vmin": 0, "vmax": 1} if unit else {}))
        ax.set_yticks(range(len(names)), [n if len(n) < 40 else "..." + n[-37:] for n in names], fontsize=6)
        ax.set_xticks(ticks, [str(steps[i]) for i in ticks])
        ax.set(xlabel="step", title=f"{method}: {key} per layer ({layers['trial']})")
        fig.colorbar(im, ax=ax, label=key if unit else f"log10 {key}")
    fig.tight_layout()
    fig.savefig(path)


def write_report(report: dict, out_dir: str, uri: str | None = None, stream=None) -> dict[str, str]:
    """Print the table; write compare.csv / trials.csv / compare.json and the PNGs to out_dir;
    with `uri`, also log them to the sweep's parent run under `report/`. Returns name -> path."""
    os.makedirs(out_dir, exist_ok=True)
    print(table(report), file=stream or sys.stdout, flush=True)
    files = {name: os.path.join(out_dir, name) for name in ("compare.csv", "trials.csv", "compare.json", "curves.png", "pareto.png")}
    columns = ["method", "config", "seeds", "reached", "failed", *STATS[:1], "ttq_min", "ttq_max", "ttq_q1",
               "ttq_q3", *STATS[1:], *RATIOS.values()]
    _csv(files["compare.csv"], columns, list(report["methods"].values()))
    _csv(files["trials.csv"], ["name", "method", "seed", "status", "stop_reason", *STATS, "elapsed_s", "run_id"], report["trials"])
    with open(files["compare.json"], "w") as f:
        json.dump(report, f, indent=2)
    plot_curves(report, files["curves.png"])
    plot_pareto(report, files["pareto.png"])
    for method, layers in report.get("layers", {}).items():
        files[f"layers-{method}.png"] = os.path.join(out_dir, f"layers-{method}.png")
        plot_layers(method, layers, files[f"layers-{method}.png"])
    if uri:
        from mlflow import MlflowClient

        client = MlflowClient(uri)
        # A report for another target than the sweep's goes beside the sweep's own, never over it.
        folder = "report" if not report.get("retargeted") else f"report-target{report['target']['value']:g}"
        for path in files.values():
            client.log_artifact(report["parent_run_id"], path, folder)
    return files


def _csv(path: str, columns: list[str], rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
