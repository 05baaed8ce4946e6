"""Evaluate a model on unified records: generate, save raw predictions, score.

Used by the stage recipes (final test-split evaluation), the per-checkpoint callback and
``eval/run_eval.py``. Predictions stream to JSONL (one line per record, the file opened once);
``metrics.json`` is written after, atomically. Under several processes every process calls
:func:`evaluate_examples`: each answers its shard (:mod:`medvlm.eval.distributed`) and the main
process scores and writes.
"""

from __future__ import annotations

import logging
from pathlib import Path

from medvlm.eval.distributed import generate_sharded, generation_summary
from medvlm.eval.scoring import score_records
from medvlm.models.base import ModelFamily
from medvlm.models.inputs import PreparedExamples
from medvlm.records import parse_meta
from medvlm.utils.distributed import world
from medvlm.utils.io import atomic_write_json, write_jsonl

logger = logging.getLogger(__name__)

#: Record fields copied into each prediction line, for slicing.
SLICE_FIELDS = ("answer_type", "modality", "body_part", "source", "split")


def prediction_rows(records, answers: list[str]) -> list[dict]:
    """One predictions-file row per record: id, question, answer, prediction, choices, the slicing
    fields, ``qtype`` from meta, and ``group``/``variant`` when the dataset groups paraphrases."""
    rows = []
    for rec, pred in zip(records, answers):
        meta = parse_meta(rec.get("meta"))
        row = {"id": rec["id"], "question": rec["question"], "answer": rec["answer"], "prediction": pred,
               "choices": list(rec.get("choices") or [])}
        row.update({k: rec.get(k, "") for k in SLICE_FIELDS})
        if "qtype" in meta:
            row["qtype"] = meta["qtype"]
        if meta.get("paraphrase_group") not in (None, ""):  # cxr_paraphrase: groups scored for robustness
            row["group"] = str(meta["paraphrase_group"])
            row["variant"] = "" if meta.get("question_variant") is None else str(meta["question_variant"])
        rows.append(row)
    return rows


def evaluate_examples(
    model, processor, family: ModelFamily, records, examples: PreparedExamples, out_dir: str | Path | None,
    *, batch_size: int | str = "auto", max_new_tokens: int = 12, name: str = "predictions", bootstrap: int = 1000,
    progress: bool = True,
) -> dict:
    """Greedy answers for ``examples``, scored; writes ``{name}.jsonl`` into ``out_dir`` if given.

    Every process of a launch must call it: each generates its shard, the main process gathers
    the answers in order, scores them and writes; the others return ``{}``. The metrics carry a
    ``generation`` section (processes, questions per process, the batch each used)."""
    sharded = generate_sharded(model, processor, family, examples.image, examples.questions, batch_size=batch_size,
                               max_new_tokens=max_new_tokens, progress=progress)
    if world()[0] != 0:
        return {}
    rows = prediction_rows(records, sharded.answers)
    if out_dir is not None:
        write_jsonl(Path(out_dir) / f"{name}.jsonl", rows)
    metrics = score_records(rows, bootstrap=bootstrap, slice_by=("qtype", "modality", "body_part"))
    metrics["generation"] = generation_summary({"greedy": sharded})
    return metrics


def write_metrics(out_dir: str | Path, metrics: dict) -> Path:
    return atomic_write_json(Path(out_dir) / "metrics.json", metrics)
