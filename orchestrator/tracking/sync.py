"""`orchestrate sync`: a sweep's results kept in Ray's storage (local, s3://, gs://) -> MLflow,
idempotently."""

from __future__ import annotations

import json
import os
from typing import Any

from methods.config import ConfigError
from orchestrator import report

from .params import _text, report_metrics
from .runs import _log_batch, ensure_experiment, find_or_create_run, finish_parent_run, finish_run


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

    remote = path if "://" in path else None
    if remote:  # s3://, gs://: read through the same filesystem layer as the summary's writer
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
        finish_run(client, run_id, last, target, status, stop, t["error"], layers, storage=remote)
        counts["trials"] += 1
        counts["created"] += not before
    if summary and parent_status == "RUNNING":  # the sweep ended but its parent run was never closed
        finish_parent_run(uri, parent, summary)  # as the sweep's driver would have
    return counts


SYNC_FILES = ("summary.json", "result.json", "params.json", "error.txt")  # what sync reads; no checkpoints


def _local_copy(uri: str) -> str:
    """The files sync reads from a sweep folder at `uri`, copied through pyarrow's filesystem
    (what Ray and `sweep.write_summary` use for s3:// and gs://) into a temporary local folder of
    the same name. Checkpoints stay where they are (only each trial's last adapter is fetched, to log it)."""
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
