"""Consistency over repeated sampled runs: a question answered differently run to run loses its point.

The rule (defaults ``k=5`` runs, ``threshold=3``):

1. Each question carries exactly ``k`` sampled answers (``record["samples"]``, one per run).
2. Each answer is put in its canonical normalised form
   (:func:`medvlm.eval.metrics.canonical_answer`: the chosen option for multiple choice, yes/no for
   a yes/no reference, otherwise :func:`~medvlm.utils.text.normalize_answer`).
3. The *mode* is the most frequent canonical answer; a tie goes to the answer that appeared first
   in run order (with k=5 and threshold=3 a tie can only occur when the question is already
   inconsistent, so the tie rule never changes a score there).
4. ``disagreeing`` = the number of runs whose canonical answer differs from the mode.
5. If ``disagreeing >= threshold`` (answers disagree in at least three of the five runs) the
   question is *inconsistent* and scores 0. Otherwise it is *consistent* and scores 1 if the mode
   is correct under the ``accuracy`` rule, else 0.

Reported: ``consistency_rate`` (share of consistent questions), ``consistent_accuracy`` (mean of
the scores above, with a bootstrap CI), ``mode_accuracy`` (accuracy of the mode ignoring
consistency), ``mean_agreement`` (mean share of runs agreeing with the mode) and ``n``. When the
records also carry the greedy ``prediction`` (model mode does), ``consistent_greedy_accuracy`` is
the other reading of "loses its point": the greedy answer's point (``accuracy`` rule), kept only
when the question is consistent (``n_greedy`` questions).

>>> recs = [{"id": "q1", "answer": "yes", "samples": ["Yes", "yes.", "no", "yes", "No"]}]
>>> consistency_scores(recs)["consistent_accuracy"]   # 2 runs disagree: consistent, mode correct
1.0
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from medvlm.eval.metrics import canonical_answer, canonical_reference, is_correct, summarize_values

DEFAULT_K = 5
DEFAULT_THRESHOLD = 3


def modal_answer(answers: Sequence[str]) -> tuple[str, int]:
    """The most frequent answer (ties -> first seen) and how many answers differ from it."""
    counts = Counter(answers)
    best = max(counts.values())
    mode = next(a for a in answers if counts[a] == best)
    return mode, len(answers) - best


def question_consistency(
    record: Mapping[str, Any], *, k: int = DEFAULT_K, threshold: int = DEFAULT_THRESHOLD
) -> dict[str, Any]:
    """Score one record's ``samples`` by the rule in the module docstring.

    Returns ``{"id", "mode", "disagreeing", "consistent", "mode_correct", "score", "greedy_score"}``
    (``greedy_score`` is ``None`` without a ``prediction``).
    Raises ``ValueError`` naming the record id when it does not carry exactly ``k`` samples.
    """
    samples = record.get("samples")
    rid = record.get("id", "<no id>")
    if not isinstance(samples, (list, tuple)) or len(samples) != k:
        got = f"{len(samples)} samples" if isinstance(samples, (list, tuple)) else f"samples={samples!r}"
        raise ValueError(
            f"record {rid!r}: consistency needs exactly k={k} sampled answers in 'samples', got {got}; "
            f"generate {k} samples for every question, or set k to the number of runs you sampled"
        )
    reference = str(record.get("answer", ""))
    canon = [canonical_answer("" if s is None else str(s), reference, record) for s in samples]
    mode, disagreeing = modal_answer(canon)
    consistent = disagreeing < threshold
    mode_correct = bool(mode) and mode == canonical_reference(reference, record)
    greedy = record.get("prediction")
    return {
        "id": rid,
        "mode": mode,
        "disagreeing": disagreeing,
        "consistent": consistent,
        "mode_correct": mode_correct,
        "score": float(consistent and mode_correct),
        "greedy_score": None if greedy is None else float(consistent and is_correct(str(greedy), reference, record)),
    }


def consistency_scores(
    records: Sequence[Mapping[str, Any]],
    *,
    k: int = DEFAULT_K,
    threshold: int = DEFAULT_THRESHOLD,
    n_resamples: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Aggregate :func:`question_consistency` over ``records`` (every one must have ``k`` samples).

    An empty input gives ``n: 0`` and ``None`` rates.
    """
    if not 1 <= threshold <= k:
        raise ValueError(f"threshold must be between 1 and k={k}, got {threshold}")
    per_q = [question_consistency(r, k=k, threshold=threshold) for r in records]
    n = len(per_q)
    out: dict[str, Any] = {"n": n, "k": k, "threshold": threshold}
    out.update(summarize_values("consistent_accuracy", [q["score"] for q in per_q], n_resamples=n_resamples, seed=seed))
    out["consistency_rate"] = sum(q["consistent"] for q in per_q) / n if n else None
    out["mode_accuracy"] = sum(q["mode_correct"] for q in per_q) / n if n else None
    out["mean_agreement"] = sum((k - q["disagreeing"]) / k for q in per_q) / n if n else None
    out["n_inconsistent"] = sum(not q["consistent"] for q in per_q)
    greedy = [q["greedy_score"] for q in per_q if q["greedy_score"] is not None]
    if greedy:
        out["n_greedy"] = len(greedy)
        out.update(summarize_values("consistent_greedy_accuracy", greedy, n_resamples=n_resamples, seed=seed))
    return out
