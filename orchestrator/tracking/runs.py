"""The runs' lifecycle: the experiment, one parent run per sweep invocation, one child run per
trial (found again by its `trial_id` tag), and how each is finished."""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import time

from methods.config import ConfigError

from .params import LAYERS_ARTIFACT, _text, final_metrics, layer_series, trial_params
from .uris import experiment_name

log = logging.getLogger(__name__)


PACKAGES = ("torch", "ray", "deepspeed", "transformers", "mlflow", "peft-orchestrator")


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
                  "num_trials": spec.num_trials, "storage": spec.storage,
                  "target_metric": target["metric"], "target_mode": target["mode"], "target_value": target["value"],
                  **_versions(), **{f"cluster.{k}": v for k, v in _cluster().items()}}
        _log_batch(client, run_id, params={k: _text(v) for k, v in params.items()})
        if spec.path and os.path.isfile(spec.path):
            client.log_artifact(run_id, spec.path)
        client.log_dict(run_id, plan if plan is not None else [], "plan.json")
        client.log_dict(run_id, {**dataclasses.asdict(spec), "data": spec.data.to_dict()}, "sweep_resolved.json")
        return run_id
    except Exception as e:
        raise ConfigError(f"tracking.uri={uri}: cannot create the MLflow experiment or parent run ({e})") from None


def sweep_parent_run(uri: str, experiment: str, sweep: str, reopen: bool = False) -> str | None:
    """The latest parent run of sweep `sweep` (what a resumed sweep continues), or None. With
    `reopen`, a parent that Ctrl-C left KILLED (or a crash left RUNNING) is RUNNING again."""
    from mlflow import MlflowClient

    try:
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name(experiment)
        runs = client.search_runs([exp.experiment_id], f"tags.orchestrator.kind = 'sweep' and tags.sweep = '{sweep}'",
                                  order_by=["attributes.start_time DESC"], max_results=1) if exp else []
        if runs and reopen and runs[0].info.status != "RUNNING":
            client.update_run(runs[0].info.run_id, status="RUNNING")
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
                       "reached_target": sum(t.get("time_to_quality_s") is not None for t in trials),
                       "not_run": len(summary.get("not_run", []))}
            if summary.get("wall_s") is not None:
                metrics["wall_s"] = summary["wall_s"]
            _log_batch(client, run_id, metrics=metrics, tags={"ended_by": summary.get("ended_by", "completed")})
        client.set_terminated(run_id, status)
    except Exception as e:
        log.warning("MLflow: could not finish parent run %s: %s", run_id, e)


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
               error: str | None, layers: list[dict], storage: str | None = None) -> None:
    """Final metrics, status / stop_reason tags, error text, per-layer history, adapter (from the
    sweep's `storage`, local or s3:// / gs://); end the run."""
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
        _log_adapter(client, run_id, last["checkpoint_path"], storage)
    client.set_terminated(run_id, "FAILED" if status == "ERROR" else "FINISHED")


def _log_adapter(client, run_id: str, checkpoint: str, storage: str | None = None) -> None:
    """`adapter/` of the trial's final checkpoint. On s3:// or gs:// storage Ray names a checkpoint
    by its path in that filesystem (no scheme): the folder is fetched through pyarrow, as Ray wrote it."""
    folder = os.path.join(checkpoint, "adapter")
    if not os.path.isdir(folder) and storage and "://" in storage:
        folder = _fetch(storage, f"{checkpoint.rstrip('/')}/adapter")
    if folder and os.path.isdir(folder):
        client.log_artifacts(run_id, folder, "adapter")
    else:
        log.warning("MLflow: no adapter at %s; not logged", checkpoint)


def _fetch(storage: str, path: str) -> str | None:
    """Folder `path` of the filesystem `storage` lives on, copied into a temporary local folder."""
    import tempfile

    import pyarrow.fs as pafs

    local = tempfile.mkdtemp(prefix="adapter-")
    try:
        fs, _ = pafs.FileSystem.from_uri(storage)
        if fs.get_file_info(path).type != pafs.FileType.Directory:
            return None
        pafs.copy_files(path, local, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    except (OSError, ValueError) as e:
        log.warning("MLflow: could not fetch %s from %s: %s", path, storage, e)
        return None
    return local
