"""MLflow tracking against a real `mlflow server` (subprocess, SQLite store, free port).

No Ray sweep runs here: the `MlflowTracker` callback is driven the way Tune drives it (start,
results shaped exactly like the worker's reports plus Tune's own keys, complete / error), while
the same reports are written to a Tune-shaped storage folder (`result.json` lines, `params.json`,
`error.txt`, `summary.json`) for `sync_from_storage`. Everything is checked through the server's
REST API, as a user of the UI would see it.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import socket
import time
import urllib.parse
import urllib.request

import pytest

from methods.config import ConfigError
from orchestrator import tracking
from orchestrator.config import Target

TARGET = Target("accuracy", "max", 0.8)
SWEEP_YAML = """\
name: demo
data: {name: bbc_news, max_train_samples: 64}
target: {metric: accuracy, value: 0.8}
train: {max_steps: 60, batch_size: 8, eval_every: 10}
methods:
  full: {}
  lora: {r: {grid: [4, 8]}}
  hybrid: {gate.tau: 0.5, boft.n_butterfly_factor: 2}
tune: {seeds: [0, 1], search_alg: grid}
resources: {num_workers: 2, cpus_per_worker: 0.49}
storage: STORAGE
"""
LAYERS = [f"bert.encoder.layer.{i}.attention.self.{p}" for i in range(2) for p in ("query", "value")]
# name -> accuracy per report (every 10 steps), seconds per step, peak MB, trainable, ending
OUTCOMES = {
    "full-seed0": ([0.5, 0.7, 0.82], 1.0, 2000.0, 22_700_000, "complete"),
    "full-seed1": ([0.5, 0.72, 0.81], 1.1, 2010.0, 22_700_000, "complete"),
    "lora-r4-seed0": ([0.4], 1.0, 990.0, 75_000, "complete"),  # ASHA stops it: no `done` report
    "lora-r4-seed1": ([0.45, "diverged"], 1.0, 995.0, 75_000, "complete"),
    "lora-r8-seed0": ([0.6, 0.81], 1.0, 1000.0, 150_000, "complete"),
    "lora-r8-seed1": ([0.6, 0.83], 1.1, 1010.0, 150_000, "complete"),
    "hybrid-m2-tau0.5-seed0": ([0.7, 0.85], 0.7, 900.0, 120_000, "complete"),
    "hybrid-m2-tau0.5-seed1": ([0.6], 0.7, 905.0, 120_000, "error"),
}
_CACHE: dict = {}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def api(url: str, endpoint: str, body: dict | None = None, **query) -> dict:
    """GET (query) or POST (body) on the MLflow REST API."""
    full = f"{url}/api/2.0/mlflow/{endpoint}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(full, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.load(r)


def search(url: str, experiment_id: str, filter_string: str = "") -> list[dict]:
    return api(url, "runs/search", {"experiment_ids": [experiment_id], "filter": filter_string,
                                    "max_results": 1000}).get("runs", [])


def experiment_id(url: str, name: str) -> str:
    return api(url, "experiments/get-by-name", experiment_name=name)["experiment"]["experiment_id"]


def history(url: str, run_id: str, key: str) -> list[dict]:
    return api(url, "metrics/get-history", run_id=run_id, metric_key=key).get("metrics", [])


def artifacts(url: str, run_id: str, path: str = "") -> list[str]:
    return [f["path"] for f in api(url, "artifacts/list", run_id=run_id, path=path).get("files", [])]


def kv(run: dict, what: str) -> dict[str, str]:
    return {x["key"]: x["value"] for x in run["data"].get(what, [])}


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """One real server for test_tracking and test_compare (both import this fixture)."""
    if "url" not in _CACHE:
        store = tmp_path_factory.mktemp("mlflow-server")
        port = free_port()
        proc = tracking.start_server(str(store / "mlflow.db"), port)
        url = f"http://127.0.0.1:{port}"
        try:  # ~10 s on an idle 2-core machine; far longer when the cores are busy
            tracking.wait_for_server(url, proc, timeout_s=300)
        except BaseException:
            tracking.stop_server(proc)
            raise
        _CACHE.update(url=url, proc=proc)
    yield _CACHE["url"]
    tracking.stop_server(_CACHE["proc"])


def make_adapter(folder) -> str:
    """A real LoRA adapter of a tiny BERT, in methods.save_adapter's format."""
    import methods
    from tests.conftest import tiny_bert

    methods.save_adapter(methods.apply_method(tiny_bert(), methods.config_for("lora", {"r": 2})), str(folder))
    return str(folder)


