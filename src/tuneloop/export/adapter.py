"""Adapter export: the PEFT adapter as it was trained, plus a model card, loadable by PEFT and by vLLM.

The files are copied byte for byte (safetensors weights, ``adapter_config.json``, tokenizer, ``tuneloop.json``);
the card says what the adapter is for and where it came from: base model, data hashes, config, eval headline.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml

from tuneloop.export.context import ExportContext, ExportError
from tuneloop.export.deploy import vllm_command
from tuneloop.export.options import ExportOptions, FormatOutput
from tuneloop.export.roundtrip import check_greedy, evaluate_exported, hf_generator
from tuneloop.models import load_causal_lm, resolve_model

VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def export_adapter(ctx: ExportContext, options: ExportOptions, out: Path) -> FormatOutput:
    if not ctx.is_adapter:
        raise ExportError(
            f"{ctx.run_dir}: trained with {ctx.adapter_method}, which saves a whole model; export merged instead"
        )
    if not (ctx.artifact_dir / "adapter_model.safetensors").is_file():
        raise ExportError(
            f"{ctx.artifact_dir}: adapter weights must be adapter_model.safetensors (pickles are refused)"
        )
    folder = out / "adapter"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for item in ctx.artifact_dir.iterdir():
        if item.is_file() and item.suffix not in (".bin", ".pt", ".pth", ".pkl"):
            shutil.copy2(item, folder / item.name)
    (folder / "README.md").write_text(model_card(ctx), encoding="utf-8")

    from peft import PeftModel

    base = load_causal_lm(resolve_model(ctx.meta["base_model"]), torch.float32, ctx.device)
    model = PeftModel.from_pretrained(base, str(folder), is_trainable=False).eval()
    tokenizer = ctx.tokenizer
    generate = hf_generator(
        model, tokenizer.pad_token_id, ctx.stop_ids(tokenizer), ctx.config.eval_batch_size
    )
    threshold = 1.0 if options.min_agreement is None else options.min_agreement
    roundtrip = check_greedy(ctx, "adapter", "peft", generate, threshold)
    evaluation = evaluate_exported(ctx, "adapter", generate) if options.evaluate else None

    rank = _max_rank(json.loads((folder / "adapter_config.json").read_text()))
    source = resolve_model(ctx.meta["base_model"])
    command = vllm_command(
        source.location,
        adapter=(ctx.run_name, folder.resolve()),
        max_lora_rank=next((r for r in VLLM_LORA_RANKS if r >= rank), rank),
        context=_context(ctx),
        dtype="auto",
    )
    return FormatOutput("adapter", [folder], [roundtrip], {"lora_rank": rank}, evaluation, command)


def _max_rank(adapter_config: dict[str, Any]) -> int:
    ranks = [
        int(adapter_config.get("r", 8)),
        *(int(r) for r in (adapter_config.get("rank_pattern") or {}).values()),
    ]
    return max(ranks)


def _context(ctx: ExportContext) -> int:
    """The context to serve with: what training used, capped at what the base model supports."""
    config = Path(resolve_model(ctx.meta["base_model"]).location) / "config.json"
    positions = json.loads(config.read_text()).get("max_position_embeddings") if config.is_file() else None
    return min(int(ctx.config.max_seq_len), int(positions or ctx.config.max_seq_len))


def model_card(ctx: ExportContext) -> str:
    """A Hugging Face style README: YAML front matter for hubs, then what a reader needs to trust the adapter."""
    record = ctx.record
    front = {
        "base_model": ctx.meta.get("base_model"),
        "library_name": "peft",
        "pipeline_tag": "text-generation",
        "tags": ["tuneloop", ctx.adapter_method, ctx.spec.task],
    }
    headline = (record.get("eval") or {}).get("headline") or {}
    inputs = record.get("inputs") or {}
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).strip(),
        "---",
        f"# {ctx.run_name}",
        "",
        f"A {ctx.adapter_method} adapter for `{ctx.meta.get('base_model')}` trained by tuneloop for the "
        f"`{ctx.spec.task}` task"
        + (f" with labels: {', '.join(ctx.spec.labels)}." if ctx.spec.labels else "."),
        "",
        "## Base model",
        f"- name: `{ctx.meta.get('base_model')}`",
        f"- weights: `{ctx.meta.get('base_model_origin')}` (sha256 `{ctx.meta.get('base_model_sha256')}`)",
        f"- chat template sha256: `{ctx.chat_format.template_sha256}`; end-of-turn token `{ctx.chat_format.eot_token}`",
        "",
        "## Data",
    ]
    for split, fingerprint in inputs.items():
        if fingerprint:
            lines.append(
                f"- {split}: `{Path(fingerprint['path']).name}` sha256 `{fingerprint['sha256']}` ({fingerprint['bytes']} bytes)"
            )
    lines += ["", "## Evaluation (held-out test split)"]
    if headline:
        lines += ["| system | " + " | ".join(sorted({k for v in headline.values() for k in v})) + " |"]
        keys = sorted({k for v in headline.values() for k in v})
        lines += ["|---" * (len(keys) + 1) + "|"]
        lines += [
            f"| {system} | " + " | ".join(f"{v.get(k, float('nan')):.3f}" for k in keys) + " |"
            for system, v in headline.items()
        ]
    else:
        lines.append("Not evaluated yet (`tuneloop eval`).")
    lines += [
        "",
        "## Use",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "base = AutoModelForCausalLM.from_pretrained(BASE_FOLDER)",
        "model = PeftModel.from_pretrained(base, 'adapter')",
        "tokenizer = AutoTokenizer.from_pretrained('adapter')",
        "```",
        "Prompts must be rendered with this folder's chat template"
        + (" and the system prompt below." if ctx.spec.system_prompt else "."),
    ]
    if ctx.spec.system_prompt:
        lines += ["", "```text", ctx.spec.system_prompt, "```"]
    lines += [
        "",
        "## Training config",
        "```yaml",
        yaml.safe_dump(record.get("config", {}), sort_keys=False).strip(),
        "```",
        "",
    ]
    return "\n".join(lines)
