"""Attention knockout over the probe examples: the per-window curves and the lesion-vs-mirror test.

For each probe record (a phantom question about a lesion, its answer teacher-forced), with
:mod:`medvlm.diagnostics.knockout`:

- **curves**: delta% of p(first answer token) per window centred on each layer, for image -> last,
  image -> question and question -> last (Geva et al. 2023's figure 2 for a VLM), averaged over the
  examples;
- **validation**: the last position may not read the lesion's cells (the image-grid cells the
  lesion mask covers, any area > 0) in any layer, against the same for the mirrored cells (the
  left-right mirror, same count). If the model reads the lesion where it is, the first lowers
  p(answer) more. Paired over the examples: d = delta%(lesion) - delta%(mirror); one-sided
  Wilcoxon signed-rank test of d < 0 (``scipy.stats.wilcoxon``, zero differences dropped), with
  the median d and the share of examples with d < 0 as effect sizes, and n. An example whose
  lesion is its own mirror image (symmetric about the midline) has no contrast and is skipped
  with that reason; a partial overlap is kept (it can only shrink d, so the test stays
  conservative) and counted.

:func:`knockout_validation` returns a JSON-ready dict that the probe stores under ``"knockout"``
in ``diagnostics.json`` and :func:`knockout_blocks` renders in the report.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from scipy.stats import wilcoxon

from medvlm.diagnostics.attention_quality import mask_to_grid
from medvlm.diagnostics.capture import prepare_example
from medvlm.diagnostics.knockout import (
    EDGE_SETS,
    Base,
    EdgeSet,
    Knockout,
    answer_probs,
    cell_positions,
    check_window,
    eval_mode,
    last_position,
    layer_sweep,
    relative_change,
    sweep_window,
)
from medvlm.models.base import ModelFamily
from medvlm.utils.images import read_mask

logger = logging.getLogger(__name__)

ALPHA = 0.05
MIN_EXAMPLES = 5  # with fewer, the smallest one-sided Wilcoxon p is above 0.05
RULE = ("delta% = (p_knocked - p) / p * 100 of the first answer token at the last prompt position; attention "
        "scores from the sources to the targets set to the dtype's minimum before the softmax in every head of a "
        "window of consecutive layers centred on each layer and clipped at the model's ends (Geva et al. 2023)")


# -- cells ----------------------------------------------------------------------------------------
def lesion_cells(mask: np.ndarray, grid: tuple[int, int]) -> list[tuple[int, int]]:
    """The grid cells any part of the lesion ``mask`` covers (area fraction > 0), row-major."""
    cover = mask_to_grid(np.asarray(mask, bool), grid, name="lesion mask")
    return [(int(r), int(c)) for r, c in zip(*np.nonzero(cover > 0), strict=True)]


def mirrored_cells(cells: Sequence[tuple[int, int]], grid: tuple[int, int]) -> list[tuple[int, int]]:
    """The left-right mirror images of ``cells`` on a grid of ``grid`` (rows, cols)."""
    return sorted((r, grid[1] - 1 - c) for r, c in cells)


# -- one example ---------------------------------------------------------------------------------
def _example(model, processor, family, rec: dict):
    """The record teacher-forced with its answer (else, when the answer tokenises to nothing, the
    model's prediction is explained)."""
    try:
        return prepare_example(model, processor, family, rec["image"], rec["question"], rec.get("answer"))
    except ValueError:
        return prepare_example(model, processor, family, rec["image"], rec["question"])


@torch.no_grad()
def _plain_forward_seconds(model, example, clock: Callable[[], float]) -> float:
    t = clock()
    model(**example.inputs, use_cache=False)
    return clock() - t


def example_knockout(model, processor, family: ModelFamily, rec: dict, window: int,
                     clock: Callable[[], float] = time.perf_counter) -> dict[str, Any]:
    """The curves and the lesion / mirror knockouts of one probe record (see the module docstring)."""
    ex = _example(model, processor, family, rec)
    with eval_mode(model):
        forward_s = _plain_forward_seconds(model, ex, clock)
        t = clock()
        sweep = layer_sweep(model, family, ex, window=window)
        row: dict[str, Any] = {"id": rec.get("id"), "question": rec.get("question"), "answer": rec.get("answer"),
                               "token": sweep["token"], "p": sweep["p"], "delta": sweep["delta"],
                               "layers": sweep["layers"]}
        span = ex.span or family.image_spans(model, ex.inputs)[0]
        cells = lesion_cells(read_mask(rec["roi"]), span.grid)
        mirror = mirrored_cells(cells, span.grid)
        row.update(n_cells=len(cells), n_overlap=len(set(cells) & set(mirror)))
        if not cells:
            row["skip"] = "the lesion mask covers no grid cell"
        elif set(cells) == set(mirror):
            row["skip"] = "the lesion is symmetric about the vertical midline: its mirror is itself"
        else:
            base = Base(last_position(ex), sweep["token"], sweep["p"])  # the sweep's unblocked pass
            last = (last_position(ex),)
            every = frozenset(range(len(family.decoder_layers(model))))
            rows = [Knockout(EdgeSet(name, cell_positions(span.start, span.grid, c), last), every)
                    for name, c in (("lesion_to_last", cells), ("mirror_to_last", mirror))]
            lesion, mirrored = relative_change(answer_probs(model, family, ex.inputs, base.position, base.token, rows),
                                               base.p)
            row.update(lesion_delta=float(lesion), mirror_delta=float(mirrored))
        row["seconds"] = clock() - t
        row["forward_s"] = forward_s
    return row


# -- over the examples ----------------------------------------------------------------------------
def paired_test(lesion: Sequence[float], mirror: Sequence[float]) -> dict[str, Any]:
    """Does knocking out the lesion lower p(answer) more than knocking out its mirror? Paired over
    the examples (finite pairs only): d = lesion - mirror (percentage points), the one-sided
    Wilcoxon signed-rank p of d < 0 (NaN with fewer than 5 pairs or all d = 0), the median d, the
    share of pairs with d < 0, the medians of each side, and n."""
    a, b = np.asarray(lesion, float), np.asarray(mirror, float)
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    d = a - b
    n = int(d.size)
    p_value = float("nan")
    reason = None
    if n < MIN_EXAMPLES:
        reason = f"{n} paired examples; the test needs at least {MIN_EXAMPLES}"
    elif not np.any(d):
        reason = "every paired difference is 0"
    else:
        p_value = float(wilcoxon(d, alternative="less", zero_method="wilcox").pvalue)
    nan = float("nan")
    return {"n": n, "p_value": p_value, "median_difference": float(np.median(d)) if n else nan,
            "share_lesion_lower": float(np.mean(d < 0)) if n else nan,
            "median_lesion_delta": float(np.median(a)) if n else nan,
            "median_mirror_delta": float(np.median(b)) if n else nan,
            "passes": None if np.isnan(p_value) else bool(p_value < ALPHA), "reason": reason}


def mean_curves(rows: Sequence[dict], statistic: str = "mean") -> dict[str, list[float]]:
    """The mean (or, with ``statistic="median"``, the median) delta% per window over the examples,
    NaN-aware, per named edge set. Both are reported: a few examples whose answer collapses (-80%)
    or jumps (+several hundred %) carry the mean, the median says what a typical example does."""
    reduce = {"mean": np.nanmean, "median": np.nanmedian}[statistic]
    out = {}
    for name in EDGE_SETS:
        curves = np.array([r["delta"][name] for r in rows if name in r.get("delta", {})], float)
        out[name] = (reduce(np.where(np.isfinite(curves), curves, np.nan), axis=0).tolist()
                     if curves.size and np.isfinite(curves).any() else [])
    return out


def knockout_validation(model, processor, family: ModelFamily, records: Sequence[dict], *, window: int | None = None,
                        clock: Callable[[], float] = time.perf_counter, time_budget: float | None = None) -> dict:
    """The knockout section of the report over ``records`` (probe records with ``roi`` masks).

    ``window``: layers per window (default :func:`~medvlm.diagnostics.knockout.sweep_window` of the
    model's depth; a window wider than the model is refused here, before any record, rather than
    skipping every record with the same error). ``time_budget`` (seconds, optional): records left
    once the measured time would overrun it are listed under ``"skipped"``. A record that fails is
    skipped with its reason.
    """
    n_layers = len(family.decoder_layers(model))
    window = sweep_window(n_layers) if window is None else check_window(window, n_layers)
    start = clock()
    rows, skipped = [], []
    for i, rec in enumerate(records):
        spent = clock() - start
        if time_budget is not None and rows and spent + spent / len(rows) > time_budget:
            skipped += [{"id": r.get("id"), "reason": f"time budget {time_budget:.3g}s: {spent:.3g}s spent"}
                        for r in records[i:]]
            break
        try:
            row = example_knockout(model, processor, family, rec, window, clock)
        except (ValueError, FileNotFoundError, KeyError) as err:
            logger.warning("knockout: record %s skipped: %s", rec.get("id"), err)
            skipped.append({"id": rec.get("id"), "reason": str(err)})
            continue
        if row.get("skip"):
            skipped.append({"id": row["id"], "reason": row["skip"], "what": "lesion_vs_mirror"})
        rows.append(row)
    paired = [r for r in rows if "lesion_delta" in r]
    seconds = [r["seconds"] for r in rows]
    forwards = [r["forward_s"] for r in rows]
    return {"rule": RULE, "window": int(window), "n_layers": n_layers, "edge_sets": dict(EDGE_SETS),
            "layers": rows[0]["layers"] if rows else [], "curves": mean_curves(rows),
            "median_curves": mean_curves(rows, "median"), "n_examples": len(rows),
            "validation": {**paired_test([r["lesion_delta"] for r in paired], [r["mirror_delta"] for r in paired]),
                           "layers": "all", "n_overlapping": sum(1 for r in paired if r["n_overlap"])},
            "cost": {"seconds_per_example": float(np.median(seconds)) if seconds else float("nan"),
                     "forward_seconds": float(np.median(forwards)) if forwards else float("nan"),
                     "forwards_per_example": 3 * n_layers + 3},
            "examples": rows, "skipped": skipped}


# -- the report ------------------------------------------------------------------------------------
def knockout_figure(result: dict) -> bytes:
    """delta% per window centre for the three edge sets (PNG bytes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(5, 3))
    for (name, title), style in zip(EDGE_SETS.items(), ("o-", "s--", "^:"), strict=True):
        curve = result["curves"].get(name) or []
        ax.plot(range(len(curve)), curve, style, label=title)
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.set(xlabel=f"window centre (layer; {result['window']} layer(s) per window)",
           ylabel="% change of p(answer)", title=f"attention knockout (n = {result['n_examples']})")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=7)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def _f(x: Any, digits: int = 2) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x:.{digits}f}"


def _p(x: Any) -> str:
    """A p-value: 4 decimals, or 2 significant digits below 0.001 (so that a small p does not read 0.0000)."""
    return _f(x, 4) if _f(x) == "n/a" or x >= 1e-3 else f"{x:.2g}"


def _curve_cell(result: dict, name: str, centre: int) -> str:
    """``mean (median)`` of one edge set's delta% at one window centre ('n/a' where missing; diagnostics
    written before the median was kept show the mean alone)."""
    def at(curves: dict | None) -> float:
        curve = (curves or {}).get(name) or []
        return curve[centre] if centre < len(curve) else float("nan")

    if "median_curves" not in result:
        return _f(at(result["curves"]))
    return f"{_f(at(result['curves']))} ({_f(at(result['median_curves']))})"


def knockout_blocks(result: dict | None) -> list[tuple]:
    """Report blocks: the rule, the curves as a table and a figure, the lesion-vs-mirror test."""
    if not result:
        return []
    v = result["validation"]
    blocks: list[tuple] = [
        ("h3", "Attention knockout (Geva et al. 2023)"),
        ("p", f"Rule: {result['rule']}. Window: {result['window']} of {result['n_layers']} layers. Mean over "
              f"{result['n_examples']} probe examples (the median in brackets; the figure shows the mean); negative = "
              "the blocked edges carried evidence for the answer."),
        ("table", ["window centre", "layers blocked", *EDGE_SETS.values()],
         [[c, ", ".join(map(str, layers)), *[_curve_cell(result, name, c) for name in EDGE_SETS]]
          for c, layers in enumerate(result.get("layers") or [])]),
        ("figures", {"knockout": knockout_figure(result)} if result["n_examples"] else {}),
        ("p", "Lesion against its mirror image: the last position may not read the lesion's cells (every layer), "
              "against the left-right mirrored cells; d = delta%(lesion) - delta%(mirror), one-sided Wilcoxon "
              f"signed-rank test of d < 0 (p < {ALPHA} passes)."),
        ("table", ["n", "median delta% lesion", "median delta% mirror", "median d", "share d < 0", "Wilcoxon p",
                   "passes", "why"],
         [[v["n"], _f(v["median_lesion_delta"]), _f(v["median_mirror_delta"]), _f(v["median_difference"]),
           _f(v["share_lesion_lower"]), _p(v["p_value"]),
           "n/a" if v["passes"] is None else ("yes" if v["passes"] else "no"), v.get("reason") or ""]]),
    ]
    cost = result.get("cost") or {}
    if np.isfinite(cost.get("seconds_per_example", float("nan"))) and cost.get("forward_seconds"):
        blocks.append(("p", f"Cost: {_f(cost['seconds_per_example'], 3)} s per example "
                            f"({cost['forwards_per_example']} forward passes, batched), "
                            f"{cost['seconds_per_example'] / cost['forward_seconds']:.0f}x a plain forward "
                            f"({_f(cost['forward_seconds'], 4)} s)."))
    if result.get("skipped"):
        blocks.append(("p", "Skipped: " + "; ".join(f"{s.get('id')}: {s['reason']}" for s in result["skipped"])))
    return blocks
