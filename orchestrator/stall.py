"""A trial that stops making progress fails with the reason `stalled`, instead of hanging its sweep.

Every worker runs a `Watchdog` thread; the loop calls `beat()` after setup, every optimizer step,
around evaluations and after every report. When no beat came for `train.stall_timeout_s`, the
watchdog writes the reason to the trial's folder (`stalled.json`, in the sweep's storage: a
local folder or an s3:// / gs:// URI, through pyarrow as Ray's own storage) and ends its process: the rank
waiting forever in a collective on a frozen peer, in a lock, in a dead data loader, is released,
Ray Train sees a failed worker (and restarts the group from the last checkpoint while
`train.max_failures` allows), and the driver turns a failed run with that file into
`TrialStalled`, which the sweep records as stop reason `stalled` (the other trials go on).

A thread cannot act in a process that is frozen as a whole (SIGSTOP, swapped out): there, the
other ranks' watchdogs fire, since their next collective waits on it.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

from orchestrator import storage

MARKER = "stalled.json"
EXIT_CODE = 86  # the worker process's exit status when its watchdog fired
WRITE_TIMEOUT_S = 30.0  # a storage that does not answer must not keep a stalled worker alive


def marker_path(storage_path: str, name: str) -> str:
    """<storage>/<name>/stalled.json (orchestrator.storage: a local folder or a URI)."""
    return storage.join(storage_path, name, MARKER)


class TrialStalled(RuntimeError):
    """The trial made no progress for its stall timeout (the message says where and how long)."""


class Watchdog:
    def __init__(self, timeout_s: float, marker: str | None, rank: int):
        self.timeout_s, self.marker, self.rank = timeout_s, marker, rank
        self.last, self.doing = time.time(), "setup"
        if timeout_s > 0:
            threading.Thread(target=self._watch, name="stall-watchdog", daemon=True).start()

    def beat(self, doing: str) -> None:
        self.last, self.doing = time.time(), doing

    def _watch(self) -> None:
        while True:
            time.sleep(min(1.0, self.timeout_s / 4))  # fires within a second of the timeout; a wake-up is ~free
            idle = time.time() - self.last
            if idle < self.timeout_s:
                continue
            reason = (f"stalled: rank {self.rank} made no progress for {idle:.0f} s in {self.doing} "
                      f"(train.stall_timeout_s={self.timeout_s:g})")
            print(reason, file=sys.stderr, flush=True)
            if self.marker:  # best effort, bounded: the process ends either way
                record = {"reason": reason, "rank": self.rank, "time": time.time()}
                writer = threading.Thread(target=_write_quietly, args=(self.marker, record), daemon=True)
                writer.start()
                writer.join(WRITE_TIMEOUT_S)
            os._exit(EXIT_CODE)


def _write_quietly(marker: str, record: dict) -> None:
    try:
        storage.write_bytes(marker, json.dumps(record).encode())
    except Exception as e:  # noqa: BLE001 - the reason is on stderr and in the error already
        print(f"stall watchdog: could not write {marker}: {e}", file=sys.stderr, flush=True)


def clear(marker: str | None) -> None:
    """Forget an earlier run's stall (a trial rerun from scratch or resumed by a sweep)."""
    if marker:
        storage.delete(marker)


def reason(marker: str | None) -> str | None:
    if not marker:
        return None
    try:
        return json.loads(storage.read_bytes(marker))["reason"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def fit(trainer, marker: str | None):
    """`trainer.fit()`, with a failure that a watchdog caused raised as TrialStalled."""
    try:
        result = trainer.fit()
    except Exception as e:
        why = reason(marker)
        if why:
            raise TrialStalled(why) from e
        raise
    if getattr(result, "error", None) is not None and reason(marker):
        raise TrialStalled(reason(marker)) from result.error
    return result
