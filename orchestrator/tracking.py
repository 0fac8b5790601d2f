"""MLflow tracking of a sweep: one experiment per sweep, one PARENT run per invocation, one CHILD run
per Tune trial (tag `mlflow.parentRunId`), written by a Tune `Callback` in the driver.

    uri = tracking_uri(spec); check_tracking_uri(uri)            # before Ray starts: clear error
    parent = start_parent_run(spec, plan, uri)                    # experiment + parent, once
    tracker = MlflowTracker(uri, experiment_name(spec), parent, target)   # a Tune callback
    ... run_sweep(spec, callbacks=[tracker]) ...
    finish_parent_run(uri, parent, summary)
    sync_from_storage("runs/<sweep>", uri)    # later, if logging failed: Ray's storage -> MLflow

Why a callback and not `MLflowLoggerCallback`: that one has no parent run, logs Tune's flattened
config keys (`run/trial/method/config/lora_ga/lora/r`) and blocks Tune's loop on every call. Here
params get one readable name per idea across methods (`rank` is lora's r, lora_ga's lora.r and
the hybrid's lora_ga.lora.r), and every MLflow call runs on one background thread: a slow or dead
server delays the log, never the training, and a failure is a counted warning, never an exception.
Child runs are keyed by Tune's trial id (tag `trial_id`), so a resumed sweep or `sync` finds them
instead of duplicating them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import queue
import subprocess
import sys
import threading
import time
from typing import Any

from ray.tune import Callback

from methods.config import ConfigError
from orchestrator import report

log = logging.getLogger(__name__)
PACKAGES = ("torch", "ray", "deepspeed", "transformers", "mlflow", "peft-orchestrator")
# Tune's bookkeeping in a report; the trial's own fields are declared in orchestrator.report.
TUNE_KEYS = {"training_iteration", "timestamp", "pid", "time_this_iter_s", "time_total_s", "time_since_restore",
             "iterations_since_restore", "trial_id", "config", "date", "hostname", "node_ip",
             "checkpoint_dir_name", "checkpoint_path"}
LAYERS_ARTIFACT = "layers.json"  # per-layer diagnostics over the reports (the hybrid's gate and norms)

# ----------------------------------------------------------------------------- names and params

# TrialConfig fields whose param name is not simply the field's own name.
TRIAL_PARAMS = {"data.name": "task", "data.seed": "data_seed", "model.name_or_path": "model",
                "deepspeed.config_file": "deepspeed_config_file", "target.metric": "target_metric",
                "target.value": "target_value"}
SAME_NAME = ("data", "model", "train", "deepspeed", "resources")  # other fields keep their name
# Method fields after dropping the composite prefixes: the hybrid's lora_ga.lora.r is LoRA's r.
COMPOSITE_PREFIXES = ("lora_ga.lora.", "lora_ga.", "lora.", "boft.")
METHOD_PARAMS = {
    "r": "rank", "alpha": "alpha", "dropout": "lora_dropout", "use_rslora": "use_rslora",
    "direction": "ga_direction", "scale": "ga_scale", "stable_gamma": "ga_stable_gamma",
    "batches": "ga_batches", "svd_seed": "ga_svd_seed",
    "block_size": "block_size", "block_num": "block_num", "n_butterfly_factor": "butterfly_depth",
    "cayley": "cayley", "neumann_terms": "neumann_terms",
    "output_scale": "output_scale", "seed": "unitary_seed", "target_modules": "target_modules",
    **{f"gate.{k}": f"gate_{k}" for k in ("init", "fixed", "tau", "update_every", "ema", "lambda_min",
                                           "lambda_max", "direction", "normalize", "schedule", "schedule_steps")},
}


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
    return out


def _text(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v) if v is None or isinstance(v, (bool, list, tuple, dict)) else str(v)


def trial_params(trial: dict[str, Any], target: dict | None = None) -> dict[str, str]:
    """A TrialConfig dict -> MLflow params. The method's settings are resolved with its defaults
    (so every run lists every hyperparameter); unknown method fields keep their dotted path."""
    out = {"method": trial["method"]["name"]}
    for section in SAME_NAME + ("target",):
        for key, value in _flat(trial.get(section) or {}).items():
            path = f"{section}.{key}"
            out[TRIAL_PARAMS.get(path, key if section in SAME_NAME else path)] = value
    try:
        import methods

        config = methods.config_for(trial["method"]["name"], trial["method"]["config"]).to_dict()
    except Exception:  # an unknown or newer method: its settings as given
        config = trial["method"]["config"]
    for path, value in _flat(config).items():
        short = next((path[len(p):] for p in COMPOSITE_PREFIXES if path.startswith(p)), path)
        name = METHOD_PARAMS.get(short, path)
        if name in out and value is None:
            continue  # the hybrid's inner target_modules are null when the outer one is set
        out[name if name not in out or out[name] in (None, value) else path] = value
    if target:
        out.update(target_metric=target["metric"], target_mode=target["mode"], target_value=target["value"])
    return {k: _text(v) for k, v in out.items()}


def report_metrics(result: dict[str, Any]) -> dict[str, float]:
    """The numbers of one Tune report (bools as 0/1); per-layer diagnostics as their mean over
    layers (`layer_mean/<name>`, e.g. layer_mean/gate); the series per layer go to layers.json."""
    out = {k: float(v) for k, v in result.items() if k not in TUNE_KEYS and report.is_metric(k, v)}
    layers = result.get("layers") or {}
    for key in sorted({k for d in layers.values() for k in d}):
        values = [d[key] for d in layers.values() if isinstance(d.get(key), (int, float)) and math.isfinite(d[key])]
        if values:
            out[f"layer_mean/{key}"] = sum(values) / len(values)
    return out


def layer_series(history: list[dict]) -> dict[str, Any]:
    """[{step, layers: {layer: {name: value}}}] -> {"steps": [...], "layers": {layer: {name: [values]}}}."""
    names = sorted({layer for h in history for layer in h["layers"]})
    keys = sorted({k for h in history for d in h["layers"].values() for k in d})
    return {"steps": [h["step"] for h in history],
            "layers": {n: {k: [h["layers"].get(n, {}).get(k) for h in history] for k in keys} for n in names}}


def final_metrics(last: dict[str, Any], target: dict) -> dict[str, float]:
    """Whole-trial numbers: the final target metric (not a diverged +-inf) and throughput."""
    out = {}
    if isinstance(last.get(target["metric"]), (int, float)) and math.isfinite(last[target["metric"]]):
        out["final_metric"] = float(last[target["metric"]])
    if last.get("elapsed_s"):
        for what in ("samples", "tokens"):
            if last.get(f"{what}_seen") is not None:
                out[f"avg_{what}_per_s"] = last[f"{what}_seen"] / last["elapsed_s"]
    return out


# ----------------------------------------------------------------------------- URIs, experiment, parent run


def tracking_uri(spec) -> str:
    """spec.tracking.uri, else `sqlite:///<abs storage>/mlflow.db` (absolute: Tune changes cwd)."""
    if spec.tracking.uri:
        return normalize_uri(spec.tracking.uri)
    storage = spec.storage if "://" not in spec.storage else "."
    return f"sqlite:///{os.path.abspath(os.path.expanduser(storage))}/mlflow.db"


def experiment_name(spec) -> str:
    return spec.tracking.experiment or spec.name


def normalize_uri(uri: str) -> str:
    """sqlite:///rel.db, a *.db file or a folder (its mlflow.db) -> sqlite:////abs; servers unchanged."""
    if uri.startswith("sqlite:///"):
        uri = uri[len("sqlite:///"):]
    elif "://" in uri or uri.startswith("databricks"):
        return uri.rstrip("/")
    path = os.path.abspath(os.path.expanduser(uri))
    return f"sqlite:///{path if path.endswith('.db') and not os.path.isdir(path) else os.path.join(path, 'mlflow.db')}"


