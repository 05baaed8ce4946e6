"""The fine-tuning scaling law: how evaluation loss falls with model/adapter size and fine-tuning data.

    L̂(X, D_f) = A · X^(−α) · D_f^(−β) + E

is the multiplicative joint law of Zhang et al. (ICLR 2024, "When scaling meets LLM finetuning",
their equation 1 and the seed paper's), with X a size variable (model size, LoRA rank or trainable
parameters) and D_f the number of fine-tuning examples. With X held constant it reduces to
L̂(D_f) = A · D_f^(−β) + E (:func:`fit_data_law`).

The fit is Hoffmann et al.'s (2022, "Training compute-optimal large language models", approach 3)
as re-examined by Besiroglu et al. (2024, "Chinchilla scaling: a replication attempt";
epoch-research/analyzing-chinchilla, commit 9225883, ``data_analysis.ipynb``):

- in log space, log L̂ = logsumexp(a − α·log X − β·log D_f, e) with A = exp(a), E = exp(e);
- a Huber loss (δ = 1e-3) on the residuals log L − log L̂, SUMMED over the points. Hoffmann et
  al. averaged it, which with L-BFGS's default tolerances stopped the optimiser early (Besiroglu
  et al.'s finding); we sum and use tight tolerances (``ftol`` 1e-15, ``gtol`` 1e-10);
- L-BFGS-B (scipy) from a grid of initialisations, keeping the best start that converged;
- bootstrap over the points (resample with replacement, refit from the point estimate, as
  Besiroglu et al. do) for percentile intervals.

BLAS runs on one thread during a fit: L-BFGS-B's vectors have four entries, and a threaded
OpenBLAS made each optimiser step 15 times slower on a busy 2-core machine.

Choices of ours. log X and log D_f are centred before the fit (the intercept is moved back
afterwards, so A is for X and D_f in their own units): better conditioning, the same model. The
grid of starting intercepts and floors is placed relative to the losses (A's term starts at 0.3,
1 or 3 times the median loss at the median point; E at 5%–90% of the smallest loss), since
fine-tuning losses are far from the 2–3 nats Hoffmann's grid was made for. The search is boxed,
where Hoffmann's was not: α and β in [0, 10] (the law's premise is a loss that does not rise with
size or data), E above 1e-12 times the smallest loss. Unboxed, points the law does not describe
sent L-BFGS creeping along a flat valley for thousands of steps to β = 34; boxed, such a fit stops
on the bound, and one that ends on the upper exponent bound is reported as not converged.

A fit that does not converge returns ``converged=False``, a message, and no parameters: never
parameters from an optimiser that stopped early. Bad input (too few points, all points at one
size, non-positive or non-finite values) raises ``ValueError`` naming the value and the limit.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import Bounds, minimize
from scipy.special import huber
from threadpoolctl import threadpool_limits

logger = logging.getLogger(__name__)

HUBER_DELTA = 1e-3  # Hoffmann et al. 2022, approach 3
EXPONENT_GRID = (0.0, 0.25, 0.5, 1.0, 2.0)  # starts for α and β (Hoffmann: 0 to 2 by 0.5)
INTERCEPT_GRID = (0.3, 1.0, 3.0)  # A's term at the median point, as multiples of the median loss
FLOOR_GRID = (0.05, 0.3, 0.6, 0.9)  # E as a share of the smallest loss
FLOOR_LIMIT = 1e-6  # E below this share of the smallest loss: the fit found no floor (E → 0)
FLOOR_BOUND = 1e-12  # E is searched above this share of the smallest loss
EXPONENT_BOUNDS = (0.0, 10.0)  # α and β: the loss does not rise with size or data; 10 is past any published one
LBFGS_OPTIONS = {"maxiter": 5000, "maxfun": 20000, "ftol": 1e-15, "gtol": 1e-10}


@dataclass
class ScalingFit:
    """The result of one fit. ``params`` and ``intervals`` are None when it did not converge.

    ``params``     {"A", "alpha", "beta", "E"} (no "alpha" for the data-only law)
    ``intervals``  the same keys → (low, high), percentile bootstrap at ``level``
    ``error``      on the fitted points: ``rmse_log`` (of log L − log L̂), ``mean_abs_rel`` and
                   ``max_abs_rel`` (|L̂ − L| / L)
    ``bootstrap``  {"n", "converged", "level"}: resamples drawn and those whose refit converged
    """

    form: str  # "X,D" or "D"
    converged: bool
    message: str
    n_points: int
    params: dict[str, float] | None = None
    intervals: dict[str, tuple[float, float]] | None = None
    error: dict[str, float] | None = None
    objective: float | None = None
    starts: dict[str, int] = field(default_factory=dict)
    bootstrap: dict[str, float] = field(default_factory=dict)

    def predict(self, D, X=None) -> np.ndarray:
        """L̂ at data sizes ``D`` (and sizes ``X`` for the joint law); refuses an unconverged fit."""
        if not self.converged or self.params is None:
            raise ValueError(f"this {self.form} scaling fit did not converge ({self.message}); it has no "
                             "parameters to predict with")
        return predict_loss(self.params, D, X)

    def to_dict(self) -> dict:
        """JSON-ready: the parameters at the top level next to their intervals and the fit's error."""
        out = {"form": self.form, "converged": self.converged, "message": self.message,
               "n_points": self.n_points}
        out.update(self.params or {})
        out.update({"intervals": {k: list(v) for k, v in (self.intervals or {}).items()} or None,
                    "error": self.error, "objective": self.objective, "starts": self.starts,
                    "bootstrap": self.bootstrap})
        return out


