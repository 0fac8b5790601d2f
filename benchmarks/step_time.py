"""Step time and memory of every adapter against PEFT's, on a random Llama of SmolLM2-135M's shape.

    python benchmarks/step_time.py                         # default: 4 layers, width 576, batch 4x128
    python benchmarks/step_time.py --layers 2 --steps 5    # quick check
    python benchmarks/step_time.py --widths 576,1152       # + width table (does BOFT cost grow with d?)
    python benchmarks/step_time.py --write --wait-quiet 120   # also replace this run's section in BENCHMARKS.md
    python benchmarks/step_time.py --profile "boft b4 m1 qv"   # torch.profiler table of one step

One step = forward + backward + AdamW step (+ `methods.after_backward`), fp32, on `--device` (CPU by default). Each variant gets
its own deep copy of one seeded random model and sees the same input batch. The machine is small and
shared, so the variants' steps are interleaved round-robin (the order rotates every round, so no
variant always follows the same neighbour), warm-up rounds are dropped, and we report medians and
ratios measured in the same run, never absolute numbers from different runs. A step during which
other processes used the CPU (/proc/stat) is rerun (`--retries`); `--wait-quiet` waits for a quiet
machine before each round. A module-level table (one projection, forward + backward, hundreds of
cheap repetitions) gives the precise depth and width scaling that the whole-model step's noise hides.

"floor" is the frozen base model with backward still running through every layer down to the input
embeddings (a forward hook makes the embedding *output* require grad; the 28M-entry embedding
matrix gets no gradient). Every variant gets the same hook, so every variant does at least the
floor's work and "overhead" = step - floor is exactly the adapter's own cost, the quantity the
targets in ../shared/REFERENCE.md section 1 compare. (In real training an adapter's backward stops at
the first adapted layer, a constant ~1 layer of input-gradient work less than reported here.)

Memory is counted, not sampled (peak RSS of variants sharing one process is meaningless and noisy):
saved activations = bytes of the distinct storages that autograd saves for backward during one
forward (`torch.autograd.graph.saved_tensors_hooks`), model parameters and buffers excluded;
state = gradients of the trainable parameters + AdamW's state. Transient buffers that die within
the forward or backward (logits' softmax temporaries, PEFT's per-forward dense-R intermediates that
are not saved) are not counted. `--rss` adds the peak RSS of a child process running each variant
alone during two steps (after building; includes Python, torch and the model).

Variants live in VARIANTS: adding a method is one line. Methods registered as "unitary" or
"hybrid" in `methods.METHODS` are benchmarked with their default config when present.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import gc
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import methods  # noqa: E402

warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
QV = ["q_proj", "v_proj"]
QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]
NOISY = 0.25  # IQR/median above which a variant's timings count as disturbed (quiet runs here: 5-20%)
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


# ---------------------------------------------------------------------------------------------
# The model and the batch
# ---------------------------------------------------------------------------------------------

def llama_config(width: int, layers: int):
    """SmolLM2-135M's shape (head_dim 64, 3 query heads per kv head, tied embeddings), scaled to `width`."""
    from transformers import LlamaConfig

    if width % 192:
        raise SystemExit(f"--width {width}: must be a multiple of 192 (head_dim 64, 3 query heads per kv head)")
    heads = width // 64
    return LlamaConfig(
        hidden_size=width, intermediate_size=1536 * width // 576, num_attention_heads=heads,
        num_key_value_heads=heads // 3, vocab_size=49152, num_hidden_layers=layers,
        max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
        attn_implementation="sdpa",
    )


DEVICE = torch.device("cpu")  # --device; on CUDA every timed region ends with a synchronize


def hardware() -> str:
    if DEVICE.type == "cuda":
        return f"fp32, GPU {torch.cuda.get_device_name(DEVICE)}"
    return f"{torch.get_num_threads()} torch threads, fp32, CPU ({os.cpu_count()} cores, shared with other work)"


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)  # kernels are asynchronous: time them, not their launch


def build_base(width: int, layers: int, seed: int) -> nn.Module:
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(width, layers)).to(DEVICE)
    model.train()  # Llama has no dropout by default: train mode only matters for adapters' own
    return model


def make_batch(batch: int, seq: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, 49152, (batch, seq), generator=g).to(DEVICE)
    return {"input_ids": ids, "labels": ids}


# ---------------------------------------------------------------------------------------------
# Variants: name -> how to turn a fresh copy of the base model into the model to train
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Variant:
    name: str
    build: Callable[[nn.Module, list], nn.Module]  # (model copy, gradient-init batches) -> model
    peer: str | None = None  # the PEFT variant at the same settings, for the ratio columns
    group: str = "ours"  # "base" | "ours" | "peft"
    in_width_sweep: bool = False  # also measured at every --widths width
    depth: int | None = None  # BOFT butterfly depth, for the depth table


