"""The published scoring conventions, each written from the harness's own code, row by row.

A convention named after a harness gives every (prediction, reference) pair the score that harness
gives it, quirks included; medvlm's own rules live in :mod:`medvlm.eval.metrics` under names of their
own. Each rule below was read from the harness's code (repository, commit, file and function are
quoted next to it) and written again here; ``tests/eval/test_harness_conventions.py`` holds the tables of
cases derived from that reading.

* lmms-eval's SLAKE task (:func:`slake_normalize`, :func:`lmms_eval_slake_match`);
* LLaVA-Med v1.0.0 (:func:`llava_med_substring`, :func:`llava_med_yesno`, :func:`llava_med_recall`);
* MultiMedEval (:func:`multimedeval_closed`, :func:`multimedeval_recall`).

LLaVA-Med's ``normalize_word`` and MultiMedEval's ``clean_str`` are the same rule (both descend from
the VQA v2 evaluation script): :func:`vqa_normalize`.
"""

from __future__ import annotations

import re
import string
from collections import Counter

# --------------------------------------------------------------------------------------------
# lmms-eval, SLAKE task.
# EvolvingLMMs-Lab/lmms-eval @ 75571cfe0fa36ca5ec2e6aa2bb268f9d38295af3 (utils.py last changed in
# 0a75d6bab2ec, "add SLAKE medical VQA benchmark"), lmms_eval/tasks/slake/utils.py:
# normalize_answer (with _normalize_medical_aliases, _normalize_yes_no) and slake_process_results
# (is_correct = the two normal forms are equal; nothing else, not even an empty-answer check).
# --------------------------------------------------------------------------------------------

#: Chinese and full-width marks the SLAKE task turns into spaces besides ASCII punctuation. Other
#: marks (curly quotes, the ellipsis, the em dash, the middle dot) are kept.
SLAKE_ZH_PUNCTUATION = "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～、，。；：《》？【】（）"
_SLAKE_TO_SPACE = {ord(c): " " for c in string.punctuation + SLAKE_ZH_PUNCTUATION}
# Bracketed text is deleted up to the first closing bracket, ASCII brackets first, then full-width
# ones in what is left (two passes: "（a (b） c)" keeps "a", one combined pass would keep "c").
_SLAKE_ASCII_BRACKETS = re.compile(r"\([^)]*\)")
_SLAKE_FULL_WIDTH_BRACKETS = re.compile("（[^）]*）")
#: Whole answers read as "yes" / "no" (English and Chinese). 正常 (normal) counts as yes and 异常
#: (abnormal) as no, as in the task.
SLAKE_YES = frozenset({"yes", "yeah", "yep", "true", "是", "是的", "有", "包含", "可以", "能", "会", "正常"})
SLAKE_NO = frozenset({"no", "nope", "false", "否", "不是", "没有", "无", "不包含", "不能", "不会", "不可以",
                      "不正常", "异常"})
#: The task's only medical alias: both spellings of x-ray after punctuation became spaces.
SLAKE_ALIASES = {"x ray": "xray", "xray": "xray"}


def slake_normalize(text: object) -> str:
    """lmms-eval SLAKE's normal form: strip and lower-case; delete ``( ... )`` and ``（ ... ）``; ASCII,
    Chinese and full-width punctuation to spaces; collapse spaces; then the whole answer through the
    x-ray alias and the yes/no map. No Unicode folding (Ｙｅｓ stays full-width), no article removal."""
    s = ("" if text is None else str(text)).strip().lower()
    s = _SLAKE_FULL_WIDTH_BRACKETS.sub(" ", _SLAKE_ASCII_BRACKETS.sub(" ", s))
    s = " ".join(s.translate(_SLAKE_TO_SPACE).split())
    s = SLAKE_ALIASES.get(s, s)
    if s in SLAKE_YES:
        return "yes"
    if s in SLAKE_NO:
        return "no"
    return s


def lmms_eval_slake_match(prediction: object, reference: object) -> float:
    """1.0 when the SLAKE normal forms are equal (two answers that both normalise to "" match)."""
    return float(slake_normalize(prediction) == slake_normalize(reference))


# --------------------------------------------------------------------------------------------
# The VQA v2 answer normaliser, as two medical harnesses have it.
# microsoft/LLaVA-Med tag v1.0.0 = b9a98a736d2ef05bcf5ff345be6403fb3a664eaf,
#   llava/eval/eval_metrics/glossary.py: normalize_word (contractions, manual_map, articles,
#   period_strip, comma_strip, punct);
# corentin-ryr/MultiMedEval @ d9ac283f5ad989d4f78b709f7076f432de4aa69e, multimedeval/utils.py:
#   clean_str (the same tables; it lower-cases first, LLaVA-Med's evaluate() lower-cases before it).
# --------------------------------------------------------------------------------------------

