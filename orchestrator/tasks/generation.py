"""Generative tasks: the model writes an answer, and the answer is scored (GSM8K, HumanEval, FLORES,
MT-Bench).

Training is the causal-LM objective of `causal_lm.py` on {"prompt", "response"} examples. Evaluation
does two things over the same eval batches:

1. `eval_loss`: the answer-token cross-entropy of the reference answer (teacher forcing), where the
   task has one. Cheap, and it moves long before a generated answer becomes right.
2. The task's metric on what the model writes: greedy decoding (deterministic, so every rank and
   every rerun agrees), batched, from prompts left-padded so that all rows end at the same
   position and generation appends to every row at once. Generation stops at the eos token or
   at one of the task's stop strings (HumanEval stops at the next top-level `def`); the budget is
   `data.max_new_tokens` (else the task's default). Under ZeRO-3 the parameters are sharded and
   every forward is a collective, so `synced_gpus` keeps all ranks stepping until the last finishes.

With several data-parallel ranks the eval batches are split across them (`distributed.py`): N
ranks generate N times faster. Scoring that is not a pure function of the text (running code in a
sandbox, asking a judge) runs on rank 0 only and is broadcast, so ranks can never disagree on
whether the target was reached (they must stop together) and the judge is paid once, not once
per rank.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Iterable
from typing import Any

import torch

from .base import DataSpec, TaskOptions, check_count, eval_mode
from .causal_lm import CausalLMTask, answer_loss_sum, end_id, pad_id
from methods import collectives

from .distributed import on_rank_zero, sharded_map


@dataclasses.dataclass(frozen=True)
class GenerationOptions(TaskOptions):
    """max_new_tokens: the generation budget per answer (null = the task's default). Evaluation
    time counts in time-to-quality, so this is a real trade-off."""

    max_new_tokens: int | None = dataclasses.field(
        default=None, metadata={"help": "tokens generated per answer; null = the task's default"})

    def __post_init__(self):
        super().__post_init__()
        check_count(self, "max_new_tokens")


class GenerativeTask(CausalLMTask):
    """A causal-LM task scored on generated text. Subclasses implement `load` and `score`."""

    default_max_new_tokens: int = 256
    stop_strings: tuple[str, ...] = ()  # besides eos; the completion is cut at the first one
    has_references: bool = True  # False: no reference answer to compute eval_loss on (MT-Bench)
    options_cls = GenerationOptions

    def samples_per_prompt(self, spec: DataSpec) -> int:
        """Answers generated per eval prompt (HumanEval's pass@k samples several)."""
        return 1

    def sampling(self, spec: DataSpec) -> dict[str, float] | None:
        """Sampling settings (temperature, top_p) when the task samples several answers; None = greedy."""
        return None

    @abc.abstractmethod
    def score(self, examples: list[dict], completions: list[str]) -> dict[str, float]:
        """Task metrics from the eval examples and the model's completions (same order)."""

    # -- batches ------------------------------------------------------------------------------

    def prompt_ids(self, tokenizer, example: dict, budget: int | None) -> list[int]:
        """The prompt's tokens as in training (bos + prompt), whole unless longer than `budget`,
        then its last `budget` tokens (the end holds the answer cue)."""
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        ids = bos + tokenizer(example["prompt"], add_special_tokens=False)["input_ids"]
        return ids[-budget:] if budget else ids

    def collate_eval(self, tokenizer, examples: list[dict], spec: DataSpec) -> dict[str, Any]:
        batch = self.collate(tokenizer, examples, max_length=spec.max_length) if self.has_references else {}
        max_new_tokens = self.new_tokens(spec)
        # Generation prompts are not cut to data.max_length (a training setting): a HumanEval
        # problem without its `def` line or an MT-Bench turn 2 without turn 1 is a different
        # question. Only the model's context, when the tokenizer knows it, bounds them.
        context = tokenizer.model_max_length if tokenizer.model_max_length < 10**6 else None
        budget = max(context - max_new_tokens, 1) if context else None
        prompts = [self.prompt_ids(tokenizer, ex, budget) for ex in examples]
        width = max(len(p) for p in prompts)
        prompt_ids = torch.full((len(prompts), width), pad_id(tokenizer), dtype=torch.long)
        prompt_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, ids in enumerate(prompts):  # left padding: every row's last prompt token is at width - 1
            prompt_ids[i, width - len(ids):] = torch.tensor(ids)
            prompt_mask[i, width - len(ids):] = 1
        batch.update(prompt_ids=prompt_ids, prompt_mask=prompt_mask, examples=list(examples),
                     max_new_tokens=max_new_tokens,
                     num_samples=self.samples_per_prompt(spec), sampling=self.sampling(spec), seed=spec.seed)
        return batch

    # -- evaluation ---------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, batches: Iterable[dict[str, Any]], tokenizer=None) -> dict[str, float]:
        if tokenizer is None:
            raise ValueError(f"{self.name}: evaluate needs the tokenizer to decode what the model writes")
        batches = list(batches)
        if not batches:
            raise ValueError(f"{self.name}: evaluate got no batches")

        def one(batch: dict[str, Any]) -> tuple[tuple[float, int], list[str]]:
            loss = answer_loss_sum(model, batch, device) if self.has_references else (0.0, 0)
            return loss, generate(model, tokenizer, batch, device, self.stop_strings)

        with eval_mode(model) as device:
            results = sharded_map(batches, one)
        scores: dict[str, float] = {}
        if self.has_references:
            tokens = sum(n for (_, n), _ in results)
            if tokens == 0:
                raise ValueError(f"{self.name}: evaluate got no answer tokens")
            scores["eval_loss"] = sum(s for (s, _), _ in results) / tokens
        completions = [text for _, texts in results for text in texts]
        examples = [ex for batch in batches for ex in batch["examples"] for _ in range(batch["num_samples"])]
        scores.update(on_rank_zero(lambda: self.score(examples, completions)))
        return scores


def generate(model: torch.nn.Module, tokenizer, batch: dict[str, Any], device: torch.device,
             stop_strings: tuple[str, ...] = ()) -> list[str]:
    """Completions of the batch's left-padded prompts (greedy, or `num_samples` sampled per prompt,
    consecutive), decoded and cut at a stop string."""
    module = getattr(model, "module", model)  # a DeepSpeed engine wraps the HF model
    eos = end_id(tokenizer)
    pad = pad_id(tokenizer) if pad_id(tokenizer) is not None else eos
    prompt_ids = batch["prompt_ids"].to(device)
    # Explicit decoding settings: the model's own generation_config (a repetition penalty, top-k)
    # must not change what "greedy" or "temperature 0.8, top-p 0.95" means from one model to another.
    kwargs: dict[str, Any] = {"do_sample": False, "num_beams": 1, "repetition_penalty": 1.0,
                              "no_repeat_ngram_size": 0, "temperature": None, "top_p": None, "top_k": None}
    if batch.get("sampling"):
        kwargs.update(do_sample=True, num_return_sequences=batch["num_samples"], top_k=0, **batch["sampling"])
    if stop_strings:
        kwargs.update(stop_strings=list(stop_strings), tokenizer=tokenizer)
    # Seeded without touching the training RNG: the same samples at every evaluation and on every rank.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(batch.get("seed", 0))
        out = module.generate(input_ids=prompt_ids, attention_mask=batch["prompt_mask"].to(device),
                              max_new_tokens=batch["max_new_tokens"], eos_token_id=eos, pad_token_id=pad,
                              synced_gpus=zero3_sharded(model), **kwargs)
    texts = decode_completions(tokenizer, batch["prompt_ids"], batch["prompt_mask"], out[:, prompt_ids.shape[1]:].cpu())
    return [cut_at_stop(text, stop_strings) for text in texts]


def decode_completions(tokenizer, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                       new_ids: torch.Tensor) -> list[str]:
    """The text each row of `new_ids` added after its prompt (rows of one prompt consecutive, as
    `num_return_sequences` gives them). Decoded together with the prompt, then the decoded prompt
    cut off: SentencePiece tokenizers (Llama, Mistral) drop the leading space of a sequence they
    decode on its own, which would take one space of indentation off every HumanEval body."""
    repeat = new_ids.shape[0] // prompt_ids.shape[0]
    prompts = [ids[mask.bool()].tolist() for ids, mask in zip(prompt_ids, prompt_mask)]
    heads = [tokenizer.decode(p, skip_special_tokens=True) for p in prompts]  # once per prompt, not per sample
    out = []
    for row, new in enumerate(new_ids):
        prompt, head = prompts[row // repeat], heads[row // repeat]
        whole = tokenizer.decode(prompt + new.tolist(), skip_special_tokens=True)
        out.append(whole[len(head):] if whole.startswith(head) else tokenizer.decode(new, skip_special_tokens=True))
    return out


def cut_at_stop(text: str, stop_strings: tuple[str, ...]) -> str:
    cut = min((i for i in (text.find(s) for s in stop_strings) if i >= 0), default=len(text))
    return text[:cut]


def zero3_sharded(model: torch.nn.Module) -> bool:
    """True under ZeRO-3 with several ranks: each generation step is then a collective."""
    stage = getattr(model, "zero_optimization_stage", None)
    return bool(stage and stage() == 3 and collectives.world_size() > 1)
