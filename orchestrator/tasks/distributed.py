"""Evaluation across data-parallel ranks: split the batches, gather the results, score once.

Every rank holds the same model and the same eval batches. `sharded_map` gives each rank every
world-th batch and gathers the results in order on every rank, so an evaluation with N ranks
costs about 1/N of one rank's (and its time counts in time-to-quality). Every rank makes the same
number of calls (a rank short of batches repeats one and drops the result): under ZeRO-3 each
forward is a collective, and a rank that stopped early would leave the others waiting.
`on_rank_zero` runs scoring that must happen once (a sandbox, a judge) on rank 0 and broadcasts
the result or the error. Without torch.distributed both are plain calls.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from methods import collectives


def _world() -> int:
    return collectives.world_size()


def sharded_map(batches: list[dict[str, Any]], fn: Callable[[dict[str, Any]], Any]) -> list[Any]:
    """[fn(b) for b in batches], the batches split round-robin across data-parallel ranks and the
    results gathered in order on every rank. Every rank calls fn the same number of times."""
    if _world() == 1:
        return [fn(b) for b in batches]
    rank, world = collectives.rank(), collectives.world_size()
    mine = list(range(rank, len(batches), world))
    calls = -(-len(batches) // world)  # ceil: the busiest rank's share
    results = {i: fn(batches[i]) for i in mine}
    for _ in range(calls - len(mine)):  # keep step with the others' collectives; result dropped
        fn(batches[0])
    gathered = collectives.all_gather_object(results)
    merged = {i: r for part in gathered for i, r in part.items()}
    return [merged[i] for i in range(len(batches))]


def on_rank_zero(compute: Callable[[], dict[str, float]]) -> dict[str, float]:
    """`compute()` on rank 0, its result (or its error) broadcast to every rank."""
    if _world() == 1:
        return compute()
    outcome: tuple[str, Any] | None = None
    if collectives.rank() == 0:
        try:
            outcome = ("ok", compute())
        except Exception as e:  # noqa: BLE001 - every rank must leave the broadcast, then all raise together
            outcome = ("error", f"{type(e).__name__}: {e}")
    status, value = collectives.broadcast_object(outcome, src=0)
    if status == "error":
        raise RuntimeError(f"scoring on rank 0 failed: {value}")
    return value
