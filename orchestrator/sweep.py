"""`orchestrate sweep FILE`: Ray Tune over Ray Train trials (Train V2: each Tune trial is a function
that launches a TorchTrainer, `trial_driver`).

    run_sweep(spec)  ->  Tuner(with_resources(trial_driver, {"CPU": 0.01}), param_space=plan)
                         -> trial_driver(config)  ->  TorchTrainer(train_loop_per_worker).fit()

Random and grid sweeps are expanded into concrete trials by `SweepSpec.plan()` (the same file
always gives the same plan, which `--dry-run` prints) and handed to Tune as one grid; Optuna gets
Tune samplers. The sweep driver holds a token CPU; the Train workers hold the real resources, so
concurrency is capped at what the cluster can host (a driver waiting for workers that can never
be scheduled would wait forever).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import threading
import time
from typing import Any

import methods
from orchestrator import storage
from orchestrator.config import Target, TrialConfig
from orchestrator.spec import TRIAL_SECTIONS, SweepSpec

SUMMARY_FILE = "summary.json"


def write_summary(storage_path: str, name: str, summary: dict[str, Any]) -> str:
    """<storage>/<name>/summary.json, beside Ray's results: a local folder or any URI pyarrow
    opens (s3://, gs://, file://), as Ray's own storage does. Returns where it went."""
    location = storage.join(storage_path, name, SUMMARY_FILE)
    storage.write_bytes(location, json.dumps(summary, indent=2, default=str).encode())
    return location


def trial_driver(config: dict[str, Any]) -> None:
    """The Tune trainable: one Ray Train run whose reports flow back to Tune."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from orchestrator import stall
    from orchestrator.trial import build_trainer

    cfg = TrialConfig.from_dict(config["run"]["trial"])
    target = Target(**config["target"])
    name = f"{config['sweep']}-{tune.get_context().get_trial_id()}"  # deterministic: restore finds it
    trials = storage.join(config["storage"], "trials")
    trainer = build_trainer(cfg, target, trials, name, callbacks=[TuneReportCallback()])
    marker = stall.marker_path(trials, name)
    stall.clear(marker)
    stall.fit(trainer, marker)  # a stalled trial fails with its reason; the sweep goes on


def trial_name(trial_config: dict[str, Any], point: dict[str, Any] | None = None) -> str:
    """hybrid-r8-m2-tau0.5-seed1: method, the point's values under their fields' short names
    (declared by the fields: methods.config.short_name), seed."""
    method = trial_config["method"]["name"]
    config_cls = methods.METHODS[method].config_cls if method in methods.METHODS else None
    parts = [method]
    for key, value in sorted((point or {}).items()):
        head, _, rest = key.partition(".")
        cls, path = (TRIAL_SECTIONS[head], rest) if head in TRIAL_SECTIONS and rest else (config_cls, key)
        short = methods.short_name(cls, path) if cls else key.split(".")[-1]
        parts.append(f"{short}{value:.3g}" if isinstance(value, float) else f"{short}{value}")
    parts.append(f"seed{trial_config['train']['seed']}")
    return "-".join(parts)


def _param_space(spec: SweepSpec, target: Target) -> dict[str, Any]:
    from ray import tune

    from orchestrator import space

    common = {"sweep": spec.name, "storage": storage_path(spec), "target": dataclasses.asdict(target)}
    if spec.tune.search_alg == "optuna":
        (method, entries), = spec.methods.items()
        trial = spec.trial(method, {}, spec.tune.seeds[0]).to_dict()
        for key, value in entries.items():  # Tune's samplers at their paths in the trial's dict
            head, _, rest = key.partition(".")
            section, path = (trial[head], rest) if head in TRIAL_SECTIONS and rest else (trial["method"]["config"], key)
            *parents, leaf = path.split(".")
            for p in parents:
                section = section[p]
            section[leaf] = space.to_tune(value)
        return {**common, "run": {"name": None, "trial": trial}}
    runs = [{"name": trial_name(t["trial"], t["point"]), "trial": t["trial"]} for t in spec.plan()]
    return {**common, "run": tune.grid_search(runs)}


def trial_configs(spec: SweepSpec) -> list[TrialConfig]:
    """The planned trials' configs (Optuna: the first method's base config)."""
    if spec.tune.search_alg == "optuna":
        method = next(iter(spec.methods))
        return [spec.trial(method, {}, spec.tune.seeds[0])]
    return [TrialConfig.from_dict(t["trial"]) for t in spec.plan()]


def planned_names(spec: SweepSpec) -> list[str]:
    """The planned trials' names; Optuna's samples, whose points come later, by method and seed."""
    if spec.tune.search_alg == "optuna":
        return [trial_name(trial_configs(spec)[0].to_dict())] * spec.num_trials
    return [trial_name(t["trial"], t["point"]) for t in spec.plan()]


def max_reports(spec: SweepSpec) -> int:
    """Reports (Tune's iterations) of the longest trial, ASHA's max_t: a method's own
    train.max_steps / eval_every count, not only the file's."""
    configs = trial_configs(spec)
    if spec.tune.search_alg == "optuna":  # its points come later: the space's corners bound them
        from orchestrator import space

        (method, entries), = spec.methods.items()
        configs = [spec.trial(method, corner, spec.tune.seeds[0]) for corner in space.corners(entries)]
    return max(c.train.reports for c in configs)


def storage_path(spec: SweepSpec) -> str:
    return spec.storage if "://" in spec.storage else os.path.abspath(os.path.expanduser(spec.storage))


def build_tuner(spec: SweepSpec, target: Target, callbacks=(), resume: bool = False, cluster_file: str | None = None,
                time_budget=None):
    """A new sweep's Tuner, or the restored one. `time_budget` (a budget.TimeBudget) takes the place
    of TuneConfig(time_budget_s), which would end the sweep the same way but keep no record of it."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    t = spec.tune
    scheduler = FIFOScheduler()
    if t.scheduler == "asha":
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=max_reports(spec), grace_period=t.grace_period,
                                  reduction_factor=t.reduction_factor)
    search_alg = None
    if t.search_alg == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch(seed=t.seeds[0])
    from orchestrator import reaper
    from orchestrator.placement import driver_plan

    # Drivers pinned to driver slots where the cluster defines them (the head, never a spot node);
    # concurrency from the size the autoscaler may reach, not only the nodes up right now.
    driver_res, concurrent = driver_plan(spec, ray.cluster_resources(), cluster_file=cluster_file)
    trainable = tune.with_resources(trial_driver, driver_res)
    path = os.path.join(storage_path(spec), spec.name)
    if resume:
        return tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=False)

    def name_creator(trial) -> str:
        return trial.config["run"]["name"] or trial_name(trial.config["run"]["trial"])
    return tune.Tuner(
        trainable,
        param_space=_param_space(spec, target),
        tune_config=tune.TuneConfig(
            metric=target.metric, mode=target.mode, scheduler=scheduler, search_alg=search_alg,
            num_samples=t.num_samples if t.search_alg == "optuna" else 1,
            max_concurrent_trials=concurrent,
            trial_name_creator=name_creator,
            trial_dirname_creator=lambda trial: f"{name_creator(trial)}-{trial.trial_id}",
        ),
        run_config=tune.RunConfig(name=spec.name, storage_path=storage_path(spec), stop=time_budget,
                                  callbacks=[*callbacks, *([time_budget] if time_budget else []), reaper.Reaper()],
                                  failure_config=tune.FailureConfig(max_failures=0), verbose=0),
    )


class Timeline:
    """Where the driver's time goes (benchmarks/overhead.py reads it from the summary): seconds
    per part, the first part (`start_s`: interpreter, imports, Ray's start) from the process's own
    start, so a one-trial sweep's cost over a plain training loop can be taken apart."""

    def __init__(self):
        import psutil  # a Ray dependency

        self.last = psutil.Process().create_time()
        self.parts: dict[str, float] = {}
        self.mark("start_s")

    def mark(self, part: str) -> None:
        now = time.time()
        self.parts[part] = round(now - self.last, 3)
        self.last = now


def _parent_run(spec: SweepSpec, uri: str, target: Target, track: bool, resume: bool) -> str | None:
    """A new sweep's MLflow parent run; a resumed sweep's own, reopened (the restored tracker logs
    under it; it stayed RUNNING or KILLED when the first driver was killed or interrupted)."""
    from orchestrator import tracking

    if not track:
        return None
    if resume:
        return tracking.sweep_parent_run(uri, tracking.experiment_name(spec), spec.name, reopen=True)
    plan = spec.plan() if spec.tune.search_alg != "optuna" else None
    return tracking.start_parent_run(spec, plan, uri, target)


def run_sweep(spec: SweepSpec, resume: bool = False, callbacks=(), quiet: bool = False, track: bool = True,
              cluster_file: str | None = None):
    """Run (or resume) the sweep; returns (Tune's ResultGrid, summary). Ray must be initialised.

    With `track`, an MLflow parent run is opened first (a resumed sweep keeps its own: the tracker
    is restored from Tune's state), every trial becomes a child run, and the comparison report
    is written at the end."""
    from orchestrator import budget, reaper, tracking
    from orchestrator.progress import LiveTable

    timeline = Timeline()
    target = spec.resolve_target()
    live = [] if quiet else [LiveTable(target)]
    uri = tracking.tracking_uri(spec)
    if track and not resume:
        tracking.check_tracking_uri(uri)  # a bad address fails here, in seconds, before anything starts
    from concurrent.futures import ThreadPoolExecutor

    from orchestrator.nodes import prepare_nodes

    # The parent run opens (a new SQLite store takes seconds to create) while the nodes build their
    # ops, outside every trial's clock: the driver's start-up pays the longer of the two, not both.
    with ThreadPoolExecutor(1) as pool:
        opening = pool.submit(_parent_run, spec, uri, target, track, resume)
        try:
            prepare_nodes(trial_configs(spec), quiet=quiet)
        except BaseException:
            if (parent := opening.result()) is not None:
                tracking.finish_parent_run(uri, parent, None, status="FAILED")
            raise
        timeline.mark("prepare_nodes_s")
        parent = opening.result()
    timeline.mark("tracking_s")  # what opening the parent run took beyond the nodes' preparation
    record = budget.record_path(storage_path(spec), spec.name)
    time_budget = None
    if not resume:
        storage.delete(record)  # an earlier sweep of the same name and storage: its end is not this one's
        if spec.tune.time_budget_s is not None:
            time_budget = budget.TimeBudget(spec.tune.time_budget_s, record)
    if track and not resume:
        live.append(tracking.MlflowTracker(uri, tracking.experiment_name(spec), parent, target, time_budget=time_budget))
    tuner = build_tuner(spec, target, callbacks=[*live, *callbacks], resume=resume, cluster_file=cluster_file,
                        time_budget=time_budget)
    started = time.time()
    try:
        with StopSignal() as stop:
            results = tuner.fit()
    except BaseException:
        if parent:
            tracking.finish_parent_run(uri, parent, None, status="FAILED")
        raise
    finally:
        reaper.settle()  # the stopped trials' leftover placement groups (orchestrator.reaper)
    ended = budget.read(record)  # the budget ran out, in this driver run or an earlier one
    if stop.received or (ended is None and interrupted(results, spec)):  # Ctrl-C: Tune saved its state
        if parent:  # KILLED until --resume reopens it
            tracking.finish_parent_run(uri, parent, None, status="KILLED")
        raise KeyboardInterrupt
    summary = summarize(results, target, ended, plan=planned_names(spec))
    summary["wall_s"] = time.time() - started
    timeline.mark("trials_s")
    summary["driver"] = timeline.parts
    try:
        write_summary(storage_path(spec), spec.name, summary)
    except OSError as e:  # a bucket's credentials, say: the summary still goes to MLflow below
        print(f"warning: could not write {SUMMARY_FILE} to {spec.storage}: {e}", file=sys.stderr)
    if track:
        report_to_mlflow(spec, uri, parent, summary)
    return results, summary


def report_to_mlflow(spec: SweepSpec, uri: str, parent: str | None, summary: dict) -> None:
    """Close the parent run and attach the comparison; a report problem never fails a finished sweep."""
    import warnings

    from orchestrator import tracking

    try:
        if parent:
            tracking.finish_parent_run(uri, parent, summary)
        from orchestrator.compare import compare, write_report

        report = compare(uri, tracking.experiment_name(spec), parent)
        write_report(report, os.path.join(storage_path(spec), spec.name, "report"), uri=uri)
        from orchestrator.logged_models import log_best_models

        log_best_models(uri, tracking.experiment_name(spec), summary)  # the UI's Models column, the registry
    except Exception as e:  # noqa: BLE001 - the results are safe in storage; `orchestrate sync` retries
        warnings.warn(f"MLflow report failed ({e}); results are in {storage_path(spec)}; run `orchestrate sync`")


class StopSignal:
    """Whether Ctrl-C (SIGINT) ended Tune's run. Tune catches the signal itself (it saves its state
    and stops the running trials, which then look like finished ones) and returns normally; its
    handler puts back the one it replaced only when a stop signal came. So a marker handler set
    before fit() and found in place after it means the run was interrupted. Main thread only
    (where Tune catches signals), unless TUNE_DISABLE_SIGINT_HANDLER is set; the previous handler
    is restored on exit."""

    def __init__(self):
        self.active = (threading.current_thread() is threading.main_thread()
                       and os.environ.get("TUNE_DISABLE_SIGINT_HANDLER", "0") == "0")
        self.received = False

    def _marker(self, signum, frame):  # only runs if a signal comes outside Tune's run
        raise KeyboardInterrupt

    def __enter__(self):
        if self.active:
            self._previous = signal.signal(signal.SIGINT, self._marker)
        return self

    def __exit__(self, *exc):
        if self.active:
            self.received = exc[0] is None and signal.getsignal(signal.SIGINT) == self._marker
            signal.signal(signal.SIGINT, self._previous)
        return False


def interrupted(results, spec: SweepSpec) -> bool:
    """True if some planned trial never ran or is not in a final state (Tune was stopped)."""
    trials = results._experiment_analysis.trials  # Tune's own trial objects, with their status
    return len(trials) < spec.num_trials or any(t.status not in ("TERMINATED", "ERROR") for t in trials)


def stop_reason(result, stopped_by_budget: bool = False) -> str:
    """target_reached | budget | diverged (the trial says so) | early_stopped (ASHA) | time_budget
    (the sweep's ran out) | stalled (its watchdog fired) | error."""
    if result.error is not None:
        return "stalled" if "TrialStalled" in f"{result.error!r} {result.error}" else "error"
    m = result.metrics or {}
    return m.get("stop_reason") or ("time_budget" if stopped_by_budget else "early_stopped")


def summarize(results, target: Target, ended: dict | None = None, plan: list[str] | None = None) -> dict[str, Any]:
    """Per trial: status and final numbers (report.SUMMARY); per method: the best trial by the one
    ranking rule (report.rank_key: reached, then training time-to-quality, then the final metric).
    `ended`: the time budget's record (budget.py) when the budget ended the sweep; `plan`: the
    planned trials' names, so that `not_run` names those that never started."""
    from collections import Counter

    from orchestrator import report

    stopped = set((ended or {}).get("stopped", ()))
    # Tune's Result takes its config from the trial's last report; a trial with none (the budget
    # stopped it first), read back from storage by a --resume, has no config there: Tune's trial has.
    configs = {t.trial_id: t.config for t in results._experiment_analysis.trials}
    trials = []
    for r in results:
        m = r.metrics or {}
        trial_id = os.path.basename(r.path or "").rsplit("-", 1)[-1]  # folders: <name>-<trial id>
        # Every report of a trial has its step; without one, Tune fills in only its own keys.
        if ended and "step" not in m and r.error is None and trial_id not in stopped:
            continue  # created, never started: the budget ran out first
        run = (r.config or configs[trial_id])["run"]
        trials.append({
            "trial_id": m.get("trial_id") or trial_id,
            "name": run["name"] or trial_name(run["trial"]),  # Optuna's: by method, seed
            "method": run["trial"]["method"]["name"],
            "config": run["trial"],
            "status": "ERROR" if r.error is not None else "TERMINATED", "stop_reason": stop_reason(r, trial_id in stopped),
            "error": str(r.error).splitlines()[0][:300] if r.error is not None else None,
            "metric": m.get(target.metric), **{k: m.get(k) for k in report.SUMMARY},
            # The trial's last checkpoint (TuneReportCallback puts its path in the report), for `orchestrate export`
            "checkpoint": m.get("checkpoint_path") or (r.checkpoint.path if r.checkpoint is not None else None),
        })

    def key(t):
        return report.trial_key(t, target.mode)

    best: dict[str, dict[str, Any]] = {}
    for t in trials:
        if t["metric"] is None or t["status"] == "ERROR":
            continue
        if t["method"] not in best or key(t) > key(best[t["method"]]):
            best[t["method"]] = t
    not_run = Counter(plan or []) - Counter(t["name"] for t in trials)
    return {"target": dataclasses.asdict(target), "trials": trials, "best": best,
            "ended_by": "time_budget" if ended else "completed", "time_budget": ended,
            "not_run": sorted(not_run.elements())}
