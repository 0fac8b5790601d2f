import gc
import weakref

import pytest

from orchestrator import startup


@pytest.fixture
def gc_passes():
    """The generation of every pass the cyclic GC starts while the test runs (gc.callbacks sees each)."""
    seen: list[int] = []

    def count(phase, info):
        if phase == "start":
            seen.append(info["generation"])

    gc.collect()
    gc.callbacks.append(count)
    yield seen
    gc.callbacks.remove(count)
    gc.enable()  # whatever the test did: the rest of the suite runs with the collector on


class Node:
    pass


def test_paused_gc_collects_nothing_inside_then_freezes_what_was_made_and_resumes(gc_passes):
    frozen = gc.get_freeze_count()
    with startup.paused_gc():
        assert not gc.isenabled()
        entered = list(gc_passes)  # [2] when something was frozen before: what was made since is collected
        made = [[i] for i in range(50_000)]  # 70x the collector's first threshold (700 allocations)
        assert gc_passes == entered  # not one pass while paused
    assert gc.isenabled()
    # never walked again by a later pass (less a little slack: frozen objects elsewhere may die meanwhile)
    assert gc.get_freeze_count() >= frozen + 0.99 * len(made)
    more = [[i] for i in range(50_000)]  # the collector runs again as usual
    assert gc_passes and len(more) == 50_000


def test_garbage_made_since_an_earlier_pause_is_collected_not_frozen(gc_passes):
    with startup.paused_gc():
        pass  # something is frozen now, as after a worker's first pause
    gc.disable()  # nothing but paused_gc may collect below
    try:
        cycle = Node()
        cycle.self = cycle
        ref = weakref.ref(cycle)
        del cycle
        assert ref() is not None  # garbage only the cyclic collector frees
        with startup.paused_gc():
            pass
        assert ref() is None  # collected as the pause began, not frozen with the rest
    finally:
        gc.enable()


def test_paused_gc_leaves_a_disabled_collector_disabled_and_freezes_nothing_after_an_error(gc_passes):
    gc.disable()
    try:
        with startup.paused_gc():
            pass
        assert not gc.isenabled()  # the caller's choice stands
    finally:
        gc.enable()
    frozen = gc.get_freeze_count()
    with pytest.raises(RuntimeError), startup.paused_gc():
        made = [[i] for i in range(1000)]
        raise RuntimeError(f"setup failed after {len(made)}")
    assert gc.isenabled()
    # the failed setup's frames and traceback stay collectable: nothing was frozen (the count can
    # only drop meanwhile: frozen objects still die by reference counting, e.g. in Ray's threads)
    assert gc.get_freeze_count() <= frozen
