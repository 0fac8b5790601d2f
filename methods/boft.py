"""BOFT: butterfly orthogonal fine-tuning (Liu et al., ICLR 2024, https://arxiv.org/abs/2311.06243).

The frozen weight is rotated on its input side and rescaled on its output side:

    y = s ⊙ (W0 (x R)) + b          (row-vector x, as PEFT: x_rot = x @ R)
    R = B_{m-1} ... B_1 B_0,        B_i = P_i blockdiag(Q_i1 .. Q_iD) P_i^T
    Q = Cayley(S) = (I - S)(I + S)^-1,  S = (R_param - R_param^T) / 2,  R_param = 0 at init -> Q = I

m = n_butterfly_factor (butterfly depth; m = 1 is block-diagonal OFT), b = block_size, D = d_in / b
blocks, P_i = the butterfly permutation of stage i (PEFT's `block_butterfly_perm`), s (d_out) init 1.

Unlike PEFT, we never build a dense (d_in, d_in) matrix in the forward. Each stage is applied to the
activations as an index gather (the permutation) and a batched (D, b, b) block product:
O(tokens * d_in * b * m) work and O(m * D * b^2) parameters. Consecutive permutations P_i^T P_{i-1}
are fused into a single gather. The Cayley transform runs in fp32 (a solve, or OFTv2's Neumann
series, arXiv 2506.19847) and is cast back to the activations' dtype.

Shapes: N... = leading token dims, d_in = D * b.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from .base import AdapterLayer
from .config import ConfigError, MethodConfig, check, check_choice

CayleyMode = Literal["exact", "neumann"]


@dataclasses.dataclass(frozen=True)
class BoftConfig(MethodConfig):
    """BOFT hyperparameters. Set at most one of `block_size` (default 4) and `block_num`.

    Args:
        block_size: b, the size of each orthogonal block (PEFT `boft_block_size`). Parameters per
            layer: m * d_in * b; even when n_butterfly_factor > 1.
        block_num: D, the number of blocks per stage (PEFT `boft_block_num`); b = d_in / D.
        n_butterfly_factor: m, the butterfly depth. Each extra stage doubles the span of mixing
            (stage i mixes groups of b * 2^i inputs); needs D divisible by 2^(m-1).
        cayley: "exact" solves (I + S)^-1; "neumann" uses the series I - S + S^2 - ... (OFTv2):
            cheaper, accurate while S stays small, slightly non-orthogonal.
        neumann_terms: k, the highest power of the Neumann series.
        target_modules: module-name suffixes or one regex; None = architecture default.
    """

    method = "boft"
    block_size: int | None = dataclasses.field(default=None, metadata={"help": "b: orthogonal block size (default 4)", "short": "b"})
    block_num: int | None = dataclasses.field(default=None, metadata={"help": "D: blocks per stage (instead of b)"})
    n_butterfly_factor: int = dataclasses.field(default=1, metadata={"help": "m: butterfly depth (1 = block OFT)", "param": "butterfly_depth", "short": "m"})
    cayley: CayleyMode = dataclasses.field(default="exact", metadata={"help": "Cayley transform: exact | neumann"})
    neumann_terms: int = dataclasses.field(default=5, metadata={"help": "k: Neumann series order (cayley=neumann)"})
    target_modules: Sequence[str] | str | None = dataclasses.field(
        default=None, metadata={"help": "module-name suffixes or one regex; None = architecture default"}
    )

    def __post_init__(self):
        if self.block_size is not None and self.block_num is not None:
            raise ConfigError(
                f"block_size={self.block_size!r}, block_num={self.block_num!r}: set at most one of them"
            )
        if self.block_size is None and self.block_num is None:
            object.__setattr__(self, "block_size", 4)
        for name in ("block_size", "block_num"):
            v = getattr(self, name)
            if v is not None:
                check(isinstance(v, int) and v >= 1, name, v, "must be an integer >= 1")
        m = self.n_butterfly_factor
        check(isinstance(m, int) and m >= 1, "n_butterfly_factor", m, "must be an integer >= 1")
        if m > 1:
            if self.block_size is not None:
                check(self.block_size % 2 == 0, "block_size", self.block_size, "must be even when n_butterfly_factor > 1")
            if self.block_num is not None:
                check(
                    self.block_num % 2 ** (m - 1) == 0 and self.block_num % 2 == 0,
                    "block_num",
                    self.block_num,
                    f"must be even and divisible by 2^(n_butterfly_factor-1)={2 ** (m - 1)}",
                )
        check_choice("cayley", self.cayley, CayleyMode)
        check(isinstance(self.neumann_terms, int) and self.neumann_terms >= 1, "neumann_terms", self.neumann_terms, "must be >= 1")
        if isinstance(self.target_modules, list):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))

    def blocks(self, d_in: int, layer_name: str) -> tuple[int, int]:
        """(D, b) for a layer of width d_in, or a ValueError naming the layer and the constraint."""
        m = self.n_butterfly_factor
        if self.block_size is not None:
            b = self.block_size
            if d_in % b:
                raise ValueError(f"{layer_name}: in_features ({d_in}) must be divisible by block_size ({b})")
            D = d_in // b
        else:
            D = self.block_num
            if d_in % D:
                raise ValueError(f"{layer_name}: in_features ({d_in}) must be divisible by block_num ({D})")
            b = d_in // D
        if m > 1:
            if D % 2 ** (m - 1) or D < 2 ** (m - 1):
                raise ValueError(
                    f"{layer_name}: n_butterfly_factor={m} needs the block count ({D} = in_features {d_in} / "
                    f"block_size {b}) to be a multiple of 2^(m-1) = {2 ** (m - 1)}; lower n_butterfly_factor "
                    f"(at most {1 + (D & -D).bit_length() - 1}) or change block_size"
                )
            if b % 2:
                raise ValueError(f"{layer_name}: block_size ({b}) must be even when n_butterfly_factor > 1")
        return D, b


def butterfly_perm(n: int, num_blocks: int, half: int) -> torch.Tensor:
    """PEFT's `block_butterfly_perm` as an index vector: within each of `num_blocks` groups, put the
    even runs of `half` entries first, then the odd runs. Its matrix P has P[i, perm[i]] = 1."""
    group = n // num_blocks
    runs = group // half
    order = torch.cat([torch.arange(0, runs, 2), torch.arange(1, runs, 2)])
    within = (order[:, None] * half + torch.arange(half)[None, :]).reshape(group)  # (group,)
    return (torch.arange(n).view(num_blocks, group)[:, within]).reshape(n)


def stage_gathers(d_in: int, D: int, b: int, m: int) -> list[torch.Tensor | None]:
    """Index vectors applied before stage m-1, between stages, and after stage 0 (None = identity).

    x @ P = x[..., inv(perm)] and y @ P^T = y[..., perm]. x R = x B_{m-1} ... B_0 applies stage m-1
    first, so the gathers are: inv_{m-1}, then perm_i[inv_{i-1}] between stages, then perm_0.
    """
    perms = [torch.arange(d_in)] + [butterfly_perm(d_in, D // 2**i, b // 2) for i in range(1, m)]
    invs = [torch.argsort(p) for p in perms]
    gathers = [invs[m - 1]] + [perms[i][invs[i - 1]] for i in range(m - 1, 0, -1)] + [perms[0]]
    ident = torch.arange(d_in)
    return [None if torch.equal(g, ident) else g for g in gathers]


def cayley(params: torch.Tensor, mode: CayleyMode = "exact", terms: int = 5) -> torch.Tensor:
    """Orthogonal blocks from unconstrained (..., b, b) parameters, computed in fp32."""
    R = params.float()
    S = 0.5 * (R - R.transpose(-1, -2))
    eye = torch.eye(R.shape[-1], dtype=R.dtype, device=R.device).expand_as(S)
    if mode == "exact":
        return torch.linalg.solve(eye + S, eye - S, left=False)  # X (I + S) = I - S
    series, power = eye, eye
    for _ in range(terms):  # (I + S)^-1 ~ sum_j (-S)^j
        power = -power @ S
        series = series + power
    return (eye - S) @ series


class BoftLinear(AdapterLayer):
    adapter_param_names = ("boft_R", "boft_s")

    def __init__(self, base_layer: nn.Module, cfg: BoftConfig, name: str = ""):
        super().__init__(base_layer, name)
        self.cfg = cfg
        D, b = cfg.blocks(self.d_in, name)
        m = cfg.n_butterfly_factor
        self.num_blocks, self.block_size, self.depth = D, b, m
        w = self.base.weight()
        self.boft_R = nn.Parameter(torch.zeros(m, D, b, b, dtype=w.dtype, device=w.device))
        self.boft_s = nn.Parameter(torch.ones(self.d_out, dtype=w.dtype, device=w.device))
        for i, g in enumerate(stage_gathers(self.d_in, D, b, m)):
            # Non-persistent: derived from the config, never saved.
            self.register_buffer(f"_gather{i}", None if g is None else g.to(w.device), persistent=False)

    def blocks(self, dtype: torch.dtype) -> torch.Tensor:
        """The orthogonal blocks Q, (m, D, b, b), computed in fp32 then cast."""
        return cayley(self.boft_R, self.cfg.cayley, self.cfg.neumann_terms).to(dtype)

    def rotate(self, x: torch.Tensor, Q: torch.Tensor | None = None) -> torch.Tensor:
        """x R for x (..., d_in), without forming R."""
        Q = self.blocks(x.dtype) if Q is None else Q
        lead = x.shape[:-1]
        for stage in range(self.depth - 1, -1, -1):
            g = getattr(self, f"_gather{self.depth - 1 - stage}")
            if g is not None:
                x = x.index_select(-1, g)
            x = x.reshape(*lead, self.num_blocks, self.block_size)  # (..., D, b)
            x = torch.einsum("...di,dij->...dj", x, Q[stage]).reshape(*lead, self.d_in)
        g = getattr(self, f"_gather{self.depth}")
        return x if g is None else x.index_select(-1, g)

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base.matmul(self.rotate(x)) * self.boft_s.to(x.dtype)
        return self.base.add_bias(y)

    def dense_rotation(self) -> torch.Tensor:
        """R as a dense (d_in, d_in) fp32 matrix: only for merging, never in the forward."""
        eye = torch.eye(self.d_in, dtype=torch.float32, device=self.boft_R.device)
        return self.rotate(eye, self.blocks(torch.float32))

    def merged_weight(self) -> torch.Tensor:
        # y = s ⊙ (x R W0^T) = x (s ⊙ W0 R^T)^T
        return self.boft_s.float()[:, None] * (self.base.weight().float() @ self.dense_rotation().t())

    def unmerged_weight(self, merged: torch.Tensor) -> torch.Tensor:
        # W0 R^T = M / s  ->  R W0^T = (M / s)^T; a solve, since the Neumann R is only near-orthogonal
        scaled = merged / self.boft_s.float()[:, None]
        return torch.linalg.solve(self.dense_rotation(), scaled.t()).t()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, blocks={self.num_blocks}x{self.block_size}, depth={self.depth}"
