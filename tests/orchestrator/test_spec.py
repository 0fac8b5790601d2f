"""Sweep files: the shipped ones validate; malformed ones give clear errors (file, line, key path),
never a traceback; the plan is deterministic."""

from __future__ import annotations

import dataclasses
import glob
import os

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from methods.config import ConfigError
from orchestrator import space
from orchestrator.cli import main
from orchestrator.config import TrialConfig
from orchestrator.spec import SweepFileError, load_sweep
from orchestrator.placement import max_concurrent
from orchestrator.sweep import trial_name

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
SHIPPED = sorted(glob.glob(os.path.join(ROOT, "search_spaces", "*.yaml")))

GOOD = {
    "name": "t",
    "data": {"name": "bbc_news"},
    "methods": {"lora": {"r": {"choice": [4, 8]}, "train.lr": {"loguniform": [1.0e-4, 1.0e-3]}},
                "hybrid": {"gate": {"tau": {"grid": [0.5, 1.0]}}, "boft.n_butterfly_factor": 2}},
    "tune": {"num_samples": 2, "seeds": [0, 1, 2]},
}


def write(tmp_path, spec) -> str:
    path = tmp_path / "s.yaml"
    path.write_text(spec if isinstance(spec, str) else yaml.safe_dump(spec, sort_keys=False))
    return str(path)


def test_shipped_files_exist_and_validate():
    names = {os.path.basename(p) for p in SHIPPED}
    assert {"quickstart.yaml", "hybrid.yaml", "compare.yaml", "lora.yaml", "lora_ga.yaml", "boft.yaml",
            "unitary.yaml", "full.yaml"} <= names
    for path in SHIPPED:
        spec = load_sweep(path)
        assert spec.plan(), path
    compare = load_sweep(os.path.join(ROOT, "search_spaces", "compare.yaml"))
    assert set(compare.methods) == {"full", "lora", "lora_ga", "boft", "unitary", "hybrid"}
    assert len(compare.tune.seeds) == 3


def test_plan_is_deterministic_and_per_method(tmp_path):
    spec = load_sweep(write(tmp_path, GOOD))
    plan = spec.plan()
    assert plan == load_sweep(write(tmp_path, GOOD)).plan()
    lora = [t for t in plan if t["method"] == "lora"]
    hybrid = [t for t in plan if t["method"] == "hybrid"]
    assert len(lora) == 2 * 3 and len(hybrid) == 2 * 3  # samples x seeds; grid(2) x seeds, no random entry
    assert {t["point"]["gate.tau"] for t in hybrid} == {0.5, 1.0}
    cfg = TrialConfig.from_dict(hybrid[0]["trial"])  # the plan's dict reads back as the typed trial
    assert cfg == spec.trial("hybrid", hybrid[0]["point"], 0)
    assert (cfg.method.gate.tau, cfg.method.boft.n_butterfly_factor) == (0.5, 2)
    assert cfg.method.lora_ga == type(cfg.method)().lora_ga  # not in the space: the method's default
    assert all(1e-4 <= x["trial"]["train"]["lr"] <= 1e-3 for x in lora)
    assert trial_name(hybrid[0]["trial"], hybrid[0]["point"]) == "hybrid-m2-tau0.5-seed0"


