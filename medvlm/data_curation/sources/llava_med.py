"""LLaVA-Med (Li et al., 2023): instruction conversations and evaluation questions on PMC figures.

Files read from the folder (option ``files``: names to read; default every top-level ``*.json``
and ``*.jsonl``), images under ``images/``:

* instruct JSON: a list of ``{id, image, conversations: [{from: "human"|"gpt", value}]}``; the key
  is sometimes spelt ``conversatons``. ``<image>`` sits at the start or end of the first human
  turn and is stripped. One record per (human, gpt) turn pair, split ``train``.
* eval JSONL: ``{question_id, image, text, gpt4_answer | answer, type?}``, split ``test``.

``group_id`` is the PMC article id when the image name starts with one (``34754592_F1.jpg`` →
``34754592``), so all figures of a paper share a split; else the image stem.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path, PurePath

from medvlm.data_curation.sources._common import (
    Context,
    Draft,
    Skip,
    closed_or_open,
    iter_jsonl,
    read_json_list,
)

OPTIONS = {"files": None}
IMAGE_TOKEN = "<image>"
CONV_KEYS = ("conversations", "conversatons")
INSTRUCT_KNOWN = {"id", "image", *CONV_KEYS}
EVAL_KNOWN = {"question_id", "image", "text", "gpt4_answer", "answer", "type"}


def strip_image_token(text: str) -> str:
    """Remove ``<image>`` (and the newline joining it) from either end of a turn."""
    return text.replace(IMAGE_TOKEN, "").strip()


def _group(image: str) -> str:
    stem = PurePath(image).stem
    m = re.match(r"^((?:PMC)?\d+)_", stem)
    return m.group(1) if m else stem


def _files(ctx: Context) -> list[Path]:
    names = ctx.options["files"]
    if names is None:
        return sorted(p for p in ctx.root.iterdir() if p.suffix in (".json", ".jsonl") and p.is_file())
    return [ctx.root / n for n in ([names] if isinstance(names, str) else names)]


def iter_records(ctx: Context) -> Iterator[Draft | Skip]:
    """Instruct conversations (train) and eval questions (test) from the folder's JSON files."""
    if ctx.root is None:
        raise ValueError("llava_med: pass the folder holding the instruct .json / eval .jsonl files and images/")
    for path in _files(ctx):
        if path.suffix == ".jsonl":
            if ctx.wants("test"):
                yield from _eval_file(ctx, path)
        elif ctx.wants("train"):
            yield from _instruct_file(ctx, path)


def _instruct_file(ctx: Context, path: Path) -> Iterator[Draft | Skip]:
    file = ctx.rel(path)
    for idx, row in enumerate(read_json_list(path)):
        key = next((k for k in CONV_KEYS if isinstance(row, dict) and k in row), None)
        if key is None:
            yield Skip(file, idx, f"no conversations (looked for {list(CONV_KEYS)})")
            continue
        extra = ctx.extras(row, INSTRUCT_KNOWN, file)
        turns = row[key] or []
        for t in range(0, len(turns), 2):
            pair = turns[t:t + 2]
            roles = [str(turn.get("from", "")) if isinstance(turn, dict) else "" for turn in pair]
            if roles != ["human", "gpt"]:
                yield Skip(file, idx, f"turns {t}-{t + 1} have roles {roles}, expected ['human', 'gpt']")
                continue
            question = pair[0].get("value")
            if isinstance(question, str):
                question = strip_image_token(question)
            meta = {"conversation_id": row.get("id"), "turn": t // 2}
            if extra:
                meta["extra"] = extra
            image = str(row.get("image") or "")
            yield Draft(file, idx, image_dirs=("images", ""), fields={
                "id": f"llava_med-{row.get('id', idx)}-{t // 2}", "image": image, "question": question,
                "answer": pair[1].get("value"), "answer_type": closed_or_open(pair[1].get("value")),
                "split": "train", "group_id": _group(image), "meta": meta,
            })


def _eval_file(ctx: Context, path: Path) -> Iterator[Draft | Skip]:
    file = ctx.rel(path)
    for idx, row in iter_jsonl(path):
        if not isinstance(row, dict):
            yield Skip(file, idx, row if isinstance(row, str) else "line is not a JSON object")
            continue
        answer = row.get("gpt4_answer", row.get("answer"))
        question = row.get("text")
        if isinstance(question, str):
            question = strip_image_token(question)
        image = str(row.get("image") or "")
        meta = {"question_id": row.get("question_id"), "type": row.get("type"),
                "answer_field": "gpt4_answer" if "gpt4_answer" in row else "answer"}
        extra = ctx.extras(row, EVAL_KNOWN, file)
        if extra:
            meta["extra"] = extra
        yield Draft(file, idx, image_dirs=("images", ""), fields={
            "id": f"llava_med-eval-{path.stem}-{row.get('question_id', idx)}", "image": image,
            "question": question, "answer": answer, "answer_type": closed_or_open(answer),
            "split": "test", "group_id": _group(image), "meta": meta,
        })
