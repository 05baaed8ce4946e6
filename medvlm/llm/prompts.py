"""Prompt templates kept as text files: ``{name}`` placeholders and optional ``{?name}...{/name}`` blocks.

Hand-written instead of ``str.format``: prompts show the model JSON examples such as
``{"score": 7}``, which ``str.format`` would try to fill (and fail on). Here only ``{identifier}``
is a placeholder; every other brace is literal text. A block ``{?caption}...{/caption}`` is kept
when ``caption`` is non-empty and dropped otherwise, so one template serves items with and
without the optional field.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

#: The templates that ship inside the package (so a wheel install has them): ``prompts/`` for QA
#: generation and the blind check, ``judge/`` for the LLM judge. Pass your own file by path.
TEMPLATES = Path(__file__).resolve().parents[1] / "templates"
PROMPTS_DIR = TEMPLATES / "prompts"
JUDGE_DIR = TEMPLATES / "judge"

_BLOCK = re.compile(r"\{\?(\w+)\}(.*?)\{/\1\}", re.DOTALL)
_FIELD = re.compile(r"\{(\w+)\}")
_BLOCK_NAMES = re.compile(r"\{\?(\w+)\}")


class TemplateError(ValueError):
    """A template that cannot be found or filled; the message names the template and the field."""


def load_template(name_or_path: str | os.PathLike, folder: str | os.PathLike | None = None) -> tuple[str, str]:
    """Return ``(name, text)`` for a template given as a path or as a bare name inside ``folder``.

    A bare name may omit ``.txt``: ``load_template("correctness", JUDGE_DIR)``.
    """
    path = Path(name_or_path)
    candidates = [path]
    if folder is not None and not path.is_absolute():
        candidates += [Path(folder) / path, Path(folder) / f"{path}.txt"]
    for cand in candidates:
        if cand.is_file():
            return cand.stem, cand.read_text(encoding="utf-8")
    available = sorted(p.stem for p in Path(folder).glob("*.txt")) if folder and Path(folder).is_dir() else []
    raise TemplateError(
        f"prompt template {str(name_or_path)!r} not found (looked in {[str(c) for c in candidates]}); "
        f"available in {folder}: {available}"
    )


def placeholders(text: str) -> set[str]:
    """Names of all ``{name}`` placeholders and ``{?name}`` blocks in ``text``."""
    return set(_FIELD.findall(text)) | set(_BLOCK_NAMES.findall(text))


def check_template(text: str, name: str, *, required: set[str], allowed: set[str]) -> None:
    """Raise :class:`TemplateError` if ``text`` lacks a ``required`` field or uses one not ``allowed``."""
    used = placeholders(text)
    missing, unknown = required - used, used - allowed
    if missing or unknown:
        raise TemplateError(
            f"template {name!r}: missing fields {sorted(missing)}, unknown fields {sorted(unknown)}; "
            f"a template may use {sorted(allowed)} (required: {sorted(required)})"
        )


def render(text: str, name: str = "<template>", **values: object) -> str:
    """Fill ``text``; a placeholder without a value raises :class:`TemplateError`."""

    def block(m: re.Match) -> str:
        return m.group(2) if str(values.get(m.group(1)) or "").strip() else ""

    def field(m: re.Match) -> str:
        key = m.group(1)
        if key not in values:
            raise TemplateError(f"template {name!r} needs a value for {{{key}}}; given: {sorted(values)}")
        return str(values[key])

    return _FIELD.sub(field, _BLOCK.sub(block, text)).strip() + "\n"