@pytest.mark.parametrize(
    "patch,message",
    [
        ({"data": {"name": "bbc_news", "max_lenght": 64}}, r"line 4: data\.max_lenght: unknown key"),
        ({"tune": {"scheduler": "hyperband"}}, r"tune\.scheduler='hyperband': must be one of 'fifo', 'asha'"),
        ({"methods": {"dora": {}}}, r"methods\.dora: unknown method"),
        ({"methods": {"lora": {"r": {"logunifrm": [1, 2]}}}}, r"methods\.lora\.r: unknown distribution 'logunifrm'"),
        ({"methods": {"lora": {"r": {"choice": [0, 8]}}}}, r"methods\.lora\.r=0: must be an integer >= 1"),
        ({"methods": {"lora": {"rank": 8}}}, r"methods\.lora\.rank: unknown key for LoraConfig"),
        ({"methods": {"lora": {"train.lr": {"loguniform": [0, 1]}}}}, r"loguniform: expected \[low, high\] with 0 < low"),
        ({"methods": {"boft": {"train.batch_size": 7}}}, r"methods\.boft\.train\.batch_size=7: must be divisible"),
        ({"target": {"metric": "f1"}}, r"target\.metric='f1': task 'bbc_news' reports"),
        # a task's own key on a task that has no such option is rejected, not ignored
        ({"data": {"name": "bbc_news", "samples_per_language": 8}},
         r"line 4: data\.samples_per_language: task bbc_news does not use it \(tasks that do: flores, xnli\)"),
        ({"resources": {"num_workers": 0}}, r"resources\.num_workers=0"),
        ({"colour": "blue"}, r"colour: unknown section"),
        ({"tune": {"search_alg": "optuna"}}, r"search_alg='optuna': needs one method"),
        ({"methods": {"lora": {"r": 8}}, "tune": {"num_samples": 4}},
         r"tune\.num_samples=4: no method has a sampled value .* every sample would be the same trial"),
        ({"methods": {"lora": {"r": {"grid": [4, 8]}}}, "tune": {"num_samples": 4, "search_alg": "grid"}},
         r"tune\.num_samples=4: search_alg=grid runs each grid point once per seed"),
        ({"methods": {"lora": {"r": {"grid": [4, 8]}}}, "tune": {"search_alg": "optuna", "seeds": [0]}},
         r"methods\.lora\.r: search_alg=optuna samples its space and has no grid"),
        # ASHA's settings with fifo, or a grace period no trial reaches: rejected, not ignored
        ({"tune": {"scheduler": "fifo", "reduction_factor": 3}},
         r"line \d+: tune\.reduction_factor: ASHA's setting, but tune\.scheduler is fifo, which would ignore it"),
        ({"tune": {"scheduler": "asha", "grace_period": 4}, "train": {"max_steps": 30, "eval_every": 10}},
         r"tune\.grace_period=4: trials report at most 3 time\(s\) .* ASHA would stop no trial early"),
    ],
)
def test_errors_name_file_line_key_and_expectation(tmp_path, patch, message):
    spec = {**GOOD, **patch}
    with pytest.raises(SweepFileError, match=message) as e:
        load_sweep(write(tmp_path, spec))
    assert str(e.value).startswith(str(tmp_path / "s.yaml"))


def test_every_error_reported_at_once(tmp_path):
    spec = {**GOOD, "data": {"name": "bbc_news", "max_lenght": 1}, "tune": {"scheduler": "x"},
            "methods": {"dora": {}}}
    with pytest.raises(SweepFileError) as e:
        load_sweep(write(tmp_path, spec))
    assert len(e.value.errors) == 3


def test_cli_validate_exits_nonzero_before_ray(tmp_path, capsys):
    import ray

    assert main(["validate", write(tmp_path, {**GOOD, "tune": {"seeds": []}})]) == 2
    assert "tune.seeds=[]" in capsys.readouterr().err
    assert main(["validate", write(tmp_path, "name: [unclosed")]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    assert main(["sweep", write(tmp_path, {**GOOD, "methods": {"dora": {}}})]) == 2
    assert not ray.is_initialized()
    assert main(["validate", write(tmp_path, GOOD)]) == 0
    assert main(["sweep", write(tmp_path, GOOD), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "12 trial(s)" in out and "hybrid-m2-tau1-seed2" in out
    assert main(["describe", "hybrid"]) == 0
    assert "gate.tau" in capsys.readouterr().out


def test_concurrency_follows_resources(tmp_path):
    # CPU workers are pinned to whole cores: 0.49 CPU is a core, so 2 workers fill 2 cores.
    spec = load_sweep(write(tmp_path, {**GOOD, "resources": {"num_workers": 2, "cpus_per_worker": 0.49}}))
    assert max_concurrent(spec, {"CPU": 2.0}) == 1
    spec = load_sweep(write(tmp_path, {**GOOD, "resources": {"num_workers": 1, "cpus_per_worker": 0.49}}))
    assert max_concurrent(spec, {"CPU": 2.0}) == 2 and max_concurrent(spec, {"CPU": 3.0}) == 3
    spec = load_sweep(write(tmp_path, {**GOOD, "resources": {"num_workers": 2, "cpus_per_worker": 1}}))
    assert max_concurrent(spec, {"CPU": 2.0}) == 1
    spec = load_sweep(write(tmp_path, {**GOOD, "resources": {"num_workers": 8, "cpus_per_worker": 4, "gpus_per_worker": 1}}))
    assert max_concurrent(spec, {"CPU": 96.0, "GPU": 16.0}) == 2
    spec = load_sweep(write(tmp_path, {**GOOD, "tune": {"max_concurrent_trials": 1}}))
    assert max_concurrent(spec, {"CPU": 64.0}) == 1


def test_distribution_corners_cover_extremes():
    corners = space.corners({"a": {"randint": [2, 5]}, "b": {"choice": ["x", "y"]}, "c": 1})
    assert {(c["a"], c["b"]) for c in corners} == {(2, "x"), (2, "y"), (4, "x"), (4, "y")}


# --- property tests: any malformed file -> a clear error, never a traceback --------------------

yaml_scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 10), st.floats(-1, 1e3, allow_nan=False),
                         st.text(max_size=8))
yaml_values = st.recursive(yaml_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=10), inner, max_size=3)), max_leaves=8)
sections = st.sampled_from(["name", "data", "methods", "tune", "train", "target", "resources", "deepspeed",
                            "model", "tracking", "storage", "bogus"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(sections, yaml_values, max_size=6))
def test_random_structures_never_traceback(tmp_path, doc):
    try:
        load_sweep(write(tmp_path, yaml.safe_dump(doc)), validate_data=False)
    except ConfigError as e:
        assert str(e).startswith(str(tmp_path))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(sorted(GOOD)), st.text(max_size=3) | yaml_values)
