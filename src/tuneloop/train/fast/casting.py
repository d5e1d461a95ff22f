"""Adapter inputs stay in the autocast dtype during training: PEFT's per-layer upcast is skipped under autocast.

PEFT keeps LoRA weights in fp32 over a bf16 base (so small updates are not rounded away) and, to match them,
casts each LoRA layer's input to fp32 before ``lora_A``. Under autocast that cast is undone at once: the
``lora_A`` matmul casts its input back to bf16. The pair costs two full copies of the layer input forward and
two more backward, for every adapted linear layer: on the embedded 135M model (210 adapted layers, batches
of ~7,000 tokens) those copies were the largest GPU cost of a step, ahead of the matmuls (issue 7, H200
profile). Skipping the upcast gives the same numbers: bf16 -> fp32 -> bf16 is exact, and the matmul sees the
same bf16 operands.

So for the training loop, and only there, the SFT recipe switches PEFT's casting off with PEFT's own
``disable_input_dtype_casting`` (a public helper; no PEFT code is replaced). Not for DoRA: its magnitude
and norm arithmetic runs on the cast input outside the matmuls. Not without autocast: an fp32 run has no
casts, and a bf16 input meeting fp32 weights without autocast would be an error, so generation and serving
(which run without autocast) keep PEFT's default.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch


def adapter_inputs_in_autocast_dtype(model: Any, *, autocast_dtype: torch.dtype | None, dora: bool) -> AbstractContextManager[Any]:
    """A context that, under autocast, leaves LoRA layer inputs in the autocast dtype (see the module docstring)."""
    if autocast_dtype is None or dora:
        return nullcontext()
    from peft.helpers import disable_input_dtype_casting

    return disable_input_dtype_casting(model)
