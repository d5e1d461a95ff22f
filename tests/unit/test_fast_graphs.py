"""CUDA-graph step, the parts that run anywhere: bucket padding trains exactly what the unpadded row trains.

The graph replays a fixed shape, so a packed row is padded up to a bucket with segments of its own and the loss
is taken over every position with ignored targets (``_PackedRowLoss``) instead of over gathered trained
positions. On the CPU (fp32, block-diagonal attention) both must give the unpadded row's loss and LoRA
gradients; tests/gpu/test_gpu_graphs.py replays real graphs against the eager step.
"""

from __future__ import annotations

import pytest
import torch

from tests.unit.test_fast_compile_packed import MAX_SEQ_LEN, four_layer_lora, random_packed_batches
from tests.unit.test_packing import encode, lora_model
from tuneloop.config import ConfigError
from tuneloop.train.batching import real_tokens, trained_tokens
from tuneloop.train.estimate import layers_compile
from tuneloop.train.fast.attention import packed_attention
from tuneloop.train.fast.compile import CompileOptions, use_auto
from tuneloop.train.fast.graphs import CAPTURE_COST_ROWS, _PackedRowLoss, plan_buckets, plan_step_graphs
from tuneloop.train.fast.packing import RowBuckets, pack
from tuneloop.train.loss import TrainedTokenLoss

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("lengths", "max_length"),
    [((64,), 16), ((128,), 128), ((1024,), 256), ((256,), 7), ((8,), 300), ((384, 512, 1152), 100)],
)
def test_a_row_pads_to_a_bucket_with_a_fixed_count_of_bounded_nonempty_segments(lengths, max_length):
    buckets = RowBuckets(lengths, max_length, pad_token_id=0)
    for length in range(1, 3 * lengths[-1] + 5):
        padded = buckets.padded_length(length)
        segments = buckets.padding_segments(length)
        assert padded in lengths or (padded - lengths[-1]) % buckets.widest_gap == 0
        assert padded > length and all(b < length + len(segments) for b in lengths if b < padded)  # the shortest fit
        assert sum(segments) == padded - length
        assert len(segments) == buckets.segments  # cu_seq_lens has one length for every full batch
        assert all(1 <= s <= max_length for s in segments), (length, segments)  # within the attention bound
    with pytest.raises(ValueError, match="ascending"):
        RowBuckets((512, 256), max_length, pad_token_id=0)


def padded_tokens(rows, lengths, max_length):
    buckets = RowBuckets(lengths, max_length, pad_token_id=0)
    return sum(buckets.padded_length(n) for n in rows)


def test_buckets_weigh_padding_against_captures():
    rows = [1695 + (i * 7919) % 3849 for i in range(314)]  # 1,695..5,543 tokens: workload (c)'s spread at batch 64
    lengths = plan_buckets(rows, 256)
    assert all(n % 128 == 0 for n in lengths) and lengths[-1] >= max(rows)
    cost = padded_tokens(rows, lengths, 256) + CAPTURE_COST_ROWS * sum(rows) / len(rows) * len(lengths)
    for other in ((lengths[-1],), tuple(range(1792, lengths[-1] + 1, 128))):  # one bucket; every 128 tokens
        other_cost = padded_tokens(rows, other, 256) + CAPTURE_COST_ROWS * sum(rows) / len(rows) * len(other)
        assert cost <= other_cost, other
    assert 1 < len(lengths) < 8
    assert plan_buckets([500] * 10, 256) == (512,)  # one shape, one bucket: 500 tokens and 3 padding segments
    assert len(plan_buckets(rows, 256, capture_cost_rows=0.0)) > len(lengths)  # free captures: a bucket per length


