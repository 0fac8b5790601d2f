"""The Tune callback that logs every trial as it runs, on one background thread."""

from __future__ import annotations

import logging
import os
import queue
import threading

from ray.tune import Callback

from .params import report_metrics
from .runs import _log_batch, _target_dict, ensure_experiment, find_or_create_run, finish_run

log = logging.getLogger(__name__)


class MlflowTracker(Callback):
    """One child run per trial under the parent run. Tune calls these hooks on its driver loop; they
    only enqueue work for one background thread, so MLflow never stalls the sweep. `failures`
    counts MLflow calls that failed (each one logged as a warning). `time_budget`: the sweep's
    budget.TimeBudget, which says which trials it stopped (Tune calls no hook for those)."""

    def __init__(self, uri: str, experiment: str, parent_run_id: str | None, target, flush_timeout_s: float = 120.0,
                 time_budget=None):
        self.uri, self.experiment, self.parent_run_id = uri, experiment, parent_run_id
        self.target, self.flush_timeout_s, self.time_budget = _target_dict(target), flush_timeout_s, time_budget
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
        keep = ("uri", "experiment", "parent_run_id", "target", "flush_timeout_s", "failures", "time_budget")
        return {k: self.__dict__[k] for k in keep}

    def __setstate__(self, state):
        self.__dict__.update({"time_budget": None, **state})  # a sweep started before the field existed
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
                   error, self._layers.get(trial_id, []), storage=config.get("storage"))

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
        for trial in trials:
            if self.time_budget is not None and self.time_budget.stopped(trial.trial_id):
                self._submit(self._end, *self._who(trial), "TERMINATED", "time_budget", None)
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
