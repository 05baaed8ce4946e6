"""Score a list of prediction records into the ``metrics.json`` structure, and write it.

:func:`score_records` is the one entry point (also called by the trainer at each checkpoint, so
this module imports no torch and loads ``rouge-score``/``sacrebleu`` only when open questions
are scored). Its result::

    {"counts":  {"n_records", "n_scored", "n_skipped", "n_empty", "n_truncated", "n_open_non_ascii", ...},
     "closed":  {"n", "n_empty", "accuracy", "accuracy_std", "accuracy_ci", "exact_match", ...},
     "open":    {"n", "n_empty", "rouge1", ..., "bleu", "sentence_bleu", "token_recall", "token_f1"},
     "consistency": {...}   # only when some record has "samples"
     "robustness":  {...}   # only when some record has a "group"
     "latency":     {...}   # only when some record has "latency_s"
     "slices":  {"modality": {"CT": {"n", "closed": {...}, "open": {...}}}, ...},
     "skipped": [{"id", "reason"}, ...],
     "config":  {"bootstrap", "seed", ..., "metric_sources": {"closed": {name: rule followed}, ...}}}

Every metric has ``<name>``, ``<name>_std`` and ``<name>_ci`` (percentile bootstrap). An empty
group has ``n: 0`` and ``null`` scores, never 0.0. The result is JSON-serialisable (NaN -> null).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from medvlm.eval.consistency import DEFAULT_K, DEFAULT_THRESHOLD, consistency_scores
from medvlm.eval.metrics import (
    ANSWER_TYPES,
    TOKEN_RECALL_THRESHOLD,
    get_metric,
    list_metrics,
    outside_rouge_score,
    summarize,
)
from medvlm.eval.predictions import MAX_PREDICTION_CHARS, load_predictions, prepare_records
from medvlm.eval.robustness import latency_summary, robustness_scores
from medvlm.utils.io import to_jsonable

logger = logging.getLogger(__name__)

DEFAULT_SLICES: tuple[str, ...] = ("modality", "answer_type", "body_part", "source")
#: Reported by eval/run_eval.py whatever a suite selects (see :func:`scoring_kwargs`): the columns its
#: metrics.json promises. The checkpoint callback keeps its exact, cheaper selection.
ALWAYS_REPORTED: dict[str, tuple[str, ...]] = {"closed": ("accuracy",), "open": ("rouge1", "rouge2", "rougeL", "bleu")}
#: Metrics reported inside each slice (all metrics everywhere would bury the table).
SLICE_METRICS: dict[str, tuple[str, ...]] = {"closed": ("accuracy",), "open": ("token_f1", "rougeL")}
MISSING = "(missing)"


def _item_values(records: Sequence[Mapping[str, Any]], names: Sequence[str], answer_type: str) -> dict:
    """``{metric name: [item value per record]}`` (each metric evaluated once per record)."""
    metrics = [get_metric(n, answer_type) for n in names]
    values: dict[str, list] = {m.name: [] for m in metrics}
    for r in tqdm(records, desc=f"scoring {answer_type}", disable=len(records) < 1000, leave=False):
        for m in metrics:
            values[m.name].append(m.fn(r["prediction"], r["answer"], r))
    return values


def _group_summary(values: dict, idx: Sequence[int], answer_type: str, records, **boot: Any) -> dict:
    """Summaries of the items ``idx`` for every metric in ``values``."""
    out: dict[str, Any] = {"n": len(idx), "n_empty": sum(not records[i]["prediction"].strip() for i in idx)}
    for name, vals in values.items():
        out.update(summarize(get_metric(name, answer_type), [vals[i] for i in idx], **boot))
    return out


def _slices(by_type: dict, slice_by: Sequence[str], **boot: Any) -> dict[str, Any]:
    """Per-value summaries for each slicing field that at least one record carries."""
    out: dict[str, Any] = {}
    for field in slice_by:
        if not any(r.get(field) not in (None, "") for t in ANSWER_TYPES for r in by_type[t][0]):
            continue
        table: dict[str, Any] = {}
        for t in ANSWER_TYPES:
            recs, values = by_type[t]
            groups: dict[str, list[int]] = {}
            for i, r in enumerate(recs):
                v = r.get(field)
                groups.setdefault(MISSING if v in (None, "") else str(v), []).append(i)
            for key, idx in groups.items():
                sub = {k: values[k] for k in SLICE_METRICS[t] if k in values}
                entry = table.setdefault(key, {"n": 0})
                entry["n"] += len(idx)
                entry[t] = _group_summary(sub, idx, t, recs, **boot)
        for entry in table.values():  # an answer type absent from a slice value: n 0, null scores
            for t in ANSWER_TYPES:
                if t not in entry:
                    names = [k for k in SLICE_METRICS[t] if k in by_type[t][1]]
                    entry[t] = _group_summary({k: [] for k in names}, [], t, [], **boot)
        out[field] = dict(sorted(table.items()))
    return out


def _consistency(records: list[dict], k: int, threshold: int, skipped: list, **boot: Any) -> dict | None:
    with_samples = [r for r in records if r.get("samples") is not None]
    if not with_samples:
        return None
    valid = []
    for r in with_samples:
        s = r["samples"]
        if isinstance(s, (list, tuple)) and len(s) == k:
            valid.append(r)
        else:
            got = len(s) if isinstance(s, (list, tuple)) else type(s).__name__
            skipped.append({"id": r["id"], "reason": f"left out of consistency only: expected k={k} samples, "
                            f"got {got}"})
    return consistency_scores(valid, k=k, threshold=threshold, n_resamples=boot["n_resamples"], seed=boot["seed"])


def score_records(
    records: Sequence[Mapping[str, Any]],
    *,
    bootstrap: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    slice_by: Sequence[str] = DEFAULT_SLICES,
    closed_metrics: Sequence[str] | None = None,
    open_metrics: Sequence[str] | None = None,
    consistency_k: int = DEFAULT_K,
    consistency_threshold: int = DEFAULT_THRESHOLD,
    max_prediction_chars: int = MAX_PREDICTION_CHARS,
    skipped: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """Score prediction records (see the module docstring for the result's structure).

    ``records`` are dicts with ``id, answer, prediction`` and optionally ``answer_type``,
    ``choices``, ``samples``, ``group``/``variant``, ``latency_s`` and slicing fields.
    ``closed_metrics``/``open_metrics`` select registered metrics (default: all). ``skipped``
    carries records already dropped while loading, so one list reports everything left out.
    """
    names = {
        "closed": list(closed_metrics) if closed_metrics is not None else list_metrics("closed"),
        "open": list(open_metrics) if open_metrics is not None else list_metrics("open"),
    }
    for t in ANSWER_TYPES:  # fail on a typo before any work
        for n in names[t]:
            get_metric(n, t)
    boot = {"n_resamples": bootstrap, "seed": seed, "confidence": confidence}
    clean, skipped_now, counts = prepare_records(records, max_prediction_chars=max_prediction_chars)
    all_skipped = [dict(s) for s in skipped] + skipped_now
    if not clean:
        logger.warning("no record could be scored (%d given, %d skipped): every score is null",
                       len(records), len(all_skipped))

    by_type: dict[str, tuple[list[dict], dict]] = {}
    result: dict[str, Any] = {}
    for t in ANSWER_TYPES:
        recs = [r for r in clean if r["answer_type"] == t]
        values = _item_values(recs, names[t], t)
        by_type[t] = (recs, values)
        result[t] = _group_summary(values, range(len(recs)), t, recs, **boot)

    cons_skipped: list[dict[str, Any]] = []
    cons = _consistency(clean, consistency_k, consistency_threshold, cons_skipped, **boot)
    if cons is not None:
        result["consistency"] = cons
    all_skipped += cons_skipped
    if any(r.get("group") not in (None, "") for r in clean):
        result["robustness"] = robustness_scores(clean, n_resamples=bootstrap, seed=seed)
    lat = latency_summary(clean)
    if lat is not None:
        result["latency"] = lat
    result["slices"] = _slices(by_type, slice_by, **boot)
    result["skipped"] = all_skipped
    result["counts"] = {
        "n_records": len(records) + len(skipped),
        "n_scored": len(clean),
        "n_skipped": len(skipped) + len(skipped_now),
        "n_skipped_consistency_only": len(cons_skipped),
        **counts,  # n_truncated: predictions cut to max_prediction_chars before every metric
        # open items whose ROUGE differs from rouge-score's own tokens (non-ASCII letters kept)
        "n_open_non_ascii": sum(outside_rouge_score(r["prediction"]) or outside_rouge_score(r["answer"])
                                for r in by_type["open"][0]),
    }
    result["config"] = {
        "bootstrap": bootstrap,
        "seed": seed,
        "confidence": confidence,
        "slice_by": list(slice_by),
        "metrics": names,
        "consistency_k": consistency_k,
        "consistency_threshold": consistency_threshold,
        "max_prediction_chars": max_prediction_chars,
        "token_recall_threshold": TOKEN_RECALL_THRESHOLD,
        # the rule each metric follows: a harness's repository, commit and function, or medvlm's own
        "metric_sources": {t: {n: get_metric(n, t).source for n in names[t]} for t in ANSWER_TYPES},
    }
    return to_jsonable(result)


def format_summary(metrics: Mapping[str, Any]) -> str:
    """A short plain-text table of the headline numbers of a :func:`score_records` result."""

    def fmt(v: Any) -> str:
        return "n/a" if v is None else f"{v:.4g}"

    rows = [("group", "n", "metric", "value", "95% CI")]
    for t in ANSWER_TYPES:
        sec = metrics.get(t, {})
        for name in metrics.get("config", {}).get("metrics", {}).get(t, []):
            ci = sec.get(f"{name}_ci")
            rows.append((t, str(sec.get("n", 0)), name, fmt(sec.get(name)),
                         "n/a" if not ci else f"[{fmt(ci[0])}, {fmt(ci[1])}]"))
    cons = metrics.get("consistency")
    if cons:
        ci = cons.get("consistent_accuracy_ci")
        rows.append(("consistency", str(cons["n"]), "consistent_accuracy", fmt(cons.get("consistent_accuracy")),
                     "n/a" if not ci else f"[{fmt(ci[0])}, {fmt(ci[1])}]"))
        rows.append(("consistency", str(cons["n"]), "consistency_rate", fmt(cons.get("consistency_rate")), ""))
        if cons.get("n_greedy"):
            ci = cons.get("consistent_greedy_accuracy_ci")
            rows.append(("consistency", str(cons["n_greedy"]), "consistent_greedy_accuracy",
                         fmt(cons.get("consistent_greedy_accuracy")), "n/a" if not ci else f"[{fmt(ci[0])}, {fmt(ci[1])}]"))
    rob = metrics.get("robustness")
    if rob:
        rows.append(("robustness", str(rob["n_flip_pairs"]), "flip_rate", fmt(rob.get("flip_rate")), ""))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    c = metrics.get("counts", {})
    lines.append(f"scored {c.get('n_scored', 0)} of {c.get('n_records', 0)} records; "
                 f"{c.get('n_skipped', 0)} skipped, {c.get('n_empty', 0)} empty predictions, "
                 f"{c.get('n_truncated', 0)} truncated to "
                 f"{metrics.get('config', {}).get('max_prediction_chars', MAX_PREDICTION_CHARS)} characters")
    return "\n".join(lines)


def write_metrics(
    output_dir: str | os.PathLike, metrics: Mapping[str, Any], *, inputs: Mapping[str, Any],
    outputs: Sequence[str] = ("metrics.json",),
) -> Path:
    """Write ``metrics.json`` atomically, then ``manifest.json`` (inputs' paths and hashes, counts).

    ``inputs`` maps a role (``"predictions"``, ``"questions"``) to a file path or ``None``;
    ``outputs`` lists the files of the folder the manifest vouches for. Returns the path of ``metrics.json``.
    """
    from medvlm.utils.io import atomic_write_json, sha256_file, write_manifest

    out = Path(output_dir)
    path = atomic_write_json(out / "metrics.json", to_jsonable(metrics))
    files = {
        role: {"path": str(Path(p).resolve()), "sha256": sha256_file(p)}
        for role, p in inputs.items()
        if p is not None
    }
    write_manifest(out, step="eval.score_predictions", inputs=files, outputs=list(outputs),
                   counts=metrics.get("counts", {}), config=metrics.get("config", {}))
    return path


def not_paraphrased(rows, para_rows) -> list[dict[str, str]]:
    """``{id, reason}`` for each main prediction row that no paraphrase row belongs to (neither by
    id nor as the group it anchors)."""
    covered = {str(r.get("id")) for r in para_rows} | {str(r.get("group")) for r in para_rows}
    return [{"id": str(r.get("id")), "reason": "no row of the paraphrase predictions belongs to it"}
            for r in rows if str(r.get("id")) not in covered]


def paraphrase_robustness(para_rows, *, bootstrap: int = 1000, seed: int = 0,
                          unmatched: list[dict] | None = None) -> dict:
    """The ``robustness`` section of ``metrics.json`` from answers to paraphrase groups (the rows of
    ``predictions_paraphrase.jsonl``): flip rate, per-variant accuracy, latency, and the questions
    left out (``unmatched``, when known)."""
    scored = score_records(para_rows, bootstrap=bootstrap, seed=seed, slice_by=())
    section = dict(scored.get("robustness", {"n": 0, "n_groups": 0}))
    if unmatched is not None:
        section.update(n_not_paraphrased=len(unmatched), not_paraphrased=list(unmatched))
    return section


def score_predictions_file(
    predictions: str | os.PathLike,
    output: str | os.PathLike,
    *,
    questions: str | os.PathLike | None = None,
    inputs: Mapping[str, Any] | None = None,
    paraphrase_rows: Sequence[Mapping[str, Any]] | None = None,
    judge: Mapping[str, Any] | None = None,
    judge_template: str = "correctness",
    judge_concurrency: int = 1,
    **kwargs: Any,
) -> dict[str, Any]:
    """Predictions mode of ``eval/run_eval.py``: score a file into ``output/metrics.json``; with
    ``paraphrase_rows`` (the rows of ``predictions_paraphrase.jsonl``) add the ``robustness``
    section; with ``judge`` (a ``make_llm`` config) judge the open answers into
    ``output/judge.jsonl`` and add the ``judge`` section. ``metrics.json`` is rewritten after each
    step, so a judge server that is down (which raises :class:`~medvlm.llm.LLMError`) loses nothing
    already scored; ``manifest.json`` is written last, only when every step finished, as in model
    mode. Returns the metrics."""
    from medvlm.utils.io import atomic_write_json

    records, skipped = load_predictions(predictions, questions)
    logger.info("read %d records from %s (%d skipped while joining)", len(records), predictions, len(skipped))
    metrics = score_records(records, skipped=skipped, **kwargs)
    out = Path(output)
    atomic_write_json(out / "metrics.json", to_jsonable(metrics))
    outputs = ["metrics.json"]
    if paraphrase_rows is not None:
        metrics["robustness"] = paraphrase_robustness(
            paraphrase_rows, bootstrap=kwargs.get("bootstrap", 1000), seed=kwargs.get("seed", 0),
            unmatched=not_paraphrased(records, paraphrase_rows))
        atomic_write_json(out / "metrics.json", to_jsonable(metrics))
    if judge:
        from medvlm.eval.judge import judge_open_rows

        clean, _, _ = prepare_records(records, max_prediction_chars=kwargs.get("max_prediction_chars",
                                                                               MAX_PREDICTION_CHARS))
        metrics["judge"] = judge_open_rows(clean, judge, output, template=judge_template,
                                           concurrency=judge_concurrency)
        outputs += [] if "error" in metrics["judge"] else ["judge.jsonl"]
    write_metrics(output, metrics, inputs=dict(inputs or {"predictions": predictions, "questions": questions}),
                  outputs=outputs)
    return metrics


#: Keys a suite YAML may set, and the :func:`score_records` argument each one feeds.
SUITE_KEYS = {
    "name": None,
    "description": None,
    "metrics": None,  # {"closed": [...], "open": [...]}
    "slice_by": "slice_by",
    "bootstrap": "bootstrap",
    "seed": "seed",
    "confidence": "confidence",
    "consistency": None,  # {"k": 5, "threshold": 3}
    "max_prediction_chars": "max_prediction_chars",
}


def load_suite(path: str | os.PathLike) -> dict[str, Any]:
    """Read a suite YAML (``eval/suites/*.yaml``) into keyword arguments for :func:`score_records`.

    Unknown keys and unknown metric names raise ``ValueError``/``UnknownMetricError`` naming the file.
    """
    import yaml

    with open(path, encoding="utf-8") as fh:
        cfg = yaml.safe_load(fh) or {}
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: a suite is a YAML mapping, got {type(cfg).__name__}")
    unknown = sorted(set(cfg) - set(SUITE_KEYS))
    if unknown:
        raise ValueError(f"{path}: unknown suite keys {unknown}; allowed: {sorted(SUITE_KEYS)}")
    kwargs = {SUITE_KEYS[k]: v for k, v in cfg.items() if SUITE_KEYS[k]}
    metrics = cfg.get("metrics") or {}
    bad = sorted(set(metrics) - set(ANSWER_TYPES))
    if bad:
        raise ValueError(f"{path}: 'metrics' keys must be {list(ANSWER_TYPES)}, got {bad}")
    for t, names in metrics.items():
        for n in names:
            get_metric(n, t)
        kwargs[f"{t}_metrics"] = list(names)
    cons = cfg.get("consistency") or {}
    bad = sorted(set(cons) - {"k", "threshold"})
    if bad:
        raise ValueError(f"{path}: 'consistency' takes keys k and threshold, got {bad}")
    if "k" in cons:
        kwargs["consistency_k"] = int(cons["k"])
    if "threshold" in cons:
        kwargs["consistency_threshold"] = int(cons["threshold"])
    return kwargs


def scoring_kwargs(suite: str | os.PathLike | None = None, **overrides: Any) -> dict[str, Any]:
    """Keyword arguments for :func:`score_records`: a suite's, then every override that is not ``None``;
    a suite's metric selection is completed with :data:`ALWAYS_REPORTED`."""
    kwargs = load_suite(suite) if suite is not None else {}
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    for t in ANSWER_TYPES:  # a suite's selection adds to ALWAYS_REPORTED, in the suite's order
        key = f"{t}_metrics"
        if kwargs.get(key) is not None:
            kwargs[key] = list(kwargs[key]) + [n for n in ALWAYS_REPORTED[t] if n not in kwargs[key]]
    return kwargs
