"""Model inputs: images prepared once into an on-disk cache, examples for the collator, the collator.

Decoding and resizing every PNG/JPEG/DICOM at every step makes VLM fine-tuning input-bound, and
keeping every decoded image in RAM grows with the dataset (602 KB per 448-pixel image: about
48 GB for ROCOv2 on every rank). So each distinct image of a dataset is prepared once (read,
resized by :meth:`~medvlm.models.base.ModelFamily.prepare_images` as the family's processor would,
kept as uint8) and written to one file of concatenated pixels with an index of offsets and
shapes. Readers read one image at a time from that file: the operating system's page cache is
shared by every rank, run and DataLoader worker, and a process holds one batch of images, whatever
the dataset's size. Images of different sizes (dynamic-resolution families) are stored as they come.

The cache folder is ``$MEDVLM_HOME/prepared_images/<fingerprint>/``; the fingerprint covers the
family, the processor's image settings and each image's path, size and modification time, so a
changed file or processor makes a new cache and a re-run (or another rank) reuses the old one.
Under several processes the main process builds it while the others wait; the folder appears by
an atomic rename, so a crash never leaves a half-written cache behind.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import ProcessorMixin

from medvlm.models.base import ModelFamily
from medvlm.utils.distributed import main_process_first
from medvlm.utils.images import read_image
from medvlm.utils.io import atomic_write_json, medvlm_home

logger = logging.getLogger(__name__)

CACHE_VERSION = 1


class ImageStore:
    """Prepared images (uint8 HxWx3, any sizes) by index: read from the cache file of ``folder`` (one
    positioned read per image), or held in a list for a small ad-hoc set.

    Reads go through the operating system's page cache (shared by every process reading the file)
    into a buffer of one image, instead of memory-mapping the file: mapped pages a process has
    touched count in its resident memory, which would then grow with every image of an epoch."""

    def __init__(self, folder: str | Path | None = None, images: Sequence[np.ndarray] | None = None):
        self.folder = None if folder is None else Path(folder)
        self._images = None if images is None else list(images)
        self._fd: int | None = None
        self._pid: int | None = None
        self.index = (np.load(self.folder / "index.npy") if self.folder is not None
                      else np.zeros((len(self._images or []), 4), np.int64))
        self._rows = self.index.tolist()  # (offset, h, w, c) as Python ints: no numpy call per read

    def __len__(self) -> int:
        return len(self._images) if self._images is not None else len(self.index)

    def __getitem__(self, i: int) -> np.ndarray:
        if self._images is not None:
            return self._images[i]
        if self._fd is None or self._pid != os.getpid():  # a DataLoader worker opens its own
            self._fd, self._pid = os.open(self.folder / "pixels.bin", os.O_RDONLY), os.getpid()
        offset, h, w, c = self._rows[i]
        data = os.pread(self._fd, h * w * c, offset)
        return np.frombuffer(data, dtype=np.uint8).reshape(h, w, c)

    def __getstate__(self) -> dict:  # DataLoader workers reopen the file
        return {**self.__dict__, "_fd": None, "_pid": None}

    def __del__(self) -> None:
        try:
            if self._fd is not None and self._pid == os.getpid():
                os.close(self._fd)
        except (AttributeError, TypeError, OSError):  # interpreter shutdown: os may be gone
            pass


def _fingerprint(family: ModelFamily, processor: ProcessorMixin, paths: Sequence[str]) -> str:
    h = hashlib.sha256()
    settings = json.dumps(family.image_settings(processor), sort_keys=True, default=str)
    h.update(f"{CACHE_VERSION}\0{family.name}\0{settings}\0".encode())
    for p in paths:
        try:
            st = os.stat(p)
            h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{p}\0missing\n".encode())
    return h.hexdigest()[:24]


def _write_store(folder: Path, family: ModelFamily, processor: ProcessorMixin, paths: Sequence[str],
                 batch: int) -> None:
    """Prepare ``paths`` into ``folder`` (a temporary name, renamed into place when complete)."""
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    index = np.zeros((len(paths), 4), np.int64)
    offset = 0
    try:
        with open(tmp / "pixels.bin", "wb") as fh:
            for start in tqdm(range(0, len(paths), batch), desc="prepare images", disable=None):
                chunk = family.prepare_images(processor, [read_image(p, name=f"image {p}")
                                                          for p in paths[start:start + batch]])
                for j, arr in enumerate(chunk):
                    arr = np.ascontiguousarray(arr, dtype=np.uint8)
                    index[start + j] = (offset, *arr.shape)
                    fh.write(arr.tobytes())
                    offset += arr.size
        np.save(tmp / "index.npy", index)
        atomic_write_json(tmp / "manifest.json", {"images": len(paths), "bytes": offset, "family": family.name,
                                                  "version": CACHE_VERSION})
        try:
            tmp.rename(folder)
        except OSError:  # another process finished the same cache first: keep theirs
            if not (folder / "manifest.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def prepared_image_store(family: ModelFamily, processor: ProcessorMixin, paths: Sequence[str], *,
                         cache_dir: str | Path | None = None, batch: int = 64) -> ImageStore:
    """The prepared images of ``paths`` (distinct), from the on-disk cache (built when missing).
    ``cache_dir`` defaults to ``$MEDVLM_HOME/prepared_images``."""
    root = Path(cache_dir) if cache_dir is not None else medvlm_home() / "prepared_images"
    folder = root / _fingerprint(family, processor, paths)
    with main_process_first():
        if not (folder / "manifest.json").is_file():
            logger.info("preparing %d images for %s into %s (reused by later runs)", len(paths), family.name, folder)
            folder.parent.mkdir(parents=True, exist_ok=True)
            _write_store(folder, family, processor, paths, batch)
    return ImageStore(folder)


@dataclass
class PreparedExamples(torch.utils.data.Dataset):
    """Examples ready for the collator: ``image`` (a prepared uint8 HxWx3), ``question``, ``answer``, ``id``."""

    store: ImageStore
    image_index: np.ndarray     # [n] index into store
    questions: list[str]
    answers: list[str]
    ids: list[str]
    phases: np.ndarray          # [n] int, 0 .. n_phases-1 (annealing order)
    lengths: np.ndarray         # [n] approximate token counts (for length grouping)
    blank: bool = False         # every image replaced by uniform mid-grey (the "does it look?" control)

    def __len__(self) -> int:
        return len(self.questions)

    def image(self, i: int) -> np.ndarray:
        img = self.store[int(self.image_index[i])]
        return np.full_like(img, 128) if self.blank else img

    def images(self) -> list[np.ndarray]:
        """Every example's prepared image, in order (read lazily from the memory-mapped cache)."""
        return [self.image(i) for i in range(len(self))]

    def head(self, n: int) -> PreparedExamples:
        """The first ``n`` examples (sharing the image store)."""
        return dataclasses.replace(self, image_index=self.image_index[:n], questions=self.questions[:n],
                                   answers=self.answers[:n], ids=self.ids[:n], phases=self.phases[:n],
                                   lengths=self.lengths[:n])

    def blanked(self) -> PreparedExamples:
        """The same examples with every image a uniform mid-grey of its own size."""
        return dataclasses.replace(self, blank=True)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.image(i), "question": self.questions[i], "answer": self.answers[i], "id": self.ids[i]}


