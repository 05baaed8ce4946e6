"""LLM-as-a-judge: score each prediction 1-10 against its reference, with a yes/no verdict.

The judge must reply ``{"score": int 1..10, "verdict": "yes"|"no", "reason": str}``. Parsing is
strict: one JSON object, the schema checked by ``jsonschema``, ``score`` a real integer (not
``"7"``, ``7.5`` or ``true``) in range, ``verdict`` in the set. A reply that fails is retried
with a new seed; one that still fails, or a backend that is down / slow / failing, makes the
item *invalid*: counted in ``n_invalid`` and listed by id, never scored as a number. Finished
judgements are kept by the LLM's disk cache (use a :class:`~medvlm.llm.CachedLLM`), so a re-run
only asks for what is missing.

Templates ship in ``medvlm/templates/judge/`` (``correctness.txt``) with placeholders
``{question}``, ``{reference}``, ``{prediction}`` and an optional ``{?caption}...{/caption}`` block
kept only when the item has a caption.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from medvlm.llm import TextLLM, generate_json
from medvlm.llm.jsonout import InvalidJSONAnswer, parse_and_validate
from medvlm.llm.prompts import JUDGE_DIR, check_template, load_template, render
from medvlm.records import parse_meta
from medvlm.utils.io import hash_rows

logger = logging.getLogger(__name__)

TEMPLATES_DIR = JUDGE_DIR
VERDICTS = ("yes", "no")
TEMPLATE_FIELDS = {"question", "reference", "prediction", "caption"}
SERVER_BACKENDS = ("ollama", "openai")  # backends asked before judging whether they are up

JUDGE_SCHEMA: dict = {
    "type": "object",
    "properties": {
        "score": {"type": "integer", "minimum": 1, "maximum": 10},
        "verdict": {"type": "string", "enum": list(VERDICTS)},
        "reason": {"type": "string"},
    },
    "required": ["score", "verdict", "reason"],
}


def check_judgement(obj: dict) -> None:
    """Rules beyond the schema: JSON Schema accepts ``7.0`` as an integer; we do not."""
    if type(obj["score"]) is not int:
        raise InvalidJSONAnswer(f"score must be an integer, got {obj['score']!r}")


def parse_judgement(text: str) -> dict:
    """Strictly parse one judge reply into ``{score, verdict, reason}``; raise InvalidJSONAnswer."""
    obj = parse_and_validate(text, JUDGE_SCHEMA)
    check_judgement(obj)
    return {"score": obj["score"], "verdict": obj["verdict"], "reason": obj["reason"]}


def _field(item: Mapping[str, Any], *names: str) -> str:
    for name in names:
        value = item.get(name)
        if value is not None and str(value).strip():
            return str(value).strip()
    return ""


def _caption(item: Mapping[str, Any]) -> str:
    # LLaVA-Med's question files call it fig_caption; our records keep it in meta["caption"].
    caption = _field(item, "caption", "fig_caption")
    if caption or not item.get("meta"):
        return caption
    return str(parse_meta(item["meta"]).get("caption") or "").strip()


def judge_prompt(item: Mapping[str, Any], template: tuple[str, str]) -> str:
    """Fill ``template`` (name, text) with the item's question, reference, prediction, caption."""
    name, text = template
    return render(
        text, name,
        question=_field(item, "question"),
        reference=_field(item, "reference", "answer"),
        prediction=_field(item, "prediction"),
        caption=_caption(item),
    )


def judge_one(
    item: Mapping[str, Any], llm: TextLLM, template: tuple[str, str], *, retries: int = 2, options: dict | None = None
) -> dict:
    """Judge one item. Returns ``{id, valid, score, verdict, reason, attempts, error}``; never raises
    on backend or parsing failures (they make ``valid`` False with the cause in ``error``)."""
    rid = str(item.get("id", ""))
    base = {"id": rid, "valid": False, "score": None, "verdict": None, "reason": None, "attempts": 0}
    if not _field(item, "question") or not _field(item, "reference", "answer"):
        return {**base, "error": "item lacks a question or a reference answer"}
    res = generate_json(
        llm, judge_prompt(item, template), schema=JUDGE_SCHEMA, options=options, retries=retries,
        check=check_judgement,
    )
    if not res.ok:
        return {**base, "attempts": res.attempts, "error": res.errors[-1] if res.errors else "no reply",
                "raw": (res.raw or "")[:500]}
    judgement = {k: res.value[k] for k in ("score", "verdict", "reason")}
    return {**base, **judgement, "valid": True, "attempts": res.attempts, "error": None}


