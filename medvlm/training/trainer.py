"""The Trainer: transformers' Trainer with medvlm's sampler, CPU-fitting defaults and a loss whose
logits are computed only where an answer token is predicted.

Why the loss is computed here. With ``labels`` a transformers model unembeds every position of the
sequence, image and prompt included, although the loss reads only the answer's few positions:
at a real checkpoint's shape that is the largest tensor of a training step (PaliGemma-3B-448: 1,045
positions x 257,216 vocabulary x 4 bytes = 1.07 GB of logits, and as much again for their
log-softmax and for each gradient), while the model's own activations for two layers per tower are
about half of that. :func:`answer_loss` asks the model for the logits at the positions that predict
a label (``logits_to_keep``) and takes the same cross-entropy there.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from transformers import Trainer

from medvlm.models.base import IGNORE_INDEX
from medvlm.training.sampler import PhaseLengthSampler


def answer_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(positions, targets)``: the sequence positions whose next token carries a label in some
    row of the batch (position p predicts token p + 1), and the labels they predict,
    ``[batch, len(positions)]`` (IGNORE_INDEX where a row has none there)."""
    shifted = labels[:, 1:]
    positions = (shifted != IGNORE_INDEX).any(0).nonzero().flatten()
    return positions, shifted[:, positions]


def answer_loss(model: torch.nn.Module, inputs: Mapping[str, Any],
                num_items_in_batch: torch.Tensor | int | None = None) -> tuple[torch.Tensor, Any]:
    """``(loss, outputs)``: the causal-LM cross-entropy of ``inputs["labels"]`` (ignoring
    IGNORE_INDEX), as ``model(**inputs).loss`` computes it, with logits only at the positions that
    predict a label. Summed over the labelled tokens and divided by ``num_items_in_batch`` when
    given (the Trainer's count over all accumulated batches), else by this batch's count."""
    positions, targets = answer_positions(inputs["labels"])
    rest = {k: v for k, v in inputs.items() if k != "labels"}
    outputs = model(**rest, logits_to_keep=positions.to(inputs["labels"].device))
    logits = outputs.logits.float()  # [batch, len(positions), vocab]
    total = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                              ignore_index=IGNORE_INDEX, reduction="sum")
    count = num_items_in_batch if num_items_in_batch is not None else (targets != IGNORE_INDEX).sum()
    if torch.is_tensor(count):
        count = count.to(total.device)
    return total / count, outputs


class MedVLMTrainer(Trainer):
    """Phase-ordered (annealing) and length-grouped batches, the loss of :func:`answer_loss`;
    everything else is transformers'."""

    def _get_train_sampler(self, train_dataset=None) -> torch.utils.data.Sampler | None:
        ds = train_dataset if train_dataset is not None else self.train_dataset
        if not hasattr(ds, "phases"):
            return super()._get_train_sampler(train_dataset)
        return PhaseLengthSampler(ds.phases, ds.lengths, batch_size=self._train_batch_size * max(
            1, self.args.world_size), seed=self.args.seed, group_by_length=getattr(self.args, "group_by_length", True))

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        """:func:`answer_loss`; transformers' own path when a label smoother or a custom loss
        function is set, or when the batch has no labels. The loss is normalised over the whole
        accumulated batch when the Trainer counted it (``num_items_in_batch``), as the models' own
        loss is, and scaled for several processes as transformers scales it."""
        if "labels" not in inputs or self.label_smoother is not None or self.compute_loss_func is not None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        items = num_items_in_batch if self.model_accepts_loss_kwargs else None
        loss, outputs = answer_loss(model, inputs, items)
        self.loss_is_scaled_for_ga = items is not None  # else the Trainer divides by the accumulation steps
        if self.args.average_tokens_across_devices and items is not None:
            scale = self.accelerator.num_processes // self.get_tp_size()
            loss = loss * (scale if self.args.n_gpu <= 1 else self.args.n_gpu)
        return (loss, outputs) if return_outputs else loss
