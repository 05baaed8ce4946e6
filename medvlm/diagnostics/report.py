"""The diagnostic report of a run: per checkpoint and across checkpoints, as Markdown and HTML.

A *run* is a stage folder (``checkpoint-N/`` with ``metrics.json`` and ``diagnostics/``, the final
``metrics.json``, ``adapter/``, optionally ``diagnostics/`` for the final adapter) or a folder of
stage folders (``stage1/``, ``stage2/``). The report holds, per stage: accuracy / ROUGE-L and
ROI mass per saliency method over training, linearity per layer, which saliency methods the
maps can be trusted with and how stable each verdict is (:data:`medvlm.diagnostics.probe_summary.TRUST_RULE`:
trusted, not trusted or unstable, with the share of bootstrap resamples that trust it), the top heads, the
attention knockout when the probe computed it (:mod:`medvlm.diagnostics.knockout_validation`), the probe
examples, and *indicators*: groups of examples (by modality and by body part) where the model is
likely to fail (rule: :data:`INDICATOR_RULE`).

The report is built once as a list of blocks (headings, paragraphs, tables, figures) and rendered
twice: Markdown (figures as PNG files next to it, or left out for a model card) and one
self-contained HTML page (figures as base64 PNG). Every text is HTML-escaped in both, so a
question holding ``<script>`` shows as text.
"""

from __future__ import annotations

import io
import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np

from medvlm.diagnostics.heads_report import HEADS_FILE, head_blocks, probe_head_blocks
from medvlm.diagnostics.knockout_validation import knockout_blocks
from medvlm.diagnostics.probe_summary import TRUST_RULE, mean_finite
from medvlm.eval.metrics import headline
from medvlm.utils.io import atomic_write_json, atomic_write_text
from medvlm.utils.render import render_html, render_markdown

logger = logging.getLogger(__name__)

ACCURACY_MARGIN = 0.05  # a group this far below the overall closed accuracy is flagged
FLIP_MARGIN = 0.05      # ... or this far above the overall paraphrase flip rate
ENTROPY_MARGIN = 0.25   # nats: the least entropy excess flagged, so near-equal entropies are not noise
INDICATOR_RULE = (f"a group is flagged when its closed accuracy is at least {ACCURACY_MARGIN:.0%} below the "
                  "overall one, when its probe maps (trusted methods, else all) put no more mass on the lesion "
                  "than chance (ROI ratio <= 1), when its mean answer entropy is more than one standard "
                  f"deviation and at least {ENTROPY_MARGIN} nats above the probe-wide mean, or when its paraphrase flip rate is at least "
                  f"{FLIP_MARGIN:.0%} above the overall one (if paraphrase results exist)")
GROUP_FIELDS = ("modality", "body_part")


# -- loading -------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        logger.warning("%s is not valid JSON (%s); left out of the report", path, err)
        return None


def _is_stage(path: Path) -> bool:
    return path.is_dir() and (any(path.glob("checkpoint-*")) or (path / "adapter").is_dir()
                              or (path / "metrics.json").is_file())


def find_stages(run_dir: str | Path) -> list[Path]:
    """The stage folders of a run: the folder itself if it is one, else its stage subfolders."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {run_dir} does not exist")
    if _is_stage(run_dir):
        return [run_dir]
    stages = sorted(p for p in run_dir.iterdir() if _is_stage(p))
    if not stages:
        raise FileNotFoundError(f"{run_dir} holds no training stage (no checkpoint-N/, adapter/ or metrics.json, "
                                "nor subfolders with them); pass the output_dir of a stage or of a demo run")
    return stages


def load_stage(path: Path) -> dict[str, Any]:
    """Checkpoints (sorted by step) with their metrics and diagnostics, and the final ones."""
    points = []
    for ckpt in path.glob("checkpoint-*"):
        m = re.fullmatch(r"checkpoint-(\d+)", ckpt.name)
        if m:
            points.append({"step": int(m.group(1)), "name": ckpt.name, "metrics": _read_json(ckpt / "metrics.json"),
                           "diagnostics": _read_json(ckpt / "diagnostics" / "diagnostics.json"),
                           "diagnostics_dir": ckpt / "diagnostics"})
    points.sort(key=lambda p: p["step"])
    final_metrics = _read_json(path / "metrics.json")
    final_diag = _read_json(path / "diagnostics" / "diagnostics.json")
    if final_metrics is not None or final_diag is not None:
        step = ((final_metrics or {}).get("train") or {}).get("steps") or (points[-1]["step"] if points else 0)
        points.append({"step": int(step), "name": "final", "metrics": final_metrics, "diagnostics": final_diag,
                       "diagnostics_dir": path / "diagnostics"})
    return {"name": path.name, "path": path, "points": points, "metrics": final_metrics}


def load_run(run_dir: str | Path) -> dict[str, Any]:
    """The stages, and the run's head comparison across them when one was saved (``head_comparison.json``)."""
    return {"run_dir": Path(run_dir), "stages": [load_stage(p) for p in find_stages(run_dir)],
            "heads": _read_json(Path(run_dir) / HEADS_FILE)}


