"""Ollama backend: the user's own server, through the official ``ollama`` Python client.

Requests go to ``/api/chat`` (non-streaming). A JSON schema is passed as ``format=<schema>``,
Ollama's structured-output mode, so the server constrains decoding to the schema. Every client
failure is mapped to an :class:`~medvlm.llm.base.LLMError` whose message says what to do.
"""

from __future__ import annotations

import json
import logging
import os

import httpx
import ollama
import pydantic

from medvlm.llm.base import (
    LLMConnectionError,
    LLMModelNotFoundError,
    LLMResponseError,
    LLMServerError,
    LLMTimeoutError,
    TextLLM,
)

logger = logging.getLogger(__name__)

DEFAULT_HOST = "http://127.0.0.1:11434"


def _same_model(wanted: str, available: str) -> bool:
    """Ollama names default to the ``:latest`` tag: ``llama3.2`` and ``llama3.2:latest`` match."""

    def norm(name: str) -> str:
        return name if ":" in name else f"{name}:latest"

    return norm(wanted) == norm(available)


class OllamaLLM(TextLLM):
    """Chat with ``model`` on an Ollama server.

    Args:
        model: an Ollama model name, e.g. ``"llama3.1:8b"``.
        host: server address; default ``$OLLAMA_HOST``, then ``http://127.0.0.1:11434``.
        timeout: seconds to wait for one response before :class:`LLMTimeoutError`.
        keep_alive: how long the server keeps the model loaded (``"5m"``, seconds, or -1).
        concurrency: default parallel requests in :meth:`generate_many`; match the server's
            ``OLLAMA_NUM_PARALLEL``.
        options: default sampling options merged under each call's options
            (default: greedy, ``temperature=0``, ``seed=0``, for reproducible outputs).
        check_model: ask the server at construction whether ``model`` is pulled.
    """

    backend = "ollama"

    def __init__(
        self,
        model: str,
        host: str | None = None,
        *,
        timeout: float = 120.0,
        keep_alive: str | float | None = None,
        concurrency: int = 1,
        options: dict | None = None,
        check_model: bool = False,
    ) -> None:
        if not model:
            raise ValueError("OllamaLLM needs a model name, e.g. OllamaLLM('llama3.1:8b')")
        self.model = model
        self.host = host or os.environ.get("OLLAMA_HOST") or DEFAULT_HOST
        self.timeout = timeout
        self.keep_alive = keep_alive
        self.concurrency = max(1, int(concurrency))
        self.default_options = {"temperature": 0, "seed": 0, **(options or {})}
        # httpx.Client (inside ollama.Client) is thread-safe, so one client serves all workers.
        self.client = ollama.Client(host=self.host, timeout=timeout)
        if check_model:
            self.check_model()

    def describe(self) -> dict:
        return {"backend": self.backend, "model": self.model, "host": self.host}

    def list_models(self) -> list[str]:
        """Names of the models pulled on the server (``GET /api/tags``)."""
        resp = self._call(self.client.list)
        return [m.model for m in resp.models if m.model]

    def check_model(self) -> None:
        """Raise :class:`LLMModelNotFoundError` (with the ``ollama pull`` command) if the model is missing."""
        names = self.list_models()
        if not any(_same_model(self.model, n) for n in names):
            raise LLMModelNotFoundError(
                f"model {self.model!r} is not on the Ollama server at {self.host} "
                f"(it has: {', '.join(names) or 'no models'}); run `ollama pull {self.model}`"
            )

    def generate(
        self,
        prompt: str,
        *,
        system: str | None = None,
        json_schema: dict | None = None,
        options: dict | None = None,
    ) -> str:
        messages = []
        if system:
            messages.append({"role": "system", "content": system})
        messages.append({"role": "user", "content": prompt})
        resp = self._call(
            self.client.chat,
            model=self.model,
            messages=messages,
            format=json_schema,
            options={**self.default_options, **(options or {})},
            keep_alive=self.keep_alive,
        )
        content = getattr(resp.message, "content", None)
        if not isinstance(content, str):
            raise LLMResponseError(f"Ollama at {self.host} returned a chat response without message content")
        return content

    def _call(self, fn, **kwargs):
        """Run one client call and translate its failures into :class:`LLMError` subclasses."""
        try:
            return fn(**kwargs)
        except ConnectionError as err:  # the client turns httpx.ConnectError into this builtin
            raise LLMConnectionError(
                f"cannot connect to Ollama at {self.host}: start it with `ollama serve`, "
                "or point OLLAMA_HOST / the `host` setting at a running server"
            ) from err
        except httpx.TimeoutException as err:
            raise LLMTimeoutError(
                f"Ollama at {self.host} did not answer within {self.timeout}s; raise `timeout` "
                "or lower `concurrency`"
            ) from err
        except ollama.ResponseError as err:
            if err.status_code == 404:
                raise LLMModelNotFoundError(
                    f"Ollama at {self.host} has no model {self.model!r} ({err.error}); "
                    f"run `ollama pull {self.model}`"
                ) from err
            raise LLMServerError(
                f"Ollama at {self.host} answered HTTP {err.status_code}: {err.error}", err.status_code
            ) from err
        except (json.JSONDecodeError, pydantic.ValidationError) as err:
            raise LLMResponseError(f"Ollama at {self.host} sent a malformed response: {err}") from err
        except httpx.HTTPError as err:  # e.g. the server closed the connection mid-response
            raise LLMServerError(f"HTTP failure talking to Ollama at {self.host}: {err!r}") from err

    def close(self) -> None:
        self.client.close()
