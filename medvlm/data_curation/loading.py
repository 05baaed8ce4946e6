"""``load_source``: any supported dataset, as users have it, → unified records + what was skipped.

>>> # result = load_source("slake", "/data/Slake1.0", split="train")
>>> # result.dataset            # datasets.Dataset with medvlm.records.FEATURES
>>> # result.skipped[0]         # {"source", "file", "row", "reason"}

``path`` may be the original release folder, a local copy of the Hugging Face version
(a folder holding parquet files), a single data file for sources that ship one (``llava_med``'s
instruct JSON, a ``cxr_paraphrase`` CSV), or a hub id (``owner/name``; needs the hub, loaded with
``datasets.load_dataset``). Records' ``image`` column holds absolute paths; images that exist
only as bytes are written to ``image_cache_dir`` (default ``$MEDVLM_HOME/image_cache/<source>/``).
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
from tqdm.auto import tqdm

from medvlm.data_curation.images import default_cache_dir, image_to_path, safe_join
from medvlm.data_curation.sources import SOURCES
from medvlm.data_curation.sources._common import Context, Draft, Skip, normalise_split
from medvlm.records import COLUMNS, FEATURES, RecordError, make_record, validate_record
from medvlm.utils.hub import looks_like_hub_id
from medvlm.utils.images import ImageError, verify_image
from medvlm.utils.io import did_you_mean

logger = logging.getLogger(__name__)

#: Above this many distinct images, ``verify_images=None`` does not decode every image
#: (it would take minutes); pass ``verify_images=True`` to force it.
VERIFY_AUTO_LIMIT = 20_000
_CHUNK = 10_000  # rows per Arrow chunk while parsing (bounded memory for big sources)
_COMMON_OPTIONS = ("verify_images", "image_cache_dir", "num_proc")


@dataclass
class LoadResult:
    """What :func:`load_source` returns.

    ``dataset``: unified records (``medvlm.records.FEATURES``). ``skipped``: one
    ``{"source", "file", "row", "reason"}`` per refused row (``row`` is the 0-based index of the
    row in ``file``). ``warnings``: notes that did not drop rows (e.g. unknown columns kept in meta).
    """

    dataset: datasets.Dataset
    skipped: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


class UnknownSourceError(ValueError):
    """An unknown dataset name; the message suggests the closest known names."""


def _clean_answer(value: Any) -> str:
    """Answer text, or raise ValueError: numbers are cast (VQA-RAD has integer answers)."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError(f"answer is {type(value).__name__} ({value!r}), expected text")
    text = str(value).strip()
    if not text:
        raise ValueError("empty answer")
    return text


def _finish(draft: Draft, ctx: Context, cache_dir: Path) -> dict[str, Any]:
    """Resolve image/roi, clean the answer, build and validate the record (errors → ValueError)."""
    fields = dict(draft.fields)
    fields["image"] = str(image_to_path(fields.get("image"), ctx.root, cache_dir, draft.image_dirs))
    roi = fields.get("roi") or ""
    if roi and ctx.root is not None:
        path = safe_join(ctx.root, roi)
        fields["roi"] = str(path) if path.exists() else ""
    fields["answer"] = _clean_answer(fields.get("answer"))
    if fields.get("answer_type") == "closed" and fields["answer"].lower() in ("yes", "no"):
        fields["answer"] = fields["answer"].lower()  # yes/no casing differs across sources
    if not isinstance(fields.get("question"), str):
        raise ValueError(f"question is {type(fields.get('question')).__name__}, expected text")
    fields["question"] = fields["question"].strip()
    fields.setdefault("source", ctx.source)
    return validate_record(make_record(**fields))


def _skip(ctx: Context, file: str, row: int, reason: str) -> dict[str, Any]:
    return {"source": ctx.source, "file": file, "row": row, "reason": reason}


