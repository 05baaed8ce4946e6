"""The LLM judge: strict parsing, invalid items counted (never scored), failures survivable and cached."""

from __future__ import annotations

import json
import math
import socket

import pytest
from llm_responders import judge_responder
from ollama_stub import OllamaStub, StubHTTPError

from medvlm.eval.judge import judge_records, parse_judgement
from medvlm.llm import CachedLLM, InvalidJSONAnswer, OllamaLLM
from medvlm.llm.prompts import TemplateError

ITEMS = [
    {"id": "q1", "question": "Which side is the effusion?", "answer": "left", "prediction": "left side"},
    {"id": "q2", "question": "Is there a fracture?", "answer": "no", "prediction": "yes"},
    {"id": "q3", "question": "What organ is shown?", "reference": "liver", "prediction": "hepatic parenchyma",
     "caption": "Axial CT of the abdomen showing the liver."},
    {"id": "q4", "question": "What modality?", "answer": "MRI", "prediction": "MRI"},
]


@pytest.mark.parametrize(
    "text, problem",
    [
        ('{"score": "11", "verdict": "yes", "reason": "r"}', "score"),
        ('{"score": 11, "verdict": "yes", "reason": "r"}', "score"),
        ('{"score": 0, "verdict": "no", "reason": "r"}', "score"),
        ('{"score": "7", "verdict": "yes", "reason": "r"}', "score"),
        ('{"score": 7.5, "verdict": "yes", "reason": "r"}', "score"),
        ('{"score": 7.0, "verdict": "yes", "reason": "r"}', "integer"),
        ('{"score": true, "verdict": "yes", "reason": "r"}', "score"),
        ('{"score": 7, "verdict": "maybe", "reason": "r"}', "verdict"),
        ('{"score": 7, "verdict": "yes"}', "reason"),
        ("Score: 7/10, verdict yes", "not JSON"),
        ('[7, "yes", "r"]', "object"),
    ],
)
def test_invalid_judgements_are_rejected(text, problem):
    with pytest.raises(InvalidJSONAnswer, match=problem):
        parse_judgement(text)


def test_valid_judgement_parses():
    assert parse_judgement('```json\n{"score": 10, "verdict": "no", "reason": "r", "extra": 1}\n```') == {
        "score": 10, "verdict": "no", "reason": "r"}


def test_judge_records_scores_and_builds_the_metrics_section(tmp_path):
    with OllamaStub(responder=judge_responder) as stub:
        out = judge_records(ITEMS, OllamaLLM("stub-model", host=stub.host, concurrency=2), retries=1)
        prompts = list(stub.counts)
    assert [it["score"] for it in out["items"]] == [9, 2, 8, 9]
    assert out["mean_score"] == pytest.approx(7.0) and out["yes_rate"] == pytest.approx(0.75)
    assert out["n"] == 4 and out["n_invalid"] == 0 and out["invalid_ids"] == []
    section = out["judge"]
    assert section["template"] == "correctness" and section["model"] == "stub-model"
    json.dumps(section, allow_nan=False)  # metrics.json stays strict JSON
    with_caption = [p for p in prompts if "Axial CT of the abdomen" in p]
    assert len(with_caption) == 1 and "What organ is shown?" in with_caption[0]
    assert not any("caption of the image" in p for p in prompts if "What organ" not in p)


def test_bad_judgements_are_counted_invalid_never_scored():
    def responder(prompt, request):
        if "Question: Is there a fracture" in prompt:
            return '{"score": 11, "verdict": "yes", "reason": "r"}'
        if "Question: What modality" in prompt:
            return '{"score": 7, "verdict": "maybe", "reason": "r"}'
        return judge_responder(prompt, request)

    with OllamaStub(responder=responder) as stub:
        out = judge_records(ITEMS, OllamaLLM("stub-model", host=stub.host), retries=2)
        assert stub.counts[next(p for p in stub.counts if "fracture" in p)] == 3  # retried twice
    assert out["n_invalid"] == 2 and out["invalid_ids"] == ["q2", "q4"]
    assert out["mean_score"] == pytest.approx((9 + 8) / 2) and out["yes_rate"] == 1.0
    bad = {it["id"]: it for it in out["items"] if not it["valid"]}
    assert bad["q2"]["score"] is None and "score" in bad["q2"]["error"]
    assert bad["q4"]["verdict"] is None and "verdict" in bad["q4"]["error"]


