"""Every method of a sweep file through the real product (`orchestrate sweep`, then `orchestrate
compare`): time-to-quality on both clocks, counted memory by part, RSS, quality, ratios to full.

    python benchmarks/quality.py                  # search_spaces/compare.yaml as it is: 3 seeds, stop at target
    python benchmarks/quality.py --write          # and record it in BENCHMARKS.md

The sweep runs one trial at a time (the file's pinned cores on this 2-core machine), so no trial's
clock measures another; DeepSpeed's ops are built before the first trial's clock starts. Medians
over seeds are censored (a seed that never reached the target counts as infinite).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.step_time import write_section  # noqa: E402
from orchestrator import tracking  # noqa: E402
from orchestrator.cli import init_ray  # noqa: E402
from orchestrator.compare import compare  # noqa: E402
from orchestrator.spec import load_sweep  # noqa: E402
from orchestrator.sweep import run_sweep  # noqa: E402


def fmt(x, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "not reached"
    return f"{x:.{digits}g}" if isinstance(x, float) else str(x)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--file", default=os.path.join(ROOT, "search_spaces", "compare.yaml"))
    p.add_argument("--write", action="store_true", help="replace this benchmark's section in BENCHMARKS.md")
    args = p.parse_args()

    spec = load_sweep(args.file)
    spec = dataclasses.replace(spec, storage=tempfile.mkdtemp(prefix="quality-"))
    init_ray(None)
    started = time.time()
    run_sweep(spec, quiet=True)
    wall = time.time() - started
    report = compare(tracking.tracking_uri(spec), tracking.experiment_name(spec))
    rows = []
    for method, g in report["methods"].items():
        spread = f"{fmt(g['ttq_min'])}-{fmt(g['ttq_max'])}" if g["reached"] else "-"
        rows.append(
            f"| {method} | {g['reached']}/{g['seeds']} | {fmt(g['train_time_to_quality_s'])} ({spread}) | "
            f"{fmt(g['time_to_quality_s'])} | {fmt(g['samples_to_quality'])} | {fmt(g['peak_memory_mb'], 4)} | "
            f"{fmt(g['memory_weights_mb'], 3)} / {fmt(g['memory_gradients_mb'], 3)} / {fmt(g['memory_optimizer_mb'], 3)} / "
            f"{fmt(g['memory_activations_mb'], 3)} | {fmt(g['rss_peak_mb'], 4)} | {fmt(g['final_metric'])} | "
            f"{fmt(g['train_ttq_vs_full'])} | {fmt(g['wall_ttq_vs_full'])} | {fmt(g['memory_vs_full'])} | "
            f"{g['trainable_params']:,.0f} |")
    t, r = report["target"], spec.resources
    lines = [
        f"### Every method to {t['metric']} >= {t['value']}: {spec.name} ({os.path.relpath(args.file, ROOT)})",
        "",
        f"- command: `python benchmarks/quality.py --write` ({wall / 60:.0f} min on this machine)",
        f"- date: {datetime.date.today()}; 2 CPU cores; `orchestrate sweep` (Ray Tune -> Ray Train, {r.num_workers} "
        f"workers x 1 pinned core, one trial at a time) -> DeepSpeed ZeRO-{spec.deepspeed.zero_stage}, CPU fp32",
        f"- model: all-MiniLM-L6-v2 (bundled), data: {spec.data.name} ({spec.data.max_train_samples} train / "
        f"{spec.data.max_eval_samples} eval, max_length {spec.data.max_length}); batch {spec.train.batch_size}, at most "
        f"{spec.train.max_steps} steps, evaluation every {spec.train.eval_every}; per-method lr from the sweep file; "
        f"seeds {list(spec.tune.seeds)}; each trial stops at the target",
        "- train TTQ: method init + steps + evaluations until the target (median over seeds, a seed that never "
        "reached counted as infinite; range over the seeds that reached); wall TTQ: from worker start, incl. "
        "model load and DeepSpeed engine; memory: counted tensors per rank (weights / gradients / optimizer / "
        "peak saved activations, MB), max over ranks; RSS: the worker process",
        "",
        "| method | reached | train TTQ s (range) | wall TTQ s | samples to target | counted MB | weights / grads / "
        "optimizer / activations MB | RSS MB | final metric | train TTQ / full | wall TTQ / full | memory / full | "
        "trainable params |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
    ]
    lines += [f"\n{n}" for n in report.get("notes", [])]
    text = "\n".join(lines)
    print(text)
    if args.write:
        write_section(os.path.join(ROOT, "BENCHMARKS.md"), f"quality {spec.name}", text)


if __name__ == "__main__":
    main()
