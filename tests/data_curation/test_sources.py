"""Each dataset loader turns a format-faithful fixture into unified records, one test per quirk."""

from __future__ import annotations

import json
import logging
import re

import datasets
import fixtures_sources as fx
import pytest
import yaml
from PIL import Image

from medvlm.data_curation import load_source
from medvlm.data_curation.loading import UnknownSourceError
from medvlm.data_curation.mixing import MixError, build_mix
from medvlm.data_curation.splits import leakage_report
from medvlm.records import FEATURES, validate_record


def _load(name, root, tmp_path, **kw):
    res = load_source(name, root, image_cache_dir=tmp_path / "cache", **kw)
    assert res.dataset.features == FEATURES
    for rec in res.dataset:
        validate_record(rec)
    return res


def _by_id(ds):
    return {r["id"]: r for r in ds}


# SLAKE ---------------------------------------------------------------------------------------


def test_slake_english_default_and_no_skip_for_language(tmp_path):
    res = _load("slake", fx.write_slake(tmp_path / "slake"), tmp_path)
    metas = [json.loads(m) for m in res.dataset["meta"]]
    assert {m["q_lang"] for m in metas} == {"en"}
    assert all("language" not in s["reason"] for s in res.skipped)
    both = _load("slake", tmp_path / "slake", tmp_path, lang="all")
    assert len(both.dataset) == len(res.dataset) + 2  # the two Chinese rows


def test_slake_closed_answers_beyond_yes_no(tmp_path):
    recs = _by_id(_load("slake", fx.write_slake(tmp_path / "s"), tmp_path, split="train").dataset)
    assert recs["slake-train-1"]["answer"] == "yes" and recs["slake-train-1"]["answer_type"] == "closed"
    assert recs["slake-train-3"]["answer"] == "Lung" and recs["slake-train-3"]["answer_type"] == "closed"
    assert recs["slake-train-6"]["answer"] == "Left"


def test_slake_empty_answer_is_skipped_and_recorded(tmp_path):
    res = _load("slake", fx.write_slake(tmp_path / "s"), tmp_path)
    assert res.skipped == [{"source": "slake", "file": "train.json", "row": 4, "reason": "empty answer"}]


def test_slake_mask_roi_group_and_split_file_names(tmp_path):
    for hf in (False, True):
        root = fx.write_slake(tmp_path / f"s{hf}", hf_names=hf)
        recs = _by_id(_load("slake", root, tmp_path).dataset)
        rec = recs["slake-validation-7"]
        assert rec["split"] == "validation" and rec["group_id"] == "xmlab2"
        assert rec["roi"].endswith("imgs/xmlab2/mask.png") and rec["image"].endswith("xmlab2/source.jpg")
        assert rec["modality"] == "CT" and rec["body_part"] == "Lung"


