"""Every shipped sweep file's plan, pinned: `orchestrate sweep FILE --dry-run` output, trial names
and MLflow parameters (names and values) must not change by accident.

A deliberate change rewrites the pin and shows up in review as a diff of tests/data/pinned_plans.json:

    python -m tests.orchestrator.test_pinned_plans
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import math
import os

import pytest

from orchestrator.cli import print_plan
from orchestrator.spec import load_sweep
from orchestrator.sweep import trial_name
from orchestrator.tracking import trial_params

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PIN = os.path.join(ROOT, "tests", "data", "pinned_plans.json")
FILES = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "search_spaces", "**", "*.yaml"), recursive=True))


def plan_of(rel: str) -> dict:
    spec = load_sweep(os.path.join(ROOT, rel))
    shown = io.StringIO()
    with contextlib.redirect_stdout(shown):
        print_plan(spec)
    target = dict(metric=(t := spec.resolve_target()).metric, mode=t.mode, value=t.value)
    trials = spec.plan() if spec.tune.search_alg != "optuna" else []
    return {"dry_run": shown.getvalue().splitlines(),
            "trials": {trial_name(t["trial"], t["point"]): trial_params(t["trial"], target) for t in trials}}


@pytest.mark.parametrize("rel", FILES)
def test_shipped_sweep_files_plan_the_same_trials_names_and_params(rel):
    pinned = json.load(open(PIN))
    assert rel in pinned, f"{rel}: not pinned yet; run python -m tests.orchestrator.test_pinned_plans"
    now = plan_of(rel)
    assert now["dry_run"] == pinned[rel]["dry_run"]
    assert list(now["trials"]) == list(pinned[rel]["trials"])
    for name, params in now["trials"].items():
        assert same_params(params, pinned[rel]["trials"][name]), name


def same_params(now: dict[str, str], pinned: dict[str, str]) -> bool:
    """The same names and values; a sampled float may differ in its last bit. Tune's samplers go
    through numpy's exp and power, whose SIMD code differs between CPUs (a learning rate pinned on an
    Intel Xeon came out 0.0007969748112755314 against 0.0007969748112755313 on an AMD EPYC)."""
    if now.keys() != pinned.keys():
        return False
    return all(a == b or _close(a, b) for a, b in ((now[k], pinned[k]) for k in now))


def _close(a: str, b: str) -> bool:
    try:
        return math.isclose(float(a), float(b), rel_tol=1e-12)
    except ValueError:
        return False


def test_every_pin_is_a_shipped_file():
    assert sorted(json.load(open(PIN))) == FILES


if __name__ == "__main__":
    with open(PIN, "w") as f:
        json.dump({rel: plan_of(rel) for rel in FILES}, f, indent=1)
        f.write("\n")
    print(f"pinned {len(FILES)} sweep files in {PIN}")
