"""QA generation from captions through a stand-in Ollama server: outputs, rejects, resume after a kill."""

from __future__ import annotations

import json
import runpy
import socket
import sys

import pytest
from llm_responders import caption_records, qa_responder, write_jsonl
from ollama_stub import OllamaStub, StubHTTPError

from medvlm.data_curation.qa_generation import (
    QAGenConfig,
    caption_context,
    generate_qa,
    load_qagen_config,
)
from medvlm.llm import CachedLLM, LLMConnectionError, OllamaLLM
from medvlm.records import make_record, validate_record


def make_cfg(tmp_path, **kw) -> QAGenConfig:
    rows = kw.pop("rows", None) or caption_records()
    base = {"input": write_jsonl(tmp_path / "in.jsonl", rows), "output_dir": str(tmp_path / "out"),
            "n_questions": {"image": 3, "literature": 2}}
    return QAGenConfig(**{**base, **kw})


def read_out(tmp_path, name):
    return [json.loads(line) for line in (tmp_path / "out" / name).read_text().splitlines()]


def test_generates_unified_records_with_provenance(tmp_path):
    rows = caption_records(3) + [make_record(id="slake-1", question="q?", answer="a", answer_type="open",
                                             source="slake", split="train", group_id="p1"),
                                 make_record(id="rocov2-empty", question="Describe.", answer="  ", source="rocov2",
                                             answer_type="open", split="train", group_id="e"),
                                 {**caption_records(1)[0], "id": "rocov2-badmeta", "meta": "{oops"}]
    cfg = make_cfg(tmp_path, rows=rows, sources=["rocov2", "medpix"])
    with OllamaStub(responder=qa_responder) as stub:
        summary = generate_qa(cfg, llm=CachedLLM(OllamaLLM("stub-model", host=stub.host), tmp_path / "cache"))
    gen = read_out(tmp_path, "generated.jsonl")
    assert summary["complete"] and summary["n_records"] == len(gen) == 4 * 5  # 4 items x (3 image + 2 lit)
    for rec in gen:
        validate_record(rec)
    first = gen[0]
    meta = json.loads(first["meta"])
    assert first["source"] == "rocov2-gen" and first["group_id"] == "img0" and first["split"] == "train"
    assert first["image"] == "images/img0.png" and first["id"] == "rocov2-img0::image0"
    assert meta["origin_id"] == "rocov2-img0" and meta["template"] == "image_qa"
    assert meta["backend"] == "ollama" and meta["model"] == "stub-model"
    assert first["answer"] == "yes" and first["answer_type"] == "closed"  # "Yes." normalised
    assert {json.loads(r["meta"])["kind"] for r in gen} == {"image", "literature"}
    assert summary["skipped"] == {"source 'slake' not in sources": 1}
    rejects = read_out(tmp_path, "rejects.jsonl")
    assert rejects[0]["reason"].startswith("empty caption") and rejects[0]["item_id"] == "rocov2-empty"
    assert rejects[1]["item_id"] == "rocov2-badmeta" and "meta is not valid JSON" in rejects[1]["reason"]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["n_records"] == 20 and manifest["n_rejects"] == 2
    assert manifest["hashes"]["generated.jsonl"] and manifest["llm"]["model"] == "stub-model"
    assert stub.formats[0]["properties"]["questions"]["items"]["properties"]["kind"]["enum"] in (["image"],
                                                                                                ["literature"])


def test_prompt_carries_caption_concepts_and_clipped_case_text(tmp_path):
    rocov2, medpix = caption_records(1)
    ctx = caption_context(rocov2)
    assert ctx["concepts"] == "X-Ray Computed Tomography; Lung Nodule" and ctx["case_text"] == ""
    case = caption_context(medpix)["case_text"]
    assert "History: Seizures for two weeks." in case and "Diagnosis: Herpes encephalitis" in case
    assert len(case) < 1000  # the 2000-char discussion is clipped


def test_invalid_reply_is_retried_then_rejected_with_reason(tmp_path):
    def responder(prompt, request):
        if "case 1)" in prompt:  # this caption always gets a closed question answered "maybe"
            return json.dumps({"questions": [{"question": "Is it benign?", "answer": "maybe",
                                              "answer_type": "closed", "kind": "image"}]})
        return qa_responder(prompt, request)

    cfg = make_cfg(tmp_path, rows=caption_records(3), kinds=["image"], retries=2)
    with OllamaStub(responder=responder) as stub:
        summary = generate_qa(cfg, llm=OllamaLLM("stub-model", host=stub.host))
        bad_prompt = next(p for p in stub.counts if "case 1)" in p)
        assert stub.counts[bad_prompt] == 3  # first try + 2 retries, each with a new seed
    rejects = read_out(tmp_path, "rejects.jsonl")
    assert len(rejects) == 1 and rejects[0]["item_id"] == "rocov2-img1" and rejects[0]["attempts"] == 3
    assert "closed answer must be yes or no" in rejects[0]["reason"] and "maybe" in rejects[0]["raw"]
    assert summary["n_records"] == 3 * 3 and summary["complete"]  # 3 good items (2 ROCOv2 + MedPix)


