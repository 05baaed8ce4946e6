"""Shared pieces of the source loaders: the loader context, drafts/skips, file readers, split names.

A loader module exposes ``iter_records(ctx: Context) -> Iterator[Draft | Skip]`` (and may set
``OPTIONS``, a dict of its own options with defaults). A :class:`Draft` is a record whose image
is still a raw reference (relative path, HF bytes dict, PIL image); :mod:`medvlm.data_curation.loading`
resolves it, checks the answer, validates the record and builds the Arrow dataset.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

from PIL import Image

from medvlm.data_curation.images import safe_join
from medvlm.utils.images import ImageError

logger = logging.getLogger(__name__)

_SPLIT_ALIASES = {
    "train": "train", "training": "train",
    "validation": "validation", "valid": "validation", "val": "validation", "validate": "validation",
    "vaild": "validation",  # ROCO-QA's spelling on the hub
    "dev": "validation",
    "test": "test", "testing": "test",
}

#: Prompt used for caption-style sources (ROCOv2, MedPix) when no ``prompt`` option is given.
CAPTION_PROMPT = "Describe this image."

def normalise_split(name: str) -> str:
    """Map a source's split spelling (``Vaild``, ``valid``, ``validate``, ``Train``) to train/validation/test.

    Unknown names are returned lower-cased so they stay visible rather than being guessed.
    """
    key = str(name).strip().lower()
    return _SPLIT_ALIASES.get(key, key)


@dataclass
class Draft:
    """A record before image resolution: ``fields`` are :func:`medvlm.records.make_record` kwargs
    except ``image`` (raw reference) and ``roi`` (path relative to the root, or "")."""

    file: str
    row: int
    fields: dict[str, Any]
    image_dirs: tuple[str, ...] = ("",)


@dataclass
class Skip:
    """A row the loader refused, with its reason (becomes one entry of ``LoadResult.skipped``)."""

    file: str
    row: int
    reason: str


@dataclass
class Context:
    """What a loader gets: its root folder (or hub id), the wanted split, its options."""

    source: str
    root: Path | None
    hub_id: str | None
    split: str | None
    options: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    _warned: set[tuple[str, tuple[str, ...]]] = field(default_factory=set)

    def wants(self, split: str) -> bool:
        """True when ``split`` (already normalised) is asked for (or no split was given)."""
        return self.split is None or self.split == split

    def rel(self, path: Path) -> str:
        """A file name for skip entries: relative to the root when possible."""
        if self.root is not None:
            try:
                return str(Path(path).relative_to(self.root))
            except ValueError:
                pass
        return str(path)

    def extras(self, row: Mapping[str, Any], known: Iterable[str], file: str) -> dict[str, Any]:
        """Columns the loader does not know: returned (to keep in meta) and logged once per file."""
        known = set(known)
        extra = {k: _jsonable(v) for k, v in row.items() if k not in known}
        if extra:
            key = (file, tuple(sorted(extra)))
            if key not in self._warned:
                self._warned.add(key)
                msg = f"{self.source}: {file} has columns this loader does not know {sorted(extra)}; kept in meta['extra']"
                logger.warning(msg)
                self.warnings.append(msg)
        return extra


def _jsonable(value: Any) -> Any:
    """Make a cell JSON-safe for meta (bytes and images are summarised, not embedded)."""
    if isinstance(value, bytes | bytearray):
        return f"<{len(value)} bytes>"
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


def first_existing(root: Path, names: Iterable[str]) -> Path | None:
    """The first of ``names`` that exists under ``root`` (None if none)."""
    for name in names:
        if (root / name).is_file():
            return root / name
    return None


def read_json(path: Path) -> Any:
    """Load a JSON file; a syntax error names the file, line and column."""
    try:
        with open(path, encoding="utf-8-sig") as fh:
            return json.load(fh)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}") from err


def read_json_list(path: Path) -> list[Any]:
    """A JSON file whose top level must be a list of objects."""
    data = read_json(path)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of rows, got {type(data).__name__}")
    return data


def iter_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """(row index, parsed object) per non-empty line; a bad line yields the error text instead."""
    with open(path, encoding="utf-8-sig") as fh:
        idx = 0
        for line in fh:
            if not line.strip():
                continue
            try:
                yield idx, json.loads(line)
            except json.JSONDecodeError as err:
                yield idx, f"invalid JSON line: {err.msg}"
            idx += 1


def iter_csv(path: Path) -> Iterator[tuple[int, dict[str, str]]]:
    """Stream (row index, row dict) from a CSV with a header; strings are kept exactly as written."""
    with open(path, encoding="utf-8-sig", newline="") as fh:
        yield from enumerate(csv.DictReader(fh))


def split_of_file(path: Path) -> str:
    """Split name of an HF data file: ``data/Vaild-00000-of-00001.parquet``, ``train_roco.parquet``,
    or the folder of ``default/Test/0000.parquet``; unknown names come back lower-cased."""
    for token in re.split(r"[-_.]", path.name):
        if normalise_split(token) in ("train", "validation", "test"):
            return normalise_split(token)
    if normalise_split(path.parent.name) in ("train", "validation", "test"):
        return normalise_split(path.parent.name)
    return path.name.split(".")[0].lower()


def hf_local_rows(root: Path, split: str | None) -> Iterator[tuple[str, str, int, dict[str, Any]]]:
    """(split, file, row index, row) from a local copy of an HF dataset stored as parquet.

    Read with pyarrow in record batches (memory stays flat); HF ``Image`` columns arrive as
    ``{"bytes", "path"}`` dicts, which :func:`medvlm.data_curation.images.image_to_path` handles.
    """
    import pyarrow.parquet as pq

    files = sorted(root.rglob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"{root}: no parquet files found (expected an HF copy such as data/train-*.parquet)")
    for path in files:
        name = split_of_file(path)
        if split is not None and name != split:
            continue
        idx = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=512):
            for row in batch.to_pylist():
                yield name, str(path.relative_to(root)), idx, row
                idx += 1


def hf_hub_rows(hub_id: str, split: str | None) -> Iterator[tuple[str, str, int, dict[str, Any]]]:
    """Same as :func:`hf_local_rows` for a hub id, through ``datasets.load_dataset`` (needs the hub)."""
    import datasets

    dsd = datasets.load_dataset(hub_id)
    for raw_name, ds in dsd.items():
        name = normalise_split(raw_name)
        if split is not None and name != split:
            continue
        for col, feat in ds.features.items():
            if isinstance(feat, datasets.Image):
                ds = ds.cast_column(col, datasets.Image(decode=False))
        for idx, row in enumerate(ds):
            yield name, f"{hub_id}:{raw_name}", idx, row


def hf_rows(ctx: Context) -> Iterator[tuple[str, str, int, dict[str, Any]]]:
    """Rows of an HF-format copy: the local parquet folder, or the hub id."""
    if ctx.hub_id is not None:
        return hf_hub_rows(ctx.hub_id, ctx.split)
    assert ctx.root is not None
    return hf_local_rows(ctx.root, ctx.split)


def numbered(rows: Iterable[tuple[str, str, int, dict[str, Any]]]) -> Iterator[tuple[str, str, int, int, dict[str, Any]]]:
    """(split, file, row in file, row in split, row): a split sharded over several files
    (``Test-00000-of-00002.parquet``, ``Test-00001-of-00002.parquet``) restarts the row index in each
    file; the running number across the split's files gives record ids that stay unique."""
    counts: dict[str, int] = {}
    for split, file, idx, row in rows:
        n = counts.get(split, 0)
        counts[split] = n + 1
        yield split, file, idx, n, row