def floor(model: nn.Module, batches) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def grad_to_embedding_output(model: nn.Module) -> None:
    """Make backward run down to the embedding *output*, never to the (vocab x d) matrix itself.
    Registered on every variant, so that all do the same frozen-base backward and step - floor is
    exactly the adapter's own work. (Without it an adapter's backward stops at the first adapted
    layer's input and skips ~one layer's input-gradient matmuls, a constant ~10 ms here that would
    hide part of every adapter's overhead and inflate the PEFT/ours overhead ratio.)"""
    model.get_input_embeddings().register_forward_hook(lambda mod, inp, out: out.requires_grad_())


def floor_no_layers(model: nn.Module, batches) -> nn.Module:
    """The floor without decoder layers: embedding, final norm, tied LM head and loss. The floor
    minus this, divided by --layers, is one layer's frozen cost: it lets us extrapolate to 30 layers."""
    model.model.layers = nn.ModuleList()
    model.config.num_hidden_layers = 0
    return floor(model, batches)


def ours(method: str, cfg: dict | None = None, gradient_init: bool = False):
    def build(model, batches):
        return methods.apply_method(model, methods.config_for(method, cfg or {}),
                                    batches=batches if gradient_init else None)
    return build


def peft_lora(targets):
    def build(model, batches):
        import peft
        return peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    return build


def peft_boft(targets, depth=1):
    def build(model, batches):
        import peft
        with warnings.catch_warnings():  # "Failed to load the CUDA extension ... forcing m=1" on CPU
            warnings.simplefilter("ignore")
            return peft.get_peft_model(model, peft.BOFTConfig(
                boft_block_size=4, boft_n_butterfly_factor=depth, target_modules=targets))
    return build


def boft(depth, targets=QV):
    return ours("boft", {"block_size": 4, "n_butterfly_factor": depth, "target_modules": targets})


LORA = {"r": 8, "alpha": 16, "target_modules": QV}
VARIANTS: list[Variant] = [
    Variant("floor", floor, group="base", in_width_sweep=True),
    Variant("floor 0 layers", floor_no_layers, group="base"),
    Variant("full FT", ours("full"), group="base"),
    Variant("lora r8 qv", ours("lora", LORA), peer="PEFT lora r8 qv", in_width_sweep=True),
    Variant("lora_ga r8 qv", ours("lora_ga", {"lora": LORA, "batches": 2}, gradient_init=True), peer="PEFT lora r8 qv"),
    Variant("boft b4 m1 qv", boft(1), peer="PEFT boft b4 m1 qv", in_width_sweep=True, depth=1),
    Variant("boft b4 m2 qv", boft(2), depth=2),
    Variant("boft b4 m3 qv", boft(3), depth=3),
    Variant("boft b4 m4 qv", boft(4), depth=4),
    Variant("boft b4 m1 qkvo", boft(1, QKVO), peer="PEFT boft b4 m1 qkvo", in_width_sweep=True),
    Variant("PEFT lora r8 qv", peft_lora(QV), group="peft", in_width_sweep=True),
    Variant("PEFT boft b4 m1 qv", peft_boft(QV), group="peft", in_width_sweep=True),
    Variant("PEFT boft b4 m1 qkvo", peft_boft(QKVO), group="peft", in_width_sweep=True),
]
# Methods others are adding to methods/: benchmarked with their default config once registered.
OPTIONAL = [
    ("unitary", Variant("unitary (default cfg)", ours("unitary"))),
    ("hybrid", Variant("hybrid (default cfg)", ours("hybrid", gradient_init=True))),
]
VARIANTS += [v for name, v in OPTIONAL if name in methods.METHODS]


# ---------------------------------------------------------------------------------------------
# One training step, and the memory count
# ---------------------------------------------------------------------------------------------

class Runner:
    """A built variant: its model, trainable parameters, optimizer, and a step function."""

    def __init__(self, variant: Variant, model: nn.Module, batch: dict):
        self.variant, self.model, self.batch = variant, model, batch
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=1e-5) if self.params else None
        self.ours = getattr(model, "adapter_config", None) is not None
        self.steps = 0
        self.times: list[float] = []

    def step(self, probe: dict | None = None) -> None:
        if probe is None:
            loss = self.model(**self.batch).loss
        else:
            with torch.autograd.graph.saved_tensors_hooks(*saved_bytes_hooks(self.model, probe)):
                loss = self.model(**self.batch).loss
        loss.backward()
        if probe is not None:
            probe["grads"] = sum(p.grad.nbytes for p in self.params if p.grad is not None)
        if self.ours:
            methods.after_backward(self.model, self.steps)  # the hybrid's gate; a no-op for others
        if self.opt is not None:
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        sync()
        if probe is not None and self.opt is not None:
            probe["optim"] = sum(t.nbytes for s in self.opt.state.values() for t in s.values()
                                 if torch.is_tensor(t) and t.dim() > 0)
        self.steps += 1


