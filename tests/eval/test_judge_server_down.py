"""A judge whose Ollama server is down (or lacks the model) stops the evaluation with one line and exit
status 2, as data_curation/generate_qa.py does, keeping the scores already written; items the
server fails on in other ways stay counted invalid."""

from __future__ import annotations

import json
import socket

import pytest
from ollama_stub import OllamaStub
from scripts import load_script

from medvlm.eval import judge as judge_mod
from medvlm.llm import LLMConnectionError, LLMServerError, OllamaLLM

ROWS = [
    {"id": "1", "question": "Is there a lesion?", "answer": "yes", "prediction": "Yes.", "answer_type": "closed"},
    {"id": "2", "question": "Is the heart enlarged?", "answer": "no", "prediction": "yes", "answer_type": "closed"},
    {"id": "3", "question": "Where is the nodule?", "answer": "left lung", "prediction": "in the left lung",
     "answer_type": "open"},
]


@pytest.fixture(scope="module")
def run_eval():
    return load_script("eval/run_eval.py")


@pytest.fixture
def closed_port_host():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def _preds(tmp_path):
    path = tmp_path / "preds.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    return path


def _argv(preds, out, host, model="stub-model"):
    return ["--predictions", str(preds), "--output", str(out), "--bootstrap", "10", "--quiet",
            "--judge-backend", "ollama", "--judge-model", model, "--judge-host", host]


def test_server_down_exits_2_with_the_fix_and_keeps_the_scores(run_eval, tmp_path, closed_port_host, capsys):
    out = tmp_path / "eval"
    assert run_eval.main(_argv(_preds(tmp_path), out, closed_port_host)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"cannot connect to Ollama at {closed_port_host}" in err and "ollama serve" in err
    assert str(out / "metrics.json") in err
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["closed"]["accuracy"] == 0.5 and metrics["open"]["n"] == 1 and "judge" not in metrics
    assert not (out / "judge.jsonl").exists()
    assert not (out / "manifest.json").exists()  # written only when every step finished, as in model mode


def test_a_model_missing_on_the_server_exits_2_naming_ollama_pull(run_eval, tmp_path, capsys):
    out = tmp_path / "eval"
    with OllamaStub(models=("other-model",)) as stub:
        assert run_eval.main(_argv(_preds(tmp_path), out, stub.host, model="llama3.1")) == 2
        assert stub.n_requests == 0  # nothing was sent to judge
    err = capsys.readouterr().err
    assert "ollama pull llama3.1" in err and "metrics.json" in err
    assert json.loads((out / "metrics.json").read_text(encoding="utf-8"))["closed"]["n"] == 2


def test_server_errors_still_count_items_invalid_and_exit_0(run_eval, tmp_path):
    out = tmp_path / "eval"
    with OllamaStub() as stub:
        stub.fail_status = 500
        assert run_eval.main(_argv(_preds(tmp_path), out, stub.host)) == 0
    judge = json.loads((out / "metrics.json").read_text(encoding="utf-8"))["judge"]
    assert judge["n_invalid"] == 1 and judge["invalid_reasons"] == {"LLMServerError": 1}
    assert json.loads((out / "manifest.json").read_text())["outputs"] == ["metrics.json", "judge.jsonl"]


def test_a_server_lost_midway_keeps_the_judge_section_and_exits_2(run_eval, tmp_path, closed_port_host,
                                                                   monkeypatch, capsys):
    """The server answered the check, then went away: items counted invalid, written, exit 2."""
    monkeypatch.setattr(judge_mod, "check_judge_server", lambda cfg: None)
    out = tmp_path / "eval"
    assert run_eval.main(_argv(_preds(tmp_path), out, closed_port_host)) == 2
    err = capsys.readouterr().err
    assert "lost its server" in err and "1 of 1 items not judged" in err and "ollama serve" in err
    judge = json.loads((out / "metrics.json").read_text(encoding="utf-8"))["judge"]
    assert judge["invalid_reasons"] == {"LLMConnectionError": 1}


def test_model_mode_checks_the_judge_server_before_loading_the_model(run_eval, tmp_path, closed_port_host,
                                                                    monkeypatch, capsys):
    import medvlm.eval.evaluate as evaluate

    monkeypatch.setattr(evaluate, "evaluate_model", lambda *a, **k: pytest.fail("the model was loaded"))
    argv = ["--model", "demo:llava", "--output", str(tmp_path / "eval"), "--judge-backend", "ollama",
            "--judge-model", "stub-model", "--judge-host", closed_port_host]
    assert run_eval.main(argv) == 2
    err = capsys.readouterr().err
    assert "cannot connect to Ollama" in err and "ollama serve" in err
    assert "nothing was evaluated or written" in err and not (tmp_path / "eval").exists()


def test_check_judge_server_raises_only_for_a_server_that_is_down(closed_port_host, monkeypatch):
    with pytest.raises(LLMConnectionError, match="ollama serve"):
        judge_mod.check_judge_server({"backend": "ollama", "model": "stub-model", "host": closed_port_host})
    with OllamaStub() as stub:
        judge_mod.check_judge_server({"backend": "ollama", "model": "stub-model", "host": stub.host})

        def failing(self):  # a failing server is not a stopped one: its items are retried, then invalid
            raise LLMServerError("Ollama answered HTTP 500", 500)

        monkeypatch.setattr(OllamaLLM, "list_models", failing)
        judge_mod.check_judge_server({"backend": "ollama", "model": "stub-model", "host": stub.host})
    judge_mod.check_judge_server({"backend": "transformers", "model": "smollm2"})  # local: nothing to check
