"""Pinned cores: concurrent workers of different trials never share a core, and say when they must."""

from __future__ import annotations

import multiprocessing as mp
import os

import pytest

from orchestrator import cores

pytestmark = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores")


def _claim(ledger: str, trial: str, n: int, ready, done, out) -> None:
    chosen, exclusive = cores.claim(n, trial, ledger)
    out.put((trial, chosen, sorted(os.sched_getaffinity(0)), exclusive, cores.other_trials(trial, ledger)))
    ready.set()
    done.wait(60)


def test_concurrent_workers_get_disjoint_cores_and_count_each_other(tmp_path):
    ledger = str(tmp_path / "cores.json")
    ctx = mp.get_context("spawn")
    out, done = ctx.Queue(), ctx.Event()
    procs = []
    for trial in ("a", "b"):
        ready = ctx.Event()
        p = ctx.Process(target=_claim, args=(ledger, trial, 1, ready, done, out))
        p.start()
        assert ready.wait(60)
        procs.append(p)
    (ta, a, aff_a, ex_a, others_a), (tb, b, aff_b, ex_b, others_b) = sorted(out.get(timeout=10) for _ in procs)
    assert ex_a and ex_b and set(a).isdisjoint(b)
    assert aff_a == a and aff_b == b  # the process really is pinned to what it claimed
    assert (others_a, others_b) == (0, 1)  # b started while a held its core
    # A third trial finds no free core: it shares, and both the flag and the count say so.
    ready = ctx.Event()
    p = ctx.Process(target=_claim, args=(ledger, "c", 1, ready, done, out))
    p.start()
    assert ready.wait(60)
    _, _, _, exclusive, others = out.get(timeout=10)
    assert not exclusive and others == 2
    done.set()
    for q in (*procs, p):
        q.join(30)
    # Dead processes free their cores: the next claim is exclusive again.
    assert cores.claimed(ledger) == {}
    assert cores.claim(1, "d", ledger)[1]
    cores.release(ledger)
    os.sched_setaffinity(0, range(os.cpu_count()))


def test_concurrency_cap_counts_whole_cores():
    from orchestrator.spec import load_sweep
    from orchestrator.placement import max_concurrent

    root = os.path.join(os.path.dirname(__file__), "..", "..", "search_spaces")
    for name in ("quickstart.yaml", "compare.yaml"):
        spec = load_sweep(os.path.join(root, name))
        assert max_concurrent(spec, {"CPU": 2.0}) == 1, name  # fair timings on 2 cores, out of the box
        assert max_concurrent(spec, {"CPU": 4.0}) == 2, name