def test_server_down_makes_every_item_invalid_without_crashing():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = judge_records(ITEMS, OllamaLLM("stub-model", host=f"http://127.0.0.1:{port}"))
    assert out["n_invalid"] == 4 and math.isnan(out["mean_score"])
    assert out["judge"]["mean_score"] is None and out["judge"]["yes_rate"] is None
    assert all(it["attempts"] == 1 and "ollama serve" in it["error"] for it in out["items"])  # no pointless retry
    assert out["invalid_reasons"] == {"LLMConnectionError": 4}


def test_slow_server_items_are_invalid_timeouts():
    with OllamaStub(responder=judge_responder) as stub:
        stub.slow = True
        out = judge_records(ITEMS[:1], OllamaLLM("stub-model", host=stub.host, timeout=0.2), retries=0)
    assert out["n_invalid"] == 1 and out["items"][0]["error"].startswith("LLMTimeoutError")


def test_finished_judgements_are_kept_when_the_server_fails_midway(tmp_path):
    broken = {"on": True}

    def responder(prompt, request):
        if broken["on"] and ("Question: Is there a fracture" in prompt or "Question: What modality" in prompt):
            raise StubHTTPError(500, "overloaded")
        return judge_responder(prompt, request)

    with OllamaStub(responder=responder) as stub:
        llm = CachedLLM(OllamaLLM("stub-model", host=stub.host), tmp_path)
        first = judge_records(ITEMS, llm, retries=1)
        assert first["n_invalid"] == 2 and first["invalid_reasons"] == {"LLMServerError": 2}
        sent = dict(stub.counts)
        broken["on"] = False
        second = judge_records(ITEMS, CachedLLM(OllamaLLM("stub-model", host=stub.host), tmp_path), retries=1)
        resent = {p: stub.counts[p] - sent.get(p, 0) for p in stub.counts if stub.counts[p] != sent.get(p, 0)}
    assert second["n_invalid"] == 0 and second["mean_score"] == pytest.approx(7.0)
    assert len(resent) == 2 and all("fracture" in p or "What modality" in p for p in resent)  # only the failed ones


def test_items_without_reference_are_invalid_not_sent():
    with OllamaStub(responder=judge_responder) as stub:
        out = judge_records([{"id": "x", "question": "q?", "prediction": "p"}], OllamaLLM("stub-model", host=stub.host))
        assert stub.n_requests == 0
    assert out["invalid_ids"] == ["x"] and "reference" in out["items"][0]["error"]


def test_a_template_missing_a_field_is_refused_before_any_request(tmp_path):
    (tmp_path / "terse.txt").write_text("Q: {question} A: {prediction} {answr}")
    with OllamaStub() as stub:
        with pytest.raises(TemplateError, match=r"missing fields \['reference'\], unknown fields \['answr'\]"):
            judge_records(ITEMS, OllamaLLM("stub-model", host=stub.host), template="terse", templates_dir=tmp_path)
        assert stub.n_requests == 0


def test_caption_block_is_filled_from_caption_or_llava_med_fig_caption_and_dropped_without():
    from medvlm.eval.judge import TEMPLATES_DIR, judge_prompt
    from medvlm.llm.prompts import load_template

    tmpl = load_template("correctness", TEMPLATES_DIR)
    base = {"id": "q", "question": "What is shown?", "answer": "a nodule", "prediction": "a mass"}
    with_fig = judge_prompt({**base, "fig_caption": "Figure 2: CT of the chest, nodule in the right lung."}, tmpl)
    with_meta = judge_prompt({**base, "meta": json.dumps({"caption": "Chest CT with a nodule."})}, tmpl)
    without = judge_prompt(base, tmpl)
    assert "Figure 2: CT of the chest, nodule in the right lung." in with_fig
    assert "Chest CT with a nodule." in with_meta
    assert "caption" not in without.lower() and "Reference answer: a nodule" in without
