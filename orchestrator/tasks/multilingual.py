"""Few-shot multilingual tasks: XNLI (classification) and FLORES-200 (translation), k examples per
language.

The paper's multilingual setting trains on k = 32 examples per language (`data.samples_per_language`)
and scores every language separately. Both tasks draw the k examples per language with the seed
(the same seed gives the same examples on every worker and every rerun), report the metric per
language as `<metric>/<language>` and, as the headline, its unweighted mean over languages.
`data.max_eval_samples` caps the eval examples *per language*, so every language weighs the same.

XNLI (Conneau et al. 2018): premise/hypothesis -> entailment, neutral, contradiction, in 15
languages. Hub: `facebook/xnli`, one config per language (`en`, `fr`, ...), splits train (MNLI
machine-translated), validation, test; we train on train and score on validation. Local files:
data_files {train, validation} with columns premise, hypothesis, label (int or name) and
`language` (the Hub configs stacked, with the config name as language). Metric: accuracy.
Default target 0.50: a reference point for a multilingual encoder with 32 examples per language
(chance is 0.33); set your own.

FLORES-200 (NLLB Team 2022): the same 997 (dev) + 1,012 (devtest) sentences in 200 languages.
Hub: `facebook/flores`, one config per language (`eng_Latn`, `fra_Latn`, ...), column `sentence`,
aligned across languages by `id`. We translate English into each language: k training pairs
from dev, scored on devtest. Local files: data_files {dev, devtest} with columns id, sentence and
`language` (the Hub configs stacked, the English rows included). The prompt names the language:

    Translate this sentence from English to French.\\nEnglish: {source}\\nFrench:

Metric: chrF (Popovic 2015) from sacrebleu, the maintained reference implementation, corpus-level
per language on the 0-100 scale. Default target 30.0: a reference point; set your own.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from . import files, hub, splits
from .base import DataSpec, Task, TaskOptions, check_count, fail
from .classification import ClassificationTask
from .generation import GenerationOptions, GenerativeTask
from .metrics import per_group

LANGUAGE = "language"

XNLI_LANGUAGES = ("ar", "bg", "de", "el", "en", "es", "fr", "hi", "ru", "sw", "th", "tr", "ur", "vi", "zh")

# FLORES-200 codes of the 14 XNLI languages besides English, and the names the prompt uses.
FLORES_NAMES = {
    "arb_Arab": "Arabic", "bul_Cyrl": "Bulgarian", "deu_Latn": "German", "ell_Grek": "Greek",
    "spa_Latn": "Spanish", "fra_Latn": "French", "hin_Deva": "Hindi", "rus_Cyrl": "Russian",
    "swh_Latn": "Swahili", "tha_Thai": "Thai", "tur_Latn": "Turkish", "urd_Arab": "Urdu",
    "vie_Latn": "Vietnamese", "zho_Hans": "Chinese (Simplified)",
}
FLORES_SOURCE = "eng_Latn"


def targets(languages: tuple[str, ...]) -> tuple[str, ...]:
    """FLORES target languages: all but the English source."""
    return tuple(x for x in languages if x != FLORES_SOURCE)


def per_language(rows: list[dict], languages: tuple[str, ...], k: int | None, seed: int, salt: str,
                 where: str) -> list[dict]:
    """Up to k rows of each language (all if k is None), drawn with the seed, languages in order."""
    out = []
    for language in languages:
        mine = [r for r in rows if r[LANGUAGE] == language]
        if not mine:
            raise ValueError(f"{where}: no rows for language {language!r} (data.languages)")
        out += splits.subsample(mine, k, seed, f"{salt}:{language}")
    return out


def distinct(values: list) -> tuple[str, ...]:
    """The distinct languages of a language column, in order of appearance."""
    return tuple(dict.fromkeys(v for v in values if isinstance(v, str) and v))


def languages_in(path: str, where: str) -> tuple[str, ...]:
    """The distinct values of a local file's language column, in order of appearance."""
    return distinct(files.read_table(path, [LANGUAGE], where)[LANGUAGE])


def stack_languages(task: Task, languages: tuple[str, ...], split: str, columns: tuple[str, ...], hint: str,
                    limit: int | None = None, seed: int = 0) -> dict[str, list]:
    """The Hub's per-language configs of `task.HUB_PATH` stacked into one table with a language
    column: the same table a local file in the task's format gives."""
    stacked: dict[str, list] = {column: [] for column in (*columns, LANGUAGE)}
    for language in languages:
        part = hub.load_split(task.HUB_PATH, language, split, task.name, hint, limit=limit, seed=seed)
        for column in columns:
            stacked[column] += part[column]
        stacked[LANGUAGE] += [language] * len(part[columns[0]])
    return stacked


def check_languages(task: Task, spec: DataSpec, known: tuple[str, ...]) -> None:
    """On the Hub every config is known in advance: an unknown language is a validation error."""
    if spec.data_files is None and spec.options.languages:
        unknown = [x for x in spec.options.languages if x not in known]
        if unknown:
            raise ValueError(f"data.languages: {unknown[0]!r} is not a {task.name} language on the Hub "
                             f"(known: {', '.join(known)})")


