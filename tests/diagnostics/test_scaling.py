"""The fine-tuning scaling law fit on synthetic losses drawn from known parameters.

Tolerances are derived, not tuned: for a least-absolute-deviation fit (the Huber loss with
δ = 1e-3 is one, since the log-noise here is 20 times δ) of a smooth model with Gaussian noise σ,
the estimates are asymptotically normal with covariance σ²·π/2·(JᵀJ)⁻¹, J the Jacobian of log L̂
with respect to (a, exponents, e) at the true parameters. The test computes J by finite
differences of the law written out here, and asks each estimate to lie within 4 of those
standard errors (a 4-sigma miss has probability 6e-5 per parameter; the seeds are fixed).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.special import huber

from medvlm.diagnostics.scaling import fit_by_template, fit_data_law, fit_scaling_law
from medvlm.diagnostics.scaling_plot import plot_scaling

SIGMA = 0.02  # multiplicative noise: log L = log L_true + N(0, SIGMA²)
FAST = dict(exponent_grid=(0.0, 0.5, 1.0), intercept_grid=(1.0,), floor_grid=(0.3, 0.9))  # 18 starts
RANKS = np.array([4.0, 8, 16, 32, 64])
SIZES = np.array([250.0, 500, 1000, 2000, 4000, 8000])


def grid_points():
    X, D = (a.ravel() for a in np.meshgrid(RANKS, SIZES))
    return X, D


def log_law(theta, D, X=None):
    """log(A·X^-α·D^-β + E) with theta = (log A, [α,] β, log E)."""
    power = theta[0] - theta[-2] * np.log(D)
    if X is not None:
        power = power - theta[1] * np.log(X)
    return np.logaddexp(power, theta[-1])


def draw(theta, D, X=None, seed=0):
    rng = np.random.default_rng(seed)
    return np.exp(log_law(theta, D, X) + rng.normal(0.0, SIGMA, D.size))


def standard_errors(theta, D, X=None):
    h = 1e-6
    J = np.column_stack([(log_law(theta + dh, D, X) - log_law(theta - dh, D, X)) / (2 * h)
                         for dh in np.eye(theta.size) * h])
    return SIGMA * np.sqrt(np.pi / 2) * np.sqrt(np.diag(np.linalg.inv(J.T @ J)))


def estimate(fit):
    p = fit.params
    return np.array([np.log(p["A"]), *([p["alpha"]] if "alpha" in p else []), p["beta"], np.log(p["E"])])


TRUE_XD = np.array([np.log(8.0), 0.3, 0.4, np.log(0.15)])  # A = 8, alpha = 0.3, beta = 0.4, E = 0.15


def test_joint_fit_recovers_the_parameters_within_four_standard_errors():
    X, D = grid_points()
    L = draw(TRUE_XD, D, X, seed=0)
    fit = fit_scaling_law(X, D, L, n_bootstrap=0, **FAST)
    se = standard_errors(TRUE_XD, D, X)
    assert fit.converged and set(fit.params) == {"A", "alpha", "beta", "E"}
    assert se[1] < 0.02 and se[2] < 0.025  # the design pins the exponents down: the check is not vacuous
    np.testing.assert_array_less(np.abs(estimate(fit) - TRUE_XD), 4 * se)
    # the error on the points is the noise's size: rmse of log residuals near SIGMA
    assert 0.5 * SIGMA < fit.error["rmse_log"] < 1.5 * SIGMA
    # the objective is the SUM (not the mean) of the Huber loss of the log residuals
    resid = np.log(L) - log_law(estimate(fit), D, X)
    assert fit.objective == pytest.approx(huber(1e-3, resid).sum(), rel=1e-6)


def test_data_only_fit_recovers_A_beta_E():
    theta = np.array([np.log(30.0), 0.5, np.log(0.2)])
    D = np.geomspace(125, 16000, 8)
    L = draw(theta, D, seed=1)
    fit = fit_data_law(D, L, n_bootstrap=0, **FAST)
    assert fit.converged and fit.form == "D" and set(fit.params) == {"A", "beta", "E"}
    np.testing.assert_array_less(np.abs(estimate(fit) - theta), 4 * standard_errors(theta, D))
    assert fit.predict([1e6])[0] == pytest.approx(fit.params["A"] * 1e6 ** -fit.params["beta"] + fit.params["E"])


def test_per_template_fits_recover_different_exponents():
    X, D = grid_points()
    closed = np.array([np.log(5.0), 0.2, 0.5, np.log(0.05)])
    open_ = np.array([np.log(20.0), 0.5, 0.2, np.log(0.3)])
    L = np.concatenate([draw(closed, D, X, seed=2), draw(open_, D, X, seed=3)])
    templates = ["closed"] * D.size + ["open"] * D.size
    fits = fit_by_template(np.tile(X, 2), np.tile(D, 2), L, templates, n_bootstrap=100, seed=4, **FAST)
    assert list(fits) == ["closed", "open"]
    for name, theta in (("closed", closed), ("open", open_)):
        assert fits[name].converged
        np.testing.assert_array_less(np.abs(estimate(fits[name]) - theta), 4 * standard_errors(theta, D, X))
    # the two templates' intervals for each exponent do not overlap: the difference is found, not assumed
    for key in ("alpha", "beta"):
        lo_c, hi_c = fits["closed"].intervals[key]
        lo_o, hi_o = fits["open"].intervals[key]
        assert hi_c < lo_o or hi_o < lo_c, key


def test_bootstrap_intervals_cover_the_true_values():
    """Over 8 synthetic data sets, each 95% interval holds the truth at least 7 times (for a true
    95% interval, 6 or fewer of 8 happens with probability 0.006), and the intervals are not
    trivially wide: under 12 standard errors, 3 times a normal 95% interval (3.9). The bootstrap of
    a least-absolute-deviation fit on 30 points is wider than the asymptotic interval on some
    draws (up to 2.1 times with 400 resamples on these data), so the bound leaves room for that."""
    X, D = grid_points()
    se = standard_errors(TRUE_XD, D, X)
    truth = {"A": 8.0, "alpha": 0.3, "beta": 0.4, "E": 0.15}
    covered = dict.fromkeys(truth, 0)
    for seed in range(8):
        fit = fit_scaling_law(X, D, draw(TRUE_XD, D, X, seed=10 + seed), n_bootstrap=40, seed=seed, **FAST)
        assert fit.bootstrap["converged"] >= 36
        for key, value in truth.items():
            lo, hi = fit.intervals[key]
            covered[key] += lo <= value <= hi
        assert fit.intervals["alpha"][1] - fit.intervals["alpha"][0] < 12 * se[1]
        assert fit.intervals["beta"][1] - fit.intervals["beta"][0] < 12 * se[2]
    assert all(n >= 7 for n in covered.values()), covered


def test_a_fit_that_does_not_converge_returns_no_parameters():
    X, D = grid_points()
    fit = fit_scaling_law(X, D, draw(TRUE_XD, D, X), max_iter=1, **FAST)
    assert not fit.converged and fit.params is None and fit.intervals is None
    assert "max_iter" in fit.message and "no start of 18 converged" in fit.message
    with pytest.raises(ValueError, match="did not converge"):
        fit.predict([1000], [8])
    assert json.loads(json.dumps(fit.to_dict()))["converged"] is False


def test_result_is_json_ready_and_the_figure_is_written(tmp_path):
    X, D = grid_points()
    L = draw(TRUE_XD, D, X)
    fit = fit_scaling_law(X, D, L, n_bootstrap=10, **FAST)
    out = json.loads(json.dumps(fit.to_dict()))
    assert {"A", "alpha", "beta", "E", "intervals", "error"} <= set(out) and len(out["intervals"]["beta"]) == 2
    png = tmp_path / "fit.png"
    plot_scaling(fit, X, D, L, png, holdout={"X": 64, "D": 32000, "measured": 0.19})
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args, message", [
    (([4, 8, 16], [100, 200, 400], [1.0, 0.9, 0.8]), "3 points for 4 parameters"),
    ((None, [100, 200], [1.0, 0.9]), "2 points for 3 parameters"),
    (([16] * 6, [100, 200, 400, 800, 1600, 3200], [1.0, 0.9, 0.8, 0.7, 0.6, 0.5]), "all 6 points have X = 16"),
    (([4, 8, 16, 32], [500] * 4, [1.0, 0.9, 0.8, 0.7]), "all 4 points have D = 500"),
    (([4, 8, 16, 32], [100, 200, 400, 800], [1.0, 0.9, 0.0, 0.7]), r"L\[2\] = 0.0: every L must be"),
    (([-4, 8, 16, 32], [100, 200, 400, 800], [1.0, 0.9, 0.8, 0.7]), r"X\[0\] = -4.0"),
    (([4, 8, 16, 32], [100, float("nan"), 400, 800], [1.0, 0.9, 0.8, 0.7]), r"D\[1\] = nan"),
    (([4, 8, 16, 32], [100, 200, 400], [1.0, 0.9, 0.8, 0.7]), "D has 3 values but L has 4"),
])
def test_bad_input_raises_naming_the_value_and_the_limit(args, message):
    with pytest.raises(ValueError, match=message):
        fit_scaling_law(*args, n_bootstrap=0, **FAST)


def test_per_template_error_names_the_template():
    X, D = grid_points()
    L = draw(TRUE_XD, D, X)
    templates = ["closed"] * (D.size - 2) + ["open"] * 2
    with pytest.raises(ValueError, match="template 'open': 2 points for 4 parameters"):
        fit_by_template(X, D, L, templates, n_bootstrap=0, **FAST)
    with pytest.raises(ValueError, match="templates has 3 labels but L has 30"):
        fit_by_template(X, D, L, ["closed"] * 3, n_bootstrap=0, **FAST)


def test_points_without_a_floor_say_that_E_is_not_identified():
    """A pure power law (E = 0): the fit converges with E at its limit and says so."""
    X, D = grid_points()
    L = draw(np.array([np.log(8.0), 0.3, 0.4, -np.inf]), D, X, seed=5)
    fit = fit_scaling_law(X, D, L, n_bootstrap=0, **FAST)
    assert fit.converged and fit.params["E"] < 1e-6 * L.min()
    assert "no floor" in fit.message and "E is not identified" in fit.message
    # the power law itself is found: a log-linear LAD fit on a balanced grid, SE = σ·√(π/2)/‖log X − mean‖
    se_alpha = SIGMA * np.sqrt(np.pi / 2) / np.linalg.norm(np.log(X) - np.log(X).mean())
    assert fit.params["alpha"] == pytest.approx(0.3, abs=4 * se_alpha)


def test_as_many_points_as_parameters_fits_but_gives_no_intervals():
    """3 points, 3 parameters: the law passes through them; a resample holds at most 3 distinct
    points and mostly fewer, so the bootstrap cannot say anything and no interval is given."""
    theta = np.array([np.log(30.0), 0.5, np.log(0.2)])
    D = np.array([500.0, 2000, 8000])
    fit = fit_data_law(D, np.exp(log_law(theta, D)), n_bootstrap=50, **FAST)
    assert fit.converged and fit.error["max_abs_rel"] < 1e-6
    np.testing.assert_allclose(estimate(fit), theta, atol=1e-4)
    assert fit.intervals is None and "3 points for 3 parameters" in fit.message
    assert "no intervals: only" in fit.message and fit.bootstrap["converged"] < 25
