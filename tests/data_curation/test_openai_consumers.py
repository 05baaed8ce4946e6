"""Each consumer of the text-LLM backends, end to end against the stand-in OpenAI-compatible server:
QA generation (``generate_qa.py`` with ``llm: {backend: openai}``), the judge (``run_eval.py
--judge-backend openai``) and the blind filter (a mix's ``blind_check``). The server wants a key,
which must reach the server and no file, and it refuses some requests on the way (503, 429,
a dropped connection), which the client resends without failing the run."""

from __future__ import annotations

import json
import runpy
import socket
import sys
from pathlib import Path

import datasets
import pytest
import yaml
from llm_responders import caption_records, judge_responder, qa_responder, write_jsonl
from openai_stub import DROP, OpenAIStub, fault
from scripts import load_script

from medvlm.data_curation.mixing import build_mix
from medvlm.records import make_record

SECRET = "sk-stub-secret-4f1b2c3d"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path_factory):
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MEDVLM_HOME", str(tmp_path_factory.getbasetemp() / "home"))


def files_holding(root: Path, text: str) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and text.encode() in p.read_bytes()]


def closed_port_host() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/v1"


# -- QA generation ----------------------------------------------------------------------------------
def run_generate_qa(tmp_path, monkeypatch, llm: dict, n_items: int = 2) -> int:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "qa.yaml"
    config = {"input": write_jsonl(tmp_path / "in.jsonl", caption_records(n_items)[:n_items]),
              "output_dir": str(tmp_path / "out"), "llm": llm}
    path.write_text(yaml.safe_dump(config))
    monkeypatch.setattr(sys, "argv", ["generate_qa.py", str(path)])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path("data_curation/generate_qa.py", run_name="__main__")
    return exit_info.value.code


