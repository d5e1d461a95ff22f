"""tuneloop.compat.varlen_attn: one meaning (causal, scale, GQA, window) mapped onto each varlen_attn signature.

The flash kernel behind ``varlen_attn`` needs CUDA, so here each release's *signature* is given a reference
implementation in plain SDPA (per sequence, exactly what the kernel computes), and the shim must produce the
same result through any of them. The real kernel is compared in tests/gpu/test_gpu_packing.py.
"""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F

from tuneloop.compat.varlen_attn import VarlenAPI, causal_varlen_attention, installed_varlen_api

pytestmark = pytest.mark.unit

LENGTHS = (5, 1, 7)
HEADS, KV_HEADS, DIM = 4, 2, 8


def _per_sequence(query, key, value, cu, *, causal, left, scale):
    """Attention of each sequence on its own; keys at most ``left`` tokens back (``-1``: unlimited)."""
    outputs = []
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
        i = torch.arange(end - start)
        allowed = (
            (i[:, None] >= i[None, :]) if causal else torch.ones(end - start, end - start, dtype=torch.bool)
        )
        if left >= 0:
            allowed &= (i[:, None] - i[None, :]) <= left
        q, k, v = (t[start:end].transpose(0, 1) for t in (query, key, value))
        outputs.append(
            F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale).transpose(0, 1)
        )
    return torch.cat(outputs)


def newer_release(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                  window_size=(-1, -1), enable_gqa=False):  # fmt: skip
    """torch >= 2.13's keywords: causal as window_size=(-1, 0), scale, enable_gqa."""
    if key.shape[1] != query.shape[1]:
        assert enable_gqa, "grouped kv heads without enable_gqa"
        key, value = (t.repeat_interleave(query.shape[1] // t.shape[1], dim=1) for t in (key, value))
    return _per_sequence(
        query, key, value, cu_seq_q, causal=window_size[1] == 0, left=window_size[0], scale=scale
    )


def older_release(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    """The first releases: is_causal, no scale (1/sqrt(D)), equal head counts only."""
    assert key.shape[1] == query.shape[1], "this release has no grouped-query attention"
    return _per_sequence(query, key, value, cu_seq_q, causal=is_causal, left=-1, scale=None)


def inputs(seed=0):
    generator = torch.Generator().manual_seed(seed)
    total = sum(LENGTHS)
    query = torch.randn(total, HEADS, DIM, generator=generator)
    key, value = (torch.randn(total, KV_HEADS, DIM, generator=generator) for _ in range(2))
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
    return query, key, value, cu


def expected(query, key, value, cu, scale, left=-1):
    groups = HEADS // KV_HEADS
    key, value = (t.repeat_interleave(groups, dim=1) for t in (key, value))
    return _per_sequence(query, key, value, cu, causal=True, left=left, scale=scale)


@pytest.mark.parametrize("release", [newer_release, older_release], ids=["window_size", "is_causal"])
@pytest.mark.parametrize("scale", [None, 0.2])
def test_every_signature_gives_the_same_causal_grouped_attention(release, scale):
    query, key, value, cu = inputs()
    api = VarlenAPI.of(release)
    out = causal_varlen_attention(api, query, key, value, cu, max(LENGTHS), scale=scale)
    torch.testing.assert_close(out, expected(query, key, value, cu, scale), rtol=1e-5, atol=1e-5)


def test_sliding_window_where_the_api_has_one_and_a_clear_error_where_not():
    query, key, value, cu = inputs(1)
    out = causal_varlen_attention(
        VarlenAPI.of(newer_release), query, key, value, cu, 7, scale=None, sliding_window=3
    )
    torch.testing.assert_close(out, expected(query, key, value, cu, None, left=2), rtol=1e-5, atol=1e-5)
    with pytest.raises(NotImplementedError, match="window_size"):
        causal_varlen_attention(
            VarlenAPI.of(older_release), query, key, value, cu, 7, scale=None, sliding_window=3
        )


def test_an_unknown_signature_is_refused_rather_than_called_without_causality():
    def neither(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k):
        return query

    with pytest.raises(TypeError, match="unknown varlen_attn signature"):
        VarlenAPI.of(neither)


def test_the_installed_torch_is_understood():
    """The version guard itself: the installed function's keywords are recognised (or torch has none)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        assert installed_varlen_api() is None
        return
    api = installed_varlen_api()
    names = set(inspect.signature(varlen_attn).parameters)
    assert api is not None and api.function is varlen_attn
    assert api.has_window_size == ("window_size" in names)
    assert api.has_scale == ("scale" in names) and api.has_gqa == ("enable_gqa" in names)
