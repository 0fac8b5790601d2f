"""MLflow names and values of a trial: its params (one name per setting, declared by the config
fields), the metrics of one report, per-layer series, whole-trial finals."""

from __future__ import annotations

import json
import math
from typing import Any

from orchestrator import report


# Tune's bookkeeping in a report; the trial's own fields are declared in orchestrator.report.
TUNE_KEYS = {"training_iteration", "timestamp", "pid", "time_this_iter_s", "time_total_s", "time_since_restore",
             "iterations_since_restore", "trial_id", "config", "date", "hostname", "node_ip",
             "checkpoint_dir_name", "checkpoint_path"}


LAYERS_ARTIFACT = "layers.json"  # per-layer diagnostics over the reports (the hybrid's gate and norms)


# TrialConfig fields whose param name is not simply the field's own name.
TRIAL_PARAMS = {"data.name": "task", "data.seed": "data_seed", "model.name_or_path": "model",
                "deepspeed.config_file": "deepspeed_config_file", "target.metric": "target_metric",
                "target.value": "target_value"}


SAME_NAME = ("data", "model", "train", "deepspeed", "resources")  # other fields keep their name


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
    return out


def _text(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v) if v is None or isinstance(v, (bool, list, tuple, dict)) else str(v)


def trial_params(trial: dict[str, Any], target: dict | None = None) -> dict[str, str]:
    """A TrialConfig dict -> MLflow params. The method's settings are resolved with its defaults
    (so every run lists every hyperparameter); unknown method fields keep their dotted path."""
    out = {"method": trial["method"]["name"]}
    for section in SAME_NAME + ("target",):
        for key, value in _flat(trial.get(section) or {}).items():
            path = f"{section}.{key}"
            out[TRIAL_PARAMS.get(path, key if section in SAME_NAME else path)] = value
    import methods

    name = trial["method"]["name"]
    try:  # every field under the name it declares (methods.config.flat_params), defaults included
        config = methods.flat_params(methods.config_for(name, trial["method"]["config"]))
    except (ValueError, TypeError):  # an unknown or newer method: its settings as given
        config = _flat(trial["method"]["config"])
    for key, value in config.items():
        out[key if key not in out or out[key] in (None, value) else f"{name}.{key}"] = value
    if target:
        out.update(target_metric=target["metric"], target_mode=target["mode"], target_value=target["value"])
    return {k: _text(v) for k, v in out.items()}


def report_metrics(result: dict[str, Any]) -> dict[str, float]:
    """The numbers of one Tune report (bools as 0/1); per-layer diagnostics as their mean over
    layers (`layer_mean/<name>`, e.g. layer_mean/gate); the series per layer go to layers.json."""
    out = {k: float(v) for k, v in result.items() if k not in TUNE_KEYS and report.is_metric(k, v)}
    layers = result.get("layers") or {}
    for key in sorted({k for d in layers.values() for k in d}):
        values = [d[key] for d in layers.values() if isinstance(d.get(key), (int, float)) and math.isfinite(d[key])]
        if values:
            out[f"layer_mean/{key}"] = sum(values) / len(values)
    return out


def layer_series(history: list[dict]) -> dict[str, Any]:
    """[{step, layers: {layer: {name: value}}}] -> {"steps": [...], "layers": {layer: {name: [values]}}}."""
    names = sorted({layer for h in history for layer in h["layers"]})
    keys = sorted({k for h in history for d in h["layers"].values() for k in d})
    return {"steps": [h["step"] for h in history],
            "layers": {n: {k: [h["layers"].get(n, {}).get(k) for h in history] for k in keys} for n in names}}


def final_metrics(last: dict[str, Any], target: dict) -> dict[str, float]:
    """Whole-trial numbers: the final target metric (not a diverged +-inf) and throughput."""
    out = {}
    if isinstance(last.get(target["metric"]), (int, float)) and math.isfinite(last[target["metric"]]):
        out["final_metric"] = float(last[target["metric"]])
    if last.get("elapsed_s"):
        for what in ("samples", "tokens"):
            if last.get(f"{what}_seen") is not None:
                out[f"avg_{what}_per_s"] = last[f"{what}_seen"] / last["elapsed_s"]
    return out
