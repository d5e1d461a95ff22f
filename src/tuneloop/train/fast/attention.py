"""Attention that never crosses the examples of a packed row, registered with transformers by name.

A packed row (:mod:`tuneloop.train.fast.packing`) is one sequence to the model but several examples to the
loss. Plain causal attention would let example 2 attend to example 1; transformers' own ``sdpa`` path would
detect the restarts in ``position_ids`` and build a dense ``[T, T]`` block mask, which costs memory
quadratic in the row and keeps SDPA off its flash kernel. Instead:

* on CUDA (fp16/bf16) the row goes to ``torch.nn.attention.varlen.varlen_attn`` with the row's
  ``cu_seq_lens``: flash attention over each example, no mask, no padding, through the version shim in
  :mod:`tuneloop.compat.varlen_attn`;
* on CUDA, a row whose examples all have the run's full length (``max_length``: fixed-length chunks of a corpus,
  issue 7's workload a) is a plain batch of equal rows, so it goes to SDPA as ``[n, H, max_length, D]`` with
  causal masking: SDPA picks cuDNN's attention on Hopper, which took half the time of ``varlen_attn``'s FA2
  kernel (2 x 2,048 tokens, 32/8 heads of 128, H200: 0.65 against 1.22 ms forward and backward). Whether the
  row is such a batch is read from shapes alone (``n * max_length == T``, which only full-length examples
  can fill), so the compiled layer guards on it instead of reading data; a run that meets both kinds of
  row compiles a graph for each;
* elsewhere (CPU, fp32, attention dropout, a torch without ``varlen_attn``) SDPA runs with a block-diagonal
  causal mask built from the same boundaries: correct, and slower.

Both paths run inside compiled decoder layers (``kernels: compile``), so neither may branch on a value that
changes per batch: the masked path computes everything from the ``cu_seq_lens`` tensor, and the flash path's
``max_length`` is the run's one bound (:func:`tuneloop.train.fast.packing.pack`), not the batch's longest.

How it plugs in, through transformers' official registries only: :func:`packed_attention` registers
:func:`varlen_attention_forward` in ``AttentionInterface`` and :func:`varlen_mask` in
``AttentionMaskInterface`` under :data:`ATTENTION_NAME`, then selects it on *one model instance* with
``set_attn_implementation`` for the duration of packed training, and restores the previous implementation
afterwards. The boundaries reach the attention function as the keyword arguments transformers forwards from
the model's forward (``cu_seq_lens_q``/``cu_seq_lens_k``, ``max_length_q``/``max_length_k``).

The implementation also answers padded batches correctly (a batch with a padding mask is handed to
transformers' ``sdpa`` mask and attention unchanged), so anything that runs the model while it is selected,
say a padded generation, still gets what ``sdpa`` would give it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from tuneloop.compat.varlen_attn import VarlenAPI, causal_varlen_attention, installed_varlen_api

ATTENTION_NAME = "tuneloop_varlen"
FLASH_DTYPES = (torch.float16, torch.bfloat16)
FLASH_MAX_HEAD_DIM = 256
_INSTALLED_VARLEN: VarlenAPI | None = installed_varlen_api()  # a constant of the installed torch


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """An ``AttentionInterface`` function: ``query`` ``[B, Hq, T, D]``, ``key``/``value`` ``[B, Hkv, S, D]``.

    Returns ``([B, T, Hq, D], None)`` like every transformers attention function.
    """
    if kwargs.get("softcap") is not None:
        raise ValueError(
            "packing does not support attention logit soft-capping (e.g. Gemma 2); set packing: false"
        )
    sliding_window = kwargs.get("sliding_window")
    cu_seq_lens = kwargs.get("cu_seq_lens_q")
    if cu_seq_lens is not None:  # a packed row from tuneloop.train.fast.packing
        if query.shape[0] != 1:
            raise ValueError(f"a packed batch is one row; got {query.shape[0]} rows with cu_seq_lens")
        max_length = int(kwargs.get("max_length_q") or query.shape[2])
        api = _flash_api(query, dropout, sliding_window, max_length)
        examples = cu_seq_lens.shape[0] - 1
        if api is not None and not sliding_window and examples * max_length == query.shape[2]:
            return _equal_rows_kernel(query, key, value, examples, scaling), None
        if api is not None:
            return _varlen_kernel(
                api, query, key, value, cu_seq_lens, max_length, scaling, sliding_window
            ), None
        if _is_block_mask(attention_mask, query) and not sliding_window:  # built once per forward (model_inputs)
            return sdpa_attention_forward(
                module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
            )
        segments = segments_from_boundaries(cu_seq_lens, query.shape[2])
    elif attention_mask is not None or query.shape[2] != key.shape[2] or query.shape[2] == 1:
        # padded batches (transformers' sdpa mask), and decoding with a cache: plain sdpa
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    else:  # no mask, no boundaries: examples may still be packed by position_ids alone
        segments = segments_from_positions(
            kwargs.get("position_ids"), query.shape[0], query.shape[2], query.device
        )
    mask = block_causal_mask(segments, sliding_window)
    return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)


def _is_block_mask(mask: torch.Tensor | None, query: torch.Tensor) -> bool:
    """A boolean ``[1, 1, T, T]`` mask for this packed row (what ``model_inputs`` builds on the CPU)."""
    length = query.shape[2]
    return mask is not None and mask.dtype == torch.bool and tuple(mask.shape) == (1, 1, length, length)


def varlen_mask(**kwargs: Any) -> torch.Tensor | None:
    """An ``AttentionMaskInterface`` function: no dense mask where none is needed.

    Without a padding mask and without a cache offset, the attention function has all it needs (the row's
    boundaries, or plain causality), so no ``[T, T]`` mask is built. Anything else (padding, decoding with a
    cache) gets exactly the mask ``sdpa`` would get.
    """
    if kwargs.get("attention_mask") is None and _no_past_tokens(kwargs):
        return None
    return sdpa_mask(**kwargs)


def _no_past_tokens(kwargs: dict[str, Any]) -> bool:
    """Queries and keys are the same tokens. Newer transformers pass ``q_length``/``q_offset``, older ones
    ``cache_position``; an offset given as a tensor (static caches) counts as past tokens."""
    kv_length, kv_offset = kwargs.get("kv_length"), kwargs.get("kv_offset", 0)
    if "q_length" in kwargs:
        q_length, q_offset = kwargs["q_length"], kwargs.get("q_offset", 0)
    elif kwargs.get("cache_position") is not None:
        q_length, q_offset = kwargs["cache_position"].shape[0], 0
    else:
        return False
    offsets = (q_offset, kv_offset)
    return all(isinstance(o, int) and o == 0 for o in offsets) and q_length == kv_length


def register_varlen_attention() -> str:
    """Register the attention and mask functions with transformers (idempotent); returns their name."""
    AttentionInterface.register(ATTENTION_NAME, varlen_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, varlen_mask)
    return ATTENTION_NAME


@contextmanager
def packed_attention(model: Any) -> Iterator[None]:
    """Select :data:`ATTENTION_NAME` on this model instance (PEFT-wrapped or not) while the block runs.

    The previous implementation is restored on exit, so the weights saved after training carry no trace of
    it and the model object behaves as loaded for whatever uses it next.
    """
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    previous = target.config._attn_implementation
    target.set_attn_implementation(register_varlen_attention())
    if target.config._attn_implementation != ATTENTION_NAME:
        raise ValueError(
            f"{type(target).__name__} cannot switch its attention implementation, so packed examples could "
            "attend to each other; set packing: false for this model"
        )
    try:
        yield
    finally:
        target.set_attn_implementation(previous)


def segments_from_boundaries(cu_seq_lens: torch.Tensor, length: int) -> torch.Tensor:
    """``[1, T]``: the index of the example each position of a packed row belongs to.

    Searched in the whole ``cu_seq_lens`` (its leading 0 counted, then taken off) rather than in
    ``cu_seq_lens[1:]``: that slice has one element for a one-example row, a size dynamo specialises on,
    which compiled another graph for such a batch."""
    positions = torch.arange(length, device=cu_seq_lens.device)
    return (torch.searchsorted(cu_seq_lens.long(), positions, right=True) - 1).unsqueeze(0)


def segments_from_positions(
    position_ids: torch.Tensor | None, rows: int, length: int, device: torch.device
) -> torch.Tensor:
    """``[B, T]`` example indices from positions: a new example starts wherever the position does not go up by 1."""
    if position_ids is None:
        return torch.zeros((rows, length), dtype=torch.long, device=device)
    position_ids = position_ids[:, -length:].expand(rows, -1)
    steps = torch.diff(position_ids, prepend=position_ids[:, :1] - 1, dim=-1)
    return (steps != 1).cumsum(-1)


def block_causal_mask(segments: torch.Tensor, sliding_window: int | None = None) -> torch.Tensor:
    """``[B, 1, T, T]`` boolean mask: causal, within one example, and within the sliding window if any."""
    positions = torch.arange(segments.shape[-1], device=segments.device)
    behind = positions[:, None] - positions[None, :]
    allowed = (segments[:, :, None] == segments[:, None, :]) & (behind >= 0)
    if sliding_window:
        allowed = allowed & (behind < sliding_window)
    return allowed.unsqueeze(1)


def _flash_api(
    query: torch.Tensor, dropout: float, sliding_window: int | None, max_length: int
) -> VarlenAPI | None:
    """The installed ``varlen_attn`` if its flash kernel can run this call, else ``None`` (masked SDPA then).

    Runs inside compiled layers, so it reads :data:`_INSTALLED_VARLEN` (resolved once at import) rather than
    calling :func:`installed_varlen_api`: dynamo would trace through its cache wrapper into the signature
    inspection on every compile.
    """
    api = _INSTALLED_VARLEN
    if api is None or not query.is_cuda or dropout > 0.0:
        return None
    head_dim = query.shape[-1]
    if head_dim > FLASH_MAX_HEAD_DIM or head_dim % 8 or _compute_dtype(query) not in FLASH_DTYPES:
        return None
    windowed = sliding_window is not None and max_length > sliding_window
    return api if api.has_window_size or not windowed else None


def _compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype the kernel runs in: autocast's where it is on (RoPE leaves q/k in fp32 next to fp32 weights)."""
    device_type = tensor.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return tensor.dtype


