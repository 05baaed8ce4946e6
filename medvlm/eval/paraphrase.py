"""Paraphrase groups for the robustness check: the same question about the same image, reworded.

Each phantom question type (``meta.qtype``, see :mod:`medvlm.data_curation.phantom`) has a pattern
matching its generated wording, whose named slots (modality, organ, side, finding) are carried
into three alternative wordings. :func:`paraphrase_records` turns each record into a group::

    {"id": "p00036-q3",    "group": "p00036-q3", "variant": "base", "question": "Is there an abnormality in this image?"}
    {"id": "p00036-q3~p1", "group": "p00036-q3", "variant": "p1",   "question": "Does this image show any lesion?"}
    ...

Every other field (image, answer, choices, modality, meta, ...) is copied, so the rows are unified
records ready for :func:`medvlm.models.inputs.prepare_examples`, and their predictions are scored by
:func:`medvlm.eval.robustness.robustness_scores` (``variant == "base"`` marks the original wording).

Records that already belong to a paraphrase group (the ``cxr_paraphrase`` source keeps
``meta.paraphrase_group`` and ``meta.question_variant``, variant ``0`` being the base wording) are
used as they are, one row each, with that group and variant: their wordings are the dataset's.
Other records are matched by wording when their ``meta`` has no ``qtype``, so SLAKE questions
phrased like the phantom's get paraphrased too. A record no pattern matches is skipped and listed
with its reason, never dropped silently.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from medvlm.records import parse_meta

BASE_VARIANT = "base"

#: qtype -> (pattern of the original wording, alternative wordings using the pattern's named slots).
PARAPHRASES: dict[str, tuple[str, tuple[str, ...]]] = {
    "modality": (
        r"what modality is used to take this image\?",
        ("Which imaging modality was used for this image?",
         "How was this image acquired: CT, MRI or X-ray?",
         "What imaging technique produced this picture?"),
    ),
    "modality_yn": (
        r"is this an? (?P<modality>.+) image\?",
        ("Was this image acquired with {modality}?",
         "Is this picture from a {modality} examination?",
         "Does this image come from {modality}?"),
    ),
    "body_part": (
        r"which part of the body does this image show\?",
        ("What body part is shown in this image?",
         "Which region of the body is imaged here?",
         "What part of the body is visible in this picture?"),
    ),
    "presence": (
        r"is there an abnormality in this image\?",
        ("Does this image show any lesion?",
         "Is anything abnormal seen here?",
         "Does this image contain an abnormal finding?"),
    ),
    "side": (
        r"which side of the (?P<organ>.+) holds the abnormality, left or right\?",
        ("Is the abnormality on the left or the right side of the {organ}?",
         "On which side of the {organ} is the abnormality, left or right?",
         "Left or right: where in the {organ} is the abnormality?"),
    ),
    "side_yn": (
        r"is the abnormality in the (?P<side>left|right) (?P<organ>.+)\?",
        ("Is the lesion located in the {side} {organ}?",
         "Does the {side} {organ} contain the abnormality?",
         "Is the abnormal finding in the {side} {organ}?"),
    ),
    "finding_yn": (
        r"is the abnormality an? (?P<finding>.+)\?",
        ("Is this lesion a {finding}?",
         "Does the abnormality look like a {finding}?",
         "Is the abnormal finding a {finding}?"),
    ),
    "location": (
        r"where is the abnormality\?",
        ("Where is the lesion located?",
         "In which location is the abnormality found?",
         "Where can the abnormal finding be seen?"),
    ),
    "finding": (
        r"what is the abnormality\?",
        ("What kind of lesion is shown?",
         "What type of abnormality is seen?",
         "Which finding is present in this image?"),
    ),
}
_COMPILED = {k: re.compile(pat, re.IGNORECASE) for k, (pat, _) in PARAPHRASES.items()}


def _meta(record: Mapping[str, Any]) -> dict[str, Any]:
    return parse_meta(record.get("meta"))


def _qtype(record: Mapping[str, Any]) -> str | None:
    return _meta(record).get("qtype")


def dataset_group(record: Mapping[str, Any]) -> tuple[str, str] | None:
    """``(group, variant)`` of a record whose dataset already groups paraphrases (``meta.paraphrase_group``,
    ``meta.question_variant``; a missing variant reads as ``""``), else ``None``."""
    meta = _meta(record)
    group = meta.get("paraphrase_group")
    if group in (None, ""):
        return None
    variant = meta.get("question_variant")
    return str(group), "" if variant is None else str(variant)


def paraphrases(question: str, qtype: str | None = None) -> list[str] | None:
    """Alternative wordings of ``question`` (its type's pattern, or any pattern when ``qtype`` is
    unknown or does not match), or ``None`` when no pattern matches the wording."""
    text = question.strip()
    kinds = [qtype] if qtype in PARAPHRASES else []
    kinds += [k for k in PARAPHRASES if k not in kinds]
    for kind in kinds:
        match = _COMPILED[kind].fullmatch(text)
        if match:
            return [t.format(**match.groupdict()) for t in PARAPHRASES[kind][1]]
    return None


def paraphrase_records(
    records: Iterable[Mapping[str, Any]], *, max_variants: int = 3
) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Paraphrase groups of ``records`` (unified records: dicts or ``datasets`` rows).

    Returns ``(rows, skipped)``: a record of a dataset paraphrase group as it is (see the module
    docstring); for each other matched record its base row then up to ``max_variants`` reworded rows (``id`` ``<id>~p<k>``, ``group`` the original id, ``variant`` ``base``/``p<k>``);
    ``skipped`` lists ``{"id", "reason"}`` for records whose wording no pattern matches.
    """
    if max_variants < 1:
        raise ValueError(f"max_variants must be >= 1, got {max_variants}")
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    for rec in records:
        rid = str(rec["id"])
        grouped = dataset_group(rec)
        if grouped is not None:
            rows.append({**rec, "group": grouped[0], "variant": grouped[1]})
            continue
        qtype = _qtype(rec)
        alternatives = paraphrases(str(rec.get("question", "")), qtype)
        if alternatives is None:
            skipped.append({"id": rid, "reason": f"no paraphrase pattern matches the question "
                                                 f"{rec.get('question')!r} (qtype {qtype!r})"})
            continue
        rows.append({**rec, "group": rid, "variant": BASE_VARIANT})
        for k, text in enumerate(alternatives[:max_variants], start=1):
            rows.append({**rec, "id": f"{rid}~p{k}", "question": text, "group": rid, "variant": f"p{k}"})
    return rows, skipped