def predict_loss(params: dict[str, float], D, X=None) -> np.ndarray:
    """A · X^(−α) · D^(−β) + E (the X factor only when ``params`` holds "alpha")."""
    D = np.asarray(D, dtype=float)
    term = params["A"] * D ** (-params["beta"])
    if "alpha" in params:
        if X is None:
            raise ValueError("this law has a size exponent (alpha): pass X as well as D")
        term = term * np.asarray(X, dtype=float) ** (-params["alpha"])
    return term + params["E"]


# -- input checks -----------------------------------------------------------------------------------
def _positive(name: str, values, n: int | None = None) -> np.ndarray:
    arr = np.asarray(values, dtype=float).ravel()
    if n is not None and arr.size != n:
        raise ValueError(f"{name} has {arr.size} values but L has {n}; give one {name} per loss")
    bad = np.flatnonzero(~np.isfinite(arr) | (arr <= 0))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"{name}[{i}] = {float(arr[i])!r}: every {name} must be a finite number > 0 (the law "
                         f"takes its logarithm); {bad.size} of {arr.size} values are not")
    return arr


def _check_points(X, D, L) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    L = _positive("L", L)
    D = _positive("D", D, L.size)
    X = None if X is None else _positive("X", X, L.size)
    n_params = 3 if X is None else 4
    if L.size < n_params:
        raise ValueError(f"{L.size} points for {n_params} parameters: the {'D' if X is None else 'X,D'} "
                         f"law needs at least {n_params} points")
    if np.unique(D).size < 2:
        raise ValueError(f"all {L.size} points have D = {D[0]:g}: beta needs at least 2 distinct data sizes")
    if X is not None and np.unique(X).size < 2:
        raise ValueError(f"all {L.size} points have X = {X[0]:g}: alpha needs at least 2 distinct sizes; "
                         "fit the data-only law (X=None, or fit_data_law) when X is constant")
    return X, D, L


# -- the objective (centred logs; theta = [a_c, exponents..., e]) ----------------------------------
def _objective(theta: np.ndarray, Z: np.ndarray, y: np.ndarray, delta: float) -> tuple[float, np.ndarray]:
    """Summed Huber loss of log L − log L̂ and its gradient; Z holds the centred logs, one column
    per variable (log X, log D)."""
    k = Z.shape[1]
    a, exps, e = theta[0], theta[1:1 + k], theta[-1]
    u = a - Z @ exps
    pred = np.logaddexp(u, e)
    r = y - pred
    s = np.exp(u - pred)  # d pred / d a; the floor's share is 1 − s
    dr = -np.clip(r, -delta, delta)  # d huber / d pred
    grad = np.concatenate([[dr @ s], -(dr * s) @ Z, [dr @ (1.0 - s)]])
    return float(huber(delta, r).sum()), grad


def _starts(Z: np.ndarray, y: np.ndarray, exponent_grid, intercept_grid, floor_grid) -> list[np.ndarray]:
    """Grid of initial points: exponents × intercepts (relative to the median loss) × floors."""
    med, low = np.median(y), np.min(y)
    k = Z.shape[1]
    out = []
    for exps in itertools.product(exponent_grid, repeat=k):
        for m, f in itertools.product(intercept_grid, floor_grid):
            out.append(np.array([med + np.log(m), *exps, low + np.log(f)]))
    return out


def _minimise(theta0: np.ndarray, Z, y, delta: float, options: dict):
    """L-BFGS-B from ``theta0`` (moved inside the box) on the summed Huber objective."""
    k = Z.shape[1]
    lo = np.array([-np.inf, *[EXPONENT_BOUNDS[0]] * k, y.min() + np.log(FLOOR_BOUND)])
    hi = np.array([np.inf, *[EXPONENT_BOUNDS[1]] * k, np.inf])
    return minimize(_objective, np.clip(theta0, lo, hi), args=(Z, y, delta), jac=True, method="L-BFGS-B",
                    options=options, bounds=Bounds(lo, hi))


