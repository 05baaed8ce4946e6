"""SLAKE (Liu et al., 2021): bilingual radiology VQA with per-image masks.

Release layout (the HF copy is the same JSON, with ``validation.json`` instead of ``validate.json``)::

    train.json  validate.json | validation.json  test.json
    imgs/xmlab102/source.jpg  mask.png  detection.json

Parquet copies (e.g. ``mdwiratathya/SLAKE-vqa-english``: ``data/{train,validation,test}-*.parquet``
with ``image`` ({bytes, path}), ``question``, ``answer``) and hub ids are read when no split JSON is
there. Columns a copy lacks are derived and ``meta`` says so: ``answer_type`` (a yes/no answer is
closed, any other open: ``answer_type_derived``; choice answers such as "Left" then count as open)
and ``q_lang`` (``zh`` when the question holds Han characters: ``q_lang_derived``).

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

import re
from collections.abc import Iterator

from medvlm.data_curation.sources._common import (
    Context,
    Draft,
    Skip,
    closed_or_open,
    first_existing,
    hf_rows,
    image_key,
    numbered,
    read_json_list,
)

OPTIONS = {"lang": "en"}
SPLIT_FILES = {
    "train": ("train.json",),
    "validation": ("validate.json", "validation.json"),
    "test": ("test.json",),
}
KNOWN = {"img_id", "img_name", "question", "answer", "q_lang", "location", "modality", "answer_type",
         "base_type", "content_type", "triple", "qid"}


def iter_records(ctx: Context) -> Iterator[Draft | Skip]:
    """Yield drafts for the wanted split(s) of a SLAKE folder (release JSON, else parquet) or hub id."""
    lang = ctx.options["lang"]
    if lang not in (None, "all", "en", "zh"):
        raise ValueError(f"slake: lang must be 'en', 'zh', 'all' or None, got {lang!r}")
    names = sum(SPLIT_FILES.values(), ())
    if ctx.root is None or not any((ctx.root / n).is_file() for n in names):
        if ctx.root is not None and not any(ctx.root.rglob("*.parquet")):
            raise FileNotFoundError(f"slake: none of {names} and no parquet files (data/train-*.parquet) found "
                                    f"in {ctx.root}; pass the release folder or a local copy of the HF version")
        yield from _iter_hf(ctx, lang)
        return
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
        raise FileNotFoundError(f"slake: none of {SPLIT_FILES[ctx.split] if ctx.split else names} found in {ctx.root}")


_HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff]")
_FOLDER = re.compile(r"xmlab\d+")


def _iter_hf(ctx: Context, lang: str | None) -> Iterator[Draft | Skip]:
    """Parquet rows: the release's columns where the copy kept them, derived (and marked) where not."""
    for split, file, idx, n, row in numbered(hf_rows(ctx)):
        meta = {k: row[k] for k in ("qid", "img_id", "q_lang", "base_type", "content_type", "triple") if k in row}
        if not row.get("q_lang"):
            meta["q_lang"] = "zh" if _HAN.search(str(row.get("question") or "")) else "en"
            meta["q_lang_derived"] = True
        if lang not in (None, "all") and meta["q_lang"] != lang:
            continue
        if row.get("answer_type"):
            kind = str(row["answer_type"]).strip().lower()
        else:
            kind = closed_or_open(row.get("answer"))
            meta["answer_type_derived"] = True
        if kind not in ("open", "closed"):
            yield Skip(file, idx, f"answer_type {row.get('answer_type')!r} is neither OPEN nor CLOSED")
            continue
        image = row["image"] if "image" in row else str(row.get("img_name") or "")
        name = str(row.get("img_name") or (image.get("path") if isinstance(image, dict) else image) or "")
        m = _FOLDER.search(name)
        folder = m.group(0) if m else ""
        extra = ctx.extras(row, KNOWN | {"image"}, file)
        if extra:
            meta["extra"] = extra
        qid = row.get("qid")
        yield Draft(file, idx, image_dirs=("imgs", ""), fields={
            "id": f"slake-{split}-{qid if qid is not None else n}", "image": image,
            "question": row.get("question"), "answer": row.get("answer"), "answer_type": kind, "split": split,
            "group_id": folder or image_key(image) or f"{split}-{n}", "modality": str(row.get("modality") or ""),
            "body_part": str(row.get("location") or ""), "roi": f"imgs/{folder}/mask.png" if folder else "",
            "meta": meta,
        })


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
