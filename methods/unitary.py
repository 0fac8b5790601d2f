"""Unitary adapter: a uRNN-style unitary rotation of W0's input (after Arjovsky, Shah & Bengio, ICML
2016, "Unitary Evolution Recurrent Neural Networks", https://arxiv.org/abs/1511.06464).

OUR RECONSTRUCTION: the paper we compare against (Qi, Dai & Huang 2025) does not publish its unitary
parametrisation; this one keeps uRNN's factors and makes the adapter exactly the identity at init.

The real input x in R^d is read as z in C^n, n = d / 2, from interleaved pairs
z_k = x_{2k} + i x_{2k+1}. A unitary U on C^n is an orthogonal map on R^d, so
W0 is rotated on its input side as in BOFT (methods/boft.py):

    y = s ⊙ (W0 real(U z)) + b,            s (d_out) init 1 (`output_scale`, else s = 1)
    U = D3 R2 F^-1 D2 Pi R1 F D1 · C,     C = F^-1 Pi^T F   (fixed)

    D_k = diag(exp(i theta_k))            phase diagonals, theta_k in R^n, init 0
    R_k = I - 2 v_k v_k^* / |v_k|^2       complex reflections, v_k in C^n
    F   = unitary DFT (fft, norm="ortho"); Pi = fixed random permutation, (Pi z)_j = z_{perm_j},
          drawn from `seed` (regenerated, never saved)

Why the fixed factor C. uRNN's product D3 R2 F^-1 D2 Pi R1 F D1 cannot be the identity: at theta = 0
it is R2 (F^-1 Pi F)(F^-1 R1 F), and F^-1 Pi F - I has rank far above the 2 that two reflections can undo,
so "v2 = v1" does not give identity. Moving Pi next to a reflection or a diagonal instead would make
it a mere relabelling of v or theta (Pi R(v) Pi^T = R(Pi v)), i.e. drop it. So we keep uRNN's product
and right-multiply it by its fixed mixing inverse C. At theta = 0,
U = R2 (F^-1 Pi) R1 (F^-1 Pi)^-1 = R(v2) R(F^-1 Pi v1), the identity iff v2 ∝ F^-1 Pi v1. We take
v1 = (1, ..., 1) and v2 = sqrt(n) e_0 (F^-1 Pi 1 = sqrt(n) e_0): directions that rounding to any dtype keeps,
and |v1| = |v2|.
Training moves every factor freely, so the reachable maps are uRNN's family times one fixed unitary;
every parameter group has a non-zero gradient at init (unlike a phase-gated reflection, whose v has
none). Cost: four length-n FFTs, two reflections, two gathers: O(d log d) per token, 7n + d_out
parameters (uRNN's ~7N). U is exactly unitary for any parameter values. FFTs always run in fp32
(complex64; bf16 FFTs are generally unsupported) and the result is cast back to x's dtype.

Shapes: N... = leading token dims, d = d_in = 2n, urnn_theta (3, n) = theta_1..3,
urnn_v (2, 2, n) = [reflection k, (real, imag), n], urnn_s (d_out).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import torch
from torch import nn

from .base import AdapterLayer
from .config import MethodConfig, check

fft = functools.partial(torch.fft.fft, norm="ortho")  # F, unitary
ifft = functools.partial(torch.fft.ifft, norm="ortho")  # F^-1 = F^*


@dataclasses.dataclass(frozen=True)
class UnitaryConfig(MethodConfig):
    """Unitary adapter hyperparameters. Parameters per layer: 3.5 d_in (+ d_out with output_scale).

    Args:
        output_scale: learn s (d_out), init 1, as BOFT's boft_s; False keeps the map norm-preserving
            end to end (y = W0 U x + b).
        seed: seed of the fixed permutation Pi (the same for all layers of one width); saved with the
            config, so a loaded adapter rebuilds the same Pi.
        target_modules: module-name suffixes or one regex; None = architecture default. Every target
            needs an even in_features.
    """

    method = "unitary"
    output_scale: bool = dataclasses.field(default=True, metadata={"help": "s: learn a per-output scale (init 1)"})
    seed: int = dataclasses.field(default=0, metadata={"help": "seed of the fixed permutation Pi", "param": "unitary_seed"})
    target_modules: Sequence[str] | str | None = dataclasses.field(
        default=None, metadata={"help": "module-name suffixes or one regex; None = architecture default"}
    )

    def __post_init__(self):
        check(isinstance(self.output_scale, bool), "output_scale", self.output_scale, "must be true or false")
        check(isinstance(self.seed, int) and not isinstance(self.seed, bool) and self.seed >= 0,
              "seed", self.seed, "must be an integer >= 0")
        if isinstance(self.target_modules, list):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))


def reflect(z: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(I - 2 v v^* / |v|^2) z for z (..., n) complex, v (n) complex."""
    coef = (z @ v.conj()) * (2 / torch.vdot(v, v).real)  # (N...,) = 2 v^* z / |v|^2
    return z - coef[..., None] * v


