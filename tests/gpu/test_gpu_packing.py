"""Packing on CUDA: the varlen flash kernel against the padded path, in bf16 (skipped without CUDA).

On CPU the packed row takes the block-diagonal SDPA fallback (tests/unit/test_packing.py); here it takes
``torch.nn.attention.varlen.varlen_attn``, whose result must match padded SDPA to bf16 precision.
"""

from __future__ import annotations

import json

import pytest
import torch

from tuneloop import train
from tuneloop.compat.varlen_attn import installed_varlen_api
from tuneloop.data import ChatRenderer, Conversation, Message, RowRef
from tuneloop.train.batching import collate, to_device
from tuneloop.train.fast.attention import (
    _equal_rows_kernel,
    _flash_api,
    _varlen_kernel,
    packed_attention,
    varlen_attention_forward,
)
from tuneloop.train.fast.packing import pack
from tuneloop.train.loss import TrainedTokenLoss

pytestmark = pytest.mark.gpu

needs_varlen = pytest.mark.skipif(installed_varlen_api() is None, reason="this torch has no varlen_attn")

ROWS = [
    ("refund please", "billing"),
    ("the export page crashes on open and the whole tab goes white", "bug"),
    ("invite team", "onboarding and then billing twice"),
    ("charged twice this month ok", "billing twice, then a long explanation"),
]


def encode(tokenizer):
    renderer = ChatRenderer(tokenizer)
    return [
        renderer.encode(Conversation((Message("user", t), Message("assistant", a)), RowRef("x", i)))
        for i, (t, a) in enumerate(ROWS)
    ]


@needs_varlen
def test_the_kernel_path_is_taken_and_matches_masked_sdpa():
    """Random q/k/v with grouped kv heads: the varlen kernel equals the masked fallback (fp32 on the same data)."""
    generator = torch.Generator(device="cuda").manual_seed(0)
    lengths = [37, 5, 120]
    total, heads, kv_heads, dim = sum(lengths), 8, 2, 64
    query = torch.randn(1, heads, total, dim, device="cuda", generator=generator, dtype=torch.bfloat16)
    key, value = (
        torch.randn(1, kv_heads, total, dim, device="cuda", generator=generator, dtype=torch.bfloat16)
        for _ in range(2)
    )
    cu = torch.tensor([0, 37, 42, 162], dtype=torch.int32, device="cuda")

    class Attention(torch.nn.Module):
        num_key_value_groups = heads // kv_heads
        is_causal = True

    kwargs = {
        "cu_seq_lens_q": cu,
        "cu_seq_lens_k": cu,
        "max_length_q": max(lengths),
        "max_length_k": max(lengths),
    }
    assert _flash_api(query, 0.0, None, max(lengths)) is not None  # the flash kernel, not the masked fallback
    fast, _ = varlen_attention_forward(Attention(), query, key, value, None, scaling=dim**-0.5, **kwargs)
    masked, _ = varlen_attention_forward(
        Attention(), *(t.float() for t in (query, key, value)), None, scaling=dim**-0.5, **kwargs
    )
    assert fast.dtype == torch.bfloat16 and fast.shape == (1, total, heads, dim)
    torch.testing.assert_close(fast.float(), masked, rtol=2e-2, atol=2e-2)


@needs_varlen
def test_a_row_of_full_length_examples_runs_as_equal_rows_and_matches_the_varlen_kernel(monkeypatch):
    """Three examples of the full ``max_length`` (96) fill the row: SDPA over 3 rows, the varlen kernel's values
    and gradients (bf16), and no varlen call."""
    generator = torch.Generator(device="cuda").manual_seed(0)
    rows, length, heads, kv_heads, dim = 3, 96, 8, 2, 64
    shapes = (
        (1, heads, rows * length, dim),
        (1, kv_heads, rows * length, dim),
        (1, kv_heads, rows * length, dim),
    )
    query, key, value = (
        torch.randn(s, device="cuda", generator=generator, dtype=torch.bfloat16).requires_grad_()
        for s in shapes
    )
    cu = torch.arange(0, rows * length + 1, length, dtype=torch.int32, device="cuda")
    kwargs = {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": length, "max_length_k": length}

    class Attention(torch.nn.Module):
        num_key_value_groups = heads // kv_heads
        is_causal = True

    calls = []
    monkeypatch.setattr(
        "tuneloop.train.fast.attention._equal_rows_kernel",
        lambda *args: calls.append(1) or _equal_rows_kernel(*args),
    )
    grad = torch.randn(1, rows * length, heads, dim, device="cuda", generator=generator, dtype=torch.bfloat16)
    out, _ = varlen_attention_forward(Attention(), query, key, value, None, scaling=dim**-0.5, **kwargs)
    grads = torch.autograd.grad(out, (query, key, value), grad)
    api = _flash_api(query, 0.0, None, length)
    want = _varlen_kernel(api, query, key, value, cu, length, dim**-0.5, None)
    want_grads = torch.autograd.grad(want, (query, key, value), grad)
    assert calls == [1] and out.shape == want.shape == (1, rows * length, heads, dim)
    torch.testing.assert_close(out, want, rtol=2e-2, atol=2e-2)
    for got, expected in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=2e-2, atol=5e-2)
    # one example shorter: the row is not equal rows, and the varlen kernel takes it
    short = torch.tensor([0, length, 2 * length, 3 * length - 1], dtype=torch.int32, device="cuda")
    varlen_attention_forward(
        Attention(), *(t[:, :, :-1] for t in (query, key, value)), None, scaling=dim**-0.5,
        **{**kwargs, "cu_seq_lens_q": short, "cu_seq_lens_k": short},
    )  # fmt: skip
    assert calls == [1]


@needs_varlen
@pytest.mark.parametrize(
    "weights", [torch.float32, torch.bfloat16], ids=["fp32-weights-autocast", "bf16-weights"]
)
def test_packed_loss_and_gradients_match_padded_in_bf16(tiny_model_dir, tiny_tokenizer, weights):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=weights).cuda()
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=["q_proj", "v_proj", "o_proj"],
        init_lora_weights=False,
    )
    model = get_peft_model(base, config)
    items = encode(tiny_tokenizer)

    def run(batch):
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss_sum, count = TrainedTokenLoss(model)(**to_device(batch, "cuda"))
        (loss_sum / count).backward()
        return float(loss_sum / count), torch.cat(
            [p.grad.float().flatten() for p in model.parameters() if p.requires_grad]
        )

    padded_loss, padded_grad = run(collate(items, tiny_tokenizer.pad_token_id))
    with packed_attention(model):
        packed_loss, packed_grad = run(pack(items))
    assert packed_loss == pytest.approx(padded_loss, rel=2e-2)
    assert torch.nn.functional.cosine_similarity(packed_grad, padded_grad, dim=0) > 0.99


@needs_varlen
def test_a_packed_bf16_run_starts_where_the_padded_one_does(tiny_config, tmp_path):
    options = {"precision": "bf16", "lora_dropout": 0.0}
    padded = train.run(tiny_config(output_dir=str(tmp_path / "padded"), **options))
    packed = train.run(tiny_config(output_dir=str(tmp_path / "packed"), packing=True, **options))

    def first_loss(run_dir):
        return next(
            json.loads(line)["loss"]
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in line
        )

    assert first_loss(packed.output_dir) == pytest.approx(first_loss(padded.output_dir), rel=2e-2)
    assert packed.steps == padded.steps
