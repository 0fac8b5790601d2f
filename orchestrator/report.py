"""The trial report: every number a trial reports, with its unit, meaning and direction, the
columns every table shows, and the one rule that ranks trials and groups of seeds.

The worker builds its reports from `FIELDS` (nothing else), and progress, the sweep summary,
tracking, compare and the CLI read them from here. A new per-trial metric is one `Field` here
plus the code that measures it.

Clocks (seconds; see worker.py for where each starts and stops):

    elapsed_s = setup_s + method_init_s + train_s + eval_s + checkpoint_s + report overhead
    time_to_quality_s        wall clock from the worker's start (MLPerf's rule: never pauses)
    train_time_to_quality_s  method_init_s + train_s + eval_s at the report that reached the
                             target: what the method costs, without process start, model load,
                             DeepSpeed engine and op builds, or checkpoint writes (MLPerf leaves
                             initialisation untimed too). The default for comparing methods.

Memory (MB = 2^20 bytes, max over ranks): on GPU `peak_memory_mb` is torch's peak allocated
memory since the trial started (reserved beside it); on CPU it is the trial's tensor memory,
counted: weights + gradients + optimizer state (as DeepSpeed partitions them on this rank) + the
peak of activations saved for backward over a training step. Process RSS is reported apart.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Iterable
from typing import Any, Literal

Mode = Literal["min", "max"]


@dataclasses.dataclass(frozen=True)
class Field:
    name: str
    unit: str
    help: str
    mode: Mode | None = None  # which way is better, where it is compared
    metric: bool = True  # a number logged as an MLflow metric
    compared: bool = False  # a column of `orchestrate compare` (median over seeds, per trial in its CSVs)


FIELDS: dict[str, Field] = {f.name: f for f in (
    Field("step", "steps", "optimizer steps done", metric=False),
    Field("train_loss", "", "mean training loss since the previous report", "min"),
    Field("samples_seen", "samples", "training samples consumed, all ranks"),
    Field("tokens_seen", "tokens", "non-padding training tokens consumed, all ranks"),
    Field("samples_per_s", "samples/s", "training throughput since the previous report (wall)", "max"),
    Field("tokens_per_s", "tokens/s", "training token throughput since the previous report (wall)", "max"),
    Field("elapsed_s", "s", "wall clock since the worker started (restarts included)"),
    Field("setup_s", "s", "process and worker start, model load, data, DeepSpeed engine (and any op build)"),
    Field("method_init_s", "s", "method initialisation on the device (LoRA-GA's gradient pass, ...)"),
    Field("train_s", "s", "forward, backward and optimizer steps"),
    Field("eval_s", "s", "evaluations"),
    Field("checkpoint_s", "s", "checkpoint writes"),
    Field("worker_start_s", "s", "from the trainer's launch to the worker loop's start (worker group start; first launch only)"),
    Field("train_time_to_quality_s", "s", "method_init_s + train_s + eval_s at the first report at target", "min", compared=True),
    Field("time_to_quality_s", "s", "wall clock from worker start to the first report at target", "min", compared=True),
    Field("samples_to_quality", "samples", "samples consumed when the target was first reached", "min", compared=True),
    Field("tokens_to_quality", "tokens", "tokens consumed when the target was first reached", "min"),
    Field("peak_memory_mb", "MB", "GPU: peak allocated; CPU: counted tensor memory (sum of the parts)", "min", compared=True),
    Field("memory_weights_mb", "MB", "parameters held by this rank (ZeRO-3: its partition)", compared=True),
    Field("memory_gradients_mb", "MB", "gradients of trainable parameters held by this rank (ZeRO-2/3: its partition)", compared=True),
    Field("memory_optimizer_mb", "MB", "optimizer state and master weights held by this rank (as DeepSpeed partitions them)", compared=True),
    Field("memory_activations_mb", "MB", "peak of tensors saved for backward over a measured training step", compared=True),
    Field("gpu_reserved_mb", "MB", "GPU: peak memory reserved by torch's caching allocator"),
    Field("rss_peak_mb", "MB", "max resident set size of the worker process", compared=True),
    Field("rss_above_baseline_mb", "MB", "max RSS minus the RSS before the model was loaded"),
    Field("trainable_params", "params", "parameters the optimizer updates", "min", compared=True),
    Field("total_params", "params", "all parameters of the adapted model"),
    Field("concurrent_trials", "trials", "most other trials that trained on this node at the same time", compared=True),
    Field("num_nodes", "nodes", "distinct nodes the trial's workers ran on"),
    Field("cpu_threads", "threads", "torch intra-op threads per worker (CPU: the pinned cores)", metric=False),
    Field("layer_rank_spread", "", "largest difference of a per-layer diagnostic between ranks (0: replicas agree)", "min"),
    Field("lr", "", "learning rate after the step"),
    Field("target_reached", "bool", "the target was reached at or before this report"),
    Field("done", "bool", "the last report of the trial", metric=False),
    Field("stop_reason", "", "target_reached | budget | diverged | stalled (the worker); early_stopped, time_budget, error (the sweep)", metric=False),
    Field("target_metric", "", "the metric the target is on", metric=False),
    Field("target", "", "the target value", metric=False),
    Field("layers", "", "per-layer diagnostics of the method ({layer: {name: value}}, e.g. the hybrid's gate)", metric=False),
)}

CLOCK_PARTS = ("setup_s", "method_init_s", "train_s", "eval_s", "checkpoint_s")
MEMORY_PARTS = ("memory_weights_mb", "memory_gradients_mb", "memory_optimizer_mb", "memory_activations_mb")
# What a comparison of trials quotes, in this order: every table starts from these.
TIME_TO_QUALITY = "train_time_to_quality_s"
COLUMNS = ("step", "train_time_to_quality_s", "time_to_quality_s", "peak_memory_mb", "stop_reason")
SHORT = {"train_time_to_quality_s": "train_ttq_s", "time_to_quality_s": "wall_ttq_s", "peak_memory_mb": "peak_mb",
         "stop_reason": "stop", "samples_to_quality": "samples_ttq", "rss_peak_mb": "rss_mb"}
# Final numbers copied from the last report to a trial's summary (sweep summary, MLflow).
SUMMARY = ("step", "time_to_quality_s", "train_time_to_quality_s", "samples_to_quality", "tokens_to_quality",
           "peak_memory_mb", *MEMORY_PARTS, "gpu_reserved_mb", "rss_peak_mb", "rss_above_baseline_mb",
           "trainable_params", "total_params", "elapsed_s", *CLOCK_PARTS, "concurrent_trials")


def short(name: str) -> str:
    return SHORT.get(name, name)


def mode_of(name: str, target_metric: str | None = None, target_mode: Mode | None = None) -> Mode | None:
    """Which way `name` is better: the target's own mode for the target metric (a task metric:
    loss is min, accuracy max), else the field's."""
    if target_metric is not None and name == target_metric:
        return target_mode
    field = FIELDS.get(name)
    return field.mode if field else None


