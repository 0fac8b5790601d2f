"""Instruction tuning: a causal LM learns to write the response to an instruction.

Data: local .jsonl/.csv/.parquet with an instruction column (default `instruction`, override with
`data.text_field`) and a response column (default `response`; Alpaca-style files call it `output`:
set `data.label_field: output`). An optional `input` column (Alpaca's context) joins the prompt.

Prompt format (Alpaca's, Taori et al. 2023), so that base models get an explicit cue:

    ### Instruction:\\n{instruction}\\n\\n[### Input:\\n{input}\\n\\n]### Response:\\n

Sequence = [bos] + prompt tokens + response tokens + [eos]; prompt and response are tokenized
separately so the boundary between them is exact. Labels copy input_ids on the response (and eos)
and are -100 on the prompt and the padding, so the loss covers answer tokens only; the model shifts
labels itself (Hugging Face convention). When the sequence is longer than max_length the prompt
loses tokens from its start (its end holds the "### Response:" cue) and the response from its end,
and the response always keeps at least min(its length, max_length // 2) tokens: an example with
no answer token would add nothing to the loss, and a batch of them would make it NaN.

Metric: eval_loss, the mean cross-entropy per answer token over the whole eval set (not a mean of
batch means), and perplexity = exp(eval_loss); both minimised. Default target 1.5 nats/token: a
reference point only (MLPerf's Llama-2-70B LoRA benchmark targets 0.925 on GovReport); what a
model can reach depends on the model and the data, so a sweep file should set its own.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F

from . import files, splits
from .base import DataSpec, Task, eval_mode
from .distributed import sharded_map

IGNORE_INDEX = -100  # torch cross_entropy's default ignore_index, and Hugging Face's
CONTEXT_COLUMN = "input"


def end_id(tokenizer) -> int | None:
    """The token that ends an answer: eos, else [SEP] (BERT-style tokenizers have no eos)."""
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id


def pad_id(tokenizer) -> int | None:
    """What batches are padded with: the pad token, else eos (GPT-2 and Llama have no pad)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def read_instructions(path: str, where: str, instruction_column: str, response_column: str) -> list[dict]:
    """{"prompt", "response"} examples from a local instruction file (optional `input` column)."""
    table = files.read_table(path, [instruction_column, response_column, CONTEXT_COLUMN], where)
    if not table[instruction_column]:
        raise ValueError(f"{where}: no rows")
    rows = []
    for i, (instruction, response, context) in enumerate(
            zip(table[instruction_column], table[response_column], table[CONTEXT_COLUMN])):
        for column, value in ((instruction_column, instruction), (response_column, response)):
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{where}: row {i}: column {column!r} must be non-empty text, got {value!r}")
        rows.append({"prompt": format_prompt(instruction, context), "response": response})
    return rows


def format_prompt(instruction: str, context: str | None = None) -> str:
    """Alpaca's prompt: the instruction, the optional input, then the response cue."""
    ctx = f"### Input:\n{context}\n\n" if context else ""
    return f"### Instruction:\n{instruction}\n\n{ctx}### Response:\n"


class CausalLMTask(Task):
    """Causal-LM fine-tuning on {"prompt", "response"} examples; loss on the response only.
    Subclasses choose where the examples come from (`load`); generative tasks add scoring."""

    kind = "causal_lm"

    def encode(self, tokenizer, example: dict, max_length: int) -> tuple[list[int], list[int]]:
        """(input_ids, labels) for one example, at most max_length long (see the module docstring)."""
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        eos_id = end_id(tokenizer)
        prompt = bos + tokenizer(example["prompt"], add_special_tokens=False)["input_ids"]
        answer = tokenizer(example["response"], add_special_tokens=False)["input_ids"]
        answer = answer + ([eos_id] if eos_id is not None else [])
        keep_answer = min(len(answer), max(max_length - len(prompt), max_length // 2))
        keep_prompt = max_length - keep_answer
        prompt = prompt[len(prompt) - keep_prompt:] if keep_prompt < len(prompt) else prompt
        answer = answer[:keep_answer]
        return prompt + answer, [IGNORE_INDEX] * len(prompt) + answer

    def collate(self, tokenizer, examples: list[dict], max_length: int = 128) -> dict[str, torch.Tensor]:
        """Right-padded batch; pad = the tokenizer's pad token, else eos (GPT-2 and Llama have none)."""
        pad = pad_id(tokenizer)
        if pad is None:
            raise ValueError(f"{self.name}: the tokenizer has neither a pad nor an eos token to pad with")
        encoded = [self.encode(tokenizer, ex, max_length) for ex in examples]
        width = max(len(ids) for ids, _ in encoded)
        input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
        labels = torch.full((len(encoded), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for i, (ids, labs) in enumerate(encoded):
            input_ids[i, :len(ids)] = torch.tensor(ids)
            labels[i, :len(labs)] = torch.tensor(labs)
            attention_mask[i, :len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, batches: Iterable[dict[str, Any]], tokenizer=None) -> dict[str, float]:
        with eval_mode(model) as device:
            loss = answer_loss(model, batches, device, self.name)
        return {"eval_loss": loss, "perplexity": math.exp(min(loss, 700.0))}


def answer_loss(model: torch.nn.Module, batches: Iterable[dict[str, Any]], device: torch.device, name: str) -> float:
    """Mean cross-entropy per answer token over all batches (not a mean of batch means), the
    batches split across data-parallel ranks."""
    sums = sharded_map(list(batches), lambda batch: answer_loss_sum(model, batch, device))
    loss_sum, tokens = sum(s for s, _ in sums), sum(n for _, n in sums)
    if tokens == 0:
        raise ValueError(f"{name}: evaluate got no answer tokens (no batches, or all labels -100)")
    return loss_sum / tokens


def answer_loss_sum(model: torch.nn.Module, batch: dict[str, Any], device: torch.device) -> tuple[float, int]:
    """(summed cross-entropy, number of answer tokens) of one batch."""
    labels = batch["labels"].to(device)
    logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
    # position t predicts token t+1: (B, T-1, V) against (B, T-1)
    shift_logits, shift_labels = logits[:, :-1].float(), labels[:, 1:]
    loss = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")
    return loss.item(), int((shift_labels != IGNORE_INDEX).sum())


class InstructionTask(CausalLMTask):
    """Instruction tuning from local (instruction, response) files."""

    needs_files = True

    def __init__(self, name: str = "instructions", default_target: float = 1.5):
        self.name = name
        self.metrics = ("eval_loss", "perplexity")
        self.default_metric = "eval_loss"
        self.default_target = default_target

    def columns(self, spec: DataSpec) -> list[tuple[str, str]]:
        return [(spec.text_field or "instruction", "text_field"), (spec.label_field or "response", "label_field")]

    def load(self, spec: DataSpec) -> tuple[list[dict], list[dict]]:
        self.validate(spec)
        (inst, _), (resp, _) = self.columns(spec)
        examples = {split: read_instructions(path, where, inst, resp)
                    for split, (path, where) in self.sources(spec).items()}
        train = examples["train"]
        if "validation" in examples:
            evals = examples["validation"]
        else:  # hold out by prompt: the same instruction never appears on both sides
            train, evals = splits.holdout(train, spec.eval_fraction, spec.seed, key=lambda ex: ex["prompt"])
        return (splits.subsample(train, spec.max_train_samples, spec.seed, "train"),
                splits.subsample(evals, spec.max_eval_samples, spec.seed, "eval"))
