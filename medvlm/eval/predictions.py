"""Predictions files: read them, convert LLaVA-Med's format, and check every record before scoring.

Two formats are read (:func:`load_predictions` tells them apart by their fields):

**Ours** (JSONL, one object per line): ``id, question, answer, prediction, answer_type`` and
optionally ``choices`` (list), ``samples`` (the k sampled answers, for consistency),
``group``/``variant`` (paraphrases), ``latency_s`` and any slicing fields (``modality``,
``body_part``, ``source``, ...), which are kept as they are.

**LLaVA-Med answer files** (JSONL with ``question_id, prompt, text, answer_id, model_id,
metadata``; ``text`` is the prediction) plus the question file they were generated from
(``--questions``; JSONL, or a JSON list), whose rows carry ``question_id`` (or ``id``), the question
under ``text``/``question`` (or the first human turn of ``conversations``) and the reference under
``answer``, ``gpt4_answer``, or the last ``gpt`` turn of ``conversations`` (LLaVA-Med's data also
spells it ``conversatons``). ``answer_type`` is taken from the question row when it has one
(``CLOSED``/``OPEN``); otherwise it is inferred: *closed when the reference is yes/no (after
normalisation), open otherwise*.

Checks made by :func:`prepare_records` (nothing is dropped silently, nothing raises):

* a missing or empty reference answer -> skipped, reason recorded;
* an ``answer_type`` other than closed/open -> skipped, reason recorded; a missing one is inferred
  as above (closed also when ``choices`` are given) and counted in ``n_inferred_answer_type``;
* a missing ``prediction`` field -> skipped (the file is probably not a predictions file);
  a ``null``/empty/whitespace prediction -> scored as wrong and counted in ``n_empty``;
* a prediction longer than :data:`MAX_PREDICTION_CHARS` characters is truncated for scoring and
  counted in ``n_truncated`` (degenerate repeating generations would otherwise dominate ROUGE's
  quadratic LCS time while adding nothing to the score);
* ``choices`` that is not a list -> skipped, reason recorded;
* a duplicate ``id`` -> the later record is skipped, reason recorded.

A malformed JSONL line raises :class:`PredictionsError` naming the file and line number; so does a
file without any record (an empty predictions file is a mistake, not a score of "no data").
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from medvlm.records import ANSWER_TYPES
from medvlm.utils.io import read_jsonl as io_read_jsonl
from medvlm.utils.text import normalize_answer

#: Predictions longer than this (characters) are truncated before scoring; see module docstring.
MAX_PREDICTION_CHARS = 2000



class PredictionsError(ValueError):
    """An unreadable predictions or questions file; the message names the file, line and fix."""


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Objects of a JSONL file (blank lines ignored); a bad line raises naming ``path:line``."""
    return io_read_jsonl(path, PredictionsError)


