"""The study: the paper's headline claims checked with the product itself, on real models and data.

    python benchmarks/study.py             # every file of search_spaces/study/ not yet done, then STUDY.md
    python benchmarks/study.py --render    # only rewrite STUDY.md (and its plots) from the finished sweeps

Each study file goes through `orchestrate sweep FILE` (or `orchestrate sweep FILE --resume` when an
earlier run of it was interrupted), which ends by writing the comparison that `orchestrate compare
FILE` writes (<storage>/<sweep>/report/compare.json and its PNGs). This script only runs those
commands one after the other and puts their reports into STUDY.md, with one line per claim of the
paper (the hybrid against full fine-tuning), judged by the rules in CLAIMS.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from orchestrator.cores import cores_wanted  # noqa: E402
from orchestrator.spec import load_sweep  # noqa: E402
from orchestrator.sweep import SUMMARY_FILE, storage_path  # noqa: E402

STUDY = sorted(glob.glob(os.path.join(ROOT, "search_spaces", "study", "*.yaml")))
PLOTS = os.path.join(ROOT, "benchmarks", "study")
OUT = os.path.join(ROOT, "STUDY.md")
WALL_FILE = "study_wall.json"  # beside summary.json: the sweep's wall time over all its invocations

# The paper's claims for the hybrid against full fine-tuning, and what counts as replicated here.
CLAIMS = {
    "time": "2.1x less training time: replicated when the hybrid's median training time to quality is "
            "at most 1/2.0 of full fine-tuning's (2.1x with 5% slack)",
    "memory": "~50% less peak memory: replicated when the hybrid's counted peak memory is at most 0.55x full's",
    "quality": "near-full quality: replicated when the hybrid reaches the target on as many seeds as full "
               "fine-tuning and its median final metric is within 0.02 of full's",
}


def folder(spec) -> str:
    return os.path.join(storage_path(spec), spec.name)


def run(path: str) -> None:
    """`orchestrate sweep` for one file unless it finished; resumes an interrupted one."""
    spec = load_sweep(path)
    out = folder(spec)
    if os.path.exists(os.path.join(out, SUMMARY_FILE)) and os.path.exists(os.path.join(out, "report", "compare.json")):
        print(f"{spec.name}: done, kept ({out})")
        return
    started = glob.glob(os.path.join(out, "experiment_state-*.json"))
    cmd = ["orchestrate", "sweep", path, *(["--resume"] if started else [])]
    print(f"{spec.name}: {' '.join(cmd)}", flush=True)
    t0 = time.time()
    done = subprocess.run(cmd, cwd=ROOT)
    wall_path = os.path.join(out, WALL_FILE)
    previous = json.load(open(wall_path))["wall_s"] if os.path.exists(wall_path) else 0.0
    os.makedirs(out, exist_ok=True)
    with open(wall_path, "w") as f:
        json.dump({"wall_s": previous + time.time() - t0, "invocations": cmd}, f)
    if done.returncode != 0:
        sys.exit(f"{spec.name}: orchestrate sweep exited {done.returncode}; run this script again to resume")


def fmt(x, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "not reached"
    return f"{x:.{digits}g}" if isinstance(x, float) else f"{x:,}" if isinstance(x, int) else str(x)


def claims(m: dict) -> list[str]:
    """One line per claim from a part's per-method report (the hybrid against full)."""
    full, hybrid = m.get("full"), m.get("hybrid")
    if not full or not hybrid:
        return ["- claims: not judged (the part lacks full fine-tuning or the hybrid)"]
    speedup = 1 / hybrid["train_ttq_vs_full"] if hybrid["train_ttq_vs_full"] else 0.0
    reached = f"reached {hybrid['reached']}/{hybrid['seeds']} against full's {full['reached']}/{full['seeds']}"
    if not math.isfinite(full["train_time_to_quality_s"]):
        time_line = f"not judged (full fine-tuning's median never reached the target; {reached})"
    elif not math.isfinite(hybrid["train_time_to_quality_s"]):
        time_line = f"**not replicated** (the hybrid's median never reached the target; {reached})"
    else:
        time_line = (f"**{'replicated' if speedup >= 2.0 else 'not replicated'}** (measured {speedup:.2f}x: "
                     f"{fmt(hybrid['train_time_to_quality_s'])} s against {fmt(full['train_time_to_quality_s'])} s)")
    memory = hybrid["memory_vs_full"]
    memory_line = (f"**{'replicated' if memory <= 0.55 else 'not replicated'}** (measured {memory:.2f}x full's "
                   f"counted peak, {1 - memory:.0%} less: {fmt(hybrid['peak_memory_mb'], 4)} MB against "
                   f"{fmt(full['peak_memory_mb'], 4)} MB)")
    gap = hybrid["final_metric"] - full["final_metric"]
    ok = hybrid["reached"] >= full["reached"] and gap >= -0.02
    quality_line = (f"**{'replicated' if ok else 'not replicated'}** (final metric {fmt(hybrid['final_metric'])} "
                    f"against {fmt(full['final_metric'])}, {gap:+.3f}; {reached})")
    return [f"- \"2.1x less time\": {time_line}", f"- \"~50% memory\": {memory_line}",
            f"- \"near-full quality\": {quality_line}"]


