"""What a fresh process pays before its first step: importing torch's, transformers' and Ray's
modules and loading a model, once per worker of every trial and once per driver.

    with paused_gc():    imports and long-lived setup, without Python's cyclic garbage collector

CPython's cyclic collector runs whenever enough container objects were allocated since its last
pass, and every few passes it walks every object the process holds. While a big package imports,
the heap grows by hundreds of thousands of objects that all stay alive: the collector runs again
and again and finds nothing to free; late in the imports one full pass walks ~0.9 M objects (0.7 s
on 2 cores). Measured on 2 cores (Python 3.11): a fresh process's imports and MiniLM load 8.5-8.9 s
instead of 10.4-12.4 s; the sweep driver's imports 2.9-5.0 s instead of 4.3-6.0 s; a 2-worker
trial's setup 3.5-3.9 s instead of 4.4-5.0 s (4 trials each, alternating). The price: cyclic
garbage made while paused is never freed (frozen): +12 MB of a worker's RSS in those trials.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """No cyclic collection inside; what was created inside is then frozen (`gc.freeze`: never walked
    by a later collection). For imports and what lives as long as the process (a trial's model and
    data in a worker): frozen objects are still freed by reference counting, only a cycle among
    them would outlive its use. Reference counting frees everything else inside as usual."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()
