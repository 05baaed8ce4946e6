"""Atomic outputs, manifests and hashes: every output folder says what made it."""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import tempfile
from collections.abc import Iterable, Mapping
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


def read_jsonl(path: str | os.PathLike, error: type[Exception] = ValueError) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file (blank lines skipped); a bad line raises ``error`` naming
    ``path:line``."""
    path = Path(path)
    rows = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise error(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno}); "
                            "each line must hold one JSON object") from e
            if not isinstance(obj, dict):
                raise error(f"{path}:{lineno}: expected a JSON object per line, got {type(obj).__name__}")
            rows.append(obj)
    return rows


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict[str, Any]]) -> Path:
    """One JSON object per line, through a temp file renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


def did_you_mean(name: str, choices: Iterable[str], what: str) -> str:
    """``unknown <what> 'x'. Did you mean 'y'? Available: ...`` for an error message."""
    import difflib

    choices = sorted(choices)
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.5)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return f"unknown {what} {name!r}.{hint} Available: {', '.join(choices)}"


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


def to_jsonable(obj: Any) -> Any:
    """Recursively turn numpy scalars into Python numbers and NaN/inf into ``None`` (strict JSON)."""
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
