"""Work done at every checkpoint: evaluate a small fixed subset, write metrics.json there, log to W&B."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from medvlm.eval.distributed import generate_sharded, generation_summary
from medvlm.eval.metrics import headline, is_correct
from medvlm.eval.run import prediction_rows, write_metrics
from medvlm.eval.scoring import score_records
from medvlm.models.adapters import write_record
from medvlm.utils.distributed import world
from medvlm.utils.io import to_jsonable, write_jsonl

logger = logging.getLogger(__name__)

#: Slices scored (and logged) at each checkpoint.
CHECKPOINT_SLICES = ("qtype", "modality", "body_part")


def checkpoint_scalars(metrics: Mapping[str, Any], prefix: str = "ckpt") -> dict[str, float]:
    """Flat ``{name: number}`` of a score_records result: every configured closed/open metric
    (``ckpt/closed_accuracy``, ``ckpt/open_rougeL``) and each slice's headline numbers
    (``ckpt/qtype/presence/closed_accuracy``). ``None`` scores (empty groups) are left out."""
    out: dict[str, float] = {}
    names = metrics.get("config", {}).get("metrics", {})
    for t in ("closed", "open"):
        section = metrics.get(t, {})
        for name in names.get(t, []):
            if section.get(name) is not None:
                out[f"{prefix}/{t}_{name}"] = float(section[name])
    for field, table in metrics.get("slices", {}).items():
        for value, entry in table.items():
            for t in ("closed", "open"):
                for name, score in (entry.get(t) or {}).items():
                    if name == headline(t) and score is not None:
                        out[f"{prefix}/{field}/{value}/{t}_{name}"] = float(score)
    return out


def _active_wandb():
    """The ``wandb`` module when a run is active (``wandb.run is not None``), else ``None``."""
    try:
        import wandb
    except ImportError:
        return None
    return wandb if getattr(wandb, "run", None) is not None else None


class AdapterRecordCallback(TrainerCallback):
    """Writes ``medvlm_adapter.json`` (the base, the family, adapters merged into the base) into every
    checkpoint, so a checkpoint's adapter loads with :func:`~medvlm.models.adapters.load_with_adapter`
    like a final one."""

    def __init__(self, base_model: str, family: str, merged_into_base: Sequence[str] = (),
                 image_settings: dict[str, int] | None = None):
        self.base_model, self.family, self.merged = base_model, family, list(merged_into_base)
        self.image_settings = dict(image_settings or {})

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            write_record(Path(args.output_dir) / f"checkpoint-{state.global_step}", self.base_model, self.family,
                         self.merged, self.image_settings)


class CheckpointEvalCallback(TrainerCallback):
    """At each save, evaluate ``examples`` (a fixed validation subset) into ``checkpoint-N/metrics.json``
    (and its raw answers into ``checkpoint-N/eval_predictions.jsonl``).

    Under several processes every process answers its shard of the subset (the Trainer calls
    ``on_save`` on every process) and the main process gathers, scores, writes and logs.
    ``batch_size`` is questions per ``generate`` call or ``"auto"``. ``max_samples`` caps the subset, ``closed_metrics``/``open_metrics``
    pick the registered metrics (default: all), ``slice_by`` the slices. When a W&B run is active the
    scalars of :func:`checkpoint_scalars` and a ``wandb.Table`` of ``table_rows`` sample predictions
    with their images are logged at the checkpoint's step; otherwise the scalars go to the attached
    Trainer's loggers (``trainer.log``).
    """

    def __init__(self, family, processor, records, examples, max_new_tokens: int = 12, *,
                 max_samples: int | None = None, batch_size: int | str = "auto", bootstrap: int = 200,
                 closed_metrics: Sequence[str] | None = None, open_metrics: Sequence[str] | None = None,
                 slice_by: Sequence[str] = CHECKPOINT_SLICES, table_rows: int = 16, prefix: str = "ckpt"):
        if max_samples is not None and max_samples < 1:
            raise ValueError(f"max_samples must be >= 1 or None, got {max_samples}")
        self.family, self.processor = family, processor
        self.records, self.examples = records, examples
        self.max_new_tokens = max_new_tokens
        self.n = len(examples) if max_samples is None else min(max_samples, len(examples))
        self.batch_size, self.bootstrap = batch_size, bootstrap
        self.score_kwargs = {"closed_metrics": closed_metrics, "open_metrics": open_metrics, "slice_by": slice_by}
        self.table_rows, self.prefix = table_rows, prefix
        self.trainer = None

    def evaluate(self, model, folder: Path, step: int) -> tuple[dict, list[dict]]:
        """Answer the subset with ``model`` (this process's shard); on the main process, write
        predictions and metrics into ``folder`` and return them (``({}, [])`` on the others)."""
        ex = self.examples
        sharded = generate_sharded(model, self.processor, self.family, ex.image, ex.questions[:self.n],
                                   batch_size=self.batch_size, max_new_tokens=self.max_new_tokens, progress=False)
        if world()[0] != 0:
            return {}, []
        records = [self.records[i] for i in range(self.n)]
        rows = prediction_rows(records, sharded.answers)
        write_jsonl(folder / "eval_predictions.jsonl", (to_jsonable(row) for row in rows))
        metrics = score_records(rows, bootstrap=self.bootstrap, **self.score_kwargs)
        metrics["global_step"] = step
        metrics["generation"] = generation_summary({"greedy": sharded})
        write_metrics(folder, metrics)
        return metrics, rows

    def log_wandb(self, wandb, metrics: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], step: int) -> None:
        """Scalars and a table of sample predictions (with images) to the active W&B run."""
        table = wandb.Table(columns=["step", "id", "image", "question", "answer", "prediction", "correct",
                                     "answer_type", "qtype"])
        ex = self.examples
        for i, row in enumerate(rows[:self.table_rows]):
            correct = is_correct(row["prediction"], row["answer"], row) if row["answer_type"] == "closed" else None
            table.add_data(step, row["id"], wandb.Image(ex.image(i), caption=row["id"]),
                           row["question"], row["answer"], row["prediction"], correct, row["answer_type"],
                           row.get("qtype", ""))
        wandb.log({**checkpoint_scalars(metrics, self.prefix), f"{self.prefix}/predictions": table,
                   "train/global_step": step})

    def on_save(self, args, state, control, model=None, **kwargs):
        if model is None:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        metrics, rows = self.evaluate(model, folder, state.global_step)
        if not state.is_world_process_zero:
            return
        closed = metrics.get("closed", {})
        logger.info("checkpoint %d: closed accuracy %s (n=%s)", state.global_step, closed.get("accuracy"),
                    closed.get("n"))
        wandb = _active_wandb()
        if wandb is not None:
            self.log_wandb(wandb, metrics, rows, state.global_step)
        elif self.trainer is not None:
            scalars = checkpoint_scalars(metrics, self.prefix)
            if scalars:
                self.trainer.log(scalars)
