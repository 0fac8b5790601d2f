"""The live view of a sweep: a compact table of trials, reprinted as results arrive (at most every
`every_s` seconds), in place of Tune's verbose default output."""

from __future__ import annotations

import sys
import time

from ray.tune import Callback

from orchestrator import report
from orchestrator.config import Target


def format_table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def fmt(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


class LiveTable(Callback):
    def __init__(self, target: Target, every_s: float = 10.0):
        self.target, self.every_s = target, every_s  # no stream attribute: Tune pickles callbacks
        self.last: dict[str, dict] = {}
        self.printed = 0.0

    def _row(self, trial) -> list[str]:
        r = self.last.get(trial.trial_id, {})
        return [str(trial), trial.status, trial.config["run"]["trial"]["method"]["name"],
                fmt(r.get(self.target.metric)), *(fmt(r.get(k), 4) if k != "stop_reason" else r.get(k) or ""
                                                  for k in report.COLUMNS)]

    def _print(self, trials, force: bool = False) -> None:
        if not force and time.time() - self.printed < self.every_s:
            return
        self.printed = time.time()
        header = ["trial", "status", "method", self.target.metric, *map(report.short, report.COLUMNS)]
        done = sum(t.status in ("TERMINATED", "ERROR") for t in trials)
        print(f"\n== {done}/{len(trials)} trials done; target {self.target.metric} "
              f"{'>=' if self.target.mode == 'max' else '<='} {self.target.value}", file=sys.stdout)
        print(format_table([self._row(t) for t in trials], header), file=sys.stdout, flush=True)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.last[trial.trial_id] = result
        self._print(trials)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._print(trials, force=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._print(trials, force=True)
