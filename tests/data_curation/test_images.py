"""Image resolution and bad input: path escapes, missing/corrupt files, bad answers, DICOM windows."""

from __future__ import annotations

import os

import fixtures_sources as fx
import numpy as np
import pydicom
import pytest

from medvlm.data_curation import load_source
from medvlm.data_curation.images import cache_image_bytes, default_cache_dir, image_to_path, safe_join
from medvlm.utils.images import WINDOW_PRESETS, ImageError, apply_window, verify_image
from medvlm.utils.images import read_image as load_image


def _vqa_rad_with(root, rows):
    """A VQA-RAD folder whose JSON holds ``rows`` (image_name, answer) and two good images."""
    fx.write_vqa_rad(root)
    data = [{"qid": 100 + i, "image_name": img, "question": "Is there a mass?", "answer": ans,
             "answer_type": "CLOSED", "phrase_type": "freeform"} for i, (img, ans) in enumerate(rows)]
    fx.write_json(root / "VQA_RAD Dataset Public.json", data)
    return root


def _reasons(res):
    return {s["row"]: s["reason"] for s in res.skipped}


def test_image_paths_escaping_the_root_are_rejected_and_recorded(tmp_path):
    outside = fx.write_image(tmp_path / "outside" / "secret.png")
    root = tmp_path / "v"
    (root / "VQA_RAD Image Folder").mkdir(parents=True)
    os.symlink(outside, root / "VQA_RAD Image Folder" / "link.png")
    _vqa_rad_with(root, [("../../etc/passwd", "yes"), (str(outside), "yes"), ("link.png", "yes"),
                         ("synpic100.jpg", "yes")])
    res = load_source("vqa_rad", root, image_cache_dir=tmp_path / "c")
    reasons = _reasons(res)
    assert sorted(reasons) == [0, 1, 2] and all("escapes the dataset root" in r for r in reasons.values())
    assert all(s["file"] == "VQA_RAD Dataset Public.json" for s in res.skipped)
    assert res.dataset["id"] == ["vqa_rad-103"]


def test_missing_and_corrupt_images_are_skipped_with_reasons(tmp_path):
    root = tmp_path / "v"
    _vqa_rad_with(root, [("nothere.jpg", "yes"), ("truncated.jpg", "yes"), ("notimage.png", "no"),
                         ("synpic100.jpg", "no")])
    folder = root / "VQA_RAD Image Folder"
    (folder / "truncated.jpg").write_bytes(fx.image_bytes(fmt="JPEG")[:120])
    (folder / "notimage.png").write_text("hello")
    res = load_source("vqa_rad", root, image_cache_dir=tmp_path / "c", verify_images=True)
    reasons = _reasons(res)
    assert "not found" in reasons[0]
    assert "corrupt or truncated" in reasons[1] and "corrupt or truncated" in reasons[2]
    assert len(res.dataset) == 1
    unchecked = load_source("vqa_rad", root, image_cache_dir=tmp_path / "c", verify_images=False)
    assert len(unchecked.dataset) == 3 and list(_reasons(unchecked)) == [0]  # only the missing file


def test_empty_and_non_string_answers_are_skipped(tmp_path):
    root = _vqa_rad_with(tmp_path / "v", [("synpic100.jpg", ""), ("synpic100.jpg", None),
                                          ("synpic100.jpg", ["yes"]), ("synpic100.jpg", 3.5)])
    res = load_source("vqa_rad", root, image_cache_dir=tmp_path / "c")
    reasons = _reasons(res)
    assert reasons[0] == "empty answer"
    assert "NoneType" in reasons[1] and "list" in reasons[2]
    assert res.dataset["answer"] == ["3.5"]


def test_safe_join_and_hf_bytes_cache(tmp_path, monkeypatch):
    assert safe_join(tmp_path, "a/../b.png") == (tmp_path / "b.png").resolve()
    with pytest.raises(ImageError):
        safe_join(tmp_path, "/etc/passwd")
    data = fx.image_bytes()
    first = image_to_path({"bytes": data, "path": "x.jpg"}, None, tmp_path / "cache")
    again = cache_image_bytes(data, tmp_path / "cache", "y.jpg")
    assert first == again and first.suffix == ".jpg" and first.read_bytes() == data
    assert len(list((tmp_path / "cache").iterdir())) == 1
    monkeypatch.setenv("MEDVLM_HOME", str(tmp_path / "home"))
    assert default_cache_dir("roco_qa") == tmp_path / "home" / "image_cache" / "roco_qa"
    with pytest.raises(ImageError, match="no local root"):
        image_to_path("a.png", None, tmp_path / "cache")





def test_dicom_window_maps_hounsfield_range_to_8_bit(tmp_path):
    path = fx.write_ct(tmp_path / "ct.dcm", [-1024, -1000, -500, 0, 500, 1000])
    gray = np.asarray(load_image(path))[0, :, 0]
    assert gray.tolist() == [0, 0, 64, 128, 191, 255]
    assert verify_image(path) == ""
    assert np.asarray(load_image(path)).shape == (1, 6, 3)  # RGB
    lung = np.asarray(load_image(path, window="lung"))[0, :, 0]
    c, w = WINDOW_PRESETS["lung"]
    assert lung.tolist() == apply_window([-1024, -1000, -500, 0, 500, 1000], c, w).tolist()
    assert 0 < lung[1] < lung[2] < lung[3] < 255 and lung[4] == lung[5] == 255  # lung window: -1350..149 HU
    assert np.asarray(load_image(path, window=(0, 2000)))[0, :, 0].tolist() == gray.tolist()
    with pytest.raises(ValueError, match="unknown window preset"):
        load_image(path, window="abdomen-ish")


def test_dicom_images_load_through_a_source(tmp_path):
    root = _vqa_rad_with(tmp_path / "v", [("scan.dcm", "yes")])
    fx.write_ct(root / "VQA_RAD Image Folder" / "scan.dcm", [0, 100])
    res = load_source("vqa_rad", root, image_cache_dir=tmp_path / "c")
    assert res.skipped == [] and res.dataset["image"][0].endswith("scan.dcm")
    assert isinstance(pydicom.dcmread(res.dataset["image"][0]).pixel_array, np.ndarray)
