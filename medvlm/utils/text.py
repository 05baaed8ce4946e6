"""Answer normalisation: one place that decides when two answers are "the same".

Every metric in :mod:`medvlm.eval` and the text filters of curation compare answers through these
functions, so a change here changes every score; the rules are listed so a reader can reproduce
them by hand.

``normalize_text`` (SQuAD-style, Rajpurkar et al. 2016, extended to Unicode):

1. Unicode NFKC (full-width letters and ligatures become their plain forms), then ``casefold``;
2. every punctuation or symbol character (Unicode categories ``P*`` and ``S*``) becomes a space,
   so "left-lung" and "left lung" agree and non-ASCII text never raises;
3. the English articles ``a``, ``an``, ``the`` are dropped as whole words, except that an answer
   that is nothing but a choice letter ("A", "(a)", "A.") keeps it: "a" is then option A, not an
   article (dropping it made every correct "A" to a lettered question empty, hence wrong);
4. runs of whitespace collapse to one space; leading/trailing space is stripped.

``normalize_answer`` additionally maps a *whole* answer that is a yes/no synonym to ``"yes"`` or
``"no"`` (see :data:`YES_WORDS` / :data:`NO_WORDS`). ``yes_no`` is more lenient: it also reads the
*first word* of a longer answer ("Yes, there is a nodule" -> ``"yes"``), which is how a closed
question is scored when its reference answer is yes/no.

>>> normalize_text("  The LEFT-lung!! ")
'left lung'
>>> normalize_answer("Correct.")
'yes'
>>> yes_no("No, the heart is not enlarged")
'no'
>>> parse_choice_letter("Answer: (b)", n_choices=4)
1
"""

from __future__ import annotations

import re
import unicodedata

#: Whole answers (after ``normalize_text``) that mean "yes". Kept short on purpose: only words a
#: model uses to answer a yes/no question, never words that carry a finding ("positive" is left
#: out because "positive for X" can answer an open question).
YES_WORDS: frozenset[str] = frozenset({"yes", "y", "yeah", "yep", "true", "correct", "present", "affirmative"})
#: Whole answers that mean "no". ``"none"`` and ``"absent"`` answer "Is there a lesion?" as no.
NO_WORDS: frozenset[str] = frozenset(
    {"no", "n", "nope", "false", "incorrect", "absent", "none", "not present", "negative"}
)
ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})

_WS = re.compile(r"\s+")


def _is_punct_or_symbol(ch: str) -> bool:
    return unicodedata.category(ch)[0] in ("P", "S")


def normalize_text(text: object) -> str:
    """Lower-case, strip punctuation/symbols and articles, collapse whitespace.

    Accepts any object (``None`` -> ``""``; numbers are stringified) and never raises on
    non-ASCII input. Returns a string of space-separated words.
    """
    if text is None:
        return ""
    folded = unicodedata.normalize("NFKC", str(text))
    s = "".join(" " if _is_punct_or_symbol(ch) else ch for ch in folded.casefold())
    words = [w for w in _WS.split(s) if w]
    if words == ["a"] and _LETTER_ALONE.match(folded):
        return "a"  # a lone choice letter A, not an article
    return " ".join(w for w in words if w not in ARTICLES)


# Han ideographs and kana: scripts written without spaces, so one character is one token (the
# usual unit for Chinese, e.g. SLAKE's Chinese half). Hangul is spaced into words and kept whole.
_HAN_RANGES = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
UNSPACED_SCRIPT = re.compile(f"([\u3040-\u30ff{_HAN_RANGES}])")
#: Han ideographs only (what sacrebleu's ``zh`` tokenizer splits).
HAN = re.compile(f"[{_HAN_RANGES}]")


def split_unspaced(text: str) -> str:
    """``text`` with a space around every Han / kana character."""
    return UNSPACED_SCRIPT.sub(r" \1 ", text)


def tokens(text: object, per_character: bool = True) -> list[str]:
    """Words of ``normalize_text(text)``, the unit of token recall and token F1. With
    ``per_character`` a Han / kana character is one token (for graded overlap on open answers);
    without, an unspaced Chinese answer is one word (for a yes/no decision on a closed answer,
    where 右肺 and 左肺, right and left lung, share a character but not the answer)."""
    norm = normalize_text(text)
    return (split_unspaced(norm) if per_character else norm).split()


def normalize_answer(text: object) -> str:
    """``normalize_text`` plus whole-answer yes/no synonym mapping ("Correct." -> "yes")."""
    norm = normalize_text(text)
    if norm in YES_WORDS:
        return "yes"
    if norm in NO_WORDS:
        return "no"
    return norm


def yes_no(text: object) -> str | None:
    """``"yes"``/``"no"`` if the whole answer or its first word is a synonym, else ``None``.

    "Yes, there is a mass" -> ``"yes"``; "There is no mass" -> ``None`` (we do not guess
    polarity from the middle of a sentence: that is the judge's job, not string matching).
    """
    norm = normalize_answer(text)
    if norm in ("yes", "no"):
        return norm
    first = norm.split(" ", 1)[0] if norm else ""
    if first in YES_WORDS:
        return "yes"
    if first in NO_WORDS:
        return "no"
    return None


# A choice letter is read only where it cannot be an English article: alone ("B", "(b)", "B."),
# after an explicit cue ("Answer: B", "the answer is (C)", "option D"), or as a labelled prefix
# ("B. Left lung", "(B) left lung", "B) ..."). "A lesion is seen" is NOT read as choice A.
_LETTER_ALONE = re.compile(r"^\s*[\(\[]?([A-Za-z])[\)\]]?\s*[.:)]?\s*$")
_LETTER_CUE = re.compile(
    r"\b(?:answer|option|choice)\s*(?:is\s*)?[:=]?\s*(?:\(([A-Za-z])\)|\[([A-Za-z])\]|([A-Za-z])(?:[.:,;)]|\s*$))",
    re.IGNORECASE,
)
_LETTER_PREFIX = re.compile(r"^\s*(?:\(([A-Za-z])\)|\[([A-Za-z])\]|([A-Za-z])[.):])\s*\S")


def parse_choice_letter(text: object, n_choices: int) -> int | None:
    """Index of the choice a letter answer names (``"B"`` -> 1), or ``None``.

    Only letters within the first ``n_choices`` letters count, so "Answer: Z" with four
    choices is ``None`` rather than an out-of-range index.
    """
    if text is None or n_choices <= 0:
        return None
    s = unicodedata.normalize("NFKC", str(text)).strip()
    for pattern in (_LETTER_ALONE, _LETTER_CUE, _LETTER_PREFIX):
        m = pattern.search(s)
        if m:
            letter = next(g for g in m.groups() if g)
            idx = ord(letter.upper()) - ord("A")
            if 0 <= idx < n_choices:
                return idx
            return None
    return None


_OPTION_LABEL = re.compile(r"^\s*(?:choice\s+|option\s+)?[\(\[]?[A-Za-z][\)\]]?\s*[.:)]\s*", re.IGNORECASE)


def strip_option_label(option: object) -> str:
    """``"A: Left lung"`` / ``"(A) Left lung"`` / ``"Choice A: ..."`` -> the option's text."""
    s = "" if option is None else str(option)
    return _OPTION_LABEL.sub("", s, count=1)
