"""Scores for a saliency map over the image grid: concentration, sparsity, ROI hits, paraphrase agreement.

A *map* is a 2-D array (numpy or torch) over the image-token grid, e.g. 16x16 for PaliGemma-224,
with non-negative values on any scale (attention rows, gradients x input magnitudes, ...). Every
function normalises it to a probability distribution p (p = map / map.sum()) and rejects maps that
are not 2-D, contain NaN/inf or negative values, or sum to zero (signed attributions must be made
non-negative first, e.g. with ``abs`` or ``clip(min=0)``: the choice changes the meaning, so it is
the caller's).

A *mask* is a 2-D ground-truth ROI (bool, or numbers in {0, 1}) at any resolution, e.g. the
phantom's 64x64 pixel mask. It is assumed to cover the same image extent as the map grid (the
model's resized input); it is brought to the grid by **area-fraction pooling**: each grid cell gets
the fraction of its area covered by the mask, computed exactly even when the sizes do not divide
(a 64x64 mask on an 8x8 grid is plain 8x8 mean pooling). We pool the mask down rather than
upsample the map, so the scores stay sums over the model's own cells.

>>> import numpy as np
>>> m = np.zeros((4, 4)); m[1, 2] = 1.0
>>> focus(m), pointing_game(m, m > 0)
(1.0, True)
"""

from __future__ import annotations

import itertools
from typing import Any, NamedTuple

import numpy as np
from scipy.ndimage import distance_transform_edt
from scipy.spatial.distance import jensenshannon
from scipy.stats import entropy

from medvlm.diagnostics.geometry import as_numpy

__all__ = [
    "RoiMass",
    "normalize_map",
    "mask_to_grid",
    "focus",
    "gini",
    "roi_mass",
    "pointing_game",
    "js_divergence",
    "js_distance",
    "paraphrase_divergence",
    "map_summary",
]


class RoiMass(NamedTuple):
    """Mass of the map inside the ROI, the same for a uniform map (chance), and their ratio."""

    mass: float  # sum of p over the mask (area-weighted), in [0, 1]
    chance: float  # mask area share = mass of a uniform map
    ratio: float  # mass / chance: 1 = chance level, 1/chance = all mass inside


def normalize_map(saliency: Any, name: str = "map") -> np.ndarray:
    """Validate a 2-D non-negative finite map with positive sum; return it divided by its sum."""
    m = as_numpy(saliency, name)
    if m.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D grid (rows, cols), got shape {m.shape}; "
                         "reshape the image-token scores to the model's patch grid first")
    if not np.isfinite(m).all():
        raise ValueError(f"{name}: {int((~np.isfinite(m)).sum())} NaN/inf cells; fix the upstream saliency")
    if (m < 0).any():
        raise ValueError(f"{name}: {int((m < 0).sum())} negative cells (min {m.min():.3g}); saliency must be "
                         "non-negative: take abs() or clip(min=0) first")
    total = m.sum()
    if total <= 0:
        raise ValueError(f"{name}: all cells are zero; there is no distribution to score")
    return m / total


def _coverage(n_src: int, n_dst: int) -> np.ndarray:
    """(n_dst, n_src) matrix: fraction of destination cell i's length covered by source cell j.

    Source cell j spans [j, j+1); destination cell i spans [i*n_src/n_dst, (i+1)*n_src/n_dst).
    Hand-written because scipy/PIL resizers interpolate instead of integrating area exactly.
    """
    edges = np.arange(n_dst + 1) * n_src / n_dst
    lo, hi = edges[:-1, None], edges[1:, None]
    j = np.arange(n_src)[None, :]
    overlap = np.clip(np.minimum(hi, j + 1) - np.maximum(lo, j), 0.0, None)
    return overlap / (n_src / n_dst)


