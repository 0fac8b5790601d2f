"""The task contract: what a sweep file says about data (`DataSpec`) and what a task provides (`Task`).

A trial needs four things from its task, and nothing else:

    train, eval = task.load(spec)                        # plain list[dict]s, deterministic by spec.seed
    batch = task.collate(tokenizer, examples, max_length=spec.max_length)   # dict[str, Tensor]
    scores = task.evaluate(model, batches)               # {"eval_loss": ..., <task metrics>}
    task.mode_of(metric), task.default_metric, task.default_target   # what "reached quality" means

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
MINIMIZED_METRICS = frozenset({"eval_loss", "perplexity"})


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """The `data:` section of a sweep file.

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

    def __post_init__(self):
        def fail(field: str, expected: str):
            raise ValueError(f"data.{field}={getattr(self, field)!r}: {expected}")

        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        if not isinstance(self.name, str) or not self.name:
            fail("name", "must be a non-empty task name")
        if self.data_files is not None:
            if not isinstance(self.data_files, Mapping) or not self.data_files:
                fail("data_files", "must be a non-empty mapping of split name -> file path, or null")
            for split, path in self.data_files.items():
                if not isinstance(split, str) or not isinstance(path, str) or not path:
                    fail("data_files", f"split {split!r}: expected a split name mapped to a file path")
            object.__setattr__(self, "data_files", dict(self.data_files))  # a copy: the caller's dict may change
        for field in ("text_field", "label_field"):
            value = getattr(self, field)
            if value is not None and (not isinstance(value, str) or not value):
                fail(field, "must be a column name or null")
        if not is_int(self.max_length) or self.max_length < 2:
            fail("max_length", "must be an integer >= 2")
        for field in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, field)
            if value is not None and (not is_int(value) or value < 1):
                fail(field, "must be an integer >= 1 or null")
        if isinstance(self.eval_fraction, bool) or not isinstance(self.eval_fraction, (int, float)) \
                or not 0 < self.eval_fraction < 1:
            fail("eval_fraction", "must be a number in (0, 1)")
        if not is_int(self.seed) or self.seed < 0:
            fail("seed", "must be an integer >= 0")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Task(abc.ABC):
    """One task: where its examples come from, how they become tensors, how a model is scored.

    Subclasses set the class/instance attributes below and implement `load`, `collate`, `evaluate`
    and `columns`. `validate` is shared: it checks `data_files` against `split_names` and the
    header of every file against `columns(spec)`.
    """

    name: str
    kind: Kind
    metrics: tuple[str, ...]  # what evaluate() returns; always includes "eval_loss"
    default_metric: str
    default_target: float  # time-to-quality threshold on default_metric (see each task's docstring)
    num_labels: int | None = None  # classification only
    split_names: tuple[str, ...] = ("train", "validation")  # data_files keys accepted; "train" first
    needs_files: bool = False  # True: no built-in source, data_files is required

    def mode_of(self, metric: str) -> Mode:
        """"min" for losses, "max" for scores; a metric this task does not report is an error."""
        if metric not in self.metrics:
            raise ValueError(f"metric {metric!r}: task {self.name} reports {', '.join(self.metrics)}")
        return "min" if metric in MINIMIZED_METRICS else "max"

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
            if "train" not in spec.data_files:
                raise ValueError(f"data.data_files: task {self.name} needs a 'train' file")
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

    @abc.abstractmethod
    def evaluate(self, model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> dict[str, float]:
        """{"eval_loss": ..., <metrics>} over all batches; eval mode, no grad, training mode restored."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


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
