"""Hybrid BOFT + LoRA-GA with a per-layer gradient-norm gate: the headline method of Qi, Dai & Huang
(2025, "Hybrid and Unitary PEFT for Resource-Efficient LLMs", arXiv 2507.18076).

OUR RECONSTRUCTION. Only the paper's abstract is available ("per-layer adaptive updates guided by
gradient norms"); the gate below is our formulation, and every part of it is configurable.

Each target layer carries a BOFT branch (rotation R, output scale s) and a LoRA-GA branch (A, B
from the gradient's SVD, frozen copies A0, B0), mixed by a per-layer gate lambda in [0, 1] (the
BOFT share), a buffer updated from gradient norms, never by the optimizer:

    x_mix = lambda (x R) + (1 - lambda) x                    one rotation, applied to activations
    y     = s_l ⊙ (W0 x_mix) + (1 - lambda)(alpha/r)(B A - B0 A0) dropout(x) + b
    s_l   = 1 + lambda (s - 1)                                the scale belongs to the BOFT branch

so there is a single product with W0 per layer; at init (R = I, s = 1, B A = B0 A0) y = W0 x + b;
lambda = 1 gives exactly BOFT and lambda = 0 exactly LoRA-GA (W0 - (alpha/r) B0 A0 + (alpha/r) B A;
with dropout, in eval mode and in expectation: LoRA-GA drops the input of B A, we that of the
update B A - B0 A0, which keeps the output equal to the base model's at init in train mode too).

Gate, every K steps after backward (gradients already reduced across data-parallel ranks, so every
rank computes the same gate and replicas never diverge):

    g_GA = sqrt(|dA|^2 + |dB|^2),  g_BO = |dR|          (each / sqrt(#params) if `normalize`)
    G_GA = g_GA / (1 - lambda),    G_BO = g_BO / lambda    each branch's own ("intrinsic") norm
    target = sigmoid(sign * (log G_BO - log G_GA) / tau)   sign = +1 "larger": favour the branch
                                                          with the larger gradient; -1 "smaller"
    lambda = clamp(beta lambda + (1 - beta) target, lambda_min, lambda_max)
    optional schedule a(t) decaying the LoRA-GA share: lambda_eff = 1 - (1 - lambda) a(t)

Why the division. The forward scales the rotation's path by lambda and the low-rank path by
(1 - lambda), so dR = lambda dR|_1 and dA, dB = (1 - lambda) dA|_1, dB|_1, where |_1 is the
gradient at unit share (the branch's own gradient). On the raw norms the gate's input would be
log g_BO - log g_GA = logit(lambda) + c, with c = log G_BO - log G_GA: the gate feeds on itself.
lambda -> sigmoid((logit(lambda) + c) / tau) can rest only where logit(lambda) = c / (tau - 1): for
tau = 1 (and c != 0) there is no such point and lambda runs to lambda_min or lambda_max; for tau < 1
the point repels, so lambda runs to a bound from either side of it; for tau > 1 it holds but
amplifies the ratio instead of softening it (tau = 2 gives sigmoid(c), tau = 1.1 sigmoid(10 c)), so
a moderate ratio already lands on a bound (measured on MiniLM: 11 of 12 layers at lambda_min after
400 steps). Divided by the shares, the input is c alone, which does not depend on the current mix,
so with EMA lambda settles at

    lambda* = clamp(sigmoid(sign * c / tau), lambda_min, lambda_max)

and layers whose branches' ratios differ settle at different values. The shares divided by are the
lambda the forward used, lambda_eff (schedule included): that value produced the gradients. A branch
whose share is (nearly) zero got no gradient and cannot be measured: that update only clamps lambda
into its bounds (so init 0 or 1 with bounds inside (0, 1) still starts moving). s_l stays in dR|_1
(it is 1 at init and near 1 after). `diagnostics()` reports lambda and the norms behind it.

Shapes: d_in = D * b, r = LoRA rank, N... = leading token dims.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import nn

from ._zero import assign
from .boft import BoftConfig, BoftLinear
from .config import ConfigError, MethodConfig, check, check_choice, from_dict
from .lora_ga import LoraGaConfig, gradient_init

GateDirection = Literal["larger", "smaller"]
Schedule = Literal["constant", "linear", "cosine"]
GradOf = Callable[[torch.Tensor], "torch.Tensor | None"]
# Below this share a branch's gradient is (numerically) absent and its own norm cannot be read from
# it; exactly 0 at lambda = 0 or 1.
MIN_SHARE = 1e-6
# The numbers behind each gate update (see HybridLinear.diagnostics); NaN until the first update.
NORM_KEYS = ("grad_norm_boft", "grad_norm_lora_ga", "branch_norm_boft", "branch_norm_lora_ga", "gate_target")


@dataclasses.dataclass(frozen=True)
class GateConfig:
    """The per-layer gate lambda (BOFT share). Our reconstruction; see the module docstring.

    Args:
        init: lambda before the first update.
        fixed: pin lambda to this value (no updates): 1 = BOFT only, 0 = LoRA-GA only; ablations.
        tau: temperature of the sigmoid on the log-ratio of the branches' own gradient norms
            (each divided by its share of the mix): larger tau keeps lambda nearer 0.5.
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

    init: float = dataclasses.field(default=0.5, metadata={"param": "gate_init", "help": "lambda before the first update"})
    fixed: float | None = dataclasses.field(default=None, metadata={"param": "gate_fixed", "help": "pin lambda (1 = BOFT, 0 = LoRA-GA)"})
    tau: float = dataclasses.field(default=1.0, metadata={"param": "gate_tau", "help": "tau: sigmoid temperature on the log norm ratio"})
    update_every: int = dataclasses.field(default=10, metadata={"param": "gate_update_every", "help": "K: steps between gate updates"})
    ema: float = dataclasses.field(default=0.9, metadata={"param": "gate_ema", "help": "beta: EMA smoothing of lambda"})
    lambda_min: float = dataclasses.field(default=0.05, metadata={"param": "gate_lambda_min", "help": "lower bound of lambda"})
    lambda_max: float = dataclasses.field(default=0.95, metadata={"param": "gate_lambda_max", "help": "upper bound of lambda"})
    direction: GateDirection = dataclasses.field(default="larger", metadata={"param": "gate_direction", "help": "favour the larger | smaller gradient"})
    normalize: bool = dataclasses.field(default=True, metadata={"param": "gate_normalize", "help": "divide norms by sqrt(#params)"})
    schedule: Schedule = dataclasses.field(default="constant", metadata={"param": "gate_schedule", "help": "LoRA-GA share decay: constant | linear | cosine"})
    schedule_steps: int = dataclasses.field(default=1000, metadata={"param": "gate_schedule_steps", "help": "steps for the schedule to reach 0"})

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
        self.dropout = nn.Dropout(cfg.lora_ga.lora.dropout) if cfg.lora_ga.lora.dropout > 0 else nn.Identity()
        self.gate_records: list[dict[str, float]] = []  # {"step", **diagnostics()} after each update
        self._norms = dict.fromkeys(NORM_KEYS, math.nan)

    @torch.no_grad()
    def init_from_gradient(self, grad: torch.Tensor) -> None:
        A, B = gradient_init(grad, self.hybrid_cfg.lora_ga, self.layer_name)
        self.lora_A0.copy_(A.to(self.lora_A0.dtype))
        self.lora_B0.copy_(B.to(self.lora_B0.dtype))
        assign(self.lora_A, self.lora_A0)  # under ZeRO-3 also the optimizer's master copy
        assign(self.lora_B, self.lora_B0)

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        lam = self.hybrid_gate.to(x.dtype)
        x_mix = torch.lerp(x, self.rotate(x), lam)  # (1 - lam) x + lam x R
        s = 1 + lam * (self.boft_s.to(x.dtype) - 1)
        # (B A - B0 A0) x as one rank-2r product pair: [B, -B0] [A; A0] x
        A2 = torch.cat([self.lora_A, self.lora_A0]).to(x.dtype)  # (2r, d_in)
        B2 = torch.cat([self.lora_B, -self.lora_B0], dim=1).to(x.dtype)  # (d_out, 2r)
        lowrank = (self.dropout(x) @ A2.t()) @ B2.t()
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
        # The forward scaled R's path by the lambda it used (schedule included) and the low-rank
        # path by 1 - lambda: divide that back out, so the gate sees each branch's own gradient and
        # not the current mix (on the raw norms it would feed on itself, see the module docstring).
        share = float(self.hybrid_gate)
        g_bo, g_ga = float(g_bo), float(g_ga)
        lam = float(self.hybrid_gate_ema)
        b_bo = b_ga = target = math.nan
        if min(share, 1 - share) >= MIN_SHARE:
            b_bo, b_ga = g_bo / share, g_ga / (1 - share)
            tiny = torch.finfo(torch.float32).tiny  # a zero gradient still gives a finite log
            sign = 1.0 if g.direction == "larger" else -1.0
            z = sign * (math.log(b_bo + tiny) - math.log(b_ga + tiny)) / g.tau
            if not math.isfinite(z):
                return  # a non-finite gradient must not poison the gate; the trainer reports divergence
            target = 1 / (1 + math.exp(-z)) if z >= 0 else math.exp(z) / (1 + math.exp(z))  # sigmoid, no overflow
            lam = g.ema * lam + (1 - g.ema) * target
        # else a branch without share got no gradient: nothing to measure, only bring lambda into bounds
        lam = min(max(lam, g.lambda_min), g.lambda_max)
        self.hybrid_gate_ema.fill_(lam)
        a = g.decay(step)
        self.hybrid_gate.fill_(lam if a == 1.0 else 1 - (1 - lam) * a)
        self._norms = {"grad_norm_boft": g_bo, "grad_norm_lora_ga": g_ga, "branch_norm_boft": b_bo,
                       "branch_norm_lora_ga": b_ga, "gate_target": target}
        self.gate_records.append({"step": step, **self.diagnostics()})

    def diagnostics(self) -> dict[str, float]:
        """The gate and the numbers behind its last update (NaN before the first one, and always
        for a fixed gate, which measures nothing):

        - gate: lambda, the BOFT share the forward uses now (after the schedule);
        - grad_norm_boft, grad_norm_lora_ga: the last update's gradient norms as read, |dR| and
          sqrt(|dA|^2 + |dB|^2) (each / sqrt(#params) with `normalize`), still scaled by the mix;
        - branch_norm_boft, branch_norm_lora_ga: the same divided by the branch's share (lambda,
          1 - lambda): each branch's own gradient norm, the gate's input;
        - gate_target: sigmoid(sign * log(branch_norm_boft / branch_norm_lora_ga) / tau), where the
          EMA is taking lambda (NaN when a share was zero and nothing could be measured).
        """
        return {"gate": float(self.hybrid_gate), **self._norms}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.lora_A.shape[0]}, gate={float(self.hybrid_gate):.3f}"


def gate_values(model: nn.Module) -> dict[str, float]:
    """Current lambda of every hybrid layer, by layer name."""
    return {name: float(m.hybrid_gate) for name, m in model.named_modules() if isinstance(m, HybridLinear)}


def gate_history(model: nn.Module) -> dict[str, list[tuple[int, float]]]:
    """(step, lambda) after every update, per layer: the layer x step heatmap's data."""
    return {name: [(int(r["step"]), r["gate"]) for r in m.gate_records]
            for name, m in model.named_modules() if isinstance(m, HybridLinear)}


def gate_records(model: nn.Module) -> dict[str, list[dict[str, float]]]:
    """Per layer, one record per gate update: {"step", "gate", "grad_norm_boft", "grad_norm_lora_ga",
    "branch_norm_boft", "branch_norm_lora_ga", "gate_target"} (see `HybridLinear.diagnostics`):
    lambda over the steps and the gradient norms that moved it there."""
    return {name: [dict(r) for r in m.gate_records] for name, m in model.named_modules() if isinstance(m, HybridLinear)}