def test_generate_qa_with_backend_openai(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("STUB_KEY", SECRET)
    with OpenAIStub(responder=qa_responder, api_key=SECRET) as stub:
        stub.plan = [fault(503, retry_after="0"), fault(429, "slow down", retry_after="0"), DROP]
        llm = {"backend": "openai", "model": "stub-model", "host": stub.host, "api_key_env": "STUB_KEY",
               "backoff": 0, "concurrency": 2}
        assert run_generate_qa(tmp_path, monkeypatch, llm) == 0
        assert stub.n_requests == 2 * 2 + 3  # 2 items x 2 kinds, plus the three refused and resent
        assert all(r["response_format"]["type"] == "json_schema" for r in stub.requests)
        assert set(stub.auth) == {f"Bearer {SECRET}"}
    captured = capsys.readouterr()
    printed = json.loads(captured.out)
    assert printed["complete"] and printed["n_records"] == 2 * (4 + 2)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["llm"]["backend"] == "openai" and manifest["llm"]["host"] == stub.host
    assert files_holding(tmp_path, SECRET) == [] and SECRET not in captured.err


def test_generate_qa_exit_codes_with_backend_openai(tmp_path, monkeypatch, capsys):
    down = {"backend": "openai", "model": "stub-model", "host": closed_port_host()}
    assert run_generate_qa(tmp_path / "a", monkeypatch, down) == 2
    assert "cannot connect to the OpenAI-compatible server" in capsys.readouterr().err
    with OpenAIStub(responder=qa_responder) as stub:
        stub.always = fault(500, "GPU out of memory")
        failing = {"backend": "openai", "model": "stub-model", "host": stub.host, "max_retries": 1, "backoff": 0}
        assert run_generate_qa(tmp_path / "b", monkeypatch, failing) == 3  # items left for a re-run
        assert stub.n_requests == 2 * 2 * 2  # each of 4 prompts: 1 + max_retries, not resent again
        incomplete = json.loads((tmp_path / "b" / "out" / "incomplete.json").read_text())
        assert sorted(incomplete["failed"]) == ["rocov2-img0", "rocov2-img1"]
        assert "GPU out of memory" in incomplete["failed"]["rocov2-img0"][0]
        stub.always, stub.requests = None, []
        unknown = {**failing, "model": "llama9"}
        assert run_generate_qa(tmp_path / "c", monkeypatch, unknown) == 2
        assert stub.n_requests <= 2  # a 404 stops the run: one request per item already started, no retry
    assert "model 'llama9'" in capsys.readouterr().err


# -- the judge --------------------------------------------------------------------------------------
PREDICTIONS = [
    {"id": "1", "question": "Is there a lesion?", "answer": "yes", "prediction": "yes", "answer_type": "closed"},
    {"id": "2", "question": "Where is the nodule?", "answer": "left lung", "prediction": "in the left lung",
     "answer_type": "open"},
    {"id": "3", "question": "Which organ is shown?", "answer": "liver", "prediction": "spleen", "answer_type": "open"},
    {"id": "4", "question": "What modality?", "answer": "MRI", "prediction": "an MRI scan", "answer_type": "open"},
]


@pytest.fixture(scope="module")
def run_eval():
    return load_script("eval/run_eval.py")


def judge_argv(tmp_path, host: str, *extra: str, model: str = "stub-model") -> list[str]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    preds = tmp_path / "preds.jsonl"
    preds.write_text("".join(json.dumps(r) + "\n" for r in PREDICTIONS), encoding="utf-8")
    return ["--predictions", str(preds), "--output", str(tmp_path / "eval"), "--bootstrap", "10", "--quiet",
            "--judge-backend", "openai", "--judge-model", model, "--judge-host", host, *extra]


def test_run_eval_judges_with_backend_openai(run_eval, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    with OpenAIStub(responder=judge_responder, api_key=SECRET) as stub:
        stub.plan = [fault(500, retry_after="0"), fault(429, retry_after="0")]
        assert run_eval.main(judge_argv(tmp_path, stub.host, "--judge-concurrency", "2")) == 0
        assert stub.model_lists == 1 and stub.n_requests == 3 + 2  # the model was checked first
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    judge = metrics["judge"]
    assert judge["n"] == 3 and judge["n_valid"] == 3 and judge["n_invalid"] == 0
    assert judge["mean_score"] == pytest.approx((9 + 2 + 9) / 3) and judge["yes_rate"] == pytest.approx(2 / 3)
    assert judge["backend"] == "openai" and judge["host"] == stub.host
    assert len((tmp_path / "eval" / "judge.jsonl").read_text().splitlines()) == 3
    assert files_holding(tmp_path, SECRET) == [] and SECRET not in capsys.readouterr().err


def test_run_eval_stops_with_exit_2_when_the_openai_judge_cannot_run(run_eval, tmp_path, monkeypatch, capsys):
    with OpenAIStub(responder=judge_responder, api_key=SECRET) as stub:
        monkeypatch.setenv("JUDGE_KEY", SECRET)
        argv = judge_argv(tmp_path / "a", stub.host, "--judge-api-key-env", "JUDGE_KEY", model="llama9")
        assert run_eval.main(argv) == 2
        assert "model 'llama9' is not served" in capsys.readouterr().err
        assert run_eval.main(judge_argv(tmp_path / "b", stub.host)) == 2  # no key in OPENAI_API_KEY: refused
        assert "refused the request (no key sent: $OPENAI_API_KEY is unset) (HTTP 401" in capsys.readouterr().err
        assert stub.n_requests == 0  # nothing was sent to judge
    monkeypatch.delenv("JUDGE_KEY")
    with pytest.raises(SystemExit) as exit_info:  # a named variable that is unset: a usage error
        run_eval.main(judge_argv(tmp_path / "c", closed_port_host(), "--judge-api-key-env", "JUDGE_KEY"))
    assert exit_info.value.code == 2 and "$JUDGE_KEY is not set" in capsys.readouterr().err
    assert run_eval.main(judge_argv(tmp_path / "d", closed_port_host())) == 2
    assert "cannot connect to the OpenAI-compatible server" in capsys.readouterr().err
    assert json.loads((tmp_path / "d" / "eval" / "metrics.json").read_text())["closed"]["n"] == 1


# -- the blind filter -------------------------------------------------------------------------------
def test_blind_check_through_backend_openai_is_cached_across_a_rebuild(tmp_path):
    rows = [make_record(id=f"q{i}", image=f"/img/{i}.png", question=f"Which modality is image {i}?",
                        answer="CT" if i % 2 else "MRI", answer_type="open", source="gen", split="train",
                        group_id=f"g{i}") for i in range(6)]
    write_jsonl(tmp_path / "gen.jsonl", rows)
    with OpenAIStub(responder=lambda prompt, request: "CT") as stub:  # a blind guess right for odd i
        stub.plan = [fault(429, retry_after="0")]
        blind = {"blind_check": {"llm": {"backend": "openai", "model": "stub-model", "host": stub.host}}}
        mix = {"seed": 0, "sources": [{"name": "gen", "source": "json", "path": str(tmp_path / "gen.jsonl"),
                                       "filters": [blind]}],
               "phases": [{"name": "main", "weights": {"gen": 1.0}}]}
        (tmp_path / "mix.yaml").write_text(yaml.safe_dump(mix))
        data_dir = build_mix(tmp_path / "mix.yaml", tmp_path / "out", report=False)
        assert sorted(datasets.load_from_disk(str(data_dir))["id"]) == ["q0", "q2", "q4"]
        assert stub.n_requests == 6 + 1  # the 429 was resent, not noted as a failed check
        assert all("response_format" not in r for r in stub.requests)  # free text, no schema
        (tmp_path / "out" / "manifest.json").unlink()  # as if the build died before finishing
        build_mix(tmp_path / "mix.yaml", tmp_path / "out", report=False)
        assert stub.n_requests == 7  # answers came from out/llm_cache
    rejects = [json.loads(x) for x in (tmp_path / "out" / "filters" / "gen" / "rejects.jsonl").read_text().splitlines()]
    assert {r["id"] for r in rejects} == {"q1", "q3", "q5"}
    assert {r["reason"] for r in rejects} == {"answerable without the image"}
    notes = tmp_path / "out" / "filters" / "gen" / "notes.jsonl"
    assert not notes.exists() or "blind check failed" not in notes.read_text()


def test_model_mode_passes_the_openai_judge_settings_through(run_eval, tmp_path, monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", SECRET)
    args = run_eval.build_parser().parse_args(
        ["--model", "demo:llava", "--output", str(tmp_path), "--judge-backend", "openai", "--judge-model", "m",
         "--judge-host", "http://127.0.0.1:9/v1", "--judge-api-key-env", "JUDGE_KEY", "--judge-timeout", "5"])
    cfg = run_eval.model_config(args).judge_llm_config()
    assert cfg == {"backend": "openai", "model": "m", "concurrency": 1, "cache_dir": str(tmp_path / "judge_cache"),
                   "host": "http://127.0.0.1:9/v1", "api_key_env": "JUDGE_KEY", "timeout": 5.0}
    assert SECRET not in json.dumps(cfg)  # the config names the variable, never the key
