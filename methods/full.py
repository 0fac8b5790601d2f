"""Full fine-tuning: no adapter, every weight trainable. The baseline the paper's ratios are taken
against (training time ~2.1x and peak memory ~2x of the hybrid's)."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .config import MethodConfig


@dataclasses.dataclass(frozen=True)
class FullConfig(MethodConfig):
    """Full fine-tuning has no method hyperparameters (learning rate and the rest are training settings)."""

    method = "full"


class FullModel:
    """Full fine-tuning's method object (adapter methods have `methods.base.AdapterLayers`): no
    layer is wrapped, every parameter trains, and the whole model is what is saved and loaded."""

    def check(self, model: nn.Module, cfg: FullConfig) -> int:
        return 0  # no target layer

    def attach(self, model: nn.Module, cfg: FullConfig, estimate=None) -> None:
        for p in model.parameters():
            p.requires_grad_(True)

    def trainable(self, model: nn.Module) -> list[nn.Parameter]:
        return list(model.parameters())

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Every parameter once (tied weights under their first name) and the persistent buffers, as
        fresh contiguous tensors: under DeepSpeed the live ones are views into flat buffers."""
        out = {name: p.detach().clone().contiguous() for name, p in model.named_parameters()}
        persistent = {n for n, _ in model.state_dict(keep_vars=True).items()}
        out.update({n: b.detach().clone().contiguous() for n, b in model.named_buffers() if n in persistent})
        return out

    def load_state(self, model: nn.Module, state: dict[str, torch.Tensor], path: str) -> None:
        result = model.load_state_dict(state, strict=False)
        loaded = {id(p) for n, p in model.named_parameters(remove_duplicate=False) if n in state}
        untied_missing = [n for n, p in model.named_parameters(remove_duplicate=False) if id(p) not in loaded]
        if untied_missing or result.unexpected_keys:
            raise ValueError(f"{path}: does not fit this model (missing {untied_missing[:3]}, "
                             f"unexpected {result.unexpected_keys[:3]})")
