"""The Trainer: transformers' Trainer with medvlm's sampler and CPU-fitting defaults."""

from __future__ import annotations

import torch
from transformers import Trainer

from medvlm.training.sampler import PhaseLengthSampler


class MedVLMTrainer(Trainer):
    """Phase-ordered (annealing) and length-grouped batches; everything else is transformers'."""

    def _get_train_sampler(self, train_dataset=None) -> torch.utils.data.Sampler | None:
        ds = train_dataset if train_dataset is not None else self.train_dataset
        if not hasattr(ds, "phases"):
            return super()._get_train_sampler(train_dataset)
        return PhaseLengthSampler(ds.phases, ds.lengths, batch_size=self._train_batch_size * max(
            1, self.args.world_size), seed=self.args.seed, group_by_length=getattr(self.args, "group_by_length", True))
