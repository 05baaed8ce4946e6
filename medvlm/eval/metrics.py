"""Metrics for closed and open questions, a registry of them, and seeded bootstrap intervals.

A metric is a per-item function ``(prediction, reference, record) -> value`` registered for one
answer type (``"closed"`` or ``"open"``) with :func:`register_metric`, which records whether higher
is better, how items aggregate, and the harness whose rule it follows (``source``, written to
``metrics.json``):

* ``aggregation="mean"``: the item values are averaged (mean, standard deviation, bootstrap CI);
* ``aggregation="corpus"``: the item values are *sufficient statistics* (a vector per item) that
  are summed over the corpus and turned into one score by ``corpus_fn`` (corpus BLEU). The
  bootstrap resamples items and recomputes the corpus score; a corpus score has no per-item
  spread, so its ``_std`` is the bootstrap standard error (the std of the resampled scores).

Closed questions (one point each, 0 or 1), all computed from the same predictions. A metric named
after a harness gives each item exactly the harness's score (rules and sources in
:mod:`medvlm.eval.conventions`); medvlm's own rules are ``accuracy`` and ``medvlm_token_recall``:

* ``accuracy``: medvlm's. Multiple choice (``choices`` present) compares the chosen option (a letter,
  see :func:`~medvlm.utils.text.parse_choice_letter`, else the nearest option text, see
  :func:`nearest_choice`); a yes/no reference compares ``yes_no`` readings;
  otherwise normalised exact match (synonyms, articles dropped, Unicode folded).
* ``exact_match``: lmms-eval's SLAKE task (its normal forms are equal).
* ``substring``: LLaVA-Med v1.0.0 ``run_eval_batch.py`` (the normalised reference is a character
  substring of the normalised answer: "no" is inside "nodule"); the rule of the paper's tables.
* ``llava_med_yesno``: LLaVA-Med v1.0.0 ``run_eval.py`` (as ``substring``, but only an answer holding
  "yes" or "no" can score).
* ``token_recall``: MultiMedEval (yes/no references: >= 0.4 of {yes} or {no, not} in the answer;
  any other reference: its open recall >= 0.75).
* ``medvlm_token_recall``: medvlm's wider rule, share of reference words in the answer
  >= :data:`TOKEN_RECALL_THRESHOLD` for every closed answer (multiple choice: as ``accuracy``).

Open questions: ``rouge1``/``rouge2``/``rougeL`` F-measure (``rouge-score``, Porter stemming, with
its tokenizer widened to every script: see :func:`rouge_tokens`), ``bleu`` (``sacrebleu`` corpus
BLEU, 0-100; ``zh`` tokens for a Chinese reference, see :func:`bleu_stats`), ``sentence_bleu``
(mean of ``sacrebleu`` sentence BLEU, 0-100), ``token_recall`` (medvlm's: share of distinct
reference tokens in the prediction), ``token_f1`` (SQuAD-style bag-of-tokens F1), and the
harnesses' recalls ``llava_med_recall`` (the paper's open columns) and ``multimedeval_recall``.
``rouge-score`` and ``sacrebleu`` are imported on first use.
"""

from __future__ import annotations

import difflib
import unicodedata
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from medvlm.eval import conventions as conv
from medvlm.records import ANSWER_TYPES
from medvlm.utils.text import (
    HAN,
    normalize_answer,
    parse_choice_letter,
    split_unspaced,
    strip_option_label,
    tokens,
    yes_no,
)

TOKEN_RECALL_THRESHOLD = 0.4


class UnknownMetricError(KeyError):
    """A metric name that is not registered; the message suggests the closest names."""

    def __str__(self) -> str:  # KeyError would repr() the message and show quotes
        return str(self.args[0])


