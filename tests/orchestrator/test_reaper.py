"""orchestrator.reaper on a real local Ray: a placement group whose creator actor died is removed
and its CPUs come back; the driver's own groups and a live actor's are left alone."""

from __future__ import annotations

import time

import pytest

from orchestrator import reaper
from tests.conftest import free_cpus


def _state(ray, pg) -> str:
    return ray.util.placement_group_table(pg)["state"]


def test_a_dead_actors_placement_group_is_removed_and_nothing_else(ray_session):
    ray = ray_session

    @ray.remote(num_cpus=0)
    class Controller:  # as Ray Train's: creates its workers' group, then dies with its trial
        def create(self, cpus: float):
            pg = ray.util.placement_group([{"CPU": cpus}])
            ray.get(pg.ready())
            return pg

    reaper.settle()  # whatever earlier tests left
    total = ray.cluster_resources()["CPU"]
    assert free_cpus(ray) == pytest.approx(total)
    own = ray.util.placement_group([{"CPU": 0.25}])  # the driver's (as Tune's trial groups)
    ray.get(own.ready())
    dying, living = Controller.remote(), Controller.remote()
    orphan, kept = ray.get(dying.create.remote(0.5)), ray.get(living.create.remote(0.5))
    assert free_cpus(ray) == pytest.approx(total - 1.25)
    assert reaper.reap() == 0  # every creator alive: nothing to do

    ray.kill(dying)
    deadline = time.monotonic() + 10
    while _state(ray, orphan) != "REMOVED" and time.monotonic() < deadline:
        reaper.reap()
        time.sleep(0.1)
    assert _state(ray, orphan) == "REMOVED"  # Ray itself keeps it until the job ends
    assert _state(ray, kept) == "CREATED" and _state(ray, own) == "CREATED"
    assert free_cpus(ray, total - 0.75) == pytest.approx(total - 0.75)

    # settle: waits for a creator that is on its way out, then frees what it left
    started = time.monotonic()
    ray.kill(living)
    reaper.settle(timeout_s=10)
    assert time.monotonic() - started < 10
    assert _state(ray, kept) == "REMOVED" and _state(ray, own) == "CREATED"
    ray.util.remove_placement_group(own)
    assert free_cpus(ray) == pytest.approx(total)
