"""`orchestrate`: validate | sweep | compare | export | sync | ui | cluster | describe.

Subcommands are plain functions; each returns the process exit code. Bad input exits 2 with every
error listed, before Ray starts. (Over 350 lines: one short function per subcommand and the one
parser, kept together so that `--help` and what runs are read in one place.)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys

from methods.config import ConfigError
from orchestrator import startup


def _load(path: str):
    from orchestrator.spec import load_sweep

    return load_sweep(path)


def cmd_validate(args) -> int:
    spec = _load(args.file)
    print(f"{args.file}: OK: {len(spec.methods)} method(s), {spec.num_trials} trial(s)")
    return 0


def cmd_prepare(args) -> int:
    """Build DeepSpeed's JIT ops (and fetch FILE's models) on this machine; non-zero if a step failed."""
    from orchestrator.nodes import ALL_OPS, hub_models, ops_for, prepare_node

    if args.file:
        from orchestrator.sweep import trial_configs

        cfgs = trial_configs(_load(args.file))
        ops, models = ops_for(cfgs), hub_models(cfgs)
    else:
        ops, models = list(ALL_OPS), []
    print(f"preparing {', '.join(ops + models)} (a first op build takes a minute or two)", flush=True)
    out = prepare_node(ops, models)
    for what, seconds in out["seconds"].items():
        print(f"  {what}: ready in {seconds:.0f} s")
    for what, why in out["failed"].items():
        print(f"error: preparing {what} failed: {why}", file=sys.stderr)
    return 1 if out["failed"] else 0


def smoke(spec):
    """--smoke-test: the real driver -> worker path, shrunk to minutes on 2 CPUs: every method of
    the file, its first seed, 2 steps and one evaluation on a little data (a gradient estimate of 2
    batches), one worker per trial so that trials run side by side. It checks that each method runs
    on this model and task; its times mean nothing."""
    from orchestrator.tasks import get_task

    r = dataclasses.replace
    task = get_task(spec.data.name)
    # Generation dominates an evaluation: fewer eval examples (per language where there are
    # languages) and a short generation budget.
    own = task.option_names()
    generative = "max_new_tokens" in own
    options = spec.data.options
    if "samples_per_language" in own:
        options = r(options, samples_per_language=min(options.samples_per_language, 8))
    if generative:
        options = r(options, max_new_tokens=min(task.new_tokens(spec.data), 16))
    data = r(spec.data, max_train_samples=64, max_length=min(spec.data.max_length, 64),
             max_eval_samples=8 if generative or "languages" in own else 32, options=options)
    return r(spec, train=r(spec.train, max_steps=min(spec.train.max_steps, 2), eval_every=2), data=data,
             methods={m: _smoke_method(m, entries) for m, entries in spec.methods.items()},
             tune=r(spec.tune, num_samples=1, seeds=spec.tune.seeds[:1]),
             # 0.49 CPU: one pinned core (orchestrator.cores), so two trials share a 2-core machine
             resources=r(spec.resources, num_workers=1, cpus_per_worker=min(spec.resources.cpus_per_worker, 0.49)))


SMOKE_GRADIENT_BATCHES = 2


def _smoke_method(method: str, entries: dict) -> dict:
    """A gradient-initialised method (LoRA-GA, the hybrid) estimates its gradient over 2 batches,
    as the smoke test trains 2 steps: on SmolLM2 the default 8 batches were ~20 of a smoke trial's
    ~30 s on one core. The estimate still averages batches; what it gives means nothing here."""
    import methods
    from methods.config import leaf_fields

    keys = [name for name, f in leaf_fields(methods.METHODS[method].config_cls) if f.metadata.get("param") == "ga_batches"]
    fixed = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
    return {**entries, **{k: min(entries[k], SMOKE_GRADIENT_BATCHES) if fixed(entries.get(k)) else SMOKE_GRADIENT_BATCHES
                          for k in keys}}


def print_plan(spec) -> None:
    from orchestrator.sweep import trial_name

    r = spec.resources
    print(f"sweep {spec.name}: target {spec.resolve_target()}")
    print(f"resources per trial: {r.num_workers} worker(s) x ({r.cpus_per_worker} CPU, {r.gpus_per_worker} GPU); "
          f"scheduler {spec.tune.scheduler}, search {spec.tune.search_alg}, seeds {list(spec.tune.seeds)}")
    from orchestrator.spec import sampled

    plan = spec.plan() if spec.tune.search_alg != "optuna" else []
    for method, entries in spec.methods.items():
        line = f"  {method}: " + (", ".join(f"{k}={json.dumps(v)}" for k, v in entries.items()) or "defaults")
        if plan:
            n = sum(t["method"] == method for t in plan)
            line += f"  [{n} trial(s){'' if sampled(entries) or spec.tune.num_samples == 1 else ': no sampled value, so num_samples does not apply'}]"
        print(line)
    if spec.tune.search_alg == "optuna":
        print(f"{spec.tune.num_samples} trial(s) suggested by Optuna")
        return
    print(f"{len(plan)} trial(s):")
    for t in plan:
        print(f"  {trial_name(t['trial'], t['point'])}")


def use_local_ray_env() -> None:
    """Settings for a Ray this process starts itself, before `ray.init`; a user's own setting wins.
    A local Ray's one node is never drained (no autoscaler, no spot instances): Ray Train's
    preemption watcher, one more actor process started with every trial, has nothing to watch
    there. Clusters keep it."""
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


def init_ray(address: str | None, verbose: bool = False, env_vars: dict[str, str] | None = None):
    """Ray for this sweep: the cluster at `address` / $RAY_ADDRESS, else a local one. `env_vars`
    reach every worker on a cluster (a local Ray's workers inherit this process's environment)."""
    import socket

    import ray

    address = address or os.environ.get("RAY_ADDRESS")
    # Ray's own chatter stays out of the live table: workers' and raylets' logs reach this terminal
    # only with --verbose (log_to_driver), and Ray's driver-side logger says warnings and worse only.
    quiet = {"log_to_driver": verbose, "logging_level": logging.INFO if verbose else logging.WARNING}
    if address:
        runtime_env = {"env_vars": env_vars} if env_vars else None
        return ray.init(address=address, runtime_env=runtime_env, **quiet)
    with socket.socket() as s:  # our own dashboard port: its state API frees stopped trials' resources
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("RAY_API_SERVER_ADDRESS", f"http://127.0.0.1:{port}")
    use_local_ray_env()
    return ray.init(include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port, **quiet)


def worker_env(spec) -> dict[str, str]:
    """Variables the workers need from the driver's environment: the judge's API key (by name)."""
    judge = getattr(spec.data.options, "judge", None)
    name = judge.api_key_env if judge is not None else None
    return {name: os.environ[name]} if name and name in os.environ else {}


def cmd_sweep(args) -> int:
    spec = _load(args.file)
    if args.storage:
        spec = dataclasses.replace(spec, storage=args.storage)
    if args.smoke_test:
        spec = smoke(spec)
    if args.dry_run:
        print_plan(spec)
        return 0
    with startup.paused_gc():  # the driver's imports (torch, Ray Tune, MLflow): orchestrator.startup
        import ray.tune  # noqa: F401  (run_sweep imports it as it needs it)
        from orchestrator import tracking
        from orchestrator.sweep import run_sweep

    tracking.check_tracking_uri(tracking.tracking_uri(spec))  # an unreachable server: now, not in an hour
    if args.cluster:
        from orchestrator.placement import capacity, load_cluster

        try:
            capacity(load_cluster(args.cluster))
        except (OSError, KeyError, TypeError, ValueError, AttributeError) as e:
            raise ConfigError(f"--cluster {args.cluster}: not a readable cluster file ({type(e).__name__}: {e})") from None
    init_ray(args.address, args.verbose, env_vars=worker_env(spec))
    results, summary = run_sweep(spec, resume=args.resume, cluster_file=args.cluster)
    return print_summary(summary)


def print_summary(summary: dict) -> int:
    """The end of `orchestrate sweep`: the best trial per method, how the sweep ended, the failed
    trials. Returns the exit status: 1 when every trial failed."""
    from orchestrator import report
    from orchestrator.progress import fmt, format_table

    columns = [k for k in report.COLUMNS if k not in ("step", "stop_reason")]
    rows = [[m, b["name"], *(fmt(b[k], 4) for k in columns), fmt(b["metric"])] for m, b in sorted(summary["best"].items())]
    t = summary["target"]
    print(f"\nBest per method (target {t['metric']} {'>=' if t['mode'] == 'max' else '<='} {t['value']}):")
    print(format_table(rows, ["method", "best trial", *map(report.short, columns), t["metric"]]))
    if summary["ended_by"] == "time_budget":
        stopped = sum(x["stop_reason"] == "time_budget" for x in summary["trials"])
        not_run = summary["not_run"]
        names = ", ".join(not_run[:5]) + (", ..." if len(not_run) > 5 else "")
        print(f"Ended by its time budget (tune.time_budget_s: {summary['time_budget']['time_budget_s']:g}): "
              f"{stopped} running trial(s) stopped; {len(not_run)} of {len(not_run) + len(summary['trials'])} "
              f"planned trials never ran" + (f" ({names})" if not_run else ""))
    failed = [x for x in summary["trials"] if x["status"] == "ERROR"]
    for x in failed:
        print(f"FAILED {x['name']}: {x['error']}")
    return 1 if failed and len(failed) == len(summary["trials"]) else 0


def cmd_compare(args) -> int:
    from orchestrator import tracking
    from orchestrator.compare import compare, write_report
    from orchestrator.sweep import storage_path

    spec = _load(args.file)
    uri = tracking.tracking_uri(spec)
    tracking.check_tracking_uri(uri)
    folder = "report" if args.target is None else f"report-target{args.target:g}"
    out = args.out or os.path.join(storage_path(spec), spec.name, folder)
    write_report(compare(uri, tracking.experiment_name(spec), args.parent, target_value=args.target), out, uri=uri)
    print(f"report written to {out} and to the sweep's MLflow parent run")
    return 0


def cmd_sync(args) -> int:
    from orchestrator import tracking
    from orchestrator.sweep import storage_path

    spec = _load(args.file)
    uri = tracking.tracking_uri(spec)
    tracking.check_tracking_uri(uri)
    counts = tracking.sync_from_storage(os.path.join(storage_path(spec), spec.name), uri, tracking.experiment_name(spec))
    print(f"synced {counts['trials']} trial(s) to {uri}: {counts['created']} run(s) created, "
          f"{counts['reports_logged']} report(s) logged")
    return 0


def cmd_cluster_check(args) -> int:
    from orchestrator.cluster import check_cluster_file

    bad = 0
    for path in args.files:
        errors = check_cluster_file(path)
        print("\n".join(errors) if errors else f"{path}: OK")
        bad += bool(errors)
    return 2 if bad else 0


def cmd_cluster_cost(args) -> int:
    from orchestrator.cluster import check_cluster_file, estimate_cost
    from orchestrator.placement import is_kuberay, load_cluster, max_concurrent_trials
    from orchestrator.spec import load_sweep

    spec = load_sweep(args.file, validate_data=False)
    concurrency = args.concurrency
    if args.cluster:
        config = load_cluster(args.cluster)
        errors = [] if is_kuberay(config) else check_cluster_file(args.cluster)
        if errors:
            print("\n".join(errors), file=sys.stderr)
            return 2
        concurrency = concurrency or max_concurrent_trials(spec, config)
    try:
        print(estimate_cost(spec, args.gpu_hour_usd, args.seconds_per_step, concurrency, args.head_hour_usd))
    except ValueError as e:  # a price or a step time out of range
        raise ConfigError(f"cluster cost: {e}") from None
    return 0


def cmd_export(args) -> int:
    from orchestrator import export

    if args.source.endswith((".yaml", ".yml")):
        spec = _load(args.source)
        source, cfg, name = export.resolve(spec, trial=args.trial, method=args.method, run_id=args.run_id)
        out = args.out or os.path.join(export.default_folder(spec), f"{name}-{args.format}")
    else:
        if args.trial or args.method or args.run_id:
            raise ConfigError("--trial / --method / --run-id choose a trial of a sweep: give the sweep file, not a folder")
        if not args.out:
            raise ConfigError("--out: required when exporting a checkpoint folder")
        source, out = args.source, args.out
        cfg = export.read_trial_file(args.trial_config) if args.trial_config else None
    if args.register and not args.source.endswith((".yaml", ".yml")):
        raise ConfigError("--register: give the sweep file (the model is registered from the trial's MLflow run)")
    info = export.export(source, out, args.format, cfg)
    print(f"exported {info['method']} ({info['format']}) to {info['path']}; logits checked against the trained "
          f"model (max difference {info['max_logit_diff']:.2g})")
    if info["format"] == "peft":
        print(f"load it: PeftModel.from_pretrained(<base model {info['base_model']}>, {info['path']!r})")
    else:
        print(f"load it: AutoModel*.from_pretrained({info['path']!r}) (transformers, vLLM, TGI)")
    if args.register:
        from orchestrator import tracking
        from orchestrator.logged_models import register

        uri = tracking.tracking_uri(spec)
        run_id = args.run_id or export.run_of(uri, tracking.experiment_name(spec), name)
        print(f"registered {args.register} version {register(uri, run_id, args.register)} (the logged model of {name})")
    return 0


def cmd_ui(args) -> int:
    from orchestrator import tracking

    return tracking.serve_ui(tracking.tracking_uri(_load(args.file)), args.port)


def cmd_describe(args) -> int:
    import methods
    from orchestrator.tasks import TASKS

    if args.method in TASKS:
        return describe_task(TASKS[args.method])
    if args.method not in methods.METHODS:
        print(f"orchestrate describe: {args.method!r} is neither a method ({', '.join(sorted(methods.METHODS))}) "
              f"nor a task ({', '.join(sorted(TASKS))})", file=sys.stderr)
        return 2
    method = methods.get_method(args.method)
    print(f"{args.method}: {(method.config_cls.__doc__ or '').strip().splitlines()[0]}")
    defaults = _flat(method.config_cls().to_dict())
    for key, help_text in method.config_cls.field_help().items():
        print(f"  {key:32s} default {json.dumps(defaults.get(key))}  {help_text}")
    return 0


def describe_task(task) -> int:
    """What time-to-quality means on this task: its metrics, direction and default target."""
    import importlib

    doc = (type(task).__doc__ or importlib.import_module(type(task).__module__).__doc__ or "").strip().splitlines()
    print(f"{task.name}: {doc[0] if doc else task.kind}  (details: pydoc {type(task).__module__})")
    print(f"  kind            {task.kind}")
    print(f"  metrics         {', '.join(task.metrics)}")
    print(f"  default target  {task.default_metric} {'>=' if task.mode == 'max' else '<='} {task.default_target} "
          f"(set target.metric / target.value to change it)")
    print(f"  data_files      {', '.join(task.split_names) or 'none (installed corpus)'}"
          f"{' (required)' if task.needs_files else ''}")
    from methods.config import field_defaults, field_help

    defaults = field_defaults(task.options_cls)  # the task's own data: keys
    for key, help_text in field_help(task.options_cls).items():
        if key == "max_new_tokens":
            help_text += f" ({task.default_max_new_tokens} here)"
        print(f"  data.{key:26s} default {json.dumps(defaults.get(key))}  {help_text}")
    return 0


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="orchestrate", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    v = sub.add_parser("validate", help="check a sweep file without starting anything")
    v.add_argument("file")
    v.set_defaults(fn=cmd_validate)
    pr = sub.add_parser("prepare", help="build DeepSpeed's ops (and fetch a sweep's models) on this machine, "
                        "before any trial: for images, node setup commands and CI")
    pr.add_argument("file", nargs="?", help="a sweep file: the ops its trials load and its models "
                    "(default: every op a CPU trial may load, no models)")
    pr.set_defaults(fn=cmd_prepare)
    s = sub.add_parser("sweep", help="run a sweep: Ray Tune over Ray Train + DeepSpeed trials")
    s.add_argument("file")
    s.add_argument("--dry-run", action="store_true", help="print the resolved plan and exit")
    s.add_argument("--resume", action="store_true", help="continue an interrupted sweep (finished trials are kept)")
    s.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    s.add_argument("--storage", help="override the file's storage folder or URI (s3://, gs://)")
    s.add_argument("--cluster", help="the cluster's YAML (launcher or KubeRay RayCluster / RayJob): trials at once "
                   "from its full size (on a launcher head, ~/ray_bootstrap_config.yaml is read by default)")
    s.add_argument("--verbose", action="store_true", help="stream the workers' logs (default: the live table only)")
    s.add_argument("--smoke-test", action="store_true", help="every method once, 2 steps on a little data, 1 worker per trial: a quick end-to-end check")
    s.set_defaults(fn=cmd_sweep)
    c = sub.add_parser("compare", help="per-method table, ratios to full fine-tuning, plots (from MLflow)")
    c.add_argument("file")
    c.add_argument("--parent", help="MLflow parent run id (default: the latest sweep run)")
    c.add_argument("--out", help="folder for the CSV/JSON/PNG files (default: <storage>/<name>/report)")
    c.add_argument("--target", type=float, help="another target value for the same metric: times to quality "
                   "re-read from every trial's logged evaluations")
    c.set_defaults(fn=cmd_compare)
    y = sub.add_parser("sync", help="write results kept in Ray's storage to MLflow (idempotent)")
    y.add_argument("file")
    y.set_defaults(fn=cmd_sync)
    e = sub.add_parser("export", help="a trained trial as a PEFT adapter or a merged transformers model")
    e.add_argument("source", metavar="SWEEP_FILE_OR_CHECKPOINT",
                   help="a sweep file (its best trial, or --method / --trial / --run-id), or a trial's checkpoint folder")
    e.add_argument("--format", choices=["peft", "merged"], default="peft",
                   help="peft: PeftModel.from_pretrained loads it; merged: the adapter folded in (AutoModel*.from_pretrained)")
    e.add_argument("--method", help="the best trial of this method (default: the best trial of the sweep)")
    e.add_argument("--trial", help="the trial of this name (e.g. lora-r8-seed0)")
    e.add_argument("--run-id", help="the trial logged as this MLflow run (its adapter and trial_config.yaml artifacts)")
    e.add_argument("--trial-config", help="for a folder without trial.json: the trial's trial.json or trial_config.yaml")
    e.add_argument("--out", help="output folder (default for a sweep: <storage>/<name>/export/<trial>-<format>)")
    e.add_argument("--register", metavar="NAME", help="also register the trial's MLflow logged model under NAME")
    e.set_defaults(fn=cmd_export)
    u = sub.add_parser("ui", help="start the MLflow UI on 127.0.0.1 over the sweep's tracking store")
    u.add_argument("file")
    u.add_argument("--port", type=int, default=5000)
    u.set_defaults(fn=cmd_ui)
    cl = sub.add_parser("cluster", help="Ray cluster files: check one offline, estimate a sweep's cost")
    csub = cl.add_subparsers(dest="cluster_command", required=True)
    c = csub.add_parser("check", help="check cluster-launcher YAMLs offline (Ray's schema and launcher, this project's rules)")
    c.add_argument("files", nargs="+")
    c.set_defaults(fn=cmd_cluster_check)
    k = csub.add_parser("cost", help="estimate a sweep's GPU-hours and price from its sweep file")
    k.add_argument("file", help="sweep file")
    k.add_argument("--gpu-hour-usd", type=float, required=True, help="price of one GPU-hour")
    k.add_argument("--seconds-per-step", type=float, required=True, help="measured seconds per optimizer step")
    k.add_argument("--concurrency", type=int, help="trials at once (for the wall clock)")
    k.add_argument("--cluster", help="cluster YAML (launcher or KubeRay): concurrency from what it can host at full scale")
    k.add_argument("--head-hour-usd", type=float, default=0.0, help="price of the head node per hour")
    k.set_defaults(fn=cmd_cluster_cost)
    d = sub.add_parser("describe", help="a method's hyperparameters, or a task's metrics and default target")
    d.add_argument("method", metavar="METHOD_OR_TASK")
    d.set_defaults(fn=cmd_describe)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: resume with `orchestrate sweep FILE --resume`", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
