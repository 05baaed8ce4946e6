"""The head comparison in the report (:mod:`medvlm.diagnostics.head_compare`): its blocks and figures.

Kept apart from the computation so the report renders a saved ``head_comparison.json`` without
loading torch or a model."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import numpy as np

#: where a run's head comparison is saved (in the run folder, beside its stages)
HEADS_FILE = "head_comparison.json"


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    if fig.get_layout_engine() is None:
        fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def head_figures(comparison: dict[str, Any]) -> dict[str, bytes]:
    """``heads_heatmap``: each variant's mean head importance (layers x heads, one colour scale
    centred on 0); ``heads_scatter``: every later variant's mean importance against the first's,
    one point per head, the top-5 of each later variant labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    names = comparison["variants"]
    means = {n: np.asarray(comparison["mean_scores"][n], float) for n in names}
    lim = max(float(np.abs(m).max()) for m in means.values()) or 1.0
    n_layers, n_heads = means[names[0]].shape
    width = min(4 + 0.25 * n_heads, 9)
    fig, axes = plt.subplots(1, len(names), figsize=(width * len(names) / 2 + 1, 0.25 * n_layers + 2.2),
                             squeeze=False, layout="constrained")
    for ax, name in zip(axes[0], names, strict=True):
        im = ax.imshow(means[name], cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto", origin="lower")
        ax.set(title=name, xlabel="head", ylabel="layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # whole layers and heads
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.colorbar(im, ax=list(axes[0]), shrink=0.8, label="mean log p increase (eq. 6)")
    fig.suptitle(f"Head importance, mean over {comparison['n_examples']} probe examples", fontsize=9)
    out = {"heads_heatmap": _png(fig)}
    fig, axes = plt.subplots(1, len(names) - 1, figsize=(3.6 * (len(names) - 1), 3.4), squeeze=False)
    x = means[names[0]].ravel()
    for ax, name in zip(axes[0], names[1:], strict=True):
        y = means[name].ravel()
        ax.scatter(x, y, s=12, alpha=0.7)
        ax.plot([-lim, lim], [-lim, lim], color="grey", lw=0.8, ls=":")
        for i in np.argsort(-y, kind="stable")[:5]:
            ax.annotate(f"{i // n_heads}.{i % n_heads}", (x[i], y[i]), fontsize=6)
        pair = next((p for p in comparison["pairs"] if p["a"] == names[0] and p["b"] == name), {})
        ax.set(xlabel=f"{names[0]} importance", ylabel=f"{name} importance",
               title=f"{name} vs {names[0]}: rho {pair.get('spearman', float('nan')):.2f}")
    out["heads_scatter"] = _png(fig)
    return out


def probe_head_blocks(d: dict, fmt: Callable[[Any], str]) -> list[tuple]:
    """A stage's probe (``diagnostics.json``): its top heads under each score, each table named
    (diagnostics written before the paper's head importance existed hold only the image-position
    sum, under ``top_heads``, and are labelled so)."""
    n = (d.get("top_heads") or [{}])[0].get("n_examples", "the")
    paper = ("h3", "Top heads by head importance (whole head output at the last position)")
    image = ("h3", "Top heads by log-probability increase summed over the image positions")
    paper_p = ("p", f"Yu & Ananiadou 2024, eq. 6: log p(w | h + o) - log p(w | h) for the head's whole output o at "
                    f"the last prompt position, summed over {n} probe examples; w is each example's predicted token.")
    image_p = ("p", "What a head carries from the image: the increase of each image position's piece a·v·W_O, "
                    f"summed over the image positions and over {n} probe examples.")
    blocks: list[tuple] = []
    for rows, heading, text in ((d.get("top_heads"), paper, paper_p), (d.get("image_top_heads"), image, image_p)):
        if rows and "image_top_heads" not in d:  # an older probe: its top_heads are the image-position sum
            heading, text = image, image_p
        if rows:
            blocks += [heading, text, ("table", ["layer", "head", "summed over examples"],
                                       [[h["layer"], h["head"], fmt(h["increase"])] for h in rows])]
    return blocks


def _fmt(x: Any, digits: int = 3) -> str:
    """A number for a table: n/a when undefined, small p-values in scientific notation."""
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "n/a"
    if isinstance(x, float):
        return f"{x:.2e}" if 0 < abs(x) < 10 ** -digits else f"{x:.{digits}f}"
    return str(x)


def head_blocks(comparison: dict[str, Any]) -> list[tuple]:
    """Report blocks: what was computed, the top heads side by side, the pairwise comparison, the
    heads that gained and lost most, the reading of each variant's top heads, the cost, the figures."""
    names = comparison["variants"]
    n = comparison["n_examples"]
    agree = comparison.get("predicts_answer") or {}
    blocks: list[tuple] = [
        ("h2", "Important heads before and after fine-tuning"),
        ("p", "Head importance (Yu & Ananiadou 2024, arXiv 2411.10950, eq. 6): log p(w | h + o) - log p(w | h) "
              "at the last prompt position, with h the residual stream entering the head's layer and o the "
              "head's whole output there (all source positions), read through the final norm with the RMS "
              f"of the last layer's output held fixed (as the authors' code does; norm = "
              f"{comparison.get('norm', 'frozen')}) and the unembedding. w is the first token of the reference "
              f"answer, the same for every variant; mean over {n} probe examples. Share of examples where the "
              "variant predicts w: " + ", ".join(f"{k} {_fmt(v, 2)}" for k, v in agree.items()) + "."),
    ]
    tops = comparison["top_heads"]
    depth = max(len(t) for t in tops.values())
    blocks += [("h3", "Top heads per variant (layer.head: mean importance)"),
               ("table", ["rank", *names],
                [[r + 1, *[f"{t[r]['layer']}.{t[r]['head']}: {_fmt(t[r]['importance'])}" if r < len(t) else ""
                           for t in (tops[x] for x in names)]] for r in range(depth)])]
    ks = comparison.get("ks") or sorted({int(k) for p in comparison["pairs"] for k in p["overlap"]}, reverse=True)
    blocks += [("h3", "How much the ranking moved"),
               ("p", "Overlap of the top-k heads (n of k; chance = the mean overlap of two random top-k sets, "
                     "k^2 / heads) and Spearman's rank correlation over all heads, of the mean importance."),
               ("table", ["variant a", "variant b", *[f"top-{k} overlap (chance)" for k in ks], "Spearman rho", "p"],
                [[p["a"], p["b"], *[f"{p['overlap'][str(k)]['n']}/{p['overlap'][str(k)]['k']} "
                                    f"({_fmt(p['overlap'][str(k)]['chance'], 2)})" for k in ks],
                  _fmt(p["spearman"], 2), _fmt(p["spearman_p"], 2)] for p in comparison["pairs"]])]
    rows = [[p["a"], p["b"], what, f"{h['layer']}.{h['head']}", f"{_fmt(h['before'])} -> {_fmt(h['after'])}",
             f"{h['rank_before']} -> {h['rank_after']}", _fmt(h["median_change"]), _fmt(h["share_in_direction"], 2),
             _fmt(h["wilcoxon_p"], 2), h["n"]]
            for p in comparison["pairs"] for what in ("gained", "lost") for h in p[what]]
    blocks += [("h3", "Heads that gained or lost most"),
               ("p", "Ranked by the change of the mean importance; median paired change, share of examples that "
                     "moved in the direction of the mean, and a two-sided Wilcoxon signed-rank p-value over the "
                     "examples. The heads were chosen by their change on these same examples: the p-values are "
                     "not corrected for that choice."),
               ("table", ["a", "b", "", "head", "importance", "rank", "median change", "share", "Wilcoxon p", "n"],
                rows)]
    reads = comparison.get("readings") or {}
    if reads:
        blocks += [("h3", "What the top heads write (reciprocal rank of w)"),
                   ("p", "Each head's weighted value-output vectors a·v·W_O of its most important source positions "
                         "(largest increase first), projected into the vocabulary (final norm, unembedding): the "
                         "reciprocal rank of w at the most important position (RR), over the read positions "
                         "(MRR), and for the head's whole output; the share of read positions that are image "
                         "tokens; means over the examples, and the top tokens at the most important position of "
                         "the first example."),
                   ("table", ["variant", "head", "importance", "RR", "MRR", "RR whole output", "image positions",
                              "top tokens (first example)"],
                    [[name, f"{r['layer']}.{r['head']}", _fmt(r["importance"]), _fmt(r["reciprocal_rank"], 2),
                      _fmt(r["mean_reciprocal_rank"], 2), _fmt(r["output_reciprocal_rank"], 2),
                      _fmt(r["image_share"], 2),
                      " ".join(repr(t) for t in (r["example"]["positions"][0]["top_tokens"]
                                                 if r["example"]["positions"] else []))]
                     for name, rs in reads.items() for r in rs])]
    timing = comparison.get("timing") or {}
    if timing:
        blocks.append(("p", "Cost per probe example (median), against a plain forward pass with logits at the last "
                            "position: " + "; ".join(
                                f"{k}: forward {_fmt(t['forward_s'], 3)} s, importance x{_fmt(t['importance_ratio'], 2)}, "
                                f"reading x{_fmt(t['reading_ratio'], 2)}" for k, t in timing.items()) + "."))
    blocks.append(("figures", head_figures(comparison)))
    return blocks
