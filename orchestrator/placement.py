"""Where a sweep's trials run and how many at once: what a cluster can host at full scale (a
cluster-launcher YAML or a KubeRay manifest), what each trial driver asks for, and how many worker
groups fit. Used by the sweep (`driver_plan`) and by `orchestrate cluster cost` (`concurrency`).

    capacity(load_cluster(path))             # {"CPU": 272, "GPU": 24, "trial_driver": 16}: the most at once
    driver_plan(spec, ray.cluster_resources())   # (what a trial driver asks for, trials at once)
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import yaml

DRIVER_RESOURCE = "trial_driver"  # one slot per sweep driver; only on the head / on-demand nodes
DRIVER_CPU = 0.01  # what a trial driver holds besides its slot
BOOTSTRAP = "~/ray_bootstrap_config.yaml"  # `ray up` writes the prepared cluster YAML here on the head


def load_cluster(path: str) -> dict[str, Any]:
    with open(path) as f:
        return yaml.safe_load(f)


def max_concurrent(spec, cluster: dict[str, float]) -> int:
    """Trials whose worker groups fit at once in the cluster's CPUs and GPUs (at least 1).

    Two limits on CPU: Ray's logical CPUs (the workers' `cpus_per_worker` plus each trial driver's
    token CPU), and whole cores, because CPU workers are pinned to cores of their own
    (orchestrator.cores: 0.49 CPU is one core), so that concurrent trials never time each other."""
    from orchestrator.cores import cores_wanted

    r = spec.resources
    fits = [math.floor(cluster.get("CPU", 0) / (r.num_workers * r.cpus_per_worker + DRIVER_CPU) + 1e-9)]
    if r.gpus_per_worker:
        fits.append(math.floor(cluster.get("GPU", 0) / (r.num_workers * r.gpus_per_worker) + 1e-9))
    else:
        fits.append(math.floor(cluster.get("CPU", 0) / (r.num_workers * cores_wanted(r.cpus_per_worker)) + 1e-9))
    n = max(1, min(fits))
    return min(n, spec.tune.max_concurrent_trials) if spec.tune.max_concurrent_trials else n


def capacity(config: dict) -> dict[str, float]:
    """Each resource's most at once: the head plus worker nodes up to each type's `max_workers`
    and the global `max_workers` (the types richest in that resource first). Node types must list
    their resources (the launcher can detect AWS ones; this cannot). A KubeRay manifest: see
    `kuberay_capacity`."""
    if is_kuberay(config):
        return kuberay_capacity(config)
    types, head = config["available_node_types"], config["head_node_type"]
    total = {k: float(v) for k, v in types[head].get("resources", {}).items()}
    workers = [t for name, t in types.items() if name != head]
    for res in {r for t in workers for r in t.get("resources", {})}:
        left = config.get("max_workers", 2)  # the launcher's default
        for t in sorted(workers, key=lambda t: -t.get("resources", {}).get(res, 0)):
            n = min(t.get("max_workers", left), left)
            total[res] = total.get(res, 0.0) + n * t.get("resources", {}).get(res, 0)
            left -= n
    return total


def is_kuberay(config: dict) -> bool:
    return isinstance(config, dict) and config.get("kind") in ("RayCluster", "RayJob")


def _quantity(value) -> float:
    """A Kubernetes quantity of CPUs or GPUs: 16, "16", "500m"."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def kuberay_capacity(manifest: dict) -> dict[str, float]:
    """A KubeRay RayCluster's (or RayJob's rayClusterSpec's) resources at full scale: the head plus
    every worker group at its `maxReplicas` (groups start at 0 replicas, so `ray.cluster_resources()`
    alone would see no GPU). A pod's CPUs and GPUs come from `rayStartParams` (num-cpus, num-gpus,
    resources), else from its first container's limits (cpu, nvidia.com/gpu), as KubeRay sets them."""
    spec = manifest["spec"].get("rayClusterSpec", manifest["spec"])

    def pod(group: dict) -> dict[str, float]:
        params = group.get("rayStartParams") or {}
        containers = group.get("template", {}).get("spec", {}).get("containers") or [{}]
        res = containers[0].get("resources", {})
        limits = {**res.get("requests", {}), **res.get("limits", {})}
        out = {"CPU": _quantity(params.get("num-cpus", limits.get("cpu", 0))),
               "GPU": _quantity(params.get("num-gpus", limits.get("nvidia.com/gpu", 0)))}
        if params.get("resources"):
            out.update({k: float(v) for k, v in json.loads(str(params["resources"]).strip().strip("'\"").replace('\\"', '"')).items()})
        return out

    total = pod(spec["headGroupSpec"])
    for group in spec.get("workerGroupSpecs", []):
        n = group.get("maxReplicas", group.get("replicas", 0))
        for k, v in pod(group).items():
            total[k] = total.get(k, 0.0) + n * v
    return total


def driver_resources(cluster: dict[str, float]) -> dict[str, float]:
    """What one trial driver asks for: a token CPU, plus a driver slot where the cluster has them
    (`ray.cluster_resources()` or `capacity(...)`), which pins drivers to the head."""
    return {"CPU": DRIVER_CPU, DRIVER_RESOURCE: 1} if cluster.get(DRIVER_RESOURCE) else {"CPU": DRIVER_CPU}


def concurrency(spec, cluster: dict[str, float]) -> int:
    """Trials at once: worker groups that fit (max_concurrent), and no more than the driver slots."""
    n = max_concurrent(spec, cluster)
    return min(n, max(1, math.floor(cluster[DRIVER_RESOURCE]))) if DRIVER_RESOURCE in cluster else n


def max_concurrent_trials(spec, config: dict) -> int:
    """Trials a cluster YAML can run at once at full scale."""
    return concurrency(spec, capacity(config))


def driver_plan(spec, now: dict[str, float], bootstrap: str = BOOTSTRAP,
                cluster_file: str | None = None) -> tuple[dict[str, float], int]:
    """For `sweep.build_tuner`: what each trial driver asks for, and how many trials at once, given
    `ray.cluster_resources()`. On a launcher cluster's head (where the sweep driver runs) the size
    the autoscaler may reach counts, not only the nodes up when the sweep starts (often the head alone:
    no GPU yet, which would cap the sweep at one trial at a time); `cluster_file` (`orchestrate
    sweep --cluster`, e.g. a KubeRay manifest) says the same where there is no bootstrap file."""
    path = os.path.expanduser(cluster_file or bootstrap)
    full = capacity(load_cluster(path)) if os.path.exists(path) else {}
    cap = {k: max(now.get(k, 0.0), full.get(k, 0.0)) for k in {*now, *full}}
    return driver_resources(cap), concurrency(spec, cap)
