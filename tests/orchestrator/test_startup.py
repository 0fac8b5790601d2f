import gc

import pytest

from orchestrator import startup


@pytest.fixture
def collections():
    """Every collection the cyclic GC starts while the test runs (gc.callbacks sees each)."""
    seen: list[int] = []

    def count(phase, info):
        if phase == "start":
            seen.append(info["generation"])

    gc.collect()
    gc.callbacks.append(count)
    yield seen
    gc.callbacks.remove(count)


def test_paused_gc_collects_nothing_inside_then_freezes_what_was_made_and_resumes(collections):
    frozen = gc.get_freeze_count()
    with startup.paused_gc():
        assert not gc.isenabled()
        made = [[i] for i in range(50_000)]  # 70x the collector's first threshold (700 allocations)
    assert collections == []  # not one pass while paused
    assert gc.isenabled()
    assert gc.get_freeze_count() >= frozen + len(made)  # never walked again by a later collection
    more = [[i] for i in range(50_000)]  # the collector runs again as usual
    assert collections and len(more) == 50_000


def test_paused_gc_leaves_a_disabled_collector_disabled_and_resumes_after_an_error(collections):
    gc.disable()
    try:
        with startup.paused_gc():
            pass
        assert not gc.isenabled()  # the caller's choice stands
    finally:
        gc.enable()
    with pytest.raises(RuntimeError), startup.paused_gc():
        raise RuntimeError("setup failed")
    assert gc.isenabled()
