"""eval/run_eval.py end to end, in-process: predictions file in, metrics.json + manifest.json out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from scripts import load_script

from medvlm.utils.io import sha256_file


@pytest.fixture(scope="module")
def run_eval():
    return load_script("eval/run_eval.py")


def _write(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


ROWS = [
    {"id": "1", "question": "Is there a lesion?", "answer": "yes", "prediction": "Yes.", "answer_type": "closed",
     "modality": "CT"},
    {"id": "2", "question": "Is the heart enlarged?", "answer": "no", "prediction": "yes", "answer_type": "closed",
     "modality": "X-ray"},
    {"id": "3", "question": "Where is the nodule?", "answer": "left lung", "prediction": "in the left lung",
     "answer_type": "open", "modality": "CT"},
    {"id": "4", "question": "Which organ?", "answer": "", "prediction": "liver", "answer_type": "open"},
]


def test_cli_scores_predictions_and_writes_metrics_and_manifest(run_eval, tmp_path, capsys):
    preds = _write(tmp_path / "preds.jsonl", ROWS)
    out = tmp_path / "eval"
    assert run_eval.main(["--predictions", str(preds), "--output", str(out), "--bootstrap", "50", "--seed", "3"]) == 0

    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["closed"]["n"] == 2 and metrics["closed"]["accuracy"] == 0.5
    assert metrics["open"]["n"] == 1 and metrics["open"]["token_recall"] == 1.0
    assert metrics["skipped"] == [{"id": "4", "reason": "missing reference answer"}]
    assert metrics["config"]["bootstrap"] == 50 and metrics["config"]["seed"] == 3
    assert set(metrics["slices"]["modality"]) == {"CT", "X-ray"}  # the skipped record is not sliced

    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["inputs"]["predictions"]["sha256"] == sha256_file(preds)
    assert manifest["outputs"] == ["metrics.json"]
    assert not list(out.glob("*.tmp"))  # atomic writes leave no temp files

    printed = capsys.readouterr().out
    assert "accuracy" in printed and "1 skipped" in printed


def test_cli_llava_med_with_questions_and_suite(run_eval, tmp_path):
    answers = _write(tmp_path / "answers.jsonl", [
        {"question_id": 7, "prompt": "Is there a mass?", "text": "No", "answer_id": "x", "model_id": "m",
         "metadata": {}},
    ])
    questions = tmp_path / "test.json"
    questions.write_text(json.dumps([{"id": 7, "conversations": [
        {"from": "human", "value": "<image>\nIs there a mass?"}, {"from": "gpt", "value": "no"}]}]), encoding="utf-8")
    suite = Path(__file__).resolve().parents[2] / "eval" / "suites" / "llava_med_vqa.yaml"
    out = tmp_path / "eval"
    run_eval.main(["--predictions", str(answers), "--questions", str(questions), "--suite", str(suite),
                   "--output", str(out), "--bootstrap", "10", "--quiet"])
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["config"]["metrics"]["closed"] == ["substring", "llava_med_yesno", "accuracy"]
    # the suite picks LLaVA-Med's recall and ours; ROUGE and BLEU are always in metrics.json
    assert metrics["config"]["metrics"]["open"] == ["llava_med_recall", "token_recall", "token_f1",
                                                    "rouge1", "rouge2", "rougeL", "bleu"]
    assert metrics["closed"]["substring"] == 1.0 and metrics["config"]["bootstrap"] == 10
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert set(manifest["inputs"]) == {"predictions", "questions", "suite"}


def test_cli_reports_malformed_file_as_usage_error(run_eval, tmp_path, capsys):
    preds = tmp_path / "preds.jsonl"
    preds.write_text('{"id": "1", "answer": "yes", "prediction": "yes"}\n{oops\n', encoding="utf-8")
    with pytest.raises(SystemExit) as e:
        run_eval.main(["--predictions", str(preds), "--output", str(tmp_path / "eval")])
    assert e.value.code == 2
    assert "preds.jsonl:2" in capsys.readouterr().err
    assert not (tmp_path / "eval" / "metrics.json").exists()


def test_cli_requires_predictions_and_output(run_eval):
    with pytest.raises(SystemExit):
        run_eval.main(["--output", "x"])
    with pytest.raises(SystemExit):
        run_eval.main(["--predictions", "x.jsonl"])


def test_cli_judges_a_predictions_file_after_writing_its_scores(run_eval, tmp_path):
    """Predictions mode with --judge-*: open answers judged into judge.jsonl and the judge section."""
    from ollama_stub import OllamaStub

    preds = _write(tmp_path / "preds.jsonl", ROWS)
    out = tmp_path / "eval"
    reply = json.dumps({"score": 8, "verdict": "yes", "reason": "same place"})
    with OllamaStub(responder=lambda prompt, request: reply) as stub:
        argv = ["--predictions", str(preds), "--output", str(out), "--bootstrap", "10", "--quiet",
                "--judge-backend", "ollama", "--judge-model", "stub-model", "--judge-host", stub.host]
        assert run_eval.main(argv) == 0
        assert stub.n_requests == 1  # one open question with a reference (row 4 has none: skipped)
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["closed"]["accuracy"] == 0.5  # the scores are still there
    judge = metrics["judge"]
    assert judge["n"] == judge["n_valid"] == 1 and judge["mean_score"] == 8.0 and judge["yes_rate"] == 1.0
    assert [json.loads(line)["id"] for line in (out / "judge.jsonl").read_text().splitlines()] == ["3"]
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["outputs"] == ["metrics.json", "judge.jsonl"]


def test_cli_judge_server_errors_count_items_invalid_and_keep_scores(run_eval, tmp_path):
    from ollama_stub import OllamaStub

    preds = _write(tmp_path / "preds.jsonl", ROWS)
    out = tmp_path / "eval"
    with OllamaStub() as stub:
        stub.fail_status = 500
        argv = ["--predictions", str(preds), "--output", str(out), "--bootstrap", "10", "--quiet",
                "--judge-backend", "ollama", "--judge-model", "stub-model", "--judge-host", stub.host]
        assert run_eval.main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["open"]["n"] == 1 and metrics["closed"]["n"] == 2
    judge = metrics["judge"]
    assert judge["n_invalid"] == 1 and judge["mean_score"] is None and judge["invalid_reasons"] == {"LLMServerError": 1}


@pytest.mark.parametrize("argv, message", [
    (["--judge-backend", "ollama"], "--judge-model"),
    (["--judge-model", "llama3.1:8b"], "--judge-backend"),
    (["--judge-backend", "ollama", "--judge-model", "m", "--judge-timeout", "0"], "timeout must be > 0"),
])
def test_cli_incomplete_judge_options_are_usage_errors(run_eval, tmp_path, capsys, argv, message):
    preds = _write(tmp_path / "preds.jsonl", ROWS)
    with pytest.raises(SystemExit) as e:
        run_eval.main(["--predictions", str(preds), "--output", str(tmp_path / "eval"), *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "eval" / "metrics.json").exists()  # refused before any scoring


@pytest.mark.parametrize("content", ["", "\n\n"])
def test_cli_refuses_an_empty_predictions_file(run_eval, tmp_path, capsys, content):
    preds = tmp_path / "preds.jsonl"
    preds.write_text(content, encoding="utf-8")
    with pytest.raises(SystemExit) as e:
        run_eval.main(["--predictions", str(preds), "--output", str(tmp_path / "eval")])
    assert e.value.code == 2 and "holds no records" in capsys.readouterr().err
