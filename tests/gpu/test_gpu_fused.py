"""Fused LoRA linears and RMSNorms on CUDA (bf16 autocast): no less accurate than PEFT's path, fewer kernels.

Both paths are compared with the same weights computed in fp32; on CUDA ``F.rms_norm`` is torch's fused kernel,
so the norms' elementwise ops go as well as the adapters' (on the CPU the norm stays composite).
"""

from __future__ import annotations

import copy

import pytest
import torch

from tests.unit.test_fast_fused import lora_model, relative_error, step
from tests.unit.test_packing import encode
from tuneloop.train.batching import collate
from tuneloop.train.fast.fused import fused_layers

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_cuda_bf16_as_accurate_as_peft_with_fewer_ops(tiny_model_dir, tiny_tokenizer):
    model = lora_model(tiny_model_dir, dtype=torch.bfloat16).cuda()
    batch = collate(encode(tiny_tokenizer), tiny_tokenizer.pad_token_id)
    _, reference, _ = step(copy.deepcopy(model).float(), batch)
    _, grads, ops = step(model, batch, autocast=True)
    with fused_layers(model, enabled=True) as counts:
        _, fused_grads, fused_ops = step(model, batch, autocast=True)
    assert counts["lora_linears"] > 0 and counts["rms_norms"] > 0
    peft_error = sum(relative_error(grads[n], g) for n, g in reference.items()) / len(reference)
    fused_error = sum(relative_error(fused_grads[n], g) for n, g in reference.items()) / len(reference)
    assert fused_error <= 1.1 * peft_error
    norm_ops = ("aten.pow", "aten.rsqrt", "aten.mean")
    assert sum(fused_ops[op] for op in norm_ops) < sum(ops[op] for op in norm_ops) / 2, (ops, fused_ops)
    assert sum(fused_ops.values()) < 0.75 * sum(ops.values())
