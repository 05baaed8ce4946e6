"""Embedding geometry: known answers on synthetic data, degenerate input, torch input."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from medvlm.diagnostics.geometry import (
    DegenerateInputError,
    anisotropy,
    cosine_anisotropy_baseline,
    intra_sentence_similarity,
    intrinsic_dimension,
    layerwise_geometry,
    linearity_score,
    max_explainable_variance,
    self_similarity,
)


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def gaussian(n: int, d: int, seed: int = 0) -> np.ndarray:
    return rng(seed).normal(size=(n, d))


# --------------------------------------------------------------------------- linearity
def _relu_mlp(X: np.ndarray) -> np.ndarray:
    r = rng(7)
    return np.maximum(X @ r.normal(size=(X.shape[1], 64)), 0) @ r.normal(size=(64, X.shape[1]))


LINEAR_MAPS = [
    ("invertible linear", lambda X: X @ rng(1).normal(size=(8, 8)), False),
    ("invertible linear, centred", lambda X: X @ rng(1).normal(size=(8, 8)), True),
    ("diagonal scaling", lambda X: X * np.arange(1.0, 9.0), False),
    ("affine, centred", lambda X: X @ rng(2).normal(size=(8, 8)) + 5.0, True),
    ("projection to fewer dims", lambda X: X @ rng(3).normal(size=(8, 3)), False),
]


@pytest.mark.parametrize("name,fn,centered", LINEAR_MAPS, ids=[c[0] for c in LINEAR_MAPS])
def test_linearity_is_one_for_linear_maps(name, fn, centered):
    X = gaussian(300, 8)
    assert linearity_score(X, fn(X), centered=centered) == pytest.approx(1.0, abs=1e-9)


NONLINEAR_MAPS = [
    ("tanh of large-scale input", lambda X: np.tanh(10.0 * X), False),
    ("tanh of large-scale input, centred", lambda X: np.tanh(10.0 * X), True),
    ("random ReLU MLP", _relu_mlp, False),
    ("random ReLU MLP, centred", _relu_mlp, True),
]


@pytest.mark.parametrize("name,fn,centered", NONLINEAR_MAPS, ids=[c[0] for c in NONLINEAR_MAPS])
def test_linearity_is_low_for_nonlinear_maps(name, fn, centered):
    X = gaussian(500, 8)
    score = linearity_score(X, fn(X), centered=centered)
    assert 0.0 <= score < 0.9


def test_uncentred_linearity_has_no_intercept():
    X = gaussian(300, 8)
    Y = X @ rng(2).normal(size=(8, 8)) + 5.0
    assert linearity_score(X, Y, centered=False) < 0.9
    assert linearity_score(X, Y, centered=True) == pytest.approx(1.0, abs=1e-9)


def test_linearity_rejects_underdetermined_fit():
    X = gaussian(10, 32)  # more dimensions than tokens: any Y is fitted exactly
    with pytest.raises(DegenerateInputError, match="trivially 1"):
        linearity_score(X, np.tanh(X))


@pytest.mark.parametrize(
    "X,Y,centered,error,match",
    [
        (np.ones((20, 4)), gaussian(20, 4), True, DegenerateInputError, "identical"),
        (np.zeros((20, 4)), gaussian(20, 4), False, DegenerateInputError, "all-zero"),
        (gaussian(20, 4), gaussian(21, 4), False, ValueError, "same tokens"),
        (gaussian(20, 4)[None], gaussian(20, 4), False, ValueError, "batch axis"),
        (np.where(np.eye(20, 4) == 1, np.nan, 0.0) + 1.0, gaussian(20, 4), False, ValueError, "NaN"),
    ],
    ids=["constant X centred", "zero X", "row mismatch", "3-D input", "NaN"],
)
def test_linearity_bad_input(X, Y, centered, error, match):
    with pytest.raises(error, match=match):
        linearity_score(X, Y, centered=centered)


# --------------------------------------------------------------------------- anisotropy
def test_anisotropy_stretched_vs_isotropic():
    stretched = gaussian(1000, 10) * np.r_[100.0, np.ones(9)]
    assert anisotropy(stretched) > 0.99
    assert anisotropy(gaussian(5000, 10)) == pytest.approx(0.1, abs=0.02)


def test_anisotropy_constant_vectors_raise():
    with pytest.raises(DegenerateInputError, match="identical"):
        anisotropy(np.tile([1.0, 2.0, 3.0], (10, 1)))


def test_cosine_baseline_equals_brute_force_mean_over_pairs():
    X = gaussian(40, 6) + 0.5
    U = X / np.linalg.norm(X, axis=1, keepdims=True)
    C = U @ U.T
    brute = C[~np.eye(40, dtype=bool)].mean()
    assert cosine_anisotropy_baseline(X) == pytest.approx(brute, abs=1e-12)


@pytest.mark.parametrize(
    "X,lo,hi",
    [
        (gaussian(2000, 16), -0.02, 0.02),
        (gaussian(500, 16) + 20.0, 0.95, 1.0),
        (np.tile([3.0, 4.0], (5, 1)), 1 - 1e-12, 1 + 1e-12),
    ],
    ids=["isotropic", "shared offset", "identical"],
)
def test_cosine_baseline_range(X, lo, hi):
    assert lo <= cosine_anisotropy_baseline(X) <= hi


def test_cosine_baseline_zero_vector_raises():
    X = gaussian(5, 3)
    X[2] = 0
    with pytest.raises(DegenerateInputError, match=r"rows \[2\] are zero"):
        cosine_anisotropy_baseline(X)


# --------------------------------------------------------------------------- intrinsic dimension
def _plane_in_50d(n: int = 1000) -> np.ndarray:
    return rng(3).uniform(size=(n, 2)) @ rng(4).normal(size=(2, 50))


def _circle_in_10d(n: int = 800) -> np.ndarray:
    t = rng(6).uniform(0, 2 * np.pi, n)
    return np.c_[np.cos(t), np.sin(t)] @ rng(7).normal(size=(2, 10))


ID_CASES = [
    ("plane in 50-D", _plane_in_50d, 2.0, 0.3),
    ("5-D gaussian", lambda: gaussian(1500, 5, seed=5), 5.0, 0.6),
    ("circle in 10-D", lambda: _circle_in_10d(), 1.0, 0.2),
]


@pytest.mark.parametrize("method", ["twonn", "mle"])
@pytest.mark.parametrize("name,make,expected,tol", ID_CASES, ids=[c[0] for c in ID_CASES])
def test_intrinsic_dimension_on_synthetic_manifolds(method, name, make, expected, tol):
    assert intrinsic_dimension(make(), method=method, k=10) == pytest.approx(expected, abs=tol)


@pytest.mark.parametrize("method", ["twonn", "mle"])
def test_intrinsic_dimension_invariant_to_isometric_embedding(method):
    # 5-D input takes the KD-tree path, its 40-D rotation the brute-force path: distances are equal.
    X = gaussian(400, 5, seed=12)
    Q, _ = np.linalg.qr(rng(13).normal(size=(40, 40)))
    high = X @ Q[:5]
    assert intrinsic_dimension(high, method=method) == pytest.approx(intrinsic_dimension(X, method=method), rel=1e-6)


def test_intrinsic_dimension_drops_duplicates(caplog):
    X = _plane_in_50d(500)
    with_dups = np.concatenate([X, X[:50]])
    with caplog.at_level("WARNING"):
        value = intrinsic_dimension(with_dups)
    assert value == pytest.approx(intrinsic_dimension(X))
    assert "dropped 50 duplicate points" in caplog.text


@pytest.mark.parametrize(
    "X,kwargs,error,match",
    [
        (np.ones((10, 3)), {}, DegenerateInputError, "1 distinct points"),
        (gaussian(8, 3), {"method": "mle", "k": 10}, DegenerateInputError, "needs at least 11"),
        (gaussian(50, 3), {"method": "pca"}, ValueError, "expected 'twonn' or 'mle'"),
        (gaussian(50, 3), {"method": "mle", "k": 1}, ValueError, "k >= 2"),
    ],
    ids=["all duplicates", "too few for k", "unknown method", "k too small"],
)
def test_intrinsic_dimension_bad_input(X, kwargs, error, match):
    with pytest.raises(error, match=match):
        intrinsic_dimension(X, **kwargs)


# --------------------------------------------------------------------------- contextuality
def _crafted_words() -> dict[str, np.ndarray]:
    r = rng(8)
    return {
        "static": np.tile(r.normal(size=16), (4, 1)),  # same vector in every context
        "contextual": r.normal(size=(6, 16)),  # unrelated vectors per context
        "hapax": r.normal(size=(1, 16)),  # one occurrence: skipped
    }


def test_self_similarity_identical_occurrences_is_one():
    words = _crafted_words()
    out = self_similarity({"static": words["static"]}, details=True)
    assert out["mean"] == pytest.approx(1.0)
    detail = self_similarity(words, details=True)
    assert detail["per_item"]["static"] == pytest.approx(1.0)
    assert abs(detail["per_item"]["contextual"]) < 0.3
    assert "hapax" in detail["skipped"] and "hapax" not in detail["per_item"]
    assert detail["mean"] == pytest.approx(np.mean(list(detail["per_item"].values())))


def test_adjusted_measures_subtract_the_baseline():
    words = _crafted_words()
    raw = self_similarity(words)
    assert self_similarity(words, adjusted=True, baseline=0.25) == pytest.approx(raw - 0.25)
    pooled = np.concatenate(list(words.values()))
    assert self_similarity(words, adjusted=True) == pytest.approx(raw - cosine_anisotropy_baseline(pooled))
    mev = max_explainable_variance(words)
    assert max_explainable_variance(words, adjusted=True, baseline=0.1) == pytest.approx(mev - 0.1)


def test_max_explainable_variance_static_word_is_one():
    words = _crafted_words()
    detail = max_explainable_variance(words, details=True)
    assert detail["per_item"]["static"] == pytest.approx(1.0)
    assert detail["per_item"]["contextual"] < 0.6
    with pytest.raises(DegenerateInputError, match="all vectors are zero"):
        max_explainable_variance({"w": np.zeros((3, 4))})


@pytest.mark.parametrize(
    "sentences,expected",
    [
        ([np.tile([1.0, 2.0, 0.5], (5, 1))], 1.0),  # all tokens the same: each equals the mean
        ([np.array([[1.0, 0.0], [0.0, 1.0]])], math.cos(math.pi / 4)),  # 45 degrees to the mean
        ([np.array([[1.0, 0.0], [0.0, 1.0]]), np.ones((3, 2))], (math.cos(math.pi / 4) + 1.0) / 2),
    ],
    ids=["identical tokens", "orthogonal pair", "average over sentences"],
)
def test_intra_sentence_similarity_known_values(sentences, expected):
    assert intra_sentence_similarity(sentences) == pytest.approx(expected)


def test_intra_sentence_similarity_errors_and_skips():
    with pytest.raises(DegenerateInputError, match="zero vectors"):
        intra_sentence_similarity([np.array([[1.0, 0.0], [-1.0, 0.0]])])  # mean vector is zero
    detail = intra_sentence_similarity([np.ones((1, 3)), np.ones((4, 3))], details=True)
    assert detail["skipped"] == {"0": "1 rows, need at least 2"}
    with pytest.raises(DegenerateInputError, match="no word has at least 2 rows"):
        self_similarity({"a": np.ones((1, 3))})


def test_torch_tensors_accepted_everywhere():
    X = gaussian(200, 6)
    T = torch.tensor(X, dtype=torch.bfloat16)
    Xb = T.float().numpy().astype(np.float64)
    assert anisotropy(T) == pytest.approx(anisotropy(Xb))
    assert cosine_anisotropy_baseline(T) == pytest.approx(cosine_anisotropy_baseline(Xb))
    assert intrinsic_dimension(T) == pytest.approx(intrinsic_dimension(Xb))
    assert linearity_score(T, T * 2) == pytest.approx(1.0)
    assert self_similarity({"w": torch.ones(3, 4)}) == pytest.approx(1.0)


# --------------------------------------------------------------------------- layerwise
def _layers(n: int = 60, d: int = 8, n_layers: int = 3) -> list[np.ndarray]:
    H = [gaussian(n, d, seed=10)]
    for i in range(n_layers - 1):
        H.append(H[-1] @ rng(11 + i).normal(size=(d, d)) + 0.0)
    return H


def test_layerwise_geometry_groups_and_json():
    H = _layers()
    mask = np.zeros(60, dtype=bool)
    mask[:40] = True
    out = layerwise_geometry([torch.tensor(h) for h in H], torch.tensor(mask))
    assert out["groups"] == {"image": 40, "text": 20}
    assert out["n_layers"] == 3 and len(out["layers"]) == 3 and len(out["linearity"]) == 2
    layer0 = out["layers"][0]
    assert layer0["image"]["anisotropy"] == pytest.approx(anisotropy(H[0][:40]))
    assert layer0["text"]["cosine_baseline"] == pytest.approx(cosine_anisotropy_baseline(H[0][40:]))
    assert layer0["image"]["intrinsic_dimension"] == pytest.approx(intrinsic_dimension(H[0][:40]))
    for step in out["linearity"]:  # each layer is a linear map of the previous one
        assert step["image"] == pytest.approx(1.0) and step["text"] == pytest.approx(1.0)
    assert json.loads(json.dumps(out))["groups"] == out["groups"]


def test_layerwise_geometry_empty_and_small_groups_are_nan_with_reason():
    H = _layers(n=20, d=8)
    mask = np.zeros(20, dtype=bool)  # no image tokens at all
    out = layerwise_geometry(H, mask)
    img = out["layers"][1]["image"]
    assert img["n_tokens"] == 0 and math.isnan(img["anisotropy"])
    assert img["nan_reasons"]["anisotropy"] == "no tokens in this group"
    assert math.isnan(out["linearity"][0]["image"])
    assert out["linearity"][0]["text"] == pytest.approx(1.0)
    tiny = layerwise_geometry(H, np.arange(20) < 2, id_method="mle", id_k=5)  # 2 image tokens, 18 text
    img = tiny["layers"][0]["image"]
    assert math.isnan(img["intrinsic_dimension"]) and "need" in img["nan_reasons"]["intrinsic_dimension"]
    assert "trivially 1" in tiny["linearity"][0]["nan_reasons"]["image"]
    assert not math.isnan(tiny["layers"][0]["text"]["intrinsic_dimension"])


def test_layerwise_geometry_records_repeated_tokens_without_warning(caplog):
    # the same token twice has one embedding at layer 0: expected in every prompt, so counted, not warned
    H = _layers()
    H = [np.concatenate([h, h[:5]]) for h in H]
    with caplog.at_level("INFO", logger="medvlm.diagnostics.geometry"):
        out = layerwise_geometry(H)
    assert out["layers"][0]["all"]["id_duplicates_dropped"] == 5
    assert out["layers"][0]["all"]["intrinsic_dimension"] == pytest.approx(intrinsic_dimension(H[0][:60]))
    assert "dropped 5 duplicate points" in caplog.text
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_layerwise_geometry_without_mask_uses_one_group():
    out = layerwise_geometry(_layers(n_layers=2))
    assert out["groups"] == {"all": 60} and set(out["linearity"][0]) >= {"all", "from", "to"}


@pytest.mark.parametrize(
    "hidden,mask,match",
    [
        ([], None, "empty"),
        ([gaussian(10, 4), gaussian(11, 4)], None, "has 11 tokens"),
        ([np.full((10, 4), np.nan)], None, "NaN"),
        ([gaussian(10, 4)], np.ones(9, dtype=bool), "expected 10 booleans"),
        ([gaussian(10, 4)], np.arange(10), "expected 10 booleans"),
    ],
    ids=["no layers", "token count mismatch", "NaN layer", "short mask", "non-boolean mask"],
)
def test_layerwise_geometry_bad_input(hidden, mask, match):
    with pytest.raises(ValueError, match=match):
        layerwise_geometry(hidden, mask)


def test_contextualisation_tells_a_fixed_token_from_a_context_dependent_one():
    """Text token 7 has one representation everywhere (self-similarity 1 before the baseline); image
    positions get a new random vector in every image (about 0 after the baseline); IntraSim and MEV
    are finite, and a group seen once per example only is NaN with the reason."""
    from medvlm.diagnostics.geometry import contextualisation

    rng = np.random.default_rng(0)
    fixed = rng.normal(size=16)
    examples = []
    for _ in range(6):
        text = np.stack([fixed, *rng.normal(size=(3, 16))])
        image = rng.normal(size=(4, 16))
        layers = [np.concatenate([image, text])] * 2
        examples.append({"layers": layers, "image_mask": np.array([True] * 4 + [False] * 4),
                         "token_ids": np.array([0, 0, 0, 0, 7, 100 + len(examples) * 3, 101 + len(examples) * 3,
                                                102 + len(examples) * 3]),
                         "image_index": np.array([0, 1, 2, 3, -1, -1, -1, -1])})
    out = contextualisation(examples)
    assert [e["layer"] for e in out] == [0, 1]
    text, image = out[0]["text"], out[0]["image"]
    assert text["self_similarity"] > 0.8  # only token 7 recurs, always the same vector
    assert abs(image["self_similarity"]) < 0.35  # a new random vector per image
    assert all(np.isfinite(v) for v in (*text.values(), *image.values()))
    single = [{**e, "token_ids": np.arange(8) + 10 * i} for i, e in enumerate(examples)]
    out = contextualisation(single)
    assert np.isnan(out[0]["text"]["self_similarity"]) and "text.self_similarity" in out[0]["nan_reasons"]