def check_tracking_uri(uri: str, timeout_s: float = 5.0) -> None:
    """Fail before the sweep, in a few seconds, when the tracking store cannot be used."""
    import urllib.error
    import urllib.request

    if uri.startswith(("http://", "https://")):
        url = f"{uri.rstrip('/')}/api/2.0/mlflow/experiments/search?max_results=1"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as r:
                json.load(r)
        except urllib.error.HTTPError as e:
            if e.code not in (401, 403):  # a server that wants credentials does answer
                raise ConfigError(f"tracking.uri={uri}: not an MLflow server (HTTP {e.code} from {url})") from None
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", None) or e
            raise ConfigError(f"tracking.uri={uri}: no MLflow server answers there ({reason}); start one "
                              f"(`orchestrate ui`), fix the address, or leave tracking.uri empty for a local "
                              f"SQLite store") from None
    elif uri.startswith("sqlite:///"):
        folder = os.path.dirname(uri[len("sqlite:///"):]) or "."
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"tracking.uri={uri}: cannot create {folder} ({e.strerror})") from None
    elif uri.startswith("file:") or ("://" not in uri and not uri.startswith("databricks")):
        raise ConfigError(f"tracking.uri={uri}: MLflow's file store is legacy; use sqlite:///ABS/PATH.db or http://host:port")


