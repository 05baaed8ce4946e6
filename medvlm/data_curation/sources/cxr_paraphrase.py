"""Chest X-ray paraphrase sets: CSVs where each question appears in several wordings.

Every ``*.csv`` in the folder is read (option ``files`` to choose), with columns ``study_id,
image_path, question, answer, question_variant`` and possibly more (kept in ``meta['extra']``).
The split comes from a ``split`` column when present, else from the file name
(``train.csv``, ``paraphrases_test.csv``), else ``test`` (these sets exist to probe consistency).

``group_id`` is the ``study_id`` (one patient study never straddles splits). ``meta`` keeps
``question_variant`` and ``paraphrase_group``: an explicit column (``paraphrase_group``,
``question_group``, ``base_question_id``) when the file has one, else ``study_id|image|answer``,
which is what paraphrases of one question share.
"""

from __future__ import annotations

from collections.abc import Iterator

from medvlm.data_curation.sources._common import (
    Context,
    Draft,
    Skip,
    closed_or_open,
    iter_csv,
    normalise_split,
    split_of_file,
)

OPTIONS = {"files": None}
GROUP_COLUMNS = ("paraphrase_group", "question_group", "base_question_id")
KNOWN = {"study_id", "image_path", "question", "answer", "question_variant", "split", "answer_type",
         *GROUP_COLUMNS}


def iter_records(ctx: Context) -> Iterator[Draft | Skip]:
    """One record per CSV row."""
    if ctx.root is None:
        raise ValueError("cxr_paraphrase: pass the folder holding the paraphrase CSV files and images")
    names = ctx.options["files"]
    paths = sorted(ctx.root.glob("*.csv")) if names is None else [ctx.root / n for n in
                                                                  ([names] if isinstance(names, str) else names)]
    for path in paths:
        file_split = split_of_file(path)
        file_split = file_split if file_split in ("train", "validation", "test") else "test"
        file = ctx.rel(path)
        for idx, row in iter_csv(path):
            split = (row.get("split") or "").strip()
            split = normalise_split(split) if split else file_split
            if not ctx.wants(split):
                continue
            study = (row.get("study_id") or "").strip()
            if not study:
                yield Skip(file, idx, "empty study_id (needed to keep a study in one split)")
                continue
            image = (row.get("image_path") or "").strip()
            answer = row.get("answer")
            group_col = next((c for c in GROUP_COLUMNS if (row.get(c) or "").strip()), None)
            pgroup = row[group_col].strip() if group_col else f"{study}|{image}|{str(answer or '').strip().lower()}"
            meta = {"question_variant": row.get("question_variant"), "paraphrase_group": pgroup}
            extra = ctx.extras(row, KNOWN, file)
            if extra:
                meta["extra"] = extra
            kind = (row.get("answer_type") or "").strip().lower()
            yield Draft(file, idx, fields={
                "id": f"cxr_paraphrase-{path.stem}-{idx}", "image": image, "question": row.get("question"),
                "answer": answer, "answer_type": kind if kind in ("open", "closed") else closed_or_open(answer),
                "split": split, "group_id": study, "modality": "X-Ray", "body_part": "chest", "meta": meta,
            })
