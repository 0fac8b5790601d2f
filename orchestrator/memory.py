"""A trial's memory, split into what the method costs and what the process costs.

On CPU a process's RSS is mostly Python, torch, Ray and DeepSpeed (about 1 GB before any tensor),
so it cannot tell a method that needs half the memory of another. What the method decides is its
tensors, and those are counted here, on this rank:

    weights      every parameter this rank holds (under ZeRO-3 its partition, `ds_tensor`)
    gradients    trainable parameters' gradients as ZeRO keeps them (partitioned from stage 2)
    optimizer    the optimizer's state and master weights, read from the optimizer DeepSpeed built
                 (its tensors, so ZeRO-1/2/3 partitioning and CPU offload are what they really are)
    activations  the peak of tensors saved for backward over one training micro-step, measured with
                 saved-tensor hooks (parameters and other views of one storage are counted once)

On GPU torch's allocator counts everything, so `peak_memory_mb` is its peak allocated since the
trial started; the parts are reported there too, for the same breakdown.
"""

from __future__ import annotations

import contextlib
import resource
from typing import Any

import torch

MB = 2**20


def _storage(t: torch.Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


def weights_bytes(model: torch.nn.Module) -> int:
    total = 0
    for p in model.parameters():  # tied weights once (parameters() deduplicates)
        local = getattr(p, "ds_tensor", None)  # ZeRO-3: this rank's partition
        total += (local.numel() * local.element_size()) if local is not None else p.numel() * p.element_size()
    return total


def gradients_bytes(model: torch.nn.Module, zero_stage: int, world: int) -> int:
    """Trainable parameters' gradients held by this rank: whole below ZeRO-2, 1/world from stage 2."""
    total = sum((getattr(p, "ds_numel", None) or p.numel()) * p.element_size()
                for p in model.parameters() if p.requires_grad)
    return total // world if zero_stage >= 2 else total


def _innermost(optimizer: Any) -> torch.optim.Optimizer | None:
    """The torch optimizer under DeepSpeed's wrappers (ZeRO optimizers hold it as `.optimizer`)."""
    seen = 0
    while optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer) and seen < 5:
        optimizer, seen = getattr(optimizer, "optimizer", None), seen + 1
    return optimizer if isinstance(optimizer, torch.optim.Optimizer) else None


def optimizer_bytes(optimizer: Any, model: torch.nn.Module) -> int:
    """State tensors (Adam's moments) plus master weights that are not the model's own tensors."""
    inner = _innermost(optimizer)
    if inner is None:
        return 0
    model_storages = {_storage(p)[0] for p in model.parameters()}
    storages: dict[int, int] = {}
    # ZeRO-3 empties param_groups between steps (it swaps its fp32 partitions in for each step):
    # the state's keys are those partitions, so they are read there too.
    params = [p for group in inner.param_groups for p in group["params"]] + list(inner.state)
    for p in params:
        if not isinstance(p, torch.Tensor):
            continue
        ptr, size = _storage(p)
        if ptr not in model_storages:  # ZeRO's fp32 partitions: a copy of the weights
            storages[ptr] = size
        for v in inner.state.get(p, {}).values():
            if isinstance(v, torch.Tensor) and v.numel() > 1:
                ptr, size = _storage(v)
                storages[ptr] = size
    return sum(storages.values())


@contextlib.contextmanager
def saved_activations(model: torch.nn.Module, out: dict[str, int]):
    """Inside the block, count the bytes of tensors autograd saves for backward (not parameters),
    each storage once; `out["bytes"]` holds the total when the block ends (the peak: backward only
    frees them)."""
    params = {_storage(p)[0] for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr, size = _storage(t)
        if ptr not in params and ptr != 0:
            seen[ptr] = size
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield
    out["bytes"] = sum(seen.values())


def rss_mb() -> float:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / MB


def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def gpu_peaks_mb(device: torch.device) -> tuple[float, float]:
    """(peak allocated, peak reserved) since the last reset."""
    return torch.cuda.max_memory_allocated(device) / MB, torch.cuda.max_memory_reserved(device) / MB
