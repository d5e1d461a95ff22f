"""Compiled layers on packed batches: a handful of graphs over many batches of random shape, the eager loss.

Issue 7, workload (c): packed batches differ in total length, example count and longest example at every
step, and SmolLM2's config keeps ``use_cache`` on. Before the fix each layer's KV-cache write (at its own
``layer_idx``) made one graph per layer, past dynamo's recompile limit. Here a 4-layer random Llama (the
tiny model's config, more layers, cache on) trains on 20 packed batches through ``aot_eager`` with a
counting backend: the number of graphs must not grow with batches or layers.
"""

from __future__ import annotations

import random

import pytest
import torch

from tests.unit.test_fast_compile import counting_backend
from tuneloop.data.types import EncodedExample, RowRef
from tuneloop.train.batching import to_device
from tuneloop.train.fast import apply_fast_path
from tuneloop.train.fast.attention import packed_attention
from tuneloop.train.fast.fused import fused_layers_for
from tuneloop.train.fast.packing import RowBuckets, batch_collator
from tuneloop.train.loss import TrainedTokenLoss

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("fresh_dynamo")]

CPU = torch.device("cpu")
MAX_SEQ_LEN = 96
LAYERS = 4



def four_layer_lora(tiny_model_dir, config):
    """The tiny model's architecture with 4 layers and ``use_cache`` on (as released models ship), LoRA-wrapped."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from tuneloop.adapters import get_adapter_method

    model_config = AutoConfig.from_pretrained(tiny_model_dir)
    model_config.num_hidden_layers = LAYERS
    model_config.use_cache = True
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(model_config, dtype=torch.float32)
    return get_adapter_method(config.adapter).apply(base, config)


def random_packed_batches(vocab_size: int, count: int, buckets: RowBuckets | None = None) -> list[dict]:
    """``count`` packed rows: 1-9 examples of 4-``MAX_SEQ_LEN`` tokens each, half of each example trained
    (``buckets``: padded up to bucket lengths, as under CUDA graphs)."""
    rng = random.Random(7)
    collate = batch_collator(True, 0, MAX_SEQ_LEN, buckets)
    batches = []
    for b in range(count):
        examples = []
        for i in range(rng.randint(1, 9)):
            n = rng.randint(4, MAX_SEQ_LEN)
            ids = tuple(rng.randrange(vocab_size) for _ in range(n))
            examples.append(EncodedExample(ids, (-100,) * (n // 2) + ids[n // 2 :], RowRef("random", b * 10 + i)))
        batches.append(collate(examples))
    return batches


def losses(
    model, batches, device: torch.device = CPU, autocast_dtype: torch.dtype | None = None, kernels: str = "eager"
) -> list[float]:
    """Mean loss per trained token of a forward and backward on each batch (the GPU test passes CUDA and bf16),
    with the layer swap the SFT loop makes for ``kernels``."""
    module = TrainedTokenLoss(model)
    out = []
    with packed_attention(model), fused_layers_for(model, kernels):
        model.train()
        for batch in batches:
            model.zero_grad()
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                loss_sum, count = module(**to_device(batch, device))
            (loss_sum / count).backward()
            out.append(float(loss_sum.detach()) / int(count))
    return out


def test_packed_batches_of_random_shapes_compile_a_handful_of_graphs_and_match_eager(tiny_config, tiny_model_dir):
    config = tiny_config(lora_dropout=0.0, kernels="compile", gradient_checkpointing=False, packing=True, max_seq_len=MAX_SEQ_LEN)
    eager = four_layer_lora(tiny_model_dir, config.model_copy(update={"kernels": "eager"}))
    batches = random_packed_batches(eager.get_base_model().config.vocab_size, 20)
    assert len({b["input_ids"].shape[1] for b in batches}) > 10  # the shapes really vary
    assert len({len(b["cu_seq_lens"]) for b in batches}) > 5 and any(len(b["cu_seq_lens"]) == 2 for b in batches)  # one-example rows too
    assert all(b["max_length"] == MAX_SEQ_LEN for b in batches)  # one bound for the run, not per batch
    reference = losses(eager, batches)

    graphs: list[int] = []
    model = four_layer_lora(tiny_model_dir, config)
    report = apply_fast_path(model, config, device=CPU, tokens_per_micro_batch=512, compile_backend=counting_backend(graphs))
    assert report.kernels == "compile" and report.total_layers == LAYERS
    after_probe = len(graphs)
    compiled = losses(model, batches, kernels=report.kernels)
    # the probe traced a packed row (apply_fast_path passes packing): one graph per kind (first layer's input
    # without a gradient, the others with one), maybe an analysis restart each; none per batch or per layer
    assert 1 <= after_probe <= 4, graphs
    assert len(graphs) == after_probe, graphs
    assert compiled == pytest.approx(reference, rel=1e-5)


def test_pack_refuses_an_example_longer_than_its_bound():
    collate = batch_collator(True, 0, 8)
    example = EncodedExample(tuple(range(9)), tuple(range(9)), RowRef("x", 1))
    with pytest.raises(ValueError, match="longer than the packing bound 8"):
        collate([example])
    assert batch_collator(True, 0)([example])["max_length"] == 9  # no bound given: the longest example


def test_a_packed_probe_compiles_what_packed_training_runs(tiny_config, tiny_model_dir):
    """With ``packing`` the probe traces a packed row under the packed attention: training adds no graph."""
    from tuneloop.train.fast.compile import CompileOptions, compile_layers
    from tuneloop.train.fast.memory import decoder_layers

    config = tiny_config(lora_dropout=0.0)
    graphs: list[int] = []
    model = four_layer_lora(tiny_model_dir, config)
    attention_before = model.get_base_model().config._attn_implementation
    options = CompileOptions(backend=counting_backend(graphs), packing=True, max_seq_len=MAX_SEQ_LEN)
    outcome = compile_layers(model, decoder_layers(model), CPU, options)
    assert outcome.kernels == "compile"
    assert model.get_base_model().config._attn_implementation == attention_before  # the probe restored it
    after_probe = len(graphs)
    assert 1 <= after_probe <= 4, graphs
    losses(model, random_packed_batches(model.get_base_model().config.vocab_size, 6), kernels=outcome.kernels)
    assert len(graphs) == after_probe, "packed training compiled graphs the packed probe had not"
