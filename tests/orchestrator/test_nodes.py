"""Node preparation: DeepSpeed's ops built before any trial's clock, a stale build lock cleared."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from orchestrator.nodes import clear_stale_lock


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


def test_a_stale_lock_no_longer_hangs_the_op_load():
    """A lock left by a killed builder makes torch's loader wait forever; prepare_node clears it
    and the op loads (built once if the cache is cold)."""
    lock = _lock_path("deepspeed_shm_comm")
    open(lock, "w").close()
    old = time.time() - 3600
    os.utime(lock, (old, old))
    code = ("from orchestrator.nodes import prepare_node; r = prepare_node(['ShareMemCommBuilder'], []); "
            "print(r); assert not r['failed'] and r['stale_locks'], r")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "removing" in done.stderr and not os.path.exists(lock)
