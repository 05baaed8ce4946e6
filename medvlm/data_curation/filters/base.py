"""The filter step interface and the helpers every step shares (key fields, batched column reads)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import datasets
from tqdm.auto import tqdm

from medvlm.llm.prompts import PROMPTS_DIR

#: Fields copied from a rejected row into its rejects line (beside ``id``, ``step``, ``reason``).
KEY_FIELDS = ("source", "split", "group_id", "image", "question", "answer", "answer_type")
#: Default blind-check prompt, shipped with the repository.
BLIND_TEMPLATE = PROMPTS_DIR / "blind_check.txt"


class FilterConfigError(ValueError):
    """An unknown step or option; the message lists what is available."""


def _hash64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def _batches(ds: datasets.Dataset, columns: list[str], batch_size: int, desc: str) -> Iterator[dict]:
    cols = ds.select_columns(columns)
    total = -(-len(ds) // batch_size)
    yield from tqdm(cols.iter(batch_size=batch_size), total=total, desc=desc, disable=None, mininterval=2.0)


def _meta_strings(meta: str) -> list[str]:
    """Every string value inside a record's meta JSON (nested lists/dicts flattened)."""
    try:
        obj = json.loads(meta or "{}")
    except json.JSONDecodeError:
        return [meta]
    out, stack = [], [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return out


@dataclass
class FilterStep:
    """One filter step. Subclasses set ``name``, their options as dataclass fields, and ``judge``."""

    name: ClassVar[str] = ""
    #: ``judge`` may run in worker processes (no unpicklable state, no global order).
    parallel: ClassVar[bool] = True
    columns: ClassVar[tuple[str, ...]] = ("id", "question", "answer", "answer_type", "choices")

    def prepare(self, ds: datasets.Dataset, batch_size: int = 1000) -> None:
        """Global pass over ``ds`` before judging (duplicates, counts); nothing by default."""

    def judge(self, batch: dict[str, list], indices: list[int]) -> tuple[list[str], list[str]]:
        """Per row of the batch: (reject reason or "", note or ""); ``indices`` are row positions."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        opts = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "llm"}
        return {"step": self.name, **opts}
