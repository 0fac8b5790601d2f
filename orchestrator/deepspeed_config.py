"""The DeepSpeed config, generated from the trial's few explicit settings in one place, so that
no sweep file ever names DeepSpeed's own keys (and two batch sizes can never drift apart)."""

from __future__ import annotations

import json
from typing import Any

import torch

from methods.config import ConfigError
from orchestrator.config import TrialConfig


def resolve_precision(precision: str) -> str:
    """auto: bf16 where the GPU supports it, else fp32 (CPU training runs in fp32)."""
    if precision != "auto":
        return precision
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in override.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def build_deepspeed_config(cfg: TrialConfig) -> dict[str, Any]:
    ds = cfg.deepspeed
    precision = resolve_precision(ds.precision)
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    config = {
        "train_batch_size": cfg.train.batch_size,
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "gradient_clipping": cfg.train.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "steps_per_print": 10**9,  # our own reports replace DeepSpeed's log lines
        "wall_clock_breakdown": False,
    }
    if ds.config_file:
        with open(ds.config_file) as f:
            config = _merge(config, json.load(f))
        for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
            ours = {"train_batch_size": cfg.train.batch_size, "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
                    "gradient_accumulation_steps": cfg.train.grad_accum}[key]
            if config[key] != ours:
                raise ConfigError(
                    f"deepspeed.config_file={ds.config_file}: {key}={config[key]} disagrees with the trial's "
                    f"{ours} (set batch sizes with train.batch_size / train.grad_accum, not in the JSON)"
                )
    return config
