"""Normalisation, closed/open metrics, the registry, bootstrap intervals, consistency and robustness."""

from __future__ import annotations

import math

import numpy as np
import pytest
import sacrebleu

from medvlm.eval import metrics as M
from medvlm.eval.consistency import consistency_scores, question_consistency
from medvlm.eval.robustness import robustness_scores
from medvlm.utils.text import normalize_answer, normalize_text, parse_choice_letter, yes_no

# --------------------------------------------------------------------------- normalisation


@pytest.mark.parametrize(
    "text, expected",
    [
        ("yes", "yes"), ("Y", "yes"), ("TRUE", "yes"), ("Correct.", "yes"), ("present", "yes"),
        ("no", "no"), ("n", "no"), ("False!", "no"), ("absent", "no"), ("None", "no"), ("Not present", "no"),
        ("The left lung", "left lung"), ("  multiple   spaces ", "multiple spaces"),
        ("A", "a"), ("(a)", "a"), ("A.", "a"), ("The", ""), ("a lesion", "lesion"),  # a lone letter is kept
    ],
)
def test_normalize_answer_maps_yes_no_synonyms_and_strips_articles(text, expected):
    assert normalize_answer(text) == expected


@pytest.mark.parametrize("text", ["肺部有结节吗？", "Ｆｕｌｌ－ｗｉｄｔｈ", "naïve café — “quoted”", "🙂", "\x00\u200b", None, 3.5])
def test_normalize_text_never_raises_on_unicode_or_non_strings(text):
    out = normalize_text(text)
    assert isinstance(out, str)
    assert "?" not in out and "？" not in out and "—" not in out


def test_normalize_text_folds_full_width_and_keeps_non_latin_words():
    assert normalize_text("Ｆｕｌｌ－ｗｉｄｔｈ") == "full width"
    assert normalize_text("肺部，结节") == "肺部 结节"


@pytest.mark.parametrize(
    "text, expected",
    [("Yes, there is a nodule", "yes"), ("no. the heart is normal", "no"), ("There is no mass", None), ("", None)],
)
def test_yes_no_reads_whole_answer_or_first_word(text, expected):
    assert yes_no(text) == expected


# --------------------------------------------------------------------------- multiple choice


@pytest.mark.parametrize(
    "text, expected",
    [
        ("B", 1), ("(b)", 1), ("B.", 1), ("Answer: B", 1), ("the answer is (C)", 2), ("B. Left lung", 1),
        ("d", 3), ("A lesion is seen", None), ("The answer is a lesion", None), ("Answer: Z", None), ("", None),
    ],
)
def test_parse_choice_letter(text, expected):
    assert parse_choice_letter(text, n_choices=4) == expected


CHOICES = ["A: Liver", "B: Spleen", "C: Left kidney", "D: Right kidney"]


@pytest.mark.parametrize(
    "prediction, reference, correct",
    [
        ("B", "B", True),
        ("(b)", "Spleen", True),  # reference given as text, prediction as letter
        ("Answer: B.", "B: Spleen", True),
        ("spleen", "B", True),  # exact option text
        ("the spleen", "B", True),
        ("A", "Liver", True),  # a correct "A" (it normalised to "" as an article and scored wrong)
        ("(A)", "A: Liver", True),
        ("a", "A", True),
        ("A.", "Liver", True),
        ("left kidny", "C", True),  # nearest option by string similarity
        ("right kidney", "C", False),
        ("", "B", False),
    ],
)
def test_multiple_choice_accuracy_by_letter_or_nearest_option(prediction, reference, correct):
    assert M.accuracy(prediction, reference, {"choices": CHOICES}) == float(correct)


def test_nearest_choice_picks_most_similar_option():
    assert M.nearest_choice("kidney on the right", CHOICES) == 3
    assert M.nearest_choice("", CHOICES) is None


# --------------------------------------------------------------------------- published conventions


CLOSED_NAMES = ("accuracy", "exact_match", "substring", "llava_med_yesno", "token_recall", "medvlm_token_recall")