def _usable(res) -> bool:
    """Converged, finite, and not stopped on the upper exponent bound (the points are not
    described by the law there: the box, not the data, set the value)."""
    return bool(res.success and np.all(np.isfinite(res.x))
                and np.all(res.x[1:-1] < 0.99 * EXPONENT_BOUNDS[1]))


def _to_params(theta: np.ndarray, centre: np.ndarray, names: Sequence[str]) -> dict[str, float]:
    """Centred intercept → A in the variables' own units: a = a_c + Σ exponent·mean(log var)."""
    k = centre.size
    exps = theta[1:1 + k]
    a = theta[0] + float(exps @ centre)
    params = {"A": float(np.exp(a))}
    params.update({n: float(v) for n, v in zip(names, exps)})
    params["E"] = float(np.exp(theta[-1]))
    return params


@dataclass
class _Problem:
    Z: np.ndarray  # centred logs [n, k]
    centre: np.ndarray  # [k]
    y: np.ndarray  # log L
    names: tuple[str, ...]  # exponent names, in Z's column order

    @classmethod
    def build(cls, X, D, L) -> _Problem:
        cols, names = ([np.log(X)], ("alpha",)) if X is not None else ([], ())
        raw = np.column_stack([*cols, np.log(D)])
        centre = raw.mean(axis=0)
        return cls(raw - centre, centre, np.log(L), (*names, "beta"))

    def subset(self, idx: np.ndarray) -> _Problem:
        return _Problem(self.Z[idx], self.centre, self.y[idx], self.names)


# -- fitting -----------------------------------------------------------------------------------------
def _best_start(problem: _Problem, starts: list[np.ndarray], delta: float, options: dict):
    """Every start through L-BFGS-B; the lowest objective among those that converged (None if none)."""
    best, failures = None, {}
    for theta0 in starts:
        res = _minimise(theta0, problem.Z, problem.y, delta, options)
        if not _usable(res):
            why = str(res.message) if not res.success else f"an exponent reached its bound {EXPONENT_BOUNDS[1]:g}"
            failures[why] = failures.get(why, 0) + 1
            continue
        if best is None or res.fun < best.fun:
            best = res
    return best, failures


def _fit_error(problem: _Problem, theta: np.ndarray) -> dict[str, float]:
    pred = np.logaddexp(theta[0] - problem.Z @ theta[1:-1], theta[-1])
    r = problem.y - pred
    rel = np.abs(np.expm1(-r))  # |L̂ − L| / L = |exp(log L̂ − log L) − 1|
    return {"rmse_log": float(np.sqrt(np.mean(r ** 2))), "mean_abs_rel": float(rel.mean()),
            "max_abs_rel": float(rel.max())}


def _bootstrap(problem: _Problem, theta: np.ndarray, n: int, level: float, seed: int, delta: float,
               options: dict) -> tuple[dict[str, tuple[float, float]] | None, dict]:
    """Percentile intervals from ``n`` resamples of the points, each refitted from ``theta``. A
    resample whose refit does not converge, or that cannot identify an exponent (one distinct size
    left, or fewer distinct points than parameters), is counted and left out; with fewer than half
    of them usable there are no intervals."""
    rng = np.random.default_rng(seed)
    n_points, k = problem.y.size, problem.Z.shape[1]
    draws = []
    for _ in range(n):
        idx = rng.integers(0, n_points, n_points)
        sub = problem.subset(idx)
        if any(np.unique(sub.Z[:, j]).size < 2 for j in range(k)) or np.unique(idx).size < k + 2:
            continue  # an exponent or the whole law under-determined: fewer distinct points than parameters
        res = _minimise(theta, sub.Z, sub.y, delta, options)
        if _usable(res):
            draws.append(_to_params(res.x, problem.centre, problem.names))
    info = {"n": n, "converged": len(draws), "level": level}
    if n == 0 or len(draws) < max(n / 2, 2):
        return None, info
    tail = (1.0 - level) / 2 * 100
    intervals = {key: (float(np.percentile(v, tail)), float(np.percentile(v, 100 - tail)))
                 for key in draws[0] for v in [np.array([d[key] for d in draws])]}
    return intervals, info


