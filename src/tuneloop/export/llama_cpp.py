"""llama.cpp through llama-cpp-python, optional: k-quant quantisation and running a GGUF to check it.

gguf-py has no k-quant quantizer, so ``q4_k_m`` is made the way llama.cpp users make it: from the f16 file
by llama.cpp's own ``llama_model_quantize``. The package compiles llama.cpp at install time, which is why
it is an optional extra (``pip install 'tuneloop[gguf]'``) and every caller checks :func:`available` first.

Loading and running a GGUF happens in a child process (``python -m tuneloop.export.llama_cpp``): llama.cpp
is native code, and a file it cannot handle can crash it outright (seen: a segfault in ``llama_decode`` on a
2-layer, head-dim-8 test model in q8_0, with llama.cpp's own quantizer too). In a child that is a clear
export error instead of a dead process.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tuneloop.export.context import ExportError

# llama.cpp's LLAMA_FTYPE_* values (include/llama.h) for the types made by its quantizer.
LLAMA_FTYPES = {"q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}


def available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def require(kind: str) -> None:
    if not available():
        raise ExportError(
            f"GGUF {kind} needs llama.cpp's quantizer: pip install 'tuneloop[gguf]' (llama-cpp-python); "
            "f16 and q8_0 need nothing extra"
        )


def quantize(source: Path, target: Path, kind: str, threads: int = 0) -> None:
    """Quantize the f16 GGUF ``source`` to ``kind`` at ``target`` with llama.cpp's quantizer."""
    require(kind)
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LLAMA_FTYPES[kind]
    params.nthread = threads
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params)
    if status != 0 or not target.is_file():
        raise ExportError(f"llama.cpp failed to quantize {source.name} to {kind} (status {status})")


def run_isolated(
    path: Path,
    context: int,
    prompts: Sequence[Sequence[int]],
    texts: Sequence[str],
    stop_ids: Sequence[int],
    max_new_tokens: int,
) -> dict[str, Any]:
    """Greedy answers to ``prompts`` and tokenizations of ``texts`` by llama.cpp, computed in a child process."""
    job = {
        "path": str(path),
        "context": context,
        "prompts": [list(p) for p in prompts],
        "texts": list(texts),
        "stop_ids": list(stop_ids),
        "max_new_tokens": max_new_tokens,
    }
    with tempfile.TemporaryDirectory(prefix="tuneloop-llama-cpp-") as folder:
        request, reply = Path(folder) / "job.json", Path(folder) / "reply.json"
        request.write_text(json.dumps(job))
        done = subprocess.run(
            [sys.executable, "-m", "tuneloop.export.llama_cpp", str(request), str(reply)],
            capture_output=True,
            check=False,
            text=True,
            timeout=3600,
        )
        if done.returncode != 0 or not reply.is_file():
            tail = (done.stderr or "").strip().splitlines()[-3:]
            raise ExportError(
                f"llama.cpp could not run {path.name} (exit {done.returncode}): {' | '.join(tail)}"
            )
        return json.loads(reply.read_text())


def _child(job: dict[str, Any]) -> dict[str, Any]:
    """Greedy decoding through llama.cpp's C API (llama-cpp-python's bindings), one prompt at a time.

    ``use_extra_bufts`` is off: llama.cpp's repacked CPU weight layouts (AMX / repack buffers) segfault in
    ``llama_decode`` for q8_0 and k-quant files on this project's machine (Xeon with AMX, llama-cpp-python
    0.3.36), while the plain layout computes the same matmuls. The check is about the file, not the fastest
    kernel, so the plain layout is used everywhere.
    """
    import ctypes

    import llama_cpp as ll
    import numpy as np

    ll.llama_backend_init()
    model_params = ll.llama_model_default_params()
    model_params.n_gpu_layers = 0
    model_params.use_extra_bufts = False
    model = ll.llama_model_load_from_file(job["path"].encode(), model_params)
    if not model:
        raise RuntimeError(f"llama.cpp could not load {job['path']}")
    context_params = ll.llama_context_default_params()
    context_params.n_ctx = job["context"]
    context_params.n_batch = job["context"]
    context_params.n_threads = context_params.n_threads_batch = max(1, os.cpu_count() or 1)
    ctx = ll.llama_init_from_model(model, context_params)
    vocab = ll.llama_model_get_vocab(model)
    n_vocab = ll.llama_vocab_n_tokens(vocab)
    stops = set(job["stop_ids"])

    def decode(tokens: list[int]) -> int:
        array = (ll.llama_token * len(tokens))(*tokens)
        if ll.llama_decode(ctx, ll.llama_batch_get_one(array, len(tokens))) != 0:
            raise RuntimeError("llama_decode failed")
        logits = ll.llama_get_logits_ith(ctx, -1)
        return int(np.ctypeslib.as_array(logits, shape=(n_vocab,)).argmax())

    generated = []
    cached: list[int] = []  # tokens whose keys/values are in the cache, in order
    for prompt in job["prompts"]:
        # keep the prefix shared with the previous prompt (system prompt, template), as llama.cpp's server does
        keep = 0
        while keep < min(len(cached), len(prompt) - 1) and cached[keep] == prompt[keep]:
            keep += 1
        ll.llama_memory_seq_rm(ll.llama_get_memory(ctx), -1, keep, -1)
        new: list[int] = []
        token = decode(list(prompt[keep:]))
        cached = list(prompt)
        while token not in stops and len(new) < job["max_new_tokens"]:
            new.append(token)
            cached.append(token)
            token = decode([token])
        generated.append(new)
    tokenized = []
    for text in job["texts"]:
        data = text.encode("utf-8")
        buffer = (ll.llama_token * (len(data) + 8))()
        count = ll.llama_tokenize(vocab, data, len(data), buffer, len(buffer), False, True)
        tokenized.append([int(buffer[i]) for i in range(count)])
    ll.llama_free(ctx)
    ll.llama_model_free(model)
    del ctypes
    return {"generated": generated, "tokenized": tokenized}


if __name__ == "__main__":
    reply = _child(json.loads(Path(sys.argv[1]).read_text()))
    Path(sys.argv[2]).write_text(json.dumps(reply))
