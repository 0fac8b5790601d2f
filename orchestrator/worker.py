"""The worker side of a trial: what every Ray Train worker runs (`orchestrator.trial` is the driver).

    train_loop_per_worker(config)    setup -> loop (train, evaluate, report) -> checkpoint / adapter

Reading order of the worker loop is the order it runs in (nanoGPT-style): clock, cores, model on
the device, data, method, DeepSpeed engine, resume, the loop, the final adapter. Every rank calls
`ray.train.report` (it is a barrier); only rank 0 prints. What a report holds is declared in
`orchestrator.report`.

Two time-to-quality clocks. The wall one follows MLPerf's rule: it starts when the worker loop
starts and never pauses (after a worker failure it is restored from the checkpoint's wall-clock
start, so lost work and the restart count). The training one adds up only what the method costs:
its initialisation (LoRA-GA's gradient pass), steps and evaluations, not setup (model load,
DeepSpeed engine, op builds) nor checkpoint writes. Every collective goes through
`methods.collectives`, which puts tensors where the backend wants them (NCCL: the GPU).
(Over 350 lines: the training loop is read in one sitting, with its clocks, memory counts and
reports beside it, nanoGPT-style, rather than spread over modules.)
"""

from __future__ import annotations

import atexit
import contextlib
import json
import math
import os
import random
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import torch

import methods
from methods import collectives
from orchestrator import cores, memory, report, stall, startup
from orchestrator.config import Target, TrialConfig
from orchestrator.deepspeed_config import build_deepspeed_config, generated_optimizer, import_deepspeed, resolve_precision
from orchestrator.tasks import get_task

_zero3_loading = None  # see load_model
ADAPTER_DIR = "adapter"  # inside the final checkpoint: methods.save_adapter's format
STATE_FILE = "trial_state.pt"
TRIAL_FILE = "trial.json"  # the trial's configuration (TrialConfig.to_dict), read by orchestrator.export


# ----------------------------------------------------------------------------- small helpers


def lr_factor(step: int, cfg: TrialConfig) -> float:
    """Linear warmup, then cosine / linear decay to 0 at max_steps, or constant."""
    t = cfg.train
    if step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    if t.lr_schedule == "constant":
        return 1.0
    progress = min((step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps), 1.0)
    return 0.5 * (1 + math.cos(math.pi * progress)) if t.lr_schedule == "cosine" else 1.0 - progress


def load_model(cfg: TrialConfig, task):
    """Tokenizer and model by hub name or local folder (null = the bundled MiniLM). Under ZeRO-3
    the weights are partitioned as they load (transformers' `HfDeepSpeedConfig` turns on
    `deepspeed.zero.Init`), so a model that only fits sharded never exists whole on one worker."""
    from transformers import AutoTokenizer

    from orchestrator.tasks.assets import model_path

    if cfg.deepspeed.zero_stage == 3:
        import deepspeed
        from transformers.integrations import HfDeepSpeedConfig

        deepspeed.init_distributed()  # zero.Init partitions over DeepSpeed's view of Ray's process group

        # transformers keeps a weak reference: this one lives as long as the trial (module level).
        global _zero3_loading
        _zero3_loading = HfDeepSpeedConfig(build_deepspeed_config(cfg))
    path = model_path(cfg.model.name_or_path)  # pip:<package>: converted once per node (nodes.py)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:  # causal LMs often have none; padding is masked anyway
        tokenizer.pad_token = tokenizer.eos_token
    model = task.auto_model().from_pretrained(path, **task.model_options())
    if task.kind == "classification":  # the head finds each sequence's last token by its padding
        model.config.pad_token_id = tokenizer.pad_token_id
    return tokenizer, model


def head_modules(model: torch.nn.Module, cfg: TrialConfig, task) -> tuple[str, ...]:
    """Modules trained in full: the user's choice, else a classification task's new head."""
    if cfg.model.modules_to_save is not None:
        return cfg.model.modules_to_save
    if task.kind != "classification":
        return ()
    return tuple(n for n, _ in model.named_children() if n in ("classifier", "score", "pre_classifier"))


def shard_batches(examples: list[dict], collate, micro: int, seed: int, rank: int, world: int,
                  start_epoch: int = 0) -> Iterator[tuple[int, dict]]:
    """Endless (epoch, batch) stream over this rank's disjoint shard, reshuffled every epoch."""
    shard = examples[rank::world]  # disjoint shards; the full list was shuffled with the seed
    if len(shard) < micro:
        raise ValueError(f"rank {rank}: {len(shard)} training examples, fewer than one micro batch ({micro})")
    epoch = start_epoch
    while True:
        order = list(range(len(shard)))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        for i in range(0, len(order) - micro + 1, micro):  # drop the ragged tail: equal steps on all ranks
            yield epoch, collate([shard[j] for j in order[i : i + micro]])
        epoch += 1