def _parse(items: Iterator[Draft | Skip], ctx: Context, cache_dir: Path):
    """One pass over the loader's drafts → Arrow chunks, provenance per kept row, skips."""
    chunks: list[datasets.Dataset] = []
    buf: list[dict[str, Any]] = []
    prov: list[tuple[str, int, str]] = []  # (file, row, image) per kept record, in order
    skipped: list[dict[str, Any]] = []
    seen_ids: set[str] = set()
    for item in tqdm(items, desc=f"load {ctx.source}", unit="row", mininterval=2.0):
        if isinstance(item, Skip):
            skipped.append(_skip(ctx, item.file, item.row, item.reason))
            continue
        try:
            rec = _finish(item, ctx, cache_dir)
        except (ImageError, RecordError, ValueError) as err:
            skipped.append(_skip(ctx, item.file, item.row, str(err)))
            continue
        if rec["id"] in seen_ids:
            skipped.append(_skip(ctx, item.file, item.row, f"duplicate record id {rec['id']!r}"))
            continue
        seen_ids.add(rec["id"])
        buf.append(rec)
        prov.append((item.file, item.row, rec["image"]))
        if len(buf) >= _CHUNK:
            chunks.append(_to_arrow(buf))
            buf = []
    if buf or not chunks:
        chunks.append(_to_arrow(buf))
    ds = chunks[0] if len(chunks) == 1 else datasets.concatenate_datasets(chunks)
    return ds, prov, skipped


def _to_arrow(records: list[dict[str, Any]]) -> datasets.Dataset:
    # Built chunk by chunk from the parse pass rather than with Dataset.from_generator: the
    # generator builder caches on the function's hash, so a second call would skip the pass
    # (and return an empty skip list) instead of re-reading files that may have changed.
    return datasets.Dataset.from_dict({c: [r[c] for r in records] for c in COLUMNS}, features=FEATURES)


def _verify_batch(batch: dict[str, list]) -> dict[str, list]:
    return {"reason": [verify_image(p) for p in batch["image"]]}


def _bad_images(images: list[str], num_proc: int | None) -> dict[str, str]:
    """Decode each distinct image once (in ``num_proc`` processes when many); image → reason."""
    uniq = sorted(set(images))
    if not uniq:
        return {}
    if num_proc is None:
        num_proc = min(os.cpu_count() or 1, 8) if len(uniq) > 2000 else None
    table = datasets.Dataset.from_dict({"image": uniq})
    table = table.map(_verify_batch, batched=True, batch_size=256, num_proc=num_proc,
                      desc="verify images", load_from_cache_file=False)
    return {p: r for p, r in zip(table["image"], table["reason"], strict=True) if r}


def _check_options(name: str, module: Any, options: dict[str, Any]) -> dict[str, Any]:
    allowed = dict(getattr(module, "OPTIONS", {}))
    for key in options:
        if key not in allowed:
            raise TypeError(did_you_mean(key, list(allowed) + list(_COMMON_OPTIONS), f"option for {name!r}"))
    return {**allowed, **options}


def source_accepts_file(name: str) -> bool:
    """True when source ``name`` can be given one data file instead of its folder (its loader has a
    ``files`` option: LLaVA-Med's instruct JSON / eval JSONL, a paraphrase CSV)."""
    target = SOURCES.get(name, ":")
    return ":" not in target and "files" in getattr(importlib.import_module(target), "OPTIONS", {})


def _one_file(name: str, module: Any, path: Path, opts: dict[str, Any]) -> dict[str, Any]:
    """A single data file given as ``path``: read that file, with its folder as the root (images
    resolve from there)."""
    if "files" not in getattr(module, "OPTIONS", {}):
        raise NotADirectoryError(f"{name}: {str(path)!r} is a file; this source reads a folder: pass the folder "
                                 f"holding the release files ({str(path.parent)!r}?), a local HF copy, or a hub id")
    if opts.get("files") is not None:
        raise ValueError(f"{name}: pass either a file as path ({str(path)!r}) or files={opts['files']!r} with "
                         "its folder, not both")
    return {**opts, "files": [path.name]}


def _wanted_split(split: str | None, extra: tuple[str, ...]) -> str | None:
    """The split asked for, normalised: train/validation/test (any spelling), or one of the source's
    own ``EXTRA_SPLITS`` (MedPix 2.0's ``train_1`` / ``train_2``, also written ``train-1``)."""
    if split is None:
        return None
    want = normalise_split(split)
    if want in ("train", "validation", "test"):
        return want
    if want.replace("-", "_") in extra:
        return want.replace("-", "_")
    names = ", ".join(("train", "validation", "test", *extra))
    raise ValueError(f"unknown split {split!r}; use one of {names} (or None for all)")


