"""The contract every registered method keeps, on tiny Llama, BERT and GPT-2 models.

New methods registered in `methods.METHODS` are picked up here automatically.
"""

from __future__ import annotations

import copy

import pytest
import torch

import methods
from tests.conftest import FAMILIES, family_inputs, logits

METHOD_NAMES = sorted(methods.METHODS)


def adapt(family: str, name: str, cfg: dict | None = None):
    base = FAMILIES[family]()
    model = copy.deepcopy(base)
    batches = [family_inputs(family, seed=s) for s in range(4)]
    methods.apply_method(model, methods.config_for(name, cfg), batches=iter(batches))
    return base, model


@torch.no_grad()
def perturb(model, seed: int = 0, scale: float = 0.05):
    """Move every trainable tensor away from its init, as training would."""
    g = torch.Generator().manual_seed(seed)
    for p in methods.trainable_parameters(model):
        p.add_(scale * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_identity_at_init(family, name):
    base, model = adapt(family, name)
    x = family_inputs(family)
    torch.testing.assert_close(logits(model, x), logits(base, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_gradient_reaches_only_adapter_parameters(family, name):
    _, model = adapt(family, name)
    perturb(model)  # away from init, where e.g. LoRA's dA is exactly zero
    model.train()
    model(**family_inputs(family)).loss.backward()
    trainable = {id(p) for p in methods.trainable_parameters(model)}
    for pname, p in model.named_parameters():
        if id(p) in trainable:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, pname
        else:
            assert not p.requires_grad and p.grad is None, pname
    n_trainable, n_total = methods.count_parameters(model)
    assert n_trainable == sum(p.numel() for p in methods.trainable_parameters(model))
    assert 0 < n_trainable <= n_total
    if name != "full":
        assert n_trainable < 0.5 * n_total


@pytest.mark.parametrize("name", [n for n in METHOD_NAMES if n != "full"])
def test_merge_equals_unmerged_and_unmerge_restores(family, name):
    _, model = adapt(family, name)
    perturb(model)
    x = family_inputs(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = logits(model, x)
    methods.merge_adapter(model)
    torch.testing.assert_close(logits(model, x), out, atol=1e-4, rtol=1e-4)
    methods.unmerge_adapter(model)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], atol=1e-5, rtol=1e-4, msg=k)
    torch.testing.assert_close(logits(model, x), out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_save_load_round_trip_is_exact(family, name, tmp_path):
    base, model = adapt(family, name)
    perturb(model)
    methods.save_adapter(model, tmp_path)
    assert (tmp_path / "adapter_config.json").exists() and (tmp_path / "adapter_model.safetensors").exists()
    assert methods.read_adapter_config(tmp_path) == model.adapter_config
    loaded = methods.load_adapter(copy.deepcopy(base), tmp_path)
    x = family_inputs(family)
    assert torch.equal(logits(loaded, x), logits(model, x))
    assert methods.count_parameters(loaded) == methods.count_parameters(model)


def test_save_refuses_merged_adapter(tmp_path):
    _, model = adapt("llama", "lora")
    methods.merge_adapter(model)
    with pytest.raises(ValueError, match="merged"):
        methods.save_adapter(model, tmp_path)


def test_load_rejects_adapter_of_another_shape(tmp_path):
    _, model = adapt("llama", "lora", {"r": 4})
    methods.save_adapter(model, tmp_path)
    other = FAMILIES["gpt2"]()
    with pytest.raises(ValueError):
        methods.load_adapter(other, tmp_path)


def test_config_round_trips_through_dict_and_pickle():
    import pickle

    for name, method in methods.METHODS.items():
        cfg = method.config_cls()
        assert method.config_cls.from_dict(cfg.to_dict()) == cfg
        assert pickle.loads(pickle.dumps(cfg)) == cfg
        assert copy.deepcopy(cfg) == cfg
        assert all(help for help in cfg.field_help().values()), name


def test_default_targets_per_family():
    expected = {"llama": {"q_proj", "v_proj"}, "bert": {"query", "value"}, "gpt2": {"c_attn"}}
    for family, names in expected.items():
        _, model = adapt(family, "lora")
        adapted = {n.rsplit(".", 1)[-1] for n, _ in methods.adapter_layers(model)}
        assert adapted == names


def test_target_modules_regex_and_list():
    _, model = adapt("llama", "lora", {"target_modules": r".*layers\.0\.self_attn\.(q|k)_proj"})
    assert [n for n, _ in methods.adapter_layers(model)] == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"]
    _, model = adapt("llama", "lora", {"target_modules": ["o_proj", "down_proj"]})
    assert len(list(methods.adapter_layers(model))) == 4


def test_bad_targets_are_clear():
    with pytest.raises(ValueError, match="matched no"):
        adapt("llama", "lora", {"target_modules": ["nonexistent"]})
    with pytest.raises(ValueError, match="only nn.Linear and Conv1D"):
        adapt("llama", "lora", {"target_modules": ["self_attn"]})


def test_applying_twice_is_refused():
    _, model = adapt("llama", "lora")
    with pytest.raises(ValueError, match="already carries"):
        methods.apply_method(model, methods.config_for("lora"))


def test_unknown_method_and_unknown_key():
    with pytest.raises(ValueError, match="unknown method"):
        methods.config_for("dora")
    with pytest.raises(methods.ConfigError, match="rank: unknown key for LoraConfig"):
        methods.config_for("lora", {"rank": 8})
    with pytest.raises(methods.ConfigError, match=r"lora\.alpha=-1"):
        methods.config_for("lora_ga", {"lora": {"alpha": -1}})


@pytest.mark.parametrize("name", ["lora", "boft"])
def test_modules_to_save_train_fully_and_round_trip(name, tmp_path):
    base = FAMILIES["bert"]()
    model = methods.apply_method(copy.deepcopy(base), methods.config_for(name), modules_to_save=["classifier"])
    head = set(map(id, model.classifier.parameters()))
    assert head <= {id(p) for p in methods.trainable_parameters(model)}
    assert all(p.requires_grad for p in model.classifier.parameters())
    perturb(model)
    methods.save_adapter(model, tmp_path)
    loaded = methods.load_adapter(copy.deepcopy(base), tmp_path)
    x = family_inputs("bert")
    assert torch.equal(logits(loaded, x), logits(model, x))
    with pytest.raises(ValueError, match="modules_to_save: 'head'"):
        methods.apply_method(copy.deepcopy(base), methods.config_for(name), modules_to_save=["head"])
