"""MT-Bench: 80 two-turn questions in 8 categories, answered by the tuned model and rated 1-10 by a
judge model (Zheng et al. 2023, "Judging LLM-as-a-judge").

MT-Bench only evaluates; the model trains on instruction data of your own, as the `instructions`
task reads it (data_files.train: instruction/response columns, Alpaca-style prompt). Questions come
from the Hub (`HuggingFaceH4/mt_bench_prompts`: prompt, category, reference, prompt_id) or from a
local `data_files.questions` file in FastChat's `question.jsonl` format (question_id, category,
turns, reference) or the Hub's columns.

Evaluation: the model answers turn 1 of every question, then turn 2 with its own first answer in
the context (two batched greedy passes, the Alpaca format extended with the first exchange); the
judge (`data.judge`, see `judge.py`) rates every answer, seeing the reference answer where the
question has one (math, reasoning, coding). Metrics: `mt_bench_score`, the mean rating over all
turns (MT-Bench's headline), with `mt_bench_score/turn_1`, `/turn_2` and one per category, and
`judge_unparsed`, the number of judge replies without a rating (scored 1). There is no reference
answer for most questions, so no `eval_loss`. Judging runs on rank 0 only and is broadcast.

A sweep with no judge configured fails at validation, and `orchestrate validate` checks that the
key is set and the endpoint answers (from the driver: an endpoint that only the workers can reach,
e.g. 127.0.0.1 on each node, is checked by the first evaluation instead). Default target 5.0
(of 10): a reference point between small chat models (~3-5) and 7B chat models (~6); set your own.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch

from . import files, hub, splits
from .base import DataSpec, eval_mode
from .causal_lm import InstructionTask, format_prompt, read_instructions
from .distributed import on_rank_zero, sharded_map
from .generation import GenerationOptions, GenerativeTask, generate
from .judge import MIN_RATING, JudgeConfig, check_judge, judge_prompt, rate_all
from .metrics import per_group

HUB_PATH = "HuggingFaceH4/mt_bench_prompts"
CATEGORIES = (  # MT-Bench's eight; each has its mt_bench_score/<category>
    "writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")
SEP = "\x1e"  # ASCII record separator: never part of a question


def second_turn_prompt(first: str, answer: str, second: str) -> str:
    """The Alpaca format continued: the first exchange, then the second instruction."""
    return f"{format_prompt(first)}{answer.strip()}\n\n{format_prompt(second)}"


def read_questions(path: str | None) -> list[dict]:
    """[{"id", "category", "turns": [q1, q2], "reference": [r1, r2] or []}] from a file or the Hub."""
    if path is None:
        table = hub.load_split(HUB_PATH, None, "train", "mt_bench",
                               "{train: instructions.jsonl, questions: question.jsonl} (FastChat's format)")
        where, ids, turns = f"{HUB_PATH} train", table["prompt_id"], table["prompt"]
    else:
        where = f"data.data_files.questions={path}"
        found = files.read_columns(path, where)
        turn_col, id_col = ("turns", "question_id") if "turns" in found else ("prompt", "prompt_id")
        table = files.read_table(path, [turn_col, id_col, "category", "reference"], where)
        ids, turns = table[id_col], table[turn_col]
    questions = []
    for i, (qid, qturns, category, reference) in enumerate(zip(ids, turns, table["category"], table["reference"])):
        if not isinstance(qturns, list) or not qturns or not all(isinstance(t, str) and t for t in qturns):
            raise ValueError(f"{where}: row {i}: the turns must be a non-empty list of questions")
        if isinstance(reference, str):  # a csv/parquet cell holding one reference
            reference = [reference]
        # One entry per turn, "" where a turn has none: turn 2's reference never shifts to turn 1.
        refs = [r if isinstance(r, str) else "" for r in (reference or [])][:2]
        questions.append({"id": str(qid if qid is not None else i), "category": category or "general",
                          "turns": list(qturns[:2]), "reference": refs})
    if not questions:
        raise ValueError(f"{where}: no questions")
    return questions


@dataclasses.dataclass(frozen=True)
class MtBenchOptions(GenerationOptions):
    """judge: the judge model, an OpenAI-compatible endpoint or a local model (`judge.py`)."""

    judge: JudgeConfig | None = dataclasses.field(
        default=None, metadata={"help": "{base_url, model, api_key_env} or {local_model: path}"})

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.judge, Mapping):  # built directly (not through from_dict)
            object.__setattr__(self, "judge", JudgeConfig.from_dict(dict(self.judge)))
        if self.judge is not None and not isinstance(self.judge, JudgeConfig):
            raise ValueError(f"data.judge={self.judge!r}: must be a mapping {{base_url, model, api_key_env}} or "
                             "{local_model: path}, or null")


class MtBenchTask(GenerativeTask):
    """Two-turn questions answered by the tuned model and rated 1-10 by a judge model."""

    name = "mt_bench"
    metrics = ("mt_bench_score", "judge_unparsed")
    default_metric = "mt_bench_score"
    default_target = 5.0
    split_names = ("train", "questions")
    needs_files = True
    has_references = False
    default_max_new_tokens = 512
    options_cls = MtBenchOptions

    def metrics_for(self, spec: DataSpec) -> tuple[str, ...]:
        parts = ("turn_1", "turn_2", *CATEGORIES)
        return (*self.metrics, *(f"mt_bench_score/{p}" for p in parts))

    def columns(self, spec: DataSpec) -> list[tuple[str, str]]:
        return InstructionTask.columns(self, spec)

    def sources(self, spec: DataSpec) -> dict[str, tuple[str, str]]:  # columns() describes train only
        return {s: v for s, v in super().sources(spec).items() if s == "train"}

    def validate(self, spec: DataSpec) -> None:
        """Files and judge settings, then the judge itself: its key is set and it answers (or the
        local model's folder exists). Run before launch, on the driver; workers re-check files only."""
        self.validate_files(spec)
        check_judge(spec.options.judge)

    def validate_files(self, spec: DataSpec) -> None:
        if spec.name == self.name and spec.options.judge is None:
            raise ValueError("data.judge: task mt_bench needs a judge model: an OpenAI-compatible endpoint "
                             "{base_url: http://host:8000/v1, model: NAME, api_key_env: VAR} or "
                             "{local_model: /path/to/model}")
        super().validate(spec)
        path = (spec.data_files or {}).get("questions")
        if path is not None:
            where = f"data.data_files.questions={path}"
            found = files.read_columns(path, where)
            if "turns" not in found and "prompt" not in found:
                raise ValueError(f"{where}: needs a 'turns' column (FastChat's question.jsonl) or 'prompt' "
                                 f"(the Hub's mt_bench_prompts); columns found: {', '.join(found)}")

    def load(self, spec: DataSpec) -> tuple[list[dict], list[dict]]:
        self.validate_files(spec)
        (inst, _), (resp, _) = self.columns(spec)
        train = read_instructions(*self.sources(spec)["train"], inst, resp)
        # Turns and references travel as one string each: examples stay flat dicts of str.
        evals = [{"prompt": format_prompt(q["turns"][0]), "id": q["id"], "category": q["category"],
                  "turns": SEP.join(q["turns"]), "reference": SEP.join(q["reference"])}
                 for q in read_questions(spec.data_files.get("questions"))]
        return (splits.subsample(train, spec.max_train_samples, spec.seed, "train"),
                splits.subsample(evals, spec.max_eval_samples, spec.seed, "eval"))

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, batches: list[dict[str, Any]], tokenizer=None) -> dict[str, float]:
        if tokenizer is None:
            raise ValueError("mt_bench: evaluate needs the tokenizer to decode what the model writes")

        def both_turns(batch: dict[str, Any]) -> list[list[str]]:
            """[[turn 1 answer, turn 2 answer], ...]; one-turn questions keep the first only."""
            firsts = generate(model, tokenizer, batch, device)
            # Always a second call, even for a batch of one-turn questions (asked again, answer
            # dropped): under ZeRO-3 every rank must make the same number of generate calls.
            follow = [dict(ex, prompt=second_turn_prompt(turns[0], a, turns[-1]))
                      for ex, a in zip(batch["examples"], firsts) for turns in [ex["turns"].split(SEP)]]
            spec = DataSpec(name=self.name, max_length=batch["max_length"],
                            options={"max_new_tokens": batch["max_new_tokens"]})
            seconds = generate(model, tokenizer, self.collate_eval(tokenizer, follow, spec), device)
            return [[a, b] if SEP in ex["turns"] else [a] for ex, a, b in zip(batch["examples"], firsts, seconds)]

        with eval_mode(model) as device:
            answers = [pair for pairs in sharded_map(batches, both_turns) for pair in pairs]
        examples = [ex for batch in batches for ex in batch["examples"]]
        # The judge config rides in the batches: evaluate() sees batches, not the sweep file.
        return on_rank_zero(lambda: self.judge_all(batches[0]["judge"], examples, answers))

    def collate_eval(self, tokenizer, examples: list[dict], spec: DataSpec) -> dict[str, Any]:
        batch = super().collate_eval(tokenizer, examples, spec)
        batch.update(max_length=spec.max_length, judge=spec.options.judge)
        return batch

    def score(self, examples: list[dict], completions: list[str]) -> dict[str, float]:
        raise NotImplementedError("mt_bench scores both turns in evaluate()")

    def judge_all(self, config, examples: list[dict], answers: list[list[str]]) -> dict[str, float]:
        prompts, turn_of, category_of = [], [], []
        for ex, given in zip(examples, answers):
            turns, refs = ex["turns"].split(SEP), ex["reference"].split(SEP)
            for t in range(len(given)):
                reference = refs[t] if t < len(refs) and refs[t] else None
                prompts.append(judge_prompt(turns[: t + 1], given[: t + 1], reference))
                turn_of.append(f"turn_{t + 1}")
                category_of.append(ex["category"])
        found = rate_all(config, prompts)
        ratings = [r if r is not None else MIN_RATING for r in found]  # no rating: the lowest score
        by_turn = per_group("mt_bench_score", turn_of, ratings)
        by_category = per_group("mt_bench_score", category_of, ratings)
        # MT-Bench's headline is the mean over all rated turns, not over the per-turn means.
        return {**by_turn, **by_category, "mt_bench_score": sum(ratings) / len(ratings),
                "judge_unparsed": float(sum(r is None for r in found))}