@dataclass(frozen=True)
class Metric:
    """A registered metric: ``fn`` scores one item; ``corpus_fn`` (corpus metrics) sums items."""

    name: str
    answer_type: str
    fn: Callable[[str, str, Mapping[str, Any]], Any]
    higher_is_better: bool = True
    aggregation: str = "mean"
    corpus_fn: Callable[[np.ndarray], float] | None = None
    source: str = ""
    title: str = ""                       # what tables, the report and the model card call it
    shown: frozenset[str] = frozenset()   # where it is shown beyond metrics.json: "table", "card"
    card_type: str | None = None          # the Hugging Face model-index metric type ("accuracy", "rouge")


#: Where a metric can be shown: the comparison and summary tables and the report ("table"), the
#: model card's model-index ("card"). Every configured metric is a W&B scalar at each checkpoint.
SHOWN = ("table", "card")

_REGISTRY: dict[str, dict[str, Metric]] = {t: {} for t in ANSWER_TYPES}


def register_metric(
    name: str,
    *,
    answer_type: str,
    higher_is_better: bool = True,
    aggregation: str = "mean",
    corpus_fn: Callable[[np.ndarray], float] | None = None,
    source: str = "",
    title: str = "",
    shown: tuple[str, ...] = (),
    card_type: str | None = None,
) -> Callable:
    """Decorator registering an item-level metric function under ``name`` for ``answer_type``;
    ``source`` names the rule it follows (a harness's repository, commit and function, or medvlm);
    ``title``, ``shown`` (a subset of :data:`SHOWN`) and ``card_type`` say how it is shown."""
    if set(shown) - set(SHOWN) or ("card" in shown and not card_type):
        raise ValueError(f"metric {name!r}: shown={shown!r} must be a subset of {SHOWN}; 'card' needs a card_type")
    if answer_type not in ANSWER_TYPES:
        raise ValueError(f"answer_type must be one of {ANSWER_TYPES}, got {answer_type!r}")
    if aggregation not in ("mean", "corpus"):
        raise ValueError(f"aggregation must be 'mean' or 'corpus', got {aggregation!r}")
    if aggregation == "corpus" and corpus_fn is None:
        raise ValueError(f"metric {name!r}: aggregation='corpus' needs a corpus_fn")

    def wrap(fn: Callable) -> Callable:
        _REGISTRY[answer_type][name] = Metric(name, answer_type, fn, higher_is_better, aggregation, corpus_fn, source,
                                              title or name, frozenset(shown), card_type)
        return fn

    return wrap


def shown_metrics(answer_type: str, where: str) -> list[Metric]:
    """The metrics of ``answer_type`` shown in ``where`` (one of :data:`SHOWN`), in registration order."""
    if where not in SHOWN:
        raise ValueError(f"where={where!r}; expected one of {SHOWN}")
    return [m for m in _REGISTRY[answer_type].values() if where in m.shown]


def headline(answer_type: str) -> str:
    """The name of the first table metric of ``answer_type`` (closed: accuracy, open: ROUGE-L)."""
    return shown_metrics(answer_type, "table")[0].name


def list_metrics(answer_type: str) -> list[str]:
    """Names registered for ``answer_type``, in registration order."""
    return list(_REGISTRY[answer_type])


def get_metric(name: str, answer_type: str) -> Metric:
    """The metric ``name`` for ``answer_type``; unknown names raise :class:`UnknownMetricError`."""
    if answer_type not in ANSWER_TYPES:
        raise ValueError(f"answer_type must be one of {ANSWER_TYPES}, got {answer_type!r}")
    table = _REGISTRY[answer_type]
    if name in table:
        return table[name]
    close = difflib.get_close_matches(name, list(table), n=1, cutoff=0.0)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise UnknownMetricError(
        f"Unknown metric '{name}' for {answer_type} questions.{hint} Available: {', '.join(table)}"
    )


# --------------------------------------------------------------------------------------------
# Bootstrap. Written by hand (not scipy.stats.bootstrap) because the corpus metrics need the
# resampled *sums of statistics*, and all metrics must share one seeded index draw.
# --------------------------------------------------------------------------------------------


_CHUNK = 100  # resamples drawn per block, so memory stays ~ 100 x n whatever n_resamples is


