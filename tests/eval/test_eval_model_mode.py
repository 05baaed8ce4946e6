"""eval/run_eval.py --model: a tiny random model answers phantom questions end to end, in-process."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from ollama_stub import OllamaStub
from scripts import load_script


@pytest.fixture(scope="module")
def run_eval():
    return load_script("eval/run_eval.py")


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _argv(model, out, *extra) -> list[str]:
    return ["--model", str(model), "--phantom-patients", "36", "--max-samples", "8", "--bootstrap", "20",
            "--output", str(out), "--quiet", *extra]


@pytest.fixture
def generate_calls(monkeypatch):
    """Spy on the PaliGemma class's ``generate``: one dict of its keyword arguments per call."""
    from transformers import PaliGemmaForConditionalGeneration

    calls: list[dict] = []
    original = PaliGemmaForConditionalGeneration.generate

    def spy(self, *args, **kwargs):
        calls.append({"batch": int(kwargs["input_ids"].shape[0]), **{k: v for k, v in kwargs.items()
                                                                       if k in ("do_sample", "num_return_sequences")}})
        return original(self, *args, **kwargs)

    monkeypatch.setattr(PaliGemmaForConditionalGeneration, "generate", spy)
    return calls


def test_model_mode_writes_predictions_metrics_and_manifest(run_eval, tiny_paligemma, tmp_path, generate_calls):
    out = tmp_path / "eval"
    assert run_eval.main(_argv(tiny_paligemma, out)) == 0

    rows = _read(out / "predictions.jsonl")
    assert len(rows) == 8 and len({r["id"] for r in rows}) == 8
    assert all({"id", "question", "answer", "prediction", "answer_type", "qtype", "modality"} <= set(r) for r in rows)
    assert all(r["latency_s"] > 0 for r in rows) and not any("samples" in r for r in rows)
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["counts"]["n_scored"] == 8 and metrics["closed"]["n"] + metrics["open"]["n"] == 8
    assert "qtype" in metrics["slices"] and metrics["model"]["family"] == "PaliGemmaFamily"
    assert "consistency" not in metrics and "robustness" not in metrics
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["step"] == "eval.model" and manifest["data"]["n"] == 8
    assert generate_calls == [{"batch": 8, "do_sample": False, "num_return_sequences": 1}]  # greedy, batched


def test_consistency_samples_come_from_one_generate_call(run_eval, tiny_paligemma, tmp_path, generate_calls):
    out = tmp_path / "cons"
    assert run_eval.main(_argv(tiny_paligemma, out, "--consistency", "--samples", "5", "--temperature", "1.5")) == 0

    assert len(generate_calls) == 2  # one greedy pass, one sampled pass for all 8 questions x 5 samples
    assert generate_calls[1] == {"batch": 8, "do_sample": True, "num_return_sequences": 5}
    rows = _read(out / "predictions.jsonl")
    assert all(isinstance(r["samples"], list) and len(r["samples"]) == 5 for r in rows)
    assert any(len(set(r["samples"])) > 1 for r in rows)  # really sampled at temperature 1.5
    cons = json.loads((out / "metrics.json").read_text(encoding="utf-8"))["consistency"]
    assert cons["n"] == 8 and cons["k"] == 5

    again = tmp_path / "cons2"  # seeded: the same samples on a re-run
    assert run_eval.main(_argv(tiny_paligemma, again, "--consistency", "--temperature", "1.5")) == 0
    assert [r["samples"] for r in _read(again / "predictions.jsonl")] == [r["samples"] for r in rows]


def test_robustness_evaluates_paraphrase_groups_with_latency(run_eval, tiny_paligemma, tmp_path, generate_calls):
    out = tmp_path / "rob"
    assert run_eval.main(_argv(tiny_paligemma, out, "--robustness")) == 0
    # the base wording is the main pass's answer, reused: only the 3 x 8 new wordings are generated
    assert [c["batch"] for c in generate_calls] == [8, 24]

    para = _read(out / "predictions_paraphrase.jsonl")
    groups: dict[str, list[dict]] = {}
    for r in para:
        groups.setdefault(r["group"], []).append(r)
    base_ids = {r["id"] for r in _read(out / "predictions.jsonl")}
    assert set(groups) == base_ids
    assert all([r["variant"] for r in g] == ["base", "p1", "p2", "p3"] for g in groups.values())
    assert all(len({r["question"] for r in g}) == 4 and r["latency_s"] > 0 for g in groups.values() for r in g)
    rob = json.loads((out / "metrics.json").read_text(encoding="utf-8"))["robustness"]
    assert rob["n_groups"] == 8 and rob["n_flip_pairs"] == 24 and rob["n_not_paraphrased"] == 0
    assert set(rob["per_variant"]) == {"base", "p1", "p2", "p3"}
    assert rob["full_consistency_rate"] is not None and rob["latency"]["n"] == 32
    main = {r["id"]: r["prediction"] for r in _read(out / "predictions.jsonl")}
    assert {r["id"]: r["prediction"] for r in para if r["variant"] == "base"} == main


