"""`tune.time_budget_s`: the whole sweep's wall-clock budget, and a record of what it stopped.

Tune's own budget (TuneConfig.time_budget_s, a TimeoutStopper) ends a sweep by stopping every
unfinished trial, and leaves no trace of it: the trials it stopped look like trials that ended on
their own (Tune calls no `on_trial_complete` for them), the planned ones it never started are
simply missing, and a driver cannot tell that end from an interrupted one. `TimeBudget` is the same
stopper and also a Tune callback: it sees which trials ended by their own decision (a final report,
ASHA, an error), so the ones the budget stopped are known, and it writes them to
`<storage>/<sweep>/time_budget.json` for the summary, and for a `--resume` of a sweep that ended so.

The budget counts from the first step of Tune's loop in each driver run: a resumed sweep gets it
again (as Tune does).
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone

from ray.tune import Callback
from ray.tune.stopper import TimeoutStopper

from orchestrator import storage

RECORD_FILE = "time_budget.json"


def record_path(storage_path: str, sweep: str) -> str:
    return storage.join(storage_path, sweep, RECORD_FILE)


class TimeBudget(TimeoutStopper, Callback):
    """Pass it both as RunConfig(stop=...) and in RunConfig(callbacks=[...]) (one object: Tune
    pickles both into its tuner state together, so a restored sweep keeps them one object)."""

    def __init__(self, seconds: float, record: str):
        super().__init__(seconds)
        self.record = record
        self.spent_at: float | None = None  # when the budget ran out, in this driver run
        self._started: set[str] = set()
        self._decided: set[str] = set()  # ended on their own: final report, ASHA, error

    def stop_all(self) -> bool:
        spent = super().stop_all()
        if spent and self.spent_at is None:
            self.spent_at = time.time()
        return spent

    def stopped(self, trial_id: str) -> bool:
        """Whether the budget ended this trial: it ran in this driver run and had not ended when
        the budget ran out (after that Tune makes no other decision: it stops every trial)."""
        return self.spent_at is not None and trial_id in self._started and trial_id not in self._decided

    def on_trial_start(self, iteration, trials, trial, **info):
        self._started.add(trial.trial_id)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._decided.add(trial.trial_id)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._decided.add(trial.trial_id)

    def on_experiment_end(self, trials, **info):
        if self.spent_at is None:
            return
        record = {
            "time_budget_s": self._timeout_seconds,
            "spent_at": datetime.fromtimestamp(self.spent_at, timezone.utc).isoformat(timespec="seconds"),
            "stopped": sorted(t.trial_id for t in trials if self.stopped(t.trial_id)),
        }
        storage.write_bytes(self.record, json.dumps(record, indent=2).encode())

    def __getstate__(self):  # what Tune pickles at the start of a run: a fresh budget for a resumed one
        return {**self.__dict__, "spent_at": None, "_started": set(), "_decided": set()}


def read(record: str) -> dict | None:
    """The record of a sweep its budget ended, or None (no such end)."""
    try:
        return json.loads(storage.read_bytes(record))
    except (OSError, ValueError):
        return None
