"""The comparison report, read back from the real MLflow server that test_tracking's demo sweep
was logged to (8 trials: full, lora r4 / r8, hybrid, 2 seeds each; see OUTCOMES there)."""

from __future__ import annotations

import csv
import json
import math

import pytest
from PIL import Image

from methods.config import ConfigError
from orchestrator import report as schema
from orchestrator.compare import compare, contention_note, pareto_front, write_report
from tests.orchestrator.test_tracking import LAYERS, artifacts, logged_sweep, mlflow_server  # noqa: F401  (shared fixtures)


@pytest.fixture(scope="module")
def report(logged_sweep):  # noqa: F811
    return compare(logged_sweep["url"], "demo")


def test_best_configuration_per_method_over_seeds(report, logged_sweep):  # noqa: F811
    assert report["parent_run_id"] == logged_sweep["parent"]
    assert report["target"] == {"metric": "accuracy", "mode": "max", "value": 0.8}
    assert len(report["trials"]) == 8 and len(report["groups"]) == 4  # seeds grouped: full, lora-r4, lora-r8, hybrid
    m = report["methods"]
    assert list(m) == ["full", "hybrid", "lora"]
    lora, full, hybrid = m["lora"], m["full"], m["hybrid"]
    assert lora["config"] == "lora-r8" and (lora["seeds"], lora["reached"]) == (2, 2)  # r4 never reached the target
    # Training time-to-quality (the ranking figure) leaves the 5 s of setup out; wall keeps it.
    assert (lora["train_time_to_quality_s"], lora["ttq_min"], lora["ttq_max"]) == pytest.approx((16.0, 15.0, 17.0))
    assert (lora["time_to_quality_s"], full["time_to_quality_s"]) == pytest.approx((21.0, 31.5))
    assert (full["train_time_to_quality_s"], full["peak_memory_mb"], full["final_metric"]) == pytest.approx((26.5, 2005.0, 0.815))
    assert lora["train_ttq_vs_full"] == pytest.approx(16 / 26.5) and lora["wall_ttq_vs_full"] == pytest.approx(21 / 31.5)
    assert lora["memory_vs_full"] == pytest.approx(1005 / 2005)
    assert lora["params_vs_full"] == pytest.approx(150_000 / 22_700_000) and full["train_ttq_vs_full"] == 1.0
    # Censored, not absent: the hybrid reached in 1 of 2 seeds (14 s, the fastest time of all), so
    # its median is infinite and it never looks faster than a method that reached every time.
    assert (hybrid["reached"], hybrid["failed"], hybrid["peak_memory_mb"]) == (1, 1, 900.0)
    assert hybrid["train_time_to_quality_s"] == math.inf and hybrid["ttq_min"] == pytest.approx(9.0)
    assert hybrid["train_ttq_vs_full"] == math.inf
    r4 = next(g for g in report["groups"] if g["config"] == "lora-r4")
    assert r4["final_metric"] == 0.4 and r4["train_time_to_quality_s"] == math.inf  # the diverged seed's -inf is no number
    assert report["notes"] == []  # every trial ran alone


def test_curves_and_layer_series(report):
    c = report["curves"]["lora-r8-seed0"]
    assert (c["method"], c["elapsed_s"], c["accuracy"]) == ("lora", [10.0, 20.0], [0.6, 0.81])
    assert c["train_s"] == pytest.approx([5.0, 15.0])
    assert report["curves"]["lora-r4-seed1"]["accuracy"] == [0.45]  # the diverged point is left out
    g = report["layers"]["hybrid"]
    assert g["trial"] == "hybrid-m2-tau0.5-seed0" and g["steps"] == [10, 20] and len(g["layers"]) == 4
    first = g["layers"][LAYERS[0]]
    assert first["gate"] == [0.425, 0.35] and first["grad_norm_boft"] == pytest.approx([0.1, 0.1])


def test_rank_rule_and_contention_note():
    # One rule for trials and groups: reached share first, then the censored median, then quality.
    assert schema.rank_key(3, 3, 40.0, 0.9, "max") > schema.rank_key(1, 3, 10.0, 0.95, "max")
    assert schema.rank_key(2, 2, 10.0, 0.8, "max") > schema.rank_key(2, 2, 12.0, 0.9, "max")
    assert schema.censored_median([10.0, None, None]) == math.inf and schema.censored_median([10.0, 12.0, None]) == 12.0
    assert contention_note({"lora": {"concurrent_trials": 0}, "boft": {"concurrent_trials": 0}}) is None
    note = contention_note({"lora": {"concurrent_trials": 1}, "hybrid": {"concurrent_trials": 0}})
    assert "not comparable" in note and "lora beside 1" in note and "hybrid beside 0" in note


def test_pareto_front():
    assert pareto_front([(1, 0.5), (2, 0.7), (3, 0.6), (4, 0.9), (4, 0.2)], "max") == [(1, 0.5), (2, 0.7), (4, 0.9)]
    assert pareto_front([(1, 0.5), (2, 0.3), (3, 0.4)], "min") == [(1, 0.5), (2, 0.3)]


def test_report_files_and_parent_artifacts(report, logged_sweep, tmp_path, capsys):  # noqa: F811
    files = write_report(report, str(tmp_path), uri=logged_sweep["url"])
    out = capsys.readouterr().out
    assert "target accuracy >= 0.8" in out and "lora-r8" in out and "16 [15-17]" in out
    assert "inf [9-9]" in out  # the hybrid's censored median, the one seed that reached as its range
    for name in ("curves.png", "pareto.png", "layers-hybrid.png"):
        with Image.open(files[name]) as im:
            assert im.format == "PNG" and im.size[0] >= 800 and im.size[1] >= 300, name
            lo, hi = im.convert("L").getextrema()
            assert hi - lo > 100, f"{name} is blank"
    assert Image.open(files["curves.png"]).size == (1200, 500)
    with open(files["compare.csv"]) as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"full", "hybrid", "lora"} and float(rows["lora"]["wall_ttq_vs_full"]) == pytest.approx(2 / 3)
    with open(files["trials.csv"]) as f:
        assert len(list(csv.DictReader(f))) == 8
    with open(files["compare.json"]) as f:
        assert json.load(f)["methods"]["lora"]["config"] == "lora-r8"
    logged = set(artifacts(logged_sweep["url"], logged_sweep["parent"], "report"))
    assert logged == {f"report/{n}" for n in files}


def test_unknown_experiment_is_a_clear_error(logged_sweep):  # noqa: F811
    with pytest.raises(ConfigError, match="experiment 'nope': not found"):
        compare(logged_sweep["url"], "nope")
