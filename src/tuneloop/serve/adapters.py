"""The adapter pool: which adapters the server knows, where their files are, and loading them safely.

Runtime loads take a *name*, never a path. A name is a short identifier (no dots, slashes or leading dash)
and resolves only to ``<adapter_dir>/<name>``; the resolved folder and every file the load opens must lie
inside the adapter directory after following symlinks, so ``../../x``, absolute paths and symlinks that
point out are refused before anything is opened. Weights must be ``adapter_model.safetensors``: a folder
with pickled weights (``adapter_model.bin``) is refused. The adapter's stored chat template must be the base
tokenizer's (same sha256), or it would be served with prompts it was never trained on.

One asyncio lock per name: two admin calls for the same adapter queue behind each other, calls for
different adapters do not wait for each other.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneloop.data import ChatFormat
from tuneloop.models.trained import META_FILE
from tuneloop.tasks import TaskSpec

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
PICKLES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth", "pytorch_model.bin")


class AdapterError(ValueError):
    """A refused or failed adapter operation; ``status`` is the HTTP status the admin API answers with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def validate_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise AdapterError(
            400, f"invalid adapter name {str(name)[:80]!r}: use 1-64 letters, digits, '_' or '-' (no paths)"
        )
    return name


def _inside(path: Path, root: Path) -> bool:
    return path.resolve() == root or path.resolve().is_relative_to(root)


def resolve_in_dir(root: Path, name: str) -> Path:
    """The artefact folder for ``name`` inside ``root`` (a run dir's ``adapter/`` or the folder itself)."""
    validate_name(name)
    root = root.resolve()
    candidate = root / name
    if not _inside(candidate, root):
        raise AdapterError(400, f"adapter {name!r} resolves outside the adapter directory; refused")
    if not candidate.is_dir():
        raise AdapterError(404, f"no adapter named {name!r} in the adapter directory")
    folder = (
        candidate
        if (candidate / CONFIG).exists() or not (candidate / "adapter").exists()
        else candidate / "adapter"
    )
    if not _inside(folder, root):
        raise AdapterError(400, f"adapter {name!r} resolves outside the adapter directory; refused")
    return folder


@dataclass(frozen=True)
class AdapterInfo:
    """An adapter's checked files and what it was trained for."""

    name: str
    folder: Path
    chat_format: ChatFormat
    spec: TaskSpec
    base_model: str
    base_model_sha256: str | None
    weights_sha256: str
    method: str


def inspect_adapter(name: str, folder: Path, root: Path | None) -> AdapterInfo:
    """Check an adapter folder without loading weights: files present, safetensors only, all inside ``root``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise AdapterError(404, f"adapter {name!r}: folder not found")
    if (folder / "adapter" / CONFIG).is_file() and not (folder / CONFIG).is_file():
        folder = folder / "adapter"
    files = {f: folder / f for f in (CONFIG, WEIGHTS, META_FILE)}
    if root is not None:
        outside = [f for f, p in files.items() if p.exists() and not _inside(p, root.resolve())]
        if outside or not _inside(folder, root.resolve()):
            raise AdapterError(
                400,
                f"adapter {name!r}: {', '.join(outside) or 'folder'} points outside the adapter directory; refused",
            )
    if not files[WEIGHTS].is_file():
        pickled = [p for p in PICKLES if (folder / p).exists()]
        reason = (
            f"has pickled weights ({pickled[0]}), which are never loaded" if pickled else f"has no {WEIGHTS}"
        )
        raise AdapterError(422, f"adapter {name!r} {reason}; export it as safetensors")
    for required in (CONFIG, META_FILE):
        if not files[required].is_file():
            raise AdapterError(
                422, f"adapter {name!r} has no {required}; serve tuneloop artefacts (adapter/ of a run)"
            )
    try:
        meta = json.loads(files[META_FILE].read_text(encoding="utf-8"))
        adapter_config = json.loads(files[CONFIG].read_text(encoding="utf-8"))
        chat_format = ChatFormat.from_dict(meta["chat_template"], meta["chat_format"])
        spec = TaskSpec.from_dict(meta["task"])
    except (ValueError, KeyError, TypeError) as exc:
        raise AdapterError(422, f"adapter {name!r}: unreadable {META_FILE} or {CONFIG} ({exc})") from None
    if adapter_config.get("peft_type") != "LORA":
        raise AdapterError(
            422, f"adapter {name!r} is {adapter_config.get('peft_type')!r}; the server batches LoRA adapters"
        )
    digest = hashlib.sha256(files[WEIGHTS].read_bytes()).hexdigest()
    return AdapterInfo(
        name,
        folder,
        chat_format,
        spec,
        str(meta.get("base_model")),
        meta.get("base_model_sha256"),
        digest,
        str(meta.get("adapter_method", "lora")),
    )


class AdapterPool:
    """Registered adapter names, which of them are loaded, and one lock per name.

    ``engine`` does the weight work in its own thread (between batches); the pool decides *whether* a load
    may happen and keeps the bookkeeping the HTTP layer reads.
    """

    def __init__(self, engine: Any, adapter_dir: Path | None, preset: dict[str, Path]) -> None:
        self.engine = engine
        self.root = Path(adapter_dir).resolve() if adapter_dir is not None else None
        self.preset = {validate_name(n): Path(p) for n, p in preset.items()}
        self.loaded: dict[str, AdapterInfo] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    def locate(self, name: str) -> tuple[Path, Path | None]:
        """(folder, confining root): a name given at start, else one inside the adapter directory."""
        validate_name(name)
        if name in self.preset:
            return self.preset[name], None
        if self.root is None:
            raise AdapterError(404, f"no adapter named {name!r} (the server has no --adapter-dir)")
        return resolve_in_dir(self.root, name), self.root

    def check_compatible(self, info: AdapterInfo) -> None:
        if info.chat_format.template_sha256 != self.engine.template_sha256:
            raise AdapterError(
                409,
                f"adapter {info.name!r} was trained with chat template {info.chat_format.template_sha256[:12]}, the "
                f"base tokenizer has {self.engine.template_sha256[:12]}; refusing to serve a mismatched template",
            )
        ours = self.engine.source.origin_sha256
        if info.base_model_sha256 and ours and info.base_model_sha256 != ours:
            raise AdapterError(
                409, f"adapter {info.name!r} was trained on other base weights than the served base"
            )

    def _prepare(self, name: str) -> AdapterInfo:
        folder, root = self.locate(name)
        info = inspect_adapter(name, folder, root)
        self.check_compatible(info)
        return info

    def load_now(self, name: str) -> AdapterInfo:
        """Blocking load, for start-up before the event loop runs."""
        info = self._prepare(name)
        self.engine.load_adapter(name, info.folder).result()
        self.loaded[name] = info
        return info

    async def load(self, name: str) -> AdapterInfo:
        async with self._lock(name):
            if name in self.loaded:
                return self.loaded[name]
            info = await asyncio.to_thread(self._prepare, name)
            await asyncio.wrap_future(self.engine.load_adapter(name, info.folder))
            self.loaded[name] = info
            return info

    async def unload(self, name: str) -> None:
        validate_name(name)
        async with self._lock(name):
            if name not in self.loaded:
                raise AdapterError(404, f"adapter {name!r} is not loaded")
            del self.loaded[name]  # new requests stop resolving it at once
            await asyncio.wrap_future(self.engine.unload_adapter(name))
