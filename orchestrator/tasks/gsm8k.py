"""GSM8K: grade-school math word problems (Cobbe et al. 2021), scored by exact match of the answer.

Source: the Hub's `openai/gsm8k` config `main` (7,473 train / 1,319 test problems), or local
.jsonl/.csv/.parquet files with the same columns, `question` and `answer`, where the answer is the
worked solution ending in a line `#### <number>`:

    {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many
     clips in May. How many clips did Natalia sell altogether in April and May?",
     "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\\n... \\n#### 72"}

Training: causal LM on prompt "Question: ...\\nAnswer:" -> the worked solution, with the dataset's
calculator annotations (`<<48/2=24>>`) removed: they are tool calls of the original paper's
calculator, not text a model should learn to write. Evaluation: the model writes a solution
greedily (batched; stops at eos or at a new "Question:"); `exact_match` is the share of problems
where the number after the completion's first `####` (one followed by a number) equals the
reference's, compared as numbers after removing thousands separators and a `$` ("1,000" = "1000"
= "$1000.00"). A completion with no `####` line scores 0 (the strict reading: the fine-tuned model
must learn the format). `eval_loss` is the answer-token loss of the reference solutions.

Default target: exact_match 0.35, a reference point near what LoRA-tuned 7B models report; a
small model will not reach it, so a sweep file for one should set its own.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

from . import files, hub, splits
from .base import DataSpec
from .generation import GenerativeTask

CALCULATOR = re.compile(r"<<[^>]*>>")
FINAL = re.compile(r"####\s*\$?\s*(-?[\d,]*\.?\d+)")
QUESTION, ANSWER = "question", "answer"


def format_prompt(question: str) -> str:
    return f"Question: {question.strip()}\nAnswer:"


def final_number(text: str) -> Decimal | None:
    """The number after the first `####`, as a Decimal (so 72 == 72.0); None if absent."""
    match = FINAL.search(text)
    if match is None:
        return None
    try:
        return Decimal(match.group(1).replace(",", ""))
    except InvalidOperation:
        return None


class Gsm8kTask(GenerativeTask):
    """Grade-school math word problems, scored by exact match of the final number after ####."""

    name = "gsm8k"
    metrics = ("eval_loss", "exact_match")
    default_metric = "exact_match"
    default_target = 0.35
    split_names = ("train", "test")
    default_max_new_tokens = 256
    stop_strings = ("\nQuestion:",)
    HUB_PATH, HUB_CONFIG = "openai/gsm8k", "main"

    def columns(self, spec: DataSpec) -> list[tuple[str, str]]:
        return [(spec.text_field or QUESTION, "text_field"), (spec.label_field or ANSWER, "label_field")]

    def validate(self, spec: DataSpec) -> None:
        super().validate(spec)
        hub.no_renames(self, spec)

    def read(self, spec: DataSpec) -> dict[str, tuple[str, dict[str, list]]]:
        if spec.data_files is not None:
            wanted = [c for c, _ in self.columns(spec)]
            return {split: (where, files.read_table(path, wanted, where))
                    for split, (path, where) in self.sources(spec).items()}
        hint = "{train: train.jsonl, test: test.jsonl} with columns question, answer"
        return {split: (f"{self.HUB_PATH}[{self.HUB_CONFIG}] {split}",
                        hub.load_split(self.HUB_PATH, self.HUB_CONFIG, split, self.name, hint))
                for split in self.split_names}

    def load(self, spec: DataSpec) -> tuple[list[dict], list[dict]]:
        self.validate(spec)
        (q_col, _), (a_col, _) = self.columns(spec)
        examples = {}
        for split, (where, table) in self.read(spec).items():
            rows = []
            for i, (question, answer) in enumerate(zip(table[q_col], table[a_col])):
                if not isinstance(question, str) or not question.strip():
                    raise ValueError(f"{where}: row {i}: column {q_col!r} must be non-empty text")
                if not isinstance(answer, str) or final_number(answer) is None:
                    raise ValueError(f"{where}: row {i}: column {a_col!r} must end with '#### <number>', "
                                     f"got {str(answer)[-60:]!r}")
                rows.append({"prompt": format_prompt(question), "response": " " + CALCULATOR.sub("", answer).strip()})
            if not rows:
                raise ValueError(f"{where}: no rows")
            examples[split] = rows
        train = examples["train"]
        if "test" in examples:
            evals = examples["test"]
        else:
            train, evals = splits.holdout(train, spec.eval_fraction, spec.seed, key=lambda ex: ex["prompt"])
        return (splits.subsample(train, spec.max_train_samples, spec.seed, "train"),
                splits.subsample(evals, spec.max_eval_samples, spec.seed, "eval"))

    def score(self, examples: list[dict], completions: list[str]) -> dict[str, float]:
        hits = [final_number(c) is not None and final_number(c) == final_number(ex["response"])
                for ex, c in zip(examples, completions)]
        return {"exact_match": sum(hits) / len(hits)}
