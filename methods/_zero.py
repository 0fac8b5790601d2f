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
