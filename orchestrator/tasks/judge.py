"""The judge of MT-Bench: a strong model rates each answer from 1 to 10 (Zheng et al. 2023).

Two kinds of judge, chosen in the sweep file under `data.judge`:

    judge: {base_url: https://api.openai.com/v1, model: gpt-4o, api_key_env: OPENAI_API_KEY}
    judge: {base_url: http://127.0.0.1:8000/v1, model: Qwen/Qwen2.5-72B-Instruct}   # vLLM, TGI, llama.cpp
    judge: {local_model: /models/judge}                                              # transformers, on rank 0

An endpoint is anything that speaks OpenAI's `POST {base_url}/chat/completions` (OpenAI itself,
vLLM, TGI, llama.cpp's server, Ollama); plain `urllib` talks to it, so no client library is needed.
The key is read from the environment variable `api_key_env` names, never from the file. Nothing
about the judge is left to be found mid-sweep: `check()` (run by `orchestrate validate` and before
a sweep starts) verifies that the key is set and the endpoint answers `GET {base_url}/models`.

Grading follows MT-Bench's single-answer mode: the judge sees the question (and, for math,
reasoning and coding, the reference answer), explains, and ends with "Rating: [[N]]". A reply with
no rating counts as the lowest score (1) and is counted in `judge_unparsed`, not silently dropped.
Calls are retried with exponential backoff on rate limits (429) and server errors (5xx), and run
`concurrency` at a time. Only rank 0 calls the judge; on a cluster, the variable `api_key_env`
names is passed from the driver to the workers through Ray's runtime environment.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from methods.config import from_dict

RATING = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]")
MIN_RATING, MAX_RATING = 1.0, 10.0

SYSTEM_PROMPT = "You are a helpful assistant who judges the quality of answers impartially."
JUDGE_PROMPT = """Please act as an impartial judge and evaluate the response of an AI assistant to \
the user question below. Consider helpfulness, relevance, accuracy, depth, creativity and level of \
detail.{reference_note} Begin with a short explanation, be as objective as possible, then rate the \
response from 1 to 10 in exactly this format: "Rating: [[5]]".

