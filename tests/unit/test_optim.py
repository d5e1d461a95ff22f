"""The optimizer registry: torch's AdamW is the fused one on a single CUDA device, the default elsewhere."""

from __future__ import annotations

import pytest
import torch

from tuneloop.train.optim import build_optimizer, get_optimizer_spec

pytestmark = pytest.mark.unit


def adamw(device: str, *, single_process: bool = True) -> torch.optim.Optimizer:
    weight = torch.nn.Parameter(torch.zeros(4))  # host memory: torch's fused AdamW also runs on the CPU
    return build_optimizer("adamw", [weight], lr=1e-3, weight_decay=0.0, device=torch.device(device), single_process=single_process)


def test_adamw_is_fused_on_one_cuda_device_only():
    assert adamw("cuda").defaults["fused"] is True
    assert not adamw("cuda", single_process=False).defaults["fused"]  # sharded parameters keep torch's default
    assert not adamw("cpu").defaults["fused"]


def test_fused_and_default_adamw_take_the_same_step():
    torch.manual_seed(0)
    start, grads = torch.randn(64), [torch.randn(64) for _ in range(3)]
    results = []
    for device in ("cuda", "cpu"):  # fused (built for "cuda", run on host memory) and the default implementation
        weight = torch.nn.Parameter(start.clone())
        optimizer = build_optimizer("adamw", [weight], lr=1e-2, weight_decay=0.1, device=torch.device(device))
        for grad in grads:
            weight.grad = grad.clone()
            optimizer.step()
        results.append(weight.detach())
    torch.testing.assert_close(results[0], results[1], rtol=1e-6, atol=1e-7)


def test_an_unknown_optimizer_names_the_known_ones():
    with pytest.raises(KeyError, match="adamw_8bit"):
        get_optimizer_spec("adam")
