"""`tune.time_budget_s`: the whole sweep's wall-clock budget, and a record of what it stopped.

Tune's own budget (TuneConfig.time_budget_s, a TimeoutStopper) ends a sweep by stopping every
unfinished trial, and leaves no trace of it: the trials it stopped look like trials that ended on
their own (Tune calls no `on_trial_complete` for them), the planned ones it never started are
simply missing, and a driver cannot tell that end from an interrupted one. `TimeBudget` is the same
stopper and also a Tune callback: it sees which trials ended by their own decision (a final report,
ASHA, an error), so the ones the budget stopped are known, and it writes them to
`<storage>/<sweep>/time_budget.json` (as it runs out) for the summary, and for a
`--resume` of a sweep that ended so.

The budget is the sweep's, across driver runs: a sweep resumed after Ctrl-C or a killed driver
gets what was left of it when Tune last saved its state (Tune keeps the stopper in that state); a
sweep its budget ended has nothing left to run.
"""

from __future__ import annotations

import json
import time
import uuid
from datetime import datetime, timezone

from ray.tune import Callback
from ray.tune.stopper import TimeoutStopper

from orchestrator import storage

RECORD_FILE = "time_budget.json"
# What the copies of one budget share in this driver process. A restored sweep holds two: Tune
# restores its stopper from its saved experiment state and its callbacks from the saved Tuner.
_SEEN: dict[str, dict] = {}


def record_path(storage_path: str, sweep: str) -> str:
    return storage.join(storage_path, sweep, RECORD_FILE)


class TimeBudget(TimeoutStopper, Callback):
    """Pass it both as RunConfig(stop=...) and in RunConfig(callbacks=[...])."""

    def __init__(self, seconds: float, record: str):
        super().__init__(seconds)
        self.record = record
        self._key = uuid.uuid4().hex  # pickled with every copy: the copies find one _SEEN entry

    @property
    def _seen(self) -> dict:
        return _SEEN.setdefault(self._key, {"spent_at": None, "started": set(), "decided": set()})

    def setup(self, **info):  # each driver run starts afresh (a --resume in the same process too)
        _SEEN.pop(self._key, None)

    @property
    def spent_at(self) -> float | None:
        """When the budget ran out in this driver run, or None."""
        return self._seen["spent_at"]

    def stop_all(self) -> bool:
        spent = super().stop_all()
        if spent and self._seen["spent_at"] is None:
            self._seen["spent_at"] = time.time()
            self._write_record()
        return spent

    def stopped(self, trial_id: str) -> bool:
        """Whether the budget ended this trial: it ran in this driver run and had not ended when
        the budget ran out (after that Tune makes no other decision: it stops every trial)."""
        seen = self._seen
        return seen["spent_at"] is not None and trial_id in seen["started"] and trial_id not in seen["decided"]

    def on_trial_start(self, iteration, trials, trial, **info):
        self._seen["started"].add(trial.trial_id)

    def on_trial_complete(self, iteration, trials, trial, **info):  # a final report or ASHA
        self._seen["decided"].add(trial.trial_id)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._seen["decided"].add(trial.trial_id)

    def _write_record(self) -> None:
        # Here, as the budget runs out: Tune asks its stopper before it saves its state in the same
        # step (and stops every trial right after), so no saved state has a spent budget and no
        # record; a driver killed at any point after leaves a sweep whose --resume finds its end.
        # A sweep resumed after its budget ran out keeps the record of the run it ran out in (this
        # run started nothing before the end, so it would record nothing stopped).
        if read(self.record) is not None:
            return
        seen = self._seen
        record = {
            "time_budget_s": self._timeout_seconds,
            "spent_at": datetime.fromtimestamp(seen["spent_at"], timezone.utc).isoformat(timespec="seconds"),
            "stopped": sorted(t for t in seen["started"] if self.stopped(t)),
        }
        storage.write_bytes(self.record, json.dumps(record, indent=2).encode())


def read(record: str) -> dict | None:
    """The record of a sweep its budget ended, or None (no such end)."""
    try:
        return json.loads(storage.read_bytes(record))
    except (OSError, ValueError):
        return None