{conversation}[The Start of Assistant's Answer]
{answer}
[The End of Assistant's Answer]"""


@dataclasses.dataclass(frozen=True)
class JudgeConfig:
    """`data.judge`: an OpenAI-compatible endpoint (base_url + model) or a local model folder."""

    base_url: str | None = dataclasses.field(
        default=None, metadata={"help": "OpenAI-compatible API root, e.g. http://127.0.0.1:8000/v1"})
    model: str | None = dataclasses.field(default=None, metadata={"help": "the judge's model name at that endpoint"})
    api_key_env: str | None = dataclasses.field(
        default=None, metadata={"help": "environment variable holding the API key (never the key itself)"})
    local_model: str | None = dataclasses.field(
        default=None, metadata={"help": "a local causal-LM folder to judge with instead of an endpoint"})
    max_tokens: int = dataclasses.field(
        default=2048, metadata={"help": "judge reply budget (a reply cut before its rating scores 1)"})
    concurrency: int = dataclasses.field(default=8, metadata={"help": "requests in flight to an endpoint"})
    timeout_s: float = dataclasses.field(default=60.0, metadata={"help": "per request"})
    retries: int = dataclasses.field(default=3, metadata={"help": "on 429/5xx/network errors, with backoff"})

    def __post_init__(self):
        def fail(field: str, expected: str):
            raise ValueError(f"data.judge.{field}={getattr(self, field)!r}: {expected}")

        for field in ("base_url", "model", "api_key_env", "local_model"):
            value = getattr(self, field)
            if value is not None and (not isinstance(value, str) or not value):
                fail(field, "must be a non-empty string or null")
        if self.local_model is not None:
            if self.base_url is not None or self.model is not None:
                fail("local_model", "give either local_model or base_url + model, not both")
        elif self.base_url is None or self.model is None:
            raise ValueError("data.judge: needs base_url and model (an OpenAI-compatible endpoint), "
                             "or local_model (a folder)")
        elif not self.base_url.startswith(("http://", "https://")):
            fail("base_url", "must start with http:// or https://")
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 16:
            fail("max_tokens", "must be an integer >= 16")
        if isinstance(self.timeout_s, bool) or not isinstance(self.timeout_s, (int, float)) or self.timeout_s <= 0:
            fail("timeout_s", "must be a number > 0")
        if isinstance(self.retries, bool) or not isinstance(self.retries, int) or self.retries < 0:
            fail("retries", "must be an integer >= 0")
        if isinstance(self.concurrency, bool) or not isinstance(self.concurrency, int) or self.concurrency < 1:
            fail("concurrency", "must be an integer >= 1")

    @classmethod
    def from_dict(cls, data: dict[str, Any], path: str = "data.judge") -> JudgeConfig:
        return from_dict(cls, data, path)

    def describe(self) -> str:
        return f"local model {self.local_model}" if self.local_model else f"{self.model} at {self.base_url}"


def judge_prompt(turns: list[str], answers: list[str], reference: str | None = None) -> str:
    """The prompt rating the last answer of a conversation (earlier turns given as context)."""
    conversation = ""
    for i, question in enumerate(turns):
        conversation += f"[Question]\n{question}\n\n"
        if i < len(turns) - 1:
            conversation += f"[Assistant's earlier answer]\n{answers[i]}\n\n"
    note = ""
    if reference:
        note = " Compare the response with the reference answer; identify and correct any mistakes."
        conversation += f"[The Start of Reference Answer]\n{reference}\n[The End of Reference Answer]\n\n"
    return JUDGE_PROMPT.format(reference_note=note, conversation=conversation, answer=answers[-1])


def parse_rating(reply: str) -> float | None:
    """The last "[[N]]" in the reply, clipped to [1, 10]; None when there is none."""
    found = RATING.findall(reply or "")
    if not found:
        return None
    return min(max(float(found[-1]), MIN_RATING), MAX_RATING)


class EndpointJudge:
    """Rates with `POST {base_url}/chat/completions` (temperature 0)."""

    def __init__(self, config: JudgeConfig):
        self.config = config
        self.url = config.base_url.rstrip("/")

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.config.api_key_env:
            key = os.environ.get(self.config.api_key_env)
            if not key:
                raise RuntimeError(f"data.judge.api_key_env={self.config.api_key_env!r}: the variable is not set")
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def check(self) -> None:
        """Key present and endpoint answering GET /models; ValueError naming data.judge otherwise."""
        try:
            request = urllib.request.Request(f"{self.url}/models", headers=self._headers())
            with urllib.request.urlopen(request, timeout=min(self.config.timeout_s, 10)) as response:
                json.load(response)
        except RuntimeError as e:
            raise ValueError(str(e)) from None
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise ValueError(f"data.judge.base_url={self.config.base_url!r}: the judge endpoint does not answer "
                             f"GET /models ({e}); start it or fix the address before the sweep") from None

    def complete(self, prompt: str) -> str:
        body = json.dumps({"model": self.config.model, "temperature": 0, "max_tokens": self.config.max_tokens,
                           "messages": [{"role": "system", "content": SYSTEM_PROMPT},
                                        {"role": "user", "content": prompt}]}).encode()
        delay = 1.0
        for attempt in range(self.config.retries + 1):
            request = urllib.request.Request(f"{self.url}/chat/completions", data=body, headers=self._headers())
            try:
                with urllib.request.urlopen(request, timeout=self.config.timeout_s) as response:
                    return json.load(response)["choices"][0]["message"]["content"] or ""
            except urllib.error.HTTPError as e:
                if e.code != 429 and e.code < 500 or attempt == self.config.retries:
                    raise RuntimeError(f"judge {self.config.describe()}: HTTP {e.code}: {e.read()[:300]!r}") from None
            except (urllib.error.URLError, OSError) as e:
                if attempt == self.config.retries:
                    raise RuntimeError(f"judge {self.config.describe()}: {e}") from None
            time.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")


class LocalJudge:
    """Rates with a local causal LM (its chat template when it has one), greedy, on a GPU if any."""

    def __init__(self, config: JudgeConfig):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.config = config
        self.tokenizer = AutoTokenizer.from_pretrained(config.local_model)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = AutoModelForCausalLM.from_pretrained(config.local_model, dtype="auto").to(device).eval()

    def inputs(self, prompt: str) -> dict:
        tok = self.tokenizer
        if not tok.chat_template:
            return tok(prompt, return_tensors="pt")
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}]
        try:
            return tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        except Exception:  # noqa: BLE001 - jinja's TemplateError: Gemma and Mistral refuse a system turn
            merged = [{"role": "user", "content": f"{SYSTEM_PROMPT}\n\n{prompt}"}]
            return tok.apply_chat_template(merged, add_generation_prompt=True, return_tensors="pt", return_dict=True)

    def complete(self, prompt: str) -> str:
        import torch

        tok = self.tokenizer
        ids = {k: v.to(self.model.device) for k, v in self.inputs(prompt).items()}
        with torch.no_grad():
            out = self.model.generate(**ids, max_new_tokens=self.config.max_tokens, do_sample=False,
                                      pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


@functools.lru_cache(maxsize=2)
def make_judge(config: JudgeConfig) -> EndpointJudge | LocalJudge:
    """One judge per worker process, kept between evaluations (a local judge loads once)."""
    return LocalJudge(config) if config.local_model else EndpointJudge(config)


def rate_all(config: JudgeConfig, prompts: list[str]) -> list[float | None]:
    """The judge's rating of every prompt (None: no rating in the reply), in order. An endpoint
    gets `concurrency` requests at a time: 160 MT-Bench answers one by one at ~10 s each would
    keep the other ranks waiting for half an hour."""
    judge = make_judge(config)
    if isinstance(judge, LocalJudge) or config.concurrency == 1:
        return [parse_rating(judge.complete(p)) for p in prompts]
    with ThreadPoolExecutor(max_workers=config.concurrency) as pool:
        return [parse_rating(reply) for reply in pool.map(judge.complete, prompts)]


def check_judge(config: JudgeConfig) -> None:
    """Before anything starts: a local model folder exists; an endpoint's key is set and it answers."""
    if config.local_model:
        if not os.path.isdir(config.local_model):
            raise ValueError(f"data.judge.local_model={config.local_model!r}: folder not found")
        return
    EndpointJudge(config).check()
