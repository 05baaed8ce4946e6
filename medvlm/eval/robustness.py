"""Paraphrase robustness: does rewording a question change the model's answer or its correctness?

Records carry ``group`` (one paraphrase group: same image, same underlying question) and
``variant`` (which wording, e.g. the generator's ``question_variant``).

The *base* wording of a group is the record whose ``variant`` is ``0``, ``"0"``, ``"base"`` or
``"original"`` (case-insensitive; the first such record in file order if several); a group with
none of these takes its first record in file order as base. Correctness is the ``accuracy`` rule
(:func:`medvlm.eval.metrics.is_correct`) and "same answer" compares canonical normalised answers
(:func:`medvlm.eval.metrics.canonical_answer`).

Reported:

* ``per_variant``: ``{variant: {"n", "accuracy"}}``;
* ``flip_rate``: among non-base records, the share whose correctness differs from their group's
  base record (with a bootstrap CI); ``n_flip_pairs`` is its denominator;
* ``full_consistency_rate``: among groups with at least two records, the share in which every
  variant gave the same canonical answer; ``n_groups_multi`` is its denominator;
* ``latency`` (only when some record has ``latency_s``): ``{"n", "mean", "p50", "p95"}`` in seconds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from medvlm.eval.metrics import canonical_answer, is_correct, summarize_values

BASE_VARIANTS = frozenset({"0", "base", "original"})


def _is_base(variant: Any) -> bool:
    return str(variant).strip().lower() in BASE_VARIANTS


def group_records(records: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    """Records with a non-empty ``group``, by group id (file order kept; base record first)."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for r in records:
        g = r.get("group")
        if g is None or g == "":
            continue
        groups.setdefault(str(g), []).append(r)
    for gid, members in groups.items():
        base = next((i for i, r in enumerate(members) if _is_base(r.get("variant", ""))), 0)
        groups[gid] = [members[base], *members[:base], *members[base + 1 :]]
    return groups


def latency_summary(records: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """Mean, median and 95th percentile of ``latency_s`` over the records that have a number there."""
    vals = []
    for r in records:
        v = r.get("latency_s")
        if isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v):
            vals.append(float(v))
    if not vals:
        return None
    arr = np.asarray(vals)
    return {
        "n": len(vals),
        "mean": float(arr.mean()),
        "p50": float(np.percentile(arr, 50)),
        "p95": float(np.percentile(arr, 95)),
    }


def robustness_scores(
    records: Sequence[Mapping[str, Any]], *, n_resamples: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """Per-variant accuracy, flip rate against the base wording and full-consistency rate."""
    groups = group_records(records)
    correct: dict[int, bool] = {}
    canon: dict[int, str] = {}
    for members in groups.values():
        for r in members:
            pred, ref = str(r.get("prediction") or ""), str(r.get("answer", ""))
            correct[id(r)] = is_correct(pred, ref, r)
            canon[id(r)] = canonical_answer(pred, ref, r)

    per_variant: dict[str, list[bool]] = {}
    flips: list[float] = []
    multi = same = 0
    for members in groups.values():
        base = members[0]
        for r in members:
            per_variant.setdefault(str(r.get("variant", "")), []).append(correct[id(r)])
        for r in members[1:]:
            flips.append(float(correct[id(r)] != correct[id(base)]))
        if len(members) >= 2:
            multi += 1
            same += len({canon[id(r)] for r in members}) == 1

    out: dict[str, Any] = {
        "n": sum(len(m) for m in groups.values()),
        "n_groups": len(groups),
        "per_variant": {
            v: {"n": len(c), "accuracy": sum(c) / len(c)} for v, c in sorted(per_variant.items())
        },
        "n_flip_pairs": len(flips),
        "n_groups_multi": multi,
        "full_consistency_rate": same / multi if multi else None,
    }
    out.update(summarize_values("flip_rate", flips, n_resamples=n_resamples, seed=seed))
    lat = latency_summary([r for m in groups.values() for r in m])
    if lat is not None:
        out["latency"] = lat
    return out