def bootstrap_sums(arr: np.ndarray, n_resamples: int, seed: int) -> np.ndarray:
    """Column sums of ``n_resamples`` resamples (with replacement) of the rows of ``arr``.

    Draws come from ``numpy.random.default_rng(seed)`` in blocks of 100 resamples; each resample
    is turned into row counts (``bincount``) and multiplied into ``arr``, so ``(n, d)`` statistics
    cost ``O(n_resamples * n)`` memory-bounded work. Returns ``(n_resamples, *arr.shape[1:])``.
    """
    rng = np.random.default_rng(seed)
    n = arr.shape[0]
    out = []
    for start in range(0, n_resamples, _CHUNK):
        b = min(_CHUNK, n_resamples - start)
        idx = rng.integers(0, n, size=(b, n))
        flat = (idx + n * np.arange(b)[:, None]).ravel()
        weights = np.bincount(flat, minlength=b * n).reshape(b, n).astype(float)
        out.append(weights @ arr)
    return np.concatenate(out, axis=0)


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    *,
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    stat: Callable[[np.ndarray], float] | None = None,
) -> tuple[float | None, float | None, float | None]:
    """Percentile bootstrap interval of the mean (or of ``stat`` over summed rows).

    ``values`` is 1-D for a mean, or ``(n, d)`` statistics whose resampled column sums are given
    to ``stat``. Returns ``(low, high, std_of_resampled_statistic)``; all ``None`` when there are no
    items or ``n_resamples`` is 0.
    """
    arr = np.asarray(values, dtype=float)
    n = arr.shape[0] if arr.ndim else 0
    if n == 0 or n_resamples <= 0:
        return None, None, None
    sums = bootstrap_sums(arr, n_resamples, seed)
    resampled = sums / n if stat is None else np.array([stat(row) for row in sums])
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.percentile(resampled, [100 * alpha, 100 * (1 - alpha)])
    return float(lo), float(hi), float(resampled.std(ddof=1)) if n_resamples > 1 else 0.0


