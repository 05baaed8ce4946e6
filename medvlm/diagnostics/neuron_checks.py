"""Causal checks of neuron sets, and the neuron diagnostics over the probe examples (``neurons.json``).

A neuron set found by a score is only *found* when editing it moves the answer (the checks of
Dai et al. 2022, §4, and Schwettmann et al. 2023, §5, against a control of random units):

- **suppression**: zeroing the set's units (at the positions where they were scored: the image
  positions for multimodal neurons, the answer-predicting position for knowledge neurons) lowers
  p(answer) more than zeroing as many random units of the same layers (each set unit replaced by a
  random other unit of its layer; ``draws`` draws averaged per example);
- **amplification**: doubling the set's activations (Dai et al.'s "enhance", ×2) raises p(answer)
  more than doubling the random units.

Each is a paired test over the probe examples on the relative change Δ = (p̃ − p) / p: one-sided
Wilcoxon signed-rank on Δ_set − Δ_random, with the effect sizes (median Δ of the set and of the
control, median paired difference, share of examples in the expected direction) and n. A set
passes (:data:`CHECK_RULE`) when both tests are significant and the set moves p(answer) in the
expected direction in the median; otherwise it is reported as failing its check, never as found.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import wilcoxon

from medvlm.diagnostics.capture import Example, prepare_example
from medvlm.diagnostics.neurons import (
    NeuronSet,
    Unit,
    UnitEdit,
    answer_probs,
    check_units,
    d_mlp,
    knowledge_neurons,
    multimodal_neurons,
)
from medvlm.diagnostics.overlay import enlarge, save_overlay
from medvlm.diagnostics.probe import select_probe_records
from medvlm.eval.paraphrase import paraphrases
from medvlm.models.base import ModelFamily
from medvlm.records import parse_meta
from medvlm.utils.images import read_mask
from medvlm.utils.io import atomic_write_json

logger = logging.getLogger(__name__)

ALPHA = 0.05
KINDS = ("multimodal", "knowledge")
AMPLIFY = 2.0  # Dai et al.: "enhance" doubles the knowledge neurons' activations
CHECK_RULE = (f"a neuron set passes its causal check when, over the probe examples, zeroing it lowers p(answer) "
              f"more than zeroing as many random units of the same layers AND multiplying it by {AMPLIFY:g} raises "
              f"p(answer) more than multiplying the random units (one-sided Wilcoxon signed-rank tests on the paired "
              f"relative changes, each p < {ALPHA}, at least 5 examples), with the median relative change of the set "
              "below 0 under suppression and above 0 under amplification")


# -- one example -------------------------------------------------------------------------------------
def random_units(units: Sequence[Unit], width: int, rng: np.random.Generator) -> list[Unit]:
    """For each unit, a random other unit of its layer: none of ``units``, no unit twice."""
    taken = set(units)
    out = []
    for layer, _ in units:
        free = [u for u in range(width) if (layer, u) not in taken]
        if not free:
            raise ValueError(f"layer {layer} has no unit left to draw a random control from ({width} units)")
        pick = (layer, int(rng.choice(free)))
        taken.add(pick)
        out.append(pick)
    return out


def unit_edits(units: Sequence[Unit], positions: Sequence[int], factor: float) -> list[UnitEdit]:
    """One :class:`UnitEdit` per layer of ``units``."""
    by_layer: dict[int, list[int]] = defaultdict(list)
    for layer, u in units:
        by_layer[layer].append(u)
    return [UnitEdit(layer, tuple(us), tuple(positions), factor) for layer, us in sorted(by_layer.items())]


def causal_effects(model: torch.nn.Module, family: ModelFamily, example: Example, target_id: int,
                   units: Sequence[Unit], positions: Sequence[int], *, draws: int = 5,
                   rng: np.random.Generator | None = None, batch: int = 16) -> dict[str, Any]:
    """Relative changes of p(target) when ``units`` (and ``draws`` random controls) are zeroed or doubled at
    ``positions``: ``suppress_top``, ``suppress_random`` (mean over draws), ``amplify_top``, ``amplify_random``."""
    if not units:
        raise ValueError("the neuron set is empty: there is nothing to edit")
    if draws < 1:
        raise ValueError(f"draws={draws}; the random control needs at least 1 draw")
    units = check_units(model, family, units)  # a layer or unit that does not exist is named
    rng = rng or np.random.default_rng(0)
    controls = [random_units(units, d_mlp(model, family), rng) for _ in range(draws)]
    rows = [[], unit_edits(units, positions, 0.0), unit_edits(units, positions, AMPLIFY)]
    rows += [unit_edits(c, positions, 0.0) for c in controls] + [unit_edits(c, positions, AMPLIFY) for c in controls]
    p = answer_probs(model, family, example, target_id, rows, batch)
    rel = (p - p[0]) / p[0]
    return {"p": float(p[0]), "n_units": len(units), "draws": draws,
            "suppress_top": float(rel[1]), "amplify_top": float(rel[2]),
            "suppress_random": float(rel[3:3 + draws].mean()), "amplify_random": float(rel[3 + draws:].mean()),
            "suppress_random_draws": rel[3:3 + draws].tolist(), "amplify_random_draws": rel[3 + draws:].tolist()}


# -- over the examples -------------------------------------------------------------------------------
def _median(x: np.ndarray) -> float:
    return float(np.median(x)) if x.size else float("nan")


def paired_test(top: Sequence[float], random: Sequence[float], alternative: str) -> dict[str, Any]:
    """One-sided Wilcoxon signed-rank test of top − random (``"less"``: the set lowers p more), effect sizes."""
    t, r = np.asarray(top, float), np.asarray(random, float)
    keep = np.isfinite(t) & np.isfinite(r)
    t, r = t[keep], r[keep]
    d = t - r
    sign = -1.0 if alternative == "less" else 1.0
    out = {"n": int(d.size), "median_top": _median(t), "median_random": _median(r), "median_difference": _median(d),
           "share_beyond_random": float(np.mean(sign * d > 0)) if d.size else float("nan"),
           "share_top_expected": float(np.mean(sign * t > 0)) if d.size else float("nan"),
           "p_value": float("nan"), "reason": ""}
    if d.size < 5:
        out["reason"] = f"{d.size} example(s): at least 5 are needed for p < {ALPHA}"
    elif not np.any(d):
        out["reason"] = "the set and the random units change p(answer) identically on every example"
    else:
        out["p_value"] = float(wilcoxon(d, alternative=alternative, zero_method="wilcox").pvalue)
    return out


def check_verdict(effects: Sequence[dict]) -> dict[str, Any]:
    """Both paired tests over the examples' :func:`causal_effects` and the verdict (:data:`CHECK_RULE`)."""
    sup = paired_test([e["suppress_top"] for e in effects], [e["suppress_random"] for e in effects], "less")
    amp = paired_test([e["amplify_top"] for e in effects], [e["amplify_random"] for e in effects], "greater")
    why = []
    for name, test, direction in (("suppression", sup, "lowers"), ("amplification", amp, "raises")):
        if not test["p_value"] < ALPHA:
            why.append(f"{name} {direction} p(answer) no more than random units (p = {test['p_value']:.3g}"
                       + (f"; {test['reason']}" if test["reason"] else "") + ")")
        elif not (test["median_top"] < 0 if name == "suppression" else test["median_top"] > 0):
            why.append(f"{name} does not {direction[:-1]} p(answer) in the median ({test['median_top']:+.3g})")
    return {"suppress": sup, "amplify": amp, "passes": not why, "n": sup["n"],
            "verdict": "passes" if not why else "fails: " + "; ".join(why)}


