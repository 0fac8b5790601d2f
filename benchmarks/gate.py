"""The hybrid's gate per layer over training, and quality against fixed gates after the same steps.

    python benchmarks/gate.py --write                    # both models, 200 steps, 3 seeds (~25 min, 2 cores)
    python benchmarks/gate.py --steps 20 --seeds 0 --models minilm   # quick check

Variants, all else equal (search_spaces/compare.yaml's hybrid: r 8, block 8, depth 2, lr 1e-3,
default gate: tau 1, K 10, EMA 0.9, bounds [0.05, 0.95]): the adaptive gate, and gate.fixed = 0
(LoRA-GA only), 0.5 and 1 (BOFT only). One process, a plain PyTorch loop (AdamW, constant lr), fp32
CPU: this measures quality and lambda, not time.

Models:
- minilm: the bundled all-MiniLM-L6-v2 classifying BBC News (5 topics; its fresh head trained in
  full), default targets query, value of its 6 layers.
- smollm2: a random LlamaForCausalLM of SmolLM2-135M's shape (width 576, 9 heads / 3 kv heads, MLP
  1536, vocab 49152, tied embeddings) with `--lm-layers` of its 30 layers; language modelling on BBC
  News article text (tokenized by MiniLM's WordPiece: its 30522 ids lie inside Llama's vocabulary),
  default targets q_proj, v_proj. The base is random, so its numbers say what the adapter alone
  learns in 200 steps on a frozen random network, nothing about a pretrained SmolLM2.

Seeds change the data order, the head's init (minilm) and the random base (smollm2); the gradient
batches of the LoRA-GA init follow the data order. Output: a table per model (mean and sample std
over seeds), the per-layer lambda of the adaptive runs with the branch norms behind it, and
`benchmarks/gate_<model>.png`, the layer x step heatmap of lambda (first seed).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import random
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import methods  # noqa: E402
from benchmarks.step_time import write_section  # noqa: E402

HYBRID = {"lora_ga": {"lora": {"r": 8}}, "boft": {"block_size": 8, "n_butterfly_factor": 2}}
VARIANTS = {"adaptive": None, "fixed 0 (LoRA-GA)": 0.0, "fixed 0.5": 0.5, "fixed 1 (BOFT)": 1.0}


# ---------------------------------------------------------------------------------------------
# Data and models
# ---------------------------------------------------------------------------------------------

def bbc(args):
    from orchestrator.tasks import DataSpec, get_task

    task = get_task("bbc_news")
    train, evals = task.load(DataSpec(name="bbc_news", max_train_samples=args.train_examples,
                                      max_eval_samples=args.eval_examples, max_length=args.seq))
    return task, train, evals


class MiniLM:
    """BBC News topic classification on the bundled MiniLM."""

    name = "minilm"
    metrics = ("eval_loss", "accuracy")

    def __init__(self, args):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from orchestrator.tasks import default_model_path

        self.args = args
        self.path = default_model_path()
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.task, self.train, evals = bbc(args)
        self.evals = [self.task.collate(self.tokenizer, evals[i:i + 32], max_length=args.seq)
                      for i in range(0, len(evals), 32)]
        self.cls = AutoModelForSequenceClassification

    def base(self, seed: int):
        torch.manual_seed(seed)  # the fresh classification head
        return self.cls.from_pretrained(self.path, num_labels=self.task.num_labels)

    def batches(self, seed: int):
        """Endless shuffled batches of the training set, reshuffled every epoch."""
        rng, b = random.Random(seed), self.args.batch
        while True:
            order = rng.sample(range(len(self.train)), len(self.train))
            for i in range(0, len(order) - b + 1, b):
                yield self.task.collate(self.tokenizer, [self.train[j] for j in order[i:i + b]], max_length=self.args.seq)

    modules_to_save = ("classifier",)

    @torch.no_grad()
    def evaluate(self, model) -> dict[str, float]:
        model.eval()
        loss = correct = n = 0.0
        for batch in self.evals:
            labels = batch["labels"]
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
            loss += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
            correct += float((logits.argmax(-1) == labels).sum())
            n += len(labels)
        model.train()
        return {"eval_loss": loss / n, "accuracy": correct / n}


class SmolLM2Shape:
    """Language modelling on BBC article text with a random Llama of SmolLM2-135M's shape."""

    name = "smollm2"
    metrics = ("eval_loss",)
    modules_to_save = ()

    def __init__(self, args):
        from transformers import AutoTokenizer

        from orchestrator.tasks import default_model_path

        self.args = args
        tokenizer = AutoTokenizer.from_pretrained(default_model_path())
        _, train, evals = bbc(args)

        def ids(examples):
            out = tokenizer([e["text"] for e in examples], truncation=True, max_length=args.seq,
                            padding="max_length", return_tensors="pt")
            return out["input_ids"], out["attention_mask"]

        self.train = ids(train)
        self.evals = ids(evals)

    def config(self):
        from transformers import LlamaConfig

        return LlamaConfig(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                           vocab_size=49152, num_hidden_layers=self.args.lm_layers, max_position_embeddings=8192,
                           rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True, attn_implementation="sdpa")

    def base(self, seed: int):
        from transformers import LlamaForCausalLM

        torch.manual_seed(seed)
        return LlamaForCausalLM(self.config())

    @staticmethod
    def lm_batch(ids, mask):
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}

    def batches(self, seed: int):
        ids, mask = self.train
        g, b = torch.Generator().manual_seed(seed), self.args.batch
        while True:
            order = torch.randperm(len(ids), generator=g)
            for i in range(0, len(order) - b + 1, b):
                j = order[i:i + b]
                yield self.lm_batch(ids[j], mask[j])

    @torch.no_grad()
    def evaluate(self, model) -> dict[str, float]:
        model.eval()
        ids, mask = self.evals
        total = tokens = 0.0
        for i in range(0, len(ids), 16):
            batch = self.lm_batch(ids[i:i + 16], mask[i:i + 16])
            n = float((batch["labels"][:, 1:] != -100).sum())  # the model shifts labels by one
            total += float(model(**batch).loss) * n
            tokens += n
        model.train()
        return {"eval_loss": total / tokens}


