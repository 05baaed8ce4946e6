"""OpenAI-compatible backend: ``POST {host}/chat/completions`` on vLLM, SGLang, llama.cpp's
``llama-server``, LM Studio, TGI, ollama's ``/v1`` endpoint (or OpenAI's own API).

Client: plain ``httpx`` (already a dependency through ``ollama``), not the official ``openai``
package. The wire format is the contract all those servers implement; the SDK follows OpenAI's
own service (its recent releases bring their own HTTP stack, ``httpx2``) and its retries, error
classes and headers would all have to be switched off or translated to give the behaviour below,
which is easier to state and test when it is ours. Only what every one of those servers serves
is used: ``POST /chat/completions`` (non-streaming) and ``GET /models``.

Behaviour, the same as :class:`~medvlm.llm.ollama_backend.OllamaLLM` where both apply:

- **Failures** map onto the :class:`~medvlm.llm.base.LLMError` family: connection refused ->
  :class:`LLMConnectionError` (not retryable: the scripts exit 2); HTTP 404 -> model not found;
  401/403 -> :class:`LLMAuthError` (not retryable); a timeout -> :class:`LLMTimeoutError`; a body
  that is not a chat completion -> :class:`LLMResponseError` (both resent by ``generate_json``
  with a new seed, then the item is invalid, as with Ollama).
- **Retries**: HTTP 408, 429 and 5xx and a dropped connection are resent here, up to
  ``max_retries`` times, after the server's ``Retry-After`` or an exponential backoff
  (:mod:`medvlm.llm.retry`); then :class:`LLMServerError` with ``resend=False``, so
  ``generate_json`` does not multiply these retries by its own. Other 4xx are not resent.
- **JSON schema**: sent as OpenAI's structured-output ``response_format`` (``type:
  json_schema``, ``strict: true``). A server that refuses it (HTTP 400/422) gets, once, TGI's form
  of the same (``{"type": "json_schema", "value": {...}}``, TGI's ``GrammarType`` in
  ``router/src/lib.rs``), then no ``response_format`` at all with the schema written into the prompt
  (as for local models). The first form the server accepts is kept for the rest of the run and
  logged once. Every reply is validated against the schema by the caller either way.
- **API key**: from ``$OPENAI_API_KEY``, or from the variable ``api_key_env`` names; sent only as
  an ``Authorization: Bearer`` header, never written to a cache, a manifest, a log or an error.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from medvlm.llm.base import (
    LLMAuthError,
    LLMConnectionError,
    LLMError,
    LLMModelNotFoundError,
    LLMResponseError,
    LLMServerError,
    LLMTimeoutError,
    TextLLM,
)
from medvlm.llm.jsonout import JSON_INSTRUCTION
from medvlm.llm.retry import Backoff, parse_retry_after, should_retry_status

logger = logging.getLogger(__name__)

DEFAULT_HOST = "http://127.0.0.1:8000/v1"  # vLLM's default port; others: --judge-host / llm.host
DEFAULT_KEY_ENV = "OPENAI_API_KEY"
SCHEMA_NAME = "reply"
# How a JSON schema is sent, best first (see the module docstring).
FORMATS = ("openai", "tgi", "prompt")
# Ollama's option names that OpenAI's API spells differently; other keys are sent as they are.
OPTION_NAMES = {"num_predict": "max_tokens"}


def api_base(host: str) -> str:
    """The API base URL: ``http://h:8000`` and ``http://h:8000/`` become ``http://h:8000/v1``;
    any other path (``/v1``, ``/openai/v1``) is kept without a trailing slash."""
    host = host.strip().rstrip("/")
    if "://" not in host:
        host = f"http://{host}"
    return host if urlsplit(host).path else f"{host}/v1"


def redact(url: str) -> str:
    """``url`` without a ``user:password@`` part, fit for manifests and messages."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def chat_options(options: dict) -> dict:
    """Sampling options in Ollama's vocabulary as chat-completion fields (``num_predict`` ->
    ``max_tokens``, dropped when <= 0: Ollama's "no limit"); other keys pass through as-is."""
    out: dict[str, Any] = {}
    for key, value in options.items():
        name = OPTION_NAMES.get(key, key)
        if name == "max_tokens" and (value is None or int(value) <= 0):
            continue
        out[name] = value
    return out


def response_format(level: str, schema: dict) -> dict | None:
    if level == "openai":
        return {"type": "json_schema", "json_schema": {"name": SCHEMA_NAME, "schema": schema, "strict": True}}
    if level == "tgi":
        return {"type": "json_schema", "value": {"name": SCHEMA_NAME, "schema": schema}}
    return None


def error_message(resp: httpx.Response) -> str:
    """The server's own words from an error body (OpenAI, vLLM, TGI and llama.cpp shapes), short."""
    text = resp.text.strip()
    try:
        body = json.loads(text)
    except ValueError:
        return text[:300] or "(empty body)"
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict) and err.get("message"):
        return str(err["message"])[:300]
    if isinstance(err, str):
        return err[:300]
    if isinstance(body, dict) and body.get("message"):
        return str(body["message"])[:300]
    return text[:300]


