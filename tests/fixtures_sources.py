"""Tiny, format-faithful copies of each supported dataset, written into a tmp folder at test time.

Each ``write_<source>(root)`` creates the release layout with a handful of rows that reproduce
the source's real quirks (named in the comments) and returns the dataset folder. Images are
8×8 PNG/JPEG files made with PIL; nothing binary is committed.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import datasets
import numpy as np
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid


def image_bytes(color: tuple[int, int, int] = (120, 60, 30), fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format=fmt)
    return buf.getvalue()


def write_image(path: Path, color: tuple[int, int, int] = (120, 60, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = "JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG"
    path.write_bytes(image_bytes(color, fmt))
    return path


def write_json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=1), encoding="utf-8")
    return path


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _slake_row(qid, folder, question, answer, kind, lang="en", **extra):
    row = {"img_id": int(folder[5:]), "img_name": f"{folder}/source.jpg", "question": question,
           "answer": answer, "q_lang": lang, "location": "Lung", "modality": "CT", "answer_type": kind,
           "base_type": "vqa", "content_type": "Organ", "triple": ["vhead", "_", "_"], "qid": qid}
    row.update(extra)
    return row


def write_slake(root: Path, hf_names: bool = False) -> Path:
    """SLAKE: en+zh rows, CLOSED non-yes/no answers, one empty answer, image xmlab1 in train AND test."""
    for i in range(3):
        folder = root / "imgs" / f"xmlab{i}"
        write_image(folder / "source.jpg", (40 * i, 80, 120))
        write_image(folder / "mask.png", (255, 255, 255))
        write_json(folder / "detection.json", [{"Lung": [10, 10, 20, 20]}])
    write_json(root / "train.json", [
        _slake_row(1, "xmlab0", "Is this a CT image?", "Yes", "CLOSED"),
        _slake_row(2, "xmlab0", "这是CT图像吗?", "是", "CLOSED", lang="zh"),
        _slake_row(3, "xmlab0", "Which organ is abnormal, heart or lung?", "Lung", "CLOSED"),
        _slake_row(4, "xmlab1", "What organ is shown?", "Liver", "OPEN"),
        _slake_row(5, "xmlab1", "Where is the lesion?", "", "OPEN"),  # the empty answer
        _slake_row(6, "xmlab1", "Is the lesion on the left or right?", "Left", "CLOSED", difficulty="easy"),
    ])
    write_json(root / ("validation.json" if hf_names else "validate.json"), [
        _slake_row(7, "xmlab2", "Which sequence is this, T1 or T2?", "T2", "CLOSED"),
    ])
    write_json(root / "test.json", [
        _slake_row(8, "xmlab1", "Does the picture contain the liver?", "No", "CLOSED"),  # shares xmlab1
        _slake_row(9, "xmlab2", "图中有肝脏吗?", "有", "CLOSED", lang="zh"),
    ])
    return root


def write_rocov2(root: Path) -> Path:
    """ROCOv2: {split}_captions.csv, {split}_concepts.csv (CUIs joined by ';'), cui_mapping.csv."""
    ids = {"train": ["ROCOv2_2023_train_000001", "ROCOv2_2023_train_000002"],
           "valid": ["ROCOv2_2023_valid_000001"], "test": ["ROCOv2_2023_test_000001"]}
    for split, names in ids.items():
        write_csv(root / f"{split}_captions.csv", ["ID", "Caption"],
                  [[n, f"Axial CT of the abdomen ({n[-1]}) showing a mass."] for n in names])
        write_csv(root / f"{split}_concepts.csv", ["ID", "CUIs"], [[n, "C0040405;C0000726"] for n in names])
        for n in names:
            write_image(root / split / f"{n}.jpg")
    write_csv(root / "cui_mapping.csv", ["CUI", "Canonical name"],
              [["C0040405", "X-Ray Computed Tomography"], ["C0000726", "Abdomen"]])
    return root


def write_medpix(root: Path) -> Path:
    """MedPix 2.0: TAC (CT) / MRI lists, capitalised keys with spaces, Age as a string."""
    case = {"Title": "Bladder Diverticulum", "History": "73-year-old male with hematuria", "Exam": "N/A",
            "Findings": "Bladder with thickened wall.", "Differential Diagnosis": "Diverticulum",
            "Case Diagnosis": "Bladder Diverticulum", "Diagnosis By": "Imaging"}
    topic = {"Title": "Bladder Diverticulum", "Disease Discussion": "Outlet obstruction.",
             "ACR Code": "8.-1", "Category": "Congenital"}
    write_json(root / "Case_topic.json", [
        {"U_id": "MPX1009", "TAC": ["MPX1009_synpic1"], "MRI": ["MPX1009_synpic2"], "Case": case, "Topic": topic},
        {"U_id": "MPX2000", "TAC": ["MPX2000_synpic3"], "MRI": [], "Case": {**case, "Findings": "Kidney cyst."},
         "Topic": topic},
    ])

    def desc(uid, image, kind, caption):
        return {"Type": kind, "U_id": uid, "image": image, "Location": "Genitourinary",
                "Location Category": "Reproductive and Urinary System",
                "Description": {"ACR Codes": "8.-1", "Age": "45", "Caption": caption, "Figure Part": None,
                                "Modality": "CT - noncontrast", "Plane": "Axial", "Sex": "male"}}
    write_json(root / "Descriptions.json", [
        desc("MPX1009", "MPX1009_synpic1", "CT", "The prostate is enlarged."),
        desc("MPX1009", "MPX1009_synpic2", "MR", "T2 bright bladder diverticulum."),
        desc("MPX2000", "MPX2000_synpic3", "CT", ""),  # empty caption: falls back to the findings
    ])
    for name in ("MPX1009_synpic1", "MPX1009_synpic2", "MPX2000_synpic3"):
        write_image(root / "images" / f"{name}.png")
    return root


def _jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def write_medpix_splits(root: Path) -> Path:
    """MedPix-2-0 with its official split: ``splitted_dataset/{data,descriptions}_{train,train_1,train_2,
    dev,test}.jsonl`` (one JSON object per line, the keys of Case_topic.json / Descriptions.json, cases
    carrying the release's extra keys such as ``Discussion`` and ``Media``) and ``uid_list.json``."""
    cases, descs = {}, {}
    for n, uid in enumerate(("MPX1009", "MPX2000", "MPX3000", "MPX3001")):
        images = [f"{uid}_synpic{10 * n + k}" for k in range(2 if uid == "MPX3000" else 1)]
        cases[uid] = {"U_id": uid, "TAC": images[:1], "MRI": images[1:], "Case": {
            "Title": f"Case {uid}", "History": f"History of {uid}", "Exam": "N/A", "Findings": f"Findings {uid}.",
            "Differential Diagnosis": "x", "Case Diagnosis": f"Diagnosis {uid}", "Diagnosis By": "Imaging",
            "Discussion": "See factoid.", "Media": None, "Treatment & Follow Up": "None."},
            "Topic": {"Title": "t", "Disease Discussion": "d", "ACR Code": "1.9", "Category": "Unsure",
                      "External Links": None, "Keywords": "k", "Reference": "r"}}
        descs[uid] = [{"Type": "CT" if k == 0 else "MR", "U_id": uid, "image": img,
                       "Description": {"ACR Codes": "1.9", "Age": str(30 + n), "Caption": f"Caption of {img}.",
                                       "Figure Part": None, "Modality": "CT - noncontrast", "Plane": "Axial",
                                       "Sex": "female"}, "Location": "Brain and Neuro", "Location Category": "Head"}
                      for k, img in enumerate(images)]
        for img in images:
            write_image(root / "images" / f"{img}.png", (10 * n, 20, 30))
    members = {"train_1": ["MPX3000"], "train_2": ["MPX3001"], "dev": ["MPX1009"], "test": ["MPX2000"]}
    members["train"] = members["train_1"] + members["train_2"]
    folder = root / "splitted_dataset"
    for name, uids in members.items():
        _jsonl(folder / f"data_{name}.jsonl", [cases[u] for u in uids])
        _jsonl(folder / f"descriptions_{name}.jsonl", [d for u in uids for d in descs[u]])
    write_json(folder / "uid_list.json", members)
    write_json(root / "Case_topic.json", list(cases.values()))
    write_json(root / "Descriptions.json", [d for v in descs.values() for d in v])
    return root


def _parquet(path: Path, columns: dict, image_col: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    feats = {k: datasets.Value("string") for k in columns}
    feats[image_col] = datasets.Image()
    if "ans_len" in columns:
        feats["ans_len"] = datasets.Value("int32")
    ds = datasets.Dataset.from_dict(columns, features=datasets.Features(feats))
    ds.to_parquet(str(path))
    return path


def write_medpix_shortqa(root: Path) -> Path:
    """MEDPIX-ShortQA HF copy: the image lives in a column named ``image_id``; splits Train/Valid/Test."""
    img = {"bytes": image_bytes((10, 200, 10)), "path": None}
    _parquet(root / "data" / "Train-00000-of-00001.parquet", {
        "image_id": [img, img], "case_id": ["MPX1009", "MPX1009"],
        "question": ["What modality is shown?", "Is there a mass?"], "answer": ["CT", "Yes"],
        "ans_len": [1, 1], "mode": ["short", "short"], "split": ["Train", "Train"]}, "image_id")
    _parquet(root / "data" / "Valid-00000-of-00001.parquet", {
        "image_id": [{"bytes": image_bytes((1, 2, 3)), "path": None}], "case_id": ["MPX2000"],
        "question": ["Which organ?"], "answer": ["Kidney"], "ans_len": [1], "mode": ["short"],
        "split": ["Valid"]}, "image_id")
    return root


def write_roco_qa(root: Path) -> Path:
    """ROCO-QA as ``adishourya/ROCO-QA`` ships it: splits ``Vaild`` and ``Test`` (Test in two shards),
    ``image_id`` an id string (``ROCO_00020``), the picture as bytes without a name in ``image``."""
    def shard(name: str, ids: list[str], answers: list[str]) -> None:
        _parquet(root / "data" / f"{name}.parquet", {
            "image_id": ids,
            "image": [{"bytes": image_bytes((int(i[-3:]), 5, 9)), "path": None} for i in ids],  # one id, one picture
            "question": [f"What does image {i} show?" for i in ids], "answer": answers}, "image")
    shard("Vaild-00000-of-00001", ["ROCO_00020", "ROCO_00020", "ROCO_00031"], ["A fracture", "Yes", "No"])
    shard("Test-00000-of-00002", ["ROCO_00100"], ["A cyst"])
    shard("Test-00001-of-00002", ["ROCO_00101", "ROCO_00102"], ["No", "Pneumothorax"])
    return root


def write_roco_qa_train(root: Path) -> Path:
    """``adishourya/ROCO-QA-Train``: one split ``Train`` sharded as ``data/Train-000NN-of-000MM.parquet``."""
    for k in range(2):
        ids = [f"ROCO_1{k}00{j}" for j in range(2)]
        _parquet(root / "data" / f"Train-0000{k}-of-00002.parquet", {
            "image_id": ids, "image": [{"bytes": image_bytes((k, j, 1)), "path": None} for j in range(2)],
            "question": ["Is there a mass?", "Which organ?"], "answer": ["yes", "Liver"]}, "image")
    return root


def write_slake_parquet(root: Path) -> Path:
    """SLAKE as ``mdwiratathya/SLAKE-vqa-english``: ``data/{train,validation,test}-*.parquet`` (train in two
    shards) with ``image`` ({bytes, path}), ``question``, ``answer`` and no ``answer_type``."""
    a, b = ({"bytes": image_bytes(c), "path": None} for c in ((1, 2, 3), (4, 5, 6)))
    shards = {
        "train-00000-of-00002": ([a, a], ["Is this a CT image?", "Which organ is abnormal, heart or lung?"],
                                 ["Yes", "Lung"]),
        "train-00001-of-00002": ([b], ["What organ is shown?"], ["Liver"]),
        "validation-00000-of-00001": ([b], ["Does the picture contain the liver?"], ["No"]),
        "test-00000-of-00001": ([a, b], ["Is the lesion on the left or right?", "Is this an MRI?"], ["Left", "no"]),
    }
    for name, (images, questions, answers) in shards.items():
        _parquet(root / "data" / f"{name}.parquet", {"image": images, "question": questions, "answer": answers},
                 "image")
    return root


_PMC_HEADER = ["Figure_path", "Question", "Answer", "Choice A", "Choice B", "Choice C", "Choice D", "Answer_label"]


def write_pmc_vqa(root: Path) -> Path:
    """PMC-VQA v1 (choices "A:CT", the ``Anwser`` spelling) and v2 (letter answers, padded choices)."""
    write_csv(root / "train.csv", _PMC_HEADER, [
        ["PMC100_F1.jpg", "What imaging is used?", "CT", "A:CT", "B:MRI", "C:PET", "D:US", "A"]])
    write_csv(root / "test.csv", ["Figure_path", "Question", "Anwser", "Choice A", "Choice B", "Choice C", "Choice D"],
              [["PMC200_F2.jpg", "Which organ?", "B:Liver", "A:Lung", "B:Liver", "C:Heart", "D:Brain"]])
    write_csv(root / "train_2.csv", _PMC_HEADER[:7], [
        ["PMC300_F3.jpg", "Which plane?", "C", " A:  Axial  ", " B: Sagittal ", " C:  Coronal   view ", " D: Oblique"]])
    write_csv(root / "test_2.csv", _PMC_HEADER[:7], [
        ["PMC400_F4.jpg", "Which side?", "A", " A: Left ", " B: Right ", " C: Both ", " D: None "]])
    for name in ("PMC100_F1.jpg", "PMC200_F2.jpg", "PMC300_F3.jpg", "PMC400_F4.jpg"):
        write_image(root / "figures" / name)
    return root


def write_vqa_rad(root: Path) -> Path:
    """VQA-RAD: integer answers, "CLOSED " with a trailing space, mixed-case yes/no, test_* phrase types."""
    def row(qid, image, q, a, kind, phrase="freeform"):
        return {"qid": qid, "image_name": image, "image_case_url": "https://medpix/x", "image_organ": "HEAD",
                "answer": a, "answer_type": kind, "question_type": "PRES", "question": q,
                "qid_linked_id": "x", "phrase_type": phrase, "question_rephrase": "NULL",
                "question_relation": "NULL", "question_frame": "NULL", "evaluation": "given"}
    write_json(root / "VQA_RAD Dataset Public.json", [
        row(1, "synpic100.jpg", "How many lesions are there?", 4, "OPEN"),
        row(2, "synpic100.jpg", "Is there a mass?", "YES", "CLOSED "),
        row(3, "synpic200.jpg", "Is the scan normal?", "No", "CLOSED", "test_freeform"),
        row(4, "synpic200.jpg", "Where is the lesion?", "Left Temporal Lobe", "OPEN", "test_para"),
    ])
    for name in ("synpic100.jpg", "synpic200.jpg"):
        write_image(root / "VQA_RAD Image Folder" / name)
    return root


def write_vqa_rad_data_rad(root: Path) -> Path:
    """VQA-RAD as ``data_RAD/`` of aioz-ai/MICCAI19-MedVQA: ``trainset.json`` / ``testset.json`` (qids restart
    at 1 in each, ``phrase_type`` "freeform" in both, lower-case answers) and the pictures in ``images/``."""
    def row(qid, image, q, a, kind, phrase="freeform"):
        return {"qid": qid, "image_name": image, "answer": a, "answer_type": kind, "question_type": "PRES",
                "question": q, "phrase_type": phrase}
    write_json(root / "trainset.json", [
        row(1, "synpic100.jpg", "what kind of image is this?", "cta - ct angiography", "OPEN"),
        row(2, "synpic100.jpg", "is this a t1 weighted image?", "no", "CLOSED"),
        row(3, "synpic300.jpg", "how many lesions are there?", 2, "OPEN", "para"),
    ])
    write_json(root / "testset.json", [
        row(1, "synpic200.jpg", "was the ct scan taken with contrast?", "yes", "CLOSED"),
        row(2, "synpic200.jpg", "where is the lesion?", "left temporal lobe", "OPEN"),
    ])
    for k, name in enumerate(("synpic100.jpg", "synpic200.jpg", "synpic300.jpg")):
        write_image(root / "images" / name, (50 * k, 9, 9))
    return root


def write_llava_med(root: Path) -> Path:
    """LLaVA-Med: instruct JSON (``conversatons`` misspelling, <image> at start or end), eval JSONL."""
    write_json(root / "llava_med_instruct_10.json", [
        {"id": "a1", "image": "34754592_F1.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat is shown in the image?"},
            {"from": "gpt", "value": "A chest CT with a nodule."},
            {"from": "human", "value": "Where is the nodule?"},
            {"from": "gpt", "value": "In the right upper lobe."}]},
        {"id": "a2", "image": "34754592_F2.jpg", "conversatons": [
            {"from": "human", "value": "Which modality is this?\n<image>"},
            {"from": "gpt", "value": "MRI."}]},
    ])
    lines = [{"question_id": 7, "image": "34754592_F1.jpg", "text": "Describe the finding.",
              "gpt4_answer": "A nodule.", "type": "detailed"},
             {"question_id": 8, "image": "11111111_F3.jpg", "text": "Is there effusion?", "answer": "no"}]
    (root / "llava_med_eval_qa.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    for name in ("34754592_F1.jpg", "34754592_F2.jpg", "11111111_F3.jpg"):
        write_image(root / "images" / name)
    return root


def write_cxr_paraphrase(root: Path) -> Path:
    """Paraphrase CSV: several wordings per question, an extra unknown column (``view``)."""
    header = ["study_id", "image_path", "question", "answer", "question_variant", "view"]
    rows = []
    for study in ("s1", "s2"):
        for v, q in enumerate(("Is there an effusion?", "Do you see pleural fluid?", "Any effusion present?")):
            rows.append([study, f"files/{study}.png", q, "Yes" if study == "s1" else "No", v, "PA"])
    write_csv(root / "paraphrases_test.csv", header, rows)
    for study in ("s1", "s2"):
        write_image(root / "files" / f"{study}.png")
    return root


def write_rocov2_hf(root: Path) -> Path:
    """ROCOv2's HF copy: parquet ``image, image_id, caption, cui`` (a list of CUIs)."""
    path = root / "data" / "train-00000-of-00001.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    feats = datasets.Features({"image": datasets.Image(), "image_id": datasets.Value("string"),
                               "caption": datasets.Value("string"),
                               "cui": datasets.Sequence(datasets.Value("string"))})
    datasets.Dataset.from_dict({
        "image": [{"bytes": image_bytes((3, 3, 3)), "path": "ROCOv2_2023_train_000009.jpg"}],
        "image_id": ["ROCOv2_2023_train_000009"], "caption": ["Chest MRI."], "cui": [["C0024485"]],
    }, features=feats).to_parquet(str(path))
    return root


def write_vqa_rad_hf(root: Path) -> Path:
    """VQA-RAD's HF copy: parquet ``image, question, answer`` in train/test files, no answer_type."""
    img = {"bytes": image_bytes((7, 7, 7)), "path": None}
    for split in ("train", "test"):
        _parquet(root / "data" / f"{split}-00000-of-00001.parquet", {
            "image": [img, img], "question": ["Is there a mass?", "Where is it?"],
            "answer": ["Yes", "left lobe"]}, "image")
    return root


def write_ct(path, hu_row, center=0.0, width=2000.0):
    """A 1×N CT slice storing HU + 1024 as uint16 with RescaleIntercept -1024."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = CTImageStorage
    ds.Modality = "CT"
    ds.Rows, ds.Columns = 1, len(hu_row)
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.WindowCenter, ds.WindowWidth = center, width
    ds.PixelData = (np.asarray(hu_row) + 1024).astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path
