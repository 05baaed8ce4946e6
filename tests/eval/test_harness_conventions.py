"""Each convention named after a harness scores every row as that harness's own code does.

The tables were derived by reading each harness's rule (sources in medvlm/eval/conventions.py):
each case is (prediction, reference, expected score, the rule it exercises). The lettered-choice
case (a correct "A" written as "A", "a", "(A)" or "A.") is in every table.
"""

from __future__ import annotations

import pytest

from medvlm.eval import conventions as conv
from medvlm.eval import metrics as M

LETTERED = ("A", "a", "(A)", "A.")  # a correct answer to a lettered question, as models write it
CHOICES = ["Liver", "Spleen", "Left kidney", "Right kidney"]

# --------------------------------------------------------------------------- lmms-eval SLAKE: exact_match
EXACT_MATCH = [
    ("Yes", "yes", 1, "lower-case"),
    (" Yes. ", "yes", 1, "strip; ASCII punctuation to spaces"),
    ("yeah", "yes", 1, "English yes map: yeah"),
    ("True", "yes", 1, "English yes map: true"),
    ("nope", "no", 1, "English no map: nope"),
    ("correct", "yes", 0, "no medvlm synonyms: correct is not yes"),
    ("present", "yes", 0, "no medvlm synonyms: present"),
    ("absent", "no", 0, "no medvlm synonyms: absent"),
    ("y", "yes", 0, "no medvlm synonyms: y"),
    ("Yes, there is a nodule", "yes", 0, "whole answer only, no first-word reading"),
    ("是的", "yes", 1, "Chinese yes: 是的"),
    ("有", "是", 1, "Chinese yes: 有 and 是"),
    ("不是", "no", 1, "Chinese no: 不是"),
    ("没有", "否", 1, "Chinese no: 没有 and 否"),
    ("无", "no", 1, "Chinese no: 无"),
    ("正常", "yes", 1, "正常 (normal) is in the yes map"),
    ("异常", "no", 1, "异常 (abnormal) is in the no map"),
    ("是的。", "yes", 1, "Chinese full stop to space"),
    ("The left lung", "left lung", 0, "no article removal"),
    ("left lung (LUL)", "left lung", 1, "ASCII bracketed text deleted"),
    ("胸腔（肺部）", "胸腔", 1, "full-width bracketed text deleted"),
    ("（a (b） c)", "a", 1, "ASCII brackets first, then full-width ones in what is left"),
    ("lung【left】", "lung left", 1, "【】 are punctuation, their text is kept"),
    ("X-Ray", "xray", 1, "alias: x ray / xray"),
    ("x ray", "XRAY", 1, "alias: x ray / xray"),
    ("left-lung", "left lung", 1, "hyphen to space"),
    ("Ｙｅｓ", "yes", 0, "no Unicode folding: full-width letters stay"),
    ("“yes”", "yes", 0, "curly quotes are not in its punctuation list"),
    ("café", "cafe", 0, "no accent folding"),
    ("(see image)", "(left)", 1, "both normalise to '': equal, no empty-answer check"),
    ("", "yes", 0, "empty answer"),
    ("Answer: A", "A", 0, "no letter reading"),
    ("A", "A", 1, "lettered: A"),
    ("a", "A", 1, "lettered: a"),
    ("(A)", "A", 0, "lettered: (A) is bracketed text, deleted"),
    ("A.", "A", 1, "lettered: A."),
    ("B", "A", 0, "lettered: wrong letter"),
]