def summarize_values(
    name: str,
    items: Sequence[Any],
    *,
    corpus_fn: Callable[[np.ndarray], float] | None = None,
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """``{name: value, name_std, name_ci: [lo, hi]}`` from item values (or corpus statistics).

    Without ``corpus_fn`` the value is the mean of ``items`` and ``_std`` their sample standard
    deviation; with it, the value is ``corpus_fn(sum of rows)`` and ``_std`` the bootstrap standard
    error. No items gives ``None`` everywhere (never 0.0): an empty group has no score.
    """
    if len(items) == 0:
        return {name: None, f"{name}_std": None, f"{name}_ci": None}
    arr = np.asarray(items, dtype=float)
    if corpus_fn is not None:
        value = corpus_fn(arr.sum(axis=0))
        lo, hi, std = bootstrap_ci(arr, n_resamples=n_resamples, seed=seed, confidence=confidence, stat=corpus_fn)
    else:
        value = float(arr.mean())
        std = float(arr.std(ddof=1)) if len(arr) > 1 else 0.0
        lo, hi, _ = bootstrap_ci(arr, n_resamples=n_resamples, seed=seed, confidence=confidence)
    return {name: float(value), f"{name}_std": std, f"{name}_ci": None if lo is None else [lo, hi]}


def summarize(metric: Metric, items: Sequence[Any], **kwargs: Any) -> dict[str, Any]:
    """:func:`summarize_values` for a registered metric (corpus metrics use their ``corpus_fn``)."""
    corpus_fn = metric.corpus_fn if metric.aggregation == "corpus" else None
    return summarize_values(metric.name, items, corpus_fn=corpus_fn, **kwargs)


# --------------------------------------------------------------------------------------------
# Closed questions
# --------------------------------------------------------------------------------------------


def nearest_choice(text: str, choices: Sequence[str]) -> int | None:
    """Index of the option closest to ``text``: highest token F1, ties broken by ``difflib`` ratio.

    Token F1 (bag of normalised words) handles reordering ("kidney on the right" vs "Right
    kidney"); the character ratio handles typos ("spleeen"). Remaining ties go to the first
    option; an empty answer matches nothing (``None``).
    """
    norm = normalize_answer(text)
    if not norm or not choices:
        return None
    options = [normalize_answer(strip_option_label(c)) for c in choices]
    scores = [(token_f1(norm, o, {}), difflib.SequenceMatcher(None, norm, o).ratio()) for o in options]
    return max(range(len(options)), key=lambda i: (scores[i], -i))


def choice_index(text: str, choices: Sequence[str]) -> int | None:
    """Which option ``text`` picks: a letter first, then an exact option text, then the nearest."""
    idx = parse_choice_letter(text, len(choices))
    if idx is not None:
        return idx
    norm = normalize_answer(text)
    for i, c in enumerate(choices):
        if norm and norm == normalize_answer(strip_option_label(c)):
            return i
    return nearest_choice(text, choices)


def canonical_answer(text: str, reference: str, record: Mapping[str, Any]) -> str:
    """The form ``text`` is compared in when scoring against ``reference`` (see ``accuracy``).

    ``"choice:<i>"`` for multiple choice, ``"yes"``/``"no"`` for a yes/no reference, otherwise
    ``normalize_answer(text)``. Also used to decide whether sampled answers agree.
    """
    choices = record.get("choices") or []
    if choices:
        idx = choice_index(text, choices)
        return f"choice:{idx}" if idx is not None else normalize_answer(text)
    if normalize_answer(reference) in ("yes", "no"):
        return yes_no(text) or normalize_answer(text)
    return normalize_answer(text)


def canonical_reference(reference: str, record: Mapping[str, Any]) -> str:
    """The reference in the same form as :func:`canonical_answer`."""
    choices = record.get("choices") or []
    if choices:
        idx = choice_index(reference, choices)
        return f"choice:{idx}" if idx is not None else normalize_answer(reference)
    return normalize_answer(reference)


def is_correct(prediction: str, reference: str, record: Mapping[str, Any]) -> bool:
    """The ``accuracy`` rule for one item; an empty prediction is never correct."""
    if not normalize_answer(prediction):
        return False
    return canonical_answer(prediction, reference, record) == canonical_reference(reference, record)


MEDVLM = "medvlm (medvlm/eval/metrics.py)"
LMMS_EVAL_SLAKE = ("lmms-eval SLAKE task: EvolvingLMMs-Lab/lmms-eval@75571cfe0fa3, lmms_eval/tasks/slake/utils.py "
                   "normalize_answer, slake_process_results")
LLAVA_MED = "LLaVA-Med v1.0.0: microsoft/LLaVA-Med@b9a98a736d2e, llava/eval/"
ROUGE_SCORE = "rouge-score F-measure, Porter stemming; tokens widened to non-ASCII letters (medvlm)"
SACREBLEU = "sacrebleu, 13a tokens (zh for a reference holding Han characters)"
MULTIMEDEVAL = ("MultiMedEval: corentin-ryr/MultiMedEval@d9ac283f5ad9, multimedeval/task_families.py VQA.evaluate, "
                "utils.py clean_str")


@register_metric("accuracy", answer_type="closed", source=MEDVLM, title="Closed-question accuracy",
                 shown=("table", "card"), card_type="accuracy")
def accuracy(prediction: str, reference: str, record: Mapping[str, Any]) -> float:
    return float(is_correct(prediction, reference, record))


@register_metric("exact_match", answer_type="closed", source=LMMS_EVAL_SLAKE)
def exact_match(prediction: str, reference: str, record: Mapping[str, Any]) -> float:
    return conv.lmms_eval_slake_match(prediction, reference)


@register_metric("substring", answer_type="closed",
                 source=LLAVA_MED + "run_eval_batch.py evaluate, eval_metrics/glossary.py normalize_word")
def substring(prediction: str, reference: str, record: Mapping[str, Any]) -> float:
    return conv.llava_med_substring(prediction, reference)


@register_metric("llava_med_yesno", answer_type="closed",
                 source=LLAVA_MED + "run_eval.py evaluate, eval_metrics/glossary.py normalize_word")
def llava_med_yesno(prediction: str, reference: str, record: Mapping[str, Any]) -> float:
    return conv.llava_med_yesno(prediction, reference)


def token_recall_value(prediction: str, reference: str, per_character: bool = True) -> float:
    """Share of distinct reference tokens that appear in the prediction (0 for an empty reference);
    ``per_character``: see :func:`~medvlm.utils.text.tokens`."""
    ref = set(tokens(reference, per_character))
    if not ref:
        return 0.0
    return len(ref & set(tokens(prediction, per_character))) / len(ref)


@register_metric("token_recall", answer_type="closed", source=MULTIMEDEVAL)
def token_recall_closed(prediction: str, reference: str, record: Mapping[str, Any]) -> float:
    return conv.multimedeval_closed(prediction, reference)


@register_metric("medvlm_token_recall", answer_type="closed", source=MEDVLM)
def token_recall_hit(prediction: str, reference: str, record: Mapping[str, Any]) -> float:
    """medvlm's wider rule: share of reference words >= 0.4, for every closed answer. Whole words:
    one shared character must not make a wrong Chinese answer correct. With ``choices`` the answer is
    an option, scored as ``accuracy`` (a letter shares no word with the option's text)."""
    if record.get("choices"):
        return float(is_correct(prediction, reference, record))
    return float(token_recall_value(prediction, reference, per_character=False) >= TOKEN_RECALL_THRESHOLD)


# --------------------------------------------------------------------------------------------
# Open questions
# --------------------------------------------------------------------------------------------


def rouge_tokens(text: str, stemmer=None) -> list[str]:
    """rouge-score's default tokenization widened to every script.

    rouge-score lower-cases, turns everything but ``[a-z0-9]`` into spaces and Porter-stems words
    of more than 3 characters, so a Chinese or accented reference loses its words and scores 0.
    Here letters, digits and combining marks of any script are kept (Unicode categories L, N, M),
    Han and kana become one token per character, and only ASCII words are stemmed. On ASCII text
    the tokens are exactly rouge-score's, so English scores stay comparable with published ones.
    """
    text = "".join(ch if unicodedata.category(ch)[0] in "LNM" else " " for ch in text.lower())
    words = split_unspaced(text).split()
    if stemmer is None:
        return words
    return [stemmer.stem(w) if len(w) > 3 and w.isascii() else w for w in words]


def outside_rouge_score(text: str) -> bool:
    """True when ``text`` holds letters, digits or marks beyond ASCII: rouge-score's own tokenizer drops
    them (β, é, 肺) where :func:`rouge_tokens` keeps them, so ROUGE differs from the package's there."""
    return any(ord(ch) > 127 and unicodedata.category(ch)[0] in "LNM" for ch in text)


@lru_cache(maxsize=1)
def _rouge_scorer():
    from nltk.stem import porter  # the stemmer rouge-score's default tokenizer uses
    from rouge_score import rouge_scorer, tokenizers

    class _Tokenizer(tokenizers.Tokenizer):
        stemmer = porter.PorterStemmer()

        def tokenize(self, text):
            return rouge_tokens(text, self.stemmer)

    return rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=_Tokenizer())


