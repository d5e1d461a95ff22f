"""Chat rendering: completion-only masks, the end-of-turn token, and the truncation guard."""

from __future__ import annotations

import pytest

from tuneloop.data import ChatRenderer, Conversation, DataError, Message, RowRef, encode_dataset
from tuneloop.data.render import IGNORE_INDEX, chat_format_of

pytestmark = pytest.mark.unit

REF = RowRef("tickets.csv", 7)


def convo(*pairs: tuple[str, str]) -> Conversation:
    return Conversation(tuple(Message(role, text) for role, text in pairs), REF)


def trained_text(renderer: ChatRenderer, example) -> list[str]:
    """Decode each contiguous run of trained tokens."""
    runs, current = [], []
    for token, label in zip(example.input_ids, example.labels):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [renderer.tokenizer.decode(run) for run in runs]


def test_end_of_turn_token_is_read_from_the_template(tiny_tokenizer):
    fmt = chat_format_of(tiny_tokenizer)
    assert fmt.eot_token == "<|im_end|>"
    assert fmt.eot_token_id == tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert len(fmt.template_sha256) == 64


def test_trained_tokens_decode_to_exactly_the_answer_and_eot(tiny_tokenizer):
    renderer = ChatRenderer(tiny_tokenizer)
    answer = "billing – refund Ünïcödé 🎉"
    example = renderer.encode(convo(("system", "Pick a label."), ("user", "charged twice"), ("assistant", answer)))
    assert trained_text(renderer, example) == [answer + "<|im_end|>"]


def test_multi_turn_trains_every_assistant_turn_and_nothing_else(tiny_tokenizer):
    renderer = ChatRenderer(tiny_tokenizer)
    example = renderer.encode(
        convo(("user", "hello"), ("assistant", "first answer"), ("user", "and then?"), ("assistant", "second answer"))
    )
    assert trained_text(renderer, example) == ["first answer<|im_end|>", "second answer<|im_end|>"]


def test_untrained_tokens_render_the_template_exactly(tiny_tokenizer):
    """Input ids are the template's own rendering (the prompt exactly as inference tokenizes it)."""
    renderer = ChatRenderer(tiny_tokenizer)
    conversation = convo(("system", "Pick a label."), ("user", "the page is blank"), ("assistant", "bug_report"))
    example = renderer.encode(conversation)
    prompt = renderer.prompt_ids(conversation.prompt)
    assert list(example.input_ids[: len(prompt)]) == prompt
    assert all(label == IGNORE_INDEX for label in example.labels[: len(prompt)])
    full = tiny_tokenizer.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in conversation.messages], tokenize=False
    )
    assert full.startswith(tiny_tokenizer.decode(example.input_ids))


def test_too_long_example_is_an_error_naming_its_row(tiny_tokenizer):
    renderer = ChatRenderer(tiny_tokenizer)
    long = convo(("user", "word " * 200), ("assistant", "billing"))
    with pytest.raises(DataError, match=r"tickets\.csv:7: renders to \d+ tokens, over max_seq_len=64"):
        encode_dataset(renderer, [long], max_seq_len=64, truncation="error")


def test_too_long_example_can_be_dropped_and_counted(tiny_tokenizer):
    renderer = ChatRenderer(tiny_tokenizer)
    short = convo(("user", "hi"), ("assistant", "billing"))
    long = convo(("user", "word " * 200), ("assistant", "billing"))
    kept, report = encode_dataset(renderer, [short, long, short], max_seq_len=64, truncation="drop")
    assert len(kept) == 2
    assert report.dropped_too_long == [str(REF)]
    assert report.trained_tokens == sum(e.num_trained_tokens for e in kept)


def test_template_without_chat_support_is_refused(tiny_tokenizer):
    import copy

    bare = copy.deepcopy(tiny_tokenizer)
    bare.chat_template = None
    with pytest.raises(DataError, match="no chat template"):
        chat_format_of(bare)
