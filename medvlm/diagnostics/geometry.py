"""Geometry of token representations: linearity, anisotropy, intrinsic dimension, contextuality.

Every function takes embeddings as a numpy array or a torch tensor of shape ``(n_tokens, d)``
(torch is converted with ``.detach().float().cpu().numpy()``; torch is never imported here) and
computes in float64.

Errors: malformed input (wrong shape, NaN/inf) raises ``ValueError`` naming the argument and the
fix. Input that is well-formed but too small or too flat for a score (fewer points than the
estimator needs, all vectors equal, zero vectors under a cosine) raises
:class:`DegenerateInputError`, a ``ValueError`` subclass, so that :func:`layerwise_geometry` can
report such a group as NaN with the reason while still failing loudly on broken input.

>>> import numpy as np
>>> X = np.random.default_rng(0).normal(size=(200, 8))
>>> round(linearity_score(X, X @ np.diag(np.arange(1.0, 9.0))), 6)
1.0
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import scipy.linalg
from scipy.spatial import cKDTree
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

__all__ = [
    "DegenerateInputError",
    "as_numpy",
    "linearity_score",
    "anisotropy",
    "cosine_anisotropy_baseline",
    "intrinsic_dimension",
    "self_similarity",
    "intra_sentence_similarity",
    "max_explainable_variance",
    "layerwise_geometry",
]


class DegenerateInputError(ValueError):
    """Well-formed input on which a score is undefined (too few points, zero variance, zero vectors)."""


def as_numpy(x: Any, name: str = "input") -> np.ndarray:
    """A float64 numpy copy of an array-like or torch tensor (bf16/fp16/GPU tensors included)."""
    if hasattr(x, "detach"):  # torch.Tensor, duck-typed so torch is not imported here
        x = x.detach().float().cpu().numpy()
    try:
        return np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name}: cannot convert {type(x).__name__} to a float array ({err})") from err


def _matrix(x: Any, name: str, min_rows: int = 1) -> np.ndarray:
    """Validate an ``(n, d)`` embedding matrix: 2-D, finite, at least ``min_rows`` rows."""
    arr = as_numpy(x, name)
    if arr.ndim != 2:
        hint = " (drop the batch axis: hs[0], or pool samples: hs.reshape(-1, d))" if arr.ndim == 3 else ""
        raise ValueError(f"{name}: expected shape (n_tokens, d), got {arr.shape}{hint}")
    bad = ~np.isfinite(arr)
    if bad.any():
        rows = np.unique(np.nonzero(bad)[0])
        raise ValueError(f"{name}: {int(bad.sum())} NaN/inf values in rows {rows[:10].tolist()}"
                         f"{' ...' if rows.size > 10 else ''}; fix the upstream capture (e.g. fp16 overflow)")
    if arr.shape[0] < min_rows:
        raise DegenerateInputError(f"{name}: {arr.shape[0]} tokens, need at least {min_rows}")
    return arr


def _unit_rows(X: np.ndarray, name: str) -> np.ndarray:
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    zero = np.nonzero(norms[:, 0] == 0)[0]
    if zero.size:
        raise DegenerateInputError(f"{name}: rows {zero[:10].tolist()} are zero vectors; cosine is undefined")
    return X / norms


def _mean_pairwise_cosine(X: np.ndarray, name: str) -> float:
    """Mean cosine over all ordered pairs i != j, exactly, in O(n d).

    With unit rows u_i: sum_{i != j} u_i.u_j = ||sum_i u_i||^2 - n, so no pair sampling is needed.
    """
    n = X.shape[0]
    if n < 2:
        raise DegenerateInputError(f"{name}: {n} vectors, need at least 2 for a pairwise cosine")
    total = _unit_rows(X, name).sum(axis=0)
    return float((total @ total - n) / (n * (n - 1)))


def _first_pc_share(X: np.ndarray, name: str, center: bool) -> float:
    """sigma_1^2 / sum_i sigma_i^2 of X (centred first when ``center``)."""
    M = X - X.mean(axis=0) if center else X
    s = np.linalg.svd(M, compute_uv=False)
    total = float(np.sum(s**2))
    if total == 0 or total <= 1e-20 * float(np.sum(X**2)):  # relative: centring leaves rounding noise
        what = "all vectors are identical (zero variance)" if center else "all vectors are zero"
        raise DegenerateInputError(f"{name}: {what}; the first-component share is undefined")
    return float(s[0] ** 2 / total)


# --------------------------------------------------------------------------- linearity
def linearity_score(X: Any, Y: Any, centered: bool = False) -> float:
    """How well one linear map takes ``X`` to ``Y`` (Razzhigaev et al. 2024, arXiv:2405.12250, Sec. 3).

    X: (n, d_x), Y: (n, d_y), the same n tokens at two layers. Returns a float in [0, 1]:

        X~ = Xc / ||Xc||_F,  Y~ = Yc / ||Yc||_F,  A = argmin_A ||X~ A - Y~||_F  (least squares),
        score = 1 - ||X~ A - Y~||_F^2

    centered=True: Xc, Yc are X, Y minus their column means (the paper's centre-then-normalise
    preprocessing); the score is then the multivariate R^2 of an affine fit, invariant to shifts.
    centered=False (default): Xc = X, Yc = Y, only the Frobenius scaling; the map has no
    intercept, so an affine ``Y = X R + b`` with b != 0 scores below 1, and the score is the
    uncentred R^2 (share of ||Y||_F^2 explained).

    Raises DegenerateInputError when rank(X~) reaches the number of rows it must fit (n, or n-1
    when centred): any Y would then be fitted exactly and the score would be a trivial 1. Pool
    tokens of many samples (n well above d) to avoid that.
    """
    X, Y = _matrix(X, "X", min_rows=2), _matrix(Y, "Y", min_rows=2)
    if X.shape[0] != Y.shape[0]:
        raise ValueError(f"X has {X.shape[0]} rows but Y has {Y.shape[0]}; "
                         "pass the same tokens at both layers")
    scaled = []
    for name, M in (("X", X), ("Y", Y)):
        Mc = M - M.mean(axis=0) if centered else M
        norm = np.linalg.norm(Mc)
        # Relative test: centring identical rows leaves rounding noise, not exact zeros.
        if norm == 0 or norm <= 1e-10 * np.linalg.norm(M):
            raise DegenerateInputError(f"{name}: {'all rows identical' if centered else 'all-zero matrix'}, "
                                       "cannot normalise to unit Frobenius norm")
        scaled.append(Mc / norm)
    Xs, Ys = scaled
    # Same least-squares solution as numpy.linalg.lstsq, but LAPACK's pivoted-QR driver (gelsy) is
    # ~20x faster than numpy's SVD driver at transformer sizes (n=3000, d=2048: 1.7 s vs 39 s).
    A, _, rank, _ = scipy.linalg.lstsq(Xs, Ys, lapack_driver="gelsy")
    rows_to_fit = Xs.shape[0] - (1 if centered else 0)
    if rank >= rows_to_fit:
        raise DegenerateInputError(
            f"rank(X) = {rank} >= {rows_to_fit} rows to fit: every Y is an exact linear image of X and "
            f"the score would be trivially 1; pass more tokens than dimensions "
            f"(got n={X.shape[0]}, d={X.shape[1]})")
    residual = Xs @ A - Ys
    return float(np.clip(1.0 - np.sum(residual**2), 0.0, 1.0))


# --------------------------------------------------------------------------- anisotropy
def anisotropy(X: Any) -> float:
    """Share of variance on the first principal component: lambda_1 / sum_i lambda_i of cov(X).

    X: (n, d) with n >= 2. 1.0 means all variation lies on one line; an isotropic cloud gives about
    1/min(n-1, d). PCA is done by SVD of the centred matrix.
    """
    return _first_pc_share(_matrix(X, "X", min_rows=2), "X", center=True)


def cosine_anisotropy_baseline(X: Any) -> float:
    """Expected cosine similarity of two different random tokens (Ethayarajh 2019, Sec. 3.4 baseline).

    X: (n, d) with n >= 2 non-zero rows. Returns the mean of cos(x_i, x_j) over all pairs i != j,
    computed exactly in O(n d) (see ``_mean_pairwise_cosine``), so sampling pairs is never needed.
    Near 0 for isotropic representations; near 1 when all vectors share one direction.
    """
    return _mean_pairwise_cosine(_matrix(X, "X", min_rows=2), "X")


# --------------------------------------------------------------------------- intrinsic dimension
def _dedup(X: np.ndarray, name: str, level: int = logging.WARNING) -> tuple[np.ndarray, int]:
    uniq = np.unique(X, axis=0)
    dropped = X.shape[0] - uniq.shape[0]
    if dropped:
        logger.log(level, "%s: dropped %d duplicate points before the intrinsic-dimension estimate "
                   "(their nearest-neighbour distance is 0)", name, dropped)
    return uniq, dropped


def _knn_distances(X: np.ndarray, k: int, chunk_bytes: int = 1 << 27) -> np.ndarray:
    """Sorted distances from each row to its k nearest other rows, shape (n, k); rows are distinct."""
    if X.shape[1] <= 16:  # a KD-tree pays off only in low dimension; column 0 is the point itself
        return cKDTree(X).query(X, k=k + 1)[0][:, 1:]
    # High dimension (hidden states): brute force by BLAS in row chunks, then exact distances for
    # the k candidates, since the Gram-matrix formula loses precision for close pairs.
    n, sq = X.shape[0], np.einsum("ij,ij->i", X, X)
    out = np.empty((n, k))
    step = max(1, chunk_bytes // (8 * n))
    for start in range(0, n, step):
        rows = np.arange(start, min(n, start + step))
        d2 = sq[rows, None] + sq[None, :] - 2.0 * (X[rows] @ X.T)
        d2[np.arange(rows.size), rows] = np.inf
        cand = np.argpartition(d2, k - 1, axis=1)[:, :k]
        out[rows] = np.sort(np.linalg.norm(X[cand] - X[rows, None, :], axis=2), axis=1)
    return out


def _id_with_info(X: Any, method: str = "twonn", k: int = 10, name: str = "X",
                  dup_log_level: int = logging.WARNING) -> dict[str, Any]:
    """Intrinsic dimension plus bookkeeping: ``{"value", "method", "k", "n_used", "n_duplicates"}``."""
    if method not in ("twonn", "mle"):
        raise ValueError(f"method={method!r}; expected 'twonn' or 'mle'")
    X, dropped = _dedup(_matrix(X, name, min_rows=1), name, dup_log_level)
    n_neighbours = 2 if method == "twonn" else k
    if method == "mle" and k < 2:
        raise ValueError(f"k={k}; the MLE needs k >= 2 neighbours")
    if X.shape[0] < n_neighbours + 1:
        raise DegenerateInputError(
            f"{name}: {X.shape[0]} distinct points, {method} needs at least {n_neighbours + 1}")
    dist = _knn_distances(X, n_neighbours)
    if method == "twonn":
        # TwoNN (Facco et al. 2017, Sci. Rep. 7:12140): mu_i = r2/r1 follows a Pareto law with
        # exponent d. We use the maximum-likelihood form, not the paper's linear fit of
        # -log(1 - F(mu)) on log(mu): d = (N - 1) / sum_i log(mu_i), where (N - 1) instead of N
        # removes the bias of the Gamma-distributed sum.
        log_mu = np.log(dist[:, 1] / dist[:, 0])
        total, n_terms = float(log_mu.sum()), X.shape[0] - 1
    else:
        # MLE (Levina & Bickel 2005) with the MacKay & Ghahramani (2005) correction: average the
        # per-point inverse estimates (1/(k-1)) sum_{j<k} log(T_k / T_j), then invert once.
        inv = np.log(dist[:, -1:] / dist[:, :-1]).sum(axis=1) / (k - 1)
        total, n_terms = float(inv.mean()), 1.0
    if total <= 0:
        raise DegenerateInputError(f"{name}: all neighbour distances equal; intrinsic dimension is unbounded")
    return {"value": float(n_terms / total), "method": method, "k": None if method == "twonn" else k,
            "n_used": int(X.shape[0]), "n_duplicates": int(dropped)}


def intrinsic_dimension(X: Any, method: str = "twonn", k: int = 10) -> float:
    """Intrinsic dimension of the point cloud X (n, d): ``method`` is "twonn" or "mle" (k neighbours).

    Duplicate rows are removed first (logged as a warning): their nearest-neighbour distance is 0
    and would make r2/r1 infinite. TwoNN needs 3 distinct points, the MLE k + 1; both need
    many more (hundreds) to be accurate, and both underestimate above ~10-20 dimensions.
    """
    return _id_with_info(X, method=method, k=k)["value"]


# --------------------------------------------------------------------------- contextuality
def _per_group(groups: Mapping[Any, Any] | Sequence[Any], score: Any, min_rows: int,
               label: str) -> tuple[dict[str, float], dict[str, str]]:
    items = groups.items() if isinstance(groups, Mapping) else enumerate(groups)
    values: dict[str, float] = {}
    skipped: dict[str, str] = {}
    for key, reps in items:
        M = _matrix(reps, f"{label} {key!r}", min_rows=0)
        if M.shape[0] < min_rows:
            skipped[str(key)] = f"{M.shape[0]} rows, need at least {min_rows}"
        else:
            values[str(key)] = score(M, f"{label} {key!r}")
    if skipped:
        logger.info("skipped %d of %d %ss: %s", len(skipped), len(skipped) + len(values), label,
                    dict(list(skipped.items())[:5]))
    if not values:
        raise DegenerateInputError(f"no {label} has at least {min_rows} rows: {skipped}")
    return values, skipped


def _finish(values: dict[str, float], skipped: dict[str, str], baseline: float | None,
            details: bool) -> float | dict[str, Any]:
    mean = float(np.mean(list(values.values())))
    if baseline is not None:
        mean -= baseline
    if not details:
        return mean
    return {"mean": mean, "baseline": baseline, "per_item": values, "skipped": skipped}


def _pooled(groups: Mapping[Any, Any] | Sequence[Any]) -> np.ndarray:
    parts = groups.values() if isinstance(groups, Mapping) else groups
    return np.concatenate([_matrix(p, "reps") for p in parts], axis=0)


def self_similarity(reps_by_word: Mapping[Any, Any], adjusted: bool = False, baseline: float | None = None,
                    min_occurrences: int = 2, details: bool = False) -> float | dict[str, Any]:
    """SelfSim (Ethayarajh 2019, Sec. 3.3): mean pairwise cosine among one word's occurrences.

    reps_by_word: word -> (n_occ, d) representations of that word in different contexts. The
    per-word means are averaged over words with >= ``min_occurrences`` occurrences (others are
    skipped, logged, and listed under "skipped" with ``details=True``). ``adjusted=True`` subtracts
    the anisotropy baseline (``baseline`` if given, else :func:`cosine_anisotropy_baseline` of all
    occurrences pooled), as the paper does. Returns a float, or with ``details=True`` a dict
    ``{"mean", "baseline", "per_item", "skipped"}``.
    """
    values, skipped = _per_group(reps_by_word, _mean_pairwise_cosine, max(2, min_occurrences), "word")
    if adjusted and baseline is None:
        baseline = cosine_anisotropy_baseline(_pooled(reps_by_word))
    return _finish(values, skipped, baseline if adjusted else None, details)


def _intra_sentence(M: np.ndarray, name: str) -> float:
    mean = M.mean(axis=0, keepdims=True)
    return float(np.mean(_unit_rows(M, name) @ _unit_rows(mean, f"{name} mean vector")[0]))


def intra_sentence_similarity(sentences: Sequence[Any], adjusted: bool = False, baseline: float | None = None,
                              min_tokens: int = 2, details: bool = False) -> float | dict[str, Any]:
    """IntraSim (Ethayarajh 2019, Sec. 3.3): mean cosine of each token to its sentence's mean vector.

    sentences: list of (n_tokens, d) arrays. Averaged over sentences with >= ``min_tokens`` tokens
    (a 1-token sentence scores 1 trivially, so it is skipped and recorded). ``adjusted`` and
    ``baseline`` as in :func:`self_similarity` (pooled over all tokens of all sentences).
    """
    values, skipped = _per_group(sentences, _intra_sentence, max(1, min_tokens), "sentence")
    if adjusted and baseline is None:
        baseline = cosine_anisotropy_baseline(_pooled(sentences))
    return _finish(values, skipped, baseline if adjusted else None, details)


def max_explainable_variance(reps_by_word: Mapping[Any, Any], adjusted: bool = False,
                             baseline: float | None = None, min_occurrences: int = 2,
                             details: bool = False) -> float | dict[str, Any]:
    """MEV (Ethayarajh 2019, Sec. 3.3): sigma_1^2 / sum sigma_i^2 of a word's occurrence matrix.

    As in the paper the occurrence matrix is *not* centred (identical occurrences give 1; compare
    :func:`anisotropy`, which is centred). Note MEV >= 1/n_occ for any word, so words with few
    occurrences score high by construction; raise ``min_occurrences`` (the paper used 5) to compare.
    ``adjusted=True`` subtracts the same statistic for all occurrences pooled (the paper's baseline
    of randomly sampled words), unless ``baseline`` is given.
    """
    def mev(M: np.ndarray, name: str) -> float:
        return _first_pc_share(M, name, center=False)

    values, skipped = _per_group(reps_by_word, mev, max(2, min_occurrences), "word")
    if adjusted and baseline is None:
        baseline = _first_pc_share(_pooled(reps_by_word), "pooled occurrences", center=False)
    return _finish(values, skipped, baseline if adjusted else None, details)


def contextualisation(examples: Sequence[Mapping[str, Any]], *, min_occurrences: int = 2,
                      max_items: int = 200) -> list[dict[str, Any]]:
    """Ethayarajh's (2019) three contextualisation measures per layer, image and text tokens apart,
    each adjusted by its anisotropy baseline (so 0 means "no more alike than random tokens").

    ``examples``: one dict per example with ``layers`` (one (n_tokens, d) array per layer),
    ``image_mask`` (n_tokens,) and ``token_ids`` (n_tokens,). A *sentence* (IntraSim) is one
    example's image tokens, or its text tokens; a *word* (SelfSim, MEV) is a text token id seen in
    several examples, and, for image tokens, one grid position seen in several images (the same
    place in different pictures: the image analogue of one word in different contexts). At most
    ``max_items`` words per group are scored (the most frequent), to bound the cost. Returns
    ``[{"layer": i, "image": {"self_similarity", "intra_sentence", "mev"}, "text": {...},
    "nan_reasons": {...}}]`` with NaN where a measure is undefined.
    """
    n_layers = len(examples[0]["layers"])
    out = []
    for li in range(n_layers):
        entry: dict[str, Any] = {"layer": li, "nan_reasons": {}}
        for group in ("image", "text"):
            sentences, words = [], {}
            for ex in examples:
                sel = np.asarray(ex["image_mask"], bool) if group == "image" else ~np.asarray(ex["image_mask"], bool)
                H = np.asarray(ex["layers"][li])[sel]
                if H.shape[0] == 0:
                    continue
                sentences.append(H)
                keys = np.arange(H.shape[0]) if group == "image" else np.asarray(ex["token_ids"])[sel]
                for k, row in zip(keys.tolist(), H, strict=True):
                    words.setdefault(k, []).append(row)
            common = sorted((k for k, v in words.items() if len(v) >= min_occurrences), key=lambda k: -len(words[k]))
            reps = {k: np.stack(words[k]) for k in common[:max_items]}
            scores: dict[str, float] = {}
            pooled = np.concatenate(sentences) if sentences else np.zeros((0, 1))
            for key, fn, arg in (("self_similarity", self_similarity, reps), ("mev", max_explainable_variance, reps),
                                 ("intra_sentence", intra_sentence_similarity, sentences)):
                try:
                    if not arg:
                        raise DegenerateInputError(f"no {group} token seen in {min_occurrences}+ examples")
                    # the baseline over every token of the group (random tokens), as in the paper
                    base = (_first_pc_share(pooled, f"{group} tokens", center=False) if key == "mev"
                            else cosine_anisotropy_baseline(pooled))
                    kwargs = {} if key == "intra_sentence" else {"min_occurrences": min_occurrences}
                    scores[key] = float(fn(arg, adjusted=True, baseline=base, **kwargs))
                except DegenerateInputError as err:
                    scores[key] = float("nan")
                    entry["nan_reasons"][f"{group}.{key}"] = str(err)
            entry[group] = scores
        out.append(entry)
    return out


# --------------------------------------------------------------------------- per layer
def _safe(fn: Any, *args: Any, **kwargs: Any) -> tuple[float, str | None]:
    try:
        return float(fn(*args, **kwargs)), None
    except DegenerateInputError as err:
        return float("nan"), str(err)


def _group_stats(H: np.ndarray, idx: np.ndarray, id_method: str, id_k: int, name: str) -> dict[str, Any]:
    out: dict[str, Any] = {"n_tokens": int(idx.size)}
    reasons: dict[str, str] = {}
    if idx.size == 0:
        reason = "no tokens in this group"
        out.update(anisotropy=float("nan"), cosine_baseline=float("nan"), intrinsic_dimension=float("nan"))
        reasons = dict.fromkeys(("anisotropy", "cosine_baseline", "intrinsic_dimension"), reason)
    else:
        G = H[idx]
        for key, fn in (("anisotropy", anisotropy), ("cosine_baseline", cosine_anisotropy_baseline)):
            out[key], why = _safe(fn, G)
            if why:
                reasons[key] = why
        try:
            # repeated tokens ("the", "?") share one embedding at layer 0: expected, recorded in
            # id_duplicates_dropped, so not a warning at every checkpoint
            info = _id_with_info(G, method=id_method, k=id_k, name=name, dup_log_level=logging.INFO)
            out["intrinsic_dimension"], out["id_duplicates_dropped"] = info["value"], info["n_duplicates"]
        except DegenerateInputError as err:
            out["intrinsic_dimension"], reasons["intrinsic_dimension"] = float("nan"), str(err)
    out["nan_reasons"] = reasons
    return out


def layerwise_geometry(hidden_states: Sequence[Any], token_mask_image: Any = None, *,
                       id_method: str = "twonn", id_k: int = 10,
                       linearity_centered: bool = False) -> dict[str, Any]:
    """Geometry of each layer's tokens, image and text tokens apart, and linearity between layers.

    hidden_states: one (n_tokens, d) array per layer (e.g. the captured residual stream; pool the
    tokens of several samples along axis 0 so that n exceeds d, else linearity is NaN).
    token_mask_image: bool array (n_tokens,), True for image tokens; None puts all tokens in one
    group "all". Returns a JSON-serialisable dict (NaN where a score is undefined)::

        {"n_layers", "n_tokens", "groups": {group: n_tokens},
         "layers": [{"layer": i, group: {"n_tokens", "anisotropy", "cosine_baseline",
                     "intrinsic_dimension", "id_duplicates_dropped"?, "nan_reasons": {metric: why}}}],
         "linearity": [{"from": i, "to": i + 1, group: score, "nan_reasons": {group: why}}],
         "settings": {...}}

    Raises ValueError for malformed input: no layers, non-2-D or non-finite layers, differing
    token counts, or a mask of the wrong length/dtype.
    """
    if id_method not in ("twonn", "mle"):
        raise ValueError(f"id_method={id_method!r}; expected 'twonn' or 'mle'")
    if len(hidden_states) == 0:
        raise ValueError("hidden_states is empty; pass one (n_tokens, d) array per layer")
    layers = [_matrix(h, f"hidden_states[{i}]") for i, h in enumerate(hidden_states)]
    n = layers[0].shape[0]
    for i, H in enumerate(layers):
        if H.shape[0] != n:
            raise ValueError(f"hidden_states[{i}] has {H.shape[0]} tokens but hidden_states[0] has {n}")
    if token_mask_image is None:
        groups = {"all": np.arange(n)}
    else:
        mask = as_numpy(token_mask_image, "token_mask_image").reshape(-1)
        if mask.shape[0] != n or not np.isin(mask, (0.0, 1.0)).all():
            raise ValueError(f"token_mask_image: expected {n} booleans (True = image token), "
                             f"got shape {mask.shape} with values {np.unique(mask)[:5].tolist()}")
        groups = {"image": np.nonzero(mask == 1)[0], "text": np.nonzero(mask == 0)[0]}
    result: dict[str, Any] = {
        "n_layers": len(layers), "n_tokens": n, "groups": {g: int(i.size) for g, i in groups.items()},
        "settings": {"id_method": id_method, "id_k": id_k if id_method == "mle" else None,
                     "linearity_centered": linearity_centered},
        "layers": [], "linearity": [],
    }
    for li, H in enumerate(tqdm(layers, desc="layer geometry", unit="layer", leave=False)):
        entry: dict[str, Any] = {"layer": li}
        for g, idx in groups.items():
            entry[g] = _group_stats(H, idx, id_method, id_k, f"layer {li} {g} tokens")
        result["layers"].append(entry)
    for li in range(len(layers) - 1):
        step: dict[str, Any] = {"from": li, "to": li + 1, "nan_reasons": {}}
        for g, idx in groups.items():
            if idx.size == 0:
                step[g], why = float("nan"), "no tokens in this group"
            else:
                step[g], why = _safe(linearity_score, layers[li][idx], layers[li + 1][idx],
                                     centered=linearity_centered)
            if why:
                step["nan_reasons"][g] = why
        result["linearity"].append(step)
    return result
