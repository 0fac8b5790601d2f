"""Ray cluster-launcher files for sweeps: check one offline, read what it can host, price a sweep.

    orchestrate cluster check clusters/aws-gpu.yaml        # or: python -m orchestrator.cluster check FILE
    orchestrate cluster cost search_spaces/compare.yaml --gpu-hour-usd 1.2 --seconds-per-step 0.5

    errors = check_cluster_file("clusters/aws-gpu.yaml")   # [] when good; else one readable line each
    capacity(load_cluster(path))             # {"CPU": 272, "GPU": 24, "trial_driver": 16}: the most at once
    driver_plan(spec, ray.cluster_resources())   # (what a trial driver asks for, trials at once)
    estimate_cost(spec, gpu_hour_usd=1.2, seconds_per_step=0.5)   # GPU-hours per trial x trials, in USD

`check_cluster_file` runs what `ray up` runs before it touches a cloud: Ray's own JSON schema
(`ray/autoscaler/ray-schema.json`, draft-07, `additionalProperties: false` catches typos), then the
launcher's `prepare_config` (merges the provider's defaults) and `validate_config`. Errors name the
file, the key path and what was expected. Then this project's rules, each a trap we know of:
  - sweep drivers are pinned by a custom resource (`trial_driver`, STYLE.md O5): the head must
    advertise it and no spot / preemptible node may (a reclaimed node would kill every trial it drives);
  - the launcher fills an omitted `setup_commands` with its defaults, which install a Ray nightly;
  - `rayproject/ray-ml` images stop at Ray 2.30, and the cluster's Ray must be the one installed here;
  - a dashboard on 0.0.0.0 (the launcher's default) lets anyone who reaches it run code: bind 127.0.0.1;
  - GCE's `scheduling` is a mapping (Ray's own GCP examples once had a list);
  - no credential in the file: instance roles / service accounts or the environment provide them.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import json
import logging
import math
import os
import re
import sys
from typing import Any

import yaml

DRIVER_RESOURCE = "trial_driver"  # one slot per sweep driver; only on the head / on-demand nodes
DRIVER_CPU = 0.01  # what a driver holds besides its slot (sweep.DRIVER_RESOURCES)
BOOTSTRAP = "~/ray_bootstrap_config.yaml"  # `ray up` writes the prepared cluster YAML here on the head
SECRETS = [(re.compile(r"AKIA[0-9A-Z]{16}"), "an AWS access key id"),
           (re.compile(r"(?i)aws_secret_access_key|aws_session_token"), "an AWS secret key"),
           (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----|\"private_key\""), "a private key"),
           (re.compile(r"(?m)^\s*gcp_credentials\s*:"), "GCP credentials (provider.gcp_credentials)")]


def load_cluster(path: str) -> dict[str, Any]:
    with open(path) as f:
        return yaml.safe_load(f)


# ----------------------------------------------------------------------------- checking


def check_cluster_file(path: str) -> list[str]:
    """Every problem of a cluster-launcher YAML, as `FILE: key.path: what was expected (line N)`."""
    try:
        with open(path) as f:
            text = f.read()
        config = yaml.safe_load(text)
    except OSError as e:
        return [f"{path}: cannot read the file ({e.strerror})"]
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        return [f"{path}: not valid YAML ({getattr(e, 'problem', e)})" + (f" (line {mark.line + 1})" if mark else "")]
    if not isinstance(config, dict):
        return [f"{path}: expected a mapping (cluster_name, provider, available_node_types, ...), got {type(config).__name__}"]
    lines = _line_map(text)

    def fmt(key: str, message: str) -> str:
        line = _line_of(key, lines)
        return f"{path}: {key + ': ' if key else ''}{message}" + (f" (line {line})" if line else "")

    errors = [fmt(k, m) for k, m in _schema_errors(config)]
    for rx, what in SECRETS:
        if m := rx.search(text):
            errors.append(f"{path}: looks like {what} (line {text.count(chr(10), 0, m.start()) + 1}); "
                          "let the cloud's instance role / service account or the environment provide it")
    if errors:  # Ray's own checks assume a schema-valid config
        return errors
    try:
        from ray.autoscaler._private.util import prepare_config, validate_config

        quiet = logging.getLogger("ray.autoscaler._private.util")  # "setting max workers for head node type to 0"
        level = quiet.level
        quiet.setLevel(logging.WARNING)
        try:
            prepared = prepare_config(copy.deepcopy(config))
            validate_config(prepared)
        finally:
            quiet.setLevel(level)
    except Exception as e:  # noqa: BLE001 - Ray raises ValueError, KeyError, AssertionError, NotImplementedError...
        return [fmt("", f"Ray's launcher rejects it: {type(e).__name__}: {e}")]
    return [fmt(k, m) for k, m in _project_errors(config, prepared)]


def _schema_errors(config: dict) -> list[tuple[str, str]]:
    import jsonschema

    import ray.autoscaler

    with open(os.path.join(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json")) as f:
        schema = json.load(f)
    out = []
    for e in sorted(jsonschema.Draft7Validator(schema).iter_errors(config), key=lambda e: [str(p) for p in e.absolute_path]):
        where = _dotted(e.absolute_path)
        if e.validator == "additionalProperties":
            known = e.schema.get("properties", {})
            for key in e.instance:
                if key in known or any(re.search(p, key) for p in e.schema.get("patternProperties", {})):
                    continue
                hint = difflib.get_close_matches(key, list(known), n=1)
                out.append((_join(where, key), "unknown key" + (f", did you mean '{hint[0]}'?" if hint else "")
                            + f" (valid here: {', '.join(sorted(known))})"))
        elif e.validator == "required":
            missing = re.match(r"'(.+)' is a required property", e.message)
            out.append((_join(where, missing.group(1)) if missing else where, "missing (required)"))
        elif e.validator == "type":
            expected = " or ".join(e.validator_value) if isinstance(e.validator_value, list) else e.validator_value
            out.append((where, f"expected {expected}, got {type(e.instance).__name__} {e.instance!r}"))
        elif e.validator == "minimum":
            out.append((where, f"expected a number >= {e.validator_value}, got {e.instance!r}"))
        else:
            out.append((where, e.message))
    return out


def _project_errors(raw: dict, prepared: dict) -> list[tuple[str, str]]:
    import ray

    out = []
    types, head = prepared["available_node_types"], prepared["head_node_type"]
    if DRIVER_RESOURCE not in types[head].get("resources", {}):
        out.append((f"available_node_types.{head}.resources", f"expected a '{DRIVER_RESOURCE}' entry (one per sweep "
                    "driver) on the head, so drivers are pinned there, never on a spot node"))
    for name, node in types.items():
        scheduling = node.get("node_config", {}).get("scheduling")
        if isinstance(scheduling, list):
            out.append((f"available_node_types.{name}.node_config.scheduling", "expected a mapping (GCE's Scheduling "
                        "object, e.g. {provisioningModel: SPOT, onHostMaintenance: TERMINATE}), got a list"))
        if is_spot(node) and DRIVER_RESOURCE in node.get("resources", {}):
            out.append((f"available_node_types.{name}.resources.{DRIVER_RESOURCE}", "must not be on a spot / "
                        "preemptible node: reclaiming it would kill every trial its drivers run"))
    if "setup_commands" not in raw:
        out.append(("setup_commands", "missing: the launcher would run its defaults (a Ray nightly wheel); "
                    "install this project here"))
    docker = prepared.get("docker") or {}
    for key in ("image", "head_image", "worker_image"):
        image = docker.get(key, "")
        tag = re.match(r"rayproject/ray(-ml)?:(\d+\.\d+\.\d+)", image)
        if "rayproject/ray-ml" in image:
            out.append((f"docker.{key}", f"rayproject/ray-ml images stop at Ray 2.30; use rayproject/ray:{ray.__version__}-py311-gpu"))
        elif tag and tag.group(2) != ray.__version__:
            out.append((f"docker.{key}", f"Ray {tag.group(2)} in the image but {ray.__version__} installed here; "
                        "the client and the cluster must run the same Ray"))
    if any(re.search(r"--dashboard-host[= ]0\.0\.0\.0", c) for c in prepared.get("head_start_ray_commands", [])):
        out.append(("head_start_ray_commands", "--dashboard-host=0.0.0.0 serves job submission (running code) on every "
                    "interface; bind 127.0.0.1 and reach it with `ray dashboard`"))
    return out


def is_spot(node_type: dict) -> bool:
    """AWS InstanceMarketOptions spot, GCE preemptible or SPOT provisioning."""
    cfg = node_type.get("node_config", {})
    market = (cfg.get("InstanceMarketOptions") or {}).get("MarketType", "")
    scheduling = cfg.get("scheduling") or {}
    items = scheduling if isinstance(scheduling, list) else [scheduling]
    return market.lower() == "spot" or any(
        isinstance(s, dict) and (s.get("preemptible") is True or str(s.get("provisioningModel", "")).upper() == "SPOT")
        for s in items)


def _dotted(parts) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _line_map(text: str) -> dict[str, int]:
    """Key path (as `_dotted` writes it) -> 1-based line, from the YAML node tree."""
    lines: dict[str, int] = {}

    def walk(node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = _join(prefix, str(k.value))
                lines[key] = k.start_mark.line + 1
                walk(v, key)
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                lines[f"{prefix}[{i}]"] = v.start_mark.line + 1
                walk(v, f"{prefix}[{i}]")

    try:
        walk(yaml.compose(text), "")
    except yaml.YAMLError:
        pass
    return lines


def _line_of(key: str, lines: dict[str, int]) -> int | None:
    while key and key not in lines:  # a missing or unknown key: the line of its parent
        parent = re.sub(r"(\.[^.\[]*|\[\d+\])$", "", key)
        key = "" if parent == key else parent
    return lines.get(key)


# ----------------------------------------------------------------------------- capacity


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
    """Trials at once: worker groups that fit (sweep.max_concurrent), and no more than the driver slots."""
    from orchestrator.sweep import max_concurrent

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


# ----------------------------------------------------------------------------- cost


@dataclasses.dataclass(frozen=True)
class CostEstimate:
    name: str
    trials: int
    gpus_per_trial: float
    hours_per_trial: float  # the longest trial's max_steps x seconds_per_step (ASHA and the target stop trials earlier)
    gpu_hours: float
    usd: float  # GPUs, plus the head for the wall clock when priced
    wall_hours: float | None = None  # with a concurrency: ceil(trials / concurrency) x hours_per_trial
    head_usd: float = 0.0

    def __str__(self) -> str:
        s = (f"{self.name}: {self.trials} trial(s) x {self.gpus_per_trial:g} GPU x {_hours(self.hours_per_trial)} "
             f"= {self.gpu_hours:.3g} GPU-hours, ${self.usd:,.2f} if every trial runs max_steps")
        if self.head_usd:
            s += f" (head ${self.head_usd:,.2f})"
        if self.wall_hours is not None:
            s += f"; about {_hours(self.wall_hours)} of wall clock once the nodes are up"
        if not self.gpus_per_trial:
            s += " (resources.gpus_per_worker is 0: this sweep asks for no GPU)"
        return s


def _hours(h: float) -> str:
    return f"{h * 60:.3g} min" if h < 1 else f"{h:.3g} h"


def estimate_cost(spec, gpu_hour_usd: float, seconds_per_step: float, concurrency: int | None = None,
                  head_hour_usd: float = 0.0) -> CostEstimate:
    """GPU-hours per trial (max_steps x seconds_per_step x GPUs) times trials, priced per GPU-hour.
    `seconds_per_step`: measure it (a short run's elapsed_s / step on the target GPU, evaluations
    included). Not counted: node start-up and model loading. With `concurrency` the wall clock is
    estimated too, and `head_hour_usd` adds the head for that long."""
    if gpu_hour_usd < 0 or seconds_per_step <= 0:
        raise ValueError(f"gpu_hour_usd={gpu_hour_usd}, seconds_per_step={seconds_per_step}: expected >= 0 and > 0")
    from orchestrator.sweep import trial_configs

    # Each trial at its own budget (a method's train.max_steps overrides the file's).
    configs = trial_configs(spec)
    trials = spec.tune.num_samples if spec.tune.search_alg == "optuna" else len(configs)
    steps = [c.train.max_steps for c in configs] * (trials if spec.tune.search_alg == "optuna" else 1)
    r = spec.resources
    gpus = r.num_workers * r.gpus_per_worker
    hours = max(steps) * seconds_per_step / 3600  # the longest trial
    gpu_hours = sum(steps) * seconds_per_step / 3600 * gpus
    wall = math.ceil(trials / concurrency) * hours if concurrency else None
    head = (wall or 0.0) * head_hour_usd
    return CostEstimate(spec.name, trials, gpus, hours, gpu_hours, gpu_hours * gpu_hour_usd + head, wall, head)


# ----------------------------------------------------------------------------- CLI


def cmd_check(args) -> int:
    bad = 0
    for path in args.files:
        errors = check_cluster_file(path)
        print("\n".join(errors) if errors else f"{path}: OK")
        bad += bool(errors)
    return 2 if bad else 0


def cmd_cost(args) -> int:
    from orchestrator.spec import load_sweep

    spec = load_sweep(args.file, validate_data=False)
    concurrency = args.concurrency
    if args.cluster:
        errors = [] if is_kuberay(load_cluster(args.cluster)) else check_cluster_file(args.cluster)
        if errors:
            print("\n".join(errors), file=sys.stderr)
            return 2
        concurrency = concurrency or max_concurrent_trials(spec, load_cluster(args.cluster))
    print(estimate_cost(spec, args.gpu_hour_usd, args.seconds_per_step, concurrency, args.head_hour_usd))
    return 0


def add_subcommands(sub) -> None:
    """`check FILE...` and `cost FILE ...` under `sub` (an argparse subparsers object)."""
    c = sub.add_parser("check", help="check cluster-launcher YAMLs offline (Ray's schema and launcher, this project's rules)")
    c.add_argument("files", nargs="+")
    c.set_defaults(fn=cmd_check)
    p = sub.add_parser("cost", help="estimate a sweep's GPU-hours and price from its sweep file")
    p.add_argument("file", help="sweep file")
    p.add_argument("--gpu-hour-usd", type=float, required=True, help="price of one GPU-hour")
    p.add_argument("--seconds-per-step", type=float, required=True, help="measured seconds per optimizer step")
    p.add_argument("--concurrency", type=int, help="trials at once (for the wall clock)")
    p.add_argument("--cluster", help="cluster YAML (launcher or KubeRay): concurrency from what it can host at full scale")
    p.add_argument("--head-hour-usd", type=float, default=0.0, help="price of the head node per hour")
    p.set_defaults(fn=cmd_cost)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.cluster", description=__doc__.splitlines()[0])
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except ValueError as e:  # a sweep file's ConfigError too
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
