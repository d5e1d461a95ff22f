"""``torch.nn.attention.varlen.varlen_attn`` across the torch releases tuneloop runs on.

Why this exists: the function is new and its keywords moved between releases that we use side by side (the
GPU machines run torch 2.11, development machines 2.13):

* causal masking was ``is_causal=True`` until pytorch/pytorch#172245 (https://github.com/pytorch/pytorch/pull/172245,
  January 2026) replaced it with ``window_size=(-1, 0)``; the same stack (#172238) added sliding windows;
* ``scale=`` is missing from the earliest releases (the kernel then scales by ``1/sqrt(head_dim)``);
* ``enable_gqa=`` arrived later still; without it key/value heads must be repeated to the query heads.

Version guard: instead of a table of torch versions, the keywords the installed function accepts are read
from its signature once (:func:`installed_varlen_api`), and every call goes through
:func:`causal_varlen_attention`, which maps tuneloop's one meaning (causal, this scale, these kv heads, this
window) onto them. Remove this module once every supported torch has ``window_size``, ``scale`` and
``enable_gqa`` (torch >= 2.13).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class VarlenAPI:
    """What one ``varlen_attn`` accepts beyond ``(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k)``."""

    function: Callable[..., torch.Tensor]
    has_window_size: bool  # causal as window_size=(-1, 0) (newer) rather than is_causal=True (older)
    has_scale: bool
    has_gqa: bool

    @classmethod
    def of(cls, function: Callable[..., torch.Tensor]) -> VarlenAPI:
        names = set(inspect.signature(function).parameters)
        if "window_size" not in names and "is_causal" not in names:
            raise TypeError(f"{function!r}: neither window_size nor is_causal; unknown varlen_attn signature")
        return cls(function, "window_size" in names, "scale" in names, "enable_gqa" in names)


@functools.cache
def installed_varlen_api() -> VarlenAPI | None:
    """The installed torch's ``varlen_attn``, or ``None`` where torch has none (older than 2.9)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return VarlenAPI.of(varlen_attn)


def causal_varlen_attention(
    api: VarlenAPI,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seq_lens: torch.Tensor,
    max_length: int,
    *,
    scale: float | None,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Causal attention within each sequence of a packed batch: ``[T, Hq, D]`` -> ``[T, Hq, D]``.

    ``key``/``value`` may have fewer heads than ``query`` (grouped-query attention; query head ``h`` reads kv
    head ``h // (Hq // Hkv)``, as transformers' ``repeat_kv``). ``sliding_window`` (keys at most
    ``sliding_window - 1`` tokens back) needs an API with ``window_size``.
    """
    kwargs: dict[str, object] = {}
    if api.has_window_size:
        kwargs["window_size"] = (sliding_window - 1 if sliding_window else -1, 0)
    elif sliding_window:
        raise NotImplementedError("this torch's varlen_attn has no window_size; use the masked fallback")
    else:
        kwargs["is_causal"] = True
    head_dim = query.shape[-1]
    if api.has_scale:
        kwargs["scale"] = scale
    elif scale is not None and scale != head_dim**-0.5:
        query = query * (scale * head_dim**0.5)  # the kernel applies 1/sqrt(head_dim); fold in the rest
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        if api.has_gqa:
            kwargs["enable_gqa"] = True
        else:
            key = key.repeat_interleave(groups, dim=1)
            value = value.repeat_interleave(groups, dim=1)
    cu = cu_seq_lens.to(device=query.device, dtype=torch.int32)
    return api.function(query, key, value, cu, cu, max_length, max_length, **kwargs)
