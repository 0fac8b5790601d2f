"""The paper's benchmarks as tasks: GSM8K, HumanEval, XNLI, FLORES, MT-Bench.

Loaders run on small local files in each task's real format (tests/data/benchmarks), HumanEval on
its real 164 problems. Generation runs for real on a tiny GPT-2 with MiniLM's tokenizer; the
MT-Bench judge is a real HTTP server on 127.0.0.1 speaking OpenAI's chat-completions protocol.
"""

from __future__ import annotations

import http.server
import json
import math
import threading
from decimal import Decimal
from pathlib import Path

import pytest
import torch

from orchestrator.config import ConfigError, TrialConfig, validate_trial
from orchestrator.tasks import TASKS, DataSpec, default_model_path, get_task
from orchestrator.tasks.generation import GenerativeTask, cut_at_stop, generate
from orchestrator.tasks.gsm8k import final_number
from orchestrator.tasks.humaneval import read_problems
from orchestrator.tasks.judge import JudgeConfig, parse_rating
from tests.conftest import bpe_tokenizer, run_ranks

DATA = Path(__file__).resolve().parents[1] / "data" / "benchmarks"
NEW_TASKS = ("gsm8k", "humaneval", "xnli", "flores", "mt_bench")


@pytest.fixture(scope="module")
def minilm_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_path())


@pytest.fixture(scope="module")
def tokenizer():
    return bpe_tokenizer()


