"""Generate question-answer records from image captions and case text with a text LLM.

The seed paper's method: for each ROCOv2 / MedPix record (caption in ``answer``, concepts and case
text in ``meta``) ask a text LLM for (a) *image* questions answerable by looking at the image the
caption describes and (b) *literature* questions about the condition, each closed (yes/no) or
open. Replies are constrained to / validated against a JSON schema; a bad reply is retried, then
recorded as a reject with its reason.

Outputs in ``output_dir`` (see :func:`generate_qa`):
    items.jsonl      journal, one line per finished input item (its records and rejects);
                     a re-run skips the items listed here, so a killed run resumes
    generated.jsonl  the unified records (``medvlm.records``), in input order
    rejects.jsonl    one line per rejected reply or question, with the reason
    config.json      the config that made the folder
    llm_cache/       the LLM responses (unless ``llm.cache_dir`` points elsewhere)
    manifest.json    counts and hashes, written last (its presence means the run finished)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections import Counter
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from tqdm.auto import tqdm

from medvlm.llm import TextLLM, generate_json, make_llm
from medvlm.llm.cache import JsonlAppender, read_journal
from medvlm.llm.jsonout import InvalidJSONAnswer
from medvlm.llm.prompts import PROMPTS_DIR, check_template, load_template, render
from medvlm.records import RecordError, make_record, validate_record
from medvlm.utils.io import (
    atomic_write_json,
    atomic_write_text,
    hash_rows,
    read_jsonl,
    sha256_file,
    write_manifest,
)

logger = logging.getLogger(__name__)

KINDS = ("image", "literature")
DEFAULT_PROMPTS_DIR = PROMPTS_DIR
# meta keys read for context, in order of preference (loaders keep the source's own names)
CONCEPT_KEYS = ("concepts", "concept_names", "cui_names", "cuis", "cui", "keywords")
# (ROCOv2 loader: cuis, concepts; MedPix loader: title ... disease_discussion)
CASE_TEXT_KEYS = ("case_text", "title", "history", "exam", "findings", "differential", "diagnosis", "topic",
                  "disease_discussion")
TEMPLATE_FIELDS = {"caption", "concepts", "case_text", "n_questions"}
MAX_FIELD_CHARS = 800  # per case-text field: MedPix disease discussions run to pages
MAX_QUESTION_CHARS = 300  # generated questions are one sentence
MAX_ANSWER_CHARS = 200    # "yes"/"no", a few words, or one sentence for literature questions


@dataclass
class QAGenConfig:
    """What to generate, from what, with which LLM.

    Data: ``input`` (a JSONL of unified records or a ``datasets.save_to_disk`` folder),
    ``output_dir``, ``sources`` (process only these sources; others are counted as skipped),
    ``limit``. Generation: ``kinds``, ``n_questions`` per kind, ``templates`` per kind,
    ``prompts_dir``, ``retries``, ``system``, ``options``, ``source_suffix``. Backend: ``llm``
    (see :func:`medvlm.llm.make_llm`) and ``concurrency`` (parallel items; default: the LLM's).
    """

    input: str = field(metadata={"help": "JSONL of unified records or a saved datasets folder"})
    output_dir: str = field(metadata={"help": "folder for generated.jsonl, rejects.jsonl, manifest.json"})
    llm: dict = field(default_factory=dict, metadata={"help": "backend config, see medvlm.llm.make_llm"})
    kinds: list = field(default_factory=lambda: list(KINDS), metadata={"help": "image and/or literature"})
    n_questions: dict = field(default_factory=lambda: {"image": 4, "literature": 2})
    templates: dict = field(default_factory=lambda: {"image": "image_qa", "literature": "literature_qa"})
    prompts_dir: str = field(default=str(DEFAULT_PROMPTS_DIR), metadata={"help": "folder of templates"})
    retries: int = field(default=2, metadata={"help": "extra tries for an invalid reply"})
    concurrency: int | None = field(default=None, metadata={"help": "items in flight; default llm's"})
    sources: list | None = field(default=None, metadata={"help": "only these sources, e.g. [rocov2]"})
    limit: int | None = field(default=None, metadata={"help": "first N eligible items only"})
    system: str | None = field(default=None, metadata={"help": "system prompt"})
    options: dict = field(default_factory=dict, metadata={"help": "sampling options per request"})
    source_suffix: str = field(default="-gen", metadata={"help": "rocov2 -> rocov2-gen"})

    def __post_init__(self) -> None:
        bad = [k for k in self.kinds if k not in KINDS]
        if bad or not self.kinds:
            raise ValueError(f"kinds {self.kinds} must be a non-empty subset of {list(KINDS)}")
        for kind in self.kinds:
            if int(self.n_questions.get(kind, 0)) < 1:
                raise ValueError(f"n_questions.{kind} must be >= 1, got {self.n_questions.get(kind)}")
            if kind not in self.templates:
                raise ValueError(f"templates has no entry for kind {kind!r}: {self.templates}")
        if self.retries < 0:
            raise ValueError(f"retries must be >= 0, got {self.retries}")


def qa_schema(kind: str, n_questions: int) -> dict:
    """JSON schema of one reply: ``{"questions": [{question, answer, answer_type, kind}]}``."""
    item = {
        "type": "object",
        "properties": {
            # length caps bound constrained decoding (a small model otherwise runs an answer to its token budget)
            "question": {"type": "string", "minLength": 5, "maxLength": MAX_QUESTION_CHARS},
            "answer": {"type": "string", "minLength": 1, "maxLength": MAX_ANSWER_CHARS},
            "answer_type": {"type": "string", "enum": ["closed", "open"]},
            "kind": {"type": "string", "enum": [kind]},
        },
        "required": ["question", "answer", "answer_type", "kind"],
    }
    questions = {"type": "array", "items": item, "minItems": 1, "maxItems": max(n_questions * 2, n_questions + 2)}
    return {"type": "object", "properties": {"questions": questions}, "required": ["questions"]}


def check_closed_answers(reply: dict) -> None:
    """A closed question must be answered exactly yes or no (the schema cannot tie the two fields)."""
    for i, qa in enumerate(reply["questions"]):
        if qa["answer_type"] == "closed" and qa["answer"].strip().lower().rstrip(".") not in ("yes", "no"):
            raise InvalidJSONAnswer(f"questions/{i}: closed answer must be yes or no, got {qa['answer']!r}")


def _join(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "; ".join(str(v) for v in value if str(v).strip())
    return str(value or "").strip()


def _clip(text: str) -> str:
    return text if len(text) <= MAX_FIELD_CHARS else text[: MAX_FIELD_CHARS - 1].rstrip() + "…"


def caption_context(rec: dict) -> dict[str, str]:
    """The template values of one record: ``caption`` (``answer``, else ``meta.caption``),
    ``concepts`` (first of :data:`CONCEPT_KEYS` in meta) and ``case_text`` (:data:`CASE_TEXT_KEYS`)."""
    try:
        meta = json.loads(rec.get("meta") or "{}")
    except json.JSONDecodeError as err:
        raise RecordError(f"record {rec.get('id')!r}: meta is not valid JSON ({err})") from err
    meta = meta if isinstance(meta, dict) else {}
    caption = str(rec.get("answer") or meta.get("caption") or "").strip()
    concepts = next((_join(meta[k]) for k in CONCEPT_KEYS if _join(meta.get(k))), "")
    case = [f"{k.replace('_', ' ').capitalize()}: {_clip(_join(meta[k]))}" for k in CASE_TEXT_KEYS
            if _join(meta.get(k))]
    return {"caption": caption, "concepts": concepts, "case_text": "\n".join(case)}


@dataclass
class ItemResult:
    """What one input item produced. ``failures`` non-empty means a backend failure: not finished."""

    item_id: str
    records: list[dict] = field(default_factory=list)
    rejects: list[dict] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


class QAGenerator:
    """Turns one caption record into generated records and rejects (used by :func:`generate_qa`)."""

    def __init__(self, cfg: QAGenConfig, llm: TextLLM) -> None:
        self.cfg, self.llm = cfg, llm
        self.templates: dict[str, tuple[str, str]] = {}
        for kind in cfg.kinds:
            name, text = self.templates[kind] = load_template(cfg.templates[kind], cfg.prompts_dir)
            check_template(text, name, required={"caption", "n_questions"}, allowed=TEMPLATE_FIELDS)

    def template_info(self) -> dict:
        return {k: {"name": n, "sha256": hash_rows([t])} for k, (n, t) in self.templates.items()}

    def prompt(self, rec: dict, kind: str) -> str:
        name, text = self.templates[kind]
        return render(text, name, n_questions=self.cfg.n_questions[kind], **caption_context(rec))

    def __call__(self, rec: dict) -> ItemResult:
        out = ItemResult(rec["id"])
        try:
            ctx = caption_context(rec)
        except RecordError as err:
            out.rejects.append(self._reject(rec, None, f"unreadable record: {err}"))
            return out
        if not ctx["caption"]:
            out.rejects.append(self._reject(rec, None, "empty caption: nothing to generate from"))
            return out
        for kind in self.cfg.kinds:
            n = int(self.cfg.n_questions[kind])
            res = generate_json(
                self.llm, self.prompt(rec, kind), schema=qa_schema(kind, n), system=self.cfg.system,
                options=self.cfg.options, retries=self.cfg.retries, check=check_closed_answers,
            )
            if res.fatal is not None:
                raise res.fatal  # server down / model missing: stop the run, finished items are kept
            if res.ok:
                self._to_records(rec, kind, res.value["questions"], out)
            elif res.backend_failed:
                out.failures.append(f"{kind}: {res.errors[-1]}")
            else:
                out.rejects.append(
                    self._reject(rec, kind, res.errors[-1], raw=res.raw, attempts=res.attempts)
                )
        return out

    def _reject(self, rec: dict, kind: str | None, reason: str, **extra: Any) -> dict:
        if isinstance(extra.get("raw"), str):
            extra["raw"] = extra["raw"][:2000]
        return {"item_id": rec["id"], "source": rec.get("source", ""), "kind": kind, "reason": reason, **extra}

    def _to_records(self, rec: dict, kind: str, questions: list[dict], out: ItemResult) -> None:
        seen: set[str] = set()
        name, _ = self.templates[kind]
        meta = {
            "origin_id": rec["id"], "origin_source": rec.get("source", ""), "kind": kind,
            "template": name, "template_sha256": self.template_info()[kind]["sha256"],
            **self.llm.describe(), "caption": caption_context(rec)["caption"],
        }
        for i, qa in enumerate(questions):
            question = " ".join(qa["question"].split())
            answer = qa["answer"].strip()
            if qa["answer_type"] == "closed":
                answer = answer.lower().rstrip(".")
            if question.lower() in seen:
                out.rejects.append(self._reject(rec, kind, f"duplicate question {question!r}"))
                continue
            seen.add(question.lower())
            new = make_record(
                id=f"{rec['id']}::{kind}{i}", image=rec.get("image", ""), question=question, answer=answer,
                answer_type=qa["answer_type"], source=f"{rec.get('source', '')}{self.cfg.source_suffix}",
                split=rec.get("split", ""), group_id=rec.get("group_id") or rec["id"],
                modality=rec.get("modality", ""), body_part=rec.get("body_part", ""),
                roi=rec.get("roi", "") if kind == "image" else "", meta=meta,
            )
            try:
                out.records.append(validate_record(new))
            except RecordError as err:
                out.rejects.append(self._reject(rec, kind, f"invalid record: {err}"))


def read_input_records(path: str | os.PathLike) -> list[dict]:
    """Unified records from a JSONL file (one record per line) or a ``save_to_disk`` folder."""
    path = Path(path)
    if path.is_dir():
        import datasets

        return [dict(r) for r in datasets.load_from_disk(str(path))]
    if not path.is_file():
        raise FileNotFoundError(f"QA generation input {path} does not exist; give a records JSONL or dataset folder")
    rows = read_jsonl(path, RecordError)
    for lineno, rec in enumerate(rows, start=1):
        if not isinstance(rec.get("id"), str):
            raise RecordError(f"{path}: record {lineno} needs a string 'id' (see medvlm.records)")
    ids = Counter(r["id"] for r in rows)
    dup = [i for i, c in ids.items() if c > 1]
    if dup:
        raise RecordError(f"{path}: duplicate record ids {dup[:5]}; ids must be unique to resume a run")
    return rows


def load_config_file(path: str | os.PathLike, overrides: list[str] | None = None) -> dict:
    """YAML mapping from ``path`` with ``key=value`` overrides (values parsed as YAML, dotted keys nest)."""
    with open(path, encoding="utf-8") as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a YAML mapping at the top level, got {type(data).__name__}")
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} must look like key=value (e.g. llm.model=llama3.1:8b)")
        *parents, leaf = key.strip().split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return data


def load_qagen_config(path: str | os.PathLike, overrides: list[str] | None = None) -> QAGenConfig:
    """Read a YAML config (``key=value`` overrides, dotted for nesting: ``llm.model=x``)."""
    data = load_config_file(path, overrides)
    known = {f.name for f in dataclasses.fields(QAGenConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown}; known keys: {sorted(known)}")
    return QAGenConfig(**data)


def _eligible(records: list[dict], cfg: QAGenConfig) -> tuple[list[dict], Counter]:
    skipped: Counter = Counter()
    todo = []
    for rec in records:
        if cfg.sources and rec.get("source") not in cfg.sources:
            skipped[f"source {rec.get('source')!r} not in sources"] += 1
            continue
        todo.append(rec)
    if cfg.limit is not None and len(todo) > cfg.limit:
        skipped["beyond limit"] += len(todo) - cfg.limit
        todo = todo[: cfg.limit]
    return todo, skipped


def generate_qa(
    cfg: QAGenConfig,
    llm: TextLLM | None = None,
    on_item_done: Callable[[ItemResult], None] | None = None,
) -> dict:
    """Run QA generation for ``cfg``; resumable. Returns the summary also written to the manifest.

    ``llm`` defaults to ``make_llm(cfg.llm)`` with ``cache_dir`` defaulting to
    ``<output_dir>/llm_cache`` (so a re-run after a kill never sends a prompt twice). ``on_item_done``
    is called in the main thread after each item is journaled (a progress hook; an exception it
    raises stops the run, keeping all finished items). A non-retryable backend error (server down, model missing) stops the run
    the same way. Items whose backend calls kept failing are left unfinished for a re-run and
    listed in ``incomplete.json``; the manifest is written only when every item finished.
    """
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "manifest.json").unlink(missing_ok=True)
    atomic_write_json(out_dir / "config.json", dataclasses.asdict(cfg))
    if llm is None:
        # Responses are always cached on disk: without a cache, the requests in flight when a run is
        # killed would be sent again by the re-run. Default: next to the outputs.
        llm = make_llm({"cache_dir": str(out_dir / "llm_cache"), **cfg.llm})
    gen = QAGenerator(cfg, llm)
    records = read_input_records(cfg.input)
    todo, skipped = _eligible(records, cfg)

    journal_path = out_dir / "items.jsonl"
    done_rows, bad_lines = read_journal(journal_path)
    done = {row["item_id"]: row for row in done_rows if "item_id" in row}
    remaining = [r for r in todo if r["id"] not in done]
    logger.info("QA generation: %d items, %d already finished, %d to do", len(todo), len(done), len(remaining))
    journal = JsonlAppender(journal_path)
    failed: dict[str, list[str]] = {}
    workers = max(1, int(cfg.concurrency or getattr(llm, "concurrency", 1) or 1))

    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="qagen")
    pending: set[Future] = set()
    queue = iter(remaining)
    try:
        with tqdm(total=len(remaining), desc="generate QA", unit="item") as bar:
            while True:
                while len(pending) < 2 * workers and (rec := next(queue, None)) is not None:
                    pending.add(pool.submit(gen, rec))
                if not pending:
                    break
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in finished:
                    res: ItemResult = fut.result()
                    bar.update(1)
                    if res.failures:
                        failed[res.item_id] = res.failures
                        continue
                    row = {"item_id": res.item_id, "records": res.records, "rejects": res.rejects}
                    journal.append(row)
                    done[res.item_id] = row
                    if on_item_done is not None:
                        on_item_done(res)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return _finish(cfg, llm, gen, todo, done, failed, skipped, bad_lines)


def _finish(cfg, llm, gen, todo, done, failed, skipped, bad_lines) -> dict:
    """Write generated.jsonl / rejects.jsonl (input order) and the manifest (or incomplete.json)."""
    out_dir = Path(cfg.output_dir)
    records = [r for item in todo if item["id"] in done for r in done[item["id"]]["records"]]
    rejects = [r for item in todo if item["id"] in done for r in done[item["id"]]["rejects"]]
    atomic_write_text(out_dir / "generated.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    atomic_write_text(out_dir / "rejects.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejects))
    meta = [json.loads(r["meta"]) for r in records]
    summary = {
        "n_input_items": len(todo),
        "n_finished": sum(1 for item in todo if item["id"] in done),
        "n_failed": len(failed),
        "n_records": len(records),
        "n_rejects": len(rejects),
        "by_kind": dict(Counter(m["kind"] for m in meta)),
        "by_answer_type": dict(Counter(r["answer_type"] for r in records)),
        "reject_reasons": dict(Counter(r["reason"].split(":")[0] for r in rejects)),
        "skipped": dict(skipped),
        "journal_bad_lines": [list(b) for b in bad_lines],
        "llm": llm.describe(),
        "cache": {"hits": getattr(llm, "hits", None), "misses": getattr(llm, "misses", None)},
        "templates": gen.template_info(),
        "hashes": {
            "input_ids": hash_rows(item["id"] for item in todo),
            "generated.jsonl": sha256_file(out_dir / "generated.jsonl"),
            "rejects.jsonl": sha256_file(out_dir / "rejects.jsonl"),
        },
    }
    if failed:
        atomic_write_json(out_dir / "incomplete.json", {"failed": failed, **summary})
        logger.warning("%d items failed on backend errors; re-run the same command to retry them", len(failed))
    else:
        (out_dir / "incomplete.json").unlink(missing_ok=True)
        write_manifest(out_dir, step="generate_qa", **summary)
    return {**summary, "failed": failed, "complete": not failed}