@pytest.mark.parametrize(
    "prediction, reference, expected",
    [
        # (accuracy, exact_match [lmms-eval], substring [LLaVA-Med batch], llava_med_yesno [LLaVA-Med run_eval],
        #  token_recall [MultiMedEval], medvlm_token_recall [medvlm's wider 0.4 rule])
        ("Yes, there is a nodule", "yes", (1, 0, 1, 1, 1, 1)),
        ("yes", "yes", (1, 1, 1, 1, 1, 1)),
        ("correct", "yes", (1, 0, 0, 0, 0, 0)),  # only medvlm's accuracy maps synonyms
        ("lung", "left lung", (0, 0, 0, 0, 0, 1)),  # recall 1/2: >= 0.4 (medvlm), < 0.75 (MultiMedEval)
        ("nodule", "no", (0, 0, 1, 1, 0, 0)),  # LLaVA-Med character substring: "no" inside "nodule"
        ("the right upper lobe", "left upper lobe", (0, 0, 0, 0, 0, 1)),  # 2/3 tokens
        ("5.2", "2.5", (0, 0, 0, 0, 0, 1)),  # medvlm splits decimals into 5 and 2; the harnesses do not
        ("heart", "left upper lobe", (0, 0, 0, 0, 0, 0)),
        ("A", "A", (1, 1, 1, 0, 0, 1)),  # lettered choice; every table in test_harness_conventions.py has it
        ("(A)", "A", (1, 0, 1, 0, 0, 1)),  # lmms-eval deletes bracketed text
    ],
)
def test_published_conventions_differ_on_crafted_examples(prediction, reference, expected):
    got = tuple(int(M.get_metric(n, "closed").fn(prediction, reference, {})) for n in CLOSED_NAMES)
    assert got == expected


# --------------------------------------------------------------------------- open questions


def test_identical_strings_score_perfectly_on_every_open_metric():
    s = "small nodule in the right upper lobe"
    assert M.rouge_f(s, s) == pytest.approx((1.0, 1.0, 1.0))
    assert M.sentence_bleu(s, s, {}) == pytest.approx(100.0)
    assert M.token_recall(s, s, {}) == 1.0
    assert M.token_f1(s, s, {}) == 1.0


def test_rouge_uses_stemmer_and_hand_checked_values():
    # stemming makes "lungs"/"lung" match: 2 shared unigrams of 3 predicted and 3 reference tokens
    r1, r2, rl = M.rouge_f("lungs are clear", "lung is clear")
    assert r1 == pytest.approx(2 / 3)
    assert r2 == 0.0
    assert rl == pytest.approx(2 / 3)


def test_rouge_tokens_are_rouge_scores_own_on_ascii_text():
    # English scores must stay comparable with papers that use rouge-score's default tokenizer
    from nltk.stem import porter
    from rouge_score import rouge_scorer, tokenizers

    rng = np.random.default_rng(0)
    alphabet = list("abcdefghijklmnopqrstuvwxyzABCXYZ0123456789 .,;:-_/()'\"!?\t\n")
    texts = ["".join(rng.choice(alphabet, size=int(rng.integers(0, 60)))) for _ in range(300)]
    texts += ["Lungs are clear; no effusion.", "T2-weighted MRI (axial), left-sided lesions!"]
    default = tokenizers.DefaultTokenizer(use_stemmer=True)
    stemmer = porter.PorterStemmer()
    assert all(M.rouge_tokens(t, stemmer) == default.tokenize(t) for t in texts)
    reference = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    for pred, ref in zip(texts[:150], texts[150:300], strict=True):
        want = reference.score(ref, pred)
        assert M.rouge_f(pred, ref) == pytest.approx(tuple(want[k].fmeasure for k in ("rouge1", "rouge2", "rougeL")))


def test_chinese_and_accented_answers_are_scored_instead_of_zero():
    # Han characters are one token each: reference 左肺 (left lung), prediction 右肺 (right lung)
    assert M.rouge_f("左肺", "左肺") == pytest.approx((1.0, 1.0, 1.0))
    r1, r2, rl = M.rouge_f("右肺", "左肺")
    assert (r1, r2, rl) == pytest.approx((0.5, 0.0, 0.5))
    assert M.rouge_f("Lungenödem", "lungenödem")[0] == 1.0  # rouge-score alone keeps "lungen", "dem"
    assert M.rouge_f("Ödem", "Erguss") == (0.0, 0.0, 0.0)
    # token F1 / recall: 肺 (lung) against 肺部 (lung region): 1 shared character of 1 and 2
    assert M.token_f1("肺", "肺部", {}) == pytest.approx(2 * 1 * 0.5 / 1.5)
    assert M.token_recall("肺", "肺部", {}) == 0.5
    # closed token recall (a yes/no decision) compares whole words: a shared character is not a hit
    for wrong, ref in (("肝脏", "心脏"), ("右肺", "左肺"), ("没有", "有")):
        assert M.token_recall_hit(wrong, ref, {}) == 0.0
    assert M.token_recall_hit("左肺", "左肺", {}) == 1.0
    # BLEU uses sacrebleu's Chinese tokenizer when the reference is Chinese: a perfect answer is 100
    assert M.sentence_bleu("左肺上叶有结节", "左肺上叶有结节", {}) == pytest.approx(100.0)
    assert 0 < M.sentence_bleu("左肺下叶有结节", "左肺上叶有结节", {}) < 100