def ensure_experiment(client, name: str) -> str:
    """The experiment's id, creating it (artifacts next to a SQLite store, not in Tune's cwd), marked
    as a model-training experiment so that the UI opens on its runs table."""
    from orchestrator.logged_models import EXPERIMENT_KIND

    exp = client.get_experiment_by_name(name)
    if exp is not None:
        for key, value in EXPERIMENT_KIND.items():
            if exp.tags.get(key) != value:
                client.set_experiment_tag(exp.experiment_id, key, value)
        return exp.experiment_id
    uri = client.tracking_uri
    location = None
    if uri.startswith("sqlite:///"):
        location = os.path.join(os.path.dirname(uri[len("sqlite:///"):]), "mlartifacts", name)
    return client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)


def _git_commit(folder: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", folder or ".", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for p in PACKAGES:
        try:
            out[f"version.{p}"] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[f"version.{p}"] = "not installed"
    return out


def start_parent_run(spec, plan: list[dict] | None, uri: str, target=None) -> str:
    """Create the experiment and this invocation's parent run, once, in the driver, before any trial
    (a brand-new SQLite store must not be created by two trials at once). Raises ConfigError."""
    from mlflow import MlflowClient

    target = _target_dict(target or spec.resolve_target())
    try:
        client = MlflowClient(uri)
        exp = ensure_experiment(client, experiment_name(spec))
        commit = _git_commit(os.path.dirname(os.path.abspath(spec.path)) if spec.path else os.getcwd())
        tags = {"orchestrator.kind": "sweep", "sweep": spec.name, **({"mlflow.source.git.commit": commit} if commit else {})}
        run_id = client.create_run(exp, tags=tags, run_name=spec.name).info.run_id
        t = spec.tune
        params = {"sweep": spec.name, "methods": ",".join(spec.methods), "scheduler": t.scheduler,
                  "search_alg": t.search_alg, "num_samples": t.num_samples, "seeds": list(t.seeds),
                  "max_concurrent_trials": t.max_concurrent_trials, "time_budget_s": t.time_budget_s,
                  "num_trials": len(plan) if plan is not None else t.num_samples, "storage": spec.storage,
                  "target_metric": target["metric"], "target_mode": target["mode"], "target_value": target["value"],
                  **_versions(), **{f"cluster.{k}": v for k, v in _cluster().items()}}
        _log_batch(client, run_id, params={k: _text(v) for k, v in params.items()})
        if spec.path and os.path.isfile(spec.path):
            client.log_artifact(run_id, spec.path)
        client.log_dict(run_id, plan if plan is not None else [], "plan.json")
        client.log_dict(run_id, dataclasses.asdict(spec), "sweep_resolved.json")
        return run_id
    except Exception as e:
        raise ConfigError(f"tracking.uri={uri}: cannot create the MLflow experiment or parent run ({e})") from None


def sweep_parent_run(uri: str, experiment: str, sweep: str) -> str | None:
    """The latest parent run of sweep `sweep` (what a resumed sweep continues), or None."""
    from mlflow import MlflowClient

    try:
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name(experiment)
        runs = client.search_runs([exp.experiment_id], f"tags.orchestrator.kind = 'sweep' and tags.sweep = '{sweep}'",
                                  order_by=["attributes.start_time DESC"], max_results=1) if exp else []
        return runs[0].info.run_id if runs else None
    except Exception as e:  # noqa: BLE001 - a resumed sweep runs without it; sync fills MLflow later
        log.warning("MLflow: no parent run found to resume (%s)", e)
        return None


def _cluster() -> dict[str, float]:
    import ray

    return ray.cluster_resources() if ray.is_initialized() else {}


def _target_dict(target) -> dict:
    return dataclasses.asdict(target) if dataclasses.is_dataclass(target) else dict(target)


def finish_parent_run(uri: str, run_id: str, summary: dict | None = None, status: str = "FINISHED") -> None:
    """Attach the sweep summary and end the parent run; a failure here is only a warning."""
    from mlflow import MlflowClient

    try:
        client = MlflowClient(uri)
        if summary is not None:
            client.log_dict(run_id, summary, "summary.json")
            trials = summary.get("trials", [])
            metrics = {"trials": len(trials), "failed": sum(t["status"] == "ERROR" for t in trials),
                       "reached_target": sum(t.get("time_to_quality_s") is not None for t in trials)}
            if summary.get("wall_s") is not None:
                metrics["wall_s"] = summary["wall_s"]
            _log_batch(client, run_id, metrics=metrics)
        client.set_terminated(run_id, status)
    except Exception as e:
        log.warning("MLflow: could not finish parent run %s: %s", run_id, e)


# ----------------------------------------------------------------------------- logging one trial


def _log_batch(client, run_id: str, metrics: dict | None = None, step: int = 0, params: dict | None = None,
               tags: dict | None = None) -> None:
    """One request per MLflow batch limit (1000 metrics, 100 params, 100 tags)."""
    from mlflow.entities import Metric, Param, RunTag

    now = int(time.time() * 1000)
    m = [Metric(k, v, now, step) for k, v in (metrics or {}).items()]
    p = [Param(k, v) for k, v in (params or {}).items()]
    t = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
    while m or p or t:
        client.log_batch(run_id, metrics=m[:1000], params=p[:100], tags=t[:100])
        m, p, t = m[1000:], p[100:], t[100:]


def find_or_create_run(client, experiment_id: str, parent_run_id: str | None, trial_id: str, name: str,
                       config: dict, target: dict) -> str:
    """The child run of this trial: found by its `trial_id` tag (resume, sync), else created."""
    found = client.search_runs([experiment_id], f"tags.trial_id = '{trial_id}'", max_results=1)
    if found:
        return found[0].info.run_id
    trial = config["run"]["trial"]
    tags = {"trial_id": trial_id, "sweep": config.get("sweep", ""), "method": trial["method"]["name"],
            "orchestrator.kind": "trial", "status": "RUNNING"}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run_id = client.create_run(experiment_id, tags=tags, run_name=name).info.run_id
    _log_batch(client, run_id, params=trial_params(trial, target))
    import yaml

    client.log_text(run_id, yaml.safe_dump(trial, sort_keys=False), "trial_config.yaml")
    try:
        from orchestrator.logged_models import log_dataset

        log_dataset(client, run_id, trial["data"])
    except Exception as e:  # noqa: BLE001 - the run itself is what matters
        log.warning("MLflow: dataset input of %s not logged: %s", name, e)
    return run_id


def finish_run(client, run_id: str, last: dict, target: dict, status: str, stop_reason: str,
               error: str | None, layers: list[dict]) -> None:
    """Final metrics, status / stop_reason tags, error text, per-layer history, adapter; end the run."""
    tags = {"status": status, "stop_reason": stop_reason}
    if error:
        tags["error"] = error.strip().splitlines()[-1][:4000] if error.strip() else "error"
        client.log_text(run_id, error, "error.txt")
    logged = client.get_run(run_id).data.metrics  # sync may finish a run twice: log no value twice
    finals = {k: v for k, v in final_metrics(last, target).items() if logged.get(k) != v}
    _log_batch(client, run_id, metrics=finals, step=int(last.get("step") or 0), tags=tags)
    if layers:
        series = layer_series(layers)
        client.log_dict(run_id, series, LAYERS_ARTIFACT)
        # The same numbers long-form, one row per (step, layer), for pandas / a spreadsheet.
        keys = sorted({k for d in series["layers"].values() for k in d})
        rows = [",".join(["step", "layer", *keys])]
        for i, step in enumerate(series["steps"]):
            for name, d in series["layers"].items():
                rows.append(",".join([str(step), name, *("" if d[k][i] is None else str(d[k][i]) for k in keys)]))
        client.log_text(run_id, "\n".join(rows) + "\n", "layers.csv")
    if last.get("checkpoint_path") and not client.list_artifacts(run_id, "adapter"):
        _log_adapter(client, run_id, last["checkpoint_path"])
    client.set_terminated(run_id, "FAILED" if status == "ERROR" else "FINISHED")


def _log_adapter(client, run_id: str, checkpoint: str) -> None:
    """`adapter/` of the trial's final checkpoint (local storage; remote storage keeps it in Ray's)."""
    folder = os.path.join(checkpoint, "adapter")
    if os.path.isdir(folder):
        client.log_artifacts(run_id, folder, "adapter")
    else:
        log.warning("MLflow: no adapter at %s; not logged", folder)


# ----------------------------------------------------------------------------- the Tune callback


class MlflowTracker(Callback):
    """One child run per trial under the parent run. Tune calls these hooks on its driver loop; they
    only enqueue work for one background thread, so MLflow never stalls the sweep. `failures`
    counts MLflow calls that failed (each one logged as a warning)."""

    def __init__(self, uri: str, experiment: str, parent_run_id: str | None, target, flush_timeout_s: float = 120.0):
        self.uri, self.experiment, self.parent_run_id = uri, experiment, parent_run_id
        self.target, self.flush_timeout_s = _target_dict(target), flush_timeout_s
        self.failures = 0
        self._init_runtime()

    def _init_runtime(self) -> None:
        self._runs: dict[str, str] = {}  # trial id -> run id
        self._last: dict[str, dict] = {}  # trial id -> last report
        self._layers: dict[str, list[dict]] = {}  # trial id -> [{step, layers}]
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._client = self._experiment_id = None

    def __getstate__(self):  # Tune pickles its RunConfig (and so this) into tuner.pkl
        return {k: self.__dict__[k] for k in ("uri", "experiment", "parent_run_id", "target", "flush_timeout_s", "failures")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._init_runtime()

    # -- the thread
    def _submit(self, fn, *args) -> None:
        if self._thread is None or not self._thread.is_alive():
            # Fail fast instead of MLflow's default (7 retries, 120 s each): the thread stays current.
            # And no "View run ... at" lines per trial in the middle of the live table.
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
            os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
            self._thread = threading.Thread(target=self._work, name="mlflow-tracker", daemon=True)
            self._thread.start()
        self._queue.put((fn, args))

    def _work(self) -> None:
        while True:
            fn, args = self._queue.get()
            try:
                fn(*args)
            except Exception as e:  # never raised into Tune: counted, and `orchestrate sync` repairs
                self.failures += 1
                log.warning("MLflow tracking (%s) failed: %s", getattr(fn, "__name__", fn), e)
            finally:
                self._queue.task_done()

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until everything queued is written (at most timeout_s); True when it was."""
        done = threading.Event()
        self._submit(done.set)
        return done.wait(self.flush_timeout_s if timeout_s is None else timeout_s)

    # -- work done on the thread
    def _run_id(self, trial_id: str, name: str, config: dict) -> str:
        if trial_id not in self._runs:
            from mlflow import MlflowClient

            if self._client is None:
                self._client = MlflowClient(self.uri)
                self._experiment_id = ensure_experiment(self._client, self.experiment)
            self._runs[trial_id] = find_or_create_run(self._client, self._experiment_id, self.parent_run_id,
                                                      trial_id, name, config, self.target)
        return self._runs[trial_id]

    def _start(self, trial_id, name, config):
        run_id = self._run_id(trial_id, name, config)
        self._client.update_run(run_id, status="RUNNING")

    def _result(self, trial_id, name, config, result):
        step = int(result.get("step", result.get("training_iteration", 0)))
        run_id = self._run_id(trial_id, name, config)
        _log_batch(self._client, run_id, metrics=report_metrics(result), step=step)

    def _end(self, trial_id, name, config, status, stop_reason, error):
        run_id = self._run_id(trial_id, name, config)
        finish_run(self._client, run_id, self._last.get(trial_id, {}), self.target, status, stop_reason,
                   error, self._layers.get(trial_id, []))

    # -- Tune's hooks (driver loop: enqueue only)
    @staticmethod
    def _who(trial) -> tuple[str, str, dict]:
        return trial.trial_id, trial.config["run"].get("name") or str(trial), trial.config

    def on_trial_start(self, iteration, trials, trial, **info):
        self._submit(self._start, *self._who(trial))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        result = {k: v for k, v in result.items() if k != "config"}
        if result.get("checkpoint_path") is None and trial.trial_id in self._last:
            result["checkpoint_path"] = self._last[trial.trial_id].get("checkpoint_path")
        self._last[trial.trial_id] = result
        if result.get("layers"):
            self._layers.setdefault(trial.trial_id, []).append({"step": result.get("step"), "layers": result["layers"]})
        self._submit(self._result, *self._who(trial), result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        stop_reason = self._last.get(trial.trial_id, {}).get("stop_reason") or "early_stopped"
        self._submit(self._end, *self._who(trial), "TERMINATED", stop_reason, None)

    def on_trial_error(self, iteration, trials, trial, **info):
        text = _error_text(trial)
        reason = "stalled" if "TrialStalled" in text else "error"  # the same rule as sweep.stop_reason
        self._submit(self._end, *self._who(trial), "ERROR", reason, text)

    def on_experiment_end(self, trials, **info):
        if not self.flush():
            log.warning("MLflow: gave up waiting after %.0f s; run `orchestrate sync` to finish the log", self.flush_timeout_s)
        if self.failures:
            log.warning("MLflow: %d call(s) failed during the sweep; `orchestrate sync FILE` writes "
                        "the results kept in Ray's storage to MLflow", self.failures)


def _error_text(trial) -> str:
    """Tune wrote the traceback to the trial's error file before calling on_trial_error."""
    try:
        with open(trial.error_file) as f:
            return f.read()
    except Exception:
        return f"trial {trial} failed (no error file)"


# ----------------------------------------------------------------------------- sync from Ray's storage


def _read(path: str, lines: bool = False) -> Any:
    """A JSON (or JSON-lines) file, or None when it is missing or unreadable."""
    try:
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()] if lines else json.load(f)
    except (OSError, ValueError):
        return None


def _read_text(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def stored_trials(sweep_dir: str, summary: dict, sweep: str) -> list[dict]:
    """Every trial Ray's storage knows: reports from each trial folder's `result.json` (Tune writes
    one line per report), status and error from `summary.json` / `error.txt`. A trial only in
    the summary becomes one report made of its summary row."""
    rows = {r.get("trial_id"): r for r in summary.get("trials", [])}
    trials = []
    for entry in sorted(os.listdir(sweep_dir)):
        folder = os.path.join(sweep_dir, entry)
        reports = _read(os.path.join(folder, "result.json"), lines=True) or []
        config = reports[-1].get("config") if reports else _read(os.path.join(folder, "params.json"))
        if not isinstance(config, dict) or "run" not in config:
            continue  # not a trial folder
        trial_id = reports[-1]["trial_id"] if reports else entry.rsplit("-", 1)[-1]  # folders: <name>-<trial id>
        row = rows.pop(trial_id, None) or rows.pop(entry, None) or {}  # summary ids a metric-less trial by folder
        error = _read_text(os.path.join(folder, "error.txt")) or row.get("error")
        trials.append({"trial_id": trial_id, "config": config, "reports": reports, "row": row, "error": error})
    for row in rows.values():
        last = {k: row[k] for k in report.SUMMARY if row.get(k) is not None}
        if row.get("metric") is not None:
            last[summary["target"]["metric"]] = row["metric"]
        trials.append({"trial_id": row["trial_id"], "row": row, "error": row.get("error"), "reports": [last] if last else [],
                       "config": {"sweep": sweep, "run": {"name": row["name"], "trial": row["config"]}}})
    return trials


def _sync_parent(client, experiment_id: str, sweep: str, target: dict):
    """The latest parent run of this sweep, or a new one saying it was made by sync: (run, status)."""
    runs = client.search_runs([experiment_id], f"tags.sweep = '{sweep}'", order_by=["attributes.start_time DESC"])
    parents = [r for r in runs if r.data.tags.get("orchestrator.kind") == "sweep"]
    if parents:
        return parents[0].info.run_id, parents[0].info.status
    run_id = client.create_run(experiment_id, run_name=sweep, tags={
        "orchestrator.kind": "sweep", "sweep": sweep, "synced_from_storage": "true"}).info.run_id
    _log_batch(client, run_id, params={"sweep": sweep, **{f"target_{k}": _text(v) for k, v in target.items()}})
    return run_id, "RUNNING"


def sync_from_storage(path: str, uri: str, experiment: str | None = None) -> dict[str, int]:
    """Write a sweep's results kept in Ray's storage (`<storage>/<sweep>/`, or its summary.json)
    to MLflow. Idempotent: child runs are found by trial id and only missing report steps are
    logged, so running it twice, or after a partly logged sweep, duplicates nothing."""
    from mlflow import MlflowClient

    if "://" in path:  # s3://, gs://: read through the same filesystem layer as the summary's writer
        path = _local_copy(path)
    sweep_dir = os.path.dirname(os.path.abspath(path)) if os.path.isfile(path) else os.path.abspath(path)
    summary = _read(os.path.join(sweep_dir, "summary.json")) or {}
    sweep = os.path.basename(sweep_dir)  # Tune's experiment folder is named after the sweep
    trials = stored_trials(sweep_dir, summary, sweep) if os.path.isdir(sweep_dir) else []
    if not trials:
        raise ConfigError(f"{path}: no Tune trial folders (result.json, params.json) or summary.json there")
    target = summary.get("target") or _stored_target(trials)
    client = MlflowClient(uri)
    experiment_id = ensure_experiment(client, experiment or sweep)
    parent, parent_status = _sync_parent(client, experiment_id, sweep, target)
    counts = {"trials": 0, "created": 0, "reports_logged": 0}
    for t in trials:
        before = client.search_runs([experiment_id], f"tags.trial_id = '{t['trial_id']}'", max_results=1)
        name = t["config"]["run"].get("name") or t["row"].get("name") or t["trial_id"]
        run_id = find_or_create_run(client, experiment_id, parent, t["trial_id"], name, t["config"], target)
        logged = {m.step for m in client.get_metric_history(run_id, "elapsed_s")} if before else set()
        for r in t["reports"]:
            step = int(r.get("step", r.get("training_iteration", 0)))
            if step not in logged:
                _log_batch(client, run_id, metrics=report_metrics(r), step=step)
                counts["reports_logged"] += 1
        last = dict(t["reports"][-1]) if t["reports"] else {}
        last["checkpoint_path"] = next((r["checkpoint_path"] for r in reversed(t["reports"]) if r.get("checkpoint_path")), None)
        status = "ERROR" if t["error"] or t["row"].get("status") == "ERROR" else "TERMINATED"
        stop = t["row"].get("stop_reason") or ("error" if status == "ERROR" else last.get("stop_reason") or "early_stopped")
        layers = [{"step": r.get("step"), "layers": r["layers"]} for r in t["reports"] if r.get("layers")]
        finish_run(client, run_id, last, target, status, stop, t["error"], layers)
        counts["trials"] += 1
        counts["created"] += not before
    if summary and parent_status == "RUNNING":  # the sweep ended but its parent run was never closed
        client.log_dict(parent, summary, "summary.json")
        client.set_terminated(parent, "FINISHED")
    return counts


SYNC_FILES = ("summary.json", "result.json", "params.json", "error.txt")  # what sync reads; no checkpoints


def _local_copy(uri: str) -> str:
    """The files sync reads from a sweep folder at `uri`, copied through pyarrow's filesystem
    (what Ray and `sweep.write_summary` use for s3:// and gs://) into a temporary local folder of
    the same name. Checkpoints stay where they are: their adapters are logged from local storage only."""
    import tempfile

    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(uri.rstrip("/"))
    dest = os.path.join(tempfile.mkdtemp(prefix="sync-"), os.path.basename(root))
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    except OSError as e:
        raise ConfigError(f"{uri}: cannot list the sweep's folder ({e})") from None
    for info in infos:
        if info.type == pafs.FileType.File and os.path.basename(info.path) in SYNC_FILES:
            local = os.path.join(dest, os.path.relpath(info.path, root))
            os.makedirs(os.path.dirname(local), exist_ok=True)
            with fs.open_input_stream(info.path) as src, open(local, "wb") as out:
                out.write(src.read())
    return dest


def _stored_target(trials: list[dict]) -> dict:
    """The target without summary.json: the sweep's Tune config carries it, reports name it."""
    for t in trials:
        if isinstance(t["config"].get("target"), dict) and "mode" in t["config"]["target"]:
            return t["config"]["target"]
    last = next((t["reports"][-1] for t in trials if t["reports"] and "target_metric" in t["reports"][-1]), None)
    if last is None:
        raise ConfigError("sync: cannot tell the target metric (no summary.json, config or report names it)")
    metric = last["target_metric"]
    return {"metric": metric, "mode": "min" if "loss" in metric else "max", "value": last["target"]}


# ----------------------------------------------------------------------------- `orchestrate ui`


def start_server(store: str, port: int, host: str = "127.0.0.1") -> subprocess.Popen:
    """`mlflow server` on a SQLite store, in its own process group (stop: `stop_server`). One
    worker and no job runner: it answers in seconds instead of ~half a minute on 2 cores."""
    uri = normalize_uri(store)
    if not uri.startswith("sqlite:///"):
        raise ConfigError(f"{store}: `orchestrate ui` serves a local SQLite store (a folder, *.db or sqlite:/// URI)")
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", host, "--port", str(port), "--workers", "1",
           "--backend-store-uri", uri]
    return subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def wait_for_server(url: str, proc: subprocess.Popen | None = None, timeout_s: float = 60.0) -> None:
    """Until `url` answers as an MLflow server; raises ConfigError if it dies or never answers."""
    deadline = time.time() + timeout_s
    while True:
        try:
            return check_tracking_uri(url, timeout_s=2)
        except ConfigError:
            if proc is not None and proc.poll() is not None:
                raise ConfigError(f"mlflow server exited: {proc.stderr.read().decode()[-2000:]}") from None
            if time.time() > deadline:
                raise
            time.sleep(0.25)


def stop_server(proc: subprocess.Popen) -> None:
    import signal

    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None


def serve_ui(uri_or_store: str, port: int = 5000) -> int:
    """`orchestrate ui`: serve the sweep's store at http://127.0.0.1:PORT until Ctrl+C."""
    if uri_or_store.startswith(("http://", "https://")):
        check_tracking_uri(uri_or_store)
        print(f"MLflow UI: {uri_or_store} (already a server)")
        return 0
    proc = start_server(uri_or_store, port)
    try:
        wait_for_server(f"http://127.0.0.1:{port}", proc)
        print(f"MLflow UI: http://127.0.0.1:{port}  (store {normalize_uri(uri_or_store)}; Ctrl+C stops it)", flush=True)
        proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        stop_server(proc)
    return 0
