"""Batched generation: a shared prompt prefix computed once gives exactly the tokens of the plain path."""

from __future__ import annotations

import pytest
import torch

from tuneloop.data import ChatRenderer, Message
from tuneloop.evaluate.generate import common_prefix_length, generate_greedy
from tuneloop.models import load_causal_lm

pytestmark = pytest.mark.unit


def test_common_prefix_length():
    assert common_prefix_length([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == 2
    assert common_prefix_length([[1, 2, 3], [1, 2, 3]]) == 2  # each keeps one token of its own
    assert common_prefix_length([[1, 2, 3]]) == 0
    assert common_prefix_length([[7, 1], [8, 1]]) == 0


@pytest.fixture(scope="module")
def tiny_lm(tiny_model_dir):
    return load_causal_lm(str(tiny_model_dir), torch.float32, torch.device("cpu")).eval()


def few_shot_prompts(tokenizer) -> list[list[int]]:
    renderer = ChatRenderer(tokenizer)
    shots = [Message("user", "refund my second charge"), Message("assistant", "billing"),
             Message("user", "dashboard crashes on export"), Message("assistant", "bug_report")]
    system = [Message("system", "Classify the message into exactly one of these categories: billing, bug_report, onboarding.")]
    texts = ["how do I invite my team", "charged twice", "the page is blank after login on Firefox", "hi"]
    return [renderer.prompt_ids([*system, *shots, Message("user", t)]) for t in texts]


def test_shared_prefix_gives_the_same_tokens(tiny_lm, tiny_tokenizer):
    prompts = few_shot_prompts(tiny_tokenizer)
    assert common_prefix_length(prompts) > 40
    kwargs = dict(pad_token_id=tiny_tokenizer.pad_token_id, stop_token_ids=[tiny_tokenizer.eos_token_id], max_new_tokens=12)
    plain = generate_greedy(tiny_lm, prompts, batch_size=3, share_prefix=False, **kwargs)
    shared = generate_greedy(tiny_lm, prompts, batch_size=3, share_prefix=True, **kwargs)
    one_by_one = [generate_greedy(tiny_lm, [p], batch_size=1, **kwargs)[0] for p in prompts]
    assert shared == plain == one_by_one
    assert all(len(ids) > 0 for ids in shared)


def test_generation_stops_at_the_stop_token(tiny_lm, tiny_tokenizer):
    prompts = few_shot_prompts(tiny_tokenizer)
    kwargs = dict(pad_token_id=tiny_tokenizer.pad_token_id, max_new_tokens=12, batch_size=4)
    free = generate_greedy(tiny_lm, prompts, stop_token_ids=[tiny_tokenizer.eos_token_id], **kwargs)
    # make the first token each prompt produced a stop token: nothing may be returned
    stops = sorted({ids[0] for ids in free})
    stopped = generate_greedy(tiny_lm, prompts, stop_token_ids=stops, **kwargs)
    for ids in stopped:
        assert not set(ids) & set(stops)
    assert stopped[0] == []
    ticks = []
    generate_greedy(tiny_lm, prompts, stop_token_ids=stops, on_batch=ticks.append, **{**kwargs, "batch_size": 3})
    assert ticks == [3, 1]
