"""Aggregate probe results: per-method ROI scores, randomisation-test verdicts, the trust rule and how
stable each verdict is, top heads.

Inputs are the per-example rows that :func:`medvlm.diagnostics.probe.probe_example` returns (and
that ``diagnostics.json`` stores under ``"examples"``); outputs are JSON-serialisable dicts with
NaN where a mean has no defined value.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import rankdata, wilcoxon

#: One-sided significance level of the better-than-chance test.
ALPHA = 0.05
#: Fewest examples the better-than-chance test runs on (below 5, no one-sided p reaches 0.05).
MIN_EXAMPLES = 5
#: Bootstrap resamples behind each verdict's stability. The share's Monte Carlo standard error is at
#: most 0.5 / sqrt(1000) = 0.016, small against the gap between the thresholds below.
N_RESAMPLES = 1000
#: Verdict thresholds on the stability (the share of bootstrap resamples of the probe examples in which
#: the method is trusted). The share estimates how often a probe on as many fresh examples would come
#: out "trusted": the power of the rule at the effect this probe measured. 0.8 is the conventional power
#: target (Cohen 1988, *Statistical Power Analysis for the Behavioral Sciences*, chapter 2), so a
#: verdict is given only when a re-run would reproduce it at least 4 times in 5 (symmetrically 0.2 for
#: "not trusted"); in between the verdict is "unstable". A share hovers near 0.5 when p sits near ALPHA;
#: on the LLaVA demo's probe (24 to 192 lesions) a share of 0.8 came with p of about 0.003-0.015 on all
#: the examples and a share of 0.2 with p of about 0.2, so "unstable" covers the verdicts that a p-value
#: close to ALPHA would decide by luck.
TRUSTED_SHARE = 0.8
UNTRUSTED_SHARE = 0.2
TRUST_RULE = ("a method is trusted when it beats chance on the lesion, i.e. its mean ROI ratio over the probe "
              "examples is above 1 AND its ROI mass exceeds the chance level (the lesion's area share) "
              f"consistently across examples (one-sided Wilcoxon signed-rank test, p < {ALPHA}, at least "
              f"{MIN_EXAMPLES} examples; so one lucky example cannot carry the mean), AND it passes the "
              "parameter-randomisation test (its map changes when the top layer of the vision tower and of the "
              "decoder are re-initialised: Spearman rho <= the threshold on every tested example). The verdict "
              "is given only when it is stable: the same rule is applied to each of "
              f"{N_RESAMPLES} bootstrap resamples of the probe examples (drawn with replacement; the "
              "randomisation test's result is held fixed, as it was measured on its own few examples), and the "
              f"stability is the share of resamples in which the method is trusted: at least {TRUSTED_SHARE} "
              f"with a trusted verdict on all the examples means trusted, at most {UNTRUSTED_SHARE} with a "
              "not-trusted one means not trusted, anything else is unstable (a re-run of the probe could flip it)")


def above_chance_p(masses: list[float], chances: list[float]) -> float:
    """One-sided Wilcoxon signed-rank p-value that ROI mass exceeds chance (paired per example).

    NaN with fewer than 5 examples (the smallest attainable p is then above 0.05) or when every
    difference is 0. The test ranks the paired differences, so it asks whether the map is on the
    lesion *consistently*, which a mean ratio driven by one example does not show.
    """
    diffs = np.asarray(masses, float) - np.asarray(chances, float)
    diffs = diffs[np.isfinite(diffs)]
    if diffs.size < MIN_EXAMPLES or not np.any(diffs):
        return float("nan")
    return float(wilcoxon(diffs, alternative="greater", zero_method="wilcox").pvalue)


def _exact_upper_p(diffs: np.ndarray) -> np.ndarray:
    """Exact one-sided signed-rank p per row of ``diffs`` [B, n], ties given midranks, zeros dropped.

    Under the null each non-zero difference is positive or negative with probability 1/2, so the
    null distribution of R+ (sum of the ranks of |d| over the positive d) is the product of
    (1 + x^r) over the ranks r: built by doubling the midranks (integers) and adding shifted copies
    of the counts, one difference at a time, for every row at once. A zero (rank 0) doubles every
    count, which leaves the p-value unchanged. scipy gives the same number per row (its exact
    distribution without ties; its permutation test, which enumerates all 2^n sign flips for
    n <= 13, with ties), but the permutation test takes ~20 ms per row: 1000 resamples would take
    seconds per method.
    """
    nonzero = diffs != 0
    ranks = rankdata(np.where(nonzero, np.abs(diffs), np.nan), axis=1, nan_policy="omit")
    twice = np.where(nonzero, np.rint(2 * np.nan_to_num(ranks)), 0).astype(np.int64)  # [B, n]
    observed = (twice * (diffs > 0)).sum(axis=1)
    sums = np.arange(int(twice.sum(axis=1).max()) + 1)  # every attainable 2 * R+
    counts = np.zeros((diffs.shape[0], sums.size), np.int64)
    counts[:, 0] = 1
    for col in twice.T:
        source = sums[None, :] - col[:, None]
        counts = counts + np.where(source >= 0, np.take_along_axis(counts, np.clip(source, 0, None), 1), 0)
    return (counts * (sums[None, :] >= observed[:, None])).sum(axis=1) / counts.sum(axis=1)


def signed_rank_p(diffs: np.ndarray) -> np.ndarray:
    """:func:`above_chance_p` of every row of ``diffs`` [B, n] (paired differences mass - chance).

    Each row gets the p-value ``scipy.stats.wilcoxon(row, alternative="greater", zero_method="wilcox")``
    gives it alone (method "auto"): exact when n <= 13, or n <= 50 without ties or zeros (here by
    :func:`_exact_upper_p`), else the normal approximation with the tie correction (scipy, batched).
    NaN for rows with fewer than 5 differences or only zeros, as :func:`above_chance_p`.
    """
    diffs = np.atleast_2d(np.asarray(diffs, float))
    n = diffs.shape[1]
    p = np.full(diffs.shape[0], np.nan)
    if n < MIN_EXAMPLES:
        return p
    magnitudes = np.sort(np.abs(diffs), axis=1)
    tied = (magnitudes[:, 0] == 0) | np.any(magnitudes[:, 1:] == magnitudes[:, :-1], axis=1)
    live = magnitudes[:, -1] > 0
    exact = live & ((n <= 13) | (~tied & (n <= 50)))
    approx = live & ~exact
    if exact.any():
        p[exact] = _exact_upper_p(diffs[exact])
    if approx.any():
        p[approx] = wilcoxon(diffs[approx], axis=1, alternative="greater", zero_method="wilcox",
                             method="asymptotic").pvalue
    return p


def chance_share(masses: Sequence[float], chances: Sequence[float], ratios: Sequence[float], *,
                 n_resamples: int = N_RESAMPLES, seed: int = 0) -> float:
    """Share of bootstrap resamples of the examples in which the better-than-chance part of the rule holds.

    Each resample draws as many examples as there are, with replacement (seeded), and asks what the
    rule asks of all of them: mean ROI ratio above 1 and one-sided Wilcoxon p < ALPHA (the p of
    :func:`above_chance_p`, computed for every resample at once by :func:`signed_rank_p`). Examples
    with an undefined mass - chance are left out, as the test leaves them out. NaN when the test
    cannot run (fewer than 5 examples, or every difference 0): that part of the rule is untested,
    not failed.
    """
    masses, chances, ratios = (np.asarray(x, float) for x in (masses, chances, ratios))
    diffs = masses - chances
    keep = np.isfinite(diffs)
    diffs, ratios = diffs[keep], ratios[keep]
    if diffs.size < MIN_EXAMPLES or not np.any(diffs):
        return float("nan")
    draws = np.random.default_rng(seed).integers(0, diffs.size, size=(n_resamples, diffs.size))
    picked = np.where(np.isfinite(ratios), ratios, 0.0)[draws]
    defined = np.isfinite(ratios)[draws].sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio_means = picked.sum(axis=1) / defined  # NaN (never above 1) when no ratio is defined
    return float(np.mean((ratio_means > 1.0) & (signed_rank_p(diffs[draws]) < ALPHA)))


def mean_finite(values: list) -> float:
    vals = [float(v) for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(vals)) if vals else float("nan")


def summarize_methods(rows: list[dict], methods: Sequence[str], *, n_resamples: int = N_RESAMPLES,
                      seed: int = 0) -> dict[str, dict]:
    """Per method: means of the ROI and concentration scores over the examples where defined, the
    better-than-chance test, and ``chance_share``: the share of ``n_resamples`` bootstrap resamples of
    those examples (seeded by ``seed``) in which the test passes (:func:`chance_share`)."""
    out = {}
    for name in methods:
        scores = [r["methods"][name] for r in rows if name in r["methods"]]
        defined = [s for s in scores if np.isfinite(s.get("roi_mass", float("nan")))]
        hits = [s["pointing_game"] for s in defined if s.get("pointing_game") is not None]
        reasons = sorted({why for s in scores for why in s.get("nan_reasons", {}).values()})
        masses, chances = [s["roi_mass"] for s in defined], [s["roi_chance"] for s in defined]
        ratios = [s["roi_mass_ratio"] for s in defined]
        out[name] = {"n": len(defined), "n_undefined": len(scores) - len(defined),
                     "roi_mass_mean": mean_finite(masses),
                     "roi_chance_mean": mean_finite(chances),
                     "roi_ratio_mean": mean_finite(ratios),
                     "roi_ratio_median": float(np.median(ratios)) if defined else float("nan"),
                     "n_above_chance": int(sum(s["roi_mass"] > s["roi_chance"] for s in defined)),
                     "above_chance_p": above_chance_p(masses, chances),
                     "chance_share": chance_share(masses, chances, ratios, n_resamples=n_resamples, seed=seed),
                     "pointing_game_rate": float(np.mean(hits)) if hits else float("nan"),
                     "focus_mean": mean_finite([s.get("focus") for s in defined]),
                     "gini_mean": mean_finite([s.get("gini") for s in defined]),
                     "nan_reasons": reasons}
    return out


def summarize_sanity(per_example: list[dict], methods: Sequence[str]) -> dict[str, dict]:
    """Per method over the tested examples: mean Spearman rho, flagged anywhere, passes (bool/None)."""
    out = {}
    for name in methods:
        tests = [e["scores"][name] for e in per_example if name in e.get("scores", {})]
        flags = [t.get("flagged") for t in tests if t.get("flagged") is not None]
        passes = None if not flags else not any(flags)
        out[name] = {"n": len(tests), "spearman_mean": mean_finite([t.get("spearman") for t in tests]),
                     "flagged_any": bool(any(flags)), "passes": passes,
                     "reasons": sorted({t["reason"] for t in tests if t.get("reason")})}
    return out


def stability_settings(n_resamples: int = N_RESAMPLES, seed: int = 0) -> dict:
    """How the verdicts' stability was measured (stored in ``diagnostics.json`` next to the verdicts)."""
    return {"n_resamples": n_resamples, "seed": seed, "trusted_at": TRUSTED_SHARE,
            "untrusted_at": UNTRUSTED_SHARE,
            "resampled": "probe examples, with replacement, as many as were probed",
            "randomization_test": "held fixed at its measured result (run on its own few examples): a failed "
                                  "test makes every resample untrusted, an untested one leaves the stability "
                                  "undefined"}


