"""Every method on a real pretrained model (all-MiniLM-L6-v2, installed from PyPI) and real labelled
data (BBC News topics): identity at init, then a short training run lowers the eval loss."""

from __future__ import annotations

import copy

import pytest
import torch

import methods
from orchestrator.tasks import DataSpec, default_model_path, get_task

pytestmark = pytest.mark.slow

LR = {"full": 5e-4, "lora_ga": 2e-3}  # LoRA-GA wants a smaller LR than LoRA, full FT smaller still


@pytest.fixture(scope="module")
def setup():
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=5).eval()
    task = get_task("bbc_news")
    train, evals = task.load(DataSpec(name="bbc_news", max_train_samples=160, max_eval_samples=48, max_length=64))
    train_batches = [task.collate(tokenizer, train[i : i + 8], max_length=64) for i in range(0, 160, 8)]
    eval_batches = [task.collate(tokenizer, evals[i : i + 16], max_length=64) for i in range(0, 48, 16)]
    return base, task, train_batches, eval_batches


@pytest.mark.parametrize("name", sorted(methods.METHODS))
def test_real_model_identity_then_training_lowers_eval_loss(setup, name):
    base, task, train_batches, eval_batches = setup
    model = copy.deepcopy(base)
    methods.apply_method(model, methods.config_for(name), batches=iter(train_batches),
                         modules_to_save=["classifier"])
    x = {k: v for k, v in eval_batches[0].items() if k != "labels"}
    with torch.no_grad():
        torch.testing.assert_close(model(**x).logits, base(**x).logits, atol=1e-5, rtol=1e-5)
    before = task.evaluate(model, eval_batches)["eval_loss"]
    opt = torch.optim.AdamW(methods.trainable_parameters(model), lr=LR.get(name, 5e-3))
    model.train()
    for step, batch in enumerate(train_batches, start=1):
        model(**batch).loss.backward()
        methods.after_backward(model, step)
        opt.step()
        opt.zero_grad()
    after = task.evaluate(model, eval_batches)["eval_loss"]
    assert after < before - 0.02, (name, before, after)
