"""MedPix 2.0 (Siragusa et al., 2024): clinical cases with CT and MR images and case text.

Release layout::

    Case_topic.json   list of {U_id, TAC: [image ids], MRI: [image ids], Case: {Title, History,
                      Exam, Findings, Differential Diagnosis, Case Diagnosis, Diagnosis By},
                      Topic: {Title, Disease Discussion, ACR Code, Category}}
    Descriptions.json list of {Type ("CT"|"MR"), U_id, image, Location, Location Category,
                      Description: {ACR Codes, Age ("45": a string), Caption, Figure Part,
                      Modality, Plane, Sex}}
    images/<image id>.png

One record per image: question = a description prompt (option ``prompt``), answer = the image
caption, or the case findings when the caption is empty; ``modality`` is CT for images listed
under ``TAC`` and MRI for those under ``MRI``; ``group_id`` is the case ``U_id``; ``meta`` holds
history, exam, findings, diagnosis and the demographics (``age`` as an int when numeric). The JSON
release has no official split: records carry ``split=""``; make one with ``split_by_group``.
"""

from __future__ import annotations

from collections.abc import Iterator

from medvlm.data_curation.sources._common import CAPTION_PROMPT, Context, Draft, Skip, read_json_list

OPTIONS = {"prompt": CAPTION_PROMPT}
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


def iter_records(ctx: Context) -> Iterator[Draft | Skip]:
    """Join Descriptions.json (per image) with Case_topic.json (per case)."""
    if ctx.root is None:
        raise ValueError("medpix: pass the MedPix-2-0 folder holding Case_topic.json and Descriptions.json")
    if ctx.split is not None:
        raise ValueError("medpix: the MedPix 2.0 JSON release has no official split; load with split=None "
                         "and call medvlm.data_curation.splits.split_by_group")
    cases = read_json_list(ctx.root / "Case_topic.json")
    descs = read_json_list(ctx.root / "Descriptions.json")
    by_image = {str(d.get("image", "")): (i, d) for i, d in enumerate(descs) if isinstance(d, dict)}
    listed: set[str] = set()
    for cidx, case in enumerate(cases):
        if not isinstance(case, dict):
            yield Skip("Case_topic.json", cidx, f"row is {type(case).__name__}, expected an object")
            continue
        extra = ctx.extras(case, CASE_KEYS, "Case_topic.json")
        for key, modality in LISTS.items():
            for item in case.get(key) or []:
                image_id = _image_id(item)
                listed.add(image_id)
                didx, desc = by_image.get(image_id, (None, {}))
                yield _draft(ctx, "Case_topic.json", cidx, case, desc, image_id, modality, extra)
    cases_by_uid = {str(c.get("U_id")): c for c in cases if isinstance(c, dict)}
    for didx, desc in enumerate(descs):  # images described but listed under no case
        if not isinstance(desc, dict) or str(desc.get("image", "")) in listed:
            continue
        modality = {"CT": "CT", "MR": "MRI"}.get(str(desc.get("Type", "")).strip(), str(desc.get("Type", "")))
        case = cases_by_uid.get(str(desc.get("U_id")), {})
        yield _draft(ctx, "Descriptions.json", didx, case, desc, str(desc.get("image", "")), modality, {})


def _draft(ctx: Context, file: str, idx: int, case: dict, desc: dict, image_id: str, modality: str,
           extra: dict) -> Draft | Skip:
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
    extra = {**extra, **ctx.extras(desc, DESC_KEYS, "Descriptions.json")} if desc else extra
    if extra:
        meta["extra"] = extra
    name = image_id if image_id.lower().endswith((".png", ".jpg", ".jpeg")) else f"{image_id}.png"
    return Draft(file, idx, image_dirs=("images", ""), fields={
        "id": f"medpix-{image_id}", "image": name, "question": ctx.options["prompt"], "answer": caption,
        "answer_type": "open", "split": "", "group_id": str(meta["u_id"] or image_id),
        "modality": modality, "body_part": str(desc.get("Location Category") or ""), "meta": meta,
    })
