"""Compiled layers on packed rows through the varlen flash kernel (CUDA, bf16): few graphs, the eager loss.

The CPU test (tests/unit/test_fast_compile_packed.py) runs the masked-SDPA fallback; this one runs the path
workload (c) of issue 7 runs on the H200, where ``max_length`` reaches the flash kernel: 20 packed rows of
random shape must not compile a graph per row (skipped without CUDA or without ``varlen_attn``).
"""

from __future__ import annotations

import pytest
import torch

from tests.unit.test_fast_compile import counting_backend
from tests.unit.test_fast_compile_packed import MAX_SEQ_LEN, four_layer_lora, losses, random_packed_batches
from tuneloop.compat.varlen_attn import installed_varlen_api
from tuneloop.train.fast import apply_fast_path

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(installed_varlen_api() is None, reason="this torch has no varlen_attn"),
]

CUDA = torch.device("cuda")


def bf16_losses(model, batches, kernels: str = "eager") -> list[float]:
    return losses(model, batches, CUDA, torch.bfloat16, kernels)


def test_compiled_packed_rows_on_the_flash_kernel_compile_a_handful_of_graphs(tiny_config, tiny_model_dir):
    torch._dynamo.reset()
    config = tiny_config(lora_dropout=0.0, kernels="compile", gradient_checkpointing=False, packing=True,
                         max_seq_len=MAX_SEQ_LEN)  # fmt: skip
    eager = four_layer_lora(tiny_model_dir, config.model_copy(update={"kernels": "eager"})).to(CUDA)
    batches = random_packed_batches(eager.get_base_model().config.vocab_size, 20)
    reference = bf16_losses(eager, batches)

    graphs: list[int] = []
    model = four_layer_lora(tiny_model_dir, config).to(CUDA)
    report = apply_fast_path(model, config, device=CUDA, tokens_per_micro_batch=1024, budget=40 * 2**30,
                             compile_backend=counting_backend(graphs), autocast_dtype=torch.bfloat16)  # fmt: skip
    assert report.kernels == "compile"
    after_probe = len(graphs)
    compiled = bf16_losses(model, batches, report.kernels)
    torch._dynamo.reset()
    # none per row (20) and none per layer (4): the probe's few graphs, then at most the dynamic-shape pair
    assert after_probe <= 4 and len(graphs) - after_probe <= 2, (after_probe, graphs)
    assert compiled == pytest.approx(reference, rel=2e-2)  # bf16 kernels: same road, not the same bits
