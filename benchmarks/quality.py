"""Quality after the same number of steps, per method, through the real orchestrator path
(Ray Tune -> Ray Train workers -> DeepSpeed) on a real pretrained model and real data.

    python benchmarks/quality.py                      # search_spaces/compare.yaml, seed 0, 60 steps
    python benchmarks/quality.py --steps 100 --write  # and record it in BENCHMARKS.md

Every method trains the same number of steps (no early stop at the target), and we record the
final eval loss and accuracy, wall time, peak memory, trainable parameters, and the gate values the
hybrid settled on per layer. One seed: a ranking, not a significance test.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.step_time import write_section  # noqa: E402
from orchestrator.cli import init_ray  # noqa: E402
from orchestrator.spec import load_sweep  # noqa: E402
from orchestrator.sweep import run_sweep  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--file", default=os.path.join(ROOT, "search_spaces", "compare.yaml"))
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--write", action="store_true", help="replace this benchmark's section in BENCHMARKS.md")
    args = p.parse_args()

    spec = load_sweep(args.file)
    r = dataclasses.replace
    spec = r(spec, storage=tempfile.mkdtemp(prefix="quality-"),
             train=r(spec.train, max_steps=args.steps, eval_every=args.eval_every, stop_at_target=False),
             tune=r(spec.tune, seeds=(0,), num_samples=1, scheduler="fifo"))
    init_ray(None)
    results, summary = run_sweep(spec, quiet=True)
    rows, gates = [], {}
    for res in results:
        m = res.metrics or {}
        method = res.config["run"]["trial"]["method"]["name"]
        if res.error is not None:
            rows.append(f"| {method} | error: {str(res.error).splitlines()[0][:80]} | | | | | |")
            continue
        rows.append(f"| {method} | {m.get('step')} | {m.get('eval_loss', float('nan')):.4f} | "
                    f"{m.get('accuracy', float('nan')):.4f} | {m.get('elapsed_s', 0):.1f} | "
                    f"{m.get('peak_memory_mb', 0):.0f} | {m.get('trainable_params', 0):,} |")
        gates.update(m.get("gates") or {})
    rows.sort()
    lines = [
        f"### Quality after {args.steps} steps: {spec.name} ({os.path.relpath(args.file, ROOT)})",
        "",
        f"- command: `python benchmarks/quality.py --steps {args.steps} --eval-every {args.eval_every} --write`",
        f"- date: {datetime.date.today()}; Ray Tune -> Ray Train ({spec.resources.num_workers} workers x "
        f"{spec.resources.cpus_per_worker} CPU) -> DeepSpeed ZeRO-{spec.deepspeed.zero_stage}, CPU fp32",
        f"- model: all-MiniLM-L6-v2 (bundled), data: {spec.data.name} ({spec.data.max_train_samples} train / "
        f"{spec.data.max_eval_samples} eval, max_length {spec.data.max_length}); batch {spec.train.batch_size}; "
        "per-method lr from the sweep file; seed 0; no early stop",
        "- wall s: the trial's clock (from worker start, incl. model load and evaluations); trials ran two at "
        "a time on 2 shared cores, so compare wall time loosely",
        "",
        "| method | steps | eval loss | accuracy | wall s | peak MB (max RSS over ranks) | trainable params |",
        "|---|---|---|---|---|---|---|",
        *rows,
    ]
    if gates:
        lines += ["", "Hybrid gate lambda (BOFT share) per layer at the end:", "",
                  "| layer | lambda |", "|---|---|",
                  *[f"| {name} | {value:.3f} |" for name, value in sorted(gates.items())]]
    text = "\n".join(lines)
    print(text)
    if args.write:
        write_section(os.path.join(ROOT, "BENCHMARKS.md"), f"quality steps={args.steps}", text)


if __name__ == "__main__":
    main()
