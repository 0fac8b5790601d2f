"""Placement groups that stopped trials leave behind, removed while the sweep runs.

    reap()                                    # remove them now; returns how many
    tune.RunConfig(callbacks=[Reaper()])      # every few seconds while a sweep runs
    settle()                                  # at its end, once its last trials' controllers died

Tune stops a trial (ASHA, a time budget, Ctrl-C, or its final report: `done`) by killing its
trial actor; Ray kills the trial's Train controller with it. A placement group that a non-detached
actor creates lives until that actor *and its job* are dead (Ray's rule), and the job is the sweep
driver. Ray Train's PlacementGroupCleaner (a detached actor per run, which the trials' trainer
leaves out: `trial._trainer_class`) removes the worker group's placement group when its controller
dies. But a controller killed while its control loop runs goes on for a moment: it sees its
workers die (they die with it), takes that for a worker failure, and starts a new worker group (a
new placement group) that no cleaner ever hears of; its process goes on ~100 ms after Ray counts
it dead. Seen with the one-worker trials of a smoke sweep and of an ASHA sweep: a group's
0.49 CPU stayed reserved for the rest of the session, and the next 2 x 0.9-CPU trial on 2 CPUs
waited for its workers until Ray Train gave up. On a GPU cluster it would be GPUs.

Such a group can never be used: its creator is dead, and what the creator started died with it.
So every placement group of this job (the sweep driver's) that is not detached, whose creator was an
actor and that actor is dead, is removed: what the cleaner would remove and the group it never
hears of. Ray's public state API does not say who created a group
(`ray.util.state.list_placement_groups` gives the job only), so this reads the GCS tables that
Ray's own `ray.util.placement_group_table` and `ray.util.state` read. In a process where it cannot
(a Ray without them, a Ray Client) `available()` says so, `reap` finds nothing, and a trial's
trainer built there keeps Ray's cleaner (`trial._trainer_class`). (Under Ray Client, Tune runs its
loop, this callback included, inside the cluster.)
"""

from __future__ import annotations

import logging
import time

from ray.tune import Callback

logger = logging.getLogger(__name__)

INTERVAL_S = 2.0  # how often a sweep looks; one GCS call, a few ms
SETTLE_S = 10.0  # at the sweep's end, how long its last trials' controllers get to die
GRACE_S = 1.0  # and how long their processes may take to end after that


FIELDS = ("placement_group_id", "state", "is_detached", "creator_job_id", "creator_actor_id", "creator_actor_dead")


def available() -> bool:
    """Whether `reap` can work here: this Ray has the GCS accessors and the placement-group fields it
    reads, and this process is not a Ray Client (whose process has no GCS connection of its own).
    Needs no connection (it decides which trainer a trial gets, maybe before Ray starts)."""
    try:
        from ray._private.state import state
        from ray.core.generated import gcs_pb2
        from ray.util.client import ray as client
    except ImportError:
        return False
    fields = gcs_pb2.PlacementGroupTableData.DESCRIPTOR.fields_by_name
    return (all(f in fields for f in FIELDS) and hasattr(state, "_connect_and_get_accessor")
            and hasattr(state, "actor_table") and not client.is_connected())


_warned = False


def _groups() -> tuple[list, list]:
    """This job's placement groups, not removed and not detached, that an actor created: (those
    whose creator is dead, those whose creator is alive). The driver's own (e.g. Tune's for its
    trials) are in neither. The creator's state comes from the actor table: the group's own
    `creator_actor_dead` is set only for the groups that existed when the creator died, not for
    one it created while dying. ([], []) when Ray cannot say (going down with the sweep)."""
    import ray
    from ray.util.placement_group import PlacementGroup

    if not available():
        return [], []
    from ray._private.state import state
    from ray.core.generated import gcs_pb2

    orphans, held, creators = [], [], {}
    try:
        job = ray.get_runtime_context().get_job_id()
        for raw in state._connect_and_get_accessor().get_placement_group_table():
            pg = gcs_pb2.PlacementGroupTableData.FromString(raw)
            if (pg.state == gcs_pb2.PlacementGroupTableData.REMOVED or pg.is_detached
                    or ray.JobID(pg.creator_job_id).hex() != job or not pg.creator_actor_id
                    or ray.ActorID(pg.creator_actor_id).is_nil()):
                continue
            creator = pg.creator_actor_id.hex()
            if creator not in creators:
                # an actor the table no longer holds died long ago
                creators[creator] = pg.creator_actor_dead or state.actor_table(creator).get("State", "DEAD") == "DEAD"
            (orphans if creators[creator] else held).append(PlacementGroup(ray.PlacementGroupID(pg.placement_group_id)))
    except Exception as e:  # noqa: BLE001 - Ray going down with the sweep: nothing left to free
        global _warned
        if ray.is_initialized() and not _warned:  # up, yet unreadable: say so once, don't fail the sweep
            _warned = True
            logger.warning("cannot read Ray's placement-group table (%s: %s): placement groups that dead "
                           "trials leave are not removed", type(e).__name__, e)
        return [], []
    return orphans, held


def _remove(groups: list) -> int:
    from ray.util import remove_placement_group

    n = 0
    for pg in groups:
        try:
            remove_placement_group(pg)
            n += 1
            logger.info("removed placement group %s: its creator actor is dead", pg.id.hex())
        except Exception:  # noqa: BLE001 - removed meanwhile (Ray Train's cleaner): nothing to do
            pass
    return n


def reap() -> int:
    """Remove the orphans (creator dead) now; returns how many were removed."""
    return _remove(_groups()[0])


def settle(timeout_s: float = SETTLE_S) -> int:
    """Reap until no placement group of a live actor of this job is left (the stopped trials'
    controllers have died) or `timeout_s` passed, and once more a moment later: a controller's
    process goes on ~100 ms after Ray counts it dead, and that is when it creates the group no
    cleaner hears of. Returns how many were removed."""
    started, n = time.monotonic(), 0
    while True:
        orphans, held = _groups()
        n += _remove(orphans)
        if not held or time.monotonic() >= started + timeout_s:
            break
        time.sleep(0.2)
    waited = time.monotonic() - started
    time.sleep(GRACE_S)
    n += reap()
    logger.info("settled: %d placement group(s) removed; %.1f s waiting for live creators", n, waited)
    return n


class Reaper(Callback):
    """A Tune callback that reaps every `interval_s` while the sweep runs (Tune's loop steps
    several times a second)."""

    def __init__(self, interval_s: float = INTERVAL_S):
        self.interval_s, self.last = interval_s, 0.0

    def setup(self, **info) -> None:  # each driver run (a --resume restores this from Tune's state)
        self.last = 0.0

    def on_step_end(self, iteration, trials, **info) -> None:
        if time.monotonic() - self.last >= self.interval_s:
            self.last = time.monotonic()
            reap()
