"""Search-space entries of a sweep file -> Ray Tune samplers. The only module that imports them.

An entry is a fixed value or a one-key mapping naming a distribution:

    r: 8                              fixed
    r: {grid: [4, 8, 16]}             every value (grid dimensions multiply)
    r: {choice: [4, 8, 16]}           one at random per sample
    lr: {loguniform: [1.0e-5, 1.0e-3]}
    dropout: {uniform: [0.0, 0.2]}
    block_size: {randint: [2, 9]}     upper bound exclusive, as in Tune
    tau: {quniform: [0.1, 2.0, 0.1]}  uniform, rounded to a multiple of q
"""

from __future__ import annotations

import itertools
import random
from typing import Any

from methods.config import ConfigError

DISTRIBUTIONS = {
    "grid": "a non-empty list of values",
    "choice": "a non-empty list of values",
    "uniform": "[low, high] with low < high",
    "loguniform": "[low, high] with 0 < low < high",
    "randint": "[low, high] integers with low < high (high exclusive)",
    "quniform": "[low, high, q] with low < high and q > 0",
}


def is_distribution(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1 and next(iter(value)) in DISTRIBUTIONS


def check_entry(key: str, value: Any) -> None:
    """Raise ConfigError for a malformed distribution; plain values are checked by the configs."""
    if isinstance(value, dict) and len(value) == 1 and not is_distribution(value):
        (name,) = value
        raise ConfigError(f"{key}: unknown distribution {name!r} (expected one of {', '.join(DISTRIBUTIONS)})")
    if not is_distribution(value):
        return
    (name, args), = value.items()
    expected = f"{key}.{name}: expected {DISTRIBUTIONS[name]}, got {args!r}"
    if name in ("grid", "choice"):
        if not isinstance(args, list) or not args:
            raise ConfigError(expected)
        return
    n = 3 if name == "quniform" else 2
    if not isinstance(args, list) or len(args) != n or not all(_is_number(a) for a in args):
        raise ConfigError(expected)
    low, high = args[0], args[1]
    ok = low < high
    if name == "loguniform":
        ok = ok and low > 0
    if name == "randint":
        ok = ok and all(isinstance(a, int) for a in args)
    if name == "quniform":
        ok = ok and args[2] > 0
    if not ok:
        raise ConfigError(expected)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def to_tune(value: Any):
    """One entry as a Tune domain (grid as `tune.grid_search`), or the fixed value itself."""
    from ray import tune

    if not is_distribution(value):
        return value
    (name, args), = value.items()
    if name == "grid":
        return tune.grid_search(list(args))
    return {"choice": lambda a: tune.choice(a), "uniform": lambda a: tune.uniform(*a),
            "loguniform": lambda a: tune.loguniform(*a), "randint": lambda a: tune.randint(*a),
            "quniform": lambda a: tune.quniform(*a)}[name](args)


def expand(space: dict[str, Any], num_samples: int, seed: int) -> list[dict[str, Any]]:
    """Concrete assignments: the grid's cartesian product, each repeated `num_samples` times with
    the other distributions sampled by Tune's own samplers (seeded: the same file, the same plan)."""
    rng = random.Random(seed)
    grid_keys = [k for k, v in space.items() if is_distribution(v) and "grid" in v]
    grids = itertools.product(*(space[k]["grid"] for k in grid_keys))
    out = []
    for combo in grids:
        for _ in range(num_samples):
            point = {}
            for key, value in space.items():
                if key in grid_keys:
                    point[key] = combo[grid_keys.index(key)]
                elif is_distribution(value):
                    point[key] = to_tune(value).sample(random_state=rng.randrange(2**31))
                else:
                    point[key] = value
            out.append({k: _plain(v) for k, v in point.items()})
    return out


def _plain(v: Any) -> Any:
    """numpy scalars from Tune's samplers -> Python numbers (YAML/JSON/MLflow friendly)."""
    return v.item() if hasattr(v, "item") and not isinstance(v, (list, dict)) else v


def corners(space: dict[str, Any]) -> list[dict[str, Any]]:
    """The extreme points of every dimension: enough to check that every value the sweep can
    produce builds a valid config, without sampling."""
    options: dict[str, list[Any]] = {}
    for key, value in space.items():
        if not is_distribution(value):
            options[key] = [value]
            continue
        (name, args), = value.items()
        if name in ("grid", "choice"):
            options[key] = list(args)
        elif name == "randint":
            options[key] = [args[0], args[1] - 1]
        else:
            options[key] = [args[0], args[1]]
    keys = list(options)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(options[k] for k in keys))][:256]
