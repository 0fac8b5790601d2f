"""The trial's pure parts: DeepSpeed config generation, sharding, LR schedule (no Ray needed)."""

from __future__ import annotations

import json
import os

import pytest

from methods.config import ConfigError
from orchestrator.config import TrialConfig
from orchestrator.deepspeed_config import build_deepspeed_config
from orchestrator.worker import lr_factor, shard_batches


def cfg(**sections) -> TrialConfig:
    return TrialConfig.from_dict({"data": {"name": "bbc_news"}, **sections})


def test_deepspeed_config_from_a_few_settings():
    c = cfg(train={"batch_size": 32, "grad_accum": 2, "grad_clip": 0.5},
            deepspeed={"zero_stage": 3, "offload_optimizer": True, "precision": "bf16"},
            resources={"num_workers": 4})
    ds = build_deepspeed_config(c)
    assert ds["train_batch_size"] == 32 and ds["gradient_accumulation_steps"] == 2
    assert ds["train_micro_batch_size_per_gpu"] == 4 == c.micro_batch_size
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"] == {"enabled": True} and not ds["fp16"]["enabled"]
    assert ds["zero_optimization"]["stage"] == 3 and ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert build_deepspeed_config(cfg())["bf16"]["enabled"] is False  # auto = fp32 on CPU


def test_offload_asks_deepspeed_for_its_cpu_adam_and_bad_combinations_fail(tmp_path):
    ds = build_deepspeed_config(cfg(train={"lr": 3e-4, "weight_decay": 0.01},
                                    deepspeed={"zero_stage": 3, "offload_optimizer": True, "offload_param": True}))
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    # DeepSpeed rejects a torch optimizer under offload: the trial's AdamW settings go to its own
    assert ds["optimizer"] == {"type": "AdamW", "params": {"lr": 3e-4, "weight_decay": 0.01, "betas": [0.9, 0.999],
                                                         "eps": 1e-8}}
    assert "optimizer" not in build_deepspeed_config(cfg())  # no offload: our torch AdamW, no block
    with pytest.raises(ConfigError, match="offload_param=True: needs zero_stage: 3"):
        cfg(deepspeed={"zero_stage": 2, "offload_param": True})
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"optimizer": {"type": "Lamb", "params": {"lr": 1e-3}}}))
    with pytest.raises(ConfigError, match="optimizer type 'Lamb' cannot run with offload"):
        build_deepspeed_config(cfg(deepspeed={"zero_stage": 2, "offload_optimizer": True, "config_file": str(path)}))


def test_user_json_overrides_generated_keys_but_not_batch_sizes(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 1, "reduce_bucket_size": 5e7},
                                "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}}))
    ds = build_deepspeed_config(cfg(deepspeed={"config_file": str(path)}))
    assert ds["zero_optimization"] == {"stage": 1, "reduce_bucket_size": 5e7}
    assert ds["optimizer"]["type"] == "AdamW" and ds["train_batch_size"] == 16
    path.write_text(json.dumps({"train_batch_size": 64}))
    with pytest.raises(ConfigError, match="train_batch_size=64 disagrees with the trial's 16"):
        build_deepspeed_config(cfg(deepspeed={"config_file": str(path)}))
    with pytest.raises(ConfigError, match="deepspeed.config_file=.*file not found"):
        cfg(deepspeed={"config_file": str(tmp_path / "nope.json")})


def test_shards_are_disjoint_cover_the_data_and_are_deterministic():
    examples = [{"i": i} for i in range(40)]
    seen = []
    for rank in range(2):
        stream = shard_batches(examples, lambda b: [e["i"] for e in b], micro=4, seed=3, rank=rank, world=2)
        epoch0 = [next(stream)[1] for _ in range(5)]
        again = shard_batches(examples, lambda b: [e["i"] for e in b], micro=4, seed=3, rank=rank, world=2)
        assert epoch0 == [next(again)[1] for _ in range(5)]
        seen.append({i for batch in epoch0 for i in batch})
        assert next(stream)[0] == 1  # the next epoch begins after 20 / 4 = 5 batches
    assert seen[0].isdisjoint(seen[1]) and seen[0] | seen[1] == set(range(40))


def test_lr_schedule_warmup_then_decay():
    c = cfg(train={"max_steps": 10, "warmup_steps": 2, "lr_schedule": "linear"})
    assert [round(lr_factor(s, c), 3) for s in (0, 1, 2, 6, 10)] == [0.5, 1.0, 1.0, 0.5, 0.0]
    c = cfg(train={"max_steps": 10, "lr_schedule": "cosine"})
    assert lr_factor(0, c) == 1.0 and lr_factor(5, c) == pytest.approx(0.5) and lr_factor(10, c) == pytest.approx(0)
    assert lr_factor(7, cfg(train={"lr_schedule": "constant"})) == 1.0


def test_trial_config_round_trips_and_pickles():
    import pickle

    c = cfg(method={"name": "hybrid", "config": {"gate": {"tau": 0.5}}})
    assert TrialConfig.from_dict(c.to_dict()) == c
    assert pickle.loads(pickle.dumps(c)) == c


def _engines_worker(rank: int, world: int) -> None:
    import sys

    import torch

    from orchestrator.deepspeed_config import MUON_KERNELS, import_deepspeed
    from orchestrator.worker import build_engine

    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))
    import_deepspeed()
    for stage in (2, 3):
        c = cfg(train={"batch_size": 4}, deepspeed={"zero_stage": stage}, resources={"num_workers": world})
        engine = build_engine(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 1)), c)
        engine.backward(engine(torch.randn(4, 8)).sum())
        engine.step()
    imported = sorted(m for m in ("mlflow", MUON_KERNELS, "torch._inductor.compile_fx") if m in sys.modules)
    assert imported == [MUON_KERNELS], imported


def test_a_workers_deepspeed_imports_neither_mlflow_nor_inductor():
    """A fresh worker's DeepSpeed import, then ZeRO-2 and ZeRO-3 engines and a step each: DeepSpeed's
    Muon module was imported (every ZeRO engine does), but neither MLflow (its autotuner's) nor
    TorchInductor (Muon's `torch.compile` at import): both cost seconds per worker per trial."""
    from tests.conftest import run_ranks

    run_ranks(_engines_worker, world=1, deadline_s=120)  # a spawned process: a fresh interpreter


def test_muons_kernels_are_compiled_on_their_first_call(monkeypatch):
    """The deferred decorator: no `torch.compile` until the first call, then one, and its result is used
    (dynamo's eager backend here: a real compile without Inductor's C++ build)."""
    import torch

    from orchestrator.deepspeed_config import _compile_on_first_call

    calls = []
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn: calls.append(fn) or real(fn, backend="eager"))

    def kernel(x):
        return (x @ x.T).tanh()

    deferred = _compile_on_first_call()(kernel)
    assert calls == [] and deferred.__wrapped__ is kernel
    x = torch.randn(4, 3)
    torch._dynamo.reset()
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]  # reset() keeps the counters
    assert torch.equal(deferred(x), kernel(x)) and torch.equal(deferred(x), kernel(x))
    assert calls == [kernel]  # compiled once, on the first call
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs + 1  # dynamo traced it, once
