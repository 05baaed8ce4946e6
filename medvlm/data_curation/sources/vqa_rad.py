"""VQA-RAD (Lau et al., 2018): clinician-written questions on radiology images.

Layouts read (the first found wins):

* the release: ``VQA_RAD Dataset Public.json`` (a list of ``qid, image_name, question, answer,
  answer_type, question_type, image_organ, phrase_type`` and a few linkage fields), images under
  ``VQA_RAD Image Folder/``. The split comes from ``phrase_type``: ``test_freeform``/``test_para``
  → test, the rest → train (the release's own convention). Record ids ``vqa_rad-<qid>``.
* the most common copy (``data_RAD/`` of ``aioz-ai/MICCAI19-MedVQA`` (MEVF) and the repositories
  built on it): ``trainset.json`` / ``testset.json`` (same row keys; ``phrase_type`` is
  ``freeform``/``para`` in both) with the pictures in ``images/``. The split is the file's; qids
  restart at 1 in each file, so record ids are ``vqa_rad-<split>-<qid>``.
* a local HF copy (parquet ``image, question, answer``, splits train/test) or a hub id; it has no
  ``answer_type``: yes/no answers are ``closed``, the rest ``open``, and ``meta["answer_type_derived"]``
  says so.

Quirks handled: some answers are integers (cast to text); ``answer_type`` may carry trailing
spaces (``"CLOSED "``); yes/no answers come in mixed case (lower-cased for closed questions only).
``group_id`` is the image name. Both image folders are searched whatever the layout.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

from medvlm.data_curation.sources._common import (
    Context,
    Draft,
    Skip,
    closed_or_open,
    hf_rows,
    image_key,
    numbered,
    read_json_list,
)

RELEASE_JSON = "VQA_RAD Dataset Public.json"
IMAGE_DIR = "VQA_RAD Image Folder"
SPLIT_FILES = {"train": "trainset.json", "test": "testset.json"}
KNOWN = {"qid", "image_name", "question", "answer", "answer_type", "question_type", "image_organ",
         "phrase_type", "qid_linked_id", "image_case_url", "evaluation", "question_rephrase",
         "question_relation", "question_frame"}


def _release_split(row: dict) -> str:
    return "test" if str(row.get("phrase_type", "")).strip().lower().startswith("test") else "train"


def iter_records(ctx: Context) -> Iterator[Draft | Skip]:
    """Release JSON, else trainset.json/testset.json, else any other JSON list, else the HF copy / hub id."""
    if ctx.root is None:
        yield from _iter_hf(ctx)
        return
    if (ctx.root / RELEASE_JSON).is_file():
        yield from _json_rows(ctx, ctx.root / RELEASE_JSON, _release_split, (IMAGE_DIR, "images", ""))
        return
    present = {split: ctx.root / name for split, name in SPLIT_FILES.items() if (ctx.root / name).is_file()}
    if present:
        for split in SPLIT_FILES:
            if not ctx.wants(split):
                continue
            if split not in present:
                raise FileNotFoundError(f"vqa_rad: split {split!r} needs {SPLIT_FILES[split]} beside "
                                        f"{', '.join(p.name for p in present.values())} in {ctx.root}")
            yield from _json_rows(ctx, present[split], lambda row, s=split: s, ("images", IMAGE_DIR, ""),
                                  id_split=True)
        return
    other = next((p for p in sorted(ctx.root.glob("*.json")) if p.is_file()), None)
    if other is not None:  # a release JSON saved under another name
        yield from _json_rows(ctx, other, _release_split, (IMAGE_DIR, "images", ""))
        return
    yield from _iter_hf(ctx)


def _json_rows(ctx: Context, path: Path, split_of: Callable[[dict], str], image_dirs: tuple[str, ...],
               id_split: bool = False) -> Iterator[Draft | Skip]:
    file = ctx.rel(path)
    for idx, row in enumerate(read_json_list(path)):
        if not isinstance(row, dict):
            yield Skip(file, idx, f"row is {type(row).__name__}, expected an object")
            continue
        split = split_of(row)
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
        qid = row.get("qid", idx)
        yield Draft(file, idx, image_dirs=image_dirs, fields={
            "id": f"vqa_rad-{split}-{qid}" if id_split else f"vqa_rad-{qid}", "image": image,
            "question": row.get("question"), "answer": row.get("answer"), "answer_type": kind, "split": split,
            "group_id": image.rsplit(".", 1)[0], "body_part": str(row.get("image_organ") or "").strip().lower(),
            "meta": meta,
        })


def _iter_hf(ctx: Context) -> Iterator[Draft | Skip]:
    for split, file, idx, n, row in numbered(hf_rows(ctx)):
        image = row.get("image")
        extra = ctx.extras(row, {"image", "question", "answer"}, file)
        yield Draft(file, idx, fields={
            "id": f"vqa_rad-{split}-{n}", "image": image, "question": row.get("question"),
            "answer": row.get("answer"), "answer_type": closed_or_open(row.get("answer")), "split": split,
            "group_id": image_key(image) or f"{split}-{n}",
            "meta": {"answer_type_derived": True, **({"extra": extra} if extra else {})},
        })