def test_one_bad_value_in_a_good_file(tmp_path, section, value):
    try:
        load_sweep(write(tmp_path, {**GOOD, section: value}), validate_data=False)
    except ConfigError as e:
        assert str(e).startswith(str(tmp_path)) and "\n" not in str(e).split(": ", 1)[0]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=200))
def test_arbitrary_text_never_tracebacks(tmp_path, text):
    try:
        load_sweep(write(tmp_path, text), validate_data=False)
    except ConfigError:
        pass


def test_benchmark_tasks_in_sweep_files(tmp_path, capsys):
    """The paper's tasks are sweepable: data options validate with file and key, the judge too."""
    from tests.conftest import BENCHMARK_DATA

    flores = {"dev": os.path.join(BENCHMARK_DATA, "flores_dev.jsonl"),
              "devtest": os.path.join(BENCHMARK_DATA, "flores_devtest.jsonl")}
    ok = {**GOOD, "data": {"name": "flores", "data_files": flores, "languages": ["fra_Latn"], "max_new_tokens": 32},
          "target": {"metric": "chrf/fra_Latn", "value": 20.0}}
    spec = load_sweep(write(tmp_path, ok))
    assert spec.data.options.languages == ("fra_Latn",)
    assert main(["validate", write(tmp_path, {**ok, "data": {**ok["data"], "judge": {"local_model": "/j"}}})]) == 2
    assert "data.judge: task flores does not use it (tasks that do: mt_bench)" in capsys.readouterr().err
    no_judge = {**GOOD, "data": {"name": "mt_bench", "data_files": {"train": "x.jsonl"}}}
    assert main(["validate", write(tmp_path, no_judge)]) == 2
    assert "data.judge: task mt_bench needs a judge model" in capsys.readouterr().err
    typo = {**GOOD, "data": {"name": "mt_bench", "judge": {"base_url": "http://127.0.0.1:9/v1", "modle": "m"}}}
    assert main(["validate", write(tmp_path, typo)]) == 2
    err = capsys.readouterr().err
    assert "s.yaml" in err and "data.judge.modle: unknown key" in err
    assert main(["describe", "gsm8k"]) == 0
    assert "exact_match >= 0.35" in capsys.readouterr().out


