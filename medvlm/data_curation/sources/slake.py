"""SLAKE (Liu et al., 2021): bilingual radiology VQA with per-image masks.

Release layout (the HF copy is the same JSON, with ``validation.json`` instead of ``validate.json``)::

    train.json  validate.json | validation.json  test.json
    imgs/xmlab102/source.jpg  mask.png  detection.json

Rows: ``img_id, img_name ("xmlab102/source.jpg"), question, answer, q_lang ("en"|"zh"), location,
modality, answer_type ("OPEN"|"CLOSED"), base_type, content_type, triple, qid``.

* ``lang`` option (default ``"en"``) keeps one language; ``None`` or ``"all"`` keeps both. This is a
  *selection*, not a rejection, so rows of the other language are not listed in ``skipped``.
* CLOSED answers are mostly yes/no, but also choices such as "Lung", "Left", "T2"; all stay
  ``closed`` (``choices`` stays empty: SLAKE does not ship the option list).
* ``roi`` is the image folder's ``mask.png``; ``group_id`` is the image folder (``xmlab102``), so
  questions on one image never straddle a split made by :func:`split_by_group`. The official
  splits do share images: see :func:`medvlm.data_curation.splits.leakage_report`.
"""

from __future__ import annotations

from collections.abc import Iterator

from medvlm.data_curation.sources._common import Context, Draft, Skip, first_existing, read_json_list

OPTIONS = {"lang": "en"}
SPLIT_FILES = {
    "train": ("train.json",),
    "validation": ("validate.json", "validation.json"),
    "test": ("test.json",),
}
KNOWN = {"img_id", "img_name", "question", "answer", "q_lang", "location", "modality", "answer_type",
         "base_type", "content_type", "triple", "qid"}


def iter_records(ctx: Context) -> Iterator[Draft | Skip]:
    """Yield drafts for the wanted split(s) of a SLAKE folder."""
    if ctx.root is None:
        raise ValueError("slake: download the release (or the HF copy's JSON + imgs folder) and pass its folder")
    lang = ctx.options["lang"]
    if lang not in (None, "all", "en", "zh"):
        raise ValueError(f"slake: lang must be 'en', 'zh', 'all' or None, got {lang!r}")
    found = False
    for split, names in SPLIT_FILES.items():
        if not ctx.wants(split):
            continue
        path = first_existing(ctx.root, names)
        if path is None:
            continue
        found = True
        file = ctx.rel(path)
        for idx, row in enumerate(read_json_list(path)):
            if not isinstance(row, dict):
                yield Skip(file, idx, f"row is {type(row).__name__}, expected an object")
                continue
            if lang not in (None, "all") and row.get("q_lang", "en") != lang:
                continue
            yield from _row(ctx, file, idx, split, row)
    if not found:
        raise FileNotFoundError(f"slake: none of {sum(SPLIT_FILES.values(), ())} found in {ctx.root}")


def _row(ctx: Context, file: str, idx: int, split: str, row: dict) -> Iterator[Draft | Skip]:
    img_name = str(row.get("img_name") or "")
    folder = img_name.split("/")[0] if "/" in img_name else str(row.get("img_id", ""))
    kind = str(row.get("answer_type", "")).strip().lower()
    if kind not in ("open", "closed"):
        yield Skip(file, idx, f"answer_type {row.get('answer_type')!r} is neither OPEN nor CLOSED")
        return
    meta = {k: row.get(k) for k in ("qid", "img_id", "q_lang", "base_type", "content_type", "triple")}
    meta["detection"] = f"imgs/{folder}/detection.json"
    extra = ctx.extras(row, KNOWN, file)
    if extra:
        meta["extra"] = extra
    yield Draft(file, idx, image_dirs=("imgs", ""), fields={
        "id": f"slake-{split}-{row.get('qid', idx)}",
        "image": img_name,
        "question": row.get("question"),
        "answer": row.get("answer"),
        "answer_type": kind,
        "split": split,
        "group_id": folder,
        "modality": str(row.get("modality") or ""),
        "body_part": str(row.get("location") or ""),
        "roi": f"imgs/{folder}/mask.png" if folder else "",
        "meta": meta,
    })
