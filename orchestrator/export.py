"""`orchestrate export`: a trained trial handed to the tools people serve models with.

    export(source, "out/lora-peft", "peft")     # PeftModel.from_pretrained(base, "out/lora-peft")
    export(source, "out/lora-merged", "merged")  # AutoModel*.from_pretrained("out/lora-merged")

`source` is a trial's checkpoint folder (it holds `adapter/` and `trial.json`) or a bare adapter
folder with its trial configuration given apart. Formats:

- `peft`: PEFT's own format, written by PEFT itself (`get_peft_model` on a fresh base, our tensors
  copied in, `save_pretrained`), so it loads in PEFT, vLLM and TGI like any PEFT adapter.
  LoRA is PEFT LoRA. LoRA-GA trains on a base whose weight was shifted by -(alpha/r) B0 A0, so its
  update on the *original* base is (alpha/r)(B A - B0 A0): a rank-2r LoRA with A' = [A; A0] and
  B' = [B, -B0] (PEFT converts its own LoRA-GA and PiSSA adapters the same way). BOFT is PEFT BOFT
  (same butterfly factors, Cayley transform and output scale) for the exact Cayley transform;
  more than one butterfly factor only on a CUDA machine (PEFT's CPU path silently uses one).
  Methods PEFT has no format for (unitary, the hybrid, BOFT with the Neumann series, full
  fine-tuning) are refused with a pointer to `merged`.
- `merged`: the adapter folded into the base weights and the adapter layers removed, saved with
  `save_pretrained` together with the tokenizer: a plain transformers model, for every method.

Before anything is written, the exported model's logits are compared with the trained model's on
a probe batch; an export that would not reproduce them is an error, not a file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from typing import Literal

import torch
from torch import nn

import methods
from methods.config import ConfigError
from methods.model import CONFIG_NAME, WEIGHTS_NAME
from orchestrator.config import TrialConfig
from orchestrator.worker import ADAPTER_DIR, TRIAL_FILE

Format = Literal["peft", "merged"]
FORMATS = ("peft", "merged")
PROBE = ["Shares rose sharply after the quarterly results.", "The team won the final in extra time.",
         "A new phone was announced today.", "Parliament debated the budget."]
ATOL = 1e-4  # fp32 logits of a reloaded export against the trained model's (tests check 1e-5)


def read_trial_file(path: str) -> TrialConfig:
    """A trial's configuration: a checkpoint's trial.json or an MLflow run's trial_config.yaml."""
    import yaml

    try:
        with open(path) as f:
            # Not yaml for JSON: PyYAML (YAML 1.1) reads json's 1e-07 as a string
            return TrialConfig.from_dict(json.load(f) if path.endswith(".json") else yaml.safe_load(f))
    except (OSError, yaml.YAMLError, TypeError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise ConfigError(f"{path}: not a trial configuration ({e})") from e


def read_trial(folder: str) -> TrialConfig:
    path = os.path.join(folder, TRIAL_FILE)
    if not os.path.isfile(path):
        raise ConfigError(f"{folder}: no {TRIAL_FILE} (the trial's configuration); give the sweep file instead, "
                          "or --trial-config trial.json|trial_config.yaml")
    return read_trial_file(path)


def default_folder(spec) -> str:
    from orchestrator.sweep import storage_path

    return os.path.join(storage_path(spec), spec.name, "export")


def run_of(uri: str, experiment: str, trial_name: str) -> str:
    """The MLflow run id of a sweep's trial, by its name (the latest such run)."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], f"attributes.run_name = '{trial_name}'",
                              order_by=["attributes.start_time DESC"], max_results=1) if exp else []
    if not runs:
        raise ConfigError(f"no MLflow run named {trial_name!r} in experiment {experiment!r} at {uri}")
    return runs[0].info.run_id


def resolve(spec, trial: str | None = None, method: str | None = None, run_id: str | None = None):
    """(checkpoint folder, trial config, trial name) of a sweep's trial: the MLflow run `run_id`, the
    trial called `trial`, the best trial of `method`, or the best of the sweep (report.rank_key)."""
    import tempfile

    from orchestrator import report, tracking
    from orchestrator.sweep import SUMMARY_FILE, storage_path

    if run_id:
        import mlflow

        uri = tracking.tracking_uri(spec)
        client = mlflow.MlflowClient(uri)
        run = client.get_run(run_id)
        folder = tempfile.mkdtemp(prefix="export-")
        for artifact in (ADAPTER_DIR, "trial_config.yaml"):
            mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact, dst_path=folder, tracking_uri=uri)
        return folder, read_trial_file(os.path.join(folder, "trial_config.yaml")), run.info.run_name
    path = os.path.join(storage_path(spec), spec.name, SUMMARY_FILE)
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: no summary of sweep {spec.name!r} here (has it finished?); or export --run-id RUN")
    with open(path) as f:
        summary = json.load(f)
    mode = summary["target"]["mode"]
    if trial:
        chosen = next((t for t in summary["trials"] if t["name"] == trial), None)
        if chosen is None:
            raise ConfigError(f"--trial: no trial {trial!r} in {path} ({', '.join(t['name'] for t in summary['trials'])})")
    elif method:
        if method not in summary["best"]:
            raise ConfigError(f"--method: no finished {method!r} trial in {path} (methods: {', '.join(summary['best'])})")
        chosen = summary["best"][method]
    else:
        if not summary["best"]:
            raise ConfigError(f"{path}: no trial of this sweep finished")
        chosen = max(summary["best"].values(), key=lambda t: report.trial_key(t, mode))
    if not chosen.get("checkpoint"):
        raise ConfigError(f"trial {chosen['name']}: no checkpoint in {path} (it ended before its first checkpoint)")
    return chosen["checkpoint"], TrialConfig.from_dict(chosen["config"]), chosen["name"]


def adapter_folder(source: str) -> str:
    folder = os.path.join(source, ADAPTER_DIR)
    if os.path.isfile(os.path.join(folder, CONFIG_NAME)):
        return folder
    if os.path.isfile(os.path.join(source, CONFIG_NAME)):
        return source
    raise ConfigError(f"{source}: neither a checkpoint (with {ADAPTER_DIR}/) nor an adapter folder "
                      f"({CONFIG_NAME} + {WEIGHTS_NAME})")


def load_base(cfg: TrialConfig):
    """A fresh (tokenizer, base model), loaded as the trial's workers loaded it, on CPU, fp32."""
    from orchestrator.tasks import get_task
    from orchestrator.worker import load_model  # the workers' own loader: same head, pad token

    cfg = dataclasses.replace(cfg, deepspeed=dataclasses.replace(cfg.deepspeed, zero_stage=0))  # no sharding here
    tokenizer, model = load_model(cfg, get_task(cfg.data.name))
    return tokenizer, model.float().eval()


def load_trained(source: str, cfg: TrialConfig):
    """(tokenizer, the trained model): the base with the trial's adapter attached."""
    tokenizer, model = load_base(cfg)
    return tokenizer, methods.load_adapter(model, adapter_folder(source)).eval()


@torch.no_grad()
def logits(model: nn.Module, tokenizer) -> torch.Tensor:
    batch = tokenizer(PROBE, return_tensors="pt", padding=True)
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()


# ----------------------------------------------------------------------------- PEFT


@contextlib.contextmanager
def _compiler_env():
    """PEFT's BOFT sets CC/CXX while it tries to build its CUDA kernel and never restores them on
    failure; later op builds in this process (DeepSpeed's) would then hash different flags."""
    saved = {k: os.environ.get(k) for k in ("CC", "CXX")}
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def peft_config(model: nn.Module):
    """PEFT's config for the adapter on `model`, or a ConfigError saying why there is none."""
    import peft

    cfg = model.adapter_config
    targets = [name for name, _ in methods.adapter_layers(model)]
    extra = list(getattr(model, "modules_to_save", ())) or None
    if cfg.method == "lora":
        return peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, use_rslora=cfg.use_rslora,
                               target_modules=targets, modules_to_save=extra)
    if cfg.method == "lora_ga":
        lora = cfg.lora  # rank 2r with the same scale: alpha/r = alpha'/(2r), or alpha/sqrt(r) = alpha'/sqrt(2r)
        alpha = lora.alpha * (math.sqrt(2) if lora.use_rslora else 2)
        return peft.LoraConfig(r=2 * lora.r, lora_alpha=alpha, lora_dropout=lora.dropout, use_rslora=lora.use_rslora,
                               target_modules=targets, modules_to_save=extra)
    if cfg.method == "boft" and cfg.cayley == "exact" and (cfg.n_butterfly_factor == 1 or torch.cuda.is_available()):
        first = next(layer for _, layer in methods.adapter_layers(model))
        return peft.BOFTConfig(boft_block_size=first.block_size, boft_n_butterfly_factor=cfg.n_butterfly_factor,
                               boft_dropout=0.0, target_modules=targets, modules_to_save=extra)
    if cfg.method == "boft" and cfg.cayley != "exact":
        why = "PEFT's BOFT has only the exact Cayley transform (this adapter used cayley: neumann)"
    elif cfg.method == "boft":  # peft/tuners/boft/layer.py: without its CUDA kernel PEFT silently builds 1 factor
        why = (f"PEFT builds BOFT with {cfg.n_butterfly_factor} butterfly factors only with its CUDA kernel, "
               "and silently builds 1 factor without it (no GPU here)")
    elif cfg.method == "full":
        why = "full fine-tuning has no adapter"
    else:
        why = f"PEFT has no format for {cfg.method!r}"
    raise ConfigError(f"--format peft: {why}; use --format merged (the base with the adapter folded in)")


