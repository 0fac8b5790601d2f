"""Does the training time-to-quality measure the method, whatever the machine does around it?

    python benchmarks/clocks.py            # the same LoRA trial in three situations, in one run
    python benchmarks/clocks.py --write    # and record it in BENCHMARKS.md

The same trial (LoRA r8 on the bundled MiniLM, BBC News, 1 worker, 1 pinned core) runs
  (a) alone,
  (b) beside a second, identical trial started at the same moment (2 trials on 2 cores),
  (c) alone, as the first trial on a node whose DeepSpeed op cache is cold (a fresh
      TORCH_EXTENSIONS_DIR and a fresh Ray instance: the op build happens before the clock).
Each runs through `orchestrator.trial.run_trial`, the product's own trial path. The spread of the
training figure across (a)-(c) should be small; the wall figure shows what the machine adds.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.step_time import write_section  # noqa: E402
from orchestrator.config import TrialConfig  # noqa: E402
from orchestrator.trial import read_reports, run_trial  # noqa: E402

FIELDS = ("train_time_to_quality_s", "time_to_quality_s", "setup_s", "worker_start_s", "samples_to_quality",
          "concurrent_trials")


def config(steps: int, target: float, seed: int) -> TrialConfig:
    return TrialConfig.from_dict({
        "data": {"name": "bbc_news", "max_train_samples": 512, "max_eval_samples": 128, "max_length": 96},
        "method": {"name": "lora", "config": {"r": 8}},
        "train": {"max_steps": steps, "batch_size": 16, "eval_every": 5, "lr": 2e-3, "warmup_steps": 5,
                  "stop_at_target": True, "checkpoint_every": 0, "seed": seed},
        "target": {"metric": "accuracy", "value": target},
        "deepspeed": {"zero_stage": 2},
        "resources": {"num_workers": 1, "cpus_per_worker": 1},
    })


def last_report(storage: str, name: str) -> dict:
    return read_reports(storage, name)[-1]


def start_ray(extensions: str) -> None:
    import ray

    os.environ["TORCH_EXTENSIONS_DIR"] = extensions  # read by the raylet's workers at their start
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)


def main() -> None:
    import ray

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--target", type=float, default=0.85)
    p.add_argument("--write", action="store_true", help="replace this benchmark's section in BENCHMARKS.md")
    args = p.parse_args()
    storage = tempfile.mkdtemp(prefix="clocks-")
    cfg = config(args.steps, args.target, seed=0)
    warm = os.environ.get("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/torch_extensions"))
    rows = {}

    start_ray(warm)
    run_trial(cfg, storage, "warmup")  # the page cache holds the model afterwards, for every case
    run_trial(cfg, storage, "a-alone")
    rows["(a) alone"] = [last_report(storage, "a-alone")]
    threads = [threading.Thread(target=run_trial, args=(cfg, storage, f"b-beside-{i}")) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rows["(b) beside a second trial"] = [last_report(storage, f"b-beside-{i}") for i in range(2)]
    ray.shutdown()

    cold = tempfile.mkdtemp(prefix="cold-extensions-")
    start_ray(cold)
    started = time.time()
    run_trial(cfg, storage, "c-cold")  # prepare_nodes builds the op into `cold` before the clock
    cold_total = time.time() - started
    rows["(c) first trial, cold op cache"] = [last_report(storage, "c-cold")]
    ray.shutdown()

    train = [r["train_time_to_quality_s"] for rs in rows.values() for r in rs]
    wall = [r["time_to_quality_s"] for rs in rows.values() for r in rs]
    table = [f"| {case} | " + " | ".join(", ".join(f"{r.get(k, float('nan')):.3g}" for r in rs) for k in FIELDS) + " |"
             for case, rs in rows.items()]
    lines = [
        "### The same LoRA trial alone, beside another trial, and on a cold op cache",
        "",
        f"- command: `python benchmarks/clocks.py --steps {args.steps} --target {args.target} --write`",
        f"- date: {datetime.date.today()}; 2 CPU cores; `run_trial` (Ray Train, 1 worker x 1 pinned core, "
        "DeepSpeed ZeRO-2, fp32); LoRA r8 on all-MiniLM-L6-v2, BBC News (512 train / 128 eval, max_length 96), "
        f"batch 16, evaluation every 5 steps, stop at accuracy >= {args.target}, seed 0",
        "- one warm-up trial first (page cache); (c) uses a fresh Ray and a fresh TORCH_EXTENSIONS_DIR: "
        f"the op build runs in `prepare_nodes`, before the trial's clock (the whole of (c) took {cold_total:.0f} s)",
        "",
        "| case | " + " | ".join(FIELDS) + " |",
        "|---|" + "---|" * len(FIELDS),
        *table,
        "",
        f"- training TTQ: min {min(train):.3g} s, max {max(train):.3g} s, spread (max-min)/median "
        f"{(max(train) - min(train)) / statistics.median(train):.1%}",
        f"- wall TTQ: min {min(wall):.3g} s, max {max(wall):.3g} s, spread {(max(wall) - min(wall)) / statistics.median(wall):.1%}",
    ]
    text = "\n".join(lines)
    print(text)
    if args.write:
        write_section(os.path.join(ROOT, "BENCHMARKS.md"), "clocks", text)


if __name__ == "__main__":
    main()
