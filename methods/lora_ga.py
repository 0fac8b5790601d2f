"""LoRA-GA: LoRA initialised from the gradient's SVD (Wang, Yu, Li 2024, https://arxiv.org/abs/2407.05000;
official code github.com/Outsider565/LoRA-GA). We follow the official code, not PEFT's variant.

    1. G = mean over `batches` batches of dL/dW0                        (d_out, d_in), fp32,
       averaged across data-parallel ranks when torch.distributed is initialised; dropout off
       (eval mode), so G is the same whatever the RNG's state and the ZeRO stage
    2. U, S, V = svd_lowrank(G, q=min(4r, min(d_out, d_in)), niter=4);  Vt = V^T, each singular
       pair's sign fixed (largest entry of u positive), so a G equal up to rounding gives one init
    3. direction "ArB2r":  A = Vt[:r, :]  (r, d_in),   B = U[:, r:2r]  (d_out, r);  S unused
    4. scale "stable":     A, B *= d_out^(1/4) / sqrt(gamma)
    5. W0 <- W0 - (alpha/r) B0 A0, so y = W0' x + (alpha/r) B A x equals W0 x at init.

PEFT >= 0.19 (`init_lora_weights="lora_ga"`) differs: B = U[:, r:2r] diag(S[r:2r]) and the
stable scale multiplies B only. `tests/methods/test_lora_ga.py` shows the difference.

The frozen init copies A0, B0 are saved with the adapter: loading onto a fresh base model replays
step 5 before copying A and B, which restores exactly the trained model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import torch
from torch import nn

from . import collectives
from ._zero import assign, gathered
from .config import MethodConfig, check, check_choice
from .lora import LoraConfig, LoraLinear

Direction = Literal["ArB2r", "A2rBr", "ArBr", "random"]
Scale = Literal["stable", "gd", "unit"]
LossFn = Callable[[nn.Module, Any], torch.Tensor]


def hf_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """The Hugging Face convention: a dict batch with labels, the model returns `.loss`."""
    return model(**batch).loss


@dataclasses.dataclass(frozen=True)
class LoraGaConfig(MethodConfig):
    """LoRA-GA hyperparameters; the LoRA ones are nested under `lora`.

    Args:
        lora: rank r, alpha, dropout, rsLoRA, target modules (see LoraConfig).
        direction: which singular vectors initialise A and B. "ArB2r" (official default): A from
            the top r right singular vectors, B from left singular vectors r..2r, so that the first
            step's update B dA + dB A aligns with the top 2r of the full gradient.
        scale: "stable" (official default) multiplies A and B by d_out^(1/4)/sqrt(gamma);
            "gd" divides both by the LoRA scale alpha/r; "unit" leaves them orthonormal.
        stable_gamma: gamma of the stable scale (official 16).
        batches: batches averaged for the gradient estimate (official 64 batches of 2 samples).
        svd_seed: seed of the randomised SVD. Every data-parallel rank must draw the same
            random projection, or replicas would start from different A, B.
    LR note: LoRA-GA wants roughly the full-fine-tuning learning rate (official issue #12: 2e-5
    worked, 3e-4 oscillated), not LoRA's ~10x larger one.
    """

    method = "lora_ga"
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig, metadata={"help": "nested LoRA settings"})
    direction: Direction = dataclasses.field(
        default="ArB2r", metadata={"help": "singular vectors for A and B: ArB2r | A2rBr | ArBr | random", "param": "ga_direction"}
    )
    scale: Scale = dataclasses.field(default="stable", metadata={"help": "init scale: stable | gd | unit", "param": "ga_scale"})
    stable_gamma: float = dataclasses.field(default=16.0, metadata={"help": "gamma of the stable scale", "param": "ga_stable_gamma"})
    batches: int = dataclasses.field(default=8, metadata={"help": "batches averaged for the gradient estimate", "param": "ga_batches"})
    svd_seed: int = dataclasses.field(default=0, metadata={"help": "seed of the randomised SVD (same on all ranks)", "param": "ga_svd_seed"})

    def __post_init__(self):
        if isinstance(self.lora, dict):
            object.__setattr__(self, "lora", LoraConfig.from_dict(self.lora, "lora"))
        check_choice("direction", self.direction, Direction)
        check_choice("scale", self.scale, Scale)
        check(self.stable_gamma > 0, "stable_gamma", self.stable_gamma, "must be > 0")
        check(isinstance(self.batches, int) and self.batches >= 1, "batches", self.batches, "must be an integer >= 1")

    @property
    def target_modules(self) -> Sequence[str] | str | None:
        return self.lora.target_modules

    @property
    def gradient_batches(self) -> int:
        return self.batches


def estimate_gradients(
    model: nn.Module,
    targets: Sequence[tuple[str, nn.Module]],
    batches: Iterable[Any],
    num_batches: int,
    loss_fn: LossFn = hf_loss,
) -> dict[str, torch.Tensor]:
    """Mean gradient dL/dW0 (d_out, d_in, fp32) of every target layer over `num_batches` batches.

    For a linear layer y = W0 x, dL/dW0 = sum over tokens of (dL/dy) x^T: hooks take x from the
    layer's forward and dL/dy from its output's gradient and accumulate that product in fp32. No
    weight ever gets a gradient, so the estimate costs no weight-gradient memory and works where
    the weights are partitioned (DeepSpeed ZeRO-3 gathers them for the forward and the backward,
    `targets` may then be the already wrapped adapter layers, whose output equals the base
    layer's at initialisation). Dropout is off during the estimate (eval mode). Across
    data-parallel ranks the result is the mean over all ranks' batches.
    """
    was_training = model.training
    saved = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    sums: dict[str, torch.Tensor] = {}
    handles = _graph_root(model, targets)

    def capture(name: str):
        def hook(module, args, output):
            if not (torch.is_grad_enabled() and output.requires_grad):
                return
            x = args[0].detach()

            def on_grad(g: torch.Tensor) -> None:
                G = g.reshape(-1, g.shape[-1]).float().t() @ x.reshape(-1, x.shape[-1]).float()
                sums[name] = sums[name] + G if name in sums else G
            output.register_hook(on_grad)
        return hook

    handles += [m.register_forward_hook(capture(name)) for name, m in targets]
    seen = 0
    # Dropout off: the estimate is the gradient of the deterministic model, so it does not depend
    # on the RNG's state (nor on which layers draw from it), and every ZeRO stage gets the same.
    model.eval()
    try:
        for batch in batches:
            if seen == num_batches:
                break
            with torch.enable_grad():
                loss_fn(model, batch).backward()
            seen += 1
    finally:
        for h in handles:
            h.remove()
        for p, flag in saved.items():
            p.requires_grad_(flag)
            p.grad = None
        model.train(was_training)
    if seen == 0:
        raise ValueError("lora_ga: the batch iterator yielded no batch for the gradient estimate")
    missing = [name for name, _ in targets if name not in sums]
    if missing:
        raise ValueError(f"lora_ga: no gradient reached {missing[:3]} (is the layer on the loss's path?)")
    for name in sorted(sums):  # sum over data-parallel ranks (same order everywhere), then divide
        collectives.all_reduce(sums[name])
    (total,) = collectives.all_reduce_values([float(seen)])
    return {name: sums[name] / total for name, _ in targets}


def _graph_root(model: nn.Module, targets: Sequence[tuple[str, nn.Module]]) -> list:
    """With every parameter frozen, autograd records nothing: make the input embeddings' output
    require grad (Hugging Face's `enable_input_require_grads` trick), so that the backward reaches
    every target. A model without input embeddings gets its targets' inputs marked instead.
    Returns the hook handles."""
    def mark(module, args, output):
        return output.requires_grad_(True)

    def mark_input(module, args):
        if args and isinstance(args[0], torch.Tensor) and not args[0].requires_grad and args[0].is_floating_point():
            return (args[0].detach().requires_grad_(True), *args[1:])
        return None

    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if isinstance(embeddings, nn.Module):
        return [embeddings.register_forward_hook(mark)]
    return [m.register_forward_pre_hook(mark_input) for _, m in targets]


def gradient_init(grad: torch.Tensor, cfg: LoraGaConfig, layer_name: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """A (r, d_in) and B (d_out, r) from the gradient G (d_out, d_in), per the official algorithm."""
    r = cfg.lora.r
    d_out, d_in = grad.shape
    if 2 * r > min(d_out, d_in):
        raise ValueError(f"{layer_name}: lora_ga needs 2r={2 * r} <= min(in_features={d_in}, out_features={d_out})")
    with torch.random.fork_rng(devices=[grad.device] if grad.device.type == "cuda" else []):
        torch.manual_seed(cfg.svd_seed)  # identical random projection on every rank
        U, _, V = torch.svd_lowrank(grad.float(), q=min(4 * r, d_out, d_in), niter=4)
        perm = torch.randperm(2 * r)[:r]
    # A singular pair (u, v) is only defined up to a joint sign, and which sign an SVD returns can
    # flip under a perturbation of the last bit (another reduction order, another ZeRO stage).
    # Fix it (scikit-learn's svd_flip): each u's largest entry positive. Same G -> same A, B.
    signs = torch.sign(U.gather(0, U.abs().argmax(0, keepdim=True)))
    signs[signs == 0] = 1
    U, V = U * signs, V * signs
    Vt = V.t()  # (q, d_in)
    if cfg.direction == "ArB2r":
        A, B = Vt[:r], U[:, r : 2 * r]
    elif cfg.direction == "A2rBr":
        A, B = Vt[r : 2 * r], U[:, :r]
    elif cfg.direction == "ArBr":
        A, B = Vt[1 : 2 * r : 2], U[:, 0 : 2 * r : 2]
    else:  # random: r of the top 2r directions, the same for A and B
        A, B = Vt[perm], U[:, perm]
    if cfg.scale == "stable":
        factor = d_out**0.25 / cfg.stable_gamma**0.5
        A, B = A * factor, B * factor
    elif cfg.scale == "gd":
        A, B = A / cfg.lora.scaling, B / cfg.lora.scaling
    return A.contiguous(), B.contiguous()


class LoraGaLinear(LoraLinear):
    """LoRA whose A, B start from the gradient; W0 is compensated in place (no extra forward cost)."""

    adapter_buffer_names = ("lora_A0", "lora_B0")
    needs_gradients = True

    def __init__(self, base_layer: nn.Module, cfg: LoraGaConfig, name: str = ""):
        super().__init__(base_layer, cfg.lora, name)
        r = cfg.lora.r
        if 2 * r > min(self.d_in, self.d_out):
            raise ValueError(f"{name}: lora_ga needs 2r={2 * r} <= min(in_features={self.d_in}, out_features={self.d_out})")
        self.ga_cfg = cfg
        self.register_buffer("lora_A0", torch.zeros_like(self.lora_A))
        self.register_buffer("lora_B0", torch.zeros_like(self.lora_B))

    @torch.no_grad()
    def init_from_gradient(self, grad: torch.Tensor) -> None:
        A, B = gradient_init(grad, self.ga_cfg, self.layer_name)
        self._start_from(A, B)

    @torch.no_grad()
    def _start_from(self, A0: torch.Tensor, B0: torch.Tensor) -> None:
        dtype = self.lora_A.dtype
        self.lora_A0.copy_(A0.to(dtype))
        self.lora_B0.copy_(B0.to(dtype))
        assign(self.lora_A, self.lora_A0)  # under ZeRO-3 also the optimizer's master copy
        assign(self.lora_B, self.lora_B0)
        # Offset computed from the dtype-cast A0, B0 so it cancels what the forward adds.
        offset = self.scaling * (self.lora_B0.float() @ self.lora_A0.float())
        with gathered(self.base.layer.weight, modify=True):
            self.base.set_weight(self.base.weight().float() - offset)

    @torch.no_grad()
    def load_adapter_state(self, state) -> None:
        self._start_from(state["lora_A0"], state["lora_B0"])  # replay the W0 compensation
        super().load_adapter_state(state)

