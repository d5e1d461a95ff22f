"""Files that tell other engines how to serve an export: an Ollama ``Modelfile`` and the ``vllm serve`` command.

Ollama does not run Jinja; its ``TEMPLATE`` is a Go template. A hand-written translation that is almost
right is the classic way a fine-tune "forgets" its training in production, so translations live in a small
registry of template families, each with the Go template *and* a Python rendering of the same Go logic.
Before a Modelfile is written, the family's rendering is compared with the run's Jinja template on probe
conversations (with and without a system message, multi-turn); no exact match, no TEMPLATE written.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneloop.data import Message

PROBES: tuple[tuple[Message, ...], ...] = (
    (Message("user", "hello"),),
    (Message("system", "Be brief."), Message("user", "hi there")),
    (Message("user", "first"), Message("assistant", "one"), Message("user", "second")),
    (Message("system", "S"), Message("user", "a\nb"), Message("assistant", "c"), Message("user", "d")),
)


@dataclass(frozen=True)
class TemplateFamily:
    """A chat format Ollama can express: its Go template and a Python mirror of that template's output."""

    name: str
    go_template: str
    render: Callable[[Sequence[Message], str], str]
    stop: tuple[str, ...]


def _chatml(messages: Sequence[Message], system: str) -> str:
    """What the ChatML Go template below produces: Ollama passes the last system message (or the
    Modelfile's SYSTEM) as ``.System`` and every message in ``.Messages``."""
    own = [m.content for m in messages if m.role == "system"]
    system = own[-1] if own else system
    text = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
    for m in messages:
        if m.role != "system":
            text += f"<|im_start|>{m.role}\n{m.content}<|im_end|>\n"
    return text + "<|im_start|>assistant\n"


CHATML_GO = (
    "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
    '{{ range .Messages }}{{ if ne .Role "system" }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}{{ end }}'
    "<|im_start|>assistant\n"
)

TEMPLATE_FAMILIES: dict[str, TemplateFamily] = {
    family.name: family for family in (TemplateFamily("chatml", CHATML_GO, _chatml, ("<|im_end|>",)),)
}


def _jinja(tokenizer: Any, messages: Sequence[Message], system: str | None) -> str:
    if system and messages[0].role != "system":
        messages = [Message("system", system), *messages]
    return tokenizer.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in messages], tokenize=False, add_generation_prompt=True
    )


def match_family(tokenizer: Any, system_prompt: str | None) -> TemplateFamily | None:
    """The family whose Go template renders every probe exactly like the run's Jinja template does.

    ``system_prompt`` is what the Modelfile's SYSTEM will hold (the run's prompt), so probes without a
    system message are compared with the Jinja rendering that has the run's prompt prepended, which is
    what ``Predictor`` and the server do.
    """
    for family in TEMPLATE_FAMILIES.values():
        if all(family.render(p, system_prompt or "") == _jinja(tokenizer, p, system_prompt) for p in PROBES):
            return family
    return None


def _quoted(text: str) -> str:
    if '"""' in text:
        raise ValueError('a Modelfile value cannot contain """')
    return f'"""{text}"""'


def modelfile(gguf_name: str, family: TemplateFamily, system_prompt: str | None, context: int) -> str:
    """An Ollama Modelfile: the GGUF, its chat template, the run's system prompt, greedy decoding, stops."""
    lines = [
        "# Written by `tuneloop export`; the TEMPLATE was checked against the run's chat template.",
        f"FROM ./{gguf_name}",
        f"TEMPLATE {_quoted(family.go_template)}",
    ]
    if system_prompt:
        lines.append(f"SYSTEM {_quoted(system_prompt)}")
    lines += [f'PARAMETER stop "{stop}"' for stop in family.stop]
    lines += ["PARAMETER temperature 0", f"PARAMETER num_ctx {context}"]
    return "\n".join(lines) + "\n"


def vllm_command(
    model: str, *, adapter: tuple[str, Path] | None, max_lora_rank: int | None, context: int, dtype: str
) -> str:
    """The exact ``vllm serve`` command: a merged folder, or the base with the adapter as a LoRA module."""
    parts = [
        "vllm",
        "serve",
        model,
        "--dtype",
        dtype,
        "--max-model-len",
        str(context),
        "--generation-config",
        "auto",
    ]
    if adapter is not None:
        name, path = adapter
        parts += ["--enable-lora", "--lora-modules", f"{name}={path}", "--max-lora-rank", str(max_lora_rank)]
    return " ".join(shlex.quote(p) for p in parts)
