"""What a trial costs beyond its training: a plain PyTorch loop against the same trial through
`orchestrate sweep`, alone and six times in a row, in one run.

    python benchmarks/overhead.py            # ~10 minutes on 2 cores
    python benchmarks/overhead.py --write    # and record it in BENCHMARKS.md

The work is the quickstart's hybrid trial (all-MiniLM-L6-v2, BBC News, 512 train / 128 eval,
max_length 96, batch 16, evaluation every 10 steps) for a fixed 20 steps, so every run does the
same steps whatever its seed:
  plain   one process, 2 threads, the project's own task and method code (`orchestrator.tasks`,
          `methods`), torch's AdamW, no Ray and no DeepSpeed; timed from process start to exit;
  sweep1  `orchestrate sweep` of that one trial (Ray Tune -> Ray Train, 2 workers x 1 pinned core,
          DeepSpeed ZeRO-2, MLflow in a local SQLite store), driver start to exit;
  sweep6  the same sweep with 6 seeds, one trial at a time;
  floor   Ray Train's own cost per run: `fit()`s of 2 workers x 0.49 CPU whose train function only
          reports once (as every trial's last evaluation does), in one process after Ray started
          (median), with the environment `orchestrate sweep` gives a local Ray; alternating: Ray's
          bare `TorchTrainer`, the trials' trainer (`trial._trainer_class`: no Ray Data actor and no
          placement-group cleaner) with Ray's 2 s controller poll, and the same with the trials'
          0.25 s poll (`trial.CONTROLLER_POLL`).
Each plain loop runs twice, once before the sweeps and once after them (the mean is used),
each time beside a plain loop whose setup runs with Python's cyclic GC on (`--plain --gc-on`;
which goes first swaps between the pairs): what pausing it (`orchestrator.startup`, as the
trials' workers and the sweep driver do) is worth to one process's imports and loads. The
per-part breakdown comes from the sweep's `summary.json` (`driver`: the driver's timeline) and the
trials' reports (`worker_start_s`, `setup_s`, method init, steps, evaluations, checkpoints). The
fixed cost of a trial is the marginal cost of one more trial in a sweep, (sweep6 - sweep1) / 5,
minus the plain loop.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

STEPS, EVAL_EVERY = 20, 10
DATA = {"name": "bbc_news", "max_train_samples": 512, "max_eval_samples": 128, "max_length": 96}
METHOD = {"lora_ga": {"lora": {"r": 8}}, "boft": {"block_size": 8}}
TRAIN = {"max_steps": STEPS, "batch_size": 16, "eval_every": EVAL_EVERY, "lr": 2.0e-3, "warmup_steps": 5,
         "stop_at_target": False}
FLOOR_ROUNDS = 4  # one-report fit()s of each kind, in turn, after one warm-up
TRIAL_PARTS = ("worker_start_s", "setup_s", "method_init_s", "train_s", "eval_s", "checkpoint_s")


def plain_loop(pause_gc: bool = True) -> None:
    """The trial's work in one process, no orchestration; prints its timeline as JSON."""
    import contextlib
    import random

    import torch

    t_import = time.time()
    torch.set_num_threads(2)
    from orchestrator import startup

    with startup.paused_gc() if pause_gc else contextlib.nullcontext():  # as a trial's workers set up
        import methods
        from orchestrator.config import TrialConfig
        from orchestrator.tasks import get_task
        from orchestrator.worker import head_modules, load_model, lr_factor, shard_batches

        cfg = TrialConfig.from_dict({"data": DATA, "method": {"name": "hybrid", "config": METHOD}, "train": TRAIN,
                                     "target": {"metric": "accuracy", "value": 0.85},
                                     "resources": {"num_workers": 1}})  # one process: the whole batch
        task = get_task(cfg.data.name)
        torch.manual_seed(cfg.train.seed)
        tokenizer, model = load_model(cfg, task)
        train, evals = task.load(cfg.data)
        random.Random(cfg.train.seed).shuffle(train)
    t_loaded = time.time()

    def collate(examples):
        return task.collate(tokenizer, examples, max_length=cfg.data.max_length)

    micro = cfg.micro_batch_size
    eval_batches = [task.collate_eval(tokenizer, evals[i : i + micro * 2], cfg.data) for i in range(0, len(evals), micro * 2)]
    grad_batches = (b for _, b in shard_batches(train, collate, micro, cfg.train.seed + 1, 0, 1))
    methods.apply_method(model, cfg.method, batches=grad_batches, modules_to_save=head_modules(model, cfg, task))
    opt = torch.optim.AdamW(methods.trainable_parameters(model), lr=cfg.train.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    t_loop = time.time()
    batches = shard_batches(train, collate, micro, cfg.train.seed, 0, 1)
    metrics = {}
    model.train()
    for step in range(1, cfg.train.max_steps + 1):
        _, batch = next(batches)
        model(**batch).loss.backward()
        methods.after_backward(model, step)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % cfg.train.eval_every == 0:
            metrics = task.evaluate(model, eval_batches, tokenizer)
    print(json.dumps({"import_s": t_import - START, "load_s": t_loaded - t_import, "init_s": t_loop - t_loaded,
                      "loop_s": time.time() - t_loop, "accuracy": metrics.get("accuracy")}))


def _empty(config) -> None:
    from ray import train

    train.report({"step": 1})


def ray_floor() -> None:
    """fit()s of a run that only reports once, in turn: Ray's bare TorchTrainer, the trials' trainer
    (the same without Ray Data's actor and Ray Train's placement-group cleaner, `trial._trainer_class`)
    with Ray's default controller poll, and the trials' trainer with the trials' poll
    (CONTROLLER_POLL); prints their wall times as JSON."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from orchestrator.cli import use_local_ray_env
    from orchestrator.trial import CONTROLLER_POLL, _trainer_class

    use_local_ray_env()
    os.environ.pop(CONTROLLER_POLL[0], None)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    tmp = tempfile.mkdtemp(prefix="floor-")

    def fit(cls, name: str, poll: str | None = None) -> float:
        if poll:  # Ray Train reads it from this process's environment when fit() starts its controller
            os.environ[CONTROLLER_POLL[0]] = poll
        started = time.time()
        try:
            cls(_empty, scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.49}),
                run_config=ray.train.RunConfig(name=name, storage_path=tmp)).fit()
        finally:
            os.environ.pop(CONTROLLER_POLL[0], None)
        return time.time() - started

    fit(TorchTrainer, "warm-up")  # the first run after Ray's start is seconds slower: not counted
    kinds = {"bare": (TorchTrainer, None), "trial_default_poll": (_trainer_class(), None),
             "trial_fast_poll": (_trainer_class(), CONTROLLER_POLL[1])}
    walls: dict[str, list[float]] = {kind: [] for kind in kinds}
    for i in range(FLOOR_ROUNDS):
        for kind, (cls, poll) in kinds.items():
            walls[kind].append(fit(cls, f"floor-{kind}{i}", poll))
    print(json.dumps(walls))


def timed(cmd: list[str], env: dict) -> tuple[float, str]:
    started = time.time()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return time.time() - started, out.stdout


def sweep(tmp: str, name: str, seeds: int, env: dict) -> dict:
    import yaml

    path = os.path.join(tmp, f"{name}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump({"name": name, "data": DATA, "target": {"metric": "accuracy", "value": 0.85},
                        "train": {**TRAIN, "checkpoint_every": 0}, "deepspeed": {"zero_stage": 2},
                        "methods": {"hybrid": {"lora_ga.lora.r": 8, "boft.block_size": 8}},
                        "tune": {"num_samples": 1, "seeds": list(range(seeds)), "scheduler": "fifo"},
                        "resources": {"num_workers": 2, "cpus_per_worker": 0.49},
                        "storage": os.path.join(tmp, "runs")}, f)
    wall, _ = timed([sys.executable, "-m", "orchestrator.cli", "sweep", path], env)
    with open(os.path.join(tmp, "runs", name, "summary.json")) as f:
        summary = json.load(f)
    trials = []
    for path in glob.glob(os.path.join(tmp, "runs", name, "*", "result.json")):  # Tune's, per trial
        with open(path) as f:
            last = [json.loads(line) for line in f if line.strip()][-1]
        trials.append({k: last.get(k) or 0.0 for k in (*TRIAL_PARTS, "elapsed_s")})
    assert len(trials) == len(summary["trials"]) == seeds, (len(trials), summary["trials"])
    driver = summary["driver"]
    driver["report_s"] = wall - sum(driver.values())  # MLflow parent run close and comparison report
    return {"wall_s": wall, "driver": driver, "trials": trials}


def fmt_parts(parts: dict) -> str:
    return ", ".join(f"{k.removesuffix('_s')} {v:.1f}" for k, v in parts.items())


def plain_row(label: str, p: dict) -> str:
    parts = fmt_parts({k: v for k, v in p.items() if k.endswith("_s") and k != "wall_s"})
    return f"| {label} | {p['wall_s']:.1f} | {parts}; accuracy {p['accuracy']:.3f} |"


def main() -> None:
    from orchestrator.trial import CONTROLLER_POLL

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--write", action="store_true", help="replace this benchmark's section in BENCHMARKS.md")
    args = p.parse_args()
    env = {**os.environ, "PYTHONPATH": ROOT, "TOKENIZERS_PARALLELISM": "false"}
    tmp = tempfile.mkdtemp(prefix="overhead-")
    plains, gc_on = [], []

    def plain_pair(pair: int) -> None:
        for runs, flags in ((gc_on, ["--gc-on"]), (plains, []))[::1 if pair == 0 else -1]:
            wall, out = timed([sys.executable, __file__, "--plain", *flags], env)
            runs.append({"wall_s": wall, **json.loads(out.strip().splitlines()[-1])})
            print(f"plain loop {' '.join(flags)}: {wall:.1f} s "
                  f"({fmt_parts({k: v for k, v in runs[-1].items() if k.endswith('_s')})})", flush=True)

    # One pair before the sweeps and one after: a shared machine's speed drifts over minutes, and
    # the plain loops' mean is what the sweeps are measured against.
    plain_pair(0)
    one = sweep(tmp, "overhead1", 1, env)
    print(f"one-trial sweep: {one['wall_s']:.1f} s", flush=True)
    six = sweep(tmp, "overhead6", 6, env)
    print(f"six-trial sweep: {six['wall_s']:.1f} s", flush=True)
    plain_pair(1)
    plain = statistics.mean(p["wall_s"] for p in plains)
    _, out = timed([sys.executable, __file__, "--ray-floor"], env)
    floors = json.loads(out.strip().splitlines()[-1])
    floor, lean, fast = floors["bare"], floors["trial_default_poll"], floors["trial_fast_poll"]
    print(f"one-report fit(): TorchTrainer {', '.join(f'{w:.1f}' for w in floor)} s; the trials' trainer, "
          f"Ray's 2 s poll {', '.join(f'{w:.1f}' for w in lean)} s, the trials' {CONTROLLER_POLL[1]} s poll "
          f"{', '.join(f'{w:.1f}' for w in fast)} s",
          flush=True)

    marginal = (six["wall_s"] - one["wall_s"]) / 5
    trial_mean = {k: statistics.mean(t[k] for t in six["trials"]) for k in (*TRIAL_PARTS, "elapsed_s")}
    span = trial_mean["worker_start_s"] + trial_mean["elapsed_s"]
    lines = [
        "### Sweep overhead: a plain loop, a one-trial sweep and a six-trial sweep",
        "",
        "- command: `python benchmarks/overhead.py --write`",
        f"- date: {datetime.date.today()}; 2 CPU cores; the quickstart's hybrid trial (MiniLM, BBC News 512/128, "
        f"max_length 96, batch 16) for a fixed {STEPS} steps with an evaluation every {EVAL_EVERY}; sweeps: 2 workers x 1 "
        "pinned core, ZeRO-2, one trial at a time, MLflow in SQLite, no checkpoints before the end",
        "",
        "| run | wall (s) | parts (s) |",
        "|---|---|---|",
        *[plain_row(f"plain loop {i + 1}, {when} the sweeps (process start to exit)", p)
          for i, (p, when) in enumerate(zip(plains, ("before", "after")))],
        *[plain_row(f"plain loop, its setup with the cyclic GC on, {i + 1}, {when} the sweeps (beside the rows above)", p)
          for i, (p, when) in enumerate(zip(gc_on, ("before", "after")))],
        f"| one-trial sweep (driver start to exit) | {one['wall_s']:.1f} | driver: {fmt_parts(one['driver'])}; "
        f"trial: {fmt_parts(one['trials'][0])} |",
        f"| six-trial sweep | {six['wall_s']:.1f} | driver: {fmt_parts(six['driver'])}; trial mean: {fmt_parts(trial_mean)} |",
        f"| Ray Train alone: a train function that reports once, 2 workers (`fit()`, Ray already started), Ray's "
        f"defaults, median | {statistics.median(floor):.1f} | {len(floor)} runs: {', '.join(f'{w:.1f}' for w in floor)} |",
        f"| the same with the trials' trainer (no Ray Data actor, no placement-group cleaner) and Ray's 2 s "
        f"controller poll, in turn with the rows around it, median | {statistics.median(lean):.1f} | {len(lean)} runs: {', '.join(f'{w:.1f}' for w in lean)} |",
        f"| the same with the trials' {CONTROLLER_POLL[1]} s controller poll (`{CONTROLLER_POLL[0]}`: as trials run), median | "
        f"{statistics.median(fast):.1f} | {len(fast)} runs: {', '.join(f'{w:.1f}' for w in fast)} |",
        "",
        f"- marginal cost of one more trial in a sweep, (sweep6 - sweep1) / 5: {marginal:.1f} s; "
        f"fixed cost per trial over the plain loop: **{marginal - plain:.1f} s** (goal <= 10 s)",
        f"- of a trial's {span:.1f} s from launch to its last report: worker group start {trial_mean['worker_start_s']:.1f} s, "
        f"worker setup {trial_mean['setup_s']:.1f} s, method init + steps + evaluations "
        f"{trial_mean['method_init_s'] + trial_mean['train_s'] + trial_mean['eval_s']:.1f} s; "
        f"the rest of the marginal cost ({marginal - span:.1f} s) is Tune's trial actor start and Train's shutdown",
        f"- of that fixed cost, Ray Train's own run start and end (the one-report function's `fit()`) is "
        f"{statistics.median(fast):.1f} s as the trials run it ({statistics.median(lean):.1f} s with Ray's 2 s poll, "
        f"{statistics.median(floor):.1f} s with Ray's bare TorchTrainer); the plain loop pays none of it",
        f"- the plain loop's load (importing the project and transformers, loading MiniLM and the data: "
        f"what a trial's workers do in their setup) with the cyclic GC paused: "
        f"{statistics.mean(p['load_s'] for p in plains):.1f} s against "
        f"{statistics.mean(p['load_s'] for p in gc_on):.1f} s with it on (means of 2)",
        f"- six-trial sweep / six plain loops: **{six['wall_s'] / (6 * plain):.2f}x** (goal <= 1.25x); "
        f"one-trial sweep / one plain loop: {one['wall_s'] / plain:.2f}x",
    ]
    text = "\n".join(lines)
    print(text)
    if args.write:
        from benchmarks.step_time import write_section

        write_section(os.path.join(ROOT, "BENCHMARKS.md"), "overhead", text)


if __name__ == "__main__":
    START = time.time()
    if sys.argv[1:] == ["--ray-floor"]:
        ray_floor()
    elif sys.argv[1:2] == ["--plain"]:
        import psutil

        START = psutil.Process().create_time()
        if sys.argv[2:] not in ([], ["--gc-on"]):
            raise SystemExit(f"usage: {sys.argv[0]} --plain [--gc-on]")
        plain_loop(pause_gc=not sys.argv[2:])
    else:
        main()
