"""Audit checks that need the model's own tokenizer and chat template.

Character counts say little about what training sees: the same row can be 40 tokens for one tokenizer and
90 for another, and a chat template may silently drop a system prompt or a turn. So these checks render
every row exactly as training will (:class:`tuneloop.data.ChatRenderer`, the task's system prompt added
the way ``train`` adds it) and count what would go wrong.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tuneloop.data.errors import DataError
from tuneloop.data.findings import Distribution, Finding, RowExample
from tuneloop.data.render import IGNORE_INDEX, ChatRenderer
from tuneloop.data.types import Conversation, EncodedExample, Message

if TYPE_CHECKING:
    from tuneloop.config import RunConfig
    from tuneloop.data.audit_context import TokenSettings
    from tuneloop.data.scan import ScanResult

_PROBE_USER = "tuneloop-probe-question"


def token_settings_from_config(config: RunConfig, train: Sequence[Conversation]) -> TokenSettings:
    """Tokenizer, limits and the system prompt ``train`` would add, all from a run config."""
    from tuneloop.data.audit_context import TokenSettings
    from tuneloop.models import load_tokenizer, resolve_model
    from tuneloop.tasks import get_task

    tokenizer = load_tokenizer(resolve_model(config.base_model))
    try:
        spec = get_task(config.task).make_spec(train, config.labels, config.system_prompt)
        system_prompt = spec.system_prompt
    except ValueError:
        system_prompt = config.system_prompt  # the label problem itself is reported by the label checks
    return TokenSettings(tokenizer, config.max_seq_len, config.max_new_tokens, system_prompt)


def _conversations(scan: ScanResult, settings: TokenSettings) -> list[Conversation]:
    return [c.with_system_prompt(settings.system_prompt) for c in scan.conversations()]


def _final_answer(example: EncodedExample) -> tuple[int, int]:
    """(prompt tokens before the final answer, tokens of the final answer with its end-of-turn token)."""
    end = len(example.labels)
    start = end
    while start > 0 and example.labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return start, end - start


def _encode_all(
    scan: ScanResult, settings: TokenSettings
) -> tuple[list[tuple[Conversation, EncodedExample]], list[RowExample]]:
    renderer = ChatRenderer(settings.tokenizer)
    encoded, failed = [], []
    for conversation in _conversations(scan, settings):
        try:
            encoded.append((conversation, renderer.encode(conversation)))
        except DataError as exc:
            failed.append(RowExample(str(conversation.source), exc.problem))
    return encoded, failed


@dataclass(frozen=True)
class TokenAnalysis:
    findings: list[Finding]
    token_lengths: Distribution | None
    answer_tokens: Distribution | None


def analyse_tokens(scan: ScanResult, settings: TokenSettings, max_examples: int) -> TokenAnalysis:
    """Rows over ``max_seq_len`` (prompt alone, or answer cut), answers over the generation budget, and
    chat-template problems: rows the template cannot render, system prompts it drops, turns it renders empty.
    """
    encoded, failed = _encode_all(scan, settings)
    limit = settings.max_seq_len
    prompt_over, answer_cut, budget = [], [], []
    answer_lengths = []
    for conversation, example in encoded:
        prompt_len, answer_len = _final_answer(example)
        answer_lengths.append(answer_len - 1)  # the answer itself, without its end-of-turn token
        total = len(example.input_ids)
        ref = str(conversation.source)
        if prompt_len >= limit:
            prompt_over.append(RowExample(ref, f"{total} tokens; the prompt alone is {prompt_len}"))
        elif total > limit:
            answer_cut.append(
                RowExample(ref, f"{total} tokens; {total - limit} of the answer's {answer_len} would not fit")
            )
        # the answer's own tokens must fit the generation budget; its end-of-turn token may be cut
        if answer_len - 1 > settings.max_new_tokens:
            budget.append(RowExample(ref, f"answer {conversation.answer[:40]!r} is {answer_len - 1} tokens"))
    findings = []

    def add(check: str, rows: list[RowExample], message: str, kind: str | None = None) -> None:
        if rows:
            findings.append(
                Finding(
                    check,
                    "warning",
                    scan.path,
                    len(rows),
                    message.format(n=len(rows)),
                    tuple(rows[:max_examples]),
                    kind=kind,
                )
            )

    add(
        "too_long",
        prompt_over,
        f"{{n}} rows have a prompt of max_seq_len={limit} tokens or more: no answer token fits",
        "prompt",
    )
    add(
        "too_long",
        answer_cut,
        f"{{n}} rows are over max_seq_len={limit}: their answer would be cut "
        "(train stops or drops them, per `truncation`)",
        "answer",
    )
    add(
        "answer_over_generation_budget",
        budget,
        f"{{n}} answers are longer than max_new_tokens={settings.max_new_tokens} tokens: "
        "evaluation and serving would cut them",
    )
    add("template", failed, "{n} rows cannot be rendered with the chat template", "render_error")
    dropped, empty = _template_problems(scan, settings)
    add("template", dropped, "{n} rows have a system prompt that the chat template drops", "system_dropped")
    add("template", empty, "{n} rows have a turn that renders to nothing", "empty_turn")
    return TokenAnalysis(
        findings, Distribution.of([len(e.input_ids) for _, e in encoded]), Distribution.of(answer_lengths)
    )


def _template_problems(
    scan: ScanResult, settings: TokenSettings
) -> tuple[list[RowExample], list[RowExample]]:
    tokenizer = settings.tokenizer
    kept_system: dict[str, bool] = {}
    dropped: list[RowExample] = []
    empty: list[RowExample] = []
    for conversation in _conversations(scan, settings):
        ref = str(conversation.source)
        system = next((m.content for m in conversation.messages if m.role == "system"), None)
        system_dropped = False
        if system is not None and system.strip():
            if system not in kept_system:
                kept_system[system] = _template_keeps_system(tokenizer, system)
            if not kept_system[system]:
                system_dropped = True
                dropped.append(RowExample(ref, f"system prompt {system[:40]!r} is not in the rendered text"))
        rendered = _render(tokenizer, conversation.messages)
        for index, message in enumerate(conversation.messages):
            if message.role == "system" and system_dropped:
                continue  # counted once, as a dropped system prompt
            text = message.content.strip()
            if not text or (rendered is not None and text not in rendered):
                empty.append(RowExample(ref, f"messages[{index}] ({message.role}) renders to nothing"))
                break
    return dropped, empty


def _render(tokenizer: Any, messages: Sequence[Message]) -> str | None:
    try:
        return tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in messages], tokenize=False
        )
    except Exception:  # a template error is reported per row by the encode pass; do not count it twice
        return None


def _template_keeps_system(tokenizer: Any, system: str) -> bool:
    rendered = _render(tokenizer, [Message("system", system), Message("user", _PROBE_USER)])
    return rendered is not None and system.strip() in rendered