def has_diagnostics(run: dict) -> bool:
    return any((p["diagnostics"] or {}).get("status") == "ok" for s in run["stages"] for p in s["points"])


def latest_diagnostics(stage: dict) -> dict | None:
    ok = [p for p in stage["points"] if (p["diagnostics"] or {}).get("status") == "ok"]
    return ok[-1] if ok else None


def latest_metrics(stage: dict) -> dict | None:
    return stage["metrics"] or next((p["metrics"] for p in reversed(stage["points"]) if p["metrics"]), None)


# -- numbers -------------------------------------------------------------------------------------
def _rouge(metrics: dict | None) -> float:
    """Open-question ROUGE-L, NaN when no open question was scored (not a misleading 0)."""
    return _get(metrics, "open", headline("open")) if _get(metrics, "open", "n") > 0 else float("nan")


def _above(diag: dict, method: str) -> str:
    """"k/n": probe examples whose ROI mass on the lesion exceeds chance, of those with a defined map."""
    n = _get(diag, "summary", method, "n")
    k = _get(diag, "summary", method, "n_above_chance")
    return f"{int(k)}/{int(n)}" if np.isfinite(n) and np.isfinite(k) else "n/a"


def _get(d: dict | None, *keys: str) -> float:
    for k in keys:
        d = d.get(k) if isinstance(d, dict) else None
    return float(d) if isinstance(d, (int, float)) and not isinstance(d, bool) else float("nan")


def _verdict(trust: dict) -> str:
    """"trusted", "not trusted", "unstable" or "untested" (a file written before the stability: from ``trusted``)."""
    if trust.get("verdict"):
        return str(trust["verdict"])
    return {True: "trusted", False: "not trusted"}.get(trust.get("trusted"), "untested")


def fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, (int, float)):
        return "NaN" if not np.isfinite(x) else (f"{x:.{digits}f}" if isinstance(x, float) else str(x))
    return str(x)


def _paraphrase_rows(stage_dir: Path) -> list[dict]:
    rows = []
    for path in sorted(stage_dir.rglob("predictions_paraphrase*.jsonl")):
        with open(path, encoding="utf-8") as fh:
            rows += [json.loads(line) for line in fh if line.strip()]
    return rows


def indicators(stage: dict) -> list[dict]:
    """Per modality and body-part group: accuracy, probe ROI ratio and entropy, flip rate, flags."""
    from medvlm.eval.robustness import robustness_scores

    metrics, point = latest_metrics(stage), latest_diagnostics(stage)
    diag = point["diagnostics"] if point else {}
    overall_acc = _get(metrics, "closed", headline("closed"))
    trusted = [m for m, t in (diag.get("trust") or {}).items() if t.get("trusted")]
    methods = trusted or list(diag.get("methods") or [])
    examples = diag.get("examples") or []
    entropies = [e["answer_entropy"] for e in examples if np.isfinite(e.get("answer_entropy", np.nan))]
    ent_cut = (float(np.mean(entropies) + max(np.std(entropies), ENTROPY_MARGIN)) if len(entropies) >= 2
               else float("nan"))
    para = _paraphrase_rows(stage["path"])
    overall_flip = robustness_scores(para, n_resamples=0).get("flip_rate") if para else None
    out = []
    for field in GROUP_FIELDS:
        names = set((metrics or {}).get("slices", {}).get(field, {})) | {e.get(field) for e in examples}
        for name in sorted(n for n in names if n):
            acc = _get(metrics, "slices", field, name, "closed", headline("closed"))
            n_eval = _get(metrics, "slices", field, name, "closed", "n")
            ex = [e for e in examples if e.get(field) == name]
            ratios = [e["methods"][m]["roi_mass_ratio"] for e in ex for m in methods if m in e.get("methods", {})]
            ratio = float(np.nanmean(ratios)) if np.isfinite(ratios).any() else float("nan")
            ent = float(np.mean([e["answer_entropy"] for e in ex])) if ex else float("nan")
            flip = None
            sub = [r for r in para if r.get(field) == name]
            if sub:
                flip = robustness_scores(sub, n_resamples=0).get("flip_rate")
            flags = []
            if np.isfinite(acc) and np.isfinite(overall_acc) and acc <= overall_acc - ACCURACY_MARGIN:
                flags.append(f"closed accuracy {acc:.2f} vs {overall_acc:.2f} overall")
            if np.isfinite(ratio) and ratio <= 1.0:
                flags.append(f"maps miss the lesion (ROI ratio {ratio:.2f})")
            if np.isfinite(ent) and np.isfinite(ent_cut) and ent > ent_cut:
                flags.append(f"uncertain answers (entropy {ent:.2f} nats)")
            if flip is not None and overall_flip is not None and flip >= overall_flip + FLIP_MARGIN:
                flags.append(f"paraphrases flip answers ({flip:.2f} vs {overall_flip:.2f})")
            out.append({"field": field, "group": name, "n_eval": None if np.isnan(n_eval) else int(n_eval),
                        "closed_accuracy": acc, "n_probe": len(ex), "roi_ratio": ratio, "answer_entropy": ent,
                        "flip_rate": flip, "flags": flags, "likely_to_fail": bool(flags)})
    return out


