"""Steps that judge a row's text: format, the answer given away, pathology relevance, the blind LLM check."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from medvlm.data_curation.filters.base import (
    BLIND_TEMPLATE,
    FilterConfigError,
    FilterStep,
    _batches,
    _meta_strings,
)
from medvlm.utils.text import normalize_answer, normalize_text, tokens, yes_no

logger = logging.getLogger(__name__)


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
    """The normalised open answer appears verbatim (whole words; a Han / kana character is a word)
    in the question: it gives itself away.

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
            elif f" {' '.join(tokens(a))} " in f" {' '.join(tokens(q))} ":  # Chinese: per character
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
