"""LoRA: parity with huggingface/peft's LoRA given the same A and B."""

from __future__ import annotations

import copy

import peft
import pytest
import torch

import methods
from tests.conftest import FAMILIES, family_inputs, logits


@pytest.mark.parametrize("use_rslora", [False, True])
def test_same_outputs_as_peft_lora(family, use_rslora):
    targets = list(methods.DEFAULT_TARGET_MODULES[{"llama": "llama", "bert": "bert", "gpt2": "gpt2"}[family]])
    base = FAMILIES[family]()
    ours = methods.apply_method(
        copy.deepcopy(base), methods.config_for("lora", {"r": 4, "alpha": 8, "use_rslora": use_rslora})
    )
    theirs = peft.get_peft_model(
        copy.deepcopy(base),
        peft.LoraConfig(r=4, lora_alpha=8, use_rslora=use_rslora, target_modules=targets,
                        fan_in_fan_out=family == "gpt2"),
    )
    g = torch.Generator().manual_seed(0)
    for name, layer in methods.adapter_layers(ours):
        with torch.no_grad():
            layer.lora_B.normal_(generator=g)
            peer = theirs.base_model.model.get_submodule(name)
            peer.lora_A["default"].weight.copy_(layer.lora_A)
            peer.lora_B["default"].weight.copy_(layer.lora_B)
    x = family_inputs(family)
    torch.testing.assert_close(logits(ours, x), logits(theirs, x), atol=1e-5, rtol=1e-5)
    assert methods.count_parameters(ours)[0] == theirs.get_nb_trainable_parameters()[0]


def test_bad_hyperparameters():
    with pytest.raises(methods.ConfigError, match="r=0: must be an integer >= 1"):
        methods.config_for("lora", {"r": 0})
    with pytest.raises(methods.ConfigError, match="dropout=1.5"):
        methods.config_for("lora", {"dropout": 1.5})
    with pytest.raises(ValueError, match=r"q_proj: r=64 exceeds min\(in_features=32"):
        methods.apply_method(FAMILIES["llama"](), methods.config_for("lora", {"r": 64}))
