"""GGUF export: merge in fp32, write the file, write its Modelfile, load it back two ways and compare.

Load-backs: transformers' GGUF reader (always; dequantizes to fp32) and llama.cpp itself when
llama-cpp-python is installed (the engine Ollama and llama.cpp users actually run, quantized kernels
included). The tokenizer each rebuilds from the file's metadata is checked against the training tokenizer.
"""

from __future__ import annotations

import gc
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tuneloop.export import llama_cpp
from tuneloop.export.context import ExportContext, ExportError
from tuneloop.export.deploy import match_family, modelfile
from tuneloop.export.gguf_llama import direct_types, pre_tokenizer_name, write_llama_gguf
from tuneloop.export.merged import merged_fp32
from tuneloop.export.options import ExportOptions, FormatOutput
from tuneloop.export.roundtrip import (
    LlamaCppRunner,
    check_gguf_tokenizer,
    check_greedy,
    check_llama_cpp_tokenizer,
    check_texts,
    evaluate_exported,
    hf_generator,
)


@dataclass(frozen=True)
class GGUFQuant:
    """A GGUF tensor type: written directly by gguf-py, or made from the f16 file by llama.cpp.

    ``min_agreement``: the share of check prompts that must get the training-time model's exact greedy
    answer. Lower for coarser types, because rounding weights to 8 or 4 bits does flip close calls; the
    accuracy cost on the whole split is what ``--eval`` measures.
    """

    name: str
    min_agreement: float
    via_llama_cpp: bool = False


GGUF_QUANTS: dict[str, GGUFQuant] = {
    q.name: q
    for q in (
        GGUFQuant("f16", 0.95),
        GGUFQuant("q8_0", 0.9),
        GGUFQuant("q4_k_m", 0.75, via_llama_cpp=True),
    )
}


def export_gguf(ctx: ExportContext, options: ExportOptions, out: Path) -> FormatOutput:
    quant = GGUF_QUANTS.get(options.quant or "f16")
    if quant is None:
        raise ExportError(f"unknown GGUF type {options.quant!r}; known: {', '.join(GGUF_QUANTS)}")
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{ctx.run_name}-{quant.name}.gguf"
    model, tokenizer = merged_fp32(ctx)
    pre = pre_tokenizer_name(json.loads(tokenizer.backend_tokenizer.to_str()))
    eot = ctx.chat_format.eot_token_id
    if quant.via_llama_cpp:
        llama_cpp.require(quant.name)
        staging = out / f".{path.stem}.f16.gguf"
        write_llama_gguf(
            model, tokenizer, ctx.chat_format.template, eot, staging, direct_types()["f16"], ctx.run_name
        )
        try:
            llama_cpp.quantize(staging, path, quant.name)
        finally:
            staging.unlink(missing_ok=True)
        details: dict[str, Any] = {"bytes": path.stat().st_size, "quantizer": "llama.cpp"}
    else:
        details = write_llama_gguf(
            model, tokenizer, ctx.chat_format.template, eot, path, direct_types()[quant.name], ctx.run_name
        )
    details["pre_tokenizer"] = pre
    positions = int(model.config.max_position_embeddings)
    del model
    gc.collect()

    output = FormatOutput(f"gguf-{quant.name}", [path], [], details)
    threshold = quant.min_agreement if options.min_agreement is None else options.min_agreement
    stop_ids = ctx.stop_ids(ctx.tokenizer)
    details["tokenizer_check"] = check_gguf_tokenizer(ctx, path, pre)
    from transformers import AutoModelForCausalLM

    loaded = (
        AutoModelForCausalLM.from_pretrained(str(out), gguf_file=path.name, dtype=torch.float32)
        .to(ctx.device)
        .eval()
    )
    generate = hf_generator(loaded, ctx.tokenizer.pad_token_id, stop_ids, ctx.config.eval_batch_size)
    output.roundtrips.append(
        check_greedy(ctx, f"gguf-{quant.name}", "transformers-gguf", generate, threshold)
    )
    native = options.llama_cpp and llama_cpp.available()
    if options.evaluate:  # scored by the engine that will serve the file: llama.cpp when it is here
        output.evaluation = (
            {} if native else {"transformers-gguf": evaluate_exported(ctx, f"gguf-{quant.name}", generate)}
        )
    del loaded
    gc.collect()

    if native:
        context = min(int(ctx.config.max_seq_len) + int(ctx.config.max_new_tokens), positions)
        run_llama = LlamaCppRunner(path, context, stop_ids, check_texts(ctx))
        run_llama(
            ctx.prompt_ids(ctx.check_prompts), int(ctx.config.max_new_tokens)
        )  # one load: answers + tokens
        assert run_llama.tokenized is not None
        details["llama_cpp_tokenizer_check"] = check_llama_cpp_tokenizer(ctx, run_llama.tokenized)
        output.roundtrips.append(
            check_greedy(ctx, f"gguf-{quant.name}", "llama-cpp-python", run_llama, threshold)
        )
        if options.evaluate:
            assert output.evaluation is not None
            output.evaluation["llama-cpp-python"] = evaluate_exported(ctx, f"gguf-{quant.name}", run_llama)
    else:
        reason = "not installed" if options.llama_cpp else "switched off"
        output.warnings.append(
            f"llama-cpp-python {reason}: the GGUF was checked with transformers' reader only"
        )

    family = match_family(ctx.tokenizer, ctx.spec.system_prompt)
    if family is None:
        output.warnings.append("no Ollama TEMPLATE matches this chat template exactly; Modelfile not written")
    else:
        context = min(int(ctx.config.max_seq_len) + int(ctx.config.max_new_tokens), positions)
        modelfile_path = out / "Modelfile"
        modelfile_path.write_text(
            modelfile(path.name, family, ctx.spec.system_prompt, context), encoding="utf-8"
        )
        output.paths.append(modelfile_path)
        details["modelfile_template"] = family.name
    return output