def test_token_f1_and_recall_hand_checked():
    # pred tokens: left lung nodule (3); ref: nodule in left upper lobe (5); common: left, nodule
    assert M.token_f1("the left lung nodule", "nodule in the left upper lobe", {}) == pytest.approx(
        2 * (2 / 3) * (2 / 5) / (2 / 3 + 2 / 5)
    )
    assert M.token_recall("the left lung nodule", "nodule in the left upper lobe", {}) == pytest.approx(2 / 5)
    assert M.token_f1("", "", {}) == 1.0 and M.token_f1("x", "", {}) == 0.0


def test_corpus_bleu_from_item_statistics_equals_sacrebleu_corpus_bleu():
    preds = ["the cat sat on the mat", "a dog", "nodule in the right upper lobe", "", "no effusion seen"]
    refs = ["the cat is on the mat", "the dog barked", "right upper lobe nodule", "something", "no effusion"]
    metric = M.get_metric("bleu", "open")
    stats = [metric.fn(p, r, {}) for p, r in zip(preds, refs, strict=True)]
    out = M.summarize(metric, stats, n_resamples=50)
    assert out["bleu"] == pytest.approx(sacrebleu.corpus_bleu(preds, [refs]).score)
    assert M.summarize(metric, [metric.fn("a b c d e", "a b c d e", {})])["bleu"] == pytest.approx(100.0)


# --------------------------------------------------------------------------- registry, bootstrap


def test_unknown_metric_suggests_closest_name_and_lists_available():
    with pytest.raises(M.UnknownMetricError) as e:
        M.get_metric("rouge_l", "open")
    msg = str(e.value)
    assert "Unknown metric 'rouge_l'" in msg and "Did you mean 'rougeL'?" in msg and "Available:" in msg


def test_register_metric_records_direction_and_aggregation():
    @M.register_metric("_test_length", answer_type="open", higher_is_better=False)
    def _length(prediction, reference, record):
        return float(len(prediction))

    try:
        m = M.get_metric("_test_length", "open")
        assert m.higher_is_better is False and m.aggregation == "mean"
        assert m.fn("abc", "", {}) == 3.0
    finally:
        M._REGISTRY["open"].pop("_test_length")


def test_bootstrap_ci_contains_mean_and_is_seeded():
    values = np.random.default_rng(3).random(200) > 0.3
    a = M.summarize_values("acc", values, n_resamples=500, seed=7)
    b = M.summarize_values("acc", values, n_resamples=500, seed=7)
    c = M.summarize_values("acc", values, n_resamples=500, seed=8)
    lo, hi = a["acc_ci"]
    assert lo <= a["acc"] <= hi and lo < hi
    assert a == b
    assert a["acc_ci"] != c["acc_ci"]


def test_empty_group_reports_none_not_zero():
    out = M.summarize_values("accuracy", [], n_resamples=100)
    assert out == {"accuracy": None, "accuracy_std": None, "accuracy_ci": None}
    assert consistency_scores([], n_resamples=10)["n"] == 0
    assert consistency_scores([])["consistency_rate"] is None


# --------------------------------------------------------------------------- consistency


def _q(samples, answer="yes", rid="q"):
    return {"id": rid, "answer": answer, "samples": samples}


