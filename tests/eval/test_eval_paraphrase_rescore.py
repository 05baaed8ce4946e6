"""Predictions mode also scores the paraphrase predictions model mode writes (--robustness), so
rescoring a run keeps its robustness section (flip rate); explicit file, automatic default, 'none'."""

from __future__ import annotations

import json
import logging

import pytest
from scripts import load_script

PARA_NAME = "predictions_paraphrase.jsonl"
MAIN = [
    {"id": "a", "question": "Is there a lesion?", "answer": "yes", "prediction": "yes", "answer_type": "closed"},
    {"id": "b", "question": "Is the heart enlarged?", "answer": "no", "prediction": "no", "answer_type": "closed"},
    {"id": "c", "question": "Where is the nodule?", "answer": "left lung", "prediction": "left lung",
     "answer_type": "open"},
]
# group a: the base right, one rewording wrong (1 flip of 2); group b: all right (0 of 2); c not paraphrased
PARA = [
    {"id": "a", "question": "Is there a lesion?", "answer": "yes", "prediction": "yes", "answer_type": "closed",
     "group": "a", "variant": "base"},
    {"id": "a~p1", "question": "Is a lesion present?", "answer": "yes", "prediction": "no", "answer_type": "closed",
     "group": "a", "variant": "p1"},
    {"id": "a~p2", "question": "Can you see a lesion?", "answer": "yes", "prediction": "yes",
     "answer_type": "closed", "group": "a", "variant": "p2"},
    {"id": "b", "question": "Is the heart enlarged?", "answer": "no", "prediction": "no", "answer_type": "closed",
     "group": "b", "variant": "base"},
    {"id": "b~p1", "question": "Is there cardiomegaly?", "answer": "no", "prediction": "no",
     "answer_type": "closed", "group": "b", "variant": "p1"},
    {"id": "b~p2", "question": "Is the heart large?", "answer": "no", "prediction": "no", "answer_type": "closed",
     "group": "b", "variant": "p2"},
]


@pytest.fixture(scope="module")
def run_eval():
    return load_script("eval/run_eval.py")


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def run_folder(tmp_path):
    """A model-mode output folder: predictions.jsonl and predictions_paraphrase.jsonl side by side."""
    folder = tmp_path / "eval"
    folder.mkdir()
    _write(folder / "predictions.jsonl", MAIN)
    _write(folder / "predictions_paraphrase.jsonl", PARA)
    return folder


def _metrics(out):
    return json.loads((out / "metrics.json").read_text(encoding="utf-8"))


def _check_robustness(rob):
    assert rob["n_groups"] == 2 and rob["n_flip_pairs"] == 4 and rob["flip_rate"] == 0.25
    assert rob["per_variant"]["p1"] == {"accuracy": 0.5, "n": 2}
    assert rob["n_not_paraphrased"] == 1 and [r["id"] for r in rob["not_paraphrased"]] == ["c"]


def test_the_paraphrase_file_beside_the_predictions_is_scored_and_logged(run_eval, run_folder, tmp_path, caplog,
                                                                       capsys):
    out = tmp_path / "rescored"
    with caplog.at_level(logging.INFO):
        assert run_eval.main(["--predictions", str(run_folder / "predictions.jsonl"), "--output", str(out),
                              "--bootstrap", "10"]) == 0
    assert any("predictions_paraphrase.jsonl" in r.getMessage() and "beside" in r.getMessage()
               for r in caplog.records)
    metrics = _metrics(out)
    _check_robustness(metrics["robustness"])
    assert metrics["closed"]["n"] == 2  # the reworded answers are not scored as more test questions
    assert "flip_rate" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["inputs"]["paraphrase_predictions"]["path"] == str((run_folder / PARA_NAME).resolve())


def test_an_explicit_paraphrase_file_is_scored_from_anywhere(run_eval, run_folder, tmp_path):
    moved = (run_folder / PARA_NAME).rename(tmp_path / "answers_reworded.jsonl")
    out = tmp_path / "rescored"
    assert run_eval.main(["--predictions", str(run_folder / "predictions.jsonl"), "--output", str(out),
                          "--bootstrap", "10", "--quiet", "--paraphrase-predictions", str(moved)]) == 0
    _check_robustness(_metrics(out)["robustness"])


def test_none_skips_the_paraphrase_file_and_no_file_means_no_robustness(run_eval, run_folder, tmp_path):
    argv = ["--predictions", str(run_folder / "predictions.jsonl"), "--bootstrap", "10", "--quiet"]
    assert run_eval.main(argv + ["--output", str(tmp_path / "r1"), "--paraphrase-predictions", "none"]) == 0
    assert "robustness" not in _metrics(tmp_path / "r1")
    (run_folder / PARA_NAME).unlink()
    assert run_eval.main(argv + ["--output", str(tmp_path / "r2")]) == 0
    assert "robustness" not in _metrics(tmp_path / "r2")


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "missing.jsonl", "does not exist"),
    (lambda d: _write(d / "flat.jsonl", MAIN), "no paraphrase groups"),
])
def test_a_bad_paraphrase_file_is_a_usage_error_before_scoring(run_eval, run_folder, tmp_path, capsys, make,
                                                               message):
    out = tmp_path / "rescored"
    with pytest.raises(SystemExit) as exc:
        run_eval.main(["--predictions", str(run_folder / "predictions.jsonl"), "--output", str(out),
                       "--paraphrase-predictions", str(make(tmp_path))])
    assert exc.value.code == 2 and message in capsys.readouterr().err
    assert not (out / "metrics.json").exists()


def test_model_mode_refuses_a_paraphrase_file(run_eval, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        run_eval.main(["--model", "demo:llava", "--output", str(tmp_path / "o"), "--paraphrase-predictions", "x"])
    assert exc.value.code == 2 and "belongs to predictions mode" in capsys.readouterr().err