def tiny_lm(tokenizer, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    eos = tokenizer.eos_token_id
    return GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=2, n_positions=256,
                                      bos_token_id=eos, eos_token_id=eos,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


def gsm8k_spec(**kw) -> DataSpec:
    files = {"train": str(DATA / "gsm8k_train.jsonl"), "test": str(DATA / "gsm8k_test.jsonl")}
    return DataSpec.from_dict(dict(name="gsm8k", data_files=files, max_length=256, **kw))


def eval_batches(task, tokenizer, examples, spec, size=2):
    return [task.collate_eval(tokenizer, examples[i:i + size], spec) for i in range(0, len(examples), size)]


def memorize(model, task, tokenizer, examples, steps=150, max_length=256):
    """Overfit the tiny model on `examples` so that greedy decoding reproduces their answers."""
    batch = task.collate(tokenizer, examples, max_length=max_length)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return loss.item()


# -- every task declares metric, direction and default target ------------------------------------

@pytest.mark.parametrize("name", NEW_TASKS)
def test_every_task_declares_metric_direction_and_target(name):
    task = get_task(name)
    assert task.default_metric in task.metrics
    assert task.mode == "max" and isinstance(task.default_target, float)
    module = __import__(type(task).__module__, fromlist=["_"])
    assert "default target" in module.__doc__.lower()  # and the docstring says why that value


# -- GSM8K ---------------------------------------------------------------------------------------

def test_gsm8k_final_number_is_compared_as_a_number():
    assert final_number("so 5 + 7 = 12\n#### 12") == Decimal(12)
    assert final_number("#### 1,750") == final_number("####1750") == final_number("#### $1750.00")
    assert final_number("#### -3") == Decimal(-3)
    assert final_number("the answer is 12") is None  # strict: no #### line, no answer
    assert final_number("#### 12\n#### 13") == Decimal(12)  # the first one counts


def test_gsm8k_loads_local_files_in_the_hub_format():
    task = get_task("gsm8k")
    train, evals = task.load(gsm8k_spec())
    assert len(train) == 4 and len(evals) == 2
    ex = next(e for e in train if "nails" in e["prompt"])
    assert ex["prompt"].startswith("Question: Tom has") and ex["prompt"].endswith("\nAnswer:")
    assert "<<" not in ex["response"] and ex["response"].rstrip().endswith("#### 1,750")
    assert task.score(evals, [ex["response"] for ex in evals]) == {"exact_match": 1.0}
    assert task.score(evals, ["#### 216", "I think it is 15000"]) == {"exact_match": 0.5}


def test_gsm8k_bad_files_name_the_row_and_the_hub_needs_network(tmp_path):
    bad = tmp_path / "train.jsonl"
    bad.write_text(json.dumps({"question": "How many?", "answer": "Three."}) + "\n")
    with pytest.raises(ValueError, match=r"train\.jsonl: row 0: column 'answer' must end with '#### <number>'"):
        get_task("gsm8k").load(DataSpec(name="gsm8k", data_files={"train": str(bad)}))
    with pytest.raises(ValueError, match="missing column 'question'"):
        get_task("gsm8k").validate(DataSpec(name="gsm8k", data_files={"train": str(DATA / "code_train.jsonl")}))
    with pytest.raises(ConnectionError, match=r"openai/gsm8k.*data\.data_files"):
        get_task("gsm8k").load(DataSpec(name="gsm8k"))  # HF_HUB_OFFLINE=1 here and in CI


def test_batched_generation_equals_one_at_a_time(tokenizer):
    """Left padding done right: a prompt's completion does not depend on its batch mates."""
    task = get_task("gsm8k")
    spec = gsm8k_spec(max_new_tokens=12)
    train, _ = task.load(spec)
    model = tiny_lm(tokenizer).eval()
    together = generate(model, tokenizer, task.collate_eval(tokenizer, train, spec), torch.device("cpu"))
    alone = [generate(model, tokenizer, task.collate_eval(tokenizer, [ex], spec), torch.device("cpu"))[0]
             for ex in train]
    assert together == alone and len(set(together)) > 1


def test_gsm8k_exact_match_by_greedy_generation(tokenizer):
    """A model that learned the answers scores 1.0; the untrained one 0.0. Real generation both times."""
    task = get_task("gsm8k")
    spec = gsm8k_spec(max_new_tokens=64)
    train, _ = task.load(spec)
    model = tiny_lm(tokenizer)
    untrained = task.evaluate(model, eval_batches(task, tokenizer, train, spec), tokenizer)
    assert untrained["exact_match"] == 0.0
    memorize(model, task, tokenizer, train)
    scores = task.evaluate(model, eval_batches(task, tokenizer, train, spec), tokenizer)
    assert scores["exact_match"] == 1.0
    assert scores["eval_loss"] < untrained["eval_loss"] / 10
    assert model.training  # evaluate restores the training flag


def test_generative_evaluate_needs_the_tokenizer(tokenizer):
    task = get_task("gsm8k")
    spec = gsm8k_spec(max_new_tokens=2)
    train, _ = task.load(spec)
    with pytest.raises(ValueError, match="needs the tokenizer"):
        task.evaluate(tiny_lm(tokenizer), eval_batches(task, tokenizer, train, spec))


def test_stop_strings_cut_the_completion():
    assert cut_at_stop("    return a\ndef other():", ("\ndef", "\nclass")) == "    return a"
    assert cut_at_stop("no stop here", ("\n",)) == "no stop here"


# -- HumanEval -----------------------------------------------------------------------------------

def humaneval_spec(**kw) -> DataSpec:
    return DataSpec.from_dict(dict(name="humaneval", data_files={"train": str(DATA / "code_train.jsonl")}, **kw))


def test_humaneval_reads_the_real_164_problems():
    problems = read_problems()
    assert len(problems) == 164 and problems[0]["task_id"] == "HumanEval/0"
    train, evals = get_task("humaneval").load(humaneval_spec())
    assert len(train) == 4 and len(evals) == 164
    assert {json.loads(e["problem"])["task_id"] for e in evals} == {p["task_id"] for p in problems}


def test_humaneval_scores_canonical_solutions_as_passing_and_wrong_ones_as_failing():
    task = get_task("humaneval")
    _, evals = task.load(humaneval_spec(max_eval_samples=24))
    right = [ex["response"] for ex in evals]
    wrong = ["    return None\n"] * len(evals)
    assert task.score(evals, right) == {"pass_at_1": 1.0}
    half = right[:12] + wrong[12:]
    assert task.score(evals, half) == {"pass_at_1": 0.5}
    assert task.score(evals, wrong) == {"pass_at_1": 0.0}


def test_humaneval_pass_at_k_with_several_samples():
    """n = 10 samples per problem, c of them right: pass@k by the unbiased estimator."""
    task = get_task("humaneval")
    spec = humaneval_spec(max_eval_samples=2, num_samples=10)
    assert task.metrics_for(spec) == ("eval_loss", "pass_at_1", "pass_at_10")
    _, evals = task.load(spec)
    examples = [ex for ex in evals for _ in range(10)]
    completions = []
    for i, ex in enumerate(evals):
        right = 3 if i == 0 else 10  # problem 0: 3 of 10 right; problem 1: all right
        completions += [ex["response"]] * right + ["    return None\n"] * (10 - right)
    scores = task.score(examples, completions)
    assert scores["pass_at_1"] == pytest.approx((0.3 + 1.0) / 2)
    assert scores["pass_at_10"] == 1.0


def test_humaneval_local_problem_file_and_errors(tmp_path):
    problems = read_problems()[:3]
    path = tmp_path / "HumanEval.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in problems))
    task = get_task("humaneval")
    spec = DataSpec(name="humaneval", data_files={"train": str(DATA / "code_train.jsonl"), "problems": str(path)})
    _, evals = task.load(spec)
    assert sorted(json.loads(e["problem"])["task_id"] for e in evals) == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    with pytest.raises(ValueError, match=r"data\.data_files: task humaneval has no built-in data"):
        task.validate(DataSpec(name="humaneval"))
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({"task_id": "x", "prompt": "def f():\n"}) + "\n")
    with pytest.raises(ValueError, match=r"problems=.*missing HumanEval column\(s\) canonical_solution"):
        task.validate(DataSpec(name="humaneval", data_files={"train": str(DATA / "code_train.jsonl"),
                                                               "problems": str(broken)}))


