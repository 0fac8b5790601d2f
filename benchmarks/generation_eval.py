"""Evaluation time of a generative task in a 2-worker trial: every rank generating every answer
(how evaluation worked before) vs the batches split across the ranks.

    python benchmarks/generation_eval.py            # 64 HumanEval prompts, 32 new tokens each
    python benchmarks/generation_eval.py --write    # and record it in BENCHMARKS.md

What it measures: `GenerativeTask.evaluate`'s generation (teacher-forced loss and greedy decoding
of the real HumanEval prompts, batched, left-padded) on a SmolLM2-shaped Llama (random weights:
the cost of a forward does not depend on them), sandbox scoring excluded (it runs once, on rank 0).
Two gloo ranks with half the cores each, as a 2-worker trial has; both variants in this run, so
the ratio is what the split buys on this machine. One process with all the cores is shown for
reference. On N GPUs, one rank per GPU, each rank does 1/N of the batches.
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import sys
import time

import torch
import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.step_time import write_section
from orchestrator.tasks import DataSpec, default_model_path, get_task


def build(args):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(default_model_path())  # any tokenizer: timing only
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=args.width, intermediate_size=args.width * 8 // 3,
                                         num_hidden_layers=args.layers, num_attention_heads=9, num_key_value_heads=3,
                                         max_position_embeddings=1024)).eval()
    task = get_task("humaneval")
    code = os.path.join(ROOT, "tests", "data", "benchmarks", "code_train.jsonl")
    spec = DataSpec(name="humaneval", data_files={"train": code}, max_eval_samples=args.prompts,
                    options={"max_new_tokens": args.new_tokens}, max_length=256)
    _, evals = task.load(spec)
    batches = [task.collate_eval(tokenizer, evals[i:i + args.batch], spec) for i in range(0, len(evals), args.batch)]
    return task, tokenizer, model, batches


def timed_eval(task, tokenizer, model, batches, split: bool = True) -> float:
    from orchestrator.tasks.distributed import sharded_map
    from orchestrator.tasks.generation import generate

    def one(b):
        return generate(model, tokenizer, b, torch.device("cpu"), task.stop_strings)

    start = time.perf_counter()
    with torch.no_grad():
        sharded_map(batches, one) if split else [one(b) for b in batches]
    return time.perf_counter() - start


def _rank(rank: int, world: int, port: int, args, split: bool, out: str):
    import torch.distributed as dist

    from methods import collectives

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=600))
    torch.set_num_threads(max(1, args.threads // world))
    task, tokenizer, model, batches = build(args)
    collectives.barrier()
    # The evaluation ends when the slowest rank does.
    (seconds,) = collectives.all_reduce_values([timed_eval(task, tokenizer, model, batches, split)], op="max")
    if rank == 0:
        with open(out, "w") as f:
            f.write(str(seconds))
    dist.destroy_process_group()


def two_ranks(args, split: bool) -> float:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"generation_eval_{os.getpid()}.txt")
    mp.start_processes(_rank, args=(2, port, args, split, out), nprocs=2, join=True, start_method="spawn")
    with open(out) as f:
        return float(f.read())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=576)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="cores in all (default: all)")
    p.add_argument("--repeats", type=int, default=2, help="alternating runs of each; the best is kept")
    p.add_argument("--write", action="store_true", help="replace this benchmark's section in BENCHMARKS.md")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    task, tokenizer, model, batches = build(args)
    timed_eval(task, tokenizer, model, batches[:1])  # warm-up
    one, every, split = [], [], []
    for _ in range(args.repeats):  # alternate, so that machine noise hits all
        one.append(timed_eval(task, tokenizer, model, batches))
        every.append(two_ranks(args, split=False))
        split.append(two_ranks(args, split=True))
    best_one, best_every, best_split = min(one), min(every), min(split)
    command = " ".join(["python", "benchmarks/generation_eval.py", *sys.argv[1:]]).replace(" --write", "")
    body = f"""### Generative evaluation in a 2-worker trial: every rank generating everything vs split ({datetime.date.today()})

`{command}` on {args.threads} CPU cores: {args.prompts} HumanEval prompts, {args.new_tokens} new
tokens each, batches of {args.batch}, a {args.layers}-layer width-{args.width} Llama.

| setup | seconds (best of {args.repeats}) | all runs |
|---|---|---|
| 2 ranks, {max(1, args.threads // 2)} thread(s) each, every rank generates every answer | {best_every:.1f} | {', '.join(f'{x:.1f}' for x in every)} |
| 2 ranks, {max(1, args.threads // 2)} thread(s) each, batches split | {best_split:.1f} | {', '.join(f'{x:.1f}' for x in split)} |
| (reference) 1 rank, {args.threads} threads | {best_one:.1f} | {', '.join(f'{x:.1f}' for x in one)} |

Speed-up from the split in a 2-worker trial: **{best_every / best_split:.2f}x** (the split time
includes gathering the completions; the slowest rank's time counts).
"""
    print(body)
    if args.write:
        write_section(os.path.join(ROOT, "BENCHMARKS.md"), "generation_eval", body)


if __name__ == "__main__":
    main()
