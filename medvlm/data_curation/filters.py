"""Filters over unified records: composable steps, each with its own reject reason.

>>> # pipeline = FilterPipeline([make_step("format"), make_step("exact_duplicates")])
>>> # result = pipeline.run(ds, "runs/filtered")
>>> # result.dataset                 # the kept rows (unified records)
>>> # result.counts[0]               # {"step": "format", "in": 900, "out": 880, "rejected": 20, "noted": 0}

Every rejected row becomes one line of ``<out_dir>/rejects.jsonl`` (``id, step, reason`` and the
row's key fields); rows that are kept but carry a note (a failed blind check) go to
``<out_dir>/filter_notes.jsonl``. Both files are written through a temp file and renamed at the end.

How a step runs (memory stays flat): an optional global pass (:meth:`FilterStep.prepare`) reads the
columns in batches and keeps only numpy arrays of a few bytes per row (hashes, first-occurrence
indices); then :meth:`FilterStep.judge` gives each batch of rows a reject reason (or "") and a
note, rejected rows are written out as they come, and the kept rows are taken with
``Dataset.select(indices)`` (an index mapping: the Arrow data are never rewritten; one byte per row
marks the kept ones). Row-wise steps may run in ``num_proc`` processes (``Dataset.map``). Steps by name (:data:`STEPS`): ``pathology``, ``exact_duplicates``,
``near_duplicate_questions``, ``duplicate_images``, ``format``, ``answer_in_question``, ``blind_check``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import tempfile
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import datasets
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from medvlm.data_curation.images import load_image
from medvlm.eval.normalize import normalize_answer, normalize_text, yes_no
from medvlm.utils.io import did_you_mean

logger = logging.getLogger(__name__)

#: Fields copied from a rejected row into its rejects line (beside ``id``, ``step``, ``reason``).
KEY_FIELDS = ("source", "split", "group_id", "image", "question", "answer", "answer_type")
#: Default blind-check prompt, shipped with the repository.
BLIND_TEMPLATE = Path(__file__).resolve().parents[2] / "data_curation" / "prompts" / "blind_check.txt"


class FilterConfigError(ValueError):
    """An unknown step or option; the message lists what is available."""


def _hash64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def _batches(ds: datasets.Dataset, columns: list[str], batch_size: int, desc: str) -> Iterator[dict]:
    cols = ds.select_columns(columns)
    total = -(-len(ds) // batch_size)
    yield from tqdm(cols.iter(batch_size=batch_size), total=total, desc=desc, disable=None, mininterval=2.0)


def _meta_strings(meta: str) -> list[str]:
    """Every string value inside a record's meta JSON (nested lists/dicts flattened)."""
    try:
        obj = json.loads(meta or "{}")
    except json.JSONDecodeError:
        return [meta]
    out, stack = [], [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return out


@dataclass
class FilterStep:
    """One filter step. Subclasses set ``name``, their options as dataclass fields, and ``judge``."""

    name: ClassVar[str] = ""
    #: ``judge`` may run in worker processes (no unpicklable state, no global order).
    parallel: ClassVar[bool] = True
    columns: ClassVar[tuple[str, ...]] = ("id", "question", "answer", "answer_type", "choices")

    def prepare(self, ds: datasets.Dataset, batch_size: int = 1000) -> None:
        """Global pass over ``ds`` before judging (duplicates, counts); nothing by default."""

    def judge(self, batch: dict[str, list], indices: list[int]) -> tuple[list[str], list[str]]:
        """Per row of the batch: (reject reason or "", note or ""); ``indices`` are row positions."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        opts = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "llm"}
        return {"step": self.name, **opts}


@dataclass
class FormatCheck(FilterStep):
    """Empty or too long question/answer, a missing answer, a closed answer outside its choices."""

    name: ClassVar[str] = "format"
    max_question_chars: int = 1000   # SLAKE/VQA-RAD questions are < 200 chars; longer ones are pasted text
    max_answer_chars: int = 2000     # captions and MedPix findings are long; QA answers are short

    def _reason(self, q: Any, a: Any, atype: str, choices: list[str] | None) -> str:
        if not isinstance(q, str) or not q.strip():
            return "empty question"
        if len(q) > self.max_question_chars:
            return f"question too long ({len(q)} > {self.max_question_chars} chars)"
        if not isinstance(a, str):
            return f"answer is not a string ({type(a).__name__})"
        if not a.strip():
            return "empty answer"
        if len(a) > self.max_answer_chars:
            return f"answer too long ({len(a)} > {self.max_answer_chars} chars)"
        if atype not in ("closed", "open"):
            return f"answer_type {atype!r} is not 'closed' or 'open'"
        if atype == "closed" and choices and normalize_answer(a) not in {normalize_answer(c) for c in choices}:
            return f"closed answer {a!r} is not one of its choices {list(choices)}"
        return ""

    def judge(self, batch, indices):
        rows = zip(batch["question"], batch["answer"], batch["answer_type"], batch["choices"], strict=True)
        return [self._reason(*r) for r in rows], [""] * len(indices)


@dataclass
class AnswerInQuestion(FilterStep):
    """The normalised open answer appears verbatim (whole words) in the question: it gives itself away.

    Closed questions are skipped: multiple-choice questions name their options on purpose and
    yes/no answers are not in the question anyway.
    """

    name: ClassVar[str] = "answer_in_question"

    def judge(self, batch, indices):
        reasons = []
        for q, a, atype in zip(batch["question"], batch["answer"], batch["answer_type"], strict=True):
            ans = normalize_text(a)
            if atype != "open" or not ans or ans in ("yes", "no"):
                reasons.append("")
            elif f" {ans} " in f" {normalize_text(q)} ":
                reasons.append(f"the question gives the answer away ({ans!r} appears in it)")
            else:
                reasons.append("")
        return reasons, [""] * len(indices)


@dataclass
class PathologyRelevance(FilterStep):
    """Keep rows that mention a listed pathology, then only pathologies with >= ``min_count`` rows.

    ``keywords``: a list of names, or ``{name: [synonyms...]}``; matched as whole words,
    case-insensitively, in the ``fields`` (``meta`` = every string value of the meta JSON, which
    holds captions, findings and concept names). ``cuis``: a list of UMLS CUIs or ``{cui: name}``,
    matched against meta ``cuis`` / ``concepts`` (strings or ``{"cui": ...}``). A row belongs to the
    first pathology it mentions, in list order. Conditions with too few examples are dropped, as
    the seed paper keeps only conditions with enough examples to learn from.
    """

    name: ClassVar[str] = "pathology"
    parallel: ClassVar[bool] = False
    columns: ClassVar[tuple[str, ...]] = ("id", "question", "answer", "meta")
    keywords: list[str] | dict[str, list[str]] = field(default_factory=list)
    cuis: list[str] | dict[str, str] = field(default_factory=list)
    min_count: int = 1
    fields: tuple[str, ...] = ("question", "answer", "meta")

    def __post_init__(self) -> None:
        syn = self.keywords if isinstance(self.keywords, dict) else {k: [k] for k in self.keywords}
        cuis = self.cuis if isinstance(self.cuis, dict) else {c: c for c in self.cuis}
        if not syn and not cuis:
            raise FilterConfigError("pathology step needs `keywords` and/or `cuis`")
        self._names = list(dict.fromkeys([*syn, *cuis.values()]))
        self._by_word = {w.lower(): self._names.index(n) for n, words in syn.items() for w in [n, *words]}
        self._by_cui = {c.upper(): self._names.index(n) for c, n in cuis.items()}
        words = sorted(self._by_word, key=len, reverse=True)
        self._regex = re.compile(r"\b(" + "|".join(map(re.escape, words)) + r")\b", re.I) if words else None
        self._code = np.zeros(0, np.int32)
        self._count = np.zeros(len(self._names), np.int64)

    def _match(self, row: dict[str, str]) -> int:
        meta_strings = _meta_strings(row["meta"]) if "meta" in self.fields else []
        if self._by_cui:
            try:
                meta = json.loads(row["meta"] or "{}")
            except json.JSONDecodeError:
                meta = {}
            for c in [*meta.get("cuis", []), *meta.get("concepts", [])]:
                c = c.get("cui", c.get("CUI", "")) if isinstance(c, dict) else c
                if isinstance(c, str) and c.upper() in self._by_cui:
                    return self._by_cui[c.upper()]
        if self._regex is None:
            return -1
        texts = [row[f] for f in self.fields if f != "meta"] + meta_strings
        hits = [self._by_word[m.group(1).lower()] for t in texts for m in self._regex.finditer(t)]
        return min(hits) if hits else -1

    def prepare(self, ds, batch_size=1000):
        codes = np.full(len(ds), -1, np.int32)
        pos = 0
        for batch in _batches(ds, ["question", "answer", "meta"], batch_size, "pathology"):
            n = len(batch["meta"])
            codes[pos:pos + n] = [self._match({k: batch[k][i] for k in batch}) for i in range(n)]
            pos += n
        self._code = codes
        self._count = np.bincount(codes[codes >= 0], minlength=len(self._names))
        logger.info("pathology counts: %s", dict(zip(self._names, self._count.tolist(), strict=True)))

    def judge(self, batch, indices):
        reasons = []
        for i in indices:
            code = int(self._code[i])
            if code < 0:
                reasons.append("no pathology from the list is mentioned")
            elif self._count[code] < self.min_count:
                reasons.append(f"pathology {self._names[code]!r} has {int(self._count[code])} examples "
                               f"(< min_count {self.min_count})")
            else:
                reasons.append("")
        return reasons, [""] * len(indices)


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


@dataclass
class NearDuplicateQuestions(FilterStep):
    """Per image, a question whose token-set Jaccard similarity with an earlier kept question of the
    same image is >= ``threshold`` is rejected (tokens = normalised words; answers are not compared)."""

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
                group.append((row, set(normalize_text(q).split())))
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
    small = load_image(path).convert("L").resize((8, 8), Image.Resampling.LANCZOS)
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


@dataclass
class BlindCheck(FilterStep):
    """Ask a text LLM the question alone; a correct answer means the image is not needed: rejected.

    ``llm`` is any object with ``generate(prompt: str, **kw) -> str``. An error from the LLM keeps
    the row and records the note ``blind check failed: <error>``: a server outage must not silently
    empty a dataset, and the notes file lists the rows to re-check. Only ``answer_types`` are asked
    (default open): a blind guess answers a yes/no question right half the time by chance, so a
    correct guess there says nothing about the image.
    """

    name: ClassVar[str] = "blind_check"
    parallel: ClassVar[bool] = False
    llm: Any = None
    template: str | None = None
    answer_types: tuple[str, ...] = ("open",)

    def __post_init__(self) -> None:
        if self.llm is None or not callable(getattr(self.llm, "generate", None)):
            raise FilterConfigError("blind_check needs `llm`: an object with generate(prompt) -> str")
        path = Path(self.template) if self.template else BLIND_TEMPLATE
        if not path.is_file():
            raise FilterConfigError(f"blind_check prompt template {str(path)!r} not found; pass template=<file>")
        self._text = path.read_text(encoding="utf-8")

    def prompt(self, question: str, choices: list[str]) -> str:
        opts = f"Options: {', '.join(choices)}\n" if choices else ""
        return self._text.replace("{choices}", opts).replace("{question}", question)

    @staticmethod
    def same(reply: str, reference: str) -> bool:
        """Normalised match; a yes/no reference also accepts a reply that starts with yes/no."""
        line = (reply or "").strip().splitlines()[0] if (reply or "").strip() else ""
        ref = normalize_answer(reference)
        if ref in ("yes", "no"):
            return yes_no(line) == ref
        return normalize_answer(line) == ref

    def judge(self, batch, indices):
        reasons, notes = [], []
        rows = zip(batch["question"], batch["answer"], batch["answer_type"], batch["choices"], strict=True)
        for q, a, atype, choices in rows:
            reason = note = ""
            if atype in self.answer_types:
                try:
                    reply = self.llm.generate(self.prompt(q, list(choices or [])))
                    if not isinstance(reply, str):
                        raise TypeError(f"generate() returned {type(reply).__name__}, expected str")
                    if self.same(reply, a):
                        reason = "answerable without the image"
                except Exception as err:  # noqa: BLE001 - duck-typed backends raise anything; never crash
                    note = f"blind check failed: {type(err).__name__}: {err}"
            reasons.append(reason)
            notes.append(note)
        return reasons, notes


STEPS: dict[str, type[FilterStep]] = {cls.name: cls for cls in (
    PathologyRelevance, ExactDuplicates, NearDuplicateQuestions, DuplicateImages, FormatCheck,
    AnswerInQuestion, BlindCheck)}


def _check_step(name: str, options: dict[str, Any]) -> type[FilterStep]:
    if name not in STEPS:
        raise FilterConfigError(did_you_mean(name, list(STEPS), "filter step"))
    allowed = [f.name for f in dataclasses.fields(STEPS[name])]
    for key in options:
        if key not in allowed:
            raise FilterConfigError(did_you_mean(key, allowed, f"option of filter step {name!r}"))
    return STEPS[name]


def make_step(name: str, **options: Any) -> FilterStep:
    """A step by name with its options; unknown names or options raise :class:`FilterConfigError`."""
    cls = _check_step(name, options)
    for key in ("fields", "answer_types"):
        if key in options:
            options[key] = tuple(options[key])
    return cls(**options)


def parse_step_spec(spec: str | dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """``"format"``, ``{"format": {...options}}`` or ``{"step": "format", ...options}`` → (name, options)."""
    if isinstance(spec, str):
        return spec, {}
    if isinstance(spec, dict) and "step" in spec:
        return str(spec["step"]), {k: v for k, v in spec.items() if k != "step"}
    if isinstance(spec, dict) and len(spec) == 1:
        name, opts = next(iter(spec.items()))
        return str(name), dict(opts or {})
    raise FilterConfigError(f"filter spec {spec!r} not understood; write a step name, {{name: {{options}}}} "
                            "or {step: name, option: value}")


@dataclass
class FilterResult:
    """``dataset``: kept rows; ``counts``: per step in/out/rejected/noted; the two JSONL paths."""

    dataset: datasets.Dataset
    counts: list[dict[str, Any]]
    rejects_path: Path
    notes_path: Path


def _mark(batch: dict[str, list], indices: list[int], step: FilterStep) -> dict[str, list]:
    reasons, notes = step.judge(batch, indices)
    return {"_reject": reasons, "_note": notes}


class _JsonlSink:
    """Lines appended to a temp file in the target folder, renamed onto the target by ``close``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        self.fh = os.fdopen(fd, "w", encoding="utf-8")

    def write(self, batch: dict[str, list], i: int, step: str, key: str, text: str) -> None:
        """One line for row ``i`` of ``batch``: id, step, ``key`` (reason or note) and the key fields."""
        row = {"id": batch["id"][i], "step": step, key: text, **{c: batch[c][i] for c in KEY_FIELDS if c in batch}}
        self.fh.write(json.dumps(row, ensure_ascii=False) + "\n")

    def close(self, keep: bool = True) -> None:
        """Rename the temp file onto the target (``keep``) or delete it (a failed run writes nothing)."""
        self.fh.close()
        if keep:
            os.replace(self.tmp, self.path)
        else:
            Path(self.tmp).unlink(missing_ok=True)


class FilterPipeline:
    """Run steps in order over a dataset of unified records; see the module docstring."""

    def __init__(self, steps: list[FilterStep], num_proc: int | None = None, batch_size: int = 1000) -> None:
        self.steps = steps
        self.num_proc = num_proc
        self.batch_size = batch_size

    @classmethod
    def from_config(cls, specs: list[str | dict[str, Any]], llm: Any = None, **kwargs: Any) -> FilterPipeline:
        """Steps from specs (see :func:`parse_step_spec`); ``llm`` is handed to a ``blind_check`` without one."""
        steps = []
        for spec in specs:
            name, options = parse_step_spec(spec)
            if name == "blind_check":
                options.setdefault("llm", llm)
            steps.append(make_step(name, **options))
        return cls(steps, **kwargs)

    @staticmethod
    def check_config(specs: list[str | dict[str, Any]], streaming: bool = False) -> None:
        """Check step names and option names without building the steps (a config check)."""
        if not isinstance(specs, list):
            raise FilterConfigError(f"`filters` must be a list of steps, got {type(specs).__name__}")
        for spec in specs:
            name, options = parse_step_spec(spec)
            cls = _check_step(name, options)
            if streaming and cls.prepare is not FilterStep.prepare:
                raise FilterConfigError(f"filter step {name!r} needs a pass over the whole source, so it "
                                        "cannot run on a streamed source; drop `streaming` or the step")

    def describe(self) -> list[dict[str, Any]]:
        return [s.describe() for s in self.steps]

    def _judged(self, step: FilterStep, ds: datasets.Dataset) -> Iterator[tuple[dict, list[str], list[str]]]:
        """(batch with id + key fields + the step's columns, reasons, notes) over ``ds`` in order.

        Only the verdicts are computed; the rows are never rewritten (kept rows are selected by
        index at the end), which is what keeps a step cheap on wide rows. Row-wise steps run in
        ``num_proc`` processes through ``Dataset.map`` over just the columns they read.
        """
        cols = [c for c in ds.column_names if c in {"id", *KEY_FIELDS, *step.columns}]
        rows = ds.select_columns(cols).iter(batch_size=self.batch_size)
        if step.parallel and self.num_proc and self.num_proc > 1 and len(ds) > 10 * self.batch_size:
            used = [c for c in ds.column_names if c in step.columns]
            marks = ds.select_columns(used).map(
                _mark, batched=True, with_indices=True, batch_size=self.batch_size, fn_kwargs={"step": step},
                remove_columns=used, num_proc=self.num_proc, load_from_cache_file=False,
                new_fingerprint=uuid.uuid4().hex, desc=f"filter {step.name}")
            for batch, m in zip(rows, marks.iter(batch_size=self.batch_size), strict=True):
                yield batch, m["_reject"], m["_note"]
            return
        pos = 0
        total = -(-len(ds) // self.batch_size)
        for batch in tqdm(rows, total=total, desc=f"filter {step.name}", disable=None, mininterval=2.0):
            n = len(batch["id"])
            reasons, notes = step.judge(batch, list(range(pos, pos + n)))
            pos += n
            yield batch, reasons, notes

    def run(self, ds: datasets.Dataset, out_dir: str | os.PathLike, rejects_name: str = "rejects.jsonl") -> FilterResult:
        """Filter ``ds``; write rejects/notes JSONL into ``out_dir``; return kept rows and counts."""
        out = Path(out_dir)
        rejects, notes = _JsonlSink(out / rejects_name), _JsonlSink(out / "filter_notes.jsonl")
        counts, ok = [], False
        try:
            for step in self.steps:
                n_in = len(ds)
                step.prepare(ds, self.batch_size)
                keep = np.ones(n_in, dtype=bool)
                pos = n_noted = 0
                for batch, reasons, row_notes in self._judged(step, ds):
                    for i, (reason, note) in enumerate(zip(reasons, row_notes, strict=True)):
                        if reason:
                            keep[pos + i] = False
                            rejects.write(batch, i, step.name, "reason", reason)
                        if note:
                            n_noted += 1
                            notes.write(batch, i, step.name, "note", note)
                    pos += len(reasons)
                if not keep.all():
                    ds = ds.select(np.flatnonzero(keep))
                counts.append({"step": step.name, "in": n_in, "out": len(ds), "rejected": n_in - len(ds),
                               "noted": n_noted})
                logger.info("filter %s: %d in, %d out, %d rejected", step.name, n_in, len(ds), n_in - len(ds))
            ok = True
        finally:
            rejects.close(keep=ok)
            notes.close(keep=ok)
        return FilterResult(dataset=ds, counts=counts, rejects_path=rejects.path, notes_path=notes.path)
