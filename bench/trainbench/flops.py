"""Model FLOPs of a LoRA training step, as issue 7 defines them, and MFU against the datasheet peak.

Counted per real (non-pad) token:

* forward and input gradients of every linear layer, the LM head included: ``2 + 2`` FLOPs per weight
  (the frozen weights get no weight gradient);
* the adapters: forward, input gradient and weight gradient, ``2 + 2 + 2`` FLOPs per adapter weight;
* causal attention at the sequence's actual length: query ``i`` (1-based) attends to ``i`` keys, and each of
  ``QK^T`` and ``PV`` costs ``2 * i * d_attn`` FLOPs forward and twice that backward (``3x`` in all).

Recompute (activation checkpointing) is not counted: MFU measures useful work, so a stack that recomputes
pays for it in time. Padding is not counted either: a padded stack spends FLOPs on pad tokens that do no
work. Every stack of a workload is scored by the same count, so MFU ranks them exactly as tokens/s does,
and says how far each is from the ceiling.

For the Llama-3.1-8B shape at 2,048 tokens this gives ~31.9 GFLOP per token (the issue's number); the H100
and H200 datasheet dense bf16 peak is 989 TFLOP/s.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

DATASHEET_BF16_DENSE_FLOPS = 989e12  # H100/H200 SXM, dense (no sparsity)

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class DecoderShape:
    """The sizes of a Llama-style decoder that its FLOPs and memory depend on."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    head_dim: int | None = None

    @property
    def attention_dim(self) -> int:
        return self.heads * (self.head_dim or self.hidden // self.heads)

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * (self.head_dim or self.hidden // self.heads)

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each adapted linear of one layer, by module name."""
        h, a, kv, i = self.hidden, self.attention_dim, self.kv_dim, self.intermediate
        return {
            "q_proj": (h, a),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (a, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    def linear_params(self) -> int:
        """Weights of every linear layer: the decoder's and the LM head's."""
        per_layer = sum(n_in * n_out for n_in, n_out in self.linear_shapes().values())
        return self.layers * per_layer + self.hidden * self.vocab

    def lora_params(self, rank: int, targets: Iterable[str] = LORA_TARGETS) -> int:
        shapes = self.linear_shapes()
        return self.layers * sum(rank * (shapes[name][0] + shapes[name][1]) for name in targets)


def sequence_flops(shape: DecoderShape, length: int, lora_rank: int) -> float:
    """Model FLOPs of one training step over one sequence of ``length`` real tokens."""
    dense = (4 * shape.linear_params() + 6 * shape.lora_params(lora_rank)) * length
    attended_pairs = length * (length + 1) / 2  # causal: query i sees keys 1..i
    attention = 3 * 2 * 2 * shape.attention_dim * attended_pairs * shape.layers
    return dense + attention


def batch_flops(shape: DecoderShape, lengths: Iterable[int], lora_rank: int) -> float:
    """Model FLOPs of the sequences of a batch, each at its own length (padding costs nothing here)."""
    return sum(sequence_flops(shape, n, lora_rank) for n in lengths)


def flops_per_token(shape: DecoderShape, length: int, lora_rank: int) -> float:
    return sequence_flops(shape, length, lora_rank) / length


def mfu(model_flops: float, seconds: float, peak: float = DATASHEET_BF16_DENSE_FLOPS) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the datasheet peak."""
    return model_flops / seconds / peak if seconds > 0 else 0.0
