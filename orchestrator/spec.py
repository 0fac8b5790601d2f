"""The sweep file: YAML -> `SweepSpec`, strict, with every error reported at once.

    name: hybrid-bbc                       # MLflow experiment and Ray run name
    data: {name: bbc_news, max_train_samples: 512}
    target: {metric: accuracy, value: 0.8} # defines time-to-quality
    train: {max_steps: 60, batch_size: 16, eval_every: 10}
    methods:                               # each method its own search space
      hybrid:
        lora_ga.lora.r: {choice: [4, 8]}   # keys: the method's config fields, dotted
        boft.n_butterfly_factor: {grid: [1, 2]}
        train.lr: {loguniform: [1.0e-4, 1.0e-3]}   # or train.* / deepspeed.* per method
      lora: {r: 8}
    tune: {num_samples: 2, seeds: [0, 1, 2], scheduler: asha}
    resources: {num_workers: 2, cpus_per_worker: 0.49}

Errors name the file, the line and the key path, and say what was expected; unknown keys are
errors. `load_sweep` never starts Ray. (Over 350 lines: the sweep file's sections, its plan and
its validation, with the error-path handling they share.)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Literal

import yaml

import methods
from methods.config import ConfigError, check, check_choice, from_dict
from orchestrator import space
from orchestrator.config import (
    DeepSpeedConfig,
    ModelConfig,
    ResourcesConfig,
    Target,
    TargetConfig,
    TrainConfig,
    TrialConfig,
    check_model_fit,
    validate_trial,
)
from orchestrator.tasks import DataSpec, get_task

Scheduler = Literal["fifo", "asha"]
SearchAlg = Literal["random", "grid", "optuna"]
# Sections a method's space may override per method (`train.lr`), with their config classes.
TRIAL_SECTIONS = {"train": TrainConfig, "deepspeed": DeepSpeedConfig}


@dataclasses.dataclass(frozen=True)
class TuneSettings:
    """Args:
    num_samples: samples per method (per grid point) from its space.
    seeds: every sampled configuration runs once per seed (the paper runs three).
    scheduler: fifo (run all to the end) | asha (stop weak trials early, in evaluation reports).
    grace_period, reduction_factor: ASHA's, in evaluation reports (an error with fifo; grace_period
        must be below the reports of the longest trial, or ASHA would stop nothing).
    search_alg: random | grid (only grid entries; each once per seed) | optuna (one method per file).
    max_concurrent_trials: cap; null = as many as the resources allow.
    time_budget_s: wall-clock budget of the whole sweep, from the start of Tune's loop; when it
        runs out, running trials stop (stop_reason time_budget), the rest never run (the summary's
        not_run) and the sweep ends normally. A resumed sweep gets what was left. null = none.
    """

    num_samples: int = dataclasses.field(default=1, metadata={"help": "samples per method and grid point"})
    seeds: tuple[int, ...] = dataclasses.field(default=(0,), metadata={"help": "each configuration once per seed"})
    scheduler: Scheduler = dataclasses.field(default="fifo", metadata={"help": "fifo | asha"})
    grace_period: int = dataclasses.field(default=1, metadata={"help": "ASHA: reports before a trial can be stopped"})
    reduction_factor: float = dataclasses.field(default=2, metadata={"help": "ASHA: keep 1/this at each rung"})
    search_alg: SearchAlg = dataclasses.field(default="random", metadata={"help": "random | grid | optuna"})
    max_concurrent_trials: int | None = dataclasses.field(default=None, metadata={"help": "concurrency cap"})
    time_budget_s: float | None = dataclasses.field(default=None, metadata={"help": "whole-sweep wall-clock budget"})

    def __post_init__(self):
        if isinstance(self.seeds, list):
            object.__setattr__(self, "seeds", tuple(self.seeds))
        check(isinstance(self.num_samples, int) and self.num_samples >= 1, "num_samples", self.num_samples, "must be an integer >= 1")
        check(len(self.seeds) >= 1 and all(isinstance(s, int) for s in self.seeds), "seeds", list(self.seeds), "must be a non-empty list of integers")
        check_choice("scheduler", self.scheduler, Scheduler)
        check_choice("search_alg", self.search_alg, SearchAlg)
        check(isinstance(self.grace_period, int) and self.grace_period >= 1, "grace_period", self.grace_period, "must be an integer >= 1")
        check(self.reduction_factor > 1, "reduction_factor", self.reduction_factor, "must be > 1")
        if self.max_concurrent_trials is not None:
            check(isinstance(self.max_concurrent_trials, int) and self.max_concurrent_trials >= 1,
                  "max_concurrent_trials", self.max_concurrent_trials, "must be an integer >= 1 or null")
        if self.time_budget_s is not None:
            check(self.time_budget_s > 0, "time_budget_s", self.time_budget_s, "must be > 0 or null")


@dataclasses.dataclass(frozen=True)
class TrackingSettings:
    """uri: MLflow tracking URI (null = SQLite under the storage folder); experiment: null = sweep name."""

    uri: str | None = dataclasses.field(default=None, metadata={"help": "MLflow tracking URI; null = local SQLite"})
    experiment: str | None = dataclasses.field(default=None, metadata={"help": "MLflow experiment; null = sweep name"})


@dataclasses.dataclass(frozen=True)
class SweepSpec:
    name: str
    data: DataSpec
    methods: dict[str, dict[str, Any]]
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    target: TargetConfig = dataclasses.field(default_factory=TargetConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = dataclasses.field(default_factory=DeepSpeedConfig)
    resources: ResourcesConfig = dataclasses.field(default_factory=ResourcesConfig)
    tune: TuneSettings = dataclasses.field(default_factory=TuneSettings)
    tracking: TrackingSettings = dataclasses.field(default_factory=TrackingSettings)
    storage: str = "runs"
    path: str = ""  # the file it came from (for messages), not a YAML key

    def trial(self, method: str, point: dict[str, Any], seed: int) -> TrialConfig:
        """One trial: the file's sections with the method's point on top. A point's keys are paths
        into the trial: the method's config fields (dotted) or `train.*` / `deepspeed.*` for this
        method alone. Errors carry the sweep file's path (`methods.<method>.<key>`)."""
        where = f"methods.{method}"
        method_values: dict[str, Any] = {}
        sections: dict[str, dict[str, Any]] = {}
        for key, value in point.items():
            head, _, rest = key.partition(".")
            if head in TRIAL_SECTIONS and rest:
                sections.setdefault(head, {})[rest] = value
            else:
                _set_dotted(method_values, key, value)
        replaced = {head: from_dict(TRIAL_SECTIONS[head], {**_asdict(getattr(self, head)), **values}, f"{where}.{head}")
                    for head, values in sections.items()}
        train = dataclasses.replace(replaced.get("train", self.train), seed=seed)
        try:
            return TrialConfig(data=self.data, model=self.model, method=methods.config_for(method, method_values, where),
                               train=train, target=self.target, deepspeed=replaced.get("deepspeed", self.deepspeed),
                               resources=self.resources)
        except ConfigError as e:  # a cross-section check (batch_size per worker): the method's entry set it
            raise ConfigError(f"{where}.{e}" if any(str(e).startswith(h + ".") for h in sections) else str(e)) from None

    def resolve_target(self) -> Target:
        """The target metric, direction and value (checks the task and its data too)."""
        method = next(iter(self.methods))
        return validate_trial(self.trial(method, {}, self.tune.seeds[0]))

    @property
    def num_trials(self) -> int:
        """Trials the sweep will run: its plan's length, or Optuna's num_samples (no plan ahead)."""
        return self.tune.num_samples if self.tune.search_alg == "optuna" else len(self.plan())

    def plan(self) -> list[dict[str, Any]]:
        """Every trial the sweep will run (random/grid): method, point, seed, and the trial's config
        as plain data (`TrialConfig.to_dict`, what crosses the Ray boundary)."""
        trials = []
        for i, (method, entries) in enumerate(self.methods.items()):
            samples = self.tune.num_samples if sampled(entries) and self.tune.search_alg != "grid" else 1
            for point in space.expand(entries, samples, seed=hash_name(self.name, method)):
                for seed in self.tune.seeds:
                    trials.append({"method": method, "point": point, "seed": seed,
                                   "trial": self.trial(method, point, seed).to_dict()})
        return trials


