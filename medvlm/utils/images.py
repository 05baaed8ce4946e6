"""The one image and mask reader: files (PNG, JPEG, DICOM), bytes, HF image dicts, PIL images and arrays.

Curation, training, evaluation, diagnostics and the explorer all read pixels through
:func:`read_image` and masks through :func:`read_mask`, so a record that passes curation's image
check is readable everywhere (a DICOM record included) and every room thresholds a mask the same way.

DICOM files become 8-bit RGB through the modality LUT (RescaleSlope / Intercept) and a linear VOI
window: the file's own WindowCenter / WindowWidth, a named preset, or a ``(center, width)`` pair.

>>> apply_window([-1000.0, 0.0, 1000.0], center=0, width=2000).tolist()
[0, 128, 255]
>>> read_mask(np.array([[0, 1], [0, 0]])).tolist()          # a 0/1 mask: nonzero is the ROI
[[False, True], [False, False]]
>>> read_mask(np.array([[0, 255], [100, 200]])).tolist()    # an 8-bit mask: above 127 is the ROI
[[False, True], [False, True]]
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from PIL import Image, UnidentifiedImageError

#: Named CT windows as (center, width) in Hounsfield units (common radiology presets).
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (40.0, 400.0),
    "brain": (40.0, 80.0),
    "bone": (400.0, 1800.0),
}

Window = str | tuple[float, float] | None


class ImageError(ValueError):
    """An image reference that cannot be used; the message names it and says why."""


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


def _read_file(path: Path, window: Window, name: str) -> Image.Image:
    if not path.is_file():
        raise FileNotFoundError(f"{name}: {path} does not exist; check the dataset's image paths (loaders "
                                "resolve them inside the dataset root)")
    try:
        if is_dicom(path):
            return dicom_to_image(pydicom.dcmread(path), window)
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, pydicom.errors.InvalidDicomError, AttributeError) as err:
        raise ImageError(f"{name}: {path} is not a readable image ({type(err).__name__}: {err}); pass a PNG, "
                         "JPEG or DICOM file, image bytes, a PIL image or an HxWx3 array") from err


def _from_array(image: Any, name: str) -> Image.Image:
    arr = np.asarray(image.detach().cpu() if hasattr(image, "detach") else image)
    if arr.ndim == 3 and arr.shape[-1] in (1, 3, 4):
        arr = arr[..., :3] if arr.shape[-1] != 1 else arr[..., 0]
    if (not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] == 3)) or min(arr.shape[:2]) < 2
            or not np.issubdtype(arr.dtype, np.number)):
        raise ImageError(f"{name}: array of shape {arr.shape} and dtype {arr.dtype} is not an image; "
                         "expected HxW or HxWxC (C in 1, 3, 4) numbers, uint8 0..255 or float 0..1")
    if arr.dtype != np.uint8:
        arr = np.clip(arr * 255.0 if arr.max() <= 1.0 else arr, 0, 255).astype(np.uint8)
    return Image.fromarray(arr).convert("RGB")


def read_image(image: Any, window: Window = None, *, name: str = "image") -> Image.Image:
    """An RGB PIL image from whatever a record, a user or a processor holds.

    ``image``: a path (PNG, JPEG, DICOM...), raw bytes, a Hugging Face image dict
    ``{"bytes", "path"}``, a PIL image, or an array / tensor (HxW, HxWx1, HxWx3, HxWx4; uint8
    0..255 or float 0..1). ``window`` applies to DICOM only (a preset name of
    :data:`WINDOW_PRESETS`, a ``(center, width)`` pair, or None for the file's own window).
    Raises ``FileNotFoundError`` for a missing file and :class:`ImageError` (a ``ValueError``)
    naming ``name`` and the input otherwise.
    """
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, dict):
        if image.get("bytes"):
            image = image["bytes"]
        elif image.get("path"):
            image = image["path"]
        else:
            raise ImageError(f"{name}: image dict without bytes or path ({sorted(image)})")
    if isinstance(image, bytes | bytearray):
        buf = io.BytesIO(bytes(image))
        if len(image) > 132 and bytes(image[128:132]) == b"DICM":
            return dicom_to_image(pydicom.dcmread(buf), window)
        try:
            with Image.open(buf) as im:
                return im.convert("RGB")
        except (UnidentifiedImageError, OSError) as err:
            raise ImageError(f"{name}: {len(image)} bytes that are not an image ({err})") from err
    if isinstance(image, str | os.PathLike):
        return _read_file(Path(image), window, name)
    return _from_array(image, name)


def read_mask(mask: Any, size: tuple[int, int] | None = None) -> np.ndarray:
    """A boolean region-of-interest mask from a path (PNG...), an image or an array.

    One threshold everywhere: a mask whose values are all 0/1 counts every nonzero pixel; an
    8-bit mask (0..255) counts pixels above 127, so a mask resized with interpolation keeps its
    outline. ``size`` = (width, height) resizes first (nearest neighbour, as labels must be).
    """
    if isinstance(mask, str | os.PathLike):
        path = Path(mask)
        if not path.is_file():
            raise FileNotFoundError(f"mask {path} does not exist; the record's roi path must name a mask image")
        with Image.open(path) as im:
            mask = im.convert("L")
    if isinstance(mask, Image.Image):
        mask = mask.convert("L")
        if size is not None:
            mask = mask.resize(size, Image.Resampling.NEAREST)
        arr = np.asarray(mask)
    else:
        arr = np.asarray(mask.detach().cpu() if hasattr(mask, "detach") else mask)
        if arr.ndim == 3 and arr.shape[-1] in (1, 3, 4):
            arr = arr[..., 0]
        if size is not None and arr.ndim == 2:
            arr = np.asarray(Image.fromarray(arr.astype(np.uint8) if arr.dtype == bool else arr)
                             .resize(size, Image.Resampling.NEAREST))
    if arr.ndim != 2:
        raise ValueError(f"mask of shape {arr.shape}; expected a 2-D array")
    if arr.dtype == bool:
        return arr
    return arr > (0 if float(arr.max(initial=0)) <= 1 else 127)
