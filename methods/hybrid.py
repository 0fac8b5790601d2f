"""Hybrid BOFT + LoRA-GA with a per-layer gradient-norm gate: the headline method of Qi, Dai & Huang
(2025, "Hybrid and Unitary PEFT for Resource-Efficient LLMs", arXiv 2507.18076).

OUR RECONSTRUCTION. Only the paper's abstract is available ("per-layer adaptive updates guided by
gradient norms"); the gate below is our formulation, and every part of it is configurable.

Each target layer carries a BOFT branch (rotation R, output scale s) and a LoRA-GA branch (A, B
from the gradient's SVD, frozen copies A0, B0), mixed by a per-layer gate lambda in [0, 1] (the
BOFT share), a buffer updated from gradient norms, never by the optimizer:

    x_mix = lambda (x R) + (1 - lambda) x                    one rotation, applied to activations
    y     = s_l ⊙ (W0 x_mix) + (1 - lambda)(alpha/r)(B A - B0 A0) x + b
    s_l   = 1 + lambda (s - 1)                                the scale belongs to the BOFT branch

so there is a single product with W0 per layer; at init (R = I, s = 1, B A = B0 A0) y = W0 x + b;
lambda = 1 gives exactly BOFT and lambda = 0 exactly LoRA-GA (W0 - (alpha/r) B0 A0 + (alpha/r) B A).

Gate, every K steps after backward (gradients already reduced across data-parallel ranks, so every
rank computes the same gate and replicas never diverge):

    g_GA = sqrt(|dA|^2 + |dB|^2),  g_BO = |dR|          (each / sqrt(#params) if `normalize`)
    target = sigmoid(sign * (log g_BO - log g_GA) / tau)   sign = +1 "larger": favour the branch
                                                          with the larger gradient; -1 "smaller"
    lambda = clamp(beta lambda + (1 - beta) target, lambda_min, lambda_max)
    optional schedule a(t) decaying the LoRA-GA share: lambda_eff = 1 - (1 - lambda) a(t)

Shapes: d_in = D * b, r = LoRA rank, N... = leading token dims.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import nn

from .boft import BoftConfig, BoftLinear
from .config import ConfigError, MethodConfig, check, check_choice, from_dict
from .lora_ga import LoraGaConfig, gradient_init

GateDirection = Literal["larger", "smaller"]
Schedule = Literal["constant", "linear", "cosine"]
GradOf = Callable[[torch.Tensor], "torch.Tensor | None"]


@dataclasses.dataclass(frozen=True)
class GateConfig:
    """The per-layer gate lambda (BOFT share). Our reconstruction; see the module docstring.

    Args:
        init: lambda before the first update.
        fixed: pin lambda to this value (no updates): 1 = BOFT only, 0 = LoRA-GA only; ablations.
        tau: temperature of the sigmoid on the log-ratio of gradient norms.
        update_every: K, steps between gate updates (the norms are read from existing gradients:
            no extra forward or backward pass).
        ema: beta, EMA smoothing of lambda across updates.
        lambda_min, lambda_max: bounds that keep both branches alive.
        direction: "larger" favours the branch whose gradient norm is larger (it has more to
            learn); "smaller" favours the calmer branch (stability).
        normalize: divide each norm by sqrt(parameter count), so the branches' sizes don't decide.
        schedule: time schedule a(t) that decays the LoRA-GA share: constant (off), linear, cosine.
        schedule_steps: steps over which a(t) goes from 1 to 0.
    """

    init: float = dataclasses.field(default=0.5, metadata={"help": "lambda before the first update"})
    fixed: float | None = dataclasses.field(default=None, metadata={"help": "pin lambda (1 = BOFT, 0 = LoRA-GA)"})
    tau: float = dataclasses.field(default=1.0, metadata={"help": "tau: sigmoid temperature on the log norm ratio"})
    update_every: int = dataclasses.field(default=10, metadata={"help": "K: steps between gate updates"})
    ema: float = dataclasses.field(default=0.9, metadata={"help": "beta: EMA smoothing of lambda"})
    lambda_min: float = dataclasses.field(default=0.05, metadata={"help": "lower bound of lambda"})
    lambda_max: float = dataclasses.field(default=0.95, metadata={"help": "upper bound of lambda"})
    direction: GateDirection = dataclasses.field(default="larger", metadata={"help": "favour the larger | smaller gradient"})
    normalize: bool = dataclasses.field(default=True, metadata={"help": "divide norms by sqrt(#params)"})
    schedule: Schedule = dataclasses.field(default="constant", metadata={"help": "LoRA-GA share decay: constant | linear | cosine"})
    schedule_steps: int = dataclasses.field(default=1000, metadata={"help": "steps for the schedule to reach 0"})

    def __post_init__(self):
        check(0.0 <= self.init <= 1.0, "init", self.init, "must be in [0, 1]")
        if self.fixed is not None:
            check(0.0 <= self.fixed <= 1.0, "fixed", self.fixed, "must be in [0, 1]")
        check(self.tau > 0, "tau", self.tau, "must be > 0")
        check(isinstance(self.update_every, int) and self.update_every >= 1, "update_every", self.update_every, "must be an integer >= 1")
        check(0.0 <= self.ema < 1.0, "ema", self.ema, "must be in [0, 1)")
        check(0.0 <= self.lambda_min <= self.lambda_max <= 1.0, "lambda_min", self.lambda_min,
              f"need 0 <= lambda_min <= lambda_max ({self.lambda_max}) <= 1")
        check_choice("direction", self.direction, GateDirection)
        check_choice("schedule", self.schedule, Schedule)
        check(isinstance(self.schedule_steps, int) and self.schedule_steps >= 1, "schedule_steps", self.schedule_steps, "must be >= 1")

    def decay(self, step: int) -> float:
        """a(t): the factor on the LoRA-GA share."""
        t = min(step / self.schedule_steps, 1.0)
        return {"constant": 1.0, "linear": 1.0 - t, "cosine": 0.5 * (1 + math.cos(math.pi * t))}[self.schedule]


@dataclasses.dataclass(frozen=True)
class HybridConfig(MethodConfig):
    """Hybrid BOFT + LoRA-GA. Branch settings nest under `boft` and `lora_ga`; targets are set here."""

    method = "hybrid"
    boft: BoftConfig = dataclasses.field(default_factory=BoftConfig, metadata={"help": "BOFT branch"})
    lora_ga: LoraGaConfig = dataclasses.field(default_factory=LoraGaConfig, metadata={"help": "LoRA-GA branch"})
    gate: GateConfig = dataclasses.field(default_factory=GateConfig, metadata={"help": "the per-layer gate"})
    target_modules: Sequence[str] | str | None = dataclasses.field(
        default=None, metadata={"help": "module-name suffixes or one regex; None = architecture default"}
    )

    def __post_init__(self):
        for name, cls in (("boft", BoftConfig), ("lora_ga", LoraGaConfig), ("gate", GateConfig)):
            if isinstance(getattr(self, name), dict):
                object.__setattr__(self, name, from_dict(cls, getattr(self, name), name))
        if self.boft.target_modules is not None or self.lora_ga.lora.target_modules is not None:
            raise ConfigError("target_modules: set it on the hybrid, not inside boft or lora_ga.lora")
        if isinstance(self.target_modules, list):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))

    @property
    def gradient_batches(self) -> int:
        return self.lora_ga.batches


class HybridLinear(BoftLinear):
    """BOFT's rotation machinery plus a LoRA-GA branch and the gate."""

    adapter_param_names = ("boft_R", "boft_s", "lora_A", "lora_B")
    adapter_buffer_names = ("lora_A0", "lora_B0", "hybrid_gate", "hybrid_gate_ema")
    needs_gradients = True

    def __init__(self, base_layer: nn.Module, cfg: HybridConfig, name: str = ""):
        super().__init__(base_layer, cfg.boft, name)
        self.hybrid_cfg = cfg
        r = cfg.lora_ga.lora.r
        if 2 * r > min(self.d_in, self.d_out):
            raise ValueError(f"{name}: lora_ga needs 2r={2 * r} <= min(in_features={self.d_in}, out_features={self.d_out})")
        w = self.base.weight()
        self.scaling = cfg.lora_ga.lora.scaling
        self.lora_A = nn.Parameter(torch.zeros(r, self.d_in, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(self.d_out, r, dtype=w.dtype, device=w.device))
        self.register_buffer("lora_A0", torch.zeros_like(self.lora_A))
        self.register_buffer("lora_B0", torch.zeros_like(self.lora_B))
        gate = cfg.gate.fixed if cfg.gate.fixed is not None else cfg.gate.init
        self.register_buffer("hybrid_gate", torch.tensor(float(gate)))  # lambda used by the forward
        self.register_buffer("hybrid_gate_ema", torch.tensor(float(gate)))  # EMA state, before the schedule
        self.gate_history: list[tuple[int, float]] = []  # (step, lambda) after each update

    @torch.no_grad()
    def init_from_gradient(self, grad: torch.Tensor) -> None:
        A, B = gradient_init(grad, self.hybrid_cfg.lora_ga, self.layer_name)
        for dst, src in ((self.lora_A0, A), (self.lora_B0, B), (self.lora_A, A), (self.lora_B, B)):
            dst.copy_(src.to(dst.dtype))

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        lam = self.hybrid_gate.to(x.dtype)
        x_mix = torch.lerp(x, self.rotate(x), lam)  # (1 - lam) x + lam x R
        s = 1 + lam * (self.boft_s.to(x.dtype) - 1)
        # (B A - B0 A0) x as one rank-2r product pair: [B, -B0] [A; A0] x
        A2 = torch.cat([self.lora_A, self.lora_A0]).to(x.dtype)  # (2r, d_in)
        B2 = torch.cat([self.lora_B, -self.lora_B0], dim=1).to(x.dtype)  # (d_out, 2r)
        lowrank = (x @ A2.t()) @ B2.t()
        return self.base.add_bias(self.base.matmul(x_mix) * s + ((1 - lam) * self.scaling) * lowrank)

    def _lowrank_delta(self) -> torch.Tensor:
        lam = float(self.hybrid_gate)
        return (1 - lam) * self.scaling * (self.lora_B.float() @ self.lora_A.float() - self.lora_B0.float() @ self.lora_A0.float())

    def _mix_and_scale(self) -> tuple[torch.Tensor, torch.Tensor]:
        lam = float(self.hybrid_gate)
        M = lam * self.dense_rotation() + (1 - lam) * torch.eye(self.d_in, device=self.boft_R.device)
        return M, 1 + lam * (self.boft_s.float() - 1)

    def merged_weight(self) -> torch.Tensor:
        M, s = self._mix_and_scale()  # y = s ⊙ (x M W0^T) + lowrank  ->  W = s ⊙ W0 M^T + delta
        return s[:, None] * (self.base.weight().float() @ M.t()) + self._lowrank_delta()

    def unmerged_weight(self, merged: torch.Tensor) -> torch.Tensor:
        M, s = self._mix_and_scale()
        scaled = (merged - self._lowrank_delta()) / s[:, None]
        return torch.linalg.solve(M, scaled.t()).t()

    @torch.no_grad()
    def after_backward(self, step: int, grad_of: GradOf | None = None) -> None:
        """Update lambda from this step's (already reduced) gradients, every K steps."""
        g = self.hybrid_cfg.gate
        if g.fixed is not None or step % g.update_every:
            return
        grad_of = grad_of or (lambda p: p.grad)
        grads = [grad_of(p) for p in (self.lora_A, self.lora_B, self.boft_R)]
        if any(t is None for t in grads):
            return  # e.g. a step skipped by the loss scaler
        gA, gB, gR = (t.float() for t in grads)
        g_ga = torch.sqrt(gA.square().sum() + gB.square().sum())
        g_bo = gR.norm()
        if g.normalize:
            g_ga = g_ga / math.sqrt(gA.numel() + gB.numel())
            g_bo = g_bo / math.sqrt(gR.numel())
        eps = torch.finfo(torch.float32).tiny
        sign = 1.0 if g.direction == "larger" else -1.0
        target = torch.sigmoid(sign * (torch.log(g_bo + eps) - torch.log(g_ga + eps)) / g.tau)
        if not torch.isfinite(target):
            return  # a non-finite gradient must not poison the gate; the trainer reports divergence
        lam = g.ema * float(self.hybrid_gate_ema) + (1 - g.ema) * float(target)
        lam = min(max(lam, g.lambda_min), g.lambda_max)
        self.hybrid_gate_ema.fill_(lam)
        a = g.decay(step)
        effective = lam if a == 1.0 else 1 - (1 - lam) * a
        self.hybrid_gate.fill_(effective)
        self.gate_history.append((step, float(self.hybrid_gate)))  # the value the forward uses

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.lora_A.shape[0]}, gate={float(self.hybrid_gate):.3f}"


def gate_values(model: nn.Module) -> dict[str, float]:
    """Current lambda of every hybrid layer, by layer name."""
    return {name: float(m.hybrid_gate) for name, m in model.named_modules() if isinstance(m, HybridLinear)}


def gate_history(model: nn.Module) -> dict[str, list[tuple[int, float]]]:
    """(step, lambda) after every update, per layer: the layer x step heatmap's data."""
    return {name: list(m.gate_history) for name, m in model.named_modules() if isinstance(m, HybridLinear)}
