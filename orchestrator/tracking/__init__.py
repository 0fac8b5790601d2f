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

from .callback import MlflowTracker
from .params import LAYERS_ARTIFACT, TUNE_KEYS, final_metrics, layer_series, report_metrics, trial_params
from .runs import (
    ensure_experiment,
    find_or_create_run,
    finish_parent_run,
    finish_run,
    start_parent_run,
    sweep_parent_run,
)
from .server import serve_ui, start_server, stop_server, wait_for_server
from .sync import stored_trials, sync_from_storage
from .uris import check_tracking_uri, experiment_name, normalize_uri, tracking_uri

__all__ = [
    "LAYERS_ARTIFACT", "TUNE_KEYS", "MlflowTracker", "check_tracking_uri", "ensure_experiment", "experiment_name",
    "final_metrics", "find_or_create_run", "finish_parent_run", "finish_run", "layer_series", "normalize_uri",
    "report_metrics", "serve_ui", "start_parent_run", "start_server", "stop_server", "stored_trials",
    "sweep_parent_run", "sync_from_storage", "tracking_uri", "trial_params", "wait_for_server",
]