def _stable(on_probe: bool | None, stability: float) -> str:
    """The verdict shown: the rule on all the examples, kept only when the resamples agree with it."""
    if on_probe is None:
        return "untested"
    if not np.isfinite(stability):  # a summary without per-example numbers (written before stability)
        return "trusted" if on_probe else "not trusted"
    if on_probe and stability >= TRUSTED_SHARE:
        return "trusted"
    if not on_probe and stability <= UNTRUSTED_SHARE:
        return "not trusted"
    return "unstable"


def trust_verdict(methods: dict[str, dict], sanity: dict[str, dict] | None) -> dict[str, dict]:
    """Which methods this model's maps can be trusted with (rule: :data:`TRUST_RULE`).

    Per method: ``trusted_on_probe`` (the rule on all the probe examples: True / False, or None when
    a condition could not be tested), ``stability`` (share of the bootstrap resamples in which it is
    trusted: ``chance_share`` when the randomisation test passed, 0 when it failed, NaN when it did
    not run), ``verdict`` ("trusted", "not trusted", "unstable" or "untested") and ``trusted``:
    True / False only for a stable verdict, else None; ``reason`` says why.
    """
    out = {}
    for name, m in methods.items():
        ratio = m.get("roi_ratio_mean", float("nan"))
        p_value = m.get("above_chance_p", float("nan"))
        reasons = []
        if not np.isfinite(ratio):
            chance_ok = None
            reasons.append("ROI ratio undefined")
        elif ratio <= 1.0:
            chance_ok = False
            reasons.append(f"ROI ratio {ratio:.2f} <= 1 (no better than chance)")
        elif not np.isfinite(p_value):
            chance_ok = None
            reasons.append(f"too few examples ({m.get('n', 0)}) to test the ROI mass against chance "
                           f"(needs {MIN_EXAMPLES})")
        elif p_value >= ALPHA:
            chance_ok = False
            reasons.append(f"mean ROI ratio {ratio:.2f} but mass above chance on only {m.get('n_above_chance')} "
                           f"of {m.get('n')} examples (Wilcoxon p = {p_value:.2f}): not consistently on the lesion")
        else:
            chance_ok = True
        passes = (sanity or {}).get(name, {}).get("passes")
        if passes is None:
            reasons.append("randomisation test not run or undefined")
        elif not passes:
            share = m.get("chance_share", float("nan"))
            beats = f" (it beats chance in {share:.0%} of the resamples)" if np.isfinite(share) else ""
            reasons.append(f"map barely changes when the top layers are randomised{beats}")
        on_probe = False if False in (chance_ok, passes) else (None if None in (chance_ok, passes) else True)
        share = m.get("chance_share", float("nan"))
        stability = float("nan") if passes is None else (float(share) if passes else 0.0)
        verdict = _stable(on_probe, stability)
        if verdict == "unstable":
            reasons.append(f"{'trusted' if on_probe else 'not trusted'} on all the examples, but trusted in "
                           f"{stability:.0%} of the bootstrap resamples: a re-run could flip the verdict")
        elif on_probe is not None and not np.isfinite(stability):
            reasons.append("stability not measured")
        out[name] = {"roi_ratio_mean": ratio, "above_chance_p": p_value, "better_than_chance": chance_ok,
                     "passes_randomization": passes, "trusted_on_probe": on_probe, "stability": stability,
                     "verdict": verdict, "trusted": {"trusted": True, "not trusted": False}.get(verdict),
                     "reason": "; ".join(reasons)}
    return out


def top_heads(rows: list[dict], n: int = 10, key: str = "head_scores") -> list[dict]:
    """The ``n`` heads with the largest score summed over the examples: ``key`` "head_scores" (the
    paper's head importance) or "image_head_scores" (the increase summed over the image positions)."""
    mats = [np.asarray(r[key]) for r in rows if key in r]
    if not mats:
        return []
    total = np.sum(mats, axis=0)
    order = np.argsort(total, axis=None)[::-1][:n]
    return [{"layer": int(i // total.shape[1]), "head": int(i % total.shape[1]), "increase": float(total.flat[i]),
             "n_examples": len(mats)} for i in order]