def saved_bytes_hooks(model: nn.Module, probe: dict):
    """Pack/unpack hooks that add up the distinct storages autograd saves, weights excluded."""
    skip = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    seen: set[int] = set()
    probe["saved"] = 0

    def pack(t):
        if t.layout == torch.strided and t.device.type != "meta":
            s = t.untyped_storage()
            ptr = s.data_ptr()
            if ptr not in skip and ptr not in seen:
                seen.add(ptr)
                probe["saved"] += s.nbytes()
        return t

    return pack, lambda t: t


def build_runners(names: list[str], width: int, layers: int, batch: dict, seed: int, log) -> list[Runner]:
    base = build_base(width, layers, seed)
    grad_batches = [batch, batch]  # gradient-init methods (lora_ga, hybrid): 2 batches is plenty here
    runners = []
    for v in (v for v in VARIANTS if v.name in names):
        t = time.perf_counter()
        model = v.build(copy.deepcopy(base), grad_batches)
        grad_to_embedding_output(model)
        runners.append(Runner(v, model, batch))
        log(f"  built {v.name!r} in {time.perf_counter() - t:.1f}s")
    del base
    return runners


class Disturbance:
    """Did other processes use the CPU while we timed something? Compares the machine's busy CPU
    time (/proc/stat, all cores, steal included) with this process's own CPU time over the interval.
    Without /proc/stat (not Linux) nothing ever counts as disturbed."""

    TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    reruns = 0  # class-wide counts, for the report
    kept = 0  # disturbed samples kept because the retries ran out

    @classmethod
    def _busy(cls) -> float | None:
        try:
            with open("/proc/stat") as fh:
                v = [int(x) for x in fh.readline().split()[1:9]]
        except (OSError, ValueError):
            return None
        return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / cls.TICK  # user nice system irq softirq steal

    def __enter__(self):
        self.busy, self.own, self.t = self._busy(), time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.t
        busy = self._busy()
        other = 0.0 if busy is None or self.busy is None else (busy - self.busy) - (time.process_time() - self.own)
        # others used more than 10% of one core (plus two 10 ms ticks of /proc/stat rounding)
        self.disturbed = other > 0.1 * self.wall + 2 / self.TICK
        return False


def wait_until_quiet(max_wait: float, log, window: float = 5.0) -> None:
    """Sleep until other processes leave the CPU alone for `window` s (at most `max_wait` seconds)."""
    deadline = time.perf_counter() + max_wait
    while time.perf_counter() < deadline:
        with Disturbance() as d:
            time.sleep(window)
        if not d.disturbed:
            return
        log("  machine busy, waiting for it to quiet down")
    log("  still busy: starting anyway")


def measure(runners: list[Runner], warmup: int, steps: int, retries: int, quiet_wait: float, log) -> None:
    """Round-robin: every round runs one step of every variant, in an order that rotates. A timed
    step during which other processes used the CPU is rerun (up to `retries` times, after a pause);
    with `quiet_wait`, every round first waits (up to that long) for 2 quiet seconds."""
    for r in runners:  # first step: memory probe (untimed; the hooks cost time)
        r.probe = {"optim": 0}
        r.step(r.probe)
    n = len(runners)
    for rnd in range(warmup + steps):
        order = runners[rnd % n:] + runners[:rnd % n]
        if quiet_wait and rnd >= warmup:
            wait_until_quiet(quiet_wait, log, window=2.0)
        gc.collect()
        gc.disable()
        try:
            for r in order:
                for attempt in range(retries + 1):
                    with Disturbance() as d:
                        r.step()
                    if not d.disturbed or attempt == retries or rnd < warmup:
                        break
                    Disturbance.reruns += 1
                    time.sleep(1.0)
                if rnd >= warmup:
                    r.times.append(d.wall)
                    Disturbance.kept += d.disturbed
        finally:
            gc.enable()
        if rnd >= warmup:
            log(f"  round {rnd - warmup + 1}/{steps} ({Disturbance.reruns} reruns so far): "
                + ", ".join(f"{r.variant.name} {1e3 * r.times[-1]:.0f}" for r in runners[:4]) + ", ...")
        else:
            log(f"  warm-up round {rnd + 1}/{warmup}")


