"""ROCOv2 (Rückert et al., 2024): radiology images from PMC with captions and UMLS concepts.

Release layout::

    train_captions.csv (ID,Caption)   train_concepts.csv (ID,CUIs joined by ";")
    valid_* / test_*                  cui_mapping.csv (CUI,Canonical name)
    train/ROCOv2_2023_train_000001.jpg   valid/...   test/...

A local HF copy (parquet with ``image, image_id, caption, cui``) or a hub id works too.

Caption rows become records whose question is a captioning prompt (option ``prompt``, default
"Describe this image."), answer the caption, ``answer_type="open"``. CUIs and their canonical
names go to ``meta`` (``cuis``, ``concepts``): the raw material for QA generation. ``modality`` is
filled from the imaging-modality CUIs ROCOv2 assigns to every image; ``group_id`` is the image ID
(ROCOv2 ships no patient or article key).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from medvlm.data_curation.sources._common import CAPTION_PROMPT, Context, Draft, Skip, hf_rows, iter_csv

OPTIONS = {"prompt": CAPTION_PROMPT}
PREFIXES = {"train": ("train",), "validation": ("valid", "validation", "val"), "test": ("test",)}
#: Modality concepts of ROCOv2 (UMLS CUI → short modality name).
MODALITY_CUIS = {
    "C0040405": "CT", "C0024485": "MRI", "C0041618": "Ultrasound", "C1306645": "X-Ray",
    "C0002978": "Angiography", "C0032743": "PET",
}


def _split_cuis(value) -> list[str]:
    if isinstance(value, list):
        return [str(v).strip() for v in value if str(v).strip()]
    return [c.strip() for c in str(value or "").split(";") if c.strip()]


def _draft(ctx: Context, file: str, idx: int, split: str, image_id: str, image, caption, cuis: list[str],
           names: dict[str, str], image_dirs: tuple[str, ...], extra: dict) -> Draft:
    modality = next((MODALITY_CUIS[c] for c in cuis if c in MODALITY_CUIS), "")
    meta = {"image_id": image_id, "cuis": cuis, "concepts": [names.get(c, "") for c in cuis]}
    if extra:
        meta["extra"] = extra
    return Draft(file, idx, image_dirs=image_dirs, fields={
        "id": f"rocov2-{image_id}", "image": image, "question": ctx.options["prompt"], "answer": caption,
        "answer_type": "open", "split": split, "group_id": image_id, "modality": modality, "meta": meta,
    })


def _mapping(root: Path) -> dict[str, str]:
    path = root / "cui_mapping.csv"
    if not path.is_file():
        return {}
    return {row.get("CUI", ""): row.get("Canonical name", "") for _, row in iter_csv(path)}


def iter_records(ctx: Context) -> Iterator[Draft | Skip]:
    """Release CSVs when present, else the HF parquet copy / hub id."""
    if ctx.root is None or not any(ctx.root.glob("*_captions.csv")):
        yield from _iter_hf(ctx)
        return
    names = _mapping(ctx.root)
    for split, prefixes in PREFIXES.items():
        if not ctx.wants(split):
            continue
        prefix = next((p for p in prefixes if (ctx.root / f"{p}_captions.csv").is_file()), None)
        if prefix is None:
            continue
        concepts_path = ctx.root / f"{prefix}_concepts.csv"
        concepts = {r.get("ID", ""): _split_cuis(r.get("CUIs")) for _, r in iter_csv(concepts_path)} \
            if concepts_path.is_file() else {}
        file = f"{prefix}_captions.csv"
        dirs = (prefix, f"{prefix}_images", "images", "")
        for idx, row in iter_csv(ctx.root / file):
            image_id = (row.get("ID") or "").strip()
            if not image_id:
                yield Skip(file, idx, "empty ID")
                continue
            extra = ctx.extras(row, {"ID", "Caption"}, file)
            yield _draft(ctx, file, idx, split, image_id, f"{image_id}.jpg", row.get("Caption"),
                         concepts.get(image_id, []), names, dirs, extra)


def _iter_hf(ctx: Context) -> Iterator[Draft | Skip]:
    names = _mapping(ctx.root) if ctx.root is not None else {}
    for split, file, idx, row in hf_rows(ctx):
        image_id = str(row.get("image_id") or row.get("ID") or f"{split}-{idx}")
        extra = ctx.extras(row, {"image", "image_id", "ID", "caption", "cui"}, file)
        yield _draft(ctx, file, idx, split, image_id, row.get("image"), row.get("caption"),
                     _split_cuis(row.get("cui")), names, ("",), extra)
