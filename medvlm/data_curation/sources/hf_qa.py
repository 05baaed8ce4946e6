"""Image QA sets published only in Hugging Face format: MEDPIX-ShortQA and ROCO-QA.

Both are parquet files (``data/Train-*.parquet`` or ``<config>/<split>/0000.parquet``) with the
image embedded as an HF ``Image`` column, read from a local copy or a hub id.

* ``medpix_shortqa`` keeps the *image* in a column named ``image_id`` (plus ``case_id, question,
  answer, ans_len, mode, split``); ``group_id`` is the ``case_id``.
* ``roco_qa`` names its splits ``Vaild`` and ``Test``; ``Vaild`` maps to ``validation``.
  ``group_id`` is the image file name, or a hash of the image bytes when it has none.

Yes/no answers are ``closed``, the rest ``open`` (neither set labels its answers).
"""

from __future__ import annotations

from collections.abc import Iterator

from medvlm.data_curation.sources._common import Context, Draft, Skip, closed_or_open, hf_rows, image_key

IMAGE_COLUMNS = ("image_id", "image", "images")  # MEDPIX-ShortQA stores the image under image_id
KNOWN = {"question", "answer", "case_id", *IMAGE_COLUMNS}


def iter_records(ctx: Context) -> Iterator[Draft | Skip]:
    """One record per parquet row."""
    for split, file, idx, row in hf_rows(ctx):
        col = next((c for c in IMAGE_COLUMNS if c in row), None)
        if col is None:
            yield Skip(file, idx, f"no image column (looked for {list(IMAGE_COLUMNS)}, found {sorted(row)})")
            continue
        image = row[col]
        if isinstance(image, list):
            image = image[0] if image else None
        key = image_key(image)
        meta = {"row_split": row.get("split"), **{k: row[k] for k in ("mode", "ans_len") if k in row}}
        extra = ctx.extras(row, KNOWN | {"split", "mode", "ans_len"}, file)
        if extra:
            meta["extra"] = extra
        group = str(row.get("case_id") or key or f"{split}-{idx}")
        yield Draft(file, idx, fields={
            "id": f"{ctx.source}-{split}-{idx}", "image": image, "question": row.get("question"),
            "answer": row.get("answer"), "answer_type": closed_or_open(row.get("answer")),
            "split": split, "group_id": group, "meta": meta,
        })