@torch.no_grad()
def to_peft(trained: nn.Module, base: nn.Module):
    """A PeftModel on `base` (a fresh copy of the trial's base model) equal to `trained`."""
    import peft

    config = peft_config(trained)
    with _compiler_env():
        model = peft.get_peft_model(base, config)
    inner = model.base_model.model
    for name, layer in methods.adapter_layers(trained):
        target = inner.get_submodule(name)
        if trained.adapter_config.method == "boft":
            target.boft_R["default"].copy_(layer.boft_R)
            target.boft_s["default"].copy_(layer.boft_s.reshape(target.boft_s["default"].shape))
            continue
        A, B = layer.lora_A, layer.lora_B
        if trained.adapter_config.method == "lora_ga":
            A, B = torch.cat([A, layer.lora_A0]), torch.cat([B, -layer.lora_B0], dim=1)
        target.lora_A["default"].weight.copy_(A)
        target.lora_B["default"].weight.copy_(B)
    for name in getattr(trained, "modules_to_save", ()):
        inner.get_submodule(name).modules_to_save["default"].load_state_dict(trained.get_submodule(name).state_dict())
    return model.eval()


# ----------------------------------------------------------------------------- the command


def base_model_name(cfg: TrialConfig) -> str:
    """How exports and logged models name the base model."""
    return cfg.model.name_or_path or "sentence-transformers/all-MiniLM-L6-v2 (bundled)"


