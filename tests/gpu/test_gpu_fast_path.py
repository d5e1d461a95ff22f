"""The fast path on a CUDA GPU: Inductor-compiled layers, auto checkpointing with a budget, the fused head loss.

Tiny random model (tests/conftest.py); what is checked is behaviour (same losses, chosen layers, lower
memory), not speed: speed is measured by ``bench/fast_path_probe.py``.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from tuneloop import train
from tuneloop.train.estimate import RUNTIME_OVERHEAD_BYTES
from tuneloop.train.fast import apply_fast_path
from tuneloop.train.fast.fused import fused_layers_for
from tuneloop.train.fast.linear_ce import fused_linear_cross_entropy
from tuneloop.train.fast.memory import memory_model_of

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")


def test_fused_head_loss_matches_and_uses_less_memory_than_full_logits():
    torch.manual_seed(0)
    hidden = torch.randn(4096, 512, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(32000, 512, device=CUDA) * 0.05).to(torch.bfloat16)
    targets = torch.randint(0, 32000, (4096,), device=CUDA)

    def peak(fn):
        hidden.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        loss = fn()
        loss.backward()
        torch.cuda.synchronize()
        return loss.detach(), hidden.grad.clone(), torch.cuda.max_memory_allocated() - start

    fused, fused_grad, fused_peak = peak(lambda: fused_linear_cross_entropy(hidden, weight, targets, chunk_rows=512))
    full, full_grad, full_peak = peak(lambda: F.cross_entropy((hidden @ weight.t()).float(), targets, reduction="sum"))
    torch.testing.assert_close(fused, full, rtol=2e-3, atol=1.0)
    torch.testing.assert_close(fused_grad.float(), full_grad.float(), rtol=5e-2, atol=5e-3)
    assert fused_peak < full_peak / 3


def build(tiny_model_dir, config):
    from transformers import AutoModelForCausalLM

    from tuneloop.adapters import get_adapter_method

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).to(CUDA)
    return get_adapter_method(config.adapter).apply(base, config)


def test_auto_checkpoints_what_the_budget_needs_and_inductor_compiles_the_layers(tiny_config, tiny_model_dir, tiny_tokenizer):
    from tests.unit.test_fast_compile import batches, step

    config = tiny_config(precision="bf16", lora_dropout=0.0, gradient_checkpointing="auto", kernels="auto")
    batch = {k: v.to(CUDA) for k, v in batches(tiny_tokenizer, sizes=(4,))[0].items()}
    eager = build(tiny_model_dir, config)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        want_loss, _ = step(eager, batch)
    model = build(tiny_model_dir, config)
    tokens = 4 * 512
    budget = memory_model_of(model, config, tokens).at(1).peak + RUNTIME_OVERHEAD_BYTES
    report = apply_fast_path(model, config, device=CUDA, tokens_per_micro_batch=tokens, budget=budget, autocast_dtype=torch.bfloat16)
    assert report.kernels == "compile", report.reasons
    assert (report.checkpointed_layers, report.checkpointed_indices, report.offload) == (1, (0,), False)
    with torch.autocast("cuda", dtype=torch.bfloat16), fused_layers_for(model, report.kernels):  # as the SFT loop
        loss, _ = step(model, batch)
    assert loss == pytest.approx(want_loss, rel=2e-2)


def test_a_compiled_auto_run_records_its_fast_path(tiny_config, tmp_path):
    config = tiny_config(output_dir=str(tmp_path / "run"), precision="bf16", kernels="compile",
                         gradient_checkpointing="auto", memory_budget_gib=64.0)  # fmt: skip
    result = train.run(config)
    record = json.loads((result.output_dir / "record.json").read_text())
    fast = record["train"]["fast_path"]
    assert fast["kernels"] == "compile" and fast["checkpointed_layers"] == 0 and fast["budget_gib"] == 64.0
    assert result.fast_path == fast
