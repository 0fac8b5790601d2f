"""CPU cores of a node, handed out to trial workers so that concurrent trials never share one.

Ray counts CPUs but does not pin them: two trials that each "hold" one CPU still run their torch
threads on every core, and their times measure each other. On CPU each worker therefore claims
whole cores in a node-local ledger (a JSON file under a file lock, in the temp folder shared by
the node's processes), pins itself to them (`sched_setaffinity`) and sets torch's threads to match.
The ledger also tells every worker how many other trials are training on its node right now, which
is recorded with its times (`concurrent_trials`).

Entries of dead processes are dropped on every access, so a killed worker never leaks its cores.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import tempfile

LEDGER = os.path.join(tempfile.gettempdir(), "peft-orchestrator-cores.json")


def cores_wanted(cpus_per_worker: float) -> int:
    """Whole cores for a worker that asked Ray for `cpus_per_worker` CPUs (0.49 -> 1)."""
    return max(1, math.ceil(cpus_per_worker - 1e-9))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


@contextlib.contextmanager
def _ledger(path: str):
    with open(path + ".lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            try:
                with open(path) as f:
                    entries = json.load(f)
            except (OSError, ValueError):
                entries = {}
            entries = {pid: e for pid, e in entries.items() if _alive(int(pid))}
            yield entries
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump(entries, f)
            os.replace(tmp, path)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def claim(n: int, trial: str, path: str = LEDGER) -> tuple[list[int], bool]:
    """Claim `n` cores of this process's allowed set for `trial`, pin this process to them.
    Returns (cores, exclusive): exclusive is False when fewer than `n` cores were free, in which
    case the least used cores are shared (and the trial's `concurrent_trials` shows it)."""
    allowed = sorted(os.sched_getaffinity(0))
    with _ledger(path) as entries:
        used: dict[int, int] = {}
        for e in entries.values():
            for c in e["cores"]:
                used[c] = used.get(c, 0) + 1
        free = [c for c in allowed if c not in used]
        exclusive = len(free) >= n
        chosen = free[:n] if exclusive else sorted(allowed, key=lambda c: (used.get(c, 0), c))[:n]
        entries[str(os.getpid())] = {"cores": chosen, "trial": trial}
    os.sched_setaffinity(0, chosen)
    return chosen, exclusive


def claim_none(trial: str, path: str = LEDGER) -> None:
    """Register this process (a GPU worker: no cores pinned) so that other trials count it."""
    with _ledger(path) as entries:
        entries[str(os.getpid())] = {"cores": [], "trial": trial}


def release(path: str = LEDGER) -> None:
    with _ledger(path) as entries:
        entries.pop(str(os.getpid()), None)


def other_trials(trial: str, path: str = LEDGER) -> int:
    """How many other trials hold cores on this node now."""
    with _ledger(path) as entries:
        return len({e["trial"] for e in entries.values() if e["trial"] != trial})


def claimed(path: str = LEDGER) -> dict[int, dict]:
    """pid -> {cores, trial} of every live claim on this node."""
    with _ledger(path) as entries:
        return {int(pid): e for pid, e in entries.items()}
