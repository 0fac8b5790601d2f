"""Hybrid: the gate's limits equal BOFT and LoRA-GA exactly; the gate moves, settles where the
branches' own gradient ratio puts it (not at a bound), differs between layers, stays in bounds,
costs no extra pass, and is identical on every data-parallel rank, under ZeRO-3 too."""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch
import torch.distributed as dist
from torch import nn

import methods
from methods.hybrid import NORM_KEYS
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
    records = methods.gate_records(model)
    assert {n: [(r["step"], r["gate"]) for r in rs] for n, rs in records.items()} == history
    assert all(set(r) == {"step", "gate", *NORM_KEYS} for rs in records.values() for r in rs)


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


# --- the gate's fixed point: lambda goes where the branches' own gradient ratio puts it ----------

def sigmoid(z: float) -> float:
    return 1 / (1 + math.exp(-z))


def synthetic_layer(gate: dict) -> methods.HybridLinear:
    torch.manual_seed(0)
    cfg = methods.config_for("hybrid", {"lora_ga": {"lora": {"r": 2}}, "gate": gate})
    layer = methods.HybridLinear(nn.Linear(16, 16), cfg, "layer")
    layer.init_from_gradient(torch.randn(16, 16))
    return layer


def own_gradients(layer: methods.HybridLinear, log_ratio: float) -> dict[str, torch.Tensor]:
    """Each branch's gradient at unit share, with per-parameter norms in the ratio e^log_ratio
    (BOFT : LoRA-GA), i.e. log(g_BO / g_GA) = log_ratio after the gate's normalisation."""
    g = torch.Generator().manual_seed(1)
    own = {n: torch.randn(getattr(layer, n).shape, generator=g) for n in ("boft_R", "lora_A", "lora_B")}
    ga = torch.sqrt(own["lora_A"].square().sum() + own["lora_B"].square().sum()) / math.sqrt(
        own["lora_A"].numel() + own["lora_B"].numel())
    own["lora_A"], own["lora_B"] = own["lora_A"] / ga, own["lora_B"] / ga
    own["boft_R"] = own["boft_R"] * math.exp(log_ratio) / (own["boft_R"].norm() / math.sqrt(own["boft_R"].numel()))
    return own


def feed(layer: methods.HybridLinear, own: dict[str, torch.Tensor], steps: int) -> None:
    """What the forward would hand the gate: R's gradient scaled by the lambda it used, A's and
    B's by 1 - lambda."""
    for step in range(1, steps + 1):
        lam = float(layer.hybrid_gate)
        layer.boft_R.grad = lam * own["boft_R"]
        layer.lora_A.grad = (1 - lam) * own["lora_A"]
        layer.lora_B.grad = (1 - lam) * own["lora_B"]
        layer.after_backward(step)


@pytest.mark.parametrize("direction", ["larger", "smaller"])
@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0])
def test_gate_settles_at_the_predicted_fixed_point(tau, direction):
    c = -0.8  # the BOFT branch's own gradient is e^-0.8 of LoRA-GA's (per parameter)
    sign = 1 if direction == "larger" else -1
    predicted = sigmoid(sign * c / tau)  # 0.17 .. 0.83: interior for every tau here
    for init in (0.1, 0.9):  # from either side
        layer = synthetic_layer({"update_every": 1, "ema": 0.9, "tau": tau, "direction": direction, "init": init})
        feed(layer, own_gradients(layer, c), 150)
        assert float(layer.hybrid_gate) == pytest.approx(predicted, abs=1e-4), (init, layer.gate_records[-1])
        assert layer.diagnostics()["gate_target"] == pytest.approx(predicted, abs=1e-5)
    # a ratio beyond what the bounds allow: the prediction is clamped, as the formula says
    layer = synthetic_layer({"update_every": 1, "tau": tau, "direction": direction})
    feed(layer, own_gradients(layer, -6.0), 150)
    assert float(layer.hybrid_gate) == pytest.approx(0.05 if sign > 0 else 0.95, abs=1e-6)


def test_schedule_descales_by_the_lambda_the_forward_used():
    """With the schedule the forward mixes with lambda_eff = 1 - (1 - lambda) a(t): the gradients
    carry lambda_eff, so the gate divides by it, and lambda's own fixed point stays put."""
    c, tau = -0.8, 1.0
    layer = synthetic_layer({"update_every": 1, "tau": tau, "schedule": "linear", "schedule_steps": 1000})
    feed(layer, own_gradients(layer, c), 200)
    lam = float(layer.hybrid_gate_ema)
    assert lam == pytest.approx(sigmoid(c / tau), abs=1e-4)
    assert float(layer.hybrid_gate) == pytest.approx(1 - (1 - lam) * (1 - 200 / 1000), abs=1e-6)