#: The 21 marks the rule removes; any other character (":", "'", "%", "*", "#", "&", non-ASCII
#: punctuation) is kept as part of a word.
VQA_PUNCTUATION = ";/[]\"{}()=+\\_-><@`,?!"
#: Number words written as digits ("none" is 0: "none" answers "how many?" but not "is there?").
VQA_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
VQA_ARTICLES = frozenset({"a", "an", "the"})
# The contracted forms of the rule's table; a word spelt with any one of a form's apostrophes left out
# becomes the form ("dont" -> "don't", "couldnt've" and "couldn'tve" -> "couldn't've", never
# "couldntve"). Its table also keys "I'm", "I've", "I'd've" in upper case (never reached: the text is
# lower-cased first) and maps "somebody'd" the other way, to "somebodyd" (see _VQA_CONTRACTIONS).
_CONTRACTED_FORMS = (
    "'ow's'at", "'twas", "ain't", "aren't", "can't", "could've", "couldn't", "couldn't've", "didn't",
    "doesn't", "don't", "hadn't", "hadn't've", "hasn't", "haven't", "he'd", "he'd've", "he's", "how'd",
    "how'll", "how's", "isn't", "it'd", "it'd've", "it'll", "ma'am", "might've", "mightn't", "mightn't've",
    "must've", "mustn't", "needn't", "not've", "o'clock", "oughtn't", "shan't", "she'd've", "should've",
    "shouldn't", "shouldn't've", "somebody'd've", "somebody'll", "somebody's", "someone'd", "someone'd've",
    "someone'll", "someone's", "something'd", "something'd've", "something'll", "that's", "there'd",
    "there'd've", "there're", "there's", "they'd", "they'd've", "they'll", "they're", "they've", "wasn't",
    "we'd've", "we've", "weren't", "what'll", "what're", "what's", "what've", "when's", "where'd", "where's",
    "where've", "who'd", "who'd've", "who'll", "who's", "who've", "why'll", "why're", "why's", "won't",
    "would've", "wouldn't", "wouldn't've", "y'all", "y'all'd've", "y'all'll", "you'd", "you'd've", "you'll",
    "you're", "you've",
)


def _one_apostrophe_dropped(form: str) -> list[str]:
    return [form[:i] + form[i + 1:] for i, ch in enumerate(form) if ch == "'"]


_VQA_CONTRACTIONS = {word: form for form in _CONTRACTED_FORMS for word in _one_apostrophe_dropped(form)}
_VQA_CONTRACTIONS["somebody'd"] = "somebodyd"
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")  # "2.5" keeps its point, "lung." loses it
#: Periods removed per call: the harnesses pass ``re.UNICODE`` (= 32) where ``sub()`` takes its count.
VQA_PERIODS_PER_CALL = 32


def vqa_normalize(text: object) -> str:
    """The answer normaliser of LLaVA-Med (``normalize_word``) and MultiMedEval (``clean_str``).

    1. lower-case;
    2. each of :data:`VQA_PUNCTUATION`'s marks is deleted when the text has it next to a space, or has
       a digit-comma-digit anywhere ("1,000"), and becomes a space otherwise ("left-lung" -> "left lung",
       "left - lung" -> "left  lung");
    3. the first 32 periods not followed by a digit are deleted ("2.5" stays one word);
    4. words (split on whitespace) through :data:`VQA_NUMBER_WORDS`, then articles dropped, then
       contractions restored; joined by single spaces; any comma left is deleted.
    """
    s = ("" if text is None else str(text)).lower()
    delete_all = _DIGIT_COMMA_DIGIT.search(s) is not None
    s = s.translate({ord(m): "" if delete_all or f"{m} " in s or f" {m}" in s else " " for m in VQA_PUNCTUATION})
    s = _PERIOD_NOT_BEFORE_DIGIT.sub("", s, count=VQA_PERIODS_PER_CALL)
    words = [VQA_NUMBER_WORDS.get(w, w) for w in s.split()]
    words = [_VQA_CONTRACTIONS.get(w, w) for w in words if w not in VQA_ARTICLES]
    return " ".join(words).replace(",", "")


# --------------------------------------------------------------------------------------------
# LLaVA-Med v1.0.0 (microsoft/LLaVA-Med tag v1.0.0 = b9a98a736d2ef05bcf5ff345be6403fb3a664eaf).
# Both scripts lower-case and normalize_word the reference (the last conversation turn) and the
# answer ``text`` before anything else.
# --------------------------------------------------------------------------------------------