def unit_counts(rows: Sequence[dict], kind: str, limit: int = 10) -> list[dict]:
    """Units of ``kind`` ("multimodal" / "knowledge") over the examples, by how many examples' sets hold
    them, then by their mean score: layer, unit, examples, mean score, decoded tokens."""
    seen: dict[Unit, list] = defaultdict(list)
    tokens: dict[Unit, list[str]] = {}
    for r in rows:
        for u in (r.get(kind) or {}).get("units") or []:
            seen[(u["layer"], u["unit"])].append(u["score"])
            tokens[(u["layer"], u["unit"])] = u["tokens"]
    order = sorted(seen, key=lambda u: (-len(seen[u]), -float(np.mean(seen[u])), u))[:limit]
    return [{"layer": u[0], "unit": u[1], "examples": len(seen[u]), "mean_score": float(np.mean(seen[u])),
             "tokens": tokens[u]} for u in order]


# -- the probe ---------------------------------------------------------------------------------------------
def _target(model, processor, family: ModelFamily, rec: dict, question: str) -> int:
    return prepare_example(model, processor, family, rec["image"], question, str(rec["answer"])).target_ids[0]


def _forward_seconds(model, family: ModelFamily, ex: Example, target: int, clock: Callable[[], float]) -> float:
    """The fastest of three plain forward passes (logits at the answer position): the cost unit."""
    times = []
    for _ in range(3):
        t = clock()
        answer_probs(model, family, ex, target, [[]])
        times.append(clock() - t)
    return min(times)