class TwoBranches(nn.Module):
    """head(tanh(a(x) + b(x))), a and b equal but a's weight `k` times b's. Both see the same input
    and the same output gradient, so their LoRA-GA inits and low-rank gradients are equal, while
    R's gradient, which passes through W0, is k times larger in a. `scale` (on both weights) sets
    the two branches' own gradients about equal per parameter at init (log ratio ~0), so that every
    tau below has its fixed point well inside the bounds, during training too."""

    def __init__(self, k: float = 1.0, scale: float = 8.0, d: int = 16):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.head = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, 4)
        with torch.no_grad():
            self.a.weight.mul_(scale)
            self.b.load_state_dict(self.a.state_dict())
            self.a.weight.mul_(k)

    def forward(self, x):
        return self.head(torch.tanh(self.a(x) + self.b(x)))


def mse(model, batch):
    return nn.functional.mse_loss(model(batch[0]), batch[1])


def two_branch_data(n=4):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(32, 16, generator=g), torch.randn(32, 4, generator=g)) for _ in range(n)]


def two_branch_hybrid(gate: dict, k: float = 1.0):
    cfg = methods.config_for("hybrid", {"lora_ga": {"lora": {"r": 2}, "batches": 2}, "target_modules": ["a", "b"],
                                        "gate": gate})
    return methods.apply_method(TwoBranches(k), cfg, batches=iter(two_branch_data()), loss_fn=mse)


def own_log_ratio(model, batch) -> dict[str, float]:
    """log(g_BO / g_GA) per layer from the branches measured alone (shares 1 and 0), normalised."""
    norms: dict[str, dict[float, float]] = {}
    saved = {n: float(m.hybrid_gate) for n, m in methods.adapter_layers(model)}
    for share in (1.0, 0.0):
        for _, m in methods.adapter_layers(model):
            m.hybrid_gate.fill_(share)
        model.zero_grad()
        mse(model, batch).backward()
        for name, m in methods.adapter_layers(model):
            if share == 1.0:
                norms.setdefault(name, {})[share] = float(m.boft_R.grad.norm()) / math.sqrt(m.boft_R.numel())
            else:
                ga = torch.sqrt(m.lora_A.grad.square().sum() + m.lora_B.grad.square().sum())
                norms[name][share] = float(ga) / math.sqrt(m.lora_A.numel() + m.lora_B.numel())
    model.zero_grad()
    for name, m in methods.adapter_layers(model):
        m.hybrid_gate.fill_(saved[name])
    return {name: math.log(n[1.0] / n[0.0]) for name, n in norms.items()}


@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0])
def test_real_forward_settles_where_its_own_gradients_predict(tau):
    """Real forward and backward, no optimizer step: at init the output doesn't depend on lambda, so
    neither do the branches' own gradients, and lambda must reach the value they predict from
    either side (the old raw-norm gate ran to a bound here)."""
    batch = two_branch_data()[0]
    for init in (0.2, 0.8):
        model = two_branch_hybrid({"update_every": 1, "ema": 0.8, "tau": tau, "init": init})
        c = own_log_ratio(model, batch)
        predicted = {name: sigmoid(v / tau) for name, v in c.items()}
        assert all(0.1 < p < 0.9 for p in predicted.values()), predicted  # interior: the test means something
        for step in range(1, 81):
            mse(model, batch).backward()
            methods.after_backward(model, step)
            model.zero_grad()
        for name, value in methods.gate_values(model).items():
            assert value == pytest.approx(predicted[name], abs=1e-4), (init, name, value, predicted[name])


