"""A record whose image is DICOM goes through every room: loaded by a source, trained on, evaluated
and explained, read everywhere by the one image reader (windowed to 8 bits)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from medvlm.data_curation import load_source
from medvlm.utils.images import read_image

pytestmark = pytest.mark.timeout(600)


def _write_ct_slice(path, hu: np.ndarray) -> None:
    """A CT slice storing HU + 1024 as uint16 (RescaleIntercept -1024), soft-tissue window."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.Modality = CTImageStorage, "CT"
    ds.Rows, ds.Columns = hu.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.WindowCenter, ds.WindowWidth = 40, 400
    ds.PixelData = (hu + 1024).astype(np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


@pytest.fixture(scope="module")
def dicom_dataset(tmp_path_factory):
    """A VQA-RAD copy (trainset.json / testset.json + images/) whose pictures are CT DICOM slices."""
    root = tmp_path_factory.mktemp("vqa_rad_dicom")
    rng = np.random.default_rng(0)
    for i in range(4):
        hu = rng.normal(0, 30, (64, 64))
        if i % 2:
            hu[20:30, 36:46] = 180  # a bright lesion on half of them
        _write_ct_slice(root / "images" / f"ct{i}.dcm", hu)

    def row(qid, image, answer):
        return {"qid": qid, "image_name": image, "question": "is there a mass?", "answer": answer,
                "answer_type": "CLOSED", "question_type": "PRES", "phrase_type": "freeform"}

    (root / "trainset.json").write_text(json.dumps([row(i, f"ct{i % 4}.dcm", "yes" if i % 2 else "no")
                                                    for i in range(8)]))
    (root / "testset.json").write_text(json.dumps([row(1, "ct1.dcm", "yes"), row(2, "ct2.dcm", "no")]))
    res = load_source("vqa_rad", root, verify_images=True)
    assert res.skipped == [] and all(p.endswith(".dcm") for p in res.dataset["image"])
    folder = tmp_path_factory.mktemp("saved") / "vqa_rad"
    res.dataset.save_to_disk(str(folder))
    return folder, res.dataset


def test_a_dicom_record_is_read_windowed(dicom_dataset):
    _, ds = dicom_dataset
    img = np.asarray(read_image(ds[0]["image"]))
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8 and 0 < img.mean() < 255


def test_dicom_records_train_evaluate_and_explain(dicom_dataset, tiny_llava, tmp_path):
    from medvlm.diagnostics.capture import prepare_example
    from medvlm.diagnostics.methods import Context, registered
    from medvlm.eval.evaluate import ModelEvalConfig, evaluate_model
    from medvlm.models.registry import load_model_and_processor
    from medvlm.training.cli import main

    folder, ds = dicom_dataset
    out = tmp_path / "stage1"
    argv = ["--model_name_or_path", str(tiny_llava), "--output_dir", str(out), "--dataset", str(folder),
            "--eval_dataset", str(folder), "--eval_split", "test", "--max_steps", "2",
            "--per_device_train_batch_size", "4", "--save_strategy", "no", "--report_to", "none",
            "--checkpoint_eval_samples", "0", "--disable_tqdm", "true", "--dataloader_num_workers", "0"]
    assert main("stage1", argv) == 0  # trained on DICOM images
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["closed"]["n"] == 2 and metrics["blank_image"]["closed"]["n"] == 2
    evaluated = evaluate_model(ModelEvalConfig(model=str(tiny_llava), adapter=str(out / "adapter"),
                                               output=str(tmp_path / "eval"), dataset=str(folder), split="test",
                                               dtype="float32"))
    assert evaluated["closed"]["n"] == 2
    lm = load_model_and_processor(str(tiny_llava), attn_implementation="eager")
    rec = next(r for r in ds if r["split"] == "test")
    ex = prepare_example(lm.model, lm.processor, lm.family, rec["image"], rec["question"], rec["answer"])
    ctx = Context(lm.model, lm.processor, lm.family, ex, kinds={k for m in registered() for k in m.shared})
    for method in registered():
        assert method.run(ctx).map.shape == ex.span.grid, method.name
