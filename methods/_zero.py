"""The one place that knows about DeepSpeed ZeRO-3 (weights partitioned across ranks).

Reading or rewriting a base weight (LoRA-GA's compensation, merging) needs the full tensor. Under
ZeRO-3 it lives in shards, so gather it first; everywhere else this is a no-op and deepspeed is
never imported, so `import methods` works without deepspeed installed.
"""

from __future__ import annotations

import contextlib

import torch


def _is_zero3_partitioned(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id")  # set by deepspeed.zero.Init on partitioned parameters


@contextlib.contextmanager
def gathered(param: torch.Tensor, modify: bool = False):
    """Inside the block `param` holds its full value; with `modify`, rank 0's changes are re-partitioned."""
    if not _is_zero3_partitioned(param):
        yield param
        return
    import deepspeed  # only reached under ZeRO-3

    with deepspeed.zero.GatheredParameters([param], modifier_rank=0 if modify else None):
        yield param


@torch.no_grad()
def assign(param: torch.Tensor, value: torch.Tensor) -> None:
    """param <- value for a trainable parameter. Under ZeRO-3 after `deepspeed.initialize` both
    copies change: the partitioned model tensor (gathered, written on rank 0, re-partitioned) and
    the optimizer's fp32 master partition, which the next step would otherwise write back. Every
    rank must call it (collectives), with the same value."""
    if not _is_zero3_partitioned(param):
        param.copy_(value.to(param.dtype))
        return
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param

    with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
        param.data.copy_(value.to(param.dtype).reshape(param.ds_shape))
    if getattr(param, "_z3_optimizer", None) is not None:
        safe_set_full_fp32_param(param, value.float().reshape(param.ds_shape))