class ErroredTrial:
    """What on_trial_error needs of a Tune Trial whose error file Tune has just written."""

    def __init__(self, trial_id: str, config: dict, error_file: str):
        self.trial_id, self.config, self.error_file, self.status = trial_id, config, error_file, "ERROR"

    def __str__(self):
        return self.config["run"]["name"]


def load_demo_spec(tmp_path):
    from orchestrator.spec import load_sweep

    path = tmp_path / "demo.yaml"
    path.write_text(SWEEP_YAML.replace("STORAGE", str(tmp_path / "runs")))
    return load_sweep(str(path), validate_data=False)


def trial_name(t: dict) -> str:
    short = {"r": "r", "boft.n_butterfly_factor": "m", "gate.tau": "tau"}
    return "-".join([t["method"], *(f"{short[k]}{v}" for k, v in sorted(t["point"].items())), f"seed{t['seed']}"])


def reports_for(name: str, trial_id: str, config: dict, adapter: str, storage: str) -> list[dict]:
    """Tune results as the tracker sees them: the worker's report, TuneReportCallback's
    checkpoint_path, Tune's bookkeeping keys and the config."""
    accs, per_step, peak, trainable, _ = OUTCOMES[name]
    out, ttq = [], None
    for i, acc in enumerate(accs):
        step, elapsed = 10 * (i + 1), 10 * (i + 1) * per_step
        diverged = acc == "diverged"
        score = float("-inf") if diverged else acc
        if not diverged and ttq is None and score >= TARGET.value:
            ttq = elapsed
        stop = "diverged" if diverged else "target_reached" if ttq is not None else "budget" if step >= 60 else ""
        checkpoint = os.path.join(storage, "trials", f"demo-{trial_id}", f"checkpoint_{i:06d}")
        shutil.copytree(adapter, os.path.join(checkpoint, "adapter"))
        r = {"step": step, "train_loss": float("nan") if diverged else 1.5 - acc, "eval_loss": 1.4 - (0 if diverged else acc),
             "accuracy": score, "macro_f1": score, "samples_seen": step * 8, "tokens_seen": step * 8 * 60,
             "samples_per_s": 8 / per_step, "tokens_per_s": 480 / per_step, "elapsed_s": elapsed,
             "peak_memory_mb": peak, "trainable_params": trainable, "total_params": 22_700_000 + trainable * (name[0] != "f"),
             "target_metric": "accuracy", "target": TARGET.value, "target_reached": ttq is not None,
             "done": bool(stop), "stop_reason": stop, "lr": 1e-3 * (1 - step / 60),
             "checkpoint_path": checkpoint, "timestamp": int(time.time()), "checkpoint_dir_name": None,
             "training_iteration": i + 1, "trial_id": trial_id, "date": "2026-01-01_00-00-00",
             "time_this_iter_s": 10 * per_step, "time_total_s": elapsed, "pid": 1, "hostname": "h",
             "node_ip": "127.0.0.1", "config": config, "time_since_restore": elapsed, "iterations_since_restore": i + 1}
        # The worker's clock parts: 5 s of setup, the rest training (3/4) and evaluation (1/4).
        r.update(setup_s=5.0, method_init_s=0.0, train_s=(elapsed - 5) * 0.75, eval_s=(elapsed - 5) * 0.25,
                 checkpoint_s=0.0, concurrent_trials=0)
        if ttq is not None:
            r.update(time_to_quality_s=ttq, train_time_to_quality_s=ttq - 5)
        if name.startswith("hybrid"):
            r["layers"] = {k: {"gate": round(0.5 + (j - 1.5) * 0.05 * (i + 1), 4), "grad_norm_boft": 0.1 * (j + 1)}
                           for j, k in enumerate(LAYERS)}
        out.append(r)
    return out


