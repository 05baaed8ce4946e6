"""Steps by name and the pipeline that runs them, writing rejects and notes as JSON lines."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from tqdm.auto import tqdm

from medvlm.data_curation.filters.base import (
    KEY_FIELDS,
    FilterConfigError,
    FilterStep,
)
from medvlm.data_curation.filters.duplicates import DuplicateImages, ExactDuplicates, NearDuplicateQuestions
from medvlm.data_curation.filters.text import AnswerInQuestion, BlindCheck, FormatCheck, PathologyRelevance
from medvlm.utils.io import did_you_mean

logger = logging.getLogger(__name__)


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
