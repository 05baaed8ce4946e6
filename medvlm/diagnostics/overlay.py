"""Draw a saliency map over its image: matplotlib colormap + PIL blending (no OpenCV).

A map is a 2-D grid over the image tokens (rows x cols from the sequence); the image is the
model's input (uint8 HxWx3 at the processor's resolution, e.g. ``Example.image``). The map is
min-max scaled to [0, 1], resized to the image with bilinear interpolation (PIL float mode), coloured
with a matplotlib colormap and alpha-blended over the image.

>>> import numpy as np
>>> img = overlay(np.zeros((64, 64, 3), np.uint8), np.eye(8))
>>> img.size, img.mode
((64, 64), 'RGB')
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from PIL import Image

from medvlm.utils.images import read_image


def scale01(grid: Any) -> np.ndarray:
    """Min-max scale a finite 2-D map to [0, 1] (a constant map becomes all zeros)."""
    m = np.asarray(grid.detach().float().cpu() if hasattr(grid, "detach") else grid, dtype=np.float64)
    if m.ndim != 2:
        raise ValueError(f"saliency map must be 2-D (rows, cols), got shape {m.shape}")
    if not np.isfinite(m).all():
        raise ValueError(f"saliency map has {int((~np.isfinite(m)).sum())} NaN/inf cells")
    span = m.max() - m.min()
    return (m - m.min()) / span if span > 0 else np.zeros_like(m)


def heatmap(grid: Any, size: tuple[int, int], cmap: str = "jet") -> np.ndarray:
    """The map resized to ``size`` (width, height) and coloured: uint8 HxWx3."""
    m = Image.fromarray(scale01(grid).astype(np.float32), mode="F").resize(size, Image.Resampling.BILINEAR)
    rgba = matplotlib.colormaps[cmap](np.clip(np.asarray(m), 0.0, 1.0))
    return (rgba[..., :3] * 255).round().astype(np.uint8)


def enlarge(image: Any, min_side: int = 256) -> Image.Image:
    """``image`` enlarged by a whole factor (nearest neighbour, so pixels stay sharp) until its
    longer side is at least ``min_side``: a 64-pixel model input stays readable in a report."""
    pil = read_image(image)
    factor = max(1, -(-min_side // max(pil.size)))
    return pil.resize((pil.width * factor, pil.height * factor), Image.Resampling.NEAREST)


def overlay(image: Any, grid: Any, alpha: float = 0.5, cmap: str = "jet", outline: Any = None) -> Image.Image:
    """RGB image with the coloured map blended over it (``alpha`` = weight of the map, in [0, 1]).

    ``outline``: an optional ground-truth mask (2-D, nonzero = ROI, any resolution covering the same
    extent) whose boundary is drawn in white, so a reader can see whether the map is on the lesion.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha}; expected a value in [0, 1]")
    base = read_image(image)
    heat = Image.fromarray(heatmap(grid, base.size, cmap))
    out = Image.blend(base, heat, alpha)
    if outline is not None:
        out = draw_outline(out, outline)
    return out


def draw_outline(image: Image.Image, mask: Any) -> Image.Image:
    """``image`` with the boundary of ``mask`` (resized to the image, nearest) drawn in white."""
    from scipy.ndimage import binary_erosion

    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"outline mask must be 2-D, got shape {m.shape}")
    m = np.asarray(Image.fromarray((m != 0).astype(np.uint8) * 255).resize(image.size, Image.Resampling.NEAREST)) > 0
    edge = m & ~binary_erosion(m)
    arr = np.asarray(image).copy()
    arr[edge] = 255
    return Image.fromarray(arr)


def save_overlay(path: str | os.PathLike, image: Any, grid: Any, alpha: float = 0.5, cmap: str = "jet",
                 outline: Any = None) -> Path:
    """Write :func:`overlay` to ``path`` (format from the suffix) atomically; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
    try:
        overlay(image, grid, alpha, cmap, outline).save(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
