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
    from llama_cpp import Llama

    llama = Llama(model_path=job["path"], n_ctx=job["context"], n_gpu_layers=0, verbose=False, seed=0)
    stops = set(job["stop_ids"])
    generated = []
    for prompt in job["prompts"]:
        llama.reset()
        new: list[int] = []
        for token in llama.generate(
            prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True
        ):
            if token in stops or len(new) >= job["max_new_tokens"]:
                break
            new.append(int(token))
        generated.append(new)
    tokenized = [llama.tokenize(t.encode("utf-8"), add_bos=False, special=True) for t in job["texts"]]
    llama.close()
    return {"generated": generated, "tokenized": tokenized}


if __name__ == "__main__":
    reply = _child(json.loads(Path(sys.argv[1]).read_text()))
    Path(sys.argv[2]).write_text(json.dumps(reply))
