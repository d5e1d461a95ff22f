"""The optimizer registry (``optimizer:`` in the config): torch AdamW, or bitsandbytes' 8-bit and paged ones.

8-bit AdamW keeps both moments in blockwise-quantized 8 bits (2 bytes per trained parameter instead of 8);
paged variants put the state in unified memory that the driver can evict to the host when a long batch
spikes activation memory. bitsandbytes is optional and CUDA-only, so it is imported only when chosen.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Iterable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class OptimizerSpec:
    """Where an optimizer class lives and what its state costs per trained parameter (for the estimate)."""

    name: str
    module: str
    cls: str
    state_bytes_per_param: float
    needs_cuda: bool = False
    paged: bool = False


OPTIMIZERS: dict[str, OptimizerSpec] = {
    spec.name: spec
    for spec in (
        OptimizerSpec("adamw", "torch.optim", "AdamW", 8.0),
        # 2 bytes of moments + one fp32 absmax per 256-value block per moment (bitsandbytes' 8-bit blocks)
        OptimizerSpec("adamw_8bit", "bitsandbytes.optim", "AdamW8bit", 2.0 + 8 / 256, needs_cuda=True),
        OptimizerSpec("paged_adamw", "bitsandbytes.optim", "PagedAdamW", 8.0, needs_cuda=True, paged=True),
        OptimizerSpec(
            "paged_adamw_8bit", "bitsandbytes.optim", "PagedAdamW8bit", 2.0 + 8 / 256, needs_cuda=True, paged=True
        ),
    )
}


def get_optimizer_spec(name: str) -> OptimizerSpec:
    try:
        return OPTIMIZERS[name]
    except KeyError:
        raise KeyError(f"unknown optimizer {name!r}; known: {', '.join(sorted(OPTIMIZERS))}") from None


def build_optimizer(
    name: str,
    parameters: Iterable[torch.nn.Parameter],
    *,
    lr: float,
    weight_decay: float,
    device: torch.device,
    single_process: bool = True,
) -> torch.optim.Optimizer:
    """Instantiate ``name`` over ``parameters``; a bitsandbytes optimizer off CUDA is a clear error.

    torch's AdamW on one CUDA device is the fused implementation: one kernel family for every parameter
    instead of a dozen launches per parameter group (a LoRA run has hundreds of small tensors, so on a small
    model the unfused step was 8 ms of a 55 ms step). Several processes keep the default (sharded parameters).
    """
    spec = get_optimizer_spec(name)
    if spec.needs_cuda:
        if device.type != "cuda":
            raise RuntimeError(f"optimizer {name} (bitsandbytes) needs a CUDA GPU; on this machine use adamw")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise RuntimeError(f"optimizer {name} needs bitsandbytes: pip install 'tuneloop[gpu]'")
    cls = getattr(importlib.import_module(spec.module), spec.cls)
    fused = {"fused": True} if spec.module == "torch.optim" and device.type == "cuda" and single_process else {}
    return cls(list(parameters), lr=lr, weight_decay=weight_decay, **fused)