class OpenAICompatLLM(TextLLM):
    """Chat with ``model`` on an OpenAI-compatible server.

    Args:
        model: the name the server serves (``GET {host}/models`` lists them).
        host: API base URL; default ``$OPENAI_BASE_URL``, then ``http://127.0.0.1:8000/v1``.
            ``/v1`` is added to a URL without a path.
        api_key_env: environment variable holding the key; default ``OPENAI_API_KEY`` (no key is
            sent when that one is unset: local servers need none). A named variable that is unset
            is an error.
        timeout: seconds to wait for one response before :class:`LLMTimeoutError`.
        concurrency: default parallel requests in :meth:`generate_many`.
        options: default sampling options (default greedy: ``temperature=0, seed=0``).
        check_model: ask ``GET /models`` at construction whether ``model`` is served.
        max_retries: resends of a 408/429/5xx answer or a dropped connection.
        backoff: seconds before the first resend (doubling, with jitter) when the server gives no
            ``Retry-After``; 0 resends at once.
        sleep: the wait function (tests pass a recorder instead of sleeping).
    """

    backend = "openai"

    def __init__(
        self,
        model: str,
        host: str | None = None,
        *,
        api_key_env: str | None = None,
        timeout: float = 120.0,
        concurrency: int = 1,
        options: dict | None = None,
        check_model: bool = False,
        max_retries: int = 4,
        backoff: float = 1.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not model:
            raise ValueError("OpenAICompatLLM needs a model name, e.g. OpenAICompatLLM('Qwen/Qwen2.5-7B-Instruct')")
        if int(max_retries) < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        self.model = model
        self.base_url = api_base(host or os.environ.get("OPENAI_BASE_URL") or DEFAULT_HOST)
        self.host = redact(self.base_url)
        self.api_key_env = api_key_env or DEFAULT_KEY_ENV
        key = os.environ.get(self.api_key_env, "")
        if api_key_env and not key:
            raise ValueError(f"api_key_env names {api_key_env}, but ${api_key_env} is not set; export it "
                             f"or drop api_key_env (then ${DEFAULT_KEY_ENV} is used when set)")
        self.timeout = timeout
        self.concurrency = max(1, int(concurrency))
        self.default_options = {"temperature": 0, "seed": 0, **(options or {})}
        self.max_retries = int(max_retries)
        self.backoff = Backoff(base=float(backoff))
        self.sleep = sleep
        self._sends_key = bool(key)  # whether a key is sent; the key itself is kept only in the client's headers
        self._format = 0  # index into FORMATS: the best form this server accepted so far
        self._format_lock = threading.Lock()
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        # httpx.Client is thread-safe: one connection pool serves all workers.
        self.client = httpx.Client(timeout=timeout, headers=headers,
                                   limits=httpx.Limits(max_connections=max(10, self.concurrency)))
        if check_model:
            self.check_model()

    def describe(self) -> dict:
        return {"backend": self.backend, "model": self.model, "host": self.host}

    # -- models --------------------------------------------------------------------------------
    def list_models(self) -> list[str]:
        """Ids the server lists at ``GET /models``."""
        resp = self._send("GET", "/models")
        try:
            data = resp.json()["data"]
            return [str(m["id"]) for m in data]
        except (ValueError, KeyError, TypeError) as err:
            raise LLMResponseError(f"{self.host}/models did not answer a model list ({err!r}): "
                                   f"{resp.text[:200]!r}") from err

    def check_model(self) -> None:
        """Raise :class:`LLMModelNotFoundError` listing what the server has when ``model`` is not
        among ``GET /models`` (an Ollama name without a tag matches its ``:latest``). A server
        without that route (404) is trusted and only logged."""
        try:
            names = self.list_models()
        except LLMModelNotFoundError:
            logger.warning("%s has no /models route; the model name %r is not checked", self.host, self.model)
            return
        tagged = {n if ":" in n else f"{n}:latest" for n in names}
        wanted = self.model if ":" in self.model else f"{self.model}:latest"
        if self.model not in names and wanted not in tagged:
            raise LLMModelNotFoundError(
                f"model {self.model!r} is not served by {self.host} (it has: {', '.join(names) or 'no models'}); "
                "give one of those names, or start the server with this model"
            )

    # -- chat ----------------------------------------------------------------------------------
    def generate(
        self,
        prompt: str,
        *,
        system: str | None = None,
        json_schema: dict | None = None,
        options: dict | None = None,
    ) -> str:
        body: dict[str, Any] = {"model": self.model, "stream": False,
                                **chat_options({**self.default_options, **(options or {})})}
        if json_schema is None:
            return self._chat({**body, "messages": self._messages(prompt, system)})
        start = self._format
        for level in range(start, len(FORMATS)):
            fmt = response_format(FORMATS[level], json_schema)
            asked = prompt if fmt else prompt + JSON_INSTRUCTION.format(schema=json.dumps(json_schema))
            request = {**body, "messages": self._messages(asked, system)}
            if fmt:
                request["response_format"] = fmt
            try:
                text = self._chat(request)
            except LLMServerError as err:
                if err.status_code in (400, 422) and level + 1 < len(FORMATS):
                    logger.debug("%s refused response_format %s: %s", self.host, FORMATS[level], err)
                    continue
                raise
            if level != start:
                self._settle_format(level)
            return text
        raise AssertionError("unreachable: the last format is always sent")  # pragma: no cover

    def _settle_format(self, level: int) -> None:
        with self._format_lock:
            if level <= self._format:
                return
            self._format = level
        how = {"tgi": "TGI's form of response_format ({'type': 'json_schema', 'value': ...})",
               "prompt": "no response_format; the schema is written into the prompt"}[FORMATS[level]]
        logger.warning("%s refused OpenAI's json_schema response_format; using %s from now on "
                       "(replies are still validated against the schema)", self.host, how)

    @staticmethod
    def _messages(prompt: str, system: str | None) -> list[dict]:
        messages = [{"role": "system", "content": system}] if system else []
        return messages + [{"role": "user", "content": prompt}]

    def _chat(self, request: dict) -> str:
        resp = self._send("POST", "/chat/completions", json=request)
        try:
            data = resp.json()
        except ValueError as err:
            raise LLMResponseError(f"{self.host} sent a malformed response (not JSON): {resp.text[:200]!r}") from err
        try:
            choice = data["choices"][0]
            content = choice["message"]["content"]
        except (KeyError, IndexError, TypeError) as err:
            raise LLMResponseError(f"{self.host} sent a response without choices[0].message.content: "
                                   f"{resp.text[:200]!r}") from err
        if not isinstance(content, str):
            raise LLMResponseError(f"{self.host} sent no text (content={content!r}, "
                                   f"finish_reason={choice.get('finish_reason')!r})")
        return content

    # -- transport -----------------------------------------------------------------------------
    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One request, resent after a wait on 408/429/5xx or a dropped connection; errors mapped."""
        url = self.base_url + path
        failure, status, wait = "", None, 0.0
        for attempt in range(self.max_retries + 1):
            if attempt:
                logger.info("%s %s: %s; retry %d of %d in %.2f s", method, path, failure, attempt,
                            self.max_retries, wait)
                self.sleep(wait)
            try:
                resp = self.client.request(method, url, **kwargs)
            except httpx.ConnectError as err:
                raise LLMConnectionError(
                    f"cannot connect to the OpenAI-compatible server at {self.host}: start it (e.g. "
                    "`vllm serve MODEL`, `llama-server -m FILE`), or point the `host` setting / --judge-host / "
                    "OPENAI_BASE_URL at a running server"
                ) from err
            except httpx.TimeoutException as err:
                raise LLMTimeoutError(f"{self.host} did not answer within {self.timeout}s; raise `timeout` "
                                      "or lower `concurrency`") from err
            except httpx.TransportError as err:  # the server dropped the connection mid-request
                failure, status = f"connection dropped ({type(err).__name__}: {err})", None
                wait = self.backoff.delay(attempt)
                continue
            if resp.is_success:
                return resp
            if not should_retry_status(resp.status_code):
                raise self._status_error(resp, path)
            failure, status = f"HTTP {resp.status_code}: {error_message(resp)}", resp.status_code
            wait = self.backoff.delay(attempt, parse_retry_after(resp.headers))
        err = LLMServerError(f"{self.host} gave up after {self.max_retries + 1} requests (max_retries="
                             f"{self.max_retries}); last: {failure}", status)
        err.resend = False  # retried here with backoff already
        raise err

    def _status_error(self, resp: httpx.Response, path: str) -> LLMError:
        status, msg = resp.status_code, error_message(resp)
        if status in (401, 403):
            sent = "the API key" if self._sends_key else f"the request (no key sent: ${self.api_key_env} is unset)"
            return LLMAuthError(f"{self.host} refused {sent} (HTTP {status}: {msg}); set ${self.api_key_env} "
                                "to a key the server accepts (or `api_key_env` / --judge-api-key-env to the "
                                "variable holding it)")
        if status == 404:
            return LLMModelNotFoundError(
                f"{self.host}{path} answered 404 for model {self.model!r} ({msg}); `GET {self.host}/models` lists "
                "the names the server serves, and `host` must be the API base (ending in /v1)"
            )
        err = LLMServerError(f"{self.host} answered HTTP {status}: {msg}", status)
        err.resend = False  # the server refused the request itself: sending it again changes nothing
        return err

    def close(self) -> None:
        self.client.close()
