"""BOFT: input-side butterfly rotation against PEFT (depth 1) and a dense reference (any depth)."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from peft.tuners.boft.layer import BOFTLayer

import methods
from methods.boft import BoftLinear, butterfly_perm, cayley
from tests.conftest import FAMILIES, family_inputs, logits


def peft_dense_rotation(boft_R: torch.Tensor, d_in: int, D: int, b: int) -> torch.Tensor:
    """R = B_{m-1} ... B_0 with B_i = P_i blockdiag(Q_i) P_i^T, straight from PEFT's own functions."""
    m = boft_R.shape[0]
    R = torch.eye(d_in)
    for i in range(m):
        perm = BOFTLayer.block_butterfly_perm(None, d_in, D // 2**i, b // 2, m - 1)
        P = BOFTLayer.perm2mat(None, perm)
        Q = BOFTLayer.cayley_batch(None, boft_R[i])
        R = P @ torch.block_diag(*Q) @ P.t() @ R
    return R


@pytest.mark.parametrize("depth,block", [(1, 4), (2, 4), (3, 2), (3, 4), (2, 8)])
def test_rotation_equals_dense_reference(depth, block):
    torch.manual_seed(0)
    layer = BoftLinear(torch.nn.Linear(32, 16), methods.BoftConfig(block_size=block, n_butterfly_factor=depth))
    with torch.no_grad():
        layer.boft_R.normal_(std=0.3)
        layer.boft_s.uniform_(0.5, 1.5)
    R = peft_dense_rotation(layer.boft_R.detach(), 32, 32 // block, block)
    torch.testing.assert_close(R.t() @ R, torch.eye(32), atol=1e-5, rtol=0)  # orthogonal
    x = torch.randn(3, 5, 32)
    expected = layer.boft_s.detach() * (x @ R @ layer.base_layer.weight.t()) + layer.base_layer.bias
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.dense_rotation(), R, atol=1e-6, rtol=1e-5)


def test_butterfly_perm_matches_peft():
    for n, D, b in [(32, 8, 4), (64, 16, 4), (48, 6, 8)]:
        for i in range(1, 3):
            if D % 2**i == 0:
                assert torch.equal(butterfly_perm(n, D // 2**i, b // 2),
                                   BOFTLayer.block_butterfly_perm(None, n, D // 2**i, b // 2, 1))


def test_same_outputs_as_peft_boft_depth_1(family):
    base = FAMILIES[family]()
    targets = list(methods.DEFAULT_TARGET_MODULES[family])
    if family == "gpt2":
        pytest.skip("PEFT's BOFT rejects GPT-2's Conv1D; ours is covered by the dense reference")
    ours = methods.apply_method(copy.deepcopy(base), methods.BoftConfig(block_size=4))
    theirs = peft.get_peft_model(
        copy.deepcopy(base), peft.BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=1, target_modules=targets)
    )
    g = torch.Generator().manual_seed(0)
    for name, layer in methods.adapter_layers(ours):
        with torch.no_grad():
            layer.boft_R.normal_(std=0.2, generator=g)
            layer.boft_s.uniform_(0.5, 1.5, generator=g)
            peer = theirs.base_model.model.get_submodule(name)
            peer.boft_R["default"].copy_(layer.boft_R)
            peer.boft_s["default"].copy_(layer.boft_s[:, None])
    x = family_inputs(family)
    torch.testing.assert_close(logits(ours, x), logits(theirs, x), atol=1e-5, rtol=1e-5)
    assert methods.count_parameters(ours)[0] == theirs.get_nb_trainable_parameters()[0]


def test_neumann_is_close_to_exact_cayley_for_small_blocks():
    R = 0.02 * torch.randn(10, 4, 4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(cayley(R, "neumann", 5), cayley(R, "exact"), atol=1e-6, rtol=0)
    assert cayley(R, "neumann", 5).dtype == torch.float32


def test_fp32_cayley_under_bf16_activations():
    layer = BoftLinear(torch.nn.Linear(16, 8).to(torch.bfloat16), methods.BoftConfig(block_size=4))
    y = layer(torch.randn(2, 16, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16


@pytest.mark.parametrize(
    "cfg,match",
    [
        ({"block_size": 4, "block_num": 2}, "set at most one of them"),
        ({"block_size": 3, "n_butterfly_factor": 2}, "block_size=3: must be even"),
        ({"block_num": 6, "n_butterfly_factor": 3}, "block_num=6: must be even and divisible by"),
        ({"n_butterfly_factor": 0}, "n_butterfly_factor=0"),
        ({"cayley": "qr"}, "cayley='qr': must be one of 'exact', 'neumann'"),
    ],
)
def test_bad_config_rejected_before_any_model(cfg, match):
    with pytest.raises(methods.ConfigError, match=match):
        methods.config_for("boft", cfg)


def test_shape_errors_name_the_layer_and_constraint():
    model = FAMILIES["llama"]()  # hidden 32
    with pytest.raises(ValueError, match=r"layers\.0\.self_attn\.q_proj: in_features \(32\) must be divisible by block_size \(5\)"):
        methods.apply_method(model, methods.config_for("boft", {"block_size": 5}))
    with pytest.raises(ValueError, match=r"q_proj: n_butterfly_factor=5 needs the block count \(8 .*at most 4"):
        methods.apply_method(model, methods.config_for("boft", {"block_size": 4, "n_butterfly_factor": 5}))
    assert not list(methods.adapter_layers(model)), "a rejected config must leave the model untouched"


def test_parameters_grow_linearly_with_depth():
    counts = [
        methods.count_parameters(methods.apply_method(FAMILIES["llama"](), methods.BoftConfig(block_size=4, n_butterfly_factor=m)))[0]
        for m in (1, 2, 3)
    ]
    # per layer: m * D * b^2 (= m * 32 * 4) + d_out scale
    assert counts[1] - counts[0] == counts[2] - counts[1] > 0
