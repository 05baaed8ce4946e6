"""How stable a trust verdict is: the share of bootstrap resamples of the probe examples in which the
rule holds, the resampled Wilcoxon p-values, and the three-valued verdict (trusted / not trusted / unstable)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import wilcoxon

from medvlm.diagnostics.probe_summary import (
    TRUSTED_SHARE,
    UNTRUSTED_SHARE,
    chance_share,
    signed_rank_p,
    summarize_methods,
    trust_verdict,
)

CHANCE = 0.2


def _pairs(diffs: list[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(masses, chances, ratios) of examples whose ROI mass is chance + diff."""
    chances = np.full(len(diffs), CHANCE)
    masses = chances + np.asarray(diffs, float)
    return masses, chances, masses / chances


def _rows(method: str, diffs: list[float]) -> list[dict]:
    masses, chances, ratios = _pairs(diffs)
    return [{"methods": {method: {"roi_mass": m, "roi_chance": c, "roi_mass_ratio": r}}}
            for m, c, r in zip(masses, chances, ratios)]


# Ten examples, |mass - chance| = 0.01 .. 0.10, below chance on the ranks listed: one-sided p = 0.032
BORDERLINE = [(-1 if rank in (1, 2, 6) else 1) * rank / 100 for rank in range(1, 11)]


@pytest.mark.parametrize("n", [5, 9, 14, 24, 51])
def test_resampled_p_is_what_scipys_wilcoxon_gives_each_resample_alone(n):
    """Resamples hold ties (an example drawn twice) and zeros: exact for n <= 13 (scipy would enumerate
    the sign flips; n = 13 is left out, at ~3 s per row), the normal approximation with the tie correction
    above; rows without ties too."""
    rng = np.random.default_rng(n)
    diffs = np.round(rng.normal(0.02, 0.1, n), 2)
    diffs[0] = 0.0
    rows = diffs[rng.integers(0, n, size=(12, n))]  # few: scipy's own permutation test is slow
    rows[:3] = rng.normal(0.03, 0.1, (3, n))  # no ties, no zeros: scipy's exact distribution up to n = 50
    rows[3] = 0.0  # nothing to rank: NaN, as above_chance_p
    expected = [wilcoxon(r, alternative="greater", zero_method="wilcox").pvalue if r.any() else np.nan
                for r in rows]
    np.testing.assert_allclose(signed_rank_p(rows), expected, rtol=1e-12, atol=0)
    assert np.isnan(signed_rank_p(rows[:, :4])).all()  # fewer than 5 examples: no test


def test_share_is_one_when_every_example_is_far_above_chance():
    assert chance_share(*_pairs([0.3, 0.25, 0.4, 0.2, 0.35, 0.3, 0.28, 0.33, 0.4, 0.22, 0.3, 0.31])) == 1.0


def test_share_is_near_zero_when_one_example_carries_the_mean():
    masses, chances, ratios = _pairs([1.5, -0.15, -0.1, -0.12, -0.05, -0.1, -0.15, -0.1, -0.08, 0.01])
    assert ratios.mean() > 1  # the mean ratio alone would pass it
    assert chance_share(masses, chances, ratios) < 0.05


def test_borderline_method_sits_between_the_thresholds():
    masses, chances, ratios = _pairs(BORDERLINE)
    assert wilcoxon(masses - chances, alternative="greater").pvalue == pytest.approx(0.032, abs=0.001)
    assert UNTRUSTED_SHARE < chance_share(masses, chances, ratios) < TRUSTED_SHARE


def test_share_is_undefined_below_five_examples_and_ignores_undefined_differences():
    assert np.isnan(chance_share(*_pairs([0.3, 0.3, 0.3, 0.3])))
    masses, chances, ratios = _pairs([0.3] * 6)
    masses[0] = np.nan  # an undefined map leaves 5 examples, still all above chance
    assert chance_share(masses, chances, ratios) == 1.0


def test_share_is_deterministic_for_a_seed():
    pairs = _pairs(BORDERLINE)
    assert chance_share(*pairs, seed=3) == chance_share(*pairs, seed=3)
    shares = {chance_share(*pairs, seed=s) for s in range(4)}
    assert len(shares) > 1 and max(shares) - min(shares) < 0.1  # other seeds: Monte Carlo error only


def test_verdict_is_given_only_when_stable():
    summary = {**summarize_methods(_rows("far", [0.3, 0.25, 0.4, 0.2, 0.35, 0.3]), ["far"]),
               **summarize_methods(_rows("edge", BORDERLINE), ["edge"]),
               **summarize_methods(_rows("never", [-0.1, 0.02, -0.05, -0.1, 0.01, -0.02]), ["never"]),
               **summarize_methods(_rows("frozen", [0.3, 0.25, 0.4, 0.2, 0.35, 0.3]), ["frozen"]),
               **summarize_methods(_rows("untested", [0.3, 0.25, 0.4, 0.2, 0.35, 0.3]), ["untested"])}
    sanity = {"far": {"passes": True}, "edge": {"passes": True}, "never": {"passes": True},
              "frozen": {"passes": False}}
    verdict = trust_verdict(summary, sanity)
    assert {k: v["verdict"] for k, v in verdict.items()} == {
        "far": "trusted", "edge": "unstable", "never": "not trusted", "frozen": "not trusted",
        "untested": "untested"}
    assert {k: v["trusted"] for k, v in verdict.items()} == {
        "far": True, "edge": None, "never": False, "frozen": False, "untested": None}
    assert verdict["far"]["stability"] == 1.0 and verdict["never"]["stability"] <= UNTRUSTED_SHARE
    edge = verdict["edge"]
    assert edge["trusted_on_probe"] is True and edge["stability"] == summary["edge"]["chance_share"]
    assert "could flip" in edge["reason"]
    # the randomisation test is not resampled: failed, it makes every resample untrusted
    assert verdict["frozen"]["stability"] == 0.0 and summary["frozen"]["chance_share"] == 1.0
    assert "beats chance in 100% of the resamples" in verdict["frozen"]["reason"]
    assert np.isnan(verdict["untested"]["stability"])