def sampled(entries: dict[str, Any]) -> bool:
    """Whether a method's space has a value to sample (a distribution other than a grid)."""
    return any(space.is_distribution(v) and "grid" not in v for v in entries.values())


def hash_name(*parts: str) -> int:
    """A stable seed from names (Python's hash() is salted per process)."""
    import zlib

    return zlib.crc32("/".join(parts).encode())


def _asdict(obj: Any) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(obj).items()}


def _set_dotted(d: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    for p in parents:
        d = d.setdefault(p, {})
    d[leaf] = value


# ----------------------------------------------------------------------------- loading


def _line_map(text: str) -> dict[str, int]:
    """Dotted key path -> 1-based line, from the YAML node tree."""
    lines: dict[str, int] = {}

    def walk(node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = f"{prefix}.{k.value}" if prefix else str(k.value)
                lines[key] = k.start_mark.line + 1
                walk(v, key)

    try:
        walk(yaml.compose(text), "")
    except yaml.YAMLError:
        pass
    return lines


def _locate(message: str, lines: dict[str, int]) -> str:
    """Prefix the line of the longest key path the message starts with."""
    key = message.split(":", 1)[0].split("=", 1)[0].strip()
    while key and key not in lines:
        key = key.rpartition(".")[0]
    return f"line {lines[key]}: {message}" if key else message


class SweepFileError(ConfigError):
    """All errors of one sweep file; str() lists them one per line."""

    def __init__(self, path: str, errors: list[str]):
        self.path, self.errors = path, errors
        super().__init__("\n".join(f"{path}: {e}" for e in errors))


def load_sweep(path: str, validate_data: bool = True) -> SweepSpec:
    """Read, build and validate a sweep file; raises SweepFileError listing every problem."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise SweepFileError(path, [f"cannot read the file ({e.strerror})"]) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        raise SweepFileError(path, [f"{where}not valid YAML ({getattr(e, 'problem', e)})"]) from None
    lines = _line_map(text)
    errors: list[str] = []
    spec = parse_sweep(raw, errors, path, validate_data)
    if errors:
        raise SweepFileError(path, [_locate(e, lines) for e in errors])
    return spec


def parse_sweep(raw: Any, errors: list[str], path: str = "", validate_data: bool = True) -> SweepSpec | None:
    if not isinstance(raw, dict):
        errors.append(f"expected a mapping of sections (name, data, methods, ...), got {type(raw).__name__}")
        return None
    fields = {f.name: f for f in dataclasses.fields(SweepSpec) if f.name != "path"}
    for key in raw:
        if key not in fields:
            errors.append(f"{key}: unknown section (valid: {', '.join(sorted(fields))})")
    for required in ("name", "data", "methods"):
        if required not in raw:
            errors.append(f"{required}: missing (required)")
    built: dict[str, Any] = {}
    for key, f in fields.items():
        if key not in raw or key == "methods":
            continue
        value = raw[key]
        if key in ("name", "storage"):
            if not isinstance(value, str) or not value or (key == "name" and not _safe_name(value)):
                errors.append(f"{key}={value!r}: expected a non-empty string" + (" of letters, digits, '-', '_', '.'" if key == "name" else ""))
            else:
                built[key] = value
            continue
        try:
            tp = _section_types()[key]
            built[key] = (tp.from_dict if tp is DataSpec else functools.partial(from_dict, tp))(value if value is not None else {}, key)
        except (ConfigError, ValueError) as e:
            errors.append(str(e))
    built_methods = _parse_methods(raw.get("methods"), errors)
    tune = raw.get("tune")
    if "tune" in built and built["tune"].scheduler == "fifo" and isinstance(tune, dict):
        for key in ("grace_period", "reduction_factor"):
            if key in tune:  # an option is honoured or rejected: fifo has no rungs to apply it to
                errors.append(f"tune.{key}: ASHA's setting, but tune.scheduler is fifo, which would ignore it; "
                              f"set scheduler: asha or remove {key}")
    if errors:
        return None
    spec = SweepSpec(path=path, methods=built_methods, **built)
    _check_plan(spec, errors, validate_data)
    return None if errors else spec


def _safe_name(name: str) -> bool:
    return all(c.isalnum() or c in "-_." for c in name)


def _section_types() -> dict[str, type]:
    return {"data": DataSpec, "model": ModelConfig, "target": TargetConfig, "train": TrainConfig,
            "deepspeed": DeepSpeedConfig, "resources": ResourcesConfig, "tune": TuneSettings,
            "tracking": TrackingSettings}


def _parse_methods(raw: Any, errors: list[str]) -> dict[str, dict[str, Any]]:
    if raw is None:
        return {}
    if isinstance(raw, list) and all(isinstance(m, str) for m in raw):
        raw = {m: {} for m in raw}
    if not isinstance(raw, dict) or not raw:
        errors.append("methods: expected a list of method names or a mapping of method -> search space")
        return {}
    out = {}
    for name, entries in raw.items():
        if name not in methods.METHODS:
            errors.append(f"methods.{name}: unknown method (known: {', '.join(sorted(methods.METHODS))})")
            continue
        entries = entries or {}
        if not isinstance(entries, dict):
            errors.append(f"methods.{name}: expected a mapping of setting -> value or distribution")
            continue
        flat = _flatten(entries)
        for key, value in flat.items():
            try:
                space.check_entry(f"methods.{name}.{key}", value)
            except ConfigError as e:
                errors.append(str(e))
        out[name] = flat
    return out


def _flatten(entries: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{gate: {tau: 1}}` and `gate.tau: 1` are the same entry; distributions stay whole."""
    out = {}
    for key, value in entries.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and not _looks_like_distribution(value):
            out.update(_flatten(value, full))
        else:
            out[full] = value
    return out


def _looks_like_distribution(value: dict) -> bool:
    """A one-key mapping whose value is a list: meant as a distribution (maybe a misspelt one)."""
    return len(value) == 1 and isinstance(next(iter(value.values())), list)


def _check_plan(spec: SweepSpec, errors: list[str], validate_data: bool) -> None:
    """Every corner of every method's space must build a valid trial; data and target checked once."""
    if spec.tune.search_alg == "optuna" and len(spec.methods) > 1:
        errors.append("tune.search_alg='optuna': needs one method per sweep file (Optuna's space is flat); "
                      "use random or grid to compare several methods in one sweep")
    if spec.tune.search_alg == "optuna" and len(spec.tune.seeds) > 1:
        errors.append(f"tune.seeds={list(spec.tune.seeds)}: search_alg='optuna' runs one seed per suggestion; give one seed")
    if spec.tune.search_alg == "optuna":
        for method, entries in spec.methods.items():
            for key, value in entries.items():
                if space.is_distribution(value) and "grid" in value:
                    errors.append(f"methods.{method}.{key}: search_alg=optuna samples its space and has no grid; "
                                  "use choice for a set of values")
    if spec.tune.num_samples > 1 and spec.tune.search_alg != "optuna":
        # num_samples draws from the methods' distributions (a method without any runs its fixed and
        # grid values once per seed, as `--dry-run` shows); with none anywhere it would change nothing.
        if spec.tune.search_alg == "grid":
            errors.append(f"tune.num_samples={spec.tune.num_samples}: search_alg=grid runs each grid point once per "
                          "seed; set num_samples: 1 (seeds are the repeats)")
        elif not any(sampled(entries) for entries in spec.methods.values()):
            errors.append(f"tune.num_samples={spec.tune.num_samples}: no method has a sampled value (only fixed and "
                          "grid values), so every sample would be the same trial; set num_samples: 1 (seeds are "
                          "the repeats) or give a method a distribution")
    if spec.tune.search_alg == "grid":
        for method, entries in spec.methods.items():
            for key, value in entries.items():
                if space.is_distribution(value) and "grid" not in value:
                    errors.append(f"methods.{method}.{key}: search_alg=grid takes grid entries or fixed values only")
    checked_data = False
    fitted: set[str] = set()  # method configs already built against the model (train.* corners share one)
    reports = 0  # the most evaluation reports any trial makes (ASHA's max_t; corners hold the extremes)
    for method, entries in spec.methods.items():
        for corner in space.corners(entries):
            values = ", ".join(f"{k}={v}" for k, v in corner.items()) or "defaults"
            try:
                cfg = spec.trial(method, corner, spec.tune.seeds[0])
                reports = max(reports, cfg.train.reports)
                key = repr(cfg.method)
                if validate_data and not checked_data:
                    validate_trial(cfg, where=f"methods.{method} ({values})")  # data, target and this corner's fit
                    checked_data = True
                elif validate_data and key not in fitted:  # every other corner: its layers against the model's shapes
                    check_model_fit(cfg, get_task(cfg.data.name), where=f"methods.{method} ({values})")
                fitted.add(key)
            except (ConfigError, ValueError) as e:
                msg = str(e)  # a train.* / deepspeed.* check of the whole trial: the method's entry set it
                if any(msg.startswith(h + ".") and any(k.startswith(h + ".") for k in entries) for h in TRIAL_SECTIONS):
                    msg = f"methods.{method}.{msg}"
                if msg not in errors:
                    errors.append(msg)
                break
    t = spec.tune
    if t.scheduler == "asha" and reports and t.grace_period >= reports:
        errors.append(f"tune.grace_period={t.grace_period}: trials report at most {reports} time(s) "
                      "(train.max_steps / train.eval_every), so ASHA would stop no trial early; "
                      "lower grace_period, evaluate more often, or use scheduler: fifo")
