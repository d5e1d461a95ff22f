"""The trained-token loss: equal to the model's own loss, and invariant to gradient accumulation."""

from __future__ import annotations

import pytest
import torch

from tuneloop.data import ChatRenderer, Conversation, Message, RowRef
from tuneloop.train.batching import collate, trained_tokens
from tuneloop.train.loss import TrainedTokenLoss

pytestmark = pytest.mark.unit


def examples(tokenizer, n: int = 4):
    renderer = ChatRenderer(tokenizer)
    texts = ["refund please", "the export page crashes on open", "invite team", "charged twice this month ok"]
    answers = ["billing", "bug", "onboarding and then billing twice", "billing twice, then a long explanation"]
    return [
        renderer.encode(Conversation((Message("user", t), Message("assistant", a)), RowRef("x", i)))
        for i, (t, a) in enumerate(zip(texts[:n], answers[:n]))
    ]


def load_model(folder):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


def test_gathered_loss_equals_the_models_own_loss(tiny_model_dir, tiny_tokenizer):
    model = load_model(tiny_model_dir)
    batch = collate(examples(tiny_tokenizer), tiny_tokenizer.pad_token_id)
    loss_sum, count = TrainedTokenLoss(model)(**batch)
    reference = model(**batch).loss  # HF: mean over non-ignored shifted labels
    assert int(count) == trained_tokens(batch)
    torch.testing.assert_close(loss_sum / count, reference, rtol=1e-5, atol=1e-6)


def _grads_after(model, batches, total_tokens):
    module = TrainedTokenLoss(model)
    model.zero_grad()
    for batch in batches:
        loss_sum, _ = module(**batch)
        (loss_sum / total_tokens).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_accumulation_normalises_by_the_whole_window(tiny_model_dir, tiny_tokenizer):
    """One batch of 4 vs two micro-batches of 2 (unequal trained tokens): identical gradients."""
    items = examples(tiny_tokenizer)
    pad = tiny_tokenizer.pad_token_id
    whole = [collate(items, pad)]
    split = [collate(items[:2], pad), collate(items[2:], pad)]
    assert trained_tokens(split[0]) != trained_tokens(split[1])
    total = trained_tokens(whole[0])
    one = _grads_after(load_model(tiny_model_dir), whole, total)
    two = _grads_after(load_model(tiny_model_dir), split, total)
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(one[name], two[name], rtol=1e-4, atol=1e-6)


def test_mean_of_micro_means_would_differ(tiny_model_dir, tiny_tokenizer):
    """Guard against the common bug: averaging per-micro-batch means weights tokens unequally."""
    items = examples(tiny_tokenizer)
    pad = tiny_tokenizer.pad_token_id
    model = load_model(tiny_model_dir)
    module = TrainedTokenLoss(model)
    with torch.no_grad():
        whole_sum, whole_n = module(**collate(items, pad))
        parts = [module(**collate(part, pad)) for part in (items[:2], items[2:])]
    correct = sum(s for s, _ in parts) / sum(n for _, n in parts)
    naive = sum(s / n for s, n in parts) / 2
    torch.testing.assert_close(correct, whole_sum / whole_n)
    assert abs(float(naive - correct)) > 1e-4