MODELS = {"minilm": MiniLM, "smollm2": SmolLM2Shape}


# ---------------------------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------------------------

def run(bench, base, variant: str, seed: int, args) -> dict:
    gate = {} if VARIANTS[variant] is None else {"fixed": VARIANTS[variant]}
    cfg = methods.config_for("hybrid", {**HYBRID, "gate": gate})
    batches = bench.batches(seed)
    model = methods.apply_method(copy.deepcopy(base), cfg, batches=batches, modules_to_save=bench.modules_to_save)
    opt = torch.optim.AdamW(methods.trainable_parameters(model), lr=args.lr)
    model.train()
    t = time.perf_counter()
    for step in range(1, args.steps + 1):
        model(**next(batches)).loss.backward()
        methods.after_backward(model, step)
        opt.step()
        opt.zero_grad(set_to_none=True)
    result = bench.evaluate(model)
    result["seconds"] = time.perf_counter() - t
    result["gates"] = methods.gate_values(model)
    result["records"] = methods.gate_records(model)
    return result


def heatmap(records: dict[str, list[dict]], init: float, title: str, path: str) -> None:
    """Layer x step image of lambda, one row per adapted layer (input lambda at step 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(records)
    steps = [0] + [int(r["step"]) for r in records[names[0]]]
    values = [[init] + [r["gate"] for r in records[n]] for n in names]
    fig, ax = plt.subplots(figsize=(7, 0.5 + 0.22 * len(names)), dpi=90)
    # colours span the values reached, so that layers a few hundredths apart stay distinguishable
    im = ax.imshow(values, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(names)), [short(n) for n in names], fontsize=6)
    ticks = range(0, len(steps), max(1, len(steps) // 10))
    ax.set_xticks(list(ticks), [str(steps[i]) for i in ticks], fontsize=7)
    ax.set_xlabel("step", fontsize=8)
    ax.set_title(title, fontsize=8)
    bar = fig.colorbar(im, ax=ax)
    bar.set_label("lambda (BOFT share)", fontsize=7)
    bar.ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def short(name: str) -> str:
    """bert.encoder.layer.3.attention.self.query -> 3.query; model.layers.2.self_attn.v_proj -> 2.v_proj"""
    parts = name.split(".")
    digits = [p for p in parts if p.isdigit()]
    return f"{digits[0]}.{parts[-1]}" if digits else name


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------

def section(bench, results: dict[str, list[dict]], args, png: str | None, wall: float) -> list[str]:
    key = bench.metrics[-1]  # accuracy for minilm, eval loss for the LM
    better = max if key == "accuracy" else min
    lines = [f"#### {bench.name}", ""]
    if bench.name == "minilm":
        lines.append(f"all-MiniLM-L6-v2 (bundled), BBC News: {args.train_examples} train / {args.eval_examples} eval "
                     f"articles, first {args.seq} tokens, batch {args.batch}, fresh head trained in full.")
    else:
        lines.append(f"random Llama of SmolLM2-135M's shape with {args.lm_layers} of its 30 layers; LM loss (nats "
                     f"per token) on BBC News text, {args.seq}-token chunks, batch {args.batch}, "
                     f"{args.eval_examples} eval articles.")
    lines += ["", f"| variant | {' | '.join(bench.metrics)} | mean lambda at the end | s per run |",
              "|---|" + "---|" * (len(bench.metrics) + 2)]
    means = {}
    for variant, runs in results.items():
        cells = [mean_std([r[m] for r in runs]) for m in bench.metrics]
        lam = statistics.mean(statistics.mean(r["gates"].values()) for r in runs)
        means[variant] = statistics.mean(r[key] for r in runs)
        lines.append(f"| {variant} | {' | '.join(cells)} | {lam:.3f} | {statistics.mean(r['seconds'] for r in runs):.0f} |")
    adaptive = results["adaptive"]
    spread = statistics.stdev(r[key] for r in adaptive) if len(adaptive) > 1 else 0.0
    best_fixed = better((v for v in means if v != "adaptive"), key=lambda v: means[v])
    margin = means["adaptive"] - means[best_fixed]
    if key != "accuracy":
        margin = -margin  # positive = adaptive better
    verdict = ("beats every fixed gate" if margin > 0 else "does not beat the best fixed gate")
    lines += ["", f"Adaptive gate on {key}: {means['adaptive']:.4f}; best fixed gate: {best_fixed} "
              f"{means[best_fixed]:.4f}. **The adaptive gate {verdict}** (by {margin:+.4f}; the adaptive runs' "
              f"std over seeds is {spread:.4f}).", ""]
    # per layer: where lambda went and the norms that sent it there (mean over seeds, last update)
    layers = list(adaptive[0]["gates"])
    lines += ["Adaptive runs, per layer at the end (mean over seeds): lambda, and the last update's branch norms "
              "(each branch's own gradient norm per parameter, the gate's input).", "",
              "| layer | lambda | branch norm BOFT | branch norm LoRA-GA | target |", "|---|---|---|---|---|"]
    for name in layers:
        last = [r["records"][name][-1] for r in adaptive]
        avg = {k: statistics.mean(x[k] for x in last) for k in ("gate", "branch_norm_boft", "branch_norm_lora_ga", "gate_target")}
        lines.append(f"| {name} | {avg['gate']:.3f} | {avg['branch_norm_boft']:.2e} | {avg['branch_norm_lora_ga']:.2e} | "
                     f"{avg['gate_target']:.3f} |")
    if png:
        lines += ["", f"![lambda per layer over steps, {bench.name}](benchmarks/{os.path.basename(png)})"]
    lines += ["", f"({wall / 60:.1f} min for this model's {sum(len(r) for r in results.values())} runs.)", ""]
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="minilm,smollm2")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--lr", type=float, default=1e-3, help="compare.yaml's hybrid lr (default 1e-3)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=32, help="tokens per example (default 32)")
    p.add_argument("--train-examples", type=int, default=800)
    p.add_argument("--eval-examples", type=int, default=160)
    p.add_argument("--lm-layers", type=int, default=4, help="decoder layers of the SmolLM2-shaped model (it has 30)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on 2 shared cores, 2 threads stall whenever another process runs)")
    p.add_argument("--write", action="store_true", help="write the heatmaps and replace this section of BENCHMARKS.md")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    cmd = "python benchmarks/gate.py " + " ".join(sys.argv[1:])
    lines = [
        f"### The hybrid's gate: lambda per layer and quality against fixed gates ({args.steps} steps)",
        "",
        f"- command: `{cmd.strip()}`",
        f"- date: {datetime.date.today()}; one process, {args.threads} torch thread{'s' * (args.threads > 1)}, fp32, CPU "
        f"({os.cpu_count()} cores, shared with other work); torch {torch.__version__}",
        f"- hybrid: r 8, block 8, depth 2, lr {args.lr:g} (AdamW, constant), default gate (tau 1, K 10, EMA 0.9, "
        f"bounds [0.05, 0.95], normalized norms); fixed variants pin gate.fixed; seeds {args.seeds}, "
        "mean ± sample std over seeds",
        "",
    ]
    for name in args.models.split(","):
        bench = MODELS[name](args)
        t = time.perf_counter()
        results: dict[str, list[dict]] = {v: [] for v in VARIANTS}
        png = None
        for seed in seeds:
            base = bench.base(seed)
            for variant in VARIANTS:
                r = run(bench, base, variant, seed, args)
                results[variant].append(r)
                log(f"{name} seed {seed} {variant}: " + ", ".join(f"{m} {r[m]:.4f}" for m in bench.metrics)
                    + f", mean lambda {statistics.mean(r['gates'].values()):.3f}, {r['seconds']:.0f} s")
                if variant == "adaptive" and seed == seeds[0] and args.write:
                    png = os.path.join(ROOT, "benchmarks", f"gate_{name}.png")
                    heatmap(r["records"], methods.GateConfig().init,
                            f"hybrid gate lambda per layer, {name}, seed {seed}", png)
            del base
        lines += section(bench, results, args, png, time.perf_counter() - t)
    lines.append(f"Total {(time.perf_counter() - t0) / 60:.1f} min.")
    text = "\n".join(lines)
    print(text)
    if args.write:
        write_section(os.path.join(ROOT, "BENCHMARKS.md"), f"gate models={args.models} steps={args.steps}", text)


if __name__ == "__main__":
    main()