# ---------------------------------------------------------------------------------------------
# Results and tables
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Result:
    name: str
    group: str
    peer: str | None
    depth: int | None
    ms: float
    spread: float  # interquartile range / median
    min_ms: float
    trainable: int
    saved_mb: float
    state_mb: float
    rss_mb: float | None = None


def summarize(runners: list[Runner]) -> dict[str, Result]:
    out = {}
    for r in runners:
        ms = [1e3 * t for t in r.times]
        med = statistics.median(ms)
        q = statistics.quantiles(ms, n=4) if len(ms) >= 2 else [med, med, med]
        out[r.variant.name] = Result(
            r.variant.name, r.variant.group, r.variant.peer, r.variant.depth, med, (q[2] - q[0]) / med, min(ms),
            sum(p.numel() for p in r.params), r.probe["saved"] / 2**20,
            (r.probe["grads"] + r.probe["optim"]) / 2**20,
        )
    return out


def fmt(x: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "–" if x is None else f"{x:{spec}}{suffix}"


def at30(res: dict[str, Result], name: str, layers: int, stat: str = "ms") -> float | None:
    """x floor extrapolated to SmolLM2's 30 layers: the head costs the same, layers and the
    per-layer adapter overhead scale by 30 / layers. None without the 0-layer floor."""
    if "floor 0 layers" not in res or name not in res:
        return None
    f, f0 = getattr(res["floor"], stat), getattr(res["floor 0 layers"], stat)
    floor30 = f0 + (f - f0) * 30 / layers
    return (floor30 + (getattr(res[name], stat) - f) * 30 / layers) / floor30


def main_table(res: dict[str, Result], layers: int, rss: bool) -> str:
    f = res["floor"].ms
    cols = ["variant", "step ms (median)", "IQR/median", "min ms", "x floor", "x PEFT same", "overhead ms",
            "overhead ours/PEFT", "x floor @30 layers (extrap.)", "trainable params", "saved act. MB",
            "grads+AdamW MB"]
    if rss:
        cols.append("peak RSS MB during 2 steps (own process)")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in res.values():
        peer = res.get(r.peer) if r.peer else None
        ov = r.ms - f
        base = r.name.startswith("floor")
        row = [r.name, f"{r.ms:.0f}", f"{100 * r.spread:.0f}%", f"{r.min_ms:.0f}", f"{r.ms / f:.3f}",
               fmt(r.ms / peer.ms if peer else None, ".3f"), "–" if r.name == "floor" else f"{ov:+.0f}",
               fmt(ov / (peer.ms - f) if peer and peer.ms - f > 0 else None, ".2f"),
               "–" if base else fmt(at30(res, r.name, layers), ".3f"), f"{r.trainable:,}",
               f"{r.saved_mb:.0f}", f"{r.state_mb:.1f}"]
        if rss:
            row.append(fmt(r.rss_mb, ".0f"))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def depth_table(res: dict[str, Result]) -> str:
    f, fmin = res["floor"].ms, res["floor"].min_ms
    rows = sorted((r for r in res.values() if r.depth), key=lambda r: r.depth)
    lines = ["| depth m | step ms | overhead ms (median) | overhead ms (min) | overhead / m | increment vs m-1 "
             "| overhead / floor |", "|---|---|---|---|---|---|---|"]
    prev = None
    for r in rows:
        ov = r.ms - f
        lines.append(f"| {r.depth} | {r.ms:.0f} | {ov:+.0f} | {r.min_ms - fmin:+.0f} | {ov / r.depth:+.1f} | "
                     f"{'–' if prev is None else f'{ov - prev:+.0f}'} | {ov / f:.3f} |")
        prev = ov
    return "\n".join(lines)


def width_table(per_width: dict[int, dict[str, Result]]) -> str:
    names = [v.name for v in VARIANTS if v.in_width_sweep and v.name != "floor"]
    names = [n for n in names if all(n in res for res in per_width.values())]
    lines = ["| width | floor ms | " + " | ".join(f"{n}: overhead/floor" for n in names) + " |",
             "|---|---|" + "---|" * len(names)]
    for w, res in sorted(per_width.items()):
        f = res["floor"].ms
        cells = [f"{(res[n].ms - f) / f:.3f}" for n in names]
        lines.append(f"| {w} | {f:.0f} | " + " | ".join(cells) + " |")
    lo, hi = min(per_width), max(per_width)
    cells = []
    for n in names:
        a = per_width[lo][n].ms - per_width[lo]["floor"].ms
        b = per_width[hi][n].ms - per_width[hi]["floor"].ms
        cells.append(f"{b / a:.2f}x" if a > 0 and b > 0 else "– (within noise)")
    f_growth = per_width[hi]["floor"].ms / per_width[lo]["floor"].ms
    lines.append(f"| growth {lo}->{hi} (floor; overhead ms) | {f_growth:.2f}x | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets(res: dict[str, Result], per_width: dict[int, dict[str, Result]], layers: int) -> list[str]:
    """Each target judged on the medians and on the minima (the least-disturbed step). The verdict
    is MET / NOT MET when both agree, UNRESOLVED (noise) when they don't."""
    out = []

    def verdict(label: str, values: dict[str, float | None], limit: float, le: bool = True, note: str = "") -> None:
        ok = {k: (v <= limit if le else v >= limit) for k, v in values.items() if v is not None}
        word = "MET" if all(ok.values()) else "NOT MET" if not any(ok.values()) else "UNRESOLVED (noise)"
        shown = ", ".join(f"{k} {v:.2f}" if v is not None else f"{k} –" for k, v in values.items())
        out.append(f"- **{word}**: {label} {'<=' if le else '>='} {limit}: {shown}{note}")

    def ov(name, stat):
        return getattr(res[name], stat) - getattr(res["floor"], stat)

    def speedup(a, b, stat):  # PEFT overhead / ours; inf when ours is at or below the floor
        return ov(b, stat) / ov(a, stat) if ov(a, stat) > 0 else float("inf")

    for a, b in (("boft b4 m1 qv", "PEFT boft b4 m1 qv"), ("boft b4 m1 qkvo", "PEFT boft b4 m1 qkvo")):
        if a in res and b in res:
            verdict(f"PEFT's BOFT overhead / ours, {a} (PEFT runs depth 1 on CPU)",
                    {"median": speedup(a, b, "ms"), "min": speedup(a, b, "min_ms")}, 3.0, le=False,
                    note=f" (overhead ms, median: ours {ov(a, 'ms'):+.0f}, PEFT {ov(b, 'ms'):+.0f})")
    if "lora r8 qv" in res and "PEFT lora r8 qv" in res:
        a, b = res["lora r8 qv"], res["PEFT lora r8 qv"]
        verdict("our LoRA step / PEFT's LoRA step", {"median": a.ms / b.ms, "min": a.min_ms / b.min_ms}, 1.1)
    for name, limit in (("lora r8 qv", 1.15), ("lora_ga r8 qv", 1.15), ("boft b4 m1 qv", 1.4),
                        ("boft b4 m2 qv", 1.4), ("boft b4 m3 qv", 1.4), ("boft b4 m4 qv", 1.4),
                        ("boft b4 m1 qkvo", 1.4)):
        if name in res:
            r, f = res[name], res["floor"]
            x30 = at30(res, name, layers)
            verdict(f"{name} step / floor step", {"median": r.ms / f.ms, "min": r.min_ms / f.min_ms}, limit,
                    note="" if x30 is None else f" (extrapolated to 30 layers: {x30:.2f})")
    if len(per_width) >= 2:
        lo, hi = min(per_width), max(per_width)
        for n in ("boft b4 m1 qv", "boft b4 m1 qkvo", "PEFT boft b4 m1 qv", "PEFT boft b4 m1 qkvo"):
            if all(n in per_width[w] for w in (lo, hi)):
                fr = {w: (per_width[w][n].ms - per_width[w]["floor"].ms) / per_width[w]["floor"].ms for w in (lo, hi)}
                out.append(f"- {n}: overhead/floor {fr[lo]:.3f} at width {lo} -> {fr[hi]:.3f} at width {hi}")
    return out


# ---------------------------------------------------------------------------------------------
# Module level: one (d x d) projection, forward + backward, many cheap repetitions
# ---------------------------------------------------------------------------------------------
# The whole-model step is dominated by the LM head and is noisy on a shared machine; one layer's
# forward + backward takes milliseconds, so hundreds of interleaved repetitions pin down how an
# adapter's own cost scales with depth m and width d.

def _peft_layer(make_cfg):
    def build(lin: nn.Linear) -> nn.Module:
        import peft

        holder = nn.Module()
        holder.q_proj = lin
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = peft.get_peft_model(holder, make_cfg(peft))
        return model.base_model.model.q_proj
    return build


def _our_layer(method: str, cfg: dict | None = None):
    def build(lin: nn.Linear) -> nn.Module:
        return methods.get_method(method).layer_cls(lin, methods.config_for(method, cfg or {}), "q_proj")
    return build


def _frozen(lin: nn.Linear) -> nn.Module:
    return lin.requires_grad_(False)


LAYER_VARIANTS: list[tuple[str, Callable[[nn.Linear], nn.Module]]] = [
    ("frozen linear", _frozen),
    ("lora r8", _our_layer("lora", {"r": 8, "alpha": 16})),
    ("PEFT lora r8", _peft_layer(lambda peft: peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj"]))),
    *[(f"boft b4 m{m}", _our_layer("boft", {"block_size": 4, "n_butterfly_factor": m})) for m in (1, 2, 3, 4)],
    ("PEFT boft b4 m1", _peft_layer(lambda peft: peft.BOFTConfig(
        boft_block_size=4, boft_n_butterfly_factor=1, target_modules=["q_proj"]))),
]
LAYER_VARIANTS += [(f"{name} (default cfg)", _our_layer(name)) for name in ("unitary", "hybrid") if name in methods.METHODS]


def layer_bench(width: int, batch: int, seq: int, reps: int, retries: int, seed: int) -> dict[str, tuple[float, float]]:
    """(median ms, min ms) of forward + backward of each LAYER_VARIANTS layer on (batch, seq, width)."""
    torch.manual_seed(seed)
    lin = nn.Linear(width, width, bias=False, device=DEVICE)
    layers = []
    for name, build in LAYER_VARIANTS:
        layer = build(copy.deepcopy(lin)).train()
        with torch.no_grad():  # away from the identity init, as after some training (no time effect)
            for p in layer.parameters():
                if p.requires_grad and p.dim() > 1:
                    p.add_(0.01 * torch.randn_like(p))
        layers.append((name, layer))
    x0 = torch.randn(batch, seq, width, device=DEVICE)
    gout = torch.randn(batch, seq, width, device=DEVICE)
    times: dict[str, list[float]] = {name: [] for name, _ in layers}
    for rnd in range(reps + 3):
        for attempt in range(retries + 1):  # a round is ~0.1 s: rerun it whole if disturbed
            round_times = {}
            with Disturbance() as d:
                for name, layer in layers[rnd % len(layers):] + layers[:rnd % len(layers)]:
                    x = x0.clone().requires_grad_()  # a middle layer: its input needs a gradient too
                    sync()
                    t = time.perf_counter()
                    layer(x).backward(gout)
                    sync()
                    round_times[name] = 1e3 * (time.perf_counter() - t)
                    for p in layer.parameters():
                        p.grad = None
            if not d.disturbed or attempt == retries:
                break
            Disturbance.reruns += 1
            time.sleep(0.2)
        if rnd >= 3:
            Disturbance.kept += d.disturbed
            for name, ms in round_times.items():
                times[name].append(ms)
    return {n: (statistics.median(t), min(t)) for n, t in times.items()}


def layer_table(per_width: dict[int, dict[str, tuple[float, float]]]) -> str:
    widths = sorted(per_width)
    cols = ["layer"] + [f"d={w}: ms (overhead, /frozen)" for w in widths]
    if len(widths) >= 2:
        cols.append(f"overhead growth d={widths[0]}->{widths[-1]}")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for name, _ in LAYER_VARIANTS:
        cells, ovs = [], []
        for w in widths:
            ms, f = per_width[w][name][0], per_width[w]["frozen linear"][0]
            ovs.append(ms - f)
            cells.append(f"{ms:.2f}" if name == "frozen linear" else f"{ms:.2f} ({ms - f:+.2f}, {ms / f:.2f}x)")
        if len(widths) >= 2:
            cells.append("–" if name == "frozen linear" or ovs[0] <= 0 else f"{ovs[-1] / ovs[0]:.2f}x")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Peak RSS of one variant in its own process (--rss)
# ---------------------------------------------------------------------------------------------

def child_rss(args, name: str) -> float | None:
    cmd = [sys.executable, os.path.abspath(__file__), "--_rss-child", name, "--layers", str(args.layers),
           "--width", str(args.width), "--batch", str(args.batch), "--seq", str(args.seq),
           "--threads", str(args.threads), "--seed", str(args.seed)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    m = re.search(r"RSS_KIB=(\d+)", p.stdout)
    return int(m.group(1)) / 1024 if m else None


def rss_child_main(args) -> None:
    batch = make_batch(args.batch, args.seq, args.seed)
    (runner,) = build_runners([args._rss_child], args.width, args.layers, batch, args.seed, lambda s: None)
    gc.collect()
    try:  # reset the peak (VmHWM) so that building the model (base + copy) does not set it
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass
    for _ in range(2):
        runner.step()
    try:
        with open("/proc/self/status") as fh:
            kib = int(next(line for line in fh if line.startswith("VmHWM:")).split()[1])
    except (OSError, StopIteration, ValueError):
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"RSS_KIB={kib}")


# ---------------------------------------------------------------------------------------------
# BENCHMARKS.md
# ---------------------------------------------------------------------------------------------

HEADER = """# Benchmarks

Produced by the scripts in `benchmarks/`; each section is replaced when its script is re-run with
`--write` at the same settings. Numbers are from one machine and one run: compare the ratios within
a section, not absolute times across sections.
"""


def write_section(path: str, key: str, body: str) -> None:
    begin, end = f"<!-- {key} begin -->", f"<!-- {key} end -->"
    text = open(path).read() if os.path.exists(path) else HEADER
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    with open(path, "w") as fh:
        fh.write(text if text.endswith("\n") else text + "\n")


# ---------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Variants: " + "; ".join(v.name for v in VARIANTS))
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default cpu; CUDA steps end with a synchronize)")
    p.add_argument("--layers", type=int, default=4, help="decoder layers (SmolLM2-135M has 30; default 4)")
    p.add_argument("--width", type=int, default=576, help="hidden size; heads, kv heads and MLP scale with it (default 576)")
    p.add_argument("--widths", default="", help="comma list, e.g. 576,1152: also measure the width-sweep variants at each")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant (median over them; default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds after the memory-probe step (default 2)")
    p.add_argument("--layer-reps", type=int, default=100,
                   help="repetitions of the module-level benchmark (one projection, fwd+bwd; 0 = skip; default 100)")
    p.add_argument("--retries", type=int, default=3,
                   help="rerun a timed step (module level: a round) during which other processes used the CPU, "
                        "at most this many times (default 3; 0 = keep every step)")
    p.add_argument("--wait-quiet", type=float, default=0, metavar="SECONDS",
                   help="before starting (and before each timed round), wait up to this long for a few seconds "
                        "without other processes on the CPU (default 0: don't wait)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", default="", help="comma list of variant names to run (the two floors are always run)")
    p.add_argument("--rss", action="store_true", help="also measure each variant's peak RSS in a child process")
    p.add_argument("--profile", default="", metavar="VARIANT", help="print a torch.profiler table of one step and exit")
    p.add_argument("--write", action="store_true", help="replace this run's section in BENCHMARKS.md")
    p.add_argument("--output", default=os.path.join(ROOT, "BENCHMARKS.md"), help=argparse.SUPPRESS)
    p.add_argument("--_rss-child", dest="_rss_child", default="", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def profile(args) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    batch = make_batch(args.batch, args.seq, args.seed)
    (runner,) = build_runners([args.profile], args.width, args.layers, batch, args.seed, print)
    for _ in range(3):
        runner.step()
    with prof(activities=[ProfilerActivity.CPU], record_shapes=True) as pr:
        runner.step()
    print(pr.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))


def main(argv=None) -> None:
    global DEVICE
    args = parse_args(argv)
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU visible")
    torch.set_num_threads(args.threads)
    if args._rss_child:
        return rss_child_main(args)
    if args.profile:
        return profile(args)
    known = [v.name for v in VARIANTS]
    names = known if not args.variants else ["floor", "floor 0 layers"] + [n.strip() for n in args.variants.split(",") if n.strip()]
    bad = [n for n in names if n not in known]
    if bad:
        raise SystemExit(f"--variants: unknown {bad}; known: {known}")
    widths = sorted({int(w) for w in args.widths.split(",") if w.strip()} | ({args.width} if args.widths else set()))
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    batch = make_batch(args.batch, args.seq, args.seed)
    if args.wait_quiet:
        wait_until_quiet(args.wait_quiet, log)
    t0, load0 = time.perf_counter(), os.getloadavg()[0]

    log(f"width {args.width}: {len(names)} variants")
    runners = build_runners(names, args.width, args.layers, batch, args.seed, log)
    measure(runners, args.warmup, args.steps, args.retries, args.wait_quiet, log)
    res = summarize(runners)
    del runners
    gc.collect()
    if args.rss:
        for n, r in res.items():
            r.rss_mb = child_rss(args, n)
            log(f"  rss {n}: {r.rss_mb}")
    per_width = {args.width: res} if widths else {}
    for w in widths:
        if w == args.width:
            continue
        sweep = [n for n in names if next(v for v in VARIANTS if v.name == n).in_width_sweep]
        log(f"width {w}: {len(sweep)} variants")
        rs = build_runners(sweep, w, args.layers, batch, args.seed, log)
        measure(rs, args.warmup, args.steps, args.retries, args.wait_quiet, log)
        per_width[w] = summarize(rs)
        del rs
        gc.collect()

    layer_res = {}
    if args.layer_reps:
        for w in widths or [args.width]:
            log(f"module level, width {w}")
            layer_res[w] = layer_bench(w, args.batch, args.seq, args.layer_reps, args.retries, args.seed)
    cmd = "python benchmarks/step_time.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = report(args, cmd, res, per_width, layer_res, widths, time.perf_counter() - t0, load0)
    print(text)
    if args.write:
        key = f"step_time layers={args.layers} width={args.width} batch={args.batch}x{args.seq}" + (
            f" widths={','.join(map(str, widths))}" if widths else "")
        write_section(args.output, key, text)
        log(f"wrote {os.path.relpath(args.output)}")


def report(args, cmd: str, res: dict[str, Result], per_width: dict, layer_res: dict, widths: list[int],
           elapsed: float, load0: float) -> str:
    """The markdown section: settings, then the tables, then the target verdicts."""
    cfg = llama_config(args.width, args.layers)
    head = [
        f"### Step time: {args.layers} layers, width {args.width}, batch {args.batch}x{args.seq}"
        + (f", widths {','.join(map(str, widths))}" if widths else ""),
        "",
        f"- command: `{cmd.strip()}`",
        f"- date: {datetime.date.today().isoformat()}; {elapsed:.0f} s wall; "
        f"1-min load average {load0:.1f} at start, {os.getloadavg()[0]:.1f} at end (2 = both cores busy)",
        f"- torch {torch.__version__}, transformers {__import__('transformers').__version__}, "
        f"peft {__import__('peft').__version__}, Python {platform.python_version()}, "
        f"{hardware()}",
        f"- model: random LlamaForCausalLM, SmolLM2-135M's shape scaled: hidden {cfg.hidden_size}, "
        f"intermediate {cfg.intermediate_size}, {cfg.num_attention_heads} heads / {cfg.num_key_value_heads} kv heads, "
        f"vocab {cfg.vocab_size}, tied embeddings, {cfg.num_hidden_layers} layers (SmolLM2 has 30), sdpa attention",
        f"- step: forward + backward + AdamW; median of {args.steps} steps after {args.warmup} warm-up rounds, "
        "variants interleaved round-robin; ratios are within this run and use medians; "
        "min ms is the least-disturbed step (noise on a shared machine only ever adds time)",
        f"- steps during which other processes used over 10% of a core were rerun (at most {args.retries} times "
        f"each): {Disturbance.reruns} reruns; {Disturbance.kept} timed steps/rounds still disturbed after the retries",
        f"- x floor @30 layers: SmolLM2 has 30 layers; with {args.layers} the tied 49152-word LM head is much of the floor. "
        "Extrapolated as (F0 + 30 l + 30 o) / (F0 + 30 l), F0 = the 0-layer floor, l = per-layer floor, "
        "o = per-layer overhead, all from this run's medians. It multiplies the overhead's noise by 30/layers: "
        "for small overheads trust the module-level table below instead",
        "- floor: frozen base, backward to the embedding output (every variant gets the same hook, so all do the "
        "floor's backward); overhead = step - floor; "
        "PEFT's BOFT runs depth 1 on CPU (it forces n_butterfly_factor=1 without its CUDA kernel), "
        "so BOFT is compared with PEFT at m=1",
        "- memory: saved act. = distinct non-weight storages saved for backward in one forward; "
        "grads+AdamW = gradients of trainable params + optimizer state (counted, deterministic)",
        "",
        main_table(res, args.layers, args.rss),
    ]
    if any(r.depth for r in res.values()):
        head += ["", "BOFT depth scaling, whole model (our input-side BOFT, b=4, q,v; linear in m means a constant "
                 "increment):", "", depth_table(res)]
    if len(per_width) >= 2:
        head += ["", "Width scaling, whole model (overhead as a fraction of the floor at each width):", "",
                 width_table(per_width)]
    if layer_res:
        head += ["", f"One ({'/'.join(map(str, sorted(layer_res)))})-square projection, forward + backward "
                 f"(input needs grad, as in a middle layer; no optimizer), batch {args.batch}x{args.seq}, "
                 f"median of {args.layer_reps} interleaved repetitions; overhead = ms - frozen linear. "
                 "Our BOFT's work is O(tokens d b m) against the frozen matmul's O(tokens d^2): its overhead "
                 "should grow ~linearly in m and ~2x per doubling of d (the frozen matmul: 4x); "
                 "PEFT's dense d x d rotation grows ~4-8x.", "", layer_table(layer_res)]
    head += ["", "Targets (REFERENCE.md section 1):", ""] + targets(res, per_width, args.layers)
    noisy = [f"{r.name} {100 * r.spread:.0f}%" for r in res.values() if r.spread > NOISY]
    if noisy or Disturbance.kept:
        head[1:1] = ["", f"**Warning: disturbed run.** {Disturbance.kept} timed steps shared the CPU with other "
                     f"processes; IQR/median above {100 * NOISY:.0f}% for {', '.join(noisy) or 'none'}. "
                     "Medians and verdicts below are unreliable: rerun on a quiet machine (`--wait-quiet 600`)."]
    return "\n".join(head) + "\n"


if __name__ == "__main__":
    main()