def run_fake_sweep(spec, uri: str, storage: str, adapter: str, prefix: str = "abcde", upto: int | None = None,
                   tracker=None) -> dict:
    """Drive the tracker as Tune would and write Tune's storage files; `upto` stops feeding the
    tracker after that many reports per trial (as if MLflow went away), storage still gets all."""
    from ray.tune.experiment import Trial

    sweep_dir = os.path.join(storage, spec.name)
    plan = spec.plan()
    trials, summary_rows, expected = [], [], {}
    for i, t in enumerate(plan):
        name, trial_id = trial_name(t), f"{prefix}_{i:05d}"
        config = {"sweep": spec.name, "storage": storage, "target": {"metric": "accuracy", "mode": "max", "value": 0.8},
                  "run": {"name": name, "trial": t["trial"]}}
        folder = os.path.join(sweep_dir, f"{name}-{trial_id}")
        os.makedirs(folder)
        with open(os.path.join(folder, "params.json"), "w") as f:
            json.dump(config, f)
        reports = reports_for(name, trial_id, config, adapter, storage)
        with open(os.path.join(folder, "result.json"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in reports)  # Tune's JSON logger: NaN / -Infinity as is
        ending = OUTCOMES[name][4]
        error = None
        if ending == "error":
            error = "Failure # 1 (occurred at 2026-01-01_00-00-00)\nray.exceptions.RayTaskError: RuntimeError: worker OOM-killed\n"
            with open(os.path.join(folder, "error.txt"), "w") as f:
                f.write(error)
            trial = ErroredTrial(trial_id, config, os.path.join(folder, "error.txt"))
        else:
            trial = Trial("trial_driver", config=config, trial_id=trial_id, stub=True)
        trials.append(trial)
        last = reports[-1]
        stop = "error" if error else last["stop_reason"] or "early_stopped"
        summary_rows.append({"trial_id": trial_id, "name": name, "method": t["method"], "config": t["trial"],
                             "status": "ERROR" if error else "TERMINATED", "stop_reason": stop,
                             "error": error.splitlines()[1] if error else None, "step": last["step"],
                             "metric": last["accuracy"], "time_to_quality_s": last.get("time_to_quality_s"),
                             "train_time_to_quality_s": last.get("train_time_to_quality_s"),
                             "peak_memory_mb": last["peak_memory_mb"], "trainable_params": last["trainable_params"],
                             "elapsed_s": last["elapsed_s"]})
        expected[name] = {"trial_id": trial_id, "reports": reports, "stop_reason": stop, "error": error}
        if tracker is not None:
            tracker.on_trial_start(iteration=i, trials=trials, trial=trial)
            for r in reports[:upto]:
                tracker.on_trial_result(iteration=i, trials=trials, trial=trial, result=r)
            if upto is None:
                if error:
                    tracker.on_trial_error(iteration=i, trials=trials, trial=trial)
                else:
                    tracker.on_trial_complete(iteration=i, trials=trials, trial=trial)
    summary = {"target": {"metric": "accuracy", "mode": "max", "value": 0.8}, "trials": summary_rows, "best": {}, "wall_s": 99.0}
    with open(os.path.join(sweep_dir, "summary.json"), "w") as f:
        json.dump(summary, f)
    if tracker is not None:
        tracker.on_experiment_end(trials=trials)
    return {"expected": expected, "summary": summary, "sweep_dir": sweep_dir, "plan": plan}


@pytest.fixture(scope="session")
def logged_sweep(mlflow_server, tmp_path_factory):
    """The demo sweep (8 trials: full, lora r4 / r8, hybrid; 2 seeds) logged by the tracker."""
    if "sweep" not in _CACHE:
        tmp = tmp_path_factory.mktemp("sweep")
        spec = load_demo_spec(tmp)
        adapter = make_adapter(tmp / "adapter")
        parent = tracking.start_parent_run(spec, spec.plan(), mlflow_server, target=TARGET)
        tracker = tracking.MlflowTracker(mlflow_server, "demo", parent, TARGET)
        run = run_fake_sweep(spec, mlflow_server, str(tmp / "runs"), adapter, tracker=tracker)
        tracking.finish_parent_run(mlflow_server, parent, run["summary"])
        _CACHE["sweep"] = {**run, "url": mlflow_server, "parent": parent, "tracker": tracker, "spec": spec,
                           "adapter": adapter, "tmp": tmp}
    return _CACHE["sweep"]


# ----------------------------------------------------------------------------- params (no server)


def trial_dict(method: str, config: dict) -> dict:
    return {"data": {"name": "bbc_news", "seed": 3}, "model": {"name_or_path": None}, "method": {"name": method, "config": config},
            "train": {"lr": 0.001, "batch_size": 8, "max_steps": 60, "seed": 1}, "target": {"metric": None, "value": None},
            "deepspeed": {"zero_stage": 2}, "resources": {"num_workers": 2}}


def test_params_use_one_name_per_idea_across_methods():
    lora = tracking.trial_params(trial_dict("lora", {"r": 8, "alpha": 32}))
    ga = tracking.trial_params(trial_dict("lora_ga", {"lora": {"r": 4}}))
    hybrid = tracking.trial_params(trial_dict("hybrid", {"lora_ga": {"lora": {"r": 16}}, "boft": {"n_butterfly_factor": 2},
                                                         "gate": {"tau": 0.5, "update_every": 5}}), TARGET.__dict__)
    assert (lora["rank"], lora["alpha"], ga["rank"], hybrid["rank"]) == ("8", "32", "4", "16")
    assert (hybrid["butterfly_depth"], hybrid["block_size"], hybrid["gate_tau"], hybrid["gate_update_every"]) == ("2", "4", "0.5", "5")
    assert hybrid["gate_ema"] == "0.9" and hybrid["alpha"] == "16.0"  # defaults resolved: every hyperparameter listed
    for p in (lora, ga, hybrid):
        assert {p["lr"], p["batch_size"], p["max_steps"], p["seed"], p["zero_stage"], p["num_workers"]} == {"0.001", "8", "60", "1", "2"}
        assert (p["task"], p["data_seed"], p["model"]) == ("bbc_news", "3", "null")
    assert (hybrid["target_metric"], hybrid["target_mode"], hybrid["target_value"]) == ("accuracy", "max", "0.8")
    unknown = tracking.trial_params(trial_dict("mystery", {"foo": {"bar": 1}, "r": 2}))
    assert unknown["foo.bar"] == "1" and unknown["r"] == "2"  # no declared names: the paths as given


def test_uris_are_absolute_and_checked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert tracking.normalize_uri("sqlite:///x/mlflow.db") == f"sqlite:///{tmp_path}/x/mlflow.db"
    assert tracking.normalize_uri(str(tmp_path)) == f"sqlite:///{tmp_path}/mlflow.db"
    assert tracking.normalize_uri("http://h:5000/") == "http://h:5000"
    spec = load_demo_spec(tmp_path)
    assert tracking.tracking_uri(spec) == f"sqlite:///{tmp_path}/runs/mlflow.db"
    with pytest.raises(ConfigError, match="file store is legacy"):
        tracking.check_tracking_uri("file:///tmp/mlruns")


def test_unreachable_server_is_a_clear_error_within_seconds():
    url = f"http://127.0.0.1:{free_port()}"
    started = time.time()
    with pytest.raises(ConfigError, match=r"tracking.uri=http://127.0.0.1:\d+: no MLflow server answers there"):
        tracking.check_tracking_uri(url)
    assert time.time() - started < 5


# ----------------------------------------------------------------------------- against the server


def test_parent_run_records_the_sweep(logged_sweep):
    url, parent = logged_sweep["url"], logged_sweep["parent"]
    run = api(url, "runs/get", run_id=parent)["run"]
    params, tags = kv(run, "params"), kv(run, "tags")
    assert run["info"]["status"] == "FINISHED" and tags["orchestrator.kind"] == "sweep" and run["info"]["run_name"] == "demo"
    assert params["methods"] == "full,lora,hybrid" and params["num_trials"] == "8" and params["seeds"] == "[0, 1]"
    assert all(params[f"version.{p}"] for p in ("torch", "ray", "deepspeed", "transformers", "mlflow"))
    assert tags.get("mlflow.source.git.commit", "x") != ""
    assert {"demo.yaml", "plan.json", "sweep_resolved.json", "summary.json"} <= set(artifacts(url, parent))
    assert {m["key"]: m["value"] for m in run["data"]["metrics"]}["failed"] == 1


def test_child_runs_params_metrics_tags_artifacts(logged_sweep):
    url, parent = logged_sweep["url"], logged_sweep["parent"]
    runs = {r["info"]["run_name"]: r for r in search(url, experiment_id(url, "demo"), f"tags.mlflow.parentRunId = '{parent}'")}
    assert set(runs) == set(OUTCOMES)
    assert logged_sweep["tracker"].failures == 0
    for name, exp in logged_sweep["expected"].items():
        run = runs[name]
        params, tags = kv(run, "params"), kv(run, "tags")
        assert tags["trial_id"] == exp["trial_id"] and tags["stop_reason"] == exp["stop_reason"], name
        assert params["method"] == name.split("-")[0] and params["seed"] == name[-1]
        steps = [m["step"] for m in history(url, run["info"]["run_id"], "accuracy")]
        assert sorted(steps) == [r["step"] for r in exp["reports"]], name
        assert "trial_config.yaml" in artifacts(url, run["info"]["run_id"])
    r8 = runs["lora-r8-seed0"]
    assert kv(r8, "params")["rank"] == "8" and kv(runs["lora-r4-seed1"], "params")["rank"] == "4"
    m = {x["key"]: x["value"] for x in r8["data"]["metrics"]}
    assert (m["time_to_quality_s"], m["final_metric"], m["peak_memory_mb"], m["trainable_params"]) == (20.0, 0.81, 1000.0, 150000)
    assert m["avg_samples_per_s"] == pytest.approx(160 / 20) and m["target_reached"] == 1
    assert r8["info"]["status"] == "FINISHED" and kv(r8, "tags")["status"] == "TERMINATED"
    assert set(artifacts(url, r8["info"]["run_id"], "adapter")) == {"adapter/adapter_config.json", "adapter/adapter_model.safetensors"}
    assert kv(runs["lora-r4-seed0"], "tags")["stop_reason"] == "early_stopped"
    diverged = runs["lora-r4-seed1"]
    assert [h["value"] for h in history(url, diverged["info"]["run_id"], "accuracy")][-1] < -1e300  # -inf, stored
    failed = runs["hybrid-m2-tau0.5-seed1"]
    assert failed["info"]["status"] == "FAILED" and kv(failed, "tags")["status"] == "ERROR"
    assert "worker OOM-killed" in kv(failed, "tags")["error"] and "error.txt" in artifacts(url, failed["info"]["run_id"])
    hybrid = runs["hybrid-m2-tau0.5-seed0"]
    assert kv(hybrid, "params")["gate_tau"] == "0.5" and kv(hybrid, "params")["butterfly_depth"] == "2"
    assert {"layers.json", "layers.csv"} <= set(artifacts(url, hybrid["info"]["run_id"]))
    assert len(history(url, hybrid["info"]["run_id"], "layer_mean/gate")) == 2


def test_tracker_never_raises_or_blocks_when_mlflow_is_down(logged_sweep, monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    tracker = tracking.MlflowTracker(f"http://127.0.0.1:{free_port()}", "demo", None, TARGET)
    started = time.time()
    run = run_fake_sweep(logged_sweep["spec"], "", str(tmp_path / "runs"), logged_sweep["adapter"], prefix="dead0", tracker=tracker)
    assert time.time() - started < 10  # the hooks only enqueue (on_experiment_end waits for the queue)
    assert tracker.failures >= len(run["expected"])  # every trial's calls failed, each one counted


def test_tracker_pickles_like_tune_needs(logged_sweep):
    copy = pickle.loads(pickle.dumps(logged_sweep["tracker"]))  # Tune stores its RunConfig in tuner.pkl
    assert (copy.uri, copy.parent_run_id, copy.target) == (logged_sweep["url"], logged_sweep["parent"], TARGET.__dict__)
    assert copy.flush(timeout_s=5)


def test_sync_is_idempotent(logged_sweep):
    url, sweep_dir = logged_sweep["url"], logged_sweep["sweep_dir"]
    first = tracking.sync_from_storage(sweep_dir, url, experiment="demo-sync")
    exp = experiment_id(url, "demo-sync")
    runs = search(url, exp)
    assert first == {"trials": 8, "created": 8, "reports_logged": 16} and len(runs) == 9  # 8 trials + a parent
    again = tracking.sync_from_storage(os.path.join(sweep_dir, "summary.json"), url, experiment="demo-sync")
    assert again == {"trials": 8, "created": 0, "reports_logged": 0} and len(search(url, exp)) == 9
    child = next(r for r in runs if r["info"]["run_name"] == "lora-r8-seed1")
    assert len(history(url, child["info"]["run_id"], "accuracy")) == 2
    assert len(history(url, child["info"]["run_id"], "final_metric")) == 1
    assert set(artifacts(url, child["info"]["run_id"], "adapter")) == {"adapter/adapter_config.json", "adapter/adapter_model.safetensors"}
    failed = next(r for r in runs if r["info"]["run_name"] == "hybrid-m2-tau0.5-seed1")
    assert failed["info"]["status"] == "FAILED" and kv(failed, "tags")["stop_reason"] == "error"


def test_mlflow_server_killed_mid_sweep_then_restarted_loses_nothing(logged_sweep, tmp_path, monkeypatch):
    """A real server killed (SIGKILL) after the parent run was opened and while trials report; the
    sweep goes on (the tracker only counts its failures); the server restarted on its store, `sync`
    logs every trial once and closes the parent run."""
    import signal

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    port, store = free_port(), str(tmp_path / "store" / "mlflow.db")
    os.makedirs(os.path.dirname(store))
    url = f"http://127.0.0.1:{port}"
    proc = tracking.start_server(store, port)
    tracking.wait_for_server(url, proc, timeout_s=300)
    spec = logged_sweep["spec"]
    parent = tracking.start_parent_run(spec, spec.plan(), url, target=TARGET)
    tracker = tracking.MlflowTracker(url, "demo", parent, TARGET, flush_timeout_s=20)
    os.killpg(proc.pid, signal.SIGKILL)  # no shutdown: the server is just gone
    proc.wait(timeout=30)
    run = run_fake_sweep(spec, url, str(tmp_path / "runs"), logged_sweep["adapter"], prefix="kill0", tracker=tracker)
    assert tracker.failures > 0  # it noticed, and the sweep still finished: its storage has everything
    proc = tracking.start_server(store, port)
    try:
        tracking.wait_for_server(url, proc, timeout_s=300)
        counts = tracking.sync_from_storage(run["sweep_dir"], url, experiment="demo")
        assert counts["trials"] == 8 and counts["reports_logged"] == 16
        exp = experiment_id(url, "demo")
        children = search(url, exp, f"tags.mlflow.parentRunId = '{parent}'")
        assert sorted(kv(r, "tags")["trial_id"] for r in children) == sorted(e["trial_id"] for e in run["expected"].values())
        assert api(url, "runs/get", run_id=parent)["run"]["info"]["status"] == "FINISHED"
        assert tracking.sync_from_storage(run["sweep_dir"], url, experiment="demo")["reports_logged"] == 0
        assert len(search(url, exp)) == 9  # a parent and 8 children: nothing twice
    finally:
        tracking.stop_server(proc)


def test_sync_reads_bucket_storage_through_pyarrow(logged_sweep):
    """s3:// and gs:// go through pyarrow's filesystem; file:// is that same code path, locally."""
    url, sweep_dir = logged_sweep["url"], logged_sweep["sweep_dir"]
    counts = tracking.sync_from_storage(f"file://{sweep_dir}", url, experiment="demo-bucket")
    assert counts == {"trials": 8, "created": 8, "reports_logged": 16}
    again = tracking.sync_from_storage(f"file://{sweep_dir}/", url, experiment="demo-bucket")
    assert again == {"trials": 8, "created": 0, "reports_logged": 0}  # idempotent there too
    with pytest.raises(ConfigError, match="no Tune trial folders"):
        tracking.sync_from_storage(f"file://{sweep_dir}-missing", url, experiment="demo-bucket")


@pytest.fixture(scope="module")
def s3_storage(tmp_path_factory):
    """A real S3 API on 127.0.0.1 (moto's server) with one bucket, and the pyarrow URI options that
    point s3:// at it: what a sweep's `storage: s3://...` talks to, without a cloud."""
    import subprocess
    import sys

    import pyarrow.fs as pafs

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    keys = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update(keys)
    try:
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2).close()
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.2)
        fs = pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", region="us-east-1",
                               allow_bucket_creation=True)
        fs.create_dir("bucket")
        yield {"fs": fs, "query": f"endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"}
    finally:
        proc.kill()
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def test_sync_and_adapters_from_s3_storage(logged_sweep, s3_storage, tmp_path):
    """A sweep kept in S3 as Ray keeps it there (a checkpoint is named by its path in the bucket,
    no scheme), nothing of it on local disk: sync reads it through pyarrow and logs each trial's
    adapter, fetched from the bucket."""
    import pyarrow.fs as pafs

    url = logged_sweep["url"]
    local = tmp_path / "runs"
    run = run_fake_sweep(logged_sweep["spec"], url, str(local), logged_sweep["adapter"], prefix="s3xx0")
    for result in local.glob("demo/*/result.json"):
        rows = [json.loads(line) for line in result.read_text().splitlines()]
        for r in rows:
            r["checkpoint_path"] = r["checkpoint_path"].replace(str(local), "bucket/runs")
        result.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pafs.copy_files(str(local), "bucket/runs", source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=s3_storage["fs"])
    shutil.rmtree(local)
    counts = tracking.sync_from_storage(f"s3://bucket/runs/demo?{s3_storage['query']}", url, experiment="demo-s3")
    assert counts == {"trials": 8, "created": 8, "reports_logged": 16}
    exp = experiment_id(url, "demo-s3")
    runs = {r["info"]["run_name"]: r for r in search(url, exp, "tags.orchestrator.kind = 'trial'")}
    assert sorted(runs) == sorted(run["expected"])
    for name, r in runs.items():
        assert set(artifacts(url, r["info"]["run_id"], "adapter")) == {"adapter/adapter_config.json",
                                                                      "adapter/adapter_model.safetensors"}, name