def test_killed_run_resumes_without_sending_any_prompt_twice(tmp_path):
    cfg = make_cfg(tmp_path, rows=caption_records(8), concurrency=2)
    finished = []

    def crash_after_three(res):
        finished.append(res.item_id)
        if len(finished) == 3:
            raise KeyboardInterrupt  # the user pressed Ctrl-C mid-run

    with OllamaStub(responder=qa_responder) as stub:
        llm = CachedLLM(OllamaLLM("stub-model", host=stub.host, concurrency=2), tmp_path / "cache")
        with pytest.raises(KeyboardInterrupt):
            generate_qa(cfg, llm=llm, on_item_done=crash_after_three)
        assert not (tmp_path / "out" / "manifest.json").exists()
        sent_before = stub.n_requests
        rerun_llm = CachedLLM(OllamaLLM("stub-model", host=stub.host, concurrency=2), tmp_path / "cache")
        summary = generate_qa(cfg, llm=rerun_llm)
        assert stub.max_count() == 1  # no prompt was ever sent twice
        assert stub.n_requests == 9 * 2 and sent_before < 18  # 9 items x 2 kinds in total
    journal = [json.loads(line)["item_id"] for line in (tmp_path / "out" / "items.jsonl").read_text().splitlines()]
    assert sorted(journal) == sorted(r["id"] for r in caption_records(8))  # each item exactly once
    gen_ids = [r["id"] for r in read_out(tmp_path, "generated.jsonl")]
    assert len(gen_ids) == len(set(gen_ids)) == summary["n_records"] == 9 * 5
    assert (tmp_path / "out" / "manifest.json").exists()


def test_backend_failures_leave_items_for_a_rerun(tmp_path):
    broken = {"on": True}

    def responder(prompt, request):
        if broken["on"] and "case 2)" in prompt:
            raise StubHTTPError(500, "GPU out of memory")
        return qa_responder(prompt, request)

    cfg = make_cfg(tmp_path, rows=caption_records(3), kinds=["image"], retries=1)
    with OllamaStub(responder=responder) as stub:
        llm = CachedLLM(OllamaLLM("stub-model", host=stub.host), tmp_path / "cache")
        summary = generate_qa(cfg, llm=llm)
        assert not summary["complete"] and list(summary["failed"]) == ["rocov2-img2"]
        assert "GPU out of memory" in summary["failed"]["rocov2-img2"][0]
        assert (tmp_path / "out" / "incomplete.json").exists()
        assert not (tmp_path / "out" / "manifest.json").exists()
        broken["on"] = False
        summary = generate_qa(cfg, llm=llm)
    assert summary["complete"] and summary["n_records"] == 4 * 3
    assert not (tmp_path / "out" / "incomplete.json").exists()


def test_server_down_stops_the_run_with_a_clear_error(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = make_cfg(tmp_path, llm={"backend": "ollama", "model": "m", "host": f"http://127.0.0.1:{port}"})
    with pytest.raises(LLMConnectionError, match="ollama serve"):
        generate_qa(cfg)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_config_file_overrides_and_unknown_keys(tmp_path):
    path = tmp_path / "qa.yaml"
    path.write_text("input: in.jsonl\noutput_dir: out\nllm: {backend: ollama, model: a}\n")
    cfg = load_qagen_config(path, ["llm.model=b", "concurrency=4", "kinds=[image]"])
    assert cfg.llm == {"backend": "ollama", "model": "b"} and cfg.concurrency == 4 and cfg.kinds == ["image"]
    path.write_text("input: in.jsonl\noutput_dir: out\nn_question: 3\n")
    with pytest.raises(ValueError, match="unknown keys \\['n_question'\\]"):
        load_qagen_config(path)
    with pytest.raises(ValueError, match="subset of"):
        QAGenConfig(input="x", output_dir="y", kinds=["video"])


def test_script_runs_from_a_yaml_config(tmp_path, monkeypatch, capsys):
    with OllamaStub(responder=qa_responder) as stub:
        path = tmp_path / "qa.yaml"
        path.write_text(
            f"input: {write_jsonl(tmp_path / 'in.jsonl', caption_records(2))}\n"
            f"output_dir: {tmp_path / 'out'}\n"
            f"llm: {{backend: ollama, model: stub-model, host: '{stub.host}', cache_dir: '{tmp_path / 'c'}'}}\n"
        )
        monkeypatch.setattr(sys, "argv", ["generate_qa.py", str(path), "limit=2", "concurrency=2"])
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_path("data_curation/generate_qa.py", run_name="__main__")
    assert exit_info.value.code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["complete"] and printed["n_finished"] == 2 and printed["n_records"] == 2 * (4 + 2)
