"""The scaling law's figure: the points, the fitted curves, their extrapolation and a held-out run.

A cut of the fitted surface per size X (loss against D_f) and, for the joint law, per data size
(loss against X); the curves are dashed past the fitted data. Matplotlib's object API (no pyplot
state), written as a PNG.
"""

from __future__ import annotations

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from medvlm.diagnostics.scaling import ScalingFit


def plot_scaling(fit: ScalingFit, X, D, L, path, *, holdout: dict | None = None, extrapolate: float = 4.0,
                 title: str = "") -> None:
    """The points and the fitted law, extrapolated ``extrapolate`` times past the largest D (dashed).

    One panel of L against D_f with a curve per size X (the law's surface, cut along D), and for
    the joint law a second panel of L against X with a curve per D_f. ``holdout`` ({"X", "D",
    "measured"}) adds a held-out run: its measured loss (star) and the prediction (open circle).
    Written as a PNG at ``path``.
    """
    D, L = np.asarray(D, float), np.asarray(L, float)
    X = np.ones_like(D) if X is None else np.asarray(X, float)
    joint = fit.form == "X,D"
    fig = Figure(figsize=(11 if joint else 5.5, 4.2), layout="constrained")
    axes = fig.subplots(1, 2 if joint else 1, squeeze=False)[0]
    colours = colormaps["viridis"]
    d_hi = max(D.max(), holdout["D"] if holdout else 0) * extrapolate
    _panel(axes[0], fit, D, L, X, d_hi, colours, along="D")
    if joint:
        x_hi = max(X.max(), holdout["X"] if holdout else 0) * extrapolate
        _panel(axes[1], fit, X, L, D, x_hi, colours, along="X")
    if holdout:
        pred = float(fit.predict(holdout["D"], holdout.get("X"))[()]) if fit.converged else None
        for ax, at in zip(axes, ("D", "X")):
            if pred is not None:  # the law along the held-out run's own level of the other variable
                grid = np.geomspace((D if at == "D" else X).min(), d_hi if at == "D" else x_hi, 100)
                D_, X_ = (grid, holdout.get("X")) if at == "D" else (holdout["D"], grid)
                ax.plot(grid, fit.predict(D_, X_), color="crimson", lw=0.9, ls=":")
            ax.scatter([holdout[at]], [holdout["measured"]], marker="*", s=160, c="crimson", zorder=5,
                       label="held-out run")
            if pred is not None:
                ax.scatter([holdout[at]], [pred], marker="o", s=70, facecolors="none", edgecolors="crimson",
                           zorder=5, label="predicted")
            ax.legend(fontsize=7)
    if fit.converged:
        p = fit.params
        law = (f"L = {p['A']:.3g}·X^-{p['alpha']:.3f}·D^-{p['beta']:.3f} + {p['E']:.3g}" if joint
               else f"L = {p['A']:.3g}·D^-{p['beta']:.3f} + {p['E']:.3g}")
    else:
        law = f"fit did not converge: {fit.message}"
    fig.suptitle(f"{title}\n{law}" if title else law, fontsize=9)
    fig.savefig(path, dpi=110)


def _panel(ax, fit: ScalingFit, along_values, L, other, hi: float, colours, along: str) -> None:
    """L against one variable (log-log), one colour and fitted curve per value of the other."""
    levels = np.unique(other)
    grid = np.geomspace(along_values.min(), hi, 100)
    for i, level in enumerate(levels):
        colour = colours(0.85 * i / max(len(levels) - 1, 1))
        sel = other == level
        name = "X" if along == "D" else "D"
        label = f"{name}={level:g}" if fit.form == "X,D" else None
        ax.scatter(along_values[sel], L[sel], color=colour, s=22, label=label, zorder=3)
        if not fit.converged:
            continue
        D_, X_ = (grid, level) if along == "D" else (level, grid)
        curve = fit.predict(D_, X_ if fit.form == "X,D" else None)
        inside = grid <= along_values.max()
        ax.plot(grid[inside], curve[inside], color=colour, lw=1.2)
        ax.plot(grid[~inside], curve[~inside], color=colour, lw=1.2, ls="--")
    if fit.converged and fit.params["E"] > 0.1 * L.min():  # a floor far below the points would squash them
        ax.axhline(fit.params["E"], color="grey", lw=0.8, ls=":", label="E (floor)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())  # labelled minor ticks overlap over a short range
    ax.set_xlabel("fine-tuning examples D_f" if along == "D" else "size X")
    ax.set_ylabel("evaluation loss")
    ax.legend(fontsize=7)
