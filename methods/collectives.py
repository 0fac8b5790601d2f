"""Every torch.distributed collective of the project goes through here (a test enforces it).

Why one place: NCCL (Ray Train's backend on GPUs) only moves CUDA tensors, gloo (CPU) only CPU
ones. A helper that builds its tensors on the process group's device works on both; a bare
`torch.distributed.all_reduce(torch.tensor(...))` raises at the first step of a GPU trial.

    device()                      the device collectives of the default group need
    all_reduce(tensor, op)        in place, moved to that device and back
    all_reduce_values([...], op)  a few Python numbers (loss sums, peaks), float64
    all_gather_object / broadcast_object / barrier

Without an initialised process group every function is the single-process identity, so the
methods run unchanged in a plain script.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

_OPS = {"sum": "SUM", "max": "MAX", "min": "MIN"}


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if initialized() else 1


def rank() -> int:
    return dist.get_rank() if initialized() else 0


def device_for_backend(backend: str) -> torch.device:
    """NCCL (and other GPU backends) need the current CUDA device; gloo and mpi take CPU tensors."""
    if backend.lower() in ("nccl", "xccl", "hccl"):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def device() -> torch.device:
    """Where the default group's collectives must put their tensors."""
    if not initialized():
        return torch.device("cpu")
    return device_for_backend(str(dist.get_backend()))


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Reduce `tensor` across ranks in place (also returned); it may live on any device."""
    if not initialized():
        return tensor
    target = device()
    moved = tensor if tensor.device == target else tensor.to(target)
    dist.all_reduce(moved, op=getattr(dist.ReduceOp, _OPS[op]))
    if moved is not tensor:
        tensor.copy_(moved)
    return tensor


def all_reduce_values(values: list[float], op: str = "sum") -> list[float]:
    """A few numbers reduced across ranks, in float64 (sums of many losses stay exact)."""
    return all_reduce(torch.tensor(values, dtype=torch.float64), op).tolist()


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's picklable `obj`, in rank order, on every rank."""
    if not initialized():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)  # NCCL: pickles travel on the current CUDA device (set by Ray Train)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """`obj` of rank `src` on every rank."""
    if not initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if initialized():
        dist.barrier()
