"""End-to-end sweeps: Ray Tune (ASHA) over Ray Train trials of DeepSpeed workers, real MiniLM on real
BBC News; a failing trial, ASHA stops, Ctrl-C and --resume; what stopped trials leave reserved."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from ray.tune import Callback

from orchestrator import reaper
from orchestrator.spec import TrackingSettings, load_sweep
from orchestrator.sweep import run_sweep
from tests.conftest import free_cpus
from tests.orchestrator.test_tracking import artifacts, experiment_id, history, kv, mlflow_server, search  # noqa: F401

pytestmark = pytest.mark.slow


def write_sweep(tmp_path: Path, **overrides) -> Path:
    spec = {
        "name": "e2e",
        "data": {"name": "bbc_news", "max_train_samples": 192, "max_eval_samples": 48, "max_length": 48},
        # Out of reach, so ASHA decides who continues; eval_loss moves smoothly with the lr (accuracy
        # on 48 examples is too coarse to order trials after 3 steps).
        "target": {"metric": "eval_loss", "value": 0.01},
        "train": {"max_steps": 12, "batch_size": 8, "eval_every": 3, "lr": 2e-3, "checkpoint_every": 0},
        "methods": {
            # lr 1e-6 barely moves the loss: it reaches each rung behind the others and is stopped there
            "lora": {"r": 4, "train.lr": {"grid": [3.0e-3, 1.0e-6]}},
            # 192 examples, fewer than one micro batch of 256: this trial passes validation (which
            # reads no data) and fails inside its worker
            "boft": {"block_size": 4, "train.batch_size": {"grid": [8, 256]}},
        },
        "tune": {"num_samples": 1, "seeds": [0], "scheduler": "asha", "grace_period": 1, "reduction_factor": 2},
        # One core per trial (pinned): two trials at a time on 2 cores, so that ASHA compares rungs.
        "resources": {"num_workers": 1, "cpus_per_worker": 0.49},
        "storage": str(tmp_path / "runs"),
    }
    spec.update(overrides)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_asha_sweep_with_a_failing_trial_tracked_in_a_real_mlflow_server(ray_session, mlflow_server, tmp_path):  # noqa: F811
    spec = load_sweep(str(write_sweep(tmp_path)))
    spec = dataclasses.replace(spec, tracking=TrackingSettings(uri=mlflow_server, experiment="e2e-sweep"))
    results, summary = run_sweep(spec, quiet=True)
    # Nothing stays reserved once the sweep returns, not even by the trials ASHA stopped mid-run
    # (Tune kills their Train controllers: orchestrator.reaper); Ray frees resources asynchronously.
    assert free_cpus(ray_session) == pytest.approx(ray_session.cluster_resources()["CPU"])
    trials = {t["name"]: t for t in summary["trials"]}
    assert len(trials) == 4
    failed = [t for t in trials.values() if t["status"] == "ERROR"]
    assert [t["name"] for t in failed] == ["boft-b4-batch_size256-seed0"]
    assert "fewer than one micro batch" in failed[0]["error"] or "micro batch" in str(results.errors[0])
    ok = [t for t in trials.values() if t["status"] == "TERMINATED"]
    assert len(ok) == 3 and all(t["metric"] is not None and t["step"] for t in ok)
    reasons = {t["stop_reason"] for t in ok}
    assert "early_stopped" in reasons, f"ASHA stopped nothing: {trials}"
    assert "budget" in reasons
    assert set(summary["best"]) == {"lora", "boft"}
    on_disk = json.loads((tmp_path / "runs" / "e2e" / "summary.json").read_text())
    assert len(on_disk["trials"]) == 4

    # What a person sees in the MLflow UI, read back through the server's REST API
    exp = experiment_id(mlflow_server, "e2e-sweep")
    runs = search(mlflow_server, exp)
    (parent,) = [r for r in runs if kv(r, "tags").get("orchestrator.kind") == "sweep"]
    children = [r for r in runs if kv(r, "tags").get("mlflow.parentRunId") == parent["info"]["run_id"]]
    by_name = {r["info"]["run_name"]: r for r in children}
    assert set(by_name) == set(trials)
    assert by_name["boft-b4-batch_size256-seed0"]["info"]["status"] == "FAILED"
    for name, t in trials.items():
        run = by_name[name]
        params, tags = kv(run, "params"), kv(run, "tags")
        assert params["method"] == t["method"] and params["seed"] == "0"
        assert tags["stop_reason"] == t["stop_reason"]
        if t["status"] == "TERMINATED":
            assert run["info"]["status"] == "FINISHED"
            steps = [m["step"] for m in history(mlflow_server, run["info"]["run_id"], "eval_loss")]
            assert steps and steps == sorted(steps) and steps[-1] == t["step"]
            if t["stop_reason"] == "budget":  # checkpoint_every: 0 -> only a finished trial has one
                assert "adapter" in artifacts(mlflow_server, run["info"]["run_id"])
    assert trials["lora-r4-lr1e-06-seed0"]["stop_reason"] == "early_stopped"
    assert kv(by_name["lora-r4-lr0.003-seed0"], "params")["rank"] == "4"
    report = artifacts(mlflow_server, parent["info"]["run_id"], "report")
    assert {"report/curves.png", "report/pareto.png", "report/compare.csv"} <= set(report)


def _state(ray, pg) -> str:
    return ray.util.placement_group_table(pg)["state"]


def test_a_dead_actors_placement_group_is_removed_and_nothing_else(ray_session):
    """orchestrator.reaper on the real local Ray: a placement group whose creator actor died is
    removed and its CPUs come back; the driver's own groups and a live actor's are left alone."""
    ray = ray_session

    @ray.remote(num_cpus=0)
    class Controller:  # as Ray Train's: creates its workers' group, then dies with its trial
        def create(self, cpus: float):
            pg = ray.util.placement_group([{"CPU": cpus}])
            ray.get(pg.ready())
            return pg

    reaper.settle()  # whatever earlier tests left
    total = ray.cluster_resources()["CPU"]
    assert free_cpus(ray) == pytest.approx(total)
    own = ray.util.placement_group([{"CPU": 0.25}])  # the driver's (as Tune's trial groups)
    ray.get(own.ready())
    dying, living = Controller.remote(), Controller.remote()
    orphan, kept = ray.get(dying.create.remote(0.5)), ray.get(living.create.remote(0.5))
    assert free_cpus(ray, total - 1.25) == pytest.approx(total - 1.25)
    assert reaper.reap() == 0  # every creator alive: nothing to do

    ray.kill(dying)
    deadline = time.monotonic() + 10
    while _state(ray, orphan) != "REMOVED" and time.monotonic() < deadline:
        reaper.reap()
        time.sleep(0.1)
    assert _state(ray, orphan) == "REMOVED"  # Ray itself keeps it until the job ends
    assert _state(ray, kept) == "CREATED" and _state(ray, own) == "CREATED"
    assert free_cpus(ray, total - 0.75) == pytest.approx(total - 0.75)

    # settle: waits for a creator that is on its way out, then frees what it left
    started = time.monotonic()
    ray.kill(living)
    reaper.settle(timeout_s=10)
    assert time.monotonic() - started < 10
    assert _state(ray, kept) == "REMOVED" and _state(ray, own) == "CREATED"
    ray.util.remove_placement_group(own)
    assert free_cpus(ray) == pytest.approx(total)


def _results(sweep_dir: Path) -> dict[str, list[dict]]:
    out = {}
    for f in sweep_dir.glob("*/result.json"):
        out[f.parent.name] = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return out


def _saved_statuses(sweep_dir: Path) -> dict[str, str]:
    """Trial id -> status in the experiment state Tune last saved ({} while none, or mid-write)."""
    try:
        (state,) = sweep_dir.glob("experiment_state-*.json")
        trials = json.loads(state.read_text())["trial_data"]
        return {t["trial_id"]: t["status"] for t in (json.loads(data) for data, _ in trials)}
    except (ValueError, KeyError, OSError):
        return {}


def test_driver_killed_then_resume_keeps_every_result_once(tmp_path):
    """The sweep driver and its local Ray SIGKILLed mid-sweep (a lost head node), then --resume: the
    finished trial is kept and not rerun, MLflow has one child run per trial, and the first
    invocation's parent run is closed by the resumed one."""
    # The kill waits for Tune to save its state after the first trial ended (Tune saves at most
    # every 10 s unless told otherwise: 1 s here), and lands while the second, longer one runs.
    path = write_sweep(tmp_path, methods={"lora": {"r": 2, "train.max_steps": {"grid": [3, 6]}}},
                       data={"name": "bbc_news", "max_train_samples": 64, "max_eval_samples": 32, "max_length": 32},
                       tune={"num_samples": 1, "seeds": [0], "scheduler": "fifo", "max_concurrent_trials": 1},
                       train={"max_steps": 3, "batch_size": 8, "eval_every": 3, "lr": 2e-3})
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TUNE_GLOBAL_CHECKPOINT_S": "1"}
    cmd = [sys.executable, "-m", "orchestrator.cli", "sweep", str(path)]
    sweep_dir = tmp_path / "runs" / "e2e"
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 600
    finished: dict[str, int] = {}
    while time.time() < deadline and proc.poll() is None:
        finished = {k: len(v) for k, v in _results(sweep_dir).items() if v and v[-1].get("done")}
        # One at a time: the state Tune saved has the first trial ended and the second one running.
        # (Its content, not file times: every save copies the trials' files again, after the state.)
        if finished and sorted(_saved_statuses(sweep_dir).values()) == ["RUNNING", "TERMINATED"]:
            break
        time.sleep(0.5)
    assert finished and proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
    os.killpg(proc.pid, signal.SIGKILL)  # no handler runs: nothing is closed or flushed
    proc.wait(timeout=60)
    assert not (sweep_dir / "summary.json").exists(), "the sweep finished before it could be killed"

    resumed = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    after = _results(sweep_dir)
    for trial, n in finished.items():
        assert len(after[trial]) == n, f"{trial} was rerun"
    summary = json.loads((sweep_dir / "summary.json").read_text())
    assert len(summary["trials"]) == 2
    assert all(t["status"] == "TERMINATED" for t in summary["trials"]), summary["trials"]
    assert sorted(t["step"] for t in summary["trials"]) == [3, 6], summary["trials"]
    # MLflow (the sweep's SQLite store): one child run per trial, under one parent, now closed.
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/runs/mlflow.db")
    exp = client.get_experiment_by_name("e2e").experiment_id
    (parent,) = client.search_runs([exp], "tags.orchestrator.kind = 'sweep'")
    children = client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.data.tags["trial_id"] for r in children) == sorted(t["trial_id"] for t in summary["trials"])
    assert parent.info.status == "FINISHED" and all(r.info.status == "FINISHED" for r in children)
    # Not a terminal: the live view wrote one plain line per change, and none of Ray's own chatter
    live = (tmp_path / "first.log").read_text().splitlines()
    assert any(ln.startswith("trial=") and "status=RUNNING" in ln for ln in live)
    assert not any("(raylet)" in ln or "trials done" in ln for ln in live)


