"""Datasets from the Hugging Face Hub, with one clear error when the Hub cannot be reached.

Every task with a Hub source also reads local files in the same format (`data.data_files`); when
the Hub is out of reach (offline cluster, `HF_HUB_OFFLINE=1`, dataset not cached) the error says so
and names the local alternative, instead of a stack trace from deep inside `datasets`.
"""

from __future__ import annotations

import random


def load_split(path: str, config: str | None, split: str, task: str, local_hint: str,
               limit: int | None = None, seed: int = 0) -> dict[str, list]:
    """One split of a Hub dataset as column -> values. With `limit`, a seeded sample of that many
    rows is taken on the Arrow table before anything becomes Python objects (XNLI keeps 32 of
    392,702 training rows per language)."""
    import datasets  # only on this path: importing datasets costs ~1 s

    name = f"{path!r}" + (f" config {config!r}" if config else "")
    try:
        ds = datasets.load_dataset(path, config, split=split)
    except ValueError as e:  # the repository answered: no such config or split
        raise ValueError(f"{task}: {name} split {split!r}: {e}") from e
    except (ConnectionError, OSError, RuntimeError) as e:  # offline, not cached, gated, script-based
        raise ConnectionError(f"{task}: could not load {name} split {split!r} from the Hugging Face Hub ({e}). "
                              f"Without hub access, point data.data_files at local copies: {local_hint}") from e
    if limit is not None and limit < len(ds):
        ds = ds.select(sorted(random.Random(f"hub:{seed}:{config}:{split}").sample(range(len(ds)), limit)))
    return ds.to_dict()


def no_renames(task, spec) -> None:
    """text_field / label_field rename columns of local files; the Hub's columns are fixed."""
    for field in ("text_field", "label_field"):
        if spec.data_files is None and getattr(spec, field) is not None:
            raise ValueError(f"data.{field}={getattr(spec, field)!r}: applies to local data_files only; "
                             f"the Hub's {task.name} columns are fixed")
