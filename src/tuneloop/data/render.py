"""Render conversations with the model's own chat template into token ids and completion-only labels.

Two decisions here prevent the field's most reported bugs:

* **Train like you infer.** The prompt part of every assistant turn is tokenized exactly as inference will
  tokenize it (the template rendered with ``add_generation_prompt=True``), and the answer is tokenized on its
  own and followed by the end-of-turn token. So the tokens the model learns to produce are the tokens it is
  asked to produce at serving time, with no BPE merge across the prompt/answer boundary.
* **The end-of-turn token is trained.** Loss covers the answer *and* the token that closes the turn; a model
  that never sees it trained never stops generating.

Templates are rendered by ``tokenizer.apply_chat_template``, which runs Jinja in an immutable sandbox.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any, Literal

from tuneloop.data.errors import DataError
from tuneloop.data.types import Conversation, EncodedExample, EncodingReport, Message

IGNORE_INDEX = -100
_PROBE_ANSWER = "tuneloop-probe-answer"


@dataclass(frozen=True)
class ChatFormat:
    """What a run must carry so that export and serving render prompts exactly like training did."""

    template: str
    template_sha256: str
    eot_token: str
    eot_token_id: int
    eot_text: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "template_sha256": self.template_sha256,
            "eot_token": self.eot_token,
            "eot_token_id": self.eot_token_id,
            "eot_text": self.eot_text,
        }

    @classmethod
    def from_dict(cls, template: str, data: dict[str, Any]) -> ChatFormat:
        return cls(template, data["template_sha256"], data["eot_token"], int(data["eot_token_id"]), data.get("eot_text", ""))


def _render(tokenizer: Any, messages: Iterable[Message], *, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in messages],
        tokenize=False,
        add_generation_prompt=generation_prompt,
    )


def chat_format_of(tokenizer: Any) -> ChatFormat:
    """Find the template's end-of-turn token by rendering a probe answer and reading what closes it.

    Falls back to the tokenizer's EOS token when the template writes nothing special after an answer.
    """
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise DataError("tokenizer", "has no chat template; set one on the model or pick an instruct model")
    if not isinstance(template, str):
        raise DataError("tokenizer", "has several named chat templates; tuneloop needs the default one")
    probe = [Message("user", "hello"), Message("assistant", _PROBE_ANSWER)]
    rendered = _render(tokenizer, probe, generation_prompt=False)
    tail = rendered[rendered.rindex(_PROBE_ANSWER) + len(_PROBE_ANSWER) :]
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    tail_ids = tokenizer.encode(tail, add_special_tokens=False) if tail else []
    if tail_ids and tail_ids[0] in special:
        eot_id = tail_ids[0]
    elif tokenizer.eos_token_id is not None:
        eot_id = tokenizer.eos_token_id
    else:
        raise DataError("tokenizer", "chat template closes no turn and the tokenizer has no EOS token")
    return ChatFormat(
        template=template,
        template_sha256=hashlib.sha256(template.encode("utf-8")).hexdigest(),
        eot_token=tokenizer.convert_ids_to_tokens(eot_id),
        eot_token_id=int(eot_id),
        eot_text=tokenizer.decode([eot_id]),
    )


class ChatRenderer:
    """Turns conversations into :class:`EncodedExample` (training) or prompt ids (inference)."""

    ANSWER_MEMO_SIZE = 4096  # distinct answers remembered; classification has a few hundred at most

    def __init__(self, tokenizer: Any, chat_format: ChatFormat | None = None) -> None:
        self.tokenizer = tokenizer
        self.format = chat_format or chat_format_of(tokenizer)
        self._answer_memo: dict[str, tuple[int, ...]] = {}

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False) if text else []

    def _answer_ids(self, text: str) -> list[int]:
        """An answer's ids, remembered per renderer: a classification set repeats a few labels thousands of
        times (BANKING77: 77 intents over 10,003 rows), and tokenizing each again was a fifth of encoding.
        The answer is tokenized on its own (see the module docstring), so its ids never depend on context."""
        ids = self._answer_memo.get(text)
        if ids is None:
            ids = tuple(self._ids(text))
            if len(self._answer_memo) < self.ANSWER_MEMO_SIZE:
                self._answer_memo[text] = ids
        return list(ids)

    def prompt_ids(self, messages: Iterable[Message]) -> list[int]:
        """Token ids of a prompt ready for generation (template + generation prompt)."""
        return self._ids(_render(self.tokenizer, messages, generation_prompt=True))

    def encode(self, conversation: Conversation) -> EncodedExample:
        """Token ids with loss only on assistant answers and their end-of-turn tokens."""
        return self.encode_many([conversation])[0]

    def encode_many(self, conversations: Sequence[Conversation]) -> list[EncodedExample]:
        """:meth:`encode` for many conversations, with every prompt part tokenized in one batched call.

        Why: one tokenizer call per turn was half of encoding a 10,000-row set (issue 7, workload c); a fast
        tokenizer encodes a list in parallel, and the ids are the same as text by text.
        """
        turns = [self._turns(conversation) for conversation in conversations]
        texts = [context for parts in turns for context, _ in parts]
        nonempty = [text for text in texts if text]
        batched = iter(self.tokenizer(nonempty, add_special_tokens=False)["input_ids"] if nonempty else [])
        encoded = []
        for conversation, parts in zip(conversations, turns):
            input_ids: list[int] = []
            labels: list[int] = []
            for context_text, answer in parts:
                context = list(next(batched)) if context_text else []
                input_ids += context + answer
                labels += [IGNORE_INDEX] * len(context) + answer
            encoded.append(EncodedExample(tuple(input_ids), tuple(labels), conversation.source))
        return encoded

    def _turns(self, conversation: Conversation) -> list[tuple[str, list[int]]]:
        """Each assistant turn as (the text the template adds before the answer, the answer's trained ids)."""
        messages = conversation.messages
        turns: list[tuple[str, list[int]]] = []
        rendered_so_far = ""
        for index, message in enumerate(messages):
            if message.role != "assistant":
                continue
            prefix = _render(self.tokenizer, messages[:index], generation_prompt=True)
            if not prefix.startswith(rendered_so_far):
                raise DataError(
                    conversation.source,
                    "the chat template renders earlier turns differently once later turns exist "
                    "(e.g. it drops past reasoning); tuneloop cannot mask such a template turn by turn",
                    field=f"messages[{index}]",
                )
            answer = self._answer_ids(message.content) + [self.format.eot_token_id]
            turns.append((prefix[len(rendered_so_far) :], answer))
            full = _render(self.tokenizer, messages[: index + 1], generation_prompt=False)
            closing = full.find(self.format.eot_text, len(prefix))
            if closing < 0 or not full[len(prefix) :].startswith(message.content):
                raise DataError(
                    conversation.source,
                    "the chat template changes the assistant text or does not close the turn with "
                    f"{self.format.eot_token!r}; training on it would not match inference",
                    field=f"messages[{index}]",
                )
            rendered_so_far = full[: closing + len(self.format.eot_text)]
        return turns


ENCODE_BATCH = 1024  # conversations rendered, then tokenized together


def encode_dataset(
    renderer: ChatRenderer,
    conversations: Iterable[Conversation],
    max_seq_len: int,
    truncation: Literal["error", "drop"],
) -> tuple[list[EncodedExample], EncodingReport]:
    """Encode every conversation; too-long ones raise (``error``) or are dropped and counted (``drop``).

    An example is never cut: a cut answer teaches the model to stop mid-sentence, a cut end-of-turn token
    teaches it never to stop.
    """
    report = EncodingReport()
    encoded: list[EncodedExample] = []
    for conversation, example in _encoded_in_batches(renderer, conversations):
        length = len(example.input_ids)
        if length > max_seq_len:
            if truncation == "error":
                raise DataError(
                    conversation.source,
                    f"renders to {length} tokens, over max_seq_len={max_seq_len}; raise max_seq_len, shorten "
                    "the row, or set truncation: drop to skip such rows",
                )
            report.dropped_too_long.append(str(conversation.source))
            continue
        encoded.append(example)
        report.kept += 1
        report.max_tokens = max(report.max_tokens, length)
        report.total_tokens += length
        report.trained_tokens += example.num_trained_tokens
    return encoded, report


def _encoded_in_batches(
    renderer: ChatRenderer, conversations: Iterable[Conversation]
) -> Iterator[tuple[Conversation, EncodedExample]]:
    rows = iter(conversations)
    while batch := list(islice(rows, ENCODE_BATCH)):
        yield from zip(batch, renderer.encode_many(batch))