def test_humaneval_generation_runs_through_the_sandbox(tokenizer):
    """Real pipeline: generate with the stop sequences, run in the sandbox, report pass@1."""
    task = get_task("humaneval")
    spec = humaneval_spec(max_eval_samples=2, max_new_tokens=8, max_length=256)
    _, evals = task.load(spec)
    scores = task.evaluate(tiny_lm(tokenizer), eval_batches(task, tokenizer, evals, spec), tokenizer)
    assert scores["pass_at_1"] == 0.0 and math.isfinite(scores["eval_loss"])


# -- XNLI ----------------------------------------------------------------------------------------

def xnli_spec(**kw) -> DataSpec:
    files = {"train": str(DATA / "xnli_train.jsonl"), "validation": str(DATA / "xnli_validation.jsonl")}
    return DataSpec.from_dict(dict(name="xnli", data_files=files, **kw))


def test_xnli_k_per_language_deterministic_by_seed():
    task = get_task("xnli")
    train, evals = task.load(xnli_spec(samples_per_language=2, seed=1))
    count = lambda rows, lang: sum(r["language"] == lang for r in rows)
    assert [count(train, x) for x in ("en", "fr", "de")] == [2, 2, 2]
    assert [count(evals, x) for x in ("en", "fr", "de")] == [4, 4, 4]
    assert train == task.load(xnli_spec(samples_per_language=2, seed=1))[0]
    others = [task.load(xnli_spec(samples_per_language=2, seed=s))[0] for s in range(2, 6)]
    assert any(o != train for o in others)
    only, _ = task.load(xnli_spec(languages=["fr"]))
    assert {r["language"] for r in only} == {"fr"} and {r["label"] for r in only} <= {0, 1, 2}


def test_xnli_reports_accuracy_per_language(minilm_tokenizer):
    from transformers import AutoModelForSequenceClassification

    task = get_task("xnli")
    spec = xnli_spec(max_eval_samples=3)
    _, evals = task.load(spec)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(default_model_path(), num_labels=3)
    scores = task.evaluate(model, eval_batches(task, minilm_tokenizer, evals, spec, size=4), minilm_tokenizer)
    per = {k: v for k, v in scores.items() if k.startswith("accuracy/")}
    assert set(per) == {"accuracy/de", "accuracy/en", "accuracy/fr"}
    assert scores["accuracy"] == pytest.approx(sum(per.values()) / 3)  # each language weighs the same
    assert all(v in (0.0, 1 / 3, 2 / 3, 1.0) or math.isclose(v * 3, round(v * 3)) for v in per.values())
    assert task.mode_of("accuracy/fr") == "max"


def test_xnli_language_errors():
    with pytest.raises(ValueError, match=r"data\.languages: 'xx' is not a xnli language on the Hub"):
        get_task("xnli").validate(DataSpec(name="xnli", options={"languages": ["fr", "xx"]}))
    with pytest.raises(ValueError, match=r"no rows for language 'es'"):
        get_task("xnli").load(xnli_spec(languages=["es"]))
    with pytest.raises(ValueError, match=r"data\.languages: task gsm8k does not use it \(tasks that do: flores, xnli\)"):
        get_task("gsm8k").validate(gsm8k_spec(languages=["fr"]))
    with pytest.raises(ConnectionError, match=r"facebook/xnli"):
        get_task("xnli").load(DataSpec(name="xnli", options={"languages": ["fr"]}))


# -- FLORES --------------------------------------------------------------------------------------

