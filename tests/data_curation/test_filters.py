"""Filter steps: each keeps and rejects crafted records, with its reason in the rejects file."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from medvlm.data_curation.filters import (
    BlindCheck,
    FilterConfigError,
    FilterPipeline,
    average_hash,
    make_step,
)
from medvlm.records import make_record, to_dataset


def rec(rid, question="What is shown?", answer="nodule", answer_type="open", choices=(), image="img.png",
        meta=None):
    return make_record(id=rid, image=image, question=question, answer=answer, answer_type=answer_type,
                       choices=list(choices), source="test", split="train", group_id=rid, meta=meta or {})


def run(tmp_path, records, *steps):
    result = FilterPipeline(list(steps), batch_size=2).run(to_dataset(records), tmp_path)
    rejects = [json.loads(line) for line in result.rejects_path.read_text().splitlines()]
    return result, sorted(result.dataset["id"]), {r["id"]: r for r in rejects}


def test_format_check_rejects_empty_long_and_off_choice_answers(tmp_path):
    records = [rec("ok"), rec("empty-a", answer=" "), rec("long-q", question="x" * 50),
               rec("off", answer="maybe", answer_type="closed", choices=["yes", "no"]),
               rec("in", answer="Yes", answer_type="closed", choices=["yes", "no"])]
    result, kept, rejects = run(tmp_path, records, make_step("format", max_question_chars=40))
    assert kept == ["in", "ok"]
    assert rejects["empty-a"]["reason"] == "empty answer"
    assert rejects["long-q"]["reason"].startswith("question too long (50 > 40")
    assert "not one of its choices" in rejects["off"]["reason"]
    assert rejects["off"]["step"] == "format" and rejects["off"]["answer"] == "maybe"
    assert result.counts == [{"step": "format", "in": 5, "out": 2, "rejected": 3, "noted": 0}]


def test_answer_in_question_skips_closed_and_yes_no(tmp_path):
    records = [rec("give", question="Is the nodule in the left lung a nodule?", answer="Nodule."),
               rec("fine", question="What is the abnormality?", answer="nodule"),
               rec("closed", question="Left or right?", answer="left", answer_type="closed",
                   choices=["left", "right"]),
               rec("zh-give", question="左肺的结节在左肺吗？", answer="左肺"),  # "left lung" in the question
               rec("zh-fine", question="病变在哪里？", answer="左肺")]
    _, kept, rejects = run(tmp_path, records, make_step("answer_in_question"))
    assert kept == ["closed", "fine", "zh-fine"]
    assert "'左肺' appears in it" in rejects["zh-give"]["reason"]
    assert rejects["give"]["reason"] == "the question gives the answer away ('nodule' appears in it)"


def test_pathology_keeps_mentions_and_drops_rare_conditions(tmp_path):
    records = [rec(f"n{i}", answer="nodule") for i in range(3)]
    records += [rec("cyst", answer="A simple CYST.")]
    records += [rec("cui", question="What?", answer="something", meta={"cuis": ["C0006826"]})]
    records += [rec("meta", question="Where?", answer="left", meta={"caption": "a large Nodule"})]
    records += [rec("none", question="Which modality?", answer="CT")]
    step = make_step("pathology", keywords={"nodule": ["nodules"], "cyst": []}, cuis={"C0006826": "neoplasm"},
                     min_count=2)
    result, kept, rejects = run(tmp_path, records, step)
    assert kept == ["meta", "n0", "n1", "n2"]
    assert rejects["none"]["reason"] == "no pathology from the list is mentioned"
    assert rejects["cyst"]["reason"] == "pathology 'cyst' has 1 examples (< min_count 2)"
    assert rejects["cui"]["reason"] == "pathology 'neoplasm' has 1 examples (< min_count 2)"
    assert result.counts[0]["rejected"] == 3


def test_exact_and_near_duplicate_questions(tmp_path):
    records = [rec("a", question="Where is the nodule located?", answer="left lung"),
               rec("a-copy", question="where is the NODULE located", answer="Left lung."),
               rec("other-image", question="Where is the nodule located?", answer="left lung", image="b.png"),
               rec("near", question="Where is the nodule located exactly?", answer="upper left"),
               rec("different", question="What size is the nodule?", answer="5 mm")]
    result, kept, rejects = run(tmp_path, records, make_step("exact_duplicates"),
                                make_step("near_duplicate_questions", threshold=0.8))
    assert kept == ["a", "different", "other-image"]
    assert rejects["a-copy"]["reason"] == "exact duplicate of 'a'"
    assert rejects["near"]["step"] == "near_duplicate_questions"
    assert "of 'a' on the same image (token-set Jaccard 0.80 >= 0.8)" in rejects["near"]["reason"]
    assert [c["rejected"] for c in result.counts] == [1, 1]
    assert [c["in"] for c in result.counts] == [5, 4]


def test_near_duplicate_chinese_questions_compare_characters(tmp_path):
    # SLAKE's Chinese questions have no spaces: as whole words they would never be near duplicates
    records = [rec("zh", question="这张图片中的器官是什么？", answer="肺"),
               rec("zh-near", question="这张图片中的器官是什么呢？", answer="肺"),
               rec("zh-other", question="病变在哪里？", answer="左肺"),
               rec("zh-liver", question="图中的肝脏是否正常？", answer="是"),  # is the liver normal?
               rec("zh-heart", question="图中的心脏是否正常？", answer="否")]  # is the heart normal?
    _, kept, rejects = run(tmp_path, records, make_step("near_duplicate_questions", threshold=0.8))
    assert kept == ["zh", "zh-heart", "zh-liver", "zh-other"]  # one organ apart is another question
    assert "of 'zh' on the same image" in rejects["zh-near"]["reason"]


def _png(path, array):
    Image.fromarray(array.astype(np.uint8)).save(path)
    return str(path)


def test_duplicate_images_exact_near_and_corrupt(tmp_path):
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (32, 32), dtype=np.uint8)
    a = _png(tmp_path / "a.png", base)
    same = tmp_path / "same.png"
    same.write_bytes((tmp_path / "a.png").read_bytes())
    near = _png(tmp_path / "near.png", np.clip(base.astype(int) + 2, 0, 255))
    other = _png(tmp_path / "other.png", np.tile(np.arange(32) * 8, (32, 1)))
    bad = tmp_path / "bad.png"
    bad.write_bytes((tmp_path / "a.png").read_bytes()[:60])  # truncated
    records = [rec("a1", image=a), rec("a2", question="Where?", image=a), rec("same", image=str(same)),
               rec("near", image=near), rec("other", image=other), rec("bad", image=str(bad)),
               rec("missing", image=str(tmp_path / "nope.png"))]
    _, kept, rejects = run(tmp_path / "out", records, make_step("duplicate_images", max_hamming=4))
    assert kept == ["a1", "a2", "other"]
    assert rejects["same"]["reason"] == f"duplicate image: same bytes as {a!r}"
    assert rejects["near"]["reason"].startswith(f"near-identical image to {a!r}")
    assert rejects["bad"]["reason"].startswith("image unreadable (")
    assert "nope.png" in rejects["missing"]["reason"]


def test_average_hash_is_stable_and_separates_images(tmp_path):
    grad = _png(tmp_path / "g.png", np.tile(np.arange(64) * 4, (64, 1)))
    flipped = _png(tmp_path / "f.png", np.tile(np.arange(64)[::-1] * 4, (64, 1)))
    assert average_hash(grad) == average_hash(grad)
    assert bin(average_hash(grad) ^ average_hash(flipped)).count("1") == 64


class FakeLLM:
    """Canned blind answers: raises for one question, answers some right and some wrong."""

    def __init__(self, answers):
        self.answers, self.prompts = answers, []

    def generate(self, prompt, **kw):
        self.prompts.append(prompt)
        for key, value in self.answers.items():
            if key in prompt:
                if isinstance(value, Exception):
                    raise value
                return value
        return "no idea"


def test_blind_check_rejects_answerable_keeps_errors_with_note(tmp_path):
    llm = FakeLLM({"capital": "Paris.\nBecause...", "broken": ConnectionError("server down"),
                   "finding": "mass"})
    records = [rec("blind", question="What is the capital of France?", answer="paris"),
               rec("err", question="Is the broken one here?", answer="x"),
               rec("needs-image", question="What is the finding?", answer="nodule"),
               rec("yn", question="Is the capital shown?", answer="yes", answer_type="closed",
                   choices=["yes", "no"])]
    result, kept, rejects = run(tmp_path, records, BlindCheck(llm=llm))
    assert kept == ["err", "needs-image", "yn"]
    assert rejects["blind"]["reason"] == "answerable without the image"
    notes = [json.loads(x) for x in result.notes_path.read_text().splitlines()]
    assert notes == [{**{k: notes[0][k] for k in notes[0]}, "id": "err", "step": "blind_check",
                      "note": "blind check failed: ConnectionError: server down"}]
    assert result.counts[0]["noted"] == 1
    assert len(llm.prompts) == 3  # the closed yes/no question was not asked
    assert "Question: What is the capital of France?" in llm.prompts[0]
    assert "nodule" not in " ".join(llm.prompts)  # only the question goes to the LLM


def test_blind_check_matches_yes_no_when_closed_types_asked():
    step = BlindCheck(llm=FakeLLM({}), answer_types=("closed",))
    assert step.same("Yes, clearly", "yes") and not step.same("No", "yes")
    assert "Options: left, right" in step.prompt("Which side?", ["left", "right"])


def test_unknown_step_and_option_suggest_names():
    with pytest.raises(FilterConfigError, match="Did you mean 'exact_duplicates'"):
        make_step("exact_duplicate")
    with pytest.raises(FilterConfigError, match="Did you mean 'max_hamming'"):
        make_step("duplicate_images", max_haming=3)
    with pytest.raises(FilterConfigError, match="needs `llm`"):
        make_step("blind_check")
    with pytest.raises(FilterConfigError, match="keywords"):
        make_step("pathology")


def test_pipeline_from_config_chains_counts(tmp_path):
    records = [rec("a"), rec("b", answer=""), rec("a2", question="what is shown")]
    pipe = FilterPipeline.from_config(["format", {"exact_duplicates": {}}, {"step": "answer_in_question"}])
    result = pipe.run(to_dataset(records), tmp_path)
    assert [(c["step"], c["in"], c["out"]) for c in result.counts] == [
        ("format", 3, 2), ("exact_duplicates", 2, 1), ("answer_in_question", 1, 1)]
    assert pipe.describe()[0] == {"step": "format", "max_question_chars": 1000, "max_answer_chars": 2000}


def test_prefix_filtered_near_duplicates_match_brute_force():
    from medvlm.data_curation.filters import _near_duplicates

    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(12)]
    group = [(i, set(rng.choice(words, size=rng.integers(1, 7), replace=False).tolist())) for i in range(150)]
    kept, brute = [], []
    for row, toks in group:  # the obvious quadratic search, for reference
        best = max(((len(toks & t) / len(toks | t), r) for r, t in kept), default=(0.0, -1))
        if best[0] >= 0.6:
            brute.append(row)
        else:
            kept.append((row, toks))
    assert [r for r, _, _ in _near_duplicates(group, 0.6)] == brute


def test_row_wise_steps_in_two_processes_match_one(tmp_path):
    records = [rec(f"r{i}", question=f"Is {i} the nodule?" if i % 3 else "What is it?", answer="nodule" if i % 4
                   else "") for i in range(30)]
    steps = ["format", "answer_in_question"]
    one = FilterPipeline.from_config(steps, batch_size=2).run(to_dataset(records), tmp_path / "one")
    two = FilterPipeline.from_config(steps, batch_size=2, num_proc=2).run(to_dataset(records), tmp_path / "two")
    assert one.dataset["id"] == two.dataset["id"] and one.counts == two.counts
    assert one.rejects_path.read_text() == two.rejects_path.read_text() != ""