def is_metric(name: str, value: Any) -> bool:
    """A report entry logged as an MLflow metric: a number that is not bookkeeping."""
    field = FIELDS.get(name)
    if field is not None and not field.metric:
        return False
    return isinstance(value, (int, float))


# ----------------------------------------------------------------------------- seeds and ranking


def censored_median(times: Iterable[float | None]) -> float:
    """Median over every seed, a seed that never reached the target counted as +inf (censored,
    not absent): a method that reached in 1 of 3 seeds has an infinite median."""
    values = sorted(math.inf if t is None else float(t) for t in times)
    return statistics.median(values) if values else math.inf


def rank_key(reached: int, runs: int, ttq_median: float | None, metric: float | None, mode: Mode) -> tuple:
    """The one ranking rule, for single trials and groups of seeds alike (larger is better):
    the share of runs that reached the target, then the censored median time-to-quality, then the
    final metric. Times compare only within the same reached share."""
    share = reached / runs if runs else 0.0
    ttq = math.inf if ttq_median is None else ttq_median
    quality = -math.inf if metric is None or not math.isfinite(metric) else (metric if mode == "max" else -metric)
    return (share, -ttq, quality)


def trial_key(trial: dict[str, Any], mode: Mode) -> tuple:
    """`rank_key` of one trial's summary (sweep.summarize's entries): reached or not, then its time."""
    ttq = trial.get(TIME_TO_QUALITY)
    return rank_key(int(ttq is not None), 1, ttq, trial.get("metric"), mode)


def unknown_fields(metrics: dict[str, Any], task_metrics: Iterable[str]) -> list[str]:
    """Report keys that have no entry here (nor are the task's own metrics): a schema gap."""
    return sorted(set(metrics) - set(FIELDS) - set(task_metrics) - {"eval_loss"})


def finite(x) -> float | None:
    """A finite number or None: MLflow stores a diverged trial's +-inf as +-1.8e308."""
    return float(x) if x is not None and math.isfinite(float(x)) and abs(float(x)) < 1e300 else None