def _knowledge(model, processor, family, rec: dict, ex: Example, target: int, steps: int, memory_mb: float,
               layers) -> NeuronSet:
    variants = paraphrases(str(rec["question"]), parse_meta(rec.get("meta")).get("qtype")) or []
    exs = [ex] + [prepare_example(model, processor, family, rec["image"], v) for v in variants]
    targets = [target] + [_target(model, processor, family, rec, v) for v in variants]
    return knowledge_neurons(model, family, exs, targets, processor.tokenizer, steps=steps, memory_mb=memory_mb,
                             layers=layers)


def _set_row(ns: NeuronSet, seconds: float) -> dict[str, Any]:
    return {"method": ns.method, "target_token": ns.target_token, "units": ns.table(), "seconds": seconds,
            **{k: v for k, v in ns.extra.items() if k not in ("per_prompt", "activations")}}


def neuron_example(model, processor, family: ModelFamily, rec: dict, *, top: int = 10, method: str = "direct",
                   knowledge: bool = True, steps: int = 20, draws: int = 5, seed: int = 0, memory_mb: float = 2048,
                   layers: Sequence[int] | None = None, clock: Callable[[], float] = time.perf_counter
                   ) -> tuple[dict[str, Any], NeuronSet]:
    """Multimodal and knowledge neurons of one record, their causal effects and costs (a JSON row), and
    the multimodal set (its maps). The answer is the record's first answer token."""
    ex = prepare_example(model, processor, family, rec["image"], str(rec["question"]))
    target = _target(model, processor, family, rec, str(rec["question"]))
    rng = np.random.default_rng(seed)
    fwd = _forward_seconds(model, family, ex, target, clock)
    row: dict[str, Any] = {"id": rec.get("id"), "question": rec.get("question"), "answer": rec.get("answer"),
                           "forward_s": fwd, "errors": {}}
    t = clock()
    mm = multimodal_neurons(model, family, ex, processor.tokenizer, target_id=target, method=method, top=top,
                            layers=layers)
    row["multimodal"] = _set_row(mm, clock() - t)
    row.update(target_token=mm.target_token, p_answer=mm.extra["p"])
    t = clock()
    row["multimodal"]["check"] = causal_effects(model, family, ex, target, mm.units, mm.positions, draws=draws, rng=rng)
    row["multimodal"]["check_seconds"] = clock() - t
    if knowledge:
        try:
            t = clock()
            kn = _knowledge(model, processor, family, rec, ex, target, steps, memory_mb, layers)
            row["knowledge"] = _set_row(kn, clock() - t)
            if kn.units:
                t = clock()
                row["knowledge"]["check"] = causal_effects(model, family, ex, target, kn.units, kn.positions,
                                                           draws=draws, rng=rng)
                row["knowledge"]["check_seconds"] = clock() - t
            else:
                row["errors"]["knowledge_check"] = "no unit is shared by enough rewordings: nothing to edit"
        except ValueError as err:
            row["errors"]["knowledge"] = str(err)
    return row, mm


def _cost(rows: Sequence[dict], kind: str) -> dict[str, float]:
    """Median seconds per example of finding and of checking a set, as multiples of a plain forward pass."""
    out = {}
    for what, key in (("find", "seconds"), ("check", "check_seconds")):
        ratios = [r[kind][key] / r["forward_s"] for r in rows if key in (r.get(kind) or {})]
        out[f"{what}_x_forward"] = _median(np.asarray(ratios))
    return out


def run_neurons(model, processor, family: ModelFamily, records: Any, out_dir: str | Path, *, max_examples: int = 8,
                top: int = 10, method: str = "direct", knowledge: bool = True, steps: int = 20, draws: int = 5,
                seed: int = 0, memory_mb: float = 2048, layers: Sequence[int] | None = None,
                clock: Callable[[], float] = time.perf_counter) -> dict[str, Any]:
    """Neuron diagnostics on the probe examples (:func:`~medvlm.diagnostics.probe.select_probe_records`):
    ``out_dir/neurons.json`` and the overlay of the first example's top multimodal neuron
    (``out_dir/neurons/``). Returns the JSON dict."""
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    chosen, skipped = select_probe_records(records, max_examples)
    if not chosen:
        raise ValueError("no record has a lesion mask ('roi'): the neuron probe uses the probe examples "
                         "(e.g. the phantom's validation split)")
    rows, overlay = [], None
    for i, rec in enumerate(tqdm(chosen, desc="neurons", unit="example", disable=None)):
        try:
            row, mm = neuron_example(model, processor, family, rec, top=top, method=method, knowledge=knowledge,
                                     steps=steps, draws=draws, seed=seed + i, memory_mb=memory_mb, layers=layers,
                                     clock=clock)
        except (ValueError, KeyError, FileNotFoundError) as err:
            logger.warning("neurons: record %s skipped: %s", rec.get("id"), err)
            skipped.append({"id": rec.get("id"), "reason": str(err)})
            continue
        if overlay is None and mm.maps:
            rel = "neurons/00_top_multimodal_neuron.png"
            ex_image = prepare_example(model, processor, family, rec["image"], str(rec["question"])).image
            save_overlay(out_dir / rel, enlarge(ex_image), mm.maps[0], outline=read_mask(rec["roi"]))
            layer, unit = mm.units[0]
            overlay = {"path": rel, "id": rec.get("id"), "layer": layer, "unit": unit, "tokens": mm.tokens[0],
                       "map": mm.maps[0].tolist()}
        rows.append(row)
    checks = {kind: check_verdict([r[kind]["check"] for r in rows if "check" in (r.get(kind) or {})])
              for kind in KINDS if kind == "multimodal" or knowledge}
    result = {"status": "ok", "check_rule": CHECK_RULE, "n_examples": len(rows), "examples": rows,
              "skipped": skipped, "checks": checks, "overlay": overlay,
              "top": {kind: unit_counts(rows, kind) for kind in checks},
              "cost": {kind: _cost(rows, kind) for kind in checks},
              "settings": {"max_examples": max_examples, "top": top, "method": method, "knowledge": knowledge,
                           "ig_steps": steps, "random_draws": draws, "amplify": AMPLIFY, "seed": seed,
                           "layers": None if layers is None else list(layers)}}
    atomic_write_json(out_dir / "neurons.json", result)
    return result


