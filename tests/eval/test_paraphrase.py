"""Paraphrase groups from phantom questions, and their robustness scores."""

from __future__ import annotations

import json

import pytest

from medvlm.eval.paraphrase import PARAPHRASES, paraphrase_records, paraphrases
from medvlm.eval.robustness import robustness_scores


def _rec(rid: str, question: str, qtype: str | None = None, answer: str = "yes") -> dict:
    meta = json.dumps({"qtype": qtype}) if qtype else "{}"
    return {"id": rid, "question": question, "answer": answer, "image": "x.png", "meta": meta,
            "choices": ["yes", "no"], "answer_type": "closed"}


def test_every_phantom_question_type_is_paraphrased(small_phantom):
    from medvlm.data_curation.phantom import ALL_TYPES, load_phantom

    records = load_phantom(small_phantom, kind="qa", split="test")
    rows, skipped = paraphrase_records(records)
    assert skipped == []
    assert {json.loads(r["meta"])["qtype"] for r in rows} == set(ALL_TYPES) == set(PARAPHRASES)
    assert len(rows) == 4 * len(records) and len({r["id"] for r in rows}) == len(rows)
    by_group: dict[str, list[dict]] = {}
    for r in rows:
        by_group.setdefault(r["group"], []).append(r)
    for rec in records:
        group = by_group[rec["id"]]
        assert [r["variant"] for r in group] == ["base", "p1", "p2", "p3"]
        assert group[0]["question"] == rec["question"] and len({r["question"] for r in group}) == 4
        assert all(r["image"] == rec["image"] and r["answer"] == rec["answer"] for r in group)


@pytest.mark.parametrize(
    "question, qtype, kept",
    [
        ("Is the abnormality in the left lung?", "side_yn", "left lung"),
        ("Is this a X-ray image?", "modality_yn", "X-ray"),
        ("Is the abnormality a cyst?", "finding_yn", "cyst"),
        ("Which side of the kidney holds the abnormality, left or right?", "side", "kidney"),
    ],
)
def test_slots_of_the_question_are_carried_into_every_wording(question, qtype, kept):
    variants = paraphrases(question, qtype)
    assert len(variants) == 3 and all(kept in v for v in variants) and question not in variants


def test_wording_matches_without_a_qtype_and_unmatched_records_are_listed():
    rows, skipped = paraphrase_records([_rec("a", "Is there an abnormality in this image?"),
                                        _rec("b", "How many ribs are visible?", "count")], max_variants=2)
    assert [r["id"] for r in rows] == ["a", "a~p1", "a~p2"]
    assert rows[1]["question"] == "Does this image show any lesion?"
    assert skipped == [{"id": "b", "reason": "no paraphrase pattern matches the question "
                                            "'How many ribs are visible?' (qtype 'count')"}]


def test_robustness_scores_of_paraphrase_predictions():
    rows, _ = paraphrase_records([_rec("a", "Is there an abnormality in this image?"),
                                  _rec("b", "Is the abnormality a mass?", "finding_yn", answer="no")])
    preds = {"a": "yes", "a~p1": "yes", "a~p2": "no", "a~p3": "yes", "b": "no", "b~p1": "no", "b~p2": "no",
             "b~p3": "no"}
    scored = robustness_scores([{**r, "prediction": preds[r["id"]], "latency_s": 0.5} for r in rows],
                               n_resamples=0)
    assert scored["n_groups"] == 2 and scored["n_flip_pairs"] == 6
    assert scored["flip_rate"] == pytest.approx(1 / 6)  # only a~p2 flips against its base
    assert scored["full_consistency_rate"] == 0.5 and scored["per_variant"]["p2"]["accuracy"] == 0.5
    assert scored["latency"]["mean"] == 0.5


def test_dataset_paraphrase_groups_are_kept_as_the_dataset_worded_them():
    """cxr_paraphrase records carry their group and variant in meta: used as is, never re-worded."""
    from medvlm.eval.run import prediction_rows
    from medvlm.eval.scoring import score_records

    wordings = ["Is there an effusion?", "Do you see pleural fluid?", "Any effusion present?"]
    records = [{"id": f"cxr-{s}-{v}", "question": q, "answer": ans, "answer_type": "closed", "choices": [],
                "meta": json.dumps({"question_variant": str(v), "paraphrase_group": f"{s}|img|{ans}"})}
               for s, ans in (("s1", "Yes"), ("s2", "No")) for v, q in enumerate(wordings)]
    rows, skipped = paraphrase_records(records)
    assert skipped == [] and [r["question"] for r in rows] == wordings * 2
    assert [(r["group"], r["variant"]) for r in rows[:3]] == [("s1|img|Yes", "0"), ("s1|img|Yes", "1"),
                                                              ("s1|img|Yes", "2")]

    # the plain predictions of such a dataset carry the groups, so robustness is scored without paraphrasing
    preds = prediction_rows(records, ["yes", "no", "yes", "no", "no", "no"])
    assert [(p["group"], p["variant"]) for p in preds] == [(r["group"], r["variant"]) for r in rows]
    rob = score_records(preds, bootstrap=0, slice_by=())["robustness"]
    assert rob["n_groups"] == 2 and rob["n_flip_pairs"] == 4
    assert rob["flip_rate"] == 0.25  # s1: variant 1 answered "no" (wrong) while the base was right
    assert rob["per_variant"]["1"] == {"n": 2, "accuracy": 0.5}
    assert rob["full_consistency_rate"] == 0.5
