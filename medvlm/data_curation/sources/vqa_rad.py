"""VQA-RAD (Lau et al., 2018): clinician-written questions on radiology images.

Release: ``VQA_RAD Dataset Public.json`` (a list of ``qid, image_name, question, answer,
answer_type, question_type, image_organ, phrase_type`` and a few linkage fields), images under
``VQA_RAD Image Folder/``. A local HF copy (parquet ``image, question, answer``, splits
train/test) or a hub id works too.

Quirks handled: some answers are integers (cast to text); ``answer_type`` may carry trailing
spaces (``"CLOSED "``); yes/no answers come in mixed case (lower-cased for closed questions only).
The split comes from ``phrase_type``: ``test_freeform``/``test_para`` → test, the rest → train
(the release's own convention). ``group_id`` is the image name.
"""

from __future__ import annotations

from collections.abc import Iterator

from medvlm.data_curation.sources._common import (
    Context,
    Draft,
    Skip,
    closed_or_open,
    hf_rows,
    image_key,
    read_json_list,
)

RELEASE_JSON = "VQA_RAD Dataset Public.json"
IMAGE_DIR = "VQA_RAD Image Folder"
KNOWN = {"qid", "image_name", "question", "answer", "answer_type", "question_type", "image_organ",
         "phrase_type", "qid_linked_id", "image_case_url", "evaluation", "question_rephrase",
         "question_relation", "question_frame"}


def iter_records(ctx: Context) -> Iterator[Draft | Skip]:
    """Release JSON when present, else the HF parquet copy / hub id."""
    path = None if ctx.root is None else next(
        (p for p in (ctx.root / RELEASE_JSON, *sorted(ctx.root.glob("*.json"))) if p.is_file()), None)
    if path is None:
        yield from _iter_hf(ctx)
        return
    file = ctx.rel(path)
    for idx, row in enumerate(read_json_list(path)):
        if not isinstance(row, dict):
            yield Skip(file, idx, f"row is {type(row).__name__}, expected an object")
            continue
        split = "test" if str(row.get("phrase_type", "")).strip().lower().startswith("test") else "train"
        if not ctx.wants(split):
            continue
        kind = str(row.get("answer_type", "")).strip().lower()
        if kind not in ("open", "closed"):
            yield Skip(file, idx, f"answer_type {row.get('answer_type')!r} is neither OPEN nor CLOSED")
            continue
        meta = {k: row.get(k) for k in ("qid", "question_type", "phrase_type", "image_organ")}
        extra = ctx.extras(row, KNOWN, file)
        if extra:
            meta["extra"] = extra
        image = str(row.get("image_name") or "")
        yield Draft(file, idx, image_dirs=(IMAGE_DIR, ""), fields={
            "id": f"vqa_rad-{row.get('qid', idx)}", "image": image, "question": row.get("question"),
            "answer": row.get("answer"), "answer_type": kind, "split": split,
            "group_id": image.rsplit(".", 1)[0], "body_part": str(row.get("image_organ") or "").strip().lower(),
            "meta": meta,
        })


def _iter_hf(ctx: Context) -> Iterator[Draft | Skip]:
    for split, file, idx, row in hf_rows(ctx):
        image = row.get("image")
        extra = ctx.extras(row, {"image", "question", "answer"}, file)
        yield Draft(file, idx, fields={
            "id": f"vqa_rad-{split}-{idx}", "image": image, "question": row.get("question"),
            "answer": row.get("answer"), "answer_type": closed_or_open(row.get("answer")), "split": split,
            "group_id": image_key(image) or f"{split}-{idx}",
            "meta": {"extra": extra} if extra else {},
        })