class UnitaryLinear(AdapterLayer):
    adapter_param_names = ("urnn_theta", "urnn_v", "urnn_s")

    def __init__(self, base_layer: nn.Module, cfg: UnitaryConfig, name: str = ""):
        super().__init__(base_layer, name)
        if self.d_in % 2:
            raise ValueError(
                f"{name}: in_features ({self.d_in}) must be even: the unitary adapter reads x as "
                f"in_features/2 complex numbers; leave this layer out with target_modules"
            )
        self.cfg = cfg
        n = self.n = self.d_in // 2
        w = self.base.weight()
        v = torch.zeros(2, 2, n)  # identity at init: v1 = 1, v2 = sqrt(n) e_0 (module docstring)
        v[0, 0] = 1.0
        v[1, 0, 0] = math.sqrt(n)
        self.urnn_theta = nn.Parameter(torch.zeros(3, n, dtype=w.dtype, device=w.device))
        self.urnn_v = nn.Parameter(v.to(dtype=w.dtype, device=w.device))
        if cfg.output_scale:
            self.urnn_s = nn.Parameter(torch.ones(self.d_out, dtype=w.dtype, device=w.device))
        else:
            self.adapter_param_names = ("urnn_theta", "urnn_v")  # instance override: no scale
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed))
        # Non-persistent: derived from the config, never saved.
        self.register_buffer("_perm", perm.to(w.device), persistent=False)
        self.register_buffer("_inv_perm", torch.argsort(perm).to(w.device), persistent=False)

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """real(U z) for x (N..., d_in), in fp32, returned in x's dtype; never forms U."""
        phase = torch.exp(1j * self.urnn_theta.float())  # (3, n) complex64
        v = torch.complex(*self.urnn_v.float().unbind(1))  # (2, n)
        xf = x.float()
        z = torch.complex(xf[..., 0::2], xf[..., 1::2])  # (N..., n): z_k = x_2k + i x_2k+1
        z = ifft(fft(z)[..., self._inv_perm])  # C = F^-1 Pi^T F
        z = fft(z * phase[0])  # F D1
        z = reflect(z, v[0])[..., self._perm] * phase[1]  # D2 Pi R1
        z = reflect(ifft(z), v[1]) * phase[2]  # D3 R2 F^-1
        return torch.view_as_real(z).reshape(x.shape).to(x.dtype)  # (N..., d_in)

    def scale(self) -> torch.Tensor | None:
        return self.urnn_s if self.cfg.output_scale else None

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base.matmul(self.rotate(x))
        s = self.scale()
        return self.base.add_bias(y if s is None else y * s.to(x.dtype))

    def dense_rotation(self) -> torch.Tensor:
        """M (d_in, d_in) fp32 with rotate(x) = x @ M (row vectors): only for merging, never in the forward."""
        return self.rotate(torch.eye(self.d_in, dtype=torch.float32, device=self.urnn_theta.device))

    def merged_weight(self) -> torch.Tensor:
        # y = s ⊙ (x M W0^T) = x (s ⊙ W0 M^T)^T
        w = self.base.weight().float() @ self.dense_rotation().t()
        s = self.scale()
        return w if s is None else s.float()[:, None] * w

    def unmerged_weight(self, merged: torch.Tensor) -> torch.Tensor:
        # M is orthogonal (U unitary), so (W0 M^T) M = W0: a transpose instead of a solve.
        s = self.scale()
        scaled = merged if s is None else merged / s.float()[:, None]
        return scaled @ self.dense_rotation()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, n={self.n}, output_scale={self.cfg.output_scale}, seed={self.cfg.seed}"
