"""Every collective goes through methods.collectives, which puts tensors where the backend wants them."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from methods import collectives

ROOT = Path(__file__).resolve().parents[2]
# A call of a torch.distributed collective, however the module is named (torch.distributed, dist).
COLLECTIVE = re.compile(r"\b(?:torch\.distributed|dist)\.(all_reduce|all_gather\w*|broadcast\w*|reduce\w*|gather\w*|"
                        r"scatter\w*|barrier|send|recv|isend|irecv|all_to_all\w*)\s*\(")


def test_no_collective_outside_the_helper():
    offenders = []
    for folder in ("methods", "orchestrator", "benchmarks"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.name == "collectives.py" and path.parent.name == "methods":
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if COLLECTIVE.search(line):
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == [], "collectives outside methods/collectives.py:\n" + "\n".join(offenders)


def test_the_pattern_catches_direct_calls():
    # The check above is only as good as its pattern: it must see the calls it forbids.
    for line in ("torch.distributed.all_reduce(t)", "dist.all_gather_object(out, x)", "dist.barrier()",
                 "torch.distributed.broadcast_object_list(box, src=0)", "dist.reduce_scatter(o, i)"):
        assert COLLECTIVE.search(line), line
    assert not COLLECTIVE.search("dist.init_process_group('gloo')") and not COLLECTIVE.search("dist.get_rank()")


def test_device_follows_the_backend():
    assert collectives.device_for_backend("gloo") == torch.device("cpu")
    assert collectives.device_for_backend("mpi") == torch.device("cpu")
    if torch.cuda.is_available():
        assert collectives.device_for_backend("nccl") == torch.device("cuda", torch.cuda.current_device())
    else:  # NCCL asks for the current CUDA device, which a CPU-only build cannot give
        import pytest

        with pytest.raises((RuntimeError, AssertionError)):
            collectives.device_for_backend("nccl")


def test_without_a_process_group_every_call_is_the_identity():
    t = torch.tensor([1.0, 2.0])
    assert collectives.all_reduce(t) is t and t.tolist() == [1.0, 2.0]
    assert collectives.all_reduce_values([3.0], op="max") == [3.0]
    assert collectives.all_gather_object({"a": 1}) == [{"a": 1}] and collectives.broadcast_object(5) == 5
    assert (collectives.world_size(), collectives.rank(), collectives.device()) == (1, 0, torch.device("cpu"))


def _reduce_on_ranks(rank: int, world: int) -> None:
    # A tensor on the wrong device for the group is moved there and back (here: gloo, CPU).
    t = torch.full((2,), float(rank + 1))
    collectives.all_reduce(t)
    assert t.tolist() == [3.0, 3.0]
    assert collectives.all_reduce_values([rank], op="max") == [1.0]
    assert collectives.all_reduce_values([rank], op="min") == [0.0]
    assert collectives.all_gather_object(rank * 10) == [0, 10]
    assert collectives.broadcast_object("from zero" if rank == 0 else None) == "from zero"
    assert collectives.device() == torch.device("cpu")


def test_collectives_across_two_gloo_ranks():
    from tests.conftest import run_ranks

    run_ranks(_reduce_on_ranks)
