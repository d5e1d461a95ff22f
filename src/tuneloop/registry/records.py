"""``record.json``: the provenance of a run (resolved config, input hashes, versions, metrics, parent).

Written atomically (temp file + rename) so a crash never leaves half a record; every number a report shows
is traceable to the files named here.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

RECORD_FILE = "record.json"


def write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, sort_keys=False, default=str)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def file_fingerprint(path: Path | None) -> dict[str, Any] | None:
    """SHA-256 and size of an input file: what 'trained on the same data' means."""
    if path is None:
        return None
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return {"path": str(path), "sha256": digest, "bytes": path.stat().st_size}


def software_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in ("tuneloop", "torch", "transformers", "peft", "accelerate"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def read_record(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / RECORD_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no {RECORD_FILE}; is this a tuneloop run directory?")
    return json.loads(path.read_text(encoding="utf-8"))


def update_record(run_dir: Path, **sections: Any) -> dict[str, Any]:
    """Merge top-level ``sections`` into the run's record (e.g. ``eval=...`` after evaluation)."""
    record = read_record(run_dir)
    record.update(sections)
    write_json_atomic(Path(run_dir) / RECORD_FILE, record)
    return record