def judge_records(
    records: Iterable[Mapping[str, Any]],
    llm: TextLLM,
    template: str = "correctness",
    *,
    retries: int = 2,
    concurrency: int | None = None,
    options: dict | None = None,
    templates_dir: str | Path = TEMPLATES_DIR,
) -> dict:
    """Judge every prediction record (``id, question, answer|reference, prediction[, caption]``).

    Returns ``{mean_score, yes_rate, n, n_valid, n_invalid, invalid_ids, invalid_reasons, items,
    judge}``: the means are over valid items only (NaN when there are none), ``items`` holds one
    result per record in input order, and ``judge`` is the section for ``metrics.json`` (the same
    numbers plus template, backend and model, with None instead of NaN so it stays strict JSON).
    """
    records = list(records)
    tmpl = load_template(template, templates_dir)
    check_template(tmpl[1], tmpl[0], required={"question", "reference", "prediction"}, allowed=TEMPLATE_FIELDS)
    workers = max(1, int(concurrency or getattr(llm, "concurrency", 1) or 1))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="judge") as pool:
        futures = [pool.submit(judge_one, r, llm, tmpl, retries=retries, options=options) for r in records]
        items = [f.result() for f in tqdm(futures, desc="judge", unit="item", disable=len(records) < 2)]
    valid = [it for it in items if it["valid"]]
    invalid = [it for it in items if not it["valid"]]
    if invalid:
        logger.warning("judge: %d of %d items invalid (e.g. %s: %s)", len(invalid), len(items),
                       invalid[0]["id"], invalid[0]["error"])
    mean_score = sum(it["score"] for it in valid) / len(valid) if valid else math.nan
    yes_rate = sum(it["verdict"] == "yes" for it in valid) / len(valid) if valid else math.nan
    reasons: dict[str, int] = {}
    for it in invalid:
        key = str(it["error"]).split(":")[0]
        reasons[key] = reasons.get(key, 0) + 1
    summary = {
        "mean_score": mean_score,
        "yes_rate": yes_rate,
        "n": len(items),
        "n_valid": len(valid),
        "n_invalid": len(invalid),
        "invalid_ids": [it["id"] for it in invalid],
        "invalid_reasons": reasons,
    }
    judge_section = {
        **summary,
        # strict JSON for metrics.json: no NaN, None when no item could be judged
        "mean_score": None if math.isnan(mean_score) else mean_score,
        "yes_rate": None if math.isnan(yes_rate) else yes_rate,
        "template": tmpl[0],
        "template_sha256": hash_rows([tmpl[1]]),
        "retries": retries,
        **llm.describe(),
    }
    return {**summary, "items": items, "judge": judge_section}


def judge_llm_config(
    backend: str, model: str, output: str | Path, *, host: str | None = None, cache: str | None = None,
    concurrency: int = 1, timeout: float | None = None, api_key_env: str | None = None,
) -> dict[str, Any]:
    """The validated ``make_llm`` config of a judge (nothing contacted); the cache defaults to
    ``output/judge_cache``, ``timeout`` (seconds per server request) to the backend's.
    ``api_key_env`` (backend openai) names the variable holding the key; it must be set.
    Raises ``ValueError`` naming a bad backend, an empty model or an unset key variable."""
    from medvlm.llm import LLMConfig

    cfg: dict[str, Any] = {"backend": backend, "model": model, "concurrency": concurrency,
                           "cache_dir": cache or str(Path(output) / "judge_cache")}
    if host:
        cfg["host"] = host
    if api_key_env:
        if not os.environ.get(api_key_env):
            raise ValueError(f"--judge-api-key-env names {api_key_env}, but ${api_key_env} is not set; export it "
                             "or drop the flag (then $OPENAI_API_KEY is used when set)")
        cfg["api_key_env"] = api_key_env
    if timeout is not None:
        if timeout <= 0:
            raise ValueError(f"the judge timeout must be > 0 seconds, got {timeout}")
        cfg["timeout"] = float(timeout)
    LLMConfig(**cfg)
    return cfg


def check_judge_server(llm_config: Mapping[str, Any]) -> None:
    """Before judging: ask a server backend whether it is up and holds the judge model (Ollama's
    ``GET /api/tags``, an OpenAI-compatible server's ``GET /v1/models``). Raises
    :class:`~medvlm.llm.LLMConnectionError` (server down: start it), :class:`~medvlm.llm.LLMModelNotFoundError`
    (``ollama pull``, or a name the server lists) or :class:`~medvlm.llm.LLMAuthError` (key refused);
    a slow or failing answer is only logged, its items are retried and counted invalid as usual.
    Local backends have nothing to check."""
    from medvlm.llm import LLMError, make_llm

    if llm_config.get("backend") not in SERVER_BACKENDS:
        return
    llm = make_llm({k: v for k, v in llm_config.items() if k != "cache_dir"})
    try:
        llm.check_model()
    except LLMError as e:
        if not e.retryable:
            raise
        logger.warning("judge: could not check the server before judging (%s); judging anyway", e)
    finally:
        llm.close()


def judge_open_rows(
    rows: Iterable[Mapping[str, Any]], llm_config: Mapping[str, Any], output: str | Path, *,
    template: str = "correctness", concurrency: int = 1,
) -> dict[str, Any]:
    """Judge the open questions of prediction ``rows`` and write one line per item to
    ``output/judge.jsonl``; returns the ``judge`` section of ``metrics.json``.

    A judge server that is down or lacks the model raises before any item is judged (see
    :func:`check_judge_server`; callers write their other metrics first, so nothing is lost).
    A server that is slow or failing makes items invalid (counted, listed by id); so does one that
    goes away midway (``invalid_reasons`` then holds ``LLMConnectionError``). A local backend that
    cannot even be built (missing model, bad template) gives a section with ``error`` and every
    item invalid.
    """
    from medvlm.llm import LLMError, make_llm
    from medvlm.utils.io import to_jsonable, write_jsonl

    open_rows = [r for r in rows if r.get("answer_type") == "open"]
    if open_rows:
        check_judge_server(llm_config)
    logger.info("judging %d open predictions with %s:%s", len(open_rows), llm_config.get("backend"),
                llm_config.get("model"))
    try:
        llm = make_llm(dict(llm_config))
        result = judge_records(open_rows, llm, template, concurrency=concurrency)
    except (LLMError, OSError, ValueError) as e:
        logger.error("judge could not run: %s", e)
        ids = [str(r.get("id")) for r in open_rows]
        return {"error": f"{type(e).__name__}: {e}", "n": len(ids), "n_valid": 0, "n_invalid": len(ids),
                "invalid_ids": ids, "invalid_reasons": {type(e).__name__: len(ids)}, "mean_score": None,
                "yes_rate": None, "template": str(template), "backend": llm_config.get("backend"),
                "model": llm_config.get("model")}
    write_jsonl(Path(output) / "judge.jsonl", (to_jsonable(it) for it in result["items"]))
    return result["judge"]
