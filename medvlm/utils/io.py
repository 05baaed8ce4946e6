"""Atomic outputs, manifests and hashes: every output folder says what made it."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def medvlm_home() -> Path:
    """The base directory for caches (base models, phantom data): ``$MEDVLM_HOME`` or ``~/.cache/medvlm``."""
    return Path(os.environ.get("MEDVLM_HOME", Path.home() / ".cache" / "medvlm")).expanduser()


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temp file in the same folder, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    """Stable hash of a JSON-able object (keys sorted)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def hash_rows(rows: Iterable[str]) -> str:
    """Order-sensitive hash of an iterable of strings (e.g. record ids)."""
    h = hashlib.sha256()
    for row in rows:
        h.update(row.encode())
        h.update(b"\0")
    return h.hexdigest()


def versions() -> dict[str, str]:
    """Versions of the libraries a result depends on, for manifests."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("medvlm", "torch", "transformers", "peft", "trl", "datasets", "accelerate", "numpy"):
        try:  # package metadata, not imports: recording versions must not load torch
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def write_manifest(folder: str | os.PathLike, **fields: Any) -> Path:
    """Write ``manifest.json`` last: its presence means the step finished."""
    data = {"versions": versions(), **fields}
    return atomic_write_json(Path(folder) / "manifest.json", data)