def check_same(expected: torch.Tensor, got: torch.Tensor, what: str) -> float:
    diff = float((expected - got).abs().max())
    if not diff <= ATOL:
        raise RuntimeError(f"{what} does not reproduce the trained model: max |logit difference| {diff:.3g} > {ATOL}")
    return diff


def export(source: str, out: str, fmt: Format, cfg: TrialConfig | None = None) -> dict:
    """Write the trial at `source` to `out` in `fmt`; returns what was written and checked."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format: {fmt!r} is not one of {', '.join(FORMATS)}")
    adapter_folder(source)  # a wrong folder is named as such, before its missing trial.json
    cfg = cfg or read_trial(source)
    tokenizer, trained = load_trained(source, cfg)
    expected = logits(trained, tokenizer)
    if fmt == "peft":
        peft_config(trained)  # refused before a second model is loaded
        model = to_peft(trained, load_base(cfg)[1])
        diff = check_same(expected, logits(model, tokenizer), "the PEFT model")
        with _compiler_env():
            model.save_pretrained(out)
    else:
        model = methods.merge_and_unload(trained)
        diff = check_same(expected, logits(model, tokenizer), "the merged model")
        model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    info = {"format": fmt, "method": cfg.method.method, "base_model": base_model_name(cfg),
            "path": os.path.abspath(out), "max_logit_diff": diff}
    with open(os.path.join(out, "export.json"), "w") as f:
        json.dump({**info, "trial": cfg.to_dict()}, f, indent=2)
    return info
