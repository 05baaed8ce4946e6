"""A stand-in OpenAI-compatible server for tests: real HTTP on 127.0.0.1, the shapes vLLM, llama.cpp,
LM Studio and ollama's ``/v1`` answer.

``POST /v1/chat/completions`` (non-streaming) answers ``{"object": "chat.completion", "choices":
[{"message": {"role": "assistant", "content": ...}, "finish_reason": "stop"}], ...}``; ``GET
/v1/models`` lists ``{"object": "list", "data": [{"id": ...}]}``; errors are ``{"error":
{"message", "type", "code"}}`` with the HTTP status.

Scriptable behaviours (attributes, changeable while running):
    responder(prompt, request) -> content   the canned model; may raise StubHTTPError(status)
    plan                                     faults for the next chat requests, one each, in order:
                                             ``fault(500)``, ``fault(429, retry_after="2")``,
                                             ``GARBAGE`` (a body that is not JSON), ``DROP`` (the
                                             connection closed with no answer), ``SLOW`` (held on
                                             ``release`` until the stub exits)
    always                                   a fault for every chat request once ``plan`` is empty
    formats                                  response_format shapes accepted: "openai"
                                             (``json_schema``), "tgi" (``value``); any other is
                                             answered 400 (OpenAI-style) or 422 (TGI-style)
    models                                   names served; others get a 404 as vLLM sends it
    api_key                                  when set, requests need ``Authorization: Bearer <key>``

Counting: ``requests`` chat request bodies (every one, faults included), ``auth`` the
Authorization header of each request, ``counts[prompt]`` chat requests per prompt (the last user
message), ``model_lists`` GET /v1/models calls.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from ollama_stub import StubHTTPError

DEFAULT_MODEL = "stub-model"
GARBAGE, DROP, SLOW = "garbage", "drop", "slow"


def fault(status: int, message: str = "stub failure", retry_after: str | None = None,
          retry_after_ms: str | None = None) -> dict:
    """An HTTP error answer for ``plan`` / ``always``, optionally with Retry-After headers."""
    headers = {}
    if retry_after is not None:
        headers["Retry-After"] = retry_after
    if retry_after_ms is not None:
        headers["retry-after-ms"] = retry_after_ms
    return {"status": status, "message": message, "headers": headers}


def echo_responder(prompt: str, request: dict) -> str:
    return f"echo: {prompt}"


class OpenAIStub:
    """Context manager: starts the server on a free port in a background thread, stops it on exit."""

    def __init__(self, responder: Callable[[str, dict], str] = echo_responder,
                 models: tuple[str, ...] = (DEFAULT_MODEL,), api_key: str | None = None) -> None:
        self.responder = responder
        self.models = list(models)
        self.api_key = api_key
        self.plan: list = []
        self.always: object = None
        self.formats = {"openai", "tgi"}
        self.release = threading.Event()
        self.requests: list[dict] = []
        self.auth: list[str | None] = []
        self.counts: Counter[str] = Counter()
        self.model_lists = 0
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> OpenAIStub:
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output quiet
                pass

            def do_GET(self) -> None:
                stub._handle(self, "GET", None)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                stub._handle(self, "POST", self.rfile.read(length))

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.release.set()  # free any request held by SLOW
        assert self._server is not None
        self._server.shutdown()
        self._server.server_close()

    @property
    def host(self) -> str:
        """The API base, as a user passes it (``--judge-host``, ``llm.host``)."""
        assert self._server is not None, "use the stub inside `with OpenAIStub() as stub:`"
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    @property
    def n_requests(self) -> int:
        return len(self.requests)

    # -- request handling ------------------------------------------------------------------
    @staticmethod
    def _reply(handler: BaseHTTPRequestHandler, status: int, body: bytes, headers: dict | None = None) -> None:
        try:
            handler.send_response(status)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(body)))
            for name, value in (headers or {}).items():
                handler.send_header(name, value)
            handler.end_headers()
            handler.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up first (a timeout test): nothing left to answer

    def _error(self, handler, status: int, message: str, headers: dict | None = None) -> None:
        body = {"error": {"message": message, "type": "StubError", "code": status}}
        self._reply(handler, status, json.dumps(body).encode(), headers)

    def _handle(self, handler: BaseHTTPRequestHandler, method: str, raw: bytes | None) -> None:
        auth = handler.headers.get("Authorization")
        with self._lock:
            self.auth.append(auth)
        if self.api_key is not None and auth != f"Bearer {self.api_key}":
            return self._error(handler, 401, "Incorrect API key provided")
        if method == "GET" and handler.path == "/v1/models":
            with self._lock:
                self.model_lists += 1
            data = [{"id": m, "object": "model", "created": 0, "owned_by": "stub"} for m in self.models]
            return self._reply(handler, 200, json.dumps({"object": "list", "data": data}).encode())
        if method != "POST" or handler.path != "/v1/chat/completions":
            return self._error(handler, 404, f"no route {method} {handler.path}")
        body = json.loads(raw or b"{}")
        users = [m.get("content", "") for m in body.get("messages", []) if m.get("role") == "user"]
        prompt = users[-1] if users else ""
        with self._lock:
            self.requests.append(body)
            self.counts[prompt] += 1
            action = self.plan.pop(0) if self.plan else self.always
        if action == SLOW:
            self.release.wait(timeout=30)
        elif action == DROP:
            handler.close_connection = True  # no status line, no body: the client sees a disconnect
            return None
        elif action == GARBAGE:
            return self._reply(handler, 200, b"<html>502 Bad Gateway</html> this is not json")
        elif isinstance(action, dict):
            return self._error(handler, action["status"], action["message"], action["headers"])
        if body.get("model") not in self.models:
            return self._error(handler, 404, f"The model `{body.get('model')}` does not exist.")
        refused = self._refused_format(body.get("response_format"))
        if refused:
            return self._error(handler, *refused)
        try:
            content = self.responder(prompt, body)
        except StubHTTPError as err:
            return self._error(handler, err.status, err.message)
        reply = {"id": f"chatcmpl-{len(self.requests)}", "object": "chat.completion", "created": 0,
                 "model": body["model"], "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                 "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                              "finish_reason": "stop"}]}
        return self._reply(handler, 200, json.dumps(reply).encode())

    def _refused_format(self, fmt: dict | None) -> tuple[int, str] | None:
        """(status, message) when this server would refuse ``response_format``, else None."""
        if fmt is None:
            return None
        shape = "openai" if "json_schema" in fmt else "tgi" if "value" in fmt else "other"
        if shape in self.formats:
            return None
        if "tgi" in self.formats:  # TGI's JSON extractor: an adjacently tagged enum needs `value`
            return 422, "Failed to deserialize the JSON body into the target type: response_format: missing field `value`"
        return 400, f"response_format {fmt.get('type')!r} is not supported"
