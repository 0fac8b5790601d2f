"""Apply a method to a model, count, merge, save and load: the interface the orchestrator uses.

    cfg = methods.config_for("boft", {"block_size": 8, "n_butterfly_factor": 2})
    model = methods.apply_method(model, cfg, batches=train_batches)  # batches: gradient-init methods only
    methods.count_parameters(model)            # (trainable, total)
    methods.save_adapter(model, "out/adapter")  # adapter_config.json + adapter_model.safetensors
    fresh = methods.load_adapter(base_model, "out/adapter")

Nothing here knows which method it holds: it goes through the method object the registry gives
(`methods.base.AdapterLayers` for adapters, `methods.full.FullModel`) and `AdapterLayer`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .base import AdapterLayer, adapter_layers, replace_module
from .config import MethodConfig
from .lora_ga import LossFn, estimate_gradients, hf_loss
from .registry import config_for, get_method

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT_VERSION = 1


def _attach(
    model: nn.Module,
    cfg: MethodConfig,
    estimate: Callable[[list[tuple[str, nn.Module]]], dict[str, torch.Tensor]] | None = None,
    modules_to_save: Sequence[str] = (),
) -> nn.Module:
    """Let the method take the model (wrap its targets, or train it whole). With `estimate`,
    gradients are taken on the still-unwrapped targets and passed to each layer's `init_from_gradient`."""
    extra = _check_modules_to_save(model, modules_to_save)
    get_method(cfg.method).model.attach(model, cfg, estimate)
    model.adapter_config = cfg  # save_adapter reads it back
    model.modules_to_save = tuple(extra)
    for p in trainable_parameters(model):
        p.requires_grad_(True)
    return model


def check_method(model: nn.Module, cfg: MethodConfig, modules_to_save: Sequence[str] = ()) -> int:
    """Validate `cfg` against `model` without changing it: build every target layer (each checks
    its shapes and raises naming the layer and the field) and discard them. Works on a model built
    on the meta device, so a sweep checks a 70B model's shapes before anything is launched.
    Returns the number of target layers."""
    _check_modules_to_save(model, modules_to_save)
    return get_method(cfg.method).model.check(model, cfg)


def _check_modules_to_save(model: nn.Module, names: Sequence[str]) -> list[str]:
    known = dict(model.named_modules())
    for name in names:
        if name not in known:
            raise ValueError(f"modules_to_save: {name!r} is not a module of the model (e.g. 'classifier', 'score')")
    return list(names)


def apply_method(
    model: nn.Module,
    cfg: MethodConfig,
    *,
    batches: Iterable[Any] | None = None,
    loss_fn: LossFn = hf_loss,
    modules_to_save: Sequence[str] = (),
    defer_init: bool = False,
) -> nn.Module:
    """Adapt `model` in place: wrap the target layers, freeze everything else. Returns the model.

    `batches` feeds the gradient estimate of methods that initialise from the gradient (lora_ga,
    hybrid); `loss_fn(model, batch)` turns a batch into a loss (default: Hugging Face `.loss`).
    `modules_to_save` are trained in full and saved with the adapter (PEFT's name), e.g. a freshly
    initialised classification head ("classifier" in BERT, "score" in Llama).
    `defer_init`: wrap only, and leave the gradient initialisation to `init_from_gradients`, to be
    called later on the wrapped model (e.g. once DeepSpeed ZeRO-3 has partitioned it).
    """
    if getattr(model, "adapter_config", None) is not None:
        raise ValueError(f"model already carries a {model.adapter_config.method!r} adapter")
    estimate = None
    if get_method(cfg.method).needs_gradients and not defer_init:
        if batches is None:
            raise ValueError(f"{cfg.method}: initialises from the gradient; pass batches= (an iterator of batches)")

        def estimate(targets):
            return estimate_gradients(model, targets, batches, cfg.gradient_batches, loss_fn)

    return _attach(model, cfg, estimate, modules_to_save)


def init_from_gradients(model: nn.Module, batches: Iterable[Any], loss_fn: LossFn = hf_loss) -> nn.Module:
    """The gradient initialisation of a model wrapped with `apply_method(..., defer_init=True)`:
    the estimate runs through the wrapped layers (whose output equals the base layers' at this
    point), so it works on a model whose weights DeepSpeed ZeRO-3 has partitioned; every rank must
    call it (the estimate and the writes are collectives there)."""
    cfg = model.adapter_config
    layers = [(name, layer) for name, layer in adapter_layers(model) if getattr(layer, "needs_gradients", False)]
    if not layers:
        return model
    grads = estimate_gradients(model, layers, batches, cfg.gradient_batches, loss_fn)
    for name, layer in layers:
        layer.init_from_gradient(grads.pop(name))
    return model


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """What trains: the method's (adapter parameters found by visiting the adapter layers, not by
    name matching; every parameter for full fine-tuning) and the modules_to_save."""
    cfg = getattr(model, "adapter_config", None)
    params = get_method(cfg.method).model.trainable(model) if cfg is not None else []
    seen = {id(p) for p in params}
    for name in getattr(model, "modules_to_save", ()):
        params.extend(p for p in model.get_submodule(name).parameters() if id(p) not in seen)
    return params


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared (tied) tensors counted once; ZeRO-3 partitioned
    tensors by their full size."""
    def numel(p):
        return getattr(p, "ds_numel", None) or p.numel()

    total = sum(numel(p) for p in model.parameters())
    trainable = sum(numel(p) for p in model.parameters() if p.requires_grad)
    return trainable, total


def merge_adapter(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight: inference at the base model's cost."""
    for _, layer in adapter_layers(model):
        layer.merge()
    return model


