"""The OpenAI-compatible backend against a stand-in server (real HTTP on 127.0.0.1): the request it
sends, and what it does on each fault: HTTP 500/503, 429 with Retry-After, malformed bodies,
replies that do not fit the schema, slow answers, dropped connections, a server that is down."""

from __future__ import annotations

import email.utils
import json
import logging
import socket
import threading
import time

import pytest
from ollama_stub import StubHTTPError
from openai_stub import DROP, GARBAGE, SLOW, OpenAIStub, fault

from medvlm.llm import (
    CachedLLM,
    LLMAuthError,
    LLMConnectionError,
    LLMModelNotFoundError,
    LLMResponseError,
    LLMServerError,
    LLMTimeoutError,
    OpenAICompatLLM,
    generate_json,
    make_llm,
)
from medvlm.llm.openai_backend import api_base, redact
from medvlm.llm.retry import Backoff, parse_retry_after

SCHEMA = {"type": "object", "properties": {"label": {"type": "string", "enum": ["a", "b"]}}, "required": ["label"]}
SECRET = "sk-test-not-a-real-key-0123456789"


class Waits(list):
    """Records the waits the backend asks for, instead of sleeping."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


@pytest.fixture(autouse=True)
def no_ambient_key(monkeypatch):
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL"):
        monkeypatch.delenv(name, raising=False)


def llm_for(stub: OpenAIStub, **kw) -> OpenAICompatLLM:
    kw.setdefault("sleep", Waits())
    return OpenAICompatLLM("stub-model", stub.host, **kw)


def closed_port_host() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/v1"


# -- the request ---------------------------------------------------------------------------------
def test_chat_request_has_the_openai_shape():
    with OpenAIStub(responder=lambda p, r: '{"label": "a"}') as stub:
        llm = llm_for(stub)
        assert llm.generate("classify", system="be brief", json_schema=SCHEMA, options={"num_predict": 12}) \
            == '{"label": "a"}'
        assert llm.generate("hi", options={"num_predict": -1}) == '{"label": "a"}'
        body, plain = stub.requests
        assert stub.auth == [None, None]  # no key in the environment: no Authorization header
    assert body["model"] == "stub-model" and body["stream"] is False
    assert body["messages"] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "classify"}]
    assert body["temperature"] == 0 and body["seed"] == 0 and body["max_tokens"] == 12
    assert body["response_format"] == {"type": "json_schema",
                                       "json_schema": {"name": "reply", "schema": SCHEMA, "strict": True}}
    assert "response_format" not in plain and "max_tokens" not in plain  # num_predict -1: Ollama's "no limit"


def test_host_and_key_come_from_config_or_environment(monkeypatch):
    assert api_base("http://h:8000") == api_base("http://h:8000/") == "http://h:8000/v1"
    assert api_base("h:1234/v1/") == "http://h:1234/v1" and api_base("http://h/openai/v1") == "http://h/openai/v1"
    assert redact("http://user:pw@h:8000/v1") == "http://h:8000/v1"
    monkeypatch.setenv("OPENAI_BASE_URL", "http://10.0.0.1:30000")  # never contacted
    assert OpenAICompatLLM("m").base_url == "http://10.0.0.1:30000/v1"
    monkeypatch.delenv("OPENAI_BASE_URL")
    assert OpenAICompatLLM("m").base_url == "http://127.0.0.1:8000/v1"
    with pytest.raises(ValueError, match=r"api_key_env names VLLM_KEY, but \$VLLM_KEY is not set"):
        OpenAICompatLLM("m", api_key_env="VLLM_KEY")
    monkeypatch.setenv("OPENAI_API_KEY", "from-default-var")
    monkeypatch.setenv("VLLM_KEY", SECRET)
    with OpenAIStub(api_key=SECRET) as stub:
        assert llm_for(stub, api_key_env="VLLM_KEY").generate("x") == "echo: x"
        with pytest.raises(LLMAuthError) as info:
            llm_for(stub).generate("x")  # OPENAI_API_KEY holds another key: refused, not resent
        assert stub.auth == [f"Bearer {SECRET}", "Bearer from-default-var"]
    assert not info.value.retryable and "refused the API key (HTTP 401" in str(info.value)
    assert "set $OPENAI_API_KEY" in str(info.value)
    assert "from-default-var" not in str(info.value)


def test_the_key_is_never_cached_described_or_logged(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    caplog.set_level(logging.DEBUG)  # httpx and httpcore log every request at DEBUG
    with OpenAIStub(api_key=SECRET, responder=lambda p, r: '{"label": "b"}') as stub:
        stub.plan = [fault(503, retry_after="0")]
        llm = CachedLLM(llm_for(stub), tmp_path)
        assert generate_json(llm, "classify", schema=SCHEMA).value == {"label": "b"}
        assert llm.generate("classify", json_schema=SCHEMA) == '{"label": "b"}' and llm.hits == 1
        assert stub.auth == [f"Bearer {SECRET}"] * 2
    assert SECRET not in (tmp_path / "responses.jsonl").read_text()
    assert SECRET not in json.dumps(llm.describe()) and SECRET not in caplog.text
    assert "HTTP 503" in caplog.text  # the retry was logged, without the key


# -- retries with backoff --------------------------------------------------------------------------
def test_5xx_is_resent_after_an_exponential_backoff():
    with OpenAIStub() as stub:
        stub.plan = [fault(500), fault(503), fault(502)]
        llm = llm_for(stub, backoff=2.0)
        assert llm.generate("hello") == "echo: hello"
        assert stub.counts["hello"] == 4
    first, second, third = llm.sleep
    assert 1.0 <= first <= 2.0 and 2.0 <= second <= 4.0 and 4.0 <= third <= 8.0  # 2 s doubling, jitter x0.5-1


def test_429_waits_as_long_as_retry_after_says():
    in_30s = email.utils.formatdate(time.time() + 30, usegmt=True)
    with OpenAIStub() as stub:
        stub.plan = [fault(429, "rate limited", retry_after="7"), fault(429, retry_after_ms="1500"),
                     fault(503, retry_after=in_30s), fault(429, retry_after="3600")]
        llm = llm_for(stub)
        assert llm.generate("hello") == "echo: hello"
        assert stub.n_requests == 5
    assert llm.sleep[:2] == [7.0, 1.5] and 28.0 <= llm.sleep[2] <= 30.0
    assert llm.sleep[3] == 60.0  # an hour is capped at a minute


def test_retry_after_parsing_and_backoff_bounds():
    assert parse_retry_after({"Retry-After": "120"}) == 120.0
    assert parse_retry_after({"retry-after-ms": "250", "Retry-After": "9"}) == 0.25
    assert parse_retry_after({"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}, now=1445412470.0) == 10.0
    assert parse_retry_after({"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}, now=1445412490.0) == 0.0
    assert parse_retry_after({"Retry-After": "soon"}) is None and parse_retry_after({"Retry-After": "-3"}) is None
    assert parse_retry_after({}) is None
    assert Backoff(base=0).delay(5) == 0.0
    assert all(30.0 <= Backoff(base=1, max_wait=60).delay(6) <= 60.0 for _ in range(20))  # 64 s capped, jittered


def test_a_server_that_keeps_failing_is_given_up_and_not_resent_by_generate_json():
    with OpenAIStub() as stub:
        stub.always = fault(500, "CUDA out of memory")
        llm = llm_for(stub, max_retries=2)
        res = generate_json(llm, "classify", schema=SCHEMA, retries=2)
        assert stub.n_requests == 3  # 1 + max_retries, not multiplied by generate_json's 2 retries
    assert not res.ok and res.backend_failed and res.attempts == 1 and res.fatal is None
    assert res.errors[0].startswith("LLMServerError") and "CUDA out of memory" in res.errors[0]
    assert "gave up after 3 requests" in res.errors[0] and len(llm.sleep) == 2


def test_a_dropped_connection_is_resent_then_given_up():
    with OpenAIStub() as stub:
        stub.plan = [DROP]
        llm = llm_for(stub, max_retries=1)
        assert llm.generate("hello") == "echo: hello" and stub.n_requests == 2
        stub.always = DROP
        with pytest.raises(LLMServerError, match="connection dropped") as info:
            llm.generate("again")
        assert stub.counts["again"] == 2
    assert info.value.status_code is None and info.value.retryable and not info.value.resend


def test_other_4xx_are_not_resent():
    def too_long(prompt, request):
        raise StubHTTPError(413, "This model's maximum context length is 4096 tokens")

    with OpenAIStub(responder=too_long) as stub:
        llm = llm_for(stub)
        with pytest.raises(LLMServerError, match="HTTP 413: This model's maximum context length") as info:
            llm.generate("x")
        assert stub.n_requests == 1 and llm.sleep == []
        res = generate_json(llm, "classify", schema=SCHEMA, retries=2)
        assert stub.n_requests == 2  # generate_json does not send it again either
    assert info.value.retryable and not info.value.resend  # the item fails, the run goes on
    assert res.backend_failed and res.attempts == 1 and "maximum context length" in res.errors[0]


# -- what generate_json resends, what it counts invalid ----------------------------------------------
def test_a_malformed_body_is_resent_with_a_new_seed_then_the_item_fails():
    with OpenAIStub() as stub:
        stub.always = GARBAGE
        llm = llm_for(stub)
        res = generate_json(llm, "classify", schema=SCHEMA, retries=2)
        seeds = [r["seed"] for r in stub.requests]
    assert seeds == [0, 1, 2] and llm.sleep == []  # one request per attempt: a 200 is not a transport failure
    assert res.backend_failed and res.attempts == 3
    assert all(e.startswith("LLMResponseError") and "not JSON" in e for e in res.errors)


def test_a_reply_without_message_content_is_a_response_error():
    with OpenAIStub(responder=lambda p, r: None) as stub:
        with pytest.raises(LLMResponseError, match="sent no text"):
            llm_for(stub).generate("x")


def test_content_that_does_not_fit_the_schema_is_counted_invalid():
    replies = iter(['{"label": "c"}', "Sure! Here it is: a", '{"label": "a"}'])
    with OpenAIStub(responder=lambda p, r: next(replies)) as stub:
        res = generate_json(llm_for(stub), "classify", schema=SCHEMA, retries=2)
        assert stub.n_requests == 3
    assert res.ok and res.value == {"label": "a"} and res.attempts == 3
    assert res.errors[0].startswith("invalid: schema violation at label") and res.errors[1].startswith("invalid: not JSON")
    with OpenAIStub(responder=lambda p, r: '{"label": "c"}') as stub:
        res = generate_json(llm_for(stub), "classify", schema=SCHEMA, retries=1)
    assert not res.ok and not res.backend_failed and res.raw == '{"label": "c"}'  # the model's fault: a reject


def test_a_slow_server_times_out_and_generate_json_tries_again():
    with OpenAIStub(responder=lambda p, r: '{"label": "a"}') as stub:
        stub.plan = [SLOW]  # held until the stub exits; the client gives up after 0.2 s
        llm = llm_for(stub, timeout=0.2)
        with pytest.raises(LLMTimeoutError, match="did not answer within 0.2s"):
            llm.generate("x")
        stub.plan = [SLOW]
        res = generate_json(llm, "classify", schema=SCHEMA, retries=1)
        assert res.ok and res.attempts == 2 and res.errors[0].startswith("LLMTimeoutError")
        assert stub.n_requests == 3 and llm.sleep == []  # a timeout is not resent by the backend itself


def test_server_down_is_a_connection_error_that_stops_at_once():
    llm = OpenAICompatLLM("m", closed_port_host(), sleep=Waits())
    with pytest.raises(LLMConnectionError, match="cannot connect to the OpenAI-compatible server"):
        llm.generate("x")
    res = generate_json(llm, "classify", schema=SCHEMA, retries=2)
    assert isinstance(res.fatal, LLMConnectionError) and res.attempts == 1 and llm.sleep == []


# -- models ---------------------------------------------------------------------------------------
def test_unknown_model_is_not_found_and_check_model_lists_what_there_is(caplog):
    with OpenAIStub(models=("stub-model", "llama3.2:latest")) as stub:
        with pytest.raises(LLMModelNotFoundError, match="does not exist.*/v1/models. lists the names the server serves") as info:
            OpenAICompatLLM("llama9", stub.host).generate("x")
        assert not info.value.retryable
        with pytest.raises(LLMModelNotFoundError, match="it has: stub-model, llama3.2:latest"):
            OpenAICompatLLM("llama9", stub.host, check_model=True)
        OpenAICompatLLM("llama3.2", stub.host, check_model=True)  # ollama's /v1 lists names with :latest
        assert stub.model_lists == 2 and stub.n_requests == 1
        root = stub.host.removesuffix("/v1")
        OpenAICompatLLM("anything", f"{root}/other/v1", check_model=True)  # no /models route: trusted
    assert "has no /models route" in caplog.text


# -- structured output fallbacks --------------------------------------------------------------------
def test_a_server_refusing_openai_json_schema_gets_tgi_form_then_keeps_it(caplog):
    with OpenAIStub(responder=lambda p, r: '{"label": "a"}') as stub:
        stub.formats = {"tgi"}  # TGI answers 422 to OpenAI's shape
        llm = llm_for(stub)
        assert llm.generate("one", json_schema=SCHEMA) == '{"label": "a"}'
        assert llm.generate("two", json_schema=SCHEMA) == '{"label": "a"}'
        shapes = [r["response_format"] for r in stub.requests]
    assert [("json_schema" in s, "value" in s) for s in shapes] == [(True, False), (False, True), (False, True)]
    assert shapes[1]["value"] == {"name": "reply", "schema": SCHEMA}
    assert caplog.text.count("refused OpenAI's json_schema response_format") == 1


def test_a_server_refusing_every_response_format_gets_the_schema_in_the_prompt():
    with OpenAIStub(responder=lambda p, r: '{"label": "b"}') as stub:
        stub.formats = set()
        llm = llm_for(stub)
        assert generate_json(llm, "classify", schema=SCHEMA).value == {"label": "b"}
        assert llm.generate("again", json_schema=SCHEMA) == '{"label": "b"}'
        assert stub.n_requests == 4  # openai 400, tgi 400, prompt-only 200; then prompt-only at once
        last = stub.requests[-1]
    assert "response_format" not in last
    assert last["messages"][-1]["content"].startswith("again\n\nReply with JSON only")
    assert json.dumps(SCHEMA) in last["messages"][-1]["content"]


def test_a_400_that_is_not_about_the_format_is_raised_and_nothing_is_remembered():
    def too_long(prompt, request):
        raise StubHTTPError(400, "prompt too long")

    with OpenAIStub(responder=too_long) as stub:
        llm = llm_for(stub)
        for _ in range(2):
            with pytest.raises(LLMServerError, match="HTTP 400: prompt too long") as info:
                llm.generate("x", json_schema=SCHEMA)
            assert not info.value.resend
        assert stub.n_requests == 6  # each call tries the three forms; the first form stays the default
        assert "json_schema" in stub.requests[3]["response_format"]


# -- concurrency and the factory --------------------------------------------------------------------
def test_generate_many_runs_requests_concurrently():
    barrier = threading.Barrier(3, timeout=10)

    def responder(prompt, request):
        try:  # passes only if three requests are in the server at the same time
            barrier.wait()
        except threading.BrokenBarrierError as err:
            raise StubHTTPError(400, "requests were not concurrent") from err
        return prompt.upper()

    with OpenAIStub(responder=responder) as stub:
        llm = llm_for(stub, concurrency=3)
        assert llm.generate_many(["a", "b", "c"]) == ["A", "B", "C"]


def test_make_llm_builds_the_backend_and_rejects_fields_of_other_backends(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_KEY", SECRET)
    llm = make_llm({"backend": "openai", "model": "m", "host": "http://127.0.0.1:9", "api_key_env": "VLLM_KEY",
                    "max_retries": 1, "backoff": 0.5, "timeout": 3, "concurrency": 2, "cache_dir": str(tmp_path)})
    inner = llm.inner
    assert isinstance(inner, OpenAICompatLLM) and inner.max_retries == 1 and inner.backoff.base == 0.5
    assert llm.describe() == {"backend": "openai", "model": "m", "host": "http://127.0.0.1:9/v1",
                              "cache": str(tmp_path / "responses.jsonl")}
    with pytest.raises(ValueError, match="llm.api_key_env is read by backend 'openai' only"):
        make_llm({"backend": "ollama", "model": "m", "api_key_env": "VLLM_KEY"})
    with pytest.raises(ValueError, match="llm.keep_alive is read by backend 'ollama' only"):
        make_llm({"backend": "openai", "model": "m", "keep_alive": "5m"})
    with pytest.raises(ValueError, match="Did you mean 'openai'"):
        make_llm({"backend": "opena", "model": "m"})
