"""Work done at every checkpoint: evaluate a small fixed subset and write metrics.json there."""

from __future__ import annotations

import logging
from pathlib import Path

from transformers import TrainerCallback

logger = logging.getLogger(__name__)


class CheckpointEvalCallback(TrainerCallback):
    """At each save, evaluate ``examples`` (a fixed validation subset) into ``checkpoint-N/metrics.json``.

    Runs on the main process only; the scalars also go to the Trainer's loggers (W&B) as
    ``ckpt/closed_accuracy`` etc.
    """

    def __init__(self, family, processor, records, examples, max_new_tokens: int = 12):
        self.family, self.processor = family, processor
        self.records, self.examples = records, examples
        self.max_new_tokens = max_new_tokens
        self.trainer = None

    def on_save(self, args, state, control, model=None, **kwargs):
        if not state.is_world_process_zero or model is None:
            return
        from medvlm.eval.run import evaluate_examples, write_metrics

        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        metrics = evaluate_examples(model, self.processor, self.family, self.records, self.examples,
                                    folder, max_new_tokens=self.max_new_tokens, bootstrap=200,
                                    name="eval_predictions", progress=False)
        metrics["global_step"] = state.global_step
        write_metrics(folder, metrics)
        closed = metrics.get("closed", {})
        logger.info("checkpoint %d: closed accuracy %s (n=%s)", state.global_step, closed.get("accuracy"),
                    closed.get("n"))
        if self.trainer is not None and closed.get("accuracy") is not None:
            self.trainer.log({"ckpt/closed_accuracy": closed["accuracy"]})
