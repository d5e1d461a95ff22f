"""The training loss on CUDA: the head's compiled elementwise step, and a packed step the host never waits on."""

from __future__ import annotations

import pytest
import torch

from tests.gpu.test_gpu_packing import encode, needs_varlen
from tests.unit.test_fast_linear_ce import grads_of
from tuneloop.train.batching import to_device
from tuneloop.train.fast.attention import packed_attention
from tuneloop.train.fast.linear_ce import compiled_logit_grad, fused_linear_cross_entropy
from tuneloop.train.fast.packing import model_inputs, pack
from tuneloop.train.loss import TrainedTokenLoss, head_loss, trained_rows

pytestmark = pytest.mark.gpu


def test_inductor_logit_grad_matches_eager_at_a_real_vocabulary():
    """bf16, 32k vocabulary, chunks of 512 rows and a short last one (two graphs), ignored rows among them."""
    generator = torch.Generator(device="cuda").manual_seed(0)
    rows, width, vocab = 1300, 256, 32768
    hidden = torch.randn(rows, width, device="cuda", generator=generator).bfloat16().requires_grad_()
    weight = (
        (torch.randn(vocab, width, device="cuda", generator=generator) * 0.05).bfloat16().requires_grad_()
    )
    targets = torch.randint(0, vocab, (rows,), device="cuda", generator=generator)
    targets[::7] = -100
    eager = fused_linear_cross_entropy(hidden, weight, targets, chunk_rows=512)
    compiled = fused_linear_cross_entropy(
        hidden, weight, targets, chunk_rows=512, logit_grad=compiled_logit_grad()
    )
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-3)
    for got, want in zip(grads_of(compiled, hidden, weight), grads_of(eager, hidden, weight)):
        torch.testing.assert_close(got.float(), want.float(), rtol=1.6e-2, atol=1e-5)


@needs_varlen
def test_the_trained_token_gather_and_the_backward_pass_never_make_the_host_wait(
    tiny_model_dir, tiny_tokenizer
):
    """With ``trained_positions`` from the collator, gathering the trained positions, the head's loss and the
    whole backward pass have no operation that reads a device value on the host (the boolean-mask gather did,
    twice a step; the GPU then idled while the host queued the backward pass). ``set_sync_debug_mode("error")``
    raises on any such operation. (transformers' mask preparation still reads the positions once per forward.)"""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).cuda()
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    module = TrainedTokenLoss(model)
    decoder, head = module.parts
    batch = to_device(pack(encode(tiny_tokenizer)), "cuda")
    inputs = model_inputs(
        batch["input_ids"], None, batch["position_ids"], batch["cu_seq_lens"], batch["max_length"]
    )

    def loss(positions):
        hidden = decoder(**inputs).last_hidden_state
        torch.cuda.set_sync_debug_mode("error")
        try:
            rows, targets = trained_rows(hidden, batch["labels"], positions)
            head_loss(head, rows, targets, module.chunk).backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")

    with packed_attention(model):
        warm_sum, warm_count = module(**batch)  # the first backward sets up kernels and handles
        (warm_sum / warm_count).backward()
        with pytest.raises(RuntimeError, match="synchroniz"):  # the check sees a wait where there is one
            loss(None)
        loss(batch["trained_positions"])
