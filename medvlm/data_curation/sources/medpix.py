"""MedPix 2.0 (Siragusa et al., 2024): clinical cases with CT and MR images and case text.

Release layout (``CHILab1/MedPix-2.0``, folder ``MedPix-2-0/``)::

    Case_topic.json   list of {U_id, TAC: [image ids], MRI: [image ids], Case: {Title, History,
                      Exam, Findings, Differential Diagnosis, Case Diagnosis, Diagnosis By},
                      Topic: {Title, Disease Discussion, ACR Code, Category}}
    Descriptions.json list of {Type ("CT"|"MR"), U_id, image, Location, Location Category,
                      Description: {ACR Codes, Age ("45": a string), Caption, Figure Part,
                      Modality, Plane, Sex}}
    images/<image id>.png
    splitted_dataset/ the official split: data_<s>.jsonl (cases, one per line, as in Case_topic.json)
                      and descriptions_<s>.jsonl (as in Descriptions.json) for s in train, train_1,
                      train_2, dev, test; uid_list.json {s: [U_id, ...]}. A case and all its
                      images are in one split; train_1 + train_2 = train.

One record per image: question = a description prompt (option ``prompt``), answer = the image
caption, or the case findings when the caption is empty; ``modality`` is CT for images listed
under ``TAC`` and MRI for those under ``MRI``; ``group_id`` is the case ``U_id``; ``meta`` holds
history, exam, findings, diagnosis and the demographics (``age`` as an int when numeric).

Splits: ``train``, ``validation`` (the release's ``dev``) and ``test`` read the official files;
``train_1`` / ``train_2`` (records say ``split="train"``, ``meta["official_split"]`` the half) too.
With ``split=None`` the official train, dev and test files are read when ``splitted_dataset/`` is
there; otherwise Case_topic.json + Descriptions.json with ``split=""`` (make one with
``split_by_group``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

from medvlm.data_curation.sources._common import (
    CAPTION_PROMPT,
    Context,
    Draft,
    Skip,
    iter_jsonl,
    read_json,
    read_json_list,
)

logger = logging.getLogger(__name__)

OPTIONS = {"prompt": CAPTION_PROMPT}
EXTRA_SPLITS = ("train_1", "train_2")
#: Requested split → the file suffix of the official split and the record's split.
OFFICIAL = {"train": ("train", "train"), "validation": ("dev", "validation"), "test": ("test", "test"),
            "train_1": ("train_1", "train"), "train_2": ("train_2", "train")}
SPLIT_DIR = "splitted_dataset"
LISTS = {"TAC": "CT", "MRI": "MRI"}  # MedPix names the CT list after the Italian "TAC"
CASE_KEYS = {"U_id", "TAC", "MRI", "Case", "Topic"}
DESC_KEYS = {"Type", "U_id", "image", "Location", "Location Category", "Description"}


def _age(value):
    text = str(value or "").strip()
    return int(text) if text.isdigit() else (text or None)


def _image_id(item) -> str:
    if isinstance(item, dict):
        item = item.get("image") or item.get("id") or ""
    return str(item).strip()


def _split_dir(root: Path) -> Path | None:
    """The folder holding data_<s>.jsonl: ``splitted_dataset/`` under the root, or the root itself."""
    for folder in (root / SPLIT_DIR, root):
        if any(folder.glob("data_*.jsonl")):
            return folder
    return None


def iter_records(ctx: Context) -> Iterator[Draft | Skip]:
    """Join cases (data / Case_topic) with image descriptions, for the official split(s) asked for."""
    if ctx.root is None:
        raise ValueError("medpix: pass the MedPix-2-0 folder holding Case_topic.json, Descriptions.json, "
                         "images/ and splitted_dataset/")
    folder = _split_dir(ctx.root)
    if ctx.split is None and folder is None:
        cases = read_json_list(ctx.root / "Case_topic.json")
        descs = read_json_list(ctx.root / "Descriptions.json")
        yield from _join(ctx, list(enumerate(cases)), list(enumerate(descs)), "Case_topic.json",
                         "Descriptions.json", split="", official="")
        return
    wanted = ("train", "validation", "test") if ctx.split is None else (ctx.split,)
    if folder is None:
        raise FileNotFoundError(_missing(ctx, wanted[0], folder))
    uid_list = _uid_list(folder)
    for want in wanted:
        suffix, split = OFFICIAL[want]
        paths = [folder / f"{kind}_{suffix}.jsonl" for kind in ("data", "descriptions")]
        if not all(p.is_file() for p in paths):
            raise FileNotFoundError(_missing(ctx, want, folder))
        cases, descs = (list(iter_jsonl(p)) for p in paths)
        _check_uids(ctx, suffix, [c for _, c in cases], uid_list, ctx.rel(paths[0]))
        yield from _join(ctx, cases, descs, ctx.rel(paths[0]), ctx.rel(paths[1]), split=split, official=suffix,
                         uid_list=uid_list)


def _missing(ctx: Context, want: str, folder: Path | None) -> str:
    suffix = OFFICIAL.get(want, (want, ""))[0]
    where = folder or ctx.root / SPLIT_DIR
    found = sorted(p.name for p in where.glob("*.jsonl")) if where.is_dir() else []
    return (f"medpix: split {want!r} needs {SPLIT_DIR}/data_{suffix}.jsonl and descriptions_{suffix}.jsonl "
            f"(the official split MedPix-2-0 ships) under {ctx.root}; found {found or 'no .jsonl files'}. "
            "Without them, load split=None from Case_topic.json and split with "
            "medvlm.data_curation.splits.split_by_group")


def _uid_list(folder: Path) -> dict[str, set[str]]:
    path = folder / "uid_list.json"
    data = read_json(path) if path.is_file() else {}
    return {str(k): {str(u) for u in v} for k, v in data.items() if isinstance(v, list)} \
        if isinstance(data, dict) else {}


def _check_uids(ctx: Context, suffix: str, cases: list, uid_list: dict[str, set[str]], file: str) -> None:
    """Cases of data_<s>.jsonl missing from uid_list.json[s] are noted (the file still decides)."""
    if suffix not in uid_list:
        return
    stray = sorted(str(c.get("U_id")) for c in cases if isinstance(c, dict) and str(c.get("U_id")) not in uid_list[suffix])
    if stray:
        msg = f"medpix: {file} holds cases not listed under {suffix!r} in uid_list.json: {stray[:5]}"
        logger.warning(msg)
        ctx.warnings.append(msg)


def _bad_row(row) -> str:
    """Skip reason for a row that is not an object (a JSONL line that did not parse says so itself)."""
    if isinstance(row, str) and row.startswith("invalid JSON line"):
        return row
    return f"row is {type(row).__name__}, expected an object"


def _join(ctx: Context, cases: Iterable[tuple[int, dict | str]], descs: list[tuple[int, dict | str]],
          case_file: str, desc_file: str, split: str, official: str,
          uid_list: dict[str, set[str]] | None = None) -> Iterator[Draft | Skip]:
    """One draft per image: images listed by a case, then images described but listed under no case."""
    by_image = {str(d.get("image", "")): d for _, d in descs if isinstance(d, dict)}
    part = {u: name for name in ("train_1", "train_2") for u in (uid_list or {}).get(name, ())}
    common = {"split": split, "official": official, "part": part}
    listed: set[str] = set()
    cases = list(cases)
    for cidx, case in cases:
        if not isinstance(case, dict):
            yield Skip(case_file, cidx, _bad_row(case))
            continue
        extra = ctx.extras(case, CASE_KEYS, case_file)
        for key, modality in LISTS.items():
            for item in case.get(key) or []:
                image_id = _image_id(item)
                listed.add(image_id)
                yield _draft(ctx, case_file, cidx, case, by_image.get(image_id, {}), image_id, modality, extra,
                             desc_file, **common)
    cases_by_uid = {str(c.get("U_id")): c for _, c in cases if isinstance(c, dict)}
    for didx, desc in descs:
        if not isinstance(desc, dict):
            yield Skip(desc_file, didx, _bad_row(desc))
            continue
        if str(desc.get("image", "")) in listed:
            continue
        modality = {"CT": "CT", "MR": "MRI"}.get(str(desc.get("Type", "")).strip(), str(desc.get("Type", "")))
        case = cases_by_uid.get(str(desc.get("U_id")), {})
        yield _draft(ctx, desc_file, didx, case, desc, str(desc.get("image", "")), modality, {}, desc_file, **common)


def _draft(ctx: Context, file: str, idx: int, case: dict, desc: dict, image_id: str, modality: str,
           extra: dict, desc_file: str, split: str, official: str, part: dict[str, str]) -> Draft | Skip:
    if not image_id:
        return Skip(file, idx, "empty image id")
    info = case.get("Case") or {}
    topic = case.get("Topic") or {}
    d = desc.get("Description") or {}
    caption = d.get("Caption") or info.get("Findings") or ""
    meta = {
        "u_id": case.get("U_id") or desc.get("U_id"), "image_id": image_id,
        "title": info.get("Title"), "history": info.get("History"), "exam": info.get("Exam"),
        "findings": info.get("Findings"), "differential": info.get("Differential Diagnosis"),
        "diagnosis": info.get("Case Diagnosis"), "diagnosis_by": info.get("Diagnosis By"),
        "topic": topic.get("Title"), "disease_discussion": topic.get("Disease Discussion"),
        "acr_code": topic.get("ACR Code") or d.get("ACR Codes"), "category": topic.get("Category"),
        "age": _age(d.get("Age")), "sex": d.get("Sex"), "plane": d.get("Plane"),
        "modality_detail": d.get("Modality"), "figure_part": d.get("Figure Part"),
        "location": desc.get("Location"), "answer_from": "caption" if d.get("Caption") else "findings",
    }
    if official:
        meta["official_split"] = official
        if str(meta["u_id"]) in part:
            meta["train_part"] = part[str(meta["u_id"])]
    extra = {**extra, **ctx.extras(desc, DESC_KEYS, desc_file)} if desc else extra
    if extra:
        meta["extra"] = extra
    name = image_id if image_id.lower().endswith((".png", ".jpg", ".jpeg")) else f"{image_id}.png"
    return Draft(file, idx, image_dirs=("images", ""), fields={
        "id": f"medpix-{image_id}", "image": name, "question": ctx.options["prompt"], "answer": caption,
        "answer_type": "open", "split": split, "group_id": str(meta["u_id"] or image_id),
        "modality": modality, "body_part": str(desc.get("Location Category") or ""), "meta": meta,
    })
