"""Image QA sets published only in Hugging Face format: MEDPIX-ShortQA and ROCO-QA.

Both are parquet files (``data/Train-*.parquet`` or ``<config>/<split>/0000.parquet``) with the
image embedded as an HF ``Image`` column, read from a local copy or a hub id. The two disagree on
which column holds the picture, so it is chosen by content (:func:`pick_image_column`: the column
holding image bytes, else one naming an existing file), not by name:

* ``medpix_shortqa`` keeps the *image* in a column named ``image_id`` (plus ``case_id, question,
  answer, ans_len, mode, split``); ``group_id`` is the ``case_id``.
* ``roco_qa`` (``adishourya/ROCO-QA``: splits ``Vaild`` and ``Test``; ``adishourya/ROCO-QA-Train``:
  split ``Train`` in 26 shards) keeps an id string such as ``ROCO_00020`` in ``image_id`` and the
  picture (bytes, no file name) in ``image``. ``Vaild`` maps to ``validation``. The id string is
  kept in ``meta["image_id"]`` and is the ``group_id``, so questions on one picture share a split.

Record ids number the rows of a split across its shards (``roco_qa-test-0`` ...). Yes/no answers
are ``closed``, the rest ``open`` (neither set labels its answers).
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
    numbered,
    pick_image_column,
)

IMAGE_COLUMNS = ("image", "image_id", "images")  # tie-break order only: the content decides
KNOWN = {"question", "answer", "case_id", *IMAGE_COLUMNS}


def iter_records(ctx: Context) -> Iterator[Draft | Skip]:
    """One record per parquet row."""
    for split, file, idx, n, row in numbered(hf_rows(ctx)):
        col, image, reason = pick_image_column(row, IMAGE_COLUMNS, ctx.root)
        if col is None:
            yield Skip(file, idx, reason)
            continue
        meta = {"row_split": row.get("split"), "image_column": col,
                **{k: row[k] for k in ("mode", "ans_len") if k in row}}
        ids = {c: row[c] for c in IMAGE_COLUMNS if c != col and isinstance(row.get(c), str) and row[c].strip()}
        meta.update(ids)  # ROCO-QA's image_id ("ROCO_00020")
        extra = ctx.extras(row, KNOWN | {"split", "mode", "ans_len"}, file)
        if extra:
            meta["extra"] = extra
        group = str(row.get("case_id") or ids.get("image_id") or image_key(image) or f"{split}-{n}")
        yield Draft(file, idx, fields={
            "id": f"{ctx.source}-{split}-{n}", "image": image, "question": row.get("question"),
            "answer": row.get("answer"), "answer_type": closed_or_open(row.get("answer")),
            "split": split, "group_id": group, "meta": meta,
        })
