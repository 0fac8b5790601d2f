"""Ray cluster-launcher files for sweeps: check one offline, price a sweep (`orchestrate cluster`).

    orchestrate cluster check clusters/aws-gpu.yaml
    orchestrate cluster cost search_spaces/compare.yaml --gpu-hour-usd 1.2 --seconds-per-step 0.5

    errors = check_cluster_file("clusters/aws-gpu.yaml")   # [] when good; else one readable line each
    estimate_cost(spec, gpu_hour_usd=1.2, seconds_per_step=0.5)   # GPU-hours per trial x trials, in USD

What a cluster can host and how many trials run at once: `orchestrator.placement`.

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

import copy
import dataclasses
import difflib
import json
import logging
import math
import os
import re

import yaml

from orchestrator.placement import DRIVER_RESOURCE
SECRETS = [(re.compile(r"AKIA[0-9A-Z]{16}"), "an AWS access key id"),
           (re.compile(r"(?i)aws_secret_access_key|aws_session_token"), "an AWS secret key"),
           (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----|\"private_key\""), "a private key"),
           (re.compile(r"(?m)^\s*gcp_credentials\s*:"), "GCP credentials (provider.gcp_credentials)")]


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
    configs = trial_configs(spec)  # Optuna: the one method's config, once per suggested trial
    trials = spec.num_trials
    steps = [c.train.max_steps for c in configs] * (trials // len(configs))
    r = spec.resources
    gpus = r.num_workers * r.gpus_per_worker
    hours = max(steps) * seconds_per_step / 3600  # the longest trial
    gpu_hours = sum(steps) * seconds_per_step / 3600 * gpus
    wall = math.ceil(trials / concurrency) * hours if concurrency else None
    head = (wall or 0.0) * head_hour_usd
    return CostEstimate(spec.name, trials, gpus, hours, gpu_hours, gpu_hours * gpu_hour_usd + head, wall, head)
