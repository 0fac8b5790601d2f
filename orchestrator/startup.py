"""What a fresh process pays before its first step: importing torch's, transformers' and Ray's
modules and loading a model, once per worker of every trial and once per driver.

    with paused_gc():    imports and loads, without Python's cyclic garbage collector

CPython's cyclic collector runs whenever enough container objects were allocated since its last
pass, and every few passes it walks every object the process holds. While big packages import,
the heap grows by hundreds of thousands of objects that all stay alive: the collector walks it
again and again and finds nothing to free (measured in BENCHMARKS.md, "Sweep overhead").
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """No cyclic collection inside; at the end every object the process then holds is frozen
    (`gc.freeze`: never walked by a later pass), so the imports are not walked again. For the
    setup of a process that keeps what it loaded (a trial's worker, the sweep driver): frozen
    objects are still freed by reference counting, but a cycle among them is never collected.
    Garbage made since an earlier pause is collected first (a pass over the unfrozen objects only),
    not frozen. A block that raises freezes nothing: its traceback's frames are not kept."""
    enabled = gc.isenabled()
    if gc.get_freeze_count():
        gc.collect()
    gc.disable()
    try:
        yield
        gc.freeze()
    finally:
        if enabled:
            gc.enable()
