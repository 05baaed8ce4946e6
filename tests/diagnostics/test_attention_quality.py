"""Saliency-map scores: known answers on tiny grids, mask resampling, bad input, torch input."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from medvlm.diagnostics.attention_quality import (
    focus,
    gini,
    js_distance,
    js_divergence,
    map_summary,
    mask_to_grid,
    normalize_map,
    paraphrase_divergence,
    pointing_game,
    roi_mass,
)


def one_hot(shape: tuple[int, int], cell: tuple[int, int], value: float = 3.0) -> np.ndarray:
    m = np.zeros(shape)
    m[cell] = value
    return m


def pixel_mask(size: int = 64, rows: slice = slice(24, 40), cols: slice = slice(32, 40)) -> np.ndarray:
    m = np.zeros((size, size), dtype=bool)
    m[rows, cols] = True
    return m


# --------------------------------------------------------------------------- focus and gini
N = 64
CONCENTRATION = [
    ("uniform", np.full((8, 8), 7.0), 0.0, 0.0),
    ("one-hot", one_hot((8, 8), (3, 4)), 1.0, 1 - 1 / N),
    # half the cells at 1, half at 0: entropy log(32), so focus = 1 - log 32 / log 64 = 1/6
    ("half", np.r_[np.ones(32), np.zeros(32)].reshape(8, 8), 1 / 6, 0.5),
    ("scale-free", one_hot((8, 8), (0, 0), value=1e-9), 1.0, 1 - 1 / N),
]


@pytest.mark.parametrize("name,m,exp_focus,exp_gini", CONCENTRATION, ids=[c[0] for c in CONCENTRATION])
def test_focus_and_gini_known_values(name, m, exp_focus, exp_gini):
    assert focus(m) == pytest.approx(exp_focus, abs=1e-12)
    assert gini(m) == pytest.approx(exp_gini, abs=1e-12)


def test_more_concentrated_maps_score_higher():
    r = np.random.default_rng(0)
    base = r.uniform(size=(16, 16))
    sharp = base**8
    assert focus(sharp) > focus(base) and gini(sharp) > gini(base)


BAD_MAPS = [
    ("negative", np.array([[1.0, -0.5], [0.2, 0.1]]), "negative cells"),
    ("all zero", np.zeros((4, 4)), "all cells are zero"),
    ("NaN", np.array([[1.0, np.nan], [0.2, 0.1]]), "NaN/inf"),
    ("1-D", np.ones(16), "2-D grid"),
]


@pytest.mark.parametrize("name,m,match", BAD_MAPS, ids=[c[0] for c in BAD_MAPS])
@pytest.mark.parametrize("fn", [focus, gini, map_summary, lambda m: js_divergence(m, m)])
def test_bad_maps_rejected(name, m, match, fn):
    with pytest.raises(ValueError, match=match):
        fn(m)


def test_focus_single_cell_rejected():
    with pytest.raises(ValueError, match="at least 2"):
        focus(np.ones((1, 1)))


# --------------------------------------------------------------------------- masks and ROI
def test_mask_to_grid_is_area_fraction_pooling():
    # 8x8-pixel blocks: rows 24:40 -> cells 3 and 4; cols 32:40 -> cell 4
    grid = mask_to_grid(pixel_mask(), (8, 8))
    expected = np.zeros((8, 8))
    expected[3:5, 4] = 1.0
    np.testing.assert_allclose(grid, expected)
    half = np.zeros((64, 64), dtype=bool)
    half[:, :4] = True  # half of the first column of 8-pixel cells
    np.testing.assert_allclose(mask_to_grid(half, (8, 8))[:, 0], 0.5)


def test_mask_to_grid_non_divisible_sizes_keep_area():
    m = np.zeros((10, 10))
    m[3:7, 2:5] = 1
    grid = mask_to_grid(m, (3, 3))
    assert grid.mean() == pytest.approx(m.mean())  # area share preserved exactly
    assert grid[0, 0] == pytest.approx((1 / 3 / (10 / 3)) * (4 / 3 / (10 / 3)))  # 0.1 of rows x 0.4 of cols
    assert grid[:, 2].max() == 0.0  # column cells beyond pixel 6.67 never touch the mask
    up = mask_to_grid(np.eye(2), (4, 4))  # smaller mask than grid: each pixel covers 2x2 cells
    np.testing.assert_allclose(up, np.kron(np.eye(2), np.ones((2, 2))))


def test_mask_must_be_binary():
    with pytest.raises(ValueError, match="mask > 0"):
        mask_to_grid(pixel_mask().astype(np.uint8) * 255, (8, 8))


ROI_CASES = [
    ("all mass inside", one_hot((8, 8), (3, 4)), 1.0),
    ("all mass outside", one_hot((8, 8), (0, 0)), 0.0),
    ("uniform map is chance", np.ones((8, 8)), 2 / 64),
    ("split inside/outside", one_hot((8, 8), (3, 4)) + one_hot((8, 8), (7, 7)), 0.5),
]


@pytest.mark.parametrize("name,m,mass", ROI_CASES, ids=[c[0] for c in ROI_CASES])
def test_roi_mass(name, m, mass):
    rm = roi_mass(m, pixel_mask())
    assert rm.mass == pytest.approx(mass)
    assert rm.chance == pytest.approx(2 / 64)  # mask covers 16x8 of 64x64 pixels
    assert rm.ratio == pytest.approx(mass / (2 / 64))


def test_roi_mass_empty_mask_raises():
    with pytest.raises(ValueError, match="mask is empty"):
        roi_mass(np.ones((8, 8)), np.zeros((64, 64), dtype=bool))


POINTING = [
    ("argmax inside", (3, 4), 0, True),
    ("argmax one cell away", (3, 5), 0, False),
    ("one cell away within tolerance 1", (3, 5), 1, True),
    ("diagonal neighbour needs sqrt 2", (2, 5), 1, False),
    ("diagonal neighbour within 1.5", (2, 5), 1.5, True),
    ("far away", (7, 0), 2, False),
]


@pytest.mark.parametrize("name,cell,tol,hit", POINTING, ids=[c[0] for c in POINTING])
def test_pointing_game(name, cell, tol, hit):
    m = np.full((8, 8), 0.1)
    m[cell] = 1.0
    assert pointing_game(m, pixel_mask(), tolerance=tol) is hit


def test_pointing_game_any_overlap_and_ties():
    sliver = np.zeros((64, 64), dtype=bool)
    sliver[0, 0] = True  # one pixel of the first 8x8 cell is enough
    assert pointing_game(one_hot((8, 8), (0, 0)), sliver)
    two_peaks = one_hot((8, 8), (3, 4)) + one_hot((8, 8), (0, 0))
    assert not pointing_game(two_peaks, pixel_mask())  # tied maxima: all must hit
    assert not pointing_game(np.ones((8, 8)), pixel_mask())  # a flat map never hits by argmax order
    with pytest.raises(ValueError, match="tolerance"):
        pointing_game(np.ones((8, 8)), pixel_mask(), tolerance=-1)


# --------------------------------------------------------------------------- JS and paraphrases
JS_CASES = [
    ("identical", np.ones((4, 4)), np.full((4, 4), 5.0), 0.0),
    ("disjoint", one_hot((4, 4), (0, 0)), one_hot((4, 4), (3, 3)), 1.0),
    # p = (1, 0), q = (1/2, 1/2): JSD = H(3/4, 1/4) - H(1/2, 1/2)/2 in bits
    ("half overlap", np.array([[1.0, 0.0]]), np.array([[1.0, 1.0]]),
     -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25)) - 0.5),
]


@pytest.mark.parametrize("name,p,q,div", JS_CASES, ids=[c[0] for c in JS_CASES])
def test_js_divergence_and_distance(name, p, q, div):
    assert js_divergence(p, q) == pytest.approx(div, abs=1e-9)
    assert js_distance(p, q) == pytest.approx(math.sqrt(div), abs=1e-6)
    assert js_divergence(q, p) == pytest.approx(js_divergence(p, q))


def test_js_shape_mismatch_raises():
    with pytest.raises(ValueError, match="differ in shape"):
        js_divergence(np.ones((4, 4)), np.ones((8, 8)))


def test_paraphrase_divergence():
    a, b = one_hot((4, 4), (0, 0)), one_hot((4, 4), (3, 3))
    out = paraphrase_divergence([a, a, b])  # pairs: (a,a)=0, (a,b)=1, (a,b)=1
    assert out["n_maps"] == 3 and out["n_pairs"] == 3
    assert out["js_divergence_mean"] == pytest.approx(2 / 3)
    assert out["js_distance_mean"] == pytest.approx(2 / 3)
    assert out["js_distance_max"] == pytest.approx(1.0)
    single = paraphrase_divergence([a])
    assert single["n_pairs"] == 0 and math.isnan(single["js_divergence_mean"])
    assert "at least 2" in single["nan_reason"]


# --------------------------------------------------------------------------- summary and torch
def test_map_summary_with_and_without_mask_is_json():
    m = one_hot((8, 8), (3, 4))
    out = map_summary(m, pixel_mask(), tolerance=1)
    assert out["focus"] == pytest.approx(1.0) and out["pointing_game"] is True
    assert out["roi_mass"] == pytest.approx(1.0) and out["roi_mass_ratio"] == pytest.approx(32.0)
    assert out["grid"] == [8, 8] and out["n_argmax_ties"] == 1 and out["nan_reasons"] == {}
    assert json.loads(json.dumps(out)) == out
    bare = map_summary(m)
    assert "roi_mass" not in bare and bare["gini"] == pytest.approx(1 - 1 / 64)
    healthy = map_summary(m, np.zeros((64, 64), dtype=bool))
    assert math.isnan(healthy["roi_mass"]) and healthy["pointing_game"] is None
    assert healthy["nan_reasons"]["roi_mass"] == "mask is empty (no ROI pixels)"


def test_torch_inputs_accepted():
    m = torch.rand(8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    m_np = m.numpy().astype(np.float64)
    mask = torch.tensor(pixel_mask())
    assert focus(m) == pytest.approx(focus(m_np))
    assert gini(m.to(torch.float16)) == pytest.approx(gini(m_np), abs=1e-3)
    assert roi_mass(m, mask).mass == pytest.approx(roi_mass(m_np, pixel_mask()).mass)
    assert js_divergence(m, m_np) == pytest.approx(0.0, abs=1e-9)
    np.testing.assert_allclose(normalize_map(m).sum(), 1.0)