# --------------------------------------------------------------------------- LLaVA-Med run_eval_batch: substring
VQA_NORMALISER = [  # rules of normalize_word / clean_str, read through the substring test
    ("two", "2", 1, "number words to digits"),
    ("There are two nodules", "2", 1, "number words to digits inside an answer"),
    ("none", "0", 1, "none to 0"),
    ("0", "none", 1, "none to 0 (reference)"),
    ("1,000 cells", "1000", 1, "thousands comma dropped"),
    ("1,000 left-lung", "left lung", 0, "a digit-comma-digit deletes every mark: leftlung"),
    ("left-lung", "left lung", 1, "a mark between letters becomes a space"),
    ("left - lung", "left lung", 1, "a mark next to a space is deleted"),
    ("left-lung", "leftlung", 0, "a mark between letters becomes a space"),
    ("The left lung", "left lung", 1, "articles dropped"),
    ("lung.", "lung", 1, "period dropped"),
    ("2.5 cm", "2.5", 1, "decimal point kept"),
    ("2 5", "2.5", 0, "decimal point kept: 2.5 is one word"),
    ("dont", "don't", 1, "contraction restored"),
    ("couldn'tve", "couldn't've", 1, "contraction restored: one apostrophe missing"),
    ("couldntve", "couldn't've", 0, "contraction: only one apostrophe may be missing"),
    ("im", "i'm", 0, "contraction: its I-forms are keyed upper-case, never reached"),
    ("somebodyd", "somebody'd", 1, "contraction table maps somebody'd to somebodyd"),
]
SUBSTRING = VQA_NORMALISER + [
    ("yes", "yes", 1, "substring: equal"),
    ("Yes, there is a nodule.", "yes", 1, "substring of a longer answer"),
    ("nodule", "no", 1, "character substring: no inside nodule"),
    ("I don't know", "no", 1, "character substring: no inside know"),
    ("yeah", "yes", 0, "no synonym mapping"),
    ("correct", "yes", 0, "no synonym mapping"),
    ("right lung", "left lung", 0, "substring: left lung absent"),
    ("yes: present", "yes", 1, "':' is kept, yes still a substring"),
    ("左肺", "左肺", 1, "Chinese kept as is"),
    ("", "yes", 0, "empty answer"),
    ("no", "No, it is not", 0, "the reference must be inside the answer"),
    ("A", "A", 1, "lettered: the reference 'a' is an article, '' is inside every answer"),
    ("a", "A", 1, "lettered: '' is inside every answer"),
    ("(A)", "A", 1, "lettered: '' is inside every answer"),
    ("A.", "A", 1, "lettered: '' is inside every answer"),
    ("B", "A", 1, "lettered: even a wrong letter scores"),
]

# --------------------------------------------------------------------------- LLaVA-Med run_eval: llava_med_yesno
LLAVA_MED_YESNO = [
    ("yes", "yes", 1, "yes in the answer, reference inside"),
    ("no", "yes", 0, "no in the answer, reference absent"),
    ("left lung", "left lung", 0, "no yes/no in the answer: 0 even when right"),
    ("yes, left lung", "left lung", 1, "yes opens the gate, then substring"),
    ("nodule in the left lung", "left lung", 1, "the 'no' of 'nodule' opens the gate"),
    ("I don't know", "no", 1, "the 'no' of 'know' opens the gate and is the reference"),
    ("two", "2", 0, "no yes/no in the answer"),
    ("none", "0", 0, "the gate reads the normalised answer: none became 0"),
    ("yeah", "yes", 0, "no synonym mapping"),
    ("A", "A", 0, "lettered: no yes/no in the answer"),
    ("a", "A", 0, "lettered: no yes/no in the answer"),
    ("(A)", "A", 0, "lettered: no yes/no in the answer"),
    ("A.", "A", 0, "lettered: no yes/no in the answer"),
    ("not A", "A", 1, "lettered: 'not' opens the gate and '' is inside every answer"),
]

# --------------------------------------------------------------------------- MultiMedEval: closed token_recall
MULTIMEDEVAL_CLOSED = [
    ("yes", "yes", 1, "yes/no reference: {yes} found"),
    ("Yes, there is a mass.", "yes", 1, "the word yes among the answer words"),
    ("yeah", "yes", 0, "no synonym mapping"),
    ("no", "no", 1, "{no, not}: no found, 1/2 >= 0.4"),
    ("not enlarged", "no", 1, "'not' counts for a no reference"),
    ("There is no mass", "no", 1, "no anywhere in the answer"),
    ("nodule", "no", 0, "whole words: nodule is not no"),
    ("yes", "no", 0, "yes for no"),
    ("no, yes", "yes", 1, "a hedging answer holds both words"),
    ("none", "no", 0, "none became 0"),
    ("yes:", "yes", 0, "':' is kept: the word is 'yes:'"),
    ("Yes.", " yes ", 1, "period dropped, reference stripped"),
    ("left lung", "left lung", 1, "other reference: open rule, recall 1 >= 0.75"),
    ("right lung", "left lung", 0, "open rule: recall 1/2 < 0.75"),
    ("the right upper lobe", "left upper lobe", 0, "open rule: recall 2/3 < 0.75"),
    ("upper lobe of the left lung", "left upper lobe", 1, "open rule: recall 1"),
    ("5.2", "2.5", 0, "open rule: decimals are one word"),
    ("2.5 cm", "2.5", 1, "open rule: decimal point kept"),
    ("two", "2", 1, "open rule: number words to digits"),
    ("x-ray", "xray", 0, "open rule: no x-ray alias"),
    ("left lung", " -left-lung", 1, "the reference is stripped first: its marks become spaces"),
    ("A", "A", 0, "lettered: the reference is an article, no words, recall 0"),
    ("a", "A", 0, "lettered: recall 0"),
    ("(A)", "A", 0, "lettered: recall 0"),
    ("A.", "A", 0, "lettered: recall 0"),
]

