"""Images for the unified record: safe path resolution and byte caching.

A record's ``image`` column is always a string path. Loaders meet images in three shapes:

* a file name relative to the dataset root (``imgs/xmlab102/source.jpg``): resolved with
  :func:`safe_join`, which rejects anything that escapes the root (``..``, absolute paths
  elsewhere, symlinks pointing outside);
* a Hugging Face ``{"bytes": ..., "path": ...}`` dict (or a decoded PIL image): written once to
  ``<cache_dir>/<sha256 of the bytes><suffix>`` by :func:`cache_image_bytes`; the same bytes
  always map to the same file, so a re-run writes nothing;
* DICOM files: kept as paths; every room reads them (windowed to 8-bit RGB) through
  :func:`medvlm.utils.images.read_image`, the one reader of pixels.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from medvlm.utils.images import ImageError
from medvlm.utils.io import medvlm_home


def default_cache_dir(source: str) -> Path:
    """Where bytes-only images are written unless a loader gets ``image_cache_dir``:
    ``$MEDVLM_HOME/image_cache/<source>/`` (``~/.cache/medvlm/image_cache/<source>/``)."""
    return medvlm_home() / "image_cache" / source


def safe_join(root: str | os.PathLike, rel: str | os.PathLike) -> Path:
    """Resolve ``rel`` inside ``root`` and return the absolute path.

    Raises :class:`ImageError` when the result lies outside ``root`` once ``..`` and symlinks
    are resolved (``../../etc/passwd``, ``/etc/passwd``, a symlink to ``/``) or when the path
    is empty. Existence is not checked here.
    """
    text = os.fspath(rel).strip()
    if not text:
        raise ImageError("empty image path")
    root_real = Path(root).resolve()
    candidate = Path(text)
    full = candidate if candidate.is_absolute() else root_real / candidate
    real = full.resolve()
    if not real.is_relative_to(root_real):
        raise ImageError(f"image path {text!r} escapes the dataset root {str(root_real)!r}; refused")
    return real


def resolve_file(root: str | os.PathLike, rel: str, search_dirs: Sequence[str] = ("",)) -> Path:
    """Find ``rel`` under ``root`` (trying each of ``search_dirs`` in turn); safe and existing.

    Raises :class:`ImageError` for an escaping path, or for a file that exists in none of the
    folders (the message lists where it looked).
    """
    tried = []
    for sub in search_dirs:
        path = safe_join(root, os.path.join(sub, rel) if sub else rel)
        if path.is_file():
            return path
        tried.append(str(path))
    raise ImageError(f"image file not found: tried {tried}")


def cache_image_bytes(data: bytes, cache_dir: str | os.PathLike, name_hint: str = "") -> Path:
    """Write image bytes once to ``cache_dir/<sha256><suffix>`` and return that path.

    The suffix comes from ``name_hint`` (the HF dict's ``path``) or ``.png``. Content-addressed
    names make the write idempotent and deduplicate identical images across rows.
    """
    if not isinstance(data, bytes | bytearray) or not data:
        raise ImageError("image bytes are empty")
    suffix = Path(name_hint).suffix.lower() if name_hint else ""
    if not suffix or len(suffix) > 6:
        suffix = ".png"
    out = Path(cache_dir) / f"{hashlib.sha256(data).hexdigest()}{suffix}"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, out)
    return out


def image_to_path(value: Any, root: str | os.PathLike | None, cache_dir: str | os.PathLike,
                  search_dirs: Sequence[str] = ("",)) -> Path:
    """Turn any image reference a source may hold into an absolute, existing file path.

    ``value`` may be a relative/absolute path string (needs ``root``), an HF image dict
    ``{"bytes", "path"}`` (bytes win; a dict with only a path is treated as a path), or a
    PIL image (saved as PNG). Raises :class:`ImageError` with the reason otherwise.
    """
    if isinstance(value, Image.Image):
        buf = io.BytesIO()
        value.save(buf, format="PNG")
        return cache_image_bytes(buf.getvalue(), cache_dir, "x.png")
    if isinstance(value, dict):
        if value.get("bytes"):
            return cache_image_bytes(value["bytes"], cache_dir, value.get("path") or "")
        value = value.get("path") or ""
    if not isinstance(value, str | os.PathLike):
        raise ImageError(f"image reference of type {type(value).__name__} is not a path, bytes or image")
    if root is None:
        raise ImageError(f"image path {os.fspath(value)!r} given but the dataset has no local root folder")
    return resolve_file(root, os.fspath(value), search_dirs)
