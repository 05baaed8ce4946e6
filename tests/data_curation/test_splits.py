"""Group splits are deterministic and leak-free; the leakage report counts what splits share."""

from __future__ import annotations

import datasets
import pytest

from medvlm.data_curation.splits import leakage_report, split_by_group
from medvlm.records import make_record, to_dataset


def _records(n_groups=40, per_group=(1, 2, 3)):
    recs = []
    for g in range(n_groups):
        for q in range(per_group[g % len(per_group)]):
            recs.append(make_record(id=f"g{g}-q{q}", image=f"img/g{g}.png", question="Is there a lesion?",
                                    answer="yes", answer_type="closed", source="t", split="", group_id=f"g{g}"))
    return to_dataset(recs)


def _groups(dsd):
    return {name: set(part["group_id"]) for name, part in dsd.items()}


def test_split_by_group_keeps_each_group_in_one_split():
    ds = _records()
    dsd = split_by_group(ds, seed=0)
    groups = _groups(dsd)
    assert sum(len(p) for p in dsd.values()) == len(ds)
    assert not (groups["train"] & groups["validation"] or groups["train"] & groups["test"]
                or groups["validation"] & groups["test"])
    assert all(set(p["split"]) == {name} for name, p in dsd.items())
    assert dsd["train"].features == ds.features  # same schema, split filled in
    assert 0.7 <= len(dsd["train"]) / len(ds) <= 0.9
    report = leakage_report(dsd)
    assert report["group_id"]["shared"] == 0 and report["image"]["shared"] == 0


def test_split_by_group_is_deterministic_and_order_independent():
    ds = _records()
    a = split_by_group(ds, seed=3)
    b = split_by_group(ds.shuffle(seed=11), seed=3)
    assert _groups(a) == _groups(b)
    assert _groups(split_by_group(ds, seed=4)) != _groups(a)  # the seed matters


def test_split_by_group_custom_ratios_and_bad_ratios():
    ds = _records(n_groups=10, per_group=(1,))
    dsd = split_by_group(ds, ratios={"train": 0.5, "test": 0.5})
    assert sorted(dsd) == ["test", "train"] and len(dsd["train"]) == len(dsd["test"]) == 5
    with pytest.raises(ValueError, match="sum to 1"):
        split_by_group(ds, ratios={"train": 0.5, "test": 0.2})


def test_rows_without_group_fall_back_to_their_image():
    ds = _records(n_groups=6, per_group=(2,))
    ds = ds.map(lambda r: {"group_id": ""})
    dsd = split_by_group(ds, ratios={"train": 0.5, "test": 0.5})
    images = {n: set(p["image"]) for n, p in dsd.items()}
    assert not images["train"] & images["test"]


def test_leakage_report_counts_shared_groups_and_images():
    ds = datasets.Dataset.from_dict({
        "group_id": ["p1", "p1", "p2", "p3", "p3", "p4"],
        "image": ["a.png", "a.png", "b.png", "c.png", "d.png", ""],
        "split": ["train", "test", "train", "train", "validation", "test"],
    })
    report = leakage_report(ds)
    assert report["rows"] == {"test": 2, "train": 3, "validation": 1}
    assert report["group_id"]["shared"] == 2
    assert report["group_id"]["pairs"] == {"test|train": 1, "train|validation": 1}
    assert report["group_id"]["rows_affected"] == {"test": 1, "train": 2, "validation": 1}
    assert report["image"]["shared"] == 1 and report["image"]["examples"] == ["a.png"]
    with pytest.raises(KeyError, match="split"):
        leakage_report(ds.remove_columns("split"))
