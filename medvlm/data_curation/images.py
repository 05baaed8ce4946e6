"""Images for the unified record: safe path resolution, byte caching, verification, DICOM windowing.

A record's ``image`` column is always a string path. Loaders meet images in three shapes:

* a file name relative to the dataset root (``imgs/xmlab102/source.jpg``): resolved with
  :func:`safe_join`, which rejects anything that escapes the root (``..``, absolute paths
  elsewhere, symlinks pointing outside);
* a Hugging Face ``{"bytes": ..., "path": ...}`` dict (or a decoded PIL image): written once to
  ``<cache_dir>/<sha256 of the bytes><suffix>`` by :func:`cache_image_bytes`; the same bytes
  always map to the same file, so a re-run writes nothing;
* DICOM files: kept as paths; :func:`load_image` converts them to 8-bit RGB with a window.

>>> apply_window([-1000.0, 0.0, 1000.0], center=0, width=2000).tolist()
[0, 128, 255]
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from PIL import Image

from medvlm.utils.io import medvlm_home

#: Named CT windows as (center, width) in Hounsfield units (common radiology presets).
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (40.0, 400.0),
    "brain": (40.0, 80.0),
    "bone": (400.0, 1800.0),
}

Window = str | tuple[float, float] | None


class ImageError(ValueError):
    """An image reference that cannot be used; the message says why (loaders record it as a skip)."""


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


def is_dicom(path: str | os.PathLike) -> bool:
    """True for ``.dcm``/``.dicom`` files or files with the ``DICM`` marker at byte 128."""
    path = Path(path)
    if path.suffix.lower() in (".dcm", ".dicom"):
        return True
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def verify_image(path: str | os.PathLike) -> str:
    """Return "" when the image decodes fully, else the reason (truncated, not an image...).

    PIL's ``verify()`` checks structure only, so the pixels are also decoded with ``load()``
    to catch truncated files. DICOM files must carry decodable pixel data.
    """
    try:
        if is_dicom(path):
            ds = pydicom.dcmread(path)
            if "PixelData" not in ds:
                return "DICOM file has no pixel data"
            _ = ds.pixel_array
            return ""
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            im.load()
        return ""
    except Exception as err:  # noqa: BLE001 - any decoder failure means "unusable image"
        return f"corrupt or truncated image ({type(err).__name__}: {err})"


def apply_window(values: Any, center: float, width: float) -> np.ndarray:
    """Map values (e.g. Hounsfield units) through a linear VOI window to uint8 0..255.

    Formula: DICOM PS3.3 C.11.2.1.2.1 (linear window): below ``c - 0.5 - (w-1)/2`` → 0, above
    ``c - 0.5 + (w-1)/2`` → 255, else ``((x - (c - 0.5)) / (w - 1) + 0.5) * 255``.
    """
    x = np.asarray(values, dtype=np.float64)
    if width < 1:
        raise ValueError(f"window width must be >= 1, got {width}")
    y = ((x - (center - 0.5)) / (width - 1) + 0.5) * 255.0
    y = np.where(x <= center - 0.5 - (width - 1) / 2, 0.0, y)
    y = np.where(x > center - 0.5 + (width - 1) / 2, 255.0, y)
    return np.clip(np.rint(y), 0, 255).astype(np.uint8)


def _first(value: Any) -> float:
    """WindowCenter/Width may be multi-valued; the first value is the primary window."""
    if isinstance(value, pydicom.multival.MultiValue | list | tuple):
        value = value[0]
    return float(value)


def _dicom_window(ds: pydicom.Dataset, window: Window, hu: np.ndarray) -> tuple[float, float]:
    if isinstance(window, str):
        if window not in WINDOW_PRESETS:
            raise ValueError(f"unknown window preset {window!r}; choose one of {sorted(WINDOW_PRESETS)}")
        return WINDOW_PRESETS[window]
    if window is not None:
        return float(window[0]), float(window[1])
    if "WindowCenter" in ds and "WindowWidth" in ds:
        return _first(ds.WindowCenter), _first(ds.WindowWidth)
    lo, hi = float(hu.min()), float(hu.max())  # no window stored: stretch the full range
    return (lo + hi) / 2, max(hi - lo, 1.0)


def dicom_to_image(ds: pydicom.Dataset, window: Window = None) -> Image.Image:
    """A DICOM dataset → 8-bit RGB PIL image (modality LUT, then the window).

    Multi-frame data uses the middle frame. MONOCHROME1 (white = low) is inverted so that
    every output shows dense tissue bright.
    """
    arr = ds.pixel_array
    if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
        arr = arr[arr.shape[0] // 2]
    if getattr(ds, "PhotometricInterpretation", "MONOCHROME2") in ("RGB", "YBR_FULL", "YBR_FULL_422"):
        return Image.fromarray(np.asarray(arr, dtype=np.uint8)).convert("RGB")
    hu = pydicom.pixels.apply_modality_lut(arr, ds).astype(np.float64)  # RescaleSlope/Intercept
    center, width = _dicom_window(ds, window, hu)
    out = apply_window(hu, center, width)
    if getattr(ds, "PhotometricInterpretation", "") == "MONOCHROME1":
        out = 255 - out
    return Image.fromarray(out, mode="L").convert("RGB")


def load_image(path: str | os.PathLike, window: Window = None) -> Image.Image:
    """Open any image the records point to as an RGB PIL image.

    ``window`` applies to DICOM only: a preset name (``lung``, ``mediastinum``, ``brain``,
    ``bone``), a ``(center, width)`` pair, or None for the file's own WindowCenter/WindowWidth.
    """
    if is_dicom(path):
        return dicom_to_image(pydicom.dcmread(path), window)
    with Image.open(path) as im:
        return im.convert("RGB")
