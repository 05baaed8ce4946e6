"""PMC-VQA (Zhang et al., 2023): multiple-choice VQA on figures from PubMed Central papers.

* v1: ``train.csv`` / ``test.csv`` with ``Figure_path, Question, Answer, Choice A, Choice B,
  Choice C, Choice D, Answer_label``; the answer column is sometimes spelt ``Anwser`` and choices
  carry their letter (``"A:CT"``).
* v2: ``train_2.csv`` / ``test_2.csv``, where ``Answer`` is the letter and choices are padded
  (``" A:  CT  "``).
* images under ``figures/`` (``images/``, ``images_2/`` also searched).

Records are ``closed`` with ``choices`` = the four cleaned option texts and ``answer`` = the text
of the correct option. ``group_id`` is the PMC article id at the start of the figure name
(``PMC8253867``), so figures of one paper stay in one split.

The version is resolved per split. Option ``version`` (``1`` or ``2``; in a mix YAML
``options: {version: 1}``) reads that version's file for every split. Without it, a split whose file
exists in one version only is read from that version (a folder with v1's ``train.csv`` and v2's
``test_2.csv`` gives v1 train and v2 test), and when both versions hold the split v2 is read and a
warning says so. A requested split with no file raises, naming the files looked for and the CSVs
the folder holds; with ``split=None`` a split with no file is a warning, unless no split has one.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import PurePath

from medvlm.data_curation.sources._common import Context, Draft, Skip, iter_csv

logger = logging.getLogger(__name__)

OPTIONS = {"version": None}
DEFAULT_VERSION = "2"  # read when both versions hold the split (the newer release)
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


def _version_option(value) -> str | None:
    """``None``, ``1``/``2``, ``"1"``/``"2"`` or ``"v1"``/``"v2"`` → None, "1" or "2"."""
    if value is None:
        return None
    text = str(value).strip().lower().removeprefix("v")
    if text not in FILES:
        raise ValueError(f"pmc_vqa: version must be 1, 2 or None (resolved per split), got {value!r}")
    return text


def _note(ctx: Context, msg: str) -> None:
    logger.warning(msg)
    ctx.warnings.append(msg)


def _plan(ctx: Context) -> list[tuple[str, str, str]]:
    """(split, version, file name) to read; raises when a requested split has no file."""
    assert ctx.root is not None
    want = _version_option(ctx.options["version"])
    if ctx.split == "validation":
        raise FileNotFoundError("pmc_vqa: PMC-VQA ships no validation split (train and test only); "
                                "make one from train with medvlm.data_curation.splits.split_by_group")
    plan, missing = [], []
    for split in (s for s in ("train", "test") if ctx.wants(s)):
        found = {v: next((n for n in FILES[v][split] if (ctx.root / n).is_file()), None) for v in FILES}
        have = [v for v, name in found.items() if name]
        version = want if want else (DEFAULT_VERSION if len(have) > 1 else next(iter(have), None))
        if version is None or not found[version]:
            looked = [n for v in ([want] if want else FILES) for n in FILES[v][split]]
            missing.append(f"{split} (looked for {looked})")
            continue
        if not want and len(have) > 1:
            _note(ctx, f"pmc_vqa: both v1 ({found['1']}) and v2 ({found['2']}) hold the {split} split; reading "
                       f"v{version} ({found[version]}); pass version=1 or version=2 to choose")
        plan.append((split, version, found[version]))
    if missing:
        csvs = sorted(p.name for p in ctx.root.glob("*.csv"))
        version = f" version-{want}" if want else ""
        msg = f"pmc_vqa: no{version} file for split {'; '.join(missing)} in {ctx.root}; it holds {csvs or 'no CSV'}"
        if ctx.split is not None or not plan:
            raise FileNotFoundError(msg)
        _note(ctx, msg + f"; read {[name for _, _, name in plan]} only")
    return plan


def iter_records(ctx: Context) -> Iterator[Draft | Skip]:
    """One closed record per CSV row, each split from the version resolved for it."""
    if ctx.root is None:
        raise ValueError("pmc_vqa: pass the folder holding train.csv/test.csv (or *_2.csv) and figures/")
    for split, version, name in _plan(ctx):
        n = 0
        for idx, row in iter_csv(ctx.root / name):
            n += 1
            yield _row(ctx, name, idx, split, version, row)
        if n == 0:
            _note(ctx, f"pmc_vqa: {name} ({split}, v{version}) has a header but no rows")


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
    return Draft(file, idx, image_dirs=("figures", "images", "images_2", ""), fields={
        "id": f"pmc_vqa-v{version}-{split}-{idx}", "image": figure, "question": row.get("Question"),
        "answer": choices[LETTERS.index(letter)], "answer_type": "closed", "choices": choices,
        "split": split, "group_id": m.group(1) if m else PurePath(figure).stem, "meta": meta,
    })
