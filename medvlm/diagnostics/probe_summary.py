"""Aggregate probe results: per-method ROI scores, randomisation-test verdicts, the trust rule, top heads.

Inputs are the per-example rows that :func:`medvlm.diagnostics.probe.probe_example` returns (and
that ``diagnostics.json`` stores under ``"examples"``); outputs are JSON-serialisable dicts with
NaN where a mean has no defined value.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

TRUST_RULE = ("a method is trusted when its mean ROI ratio over the probe examples is above 1 (more "
              "map mass on the lesion than a uniform map) AND it passes the parameter-randomisation test "
              "(its map changes when the top decoder layer is re-initialised: Spearman rho <= the threshold)")


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
        chance_ok = None if not np.isfinite(ratio) else bool(ratio > 1.0)
        passes = (sanity or {}).get(name, {}).get("passes")
        reasons = []
        if chance_ok is None:
            reasons.append("ROI ratio undefined")
        elif not chance_ok:
            reasons.append(f"ROI ratio {ratio:.2f} <= 1 (no better than chance)")
        if passes is None:
            reasons.append("randomisation test not run or undefined")
        elif not passes:
            reasons.append("map barely changes when the top decoder layer is randomised")
        trusted = False if False in (chance_ok, passes) else (None if None in (chance_ok, passes) else True)
        out[name] = {"roi_ratio_mean": ratio, "better_than_chance": chance_ok, "passes_randomization": passes,
                     "trusted": trusted, "reason": "; ".join(reasons)}
    return out


def top_heads(rows: list[dict], n: int = 10) -> list[dict]:
    mats = [np.asarray(r["head_scores"]) for r in rows if "head_scores" in r]
    if not mats:
        return []
    total = np.sum(mats, axis=0)
    order = np.argsort(total, axis=None)[::-1][:n]
    return [{"layer": int(i // total.shape[1]), "head": int(i % total.shape[1]), "increase": float(total.flat[i]),
             "n_examples": len(mats)} for i in order]
