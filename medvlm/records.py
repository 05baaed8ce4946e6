"""The unified record: one row per question, whatever the source.

Every loader in :mod:`medvlm.data_curation` emits these columns, and every later room
(training, eval, diagnostics) reads only these columns. Source quirks stay in the loaders;
the source's own fields survive in ``meta`` (a JSON string).

>>> rec = make_record(id="p0-q1", image="img/p0.png", question="Is there a lesion?",
...                   answer="yes", answer_type="closed", source="phantom", split="train",
...                   group_id="p0")
>>> validate_record(rec)["answer_type"]
'closed'
"""

from __future__ import annotations

import json
from typing import Any

import datasets

ANSWER_TYPES = ("closed", "open")
SPLITS = ("train", "validation", "test")

#: Column order of the unified record (DESIGN.md, "The unified record").
COLUMNS: tuple[str, ...] = (
    "id",
    "image",
    "question",
    "answer",
    "answer_type",
    "choices",
    "source",
    "split",
    "group_id",
    "modality",
    "body_part",
    "roi",
    "meta",
)

#: Arrow schema. ``image`` is a path (relative to the dataset root or absolute); loaders that
#: only have bytes write them to a file next to the dataset so every room reads one kind.
FEATURES = datasets.Features(
    {
        "id": datasets.Value("string"),
        "image": datasets.Value("string"),
        "question": datasets.Value("string"),
        "answer": datasets.Value("string"),
        "answer_type": datasets.Value("string"),
        "choices": datasets.Sequence(datasets.Value("string")),
        "source": datasets.Value("string"),
        "split": datasets.Value("string"),
        "group_id": datasets.Value("string"),
        "modality": datasets.Value("string"),
        "body_part": datasets.Value("string"),
        "roi": datasets.Value("string"),
        "meta": datasets.Value("string"),
    }
)


class RecordError(ValueError):
    """A record that does not fit the unified schema; the message names the row and the fix."""


def make_record(**fields: Any) -> dict[str, Any]:
    """Build a record with defaults for the optional columns (``choices`` [], strings "")."""
    unknown = set(fields) - set(COLUMNS)
    if unknown:
        raise RecordError(f"unknown record fields {sorted(unknown)}; expected a subset of {list(COLUMNS)}")
    rec: dict[str, Any] = {c: "" for c in COLUMNS}
    rec["choices"] = []
    rec["meta"] = "{}"
    rec.update(fields)
    if isinstance(rec["meta"], dict):
        rec["meta"] = json.dumps(rec["meta"], sort_keys=True, ensure_ascii=False)
    return rec


def validate_record(rec: dict[str, Any]) -> dict[str, Any]:
    """Check one record; raise :class:`RecordError` naming the row id and what to fix."""
    rid = rec.get("id", "<no id>")
    missing = [c for c in COLUMNS if c not in rec]
    if missing:
        raise RecordError(f"record {rid!r} lacks columns {missing}; build it with make_record()")
    for col in ("id", "question", "answer", "source", "split", "group_id"):
        if not isinstance(rec[col], str):
            raise RecordError(f"record {rid!r}: {col} must be a string, got {type(rec[col]).__name__}")
    if not rec["question"].strip():
        raise RecordError(f"record {rid!r}: empty question")
    if rec["answer_type"] not in ANSWER_TYPES:
        raise RecordError(
            f"record {rid!r}: answer_type {rec['answer_type']!r} is not one of {ANSWER_TYPES}"
        )
    if not isinstance(rec["choices"], list):
        raise RecordError(f"record {rid!r}: choices must be a list, got {type(rec['choices']).__name__}")
    try:
        json.loads(rec["meta"] or "{}")
    except json.JSONDecodeError as err:
        raise RecordError(f"record {rid!r}: meta is not valid JSON ({err})") from err
    return rec


def to_dataset(records: list[dict[str, Any]]) -> datasets.Dataset:
    """Validated records → a :class:`datasets.Dataset` with the unified schema."""
    for rec in records:
        validate_record(rec)
    cols = {c: [r[c] for r in records] for c in COLUMNS}
    return datasets.Dataset.from_dict(cols, features=FEATURES)


def parse_meta(meta: Any) -> dict[str, Any]:
    """A record's ``meta`` as a dict: the JSON string loaded (or a mapping copied); ``{}`` when it is
    empty, not valid JSON or not a JSON object. The one reader of ``meta`` for every room."""
    if isinstance(meta, dict):
        return dict(meta)
    if not meta:
        return {}
    try:
        value = json.loads(meta) if isinstance(meta, str | bytes) else dict(meta)
    except (json.JSONDecodeError, TypeError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}
