"""The task contract: what a sweep file says about data (`DataSpec`) and what a task provides (`Task`).

A trial needs four things from its task, and nothing else:

    train, eval = task.load(spec)                        # plain list[dict]s, deterministic by spec.seed
    batch = task.collate(tokenizer, examples, max_length=spec.max_length)   # dict[str, Tensor]
    eval_batch = task.collate_eval(tokenizer, examples, spec)  # the same, plus what scoring needs
    scores = task.evaluate(model, eval_batches, tokenizer)  # {"eval_loss": ..., <task metrics>}
    task.mode_of(metric), task.default_metric, task.default_target   # what "reached quality" means

Generative tasks (GSM8K, HumanEval, FLORES, MT-Bench) score text the model writes: their eval
batches also carry the prompts, left-padded, and the examples themselves, and `evaluate` decodes
with the tokenizer. Metrics may carry a per-language suffix (`accuracy/fr`); the direction is the
base metric's.

Examples are plain dicts of str/int so they pickle cheaply across the Ray boundary; tokenization
happens in `collate`, on the worker, with the model's own tokenizer.

`Task.validate(spec)` checks everything checkable without a model or a full read of the data (file
exists, extension, split names, required columns from the header or schema), so `orchestrate
validate` fails before `ray.init` and names the file and the field at fault. Error messages use the
sweep file's key names under `data.` (e.g. `data.data_files.train=x.csv: missing column 'label'`).
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Literal

import torch

from . import files

Kind = Literal["classification", "causal_lm"]
Mode = Literal["max", "min"]

# Metrics where lower is better; every other metric a task reports is maximised.
MINIMIZED_METRICS = frozenset({"eval_loss", "perplexity", "judge_unparsed"})


def fail(field: str, value: Any, expected: str):
    """The error of one `data:` key, named as in the sweep file."""
    raise ValueError(f"data.{field}={value!r}: {expected}")


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_count(obj: Any, field: str, optional: bool = True) -> None:
    """`field` is an integer >= 1 (or null, if optional)."""
    value = getattr(obj, field)
    if not (optional and value is None) and (not is_int(value) or value < 1):
        fail(field, value, "must be an integer >= 1" + (" or null" if optional else ""))


@dataclasses.dataclass(frozen=True)
class TaskOptions:
    """A task's own `data:` keys, beside DataSpec's common ones (each task declares its subclass
    as `Task.options_cls`; a task with none has this, empty). Subclasses check their fields in
    `__post_init__`, calling super's first, and their defaults are the only defaults."""

    def __post_init__(self):
        pass

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """The `data:` section of a sweep file: the keys every task reads, and the task's own (its
    `options`, written beside the common keys in the file: `data: {name: xnli, languages: [fr]}`).

    Args:
        name: task registry key, e.g. "glue/sst2", "bbc_news", "instructions".
        data_files: split name -> local .csv/.jsonl/.parquet path. None = the task's own source
            (the Hugging Face Hub for GLUE, the installed package for bbc_news / tweet_sentiment).
        text_field: override the text column name (single-text tasks only; for instructions the
            instruction column).
        label_field: override the label column name (for instructions the response column).
        max_length: tokens per example after truncation (collate pads to the batch's longest).
        max_train_samples: keep a seeded random subset of this many training examples.
        max_eval_samples: the same for the eval split (evaluation time counts in time-to-quality).
        eval_fraction: share of the examples held out for eval when the source has no eval split.
        seed: seeds the held-out split and the subsets; same seed, same examples.
        options: the task's own settings (`Task.options_cls`; `orchestrate describe TASK` lists them).
    """

    name: str = dataclasses.field(metadata={"help": "task registry key, e.g. glue/sst2, bbc_news"})
    data_files: dict[str, str] | None = dataclasses.field(
        default=None, metadata={"help": "split -> local .csv/.jsonl/.parquet path; null = the task's own source"})
    text_field: str | None = dataclasses.field(default=None, metadata={"help": "text column override"})
    label_field: str | None = dataclasses.field(default=None, metadata={"help": "label column override"})
    max_length: int = dataclasses.field(default=128, metadata={"help": "tokens per example after truncation"})
    max_train_samples: int | None = dataclasses.field(default=None, metadata={"help": "seeded subset of train"})
    max_eval_samples: int | None = dataclasses.field(default=None, metadata={"help": "seeded subset of eval"})
    eval_fraction: float = dataclasses.field(
        default=0.1, metadata={"help": "held-out share when the source has no eval split, in (0, 1)"})
    seed: int = dataclasses.field(default=0, metadata={"help": "seeds the split and the subsets"})
    # Given as None or a mapping: the task's options are built from it (their defaults for None).
    options: TaskOptions | Mapping[str, Any] | None = dataclasses.field(
        default=None, metadata={"help": "the task's own settings"})

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            fail("name", self.name, "must be a non-empty task name")
        if self.data_files is not None:
            if not isinstance(self.data_files, Mapping) or not self.data_files:
                fail("data_files", self.data_files, "must be a non-empty mapping of split name -> file path, or null")
            for split, path in self.data_files.items():
                if not isinstance(split, str) or not isinstance(path, str) or not path:
                    fail("data_files", self.data_files, f"split {split!r}: expected a split name mapped to a file path")
            object.__setattr__(self, "data_files", dict(self.data_files))  # a copy: the caller's dict may change
        for field in ("text_field", "label_field"):
            value = getattr(self, field)
            if value is not None and (not isinstance(value, str) or not value):
                fail(field, value, "must be a column name or null")
        if not is_int(self.max_length) or self.max_length < 2:
            fail("max_length", self.max_length, "must be an integer >= 2")
        for field in ("max_train_samples", "max_eval_samples"):
            check_count(self, field)
        if isinstance(self.eval_fraction, bool) or not isinstance(self.eval_fraction, (int, float)) \
                or not 0 < self.eval_fraction < 1:
            fail("eval_fraction", self.eval_fraction, "must be a number in (0, 1)")
        if not is_int(self.seed) or self.seed < 0:
            fail("seed", self.seed, "must be an integer >= 0")
        task = _registry().get(self.name)
        if task is None and self.options:  # its keys cannot be checked: the name is what is wrong
            from . import get_task

            get_task(self.name)  # raises, naming data.name and the known tasks
        cls = task.options_cls if task is not None else TaskOptions  # an unknown task: validation names it
        if self.options is None or isinstance(self.options, Mapping):
            object.__setattr__(self, "options", _task_options(cls, dict(self.options or {}), self.name))
        elif type(self.options) is not cls:
            raise ValueError(f"data.options: task {self.name} takes {cls.__name__}, got {type(self.options).__name__}")

    @classmethod
    def from_dict(cls, data: Any, path: str = "data") -> DataSpec:
        """From the sweep file's flat form: the common keys, the rest the task's own options."""
        from methods.config import ConfigError, from_dict

        if not isinstance(data, Mapping):
            raise ConfigError(f"{path}: expected a mapping of data settings, got {type(data).__name__}")
        common = {f.name for f in dataclasses.fields(cls)} - {"options"}
        own = {k: v for k, v in data.items() if k not in common}
        try:
            return from_dict(cls, {**{k: v for k, v in data.items() if k in common}, "options": own}, path)
        except ConfigError:
            raise
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def to_dict(self) -> dict[str, Any]:
        """The flat form, as in a sweep file (what crosses the Ray boundary and is logged)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "options"}
        return {**out, **self.options.to_dict()}


def _task_options(cls: type[TaskOptions], values: dict[str, Any], task: str) -> TaskOptions:
    """The task's options from their keys; a key of another task's options says which tasks take it
    (set to null it says nothing, and is dropped)."""
    from methods.config import from_dict

    known = {f.name for f in dataclasses.fields(cls)}
    for key, value in list(values.items()):
        if key not in known:
            if value is None and any(key in t.option_names() for t in _registry().values()):
                del values[key]
                continue
            users = sorted(n for n, t in _registry().items() if key in t.option_names())
            if users:
                raise ValueError(f"data.{key}: task {task} does not use it (tasks that do: {', '.join(users)})")
            valid = sorted({f.name for f in dataclasses.fields(DataSpec)} - {"options"} | known)
            raise ValueError(f"data.{key}: unknown key for DataSpec (valid keys: {', '.join(valid)})")
    try:
        return from_dict(cls, values, "data")
    except ValueError as e:  # plain: DataSpec's own from_dict adds no second `data.`
        raise ValueError(str(e)) from None


class Task(abc.ABC):
    """One task: where its examples come from, how they become tensors, how a model is scored.

    Subclasses set the class/instance attributes below and implement `load`, `collate`, `evaluate`
    and `columns`. `validate` is shared: it checks `data_files` against `split_names` and the
    header of every file against `columns(spec)`.
    """

    name: str
    kind: Kind
    metrics: tuple[str, ...]  # what evaluate() returns; "eval_loss" wherever there are reference answers
    default_metric: str
    default_target: float  # time-to-quality threshold on default_metric (see each task's docstring)
    num_labels: int | None = None  # classification only
    split_names: tuple[str, ...] = ("train", "validation")  # data_files keys accepted; the training split first
    needs_files: bool = False  # True: no built-in source, data_files is required
    # The task's own `data:` keys (setting one of another task's is an error, not a no-op).
    options_cls: type[TaskOptions] = TaskOptions
    default_max_new_tokens: int = 0  # generative tasks: tokens generated per answer unless data.max_new_tokens

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls.options_cls))

    def new_tokens(self, spec: DataSpec) -> int:
        """Tokens generated per answer: data.max_new_tokens, else the task's default; 0 for a task
        that generates nothing. Resolved here only (evaluation, validation and --smoke-test)."""
        return (getattr(spec.options, "max_new_tokens", None) or self.default_max_new_tokens) \
            if "max_new_tokens" in self.option_names() else 0

    def auto_model(self):
        """The transformers auto class of the model this task trains, chosen here only: the worker
        loads the weights with it, validation builds the architecture on the meta device."""
        import transformers

        if self.kind == "classification":
            return transformers.AutoModelForSequenceClassification
        return transformers.AutoModelForCausalLM

    def model_options(self) -> dict[str, Any]:
        """What the auto class needs beyond the checkpoint (a classification head's label count)."""
        return {"num_labels": self.num_labels} if self.kind == "classification" else {}

    def metrics_for(self, spec: DataSpec) -> tuple[str, ...]:
        """Every metric `evaluate` returns for this spec (per-language ones included)."""
        return self.metrics

    def mode_of(self, metric: str) -> Mode:
        """"min" for losses, "max" for scores; a metric this task does not report is an error."""
        base = metric.split("/", 1)[0]  # accuracy/fr is maximised like accuracy
        if base not in self.metrics:
            raise ValueError(f"metric {metric!r}: task {self.name} reports {', '.join(self.metrics)}")
        return "min" if base in MINIMIZED_METRICS else "max"

    @property
    def mode(self) -> Mode:
        return self.mode_of(self.default_metric)

    # -- validation ---------------------------------------------------------------------------

    def columns(self, spec: DataSpec) -> list[tuple[str, str]]:
        """Required (column, DataSpec field that names it) pairs for this spec's files."""
        raise NotImplementedError

    def sources(self, spec: DataSpec) -> dict[str, tuple[str, str]]:
        """split -> (file path, how to name it in messages). Tasks with a packaged default override."""
        return {split: (path, f"data.data_files.{split}={path}") for split, path in (spec.data_files or {}).items()}

    def validate(self, spec: DataSpec) -> None:
        """Raise ValueError naming file and field for anything wrong that needs no model to find."""
        if spec.name != self.name:
            raise ValueError(f"data.name={spec.name!r}: this is task {self.name!r}")
        if spec.data_files is not None:
            if not self.split_names:
                raise ValueError(f"data.data_files: task {self.name} reads its installed corpus and takes no "
                                 "files; leave data_files unset")
            unknown = sorted(set(spec.data_files) - set(self.split_names))
            if unknown:
                raise ValueError(f"data.data_files.{unknown[0]}: unknown split for task {self.name} "
                                 f"(expected {', '.join(self.split_names)})")
            if self.split_names[0] not in spec.data_files:
                raise ValueError(f"data.data_files: task {self.name} needs a {self.split_names[0]!r} file "
                                 f"(it trains on that split)")
        elif self.needs_files:
            raise ValueError(f"data.data_files: task {self.name} has no built-in data; give local files, "
                             f"e.g. {{train: train.jsonl, validation: eval.jsonl}}")
        sources = self.sources(spec)
        required = self.columns(spec) if sources else []
        for path, where in sources.values():
            found = files.read_columns(path, where)
            for column, field in required:
                if column not in found:
                    raise ValueError(f"{where}: missing column {column!r} (data.{field}); "
                                     f"columns found: {', '.join(found) or 'none'}")

    # -- the contract the trial loop uses -----------------------------------------------------

    @abc.abstractmethod
    def load(self, spec: DataSpec) -> tuple[list[dict], list[dict]]:
        """(train, eval) examples; deterministic by spec.seed, eval disjoint from train."""

    @abc.abstractmethod
    def collate(self, tokenizer, examples: list[dict], max_length: int = 128) -> dict[str, torch.Tensor]:
        """Tokenize a batch: input_ids, attention_mask, labels; padded to the longest, truncated."""

    def collate_eval(self, tokenizer, examples: list[dict], spec: DataSpec) -> dict[str, Any]:
        """One eval batch. Scored tasks need only the training batch; generative ones add prompts."""
        return self.collate(tokenizer, examples, max_length=spec.max_length)

    @abc.abstractmethod
    def evaluate(self, model: torch.nn.Module, batches: Iterable[dict[str, Any]], tokenizer=None) -> dict[str, float]:
        """{"eval_loss": ..., <metrics>} over all batches; eval mode, no grad, training mode restored.
        `tokenizer` is needed by generative tasks only (to decode what the model wrote)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


def _registry() -> dict[str, Task]:
    from . import TASKS  # late: the registry imports this module

    return TASKS


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.device]:
    """Evaluation mode for the block (restoring the training flag after); yields the batches' device."""
    was_training = model.training
    model.eval()
    try:
        yield model_device(model)
    finally:
        model.train(was_training)


def model_device(model: torch.nn.Module) -> torch.device:
    """Where to put the batches: HF models and DeepSpeed engines have `.device`; else the first parameter."""
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(model.parameters()).device