@pytest.mark.parametrize("direction", ["larger", "smaller"])
def test_layer_with_the_larger_boft_gradient_gets_the_predicted_side(direction):
    """Layer a's R gradient is 4x layer b's, everything else equal: after 100 training steps a's
    lambda is above b's for "larger" and below for "smaller", both strictly inside the bounds."""
    model = two_branch_hybrid({"update_every": 2, "tau": 1.0, "direction": direction}, k=4.0)
    data = two_branch_data()
    c = own_log_ratio(model, data[0])
    assert c["a"] - c["b"] == pytest.approx(math.log(4), abs=1e-3)  # the construction does what it says
    opt = torch.optim.AdamW(methods.trainable_parameters(model), lr=1e-2)
    for step in range(1, 101):
        mse(model, data[step % len(data)]).backward()
        methods.after_backward(model, step)
        opt.step()
        opt.zero_grad()
    gates = methods.gate_values(model)
    if direction == "larger":
        assert gates["a"] > gates["b"] + 0.1, gates
    else:
        assert gates["a"] < gates["b"] - 0.1, gates
    assert all(0.06 < v < 0.94 for v in gates.values()), gates


@pytest.mark.parametrize("model_kind, tau", [("mlp", 0.5), ("mlp", 1.0), ("mlp", 2.0), ("llama", 2.0)])
def test_gate_stays_inside_its_bounds_on_a_real_training_run(model_kind, tau):
    """200 AdamW steps: lambda follows the branches' own ratio to an interior value instead of
    running to lambda_min (with the old gate: every layer at 0.05 by step 50 on a tiny Llama). The
    Llama's BOFT gradient is ~30x smaller than its LoRA-GA gradient per parameter, which for tau < 2
    puts its fixed point below lambda_min; tau = 2 keeps it inside."""
    gate = {"update_every": 2, "tau": tau}
    if model_kind == "mlp":
        model, data = two_branch_hybrid(gate), two_branch_data()
        loss = mse
    else:
        _, model = hybrid(gate)
        data = batches(8, seed=10)

        def loss(m, b):
            return m(**b).loss
    opt = torch.optim.AdamW(methods.trainable_parameters(model), lr=1e-2)
    model.train()
    for step in range(1, 201):
        loss(model, data[step % len(data)]).backward()
        methods.after_backward(model, step)
        opt.step()
        opt.zero_grad()
    for name, records in methods.gate_records(model).items():
        lam = records[-1]["gate"]
        assert 0.05 + 0.02 < lam < 0.95 - 0.02, (name, lam)
        recent = [r["gate_target"] for r in records[-20:]]  # where the EMA is heading, from the own norms
        assert min(recent) - 0.05 < lam < max(recent) + 0.05, (name, lam, recent)


def test_gate_from_a_pure_branch_starts_moving():
    """At lambda = 1 the LoRA-GA branch gets no gradient (at 0 BOFT's): nothing to measure, so the
    first update only brings lambda into its bounds; from there it adapts."""
    for init, bound in ((1.0, 0.95), (0.0, 0.05)):
        _, model = hybrid({"init": init, "update_every": 1, "tau": 4.0})  # tau 4: a target well inside
        data = batches()
        model.train()
        model(**data[0]).loss.backward()
        methods.after_backward(model, 1)
        model.zero_grad()
        for d in methods.layer_diagnostics(model).values():
            assert d["gate"] == pytest.approx(bound) and math.isnan(d["gate_target"]), d
        model(**data[1]).loss.backward()
        methods.after_backward(model, 2)
        for d in methods.layer_diagnostics(model).values():
            assert 0.05 < d["gate_target"] < 0.95 and d["gate"] != pytest.approx(bound), d


def test_diagnostics_report_the_gate_and_the_norms_behind_it():
    _, model = hybrid({"update_every": 2, "tau": 0.5})
    before = methods.layer_diagnostics(model)
    assert set(before) == set(methods.gate_values(model))
    assert all(d["gate"] == 0.5 and all(math.isnan(d[k]) for k in NORM_KEYS) for d in before.values())
    model.train()
    model(**batches()[0]).loss.backward()
    methods.after_backward(model, 2)
    after = methods.layer_diagnostics(model)
    for name, layer in methods.adapter_layers(model):
        d, gA, gB, gR = after[name], layer.lora_A.grad, layer.lora_B.grad, layer.boft_R.grad
        bo = float(gR.norm()) / math.sqrt(gR.numel())
        ga = math.sqrt(float(gA.square().sum() + gB.square().sum()) / (gA.numel() + gB.numel()))
        assert d["grad_norm_boft"] == pytest.approx(bo, rel=1e-5)
        assert d["grad_norm_lora_ga"] == pytest.approx(ga, rel=1e-5)
        assert d["branch_norm_boft"] == pytest.approx(bo / 0.5, rel=1e-5)  # the forward's lambda was 0.5
        assert d["branch_norm_lora_ga"] == pytest.approx(ga / 0.5, rel=1e-5)
        assert d["gate_target"] == pytest.approx(sigmoid(math.log(bo / ga) / 0.5), rel=1e-5)
        assert d["gate"] == pytest.approx(0.9 * 0.5 + 0.1 * d["gate_target"], rel=1e-5)
    lora = methods.apply_method(FAMILIES["llama"](), methods.config_for("lora"))
    assert methods.layer_diagnostics(lora) == {}  # layers without diagnostics are left out