def test_slake_unknown_column_kept_in_meta_and_warned_once(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        res = _load("slake", fx.write_slake(tmp_path / "s"), tmp_path)
    rec = _by_id(res.dataset)["slake-train-6"]
    assert json.loads(rec["meta"])["extra"] == {"difficulty": "easy"}
    assert sum("difficulty" in w for w in res.warnings) == 1
    assert sum("difficulty" in r.getMessage() for r in caplog.records) == 1


def test_slake_official_splits_share_an_image(tmp_path):
    res = _load("slake", fx.write_slake(tmp_path / "s"), tmp_path)
    report = leakage_report(res.dataset)
    assert report["image"]["shared"] == 1 and report["group_id"]["shared"] == 1
    assert report["group_id"]["pairs"] == {"test|train": 1}
    assert report["group_id"]["examples"] == ["xmlab1"]


def test_slake_parquet_copy_without_answer_type(tmp_path):
    root = fx.write_slake_parquet(tmp_path / "SLAKE-vqa-english")
    res = _load("slake", root, tmp_path)
    recs = _by_id(res.dataset)
    assert res.skipped == [] and sorted(recs) == ["slake-test-0", "slake-test-1", "slake-train-0", "slake-train-1",
                                                  "slake-train-2", "slake-validation-0"]
    kinds = {i: (r["answer"], r["answer_type"]) for i, r in recs.items()}
    assert kinds["slake-train-0"] == ("yes", "closed") and kinds["slake-validation-0"] == ("no", "closed")
    assert kinds["slake-train-1"] == ("Lung", "open") and kinds["slake-test-0"] == ("Left", "open")  # derived
    metas = [json.loads(r["meta"]) for r in recs.values()]
    assert all(m["answer_type_derived"] and m["q_lang"] == "en" and m["q_lang_derived"] for m in metas)
    assert recs["slake-train-0"]["image"] == recs["slake-test-0"]["image"]  # same picture, one file, one group
    assert recs["slake-train-0"]["group_id"] == recs["slake-test-0"]["group_id"] != recs["slake-train-2"]["group_id"]
    with Image.open(recs["slake-train-2"]["image"]) as im:
        assert im.size == (8, 8)
    assert _load("slake", root, tmp_path, split="validation").dataset["id"] == ["slake-validation-0"]
    assert len(_load("slake", root, tmp_path, lang="zh").dataset) == 0  # an English-only copy


def test_slake_folder_without_json_or_parquet_names_both_layouts(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"none of \('train.json'.*and no parquet files"):
        load_source("slake", tmp_path / "empty")


# ROCOv2 / MedPix -----------------------------------------------------------------------------


def test_rocov2_captions_with_concepts(tmp_path):
    res = _load("rocov2", fx.write_rocov2(tmp_path / "roco"), tmp_path, prompt="Caption this.")
    assert sorted(set(res.dataset["split"])) == ["test", "train", "validation"]
    rec = _by_id(res.dataset)["rocov2-ROCOv2_2023_train_000001"]
    meta = json.loads(rec["meta"])
    assert rec["question"] == "Caption this." and rec["answer_type"] == "open"
    assert rec["answer"].startswith("Axial CT") and rec["modality"] == "CT"
    assert meta["cuis"] == ["C0040405", "C0000726"]
    assert meta["concepts"] == ["X-Ray Computed Tomography", "Abdomen"]
    assert rec["image"].endswith("train/ROCOv2_2023_train_000001.jpg")


def test_medpix_tac_mri_lists_and_case_text(tmp_path):
    res = _load("medpix", fx.write_medpix(tmp_path / "mp"), tmp_path)
    recs = _by_id(res.dataset)
    assert len(recs) == 3 and not res.skipped
    assert recs["medpix-MPX1009_synpic1"]["modality"] == "CT"
    assert recs["medpix-MPX1009_synpic2"]["modality"] == "MRI"
    meta = json.loads(recs["medpix-MPX1009_synpic1"]["meta"])
    assert meta["age"] == 45 and meta["diagnosis"] == "Bladder Diverticulum"
    assert meta["history"].startswith("73-year-old")
    fallback = recs["medpix-MPX2000_synpic3"]
    assert fallback["answer"] == "Kidney cyst." and json.loads(fallback["meta"])["answer_from"] == "findings"
    assert fallback["group_id"] == "MPX2000" and fallback["split"] == ""
    with pytest.raises(FileNotFoundError, match=r"split 'train' needs splitted_dataset/data_train.jsonl.*split_by_group"):
        load_source("medpix", tmp_path / "mp", split="train")


@pytest.mark.parametrize("split, ids, record_split", [
    ("test", ["medpix-MPX2000_synpic10"], "test"),
    ("dev", ["medpix-MPX1009_synpic0"], "validation"),
    ("validation", ["medpix-MPX1009_synpic0"], "validation"),
    ("train", ["medpix-MPX3000_synpic20", "medpix-MPX3000_synpic21", "medpix-MPX3001_synpic30"], "train"),
    ("train_1", ["medpix-MPX3000_synpic20", "medpix-MPX3000_synpic21"], "train"),
    ("train-2", ["medpix-MPX3001_synpic30"], "train"),
])
def test_medpix_official_splits(tmp_path, split, ids, record_split):
    res = _load("medpix", fx.write_medpix_splits(tmp_path / "MedPix-2-0"), tmp_path, split=split)
    recs = _by_id(res.dataset)
    assert sorted(recs) == ids and res.skipped == [] and res.warnings == []
    assert {r["split"] for r in recs.values()} == {record_split}
    for rec in recs.values():
        meta = json.loads(rec["meta"])
        assert rec["answer"] == f"Caption of {meta['image_id']}." and rec["group_id"] == meta["u_id"]
        assert meta["official_split"] == {"validation": "dev", "train-2": "train_2"}.get(split, split)
        with Image.open(rec["image"]) as im:
            assert im.size == (8, 8)
    if split == "train":  # uid_list.json tells which half of train a case is in
        assert {json.loads(r["meta"])["train_part"] for r in recs.values()} == {"train_1", "train_2"}
        assert recs["medpix-MPX3000_synpic21"]["modality"] == "MRI"


def test_medpix_all_official_splits_without_the_train_halves_twice(tmp_path):
    res = _load("medpix", fx.write_medpix_splits(tmp_path / "MedPix-2-0"), tmp_path)
    assert sorted(res.dataset["split"]) == ["test", "train", "train", "train", "validation"]
    assert len(set(res.dataset["id"])) == 5 and res.skipped == []
    with pytest.raises(ValueError, match="unknown split 'train_3'; use one of train, validation, test, train_1"):
        load_source("medpix", tmp_path / "MedPix-2-0", split="train_3")


def test_medpix_case_missing_from_uid_list_is_a_warning_not_a_drop(tmp_path):
    root = fx.write_medpix_splits(tmp_path / "MedPix-2-0")
    uids = json.loads((root / "splitted_dataset" / "uid_list.json").read_text())
    fx.write_json(root / "splitted_dataset" / "uid_list.json", {**uids, "test": ["MPX9999"]})
    res = _load("medpix", root, tmp_path, split="test")
    assert res.dataset["id"] == ["medpix-MPX2000_synpic10"]
    assert res.warnings == ["medpix: splitted_dataset/data_test.jsonl holds cases not listed under 'test' in "
                            "uid_list.json: ['MPX2000']"]


def test_medpix_bad_jsonl_line_is_a_recorded_skip(tmp_path):
    root = fx.write_medpix_splits(tmp_path / "MedPix-2-0")
    with open(root / "splitted_dataset" / "descriptions_test.jsonl", "a") as fh:
        fh.write('{"Type": "CT", "U_id": \n')
    res = _load("medpix", root, tmp_path, split="test")
    assert res.dataset["id"] == ["medpix-MPX2000_synpic10"]
    assert [(s["file"], s["row"]) for s in res.skipped] == [("splitted_dataset/descriptions_test.jsonl", 1)]
    assert res.skipped[0]["reason"].startswith("invalid JSON line")


# HF-format sets ------------------------------------------------------------------------------


def test_medpix_shortqa_image_in_image_id_column_is_cached_once(tmp_path):
    res = _load("medpix_shortqa", fx.write_medpix_shortqa(tmp_path / "sq"), tmp_path)
    recs = _by_id(res.dataset)
    train = [r for r in recs.values() if r["split"] == "train"]
    assert len(train) == 2 and train[0]["image"] == train[1]["image"]  # same bytes, one file
    assert train[0]["image"].startswith(str(tmp_path / "cache"))
    assert {r["answer_type"] for r in train} == {"open", "closed"}
    assert train[0]["group_id"] == "MPX1009"
    assert len(list((tmp_path / "cache").iterdir())) == 2
    assert [r["split"] for r in recs.values() if r["answer"] == "Kidney"] == ["validation"]


def test_roco_qa_picture_in_image_id_string_in_image_id_vaild_is_validation(tmp_path):
    root = fx.write_roco_qa(tmp_path / "rq")
    res = _load("roco_qa", root, tmp_path)
    assert res.skipped == [] and len(res.dataset) == 6
    recs = _by_id(res.dataset)
    assert sorted(recs) == [f"roco_qa-test-{i}" for i in range(3)] + [f"roco_qa-validation-{i}" for i in range(3)]
    first = recs["roco_qa-validation-0"]
    assert json.loads(first["meta"])["image_id"] == "ROCO_00020" and first["group_id"] == "ROCO_00020"
    assert json.loads(first["meta"])["image_column"] == "image" and first["answer"] == "A fracture"
    assert first["image"] == recs["roco_qa-validation-1"]["image"]  # same picture, one cached file
    with Image.open(first["image"]) as im:
        assert im.size == (8, 8)
    # the Test split's two shards number on: no id collides, every row is kept
    assert [recs[f"roco_qa-test-{i}"]["group_id"] for i in range(3)] == ["ROCO_00100", "ROCO_00101", "ROCO_00102"]
    only = _load("roco_qa", root, tmp_path, split="Vaild")
    assert only.dataset["split"] == ["validation"] * 3 and only.dataset["answer"] == ["A fracture", "yes", "no"]


def test_roco_qa_train_shards_all_load(tmp_path):
    res = _load("roco_qa", fx.write_roco_qa_train(tmp_path / "rqt"), tmp_path, split="train")
    assert len(res.dataset) == 4 and res.skipped == []
    assert sorted(res.dataset["group_id"]) == ["ROCO_10000", "ROCO_10001", "ROCO_11000", "ROCO_11001"]
    assert len(set(res.dataset["image"])) == 4


def test_hf_qa_image_column_chosen_by_content(tmp_path):
    """A copy whose ``image`` names a file in the folder and ``image_id`` holds an id: the file is used;
    a row where no column holds a picture is skipped with what each column held."""
    root = tmp_path / "q"
    fx.write_image(root / "imgs" / "a.png")
    path = root / "data" / "test-00000-of-00001.parquet"
    path.parent.mkdir(parents=True)
    datasets.Dataset.from_dict({"image_id": ["ROCO_1", "ROCO_2"], "image": ["imgs/a.png", "imgs/missing.png"],
                                "question": ["Q1?", "Q2?"], "answer": ["yes", "no"]}).to_parquet(str(path))
    res = _load("roco_qa", root, tmp_path)
    assert res.dataset["image"] == [str((root / "imgs" / "a.png").resolve())]
    assert res.skipped[0]["row"] == 1 and "image: 'imgs/missing.png'" in res.skipped[0]["reason"]
    assert "image_id: 'ROCO_2'" in res.skipped[0]["reason"]


# PMC-VQA -------------------------------------------------------------------------------------


def test_pmc_vqa_v1_letter_prefixed_choices_and_anwser_spelling(tmp_path):
    recs = _by_id(_load("pmc_vqa", fx.write_pmc_vqa(tmp_path / "p"), tmp_path, version="1").dataset)
    train, test = recs["pmc_vqa-v1-train-0"], recs["pmc_vqa-v1-test-0"]
    assert train["choices"] == ["CT", "MRI", "PET", "US"] and train["answer"] == "CT"
    assert test["answer"] == "Liver" and test["answer_type"] == "closed"  # from the "Anwser" column
    assert train["group_id"] == "PMC100"


def test_pmc_vqa_v2_letter_answers_and_padded_choices(tmp_path):
    recs = _by_id(_load("pmc_vqa", fx.write_pmc_vqa(tmp_path / "p"), tmp_path).dataset)
    rec = recs["pmc_vqa-v2-train-0"]
    assert rec["choices"] == ["Axial", "Sagittal", "Coronal view", "Oblique"]
    assert rec["answer"] == "Coronal view" and json.loads(rec["meta"])["answer_letter"] == "C"
    assert recs["pmc_vqa-v2-test-0"]["answer"] == "Left"


def test_pmc_vqa_version_resolved_per_split(tmp_path):
    """v1's train.csv beside v2's test_2.csv: each split reads the version that has it (not 0 train rows)."""
    root = fx.write_pmc_vqa(tmp_path / "p")
    (root / "test.csv").unlink()
    (root / "train_2.csv").unlink()
    res = _load("pmc_vqa", root, tmp_path)
    assert sorted(res.dataset["id"]) == ["pmc_vqa-v1-train-0", "pmc_vqa-v2-test-0"] and res.warnings == []
    train = _load("pmc_vqa", root, tmp_path, split="train").dataset
    assert train["id"] == ["pmc_vqa-v1-train-0"] and train["answer"] == ["CT"]
    with Image.open(train["image"][0]) as im:
        assert im.size == (8, 8)


def test_pmc_vqa_both_versions_default_is_said_and_version_option_chooses(tmp_path, caplog):
    root = fx.write_pmc_vqa(tmp_path / "p")
    with caplog.at_level(logging.WARNING):
        res = _load("pmc_vqa", root, tmp_path, split="train")
    assert res.dataset["id"] == ["pmc_vqa-v2-train-0"]
    assert res.warnings == ["pmc_vqa: both v1 (train.csv) and v2 (train_2.csv) hold the train split; reading v2 "
                            "(train_2.csv); pass version=1 or version=2 to choose"]
    assert res.warnings[0] in caplog.text
    for version in (1, "v1", "1"):
        v1 = _load("pmc_vqa", root, tmp_path, version=version)
        assert sorted(v1.dataset["id"]) == ["pmc_vqa-v1-test-0", "pmc_vqa-v1-train-0"] and v1.warnings == []


def test_pmc_vqa_missing_file_raises_naming_what_was_looked_for_and_what_exists(tmp_path):
    root = fx.write_pmc_vqa(tmp_path / "p")
    (root / "train_2.csv").unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(
            "no version-2 file for split train (looked for ['train_2.csv']) in ")) as err:
        load_source("pmc_vqa", root, split="train", version=2)
    assert "it holds ['test.csv', 'test_2.csv', 'train.csv']" in str(err.value)
    with pytest.raises(FileNotFoundError, match="ships no validation split"):
        load_source("pmc_vqa", root, split="validation")
    for name in ("train.csv", "test.csv"):
        (root / name).unlink()
    res = _load("pmc_vqa", root, tmp_path)  # split=None: the test split loads, the missing train is said
    assert res.dataset["id"] == ["pmc_vqa-v2-test-0"]
    assert res.warnings == [f"pmc_vqa: no file for split train (looked for ['train.csv', 'train_2.csv']) in {root}"
                            "; it holds ['test_2.csv']; read ['test_2.csv'] only"]


