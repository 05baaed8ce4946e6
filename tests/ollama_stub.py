"""A stand-in Ollama server for tests: real HTTP on 127.0.0.1, the REST shapes the client uses.

It speaks what ``ollama`` 0.6's ``Client`` sends and parses (``ollama/_client.py``,
``_types.py``): ``POST /api/chat`` and ``POST /api/generate`` with ``stream: false`` answer one
JSON object (``message.content`` / ``response``, ``done: true``); ``GET /api/tags`` lists
``{"models": [{"model": ...}]}``; errors are a JSON ``{"error": ...}`` body with the HTTP status.

Scriptable behaviours (attributes, changeable while running):
    responder(prompt, request) -> content   the canned model; may raise StubHTTPError(status)
    fail_status = 500                        every model request answers that status
    garbage_body = True                      the body is not JSON at all
    slow = True                              requests wait on ``release`` (an Event) before answering
    models                                   names known to the server; others get a 404

Counting: ``counts[prompt]`` requests per prompt (the last user message), ``requests`` all
request bodies, ``formats`` the ``format`` field of each model request.

    with OllamaStub(responder=lambda p, r: "hi") as stub:
        OllamaLLM("stub-model", host=stub.host).generate("hello")
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

DEFAULT_MODEL = "stub-model:latest"


class StubHTTPError(Exception):
    """Raise from a responder to answer with this HTTP status and message."""

    def __init__(self, status: int, message: str = "stub failure") -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _tagged(name: str) -> str:
    """Ollama resolves an untagged name to ``:latest``."""
    return name if ":" in name else f"{name}:latest"


def echo_responder(prompt: str, request: dict) -> str:
    return f"echo: {prompt}"


class OllamaStub:
    """Context manager: starts the server on a free port in a background thread, stops it on exit."""

    def __init__(
        self,
        responder: Callable[[str, dict], str] = echo_responder,
        models: tuple[str, ...] = (DEFAULT_MODEL,),
    ) -> None:
        self.responder = responder
        self.models = list(models)
        self.fail_status: int | None = None
        self.garbage_body = False
        self.slow = False
        self.release = threading.Event()
        self.counts: Counter[str] = Counter()
        self.requests: list[dict] = []
        self.formats: list[object] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> OllamaStub:
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
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release.set()  # free any request held by ``slow``
        assert self._server is not None
        self._server.shutdown()
        self._server.server_close()

    @property
    def host(self) -> str:
        assert self._server is not None, "use the stub inside `with OllamaStub() as stub:`"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def n_requests(self) -> int:
        return len(self.requests)

    def max_count(self) -> int:
        """Most requests any single prompt received (1 means no prompt was sent twice)."""
        return max(self.counts.values(), default=0)

    # -- request handling ------------------------------------------------------------------
    @staticmethod
    def _reply(handler: BaseHTTPRequestHandler, status: int, body: bytes) -> None:
        try:
            handler.send_response(status)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(body)))
            handler.end_headers()
            handler.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up first (a timeout test): nothing left to answer

    def _json(self, handler, status: int, obj: dict) -> None:
        self._reply(handler, status, json.dumps(obj).encode())

    def _handle(self, handler: BaseHTTPRequestHandler, method: str, raw: bytes | None) -> None:
        path = handler.path
        if method == "GET" and path == "/api/tags":
            return self._json(handler, 200, {"models": [{"model": m, "name": m} for m in self.models]})
        if method != "POST" or path not in ("/api/chat", "/api/generate"):
            return self._json(handler, 404, {"error": f"no route {method} {path}"})
        body = json.loads(raw or b"{}")
        prompt = self._prompt(path, body)
        with self._lock:
            self.requests.append(body)
            self.counts[prompt] += 1
            self.formats.append(body.get("format"))
        if self.slow:
            self.release.wait(timeout=30)
        if _tagged(str(body.get("model"))) not in {_tagged(m) for m in self.models}:
            return self._json(handler, 404, {"error": f"model '{body.get('model')}' not found"})
        if self.fail_status is not None:
            return self._json(handler, self.fail_status, {"error": "stub: internal server error"})
        if self.garbage_body:
            return self._reply(handler, 200, b"<html>this is not json")
        try:
            content = self.responder(prompt, body)
        except StubHTTPError as err:
            return self._json(handler, err.status, {"error": err.message})
        base = {"model": body["model"], "created_at": "2025-01-01T00:00:00Z", "done": True, "done_reason": "stop"}
        if path == "/api/chat":
            return self._json(handler, 200, {**base, "message": {"role": "assistant", "content": content}})
        return self._json(handler, 200, {**base, "response": content})

    @staticmethod
    def _prompt(path: str, body: dict) -> str:
        if path == "/api/generate":
            return str(body.get("prompt", ""))
        users = [m.get("content", "") for m in body.get("messages", []) if m.get("role") == "user"]
        return users[-1] if users else ""