def _image_content(value: Any, root: Path | None) -> tuple[str, Any]:
    """What a cell holds: ("bytes", image reference), ("file", path), or ("", description)."""
    if isinstance(value, list | tuple):
        value = value[0] if value else None
    if isinstance(value, Image.Image):
        return "bytes", value
    if isinstance(value, bytes | bytearray):
        return ("bytes", {"bytes": bytes(value), "path": None}) if value else ("", "empty bytes")
    if isinstance(value, dict):
        if value.get("bytes"):
            return "bytes", value
        value = value.get("path") or ""
    if isinstance(value, str) and value.strip():
        if root is not None:
            try:
                if safe_join(root, value).is_file():
                    return "file", value
            except ImageError:
                pass
        return "", f"{value!r} (no image file of that name under the dataset folder)"
    return "", f"{type(value).__name__} {value!r}"[:80]


def pick_image_column(row: Mapping[str, Any], columns: Iterable[str], root: Path | None) -> tuple[str | None, Any, str]:
    """The column of ``row`` that holds the picture, chosen by content, not by name order.

    Copies disagree on which column holds the picture: MEDPIX-ShortQA keeps it under ``image_id``,
    ROCO-QA keeps an id string (``ROCO_00020``) under ``image_id`` and the picture under ``image``.
    A column holding image bytes wins; else one naming a file that exists under ``root``; the first
    of ``columns`` breaks ties. Returns (column, image reference, "") or (None, None, reason), the
    reason saying what each candidate column held.
    """
    found: dict[str, list[tuple[str, Any]]] = {"bytes": [], "file": []}
    held = []
    for col in columns:
        if col not in row:
            continue
        kind, ref = _image_content(row[col], root)
        if kind:
            found[kind].append((col, ref))
        else:
            held.append(f"{col}: {ref}")
    for kind in ("bytes", "file"):
        if found[kind]:
            col, ref = found[kind][0]
            return col, ref, ""
    if not held:
        return None, None, f"no image column (looked for {list(columns)}, found {sorted(row)})"
    return None, None, "no column holds image bytes or an existing image file: " + "; ".join(held)


def closed_or_open(answer: Any) -> str:
    """Answer type for sources that do not label it: yes/no answers are closed, the rest open."""
    return "closed" if str(answer).strip().lower() in ("yes", "no") else "open"


def image_key(image: Any) -> str:
    """A stable group key for an embedded image: its file stem, else a hash of its bytes."""
    if isinstance(image, dict):
        if image.get("path"):
            return PurePath(str(image["path"])).stem
        if image.get("bytes"):
            return hashlib.sha256(image["bytes"]).hexdigest()[:16]
    if isinstance(image, str):
        return PurePath(image).stem
    return ""