def _column(records, name: str, default=None) -> list:
    """A column of a ``datasets.Dataset`` or of a list of dicts."""
    if hasattr(records, "column_names"):
        return list(records[name]) if name in records.column_names else [default] * len(records)
    return [r.get(name, default) for r in records]


def prepare_examples(records, processor: ProcessorMixin, family: ModelFamily, *,
                     cache_dir: str | Path | None = None, in_memory: bool = False) -> PreparedExamples:
    """Unified records (a ``datasets.Dataset`` or dicts) → :class:`PreparedExamples`.

    Each distinct image is prepared once into the on-disk cache (``in_memory=True`` keeps a small
    ad-hoc set in a list instead); lengths are tokenised for grouping; the ``phase`` column (from
    a mix) is kept, 0 when absent.
    """
    paths, questions, answers, ids = (_column(records, c) for c in ("image", "question", "answer", "id"))
    phases = _column(records, "phase", 0)
    unique = list(dict.fromkeys(str(p) for p in paths))
    if in_memory:
        store = ImageStore(images=family.prepare_images(processor, [read_image(p) for p in unique]))
    else:
        store = prepared_image_store(family, processor, unique, cache_dir=cache_dir)
    index = {p: i for i, p in enumerate(unique)}
    tok = processor.tokenizer
    lengths = np.array([len(x) + len(y) for x, y in zip(
        tok(questions, add_special_tokens=False)["input_ids"],
        tok(answers, add_special_tokens=False)["input_ids"])], dtype=np.int64)
    return PreparedExamples(store, np.array([index[str(p)] for p in paths], dtype=np.int64), questions,
                            answers, ids, np.asarray(phases, dtype=np.int64), lengths)


@dataclass
class VLMCollator:
    """Examples → model inputs with labels.

    Keys in: ``image`` (uint8 HxWx3 prepared by the family), ``question``, ``answer``.
    Keys out: ``input_ids``, ``attention_mask``, ``pixel_values``, ``labels`` and what else the
    family's model takes (``token_type_ids``, ``image_grid_thw`` ...); padding to the longest.
    """

    family: ModelFamily
    processor: ProcessorMixin

    def __call__(self, examples: list[dict[str, Any]]) -> dict:
        expected = {"image", "question", "answer"}
        if not examples or not expected <= set(examples[0]):
            found = sorted(examples[0]) if examples else []
            raise KeyError(f"VLMCollator expects keys {sorted(expected)}, found {found}")
        batch = self.family.train_batch(self.processor, [e["image"] for e in examples],
                                        [e["question"] for e in examples], [e["answer"] for e in examples],
                                        prepared=True)
        return self.family.model_inputs(batch)