@lru_cache(maxsize=65536)
def rouge_f(prediction: str, reference: str) -> tuple[float, float, float]:
    """(ROUGE-1, ROUGE-2, ROUGE-L) F-measure of ``prediction`` against ``reference``."""
    s = _rouge_scorer().score(reference, prediction)  # rouge-score takes (target, prediction)
    return s["rouge1"].fmeasure, s["rouge2"].fmeasure, s["rougeL"].fmeasure


@register_metric("rouge1", answer_type="open", source=ROUGE_SCORE)
def rouge1(prediction: str, reference: str, record: Mapping[str, Any]) -> float:
    return rouge_f(prediction, reference)[0]


@register_metric("rouge2", answer_type="open", source=ROUGE_SCORE)
def rouge2(prediction: str, reference: str, record: Mapping[str, Any]) -> float:
    return rouge_f(prediction, reference)[1]


@register_metric("rougeL", answer_type="open", source=ROUGE_SCORE, title="Open-question ROUGE-L",
                 shown=("table", "card"), card_type="rouge")
def rougeL(prediction: str, reference: str, record: Mapping[str, Any]) -> float:  # noqa: N802
    return rouge_f(prediction, reference)[2]


@lru_cache(maxsize=65536)
def bleu_stats(prediction: str, reference: str) -> tuple[float, tuple[float, ...]]:
    """Sentence BLEU (0-100) and the statistics a corpus BLEU sums: 4 matches, 4 totals, lengths.

    Tokens are sacrebleu's ``13a`` (its default, as published English scores use), or ``zh`` when
    the reference holds Han characters (sacrebleu's Chinese tokenizer: one token per Han character,
    the rest as ``13a``); under ``13a`` an unspaced Chinese answer is one token. Kana are not split
    by either: Japanese BLEU would need its own tokenizer (sacrebleu's ``ja-mecab``)."""
    import sacrebleu

    tokenize = "zh" if HAN.search(reference) else "13a"
    s = sacrebleu.sentence_bleu(prediction, [reference], tokenize=tokenize)
    return float(s.score), (*map(float, s.counts), *map(float, s.totals), float(s.sys_len), float(s.ref_len))