@pytest.mark.parametrize(
    "samples, consistent, score",
    [
        (["yes"] * 5, True, 1.0),
        (["Yes", "yes.", "y", "True", "no"], True, 1.0),  # synonyms agree; 1 disagreeing
        (["yes", "yes", "yes", "no", "No"], True, 1.0),  # exactly 2 disagreeing: keeps its point
        (["no", "no", "no", "yes", "yes"], True, 0.0),  # consistent but the mode is wrong
        (["yes", "yes", "no", "no", "maybe"], False, 0.0),  # 3 disagreeing: loses its point
        (["yes", "no", "maybe", "unsure", "perhaps"], False, 0.0),
    ],
)
def test_consistency_rule_on_five_samples(samples, consistent, score):
    q = question_consistency(_q(samples))
    assert q["consistent"] is consistent and q["score"] == score


def test_consistency_aggregates_rates():
    recs = [_q(["yes"] * 5, rid="a"), _q(["yes", "yes", "no", "no", "x"], rid="b"), _q(["no"] * 5, rid="c")]
    out = consistency_scores(recs, n_resamples=50)
    assert out["n"] == 3 and out["consistency_rate"] == pytest.approx(2 / 3)
    assert out["consistent_accuracy"] == pytest.approx(1 / 3)
    assert out["mean_agreement"] == pytest.approx((1 + 0.4 + 1) / 3)


def test_consistency_also_scores_the_greedy_answer_when_present():
    recs = [{**_q(["yes"] * 5, rid="a"), "prediction": "no"},  # consistent, but the greedy answer is wrong
            {**_q(["yes", "yes", "no", "no", "x"], rid="b"), "prediction": "yes"},  # right, but inconsistent
            {**_q(["yes"] * 4 + ["no"], rid="c"), "prediction": "Yes."}]
    out = consistency_scores(recs, n_resamples=20)
    assert out["n_greedy"] == 3 and out["consistent_greedy_accuracy"] == pytest.approx(1 / 3)
    assert out["consistent_accuracy"] == pytest.approx(2 / 3)
    assert "consistent_greedy_accuracy" not in consistency_scores([_q(["yes"] * 5)], n_resamples=0)


@pytest.mark.parametrize("samples", [["yes"] * 4, ["yes"] * 6, None, "yes"])
def test_consistency_requires_exactly_k_samples_and_names_the_id(samples):
    with pytest.raises(ValueError, match="'q17'.*k=5"):
        question_consistency({"id": "q17", "answer": "yes", "samples": samples})


def test_consistency_k_and_threshold_are_parameters():
    q = _q(["yes", "no", "yes"])
    assert question_consistency(q, k=3, threshold=1)["consistent"] is False
    assert question_consistency(q, k=3, threshold=2)["consistent"] is True


# --------------------------------------------------------------------------- robustness


def test_robustness_flip_rate_against_base_and_full_consistency():
    recs = [
        # group g1: base correct; variant 1 correct, variant 2 wrong -> one flip of two
        {"id": "1", "group": "g1", "variant": "1", "answer": "yes", "prediction": "yes", "latency_s": 1.0},
        {"id": "2", "group": "g1", "variant": "0", "answer": "yes", "prediction": "Yes.", "latency_s": 2.0},
        {"id": "3", "group": "g1", "variant": "2", "answer": "yes", "prediction": "no", "latency_s": 3.0},
        # group g2: no base variant -> first record is base; both wrong alike -> no flip, all same answer
        {"id": "4", "group": "g2", "variant": "a", "answer": "no", "prediction": "yes"},
        {"id": "5", "group": "g2", "variant": "b", "answer": "no", "prediction": "Yes"},
    ]
    out = robustness_scores(recs, n_resamples=100)
    assert out["n_flip_pairs"] == 3
    assert out["flip_rate"] == pytest.approx(1 / 3)
    assert out["n_groups_multi"] == 2 and out["full_consistency_rate"] == pytest.approx(0.5)
    assert out["per_variant"]["2"] == {"n": 1, "accuracy": 0.0}
    assert out["latency"]["n"] == 3 and out["latency"]["mean"] == pytest.approx(2.0)
    assert out["latency"]["p50"] == pytest.approx(2.0)


def test_robustness_single_member_groups_have_no_rates():
    out = robustness_scores([{"id": "1", "group": "g", "variant": "0", "answer": "x", "prediction": "x"}])
    assert out["n_flip_pairs"] == 0 and out["flip_rate"] is None
    assert out["full_consistency_rate"] is None and "latency" not in out
    assert not math.isnan(out["per_variant"]["0"]["accuracy"])