def llava_med_substring(prediction: object, reference: object) -> float:
    """llava/eval/run_eval_batch.py ``evaluate``, CLOSED branch ("yes/no accuracy"; the OPEN branch's
    "open accuracy" is the same test): 1.0 when the normalised reference is a character substring of
    the normalised answer. "no" is inside "nodule"; a reference that normalises to "" (the letter "A",
    an article) is inside every answer."""
    return float(vqa_normalize(reference) in vqa_normalize(prediction))


def llava_med_yesno(prediction: object, reference: object) -> float:
    """llava/eval/run_eval.py ``evaluate``, CLOSED branch: as :func:`llava_med_substring`, but only an
    answer holding the characters "yes" or "no" somewhere (also inside "nodule", "know") can score."""
    pred = vqa_normalize(prediction)
    if "yes" not in pred and "no" not in pred:
        return 0.0
    return float(vqa_normalize(reference) in pred)


def llava_med_recall(prediction: object, reference: object) -> float:
    """llava/eval/run_eval_batch.py ``evaluate``, OPEN branch, "recall" from
    llava/eval/eval_metrics/evaluate_metrics.py ``calculate_f1score``: the recall of the paper's open
    columns.

    The already normalised strings are normalised again (``calculate_f1score`` calls normalize_word
    itself) and split on whitespace. Hits are counted *in the answer*: each predicted word that is a
    reference word counts as many times as it is predicted; misses are reference words (with their
    repeats) the answer lacks; recall = hits / (hits + misses). So "lung lung" against "left lung" is
    2/3 and "lung lung" against "lung" is 1. An empty answer or reference scores 0.
    """
    pred = Counter(vqa_normalize(vqa_normalize(prediction)).split())
    ref = Counter(vqa_normalize(vqa_normalize(reference)).split())
    if not pred or not ref:
        return 0.0
    hits = sum(n for word, n in pred.items() if word in ref)
    misses = sum(n for word, n in ref.items() if word not in pred)
    return hits / (hits + misses) if hits else 0.0


# --------------------------------------------------------------------------------------------
# MultiMedEval (corentin-ryr/MultiMedEval @ d9ac283f5ad989d4f78b709f7076f432de4aa69e),
# multimedeval/task_families.py ``VQA.evaluate`` with ``VQA._preprocess`` and utils.py ``clean_str``;
# the reference is ``answer.lower().strip()`` (vqa.py ``get_correct_answer`` of VQA-RAD, Path-VQA, SLAKE).
# --------------------------------------------------------------------------------------------

#: A yes/no question is correct when this share of its reference tokens ("no" counts "not" as well)
#: is in the answer ("closedQuestionsAccuracy").
MULTIMEDEVAL_CLOSED_THRESHOLD = 0.4
#: Any other question is correct when its recall reaches this ("openQuestionsAccuracy").
MULTIMEDEVAL_OPEN_THRESHOLD = 0.75


def multimedeval_tokens(text: object) -> set[str]:
    """The set of words of ``clean_str(text)`` (repeats count once)."""
    return set(vqa_normalize(text).split())


def _reference(reference: object) -> str:
    # get_correct_answer strips the reference (not the answer) before clean_str; it matters to the
    # punctuation rule: " -left-lung" deletes every "-" (one is next to a space), "-left-lung" does not
    return ("" if reference is None else str(reference)).lower().strip()


def multimedeval_recall(prediction: object, reference: object) -> float:
    """``VQA.evaluate``'s per-question "recall": the share of distinct reference words found among the
    answer's distinct words (0 for an empty reference)."""
    ref = multimedeval_tokens(_reference(reference))
    return len(ref & multimedeval_tokens(prediction)) / len(ref) if ref else 0.0


def multimedeval_closed(prediction: object, reference: object) -> float:
    """``VQA.evaluate``'s correctness of one question.

    A question is closed only when its cleaned reference is "yes" or "no" (whatever the dataset's
    answer type); it is correct when at least 0.4 of the reference tokens, {"yes"} or {"no", "not"},
    are answer words: "yes" needs the word yes, "no" needs the word no or not. Every other question
    is scored by the open rule, correct when :func:`multimedeval_recall` >= 0.75 ("right lung" for
    "left lung" is 0.5, not correct).
    """
    ref = vqa_normalize(_reference(reference))
    if ref not in ("yes", "no"):
        return float(multimedeval_recall(prediction, reference) >= MULTIMEDEVAL_OPEN_THRESHOLD)
    wanted = {"no", "not"} if ref == "no" else {"yes"}
    found = len(wanted & multimedeval_tokens(prediction)) / len(wanted)
    return float(found >= MULTIMEDEVAL_CLOSED_THRESHOLD)