# --------------------------------------------------------------------------- open recalls
MANY_PERIODS = "." * 33 + " lung."  # 34 periods to delete; one pass deletes 32
LLAVA_MED_RECALL = [
    ("left lung", "left lung", 1.0, "all reference words"),
    ("lung", "left lung", 0.5, "one of two"),
    ("lung lung", "left lung", 2 / 3, "repeated predicted words count: 2 hits, 1 miss"),
    ("lung lung", "lung", 1.0, "repeats never lower recall"),
    ("left lung left", "left lung", 1.0, "3 hits, no miss"),
    ("two nodules", "2 nodules", 1.0, "number words to digits"),
    ("2.5 cm", "2.5 cm", 1.0, "decimal point kept"),
    ("2 5 cm", "2.5 cm", 0.5, "2.5 is one word: missed"),
    ("the left lung", "left lung", 1.0, "articles dropped"),
    ("1,000 cells", "1000 cells", 1.0, "thousands comma dropped"),
    ("left-lung.", "left lung", 1.0, "hyphen to space, period dropped"),
    ("heart", "left lung", 0.0, "no hit"),
    ("", "lung", 0.0, "empty answer"),
    ("lung", "the", 0.0, "a reference with no word left scores 0"),
    (MANY_PERIODS, "lung", 1.0, "normalised twice: the second pass deletes the periods the first left"),
    ("A", "A", 0.0, "lettered: the reference is an article, no words"),
    ("a", "A", 0.0, "lettered: no reference words"),
    ("(A)", "A", 0.0, "lettered: no reference words"),
    ("A.", "A", 0.0, "lettered: no reference words"),
]
MULTIMEDEVAL_RECALL = [
    ("left lung", "left lung", 1.0, "all reference words"),
    ("lung", "left lung", 0.5, "one of two"),
    ("lung lung", "left lung", 0.5, "sets: repeats count once"),
    ("two nodules", "2 nodules", 1.0, "number words to digits"),
    ("2 5 cm", "2.5 cm", 0.5, "2.5 is one word: missed"),
    ("the left lung", "left lung", 1.0, "articles dropped"),
    ("yes:", "yes", 0.0, "':' is kept"),
    ("left lung", " -left-lung", 1.0, "the reference is stripped first"),
    ("", "lung", 0.0, "empty answer"),
    (MANY_PERIODS, "lung", 0.0, "one pass deletes 32 periods: 'lung.' keeps its period"),
    ("A", "A", 0.0, "lettered: no reference words"),
    ("a", "A", 0.0, "lettered: no reference words"),
    ("(A)", "A", 0.0, "lettered: no reference words"),
    ("A.", "A", 0.0, "lettered: no reference words"),
]

TABLES = {
    ("exact_match", "closed"): EXACT_MATCH,
    ("substring", "closed"): SUBSTRING,
    ("llava_med_yesno", "closed"): LLAVA_MED_YESNO,
    ("token_recall", "closed"): MULTIMEDEVAL_CLOSED,
    ("llava_med_recall", "open"): LLAVA_MED_RECALL,
    ("multimedeval_recall", "open"): MULTIMEDEVAL_RECALL,
}
CASES = [pytest.param(name, atype, *case, id=f"{name}-{i}") for (name, atype), table in TABLES.items()
         for i, case in enumerate(table)]


@pytest.mark.parametrize("name, answer_type, prediction, reference, expected, rule", CASES)
def test_harness_convention_table(name, answer_type, prediction, reference, expected, rule):
    assert M.get_metric(name, answer_type).fn(prediction, reference, {}) == pytest.approx(expected), rule


