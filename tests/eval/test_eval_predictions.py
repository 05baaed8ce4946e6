"""Predictions files (ours and LLaVA-Med's), bad input, and the score_records structure."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from medvlm.eval.predictions import (
    MAX_PREDICTION_CHARS,
    PredictionsError,
    load_predictions,
    prepare_records,
    read_jsonl,
)
from medvlm.eval.scoring import load_suite, score_records

SUITES = Path(__file__).resolve().parents[2] / "eval" / "suites"


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _rec(i, answer="yes", prediction="yes", answer_type="closed", **extra):
    return {"id": str(i), "question": "q?", "answer": answer, "prediction": prediction,
            "answer_type": answer_type, **extra}


# --------------------------------------------------------------------------- reading files


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "preds.jsonl"
    path.write_text('{"id": "1"}\n\n{"id": 2,\n', encoding="utf-8")
    with pytest.raises(PredictionsError, match=r"preds\.jsonl:3: not valid JSON"):
        read_jsonl(path)


def test_non_object_line_is_an_error_naming_the_line(tmp_path):
    path = tmp_path / "preds.jsonl"
    path.write_text('{"id": "1"}\n[1, 2]\n', encoding="utf-8")
    with pytest.raises(PredictionsError, match=r"preds\.jsonl:2: expected a JSON object"):
        read_jsonl(path)


LLAVA_ANSWERS = [
    {"question_id": 1, "prompt": "Is there a mass?", "text": "Yes, there is.", "answer_id": "a1",
     "model_id": "llava-med", "metadata": {}},
    {"question_id": 2, "prompt": "What organ?", "text": "The liver", "answer_id": "a2",
     "model_id": "llava-med", "metadata": {}},
    {"question_id": 3, "prompt": "Which side?", "text": "left", "answer_id": "a3", "model_id": "llava-med",
     "metadata": {}},
    {"question_id": 99, "prompt": "?", "text": "no", "answer_id": "a4", "model_id": "llava-med", "metadata": {}},
]
LLAVA_QUESTIONS = [  # the three ways LLaVA-Med question files carry the reference
    {"id": 1, "image": "a.jpg", "conversatons": [{"from": "human", "value": "<image>\nIs there a mass?"},
                                                 {"from": "gpt", "value": "yes"}]},
    {"question_id": 2, "text": "What organ is shown?", "gpt4_answer": "liver"},
    {"question_id": 3, "question": "Which side?", "answer": "Left", "answer_type": "CLOSED"},
    {"question_id": 4, "question": "Unanswered?", "answer": "no"},
]


@pytest.mark.parametrize("as_json_list", [True, False])
def test_llava_med_answer_file_joins_question_file(tmp_path, as_json_list):
    answers = _write_jsonl(tmp_path / "answers.jsonl", LLAVA_ANSWERS)
    qpath = tmp_path / ("test.json" if as_json_list else "questions.jsonl")
    if as_json_list:
        qpath.write_text(json.dumps(LLAVA_QUESTIONS), encoding="utf-8")
    else:
        _write_jsonl(qpath, LLAVA_QUESTIONS)
    records, skipped = load_predictions(answers, qpath)
    by_id = {r["id"]: r for r in records}
    assert set(by_id) == {"1", "2", "3"}
    assert by_id["1"]["answer"] == "yes" and by_id["1"]["answer_type"] == "closed"  # inferred: yes/no
    assert by_id["1"]["question"] == "Is there a mass?" and by_id["1"]["prediction"] == "Yes, there is."
    assert by_id["2"]["answer"] == "liver" and by_id["2"]["answer_type"] == "open"  # inferred: not yes/no
    assert by_id["3"]["answer_type"] == "closed"  # given by the question file (CLOSED)
    reasons = {s["id"]: s["reason"] for s in skipped}
    assert "not found in questions file" in reasons["99"]
    assert "no answer" in reasons["4"]


def test_llava_med_answer_file_without_questions_explains_the_fix(tmp_path):
    answers = _write_jsonl(tmp_path / "answers.jsonl", LLAVA_ANSWERS)
    with pytest.raises(PredictionsError, match="--questions"):
        load_predictions(answers)


# --------------------------------------------------------------------------- bad input


def test_prepare_records_skips_and_counts_bad_input_without_raising():
    long_pred = "lesion " * 1000
    records = [
        _rec(1, prediction=""),  # empty: wrong, counted
        _rec(2, prediction=None),  # null: same
        _rec(3, answer=""),  # missing reference: skipped
        {"id": "4", "answer": "yes"},  # no prediction field: skipped
        _rec(5, answer_type="numeric"),  # unknown answer type: skipped
        _rec(6, answer="肺", prediction="肺部 🙂", answer_type="open"),  # non-ASCII: scored
        _rec(7, answer="lesion", prediction=long_pred, answer_type="open"),  # truncated
        _rec(8, answer_type=None),  # inferred
        _rec(1),  # duplicate id: skipped
        _rec(9, choices="A,B"),  # choices not a list: skipped
    ]
    clean, skipped, counts = prepare_records(records)
    assert [r["id"] for r in clean] == ["1", "2", "6", "7", "8"]
    reasons = {s["id"]: s["reason"] for s in skipped}
    assert set(reasons) == {"3", "4", "5", "1", "9"}
    assert "missing reference" in reasons["3"] and "numeric" in reasons["5"] and "duplicate" in reasons["1"]
    assert counts == {"n_empty": 2, "n_truncated": 1, "n_inferred_answer_type": 1}
    assert len(clean[3]["prediction"]) == MAX_PREDICTION_CHARS
    assert clean[4]["answer_type"] == "closed"


def test_empty_predictions_count_as_wrong_not_skipped():
    out = score_records([_rec(1, prediction=""), _rec(2, prediction="yes")], bootstrap=0)
    assert out["closed"]["n"] == 2 and out["closed"]["n_empty"] == 1
    assert out["closed"]["accuracy"] == 0.5
    assert out["counts"]["n_empty"] == 1 and out["counts"]["n_skipped"] == 0


# --------------------------------------------------------------------------- score_records structure


def test_score_records_structure_is_json_serialisable_with_null_for_empty_groups():
    records = [_rec(i, modality="CT") for i in range(4)]  # closed only: the open group is empty
    out = score_records(records, bootstrap=50)
    assert out["open"]["n"] == 0 and out["open"]["rougeL"] is None and out["open"]["bleu_ci"] is None
    assert out["closed"]["accuracy"] == 1.0 and out["closed"]["accuracy_ci"] == [1.0, 1.0]
    for key in ("exact_match", "substring", "llava_med_yesno", "token_recall", "medvlm_token_recall"):
        assert key in out["closed"] and f"{key}_ci" in out["closed"]
    assert "consistency" not in out and "robustness" not in out
    text = json.dumps(out, allow_nan=False)  # raises if a NaN slipped through
    assert json.loads(text)["slices"]["modality"]["CT"]["closed"]["n"] == 4


def test_metrics_json_records_cut_predictions_and_rows_where_rouge_leaves_rouge_score():
    records = [_rec(1, "lesion", "lesion " * 400, "open"), _rec(2, "β-blocker", "β-blocker", "open"),
               _rec(3, "lung", "lung", "open"), _rec(4, "yes", "x" * MAX_PREDICTION_CHARS + " yes")]
    out = score_records(records, bootstrap=0)
    assert out["counts"]["n_truncated"] == 2 and out["counts"]["n_open_non_ascii"] == 1
    assert out["config"]["max_prediction_chars"] == MAX_PREDICTION_CHARS
    assert out["closed"]["substring"] == 0.0  # the "yes" after the cut is not seen
    whole = score_records(records, bootstrap=0, max_prediction_chars=10 * MAX_PREDICTION_CHARS)
    assert whole["counts"]["n_truncated"] == 0 and whole["closed"]["substring"] == 1.0
    sources = out["config"]["metric_sources"]
    assert "lmms-eval" in sources["closed"]["exact_match"] and "LLaVA-Med" in sources["open"]["llava_med_recall"]


def test_score_records_open_metrics_report_mean_std_ci():
    records = [_rec(1, "left lung", "left lung", "open"), _rec(2, "right kidney", "the liver", "open")]
    out = score_records(records, bootstrap=100, seed=1)["open"]
    for name in ("rouge1", "rouge2", "rougeL", "bleu", "sentence_bleu", "token_recall", "token_f1",
                 "llava_med_recall", "multimedeval_recall"):
        assert {name, f"{name}_std", f"{name}_ci"} <= set(out)
        lo, hi = out[f"{name}_ci"]
        assert lo <= hi
    assert out["token_f1"] == pytest.approx(0.5) and out["rouge1"] == pytest.approx(0.5)


def test_slices_by_modality_and_missing_values():
    records = [
        _rec(1, modality="CT"), _rec(2, prediction="no", modality="CT"), _rec(3, modality="MRI"),
        _rec(4, answer="liver", prediction="liver", answer_type="open"),
    ]
    out = score_records(records, bootstrap=0, slice_by=("modality", "body_part"))
    sl = out["slices"]["modality"]
    assert sl["CT"]["closed"]["accuracy"] == 0.5 and sl["CT"]["n"] == 2
    assert sl["MRI"]["open"]["n"] == 0 and sl["MRI"]["open"]["token_f1"] is None
    assert sl["(missing)"]["open"]["token_f1"] == 1.0
    assert "body_part" not in out["slices"]  # no record carries it


def test_score_records_consistency_and_robustness_sections():
    samples_ok = ["yes", "yes", "yes", "no", "no"]
    records = [
        _rec(1, samples=samples_ok, group="g", variant="0"),
        _rec(2, samples=["yes", "no", "no", "maybe", "yes"], group="g", variant="1", prediction="no"),
        _rec(3, samples=["yes"] * 3),  # wrong k: left out of consistency only, recorded
    ]
    out = score_records(records, bootstrap=20)
    assert out["consistency"]["n"] == 2 and out["consistency"]["consistency_rate"] == 0.5
    assert out["closed"]["n"] == 3
    assert any(s["id"] == "3" and "k=5" in s["reason"] for s in out["skipped"])
    assert out["counts"]["n_skipped_consistency_only"] == 1
    assert out["robustness"]["flip_rate"] == 1.0


def test_score_records_is_seeded_reproducible():
    records = [_rec(i, prediction="yes" if i % 3 else "no") for i in range(30)]
    assert score_records(records, seed=5, bootstrap=200) == score_records(records, seed=5, bootstrap=200)


def test_unknown_metric_in_selection_fails_before_scoring():
    with pytest.raises(KeyError, match="Did you mean 'accuracy'"):
        score_records([_rec(1)], closed_metrics=["acuracy"])


def test_all_nan_free_even_with_only_skipped_records():
    out = score_records([_rec(1, answer="")], bootstrap=10)
    assert out["counts"]["n_scored"] == 0 and out["closed"]["accuracy"] is None
    assert not any(isinstance(v, float) and math.isnan(v) for v in out["closed"].values())


# --------------------------------------------------------------------------- suites


def test_shipped_suites_load_and_typos_are_reported(tmp_path):
    for name in ("default", "llava_med_vqa", "slake"):
        kwargs = load_suite(SUITES / f"{name}.yaml")
        assert kwargs["closed_metrics"] and kwargs["open_metrics"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("metrics:\n  open: [rouge_l]\n", encoding="utf-8")
    with pytest.raises(KeyError, match="rougeL"):
        load_suite(bad)
    bad.write_text("slices: [modality]\n", encoding="utf-8")
    with pytest.raises(ValueError, match="unknown suite keys"):
        load_suite(bad)
