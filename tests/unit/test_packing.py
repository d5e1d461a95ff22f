"""Padding-free packing: same examples, same loss and gradients as padded batches, no attention across examples.

Everything runs on CPU in fp32, where the packed row goes through the block-diagonal SDPA fallback of
``tuneloop.train.fast.attention``; tests/gpu/test_gpu_packing.py covers the varlen flash kernel.
"""

from __future__ import annotations

import json

import pytest
import torch

from tuneloop import train
from tuneloop.data import ChatRenderer, Conversation, Message, RowRef
from tuneloop.data.render import IGNORE_INDEX
from tuneloop.train.batching import collate, real_tokens, trained_positions, trained_tokens
from tuneloop.train.fast.attention import (
    ATTENTION_NAME,
    block_causal_mask,
    packed_attention,
    segments_from_positions,
)
from tuneloop.train.fast.packing import model_inputs, pack
from tuneloop.train.loss import TrainedTokenLoss
from tuneloop.train.rundir import fingerprint

pytestmark = pytest.mark.unit

TICKETS = [
    ("refund please", "billing"),
    ("the export page crashes on open and the whole tab goes white", "bug"),
    ("invite team", "onboarding and then billing twice"),
    ("charged twice this month ok", "billing twice, then a long explanation"),
]


def encode(tokenizer, rows=TICKETS):
    renderer = ChatRenderer(tokenizer)
    return [
        renderer.encode(Conversation((Message("user", text), Message("assistant", answer)), RowRef("x", i)))
        for i, (text, answer) in enumerate(rows)
    ]


