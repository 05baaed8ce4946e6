"""PMC-VQA (Zhang et al., 2023): multiple-choice VQA on figures from PubMed Central papers.

* v1: ``train.csv`` / ``test.csv`` with ``Figure_path, Question, Answer, Choice A, Choice B,
  Choice C, Choice D, Answer_label``; the answer column is sometimes spelt ``Anwser`` and choices
  carry their letter (``"A:CT"``).
* v2: ``train_2.csv`` / ``test_2.csv``, where ``Answer`` is the letter and choices are padded
  (``" A:  CT  "``).
* images under ``figures/`` (``images/`` also searched).

Records are ``closed`` with ``choices`` = the four cleaned option texts and ``answer`` = the text
of the correct option. Option ``version``: None (v2 files when present, else v1), "1" or "2".
``group_id`` is the PMC article id at the start of the figure name (``PMC8253867``), so figures
of one paper stay in one split.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import PurePath

from medvlm.data_curation.sources._common import Context, Draft, Skip, iter_csv

OPTIONS = {"version": None}
FILES = {
    "1": {"train": ("train.csv",), "test": ("test.csv", "test_clean.csv")},
    "2": {"train": ("train_2.csv",), "test": ("test_2.csv",)},
}
LETTERS = "ABCD"
KNOWN = {"Figure_path", "Question", "Answer", "Anwser", "Answer_label", "index", "split",
         *(f"Choice {x}" for x in LETTERS)}
_CHOICE = re.compile(r"^\s*([A-D])\s*[:.)]\s*(.*?)\s*$", re.S)


def clean_choice(text) -> str:
    """``" A:  CT  "`` → ``"CT"``; inner runs of whitespace collapse to one space."""
    text = str(text or "")
    m = _CHOICE.match(text)
    body = m.group(2) if m else text
    return " ".join(body.split())


def _correct_letter(row: dict, choices: list[str]) -> str | None:
    label = str(row.get("Answer_label") or "").strip().upper()
    if label in tuple(LETTERS):
        return label
    answer = str(row.get("Answer", row.get("Anwser")) or "").strip()
    if answer.upper() in tuple(LETTERS):
        return answer.upper()  # v2: the answer column is the letter
    m = _CHOICE.match(answer)
    if m:
        return m.group(1)
    text = " ".join(answer.split()).lower()
    hits = [LETTERS[i] for i, c in enumerate(choices) if c.lower() == text]
    return hits[0] if hits else None


def _pick_version(ctx: Context) -> str:
    want = ctx.options["version"]
    if want is not None:
        if str(want) not in FILES:
            raise ValueError(f"pmc_vqa: version must be '1', '2' or None, got {want!r}")
        return str(want)
    return "2" if any((ctx.root / n).is_file() for n in ("train_2.csv", "test_2.csv")) else "1"


def iter_records(ctx: Context) -> Iterator[Draft | Skip]:
    """One closed record per CSV row of the chosen version."""
    if ctx.root is None:
        raise ValueError("pmc_vqa: pass the folder holding train.csv/test.csv (or *_2.csv) and figures/")
    version = _pick_version(ctx)
    for split, names in FILES[version].items():
        if not ctx.wants(split):
            continue
        name = next((n for n in names if (ctx.root / n).is_file()), None)
        if name is None:
            continue
        for idx, row in iter_csv(ctx.root / name):
            yield _row(ctx, name, idx, split, version, row)


def _row(ctx: Context, file: str, idx: int, split: str, version: str, row: dict) -> Draft | Skip:
    choices = [clean_choice(row.get(f"Choice {x}")) for x in LETTERS]
    letter = _correct_letter(row, choices)
    if letter is None or not choices[LETTERS.index(letter)]:
        return Skip(file, idx, f"cannot tell the correct option: Answer={row.get('Answer', row.get('Anwser'))!r}, "
                               f"Answer_label={row.get('Answer_label')!r}")
    figure = str(row.get("Figure_path") or "").strip()
    m = re.match(r"(PMC\d+)", PurePath(figure).name)
    meta = {"figure": figure, "version": version, "answer_letter": letter}
    extra = ctx.extras(row, KNOWN, file)
    if extra:
        meta["extra"] = extra
    return Draft(file, idx, image_dirs=("figures", "images", ""), fields={
        "id": f"pmc_vqa-v{version}-{split}-{idx}", "image": figure, "question": row.get("Question"),
        "answer": choices[LETTERS.index(letter)], "answer_type": "closed", "choices": choices,
        "split": split, "group_id": m.group(1) if m else PurePath(figure).stem, "meta": meta,
    })