def test_ctrl_c_exits_130_keeps_what_was_reported_and_marks_the_parent_killed(tmp_path):
    """Ctrl-C (SIGINT to the terminal's process group) mid-trial: the driver exits 130 with a hint to
    resume, writes no summary of a partial sweep, keeps the trial's reports, and the MLflow parent
    run says KILLED (a later --resume reopens it: the driver-kill test resumes)."""
    path = write_sweep(tmp_path, methods={"lora": {"r": 2}}, tune={"num_samples": 1, "seeds": [0], "scheduler": "fifo"},
                       train={"max_steps": 200, "batch_size": 8, "eval_every": 2, "lr": 2e-3})
    cmd = [sys.executable, "-m", "orchestrator.cli", "sweep", str(path)]
    sweep_dir = tmp_path / "runs" / "e2e"
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and not any(_results(sweep_dir).values()):
            time.sleep(0.5)
        reported = {k: len(v) for k, v in _results(sweep_dir).items()}
        assert reported, (tmp_path / "first.log").read_text()[-3000:]
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=120) == 130, (tmp_path / "first.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "resume with `orchestrate sweep FILE --resume`" in (tmp_path / "first.log").read_text()
    assert not (sweep_dir / "summary.json").exists()
    after = _results(sweep_dir)
    assert all(len(after[k]) >= n for k, n in reported.items())  # nothing reported is lost
    assert max(r["step"] for rows in after.values() for r in rows) < 200  # it was stopped, not finished
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/runs/mlflow.db")
    (parent,) = client.search_runs([client.get_experiment_by_name("e2e").experiment_id], "tags.orchestrator.kind = 'sweep'")
    assert parent.info.status == "KILLED"


def _budget_sweep(tmp_path: Path, name: str, budget_s: float) -> Path:
    """Optuna's points (one method, one seed, one trial at a time), a first trial with steps for hours."""
    return write_sweep(tmp_path, name=name,
                       methods={"lora": {"r": {"choice": [2, 4]}, "train.lr": {"loguniform": [1.0e-3, 3.0e-3]}}},
                       tune={"num_samples": 2, "seeds": [0], "search_alg": "optuna", "time_budget_s": budget_s,
                             "max_concurrent_trials": 1},
                       train={"max_steps": 100000, "batch_size": 8, "eval_every": 2, "checkpoint_every": 0},
                       resources={"num_workers": 1, "cpus_per_worker": 0.9})


def _ended(spec, **kwargs):
    """run_sweep, where a KeyboardInterrupt (an end taken for an interruption) fails the test, not the session."""
    try:
        return run_sweep(spec, quiet=True, **kwargs)
    except KeyboardInterrupt:
        pytest.fail("the sweep ended as an interrupted one")


def test_a_sweep_that_runs_out_of_time_ends_normally_and_says_what_never_ran(ray_session, mlflow_server, tmp_path, capsys):  # noqa: F811
    """The time budget runs out while Optuna's first trial trains: that trial stops with stop_reason
    time_budget, the second is never suggested, and the sweep ends as a finished one (summary, budget
    record, exit status 0), not as an interrupted one. Then the same budget across a Ctrl-C: the
    resumed sweep gets what was left of it, runs out while the trial trains again, and says so in
    MLflow too; resuming it once more runs nothing and says the same."""
    import threading

    from orchestrator.cli import print_summary

    # A new sweep: Tune's stopper and the budget's callback are one object.
    spec = load_sweep(str(_budget_sweep(tmp_path, "ended", 12)))
    _, summary = _ended(spec, track=False)
    assert summary["ended_by"] == "time_budget" and summary["not_run"] == ["lora-seed0"], summary
    (trial,) = summary["trials"]
    assert trial["status"] == "TERMINATED" and trial["stop_reason"] == "time_budget", trial
    c = trial["config"]
    assert c["method"]["config"]["r"] in (2, 4) and 1e-3 <= c["train"]["lr"] <= 3e-3
    assert 12 <= summary["wall_s"] < 12 + 90  # stopped when the budget ran out, not after its steps
    record = json.loads((tmp_path / "runs" / "ended" / "time_budget.json").read_text())
    assert record["time_budget_s"] == 12 and record["stopped"] == [trial["trial_id"].rsplit("-", 1)[-1]]
    assert print_summary(summary) == 0
    assert "Ended by its time budget (tune.time_budget_s: 12): 1 running trial(s) stopped; " \
           "1 of 2 planned trials never ran (lora-seed0)" in capsys.readouterr().out

    # Ctrl-C (Tune's handler takes SIGINT in the main thread) once Tune's loop has spent ~15 s of 30.
    budget_s, sweep_dir = 30, tmp_path / "runs" / "resumed"
    spec = dataclasses.replace(load_sweep(str(_budget_sweep(tmp_path, "resumed", budget_s))),
                               tracking=TrackingSettings(uri=mlflow_server, experiment="budget-resumed"))
    started = time.time()

    def interrupt():
        while time.time() < started + 18 or not list(sweep_dir.glob("lora-seed0-*")):
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        run_sweep(spec, quiet=True)
    assert not (sweep_dir / "time_budget.json").exists() and not (sweep_dir / "summary.json").exists()
    # Restored, Tune's stopper and the budget's callback are two copies (from its experiment state
    # and from the saved Tuner): they still agree on what the budget stopped.
    _, summary = _ended(spec, resume=True)
    assert summary["ended_by"] == "time_budget" and summary["not_run"] == ["lora-seed0"], summary
    (trial,) = summary["trials"]
    assert trial["stop_reason"] == "time_budget", trial
    assert summary["wall_s"] < budget_s, summary["wall_s"]  # what was left of the budget, not a new one
    record = json.loads((sweep_dir / "time_budget.json").read_text())
    assert record["stopped"] == [trial["trial_id"].rsplit("-", 1)[-1]]
    eid = experiment_id(mlflow_server, "budget-resumed")
    (parent,) = search(mlflow_server, eid, "tags.orchestrator.kind = 'sweep'")
    assert parent["info"]["status"] == "FINISHED" and kv(parent, "tags")["ended_by"] == "time_budget"
    assert kv(parent, "metrics")["not_run"] == 1
    (child,) = search(mlflow_server, eid, "tags.orchestrator.kind = 'trial'")
    assert kv(child, "tags")["stop_reason"] == "time_budget" and kv(child, "tags")["status"] == "TERMINATED"
    assert child["info"]["status"] == "FINISHED"
    report = json.loads((sweep_dir / "report" / "compare.json").read_text())  # the comparison says it is partial
    assert any("ended by its time budget" in n and "1 planned trial(s) never ran" in n for n in report["notes"]), report["notes"]

    _, again = _ended(spec, resume=True)  # nothing left to run; the same end
    assert again["ended_by"] == "time_budget" and again["not_run"] == ["lora-seed0"]
    assert [(t["trial_id"], t["stop_reason"]) for t in again["trials"]] == [(trial["trial_id"], "time_budget")]


def _sleeps_before_its_first_report(config):
    time.sleep(120)
    from ray import tune

    tune.report({"step": 1})


def test_trials_the_budget_ended_before_any_report_are_summarized_live_and_restored(ray_session, tmp_path):
    """The budget runs out before the first trial's first report, and the second never starts. Both
    in the summary's terms (stopped by the budget; never ran) as the sweep ends, and again from
    storage, as a --resume with nothing left to run reads it: there Tune's Result of the stopped
    trial has no config (Tune takes it from the trial's last report), only Tune's trial has."""
    from ray import tune

    from orchestrator import budget
    from orchestrator.config import Target
    from orchestrator.sweep import summarize

    record = str(tmp_path / "time_budget.json")
    stopper = budget.TimeBudget(8, record)  # long enough for the first trial to start
    trial = {"method": {"name": "lora"}}
    live = tune.Tuner(
        _sleeps_before_its_first_report,
        param_space={"run": {"name": tune.grid_search(["lora-seed0", "lora-seed1"]), "trial": trial}},
        tune_config=tune.TuneConfig(max_concurrent_trials=1,  # the sweep's folders: <name>-<trial id>
                                    trial_dirname_creator=lambda t: f"{t.config['run']['name']}-{t.trial_id}"),
        run_config=tune.RunConfig(name="b", storage_path=str(tmp_path), stop=stopper, callbacks=[stopper], verbose=0),
    ).fit()
    ended = budget.read(record)
    assert ended is not None and len(ended["stopped"]) == 1, ended
    restored = tune.ResultGrid(tune.ExperimentAnalysis(str(tmp_path / "b")))
    assert [r.config for r in restored if r.path.endswith(ended["stopped"][0])] == [None]
    target = Target("eval_loss", "min", 0.01)
    for results in (live, restored):
        summary = summarize(results, target, ended, plan=["lora-seed0", "lora-seed1"])
        (only,) = summary["trials"]
        assert only["trial_id"] == ended["stopped"][0] and only["stop_reason"] == "time_budget", summary
        assert only["name"] == "lora-seed0" and only["config"] == trial and only["metric"] is None
        assert summary["not_run"] == ["lora-seed1"] and summary["best"] == {}


def _reports_until_stopped(config):
    from ray import tune

    for step in range(1, 10000):
        tune.report({"step": step, "eval_loss": 1.0 / step})
        time.sleep(0.25)


class _KillsItsDriverAfterTheBudgetStep(Callback):
    """SIGKILL of the driver right after Tune saved its state in the step the budget ran out in
    (Tune's callbacks run after that save, in order: this one before the budget's). Only in the
    process that made it: the restored copy (Tune keeps its callbacks in the saved Tuner) does nothing."""

    def __init__(self, stopper):
        self.stopper, self.pid = stopper, os.getpid()

    def on_step_end(self, iteration, trials, **info):
        if os.getpid() == self.pid and self.stopper.spent_at is not None:
            os.kill(os.getpid(), signal.SIGKILL)


_KILLED_DRIVER = """
import sys

import ray
from ray import tune

from orchestrator import budget
from tests.orchestrator.test_sweep import _KillsItsDriverAfterTheBudgetStep, _reports_until_stopped

address, storage, record = sys.argv[1:]
ray.init(address=address, configure_logging=False)
stopper = budget.TimeBudget(5, record)
tune.Tuner(
    _reports_until_stopped,
    param_space={"run": {"name": "lora-seed0", "trial": {"method": {"name": "lora"}}}},
    tune_config=tune.TuneConfig(trial_dirname_creator=lambda t: f"{t.config['run']['name']}-{t.trial_id}"),
    run_config=tune.RunConfig(name="k", storage_path=storage, stop=stopper, verbose=0,
                              callbacks=[_KillsItsDriverAfterTheBudgetStep(stopper), stopper]),
).fit()
"""


def test_a_driver_killed_right_after_the_budget_ran_out_resumes_to_the_same_end(ray_session, tmp_path):
    """The driver dies in the step its budget ran out in, after Tune saved that step's state (the
    budget spent, the trial still running) and before any callback ran. The record of what the
    budget stopped is already written, so the --resume ends the sweep as its budget did, with the
    same trial stopped by it, instead of an interrupted sweep or one where nothing was stopped."""
    from ray import tune

    from orchestrator import budget
    from orchestrator.config import Target
    from orchestrator.sweep import summarize

    record = str(tmp_path / "k" / budget.RECORD_FILE)
    env = {**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "0"}  # Tune saves its state in every step
    killed = subprocess.run([sys.executable, "-c", _KILLED_DRIVER, ray_session.get_runtime_context().gcs_address,
                             str(tmp_path), record], env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-3000:] + killed.stderr[-3000:]
    ended = budget.read(record)
    assert ended is not None and len(ended["stopped"]) == 1, ended
    saved = _saved_statuses(tmp_path / "k")
    assert list(saved.values()) == ["RUNNING"], saved  # what a resume restarts, with a spent budget

    results = tune.Tuner.restore(str(tmp_path / "k"), trainable=_reports_until_stopped).fit()
    assert budget.read(record) == ended  # the resumed run ran out at once and kept the record
    summary = summarize(results, Target("eval_loss", "min", 0.01), budget.read(record), plan=["lora-seed0"])
    (trial,) = summary["trials"]
    assert summary["ended_by"] == "time_budget" and trial["stop_reason"] == "time_budget", summary
    assert trial["trial_id"] == ended["stopped"][0] and trial["step"] >= 1, trial


def test_summary_goes_beside_the_results_locally_or_at_a_uri(tmp_path):
    from orchestrator.sweep import write_summary

    summary = {"best": {"lora": {"name": "lora-r4-seed0"}}, "wall_s": 1.5}
    local = write_summary(str(tmp_path / "runs"), "s", summary)
    assert json.loads(Path(local).read_text()) == summary
    uri = write_summary(f"file://{tmp_path}/bucket", "s", summary)  # the pyarrow path s3:// and gs:// take
    assert uri == f"file://{tmp_path}/bucket/s/summary.json"
    assert json.loads((tmp_path / "bucket" / "s" / "summary.json").read_text()) == summary


# ----------------------------------------------------------------------------- seeds, compare, export


@pytest.fixture(scope="module")
def seeded_sweep(ray_session, mlflow_server, tmp_path_factory):  # noqa: F811
    """A real sweep of 2 seeds x 2 methods, 10 short steps each, tracked in a real MLflow server: LoRA at
    a working learning rate, BOFT at one too small to move the loss, so its seeds differ only by
    their classifier heads' random initialisation."""
    tmp = tmp_path_factory.mktemp("seeded")
    path = write_sweep(tmp, name="seeded",
                       data={"name": "bbc_news", "max_train_samples": 64, "max_eval_samples": 32, "max_length": 32},
                       train={"max_steps": 10, "batch_size": 8, "eval_every": 5, "lr": 2e-2, "checkpoint_every": 0},
                       methods={"lora": {"r": 4}, "boft": {"block_size": 4, "train.lr": 1e-7}},
                       tune={"num_samples": 1, "seeds": [0, 1], "scheduler": "fifo"},
                       tracking={"uri": mlflow_server, "experiment": "seeded"})
    spec = load_sweep(str(path))
    _, summary = run_sweep(spec, quiet=True)
    assert len(summary["trials"]) == 4 and all(t["status"] == "TERMINATED" for t in summary["trials"]), summary["trials"]
    return {"path": path, "spec": spec, "summary": summary, "url": mlflow_server}


def test_compare_on_real_runs_counts_the_seeds_that_never_reached(seeded_sweep):
    from orchestrator.compare import compare, table

    url = seeded_sweep["url"]
    sweep = compare(url, "seeded")
    lowest = {method: sorted(min(c["eval_loss"]) for c in sweep["curves"].values() if c["method"] == method)
              for method in ("lora", "boft")}
    lora, boft = lowest["lora"], lowest["boft"]
    # A target that one BOFT seed meets (its luckiest head) and every LoRA seed meets: then BOFT's
    # fastest time may well be the fastest of all, but it reached in 1 of 2 seeds.
    assert lora[-1] < boft[1], f"the runs do not separate: lora {lora}, boft {boft}"
    value = max(lora[-1], boft[0])
    report = compare(url, "seeded", target_value=value)
    m = report["methods"]
    assert (m["lora"]["reached"], m["lora"]["seeds"], m["boft"]["reached"], m["boft"]["seeds"]) == (2, 2, 1, 2)
    assert m["boft"]["train_time_to_quality_s"] == math.inf and math.isfinite(m["lora"]["train_time_to_quality_s"])
    assert m["boft"]["ttq_min"] is not None  # its one reaching seed's time is kept as the spread
    assert report["ranking"] == ["lora", "boft"]
    shown = table(report)
    assert "1/2" in shown and "2/2" in shown and "inf [" in shown and "target changed" in shown
    # The sweep's own (unreachable) target: nobody reached, and the report says so.
    assert all(g["reached"] == 0 for g in sweep["methods"].values())


def test_export_a_sweeps_best_trial_by_method_or_by_mlflow_run(seeded_sweep, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from orchestrator import export

    cmd = [sys.executable, "-m", "orchestrator.cli", "export", str(seeded_sweep["path"]), "--method", "lora",
           "--format", "merged", "--out", str(tmp_path / "merged")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    best = seeded_sweep["summary"]["best"]["lora"]["name"]
    assert json.loads((tmp_path / "merged" / "export.json").read_text())["trial"]["train"]["seed"] == int(best[-1])
    AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "merged"))  # a plain transformers folder

    url = seeded_sweep["url"]
    (run,) = search(url, experiment_id(url, "seeded"), f"attributes.run_name = '{best}'")
    source, cfg, name = export.resolve(seeded_sweep["spec"], run_id=run["info"]["run_id"])  # MLflow's artifacts
    assert os.path.isfile(os.path.join(source, "adapter", "adapter_config.json"))
    assert name == best and cfg.method.method == "lora"
    info = export.export(source, str(tmp_path / "peft"), "peft", cfg)
    assert info["max_logit_diff"] <= 1e-5
    bad = subprocess.run([*cmd[:5], "--method", "unitary"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "no finished 'unitary' trial" in bad.stderr


def test_mlflow_lists_the_best_models_and_the_training_data(seeded_sweep, tmp_path):
    from tests.orchestrator.test_tracking import api

    url, summary = seeded_sweep["url"], seeded_sweep["summary"]
    exp = experiment_id(url, "seeded")
    tags = {t["key"]: t["value"] for t in api(url, "experiments/get", experiment_id=exp)["experiment"]["tags"]}
    assert tags["mlflow.experimentKind"] == "custom_model_development"  # the UI opens on the runs table
    runs = {r["info"]["run_name"]: r for r in search(url, exp, "tags.orchestrator.kind = 'trial'")}
    assert len(runs) == 4
    for run in runs.values():  # the runs table's Dataset column
        (inp,) = run["inputs"]["dataset_inputs"]
        assert inp["dataset"]["name"] == "bbc_news" and len(inp["dataset"]["digest"]) == 10
        assert {"key": "mlflow.data.context", "value": "training"} in inp["tags"]
    digests = {r["inputs"]["dataset_inputs"][0]["dataset"]["digest"] for r in runs.values()}
    assert len(digests) == 1  # the same data for every trial (the sampling seed is the data's, not the trial's)
    models = api(url, "logged-models/search", {"experiment_ids": [exp]})["models"]
    by_method = {{t["key"]: t["value"] for t in m["info"]["tags"]}["method"]: m for m in models}
    assert set(by_method) == {"lora", "boft"}
    for method, m in by_method.items():
        info = m["info"]
        best = summary["best"][method]["name"]
        assert info["source_run_id"] == runs[best]["info"]["run_id"] and info["status"] == "LOGGED_MODEL_READY"
        assert {t["key"]: t["value"] for t in info["tags"]}["format"] == "peft"  # both have a PEFT format
        outputs = runs[best]["outputs"]["model_outputs"]
        assert [o["model_id"] for o in outputs] == [info["model_id"]]  # the runs table's Models column
    cmd = [sys.executable, "-m", "orchestrator.cli", "export", str(seeded_sweep["path"]), "--method", "lora",
           "--out", str(tmp_path / "peft"), "--register", "seeded-lora"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "registered seeded-lora version 1" in done.stdout
    versions = api(url, "model-versions/search", filter="name='seeded-lora'")["model_versions"]
    assert [v["run_id"] for v in versions] == [by_method["lora"]["info"]["source_run_id"]]