def mask_to_grid(mask: Any, grid_shape: tuple[int, int], name: str = "mask") -> np.ndarray:
    """Area fraction of each grid cell covered by ``mask`` (values in [0, 1], shape ``grid_shape``)."""
    m = as_numpy(mask, name)
    if m.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D mask, got shape {m.shape}")
    if not np.isin(m, (0.0, 1.0)).all():
        vals = np.unique(m[np.isfinite(m)])[:6].tolist()
        raise ValueError(f"{name}: expected a binary mask (bool or 0/1), found values {vals}; "
                         "threshold it first, e.g. mask > 0 for a 0/255 PNG")
    frac = _coverage(m.shape[0], grid_shape[0]) @ m @ _coverage(m.shape[1], grid_shape[1]).T
    return np.clip(frac, 0.0, 1.0)


def _grid_mask(p: np.ndarray, mask: Any) -> np.ndarray:
    frac = mask_to_grid(mask, p.shape)
    if not (frac > 0).any():
        raise ValueError("mask is empty (no ROI pixels); ROI scores are undefined for this image")
    return frac


def focus(saliency: Any) -> float:
    """1 - H(p) / log(N): 0 for a uniform map, 1 for a single cell (N cells, H natural-log entropy).

    The normalised-entropy "focus" score of the medical-vlm-intepret toolkit. Needs N >= 2 cells.
    """
    p = normalize_map(saliency)
    if p.size < 2:
        raise ValueError(f"map has {p.size} cell; focus needs at least 2 (log N = 0)")
    return float(1.0 - entropy(p.ravel()) / np.log(p.size))


def gini(saliency: Any) -> float:
    """Gini sparsity index (Hurley & Rickard 2009, IEEE Trans. Inf. Theory 55(10), eq. for G(c)).

    With c sorted ascending, G = 1 - 2 * sum_k (c_k / ||c||_1) * (N - k + 1/2) / N, k = 1..N.
    0 for a uniform map, 1 - 1/N for a single non-zero cell.
    """
    c = np.sort(normalize_map(saliency).ravel())  # already sums to 1, i.e. c / ||c||_1
    n = c.size
    k = np.arange(1, n + 1)
    return float(1.0 - 2.0 * np.sum(c * (n - k + 0.5) / n))


def roi_mass(saliency: Any, mask: Any) -> RoiMass:
    """Share of the map's mass inside the ROI, with the chance level of a uniform map.

    mass = sum_cells p * f, where f is the cell's area fraction inside the mask (see module doc);
    chance = mean(f), the mask's area share; ratio = mass / chance. Raises ValueError for an empty
    mask.
    """
    p = normalize_map(saliency)
    frac = _grid_mask(p, mask)
    mass, chance = float(np.sum(p * frac)), float(frac.mean())
    return RoiMass(mass=mass, chance=chance, ratio=mass / chance)


def _argmax_cells(p: np.ndarray) -> np.ndarray:
    return np.argwhere(p >= p.max() - 1e-12 * p.max())


def pointing_game(saliency: Any, mask: Any, tolerance: float = 0) -> bool:
    """Pointing game (Zhang et al. 2016, "Top-down neural attention by excitation backprop").

    Hit when the map's maximum cell lies in the ROI: a grid cell counts as ROI when the mask
    touches any part of it; ``tolerance`` (in cells, Euclidean between cell centres) widens the ROI.
    Ties: when several cells share the maximum, *all* of them must hit, so a flat map cannot score
    by luck of the argmax order.
    """
    if tolerance < 0:
        raise ValueError(f"tolerance={tolerance}; expected >= 0 cells")
    p = normalize_map(saliency)
    inside = _grid_mask(p, mask) > 1e-9  # any overlap; the epsilon absorbs float rounding only
    dist = distance_transform_edt(~inside)  # 0 inside the ROI, else cells to the nearest ROI cell
    return bool(all(dist[r, c] <= tolerance for r, c in _argmax_cells(p)))


def _pair(p: Any, q: Any) -> tuple[np.ndarray, np.ndarray]:
    a, b = normalize_map(p, "p"), normalize_map(q, "q")
    if a.shape != b.shape:
        raise ValueError(f"maps differ in shape: p {a.shape} vs q {b.shape}; compare maps on the same grid")
    return a.ravel(), b.ravel()


def js_distance(p: Any, q: Any) -> float:
    """Jensen-Shannon distance in base 2: sqrt of :func:`js_divergence`, a metric in [0, 1]."""
    a, b = _pair(p, q)
    return float(jensenshannon(a, b, base=2))