# -- figures -------------------------------------------------------------------------------------
def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def figures(stage: dict) -> dict[str, bytes]:
    """Accuracy over training, ROI ratio per method over training, linearity per layer (PNG bytes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [p for p in stage["points"] if p["name"] != "final"] or stage["points"]
    out = {}
    steps = [p["step"] for p in pts]
    if any(p["metrics"] for p in pts):
        fig, ax = plt.subplots(figsize=(5, 3))
        ax.plot(steps, [_get(p["metrics"], "closed", headline("closed")) for p in pts], "o-", label="closed accuracy")
        ax.plot(steps, [_rouge(p["metrics"]) for p in pts], "s--", label="open ROUGE-L")
        ax.set(xlabel="step", ylim=(0, 1), title=f"{stage['name']}: accuracy over training")
        ax.legend()
        out["accuracy"] = _png(fig)
    diags = [p for p in stage["points"] if (p["diagnostics"] or {}).get("status") == "ok"]
    if diags:
        fig, ax = plt.subplots(figsize=(5, 3))
        methods = sorted({m for p in diags for m in p["diagnostics"].get("summary", {})})
        for m in methods:
            ax.plot([p["step"] for p in diags], [_get(p["diagnostics"], "summary", m, "roi_ratio_mean") for p in diags],
                    "o-", label=m)
        ax.axhline(1.0, color="grey", lw=0.8, ls=":")
        ax.set(xlabel="step", ylabel="ROI mass / chance", title=f"{stage['name']}: saliency on the lesion")
        ax.legend(fontsize=7)
        out["roi"] = _png(fig)
        from matplotlib.ticker import MaxNLocator

        fig, ax = plt.subplots(figsize=(5, 3))
        for p in diags:
            lin = (p["diagnostics"].get("geometry") or {}).get("linearity") or []
            for group, style in (("image", "-"), ("text", "--")):
                ax.plot([s["to"] for s in lin], [_get(s, group) for s in lin], style, marker="o",
                        label=f"{p['name']} {group}")
        ax.set(xlabel="layer (output of transition l-1 -> l)", ylabel="linearity", title="linearity per layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # layers are whole numbers
        ax.legend(fontsize=6)
        out["linearity"] = _png(fig)
    return out


# -- blocks --------------------------------------------------------------------------------------
def _stage_blocks(stage: dict) -> list[tuple]:
    blocks: list[tuple] = [("h2", f"Stage {stage['name']}")]
    pts = stage["points"]
    methods = sorted({m for p in pts for m in ((p["diagnostics"] or {}).get("summary") or {})})
    rows = []
    for p in pts:
        d = p["diagnostics"] or {}
        geo = d.get("geometry") or {}
        rows.append([p["name"], p["step"], fmt(_get(p["metrics"], "closed", headline("closed"))),
                     fmt(_rouge(p["metrics"])),
                     *[f"{fmt(_get(d, 'summary', m, 'roi_mass_mean'))} (x{fmt(_get(d, 'summary', m, 'roi_ratio_mean'), 2)})"
                       for m in methods],
                     fmt(_get(geo, "linearity_image_mean")), fmt(_get(geo, "linearity_text_mean")),
                     d.get("status", "none")])
    blocks += [("h3", "Across checkpoints"),
               ("p", "ROI mass per method: share of the map on the lesion (x ratio to a uniform map)."),
               ("table", ["checkpoint", "step", "closed acc", "open ROUGE-L", *[f"ROI {m}" for m in methods],
                          "linearity img", "linearity txt", "diagnostics"], rows)]
    for p in pts:
        skipped = ((p["diagnostics"] or {}).get("budget") or {}).get("skipped") or []
        if skipped:
            blocks.append(("p", f"{p['name']}: left out for the time budget: "
                                + "; ".join(f"{s['what']} {s.get('name') or s.get('n') or ''}".strip() for s in skipped)))
    blocks.append(("figures", figures(stage)))
    point = latest_diagnostics(stage)
    if point is None:
        return blocks + [("p", "No diagnostics for this stage.")]
    d = point["diagnostics"]
    blocks += [("h3", f"Which saliency methods can be trusted ({point['name']})"), ("p", f"Rule: {TRUST_RULE}.")]
    blocks.append(("table", ["method", "ROI mass", "chance", "ratio", "median ratio", "above chance", "Wilcoxon p",
                             "pointing game", "randomisation rho", "passes", "stability", "verdict", "why"],
                   [[m, fmt(_get(d, "summary", m, "roi_mass_mean")), fmt(_get(d, "summary", m, "roi_chance_mean")),
                     fmt(_get(d, "summary", m, "roi_ratio_mean"), 2), fmt(_get(d, "summary", m, "roi_ratio_median"), 2),
                     _above(d, m), fmt(_get(d, "summary", m, "above_chance_p"), 3),
                     fmt(_get(d, "summary", m, "pointing_game_rate"), 2),
                     fmt(_get(d, "sanity", "summary", m, "spearman_mean"), 2), fmt(t.get("passes_randomization")),
                     fmt(_get(t, "stability"), 2), _verdict(t), t.get("reason", "")]
                    for m, t in (d.get("trust") or {}).items()]))
    blocks += _geometry_blocks(d.get("geometry") or {}, fmt)
    div = [e["paraphrase_divergence"] for e in d.get("examples", []) if (e.get("paraphrase_divergence") or {}).get("n_variants")]
    if div:
        names = sorted({m for x in div for m in x.get("methods", {})})
        blocks += [("h3", "Maps across rewordings of the question"),
                   ("p", "Jensen-Shannon distance (base 2; 0 = the same map) between the map of the question and "
                         "the maps of its rewordings, for the methods read from the shared pass, on the drawn "
                         "examples: a map that moves with the wording explains the words, not the image."),
                   ("table", ["method", "examples", "mean JS distance", "max JS distance"],
                    [[m, sum(1 for x in div if "js_distance_mean" in x["methods"].get(m, {})),
                      fmt(mean_finite([x["methods"][m].get("js_distance_mean") for x in div if m in x["methods"]])),
                      fmt(max((x["methods"][m].get("js_distance_max") or float("nan") for x in div
                               if m in x["methods"]), default=float("nan")))] for m in names])]
    blocks += probe_head_blocks(d, fmt)
    blocks += _neuron_section(stage["path"] / "diagnostics")
    blocks += knockout_blocks(d.get("knockout"))
    blocks += [("h3", "Probe examples"),
               ("table", ["id", "question", "answer", "modality", "body part", "first answer token", "entropy",
                          *[f"ratio {m}" for m in d.get("methods", [])]],
                [[e.get("id"), e.get("question"), e.get("answer"), e.get("modality"), e.get("body_part"),
                  str(e.get("predicted_token") or "").strip(), fmt(e.get("answer_entropy"), 2),
                  *[fmt(_get(e, "methods", m, "roi_mass_ratio"), 2) for m in d.get("methods", [])]]
                 for e in d.get("examples", [])])]
    overlays = {}
    for e in d.get("examples", [])[:1]:
        for m, rel in (e.get("overlays") or {}).items():
            path = point["diagnostics_dir"] / rel
            if path.is_file():
                overlays[f"overlay_{m}"] = path.read_bytes()
    blocks.append(("figures", overlays))
    ind = indicators(stage)
    blocks += [("h3", "Where the model is likely to fail"), ("p", f"Rule: {INDICATOR_RULE}.")]
    flagged = [g for g in ind if g["likely_to_fail"]]
    blocks.append(("p", "Likely to fail: " + ("; ".join(f"{g['field']} = {g['group']} ({', '.join(g['flags'])})"
                                                         for g in flagged) if flagged else "no group flagged.")))
    blocks.append(("table", ["by", "group", "n eval", "closed acc", "n probe", "ROI ratio", "entropy", "flip rate",
                             "flags"],
                   [[g["field"], g["group"], fmt(g["n_eval"]), fmt(g["closed_accuracy"]), g["n_probe"],
                     fmt(g["roi_ratio"], 2), fmt(g["answer_entropy"], 2), fmt(g["flip_rate"]), "; ".join(g["flags"])]
                    for g in ind]))
    return blocks


def _neuron_section(folder: Path) -> list[tuple]:
    """Multimodal and knowledge neurons of the final adapter, when ``diagnostics/run_neurons.py`` wrote them."""
    data = _read_json(folder / "neurons.json")
    if not data:
        return []
    from medvlm.diagnostics.neuron_checks import neuron_blocks

    return neuron_blocks(data, folder)


def _geometry_blocks(geo: dict, fmt) -> list[tuple]:
    """Per layer, image and text tokens apart: linearity to the next layer, then anisotropy,
    intrinsic dimension and the three contextualisation measures (Ethayarajh 2019, baseline-adjusted)."""
    lin = geo.get("linearity") or []
    blocks: list[tuple] = [("h3", "Linearity per layer"),
                           ("table", ["from", "to", "image tokens", "text tokens", "undefined because"],
                            [[s["from"], s["to"], fmt(_get(s, "image")), fmt(_get(s, "text")),
                              "; ".join(f"{k}: {v}" for k, v in s.get("nan_reasons", {}).items())] for s in lin])]
    ctx = {e["layer"]: e for e in geo.get("contextualisation") or []}
    layers = geo.get("layers") or []
    if not layers:
        return blocks
    names = geo.get("layer_names") or [str(e["layer"]) for e in layers]
    head = ["layer"] + [f"{what} ({g})" for what in ("anisotropy", "intrinsic dim.", "self-sim.", "intra-sent.",
                                                       "MEV") for g in ("image", "text")]
    rows = []
    for e in layers:
        c = ctx.get(e["layer"], {})
        rows.append([names[e["layer"]] if e["layer"] < len(names) else e["layer"],
                     *[fmt(_get(e, g, "anisotropy")) for g in ("image", "text")],
                     *[fmt(_get(e, g, "intrinsic_dimension"), 1) for g in ("image", "text")],
                     *[fmt(_get(c, g, key)) for key in ("self_similarity", "intra_sentence", "mev")
                       for g in ("image", "text")]])
    blocks += [("h3", "Contextualisation per layer"),
               ("p", "Anisotropy (share of variance on the first principal component) and intrinsic dimension "
                     "(TwoNN) of the pooled tokens; self-similarity (one token id, or one image grid position, "
                     "across examples), intra-sentence similarity (tokens to their example's mean) and maximum "
                     "explainable variance (Ethayarajh 2019), each minus its value for random tokens of the "
                     "same group: near 0 means context-specific, near 1 - baseline means fixed."),
               ("table", head, rows)]
    return blocks


def report_blocks(run: dict) -> list[tuple]:
    blocks: list[tuple] = [("h1", f"Diagnostic report: {run['run_dir'].name}"),
                           ("p", f"Run folder: {run['run_dir']}. Stages: {', '.join(s['name'] for s in run['stages'])}.")]
    for stage in run["stages"]:
        blocks += _stage_blocks(stage)
    if run.get("heads"):
        blocks += head_blocks(run["heads"])
    return blocks


def write_report(run: dict, output: str | Path) -> dict[str, Any]:
    """Write ``report.md`` (+ ``figures/``), ``report.html`` and ``indicators.json`` into ``output``.

    Returns the paths and the Markdown without figures (for a model card body).
    """
    out = Path(output)
    blocks = report_blocks(run)
    md = atomic_write_text(out / "report.md", render_markdown(blocks, out / "figures"))
    page = atomic_write_text(out / "report.html", render_html(blocks, f"Diagnostic report: {run['run_dir'].name}"))
    ind = atomic_write_json(out / "indicators.json", {s["name"]: indicators(s) for s in run["stages"]})
    return {"markdown": md, "html": page, "indicators": ind,
            "card_markdown": render_markdown(blocks, None, heading_offset=2)}
