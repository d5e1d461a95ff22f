"""Offloaded checkpointing on a CUDA GPU: the layer inputs leave the GPU, gradients stay exact, layers stay compiled.

A tiny-config Llama made wider and deeper (hidden 1024, 8 layers, fp32) so that one layer input (2 x 1024
tokens x 1024 x 4 bytes = 8 MiB) is visible in the allocator's peak; what is checked is behaviour (inputs on
the host, same gradients), not speed: speed is measured by ``bench/fast_path_probe.py``.
"""

from __future__ import annotations

import pytest
import torch

from tuneloop.train.estimate import RUNTIME_OVERHEAD_BYTES
from tuneloop.train.fast import apply_fast_path
from tuneloop.train.fast.fused import fused_layers_for
from tuneloop.train.fast.memory import apply_checkpointing, decoder_layers, memory_model_of

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")
LAYERS, HIDDEN, BATCH, SEQ = 8, 1024, 2, 1024


def build(tiny_model_dir, config, dtype=torch.float32):
    from transformers import AutoConfig, AutoModelForCausalLM

    from tuneloop.adapters import get_adapter_method

    hf_config = AutoConfig.from_pretrained(tiny_model_dir)
    hf_config.update({"num_hidden_layers": LAYERS, "hidden_size": HIDDEN, "intermediate_size": 2 * HIDDEN,
                      "num_attention_heads": 8, "num_key_value_heads": 4, "max_position_embeddings": SEQ,
                      "use_cache": False})  # fmt: skip
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(hf_config, dtype=dtype).to(CUDA)
    return get_adapter_method(config.adapter).apply(base, config)


def measured_step(model, ids):
    """Loss, gradients, and what the forward pass left allocated for the backward (above the start).

    Held after the forward, not the step's peak: the peak comes in the backward pass, where a full fine-tune's
    weight gradients (and the recomputed layer) outweigh the saved inputs, so it says little about them.
    """
    model.train()
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
    torch.cuda.synchronize()  # the side-stream copies to the host are done ...
    torch.empty(1, device=CUDA)  # ... and an allocation lets the allocator release the blocks they were reading
    held = torch.cuda.memory_allocated() - start
    loss.backward()
    torch.cuda.synchronize()
    return float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, held


@pytest.mark.parametrize("adapter", ["lora", "full"])
def test_offloaded_inputs_leave_the_gpu_and_gradients_match_torch_checkpoint(tiny_config, tiny_model_dir, adapter):
    config = tiny_config(adapter=adapter, lora_dropout=0.0)
    ids = torch.randint(0, 300, (BATCH, SEQ), device=CUDA, generator=torch.Generator(CUDA).manual_seed(0))
    results = {}
    for offload in (False, True):
        model = build(tiny_model_dir, config)
        apply_checkpointing(decoder_layers(model), LAYERS, offload=offload, pin_memory=True)
        measured_step(model, ids)  # warm-up: cuBLAS workspaces, pinned host blocks
        results[offload] = measured_step(model, ids)
        del model
        torch.cuda.empty_cache()
    (loss, grads, held), (off_loss, off_grads, off_held) = results[False], results[True]
    assert off_loss == pytest.approx(loss, rel=1e-6)
    assert off_grads.keys() == grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(off_grads[name], grads[name], rtol=1e-5, atol=1e-6)
    one_input = BATCH * SEQ * HIDDEN * 4
    saved = held - off_held
    # all but two inputs (the one recomputed and the next, prefetched) left the GPU; allow a quarter for slack
    assert saved >= 0.75 * (LAYERS - 2) * one_input, (held, off_held, one_input)


def test_auto_at_a_tight_budget_offloads_and_keeps_inductor(tiny_config, tiny_model_dir):
    config = tiny_config(precision="bf16", lora_dropout=0.0, gradient_checkpointing="auto", kernels="compile")
    ids = torch.randint(0, 300, (BATCH, SEQ), device=CUDA, generator=torch.Generator(CUDA).manual_seed(0))
    eager = build(tiny_model_dir, config, dtype=torch.bfloat16)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        want, _, _ = measured_step(eager, ids)
    del eager
    model = build(tiny_model_dir, config, dtype=torch.bfloat16)
    tokens = BATCH * SEQ
    budget = memory_model_of(model, config, tokens).at(LAYERS, offload=True).peak + RUNTIME_OVERHEAD_BYTES
    report = apply_fast_path(model, config, device=CUDA, tokens_per_micro_batch=tokens, budget=budget, autocast_dtype=torch.bfloat16)
    assert report.kernels == "compile" and report.offload and report.checkpointed_layers == LAYERS, report.reasons
    with torch.autocast("cuda", dtype=torch.bfloat16), fused_layers_for(model, report.kernels):  # as the SFT loop
        losses = [measured_step(model, ids)[0] for _ in range(2)]
    assert losses[0] == pytest.approx(want, rel=2e-2)
    assert losses[1] == pytest.approx(losses[0], rel=1e-3)  # no update in between: a second step (stash reused) agrees