# -- the report's section ----------------------------------------------------------------------------------
def _f(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "n/a"
    return f"{x:.{digits}g}" if isinstance(x, float) else str(x)


def neuron_blocks(data: dict, folder: Path) -> list[tuple]:
    """Report blocks of a ``neurons.json`` found in ``folder``: the causal checks, the top neurons with
    the tokens they decode to, the cost, and the overlay of the first example's top multimodal neuron."""
    s = data.get("settings") or {}
    blocks: list[tuple] = [
        ("h3", "Multimodal and knowledge neurons"),
        ("p", f"On {data.get('n_examples', 0)} probe examples, for the answer's first token: multimodal neurons "
              f"(MLP units scored at the image positions, {s.get('method')} score, top {s.get('top')} per example; "
              "Schwettmann et al. 2023) and knowledge neurons (integrated gradients at the answer position, "
              f"{s.get('ig_steps')} steps, kept at >= 0.2 x the maximum and shared by the question and its "
              f"rewordings; Dai et al. 2022). Δ = relative change of p(answer); the random control draws "
              f"{s.get('random_draws')} sets of as many units of the same layers. Rule: {data.get('check_rule')}."),
    ]
    rows = []
    checks = data.get("checks") or {}
    for kind, c in sorted(checks.items(), key=lambda kv: KINDS.index(kv[0]) if kv[0] in KINDS else len(KINDS)):
        sup, amp = c.get("suppress") or {}, c.get("amplify") or {}
        rows.append([kind, c.get("n"), *[_f(t.get(k)) for t in (sup, amp) for k in
                                          ("median_top", "median_random", "share_beyond_random", "p_value")],
                     c.get("verdict")])
    blocks.append(("table", ["neurons", "n", "zeroed: median Δ set", "median Δ random", "share beyond random",
                             "Wilcoxon p", f"x{s.get('amplify', AMPLIFY):g}: median Δ set", "median Δ random",
                             "share beyond random", "Wilcoxon p", "verdict"], rows))
    top = [[kind, u["layer"], u["unit"], f"{u['examples']}/{data.get('n_examples')}", _f(u["mean_score"]),
            ", ".join(repr(t) for t in u["tokens"])] for kind in KINDS for u in (data.get("top") or {}).get(kind, [])]
    blocks += [("p", "The units found most often across the examples (a unit that fails its causal check above is "
                     "not a finding), with the vocabulary tokens its output weight decodes to:"),
               ("table", ["neurons", "layer", "unit", "examples", "mean score", "decodes to"], top)]
    cost = data.get("cost") or {}
    if cost:
        blocks.append(("p", "Cost per probe example, in plain forward passes: " + "; ".join(
            f"{kind}: finding {_f(c.get('find_x_forward'))}x, causal check {_f(c.get('check_x_forward'))}x"
            for kind, c in cost.items()) + "."))
    ov = data.get("overlay") or {}
    path = folder / str(ov.get("path", ""))
    if ov and path.is_file():
        blocks += [("p", f"Top multimodal neuron of {ov.get('id')}: layer {ov.get('layer')}, unit {ov.get('unit')} "
                         f"(decodes to {', '.join(repr(t) for t in ov.get('tokens') or [])}); its contribution "
                         "over the image grid, lesion outlined."),
                   ("figures", {"top_multimodal_neuron": path.read_bytes()})]
    return blocks
