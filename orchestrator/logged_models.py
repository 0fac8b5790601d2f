"""What MLflow's UI and registry show beyond metrics: the training data as each run's dataset input,
the best trial of each method as an MLflow 3 `LoggedModel` of its run, and registration.

    log_dataset(client, run_id, trial["data"])            # runs table: the Dataset column
    log_best_models(uri, experiment, summary)              # runs table: the Models column
    register(uri, run_id, "bbc-lora")                      # Models -> registry, version n

A logged model carries the trial's PEFT export (`orchestrate export --format peft`) where PEFT has a
format for the method, else the adapter in this project's format with the trial's configuration
(`orchestrate export --run-id RUN --format merged` turns it into a plain transformers model: a
merged copy of the base model per method is not written by default, it would be a full model's
size on every sweep). Its tags name the method, the base model and the format.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from typing import Any

log = logging.getLogger(__name__)

EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}  # the UI opens on the runs table
DIGEST_BYTES = 1 << 20  # a data file's digest reads its first MiB (and its size), as MLflow's own samples rows


def dataset_entity(data: dict[str, Any]):
    """MLflow's Dataset for a trial's `data` section: the task's name, its source (the local files,
    or the installed corpus / hub dataset the task reads), a digest of the source and the sampling."""
    from mlflow.entities import Dataset

    from orchestrator.config import TrialConfig
    from orchestrator.tasks import get_task

    spec = TrialConfig.from_dict({"data": data}).data
    sources = {split: path for split, (path, _) in get_task(spec.name).sources(spec).items()}
    digest = hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode())
    for split, path in sorted(sources.items()):
        digest.update(split.encode())
        if os.path.isfile(path):
            digest.update(str(os.path.getsize(path)).encode())
            with open(path, "rb") as f:
                digest.update(f.read(DIGEST_BYTES))
    source = json.dumps(sources) if sources else json.dumps({"task": spec.name})
    return Dataset(name=spec.name, digest=digest.hexdigest()[:10], source_type="local" if sources else "code",
                   source=source)


def log_dataset(client, run_id: str, data: dict[str, Any]) -> None:
    from mlflow.entities import DatasetInput, InputTag

    tags = [InputTag("mlflow.data.context", "training")]
    client.log_inputs(run_id, datasets=[DatasetInput(dataset_entity(data), tags=tags)])


def _export_folder(checkpoint: str, folder: str) -> str:
    """The PEFT export of the checkpoint into `folder`, or (no PEFT format) its adapter + trial.json."""
    from methods.config import ConfigError
    from orchestrator import export
    from orchestrator.worker import ADAPTER_DIR, TRIAL_FILE

    try:
        export.export(checkpoint, folder, "peft")
        return "peft"
    except ConfigError:
        shutil.copytree(os.path.join(checkpoint, ADAPTER_DIR), folder, dirs_exist_ok=True)
        shutil.copy(os.path.join(checkpoint, TRIAL_FILE), folder)
        return "peft-orchestrator"


def log_model(client, experiment_id: str, run_id: str, trial: dict[str, Any]) -> str:
    """The trial's model as a LoggedModel of its run (READY once its files are uploaded)."""
    from mlflow.entities import LoggedModelOutput

    from orchestrator.config import TrialConfig
    from orchestrator.export import base_model_name

    cfg = trial["config"]
    with tempfile.TemporaryDirectory() as d:
        fmt = _export_folder(trial["checkpoint"], d)
        base = base_model_name(TrialConfig.from_dict(cfg))
        model = client.create_logged_model(
            experiment_id, name=f"{trial['method']}-best", source_run_id=run_id,
            tags={"method": trial["method"], "base_model": base, "format": fmt, "trial": trial["name"]},
            params={"method": trial["method"], "base_model": base}, model_type=fmt)
        client.log_model_artifacts(model.model_id, d)
    client.finalize_logged_model(model.model_id, "READY")
    client.log_outputs(run_id, [LoggedModelOutput(model.model_id, int(trial.get("step") or 0))])
    return model.model_id


def log_best_models(uri: str, experiment: str, summary: dict[str, Any]) -> dict[str, str]:
    """method -> model id, for the best trial of every method that has a checkpoint. A model that
    cannot be logged is a warning: the sweep's results are already safe."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    out = {}
    for method, trial in summary["best"].items():
        if not trial.get("checkpoint"):
            continue
        try:
            runs = client.search_runs([exp.experiment_id], f"tags.trial_id = '{trial['trial_id']}'", max_results=1)
            if runs and not client.search_logged_models([exp.experiment_id], f"source_run_id = '{runs[0].info.run_id}'"):
                out[method] = log_model(client, exp.experiment_id, runs[0].info.run_id, trial)
        except Exception as e:  # noqa: BLE001
            log.warning("MLflow: the best %s model (%s) was not logged: %s", method, trial["name"], e)
    return out


def register(uri: str, run_id: str, name: str) -> int:
    """Register the LoggedModel of run `run_id` under `name`; returns the new version."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from methods.config import ConfigError

    client = MlflowClient(uri)
    run = client.get_run(run_id)
    models = client.search_logged_models([run.info.experiment_id], f"source_run_id = '{run_id}'")
    if not models:
        raise ConfigError(f"--register: run {run_id} ({run.info.run_name}) has no logged model; a sweep logs one "
                          "for the best trial of each method")
    try:
        client.create_registered_model(name)
    except MlflowException as e:
        if "already exists" not in str(e).lower() and "RESOURCE_ALREADY_EXISTS" not in str(e):
            raise
    model = models[0]
    version = client.create_model_version(name, source=model.artifact_location, run_id=run_id, model_id=model.model_id)
    return int(version.version)