def test_shape_errors_are_found_before_launch_on_the_meta_device(tmp_path, capsys):
    """A BOFT block size that does not divide MiniLM's width 384 fails validation, naming the
    layer; nothing is loaded but config.json (the model is built on the meta device)."""
    import ray

    bad = {**GOOD, "methods": {"boft": {"block_size": {"grid": [8, 5]}}}}
    assert main(["validate", write(tmp_path, bad)]) == 2
    err = capsys.readouterr().err
    assert "s.yaml" in err and "attention.self.query: in_features (384) must be divisible by block_size (5)" in err
    assert "methods.boft (block_size=5): bert.encoder" in err  # which corner of the space, from the sweep file
    assert not ray.is_initialized()
    typo = {**GOOD, "methods": {"lora": {"target_modules": ["q_proj"]}}}  # Llama's name, not BERT's
    assert main(["validate", write(tmp_path, typo)]) == 2
    assert "target_modules=('q_proj',) matched no nn.Linear/Conv1D module" in capsys.readouterr().err


def test_the_judge_key_is_passed_to_cluster_workers_by_name(tmp_path, monkeypatch):
    from orchestrator.cli import worker_env
    from orchestrator.tasks import DataSpec

    spec = load_sweep(write(tmp_path, GOOD))
    assert worker_env(spec) == {}
    judged = dataclasses.replace(spec, data=DataSpec(name="mt_bench", options={"judge": {
        "base_url": "http://h:1/v1", "model": "m", "api_key_env": "JUDGE_KEY_T"}}))
    monkeypatch.delenv("JUDGE_KEY_T", raising=False)
    assert worker_env(judged) == {}
    monkeypatch.setenv("JUDGE_KEY_T", "sk-1")
    assert worker_env(judged) == {"JUDGE_KEY_T": "sk-1"}


def test_each_task_has_its_own_data_options_and_the_flat_form_round_trips():
    from orchestrator.tasks import DataSpec
    from orchestrator.tasks.multilingual import FloresOptions

    flat = {"name": "flores", "languages": ["fra_Latn"], "max_new_tokens": 8, "max_length": 64}
    spec = DataSpec.from_dict(flat)
    assert spec.options == FloresOptions(languages=("fra_Latn",), max_new_tokens=8)  # samples_per_language: 32
    assert DataSpec.from_dict(spec.to_dict()) == spec and TrialConfig.from_dict({"data": spec.to_dict()}).data == spec
    assert set(DataSpec(name="bbc_news").to_dict()) == {f for f in spec.to_dict()} - {"languages", "max_new_tokens",
                                                                                       "samples_per_language"}
    with pytest.raises(ValueError, match=r"data\.options: task xnli takes MultilingualOptions, got FloresOptions"):
        DataSpec(name="xnli", options=spec.options)
    with pytest.raises(ConfigError, match=r"^data\.max_new_tokens=0: must be an integer >= 1 or null$"):
        DataSpec.from_dict({"name": "gsm8k", "max_new_tokens": 0})
    # A trial stored before tasks had their own options lists every task's keys at their defaults
    old = {"data": {"name": "bbc_news", "languages": None, "samples_per_language": 32, "max_new_tokens": None,
                    "num_samples": None, "judge": None}, "method": {"name": "lora", "config": {"r": 4}}}
    cfg = TrialConfig.from_dict(old)
    assert cfg.data == DataSpec(name="bbc_news") and cfg.method.r == 4 and cfg.method.alpha == 16.0
    assert TrialConfig.from_dict(cfg.to_dict()) == cfg
    # ... and one that set samples_per_language on a task that never read it ran without it
    assert TrialConfig.from_dict({"data": {"name": "bbc_news", "samples_per_language": 8}}).data == cfg.data
    # In a sweep file that key is refused; another task's key at null says nothing and is accepted
    with pytest.raises(ConfigError, match=r"data\.samples_per_language: task bbc_news does not use it"):
        DataSpec.from_dict({"name": "bbc_news", "samples_per_language": 8})
    assert DataSpec.from_dict({"name": "bbc_news", "languages": None, "judge": None}) == DataSpec(name="bbc_news")
    with pytest.raises(ValueError, match=r"data\.name='xnlii': unknown task"):  # a misspelt name, not its keys
        DataSpec.from_dict({"name": "xnlii", "languages": ["fr"]})


def test_a_per_method_section_error_found_on_the_whole_trial_names_the_methods_entry(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text('{"train_batch_size": 999}')
    bad = {**GOOD, "methods": {"lora": {"deepspeed.config_file": str(ds)}}}
    with pytest.raises(SweepFileError, match=r"line \d+: methods\.lora\.deepspeed\.config_file=.*train_batch_size=999 disagrees"):
        load_sweep(write(tmp_path, bad))
