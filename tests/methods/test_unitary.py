"""Unitary adapter: the documented product of dense factors, identity at init, norm preservation,
gradients, merge, save/load, errors and parameter count."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import methods
from methods.unitary import UnitaryLinear
from tests.conftest import FAMILIES, family_inputs, logits


def randomised(d_in: int, d_out: int = 6, seed: int = 0, dtype=torch.float32, **cfg) -> UnitaryLinear:
    """A layer whose urnn parameters are all moved to random values."""
    g = torch.Generator().manual_seed(seed)
    layer = UnitaryLinear(torch.nn.Linear(d_in, d_out).to(dtype), methods.UnitaryConfig(seed=seed, **cfg))
    with torch.no_grad():
        for name in layer.adapter_param_names:
            p = getattr(layer, name)
            p.copy_(torch.randn(p.shape, generator=g))
    return layer


def dense_U(layer: UnitaryLinear) -> torch.Tensor:
    """U = D3 R2 F^-1 D2 Pi R1 F D1 F^-1 Pi^T F from explicit (n, n) complex matrices."""
    n = layer.n
    eye = torch.eye(n, dtype=torch.complex64)
    F = torch.fft.fft(eye, norm="ortho")  # symmetric: fft of each row e_i is column i
    Fi = F.conj().t()
    P = eye[layer._perm]  # (P z)_j = z_perm[j]
    D = [torch.diag(torch.polar(torch.ones(n), t)) for t in layer.urnn_theta.detach().float()]
    R = []
    for re, im in layer.urnn_v.detach().float():
        v = torch.complex(re, im)[:, None]
        R.append(eye - 2 * (v @ v.conj().t()) / (v.conj().t() @ v))
    return D[2] @ R[1] @ Fi @ D[1] @ P @ R[0] @ F @ D[0] @ Fi @ P.t() @ F


@pytest.mark.parametrize("d_in", [2, 8, 30])
def test_rotation_equals_documented_dense_product(d_in):
    layer = randomised(d_in, seed=d_in)
    U = dense_U(layer)
    torch.testing.assert_close(U.conj().t() @ U, torch.eye(d_in // 2, dtype=torch.complex64), atol=1e-5, rtol=0)
    x = torch.randn(3, 4, d_in)
    z = torch.complex(x[..., 0::2], x[..., 1::2])  # interleaved pairs
    expected = torch.view_as_real(z @ U.t()).reshape(x.shape)
    torch.testing.assert_close(layer.rotate(x), expected, atol=1e-5, rtol=1e-5)
    y = layer.urnn_s.detach() * (expected @ layer.base_layer.weight.t()) + layer.base_layer.bias
    torch.testing.assert_close(layer(x), y, atol=1e-5, rtol=1e-5)


def test_identity_at_init(family):
    base = FAMILIES[family]()
    model = methods.apply_method(copy.deepcopy(base), methods.UnitaryConfig())
    assert len(list(methods.adapter_layers(model))) == {"llama": 4, "bert": 4, "gpt2": 2}[family]
    x = family_inputs(family)
    torch.testing.assert_close(logits(model, x), logits(base, x), atol=1e-5, rtol=0)


def test_rotation_at_init_is_exact_in_bf16():
    # v1 = 1 and v2 ∝ e_0 keep their directions when rounded to bf16, so U = I still holds; the fp32
    # FFTs' error (~1e-7) is far below bf16's resolution
    layer = UnitaryLinear(torch.nn.Linear(64, 8).to(torch.bfloat16), methods.UnitaryConfig())
    x = torch.randn(5, 64).to(torch.bfloat16)
    assert torch.equal(layer.rotate(x), x)


@settings(max_examples=30, deadline=None)
@given(half=st.integers(1, 48), seed=st.integers(0, 2**31 - 1))
def test_norm_preserved_for_any_parameters(half, seed):
    layer = randomised(2 * half, seed=seed)
    x = torch.randn(7, 2 * half, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(layer.rotate(x).norm(dim=-1), x.norm(dim=-1), atol=1e-5, rtol=1e-5)
    xb = x.to(torch.bfloat16)  # computed in fp32, cast back once
    yb = layer.rotate(xb)
    assert yb.dtype == torch.bfloat16
    assert torch.equal(yb, layer.rotate(xb.float()).to(torch.bfloat16))
    torch.testing.assert_close(yb.float().norm(dim=-1), xb.float().norm(dim=-1), atol=1e-2, rtol=1e-2)


def test_bf16_layer_runs_in_fp32():
    layer = randomised(16, dtype=torch.bfloat16)
    x = torch.randn(2, 3, 16).to(torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16 and layer.urnn_theta.dtype == torch.bfloat16
    M = layer.dense_rotation()
    torch.testing.assert_close(M @ M.t(), torch.eye(16), atol=1e-5, rtol=0)


def test_every_parameter_group_has_a_gradient_at_init():
    model = methods.apply_method(FAMILIES["llama"](), methods.UnitaryConfig())
    model.train()
    model(**family_inputs("llama")).loss.backward()  # no perturbation: straight from init
    for name, layer in methods.adapter_layers(model):
        for k in range(3):
            assert layer.urnn_theta.grad[k].abs().sum() > 0, f"{name} theta_{k + 1}"
        for k in range(2):
            assert layer.urnn_v.grad[k].abs().sum() > 0, f"{name} v_{k + 1}"
        assert layer.urnn_s.grad.abs().sum() > 0, name
    trainable = {id(p) for p in methods.trainable_parameters(model)}
    for pname, p in model.named_parameters():
        if id(p) not in trainable:
            assert not p.requires_grad and p.grad is None, pname


@pytest.mark.parametrize("output_scale", [True, False])
def test_merge_equals_unmerged_and_unmerge_restores(output_scale):
    model = methods.apply_method(FAMILIES["gpt2"](), methods.UnitaryConfig(output_scale=output_scale))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in methods.trainable_parameters(model):
            p.add_(0.5 * torch.randn(p.shape, generator=g))
    x = family_inputs("gpt2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = logits(model, x)
    methods.merge_adapter(model)
    torch.testing.assert_close(logits(model, x), out, atol=1e-4, rtol=1e-4)
    methods.unmerge_adapter(model)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], atol=1e-5, rtol=1e-4, msg=k)


def test_save_load_round_trip_rebuilds_the_permutation(tmp_path):
    base = FAMILIES["bert"]()
    cfg = methods.UnitaryConfig(output_scale=False, seed=7)
    model = methods.apply_method(copy.deepcopy(base), cfg)
    with torch.no_grad():
        for p in methods.trainable_parameters(model):
            p.add_(0.3 * torch.randn(p.shape))
    methods.save_adapter(model, tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert {k.rsplit(".", 1)[-1] for k in saved} == {"urnn_theta", "urnn_v"}  # Pi is not saved
    loaded = methods.load_adapter(copy.deepcopy(base), tmp_path)
    assert loaded.adapter_config == cfg
    x = family_inputs("bert")
    assert torch.equal(logits(loaded, x), logits(model, x))


def test_odd_width_is_refused_and_names_the_layer():
    with pytest.raises(ValueError, match=r"blk\.proj: in_features \(7\) must be even.*target_modules"):
        UnitaryLinear(torch.nn.Linear(7, 4), methods.UnitaryConfig(), "blk.proj")
    model = torch.nn.Sequential(torch.nn.Linear(8, 5), torch.nn.Linear(5, 3))
    with pytest.raises(ValueError, match=r"^1: in_features \(5\) must be even"):
        methods.apply_method(model, methods.UnitaryConfig(target_modules=["0", "1"]))
    assert not list(methods.adapter_layers(model)), "a rejected config must leave the model untouched"
    methods.apply_method(model, methods.UnitaryConfig(target_modules=["0"]))  # the way around it


@pytest.mark.parametrize(
    "cfg,match",
    [
        ({"seed": -1}, "seed=-1: must be an integer >= 0"),
        ({"seed": 1.5}, "seed=1.5: must be an integer"),
        ({"output_scale": "yes"}, "output_scale='yes': must be true or false"),
        ({"block_size": 4}, "block_size: unknown key for UnitaryConfig"),
    ],
)
def test_bad_config_rejected(cfg, match):
    with pytest.raises(methods.ConfigError, match=match):
        methods.config_for("unitary", cfg)


@pytest.mark.parametrize("output_scale", [True, False])
def test_parameter_count_is_linear_in_width(output_scale):
    model = methods.apply_method(FAMILIES["llama"](), methods.UnitaryConfig(output_scale=output_scale))
    # 2 blocks x (q_proj 32 -> 32, v_proj 32 -> 16): theta 3n + reflections 2 * 2n = 7n per layer,
    # n = d_in / 2 = 16, plus s (d_out) with output_scale
    expected = 4 * 7 * 16 + (2 * (32 + 16) if output_scale else 0)
    assert methods.count_parameters(model)[0] == expected
    for _, layer in methods.adapter_layers(model):
        assert layer.urnn_theta.shape == (3, 16) and layer.urnn_v.shape == (2, 2, 16)
