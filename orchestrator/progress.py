"""The live view of a sweep, in place of Tune's verbose default output: a table of trials updated in
place in a terminal, a plain line per change otherwise (see LiveTable)."""

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
    """In a terminal: one table of every trial, redrawn in place (at most every `every_s` seconds,
    and at every trial's end). Elsewhere (CI, `ray job logs`, a file): one plain line per trial
    whenever its status or step changes, so the log reads as a history, not as reprinted tables."""

    def __init__(self, target: Target, every_s: float = 2.0):
        self.target, self.every_s = target, every_s  # no stream attribute: Tune pickles callbacks
        self.last: dict[str, dict] = {}
        self.printed = 0.0
        self.drawn = 0  # lines of the table last drawn in place
        self.shown: dict[str, tuple] = {}  # trial id -> (status, step) of its last plain line

    def _row(self, trial) -> list[str]:
        r = self.last.get(trial.trial_id, {})
        return [str(trial), trial.status, trial.config["run"]["trial"]["method"]["name"],
                fmt(r.get(self.target.metric)), *(fmt(r.get(k), 4) if k != "stop_reason" else r.get(k) or ""
                                                  for k in report.COLUMNS)]

    def _header(self) -> list[str]:
        return ["trial", "status", "method", self.target.metric, *map(report.short, report.COLUMNS)]

    def _print(self, trials, force: bool = False) -> None:
        if sys.stdout.isatty():
            self._redraw(trials, force)
        else:
            self._lines(trials)

    def _redraw(self, trials, force: bool) -> None:
        if not force and time.time() - self.printed < self.every_s:
            return
        self.printed = time.time()
        done = sum(t.status in ("TERMINATED", "ERROR") for t in trials)
        text = (f"{done}/{len(trials)} trials done; target {self.target.metric} "
                f"{'>=' if self.target.mode == 'max' else '<='} {self.target.value}\n"
                + format_table([self._row(t) for t in trials], self._header()))
        # Cursor up over the previous table, clear to the end of the screen, draw the new one.
        up = f"\x1b[{self.drawn}F\x1b[J" if self.drawn else ""
        sys.stdout.write(up + text + "\n")
        sys.stdout.flush()
        self.drawn = text.count("\n") + 1

    def _lines(self, trials) -> None:
        header = self._header()
        for t in trials:
            row = self._row(t)
            key = (t.status, row[4])  # status, step
            if self.shown.get(t.trial_id) == key:
                continue
            self.shown[t.trial_id] = key
            print("  ".join(f"{h}={v}" for h, v in zip(header, row) if v not in ("-", "")), flush=True)

    def on_trial_start(self, iteration, trials, trial, **info):
        self._print(trials)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.last[trial.trial_id] = result
        self._print(trials)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._print(trials, force=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._print(trials, force=True)

    def on_experiment_end(self, trials, **info):  # the trials a time budget stopped have no hook of their own
        self._print(trials, force=True)
