"""LoRA-GA: the official algorithm (ArB2r, stable scale), recomputed independently here; PEFT's variant."""

from __future__ import annotations

import copy

import peft
import pytest
import torch

import methods
from methods.lora_ga import gradient_init
from tests.conftest import FAMILIES, family_inputs, logits

R = 4


def batches(family="llama", n=4):
    return [family_inputs(family, batch=2, seed=s) for s in range(n)]


def reference_gradients(base, family="llama"):
    """Mean dL/dW of the default targets over the batches, with plain autograd on a fresh copy."""
    model = copy.deepcopy(base).train()
    targets = {n: m for n, m in model.named_modules() if n.endswith(("q_proj", "v_proj"))}
    model.zero_grad()
    for b in batches(family):
        model(**b).loss.backward()
    return {n: m.weight.grad / len(batches(family)) for n, m in targets.items()}


def assert_same_up_to_sign(ours: torch.Tensor, ref: torch.Tensor, dim: int):
    """Columns (dim=0) / rows (dim=1) equal up to a sign flip each: SVD's sign is arbitrary."""
    cos = torch.nn.functional.cosine_similarity(ours, ref, dim=dim)
    torch.testing.assert_close(cos.abs(), torch.ones_like(cos), atol=1e-3, rtol=0)
    torch.testing.assert_close(ours.norm(dim=dim), ref.norm(dim=dim), atol=1e-4, rtol=1e-4)


def test_matches_official_algorithm_recomputed_independently():
    base = FAMILIES["llama"]()
    model = methods.apply_method(
        copy.deepcopy(base), methods.config_for("lora_ga", {"lora": {"r": R}, "batches": 4}), batches=iter(batches())
    )
    grads = reference_gradients(base)
    for name, layer in methods.adapter_layers(model):
        G = grads[name]
        U, S, Vh = torch.linalg.svd(G, full_matrices=False)  # exact SVD, not the randomised one
        factor = G.shape[0] ** 0.25 / 16**0.5  # stable scale, gamma = 16, on A and B
        A_ref, B_ref = Vh[:R] * factor, U[:, R : 2 * R] * factor  # ArB2r
        assert_same_up_to_sign(layer.lora_A0, A_ref, dim=1)
        assert_same_up_to_sign(layer.lora_B0, B_ref, dim=0)
        assert torch.equal(layer.lora_A, layer.lora_A0) and torch.equal(layer.lora_B, layer.lora_B0)
    x = family_inputs("llama")
    torch.testing.assert_close(logits(model, x), logits(base, x), atol=1e-5, rtol=1e-5)  # W0 compensated


def test_peft_variant_differs_as_documented():
    """PEFT: B = U[:, r:2r] diag(S[r:2r]) and the stable scale on B only; official: S unused, scale on both."""
    base = FAMILIES["llama"]()
    ours = methods.apply_method(
        copy.deepcopy(base), methods.config_for("lora_ga", {"lora": {"r": R}, "batches": 4}), batches=iter(batches())
    )
    theirs_base = copy.deepcopy(base)
    cfg = peft.LoraConfig(r=R, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights="lora_ga",
                          lora_ga_config=peft.LoraGAConfig())

    def train_step():
        for b in batches():
            theirs_base(**b).loss.backward()

    peft.tuners.lora.preprocess_loraga(theirs_base, cfg, train_step)
    theirs = peft.get_peft_model(theirs_base, cfg)
    grads = reference_gradients(base)
    for name, layer in methods.adapter_layers(ours):
        peer = theirs.base_model.model.get_submodule(name)
        S = torch.linalg.svdvals(grads[name])[R : 2 * R]
        factor = layer.d_out**0.25 / 4
        assert_same_up_to_sign(peer.lora_A["default"].weight.detach(), layer.lora_A0 / factor, dim=1)
        assert_same_up_to_sign(peer.lora_B["default"].weight.detach(), layer.lora_B0 * S, dim=0)


def test_svd_is_identical_whatever_the_global_rng():
    """Data-parallel replicas must start from the same A, B: the randomised SVD is seeded."""
    G = torch.randn(32, 24)
    cfg = methods.LoraGaConfig()
    torch.manual_seed(1)
    a1, b1 = gradient_init(G, cfg)
    torch.manual_seed(2)
    a2, b2 = gradient_init(G, cfg)
    assert torch.equal(a1, a2) and torch.equal(b1, b2)
    state = torch.get_rng_state()
    gradient_init(G, cfg)
    assert torch.equal(state, torch.get_rng_state()), "must not consume the caller's RNG"


@pytest.mark.parametrize("direction", ["ArB2r", "A2rBr", "ArBr", "random"])
@pytest.mark.parametrize("scale", ["stable", "gd", "unit"])
def test_directions_and_scales(direction, scale):
    G = torch.randn(32, 24, generator=torch.Generator().manual_seed(0))
    cfg = methods.config_for("lora_ga", {"lora": {"r": R}, "direction": direction, "scale": scale})
    A, B = gradient_init(G, cfg)
    assert A.shape == (R, 24) and B.shape == (32, R)
    # A's rows (and B's columns) are orthogonal singular vectors, scaled as the option says.
    norm = {"stable": 32**0.25 / 4, "gd": 1 / cfg.lora.scaling, "unit": 1.0}[scale]
    torch.testing.assert_close(A @ A.t(), norm**2 * torch.eye(R), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(B.t() @ B, norm**2 * torch.eye(R), atol=1e-4, rtol=1e-4)


def test_needs_batches_and_a_large_enough_layer():
    with pytest.raises(ValueError, match="pass batches="):
        methods.apply_method(FAMILIES["llama"](), methods.config_for("lora_ga"))
    consumed = []
    with pytest.raises(ValueError, match=r"v_proj: lora_ga needs 2r=24 <= min\(in_features=32, out_features=16\)"):
        methods.apply_method(FAMILIES["llama"](), methods.config_for("lora_ga", {"lora": {"r": 12}}),
                             batches=iter(batches()), loss_fn=lambda m, b: consumed.append(b))
    assert not consumed, "shape errors must come before the gradient estimate"
    with pytest.raises(ValueError, match="yielded no batch"):
        methods.apply_method(FAMILIES["llama"](), methods.config_for("lora_ga"), batches=iter([]))
    with pytest.raises(methods.ConfigError, match="direction='BrAr'"):
        methods.config_for("lora_ga", {"direction": "BrAr"})


def test_only_the_first_batches_are_used_and_frozen_state_restored():
    base = FAMILIES["llama"]()
    used = []

    def loss_fn(model, batch):
        used.append(batch)
        return model(**batch).loss

    model = methods.apply_method(copy.deepcopy(base), methods.config_for("lora_ga", {"batches": 2}),
                                 batches=iter(batches(n=5)), loss_fn=loss_fn)
    assert len(used) == 2
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
