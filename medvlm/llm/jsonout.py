"""Structured (JSON) answers from a text LLM: parse, validate against a schema, retry.

Parsing is strict on purpose: the text must be one JSON value, optionally wrapped in a single
Markdown code fence (small local models add one even when told not to). Validation uses
``jsonschema`` so the same schema that constrains an Ollama server checks every backend.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jsonschema

from medvlm.llm.base import LLMError, TextLLM, retry_options

logger = logging.getLogger(__name__)

# Appended to the prompt when the backend cannot constrain decoding to the schema itself.
JSON_INSTRUCTION = (
    "\n\nReply with JSON only (no prose, no code fence) that matches this JSON schema:\n{schema}"
)

_FENCE = re.compile(r"^```(?:json)?\s*\n?(.*?)\n?```$", re.DOTALL)


class InvalidJSONAnswer(ValueError):
    """The reply is not JSON, or not JSON matching the schema; the message says which part failed."""


def parse_json(text: str) -> Any:
    """Parse ``text`` as exactly one JSON value (an optional ```json fence is removed)."""
    if not isinstance(text, str):
        raise InvalidJSONAnswer(f"expected a string reply, got {type(text).__name__}")
    stripped = text.strip()
    fenced = _FENCE.match(stripped)
    if fenced:
        stripped = fenced.group(1).strip()
    try:
        return json.loads(stripped)
    except json.JSONDecodeError as err:
        preview = stripped[:80].replace("\n", " ")
        raise InvalidJSONAnswer(f"not JSON ({err.msg} at char {err.pos}): {preview!r}") from err


def validate_json(obj: Any, schema: dict) -> Any:
    """Check ``obj`` against ``schema``; raise :class:`InvalidJSONAnswer` naming the failing path."""
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path))
    if errors:
        err = errors[0]
        where = "/".join(str(p) for p in err.absolute_path) or "<root>"
        raise InvalidJSONAnswer(f"schema violation at {where}: {err.message}")
    return obj


def parse_and_validate(text: str, schema: dict) -> Any:
    """:func:`parse_json` then :func:`validate_json`."""
    return validate_json(parse_json(text), schema)


@dataclass
class JSONResult:
    """Outcome of :func:`generate_json`.

    ``ok`` says whether ``value`` holds a validated object; ``errors`` holds one
    reason per failed attempt (``"invalid: ..."`` or ``"LLMServerError: ..."``); ``raw`` is the
    last text received (kept for the reject log).
    """

    value: Any = None
    raw: str | None = None
    attempts: int = 0
    errors: list[str] = field(default_factory=list)
    fatal: LLMError | None = None
    ok: bool = False

    @property
    def backend_failed(self) -> bool:
        """True when no attempt got a reply at all (the failure is the server's, not the model's)."""
        return not self.ok and self.raw is None


def generate_json(
    llm: TextLLM,
    prompt: str,
    *,
    schema: dict,
    system: str | None = None,
    options: dict | None = None,
    retries: int = 2,
    check: Callable[[Any], Any] | None = None,
) -> JSONResult:
    """Ask ``llm`` for JSON matching ``schema``; retry up to ``retries`` times on a bad answer.

    ``check`` may raise :class:`InvalidJSONAnswer` for rules a schema cannot say. Retryable
    backend errors (timeout, HTTP 500, garbage body) are retried too, unless the backend says
    resending will not help (``err.resend`` False: it already retried with backoff, or the server
    refused the request): that attempt ends the item. A non-retryable error (server down, model
    missing) stops at once and is returned in ``fatal``. Never raises :class:`LLMError`.
    """
    result = JSONResult()
    for attempt in range(retries + 1):
        result.attempts = attempt + 1
        try:
            text = llm.generate(prompt, system=system, json_schema=schema, options=retry_options(options, attempt))
        except LLMError as err:
            result.errors.append(f"{type(err).__name__}: {err}")
            if not err.retryable:
                result.fatal = err
                return result
            if not err.resend:
                return result
            continue
        result.raw = text
        try:
            value = parse_and_validate(text, schema)
            if check is not None:
                check(value)
        except InvalidJSONAnswer as err:
            result.errors.append(f"invalid: {err}")
            logger.debug("attempt %d rejected: %s", attempt + 1, err)
            continue
        result.value, result.ok = value, True
        return result
    return result
