"""LoRA: low-rank adaptation (Hu et al. 2022, https://arxiv.org/abs/2106.09685).

    y = W0 x + b + (alpha / r) * B A dropout(x)          (rsLoRA: alpha / sqrt(r))

    A: (r, d_in), Kaiming-uniform(a=sqrt(5)) as in PEFT;  B: (d_out, r), zeros  -> identity at init.

Shapes: N = tokens (all leading dims flattened by the matmuls), d_in/d_out = layer widths, r = rank.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
from torch import nn

from .base import AdapterLayer
from .config import MethodConfig, check


@dataclasses.dataclass(frozen=True)
class LoraConfig(MethodConfig):
    """LoRA hyperparameters.

    Args:
        r: rank r of the update B A. 4-64 is typical; cost and parameters grow linearly with r.
        alpha: the update is scaled by alpha / r (alpha / sqrt(r) with `use_rslora`). Keeping
            alpha = 2r is a common default.
        dropout: dropout on the adapter's input only (the frozen path sees the clean input).
        use_rslora: rank-stabilised scale alpha / sqrt(r) (Kalajdzievska 2023), better at high r.
        target_modules: module names (suffix match) or one regex (full match); None = the
            architecture's default (attention query/value projections).
    """

    method = "lora"
    r: int = dataclasses.field(default=8, metadata={"help": "rank r of the update B A (symbol r)", "param": "rank"})
    alpha: float = dataclasses.field(default=16.0, metadata={"help": "scale numerator: update scaled by alpha/r"})
    dropout: float = dataclasses.field(default=0.0, metadata={"help": "dropout on the adapter input, in [0, 1)", "param": "lora_dropout"})
    use_rslora: bool = dataclasses.field(default=False, metadata={"help": "scale alpha/sqrt(r) instead of alpha/r"})
    target_modules: Sequence[str] | str | None = dataclasses.field(
        default=None, metadata={"help": "module-name suffixes or one regex; None = architecture default"}
    )

    def __post_init__(self):
        check(isinstance(self.r, int) and self.r >= 1, "r", self.r, "must be an integer >= 1")
        check(isinstance(self.alpha, (int, float)) and self.alpha > 0, "alpha", self.alpha, "must be > 0")
        check(0.0 <= self.dropout < 1.0, "dropout", self.dropout, "must be in [0, 1)")
        if isinstance(self.target_modules, list):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


class LoraLinear(AdapterLayer):
    adapter_param_names = ("lora_A", "lora_B")

    def __init__(self, base_layer: nn.Module, cfg: LoraConfig, name: str = ""):
        super().__init__(base_layer, name)
        if cfg.r > min(self.d_in, self.d_out):
            raise ValueError(
                f"{name}: r={cfg.r} exceeds min(in_features={self.d_in}, out_features={self.d_out})"
            )
        w = self.base.weight()
        self.cfg = cfg
        self.scaling = cfg.scaling
        self.lora_A = nn.Parameter(torch.empty(cfg.r, self.d_in, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(self.d_out, cfg.r, dtype=w.dtype, device=w.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    def lora_delta(self, x: torch.Tensor) -> torch.Tensor:
        # (N, d_in) -> (N, r) -> (N, d_out)
        return (self.dropout(x) @ self.lora_A.t().to(x.dtype)) @ self.lora_B.t().to(x.dtype) * self.scaling

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.lora_delta(x)

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * (self.lora_B.float() @ self.lora_A.float())  # (d_out, d_in)

    def merged_weight(self) -> torch.Tensor:
        return self.base.weight().float() + self.delta_weight()

    def unmerged_weight(self, merged: torch.Tensor) -> torch.Tensor:
        return merged - self.delta_weight()