def test_sync_completes_a_partly_logged_sweep(logged_sweep, tmp_path):
    """MLflow went away after each trial's first report: sync adds the rest and ends every run."""
    import dataclasses

    from orchestrator.spec import TrackingSettings

    url = logged_sweep["url"]
    spec = dataclasses.replace(logged_sweep["spec"], tracking=TrackingSettings(experiment="demo-partial"))
    parent = tracking.start_parent_run(spec, spec.plan(), url, target=TARGET)
    tracker = tracking.MlflowTracker(url, "demo-partial", parent, TARGET)
    run = run_fake_sweep(spec, url, str(tmp_path / "runs"), logged_sweep["adapter"], prefix="part0", upto=1, tracker=tracker)
    counts = tracking.sync_from_storage(run["sweep_dir"], url, experiment="demo-partial")
    assert counts == {"trials": 8, "created": 0, "reports_logged": 16 - 8}
    exp = experiment_id(url, "demo-partial")
    children = search(url, exp, f"tags.mlflow.parentRunId = '{parent}'")
    assert len(children) == 8 and all(r["info"]["status"] in ("FINISHED", "FAILED") for r in children)
    for r in children:
        steps = [h["step"] for h in history(url, r["info"]["run_id"], "elapsed_s")]
        assert sorted(steps) == [x["step"] for x in run["expected"][r["info"]["run_name"]]["reports"]]
    assert api(url, "runs/get", run_id=parent)["run"]["info"]["status"] == "FINISHED"