def part(path: str) -> list[str]:
    spec = load_sweep(path)
    out = folder(spec)
    report = json.load(open(os.path.join(out, "report", "compare.json")))
    wall = json.load(open(os.path.join(out, WALL_FILE)))["wall_s"] if os.path.exists(os.path.join(out, WALL_FILE)) else None
    os.makedirs(PLOTS, exist_ok=True)
    plots = {}
    for kind in ("curves", "pareto"):
        src = os.path.join(out, "report", f"{kind}.png")
        if os.path.exists(src):
            plots[kind] = os.path.join(PLOTS, f"{spec.name}-{kind}.png")
            shutil.copyfile(src, plots[kind])
    t, d, tr, r = report["target"], spec.data, spec.train, spec.resources
    m = report["methods"]
    rows = []
    for method in report.get("ranking") or sorted(m):
        g = m[method]
        spread = f"{fmt(g['ttq_min'])}-{fmt(g['ttq_max'])}" if g["ttq_min"] is not None else "-"
        rows.append(f"| {method} | {g['reached']}/{g['seeds']} | {fmt(g['train_time_to_quality_s'])} ({spread}) | "
                    f"{fmt(g['time_to_quality_s'])} | {fmt(g['peak_memory_mb'], 4)} | {fmt(g['final_metric'])} | "
                    f"{fmt(g['train_ttq_vs_full'])} | {fmt(g['wall_ttq_vs_full'])} | {fmt(g['memory_vs_full'])} | "
                    f"{fmt(g['metric_vs_full'])} | {int(g['trainable_params']):,} |")
    rel = os.path.relpath(path, ROOT)
    lines = [
        f"### {spec.name}: {spec.model.name_or_path or 'all-MiniLM-L6-v2 (bundled)'} on {d.name} ({rel})",
        "",
        f"- commands: `orchestrate sweep {rel}` then `orchestrate compare {rel}`"
        + (f"; the sweep took {wall / 60:.1f} min" if wall else ""),
        f"- data: {d.max_train_samples} train / {d.max_eval_samples} eval examples, max_length {d.max_length}; "
        f"batch {tr.batch_size}, at most {tr.max_steps} steps, an evaluation every {tr.eval_every}; target "
        f"{t['metric']} {'>=' if t['mode'] == 'max' else '<='} {t['value']}; seeds {list(spec.tune.seeds)}; "
        f"{r.num_workers} worker(s) x {cores_wanted(r.cpus_per_worker)} pinned core(s), DeepSpeed "
        f"ZeRO-{spec.deepspeed.zero_stage}{' (one rank: nothing is sharded)' if r.num_workers == 1 else ''}, "
        f"one trial at a time",
        "",
        "| method | reached | train TTQ s, median (range) | wall TTQ s | counted peak MB | final metric | "
        "train TTQ / full | wall TTQ / full | memory / full | metric / full | trainable params |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        *claims(m),
        "",
        *[f"![{kind}](benchmarks/study/{os.path.basename(p)})" for kind, p in plots.items()],
    ]
    lines += [f"\n{n}" for n in report.get("notes", [])]
    return lines


def render(paths: list[str]) -> str:
    import deepspeed
    import ray
    import torch

    with open("/proc/meminfo") as f:
        mem_gib = int(f.readline().split()[1]) / 2**20
    head = [
        "# The study: the paper's headline claims, checked with this tool",
        "",
        "Qi, Dai and Huang (2025) report that their BOFT + LoRA-GA hybrid \"approaches the quality of full",
        "fine-tuning while reducing training time by about 2.1x and peak memory by nearly 50%\" (three runs",
        "per task). Here every method runs at one reasonable setting, three seeds, the same target and",
        "budget, on real weights and data that install offline, through `orchestrate sweep` and",
        "`orchestrate compare` only. Written by `python benchmarks/study.py` (see its docstring).",
        "",
        f"- machine: {os.cpu_count()} CPU cores ({platform.machine()}), {mem_gib:.0f} GiB, no GPU; torch "
        f"{torch.__version__}, Ray {ray.__version__}, DeepSpeed {deepspeed.__version__}; date {datetime.date.today()}",
        "- train TTQ: the trial's training clock (method init + steps + evaluations) at the first evaluation",
        "  that meets the target; median over the 3 seeds, a seed that never reached counted as infinite;",
        "  range over the seeds that reached. Wall TTQ: from worker start (model load, DeepSpeed engine).",
        "- counted peak memory: the tensors a rank holds (weights + gradients + optimizer state + the peak",
        "  of activations saved for backward), max over ranks. Final metric: the last evaluation; trials",
        "  stop at the target, so it is the first evaluation past it for a trial that reached.",
        "",
    ]
    body = []
    for path in paths:
        body += part(path) + [""]
    return "\n".join(head + body).rstrip() + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--render", action="store_true", help="only rewrite STUDY.md from the finished sweeps")
    p.add_argument("files", nargs="*", default=STUDY, help="study files (default: search_spaces/study/*.yaml)")
    args = p.parse_args()
    if not args.render:
        for path in args.files:
            run(path)
    text = render(args.files)
    marker = "<!-- commentary -->"  # what the numbers say, written by hand below the marker, is kept
    old = open(OUT).read() if os.path.exists(OUT) else ""
    if marker in old:
        text += "\n" + marker + old.split(marker, 1)[1]
    with open(OUT, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