def test_adapter_is_applied_and_recorded(run_eval, tiny_paligemma, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import PaliGemmaForConditionalGeneration

    model = PaliGemmaForConditionalGeneration.from_pretrained(tiny_paligemma)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    (adapter / "medvlm_adapter.json").write_text(json.dumps({"model_name_or_path": str(tiny_paligemma)}))

    out = tmp_path / "with-adapter"
    assert run_eval.main(_argv(tiny_paligemma, out, "--adapter", str(adapter))) == 0
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["model"]["adapter"] == str(adapter) and metrics["counts"]["n_scored"] == 8


@pytest.mark.parametrize("case", ["model", "adapter", "judge"])
def test_bad_inputs_give_one_line_and_exit_2(run_eval, tiny_paligemma, tmp_path, capsys, case):
    extra = {"model": [], "adapter": ["--adapter", str(tmp_path / "nope")],
             "judge": ["--judge-backend", "ollama"]}[case]
    model = tmp_path / "missing-model" if case == "model" else tiny_paligemma
    assert run_eval.main(_argv(model, tmp_path / "out", *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("run_eval.py: error:")
    assert {"model": "missing-model", "adapter": "adapter_config.json", "judge": "--judge-model"}[case] in err
    assert not (tmp_path / "out" / "predictions.jsonl").exists()


def _down_judge_argv(tiny_paligemma, out):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return _argv(tiny_paligemma, out, "--judge-backend", "ollama", "--judge-model", "stub-model",
                 "--judge-host", f"http://127.0.0.1:{port}")


def test_judge_server_down_stops_before_the_model_answers(run_eval, tiny_paligemma, tmp_path, capsys,
                                                          generate_calls):
    out = tmp_path / "judge-down"
    assert run_eval.main(_down_judge_argv(tiny_paligemma, out)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot connect to Ollama" in err and "ollama serve" in err
    assert generate_calls == [] and not (out / "predictions.jsonl").exists()


def test_judge_server_lost_while_the_model_answers_keeps_predictions_and_scores(run_eval, tiny_paligemma,
                                                                                tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(run_eval, "check_judge_server", lambda cfg: None)  # up when checked, gone when judging
    out = tmp_path / "judge-lost"
    assert run_eval.main(_down_judge_argv(tiny_paligemma, out)) == 2
    err = capsys.readouterr().err.strip()
    assert "ollama serve" in err and "predictions.jsonl" in err
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert len(_read(out / "predictions.jsonl")) == 8 and metrics["counts"]["n_scored"] == 8
    assert "judge" not in metrics


def test_judge_scores_open_predictions_through_the_cache(run_eval, tiny_paligemma, tmp_path):
    reply = json.dumps({"score": 3, "verdict": "no", "reason": "empty answer"})
    out = tmp_path / "judge"
    with OllamaStub(responder=lambda prompt, request: reply) as stub:
        argv = _argv(tiny_paligemma, out, "--judge-backend", "ollama", "--judge-model", "stub-model",
                     "--judge-host", stub.host)
        assert run_eval.main(argv) == 0
        sent = stub.n_requests
        assert run_eval.main(argv) == 0  # the re-run reads every judgement from the cache
        assert stub.n_requests == sent
    judge = json.loads((out / "metrics.json").read_text(encoding="utf-8"))["judge"]
    items = _read(out / "judge.jsonl")
    assert judge["n_valid"] == judge["n"] == len(items) >= 1 and judge["mean_score"] == 3.0
    assert judge["model"] == "stub-model" and (out / "judge_cache").is_dir()