def read_json_or_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """A JSON list of objects (LLaVA-Med's ``test.json``) or a JSONL file, whichever ``path`` holds."""
    path = Path(path)
    with open(path, encoding="utf-8") as fh:
        head = fh.read(1024).lstrip()
    if not head.startswith("["):
        return read_jsonl(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise PredictionsError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from e
    bad = next((i for i, x in enumerate(data) if not isinstance(x, dict)), None)
    if bad is not None:
        raise PredictionsError(f"{path}: item {bad} of the JSON list is not an object")
    return data


def is_llava_med(rows: Sequence[Mapping[str, Any]]) -> bool:
    """True when rows look like a LLaVA-Med answer file (``question_id`` + ``text``, no ``prediction``)."""
    return bool(rows) and all("question_id" in r and "text" in r and "prediction" not in r for r in rows)


def _turns(row: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    turns = row.get("conversations", row.get("conversatons")) or []
    return [t for t in turns if isinstance(t, Mapping)]


def _reference(row: Mapping[str, Any]) -> str | None:
    for key in ("answer", "gpt4_answer"):
        if row.get(key) not in (None, ""):
            return str(row[key])
    gpt = [t.get("value") for t in _turns(row) if t.get("from") == "gpt"]
    return str(gpt[-1]) if gpt and gpt[-1] not in (None, "") else None


def _question(row: Mapping[str, Any]) -> str:
    for key in ("question", "text"):
        if row.get(key):
            return str(row[key])
    human = [t.get("value") for t in _turns(row) if t.get("from") == "human"]
    return str(human[0]).replace("<image>", "").strip() if human else ""


def infer_answer_type(answer: Any, choices: Sequence[Any] | None = None) -> str:
    """``"closed"`` for a yes/no reference or when choices are given, else ``"open"``."""
    if choices:
        return "closed"
    return "closed" if normalize_answer(answer) in ("yes", "no") else "open"


def from_llava_med(
    answers: Sequence[Mapping[str, Any]], questions: Sequence[Mapping[str, Any]], *, questions_path: str = ""
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Join LLaVA-Med answer rows with their question rows into our records.

    Returns ``(records, skipped)``. Answers whose ``question_id`` is not in the question file and
    questions that got no answer are both skipped with their reason.
    """
    by_id: dict[str, Mapping[str, Any]] = {}
    for q in questions:
        qid = q.get("question_id", q.get("id"))
        if qid is not None:
            by_id[str(qid)] = q
    records, skipped, answered = [], [], set()
    for a in answers:
        qid = str(a.get("question_id"))
        answered.add(qid)
        q = by_id.get(qid)
        if q is None:
            skipped.append({"id": qid, "reason": f"question_id not found in questions file {questions_path}"})
            continue
        meta = a.get("metadata") if isinstance(a.get("metadata"), Mapping) else {}
        rec = {k: v for k, v in q.items() if k not in ("conversations", "conversatons", "text")}
        rec.update(
            id=qid,
            question=_question(q) or str(a.get("prompt", "")),
            answer=_reference(q),
            prediction=a.get("text"),
            model_id=a.get("model_id", ""),
            **{k: v for k, v in meta.items() if k not in ("id", "answer", "prediction")},
        )
        if q.get("answer_type") not in (None, ""):
            rec["answer_type"] = str(q["answer_type"]).lower()
        elif rec["answer"] is not None:
            rec["answer_type"] = infer_answer_type(rec["answer"], rec.get("choices"))
        records.append(rec)
    for qid in by_id:
        if qid not in answered:
            skipped.append({"id": qid, "reason": "question has no answer in the predictions file"})
    return records, skipped


def load_predictions(
    path: str | os.PathLike, questions: str | os.PathLike | None = None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Read a predictions file (ours, or LLaVA-Med's with its ``questions`` file) into records.

    Returns ``(records, skipped)``; records still need :func:`prepare_records`.
    """
    rows = read_jsonl(path)
    if not rows:
        raise PredictionsError(f"{path} holds no records (the file is empty); expected one JSON object per line "
                               "with id/answer/prediction, or a LLaVA-Med answer file")
    if is_llava_med(rows):
        if questions is None:
            raise PredictionsError(
                f"{path} is a LLaVA-Med answer file (question_id/text rows): pass the question file it "
                "was generated from (--questions FILE) so the reference answers can be read"
            )
        return from_llava_med(rows, read_json_or_jsonl(questions), questions_path=str(questions))
    return rows, []


#: The paraphrase predictions model mode writes beside ``predictions.jsonl`` (``--robustness``).
PARAPHRASE_FILE = "predictions_paraphrase.jsonl"


def load_paraphrase_predictions(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a paraphrase predictions file (ours: the rows of ``predictions.jsonl`` plus ``group``
    and ``variant``, one group per question and its rewordings). Raises :class:`PredictionsError`
    for an empty file or one whose rows carry no ``group``."""
    rows = read_jsonl(path)
    if not rows:
        raise PredictionsError(f"{path} holds no records (the file is empty); expected the paraphrase "
                               f"predictions model mode writes with --robustness ({PARAPHRASE_FILE})")
    if not any(r.get("group") not in (None, "") for r in rows):
        raise PredictionsError(f"{path} holds no paraphrase groups (no row has a 'group' field); pass the "
                               f"{PARAPHRASE_FILE} model mode writes with --robustness")
    return rows


def _check(rec: Mapping[str, Any], rid: str, seen: set[str]) -> str | None:
    """Why ``rec`` cannot be scored, or ``None``."""
    if "prediction" not in rec:
        return "no 'prediction' field (is this a predictions file? expected id/answer/prediction)"
    if rec.get("answer") is None or not str(rec.get("answer")).strip():
        return "missing reference answer"
    at = rec.get("answer_type")
    if at not in (None, "") and str(at).lower() not in ANSWER_TYPES:
        return f"unknown answer_type {at!r} (expected one of {list(ANSWER_TYPES)})"
    choices = rec.get("choices")
    if choices not in (None, "") and not isinstance(choices, (list, tuple)):
        return f"'choices' must be a list of option strings, got {type(choices).__name__}"
    if rid in seen:
        return "duplicate id (an earlier record with this id is scored)"
    return None


def prepare_records(
    records: Sequence[Mapping[str, Any]], *, max_prediction_chars: int = MAX_PREDICTION_CHARS
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, int]]:
    """Validate and clean records for scoring (rules in the module docstring).

    Returns ``(clean, skipped, counts)``: clean records have a string ``prediction`` (possibly
    empty, possibly truncated), a string ``answer`` and ``answer_type`` in closed/open; ``skipped``
    lists ``{"id", "reason"}``; ``counts`` holds ``n_empty``, ``n_truncated``, ``n_inferred_answer_type``.
    """
    clean, skipped, seen = [], [], set()
    counts = {"n_empty": 0, "n_truncated": 0, "n_inferred_answer_type": 0}
    for i, rec in enumerate(records):
        rid = f"<row {i}>" if rec.get("id") in (None, "") else str(rec["id"])
        reason = _check(rec, rid, seen)
        if reason:
            skipped.append({"id": rid, "reason": reason})
            continue
        seen.add(rid)
        out = dict(rec)
        out["id"] = rid
        out["answer"] = str(rec["answer"])
        pred = "" if rec["prediction"] is None else str(rec["prediction"])
        if len(pred) > max_prediction_chars:
            pred = pred[:max_prediction_chars]
            counts["n_truncated"] += 1
        if not pred.strip():
            counts["n_empty"] += 1
        out["prediction"] = pred
        if isinstance(out.get("samples"), (list, tuple)):
            out["samples"] = ["" if s is None else str(s)[:max_prediction_chars] for s in out["samples"]]
        at = rec.get("answer_type")
        if at in (None, ""):
            at = infer_answer_type(out["answer"], rec.get("choices"))
            counts["n_inferred_answer_type"] += 1
        out["answer_type"] = str(at).lower()
        clean.append(out)
    return clean, skipped, counts
