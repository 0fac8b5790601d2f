"""The worker side of a trial: what every Ray Train worker runs (`orchestrator.trial` is the driver).

    train_loop_per_worker(config)    setup -> loop (train, evaluate, report) -> checkpoint / adapter

Reading order of the worker loop is the order it runs in (nanoGPT-style): clock, model, data,
method, DeepSpeed engine, resume, the loop, the final adapter. Every rank calls `ray.train.report`
(it is a barrier); only rank 0 prints.

Time-to-quality follows MLPerf's rule: the clock starts when the worker loop starts, before the
data is touched, and never pauses: after a worker failure the clock is restored from the
checkpoint's wall-clock start, so the lost work and the restart are counted too.
"""

from __future__ import annotations

import math
import os
import random
import resource
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import torch

import methods
from orchestrator.config import Target, TrialConfig
from orchestrator.deepspeed_config import build_deepspeed_config
from orchestrator.tasks import get_task

ADAPTER_DIR = "adapter"  # inside the final checkpoint: methods.save_adapter's format
STATE_FILE = "trial_state.pt"


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
    """Tokenizer and model by hub name or local folder (null = the bundled MiniLM)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from orchestrator.tasks import default_model_path

    path = cfg.model.name_or_path or str(default_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:  # causal LMs often have none; padding is masked anyway
        tokenizer.pad_token = tokenizer.eos_token
    if task.kind == "classification":
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=task.num_labels)
        model.config.pad_token_id = tokenizer.pad_token_id
    else:
        model = AutoModelForCausalLM.from_pretrained(path)
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


def all_reduce(values: list[float], op: str = "sum") -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if torch.distributed.is_initialized():
        reduce_op = {"sum": torch.distributed.ReduceOp.SUM, "max": torch.distributed.ReduceOp.MAX}[op]
        torch.distributed.all_reduce(t, op=reduce_op)
    return t.tolist()


def peak_memory_mb(device: torch.device) -> float:
    """GPU: max allocated; CPU: max RSS of this process. The max over ranks is taken by the caller."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ----------------------------------------------------------------------------- the worker loop


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import deepspeed
    import ray.train
    from deepspeed.utils import safe_get_full_grad

    cfg = TrialConfig.from_dict(config["trial"])
    target = Target(**config["target"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    master = rank == 0
    checkpoint = ray.train.get_checkpoint()
    state: dict[str, Any] = {"step": 0, "samples": 0, "tokens": 0, "clock_start": time.time(),
                             "time_to_quality_s": None, "epoch": 0}
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = torch.load(os.path.join(d, STATE_FILE), weights_only=False)
    clock_start = state["clock_start"]  # MLPerf: never pauses, survives restarts

    # ---- model and data
    task = get_task(cfg.data.name)
    torch.manual_seed(cfg.train.seed)
    tokenizer, model = load_model(cfg, task)
    train_examples, eval_examples = task.load(cfg.data)
    random.Random(cfg.train.seed).shuffle(train_examples)

    def collate(examples):
        return task.collate(tokenizer, examples, max_length=cfg.data.max_length)

    micro = cfg.micro_batch_size
    eval_batches = [task.collate_eval(tokenizer, eval_examples[i : i + micro * 2], cfg.data)
                    for i in range(0, len(eval_examples), micro * 2)]

    # ---- method: on resume, the saved adapter (a gradient init is not replayed)
    method_cfg = cfg.method.build()
    modules_to_save = head_modules(model, cfg, task)
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            model = methods.load_adapter(model, os.path.join(d, ADAPTER_DIR))
    else:
        grad_batches = (b for _, b in shard_batches(train_examples, collate, micro, cfg.train.seed + 1, rank, world))
        methods.apply_method(model, method_cfg, batches=grad_batches, modules_to_save=modules_to_save)
    trainable, total = methods.count_parameters(model)

    # ---- DeepSpeed engine: our AdamW and LR schedule unless the user's JSON brings its own
    ds_config = build_deepspeed_config(cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = None if "optimizer" in ds_config else torch.optim.AdamW(
        params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    scheduler = None
    if optimizer is not None and "scheduler" not in ds_config:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=params, optimizer=optimizer,
                                           lr_scheduler=scheduler, config=ds_config)
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            engine.load_checkpoint(d, load_module_strict=False)
    device = engine.device

    # ---- the loop
    batches = shard_batches(train_examples, collate, micro, cfg.train.seed, rank, world, state["epoch"])
    window = {"loss": 0.0, "n": 0, "samples": 0, "tokens": 0, "t": time.time()}
    reports_since_checkpoint = 0
    stop_reason = None
    engine.train()
    while state["step"] < cfg.train.max_steps and stop_reason is None:
        for _ in range(cfg.train.grad_accum):
            state["epoch"], batch = next(batches)
            batch = {k: v.to(device) for k, v in batch.items()}
            loss = engine(**batch).loss
            engine.backward(loss)
            if engine.is_gradient_accumulation_boundary():
                methods.after_backward(engine.module, state["step"] + 1, safe_get_full_grad)
            engine.step()
            window["loss"] += loss.item()
            window["n"] += 1
            window["samples"] += batch["input_ids"].shape[0]
            window["tokens"] += int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
        state["step"] += 1
        # Summed over ranks every step: all ranks must agree on divergence, or they would part ways.
        loss_sum, n, samples, tokens = all_reduce([window["loss"], window["n"], window["samples"], window["tokens"]])
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
            metrics.update(task.evaluate(engine, eval_batches, tokenizer))
        else:  # diverged: the worst score, so that schedulers and summaries rank it last
            metrics[target.metric] = float("-inf") if target.mode == "max" else float("inf")
        elapsed = time.time() - clock_start
        score = metrics.get(target.metric)
        if stop_reason is None and state["time_to_quality_s"] is None and score is not None and target.reached(score):
            state["time_to_quality_s"] = elapsed
            if cfg.train.stop_at_target:
                stop_reason = "target_reached"
        if stop_reason is None and state["step"] >= cfg.train.max_steps:
            stop_reason = "budget"
        (peak,) = all_reduce([peak_memory_mb(device)], op="max")
        metrics.update({
            "samples_seen": state["samples"], "tokens_seen": state["tokens"],
            "samples_per_s": samples / max(now - window["t"], 1e-9), "tokens_per_s": tokens / max(now - window["t"], 1e-9),
            "elapsed_s": elapsed, "peak_memory_mb": peak, "trainable_params": trainable, "total_params": total,
            "target_metric": target.metric, "target": target.value, "target_reached": state["time_to_quality_s"] is not None,
            "done": stop_reason is not None, "stop_reason": stop_reason or "",
            "lr": engine.get_lr()[0] if engine.get_lr() else cfg.train.lr,
        })
        if state["time_to_quality_s"] is not None:
            metrics["time_to_quality_s"] = state["time_to_quality_s"]
        gates = methods.gate_values(engine.module)
        if gates:
            metrics["gates"] = gates
            # Every rank must hold the same gates (they come from reduced gradients): checked, not assumed.
            values = list(gates.values())
            high = all_reduce(values, op="max")
            low = all_reduce([-v for v in values], op="max")
            metrics["gate_rank_spread"] = max(h + lo for h, lo in zip(high, low))
        reports_since_checkpoint += 1
        due = cfg.train.checkpoint_every and reports_since_checkpoint >= cfg.train.checkpoint_every
        if due or stop_reason is not None:
            reports_since_checkpoint = 0
            report_with_checkpoint(engine, metrics, state, final=stop_reason is not None)
        else:
            ray.train.report(metrics)
        if master:
            shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in metrics.items() if k != "gates"}
            print(f"[trial] {shown}", flush=True)
        window = {"loss": 0.0, "n": 0, "samples": 0, "tokens": 0, "t": time.time()}

    if torch.distributed.is_initialized():  # leave together: a rank exiting early aborts the others
        torch.distributed.barrier()


def report_with_checkpoint(engine, metrics: dict, state: dict, final: bool) -> None:
    """Every rank writes its DeepSpeed shard into its own folder; Ray merges them in storage.
    Rank 0 adds the adapter alone (methods' format) and the trial state (step, clock, ...)."""
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    with tempfile.TemporaryDirectory() as d:
        engine.save_checkpoint(d, tag="deepspeed", exclude_frozen_parameters=True)
        with gathered_adapter(engine):  # a collective under ZeRO-3: every rank enters
            if rank == 0:
                methods.save_adapter(engine.module, os.path.join(d, ADAPTER_DIR))
                torch.save(state, os.path.join(d, STATE_FILE))
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def gathered_adapter(engine):
    """Full adapter tensors on every rank for the duration (ZeRO-3 partitions them)."""
    import contextlib

    if engine.zero_optimization_stage() < 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(methods.trainable_parameters(engine.module))