@torch.no_grad()
def merge_and_unload(model: nn.Module) -> nn.Module:
    """PEFT's `merge_and_unload`: fold every adapter into its base weight and put the base layers
    back, so the model is the plain base architecture again (its state dict has the base model's
    keys; `save_pretrained` writes an ordinary checkpoint). Full fine-tuning is already plain."""
    for name, layer in list(adapter_layers(model)):
        layer.merge()
        replace_module(model, name, layer.base_layer)
    for attr in ("adapter_config", "modules_to_save"):
        if hasattr(model, attr):
            delattr(model, attr)
    return model


def unmerge_adapter(model: nn.Module) -> nn.Module:
    for _, layer in adapter_layers(model):
        layer.unmerge()
    return model


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """What save_adapter writes: '<layer path>.<tensor name>' -> tensor (the whole model's for full)."""
    return get_method(model.adapter_config.method).model.state_dict(model)


def save_adapter(model: nn.Module, directory: str | os.PathLike) -> None:
    """Write `adapter_config.json` and `adapter_model.safetensors` (the whole model for `full`)."""
    cfg = getattr(model, "adapter_config", None)
    if cfg is None:
        raise ValueError("model carries no adapter: call apply_method first")
    os.makedirs(directory, exist_ok=True)
    meta = {
        "method": cfg.method,
        "config": cfg.to_dict(),
        "modules_to_save": list(getattr(model, "modules_to_save", ())),
        "format_version": FORMAT_VERSION,
    }
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump(meta, f, indent=2)
    save_file(adapter_state_dict(model), os.path.join(directory, WEIGHTS_NAME), metadata={"method": cfg.method})


def _read_meta(directory: str | os.PathLike) -> dict[str, Any]:
    path = os.path.join(directory, CONFIG_NAME)
    with open(path) as f:
        meta = json.load(f)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version={meta.get('format_version')!r}, expected {FORMAT_VERSION}")
    return meta


def read_adapter_config(directory: str | os.PathLike) -> MethodConfig:
    meta = _read_meta(directory)
    return config_for(meta["method"], meta["config"])


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Attach the saved adapter to a fresh base model (same architecture and weights as at save time)."""
    meta = _read_meta(directory)
    cfg = config_for(meta["method"], meta["config"])
    path = os.path.join(directory, WEIGHTS_NAME)
    _attach(model, cfg, modules_to_save=meta.get("modules_to_save", ()))
    get_method(cfg.method).model.load_state(model, load_file(path), path)
    return model


def layer_diagnostics(model: nn.Module) -> dict[str, dict[str, float]]:
    """Layer name -> that layer's `diagnostics()`, for the layers that have any (the hybrid: its
    gate and the gradient norms behind it). Plain floats, the same on every data-parallel rank when
    they come from reduced gradients; cheap (no collective), so a trainer may call it at every report."""
    out = {}
    for name, layer in adapter_layers(model):
        numbers = layer.diagnostics()
        if numbers:
            out[name] = numbers
    return out


def after_backward(
    model: nn.Module, step: int, grad_of: Callable[[torch.Tensor], torch.Tensor | None] | None = None
) -> None:
    """Call once per optimizer step after gradients are final (reduced, before `zero_grad`): lets
    layers that adapt themselves from gradients (the hybrid's gate) update. A no-op for the others.
    `grad_of(param)` returns a parameter's full gradient where `.grad` doesn't hold it (DeepSpeed
    ZeRO: `deepspeed.utils.safe_get_full_grad`)."""
    for _, layer in adapter_layers(model):
        hook = getattr(layer, "after_backward", None)
        if hook is not None:
            hook(step, grad_of)


__all__ = [
    "AdapterLayer",
    "adapter_state_dict",
    "after_backward",
    "apply_method",
    "count_parameters",
    "layer_diagnostics",
    "load_adapter",
    "merge_adapter",
    "merge_and_unload",
    "read_adapter_config",
    "save_adapter",
    "trainable_parameters",
    "unmerge_adapter",
]