class Clock:
    """The trial's clock parts (report.CLOCK_PARTS), carried in the trial state across restarts."""

    def __init__(self, parts: dict[str, float]):
        self.parts = parts

    @contextlib.contextmanager
    def __call__(self, part: str):
        started = time.time()
        try:
            yield
        finally:
            self.parts[part] += time.time() - started

    @property
    def training(self) -> float:
        """What the method costs: its initialisation, its steps and its evaluations."""
        return self.parts["method_init_s"] + self.parts["train_s"] + self.parts["eval_s"]


def pin_cores(cfg: TrialConfig, device: torch.device, name: str) -> int:
    """CPU: this worker's own cores and as many torch threads; GPU: registered, not pinned.
    Returns the torch thread count."""
    if device.type == "cuda":
        cores.claim_none(name)
        return torch.get_num_threads()
    chosen, exclusive = cores.claim(cores.cores_wanted(cfg.resources.cpus_per_worker), name)
    if not exclusive:
        print(f"[trial] warning: fewer free cores than asked for; sharing cores {chosen} "
              "(the trial's times are measured under contention: see concurrent_trials)", flush=True)
    torch.set_num_threads(len(chosen))
    return len(chosen)


def estimate_loss(device: torch.device, precision: str):
    """LoRA-GA's gradient pass in the trial's precision (autocast: fp32 accumulation stays in
    `estimate_gradients`), on the worker's device."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def loss_fn(model, batch):
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            return model(**{k: v.to(device) for k, v in batch.items()}).loss

    return loss_fn


def memory_report(engine, cfg: TrialConfig, device: torch.device, activations: int, rss_base: float) -> dict[str, float]:
    """report's memory fields, from the rank whose counted total is largest (so the parts sum to the
    total), RSS and GPU peaks as the max over ranks."""
    world = collectives.world_size()
    mine = [memory.weights_bytes(engine.module) / memory.MB,
            memory.gradients_bytes(engine.module, cfg.deepspeed.zero_stage, world) / memory.MB,
            memory.optimizer_bytes(engine.optimizer, engine.module) / memory.MB,
            activations / memory.MB]
    parts = max(collectives.all_gather_object(mine), key=sum)
    out = dict(zip(report.MEMORY_PARTS, parts))
    rss = memory.max_rss_mb()
    peaks = [rss, rss - rss_base]
    if device.type == "cuda":
        peaks += memory.gpu_peaks_mb(device)
    peaks = collectives.all_reduce_values(peaks, op="max")
    out.update(rss_peak_mb=peaks[0], rss_above_baseline_mb=peaks[1])
    if device.type == "cuda":
        out.update(peak_memory_mb=peaks[2], gpu_reserved_mb=peaks[3])
    else:
        out["peak_memory_mb"] = sum(parts)
    return out


def build_engine(model, cfg: TrialConfig):
    """The DeepSpeed engine with our AdamW and LR schedule, unless the user's JSON brings its own.
    Under optimizer offload DeepSpeed builds its CPU Adam from the generated `optimizer` block
    (it rejects a torch optimizer there); our schedule goes on whichever optimizer it holds."""
    import deepspeed

    ds_config = build_deepspeed_config(cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = None if "optimizer" in ds_config else torch.optim.AdamW(
        params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    scheduler = None
    if "scheduler" not in ds_config and (optimizer is not None or generated_optimizer(cfg)):
        def scheduler(opt):
            return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=params, optimizer=optimizer,
                                           lr_scheduler=scheduler, config=ds_config)
    return engine


# ----------------------------------------------------------------------------- the worker loop


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray
    import ray.train
    import ray.train.torch

    with startup.paused_gc():  # setup's imports and loads: see orchestrator.startup
        import_deepspeed()
    from deepspeed.utils import safe_get_full_grad

    started = time.time()
    cfg = TrialConfig.from_dict(config["trial"])
    target = Target(**config["target"])
    name = config.get("name") or ray.train.get_context().get_experiment_name()
    rank, world = collectives.rank(), collectives.world_size()
    master = rank == 0
    checkpoint = ray.train.get_checkpoint()
    state: dict[str, Any] = {"step": 0, "samples": 0, "tokens": 0, "clock_start": started, "reached": None,
                             "epoch": 0, "clocks": dict.fromkeys(report.CLOCK_PARTS, 0.0)}
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = torch.load(os.path.join(d, STATE_FILE), weights_only=False)
    clock_start = state["clock_start"]  # MLPerf: never pauses, survives restarts
    clock = Clock(state["clocks"])
    worker_start_s = max(0.0, started - config["launched_at"]) if config.get("launched_at") and checkpoint is None else None

    # ---- setup: device, cores, model, data (this process's part; a restart adds its own)
    watchdog = stall.Watchdog(cfg.train.stall_timeout_s, config.get("stall_marker"), rank)
    device = ray.train.torch.get_device()
    threads = pin_cores(cfg, device, name)
    atexit.register(cores.release)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # the trial's peak, not the process's history
    rss_base = memory.rss_mb()
    with clock("setup_s"), startup.paused_gc():
        task = get_task(cfg.data.name)
        torch.manual_seed(cfg.train.seed)
        tokenizer, model = load_model(cfg, task)
        if cfg.deepspeed.zero_stage < 3:  # ZeRO-3 loads each partition onto the device itself
            model.to(device)  # before the method: LoRA-GA estimates on the device, in the trial's peak
        train_examples, eval_examples = task.load(cfg.data)
        random.Random(cfg.train.seed).shuffle(train_examples)

    def collate(examples):
        return task.collate(tokenizer, examples, max_length=cfg.data.max_length)

    micro = cfg.micro_batch_size
    eval_batches = [task.collate_eval(tokenizer, eval_examples[i : i + micro * 2], cfg.data)
                    for i in range(0, len(eval_examples), micro * 2)]

    # ---- method: on resume, the saved adapter (a gradient init is not replayed: setup, not init)
    method_cfg = cfg.method
    modules_to_save = head_modules(model, cfg, task)
    if checkpoint is not None:
        with clock("setup_s"), checkpoint.as_directory() as d:
            model = methods.load_adapter(model, os.path.join(d, ADAPTER_DIR))
    # Under ZeRO-3 the gradient initialisation runs on the partitioned model, through the engine
    # (gathered layer by layer as the forward and backward go), so a model that only fits sharded
    # can be initialised; below ZeRO-3 it runs before the engine, on the whole model.
    grad_batches = (b for _, b in shard_batches(train_examples, collate, micro, cfg.train.seed + 1, rank, world))
    loss_fn = estimate_loss(device, resolve_precision(cfg.deepspeed.precision))
    deferred = checkpoint is None and cfg.deepspeed.zero_stage == 3 and methods.get_method(method_cfg.method).needs_gradients
    if checkpoint is None:
        with clock("method_init_s"):
            methods.apply_method(model, method_cfg, batches=grad_batches, modules_to_save=modules_to_save,
                                 loss_fn=loss_fn, defer_init=deferred)
    trainable, total = methods.count_parameters(model)
    # Ray's node ids, not Train's node ranks: those group workers by IP (raylets sharing a host count once).
    num_nodes = len(set(collectives.all_gather_object(ray.get_runtime_context().get_node_id())))

    # ---- DeepSpeed engine (setup: any op it builds is a cost of the machine, not of the method)
    with clock("setup_s"), startup.paused_gc():
        engine = build_engine(model, cfg)
        if checkpoint is not None:
            with checkpoint.as_directory() as d:
                engine.load_checkpoint(d, load_module_strict=False)
    if deferred:
        with clock("method_init_s"):
            methods.init_from_gradients(engine.module, grad_batches, loss_fn)

    # ---- the loop
    batches = shard_batches(train_examples, collate, micro, cfg.train.seed, rank, world, state["epoch"])
    window = {"loss": 0.0, "n": 0, "samples": 0, "tokens": 0, "t": time.time()}
    activations = {"bytes": 0, "peak": 0}
    contention = 0
    reports_since_checkpoint = 0
    stop_reason = None
    engine.train()
    watchdog.beat("training")
    while state["step"] < cfg.train.max_steps and stop_reason is None:
        with clock("train_s"):
            for micro_step in range(cfg.train.grad_accum):
                state["epoch"], batch = next(batches)
                batch = {k: v.to(device) for k, v in batch.items()}
                # Activations measured on the first micro-step of every report window (hooks only count).
                measure = memory.saved_activations(engine.module, activations) if window["n"] == 0 else contextlib.nullcontext()
                with measure:
                    loss = engine(**batch).loss
                activations["peak"] = max(activations["peak"], activations["bytes"])
                engine.backward(loss)
                if engine.is_gradient_accumulation_boundary():
                    methods.after_backward(engine.module, state["step"] + 1, safe_get_full_grad)
                engine.step()
                window["loss"] += loss.item()
                window["n"] += 1
                window["samples"] += batch["input_ids"].shape[0]
                window["tokens"] += int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
            state["step"] += 1
            watchdog.beat(f"step {state['step']}")
            # Summed over ranks every step: all ranks must agree on divergence, or they would part ways.
            loss_sum, n, samples, tokens = collectives.all_reduce_values(
                [window["loss"], window["n"], window["samples"], window["tokens"]])
        contention = max(contention, cores.other_trials(name))
        if not math.isfinite(loss_sum):
            stop_reason = "diverged"
        elif state["step"] % cfg.train.eval_every and state["step"] < cfg.train.max_steps:
            continue

        # ---- evaluate and report (every rank: ray.train.report is a barrier)
        now = time.time()
        metrics: dict[str, Any] = {"step": state["step"], "train_loss": loss_sum / max(n, 1)}
        state["samples"] += int(samples)
        state["tokens"] += int(tokens)
        if stop_reason is None:
            watchdog.beat(f"the evaluation at step {state['step']}")
            with clock("eval_s"):
                metrics.update(task.evaluate(engine, eval_batches, tokenizer))
            watchdog.beat(f"the report at step {state['step']}")
        else:  # diverged: the worst score, so that schedulers and summaries rank it last
            metrics[target.metric] = float("-inf") if target.mode == "max" else float("inf")
        elapsed = time.time() - clock_start
        score = metrics.get(target.metric)
        if stop_reason is None and state["reached"] is None and score is not None and target.reached(score):
            state["reached"] = {"time_to_quality_s": elapsed, "train_time_to_quality_s": clock.training,
                                "samples_to_quality": state["samples"], "tokens_to_quality": state["tokens"]}
            if cfg.train.stop_at_target:
                stop_reason = "target_reached"
        if stop_reason is None and state["step"] >= cfg.train.max_steps:
            stop_reason = "budget"
        (contention,) = collectives.all_reduce_values([contention], op="max")
        metrics.update({
            "samples_seen": state["samples"], "tokens_seen": state["tokens"],
            "samples_per_s": samples / max(now - window["t"], 1e-9), "tokens_per_s": tokens / max(now - window["t"], 1e-9),
            "elapsed_s": elapsed, **clock.parts, "trainable_params": trainable, "total_params": total,
            **memory_report(engine, cfg, device, activations["peak"], rss_base),
            "concurrent_trials": int(contention), "cpu_threads": threads, "num_nodes": num_nodes,
            "target_metric": target.metric, "target": target.value, "target_reached": state["reached"] is not None,
            "done": stop_reason is not None, "stop_reason": stop_reason or "",
            "lr": engine.get_lr()[0] if engine.get_lr() else cfg.train.lr,
            **(state["reached"] or {}),
        })
        if worker_start_s is not None:
            metrics["worker_start_s"] = worker_start_s
        layers = methods.layer_diagnostics(engine.module)
        if layers:
            metrics["layers"] = layers
            # Every rank must hold the same diagnostics (they come from reduced gradients, e.g. the
            # hybrid's gate): checked, not assumed. The same layers and names on every rank.
            values = [layers[n][k] for n in sorted(layers) for k in sorted(layers[n])]
            high = collectives.all_reduce_values(values, op="max")
            low = collectives.all_reduce_values(values, op="min")
            spreads = [h - lo for h, lo in zip(high, low) if math.isfinite(h) and math.isfinite(lo)]
            metrics["layer_rank_spread"] = max(spreads, default=0.0)
        reports_since_checkpoint += 1
        due = cfg.train.checkpoint_every and reports_since_checkpoint >= cfg.train.checkpoint_every
        if due or stop_reason is not None:
            reports_since_checkpoint = 0
            with clock("checkpoint_s"):
                report_with_checkpoint(engine, metrics, state, config["trial"])
        else:
            ray.train.report(metrics)
        if master:
            shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in metrics.items() if k != "layers"}
            print(f"[trial] {shown}", flush=True)
        window = {"loss": 0.0, "n": 0, "samples": 0, "tokens": 0, "t": time.time()}
        activations["peak"] = 0
        watchdog.beat(f"training after step {state['step']}")

    collectives.barrier()  # leave together: a rank exiting early aborts the others
    cores.release()


def report_with_checkpoint(engine, metrics: dict, state: dict, trial: dict) -> None:
    """Every rank writes its DeepSpeed shard into its own folder; Ray merges them in storage.
    Rank 0 adds the adapter alone (methods' format), the trial state (step, clock, ...) and the
    trial's configuration (what `orchestrate export` rebuilds the base model from)."""
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    with tempfile.TemporaryDirectory() as d:
        engine.save_checkpoint(d, tag="deepspeed", exclude_frozen_parameters=True)
        with gathered_adapter(engine):  # a collective under ZeRO-3: every rank enters
            if rank == 0:
                methods.save_adapter(engine.module, os.path.join(d, ADAPTER_DIR))
                torch.save(state, os.path.join(d, STATE_FILE))
                with open(os.path.join(d, TRIAL_FILE), "w") as f:
                    json.dump(trial, f, indent=2)
        collectives.barrier()
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def gathered_adapter(engine):
    """Full adapter tensors on every rank for the duration (ZeRO-3 partitions them)."""
    if engine.zero_optimization_stage() < 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(methods.trainable_parameters(engine.module))
