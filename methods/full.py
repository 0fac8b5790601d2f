"""Full fine-tuning: no adapter, every weight trainable. The baseline the paper's ratios are taken
against (training time ~2.1x and peak memory ~2x of the hybrid's)."""

from __future__ import annotations

import dataclasses

from .config import MethodConfig


@dataclasses.dataclass(frozen=True)
class FullConfig(MethodConfig):
    """Full fine-tuning has no method hyperparameters (learning rate and the rest are training settings)."""

    method = "full"
