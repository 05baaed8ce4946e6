"""Human review: export a review sheet (CSV), read the reviewer's decisions back.

>>> # export_review_sheet(ds.select(range(200)), "runs/review/sheet.csv")
>>> # ... a clinician fills `decision` (accept | reject | edit), `corrected_answer`, `note` ...
>>> # result = apply_review(ds, "runs/review/sheet.csv", rejects_path="runs/review/rejects.jsonl")
>>> # result.dataset, result.counts      # {"accept": 180, "reject": 12, "edit": 8, "undecided": 0}

Sheet columns: ``id, image, question, answer, answer_type, source, decision, corrected_answer,
note``. On import: ``accept`` keeps the row; ``reject`` drops it and appends it to the rejects
JSONL with reason ``human review: <note>``; ``edit`` keeps it with ``corrected_answer`` as the
answer (the original answer and the note go to ``meta["review"]``). Rows of the dataset that the
sheet does not list, or that have an empty decision, are kept unchanged and counted as
``undecided`` (pass ``require_decision=True`` to refuse them). Every problem in the sheet (unknown
id, bad decision, edit without a corrected answer, an id listed twice) is reported together,
each naming the sheet's line, and nothing is applied.
"""

from __future__ import annotations

import csv
import difflib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

from medvlm.data_curation.filters import KEY_FIELDS
from medvlm.utils.io import atomic_write_text

SHEET_COLUMNS = ("id", "image", "question", "answer", "answer_type", "source", "decision",
                 "corrected_answer", "note")
DECISIONS = ("accept", "reject", "edit")
REVIEW_STEP = "human_review"


class ReviewError(ValueError):
    """A review sheet that cannot be applied; the message lists each bad line and the fix."""


@dataclass
class Decision:
    decision: str
    corrected_answer: str
    note: str
    line: int


@dataclass
class ReviewResult:
    """``dataset``: rows kept (edits applied); ``counts``: rows per decision and ``undecided``."""

    dataset: datasets.Dataset
    counts: dict[str, int]
    rejects_path: Path | None


def export_review_sheet(ds: datasets.Dataset, path: str | os.PathLike) -> Path:
    """Write the review sheet for every row of ``ds`` (select a sample first); returns its path."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(SHEET_COLUMNS)
    for b in ds.select_columns(list(SHEET_COLUMNS[:6])).iter(batch_size=1000):
        for i in range(len(b["id"])):
            writer.writerow([b[c][i] for c in SHEET_COLUMNS[:6]] + ["", "", ""])
    return atomic_write_text(path, buf.getvalue())


def _check_row(row: dict[str, str], line: int, known: set[str], seen: dict[str, int]) -> str:
    rid = (row.get("id") or "").strip()
    decision = (row.get("decision") or "").strip().lower()
    if not rid:
        return f"line {line}: empty id"
    if rid not in known:
        return f"line {line}: id {rid!r} is not in the dataset under review (was the sheet made from it?)"
    if rid in seen:
        return f"line {line}: id {rid!r} is listed again (first on line {seen[rid]}); keep one line per id"
    if decision and decision not in DECISIONS:
        close = difflib.get_close_matches(decision, DECISIONS, n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"line {line}: decision {row.get('decision')!r} is not one of {', '.join(DECISIONS)}{hint}"
    if decision == "edit" and not (row.get("corrected_answer") or "").strip():
        return f"line {line}: decision 'edit' for id {rid!r} needs a corrected_answer"
    return ""


def read_review_sheet(path: str | os.PathLike, known_ids: set[str]) -> dict[str, Decision]:
    """Validated decisions by id (rows with an empty decision are left out).

    Raises:
        ReviewError: listing every bad line (missing columns, unknown ids, bad decisions...).
    """
    path = Path(path)
    with open(path, newline="", encoding="utf-8-sig") as fh:  # -sig: sheets saved by spreadsheet apps
        reader = csv.DictReader(fh)
        missing = [c for c in ("id", "decision", "corrected_answer", "note") if c not in (reader.fieldnames or [])]
        if missing:
            raise ReviewError(f"{path}: review sheet lacks columns {missing}; found {reader.fieldnames}. "
                              "Start from the sheet written by export_review_sheet")
        errors, seen, out = [], {}, {}
        for line, row in enumerate(reader, start=2):  # line 1 is the header
            problem = _check_row(row, line, known_ids, seen)
            if problem:
                errors.append(problem)
                continue
            rid = row["id"].strip()
            seen[rid] = line
            decision = (row.get("decision") or "").strip().lower()
            if decision:
                out[rid] = Decision(decision, (row.get("corrected_answer") or "").strip(),
                                    (row.get("note") or "").strip(), line)
    if errors:
        shown = "\n  ".join(errors[:20]) + (f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else "")
        raise ReviewError(f"{path}: {len(errors)} problem(s) in the review sheet, nothing applied:\n  {shown}")
    return out


def _apply(batch: dict[str, list], decisions: dict[str, Decision]) -> dict[str, list]:
    answers, metas = list(batch["answer"]), list(batch["meta"])
    for i, rid in enumerate(batch["id"]):
        d = decisions.get(rid)
        if d is None or d.decision == "reject":
            continue
        meta = json.loads(metas[i] or "{}")
        meta["review"] = {"decision": d.decision, "note": d.note}
        if d.decision == "edit":
            meta["review"]["original_answer"] = answers[i]
            answers[i] = d.corrected_answer
        metas[i] = json.dumps(meta, sort_keys=True, ensure_ascii=False)
    return {"answer": answers, "meta": metas}


def _append_rejects(path: Path, rows: list[dict[str, Any]]) -> None:
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    if old and not old.endswith("\n"):
        old += "\n"
    atomic_write_text(path, old + "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def apply_review(ds: datasets.Dataset, sheet: str | os.PathLike, rejects_path: str | os.PathLike | None = None,
                 require_decision: bool = False) -> ReviewResult:
    """Apply the decisions of ``sheet`` to ``ds``; rejected rows are appended to ``rejects_path``.

    Raises:
        ReviewError: a bad sheet (see :func:`read_review_sheet`), or undecided rows when
        ``require_decision`` is set.
    """
    ids = {i for b in ds.select_columns(["id"]).iter(batch_size=10_000) for i in b["id"]}
    decisions = read_review_sheet(sheet, ids)
    undecided = len(ids) - len(decisions)
    if require_decision and undecided:
        raise ReviewError(f"{sheet}: {undecided} row(s) have no decision; fill `decision` for every row "
                          "or call with require_decision=False")
    rejected = {rid for rid, d in decisions.items() if d.decision == "reject"}
    if rejected:
        if rejects_path is None:
            raise ReviewError("the sheet rejects rows: pass rejects_path so that they are recorded")
        gone = ds.filter(lambda b: [r in rejected for r in b], input_columns="id", batched=True)
        rows = [{"id": r["id"], "step": REVIEW_STEP, "reason": f"human review: {decisions[r['id']].note}",
                 **{k: r[k] for k in KEY_FIELDS}} for r in gone]
        _append_rejects(Path(rejects_path), rows)
    kept = ds.filter(lambda b: [r not in rejected for r in b], input_columns="id", batched=True)
    kept = kept.map(_apply, batched=True, fn_kwargs={"decisions": decisions}, desc="apply review")
    counts = {d: sum(x.decision == d for x in decisions.values()) for d in DECISIONS}
    counts["undecided"] = undecided
    return ReviewResult(dataset=kept, counts=counts, rejects_path=Path(rejects_path) if rejects_path else None)
