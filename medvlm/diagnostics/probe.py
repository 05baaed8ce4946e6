"""Run the diagnostics on a small fixed probe set of phantom lesions: ``diagnostics.json`` + overlays.

The probe set is chosen deterministically from the records (see :func:`select_probe_records`), so
every checkpoint of a run is probed on the same questions and the numbers are comparable over
training. For each probe example, at the model's *predicted first answer token* (the last prompt
position; no answer is teacher-forced), one shared capture pass keeps the residual stream of every
layer (the geometry's input) and whatever the chosen methods read from it (head-mean attention for
``attention`` and ``rollout``, the residual stream for ``logit_lens``); then every registered
method (:mod:`medvlm.diagnostics.methods`) gives its map, the methods with passes of their own
(``gradcam``, ``logprob``, ``occlusion``, the faithful reference) after the shared pass is freed.

Each map is scored against the lesion mask with :func:`~medvlm.diagnostics.attention_quality.map_summary`
(ROI mass, chance, ratio, pointing game, focus, gini). Geometry pools the hidden states of all
probe examples (so that tokens outnumber dimensions and linearity is not trivially 1). The
parameter-randomisation test (top layer of both towers re-initialised) runs on the first
``sanity_examples`` examples. A method is *trusted* when its ROI mass beats chance consistently
across the examples (one-sided Wilcoxon, p < 0.05, at least 5 examples) and it passes the
randomisation test (see :data:`~medvlm.diagnostics.probe_summary.TRUST_RULE`); the verdict is given
only when it holds in most bootstrap resamples of the probe examples (else it is "unstable").

Everything undefined is NaN (or None) with a reason; nothing is dropped silently.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medvlm.diagnostics.attention_quality import paraphrase_divergence, score_map
from medvlm.diagnostics.capture import AttentionNotEagerError, Cache, Example, capture, prepare_example
from medvlm.diagnostics.knockout_validation import knockout_validation
from medvlm.diagnostics.methods import Context, registered
from medvlm.diagnostics.methods.logit_lens import LogitLens, write_lens_html
from medvlm.diagnostics.overlay import enlarge, save_overlay
from medvlm.diagnostics.probe_summary import (
    TRUST_RULE,
    mean_finite,
    stability_settings,
    summarize_methods,
    summarize_sanity,
    top_heads,
    trust_verdict,
)
from medvlm.diagnostics.sanity import randomization_test, sanity_methods
from medvlm.eval.paraphrase import paraphrases
from medvlm.models.base import ModelFamily
from medvlm.records import parse_meta
from medvlm.utils.images import read_mask
from medvlm.utils.io import atomic_write_json

logger = logging.getLogger(__name__)

#: The randomisation test re-initialises the top layer of both towers: a VLM computes its image
#: evidence in the vision tower (the demo's tower is pre-trained on per-patch lesion labels), so a
#: test that leaves the whole tower intact would flag an output-faithful map such as occlusion,
#: whose lesion evidence survives a new top decoder layer through the residual stream. Measured on
#: the demo's stage-2 adapter (6 examples, Spearman rho > 0.8 counts): occlusion 3/6 flagged with the
#: decoder's top layer only, 0/6 with both towers; the log-prob and logit-lens readouts stay flagged.
SANITY_TOWER = "both"
#: Question types asked about the lesion, preferred for the probe (most image-dependent first).
LESION_QTYPES = ("location", "finding", "presence", "side", "finding_yn", "side_yn")
# -- the probe set -------------------------------------------------------------------------------
def _meta(rec: dict) -> dict:
    return parse_meta(rec.get("meta"))


def select_probe_records(records: Any, max_examples: int = 8) -> tuple[list[dict], list[dict]]:
    """A fixed, diverse set of records with a lesion mask: ``(chosen, skipped)``.

    Records without ``roi`` are not candidates. Among the others, one question per image (the
    first of :data:`LESION_QTYPES` present, else the first question), then round-robin over
    (modality, body_part) groups in record order, so the probe spans the groups. ``skipped`` lists
    candidates whose mask file is missing, with the reason.
    """
    by_image: dict[str, list[dict]] = {}
    skipped: list[dict] = []
    for rec in records:
        rec = dict(rec)
        if not rec.get("roi"):
            continue
        if not Path(rec["roi"]).is_file():
            skipped.append({"id": rec.get("id"), "reason": f"mask {rec['roi']} does not exist"})
            continue
        by_image.setdefault(str(rec.get("image")), []).append(rec)
    rank = {q: i for i, q in enumerate(LESION_QTYPES)}
    groups: dict[tuple[str, str], list[dict]] = {}
    for recs in by_image.values():
        best = min(recs, key=lambda r: rank.get(_meta(r).get("qtype"), len(rank)))
        groups.setdefault((str(best.get("modality", "")), str(best.get("body_part", ""))), []).append(best)
    chosen: list[dict] = []
    queues = [list(v) for v in groups.values()]
    while len(chosen) < max_examples and any(queues):
        for q in queues:
            if q and len(chosen) < max_examples:
                chosen.append(q.pop(0))
    return chosen, skipped


# -- hidden states for the geometry ---------------------------------------------------------------
def _EMBED_AND_RESID(name: str) -> bool:  # noqa: N802 - a names_filter constant
    """Keep every layer's output and only layer 0's input (the embeddings)."""
    return not name.endswith("resid_pre") or name == "blocks.0.resid_pre"


def _hidden_from_cache(cache: Cache, input_ids: torch.Tensor, max_tokens: int = 256) -> dict:
    """What the geometry keeps of one example: the embeddings and each decoder layer's output at the
    kept positions ([n, D] numpy), which of them are image tokens, their token ids and their index in
    the image grid (-1 for text). Every text token is kept, and image tokens at a fixed stride chosen
    so that at most ``max_tokens`` remain: the same grid positions in every image (the
    contextualisation measures compare one position across images), and memory bounded by the
    budget, not by the image's token count."""
    span = cache.image_span
    n_img = span.end - span.start
    text = [p for p in range(cache.seq_len) if not span.start <= p < span.end]
    stride = max(1, -(-n_img // max(1, max_tokens - len(text))))
    keep = np.array(sorted(text + list(range(span.start, span.end, stride))))
    rows = torch.as_tensor(keep)
    layers = [cache["resid_pre", 0][0]] + [cache["resid_post", i][0] for i in range(cache.n_layers)]
    is_image = (keep >= span.start) & (keep < span.end)
    return {"layers": [h.index_select(0, rows.to(h.device)).float().cpu().numpy() for h in layers],
            "image_mask": is_image, "token_ids": input_ids.reshape(-1).cpu().numpy()[keep],
            "image_index": np.where(is_image, keep - span.start, -1)}


def hidden_states(model, processor, family: ModelFamily, rec: dict, max_tokens: int = 256) -> dict:
    """A hidden-states-only capture pass over one record (extra geometry examples)."""
    ex = prepare_example(model, processor, family, rec["image"], rec["question"])
    _, cache = capture(model, family, ex.inputs, attention=False, hidden_states=True, resid_pre=True,
                       names_filter=_EMBED_AND_RESID, logits_positions=[-1])  # the logits are not read
    return _hidden_from_cache(cache, ex.inputs["input_ids"], max_tokens)


def geometry_records(records, exclude_images: set[str], n: int) -> list[dict]:
    """Up to ``n`` records, one per image not in ``exclude_images``, in record order; masks not needed."""
    out, seen = [], set(exclude_images)
    for rec in records:
        if len(out) >= n:
            break
        if str(rec.get("image")) in seen:
            continue
        seen.add(str(rec.get("image")))
        out.append(dict(rec))
    return out


# -- one example ---------------------------------------------------------------------------------
def _first_answer_token(model, processor, family, rec: dict) -> int | None:
    try:
        ex = prepare_example(model, processor, family, rec["image"], rec["question"], rec["answer"])
    except ValueError:
        return None
    return ex.target_ids[0]


def probe_example(model, processor, family: ModelFamily, rec: dict, names: Sequence[str],
                  timings: Counter, clock: Callable[[], float] = time.monotonic, geometry_tokens: int = 256
                  ) -> tuple[dict, dict[str, np.ndarray], Example, dict | None]:
    """Maps and scores of one record: ``(row, maps, example, hidden)``; ``hidden`` holds the
    per-layer hidden states [S, D] and the image-token mask for the geometry (None on failure).

    One shared capture pass (the hidden states for the geometry, and what the chosen methods read
    from it: head-mean attention, the residual stream), then each registered method in turn; a
    method that fails is recorded in ``errors`` and the others still run."""
    meta = _meta(rec)
    row: dict[str, Any] = {"id": rec.get("id"), "question": rec.get("question"), "answer": rec.get("answer"),
                           "qtype": meta.get("qtype"), "modality": rec.get("modality"),
                           "body_part": rec.get("body_part"), "finding": meta.get("finding"),
                           "side": meta.get("side"), "methods": {}, "errors": {}}
    t = clock()
    ex = prepare_example(model, processor, family, rec["image"], rec["question"])
    mask = read_mask(rec["roi"])
    chosen = registered(names)
    try:
        family.check_eager(model)
        eager = True
    except AttentionNotEagerError as err:
        eager = False
        row["errors"].update({m.name: str(err) for m in chosen if m.eager})
        chosen = [m for m in chosen if not m.eager]
    kinds = {"hidden_states", "resid_pre"} | {k for m in chosen for k in m.shared}
    ctx = Context(model, processor, family, ex, kinds=kinds if eager else kinds - {"attention_mean"},
                  names_filter=_EMBED_AND_RESID)
    logits = ctx.logits[0]
    logp = torch.log_softmax(logits, -1)
    pred = ctx.target_id
    first = _first_answer_token(model, processor, family, rec)
    row.update(predicted_token_id=pred, predicted_token=processor.tokenizer.decode([pred]),
               answer_entropy=float(-(logp.exp() * logp).sum()),
               first_token_correct=None if first is None else bool(pred == first))
    timings["capture"] += clock() - t
    maps: dict[str, np.ndarray] = {}
    hidden = None
    for method in sorted(chosen, key=lambda m: (not m.shared, m.order)):  # shared-pass readers first
        if hidden is None and not method.shared:
            hidden = _hidden_from_cache(ctx.cache, ex.inputs["input_ids"], geometry_tokens)
            ctx.release()  # the methods left run passes of their own
        t = clock()
        try:
            result = method.run(ctx)
            maps[method.name] = result.map
            row.update(result.row)
            if result.data is not None:
                ex.meta[method.name] = result.data  # e.g. the logit lens, for its page
        except (ValueError, RuntimeError, KeyError) as err:
            logger.warning("probe %s: method %s failed: %s", rec.get("id"), method.name, err)
            row["errors"][method.name] = str(err)
        timings[method.name] += clock() - t
    if hidden is None:
        hidden = _hidden_from_cache(ctx.cache, ex.inputs["input_ids"], geometry_tokens)
        ctx.release()
    for name, grid in maps.items():
        row["methods"][name] = score_map(grid, mask)
    for name in names:
        if name not in row["methods"]:
            row["methods"][name] = {"roi_mass": float("nan"), "roi_mass_ratio": float("nan"), "pointing_game": None,
                                    "nan_reasons": {"all": row["errors"].get(name, "method not run")}}
    return row, maps, ex, hidden


def paraphrase_consistency(model, processor, family: ModelFamily, rec: dict, maps: dict[str, np.ndarray],
                           max_variants: int = 3) -> dict[str, Any]:
    """Do the maps move when only the wording does? For the methods read from the shared capture
    pass (one forward per rewording), the Jensen-Shannon divergence between the map of the question
    and the maps of up to ``max_variants`` rewordings (:mod:`medvlm.eval.paraphrase`), per method;
    ``{"n_variants": 0, "reason": ...}`` when the question has no rewording."""
    variants = paraphrases(str(rec.get("question", "")), _meta(rec).get("qtype")) or []
    variants = variants[:max_variants]
    if not variants:
        return {"n_variants": 0, "reason": "no rewording of this question is known"}
    shared = [m for m in registered(list(maps)) if m.shared and m.name in maps]
    out: dict[str, Any] = {"n_variants": len(variants), "methods": {}}
    for_method: dict[str, list[np.ndarray]] = {m.name: [np.clip(maps[m.name], 0, None)] for m in shared}
    for question in variants:
        ex = prepare_example(model, processor, family, rec["image"], question)
        ctx = Context(model, processor, family, ex, kinds={k for m in shared for k in m.shared})
        for m in shared:
            try:
                for_method[m.name].append(np.clip(m.run(ctx).map, 0, None))
            except (ValueError, RuntimeError, KeyError) as err:
                out["methods"][m.name] = {"reason": str(err)}
        ctx.release()
    for name, grids in for_method.items():
        if name not in out["methods"]:
            d = paraphrase_divergence(grids)
            out["methods"][name] = {k: d.get(k) for k in ("js_distance_mean", "js_distance_max", "n_pairs")}
    return out


def _geometry(hidden: list[dict]) -> dict:
    """Pool the probe examples' kept hidden states and run :func:`layerwise_geometry` on them, and the
    contextualisation measures (self-similarity, intra-sentence similarity, maximum explainable
    variance per layer, image and text tokens apart) on the examples one by one."""
    from medvlm.diagnostics.geometry import contextualisation, layerwise_geometry

    n_layers = len(hidden[0]["layers"])
    geo = layerwise_geometry([np.concatenate([h["layers"][li] for h in hidden]) for li in range(n_layers)],
                             np.concatenate([h["image_mask"] for h in hidden]))
    geo["layer_names"] = ["embeddings"] + [f"decoder.{i}" for i in range(n_layers - 1)]
    for group in ("image", "text"):
        geo[f"linearity_{group}_mean"] = mean_finite([s.get(group) for s in geo["linearity"]])
    geo["contextualisation"] = contextualisation(hidden)
    return geo


# -- the probe -----------------------------------------------------------------------------------
def run_probe(model, processor, family: ModelFamily, records: Any, out_dir: str | Path, *,
              methods: Sequence[str] | None = None, geometry: bool = True, max_examples: int = 8,
              sanity_examples: int = 2, overlay_examples: int = 2, time_budget: float | None = None,
              clock: Callable[[], float] = time.monotonic, geometry_examples: int = 24, geometry_tokens: int = 256,
              seed: int = 0, knockout: bool = False,
              extra: dict | None = None) -> dict:
    """Probe ``model`` on up to ``max_examples`` lesion records; write ``out_dir/diagnostics.json``.

    ``records``: unified records (a ``datasets.Dataset`` or dicts) with ``roi`` mask paths.
    ``geometry_examples`` more records (any, masks not needed) get a hidden-states-only pass for the
    geometry, so that pooled tokens outnumber the model width (else linearity is NaN).
    ``time_budget`` (seconds, optional): before each further example and before the randomisation
    test the measured cost so far is extrapolated; what would overrun is skipped and listed under
    ``"skipped"`` with the reason. ``knockout``: also the attention-knockout curves and lesion-vs-mirror
    test over the probed examples (:mod:`~medvlm.diagnostics.knockout_validation`; 3 x layers + 3
    forwards per example) under ``"knockout"``: the final probe asks for it, the per-checkpoint probe
    does not (the per-cell knockout map, a registered method, runs there within the budget; the
    sweep grows with the depth and is read once, on the final adapter). ``extra`` is merged into the
    JSON (e.g. the budget plan).
    Returns the JSON dict (see the module docstring); raises ValueError when no record has a mask.
    """
    from tqdm.auto import tqdm

    names = [m.name for m in registered(methods)]  # registered order; an unknown name: did-you-mean
    out_dir = Path(out_dir)
    start = clock()
    chosen, skipped = select_probe_records(records, max_examples)
    if not chosen:
        raise ValueError("no record has a lesion mask ('roi' path) to score saliency against; probe records must "
                         "include lesions (e.g. the phantom's validation split)")
    timings: Counter = Counter()
    rows, hidden, tested = [], [], []
    for i, rec in enumerate(tqdm(chosen, desc="probe", unit="example", disable=None)):
        elapsed = clock() - start
        if time_budget is not None and rows and elapsed + elapsed / len(rows) > time_budget:
            skipped += [{"id": r.get("id"), "reason": f"time budget {time_budget:.3g}s: {elapsed:.3g}s spent"}
                        for r in chosen[i:]]
            break
        try:
            row, maps, ex, hid = probe_example(model, processor, family, rec, names, timings, clock, geometry_tokens)
        except (ValueError, FileNotFoundError, RuntimeError, KeyError) as err:
            logger.warning("probe: record %s skipped: %s", rec.get("id"), err)
            skipped.append({"id": rec.get("id"), "reason": str(err)})
            continue
        if len(rows) < overlay_examples:
            row["overlays"] = {}
            for name, grid in maps.items():
                rel = f"overlays/{len(rows):02d}_{name}.png"
                try:
                    save_overlay(out_dir / rel, enlarge(ex.image), np.clip(grid, 0, None),
                                 outline=read_mask(rec["roi"]))
                    row["overlays"][name] = rel
                except ValueError as err:
                    row["errors"][f"overlay_{name}"] = str(err)
            if isinstance(ex.meta.get("logit_lens"), LogitLens):  # the interactive page (hover a patch)
                rel = f"overlays/{len(rows):02d}_logit_lens.html"
                write_lens_html(out_dir / rel, ex.meta["logit_lens"], enlarge(ex.image), ex.question)
                row["overlays"]["logit_lens_page"] = rel
            row["paraphrase_divergence"] = paraphrase_consistency(model, processor, family, rec, maps)
        ex.meta.clear()
        if len(tested) < sanity_examples:
            tested.append((row["id"], ex))
        rows.append(row)
        hidden.append(hid)
    result: dict[str, Any] = {"status": "ok", "methods": names,
                              "method_titles": {m.name: m.title for m in registered(names)}, "trust_rule": TRUST_RULE, "examples": rows,
                              "n_examples": len(rows), "skipped": skipped,
                              "settings": {"max_examples": max_examples, "sanity_examples": sanity_examples,
                                           "geometry": geometry, "geometry_extra_examples": geometry_examples,
                                           "geometry_tokens_per_example": geometry_tokens,
                                           "time_budget_s": time_budget, "seed": seed, "knockout": knockout}}
    result["summary"] = summarize_methods(rows, names, seed=seed)
    result["top_heads"] = top_heads(rows)  # the paper's head importance; the image-position sum apart
    result["image_top_heads"] = top_heads(rows, key="image_head_scores")
    lens_counts: Counter = Counter()
    for r in rows:
        lens_counts.update(r.get("logit_lens", {}).get("best_layer_counts", {}))
    result["logit_lens_best_layers"] = dict(sorted(lens_counts.items(), key=lambda kv: int(kv[0])))
    if knockout and rows:  # within what is left of the budget; records left out are listed in it
        t, probed = clock(), {r["id"] for r in rows}
        left = None if time_budget is None else max(time_budget - (t - start), 0.0)
        result["knockout"] = knockout_validation(model, processor, family, [r for r in chosen if r.get("id") in probed],
                                                 clock=clock, time_budget=left)
        timings["knockout_validation"] += clock() - t  # "knockout" is the per-cell map's (a method)

    # Geometry: hidden states of the shared capture pass, pooled over the examples, plus
    # hidden-states-only passes over more records so that tokens outnumber dimensions
    t = clock()
    if geometry and geometry_examples and rows:
        extra_recs = geometry_records(records, {str(r.get("image")) for r in chosen}, geometry_examples)
        for i, rec in enumerate(extra_recs):
            elapsed = clock() - start
            if time_budget is not None and i and elapsed + (clock() - t) / i > time_budget:
                skipped.append({"what": "geometry_examples", "n": len(extra_recs) - i,
                                "reason": f"time budget {time_budget:.3g}s: {elapsed:.3g}s spent"})
                break
            try:
                hidden.append(hidden_states(model, processor, family, rec, geometry_tokens))
            except (ValueError, FileNotFoundError, RuntimeError) as err:
                skipped.append({"id": rec.get("id"), "reason": f"geometry pass failed: {err}"})
    result["geometry"] = None
    if geometry and hidden:
        try:
            result["geometry"] = _geometry(hidden)
        except ValueError as err:
            result["geometry_error"] = str(err)
    timings["geometry"] += clock() - t
    del hidden

    # Sanity: parameter randomisation on the first examples, if the budget allows
    sanity_rows: list[dict] = []
    per_example = (clock() - start) / max(len(rows), 1)
    for rid, ex in tested:
        elapsed = clock() - start
        if time_budget is not None and elapsed + 2 * per_example > time_budget:
            skipped.append({"id": rid, "reason": f"randomisation test skipped: time budget {time_budget:.3g}s, "
                                                 f"{elapsed:.3g}s spent"})
            continue
        t = clock()
        rep = randomization_test(model, family, ex, sanity_methods(names), top_k=1, tower=SANITY_TOWER, seed=seed)
        sanity_rows.append({"id": rid, "tower": rep.tower, "top_k": rep.top_k, "threshold": rep.threshold,
                            "scores": rep.scores})
        timings["sanity"] += clock() - t
    result["sanity"] = {"examples": sanity_rows, "summary": summarize_sanity(sanity_rows, list(sanity_methods(names)))}
    result["trust"] = trust_verdict(result["summary"], result["sanity"]["summary"] if sanity_rows else None)
    result["trust_stability"] = stability_settings(seed=seed)
    result["timings"] = {**{k: float(v) for k, v in timings.items()}, "total": float(clock() - start),
                         "n_examples": len(rows), "n_sanity": len(sanity_rows)}
    result.update(extra or {})
    atomic_write_json(out_dir / "diagnostics.json", result)
    return result
