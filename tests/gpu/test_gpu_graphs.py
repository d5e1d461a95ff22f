"""CUDA graphs of the packed step (CUDA, bf16): the replayed step gives the eager step's loss and gradients.

Rows of random shape are padded to buckets; the first step runs eagerly and every shape after it is captured
the first time it is seen, so the sequence below replays shapes once, twice and many times. Then a whole ``tuneloop`` SFT run with
``cuda_graphs: true`` must replay graphs and follow the loss curve of the same run without them.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.unit.test_fast_compile_packed import MAX_SEQ_LEN, four_layer_lora, random_packed_batches
from tuneloop.compat.varlen_attn import installed_varlen_api
from tuneloop.train.batching import to_device
from tuneloop.train.fast.attention import packed_attention
from tuneloop.train.fast.graphs import PackedStepGraphs
from tuneloop.train.fast.packing import RowBuckets
from tuneloop.train.loss import TrainedTokenLoss

from .conftest import needs_bitsandbytes

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(installed_varlen_api() is None, reason="this torch has no varlen_attn"),
]

CUDA = torch.device("cuda")


def step(model, module, forward, batch):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = forward(module, to_device(batch, CUDA))
    loss.backward()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}
    return float(loss.detach()), grads


def test_replayed_steps_give_the_eager_loss_and_gradients(tiny_config, tiny_model_dir):
    config = tiny_config(lora_dropout=0.0, kernels="eager", packing=True, cuda_graphs=True, max_seq_len=MAX_SEQ_LEN)
    eager = four_layer_lora(tiny_model_dir, config).to(CUDA)
    graphed = four_layer_lora(tiny_model_dir, config).to(CUDA)  # same seed: same weights
    vocab = eager.get_base_model().config.vocab_size
    rows = random_packed_batches(vocab, 6, RowBuckets((256,), MAX_SEQ_LEN, pad_token_id=0))
    order = [0, 1, 0, 2, 0, 1, 3, 0, 4, 5, 4, 0]
    eager_module, graphed_module = TrainedTokenLoss(eager), TrainedTokenLoss(graphed)
    graphs = PackedStepGraphs(graphed_module, autocast_dtype=torch.bfloat16)
    shapes = [(rows[i]["input_ids"].shape[1], rows[i]["cu_seq_lens"].numel()) for i in order]
    with packed_attention(eager), packed_attention(graphed):
        eager.train(), graphed.train()
        for index in order:
            want_loss, want_grads = step(eager, eager_module, lambda m, b: m(**b)[0], rows[index])
            got_loss, got_grads = step(graphed, graphed_module, graphs, rows[index])
            assert got_loss == pytest.approx(want_loss, rel=2e-2), index
            for name, grad in want_grads.items():
                scale = grad.abs().max().item() + 1e-6
                assert (got_grads[name] - grad).abs().max().item() <= 5e-2 * scale, (index, name)
    assert graphs.captured == len(set(shapes[1:])) > 1  # every shape after the eager first step
    assert graphs.replays == len(shapes) - 1


def plain_and_graphed_runs(tiny_config, tag: str, graphed_kernels: str, **options):
    """Two packed runs of the same settings, without CUDA graphs (``kernels: eager``) and with them
    (``graphed_kernels``): their loss curves and ``record.json``s, plain first."""
    from tuneloop import train

    curves, records = [], []
    for use in (False, True):
        config = tiny_config(
            packing=True, cuda_graphs=use, kernels=graphed_kernels if use else "eager", lora_dropout=0.0, epochs=3,
            batch_size=2, logging_steps=1, output_dir=str(tiny_config().output_dir) + f"-{tag}-{use}", **options,
        )  # fmt: skip
        result = train.run(config, overwrite=True)
        rows = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
        curves.append([r["loss"] for r in rows if "loss" in r])
        records.append(json.loads((result.output_dir / "record.json").read_text()))
    return curves, records


def test_a_run_with_cuda_graphs_replays_them_and_follows_the_plain_loss_curve(tiny_config):
    curves, records = plain_and_graphed_runs(tiny_config, "graphs", "eager")
    summary = records[1]["cuda_graphs"]
    assert summary["graphs"] > 0 and summary["replays"] > 0
    assert records[1]["train"]["fast_path"]["cuda_graphs"] is True
    assert len(curves[0]) == len(curves[1]) > 2
    assert curves[1] == pytest.approx(curves[0], rel=5e-2)


@needs_bitsandbytes
def test_qlora_steps_replay_as_graphs_with_fused_4bit_lora_linears(tiny_config):
    """``kernels: auto`` under ``cuda_graphs`` is ``fused``: on QLoRA that includes the 4-bit LoRA linears, whose
    bitsandbytes rebuilds of the weight are captured in the graphs; the curve follows eager QLoRA's."""
    curves, records = plain_and_graphed_runs(tiny_config, "qlora-graphs", "auto", adapter="qlora", precision="bf16")
    assert records[1]["train"]["fast_path"]["kernels"] == "fused"
    assert records[1]["fused_layers"]["lora_linears"] > 0
    assert records[1]["cuda_graphs"]["replays"] > 0
    assert len(curves[0]) == len(curves[1]) > 2
    assert curves[1] == pytest.approx(curves[0], rel=5e-2)
