"""PEFT adapters in plain PyTorch: LoRA, LoRA-GA, BOFT, unitary, the BOFT+LoRA-GA hybrid, full FT.

No Ray, MLflow or DeepSpeed here (DeepSpeed only lazily, under ZeRO-3): the orchestrator imports
this package, never the other way round.
"""

from .base import DEFAULT_TARGET_MODULES, AdapterLayer, adapter_layers
from .boft import BoftConfig, BoftLinear
from .config import ConfigError, MethodConfig, flat_params, short_name
from .full import FullConfig
from .hybrid import GateConfig, HybridConfig, HybridLinear, gate_history, gate_records, gate_values
from .lora import LoraConfig, LoraLinear
from .lora_ga import LoraGaConfig, LoraGaLinear, estimate_gradients, hf_loss
from .model import (
    adapter_state_dict,
    after_backward,
    apply_method,
    check_method,
    count_parameters,
    init_from_gradients,
    layer_diagnostics,
    load_adapter,
    merge_adapter,
    merge_and_unload,
    read_adapter_config,
    save_adapter,
    trainable_parameters,
    unmerge_adapter,
)
from .registry import METHODS, Method, config_for, get_method, register
from .unitary import UnitaryConfig, UnitaryLinear

__all__ = [
    "DEFAULT_TARGET_MODULES", "METHODS", "AdapterLayer", "BoftConfig", "BoftLinear", "ConfigError",
    "FullConfig", "GateConfig", "HybridConfig", "HybridLinear", "gate_history", "gate_records", "gate_values", "LoraConfig", "LoraGaConfig", "LoraGaLinear", "LoraLinear", "Method", "MethodConfig",
    "adapter_layers", "adapter_state_dict", "after_backward", "apply_method", "check_method", "config_for",
    "count_parameters", "init_from_gradients", "estimate_gradients", "layer_diagnostics", "get_method", "hf_loss", "load_adapter", "merge_adapter", "merge_and_unload",
    "read_adapter_config", "register", "flat_params", "short_name", "save_adapter", "trainable_parameters", "unmerge_adapter",
    "UnitaryConfig", "UnitaryLinear",
]