def test_a_bucket_padded_row_trains_exactly_what_the_unpadded_row_trains(tiny_model_dir, tiny_tokenizer):
    items = encode(tiny_tokenizer)
    plain = pack(items, max_length=128)
    padded = pack(items, max_length=128, buckets=RowBuckets((64,), 16, tiny_tokenizer.pad_token_id))
    assert padded["input_ids"].shape[1] % 64 == 0 and padded["pad_tokens"] > 0
    assert real_tokens(padded) == real_tokens(plain) == plain["input_ids"].shape[1]
    assert trained_tokens(padded) == trained_tokens(plain)

    model = lora_model(tiny_model_dir)
    module = TrainedTokenLoss(model)
    decoder, head = module.parts
    row_loss = _PackedRowLoss(decoder, head, module.chunk, max_length=128, dtype=None)
    results = []
    with packed_attention(model):
        for run in (
            lambda: module(**plain)[0],
            lambda: module(**padded)[0],
            lambda: row_loss(padded["input_ids"], padded["labels"], padded["position_ids"], padded["cu_seq_lens"]),
        ):
            model.zero_grad()
            loss = run()
            loss.backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
            results.append((loss.detach(), grads))
    (reference, reference_grads), *others = results
    for loss, grads in others:
        torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)
        for name, grad in reference_grads.items():
            assert grad.abs().sum() > 0, name
            torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_random_rows_padded_to_buckets_keep_their_loss(tiny_config, tiny_model_dir):
    """Many rows of random shape (1-9 examples each) through the graph's loss, padded, against the eager loss."""
    config = tiny_config(lora_dropout=0.0, kernels="eager", packing=True, max_seq_len=MAX_SEQ_LEN)
    model = four_layer_lora(tiny_model_dir, config)
    vocab = model.get_base_model().config.vocab_size
    module = TrainedTokenLoss(model)
    row_loss = _PackedRowLoss(*module.parts, module.chunk, max_length=MAX_SEQ_LEN, dtype=None)
    buckets = RowBuckets((128,), MAX_SEQ_LEN, pad_token_id=0)
    with packed_attention(model), torch.no_grad():
        for batch in random_packed_batches(vocab, 8):
            examples = batch["cu_seq_lens"].diff().tolist()
            padding = buckets.padding_segments(batch["input_ids"].shape[1])
            cu = torch.tensor([0, *examples, *padding], dtype=torch.int32).cumsum(0, dtype=torch.int32)
            ids = torch.cat([batch["input_ids"], torch.zeros(1, sum(padding), dtype=torch.long)], dim=1)
            labels = torch.cat([batch["labels"], torch.full((1, sum(padding)), -100)], dim=1)
            positions = torch.cat([batch["position_ids"], *(torch.arange(n).unsqueeze(0) for n in padding)], dim=1)
            torch.testing.assert_close(row_loss(ids, labels, positions, cu), module(**batch)[0], rtol=1e-5, atol=1e-5)


def test_graphs_are_planned_only_where_they_can_replay(tiny_config):
    config = tiny_config(packing=True, cuda_graphs=True, kernels="auto")
    cuda = torch.device("cuda")
    assert plan_step_graphs(config, cuda, 1, "eager", offload=False)[0]
    for device, processes, kernels, offload, words in (
        (torch.device("cpu"), 1, "eager", False, "CUDA GPU"),
        (cuda, 2, "eager", False, "several processes"),
        (cuda, 1, "eager", True, "offloaded"),
        (cuda, 1, "compile", False, "compiled layers"),
    ):
        use, reason = plan_step_graphs(config, device, processes, kernels, offload)
        assert not use and words in reason
    assert plan_step_graphs(tiny_config(packing=True), cuda, 1, "eager", False) == (False, "")


def test_cuda_graphs_keep_auto_layers_uncompiled_and_need_packing(tiny_config):
    config = tiny_config(packing=True, cuda_graphs=True, kernels="auto")
    assert not layers_compile(config)  # the memory plan counts eager activations
    assert layers_compile(config.model_copy(update={"cuda_graphs": False}))
    outcome = use_auto(None, [torch.nn.Linear(2, 2)], torch.device("cuda"), CompileOptions(cuda_graphs=True))
    assert outcome.kernels == "fused" and "cuda_graphs" in outcome.reason
    with pytest.raises((ConfigError, ValueError), match="cuda_graphs needs packing"):
        tiny_config(cuda_graphs=True)
