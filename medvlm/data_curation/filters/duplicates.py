"""Duplicate steps: exact duplicates, near-duplicate questions per image, duplicate and near-identical images."""

from __future__ import annotations

import hashlib
import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from medvlm.data_curation.filters.base import (
    FilterConfigError,
    FilterStep,
    _batches,
    _hash64,
)
from medvlm.utils.images import read_image
from medvlm.utils.text import UNSPACED_SCRIPT, normalize_text


@dataclass
class ExactDuplicates(FilterStep):
    """Same normalised question + normalised answer + image path: later copies are rejected."""

    name: ClassVar[str] = "exact_duplicates"
    parallel: ClassVar[bool] = False

    def prepare(self, ds, batch_size=1000):
        keys = np.zeros(len(ds), np.uint64)
        pos = 0
        for b in _batches(ds, ["question", "answer", "image"], batch_size, "exact duplicates"):
            n = len(b["image"])
            keys[pos:pos + n] = [_hash64(f"{normalize_text(q)}\0{normalize_text(a)}\0{im}")
                                 for q, a, im in zip(b["question"], b["answer"], b["image"], strict=True)]
            pos += n
        _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
        self._first = first[inverse]  # position of the first row with the same key, per row
        self._ids = ds.select_columns(["id"])

    def judge(self, batch, indices):
        reasons = []
        for i in indices:
            first = int(self._first[i])
            reasons.append("" if first == i else f"exact duplicate of {self._ids[first]['id']!r}")
        return reasons, [""] * len(indices)


def _near_duplicates(group: list[tuple[int, set[str]]], threshold: float) -> list[tuple[int, int, float]]:
    """(row, earlier kept row, Jaccard) for each question of one image's ``group`` that is near another.

    Prefix filtering (Chaudhuri et al., ICDE 2006; Xiao et al., PPJoin, WWW 2008): with tokens in one
    fixed order (rarest in the group first), two sets with Jaccard >= t share a token among the first
    ``|x| - ceil(t |x|) + 1`` of each, so only questions sharing such a token are compared. This keeps
    an image with thousands of questions from costing a quadratic number of comparisons.
    """
    freq: Counter = Counter(tok for _, toks in group for tok in toks)
    index: dict[str, list[int]] = {}
    kept: list[tuple[int, set[str]]] = []
    found = []
    for row, toks in group:
        ordered = sorted(toks, key=lambda tok: (freq[tok], tok))
        prefix = ordered[:len(ordered) - math.ceil(threshold * len(ordered) - 1e-9) + 1]
        best, best_row = 0.0, -1
        for k in sorted({k for tok in prefix for k in index.get(tok, ())}):
            other_row, other = kept[k]
            score = len(toks & other) / len(toks | other)
            if score > best:
                best, best_row = score, other_row
        if best_row >= 0 and best >= threshold:
            found.append((row, best_row, best))
            continue
        for tok in prefix:
            index.setdefault(tok, []).append(len(kept))
        kept.append((row, toks))
    return found


def question_shingles(question: str) -> set[str]:
    """The units near-duplicate questions are compared by: normalised words, and for a word in an
    unspaced script (Chinese, Japanese) its character bigrams. Single characters would make
    "图中的肝脏是否正常" and "图中的心脏是否正常" (is the liver / the heart normal) 0.8 alike;
    bigrams put them at 0.6, while a question that only adds a particle stays above 0.9."""
    out: set[str] = set()
    for word in normalize_text(question).split():
        if len(word) > 1 and UNSPACED_SCRIPT.search(word):
            out.update(word[i:i + 2] for i in range(len(word) - 1))
        else:
            out.add(word)
    return out