def test_lora_dropout_applies_to_the_low_rank_branch_only():
    base, model = hybrid({"fixed": 0.5}, lora_ga={"lora": {"r": 4, "dropout": 0.5}, "batches": 2})
    x = family_inputs("llama")
    model.train()  # at init the update B A - B0 A0 is zero: dropout on its input changes nothing
    torch.testing.assert_close(logits(model, x), logits(base, x), atol=1e-5, rtol=1e-5)
    randomize(model)
    torch.manual_seed(0)
    first = logits(model, x)
    torch.manual_seed(1)
    assert not torch.allclose(first, logits(model, x)), "dropout is not applied in train mode"
    _, plain = hybrid({"fixed": 0.5})
    plain.load_state_dict(model.state_dict())
    model.eval()
    torch.testing.assert_close(logits(model, x), logits(plain, x))  # eval mode: no dropout
    _, boft_only = hybrid({"fixed": 1.0}, lora_ga={"lora": {"r": 4, "dropout": 0.5}, "batches": 2})
    randomize(boft_only)
    boft_only.train()  # the rotation path sees the clean input
    torch.testing.assert_close(logits(boft_only, x), logits(boft_only.eval(), x))


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


# --- ZeRO-3: parameters and gradients partitioned across the ranks -------------------------------

ZERO3_GATE = {"update_every": 1, "ema": 0.5, "tau": 0.5}


def _zero3_worker(rank: int, world: int, out: str):
    """The real trainer's calls (orchestrator/worker.py): DeepSpeed ZeRO-3, `after_backward` after
    `engine.backward` with `safe_get_full_grad`, which gathers each partitioned gradient."""
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/torch_extensions"))
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    _, model = hybrid(ZERO3_GATE)
    params = methods.trainable_parameters(model)
    config = {"train_batch_size": 2 * world, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 3}, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=config,
                                      optimizer=torch.optim.AdamW(params, lr=1e-2))
    assert all(hasattr(p, "ds_id") for p in params)  # really partitioned: p.grad holds no full gradient
    engine.train()
    for step in range(1, 4):
        engine.backward(engine(**zero3_batch(rank, step)).loss)
        methods.after_backward(engine.module, step, safe_get_full_grad)
        engine.step()
    diagnostics = methods.layer_diagnostics(engine.module)
    mine = torch.tensor([[d[k] for k in ("gate", *NORM_KEYS)] for d in diagnostics.values()], dtype=torch.float64)
    everyone = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(everyone, mine)
    if rank == 0:
        torch.save({"names": list(diagnostics), "ranks": everyone}, out)


def zero3_batch(rank: int, step: int) -> dict:
    return family_inputs("llama", seed=100 * (rank + 1) + step)  # each rank its own data


def test_every_rank_computes_the_same_gate_under_zero3(tmp_path):
    out = str(tmp_path / "gates.pt")
    run_ranks(_zero3_worker, (out,))
    result = torch.load(out)
    g0, g1 = result["ranks"]
    assert torch.equal(g0, g1)  # gate and the norms behind it, bit for bit
    # ... and they are the full reduced gradients' gate: one process on both ranks' data together
    _, model = hybrid(ZERO3_GATE)
    opt = torch.optim.AdamW(methods.trainable_parameters(model), lr=1e-2)
    model.train()
    for step in range(1, 4):
        a, b = zero3_batch(0, step), zero3_batch(1, step)
        model(**{k: torch.cat([a[k], b[k]]) for k in a}).loss.backward()  # equal token counts: mean of means
        methods.after_backward(model, step)
        opt.step()
        opt.zero_grad()
    reference = methods.gate_values(model)
    assert result["names"] == list(reference)
    torch.testing.assert_close(g0[:, 0], torch.tensor(list(reference.values()), dtype=torch.float64), atol=1e-6, rtol=0)
    assert (g0[:, 0] - 0.5).abs().max() > 1e-2  # the gate moved
