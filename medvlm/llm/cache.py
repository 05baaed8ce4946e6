"""Disk cache of LLM responses, so a re-run never sends the same request twice.

Storage choice: an append-only JSONL file (``responses.jsonl``), one line per response, flushed
and fsynced per line. We chose it over sqlite3 because (1) a killed run can only ever lose or
truncate the line being written, and a truncated last line is detected, skipped and recorded on
load; (2) the file is plain text that can be grepped, diffed and shipped next to a generated
dataset as its provenance; (3) the access pattern is "load all once, append" and fits in memory
(a 100k-response cache is a few hundred MB at most). Several processes may share a cache
folder: each append takes an exclusive ``flock`` so lines never interleave.

The key is the sha256 of ``(backend, model, system, prompt, schema, options)``.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from medvlm.llm.base import TextLLM
from medvlm.utils.io import sha256_json

logger = logging.getLogger(__name__)

CACHE_FILE = "responses.jsonl"


def cache_key(
    backend: str,
    model: str,
    prompt: str,
    *,
    system: str | None = None,
    json_schema: dict | None = None,
    options: dict | None = None,
) -> str:
    """sha256 (hex) of everything that determines a response."""
    return sha256_json(
        {
            "backend": backend,
            "model": model,
            "system": system,
            "prompt": prompt,
            "schema": json_schema,
            "options": options or {},
        }
    )


def read_journal(path: str | os.PathLike) -> tuple[list[dict], list[tuple[int, str]]]:
    """Read an append-only JSONL file written by :class:`JsonlAppender`, tolerating a crash.

    Returns ``(rows, bad_lines)``; ``bad_lines`` lists ``(line_number, reason)`` for a truncated
    last line (an interrupted write) or a corrupted line, each also logged as a warning. A file
    cut mid-line gets its newline back so the next append starts on a fresh line.
    """
    path = Path(path)
    rows: list[dict] = []
    bad: list[tuple[int, str]] = []
    if not path.exists():
        return rows, bad
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise TypeError(f"a line must hold a JSON object, got {type(row).__name__}")
            rows.append(row)
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as err:
            # Only the last line can be cut by a crash: the file then does not end in "\n".
            reason = "truncated last line (interrupted write)" if lineno == len(lines) else f"corrupted line ({err})"
            bad.append((lineno, reason))
            logger.warning("%s: skipping line %d: %s", path, lineno, reason)
    if raw and not raw.endswith(b"\n"):
        with open(path, "ab") as fh:
            fh.write(b"\n")
    return rows, bad


class JsonlAppender:
    """Append JSON objects to a file, one line each, durably (flush + fsync per line).

    Thread-safe; an exclusive ``flock`` per line keeps lines whole when processes share the file.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def append(self, obj: dict) -> None:
        line = json.dumps(obj, ensure_ascii=False, default=str) + "\n"
        with self._lock, open(self.path, "a", encoding="utf-8") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                fh.write(line)
                fh.flush()
                os.fsync(fh.fileno())
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)


class ResponseCache:
    """An append-only JSONL store: ``key -> response text``.

    Attributes:
        path: the JSONL file.
        bad_lines: ``(line_number, reason)`` for lines skipped on load (a truncated last line
            after a crash, or a corrupted line); they are logged, never silently dropped.
    """

    def __init__(self, cache_dir: str | os.PathLike) -> None:
        self.dir = Path(cache_dir).expanduser()
        self.path = self.dir / CACHE_FILE
        self._writer = JsonlAppender(self.path)
        rows, self.bad_lines = read_journal(self.path)
        self._data: dict[str, str] = {}
        for lineno, row in enumerate(rows, start=1):
            if isinstance(row.get("key"), str) and isinstance(row.get("response"), str):
                self._data[row["key"]] = row["response"]
            else:
                self.bad_lines.append((lineno, "entry without a string key/response"))

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: str) -> bool:
        return key in self._data

    def get(self, key: str) -> str | None:
        return self._data.get(key)

    def put(self, key: str, response: str, **info) -> None:
        """Append one response (with ``info`` such as backend/model/prompt for auditing) durably."""
        self._writer.append({"key": key, "response": response, "time": time.time(), **info})
        self._data[key] = response


class CachedLLM(TextLLM):
    """Wrap a backend so every response is stored in ``cache_dir`` and served from there next time.

    Concurrent identical requests are coalesced: the second waits for the first, then reads the
    cache, so even a parallel run never sends one request twice. Errors are not cached.
    ``hits`` and ``misses`` count lookups.
    """

    def __init__(self, backend: TextLLM, cache_dir: str | os.PathLike) -> None:
        self.inner = backend
        self.backend = backend.backend
        self.model = backend.model
        self.concurrency = backend.concurrency
        self.cache = ResponseCache(cache_dir)
        self.hits = 0
        self.misses = 0
        self._count_lock = threading.Lock()
        self._inflight: dict[str, threading.Lock] = {}

    def describe(self) -> dict:
        return {**self.inner.describe(), "cache": str(self.cache.path)}

    @contextmanager
    def _key_lock(self, key: str) -> Iterator[None]:
        with self._count_lock:
            lock = self._inflight.setdefault(key, threading.Lock())
        with lock:
            yield

    def generate(
        self,
        prompt: str,
        *,
        system: str | None = None,
        json_schema: dict | None = None,
        options: dict | None = None,
    ) -> str:
        key = cache_key(
            self.backend, self.model, prompt, system=system, json_schema=json_schema, options=options
        )
        with self._key_lock(key):
            cached = self.cache.get(key)
            if cached is not None:
                with self._count_lock:
                    self.hits += 1
                return cached
            text = self.inner.generate(prompt, system=system, json_schema=json_schema, options=options)
            self.cache.put(key, text, backend=self.backend, model=self.model, prompt=prompt, options=options)
            with self._count_lock:
                self.misses += 1
            return text

    def close(self) -> None:
        self.inner.close()