def load_model(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


def lora_model(folder):
    """LoRA with random (not zero) B, so every adapter weight gets a gradient worth comparing."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, init_lora_weights=False)
    return get_peft_model(load_model(folder), config)


def loss_and_grads(model, batch):
    module = TrainedTokenLoss(model)
    model.zero_grad()
    loss_sum, count = module(**batch)
    (loss_sum / count).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss_sum.detach(), int(count), grads


def test_pack_lays_examples_end_to_end_with_their_own_positions(tiny_tokenizer):
    items = encode(tiny_tokenizer)
    batch = pack(items)
    lengths = [len(e.input_ids) for e in items]
    assert (
        batch["input_ids"].shape == batch["labels"].shape == batch["position_ids"].shape == (1, sum(lengths))
    )
    assert batch["input_ids"][0].tolist() == [t for e in items for t in e.input_ids]
    assert batch["position_ids"][0].tolist() == [p for n in lengths for p in range(n)]
    assert batch["cu_seq_lens"].dtype == torch.int32
    assert batch["cu_seq_lens"].tolist() == [sum(lengths[:i]) for i in range(len(lengths) + 1)]
    assert batch["max_length"] == max(lengths)
    assert "attention_mask" not in batch  # nothing is padding
    assert real_tokens(batch) == sum(lengths) == real_tokens(collate(items, tiny_tokenizer.pad_token_id))


def test_no_example_is_trained_to_predict_the_next_examples_first_token(tiny_tokenizer):
    """Give every first token a label: packing must still mask it, the padded layout never trains it either."""
    items = [
        type(e)(input_ids=e.input_ids, labels=(e.input_ids[0], *e.labels[1:]), source=e.source)
        for e in encode(tiny_tokenizer)
    ]
    batch = pack(items)
    starts = batch["cu_seq_lens"][:-1].long()
    assert (batch["labels"][0, starts] == IGNORE_INDEX).all()
    ends = batch["cu_seq_lens"][1:].long() - 1  # each example's own last label is kept
    expected_last = torch.tensor([e.labels[-1] for e in items])
    assert torch.equal(batch["labels"][0, ends], expected_last)
    assert trained_tokens(batch) == trained_tokens(collate(items, tiny_tokenizer.pad_token_id))


def test_trained_tokens_are_the_same_in_both_layouts(tiny_tokenizer):
    items = encode(tiny_tokenizer)
    padded, packed = collate(items, tiny_tokenizer.pad_token_id), pack(items)
    assert trained_tokens(packed) == trained_tokens(padded) == sum(e.num_trained_tokens for e in items)


def test_packed_loss_and_lora_gradients_equal_the_padded_ones(tiny_model_dir, tiny_tokenizer):
    items = encode(tiny_tokenizer)
    model = lora_model(tiny_model_dir)
    padded_loss, padded_count, padded_grads = loss_and_grads(
        model, collate(items, tiny_tokenizer.pad_token_id)
    )
    with packed_attention(model):
        assert model.get_base_model().config._attn_implementation == ATTENTION_NAME
        packed_loss, packed_count, packed_grads = loss_and_grads(model, pack(items))
    assert packed_count == padded_count
    torch.testing.assert_close(packed_loss, padded_loss, rtol=1e-5, atol=1e-6)
    assert packed_grads.keys() == padded_grads.keys() and padded_grads
    for name, grad in padded_grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_trained_positions_point_at_the_tokens_that_predict_a_trained_label(tiny_tokenizer):
    items = encode(tiny_tokenizer)
    batch = pack(items)
    labels = batch["labels"][0]
    positions = batch["trained_positions"]
    assert positions.tolist() == [t for t in range(len(labels) - 1) if labels[t + 1] != IGNORE_INDEX]
    assert len(positions) == trained_tokens(batch)
    padded = collate(items, tiny_tokenizer.pad_token_id)  # several rows: flat indices into [rows, width]
    width = padded["labels"].shape[1]
    flat = trained_positions(padded["labels"])
    assert (
        padded["labels"].flatten()[flat + 1].tolist()
        == padded["labels"][:, 1:][padded["labels"][:, 1:] != IGNORE_INDEX].tolist()
    )
    assert ((flat % width) < width - 1).all()


def test_the_gather_by_trained_positions_gives_the_masked_gathers_loss_and_gradients(
    tiny_model_dir, tiny_tokenizer
):
    """``trained_positions`` (from the host) only replaces the boolean mask on the device: same loss and grads."""
    items = encode(tiny_tokenizer)
    model = lora_model(tiny_model_dir)
    batch = pack(items)
    without = {k: v for k, v in batch.items() if k != "trained_positions"}
    with packed_attention(model):
        loss, count, grads = loss_and_grads(model, batch)
        masked_loss, masked_count, masked_grads = loss_and_grads(model, without)
    assert count == masked_count
    torch.testing.assert_close(loss, masked_loss, rtol=0, atol=0)
    for name, grad in masked_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-6, atol=1e-8, msg=name)


def logits(model, batch):
    with torch.no_grad():
        keys = ("position_ids", "cu_seq_lens", "max_length")
        return model(**model_inputs(batch["input_ids"], None, *(batch[k] for k in keys))).logits[0]


def test_attention_does_not_cross_examples(tiny_model_dir, tiny_tokenizer):
    """Example 2's logits ignore example 1 entirely (causal attention alone would not ensure that), and
    example 1's ignore example 2."""
    first, second, other_first, other_second = encode(tiny_tokenizer)
    n = len(first.input_ids)
    model = load_model(tiny_model_dir)
    with packed_attention(model):
        row = logits(model, pack([first, second]))
        second_alone = logits(model, pack([second]))
        torch.testing.assert_close(row[n:], second_alone, rtol=1e-5, atol=1e-5)
        changed_second = logits(model, pack([first, other_second]))
        torch.testing.assert_close(changed_second[:n], row[:n], rtol=1e-5, atol=1e-5)
        changed_first = logits(model, pack([other_first, second]))
        torch.testing.assert_close(
            changed_first[len(other_first.input_ids) :], second_alone, rtol=1e-5, atol=1e-5
        )
    # the same row read as one sequence (plain causal attention, positions 0..T-1) does leak: the check can fail
    with torch.no_grad():
        leaked = model(input_ids=pack([first, second])["input_ids"]).logits[0]
    assert not torch.allclose(leaked[n:], second_alone, atol=1e-3)


def test_selection_is_per_instance_and_undone_and_padded_batches_are_unchanged(
    tiny_model_dir, tiny_tokenizer
):
    items = encode(tiny_tokenizer)
    padded = collate(items, tiny_tokenizer.pad_token_id)
    model, bystander = load_model(tiny_model_dir), load_model(tiny_model_dir)
    with torch.no_grad():
        expected = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
    before = model.config._attn_implementation
    with packed_attention(model):
        assert bystander.config._attn_implementation == before  # another instance of the same class
        with torch.no_grad():
            during = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
    assert model.config._attn_implementation == before
    real = padded["attention_mask"].bool()
    torch.testing.assert_close(during[real], expected[real], rtol=1e-5, atol=1e-5)


def test_positions_alone_also_keep_examples_apart(tiny_model_dir, tiny_tokenizer):
    """Without cu_seq_lens (a caller passing position_ids only), boundaries come from the restarts."""
    items = encode(tiny_tokenizer)
    batch = pack(items)
    model = load_model(tiny_model_dir)
    with packed_attention(model), torch.no_grad():
        by_boundaries = logits(model, batch)
        by_positions = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
    torch.testing.assert_close(by_positions, by_boundaries, rtol=1e-5, atol=1e-5)


def test_block_causal_mask_with_a_sliding_window():
    segments = segments_from_positions(
        torch.tensor([[0, 1, 2, 3, 0, 1]]), rows=1, length=6, device=torch.device("cpu")
    )
    assert segments.tolist() == [[0, 0, 0, 0, 1, 1]]
    mask = block_causal_mask(segments, sliding_window=2)[0, 0].int().tolist()
    assert mask == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 1, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 0],
        [0, 0, 0, 0, 1, 1],
    ]


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_packed_run_trains_like_a_padded_one(tiny_config, tmp_path):
    padded_config = tiny_config(output_dir=str(tmp_path / "padded"), lora_dropout=0.0)
    packed_config = tiny_config(output_dir=str(tmp_path / "packed"), lora_dropout=0.0, packing=True)
    padded, packed = train.run(padded_config), train.run(packed_config)
    assert packed.steps == padded.steps and packed.epochs == padded.epochs
    padded_rows, packed_rows = metrics(padded.output_dir), metrics(packed.output_dir)
    train_rows = [(a, b) for a, b in zip(padded_rows, packed_rows) if "loss" in a]
    assert [a["trained_tokens"] for a, _ in train_rows] == [b["trained_tokens"] for _, b in train_rows]
    first_padded, first_packed = train_rows[0]
    assert first_packed["loss"] == pytest.approx(first_padded["loss"], rel=1e-6)
    val = [(a["val_loss"], b["val_loss"]) for a, b in zip(padded_rows, packed_rows) if "val_loss" in a]
    assert len(val) == 2 and all(b == pytest.approx(a, rel=1e-3) for a, b in val)  # after updates: same road
    stream = [[1, 2], [3]]  # packing changes the layout of a batch, not which batches are replayed on resume
    assert fingerprint(packed_config, iter([stream])) == fingerprint(padded_config, iter([stream]))
