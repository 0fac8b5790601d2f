"""What every adapter shares: the base-layer view, the `AdapterLayer` contract, target selection.

Adapters wrap a frozen linear layer y = W0 x + b, W0 of shape (d_out, d_in). Two layer types carry
such a W0 in Hugging Face models: `nn.Linear` (weight stored (d_out, d_in)) and GPT-2's `Conv1D`
(weight stored transposed, (d_in, d_out)). `BaseLinear` hides that difference so that every method
sees W0 as (d_out, d_in).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from typing import ClassVar

import torch
from torch import nn

# Default target modules per architecture family (Hugging Face `config.model_type`), the attention
# projections that the LoRA paper and PEFT adapt by default.
DEFAULT_TARGET_MODULES: dict[str, tuple[str, ...]] = {
    "llama": ("q_proj", "v_proj"),
    "mistral": ("q_proj", "v_proj"),
    "mixtral": ("q_proj", "v_proj"),
    "qwen2": ("q_proj", "v_proj"),
    "qwen3": ("q_proj", "v_proj"),
    "gemma": ("q_proj", "v_proj"),
    "gemma2": ("q_proj", "v_proj"),
    "gemma3_text": ("q_proj", "v_proj"),
    "phi3": ("qkv_proj",),
    "bert": ("query", "value"),
    "roberta": ("query", "value"),
    "distilbert": ("q_lin", "v_lin"),
    "gpt2": ("c_attn",),
    "gpt_neox": ("query_key_value",),
    "opt": ("q_proj", "v_proj"),
}


def is_conv1d(module: nn.Module) -> bool:
    # Checked by name so that methods/ does not import transformers.
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


class BaseLinear:
    """W0 as (d_out, d_in) whatever the layer stores; the product x W0^T without the bias."""

    def __init__(self, layer: nn.Module):
        if not is_linear_like(layer):
            raise TypeError(f"expected nn.Linear or Conv1D, got {type(layer).__name__}")
        self.layer = layer
        self.transposed = is_conv1d(layer)
        w = layer.weight
        shape = getattr(w, "ds_shape", w.shape)  # ZeRO-3 partitioned at load: the full shape
        self.d_out, self.d_in = (shape[1], shape[0]) if self.transposed else tuple(shape)

    @property
    def bias(self) -> torch.Tensor | None:
        return self.layer.bias

    def weight(self) -> torch.Tensor:
        """W0, (d_out, d_in); a view, so in-place updates reach the layer."""
        w = self.layer.weight
        return w.t() if self.transposed else w

    @torch.no_grad()
    def set_weight(self, w: torch.Tensor) -> None:
        """Write a (d_out, d_in) weight back in the layer's own layout and dtype."""
        target = self.layer.weight
        target.copy_((w.t() if self.transposed else w).to(target.dtype))

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x W0^T, no bias: (..., d_in) -> (..., d_out)."""
        w = self.layer.weight
        return x @ w.to(x.dtype) if self.transposed else nn.functional.linear(x, w.to(x.dtype))

    def add_bias(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.layer.bias is None else y + self.layer.bias.to(y.dtype)


class AdapterLayer(nn.Module):
    """One adapted linear layer. Subclasses declare their parameters and implement the math.

    Contract (what `methods.model` relies on, whichever method it holds):
    - `base_layer` is the original module, frozen, still reachable for merging;
    - `adapter_param_names` lists the trainable tensors; `adapter_buffer_names` the frozen tensors
      that must be saved with them (e.g. LoRA-GA's init copy);
    - forward equals the base layer's forward at initialisation;
    - `merged_weight()` returns the (d_out, d_in) weight that folds the adapter in, and
      `unmerged_weight(w)` inverts it; `merge()`/`unmerge()` use them;
    - optionally `diagnostics()`, numbers about the layer's state that a trainer may report.
    """

    adapter_param_names: ClassVar[tuple[str, ...]] = ()
    adapter_buffer_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, base_layer: nn.Module, name: str):
        super().__init__()
        self.base_layer = base_layer
        self.base = BaseLinear(base_layer)
        self.layer_name = name  # for error messages: "model.layers.0.self_attn.q_proj"
        self.merged = False
        for p in base_layer.parameters():
            p.requires_grad_(False)

    @property
    def d_in(self) -> int:
        return self.base.d_in

    @property
    def d_out(self) -> int:
        return self.base.d_out

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        return self.adapter_forward(x)

    def merged_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def unmerged_weight(self, merged: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        self.base.set_weight(self.merged_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        self.base.set_weight(self.unmerged_weight(self.base.weight().float()))
        self.merged = False

    def diagnostics(self) -> dict[str, float]:
        """Per-layer numbers a trainer may report, by name: e.g. the hybrid's gate and the gradient
        norms behind it. None by default; `methods.layer_diagnostics(model)` collects them."""
        return {}

    def adapter_state(self) -> dict[str, torch.Tensor]:
        names = self.adapter_param_names + self.adapter_buffer_names
        return {n: getattr(self, n).detach() for n in names}

    @torch.no_grad()
    def load_adapter_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load tensors saved by `adapter_state`; methods that touch W0 on init override this."""
        expected = set(self.adapter_param_names + self.adapter_buffer_names)
        if set(state) != expected:
            raise ValueError(
                f"{self.layer_name}: saved adapter has tensors {sorted(state)}, expected {sorted(expected)}"
            )
        for n, t in state.items():
            mine = getattr(self, n)
            if mine.shape != t.shape:
                raise ValueError(
                    f"{self.layer_name}.{n}: saved shape {tuple(t.shape)} != model shape {tuple(mine.shape)};"
                    " was the adapter saved for another base model or config?"
                )
            mine.copy_(t)

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, d_out={self.d_out}, merged={self.merged}"


def resolve_target_modules(model: nn.Module, target_modules: Sequence[str] | str | None) -> Sequence[str] | str:
    """The user's patterns, or the architecture's defaults."""
    if target_modules is not None:
        return target_modules
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in DEFAULT_TARGET_MODULES:
        raise ValueError(
            f"target_modules: no default for model_type={model_type!r}; "
            f"set target_modules (known defaults: {sorted(DEFAULT_TARGET_MODULES)})"
        )
    return DEFAULT_TARGET_MODULES[model_type]


def matches(name: str, patterns: Sequence[str] | str) -> bool:
    """PEFT's rule: a string is a regex that must match the whole name; a list matches name suffixes."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def find_targets(model: nn.Module, target_modules: Sequence[str] | str | None) -> Iterator[tuple[str, nn.Module]]:
    """Every (name, linear-like module) whose name the patterns select; errors if none."""
    patterns = resolve_target_modules(model, target_modules)
    found = []
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer) or not matches(name, patterns):
            continue
        if not is_linear_like(module):
            if isinstance(patterns, str) or name.rsplit(".", 1)[-1] in patterns:
                raise ValueError(
                    f"target_modules: {name} is a {type(module).__name__}; only nn.Linear and Conv1D can be adapted"
                )
            continue
        found.append((name, module))
    if not found:
        raise ValueError(f"target_modules={patterns!r} matched no nn.Linear/Conv1D module of the model")
    return iter(found)


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            yield name, module


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


MODULES_TO_SAVE = "modules_to_save"  # key prefix of fully trained extra modules in the weights file


class AdapterLayers:
    """The method object of every method whose layers wrap target modules (all but full fine-
    tuning, `methods.full.FullModel`): how `methods.model` checks, attaches, trains, saves and
    loads it. The registry gives each method one; `methods.model` never asks which method it is."""

    def __init__(self, layer_cls: type[AdapterLayer]):
        self.layer_cls = layer_cls

    def check(self, model: nn.Module, cfg) -> int:
        """Build every target layer (each checks its shapes) and discard them: the target count."""
        targets = list(find_targets(model, cfg.target_modules))
        for name, module in targets:
            self.layer_cls(module, cfg, name)
        return len(targets)

    def attach(self, model: nn.Module, cfg, estimate=None) -> None:
        targets = list(find_targets(model, cfg.target_modules))
        # Build (and so validate) every layer before any costly work and before swapping any in:
        # a bad hyperparameter leaves the model untouched.
        layers = [(name, self.layer_cls(module, cfg, name)) for name, module in targets]
        grads = estimate(targets) if estimate is not None else None
        for p in model.parameters():
            p.requires_grad_(False)
        for name, layer in layers:
            if grads is not None:
                layer.init_from_gradient(grads.pop(name))
            replace_module(model, name, layer)

    def trainable(self, model: nn.Module) -> list[nn.Parameter]:
        return [getattr(layer, n) for _, layer in adapter_layers(model) for n in layer.adapter_param_names]

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """'<layer path>.<tensor name>' -> tensor, and the modules_to_save under their prefix."""
        out = {}
        for name, layer in adapter_layers(model):
            if layer.merged:
                raise ValueError(f"{name}: adapter is merged; unmerge_adapter(model) before saving it")
            for key, t in layer.adapter_state().items():
                out[f"{name}.{key}"] = t.contiguous()
        for name in getattr(model, "modules_to_save", ()):
            for key, t in model.get_submodule(name).state_dict().items():
                out[f"{MODULES_TO_SAVE}.{name}.{key}"] = t.detach().contiguous()
        return out

    def load_state(self, model: nn.Module, state: dict[str, torch.Tensor], path: str) -> None:
        """Into an attached model: each layer's tensors, then the modules_to_save."""
        extra = {k[len(MODULES_TO_SAVE) + 1 :]: t for k, t in state.items() if k.startswith(MODULES_TO_SAVE + ".")}
        if extra:
            with torch.no_grad():
                unexpected = model.load_state_dict(extra, strict=False).unexpected_keys
            if unexpected:
                raise ValueError(f"{path}: saved modules_to_save tensors {unexpected[:3]} do not fit this model")
        layers = dict(adapter_layers(model))
        per_layer: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in state.items():
            if key.startswith(MODULES_TO_SAVE + "."):
                continue
            name, _, tensor = key.rpartition(".")
            if name not in layers:
                raise ValueError(f"{path}: tensor {key} belongs to no adapted layer of this model")
            per_layer.setdefault(name, {})[tensor] = t
        missing = sorted(set(layers) - set(per_layer))
        if missing:
            raise ValueError(f"{path}: no saved tensors for adapted layer(s) {missing[:3]}")
        for name, layer in layers.items():
            layer.load_adapter_state({k: v.to(getattr(layer, k).device) for k, v in per_layer[name].items()})