@dataclasses.dataclass(frozen=True)
class MultilingualOptions(TaskOptions):
    """languages: the languages to train and score on (null = the task's default set).
    samples_per_language: k training examples per language (k = 32, as in the paper's few-shot
    setting), drawn with the seed."""

    languages: tuple[str, ...] | None = dataclasses.field(
        default=None, metadata={"help": "languages to train and score on; null = the task's set"})
    samples_per_language: int = dataclasses.field(default=32, metadata={"help": "k training examples per language"})

    def __post_init__(self):
        super().__post_init__()
        if self.languages is not None:
            if isinstance(self.languages, str) or not isinstance(self.languages, (list, tuple)) \
                    or not self.languages or not all(isinstance(x, str) and x for x in self.languages):
                fail("languages", self.languages, "must be a non-empty list of language codes, or null")
            if len(set(self.languages)) != len(self.languages):
                fail("languages", self.languages, "lists a language twice")
            object.__setattr__(self, "languages", tuple(self.languages))
        check_count(self, "samples_per_language", optional=False)


@dataclasses.dataclass(frozen=True)
class FloresOptions(MultilingualOptions, GenerationOptions):
    """The languages (FLORES-200 codes, English excluded: it is the source) and the generation budget."""


class XnliTask(ClassificationTask):
    """XNLI with k training examples per language and accuracy per language."""

    HUB_PATH = "facebook/xnli"
    options_cls = MultilingualOptions

    def __init__(self):
        super().__init__("xnli", ("entailment", "neutral", "contradiction"), ("premise", "hypothesis"),
                         ("accuracy",), default_target=0.50)

    def languages(self, spec: DataSpec) -> tuple[str, ...]:
        """The languages asked for; else those in the local training file; else all 15."""
        if spec.options.languages:
            return spec.options.languages
        if spec.data_files is not None:
            return languages_in(*self.sources(spec)["train"])
        return XNLI_LANGUAGES

    def metrics_for(self, spec: DataSpec) -> tuple[str, ...]:
        return (*self.metrics, *(f"accuracy/{x}" for x in self.languages(spec)))

    def columns(self, spec: DataSpec) -> list[tuple[str, str]]:
        return [*super().columns(spec), (LANGUAGE, "languages")]

    def validate(self, spec: DataSpec) -> None:
        super().validate(spec)
        check_languages(self, spec, XNLI_LANGUAGES)
        hub.no_renames(self, spec)

    def read(self, spec: DataSpec) -> dict[str, tuple[str, dict[str, list]]]:
        if spec.data_files is not None:
            return super().read(spec)
        hint = "{train: train.jsonl, validation: validation.jsonl} with columns premise, hypothesis, label, language"
        return {split: (f"{self.HUB_PATH} {split}",
                        stack_languages(self, self.languages(spec), split, ("premise", "hypothesis", "label"), hint,
                                        limit=spec.options.samples_per_language if split == "train" else spec.max_eval_samples,
                                        seed=spec.seed))
                for split in self.split_names}

    def examples(self, table: dict[str, list], texts: tuple[str, ...], label_col: str, where: str) -> list[dict]:
        rows = super().examples(table, texts, label_col, where)
        for row, language in zip(rows, table[LANGUAGE]):
            if not isinstance(language, str) or not language:
                raise ValueError(f"{where}: column {LANGUAGE!r} must name each row's language")
            row[LANGUAGE] = language
        return rows

    def load(self, spec: DataSpec) -> tuple[list[dict], list[dict]]:
        self.validate(spec)
        tables = self.read(spec)
        texts, label_col = self.text_columns_for(spec), spec.label_field or self.label_column
        train_where, train_table = tables["train"]
        train = self.examples(train_table, texts, label_col, train_where)
        languages = spec.options.languages or distinct([r[LANGUAGE] for r in train])
        if "validation" in tables:
            eval_where, eval_table = tables["validation"]
            evals = self.examples(eval_table, texts, label_col, eval_where)
        else:  # hold out per text pair before drawing the k examples, so none is on both sides
            train, evals = splits.holdout(train, spec.eval_fraction, spec.seed,
                                          key=lambda ex: (ex["text"], ex["text_pair"]))
            eval_where = train_where + " (held out)"
        train = per_language(train, languages, spec.options.samples_per_language, spec.seed, "train", train_where)
        evals = per_language(evals, languages, spec.max_eval_samples, spec.seed, "eval", eval_where)
        return splits.subsample(train, spec.max_train_samples, spec.seed, "train"), evals

    def collate_eval(self, tokenizer, examples: list[dict], spec: DataSpec) -> dict[str, Any]:
        batch = super().collate_eval(tokenizer, examples, spec)
        batch["groups"] = [ex[LANGUAGE] for ex in examples]
        return batch