def corpus_bleu_from_stats(stats: np.ndarray) -> float:
    """Corpus BLEU (sacrebleu's corpus defaults: exp smoothing; tokens as in :func:`bleu_stats`)
    from summed statistics.

    Identical to ``sacrebleu.corpus_bleu(preds, [refs]).score`` on the same items when they share
    one tokenizer (tested); a corpus mixing Chinese and other references sums each item's own.
    """
    from sacrebleu.metrics import BLEU

    counts = [int(round(x)) for x in stats[:4]]
    totals = [int(round(x)) for x in stats[4:8]]
    return float(BLEU.compute_bleu(counts, totals, int(round(stats[8])), int(round(stats[9])),
                                   smooth_method="exp").score)


@register_metric("bleu", answer_type="open", aggregation="corpus", corpus_fn=corpus_bleu_from_stats,
                 source=SACREBLEU, title="Open-question BLEU", shown=("card",), card_type="bleu")
def bleu(prediction: str, reference: str, record: Mapping[str, Any]) -> tuple[float, ...]:
    return bleu_stats(prediction, reference)[1]


@register_metric("sentence_bleu", answer_type="open", source=SACREBLEU)
def sentence_bleu(prediction: str, reference: str, record: Mapping[str, Any]) -> float:
    return bleu_stats(prediction, reference)[0]


@register_metric("token_recall", answer_type="open", source=MEDVLM)
def token_recall(prediction: str, reference: str, record: Mapping[str, Any]) -> float:
    return token_recall_value(prediction, reference)


@register_metric("token_f1", answer_type="open", source=MEDVLM, title="Open-question token F1",
                 shown=("table", "card"), card_type="f1")
def token_f1(prediction: str, reference: str, record: Mapping[str, Any]) -> float:
    """SQuAD v1.1 F1 over bags of normalised tokens (1.0 when both are empty)."""
    pred, ref = tokens(prediction), tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


@register_metric("llava_med_recall", answer_type="open",
                 source=LLAVA_MED + "run_eval_batch.py evaluate, eval_metrics/evaluate_metrics.py calculate_f1score")
def llava_med_recall(prediction: str, reference: str, record: Mapping[str, Any]) -> float:
    return conv.llava_med_recall(prediction, reference)


@register_metric("multimedeval_recall", answer_type="open", source=MULTIMEDEVAL)
def multimedeval_recall(prediction: str, reference: str, record: Mapping[str, Any]) -> float:
    return conv.multimedeval_recall(prediction, reference)
