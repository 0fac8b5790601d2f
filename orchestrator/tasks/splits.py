"""Seeded held-out splits and subsets.

`holdout` splits by *group* (by default the example's text), not by row: real corpora repeat
themselves (98 of the 2,225 BBC articles are exact duplicates, ~900 of the 38,158 tweets), and a
row-level split would put the same text on both sides and overstate eval quality.

Everything is seeded with `random.Random(str)`: its string seeding is stable across runs, platforms
and Python versions, unlike `hash()`, so every Ray worker gets the same examples from the same seed.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Hashable


def holdout(examples: list[dict], fraction: float, seed: int,
            key: Callable[[dict], Hashable]) -> tuple[list[dict], list[dict]]:
    """(train, eval): about `fraction` of the distinct keys go to eval; equal keys stay together."""
    keys = list(dict.fromkeys(key(ex) for ex in examples))  # distinct, in first-seen order
    if len(keys) < 2:
        raise ValueError(f"cannot hold out an eval split from {len(keys)} distinct example(s)")
    random.Random(f"holdout:{seed}").shuffle(keys)
    n_eval = min(len(keys) - 1, max(1, math.ceil(fraction * len(keys))))
    held = set(keys[:n_eval])
    train = [ex for ex in examples if key(ex) not in held]
    evals = [ex for ex in examples if key(ex) in held]
    return train, evals


def subsample(examples: list[dict], limit: int | None, seed: int, salt: str) -> list[dict]:
    """A seeded shuffle of `examples`, cut to `limit` (None = all). `salt` decorrelates the splits."""
    out = list(examples)
    random.Random(f"{salt}:{seed}").shuffle(out)
    return out if limit is None else out[:limit]