def test_storage_trial_that_failed_before_reporting(tmp_path):
    """No result.json, and summary.json ids it by its folder (Result.metrics is empty): the real
    trial id comes from the folder name, the error from Tune's error.txt."""
    folder = tmp_path / "demo" / "lora-r8-seed0-abcde_00003"
    folder.mkdir(parents=True)
    config = {"sweep": "demo", "target": {"metric": "accuracy", "mode": "max", "value": 0.8},
              "run": {"name": "lora-r8-seed0", "trial": trial_dict("lora", {"r": 8})}}
    (folder / "params.json").write_text(json.dumps(config))
    (folder / "error.txt").write_text("Failure # 1\nRuntimeError: placement group timed out\n")
    summary = {"trials": [{"trial_id": folder.name, "name": "lora-r8-seed0", "status": "ERROR", "stop_reason": "error",
                           "error": "RuntimeError: placement group timed out", "config": config["run"]["trial"]}]}
    (t,) = tracking.stored_trials(str(tmp_path / "demo"), summary, "demo")
    assert (t["trial_id"], t["reports"], t["row"]["status"]) == ("abcde_00003", [], "ERROR")
    assert "placement group timed out" in t["error"]


def test_a_stalled_workers_reason_reaches_s3_storage(s3_storage):
    """A worker whose watchdog fires on s3:// storage leaves its reason in the bucket (where the
    driver reads it to fail the trial as `stalled`), then its process ends with the watchdog's code."""
    import subprocess
    import sys

    from orchestrator import stall

    marker = stall.marker_path(f"s3://bucket/runs?{s3_storage['query']}", "demo-stalls")
    assert marker == f"s3://bucket/runs/demo-stalls/stalled.json?{s3_storage['query']}"
    frozen = ("import time; from orchestrator import stall; "
              f"stall.Watchdog(1.0, {marker!r}, rank=1); time.sleep(120)")  # no beat ever comes
    done = subprocess.run([sys.executable, "-c", frozen], capture_output=True, text=True, timeout=90)
    assert done.returncode == stall.EXIT_CODE, done.stderr[-2000:]
    why = stall.reason(marker)
    assert why and why.startswith("stalled: rank 1 made no progress for ") and "stall_timeout_s=1" in why
    assert s3_storage["fs"].get_file_info("bucket/runs/demo-stalls/stalled.json").size > 0
    stall.clear(marker)  # a rerun starts without the old reason
    assert stall.reason(marker) is None
    stall.clear(marker)  # and clearing nothing is fine
