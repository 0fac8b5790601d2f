"""Sequence classification: one or two texts -> one of `num_labels` classes; and the GLUE tasks.

Examples are `{"text": str, "label": int}` plus `"text_pair": str` for sentence-pair tasks. The
model is any `AutoModelForSequenceClassification` (it must return `.logits`, shape (B, num_labels));
`evaluate` computes the cross-entropy itself, summed over examples and divided by their count, so
a short last batch weighs what it should.

GLUE (Wang et al. 2019, https://gluebenchmark.com) comes from the Hugging Face Hub as
`datasets.load_dataset("nyu-mll/glue", <config>)`, or from local files with the same columns as
that dataset (csv/jsonl/parquet; labels as ints or as the label names below; an `idx` column may
be present and is ignored). Splits: "train" and "validation" ("validation_matched" for MNLI); the
GLUE test split has no labels (-1) and is rejected. Metrics follow GLUE (see `metrics.py`).

| task | text columns | labels | metric (default first) | default target |
|---|---|---|---|---|
| glue/cola | sentence | unacceptable, acceptable | matthews_correlation | 0.35 |
| glue/sst2 | sentence | negative, positive | accuracy | 0.88 |
| glue/mrpc | sentence1, sentence2 | not_equivalent, equivalent | f1, accuracy | 0.85 |
| glue/qqp | question1, question2 | not_duplicate, duplicate | f1, accuracy | 0.80 |
| glue/mnli | premise, hypothesis | entailment, neutral, contradiction | accuracy (matched) | 0.75 |
| glue/qnli | question, sentence | entailment, not_entailment | accuracy | 0.85 |
| glue/rte | sentence1, sentence2 | entailment, not_entailment | accuracy | 0.60 |

Default targets are our choice and were not measured here (GLUE is not available offline): a few
points under the dev-set scores reported for small distilled BERTs (6 layers, width 384, e.g.
MiniLM, Wang et al. 2020), so that a reasonable method reaches them and time-to-quality separates
the methods. The threshold decides the ranking (DAWNBench's lesson): a sweep for another model
should set its own.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

from . import files, splits
from .base import DataSpec, Task, eval_mode
from .distributed import sharded_map
from .metrics import CLASSIFICATION_METRICS, per_group


class ClassificationTask(Task):
    """Classification from tables of (text[, text_pair], label) rows; subclasses choose the source."""

    kind = "classification"

    def __init__(self, name: str, label_names: tuple[str, ...], text_columns: tuple[str, ...],
                 metrics: tuple[str, ...], default_target: float, label_column: str = "label",
                 split_names: tuple[str, ...] = ("train", "validation")):
        if not 1 <= len(text_columns) <= 2:
            raise ValueError(f"{name}: one or two text columns, got {text_columns}")
        if set(metrics) - set(CLASSIFICATION_METRICS):
            raise ValueError(f"{name}: unknown metrics {sorted(set(metrics) - set(CLASSIFICATION_METRICS))}")
        self.name = name
        self.label_names = tuple(label_names)
        self.num_labels = len(label_names)
        self.text_columns = tuple(text_columns)
        self.label_column = label_column
        self.metrics = ("eval_loss", *metrics)
        self.default_metric = metrics[0]
        self.default_target = default_target
        self.split_names = split_names
        self.eval_split = split_names[1] if len(split_names) > 1 else None

    # -- columns and validation ---------------------------------------------------------------

    def text_columns_for(self, spec: DataSpec) -> tuple[str, ...]:
        if spec.text_field is None:
            return self.text_columns
        if len(self.text_columns) > 1:
            raise ValueError(f"data.text_field={spec.text_field!r}: task {self.name} has two text columns "
                             f"({', '.join(self.text_columns)}); rename the columns in the file instead")
        return (spec.text_field,)

    def columns(self, spec: DataSpec) -> list[tuple[str, str]]:
        return [(c, "text_field") for c in self.text_columns_for(spec)] + \
               [(spec.label_field or self.label_column, "label_field")]

    # -- loading ------------------------------------------------------------------------------

    def read(self, spec: DataSpec) -> dict[str, tuple[str, dict[str, list]]]:
        """split -> (where, column -> values); the local files by default."""
        wanted = [c for c, _ in self.columns(spec)]
        return {split: (where, files.read_table(path, wanted, where))
                for split, (path, where) in self.sources(spec).items()}

    def load(self, spec: DataSpec) -> tuple[list[dict], list[dict]]:
        self.validate(spec)
        tables = self.read(spec)
        texts, label_col = self.text_columns_for(spec), spec.label_field or self.label_column
        examples = {split: self.examples(table, texts, label_col, where) for split, (where, table) in tables.items()}
        train = examples["train"]
        if self.eval_split in examples:
            evals = examples[self.eval_split]
        else:  # no eval split in the source: hold one out, keeping duplicate texts on one side
            train, evals = splits.holdout(train, spec.eval_fraction, spec.seed,
                                          key=lambda ex: (ex["text"], ex.get("text_pair")))
        return (splits.subsample(train, spec.max_train_samples, spec.seed, "train"),
                splits.subsample(evals, spec.max_eval_samples, spec.seed, "eval"))

    def examples(self, table: dict[str, list], texts: tuple[str, ...], label_col: str, where: str) -> list[dict]:
        keys = ("text", "text_pair")[:len(texts)]
        if not table[label_col]:
            raise ValueError(f"{where}: no rows")
        out = []
        for row, label in enumerate(table[label_col]):
            ex = {"label": self.label_id(label, where, row, label_col)}
            for key, column in zip(keys, texts):
                value = table[column][row]
                if value is None:
                    raise ValueError(f"{where}: row {row}: column {column!r} is empty")
                ex[key] = str(value)
            out.append(ex)
        return out

    def label_id(self, value, where: str, row: int, column: str) -> int:
        """An int in [0, num_labels) from an int, an integral float, a digit string or a label name."""
        if isinstance(value, str):
            value = value.strip()
            if value in self.label_names:
                return self.label_names.index(value)
            if value.lstrip("-").isdigit():
                value = int(value)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < self.num_labels:
            return value
        hint = " (GLUE test files have no labels; use train/validation)" if value == -1 else ""
        raise ValueError(f"{where}: row {row}: column {column!r} = {value!r} is not a label of {self.name} "
                         f"(expected 0..{self.num_labels - 1} or one of {', '.join(self.label_names)}){hint}")

    # -- batches and scores -------------------------------------------------------------------

    def collate(self, tokenizer, examples: list[dict], max_length: int = 128) -> dict[str, torch.Tensor]:
        """Tokenize (pairs truncated longest-first), pad to the batch's longest. BERT-style
        tokenizers also return token_type_ids, which sentence-pair tasks need; they are kept."""
        pairs = [ex["text_pair"] for ex in examples] if "text_pair" in examples[0] else None
        enc = tokenizer([ex["text"] for ex in examples], pairs, padding="longest", truncation=True,
                        max_length=max_length, return_tensors="pt")
        batch = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
        batch["labels"] = torch.tensor([ex["label"] for ex in examples], dtype=torch.long)
        return batch

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]], tokenizer=None) -> dict[str, float]:
        batches = list(batches)
        if not batches:
            raise ValueError(f"{self.name}: evaluate got no batches")

        def one(batch: dict) -> tuple[float, torch.Tensor, torch.Tensor]:
            batch = {k: v.to(device) for k, v in batch.items() if k != "groups"}
            y = batch.pop("labels")
            logits = model(**batch).logits.float()
            if logits.shape != (y.shape[0], self.num_labels):
                raise ValueError(f"{self.name}: model logits {tuple(logits.shape)}, expected "
                                 f"({y.shape[0]}, {self.num_labels}); build it with num_labels={self.num_labels}")
            return F.cross_entropy(logits, y, reduction="sum").item(), logits.argmax(-1).cpu(), y.cpu()

        with eval_mode(model) as device:
            results = sharded_map(batches, one)  # each rank scores 1/N of the batches
        y, p = torch.cat([r[2] for r in results]), torch.cat([r[1] for r in results])
        scores = {"eval_loss": sum(r[0] for r in results) / y.numel()}
        for name in self.metrics[1:]:
            scores[name] = CLASSIFICATION_METRICS[name](y, p)
        groups = [g for batch in batches for g in batch.get("groups", [])]  # e.g. each example's language
        if groups:  # per group, and the headline becomes the mean over groups (each weighs the same)
            pairs = list(zip(y.tolist(), p.tolist()))
            for name in self.metrics[1:]:
                scores.update(per_group(name, groups, pairs,
                                        lambda v, f=CLASSIFICATION_METRICS[name]: f(*zip(*v))))
        return scores


class GlueTask(ClassificationTask):
    """A GLUE task: the Hub when `data_files` is unset, else local files in the Hub's columns."""

    HUB_PATH = "nyu-mll/glue"

    def __init__(self, config: str, label_names, text_columns, metrics, default_target, eval_split="validation"):
        super().__init__(f"glue/{config}", label_names, text_columns, metrics, default_target,
                         split_names=("train", eval_split))
        self.config = config

    def validate(self, spec: DataSpec) -> None:
        super().validate(spec)
        for field in ("text_field", "label_field"):
            if spec.data_files is None and getattr(spec, field) is not None:
                raise ValueError(f"data.{field}={getattr(spec, field)!r}: applies to local data_files only; "
                                 f"the hub's {self.config} columns are fixed")

    def read(self, spec: DataSpec) -> dict[str, tuple[str, dict[str, list]]]:
        if spec.data_files is not None:
            return super().read(spec)
        import datasets  # only on this path: importing datasets costs ~1 s

        try:
            ds = datasets.load_dataset(self.HUB_PATH, self.config)
        except (ConnectionError, OSError) as e:  # offline, hub down, or not in the local cache
            cols = ", ".join(c for c, _ in self.columns(spec))
            raise ConnectionError(
                f"{self.name}: could not load {self.HUB_PATH!r} config {self.config!r} from the Hugging Face "
                f"Hub ({e}). Without hub access, point data.data_files at local copies, e.g. "
                f"{{train: train.parquet, {self.eval_split}: {self.eval_split}.parquet}} "
                f"(csv/jsonl/parquet with columns {cols})") from e
        return {split: (f"{self.HUB_PATH}[{self.config}] {split}", ds[split].to_dict())
                for split in ("train", self.eval_split)}


GLUE_TASKS = (
    GlueTask("cola", ("unacceptable", "acceptable"), ("sentence",), ("matthews_correlation", "accuracy"), 0.35),
    GlueTask("sst2", ("negative", "positive"), ("sentence",), ("accuracy",), 0.88),
    GlueTask("mrpc", ("not_equivalent", "equivalent"), ("sentence1", "sentence2"), ("f1", "accuracy"), 0.85),
    GlueTask("qqp", ("not_duplicate", "duplicate"), ("question1", "question2"), ("f1", "accuracy"), 0.80),
    GlueTask("mnli", ("entailment", "neutral", "contradiction"), ("premise", "hypothesis"), ("accuracy",), 0.75,
             eval_split="validation_matched"),
    GlueTask("qnli", ("entailment", "not_entailment"), ("question", "sentence"), ("accuracy",), 0.85),
    GlueTask("rte", ("entailment", "not_entailment"), ("sentence1", "sentence2"), ("accuracy",), 0.60),
)