def flores_spec(**kw) -> DataSpec:
    files = {"dev": str(DATA / "flores_dev.jsonl"), "devtest": str(DATA / "flores_devtest.jsonl")}
    return DataSpec.from_dict(dict(name="flores", data_files=files, **kw))


def test_flores_pairs_english_with_each_language_by_id():
    task = get_task("flores")
    train, evals = task.load(flores_spec(samples_per_language=3))
    assert sorted({r["language"] for r in train}) == ["deu_Latn", "fra_Latn"]
    assert sum(r["language"] == "fra_Latn" for r in train) == 3 and len(evals) == 4
    rows = [json.loads(line) for name in ("flores_dev.jsonl", "flores_devtest.jsonl")
            for line in (DATA / name).read_text().splitlines()]
    sentence = {(r["language"], r["id"]): r["sentence"] for r in rows}
    for ex in train + evals:  # the English source and the target come from the same id
        sid = next(i for (lang, i), text in sentence.items() if lang == "eng_Latn" and f"English: {text}\n" in ex["prompt"])
        assert ex["response"] == " " + sentence[(ex["language"], sid)]
    sandcastle = next(r for r in evals if "sandcastle" in r["prompt"] and r["language"] == "deu_Latn")
    assert sandcastle["prompt"].startswith("Translate this sentence from English to German.")
    assert sandcastle["prompt"].endswith("\nGerman:") and sandcastle["response"] == " Die Kinder bauten eine Sandburg."


def test_flores_chrf_per_language_matches_sacrebleu():
    from sacrebleu.metrics import CHRF

    task = get_task("flores")
    _, evals = task.load(flores_spec())
    perfect = task.score(evals, [ex["response"] for ex in evals])
    assert perfect["chrf"] == pytest.approx(100.0) and perfect["chrf/fra_Latn"] == pytest.approx(100.0)
    guesses = ["Les enfants ont un château.", "Du pain est au marché.", "Die Kinder bauen.", "Brot."]
    order = [(ex["language"], ex["response"].strip()) for ex in evals]
    scores = task.score(evals, guesses)
    for language in ("fra_Latn", "deu_Latn"):
        hyps = [g for g, (lang, _) in zip(guesses, order) if lang == language]
        refs = [r for lang, r in order if lang == language]
        assert scores[f"chrf/{language}"] == pytest.approx(CHRF().corpus_score(hyps, [refs]).score)
    assert scores["chrf"] == pytest.approx((scores["chrf/fra_Latn"] + scores["chrf/deu_Latn"]) / 2)


def test_flores_generates_and_scores(tokenizer):
    task = get_task("flores")
    spec = flores_spec(max_new_tokens=6)
    _, evals = task.load(spec)
    scores = task.evaluate(tiny_lm(tokenizer), eval_batches(task, tokenizer, evals, spec), tokenizer)
    assert set(scores) == {"eval_loss", "chrf", "chrf/deu_Latn", "chrf/fra_Latn"}
    assert 0 <= scores["chrf"] < 30


def test_flores_errors():
    with pytest.raises(ValueError, match=r"data\.languages: 'french' is not a FLORES-200 code"):
        get_task("flores").validate(DataSpec(name="flores", options={"languages": ["french"]}))
    with pytest.raises(ValueError, match="eng_Latn is the source language"):
        get_task("flores").validate(DataSpec(name="flores", options={"languages": ["eng_Latn"]}))
    with pytest.raises(ValueError, match=r"needs a 'dev' file"):
        get_task("flores").validate(DataSpec(name="flores", data_files={"devtest": str(DATA / "flores_devtest.jsonl")}))


# -- MT-Bench ------------------------------------------------------------------------------------