@pytest.mark.parametrize("name, answer_type", list(TABLES))
def test_harness_conventions_ignore_the_options_list(name, answer_type):
    # the harnesses read no choices: the lettered rows score the same with the options given
    fn = M.get_metric(name, answer_type).fn
    for prediction, reference, expected, _ in TABLES[(name, answer_type)]:
        if reference == "A":
            assert fn(prediction, reference, {"choices": CHOICES}) == pytest.approx(expected), prediction


def test_every_table_has_the_lettered_choice_case():
    for key, table in TABLES.items():
        assert {p for p, r, _, _ in table if r == "A"} >= set(LETTERED), key


def test_every_registered_metric_names_the_rule_it_follows():
    for answer_type in M.ANSWER_TYPES:
        for name in M.list_metrics(answer_type):
            assert M.get_metric(name, answer_type).source, (name, answer_type)
    assert "lmms-eval" in M.get_metric("exact_match", "closed").source
    assert "run_eval_batch.py" in M.get_metric("substring", "closed").source
    assert "run_eval.py" in M.get_metric("llava_med_yesno", "closed").source
    assert "MultiMedEval" in M.get_metric("token_recall", "closed").source


# --------------------------------------------------------------------------- medvlm's own rules

ACCURACY_LETTERED = [  # (prediction, reference, record, expected, rule)
    *[(p, "Liver", {"choices": CHOICES}, 1, f"choices, reference as option text: {p}") for p in LETTERED],
    *[(p, "A", {"choices": CHOICES}, 1, f"choices, reference as letter: {p}") for p in LETTERED],
    *[(p, "A", {}, 1, f"no choices, reference a lone letter: {p}") for p in LETTERED],
    ("Answer: A", "Liver", {"choices": CHOICES}, 1, "letter after a cue"),
    ("B", "Liver", {"choices": CHOICES}, 0, "wrong letter"),
    ("B", "A", {}, 0, "no choices: wrong letter"),
    ("a lesion", "A", {}, 0, "an article starting a sentence is not a letter"),
    ("The", "A", {}, 0, "an article alone is not the letter A"),
]


@pytest.mark.parametrize("prediction, reference, record, expected, rule", ACCURACY_LETTERED)
def test_accuracy_reads_a_correct_letter_a(prediction, reference, record, expected, rule):
    assert M.accuracy(prediction, reference, record) == expected, rule


MEDVLM_TOKEN_RECALL = [
    ("lung", "left lung", {}, 1, "1/2 >= 0.4"),
    ("right lung", "left lung", {}, 1, "1/2 >= 0.4: the wider rule counts a wrong side"),
    ("5.2", "2.5", {}, 1, "medvlm splits decimals into 2 and 5"),
    ("heart", "left upper lobe", {}, 0, "no shared word"),
    ("右肺", "左肺", {}, 0, "whole words: one shared character is no hit"),
    ("nodule", "no", {}, 0, "whole words"),
    *[(p, "Liver", {"choices": CHOICES}, 1, f"lettered with choices, as accuracy: {p}") for p in LETTERED],
    ("B", "Liver", {"choices": CHOICES}, 0, "lettered with choices: wrong letter"),
    *[(p, "A", {}, 1, f"lettered, reference a lone letter: {p}") for p in LETTERED],
]


@pytest.mark.parametrize("prediction, reference, record, expected, rule", MEDVLM_TOKEN_RECALL)
def test_medvlm_token_recall_keeps_the_wider_rule_under_its_own_name(prediction, reference, record, expected, rule):
    assert M.get_metric("medvlm_token_recall", "closed").fn(prediction, reference, record) == expected, rule


@pytest.mark.parametrize("prediction", LETTERED)
def test_medvlm_open_token_metrics_keep_a_lone_letter(prediction):
    assert M.token_recall(prediction, "A", {}) == 1.0
    assert M.token_f1(prediction, "A", {}) == 1.0
    assert M.token_recall("B", "A", {}) == 0.0


def test_vqa_normaliser_contractions_cover_every_one_apostrophe_spelling():
    # derived table: each listed form is reached from every spelling that lacks one of its apostrophes
    assert conv.vqa_normalize("y'alld've") == conv.vqa_normalize("yall'd've") == "y'all'd've"
    assert conv.vqa_normalize("yalldve") == "yalldve"
    assert conv.vqa_normalize("its") == "its" and conv.vqa_normalize("well") == "well"
