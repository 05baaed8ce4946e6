"""Phase-ordered, length-grouped sampling: annealing keeps its order, batches pad little.

Phases (the mix's phases, the last one annealing toward the high-quality source) are visited in
order; within a phase, indices are shuffled with a seed that depends on the epoch, cut into
mega-batches of ``mega * batch_size`` and sorted by length inside each, so a batch holds
examples of similar length (the trick of HF's LengthGroupedSampler, kept within phases).
Deterministic for a given (seed, epoch), so resuming skips exactly the batches already seen.
"""

from __future__ import annotations

import numpy as np
import torch


class PhaseLengthSampler(torch.utils.data.Sampler[int]):
    def __init__(self, phases: np.ndarray, lengths: np.ndarray, batch_size: int, seed: int = 0,
                 mega: int = 8, group_by_length: bool = True):
        self.phases = np.asarray(phases)
        self.lengths = np.asarray(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.mega = mega
        self.group_by_length = group_by_length
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.phases)

    def order(self) -> list[int]:
        rng = np.random.default_rng([self.seed, self.epoch])
        out: list[int] = []
        for phase in np.unique(self.phases):
            idx = np.flatnonzero(self.phases == phase)
            idx = idx[rng.permutation(len(idx))]
            if self.group_by_length:
                size = self.mega * self.batch_size
                groups = [idx[i:i + size] for i in range(0, len(idx), size)]
                idx = np.concatenate([g[np.argsort(-self.lengths[g], kind="stable")] for g in groups])
            out.extend(int(i) for i in idx)
        return out

    def __iter__(self):
        return iter(self.order())
