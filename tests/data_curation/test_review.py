"""Human review: sheet export, decisions imported back (accept / reject / edit), sheet validation."""

from __future__ import annotations

import csv
import json

import pytest

from medvlm.data_curation.review import SHEET_COLUMNS, ReviewError, apply_review, export_review_sheet
from medvlm.records import make_record, to_dataset


def dataset():
    return to_dataset([make_record(id=f"r{i}", image=f"/img/{i}.png", question=f"Question {i}?",
                                   answer=f"answer {i}", answer_type="open", source="test", split="train",
                                   group_id=f"g{i}", meta={"k": i}) for i in range(4)])


def fill(path, decisions):
    """Rewrite the exported sheet with {id: (decision, corrected_answer, note)}."""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        row["decision"], row["corrected_answer"], row["note"] = decisions.get(row["id"], ("", "", ""))
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=SHEET_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def test_review_round_trip_accept_reject_edit(tmp_path):
    ds = dataset()
    sheet = export_review_sheet(ds, tmp_path / "sheet.csv")
    with open(sheet, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == list(SHEET_COLUMNS)
    assert rows[1]["image"] == "/img/1.png" and rows[1]["decision"] == ""
    fill(sheet, {"r0": ("accept", "", ""), "r1": ("Reject", "", "wrong organ"),
                 "r2": ("edit", "left kidney", "side was wrong")})
    rejects = tmp_path / "rejects.jsonl"
    rejects.write_text(json.dumps({"id": "old", "step": "format", "reason": "empty answer"}) + "\n")
    result = apply_review(ds, sheet, rejects_path=rejects)
    assert result.counts == {"accept": 1, "reject": 1, "edit": 1, "undecided": 1}
    assert result.dataset["id"] == ["r0", "r2", "r3"]
    edited = result.dataset[1]
    assert edited["answer"] == "left kidney"
    assert json.loads(edited["meta"])["review"] == {"decision": "edit", "note": "side was wrong",
                                                   "original_answer": "answer 2"}
    assert result.dataset[2]["answer"] == "answer 3" and "review" not in json.loads(result.dataset[2]["meta"])
    lines = [json.loads(x) for x in rejects.read_text().splitlines()]
    assert lines[0]["id"] == "old"  # earlier rejects are kept
    assert lines[1]["id"] == "r1" and lines[1]["reason"] == "human review: wrong organ"
    assert lines[1]["step"] == "human_review" and lines[1]["question"] == "Question 1?"


def test_bad_sheet_lists_every_bad_line(tmp_path):
    ds = dataset()
    sheet = export_review_sheet(ds, tmp_path / "sheet.csv")
    fill(sheet, {"r0": ("acept", "", ""), "r1": ("edit", "", "")})
    with open(sheet, "a", newline="") as fh:
        csv.writer(fh).writerow(["ghost", "", "", "", "", "", "accept", "", ""])
        csv.writer(fh).writerow(["r3", "", "", "", "", "", "accept", "", ""])
    with pytest.raises(ReviewError) as err:
        apply_review(ds, sheet, rejects_path=tmp_path / "rejects.jsonl")
    msg = str(err.value)
    assert "line 2: decision 'acept' is not one of accept, reject, edit (did you mean 'accept'?)" in msg
    assert "line 3: decision 'edit' for id 'r1' needs a corrected_answer" in msg
    assert "line 6: id 'ghost' is not in the dataset" in msg
    assert "line 7: id 'r3' is listed again (first on line 5)" in msg
    assert not (tmp_path / "rejects.jsonl").exists()  # nothing applied


def test_missing_columns_and_undecided_rows_refused(tmp_path):
    ds = dataset()
    bad = tmp_path / "bad.csv"
    bad.write_text("id,answer\nr0,x\n")
    with pytest.raises(ReviewError, match=r"lacks columns \['decision', 'corrected_answer', 'note'\]"):
        apply_review(ds, bad)
    sheet = export_review_sheet(ds, tmp_path / "sheet.csv")
    with pytest.raises(ReviewError, match="4 row\\(s\\) have no decision"):
        apply_review(ds, sheet, require_decision=True)