def test_pmc_vqa_version_from_a_mix_yaml(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDVLM_HOME", str(tmp_path / "home"))
    root = fx.write_pmc_vqa(tmp_path / "p")
    mix = {"seed": 0, "stopping_strategy": "once", "phases": [{"name": "main", "weights": {"pmc": 1.0}}],
           "sources": [{"name": "pmc", "source": "pmc_vqa", "path": str(root), "split": "train",
                        "options": {"version": 1}}]}
    (tmp_path / "mix.yaml").write_text(yaml.safe_dump(mix))
    data = build_mix(tmp_path / "mix.yaml", tmp_path / "out", report=False)
    assert datasets.load_from_disk(str(data))["id"] == ["pmc_vqa-v1-train-0"]


def test_hf_copies_of_release_sources(tmp_path):
    roco = _by_id(_load("rocov2", fx.write_rocov2_hf(tmp_path / "rh"), tmp_path).dataset)
    rec = roco["rocov2-ROCOv2_2023_train_000009"]
    assert rec["modality"] == "MRI" and json.loads(rec["meta"])["cuis"] == ["C0024485"]
    rad = _load("vqa_rad", fx.write_vqa_rad_hf(tmp_path / "vh"), tmp_path).dataset
    assert sorted(rad["split"]) == ["test", "test", "train", "train"]
    assert sorted(set(rad["answer"])) == ["left lobe", "yes"]
    assert {json.loads(m)["answer_type_derived"] for m in rad["meta"]} == {True}
    assert len(set(rad["group_id"])) == 1  # same image bytes, one group


# VQA-RAD -------------------------------------------------------------------------------------


def test_vqa_rad_integer_answers_trailing_spaces_and_case(tmp_path):
    res = _load("vqa_rad", fx.write_vqa_rad(tmp_path / "v"), tmp_path)
    recs = _by_id(res.dataset)
    assert recs["vqa_rad-1"]["answer"] == "4" and recs["vqa_rad-1"]["answer_type"] == "open"
    assert recs["vqa_rad-2"]["answer"] == "yes" and recs["vqa_rad-2"]["answer_type"] == "closed"
    assert recs["vqa_rad-3"]["answer"] == "no" and recs["vqa_rad-3"]["split"] == "test"
    assert recs["vqa_rad-4"]["answer"] == "Left Temporal Lobe"  # open answers keep their case
    assert recs["vqa_rad-1"]["body_part"] == "head" and not res.warnings


def test_vqa_rad_trainset_testset_with_images_folder(tmp_path):
    root = fx.write_vqa_rad_data_rad(tmp_path / "data_RAD")
    res = _load("vqa_rad", root, tmp_path)
    recs = _by_id(res.dataset)
    assert res.skipped == [] and sorted(recs) == ["vqa_rad-test-1", "vqa_rad-test-2", "vqa_rad-train-1",
                                                  "vqa_rad-train-2", "vqa_rad-train-3"]
    assert recs["vqa_rad-test-1"]["split"] == "test"  # from the file: phrase_type is "freeform" here
    assert recs["vqa_rad-test-1"]["answer"] == "yes" and recs["vqa_rad-test-1"]["answer_type"] == "closed"
    assert recs["vqa_rad-train-3"]["answer"] == "2" and recs["vqa_rad-train-1"]["group_id"] == "synpic100"
    assert recs["vqa_rad-train-1"]["image"] == str((root / "images" / "synpic100.jpg").resolve())
    for rec in recs.values():
        with Image.open(rec["image"]) as im:
            assert im.size == (8, 8)
    test = _load("vqa_rad", root, tmp_path, split="test").dataset
    assert sorted(test["id"]) == ["vqa_rad-test-1", "vqa_rad-test-2"]
    (root / "testset.json").unlink()
    with pytest.raises(FileNotFoundError, match="split 'test' needs testset.json beside trainset.json"):
        load_source("vqa_rad", root, split="test")


def test_vqa_rad_release_json_finds_images_in_either_folder(tmp_path):
    root = fx.write_vqa_rad(tmp_path / "v")
    (root / "VQA_RAD Image Folder").rename(root / "images")
    res = _load("vqa_rad", root, tmp_path)
    assert len(res.dataset) == 4 and res.skipped == []


# LLaVA-Med -----------------------------------------------------------------------------------


def test_llava_med_turn_pairs_image_token_and_misspelt_key(tmp_path):
    res = _load("llava_med", fx.write_llava_med(tmp_path / "l"), tmp_path, split="train")
    recs = _by_id(res.dataset)
    assert set(recs) == {"llava_med-a1-0", "llava_med-a1-1", "llava_med-a2-0"}
    assert recs["llava_med-a1-0"]["question"] == "What is shown in the image?"
    assert recs["llava_med-a2-0"]["question"] == "Which modality is this?"  # from "conversatons"
    assert recs["llava_med-a1-1"]["answer"] == "In the right upper lobe."
    assert {r["group_id"] for r in recs.values()} == {"34754592"}


def test_llava_med_eval_jsonl_answer_fields(tmp_path):
    res = _load("llava_med", fx.write_llava_med(tmp_path / "l"), tmp_path, split="test")
    by_q = {json.loads(r["meta"])["question_id"]: r for r in res.dataset}
    assert by_q[7]["answer"] == "A nodule." and by_q[8]["answer"] == "no"
    assert by_q[8]["answer_type"] == "closed" and set(res.dataset["split"]) == {"test"}


# CXR paraphrases -----------------------------------------------------------------------------


def test_cxr_paraphrase_groups_by_study_with_paraphrase_key(tmp_path):
    res = _load("cxr_paraphrase", fx.write_cxr_paraphrase(tmp_path / "c"), tmp_path)
    assert sorted(set(res.dataset["group_id"])) == ["s1", "s2"]
    metas = [json.loads(m) for m in res.dataset["meta"]]
    keys = {m["paraphrase_group"] for m in metas}
    assert len(keys) == 2  # three wordings each of two questions
    assert sorted({m["question_variant"] for m in metas}) == ["0", "1", "2"]
    assert metas[0]["extra"] == {"view": "PA"} and len(res.warnings) == 1


# Single-file datasets ------------------------------------------------------------------------


def test_single_data_file_as_path(tmp_path):
    root = fx.write_llava_med(tmp_path / "l")
    instruct = _load("llava_med", root / "llava_med_instruct_10.json", tmp_path)
    assert sorted(instruct.dataset["id"]) == ["llava_med-a1-0", "llava_med-a1-1", "llava_med-a2-0"]
    assert set(instruct.dataset["split"]) == {"train"} and instruct.skipped == []
    assert instruct.dataset["image"][0] == str((root / "images" / "34754592_F1.jpg").resolve())
    answers = _load("llava_med", root / "llava_med_eval_qa.jsonl", tmp_path).dataset
    assert sorted(answers["answer"]) == ["A nodule.", "no"] and set(answers["split"]) == {"test"}
    csv = _load("cxr_paraphrase", fx.write_cxr_paraphrase(tmp_path / "c") / "paraphrases_test.csv", tmp_path)
    assert len(csv.dataset) == 6 and sorted(set(csv.dataset["group_id"])) == ["s1", "s2"]
    with Image.open(csv.dataset["image"][0]) as im:
        assert im.size == (8, 8)
    with pytest.raises(ValueError, match="either a file as path .* or files="):
        load_source("llava_med", root / "llava_med_instruct_10.json", files=["llava_med_eval_qa.jsonl"])
    slake = fx.write_slake(tmp_path / "s") / "train.json"
    with pytest.raises(NotADirectoryError, match=r"is a file; this source reads a folder: pass the folder"):
        load_source("slake", slake)


def test_single_data_file_in_a_mix(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDVLM_HOME", str(tmp_path / "home"))
    root = fx.write_llava_med(tmp_path / "l")

    def mix(source, path):
        cfg = {"seed": 0, "stopping_strategy": "once", "phases": [{"name": "main", "weights": {"a": 1.0}}],
               "sources": [{"name": "a", "source": source, "path": str(path), "split": "train"}]}
        (tmp_path / "mix.yaml").write_text(yaml.safe_dump(cfg))
        return tmp_path / "mix.yaml"

    data = build_mix(mix("llava_med", root / "llava_med_instruct_10.json"), tmp_path / "out", report=False)
    assert len(datasets.load_from_disk(str(data))) == 3
    slake = fx.write_slake(tmp_path / "s") / "train.json"
    with pytest.raises(MixError, match="is a file but `source: slake` reads a folder: set `path:` in .*mix.yaml"):
        build_mix(mix("slake", slake), tmp_path / "out2", report=False)


# Registry ------------------------------------------------------------------------------------


def test_unknown_source_did_you_mean():
    with pytest.raises(UnknownSourceError, match=r"Did you mean 'slake'\?.*Available:"):
        load_source("slak", "/nonexistent")


def test_unknown_option_did_you_mean(tmp_path):
    with pytest.raises(TypeError, match="Did you mean 'lang'"):
        load_source("slake", fx.write_slake(tmp_path / "s"), lang_="en")


def test_phantom_entry_is_lazy(tmp_path):
    phantom = pytest.importorskip("medvlm.data_curation.phantom")
    if not hasattr(phantom, "load_phantom_source"):
        pytest.skip("medvlm.data_curation.phantom.load_phantom_source not written yet")
    res = load_source("phantom", str(tmp_path / "phantom"), split="train", n_patients=10)
    assert len(res.dataset) > 0 and set(res.dataset["split"]) == {"train"}
    assert all(s.startswith("phantom") for s in res.dataset["source"]) and res.skipped == []
    assert res.dataset.features == FEATURES
