"""`orchestrate export`: the trained model reloaded by PEFT (`PeftModel.from_pretrained`) and by
transformers (`AutoModel*.from_pretrained` of the merged export) gives the trained model's logits;
on the bundled MiniLM (classification, with its trained head) and on a small random Llama."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import methods
from methods.config import ConfigError
from orchestrator import export
from orchestrator.config import TrialConfig
from orchestrator.worker import ADAPTER_DIR, TRIAL_FILE, head_modules
from tests.conftest import save_tiny_causal_lm

CONFIGS = {
    "lora": {"r": 4, "alpha": 8},
    "lora_ga": {"lora": {"r": 4, "alpha": 8}, "batches": 2},
    "boft": {"block_size": 4},
    "unitary": {},
    "hybrid": {"lora_ga": {"lora": {"r": 4}, "batches": 2}, "boft": {"block_size": 4}},
    "full": {},
}


@pytest.fixture(scope="module")
def llama_path(tmp_path_factory) -> str:
    return save_tiny_causal_lm(str(tmp_path_factory.mktemp("llama")))


def trial(model: str, method: str, llama_path: str) -> TrialConfig:
    data = {"name": "bbc_news"} if model == "minilm" else {"name": "instructions", "data_files": {"train": "unused.jsonl"}}
    return TrialConfig.from_dict({"data": data, "model": {"name_or_path": None if model == "minilm" else llama_path},
                                  "method": {"name": method, "config": CONFIGS[method]}})


def trained_checkpoint(folder, cfg: TrialConfig) -> torch.Tensor:
    """A checkpoint as a trial writes it (adapter/ + trial.json) of an adapter moved away from its
    initialisation (every trainable tensor perturbed, as training would); returns its logits."""
    from orchestrator.tasks import get_task

    tokenizer, model = export.load_base(cfg)
    batch = tokenizer(export.PROBE, return_tensors="pt", padding=True)
    labels = torch.arange(len(export.PROBE)) % 5 if get_task(cfg.data.name).kind == "classification" else batch["input_ids"]
    batches = iter([{**batch, "labels": labels}] * 4)
    methods.apply_method(model, cfg.method, batches=batches, modules_to_save=head_modules(model, cfg, get_task(cfg.data.name)))
    torch.manual_seed(1)
    with torch.no_grad():
        for p in methods.trainable_parameters(model):
            p.add_(0.05 * torch.randn_like(p))
        for _, layer in methods.adapter_layers(model):
            if hasattr(layer, "hybrid_gate"):
                layer.hybrid_gate.fill_(0.3)  # a gate away from its init: both branches count
    methods.save_adapter(model, folder / ADAPTER_DIR)
    (folder / TRIAL_FILE).write_text(json.dumps(cfg.to_dict()))
    return export.logits(model.eval(), tokenizer)


def auto_class(cfg: TrialConfig):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForSequenceClassification if cfg.data.name == "bbc_news" else AutoModelForCausalLM


@pytest.mark.parametrize("model", ["minilm", "llama"])
@pytest.mark.parametrize("method", ["lora", "lora_ga", "boft"])
def test_peft_export_loads_in_peft_with_the_trained_logits(model, method, llama_path, tmp_path):
    from peft import PeftModel

    cfg = trial(model, method, llama_path)
    expected = trained_checkpoint(tmp_path / "ckpt", cfg)
    info = export.export(str(tmp_path / "ckpt"), str(tmp_path / "peft"), "peft")
    saved = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert saved["peft_type"] == ("BOFT" if method == "boft" else "LORA")
    if method == "lora_ga":  # (alpha/r)(B A - B0 A0) on the original base: rank 2r, same scale
        assert (saved["r"], saved["lora_alpha"]) == (8, 16)
    base = export.load_base(cfg)[1]  # a fresh base: the classifier head is a new random one
    reloaded = PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()
    tokenizer = export.load_base(cfg)[0]
    got = export.logits(reloaded, tokenizer)
    assert torch.allclose(got, expected, atol=1e-5), float((got - expected).abs().max())
    assert info["max_logit_diff"] <= 1e-5
    if model == "minilm":  # the README's one-liner: PEFT finds the base model by itself
        from peft import AutoPeftModelForSequenceClassification

        auto = AutoPeftModelForSequenceClassification.from_pretrained(str(tmp_path / "peft"), num_labels=5).eval()
        assert torch.allclose(export.logits(auto, tokenizer), expected, atol=1e-5)
    assert not torch.allclose(export.logits(export.load_base(cfg)[1], tokenizer), expected, atol=1e-3)  # the adapter matters


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_merged_export_loads_in_transformers_with_the_trained_logits(method, llama_path, tmp_path):
    for model in ("minilm", "llama") if method in ("hybrid", "lora_ga") else ("minilm",):
        cfg = trial(model, method, llama_path)
        expected = trained_checkpoint(tmp_path / model / "ckpt", cfg)
        export.export(str(tmp_path / model / "ckpt"), str(tmp_path / model / "merged"), "merged")
        reloaded = auto_class(cfg).from_pretrained(str(tmp_path / model / "merged")).eval()
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / model / "merged"))  # saved with the model
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        got = export.logits(reloaded, tokenizer)
        assert torch.allclose(got, expected, atol=1e-5), (model, float((got - expected).abs().max()))
        keys = set(reloaded.state_dict())
        assert not any("base_layer" in k or "lora_" in k or "boft_" in k for k in keys)  # a plain model


@pytest.mark.parametrize("method", ["unitary", "hybrid", "full", "boft-m2", "boft-neumann"])
def test_methods_peft_cannot_represent_are_refused_with_a_pointer_to_merged(method, llama_path, tmp_path):
    cfg = trial("minilm", method.split("-")[0], llama_path)
    if method == "boft-m2":  # PEFT's BOFT on CPU silently builds one butterfly factor
        cfg = TrialConfig.from_dict({**cfg.to_dict(), "method": {"name": "boft", "config": {"block_size": 4, "n_butterfly_factor": 2}}})
    if method == "boft-neumann":
        cfg = TrialConfig.from_dict({**cfg.to_dict(), "method": {"name": "boft", "config": {"cayley": "neumann"}}})
    trained_checkpoint(tmp_path / "ckpt", cfg)
    with pytest.raises(ConfigError, match="use --format merged"):
        export.export(str(tmp_path / "ckpt"), str(tmp_path / "peft"), "peft")
    assert not (tmp_path / "peft").exists()  # refused before anything was written


def test_export_command_from_a_checkpoint_folder(llama_path, tmp_path):
    cfg = trial("minilm", "lora", llama_path)
    trained_checkpoint(tmp_path / "ckpt", cfg)
    cmd = [sys.executable, "-m", "orchestrator.cli", "export", str(tmp_path / "ckpt"), "--format", "peft",
           "--out", str(tmp_path / "out")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file() and "PeftModel.from_pretrained" in done.stdout
    bad = subprocess.run([*cmd[:4], str(tmp_path), "--format", "peft", "--out", str(tmp_path / "x")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "neither a checkpoint" in bad.stderr
