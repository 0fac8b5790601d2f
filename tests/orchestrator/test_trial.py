"""Real trials: Ray Train (2 workers, local Ray) x DeepSpeed ZeRO-2 on CPU x the real MiniLM on real BBC News."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
import time

import psutil
import pytest
import torch

from methods.config import ConfigError
from orchestrator import report
from orchestrator.config import TrialConfig, validate_trial
from orchestrator.trial import CONTROLLER_POLL, build_trainer, read_reports, run_trial
from tests.conftest import free_cpus

pytestmark = pytest.mark.slow


def trial_config(**overrides) -> TrialConfig:
    base = {
        "data": {"name": "bbc_news", "max_train_samples": 256, "max_eval_samples": 64, "max_length": 64},
        "method": {"name": "lora", "config": {"r": 8}},
        "train": {"max_steps": 12, "batch_size": 8, "eval_every": 3, "lr": 2e-3, "stop_at_target": False,
                  "warmup_steps": 2},
        # eval_loss goes 1.575, 1.556, 1.538, 1.534 (deterministic by seed): reached at step 9, mid-run.
        "target": {"metric": "eval_loss", "value": 1.545},
        "deepspeed": {"zero_stage": 2},
        "resources": {"num_workers": 2, "cpus_per_worker": 0.9},
    }
    for section, values in overrides.items():
        base[section] = {**base.get(section, {}), **values}
    return TrialConfig.from_dict(base)


def check_consistent(reports: list[dict], target: float) -> None:
    steps = [r["step"] for r in reports]
    assert steps == sorted(steps) and len(set(steps)) == len(steps)
    clock = [r["elapsed_s"] for r in reports]
    assert clock == sorted(clock), "the clock never runs backwards"
    samples = [r["samples_seen"] for r in reports]
    assert all(b > a for a, b in zip(samples, samples[1:]))
    for r in reports:
        for key in ("train_loss", "eval_loss", "accuracy", "samples_per_s", "tokens_per_s", "peak_memory_mb",
                    "trainable_params", "total_params", *report.CLOCK_PARTS, *report.MEMORY_PARTS, "rss_peak_mb"):
            assert key in r, key
        assert report.unknown_fields({k: v for k, v in r.items() if k != "checkpoint"}, ("accuracy", "macro_f1")) == []
        assert 0 < r["trainable_params"] < r["total_params"]
        # The clock parts are disjoint pieces of the wall clock; the memory parts add up to the total.
        assert sum(r[k] for k in report.CLOCK_PARTS) <= r["elapsed_s"] + 1e-6
        assert r["setup_s"] > 0 and r["train_s"] > 0 and r["eval_s"] > 0
        assert sum(r[k] for k in report.MEMORY_PARTS) == pytest.approx(r["peak_memory_mb"])
        assert r["memory_weights_mb"] > 80  # MiniLM's 22.7M fp32 parameters: 87 MB
        assert r["rss_peak_mb"] > r["peak_memory_mb"]  # the process is much more than its tensors
        assert r["concurrent_trials"] == 0 and r["cpu_threads"] == 1  # alone, on its own core
    first = next((i for i, r in enumerate(reports) if r["eval_loss"] <= target), None)
    for i, r in enumerate(reports):
        if first is None or i < first:
            assert "time_to_quality_s" not in r or r["time_to_quality_s"] is None
        else:
            assert r["time_to_quality_s"] == pytest.approx(reports[first]["elapsed_s"])
            train_clock = sum(reports[first][k] for k in ("method_init_s", "train_s", "eval_s"))
            assert r["train_time_to_quality_s"] == pytest.approx(train_clock)
            assert r["train_time_to_quality_s"] < r["time_to_quality_s"]  # setup is not the method's cost
            assert r["samples_to_quality"] == reports[first]["samples_seen"]


def _train_worker_pids() -> list[int]:
    return [p.pid for p in psutil.process_iter(["cmdline"])
            if any("RayTrainWorker" in part for part in (p.info["cmdline"] or []))]


def _actors(cls: str, *filters: tuple) -> dict[str, int]:
    """Actor id -> pid of the actors of this class that Ray started in the session (Ray's state API:
    this session only), alive or not unless `filters` say otherwise."""
    from ray.util.state import list_actors

    return {a.actor_id: a.pid for a in list_actors(filters=[("class_name", "=", cls), *filters], limit=10_000,
                                                   raise_on_missing_output=False)}


def _actors_started(cls: str) -> int:
    return len(_actors(cls))


def test_two_worker_trial_killed_mid_run_resumes_and_reports_time_to_quality(ray_session, tmp_path):
    """The whole trial path (Ray Train, 2 DeepSpeed ZeRO-2 workers, the real MiniLM on BBC News) with
    a worker killed after the first checkpoint: the trial resumes from it, and its reports, clocks
    and time to quality are those of an uninterrupted run. Ray starts no Ray Data process for it."""
    cfg = trial_config(train={"max_steps": 15, "max_failures": 1})
    killed: list[int] = []

    def kill_after_first_checkpoint():
        path = tmp_path / "killed" / "reports.jsonl"
        deadline = time.time() + 600
        while time.time() < deadline and not path.exists():
            time.sleep(0.5)
        time.sleep(1.0)  # the first report (step 3) carries a checkpoint
        pids = _train_worker_pids()
        if pids:
            psutil.Process(pids[-1]).kill()
            killed.append(pids[-1])

    killer = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    killer.start()
    classes = ("TrainController", "DatasetManager", "PlacementGroupCleaner")
    before = {cls: _actors_started(cls) for cls in classes}
    result = run_trial(cfg, str(tmp_path), "killed")
    killer.join(timeout=5)
    # One controller; no Ray Data process (trials pass no Ray Datasets) and no Ray Train placement-group
    # cleaner (orchestrator.reaper does its job): trial._trainer_class
    assert {cls: _actors_started(cls) - n for cls, n in before.items()} == dict(zip(classes, (1, 0, 0)))
    # the worker groups' placement groups, the restarted one's and the first, were all removed
    assert free_cpus(ray_session) == pytest.approx(ray_session.cluster_resources()["CPU"])
    assert killed, "no worker was killed"
    assert result.error is None
    reports = read_reports(str(tmp_path), "killed")
    # Resumed, not restarted: every report exactly once, none lost, none repeated.
    assert [r["step"] for r in reports] == [3, 6, 9, 12, 15]
    assert reports[-1]["stop_reason"] == "budget" and reports[-1]["done"]
    check_consistent(reports, 1.545)
    reached = [r for r in reports if r.get("time_to_quality_s") is not None]
    assert reached and len(reached) < len(reports), "the target must be crossed mid-run for this test to bite"
    assert reports[-1]["eval_loss"] < reports[0]["eval_loss"]
    # the final checkpoint carries the adapter alone, loadable on the base model, and the trial's config
    import methods
    from orchestrator.export import read_trial

    with result.checkpoint.as_directory() as d:
        assert methods.read_adapter_config(os.path.join(d, "adapter")).method == "lora"
        assert read_trial(d) == cfg


def _alive_actors(cls: str) -> dict[str, int]:
    return _actors(cls, ("state", "=", "ALIVE"))


def test_a_standalone_trial_whose_controller_dies_leaves_no_cpu_reserved(ray_session, tmp_path, monkeypatch):
    """The Train controller SIGKILLed once its workers exist (the driver lives on): Ray kills the
    workers with it but keeps their placement group until the driver's job ends. The trials'
    trainer has no Ray Train placement-group cleaner, so run_trial removes it itself
    (orchestrator.reaper) once fit() fails: seen reserved just before, and free after."""
    import ray

    from orchestrator import reaper

    total = ray_session.cluster_resources()["CPU"]
    seen: dict[str, float] = {}
    real_groups = reaper._groups

    def groups_and_record():  # what the reaper finds, read just before it first removes anything
        seen.setdefault("free_before", ray.available_resources().get("CPU", 0.0))
        return real_groups()

    monkeypatch.setattr(reaper, "_groups", groups_and_record)
    controllers_before, workers_before = set(_alive_actors("TrainController")), set(_alive_actors("RayTrainWorker"))
    killed: list[int] = []
    stop = threading.Event()

    def kill_controller_once_workers_exist():
        while not stop.wait(0.2):
            workers = set(_alive_actors("RayTrainWorker")) - workers_before
            controllers = {a: pid for a, pid in _alive_actors("TrainController").items() if a not in controllers_before}
            if len(workers) == 2 and len(controllers) == 1:
                (pid,) = controllers.values()
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                return

    killer = threading.Thread(target=kill_controller_once_workers_exist, daemon=True)
    killer.start()
    try:
        with pytest.raises(ray.exceptions.RayActorError):
            run_trial(trial_config(train={"max_steps": 60}), str(tmp_path), "controller-killed")
    finally:
        stop.set()
        killer.join(timeout=10)
        reaper.reap()  # a failed check must not leave the group reserved for the rest of the session
    assert len(killed) == 1, killed
    assert seen["free_before"] <= total - 2 * 0.9 + 1e-6  # the dead controller's workers' group, still held
    assert free_cpus(ray_session) == pytest.approx(total)


def test_bad_settings_fail_before_any_worker(tmp_path):
    bad = [
        ({"data": {"name": "squad"}}, "unknown task"),
        ({"data": {"name": "glue/sst2", "data_files": {"train": str(tmp_path / "missing.csv")}}}, "missing.csv"),
        ({"deepspeed": {"zero_stage": 5}}, "deepspeed.zero_stage=5: must be 0, 1, 2 or 3"),
        ({"deepspeed": {"zero_stage": 2, "offload_param": True}}, "deepspeed.offload_param=True: needs zero_stage: 3"),
        ({"train": {"batch_size": 9}}, r"train.batch_size=9: must be divisible by resources.num_workers"),
        ({"target": {"metric": "f1"}}, "target.metric='f1': task 'bbc_news' reports eval_loss, accuracy, macro_f1"),
    ]
    for overrides, match in bad:
        with pytest.raises((ConfigError, ValueError), match=match):
            validate_trial(trial_config(**overrides))
        with pytest.raises((ConfigError, ValueError), match=match):
            run_trial(trial_config(**overrides), str(tmp_path), "never")
    assert not (tmp_path / "never").exists()


@pytest.fixture(scope="module")
def cpu_adam(ray_session):
    """DeepSpeed's CPU Adam op built on this node, as a sweep's `prepare_nodes` builds it before its
    first trial: about a minute once per machine (then cached), paid here and not in a test."""
    from orchestrator.nodes import prepare_nodes

    (node,) = prepare_nodes([trial_config(deepspeed={"zero_stage": 2, "offload_optimizer": True})], quiet=True)
    assert not node["failed"], node["failed"]


def test_trials_poll_their_workers_every_quarter_second_unless_the_user_says_otherwise(tmp_path, monkeypatch):
    """Ray Train's controller reads its poll from the environment when fit() starts it (Ray's 2 s
    default: a run ends two polls after its last report); a trial sets 0.25 s where nobody set it."""
    cfg = trial_config()
    monkeypatch.delenv(CONTROLLER_POLL[0], raising=False)
    build_trainer(cfg, validate_trial(cfg), str(tmp_path), "poll")
    assert os.environ[CONTROLLER_POLL[0]] == "0.25"
    monkeypatch.setenv(CONTROLLER_POLL[0], "1.5")
    build_trainer(cfg, validate_trial(cfg), str(tmp_path), "poll")
    assert os.environ[CONTROLLER_POLL[0]] == "1.5"  # the user's own setting wins


def test_a_driver_prepares_each_node_once_per_op_and_model(ray_session, monkeypatch, capsys):
    """A second sweep or trial from the same process starts no preparation task on a node that this
    process already prepared for the same ops; an op not yet prepared there still is."""
    from ray.util.state import list_tasks

    from orchestrator import nodes
    from orchestrator.config import TrialConfig

    def tasks_run() -> int:
        return len(list_tasks(filters=[("name", "=", "prepare_node")], limit=10_000, raise_on_missing_output=False))

    monkeypatch.setattr(nodes, "_PREPARED", set())
    plain = TrialConfig.from_dict({"data": {"name": "bbc_news"}, "method": {"name": "lora", "config": {}}})
    offload = TrialConfig.from_dict({"data": {"name": "bbc_news"}, "method": {"name": "lora", "config": {}},
                                     "deepspeed": {"zero_stage": 2, "offload_optimizer": True}})
    before = tasks_run()
    (first,) = nodes.prepare_nodes([plain], quiet=True)
    assert set(first["seconds"]) == {nodes.COMM_OP} and not first["failed"]
    (again,) = nodes.prepare_nodes([plain])
    assert again["seconds"] == {} and not again["failed"]
    assert "prepared 0 node(s) in 0 s (DeepSpeed ops ShareMemCommBuilder); 1 already prepared by this process" in capsys.readouterr().err
    (more,) = nodes.prepare_nodes([offload], quiet=True)
    assert set(more["seconds"]) == {nodes.CPU_ADAM_OP}  # the comm op was ready; CPU Adam was not asked for yet
    deadline = time.time() + 20  # Ray's task events reach its state API within a second or two
    while tasks_run() - before < 2 and time.time() < deadline:
        time.sleep(0.5)
    assert tasks_run() - before == 2  # the second call started no task


def test_hybrid_gates_move_identically_across_ranks_under_zero2_with_cpu_adam_offload(cpu_adam, tmp_path):
    """The hybrid under ZeRO-2 with the optimizer offloaded to DeepSpeed's CPU Adam (one trial for
    both: each trial costs ~15 s of Ray Train start-up): the gates read the partitioned, offloaded
    gradients, move between reports and agree on every rank; the model trains."""
    cfg = trial_config(method={"name": "hybrid", "config": {"lora_ga": {"lora": {"r": 4}, "batches": 2},
                                                             "gate": {"update_every": 1}}},
                       deepspeed={"zero_stage": 2, "offload_optimizer": True},
                       train={"max_steps": 6, "eval_every": 3, "checkpoint_every": 0})
    assert run_trial(cfg, str(tmp_path), "hybrid").error is None
    reports = read_reports(str(tmp_path), "hybrid")
    assert [r["step"] for r in reports] == [3, 6]
    gates = {name: d["gate"] for name, d in reports[-1]["layers"].items()}
    assert len(gates) == 12  # query and value in 6 MiniLM layers
    assert all(0.05 <= v <= 0.95 for v in gates.values())
    assert {name: d["gate"] for name, d in reports[0]["layers"].items()} != gates, "the gate should move between reports"
    assert all(r["layer_rank_spread"] == 0.0 for r in reports)
    assert reports[0]["method_init_s"] > 0  # LoRA-GA's gradient pass is the method's cost
    assert reports[-1]["eval_loss"] < reports[0]["eval_loss"] and reports[-1]["train_loss"] < 1.6
    assert reports[-1]["memory_optimizer_mb"] > 0  # DeepSpeed's CPU Adam state, partitioned over 2 ranks


def test_counted_memory_tells_full_fine_tuning_from_lora(ray_session, tmp_path):
    """Weights + gradients + AdamW's two moments make full fine-tuning ~4x its weights, LoRA ~1x:
    the counted memory must show it (a worker's RSS barely does)."""
    counted = {}

    def one(method: str, config: dict) -> None:
        cfg = trial_config(method={"name": method, "config": config}, deepspeed={"zero_stage": 0},
                           train={"max_steps": 2, "eval_every": 2, "checkpoint_every": 0},
                           resources={"num_workers": 1, "cpus_per_worker": 0.49})
        assert run_trial(cfg, str(tmp_path), method).error is None
        (counted[method],) = read_reports(str(tmp_path), method)

    # Both at once, a core each: counted memory does not depend on what else runs (times would).
    threads = [threading.Thread(target=one, args=m) for m in (("full", {}), ("lora", {"r": 8}))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(counted) == {"full", "lora"}
    for r in counted.values():
        assert sum(r[k] for k in report.MEMORY_PARTS) == pytest.approx(r["peak_memory_mb"])
    full, lora = counted["full"], counted["lora"]
    assert full["peak_memory_mb"] >= 2.5 * lora["peak_memory_mb"]
    assert full["memory_gradients_mb"] == pytest.approx(full["memory_weights_mb"], rel=0.01)  # ZeRO-0: whole
    assert full["memory_optimizer_mb"] == pytest.approx(2 * full["memory_weights_mb"], rel=0.01)  # exp_avg, exp_avg_sq
    assert lora["memory_optimizer_mb"] < 0.02 * full["memory_optimizer_mb"]
    assert full["memory_activations_mb"] > 0 and lora["memory_activations_mb"] > 0


def test_zero3_lora_ga_initialises_on_the_partitioned_model_as_zero0_does(ray_session, tmp_path):
    """Under ZeRO-3 the gradient estimate runs through the engine on partitioned weights; it must
    give the init that ZeRO-0 gives on the whole model, from the same batches."""
    from safetensors.torch import load_file

    init = {}
    for stage in (0, 3):
        cfg = trial_config(method={"name": "lora_ga", "config": {"lora": {"r": 4}, "batches": 2}},
                           deepspeed={"zero_stage": stage}, train={"max_steps": 1, "eval_every": 1, "lr": 5e-4})
        result = run_trial(cfg, str(tmp_path), f"zero{stage}")
        assert result.error is None
        (r,) = read_reports(str(tmp_path), f"zero{stage}")
        assert r["method_init_s"] > 0 and math.isfinite(r["train_loss"])
        with result.checkpoint.as_directory() as d:
            init[stage] = load_file(os.path.join(d, "adapter", "adapter_model.safetensors"))
    assert init[0].keys() == init[3].keys()
    frozen = [k for k in init[0] if k.endswith(("lora_A0", "lora_B0"))]
    assert len(frozen) == 24  # A0 and B0 of query and value in 6 layers
    for key in frozen:
        torch.testing.assert_close(init[3][key], init[0][key], atol=1e-5, rtol=1e-4, msg=key)
    # One step later the trained A, B moved alike too: the optimizer started from the same init.
    for key in (k for k in init[0] if k.endswith(("lora_A", "lora_B"))):
        torch.testing.assert_close(init[3][key], init[0][key], atol=1e-4, rtol=1e-3, msg=key)


def test_divergence_ends_the_trial_with_a_reason(ray_session, tmp_path):
    # Full fine-tuning at lr 1e6: embeddings and LayerNorms blow up to inf, the loss to NaN.
    cfg = trial_config(method={"name": "full", "config": {}},
                       train={"lr": 1e6, "lr_schedule": "constant", "warmup_steps": 0, "max_steps": 30,
                              "eval_every": 50}, resources={"num_workers": 1})
    result = run_trial(cfg, str(tmp_path), "diverge")
    assert result.error is None
    (last,) = read_reports(str(tmp_path), "diverge")
    assert last["stop_reason"] == "diverged" and last["done"] and last["step"] < 30
    assert last["eval_loss"] == float("inf")  # the worst score, so that schedulers rank it last


def test_generative_task_under_zero3_scores_generated_answers(ray_session, tmp_path):
    """GSM8K on a tiny causal LM, 2 workers, ZeRO-3: every generation step is a collective
    (synced_gpus), scoring runs on rank 0 and is broadcast. Reports carry exact_match and eval_loss."""
    from tests.conftest import BENCHMARK_DATA, save_tiny_causal_lm

    model = save_tiny_causal_lm(str(tmp_path / "model"))
    files = {"train": os.path.join(BENCHMARK_DATA, "gsm8k_train.jsonl"),
             "test": os.path.join(BENCHMARK_DATA, "gsm8k_test.jsonl")}
    cfg = TrialConfig.from_dict({
        "data": {"name": "gsm8k", "data_files": files, "max_length": 256, "max_new_tokens": 8},
        "model": {"name_or_path": model},
        "method": {"name": "lora", "config": {"r": 4}},
        "train": {"max_steps": 4, "batch_size": 2, "eval_every": 2, "lr": 1e-3, "stop_at_target": False},
        "deepspeed": {"zero_stage": 3},
        "resources": {"num_workers": 2, "cpus_per_worker": 0.9},
    })
    target = validate_trial(cfg)
    assert (target.metric, target.mode, target.value) == ("exact_match", "max", 0.35)
    result = run_trial(cfg, str(tmp_path), "gsm8k-zero3")
    assert result.error is None
    reports = read_reports(str(tmp_path), "gsm8k-zero3")
    assert [r["step"] for r in reports] == [2, 4]
    for r in reports:
        assert r["exact_match"] == 0.0 and r["eval_loss"] > 0 and "time_to_quality_s" not in r
    assert reports[-1]["eval_loss"] < reports[0]["eval_loss"] + 1.0  # finite and sane
    assert reports[-1]["stop_reason"] == "budget"


def test_a_frozen_worker_fails_the_trial_as_stalled_instead_of_hanging(ray_session, tmp_path):
    """One of two workers frozen for real (SIGSTOP) after the first report: the other waits in its
    next collective forever, until its watchdog ends the attempt; the trial fails as stalled."""
    from orchestrator.stall import TrialStalled

    cfg = trial_config(train={"max_steps": 500, "eval_every": 2, "stall_timeout_s": 15, "max_failures": 0,
                              "checkpoint_every": 0})
    frozen: list[int] = []

    def freeze_after_first_report():
        path = tmp_path / "frozen" / "reports.jsonl"
        deadline = time.time() + 300
        while time.time() < deadline and not path.exists():
            time.sleep(0.2)
        pids = _train_worker_pids()
        if pids:
            os.kill(pids[-1], signal.SIGSTOP)
            frozen.append(pids[-1])

    freezer = threading.Thread(target=freeze_after_first_report, daemon=True)
    freezer.start()
    started = time.time()
    try:
        with pytest.raises(TrialStalled, match=r"stalled: rank \d made no progress for \d+ s in .*stall_timeout_s=15"):
            run_trial(cfg, str(tmp_path), "frozen")
    finally:
        for pid in frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert frozen, "no worker was frozen"
    assert time.time() - started < 240  # ended by the watchdog, not by any 10-minute default
    reports = read_reports(str(tmp_path), "frozen")
    assert reports and reports[-1]["step"] < 500  # what was reported before the stall is kept


def test_a_worker_group_that_can_never_start_fails_the_trial_instead_of_waiting_forever(ray_session, tmp_path, monkeypatch):
    """Three 1-CPU workers on a 2-CPU Ray never fit: Ray Train times their start out and, left to
    itself, retries without end. With a 2 s start timeout (Ray Train passes its RAY_TRAIN_* variables
    from the driver to its controller), the trial fails after trial.WORKER_GROUP_START_RETRIES
    retries, naming the start-up timeout."""
    from ray.train import ControllerError

    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "2")
    cfg = trial_config(resources={"num_workers": 3, "cpus_per_worker": 1.0}, train={"batch_size": 9})
    started = time.time()
    with pytest.raises(ControllerError, match="worker group startup timed out after 2.0 seconds"):
        run_trial(cfg, str(tmp_path), "never")
    assert time.time() - started < 120  # 4 starts of 2 s and the controller's own, not forever
