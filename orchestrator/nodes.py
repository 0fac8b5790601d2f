"""Work done once per node before any trial starts its clock, so that trial 1 and trial 20 pay
the same setup.

    prepare_nodes(trial_configs)   on every alive node, in parallel, before `fit()`:
        - DeepSpeed's JIT ops the trials load: the CPU shared-memory comm op (every CPU trial's
          `deepspeed.initialize`) and CPU Adam (optimizer or parameter offload). A first build
          takes about a minute; the result is cached in $TORCH_EXTENSIONS_DIR, which the workers
          on that node read.
        - the Hugging Face snapshots of hub models (`model.name_or_path` that is no local folder),
          into the node's cache, and the one-time conversion of `pip:<package>` GGUF models.

    orchestrate prepare [FILE]     the same on this machine, without Ray: in an image or a node's
        setup commands, so that a node that joins a running sweep later (an autoscaled worker)
        has its ops and models ready before its first trial, and in CI before the tests.

A build lock left behind by a process killed mid-build (torch's JIT loader takes a lock file per
op, and every later load waits on it forever) is removed with a warning when it is older than any
build takes (`STALE_LOCK_S`). Each step that fails is reported and left to the trial, which then
fails with the real error in its own log (a missing op or an offline hub must not be hidden here).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable
from typing import Any

from orchestrator.config import TrialConfig


# Every JIT op a trial may load on a CPU node: the comm op (any trial), CPU Adam (offload).
COMM_OP, CPU_ADAM_OP = "ShareMemCommBuilder", "CPUAdamBuilder"
ALL_OPS = (COMM_OP, CPU_ADAM_OP)


def ops_for(cfgs: Iterable[TrialConfig]) -> list[str]:
    offload = any(c.deepspeed.offload_optimizer or c.deepspeed.offload_param for c in cfgs)
    return [COMM_OP, CPU_ADAM_OP] if offload else [COMM_OP]


def hub_models(cfgs: Iterable[TrialConfig]) -> list[str]:
    """Hub names to fetch and `pip:<package>` models to convert (not local folders)."""
    names = {c.model.name_or_path for c in cfgs if c.model.name_or_path}
    return sorted(n for n in names if not os.path.isdir(os.path.expanduser(n)))


STALE_LOCK_S = 15 * 60  # a CPU op builds in ~1-2 min; a lock this old has no live builder
PREPARE_TIMEOUT_S = 30 * 60  # op builds and downloads of every node, at most (a 70B download fits)


def clear_stale_lock(name: str, max_age_s: float = STALE_LOCK_S) -> str | None:
    """Remove the JIT build lock of extension `name` if it is older than `max_age_s`; returns its
    path when it did."""
    from torch.utils.cpp_extension import _get_build_directory  # where torch's loader puts the lock

    lock = os.path.join(_get_build_directory(name, verbose=False), "lock")
    try:
        age = time.time() - os.path.getmtime(lock)
    except OSError:
        return None
    if age < max_age_s:
        return None
    print(f"warning: removing {lock}, a build lock {age / 60:.0f} min old left by a process that died "
          "mid-build (every later load would wait on it forever)", file=sys.stderr, flush=True)
    os.remove(lock)
    return lock


def prepare_node(ops: list[str], models: list[str], max_lock_age_s: float = STALE_LOCK_S) -> dict[str, Any]:
    """Build the ops and fetch the models on this node; returns what took how long, and failures."""
    out: dict[str, Any] = {"node": os.uname().nodename, "seconds": {}, "failed": {}, "stale_locks": []}
    for op in ops:
        started = time.time()
        try:
            from orchestrator.deepspeed_config import import_deepspeed

            import_deepspeed()
            from deepspeed.accelerator import get_accelerator

            builder = get_accelerator().create_op_builder(op)
            if builder is not None and (lock := clear_stale_lock(builder.name, max_lock_age_s)):
                out["stale_locks"].append(lock)
            if builder is not None and builder.is_compatible():
                builder.load(verbose=False)
            out["seconds"][op] = time.time() - started
        except Exception as e:  # noqa: BLE001 - reported; the trial fails with the real error
            out["failed"][op] = f"{type(e).__name__}: {e}"
    for name in models:
        started = time.time()
        try:
            from huggingface_hub import snapshot_download

            from orchestrator.tasks import assets

            if assets.is_packaged(name):
                assets.model_path(name)  # an installed package's GGUF, dequantised once on this node
            else:
                snapshot_download(name)
            out["seconds"][name] = time.time() - started
        except Exception as e:  # noqa: BLE001
            out["failed"][name] = f"{type(e).__name__}: {e}"
    return out


# (Ray node id, op or model) prepared by this driver process. A second sweep or trial from the same
# process (a notebook, a script of several runs) does not start a task per node (~3 s: a process
# that imports DeepSpeed) to find the same ops built; a node that joined since, or a new cluster
# (new node ids), is prepared.
_PREPARED: set[tuple[str, str]] = set()


def prepare_nodes(cfgs: Iterable[TrialConfig], quiet: bool = False) -> list[dict[str, Any]]:
    """`prepare_node` on every alive node of the connected Ray cluster (Ray must be initialised);
    one result per node, in `ray.nodes()` order (a node already prepared by this process: nothing
    in `seconds`)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    cfgs = list(cfgs)
    ops, models = ops_for(cfgs), hub_models(cfgs)
    # No resources held (the step must run while trials of another sweep hold every CPU), and the
    # node's GPUs left visible, so that DeepSpeed picks the accelerator the workers will use.
    task = ray.remote(num_cpus=0)(prepare_node)
    env = {"env_vars": {"RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1"}}
    nodes = {n["NodeID"]: n["NodeManagerHostname"] for n in ray.nodes() if n.get("Alive")}
    todo = {node: ([o for o in ops if (node, o) not in _PREPARED], [m for m in models if (node, m) not in _PREPARED])
            for node in nodes}
    started = time.time()
    refs = {task.options(runtime_env=env, scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
            .remote(*items): node for node, items in todo.items() if any(items)}
    # Bounded: a node stuck here (a build lock younger than STALE_LOCK_S that nobody holds, a hub
    # that never answers) must not hold the sweep; its trials meet the same problem under their
    # stall watchdog, which fails them with the reason.
    done, pending = ray.wait(list(refs), num_returns=len(refs), timeout=PREPARE_TIMEOUT_S) if refs else ([], [])
    for ref in pending:
        ray.cancel(ref, force=True)
    ran = {refs[ref]: result for ref, result in zip(done, ray.get(done))}
    for node, result in ran.items():
        _PREPARED.update((node, item) for item in [*todo[node][0], *todo[node][1]] if item not in result["failed"])
    stuck = {refs[ref] for ref in pending}
    results = [ran.get(node) or {"node": host, "seconds": {}, "stale_locks": [],
                                 "failed": {"prepare": f"not done within {PREPARE_TIMEOUT_S:.0f} s"} if node in stuck else {}}
               for node, host in nodes.items()]
    if pending:
        print(f"warning: {len(pending)} node(s) not prepared within {PREPARE_TIMEOUT_S:.0f} s (DeepSpeed op build or "
              "model download stuck); their trials will try again", file=sys.stderr, flush=True)
    if not quiet:
        failed = {f"{r['node']}:{k}": v for r in results for k, v in r["failed"].items() if k != "prepare"}
        already = len(nodes) - len(refs)
        print(f"prepared {len(refs)} node(s) in {time.time() - started:.0f} s (DeepSpeed ops {', '.join(ops)}"
              f"{'; models ' + ', '.join(models) if models else ''})"
              f"{f'; {already} already prepared by this process' if already else ''}", file=sys.stderr, flush=True)
        for what, why in failed.items():
            print(f"warning: preparing {what} failed ({why}); the trials will try again", file=sys.stderr)
    return results
