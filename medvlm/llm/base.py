"""The one interface every text-LLM backend speaks, and the errors it raises.

QA generation and the judge only see :class:`TextLLM`: ``generate(prompt) -> str``. A backend
maps its own failures onto the :class:`LLMError` family so callers can tell a server that is
down (stop, nothing to retry) from a slow or failing one (retry, then count the item invalid).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

logger = logging.getLogger(__name__)


class LLMError(RuntimeError):
    """A backend failed to produce a response.

    ``retryable`` says whether the *run* may go on: False means nothing will work until the user
    acts (server down, model missing, key refused), so callers stop. ``resend`` says whether
    sending *this request* again may help: False when the backend already retried it itself
    (with backoff) or when the server refused the request as such (HTTP 4xx), so
    :func:`~medvlm.llm.jsonout.generate_json` counts the item failed instead of multiplying the
    backend's retries by its own.
    """

    retryable = True
    resend = True


class LLMConnectionError(LLMError):
    """The server cannot be reached at all (connection refused, DNS): retrying will not help."""

    retryable = False


class LLMTimeoutError(LLMError):
    """The server took longer than the client timeout."""


class LLMServerError(LLMError):
    """The server answered with an HTTP error (e.g. 500)."""

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class LLMModelNotFoundError(LLMError):
    """The model is not available on the backend; the message says how to get it."""

    retryable = False


class LLMAuthError(LLMError):
    """The server refused the API key (HTTP 401/403): retrying will not help."""

    retryable = False


class LLMResponseError(LLMError):
    """The server answered, but the answer is not a well-formed response (garbage body, no content)."""


class TextLLM(ABC):
    """A text-in, text-out language model.

    Subclasses set ``backend`` (a short name such as ``"ollama"``) and ``model`` and implement
    :meth:`generate`. ``concurrency`` is the default number of parallel requests in
    :meth:`generate_many` (1 for local models, more for servers).
    """

    backend: str = "base"
    model: str = ""
    concurrency: int = 1

    @abstractmethod
    def generate(
        self,
        prompt: str,
        *,
        system: str | None = None,
        json_schema: dict | None = None,
        options: dict | None = None,
    ) -> str:
        """Return the model's reply to ``prompt``.

        Args:
            prompt: the user message.
            system: an optional system message.
            json_schema: when given, the reply should be JSON matching this schema (servers that
                support it constrain decoding; local models are asked and re-sampled).
            options: sampling options in Ollama's vocabulary (``temperature``, ``seed``,
                ``top_p``, ``num_predict``); unknown keys are passed to the backend as-is.

        Raises:
            LLMError: (a subclass of) when no response could be produced.
        """

    def generate_many(
        self,
        prompts: Sequence[str],
        *,
        system: str | None = None,
        json_schema: dict | None = None,
        options: dict | None = None,
        concurrency: int | None = None,
        return_exceptions: bool = False,
    ) -> list[str | LLMError]:
        """Generate for each prompt, up to ``concurrency`` at a time; results keep the input order.

        With ``return_exceptions=True`` a failed prompt yields its :class:`LLMError` in place of
        the text (like ``asyncio.gather``); otherwise the first error is raised.
        """
        workers = max(1, int(concurrency or self.concurrency or 1))

        def one(prompt: str) -> str | LLMError:
            try:
                return self.generate(prompt, system=system, json_schema=json_schema, options=options)
            except LLMError as err:
                if return_exceptions:
                    return err
                raise

        if workers == 1 or len(prompts) <= 1:
            return [one(p) for p in prompts]
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"{self.backend}-llm") as pool:
            return list(pool.map(one, prompts))

    def describe(self) -> dict[str, Any]:
        """What to write into a manifest or a record's meta about this backend."""
        return {"backend": self.backend, "model": self.model}

    def close(self) -> None:  # noqa: B027 - optional hook, most backends hold nothing
        """Release network clients or model memory; the default does nothing."""


def retry_options(options: dict | None, attempt: int, retry_temperature: float = 0.7) -> dict:
    """Options for retry number ``attempt`` (0 = first try, returned unchanged).

    A retry must differ from the try before it, otherwise a deterministic backend (and the disk
    cache, keyed on options) answers the same invalid text again. So retry ``k`` adds ``k`` to the
    seed and lifts a greedy temperature (<= 0) to ``retry_temperature``.
    """
    opts = dict(options or {})
    if attempt <= 0:
        return opts
    opts["seed"] = int(opts.get("seed", 0)) + attempt
    if float(opts.get("temperature", retry_temperature)) <= 0:
        opts["temperature"] = retry_temperature
    return opts
