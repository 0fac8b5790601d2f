"""Datasets from the Hugging Face Hub, with one clear error when the Hub cannot be reached.

Every task with a Hub source also reads local files in the same format (`data.data_files`); when
the Hub is out of reach (offline cluster, `HF_HUB_OFFLINE=1`, dataset not cached) the error says so
and names the local alternative, instead of a stack trace from deep inside `datasets`.
"""

from __future__ import annotations


def load_split(path: str, config: str | None, split: str, task: str, local_hint: str) -> dict[str, list]:
    """One split of a Hub dataset as column -> values."""
    import datasets  # only on this path: importing datasets costs ~1 s

    try:
        return datasets.load_dataset(path, config, split=split).to_dict()
    except (ConnectionError, OSError, ValueError) as e:  # offline, not cached, gated, unknown config
        name = f"{path!r}" + (f" config {config!r}" if config else "")
        raise ConnectionError(f"{task}: could not load {name} split {split!r} from the Hugging Face Hub ({e}). "
                              f"Without hub access, point data.data_files at local copies: {local_hint}") from e
