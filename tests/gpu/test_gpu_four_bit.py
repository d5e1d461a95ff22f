"""The traced 4-bit dequantization compiled QLoRA layers use is bitsandbytes' own, on CUDA.

On the CPU, bitsandbytes' dequantization (0.50) only agrees with its quantization when weight rows are whole
blocks, so the unit tests use such widths; its CUDA kernel, like its quantization, reads the weight as one flat
run of blocks. These shapes include rows that are not whole blocks, an odd count of blocks per nested block,
and the widths of an 8B model's linears.
"""

from __future__ import annotations

import pytest
import torch

from tuneloop.train.fast.four_bit import dequantize_4bit, four_bit_parts, traced_dequantize_4bit

from .conftest import needs_bitsandbytes

pytestmark = [pytest.mark.gpu, needs_bitsandbytes]


def quantized_linear(shape: tuple[int, int], nested: bool, quant_type: str):
    import bitsandbytes as bnb

    out_features, in_features = shape
    layer = bnb.nn.Linear4bit(
        in_features, out_features, bias=False, compute_dtype=torch.bfloat16, compress_statistics=nested,
        quant_type=quant_type,
    )  # fmt: skip
    weight = torch.randn(shape, dtype=torch.bfloat16)
    layer.weight = bnb.nn.Params4bit(
        weight, requires_grad=False, compress_statistics=nested, quant_type=quant_type
    )
    return layer.cuda()


@pytest.mark.parametrize("shape", [(40, 96), (1000, 328), (4096, 14336)])
@pytest.mark.parametrize(
    "nested, quant_type",
    [(True, "nf4"), (False, "nf4"), (True, "fp4")],
    ids=["nf4-double-quant", "nf4", "fp4"],
)
def test_traced_dequantization_is_bitsandbytes_cuda_dequantization(shape, nested, quant_type):
    import bitsandbytes as bnb

    torch.manual_seed(0)
    layer = quantized_linear(shape, nested, quant_type)
    tensors, layout = four_bit_parts(layer)
    want = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    assert torch.equal(dequantize_4bit(*tensors, layout), want)  # eagerly: bitsandbytes' kernels themselves
    assert torch.equal(traced_dequantize_4bit(*tensors, layout), want)  # the traced ops, run op by op
    assert torch.equal(traced_dequantize_4bit(*tensors, layout, again=True), want)
    compiled = torch.compile(traced_dequantize_4bit, fullgraph=True)(*tensors, layout)
    # one Inductor kernel; with double quantisation it may fuse ``scale * absmax + offset`` into one rounding
    torch.testing.assert_close(compiled, want, rtol=2**-8, atol=0)
    assert (compiled == want).float().mean() > 0.999
