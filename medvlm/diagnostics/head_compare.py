"""How fine-tuning moves the important heads: the base model, stage 1 and stage 2 on the same examples.

:func:`compare_heads` runs :func:`~medvlm.diagnostics.heads.head_importance` (the paper's head
importance, Yu & Ananiadou 2024, eq. 6) for every variant on the same probe examples and the same
token per example (the first token of the reference answer, so every variant is scored on the same
w; whether each variant predicts it is recorded), then :func:`compare_scores` compares the
variants' mean importance over the examples:

- overlap of the top-k heads (k = 10 and 5), with the overlap two random top-k sets would have on
  average (k² / number of heads);
- Spearman's rank correlation over all heads (scipy.stats.spearmanr);
- the heads that gained and lost most (mean change), each with a paired two-sided Wilcoxon
  signed-rank test over the examples (scipy.stats.wilcoxon; n < 5 or all-zero changes give NaN),
  the median paired change and the share of examples that moved in the direction of the mean. The
  heads are chosen by the size of the change on the same examples, so these p-values are not
  corrected for that choice: read them as effect descriptions, not as confirmatory tests;
- the reading of each variant's top heads (mean reciprocal rank of the answer token in the
  projection of the head's most important weighted value-output vectors, over the examples).

Pairs: every variant against the first (the base), and each variant against the one before it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import spearmanr, wilcoxon

from medvlm.diagnostics.capture import Example, prepare_example
from medvlm.diagnostics.heads import head_importance
from medvlm.diagnostics.heads_report import HEADS_FILE
from medvlm.models.base import ModelFamily

KS = (10, 5)
#: a variant: its name and the model, or a zero-argument callable returning a context manager that
#: yields the model (named adapters on one base, switched per variant)
Variant = tuple[str, torch.nn.Module | Callable[[], AbstractContextManager]]


# -- statistics on score matrices ---------------------------------------------------------------
def top_set(scores: np.ndarray, k: int) -> set[int]:
    """Flat indices of the ``k`` largest scores (stable order on ties)."""
    return {int(i) for i in np.argsort(-np.asarray(scores, float).ravel(), kind="stable")[:k]}


def topk_overlap(a: np.ndarray, b: np.ndarray, k: int) -> dict[str, float]:
    """Heads among the top ``k`` of both: ``n``, ``share`` (n / k) and ``chance`` (k² / heads: the
    mean overlap of two random top-k sets)."""
    total = np.asarray(a).size
    if np.asarray(b).size != total:
        raise ValueError(f"score matrices of {np.asarray(a).shape} and {np.asarray(b).shape} heads differ")
    k_eff = min(k, total)
    n = len(top_set(a, k_eff) & top_set(b, k_eff))
    return {"k": k_eff, "n": n, "share": n / k_eff, "chance": k_eff * k_eff / total}


def rank_correlation(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Spearman's rho and its p-value over all heads; NaN when either is constant."""
    x, y = np.asarray(a, float).ravel(), np.asarray(b, float).ravel()
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan"), float("nan")
    res = spearmanr(x, y)
    return float(res.statistic), float(res.pvalue)


def _ranks(scores: np.ndarray) -> np.ndarray:
    """Rank of every head (1 = most important), same shape as ``scores``."""
    flat = np.asarray(scores, float).ravel()
    ranks = np.empty(flat.size, int)
    ranks[np.argsort(-flat, kind="stable")] = np.arange(1, flat.size + 1)
    return ranks.reshape(np.shape(scores))


