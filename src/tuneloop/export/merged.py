"""Merged export: the adapter folded into a fresh copy of the base, saved as 16-bit safetensors.

The merge is done in fp32 on a base loaded fresh from its safetensors (never into a 4-bit base, where
``merge_and_unload`` would round the update into 4-bit blocks), and only the result is cast to 16 bit. For a
QLoRA run the adapter was trained against the *dequantized* 4-bit base, so that base is rebuilt first
(quantize + dequantize each linear weight exactly as bitsandbytes did at training time) and the adapter is
merged into it; merging into the original full-precision weights would give a model that never existed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from tuneloop.export.context import ExportContext, ExportError
from tuneloop.models import load_causal_lm, load_tokenizer, resolve_model
from tuneloop.models.trained import META_FILE

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def merged_fp32(ctx: ExportContext) -> tuple[Any, Any]:
    """(model, tokenizer): the fine-tune as one plain fp32 ``transformers`` model on the CPU."""
    tokenizer = load_tokenizer(str(ctx.artifact_dir))
    if not ctx.is_adapter:  # full fine-tune: the artefact already is a whole model
        return load_causal_lm(str(ctx.artifact_dir), torch.float32, torch.device("cpu")).eval(), tokenizer
    from peft import PeftModel

    if not (ctx.artifact_dir / "adapter_model.safetensors").is_file():
        raise ExportError(
            f"{ctx.artifact_dir}: adapter weights must be adapter_model.safetensors (pickles are refused)"
        )
    base = load_causal_lm(resolve_model(ctx.meta["base_model"]), torch.float32, torch.device("cpu"))
    quantization = _training_quantization(ctx.adapter_method)
    if quantization is not None:
        _dequantized_like_training(base, quantization)
    model = PeftModel.from_pretrained(base, str(ctx.artifact_dir), is_trainable=False)
    return model.merge_and_unload(safe_merge=True).eval(), tokenizer


def _training_quantization(method_name: str) -> Any:
    """The method's base quantization (QLoRA), or ``None``; unknown method names merge like LoRA."""
    from tuneloop.adapters import ADAPTER_METHODS

    method = ADAPTER_METHODS.get(method_name)
    return getattr(method, "quantization", None) if method is not None else None


@torch.no_grad()
def _dequantized_like_training(model: Any, spec: Any) -> None:
    """Replace each linear weight (the output head excepted, as transformers' bitsandbytes loader skips it) by
    its 4-bit quantize/dequantize round trip, so the adapter is merged into the weights it was trained on."""
    if not torch.cuda.is_available():
        raise ExportError(
            "merging a QLoRA adapter rebuilds its 4-bit base with bitsandbytes, which needs a CUDA GPU"
        )
    try:
        import bitsandbytes.functional as bnbf
    except ImportError:
        raise ExportError("merging a QLoRA adapter needs bitsandbytes: pip install 'tuneloop[gpu]'") from None
    compute = getattr(torch, spec.compute_dtype)
    head = model.get_output_embeddings()
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module is not head:
            weight = module.weight.data.to(device="cuda", dtype=compute)
            packed, state = bnbf.quantize_4bit(
                weight,
                blocksize=spec.blocksize,
                compress_statistics=spec.double_quant,
                quant_type=spec.quant_type,
            )
            module.weight.data = bnbf.dequantize_4bit(packed, state).to(device="cpu", dtype=torch.float32)


def write_merged(ctx: ExportContext, out: Path, dtype: str) -> Path:
    """Save the merged model as ``dtype`` safetensors plus tokenizer and ``tuneloop.json`` into ``out/merged``.

    The folder is itself a tuneloop artefact (``load_trained_model`` and ``Predictor`` accept it) and a plain
    Hugging Face model (``vllm serve``, ``from_pretrained``). Its generation config stops at the end-of-turn
    token, so engines that read it stop where training taught the model to stop.
    """
    if dtype not in DTYPES:
        raise ExportError(f"merged dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    model, tokenizer = merged_fp32(ctx)
    model = model.to(DTYPES[dtype])
    model.generation_config.eos_token_id = ctx.stop_ids(tokenizer)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    folder = out / "merged"
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    meta = {**ctx.meta, "adapter_method": "merged", "merged_from": ctx.adapter_method, "dtype": dtype}
    (folder / META_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        raise ExportError(f"{folder}: a pickled weight file was written; only safetensors are allowed")
    return folder


def export_merged(ctx: ExportContext, options: Any, out: Path) -> Any:
    """Write the merged folder, then load it back with plain transformers and check its answers.

    The check computes in fp32 from the saved 16-bit weights, so it measures what the export changed (the
    16-bit rounding of merged weights), not the CPU's half-precision kernels.
    """
    from tuneloop.export.adapter import _context
    from tuneloop.export.deploy import vllm_command
    from tuneloop.export.options import FormatOutput
    from tuneloop.export.roundtrip import check_greedy, evaluate_exported, hf_generator

    folder = write_merged(ctx, out, options.dtype)
    model = load_causal_lm(str(folder), torch.float32, ctx.device).eval()
    tokenizer = ctx.tokenizer
    generate = hf_generator(
        model, tokenizer.pad_token_id, ctx.stop_ids(tokenizer), ctx.config.eval_batch_size
    )
    threshold = MIN_AGREEMENT[options.dtype] if options.min_agreement is None else options.min_agreement
    roundtrip = check_greedy(ctx, f"merged-{options.dtype}", "transformers", generate, threshold)
    details = {"dtype": options.dtype, "max_logit_diff": _max_logit_diff(ctx, model)}
    evaluation = evaluate_exported(ctx, f"merged-{options.dtype}", generate) if options.evaluate else None
    torch_dtype = {"fp16": "float16", "bf16": "bfloat16"}[options.dtype]
    command = vllm_command(
        str(folder.resolve()), adapter=None, max_lora_rank=None, context=_context(ctx), dtype=torch_dtype
    )
    return FormatOutput(f"merged-{options.dtype}", [folder], [roundtrip], details, evaluation, command)


# Share of the check prompts whose greedy answer must be token-identical to the training-time model's.
MIN_AGREEMENT = {"fp16": 0.95, "bf16": 0.9}


@torch.no_grad()
def _max_logit_diff(ctx: ExportContext, model: Any) -> float:
    """Largest absolute difference of next-token logits on the first check prompt: the merge's numeric error."""
    ids = torch.tensor([ctx.prompt_ids(1)[0]], device=ctx.device)
    expected = ctx.reference.model(input_ids=ids).logits[0, -1].float()
    got = model(input_ids=ids).logits[0, -1].float()
    return round(float((expected - got).abs().max()), 6)
