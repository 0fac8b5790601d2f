"""clusters/: the launcher YAMLs pass Ray's own schema and offline launcher checks, the KubeRay
manifests carry what KubeRay needs, `orchestrate cluster` reports problems readably and prices a
sweep, and a real multi-node Ray cluster (several raylets on this machine, fake GPUs) dispatches a
Tune sweep the way the GPU cluster will: onto the nodes with the resource, no more at once than the
resource allows, and retrying the trials of a node that disappears."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest
import yaml

from orchestrator import cli, cluster, placement

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAUNCHER_FILES = ["clusters/aws-gpu.yaml", "clusters/gcp-gpu.yaml"]
KUBERAY_FILES = ["clusters/kuberay/raycluster.yaml", "clusters/kuberay/rayjob.yaml"]


def load(rel: str) -> dict:
    with open(os.path.join(ROOT, rel)) as f:
        return yaml.safe_load(f)


def quickstart_spec(**resources):
    from orchestrator.config import ResourcesConfig
    from orchestrator.spec import load_sweep

    spec = load_sweep(os.path.join(ROOT, "search_spaces/quickstart.yaml"), validate_data=False)
    return dataclasses.replace(spec, resources=ResourcesConfig(**resources)) if resources else spec


# ----------------------------------------------------------------------------- launcher YAMLs


@pytest.mark.parametrize("rel", LAUNCHER_FILES)
def test_launcher_yaml_passes_rays_schema_and_offline_launcher_checks(rel):
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load(rel)
    with open(os.path.join(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json")) as f:
        schema = json.load(f)
    assert schema["$schema"].startswith("http://json-schema.org/draft-07")
    jsonschema.Draft7Validator(schema).validate(config)
    validate_config(prepare_config(copy.deepcopy(config)))
    assert cluster.check_cluster_file(os.path.join(ROOT, rel)) == []


@pytest.mark.parametrize("rel", LAUNCHER_FILES)
def test_launcher_yaml_layout(rel):
    import ray

    c = load(rel)
    cloud = c["provider"]["type"]
    assert c["docker"]["image"] == f"rayproject/ray:{ray.__version__}-py311-gpu"
    types, head = c["available_node_types"], c["head_node_type"]
    assert types[head]["resources"].get("GPU", 0) == 0 and types[head]["resources"][placement.DRIVER_RESOURCE] >= 1
    workers = {n: t for n, t in types.items() if n != head}
    assert sorted(t["resources"]["GPU"] for t in workers.values()) == [1, 8]  # small and large models
    assert all(t["min_workers"] == 0 < t["max_workers"] for t in workers.values())  # autoscaling from zero
    assert any(cluster.is_spot(t) for t in workers.values())
    for name, t in types.items():  # drivers pinned to the head / on-demand nodes only (STYLE.md O5)
        assert placement.DRIVER_RESOURCE not in t["resources"] or (name == head and not cluster.is_spot(t))
        if name != head:  # the workers write checkpoints to the bucket with their own cloud identity
            assert ("IamInstanceProfile" if cloud == "aws" else "serviceAccounts") in t["node_config"]
    assert c["file_mounts"]["/home/ray/peft-orchestrator"] == "."
    assert "~/.ray/auth_token" in c["file_mounts"]
    assert any("pip install" in cmd and "-e" in cmd and "/home/ray/peft-orchestrator" in cmd for cmd in c["setup_commands"])
    assert any("torch==" in cmd for cmd in c["setup_commands"])
    head_cmds = " ".join(c["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_cmds and "mlflow server --host 127.0.0.1" in head_cmds
    assert ("s3://" if cloud == "aws" else "gs://") in head_cmds
    assert any("RAY_AUTH_MODE=token" in o for o in c["docker"]["run_options"])


def test_capacity_and_concurrency_derived_from_the_cluster_yaml():
    aws = load("clusters/aws-gpu.yaml")
    # head 16 CPU; max_workers=10: 2 x p4d (96 CPU, 8 GPU) + 8 x g5.2xlarge (8 CPU, 1 GPU)
    assert placement.capacity(aws) == {"CPU": 16 + 2 * 96 + 8 * 8, "GPU": 2 * 8 + 8, "trial_driver": 16}
    one_gpu = quickstart_spec(num_workers=1, cpus_per_worker=6, gpus_per_worker=1)
    assert placement.max_concurrent_trials(one_gpu, aws) == 16  # 24 GPUs, but 16 driver slots
    eight_gpu = quickstart_spec(num_workers=8, cpus_per_worker=10, gpus_per_worker=1)
    assert placement.max_concurrent_trials(eight_gpu, aws) == 3  # 24 GPUs / 8
    small = {"max_workers": 3, "head_node_type": "h", "available_node_types": {
        "h": {"resources": {"CPU": 4}}, "a": {"resources": {"GPU": 1}, "max_workers": 5},
        "b": {"resources": {"GPU": 4}, "max_workers": 2}}}
    assert placement.capacity(small) == {"CPU": 4, "GPU": 2 * 4 + 1 * 1}  # global cap 3: the 4-GPU type first


def test_driver_resources_pin_drivers_only_where_the_cluster_has_slots():
    assert placement.driver_resources({"CPU": 2.0}) == {"CPU": 0.01}
    assert placement.driver_resources({"CPU": 272.0, "trial_driver": 16.0}) == {"CPU": 0.01, "trial_driver": 1}


def test_driver_plan_counts_the_autoscalers_full_size_on_a_launcher_head(tmp_path):
    from orchestrator.placement import max_concurrent

    one_gpu = quickstart_spec(num_workers=1, cpus_per_worker=6, gpus_per_worker=1)
    head_only = {"CPU": 16.0, "trial_driver": 16.0}  # the sweep starts before any GPU node is up
    bootstrap = tmp_path / "ray_bootstrap_config.yaml"
    bootstrap.write_text(open(os.path.join(ROOT, "clusters/aws-gpu.yaml")).read())
    assert placement.driver_plan(one_gpu, head_only, str(bootstrap)) == ({"CPU": 0.01, "trial_driver": 1}, 16)
    laptop = {"CPU": 2.0}  # no bootstrap file: what is there now, as before
    assert placement.driver_plan(one_gpu, laptop, str(tmp_path / "none.yaml")) == ({"CPU": 0.01}, max_concurrent(one_gpu, laptop))


# ----------------------------------------------------------------------------- readable errors


def write_variant(tmp_path, edit, base="clusters/aws-gpu.yaml", name="x.yaml") -> str:
    c = load(base)
    edit(c)
    path = str(tmp_path / name)
    with open(path, "w") as f:
        yaml.safe_dump(c, f, sort_keys=False)
    return path


def test_typo_names_file_key_path_and_expectation(tmp_path):
    def typo(c):
        t = c["available_node_types"]["gpu_1"]
        t["resourses"] = t.pop("resources")
        c["max_workers"] = "ten"

    path = write_variant(tmp_path, typo)
    errors = cluster.check_cluster_file(path)
    assert any(e.startswith(f"{path}: available_node_types.gpu_1.resourses: unknown key, did you mean 'resources'?")
               for e in errors), errors
    assert any(e.startswith(f"{path}: available_node_types.gpu_1.resources: missing (required)") for e in errors)
    assert any(e.startswith(f"{path}: max_workers: expected integer, got str 'ten'") for e in errors)
    assert all("(line " in e for e in errors)


def test_project_rules(tmp_path):
    def break_it(c):
        types = c["available_node_types"]
        del types["head"]["resources"]["trial_driver"]
        types["gpu_1"]["resources"]["trial_driver"] = 1  # a spot node
        c["docker"]["image"] = "rayproject/ray-ml:2.30.0-py310-gpu"
        c["head_start_ray_commands"] = [cmd.replace("127.0.0.1", "0.0.0.0") for cmd in c["head_start_ray_commands"]]
        del c["setup_commands"]

    errors = "\n".join(cluster.check_cluster_file(write_variant(tmp_path, break_it)))
    for expected in ["available_node_types.head.resources: expected a 'trial_driver' entry",
                     "available_node_types.gpu_1.resources.trial_driver: must not be on a spot",
                     "docker.image: rayproject/ray-ml images stop at Ray 2.30",
                     "head_start_ray_commands: --dashboard-host=0.0.0.0",
                     "setup_commands: missing"]:
        assert expected in errors, errors

    def gcp_list(c):
        c["available_node_types"]["gpu_8"]["node_config"]["scheduling"] = [{"preemptible": True}]

    errors = "\n".join(cluster.check_cluster_file(write_variant(tmp_path, gcp_list, "clusters/gcp-gpu.yaml", "g.yaml")))
    assert "available_node_types.gpu_8.node_config.scheduling: expected a mapping" in errors


def test_credentials_bad_yaml_and_ray_rejections(tmp_path):
    secret = write_variant(tmp_path, lambda c: c["provider"].update(aws_secret_access_key="abc"))
    assert "looks like an AWS secret key" in "\n".join(cluster.check_cluster_file(secret))
    bad = tmp_path / "bad.yaml"
    bad.write_text("cluster_name: x\nprovider: {type: aws\n")
    assert cluster.check_cluster_file(str(bad))[0].startswith(f"{bad}: not valid YAML")
    wrong_head = write_variant(tmp_path, lambda c: c.update(head_node_type="nope"))
    assert "Ray's launcher rejects it: ValueError: `head_node_type` must be one of" in cluster.check_cluster_file(wrong_head)[0]
    assert "cannot read the file" in cluster.check_cluster_file(str(tmp_path / "missing.yaml"))[0]


def test_cli_check_and_cost(tmp_path, capsys):
    assert cli.main(["cluster", "check", *(os.path.join(ROOT, f) for f in LAUNCHER_FILES)]) == 0
    bad = write_variant(tmp_path, lambda c: c.pop("setup_commands"))
    assert cli.main(["cluster", "check", bad]) == 2
    sweep = tmp_path / "gpu.yaml"
    sweep.write_text(open(os.path.join(ROOT, "search_spaces/quickstart.yaml")).read().replace(
        "resources: {num_workers: 2, cpus_per_worker: 0.49}", "resources: {num_workers: 2, cpus_per_worker: 4, gpus_per_worker: 1}"))
    capsys.readouterr()
    assert cli.main(["cluster", "cost", str(sweep), "--gpu-hour-usd", "2", "--seconds-per-step", "0.5",
                         "--cluster", os.path.join(ROOT, "clusters/aws-gpu.yaml")]) == 0
    out = capsys.readouterr().out
    assert "x 2 GPU" in out and "GPU-hours" in out and "wall clock" in out


# ----------------------------------------------------------------------------- cost


def test_estimate_cost_is_gpu_hours_per_trial_times_trials():
    spec = quickstart_spec(num_workers=2, cpus_per_worker=4, gpus_per_worker=1)
    trials = len(spec.plan())
    est = cluster.estimate_cost(spec, gpu_hour_usd=2.0, seconds_per_step=0.5, concurrency=4, head_hour_usd=1.0)
    hours = spec.train.max_steps * 0.5 / 3600
    assert est.trials == trials and est.gpus_per_trial == 2
    assert est.gpu_hours == pytest.approx(trials * 2 * hours)
    assert est.wall_hours == pytest.approx(-(-trials // 4) * hours)
    assert est.usd == pytest.approx(trials * 2 * hours * 2.0 + est.wall_hours * 1.0)
    assert f"{trials} trial(s) x 2 GPU" in str(est)
    assert cluster.estimate_cost(quickstart_spec(), 2.0, 0.5).usd == 0  # a CPU sweep: no GPU-hours
    with pytest.raises(ValueError, match="seconds_per_step"):
        cluster.estimate_cost(spec, 2.0, 0)


def test_a_methods_own_budget_drives_the_cost_and_ashas_max_t():
    import dataclasses

    from orchestrator.sweep import max_reports

    spec = quickstart_spec(num_workers=1, cpus_per_worker=4, gpus_per_worker=1)
    methods = {**spec.methods, "lora": {**spec.methods["lora"], "train.max_steps": 10000}}
    spec = dataclasses.replace(spec, methods=methods)
    est = cluster.estimate_cost(spec, gpu_hour_usd=2.0, seconds_per_step=1.0)
    others = len(spec.plan()) - 1
    assert est.gpu_hours == pytest.approx((10000 + others * spec.train.max_steps) / 3600)  # not 3 x 60 steps
    assert est.hours_per_trial == pytest.approx(10000 / 3600)
    assert max_reports(spec) == 10000 // spec.train.eval_every  # ASHA's max_t: the longest trial's reports
    # Optuna's points come later: a sampled budget counts at its largest (ASHA would stop a trial at max_t)
    optuna = dataclasses.replace(spec, methods={"lora": {"train.max_steps": {"choice": [100, 10000]}}},
                                 tune=dataclasses.replace(spec.tune, search_alg="optuna", seeds=(0,)))
    assert max_reports(optuna) == 10000 // spec.train.eval_every


# ----------------------------------------------------------------------------- KubeRay


def get(d, dotted: str):
    for part in dotted.split("."):
        d = d[int(part)] if isinstance(d, list) else d[part]
    return d


def check_cluster_spec(spec: dict) -> None:
    assert get(spec, "headGroupSpec.template.spec.containers.0.image").startswith("rayproject/ray:2.60.0")
    assert "trial_driver" in spec["headGroupSpec"]["rayStartParams"]["resources"]
    assert spec["authOptions"] == {"mode": "token"}
    assert spec["workerGroupSpecs"]
    for group in spec["workerGroupSpecs"]:
        for key in ("groupName", "replicas", "minReplicas", "maxReplicas", "template"):
            assert key in group, key
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        container = get(group, "template.spec.containers.0")
        assert container["image"].startswith("rayproject/ray:2.60.0")
        assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
        assert "trial_driver" not in json.dumps(group)  # drivers stay on the head


def test_kuberay_raycluster_carries_required_fields():
    c = load("clusters/kuberay/raycluster.yaml")
    assert (c["apiVersion"], c["kind"], c["metadata"]["name"]) == ("ray.io/v1", "RayCluster", "peft-orchestrator")
    check_cluster_spec(c["spec"])
    gpus = sorted(int(get(g, "template.spec.containers.0.resources.limits")["nvidia.com/gpu"]) for g in c["spec"]["workerGroupSpecs"])
    assert gpus == [1, 8]


def test_kuberay_rayjob_runs_orchestrate_sweep():
    j = load("clusters/kuberay/rayjob.yaml")
    assert (j["apiVersion"], j["kind"]) == ("ray.io/v1", "RayJob") and j["metadata"]["name"]
    assert j["spec"]["entrypoint"].startswith("orchestrate sweep ")
    env = yaml.safe_load(j["spec"]["runtimeEnvYAML"])
    assert any(p.startswith("torch==") for p in env["pip"]) and any(p.startswith("peft-orchestrator") for p in env["pip"])
    check_cluster_spec(j["spec"]["rayClusterSpec"])


def test_no_secret_in_any_cluster_file():
    for rel in LAUNCHER_FILES + KUBERAY_FILES:
        text = open(os.path.join(ROOT, rel)).read()
        for rx, what in cluster.SECRETS:
            assert not rx.search(text), f"{rel}: {what}"


# ----------------------------------------------------------------------------- multi-node dispatch

TRIALS, REPORTS, SLEEP_S = 8, 3, 0.5
FAKE_GPUS_PER_NODE = 2


def _multi_node_sweep(out_path: str) -> None:
    """Run in a fresh process (own Ray, own temp dir): head + 2 worker raylets with 2 fake GPUs
    each, a Tune sweep of trials needing 1 fake GPU, and the first node a trial starts on removed
    mid-sweep. Writes what happened to `out_path` as JSON."""
    import threading
    import time

    import ray
    from ray import tune
    from ray.cluster_utils import Cluster

    tmp = os.environ["RAY_TMPDIR"]
    events = os.path.join(tmp, "events.jsonl")  # one machine: every node's trials append here
    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": False,  # the head: no fake GPU
        "dashboard_agent_listen_port": None,  # not the default port another Ray here may hold
        "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 3}})
    nodes = [c.add_node(num_cpus=1, resources={"fake_gpu": FAKE_GPUS_PER_NODE}) for _ in range(2)]
    try:
        ray.init(address=c.address, log_to_driver=False)

        def trainable(config):
            node = ray.get_runtime_context().get_node_id()
            trial = tune.get_context().get_trial_id()

            def log(kind):
                with open(events, "a") as f:
                    f.write(json.dumps({"trial": trial, "node": node, "kind": kind, "t": time.time()}) + "\n")

            log("start")
            for step in range(REPORTS):
                time.sleep(SLEEP_S)
                tune.report({"step": step, "node": node})
            log("end")

        removed = {}

        def remove_first_busy_node():
            deadline = time.time() + 60
            while time.time() < deadline:
                started = [json.loads(line) for line in open(events)] if os.path.exists(events) else []
                if started:
                    victim = next(n for n in nodes if n.node_id == started[0]["node"])
                    time.sleep(0.3)  # mid-trial
                    removed["node"], removed["t"] = victim.node_id, time.time()
                    c.remove_node(victim)
                    removed["done"] = time.time()
                    return
                time.sleep(0.05)

        killer = threading.Thread(target=remove_first_busy_node)
        killer.start()
        results = tune.Tuner(
            tune.with_resources(trainable, {"fake_gpu": 1}),
            param_space={"i": tune.grid_search(list(range(TRIALS)))},
            tune_config=tune.TuneConfig(reuse_actors=True),
            run_config=tune.RunConfig(name="multi-node", storage_path=os.path.join(tmp, "storage"), verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=2)),
        ).fit()
        killer.join()
        trials = results._experiment_analysis.trials
        out = {"status": {t.trial_id: t.status for t in trials}, "failures": {t.trial_id: t.num_failures for t in trials},
               "errors": [str(r.error)[:300] for r in results if r.error is not None],
               "events": [json.loads(line) for line in open(events)], "removed": removed,
               "head": c.head_node.node_id, "workers": [n.node_id for n in nodes]}
        with open(out_path, "w") as f:
            json.dump(out, f)
    finally:
        ray.shutdown()
        c.shutdown()


def intervals(events, removed):
    """(node, start, end) per trial attempt; an attempt on the removed node ends at its removal."""
    starts, out = {}, []
    for e in sorted(events, key=lambda e: e["t"]):
        key = (e["trial"], e["node"])
        if e["kind"] == "start":
            starts[key] = e["t"]
        elif key in starts:
            out.append((e["node"], starts.pop(key), e["t"]))
    for (trial, node), t in starts.items():
        assert node == removed["node"], f"trial {trial} started on {node} and never ended"
        out.append((node, t, removed["done"]))
    return out


def concurrent_max(spans: list[tuple[float, float]]) -> int:
    """Most intervals open at once (an end at the same instant as a start closes first)."""
    running = best = 0
    for _, delta in sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans]):
        running += delta
        best = max(best, running)
    return best


def test_multi_node_sweep_dispatch_concurrency_and_node_loss(tmp_path):
    """Several raylets on this machine, fake GPUs: trials land only where the resource is, never
    more at once than it allows, and the trials of a removed node are retried elsewhere."""
    ray_tmp = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(RAY_TMPDIR=ray_tmp,  # own session dir and own "current cluster" file: no other Ray finds it
               RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=os.urandom(16).hex())  # as Ray >= 2.59 local clusters
    out = tmp_path / "out.json"
    code = "import sys; from tests.orchestrator.test_clusters import _multi_node_sweep as f; f(sys.argv[1])"
    proc = subprocess.run([sys.executable, "-c", code, str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0 and out.exists(), f"Ray's logs: {ray_tmp}\n{proc.stderr[-4000:]}"
    shutil.rmtree(ray_tmp, ignore_errors=True)  # kept above when it failed
    r = json.loads(out.read_text())

    assert r["errors"] == [] and len(r["status"]) == TRIALS
    assert r["removed"], "no trial started within 60 s: no node was removed"
    assert set(r["status"].values()) == {"TERMINATED"}, r["status"]  # none lost
    gpu_nodes = set(r["workers"])
    assert {e["node"] for e in r["events"]} <= gpu_nodes  # never on the head (no fake_gpu there)
    spans = intervals(r["events"], r["removed"])
    for node in gpu_nodes:  # never more trials on a node than its fake GPUs
        assert concurrent_max([(s, e) for n, s, e in spans if n == node]) <= FAKE_GPUS_PER_NODE
    assert concurrent_max([(s, e) for _, s, e in spans]) <= FAKE_GPUS_PER_NODE * len(gpu_nodes)
    assert len({n for n, _, _ in spans}) == 2  # both worker nodes ran trials

    victim = r["removed"]["node"]
    hit = {e["trial"] for e in r["events"] if e["node"] == victim and e["kind"] == "start"}
    assert hit, "the removed node ran no trial"
    for trial in hit:  # retried on the surviving node, from the start, to the end
        ends = [e for e in r["events"] if e["trial"] == trial and e["kind"] == "end"]
        assert ends and all(e["node"] != victim for e in ends), trial
        assert r["failures"][trial] >= 1
    after = [(max(s, r["removed"]["done"]), e) for n, s, e in spans if e > r["removed"]["done"]]
    assert concurrent_max(after) <= FAKE_GPUS_PER_NODE  # one node left: its two fake GPUs


def _two_node_cluster_sweep(sweep_file: str, out_path: str) -> None:
    """In a fresh process: a head and a second raylet on this machine, then `orchestrate sweep
    --address` of the real trial code against that cluster (its own driver process)."""
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": False, "dashboard_agent_listen_port": None})
    c.add_node(num_cpus=1)
    c.wait_for_nodes()
    try:
        cmd = [sys.executable, "-m", "orchestrator.cli", "sweep", sweep_file, "--address", c.address]
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400)
        with open(out_path, "w") as f:
            json.dump({"rc": done.returncode, "out": done.stdout[-4000:], "err": done.stderr[-6000:]}, f)
    finally:
        c.shutdown()


def test_a_real_trial_runs_its_deepspeed_group_across_two_nodes(tmp_path):
    """Two raylets (one core each): a worker needs 0.6 CPU, so the trial's two DeepSpeed workers
    can only run on different nodes; their gloo group spans the nodes, the trial reports from
    both, and its results reach MLflow."""
    sweep = tmp_path / "two-nodes.yaml"
    sweep.write_text(yaml.safe_dump({
        "name": "two-nodes", "data": {"name": "bbc_news", "max_train_samples": 64, "max_eval_samples": 16, "max_length": 32},
        "target": {"metric": "eval_loss", "value": 0.01},
        "train": {"max_steps": 4, "batch_size": 8, "eval_every": 2, "lr": 2e-3, "checkpoint_every": 0},
        "methods": {"lora": {"r": 4}}, "tune": {"num_samples": 1, "seeds": [0], "scheduler": "fifo"},
        "resources": {"num_workers": 2, "cpus_per_worker": 0.6}, "storage": str(tmp_path / "runs")}))
    ray_tmp = tempfile.mkdtemp(prefix="rc", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(RAY_TMPDIR=ray_tmp, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=os.urandom(16).hex())
    out = tmp_path / "out.json"
    code = "import sys; from tests.orchestrator.test_clusters import _two_node_cluster_sweep as f; f(sys.argv[1], sys.argv[2])"
    proc = subprocess.run([sys.executable, "-c", code, str(sweep), str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0 and out.exists(), f"Ray's logs: {ray_tmp}\n{proc.stderr[-4000:]}"
    r = json.loads(out.read_text())
    assert r["rc"] == 0, r["out"] + r["err"]
    shutil.rmtree(ray_tmp, ignore_errors=True)
    summary = json.loads((tmp_path / "runs" / "two-nodes" / "summary.json").read_text())
    (trial,) = summary["trials"]
    assert trial["status"] == "TERMINATED" and trial["step"] == 4
    results = [json.loads(line) for f in (tmp_path / "runs" / "two-nodes").glob("*/result.json")
               for line in f.read_text().splitlines() if line.strip()]
    assert [x["num_nodes"] for x in results] == [2, 2]  # both reports: the group spanned the two nodes
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/runs/mlflow.db")
    exp = client.get_experiment_by_name("two-nodes").experiment_id
    (run,) = client.search_runs([exp], "tags.orchestrator.kind = 'trial'")
    assert run.data.metrics["num_nodes"] == 2 and run.info.status == "FINISHED"


def test_kuberay_concurrency_comes_from_the_worker_groups_max_replicas():
    """The GPU groups start at 0 replicas: concurrency from maxReplicas, capped by the driver slots."""
    raycluster = placement.load_cluster(os.path.join(ROOT, "clusters/kuberay/raycluster.yaml"))
    assert placement.capacity(raycluster) == {"CPU": 16 + 8 * 7 + 2 * 90, "GPU": 8 + 2 * 8, "trial_driver": 16}
    gpu = quickstart_spec(num_workers=1, cpus_per_worker=4, gpus_per_worker=1)
    assert placement.concurrency(gpu, placement.capacity(raycluster)) == 16  # 24 GPUs, but 16 driver slots
    assert placement.driver_plan(gpu, {"CPU": 16.0, "trial_driver": 16.0},
                               cluster_file=os.path.join(ROOT, "clusters/kuberay/rayjob.yaml"))[1] == 8  # the job's 8 GPUs
    assert placement.driver_plan(gpu, {"CPU": 16.0, "trial_driver": 16.0}, bootstrap="/nonexistent")[1] == 1  # what it saw
