"""The DeepSpeed config, generated from the trial's few explicit settings in one place, so that
no sweep file ever names DeepSpeed's own keys (and two batch sizes can never drift apart); and
DeepSpeed's import, without what a trial never uses."""

from __future__ import annotations

import functools
import importlib
import json
import sys
from typing import Any

import torch

from methods.config import ConfigError
from orchestrator.config import TrialConfig


def import_deepspeed() -> None:
    """Import DeepSpeed without MLflow, and its Muon kernels without TorchInductor.

    - Its autotuner imports `mlflow` whenever it is installed (2 of DeepSpeed's 2.7 s import on 2
      cores, in every worker of every trial) only to log autotuning runs, which trials never
      start; a trial's tracking is the driver's. MLflow stays importable afterwards.
    - Every ZeRO engine imports DeepSpeed's Muon optimizer module (at its start, and in every ZeRO-1/2
      step), Muon or not, for isinstance checks; that module applies `torch.compile` to three
      kernels as it is imported, and `torch.compile` imports TorchInductor (~1.5-2 s of CPU per
      worker per trial, measured on 2 cores). Here the kernels are compiled on their first call
      instead: the same compiled functions for a Muon user, no Inductor import for anyone else."""
    if "deepspeed" not in sys.modules:
        blocked = "mlflow" not in sys.modules
        if blocked:
            sys.modules["mlflow"] = None  # `import mlflow` raises ImportError: DeepSpeed's has_mlflow = False
        try:
            import deepspeed  # noqa: F401
        finally:
            if blocked:
                del sys.modules["mlflow"]
    _import_muon_compiling_on_first_call()


MUON_KERNELS = "deepspeed.runtime.zero.muon.original_muon"


def _compile_on_first_call():
    """A `torch.compile` decorator that calls `torch.compile` when the function is first called."""
    def decorate(fn):
        compiled = None

        @functools.wraps(fn)
        def call(*args, **kwargs):
            nonlocal compiled
            if compiled is None:
                compiled = torch.compile(fn)
            return compiled(*args, **kwargs)
        return call
    return decorate


def _import_muon_compiling_on_first_call() -> None:
    if MUON_KERNELS in sys.modules:
        return
    from deepspeed.runtime import compiler

    at_import, compiler.compile = compiler.compile, _compile_on_first_call
    try:
        importlib.import_module(MUON_KERNELS)
    except ImportError:  # a DeepSpeed without Muon (or with it elsewhere): nothing to defer
        pass
    finally:
        compiler.compile = at_import


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


def _user_json(cfg: TrialConfig) -> dict[str, Any]:
    if not cfg.deepspeed.config_file:
        return {}
    with open(cfg.deepspeed.config_file) as f:
        return json.load(f)


def generated_optimizer(cfg: TrialConfig, user: dict[str, Any] | None = None) -> bool:
    """True when the `optimizer` block is ours: under offload DeepSpeed must build its own CPU Adam
    (it rejects a torch optimizer there), so the trial's AdamW settings go into the config.
    `user`: the user's JSON when the caller has read it already."""
    ds = cfg.deepspeed
    return (ds.offload_optimizer or ds.offload_param) and "optimizer" not in (_user_json(cfg) if user is None else user)


def build_deepspeed_config(cfg: TrialConfig) -> dict[str, Any]:
    ds = cfg.deepspeed
    user = _user_json(cfg)
    precision = resolve_precision(ds.precision)
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    pin = torch.cuda.is_available()  # pinned host memory only helps (and only exists) with a GPU
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    if ds.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
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
    if generated_optimizer(cfg, user):
        # DeepSpeed's CPU Adam in AdamW mode, with torch.optim.AdamW's defaults for the rest.
        config["optimizer"] = {"type": "AdamW", "params": {"lr": cfg.train.lr, "weight_decay": cfg.train.weight_decay,
                                                           "betas": [0.9, 0.999], "eps": 1e-8}}
    if ds.config_file:
        config = _merge(config, user)
        kind = str(user.get("optimizer", {}).get("type", "adamw")).lower()
        forced = config.get("zero_force_ds_cpu_optimizer", True) is False
        if (ds.offload_optimizer or ds.offload_param) and kind not in ("adam", "adamw") and not forced:
            raise ConfigError(
                f"deepspeed.config_file={ds.config_file}: optimizer type {user['optimizer']['type']!r} cannot run with "
                "offload_optimizer / offload_param (DeepSpeed offloads Adam and AdamW only; set "
                "zero_force_ds_cpu_optimizer: false in the JSON to force another optimizer)")
        for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
            ours = {"train_batch_size": cfg.train.batch_size, "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
                    "gradient_accumulation_steps": cfg.train.grad_accum}[key]
            if config[key] != ours:
                raise ConfigError(
                    f"deepspeed.config_file={ds.config_file}: {key}={config[key]} disagrees with the trial's "
                    f"{ours} (set batch sizes with train.batch_size / train.grad_accum, not in the JSON)"
                )
    return config