def _load_full(name: str, target: str, path: str | os.PathLike | None, split: str | None, **options):
    """Entries of the form ``module:function`` return records themselves (the phantom dataset)."""
    mod_name, func_name = target.split(":")
    func = getattr(importlib.import_module(mod_name), func_name)
    out = func(path, split, **options)
    if isinstance(out, LoadResult):
        return out
    if hasattr(out, "dataset") and hasattr(out, "skipped"):
        return LoadResult(dataset=out.dataset, skipped=list(out.skipped))
    if isinstance(out, list):
        out = datasets.Dataset.from_dict({c: [r[c] for r in out] for c in COLUMNS}, features=FEATURES)
    return LoadResult(dataset=out.cast(FEATURES) if out.features != FEATURES else out)


def load_source(
    name: str,
    path: str | os.PathLike | None,
    split: str | None = None,
    *,
    verify_images: bool | None = None,
    image_cache_dir: str | os.PathLike | None = None,
    num_proc: int | None = None,
    **options: Any,
) -> LoadResult:
    """Load dataset ``name`` from ``path`` into unified records.

    Args:
        name: a key of :data:`medvlm.data_curation.sources.SOURCES` (``slake``, ``rocov2``...).
        path: release folder, local HF copy (parquet files), hub id ``owner/name``, or one data
            file of a source with a ``files`` option (read alone; its folder is the root).
        split: ``train``/``validation``/``test`` (source spellings such as ``Vaild`` or ``dev``
            accepted), a source's own split (MedPix 2.0's ``train_1``, ``train_2``), or None for
            every split the source ships.
        verify_images: decode every distinct image and skip rows whose image is corrupt or
            truncated. None (default) verifies when there are at most ``VERIFY_AUTO_LIMIT``
            distinct images and logs that it did not otherwise.
        image_cache_dir: where images stored as bytes are written (content-addressed);
            default ``$MEDVLM_HOME/image_cache/<name>/``.
        num_proc: processes for image verification (default: automatic).
        **options: source options, e.g. ``lang="en"`` for SLAKE or ``prompt=...`` for captions.

    Returns:
        :class:`LoadResult` with the dataset, the skipped rows and warnings.
    """
    if name not in SOURCES:
        raise UnknownSourceError(did_you_mean(name, list(SOURCES), "source"))
    target = SOURCES[name]
    if ":" in target:
        return _load_full(name, target, path, _wanted_split(split, ()), **options)
    module = importlib.import_module(target)
    want = _wanted_split(split, getattr(module, "EXTRA_SPLITS", ()))
    opts = _check_options(name, module, options)
    text = os.fspath(path) if path is not None else ""
    if looks_like_hub_id(text):
        ctx = Context(source=name, root=None, hub_id=text, split=want, options=opts)
    else:
        root = Path(text).expanduser()
        if root.is_file():
            opts = _one_file(name, module, root, opts)
            root = root.parent
        elif not root.is_dir():
            raise FileNotFoundError(f"{name}: dataset folder {str(root)!r} does not exist; pass the folder "
                                    "holding the release files, a local HF copy, or a hub id owner/name")
        ctx = Context(source=name, root=root.resolve(), hub_id=None, split=want, options=opts)
    cache_dir = Path(image_cache_dir) if image_cache_dir is not None else default_cache_dir(name)
    ds, prov, skipped = _parse(module.iter_records(ctx), ctx, cache_dir)

    n_images = len({p[2] for p in prov})
    if verify_images is None:
        verify_images = n_images <= VERIFY_AUTO_LIMIT
        if not verify_images:
            logger.warning("%s: %d images not decoded (above %d); pass verify_images=True to check them",
                           name, n_images, VERIFY_AUTO_LIMIT)
    if verify_images and len(ds):
        bad = _bad_images([p[2] for p in prov], num_proc)
        if bad:
            keep = [i for i, p in enumerate(prov) if p[2] not in bad]
            skipped += [_skip(ctx, f, r, bad[img]) for f, r, img in prov if img in bad]
            ds = ds.select(keep).flatten_indices()
    if skipped:
        logger.warning("%s: skipped %d rows (see LoadResult.skipped); first: %s", name, len(skipped), skipped[0])
        if not len(ds) and all(s["reason"].startswith("image file not found") for s in skipped):
            logger.error("%s: no image was found under %s; extract the image archive (e.g. imgs.zip, "
                         "images.zip) inside the dataset folder", name, text)
    logger.info("%s: %d records loaded from %s", name, len(ds), text)
    return LoadResult(dataset=ds, skipped=skipped, warnings=ctx.warnings)