def _varlen_kernel(
    api: VarlenAPI,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seq_lens: torch.Tensor,
    max_length: int,
    scaling: float | None,
    sliding_window: int | None,
) -> torch.Tensor:
    dtype = _compute_dtype(query)
    q, k, v = (t[0].transpose(0, 1).to(dtype) for t in (query, key, value))  # [1, H, T, D] -> [T, H, D]
    window = sliding_window if sliding_window is not None and max_length > sliding_window else None
    out = causal_varlen_attention(api, q, k, v, cu_seq_lens, max_length, scale=scaling, sliding_window=window)
    return out.unsqueeze(0)  # [1, T, Hq, D]


def _equal_rows_kernel(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, rows: int, scaling: float | None
) -> torch.Tensor:
    """A packed row of ``rows`` examples of one length as that many rows of causal SDPA: ``[1, T, Hq, D]``."""
    dtype = _compute_dtype(query)
    length = query.shape[2] // rows

    def as_rows(t: torch.Tensor) -> torch.Tensor:  # [1, H, T, D] -> [rows, H, length, D]
        return t.transpose(1, 2).reshape(rows, length, t.shape[1], t.shape[3]).transpose(1, 2).to(dtype)

    q, k, v = as_rows(query), as_rows(key), as_rows(value)
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, is_causal=True, scale=scaling, enable_gqa=q.shape[1] != k.shape[1]
    )
    return out.transpose(1, 2).reshape(1, query.shape[2], query.shape[1], query.shape[3])