@dataclass
class NearDuplicateQuestions(FilterStep):
    """Per image, a question whose token-set Jaccard similarity with an earlier kept question of the
    same image is >= ``threshold`` is rejected (tokens: :func:`question_shingles`; answers are not
    compared)."""

    name: ClassVar[str] = "near_duplicate_questions"
    parallel: ClassVar[bool] = False
    threshold: float = 0.8

    def __post_init__(self) -> None:
        if not 0 < self.threshold <= 1:
            raise FilterConfigError(f"near_duplicate_questions: threshold must be in (0, 1], got {self.threshold}")

    def prepare(self, ds, batch_size=1000):
        n = len(ds)
        images = np.zeros(n, np.uint64)
        pos = 0
        for b in _batches(ds, ["image"], batch_size, "near duplicates: images"):
            images[pos:pos + len(b["image"])] = [_hash64(im) for im in b["image"]]
            pos += len(b["image"])
        order = np.argsort(images, kind="stable")  # rows of one image together, in dataset order
        self._dup_of = np.full(n, -1, np.int64)
        self._score = np.zeros(n, np.float32)
        group: list[tuple[int, set[str]]] = []  # the questions of the current image

        def flush() -> None:
            for row, other, score in _near_duplicates(group, self.threshold):
                self._dup_of[row], self._score[row] = other, score
            group.clear()

        pos = 0
        for b in _batches(ds.select(order), ["question"], batch_size, "near duplicates: questions"):
            rows = order[pos:pos + len(b["question"])].tolist()  # a batch at a time: no list of all rows
            pos += len(rows)
            for row, q in zip(rows, b["question"], strict=True):
                if group and images[row] != images[group[0][0]]:
                    flush()
                group.append((row, question_shingles(q)))
        flush()
        self._ids = ds.select_columns(["id"])

    def judge(self, batch, indices):
        reasons = []
        for i in indices:
            j = int(self._dup_of[i])
            reasons.append("" if j < 0 else f"near-duplicate question of {self._ids[j]['id']!r} on the same "
                           f"image (token-set Jaccard {self._score[i]:.2f} >= {self.threshold})")
        return reasons, [""] * len(indices)


def average_hash(path: str | os.PathLike) -> int:
    """64-bit average hash (aHash; N. Krawetz, "Looks Like It", 2011): grey, shrink to 8 x 8, one bit
    per pixel brighter than the mean. Written here because it is a few lines and the library that
    offers it (imagehash) would be a dependency for this alone. DICOM files are read too."""
    small = read_image(path).convert("L").resize((8, 8), Image.Resampling.LANCZOS)
    pixels = np.asarray(small, dtype=np.float32)
    return int(np.packbits((pixels > pixels.mean()).ravel()).view(">u8")[0])


@dataclass
class DuplicateImages(FilterStep):
    """Rows whose image file has the same bytes (SHA-256) as an earlier image, or an average hash within
    ``max_hamming`` bits of one, are rejected; unreadable images are rejected with the decoder's error.

    Near matches use multi-index hashing (Norouzi et al., CVPR 2012): split the 64 bits into
    ``max_hamming + 1`` bands; two hashes within that distance agree exactly on at least one band,
    so only images sharing a band are compared.
    """

    name: ClassVar[str] = "duplicate_images"
    parallel: ClassVar[bool] = False
    columns: ClassVar[tuple[str, ...]] = ("id", "image")
    max_hamming: int = 4
    image_root: str | None = None

    def _path(self, image: str) -> str:
        return os.path.join(self.image_root, image) if self.image_root and not os.path.isabs(image) else image

    def prepare(self, ds, batch_size=1000):
        images: dict[str, None] = {}
        for b in _batches(ds, ["image"], batch_size, "duplicate images: list"):
            images.update(dict.fromkeys(b["image"]))
        bands = min(self.max_hamming + 1, 64)
        width = 64 // bands
        buckets: dict[tuple[int, int], list[tuple[int, str]]] = {}
        by_sha: dict[str, str] = {}
        self._bad: dict[str, str] = {}
        for image in tqdm(images, desc="duplicate images: hash", disable=None, mininterval=2.0):
            if not image:
                self._bad[image] = "no image path"
                continue
            try:
                sha = hashlib.sha256(Path(self._path(image)).read_bytes()).hexdigest()
                ahash = average_hash(self._path(image))
            except Exception as err:  # noqa: BLE001 - any decoder/OS failure is recorded as the reject reason
                self._bad[image] = f"image unreadable ({type(err).__name__}: {err})"
                continue
            if sha in by_sha:
                self._bad[image] = f"duplicate image: same bytes as {by_sha[sha]!r}"
                continue
            by_sha[sha] = image
            keys = [(b, (ahash >> (b * width)) & ((1 << width) - 1)) for b in range(bands)]
            near = [(bin(ahash ^ h).count("1"), other) for k in keys for h, other in buckets.get(k, [])]
            near = [m for m in near if m[0] <= self.max_hamming]
            if near:
                dist, other = min(near)
                self._bad[image] = f"near-identical image to {other!r} (average-hash Hamming distance {dist} " \
                                   f"<= {self.max_hamming})"
                continue
            for k in keys:
                buckets.setdefault(k, []).append((ahash, image))

    def judge(self, batch, indices):
        return [self._bad.get(im, "") for im in batch["image"]], [""] * len(indices)
