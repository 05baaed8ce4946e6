"""Mix reports: condition / modality / body-part counts per mix as PNG, Markdown and CSV."""

from __future__ import annotations

import csv
from pathlib import Path

import datasets
import pytest
from PIL import Image

from medvlm.data_curation.reports import compare_mix_folders, conditions_of, write_mix_report
from medvlm.records import make_record, to_dataset


def mix(spec):
    """spec: list of (modality, body_part, meta) per row."""
    return to_dataset([make_record(id=f"r{i}", image="x.png", question="q?", answer="a", answer_type="open",
                                   source="s", split="train", group_id="g", modality=m, body_part=b, meta=meta)
                       for i, (m, b, meta) in enumerate(spec)])


def test_conditions_from_meta_fields_and_concepts():
    assert conditions_of('{"finding": "Nodule", "diagnosis": "suspected neoplasm"}') == ["nodule",
                                                                                          "suspected neoplasm"]
    assert conditions_of('{"finding": "none", "concepts": ["Pneumonia", {"name": "Effusion"}]}') == [
        "(no finding)", "pneumonia", "effusion"]
    assert conditions_of("not json") == [] and conditions_of('{"findings": "' + "x" * 200 + '"}') == []


def test_report_files_hold_counts_and_shares(tmp_path):
    a = mix([("CT", "chest", {"finding": "nodule"})] * 3 + [("MRI", "head", {"finding": "none"})])
    b = mix([("CT", "chest", {"finding": "cyst"})] * 2)
    paths = write_mix_report({"candidate A": a, "candidate|B": b}, tmp_path, title="two mixes")
    with open(paths["csv"], newline="") as fh:
        rows = list(csv.DictReader(fh))
    row = next(r for r in rows if r["category"] == "condition" and r["value"] == "nodule" and r["mix"] == "candidate A")
    assert row["count"] == "3" and float(row["share"]) == 0.75
    row = next(r for r in rows if r["category"] == "modality" and r["value"] == "MRI" and r["mix"] == "candidate|B")
    assert row["count"] == "0"
    md = paths["md"].read_text()
    assert "| value | candidate A | candidate&#124;B |" in md  # a pipe in a name cannot break the table
    assert "| nodule | 3 (75.0%) | 0 (0.0%) |" in md and "| cyst | 0 (0.0%) | 2 (100.0%) |" in md
    with Image.open(paths["png"]) as im:
        assert im.size[0] > 500 and im.size[1] > 500


def test_top_k_sums_the_rest_into_other(tmp_path):
    ds = mix([("CT", "chest", {"finding": f"f{i}"}) for i in range(5)])
    rows = list(csv.DictReader(open(write_mix_report({"m": ds}, tmp_path, top_k=2)["csv"], newline="")))
    cond = {r["value"]: int(r["count"]) for r in rows if r["category"] == "condition"}
    assert cond == {"f0": 1, "f1": 1, "(other)": 3}


def test_compare_folders_and_bad_input(tmp_path):
    for name in ("a", "b"):
        mix([("CT", "chest", {})]).save_to_disk(str(tmp_path / name / "dataset"))
    paths = compare_mix_folders([tmp_path / "a", tmp_path / "b"], tmp_path / "cmp")
    assert Path(paths["png"]).name == "comparison.png" and "| CT | 1 (100.0%) | 1 (100.0%) |" in paths["md"].read_text()
    with pytest.raises(FileNotFoundError, match="holds no dataset/ folder"):
        compare_mix_folders([tmp_path / "nothing"], tmp_path / "cmp")
    with pytest.raises(ValueError, match="at least one mix"):
        write_mix_report({}, tmp_path)
    assert isinstance(datasets.load_from_disk(str(tmp_path / "a" / "dataset")), datasets.Dataset)