def fit_scaling_law(X, D, L, *, n_bootstrap: int = 200, level: float = 0.95, seed: int = 0,
                    delta: float = HUBER_DELTA, exponent_grid: Sequence[float] = EXPONENT_GRID,
                    intercept_grid: Sequence[float] = INTERCEPT_GRID, floor_grid: Sequence[float] = FLOOR_GRID,
                    max_iter: int = LBFGS_OPTIONS["maxiter"]) -> ScalingFit:
    """Fit L̂(X, D) = A · X^(−α) · D^(−β) + E to losses ``L`` of runs at sizes ``X`` and data ``D``.

    ``X=None`` fits the data-only law L̂(D) = A · D^(−β) + E (no "alpha"). Returns a
    :class:`ScalingFit`; ``converged=False`` (and no parameters) when no start of the grid
    converged within ``max_iter`` L-BFGS iterations. ``n_bootstrap=0`` skips the intervals.
    Raises ``ValueError`` on fewer points than parameters, a single distinct size (X) or data size
    (D), and on values that are not finite and > 0.
    """
    X, D, L = _check_points(X, D, L)
    with threadpool_limits(limits=1, user_api="blas"):
        return _fit(X, D, L, n_bootstrap=n_bootstrap, level=level, seed=seed, delta=delta,
                    grids=(exponent_grid, intercept_grid, floor_grid), max_iter=max_iter)


def _fit(X, D, L, *, n_bootstrap: int, level: float, seed: int, delta: float, grids, max_iter: int) -> ScalingFit:
    problem = _Problem.build(X, D, L)
    form = "D" if X is None else "X,D"
    options = {**LBFGS_OPTIONS, "maxiter": max_iter}
    starts = _starts(problem.Z, problem.y, *grids)
    best, failures = _best_start(problem, starts, delta, options)
    n_ok = len(starts) - sum(failures.values())
    start_info = {"tried": len(starts), "converged": n_ok}
    if best is None:
        reasons = "; ".join(f"{c}x {m}" for m, c in failures.items())
        message = (f"no start of {len(starts)} converged (L-BFGS-B: {reasons}); if the optimiser stopped, "
                   f"raise max_iter (now {max_iter}) or widen the grid; if an exponent reached its bound, "
                   "the law does not describe these points")
        logger.warning("scaling fit (%s, %d points): %s", form, L.size, message)
        return ScalingFit(form, False, message, L.size, starts=start_info)
    params = _to_params(best.x, problem.centre, problem.names)
    intervals, boot = _bootstrap(problem, best.x, n_bootstrap, level, seed, delta, options)
    message = f"best of {n_ok} converged starts (of {len(starts)})"
    if params["E"] < FLOOR_LIMIT * L.min():
        message += (f"; E went to its limit 0 ({params['E']:.3g}): these points show no floor, the law is a "
                    "pure power law here and E is not identified")
    for name in problem.names:
        if params[name] <= EXPONENT_BOUNDS[0] + 1e-9:
            message += f"; {name} = 0 (its lower bound): no effect of {'D' if name == 'beta' else 'X'} in these points"
    if L.size == len(best.x):
        message += (f"; {L.size} points for {L.size} parameters: nothing is left over to test the law, so its "
                    "error on the points says little about it")
    if n_bootstrap and intervals is None:
        message += f"; no intervals: only {boot['converged']} of {n_bootstrap} bootstrap refits usable"
    return ScalingFit(form, True, message, L.size, params=params, intervals=intervals,
                      error=_fit_error(problem, best.x), objective=float(best.fun), starts=start_info,
                      bootstrap=boot)


def fit_data_law(D, L, **kwargs) -> ScalingFit:
    """L̂(D) = A · D^(−β) + E for runs at one size (see :func:`fit_scaling_law` for the options)."""
    return fit_scaling_law(None, D, L, **kwargs)


def fit_by_template(X, D, L, templates: Sequence[str], **kwargs) -> dict[str, ScalingFit]:
    """One fit per question template (e.g. "closed" and "open"), since the exponents can differ by
    template (the seed paper saw this). ``templates[i]`` labels point i; ``X=None`` fits the
    data-only law per template. A group that cannot be fitted raises, naming the template."""
    labels = np.asarray(list(templates), dtype=object)
    L_arr = np.asarray(L, dtype=float).ravel()
    if labels.size != L_arr.size:
        raise ValueError(f"templates has {labels.size} labels but L has {L_arr.size}; give one label per loss")
    X_arr = None if X is None else np.asarray(X, dtype=float).ravel()
    D_arr = np.asarray(D, dtype=float).ravel()
    fits = {}
    for label in dict.fromkeys(labels.tolist()):
        idx = np.flatnonzero(labels == label)
        try:
            fits[str(label)] = fit_scaling_law(None if X_arr is None else X_arr[idx], D_arr[idx], L_arr[idx],
                                               **kwargs)
        except ValueError as err:
            raise ValueError(f"template {label!r}: {err}") from err
    return fits