class JudgeServer:
    """A real OpenAI-compatible endpoint on 127.0.0.1: answers /models and /chat/completions with
    the rating chosen by `rate(prompt)`, and records every request."""

    def __init__(self, rate):
        self.requests: list[dict] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def reply(self, body: dict):
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                outer.requests.append({"path": self.path, "auth": self.headers.get("Authorization")})
                self.reply({"object": "list", "data": [{"id": "judge-model", "object": "model"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                text = rate(body["messages"][-1]["content"])
                self.reply({"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]})

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def judge_server():
    def rate(prompt: str) -> str:  # deterministic and content-dependent: math answers get 2, others 8
        if "Reference Answer" in prompt:
            return "The answer is wrong. Rating: [[2]]"
        return "I cannot decide." if "letter L" in prompt else "Fine. Rating: [[8]]"

    server = JudgeServer(rate)
    yield server
    server.close()


def mt_spec(judge: dict | None, **kw) -> DataSpec:
    files = {"train": str(Path(__file__).resolve().parents[1] / "data" / "instructions.jsonl"),
             "questions": str(DATA / "mt_bench_questions.jsonl")}
    return DataSpec.from_dict(dict(name="mt_bench", data_files=files, judge=judge, label_field="output", **kw))


def test_mt_bench_without_a_judge_fails_at_validation():
    with pytest.raises(ValueError, match=r"data\.judge: task mt_bench needs a judge model"):
        get_task("mt_bench").validate(mt_spec(None))
    cfg = TrialConfig.from_dict({"data": {"name": "mt_bench", "data_files": mt_spec(None).data_files}})
    with pytest.raises(ValueError, match=r"data\.judge"):
        validate_trial(cfg)
    with pytest.raises(ConfigError, match=r"data\.judge: needs base_url and model"):
        TrialConfig.from_dict({"data": {"name": "mt_bench", "judge": {"model": "gpt-4o"}}})
    with pytest.raises(ConfigError, match=r"data\.judge\.temperature: unknown key"):
        TrialConfig.from_dict({"data": {"name": "mt_bench", "judge": {"local_model": "/x", "temperature": 0}}})


def test_mt_bench_unreachable_judge_or_missing_key_fails_at_validation(judge_server, monkeypatch):
    import socket

    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    with pytest.raises(ValueError, match=r"data\.judge\.base_url=.*does not answer GET /models"):
        get_task("mt_bench").validate(mt_spec({"base_url": f"http://127.0.0.1:{dead}/v1", "model": "m"}))
    monkeypatch.delenv("JUDGE_KEY_FOR_TEST", raising=False)
    with pytest.raises(ValueError, match=r"api_key_env='JUDGE_KEY_FOR_TEST': the variable is not set"):
        get_task("mt_bench").validate(mt_spec({"base_url": judge_server.url, "model": "m",
                                               "api_key_env": "JUDGE_KEY_FOR_TEST"}))
    monkeypatch.setenv("JUDGE_KEY_FOR_TEST", "sk-test")
    get_task("mt_bench").validate(mt_spec({"base_url": judge_server.url, "model": "m", "api_key_env": "JUDGE_KEY_FOR_TEST"}))
    assert judge_server.requests[-1] == {"path": "/v1/models", "auth": "Bearer sk-test"}


def test_mt_bench_two_turns_generated_and_judged(tokenizer, judge_server):
    task = get_task("mt_bench")
    spec = mt_spec({"base_url": judge_server.url, "model": "judge-model"}, max_new_tokens=5, max_length=128)
    train, evals = task.load(spec)
    assert len(train) > 0 and len(evals) == 3
    scores = task.evaluate(tiny_lm(tokenizer), eval_batches(task, tokenizer, evals, spec), tokenizer)
    posts = [r for r in judge_server.requests if r["path"] == "/v1/chat/completions"]
    assert len(posts) == 5  # two questions with two turns, one with one
    assert {p["body"]["model"] for p in posts} == {"judge-model"} and all(p["body"]["temperature"] == 0 for p in posts)
    second_turn = [p for p in posts if "earlier answer" in p["body"]["messages"][-1]["content"]]
    assert len(second_turn) == 2
    # writing: turn 1 -> 8, turn 2 (the "letter L" rewrite) -> unparsed -> 1; math: 2 and 2; extraction: 8
    assert scores["judge_unparsed"] == 1.0
    assert scores["mt_bench_score"] == pytest.approx((8 + 1 + 2 + 2 + 8) / 5)
    assert scores["mt_bench_score/turn_1"] == pytest.approx((8 + 2 + 8) / 3)
    assert scores["mt_bench_score/turn_2"] == pytest.approx((1 + 2) / 2)
    assert scores["mt_bench_score/math"] == 2.0 and scores["mt_bench_score/extraction"] == 8.0


def test_judge_rating_parser_and_config():
    assert parse_rating("ok. Rating: [[7]]") == 7.0
    assert parse_rating("Rating: [[7]] then [[9]]") == 9.0
    assert parse_rating("Rating: [[ 12 ]]") == 10.0 and parse_rating("nothing") is None
    assert JudgeConfig.from_dict({"local_model": "/models/j"}).describe() == "local model /models/j"
    with pytest.raises(ValueError, match=r"data\.judge\.base_url='ftp://x': must start with http"):
        JudgeConfig(base_url="ftp://x", model="m")


# -- the sweep file sees the new tasks ------------------------------------------------------------

def test_target_metrics_per_language_are_valid_targets():
    files = {"train": str(DATA / "xnli_train.jsonl"), "validation": str(DATA / "xnli_validation.jsonl")}
    cfg = TrialConfig.from_dict({"data": {"name": "xnli", "data_files": files, "languages": ["fr", "de"]},
                                 "target": {"metric": "accuracy/fr", "value": 0.6}})
    target = validate_trial(cfg)
    assert (target.metric, target.mode, target.value) == ("accuracy/fr", "max", 0.6)
    bad = TrialConfig.from_dict({"data": {"name": "xnli", "data_files": files, "languages": ["fr"]},
                                 "target": {"metric": "accuracy/de", "value": 0.6}})
    with pytest.raises(ConfigError, match=r"target\.metric='accuracy/de': task 'xnli' reports .*accuracy/fr"):
        validate_trial(bad)


def test_generative_tasks_are_registered():
    for name in ("gsm8k", "humaneval", "flores", "mt_bench"):
        assert isinstance(TASKS[name], GenerativeTask) and TASKS[name].kind == "causal_lm"
    assert TASKS["xnli"].kind == "classification" and TASKS["xnli"].num_labels == 3


# -- the Hub loaders, on local copies laid out as the Hub repositories are -------------------------

def hub_repo(root: Path, configs: dict[str, dict[str, list[dict]]]) -> str:
    """A dataset repository as on the Hub: README.md declaring the configs, one parquet per split."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml

    meta = []
    for config, split_rows in configs.items():
        files = []
        for split, rows in split_rows.items():
            (root / config).mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.Table.from_pylist(rows), root / config / f"{split}-00000-of-00001.parquet")
            files.append({"split": split, "path": f"{config}/{split}-*.parquet"})
        meta.append({"config_name": config, "data_files": files})
    (root / "README.md").write_text("---\n" + yaml.safe_dump({"configs": meta}) + "---\n")
    return str(root)


def jsonl(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text().splitlines()]


def test_hub_loaders_read_hub_shaped_repositories(tmp_path, monkeypatch):
    from orchestrator.tasks import mt_bench as mt_module

    gsm = hub_repo(tmp_path / "gsm8k", {"main": {"train": jsonl("gsm8k_train.jsonl"), "test": jsonl("gsm8k_test.jsonl")}})
    monkeypatch.setattr(type(get_task("gsm8k")), "HUB_PATH", gsm)
    train, evals = get_task("gsm8k").load(DataSpec(name="gsm8k"))
    assert (len(train), len(evals)) == (4, 2)

    label_id = {"entailment": 0, "neutral": 1, "contradiction": 2}
    xnli = {}
    for split, name in (("train", "xnli_train.jsonl"), ("validation", "xnli_validation.jsonl")):
        for row in jsonl(name):  # the Hub's configs are per language, labels as ints, no language column
            lang = row.pop("language")
            row["label"] = label_id.get(row["label"], row["label"])
            xnli.setdefault(lang, {}).setdefault(split, []).append(row)
    monkeypatch.setattr(type(get_task("xnli")), "HUB_PATH", hub_repo(tmp_path / "xnli", xnli))
    train, evals = get_task("xnli").load(DataSpec(name="xnli", options={"languages": ["fr", "de"], "samples_per_language": 3}))
    assert sorted(r["language"] for r in train) == ["de"] * 3 + ["fr"] * 3 and len(evals) == 8

    flores = {}
    for split in ("dev", "devtest"):
        for row in jsonl(f"flores_{split}.jsonl"):
            flores.setdefault(row.pop("language"), {}).setdefault(split, []).append(row)
    monkeypatch.setattr(type(get_task("flores")), "HUB_PATH", hub_repo(tmp_path / "flores", flores))
    train, evals = get_task("flores").load(DataSpec(name="flores", options={"languages": ["deu_Latn"], "samples_per_language": 2}))
    assert len(train) == 2 and len(evals) == 2 and {r["language"] for r in train + evals} == {"deu_Latn"}

    prompts = [{"prompt": q["turns"], "prompt_id": q["question_id"], "category": q["category"],
                "reference": q.get("reference") or []} for q in jsonl("mt_bench_questions.jsonl")]
    monkeypatch.setattr(mt_module, "HUB_PATH", hub_repo(tmp_path / "mt", {"default": {"train": prompts}}))
    questions = mt_module.read_questions(None)
    assert [q["turns"] for q in questions] == [q["turns"] for q in jsonl("mt_bench_questions.jsonl")]
    assert questions[1]["reference"] == ["51", "2601"] and questions[0]["reference"] == []


# -- generation split across data-parallel ranks ----------------------------------------------------

def _sharded_eval_worker(rank: int, world: int, folder: str, out: str):
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, AutoTokenizer

    task, spec = get_task("gsm8k"), gsm8k_spec(max_new_tokens=64)
    tokenizer, model = AutoTokenizer.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(folder)
    train, _ = task.load(spec)
    scores = task.evaluate(model, eval_batches(task, tokenizer, train[:3], spec, size=1), tokenizer)
    everyone = [None] * world
    dist.all_gather_object(everyone, scores)
    if rank == 0:
        Path(out).write_text(json.dumps(everyone))


def test_generation_split_across_ranks_gives_the_single_process_scores(tokenizer, tmp_path):
    """3 eval batches on 2 ranks (one rank repeats a batch to keep step): the same eval_loss and
    exact_match as one process, on every rank."""
    task, spec = get_task("gsm8k"), gsm8k_spec(max_new_tokens=64)
    train, _ = task.load(spec)
    model = tiny_lm(tokenizer)
    memorize(model, task, tokenizer, train[:2])  # two answers learned, the third not: 2/3
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    alone = task.evaluate(model, eval_batches(task, tokenizer, train[:3], spec, size=1), tokenizer)
    assert alone["exact_match"] == pytest.approx(2 / 3)
    out = tmp_path / "scores.json"
    run_ranks(_sharded_eval_worker, (str(tmp_path / "model"), str(out)))
    on_rank_0, on_rank_1 = json.loads(out.read_text())
    assert on_rank_0 == on_rank_1
    assert on_rank_0["exact_match"] == alone["exact_match"]
    assert on_rank_0["eval_loss"] == pytest.approx(alone["eval_loss"], rel=1e-4)


def test_mt_bench_with_a_local_judge_model(tokenizer, tmp_path):
    """judge: {local_model: folder} runs a causal LM with transformers on rank 0. This tiny random
    one never writes a rating, so every answer is counted unparsed and scored 1."""
    from tests.conftest import save_tiny_causal_lm

    judge = save_tiny_causal_lm(str(tmp_path / "judge"))
    task = get_task("mt_bench")
    spec = mt_spec({"local_model": judge, "max_tokens": 16}, max_new_tokens=4, max_length=128)
    task.validate(spec)
    _, evals = task.load(spec)
    scores = task.evaluate(tiny_lm(tokenizer), eval_batches(task, tokenizer, evals, spec), tokenizer)
    assert scores["judge_unparsed"] == 5.0 and scores["mt_bench_score"] == 1.0
    with pytest.raises(ValueError, match=r"data\.judge\.local_model='/nowhere': folder not found"):
        task.validate(mt_spec({"local_model": "/nowhere"}))


def test_completions_keep_their_leading_space_with_sentencepiece_style_tokenizers():
    """Llama/Mistral tokenizers drop the first space of a sequence decoded alone: decoding the
    completion by itself would turn a 4-space HumanEval body into 3 spaces and fail every test."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    from orchestrator.tasks.generation import decode_completions

    sp = Tokenizer(models.BPE(unk_token="<unk>"))
    sp.normalizer = normalizers.Replace(" ", "\u2581")
    sp.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=True)
    sp.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    sp.train_from_iterator(["def f(x):\n    return x\n", "def g(y):\n    return y + 1\n"] * 20,
                           trainers.BpeTrainer(vocab_size=60, special_tokens=["<unk>", "</s>"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=sp, eos_token="</s>", pad_token="</s>")
    full = tok("def f(x):\n    return x\n", add_special_tokens=False)["input_ids"]
    prompt = tok("def f(x):\n", add_special_tokens=False)["input_ids"]
    assert full[:len(prompt)] == prompt
    assert tok.decode(full[len(prompt):]) == "   return x\n"  # the trap: one space short
    pad = tok.pad_token_id
    ids = torch.tensor([[pad, *prompt]])  # left-padded, as collate_eval makes them
    mask = torch.tensor([[0] + [1] * len(prompt)])
    new = torch.tensor([full[len(prompt):] + [tok.eos_token_id]])
    assert decode_completions(tok, ids, mask, new) == ["    return x\n"]


def test_mt_bench_references_stay_with_their_turn(tmp_path, judge_server):
    """A question with a reference for turn 2 only: turn 1 is judged without one, turn 2 with it."""
    from orchestrator.tasks.mt_bench import read_questions

    path = tmp_path / "question.jsonl"
    path.write_text(json.dumps({"question_id": 1, "category": "math", "turns": ["Pick a number.", "Square 51."],
                                "reference": ["", "2601"]}) + "\n")
    (question,) = read_questions(str(path))
    assert question["reference"] == ["", "2601"]
    config = JudgeConfig(base_url=judge_server.url, model="judge-model")
    example = {"turns": "\x1e".join(question["turns"]), "reference": "\x1e".join(question["reference"]),
               "category": "math"}
    scores = get_task("mt_bench").judge_all(config, [example], [["7", "2601"]])
    prompts = [r["body"]["messages"][-1]["content"] for r in judge_server.requests if "body" in r]
    assert len(prompts) == 2  # sent concurrently: in any order
    assert all(("Reference Answer" in p) == ("Square 51" in p) for p in prompts)
    assert scores["mt_bench_score/turn_1"] == 8.0 and scores["mt_bench_score/turn_2"] == 2.0


def test_multilingual_and_gsm8k_validation_gaps_are_closed(tmp_path):
    # per-language targets come from the languages of a local file when none are listed
    assert get_task("flores").metrics_for(flores_spec()) == ("eval_loss", "chrf", "chrf/fra_Latn", "chrf/deu_Latn")
    assert get_task("xnli").metrics_for(xnli_spec())[2:] == ("accuracy/en", "accuracy/fr", "accuracy/de")
    # column renames apply to local files only
    with pytest.raises(ValueError, match=r"data\.text_field='q': applies to local data_files only"):
        get_task("gsm8k").validate(DataSpec(name="gsm8k", text_field="q"))
    with pytest.raises(ValueError, match=r"data\.label_field='y': applies to local data_files only"):
        get_task("xnli").validate(DataSpec(name="xnli", label_field="y"))
    with pytest.raises(ValueError, match=r"data\.text_field: task flores reads the columns id, sentence"):
        get_task("flores").validate(flores_spec(text_field="text"))
    # max_train_samples caps the k-per-language draw
    assert len(get_task("xnli").load(xnli_spec(max_train_samples=5))[0]) == 5
    assert len(get_task("flores").load(flores_spec(max_train_samples=3))[0]) == 3
    # an MT-Bench questions file is checked before launch
    bad = tmp_path / "q.jsonl"
    bad.write_text(json.dumps({"question": "hi"}) + "\n")
    with pytest.raises(ValueError, match=r"questions=.*needs a 'turns' column"):
        get_task("mt_bench").validate_files(DataSpec(
            name="mt_bench", data_files={"train": str(DATA / "code_train.jsonl"), "questions": str(bad)},
            text_field="prompt", label_field="completion", options={"judge": {"local_model": str(tmp_path)}}))
    assert get_task("mt_bench").mode_of("judge_unparsed") == "min"


def test_hub_errors_tell_a_missing_config_from_no_access(tmp_path, monkeypatch):
    gsm = hub_repo(tmp_path / "gsm8k", {"main": {"train": jsonl("gsm8k_train.jsonl")}})
    from orchestrator.tasks import hub

    with pytest.raises(ValueError, match=r"flores: .* config 'fra_latn' split 'dev'"):
        hub.load_split(gsm, "fra_latn", "dev", "flores", "-")
    rows = hub.load_split(gsm, "main", "train", "gsm8k", "-", limit=2, seed=1)
    assert len(rows["question"]) == 2 and rows == hub.load_split(gsm, "main", "train", "gsm8k", "-", limit=2, seed=1)


def test_generation_budget_is_checked_against_the_model_context(tmp_path):
    from tests.conftest import save_tiny_causal_lm

    model = save_tiny_causal_lm(str(tmp_path / "model"))  # 512 positions
    data = {"name": "gsm8k", "data_files": gsm8k_spec().data_files}
    ok = TrialConfig.from_dict({"data": {**data, "max_new_tokens": 128}, "model": {"name_or_path": model}})
    validate_trial(ok)
    for extra, match in (({"max_new_tokens": 512}, r"data\.max_new_tokens=512: leaves no room for the prompt"),
                         ({"max_length": 1024}, r"data\.max_length=1024: longer than the model's context \(512")):
        bad = TrialConfig.from_dict({"data": {**data, **extra}, "model": {"name_or_path": model}})
        with pytest.raises(ConfigError, match=match):
            validate_trial(bad)