class FloresTask(GenerativeTask):
    """English -> each language, k training pairs per language from dev, chrF per language on devtest."""

    name = "flores"
    metrics = ("eval_loss", "chrf")
    default_metric = "chrf"
    default_target = 30.0
    split_names = ("dev", "devtest")
    default_max_new_tokens = 128
    stop_strings = ("\n",)
    options_cls = FloresOptions
    HUB_PATH = "facebook/flores"

    def languages(self, spec: DataSpec) -> tuple[str, ...]:
        """The languages asked for; else those in the local dev file but English; else 14 (XNLI's)."""
        if spec.options.languages:
            return spec.options.languages
        if spec.data_files is not None:
            return targets(languages_in(*self.sources(spec)["dev"]))
        return tuple(FLORES_NAMES)

    def metrics_for(self, spec: DataSpec) -> tuple[str, ...]:
        return (*self.metrics, *(f"chrf/{x}" for x in self.languages(spec)))

    def columns(self, spec: DataSpec) -> list[tuple[str, str]]:
        return [("id", "data_files"), ("sentence", "data_files"), (LANGUAGE, "languages")]

    def validate(self, spec: DataSpec) -> None:
        super().validate(spec)
        for field in ("text_field", "label_field"):
            if getattr(spec, field) is not None:
                raise ValueError(f"data.{field}: task flores reads the columns id, sentence, language; "
                                 "rename the columns in the file instead")
        if spec.options.languages and FLORES_SOURCE in spec.options.languages:
            raise ValueError(f"data.languages: {FLORES_SOURCE} is the source language; list target languages")
        if spec.data_files is None and spec.options.languages:  # FLORES codes look like xxx_Scrp
            bad = [x for x in spec.options.languages if len(x.split("_")) != 2]
            if bad:
                raise ValueError(f"data.languages: {bad[0]!r} is not a FLORES-200 code (e.g. fra_Latn, zho_Hans)")

    def read_split(self, spec: DataSpec, split: str) -> tuple[str, dict[str, list]]:
        if spec.data_files is not None:
            path, where = self.sources(spec)[split]
            return where, files.read_table(path, ["id", "sentence", LANGUAGE], where)
        hint = "{dev: dev.jsonl, devtest: devtest.jsonl} with columns id, sentence, language"
        return f"{self.HUB_PATH} {split}", stack_languages(self, (FLORES_SOURCE, *self.languages(spec)), split,
                                                            ("id", "sentence"), hint)

    def pairs(self, where: str, table: dict[str, list], languages: tuple[str, ...]) -> list[dict]:
        """English -> language examples from a table of id, sentence, language."""
        by_language: dict[str, dict] = {}
        for i, (sid, sentence, language) in enumerate(zip(table["id"], table["sentence"], table[LANGUAGE])):
            if not isinstance(sentence, str) or not sentence.strip() or sid is None or not language:
                raise ValueError(f"{where}: row {i}: id, sentence and language must all be set")
            by_language.setdefault(language, {})[sid] = sentence
        source = by_language.get(FLORES_SOURCE)
        if not source:
            raise ValueError(f"{where}: no {FLORES_SOURCE} rows: English is the source of every pair")
        rows = []
        for language in languages:
            target = by_language.get(language, {})
            name = FLORES_NAMES.get(language, language)
            rows += [{"prompt": f"Translate this sentence from English to {name}.\nEnglish: {source[sid]}\n{name}:",
                      "response": " " + target[sid], LANGUAGE: language}
                     for sid in sorted(target) if sid in source]
        return rows

    def load(self, spec: DataSpec) -> tuple[list[dict], list[dict]]:
        self.validate(spec)
        where, table = self.read_split(spec, "dev")
        local = spec.data_files is not None and not spec.options.languages  # languages: those the dev file has
        languages = targets(distinct(table[LANGUAGE])) if local else self.languages(spec)
        dev = self.pairs(where, table, languages)
        train = per_language(dev, languages, spec.options.samples_per_language, spec.seed, "train", where)
        if spec.data_files is None or "devtest" in spec.data_files:
            where, table = self.read_split(spec, "devtest")
            devtest = self.pairs(where, table, languages)
        else:  # no devtest file: score on dev pairs not drawn for training
            taken = {(ex[LANGUAGE], ex["prompt"]) for ex in train}
            devtest = [ex for ex in dev if (ex[LANGUAGE], ex["prompt"]) not in taken]
        evals = per_language(devtest, languages, spec.max_eval_samples, spec.seed, "eval", where)
        return splits.subsample(train, spec.max_train_samples, spec.seed, "train"), evals

    def score(self, examples: list[dict], completions: list[str]) -> dict[str, float]:
        from sacrebleu.metrics import CHRF

        def corpus_chrf(pairs: list[tuple[str, str]]) -> float:
            hyps, refs = zip(*pairs)
            return CHRF().corpus_score(list(hyps), [list(refs)]).score

        pairs = [(c.strip(), ex["response"].strip()) for ex, c in zip(examples, completions)]
        return per_group("chrf", [ex[LANGUAGE] for ex in examples], pairs, corpus_chrf)
