"""Group-aware splits and a leakage report.

A group (patient, case, study, image folder: the record's ``group_id``) lands in exactly one
split, so no patient is seen in training and scored in test.

>>> import datasets
>>> ds = datasets.Dataset.from_dict({"group_id": ["a", "a", "b", "c"], "image": ["1", "1", "2", "3"]})
>>> report = leakage_report(ds.add_column("split", ["train", "test", "train", "test"]))
>>> report["group_id"]["shared"], report["image"]["shared"]
(1, 1)
"""

from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

import datasets

logger = logging.getLogger(__name__)

DEFAULT_RATIOS = {"train": 0.8, "validation": 0.1, "test": 0.1}


def _rank(group: str, seed: int) -> str:
    """A seeded, platform-independent sort key (Python's ``hash`` is salted per process)."""
    return hashlib.sha256(f"{seed}\0{group}".encode()).hexdigest()


def _group_keys(ds: datasets.Dataset) -> list[str]:
    """``group_id`` per row; rows without one fall back to their image, then their id (logged)."""
    groups = list(ds["group_id"])
    empty = [i for i, g in enumerate(groups) if not g]
    if empty:
        images = ds["image"] if "image" in ds.column_names else [""] * len(groups)
        ids = ds["id"] if "id" in ds.column_names else [str(i) for i in range(len(groups))]
        for i in empty:
            groups[i] = f"image:{images[i]}" if images[i] else f"id:{ids[i]}"
        logger.warning("split_by_group: %d rows have no group_id; grouped by image (or id) instead", len(empty))
    return groups


def split_by_group(
    ds: datasets.Dataset, ratios: Mapping[str, float] | None = None, seed: int = 0
) -> datasets.DatasetDict:
    """Assign whole groups to splits, deterministically.

    Groups are ordered by a seeded SHA-256 of their id (independent of row order and of the
    process), then taken in that order into each split until its share of *rows* reaches its
    ratio. The same ``(groups, seed)`` always gives the same split. The ``split`` column (if
    any) is overwritten with the assigned name.

    Args:
        ds: records with a ``group_id`` column.
        ratios: split name → fraction, summing to 1 (default 0.8/0.1/0.1 train/validation/test).
        seed: changes the order of groups, hence the assignment.

    Returns:
        A :class:`datasets.DatasetDict` with one entry per ratio (possibly empty if there are
        fewer groups than splits).
    """
    ratios = dict(DEFAULT_RATIOS if ratios is None else ratios)
    if not ratios or any(v < 0 for v in ratios.values()) or abs(sum(ratios.values()) - 1.0) > 1e-6:
        raise ValueError(f"ratios must be non-negative and sum to 1, got {ratios}")
    if "group_id" not in ds.column_names:
        raise KeyError(f"split_by_group needs a 'group_id' column; found {ds.column_names}")
    groups = _group_keys(ds)
    rows_of: dict[str, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        rows_of[g].append(i)
    order = sorted(rows_of, key=lambda g: _rank(g, seed))
    names = list(ratios)
    targets, acc = [], 0.0
    for name in names:  # cumulative row targets per split
        acc += ratios[name]
        targets.append(acc * len(groups))
    assigned: dict[str, list[int]] = {n: [] for n in names}
    k, done = 0, 0
    for g in order:
        while k < len(names) - 1 and done >= targets[k] - 1e-9:
            k += 1
        assigned[names[k]].extend(rows_of[g])
        done += len(rows_of[g])
    out = {}
    base = ds.remove_columns("split") if "split" in ds.column_names else ds
    for name in names:
        part = base.select(sorted(assigned[name]))
        out[name] = part.add_column("split", [name] * len(part), feature=datasets.Value("string"))
        if "split" in ds.column_names:
            out[name] = out[name].select_columns(ds.column_names)
    return datasets.DatasetDict(out)


def _by_split(data: datasets.DatasetDict | datasets.Dataset | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(data, datasets.Dataset):
        if "split" not in data.column_names:
            raise KeyError(f"leakage_report needs a DatasetDict or a 'split' column; found {data.column_names}")
        splits = data["split"]
        return {s: data.select([i for i, x in enumerate(splits) if x == s]) for s in sorted(set(splits))}
    return dict(data)


def leakage_report(
    data: datasets.DatasetDict | datasets.Dataset, keys: Iterable[str] = ("group_id", "image"), examples: int = 5
) -> dict[str, Any]:
    """Count values of each key that occur in more than one split.

    Args:
        data: a DatasetDict (split → records) or one Dataset with a ``split`` column.
        keys: columns to check (groups, images; any string column works).
        examples: how many shared values to list per key.

    Returns:
        ``{"rows": {split: n}, key: {"shared": n_values_in_2+_splits, "pairs": {"test|train": n},
        "rows_affected": {split: n_rows_whose_value_is_shared}, "examples": [...]}}``.
        Empty values are ignored.
    """
    parts = _by_split(data)
    report: dict[str, Any] = {"rows": {s: len(d) for s, d in parts.items()}}
    for key in keys:
        where: dict[str, set[str]] = defaultdict(set)
        columns = {s: d[key] if key in d.column_names else [] for s, d in parts.items()}
        for s, values in columns.items():
            for v in values:
                if v:
                    where[v].add(s)
        shared = {v: ss for v, ss in where.items() if len(ss) > 1}
        pairs: dict[str, int] = defaultdict(int)
        for ss in shared.values():
            ordered = sorted(ss)
            for i, a in enumerate(ordered):
                for b in ordered[i + 1:]:
                    pairs[f"{a}|{b}"] += 1
        report[key] = {
            "shared": len(shared),
            "pairs": dict(sorted(pairs.items())),
            "rows_affected": {s: sum(1 for v in vals if v in shared) for s, vals in columns.items()},
            "examples": sorted(shared)[:examples],
        }
        if shared:
            logger.warning("leakage: %d %s values appear in more than one split (%s)", len(shared), key, dict(pairs))
    return report
