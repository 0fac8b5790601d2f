"""The method registry: how the orchestrator finds a method by name without knowing what it is.

A method is a config class plus, for adapters, the `AdapterLayer` subclass that wraps each target
layer (full fine-tuning, which wraps nothing, brings its own method object instead). Adding a
method = one module with those two classes, and one line here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from .base import AdapterLayers
from .boft import BoftConfig, BoftLinear
from .config import MethodConfig
from .full import FullConfig, FullModel
from .hybrid import HybridConfig, HybridLinear
from .lora import LoraConfig, LoraLinear
from .lora_ga import LoraGaConfig, LoraGaLinear
from .unitary import UnitaryConfig, UnitaryLinear


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    config_cls: type[MethodConfig]
    layer_cls: type[nn.Module] | None  # None: no adapter layer (full fine-tuning)
    model: Any = None  # how methods.model attaches, trains, saves and loads it (AdapterLayers(layer_cls) by default)

    @property
    def needs_gradients(self) -> bool:
        """True if building the method needs gradient batches (LoRA-GA-style inits)."""
        return bool(getattr(self.layer_cls, "needs_gradients", False))


METHODS: dict[str, Method] = {}


def register(name: str, config_cls: type[MethodConfig], layer_cls: type[nn.Module] | None, model: Any = None) -> None:
    """A method: its config class and adapter layer class (its method object is then the adapter
    one, `AdapterLayers`), or for a method without adapter layers its own method object."""
    if name in METHODS:
        raise ValueError(f"method {name!r} is already registered")
    if model is None and layer_cls is None:
        raise ValueError(f"method {name!r}: give an adapter layer class or a method object")
    METHODS[name] = Method(name, config_cls, layer_cls, model if model is not None else AdapterLayers(layer_cls))


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"method={name!r}: unknown method (known: {', '.join(sorted(METHODS))})")
    return METHODS[name]


def config_for(name: str, data: dict | None = None, path: str = "") -> MethodConfig:
    """The method's config built (and validated) from a plain dict."""
    return get_method(name).config_cls.from_dict(data or {}, path)


register("lora", LoraConfig, LoraLinear)
register("lora_ga", LoraGaConfig, LoraGaLinear)
register("boft", BoftConfig, BoftLinear)
register("unitary", UnitaryConfig, UnitaryLinear)
register("hybrid", HybridConfig, HybridLinear)
register("full", FullConfig, None, FullModel())
