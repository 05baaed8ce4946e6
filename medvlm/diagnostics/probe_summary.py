"""Aggregate probe results: per-method ROI scores, randomisation-test verdicts, the trust rule, top heads.

Inputs are the per-example rows that :func:`medvlm.diagnostics.probe.probe_example` returns (and
that ``diagnostics.json`` stores under ``"examples"``); outputs are JSON-serialisable dicts with
NaN where a mean has no defined value.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import wilcoxon

#: One-sided significance level of the better-than-chance test.
ALPHA = 0.05
TRUST_RULE = ("a method is trusted when it beats chance on the lesion, i.e. its mean ROI ratio over the probe "
              "examples is above 1 AND its ROI mass exceeds the chance level (the lesion's area share) "
              f"consistently across examples (one-sided Wilcoxon signed-rank test, p < {ALPHA}; so one lucky "
              "example cannot carry the mean), AND it passes the parameter-randomisation test (its map changes "
              "when the top layer of the vision tower and of the decoder are re-initialised: Spearman rho <= the "
              "threshold on every tested example)")


def above_chance_p(masses: list[float], chances: list[float]) -> float:
    """One-sided Wilcoxon signed-rank p-value that ROI mass exceeds chance (paired per example).

    NaN with fewer than 5 examples (the smallest attainable p is then above 0.05) or when every
    difference is 0. The test ranks the paired differences, so it asks whether the map is on the
    lesion *consistently*, which a mean ratio driven by one example does not show.
    """
    diffs = np.asarray(masses, float) - np.asarray(chances, float)
    diffs = diffs[np.isfinite(diffs)]
    if diffs.size < 5 or not np.any(diffs):
        return float("nan")
    return float(wilcoxon(diffs, alternative="greater", zero_method="wilcox").pvalue)


def mean_finite(values: list) -> float:
    vals = [float(v) for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(vals)) if vals else float("nan")


def summarize_methods(rows: list[dict], methods: Sequence[str]) -> dict[str, dict]:
    """Per method: means of the ROI and concentration scores over the examples where defined."""
    out = {}
    for name in methods:
        scores = [r["methods"][name] for r in rows if name in r["methods"]]
        defined = [s for s in scores if np.isfinite(s.get("roi_mass", float("nan")))]
        hits = [s["pointing_game"] for s in defined if s.get("pointing_game") is not None]
        reasons = sorted({why for s in scores for why in s.get("nan_reasons", {}).values()})
        out[name] = {"n": len(defined), "n_undefined": len(scores) - len(defined),
                     "roi_mass_mean": mean_finite([s["roi_mass"] for s in defined]),
                     "roi_chance_mean": mean_finite([s["roi_chance"] for s in defined]),
                     "roi_ratio_mean": mean_finite([s["roi_mass_ratio"] for s in defined]),
                     "roi_ratio_median": (float(np.median([s["roi_mass_ratio"] for s in defined])) if defined
                                          else float("nan")),
                     "n_above_chance": int(sum(s["roi_mass"] > s["roi_chance"] for s in defined)),
                     "above_chance_p": above_chance_p([s["roi_mass"] for s in defined],
                                                      [s["roi_chance"] for s in defined]),
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


def trust_verdict(methods: dict[str, dict], sanity: dict[str, dict] | None) -> dict[str, dict]:
    """Which methods this model's maps can be trusted with (rule: :data:`TRUST_RULE`).

    ``trusted`` is True / False, or None when a condition could not be tested (reason given).
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
            reasons.append(f"too few examples ({m.get('n', 0)}) to test the ROI mass against chance (needs 5)")
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
            reasons.append("map barely changes when the top layers are randomised")
        trusted = False if False in (chance_ok, passes) else (None if None in (chance_ok, passes) else True)
        out[name] = {"roi_ratio_mean": ratio, "above_chance_p": p_value, "better_than_chance": chance_ok,
                     "passes_randomization": passes,
                     "trusted": trusted, "reason": "; ".join(reasons)}
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
