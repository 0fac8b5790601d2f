"""Hybrid: the gate's limits equal BOFT and LoRA-GA exactly; the gate moves, stays in bounds, costs no
extra pass, and is identical on every data-parallel rank."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

import methods
from tests.conftest import FAMILIES, family_inputs, logits, run_ranks


def batches(n=4, seed=0):
    return [family_inputs("llama", seed=seed + s) for s in range(n)]


def hybrid(gate: dict | None = None, base=None, **kw):
    base = base if base is not None else FAMILIES["llama"]()
    cfg = methods.config_for("hybrid", {"lora_ga": {"lora": {"r": 4}, "batches": 2}, "gate": gate or {}, **kw})
    return base, methods.apply_method(copy.deepcopy(base), cfg, batches=iter(batches()))


@torch.no_grad()
def randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for p in methods.trainable_parameters(model):
        p.add_(0.1 * torch.randn(p.shape, generator=g))


def test_gate_one_is_exactly_boft():
    base, hyb = hybrid({"fixed": 1.0})
    randomize(hyb)
    boft = methods.apply_method(copy.deepcopy(base), methods.BoftConfig())
    for (name, h), (_, b) in zip(methods.adapter_layers(hyb), methods.adapter_layers(boft)):
        with torch.no_grad():
            b.boft_R.copy_(h.boft_R)
            b.boft_s.copy_(h.boft_s)
    x = family_inputs("llama")
    torch.testing.assert_close(logits(hyb, x), logits(boft, x), atol=1e-5, rtol=1e-5)


def test_gate_zero_is_exactly_lora_ga():
    base, hyb = hybrid({"fixed": 0.0})
    randomize(hyb)  # moves R and s too: at lambda = 0 they must not matter
    ga = methods.apply_method(copy.deepcopy(base), methods.config_for("lora_ga", {"lora": {"r": 4}, "batches": 2}),
                              batches=iter(batches()))
    for (name, h), (_, g) in zip(methods.adapter_layers(hyb), methods.adapter_layers(ga)):
        torch.testing.assert_close(g.lora_A0, h.lora_A0)  # same gradient, same init
        with torch.no_grad():
            g.lora_A.copy_(h.lora_A)
            g.lora_B.copy_(h.lora_B)
    x = family_inputs("llama")
    torch.testing.assert_close(logits(hyb, x), logits(ga, x), atol=1e-5, rtol=1e-5)


def train_steps(model, steps, data, gate_grad_of=None):
    opt = torch.optim.AdamW(methods.trainable_parameters(model), lr=1e-2)
    model.train()
    for step in range(1, steps + 1):
        model(**data[step % len(data)]).loss.backward()
        methods.after_backward(model, step, gate_grad_of)
        opt.step()
        opt.zero_grad()


def test_gate_moves_within_bounds_and_records_history():
    _, model = hybrid({"update_every": 2, "ema": 0.5, "lambda_min": 0.2, "lambda_max": 0.8, "tau": 0.1})
    train_steps(model, 6, batches())
    history = methods.gate_history(model)
    assert len(history) == 4  # q_proj, v_proj in 2 layers
    for name, h in history.items():
        assert [s for s, _ in h] == [2, 4, 6]
        assert all(0.2 <= v <= 0.8 for _, v in h), (name, h)
    values = methods.gate_values(model)
    assert any(abs(v - 0.5) > 1e-3 for v in values.values()), "the gate never moved"
    assert values == {n: h[-1][1] for n, h in history.items()}


def test_direction_flips_the_gate():
    finals = {}
    for direction in ("larger", "smaller"):
        _, model = hybrid({"update_every": 1, "ema": 0.0, "tau": 0.5, "direction": direction,
                           "lambda_min": 0.0, "lambda_max": 1.0})
        train_steps(model, 1, batches())
        finals[direction] = methods.gate_values(model)
    for name, lam in finals["larger"].items():
        assert lam == pytest.approx(1 - finals["smaller"][name], abs=1e-6)  # sigmoid(-z) = 1 - sigmoid(z)


def test_fixed_gate_never_moves_and_schedule_decays_lora_share():
    _, model = hybrid({"fixed": 0.3, "update_every": 1})
    train_steps(model, 3, batches())
    assert all(v == pytest.approx(0.3) for v in methods.gate_values(model).values())
    _, model = hybrid({"update_every": 1, "schedule": "linear", "schedule_steps": 4, "lambda_max": 0.9})
    train_steps(model, 4, batches())
    assert all(v == pytest.approx(1.0) for v in methods.gate_values(model).values())  # a(4) = 0: BOFT only


def test_gate_update_costs_no_forward_or_backward():
    _, model = hybrid({"update_every": 1})
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    model.train()
    model(**batches()[0]).loss.backward()
    assert len(calls) == 1
    methods.after_backward(model, 1)
    assert len(calls) == 1


def test_gate_is_saved_and_loaded(tmp_path):
    base, model = hybrid({"update_every": 1})
    train_steps(model, 2, batches())
    methods.save_adapter(model, tmp_path)
    loaded = methods.load_adapter(copy.deepcopy(base), tmp_path)
    assert methods.gate_values(loaded) == methods.gate_values(model)


def test_bad_hybrid_configs():
    with pytest.raises(methods.ConfigError, match="gate.tau=0"):
        methods.config_for("hybrid", {"gate": {"tau": 0}})
    with pytest.raises(methods.ConfigError, match="gate.lambda_min=0.9"):
        methods.config_for("hybrid", {"gate": {"lambda_min": 0.9, "lambda_max": 0.5}})
    with pytest.raises(methods.ConfigError, match="target_modules: set it on the hybrid"):
        methods.config_for("hybrid", {"boft": {"target_modules": ["q_proj"]}})
    with pytest.raises(methods.ConfigError, match="gate.temperature: unknown key"):
        methods.config_for("hybrid", {"gate": {"temperature": 1}})


# --- data parallelism: two real processes (gloo), different data on each rank --------------------

def _dp_worker(rank: int, world: int, use_ddp: bool, out: str):
    _, model = hybrid({"update_every": 1, "ema": 0.5, "tau": 0.2})
    if use_ddp:  # the reduction happens inside backward, as under DeepSpeed / DDP
        ddp = torch.nn.parallel.DistributedDataParallel(model)
    data = batches(seed=100 * (rank + 1))  # each rank its own shard
    opt = torch.optim.AdamW(methods.trainable_parameters(model), lr=1e-2)
    model.train()
    for step in range(1, 4):
        (ddp if use_ddp else model)(**data[step]).loss.backward()
        methods.after_backward(model, step)
        opt.step()
        opt.zero_grad()
    gates = torch.tensor(list(methods.gate_values(model).values()))
    everyone = [torch.zeros_like(gates) for _ in range(world)]
    dist.all_gather(everyone, gates)
    if rank == 0:
        torch.save(everyone, out)


@pytest.mark.parametrize("use_ddp", [True, False])
def test_every_rank_computes_the_same_gate(use_ddp, tmp_path):
    out = str(tmp_path / "gates.pt")
    run_ranks(_dp_worker, (use_ddp, out))
    g0, g1 = torch.load(out)
    if use_ddp:
        assert torch.equal(g0, g1)
    else:  # control: without gradient reduction the replicas' gates do drift apart
        assert not torch.equal(g0, g1)