def paired_change(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Per-example scores of one head under two variants: mean and median change b - a, the share
    of examples moving in the direction of the mean, and the two-sided Wilcoxon p-value."""
    d = np.asarray(b, float) - np.asarray(a, float)
    d = d[np.isfinite(d)]
    mean = float(d.mean()) if d.size else float("nan")
    sign = np.sign(mean) if np.isfinite(mean) and mean != 0 else 0.0
    p = (float(wilcoxon(d, alternative="two-sided", zero_method="wilcox").pvalue)
         if d.size >= 5 and np.any(d) else float("nan"))
    return {"n": int(d.size), "mean_change": mean, "median_change": float(np.median(d)) if d.size else float("nan"),
            "share_in_direction": float(np.mean(np.sign(d) == sign)) if d.size and sign else float("nan"),
            "wilcoxon_p": p}


def compare_pair(a: np.ndarray, b: np.ndarray, ks: Sequence[int] = KS, n_changes: int = 5) -> dict[str, Any]:
    """Compare per-example head scores of two variants ([examples, layers, heads] each, the same
    examples in the same order): top-k overlaps and rank correlation of the mean scores, and the
    ``n_changes`` heads that gained and lost most."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.shape != b.shape or a.ndim != 3:
        raise ValueError(f"per-example scores must be [examples, layers, heads] of one shape; got {a.shape} "
                         f"and {b.shape}")
    ma, mb = a.mean(0), b.mean(0)
    rho, p = rank_correlation(ma, mb)
    ra, rb = _ranks(ma), _ranks(mb)
    change = mb - ma
    order = np.argsort(change, axis=None, kind="stable")
    n_heads = a.shape[2]

    def head(i: int) -> dict[str, Any]:
        layer, hd = divmod(int(i), n_heads)
        return {"layer": layer, "head": hd, "before": float(ma.flat[i]), "after": float(mb.flat[i]),
                "rank_before": int(ra.flat[i]), "rank_after": int(rb.flat[i]),
                **paired_change(a[:, layer, hd], b[:, layer, hd])}

    n = min(n_changes, change.size)
    return {"overlap": {str(k): topk_overlap(ma, mb, k) for k in ks}, "spearman": rho, "spearman_p": p,
            "gained": [head(i) for i in order[::-1][:n] if change.flat[i] > 0],
            "lost": [head(i) for i in order[:n] if change.flat[i] < 0]}


def variant_pairs(names: Sequence[str]) -> list[tuple[str, str]]:
    """Every variant against the first, then each against the one before it (no pair twice)."""
    pairs = [(names[0], n) for n in names[1:]]
    pairs += [(x, y) for x, y in zip(names[1:], names[2:], strict=False) if (x, y) not in pairs]
    return pairs


def compare_scores(per_variant: dict[str, np.ndarray], ks: Sequence[int] = KS, n_changes: int = 5,
                   top: int = 10) -> dict[str, Any]:
    """The comparison of :func:`compare_heads` from per-example scores {variant: [examples, layers, heads]}
    (insertion order = the order of the variants, the base first)."""
    names = list(per_variant)
    if len(names) < 2:
        raise ValueError(f"comparing heads needs at least two variants; got {names}")
    means = {n: np.asarray(s, float).mean(0) for n, s in per_variant.items()}
    tops = {}
    for n, m in means.items():
        order = np.argsort(-m.ravel(), kind="stable")[:top]
        tops[n] = [{"layer": int(i // m.shape[1]), "head": int(i % m.shape[1]), "importance": float(m.flat[i])}
                   for i in order]
    return {"variants": names, "n_examples": int(np.asarray(per_variant[names[0]]).shape[0]),
            "ks": list(ks), "mean_scores": {n: m.tolist() for n, m in means.items()}, "top_heads": tops,
            "pairs": [{"a": x, "b": y, **compare_pair(per_variant[x], per_variant[y], ks, n_changes)}
                      for x, y in variant_pairs(names)]}


# -- running the variants -----------------------------------------------------------------------
@contextlib.contextmanager
def _entered(model: torch.nn.Module | Callable[[], AbstractContextManager]) -> Iterator[torch.nn.Module]:
    if isinstance(model, torch.nn.Module):
        yield model
    else:
        with model() as m:
            yield m


def probe_examples(model: torch.nn.Module, processor, family: ModelFamily, records: Sequence[dict]
                   ) -> tuple[list[Example], list[int], list[dict]]:
    """(examples, answer token ids, skipped) for records with an image, a question and an answer:
    each question without its answer (the last prompt position is explained) and the first token
    of its reference answer as the token w. A record whose answer gives no token is skipped with why."""
    examples, targets, skipped = [], [], []
    for rec in records:
        try:
            answered = prepare_example(model, processor, family, rec["image"], rec["question"], rec["answer"])
            examples.append(prepare_example(model, processor, family, rec["image"], rec["question"]))
        except (ValueError, KeyError, FileNotFoundError) as err:
            skipped.append({"id": rec.get("id"), "reason": str(err)})
            continue
        examples[-1].meta["id"] = rec.get("id")
        targets.append(answered.target_ids[0])
    return examples, targets, skipped


def _plain_forward(model: torch.nn.Module, ex: Example) -> float:
    t = time.perf_counter()
    with torch.no_grad():
        model(**ex.inputs, use_cache=False, logits_to_keep=1)
    return time.perf_counter() - t


def compare_heads(variants: Sequence[Variant], family: ModelFamily, processor, examples: Sequence[Example],
                  targets: Sequence[int] | None = None, *, ks: Sequence[int] = KS, n_changes: int = 5,
                  read_positions: int = 5, norm: str = "frozen", progress: bool = True) -> dict[str, Any]:
    """Head importance of every variant on ``examples`` (``targets``: the token explained per
    example, default each example's own), compared (:func:`compare_scores`), with the reading of each
    variant's top-``max(ks)`` heads (mean over the examples) and the cost per example against a
    plain forward pass (``model(**inputs)`` with logits at the last position, timed per example)."""
    from tqdm.auto import tqdm

    if len({name for name, _ in variants}) != len(variants):
        raise ValueError(f"variant names must differ; got {[name for name, _ in variants]}")
    if not examples:
        raise ValueError("no probe example to compare heads on")
    targets = list(targets) if targets is not None else [None] * len(examples)
    tok = getattr(processor, "tokenizer", None)
    per_variant, readings, timing, agree = {}, {}, {}, {}
    k = max(ks)
    for name, model_or_ctx in variants:
        with _entered(model_or_ctx) as model:
            runs, seconds, forward = [], [], []
            for ex, target in zip(tqdm(examples, desc=f"heads {name}", disable=not progress or None), targets,
                                  strict=True):
                forward.append(_plain_forward(model, ex))
                t = time.perf_counter()
                runs.append(head_importance(model, family, ex, tok, target_id=target, read=0, norm=norm))
                seconds.append(time.perf_counter() - t)
            scores = np.stack([r.scores for r in runs])
            per_variant[name] = scores
            agree[name] = float(np.mean([r.predicted_id == r.target_id for r in runs]))
            mean = scores.mean(0)
            pairs = [(int(i // mean.shape[1]), int(i % mean.shape[1]))
                     for i in np.argsort(-mean.ravel(), kind="stable")[:k]]
            read_s, reads = [], []
            for ex, target in zip(examples, targets, strict=True):  # the reading of the mean top heads
                t = time.perf_counter()
                reads.append(head_importance(model, family, ex, tok, target_id=target, read=pairs,
                                             read_positions=read_positions, norm=norm).readings)
                read_s.append(time.perf_counter() - t)
        readings[name] = _mean_readings(reads)
        timing[name] = {"forward_s": float(np.median(forward)), "importance_s": float(np.median(seconds)),
                        "reading_s": float(np.median(read_s)),
                        "importance_ratio": float(np.median(np.divide(seconds, forward))),
                        "reading_ratio": float(np.median(np.divide(read_s, forward)))}
    out = compare_scores(per_variant, ks, n_changes, top=k)
    out.update(readings=readings, predicts_answer=agree, timing=timing, norm=norm,
               per_example={n: s.tolist() for n, s in per_variant.items()},
               examples=[ex.meta.get("id") for ex in examples])
    return out


def _mean_readings(reads: list[list]) -> list[dict[str, Any]]:
    """Per head (same heads in every example): mean importance and reciprocal ranks over the examples,
    and the first example's reading (positions and top tokens) as an illustration."""
    out = []
    for i, first in enumerate(reads[0]):
        rows = [r[i] for r in reads]
        out.append({"layer": first.layer, "head": first.head,
                    "importance": float(np.mean([r.importance for r in rows])),
                    "reciprocal_rank": float(np.mean([r.reciprocal_rank for r in rows])),
                    "mean_reciprocal_rank": float(np.mean([r.mean_reciprocal_rank for r in rows])),
                    "output_reciprocal_rank": float(np.mean([1.0 / r.output_rank for r in rows])),
                    "image_share": float(np.mean([np.mean([p.is_image for p in r.positions]) for r in rows])),
                    "example": first.to_json()})
    return out


# -- a run's stages -----------------------------------------------------------------------------

def compare_run_heads(stage_dirs: Sequence[str | Path], out_dir: str | Path, *, max_examples: int = 24,
                      model_name_or_path: str | None = None, **kwargs) -> dict[str, Any]:
    """Head importance of the run's base (adapter disabled) and of each stage's final adapter, on the
    last stage's probe examples; written to ``out_dir/head_comparison.json`` and returned.

    One base model in memory: the adapters are PEFT named adapters on it, switched per variant.
    The base is the one the adapters name (every stage must name the same one), or
    ``model_name_or_path``. ``kwargs`` go to :func:`compare_heads`."""
    from medvlm.diagnostics.model_card import adapter_base, probe_records_for
    from medvlm.diagnostics.probe import select_probe_records
    from medvlm.models.adapters import adapter_record, apply_adapter
    from medvlm.models.registry import load_model_and_processor
    from medvlm.utils.io import atomic_write_json

    stages = [Path(s) for s in stage_dirs]
    if not stages:
        raise ValueError("no stage with an adapter/ to compare heads on")
    bases = {adapter_base(s, prefer_local=True) for s in stages}
    if model_name_or_path is None and len(bases) > 1:
        raise ValueError(f"the stages name different base models {sorted(bases)}; their heads are not comparable "
                         "(pass --model-name-or-path to force one)")
    base = model_name_or_path or bases.pop()
    for s in stages:
        if adapter_record(s / "adapter")["merged_into_base"]:
            raise ValueError(f"{s / 'adapter'} is a checkpoint adapter of a merging stage; compare final adapters")
    loaded = load_model_and_processor(base, dtype="auto", attn_implementation="eager", for_inference=True)
    model = loaded.model
    for i, s in enumerate(stages):
        if i == 0:
            model = apply_adapter(model, s / "adapter", name=s.name)
        else:
            model.load_adapter(str(s / "adapter"), adapter_name=s.name)
    model.eval()

    def use(name: str | None):
        @contextlib.contextmanager
        def ctx():
            if name is None:
                with model.disable_adapter():
                    yield model
            else:
                model.set_adapter(name)
                yield model
        return ctx

    records, skipped = select_probe_records(probe_records_for(stages[-1]), max_examples)
    examples, targets, bad = probe_examples(model, loaded.processor, loaded.family, records)
    variants = [("base", use(None))] + [(s.name, use(s.name)) for s in stages]
    result = compare_heads(variants, loaded.family, loaded.processor, examples, targets, **kwargs)
    result.update(base_model=base, stages=[str(s) for s in stages], skipped=skipped + bad)
    atomic_write_json(Path(out_dir) / HEADS_FILE, result)
    return result