def js_divergence(p: Any, q: Any) -> float:
    """Jensen-Shannon divergence with base-2 logs, in [0, 1]: 0 for equal maps, 1 for disjoint ones.

    JSD(P||Q) = H(M) - (H(P) + H(Q)) / 2 with M = (P + Q) / 2 (Lin 1991), both maps normalised.
    Computed as the square of scipy's base-2 Jensen-Shannon distance.
    """
    return js_distance(p, q) ** 2


def paraphrase_divergence(maps: list[Any]) -> dict[str, Any]:
    """Mean pairwise JS divergence and distance (base 2) across maps of paraphrases of one question.

    Returns ``{"n_maps", "n_pairs", "js_divergence_mean", "js_distance_mean", "js_distance_max"}``;
    with fewer than 2 maps the scores are NaN and ``"nan_reason"`` says why.
    """
    out: dict[str, Any] = {"n_maps": len(maps), "n_pairs": 0}
    if len(maps) < 2:
        nan = float("nan")
        out.update(js_divergence_mean=nan, js_distance_mean=nan, js_distance_max=nan,
                   nan_reason=f"{len(maps)} map(s); need at least 2 paraphrases to compare")
        return out
    dists = np.array([js_distance(a, b) for a, b in itertools.combinations(maps, 2)])
    out.update(n_pairs=int(dists.size), js_divergence_mean=float(np.mean(dists**2)),
               js_distance_mean=float(dists.mean()), js_distance_max=float(dists.max()))
    return out


def map_summary(saliency: Any, mask: Any = None, tolerance: float = 0) -> dict[str, Any]:
    """All scores of one map as a JSON-serialisable dict.

    Always: ``grid`` [rows, cols], ``focus``, ``gini``, ``entropy`` (nats), ``n_argmax_ties``. With a
    mask: ``roi_mass``, ``roi_chance``, ``roi_mass_ratio``, ``pointing_game`` (bool) and
    ``pointing_tolerance``; an empty mask (a healthy image) gives NaN/None there. ``nan_reasons``
    maps each undefined score to the reason.
    """
    p = normalize_map(saliency)
    reasons: dict[str, str] = {}
    out: dict[str, Any] = {
        "grid": list(p.shape),
        "focus": focus(p) if p.size > 1 else float("nan"),
        "gini": gini(p),
        "entropy": float(entropy(p.ravel())),
        "n_argmax_ties": int(len(_argmax_cells(p))),
        "nan_reasons": reasons,
    }
    if p.size < 2:
        reasons["focus"] = "map has a single cell (log N = 0)"
    if mask is None:
        return out
    out["pointing_tolerance"] = tolerance
    if not (mask_to_grid(mask, p.shape) > 0).any():
        out.update(roi_mass=float("nan"), roi_chance=0.0, roi_mass_ratio=float("nan"), pointing_game=None)
        why = "mask is empty (no ROI pixels)"
        reasons.update(dict.fromkeys(("roi_mass", "roi_mass_ratio", "pointing_game"), why))
        return out
    rm = roi_mass(p, mask)
    out.update(roi_mass=rm.mass, roi_chance=rm.chance, roi_mass_ratio=rm.ratio,
               pointing_game=pointing_game(p, mask, tolerance))
    return out


def score_map(grid: np.ndarray, mask: np.ndarray | None) -> dict[str, Any]:
    """:func:`map_summary` of a map (against a mask when there is one); signed maps are clipped at 0
    first (the score asks where the positive evidence lies); a map without positive mass gets NaN
    and the reason."""
    g = np.clip(np.asarray(grid, float), 0.0, None)
    if not np.isfinite(g).all() or g.sum() <= 0:
        why = "map has no positive finite mass"
        keys = ("focus", "gini", "entropy") + (() if mask is None else ("roi_mass", "roi_chance", "roi_mass_ratio"))
        return {**dict.fromkeys(keys, float("nan")), "pointing_game": None, "nan_reasons": dict.fromkeys(keys, why)}
    return map_summary(g, mask)
