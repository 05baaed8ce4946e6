"""Sampled answers seeded per question, so they do not depend on batches or processes.

``generate(do_sample=True)`` draws every row's next token from the one global torch generator
(``torch.multinomial(probs)`` in transformers' ``GenerationMixin._sample``, 5.x), so the sample a
question gets depends on which other questions share its batch, on the batch size and, across
processes, on the rank: five sampled answers per question would change with the number of
processes. ``generate`` takes no per-row generator. :class:`PerRowSampler` is a logits processor
that does the sampling itself: each row (question ``q``, sample ``s``) owns a ``torch.Generator``
seeded from ``(seed, q, s)`` and its token is drawn from that row's probabilities only; the
processor returns a one-hot score (0 for the drawn token, -inf elsewhere), which transformers'
own multinomial then picks with certainty. Temperature and top-p are applied here with
transformers' own warpers (``generate`` is called with temperature 1, top-k 0 and top-p 1, so it
applies none of its own).

The distribution is unchanged (softmax of the warped scores, one multinomial draw per row and
step); only where the randomness comes from changes: a question's samples are the same whether it
is answered alone, in a batch of 32, or on process 3 of 8.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from transformers import LogitsProcessor, LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper


def row_seed(seed: int, question: int, sample: int) -> int:
    """A 64-bit seed for sample ``sample`` of question ``question`` (its global index in the
    evaluated set): numpy's ``SeedSequence`` hashes the three numbers, so nearby questions get
    unrelated streams."""
    if min(seed, question, sample) < 0:
        raise ValueError(f"seed, question index and sample index must be >= 0, got {seed}, {question}, {sample}")
    return int(np.random.SeedSequence((seed, question, sample)).generate_state(1, np.uint64)[0])


class PerRowSampler(LogitsProcessor):
    """Draws the next token of each row from its own seeded generator (see the module docstring).

    Rows are ordered as ``generate`` expands ``num_return_sequences``: question-major, so row
    ``r`` is sample ``r % k`` of question ``question_ids[r // k]``. ``generate`` keeps finished
    rows in the batch (padding them), so row ``r`` stays row ``r`` for the whole call.
    """

    def __init__(self, question_ids: Sequence[int], samples: int, *, seed: int, temperature: float = 1.0,
                 top_p: float = 1.0, device: torch.device | str = "cpu"):
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0 for sampling, got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        warpers = []
        if temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(temperature))
        if top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p))
        self.warpers = LogitsProcessorList(warpers)
        self.generators = [torch.Generator(device=device).manual_seed(row_seed(seed, int(q), s))
                           for q in question_ids for s in range(samples)]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if scores.shape[0] != len(self.generators):
            raise ValueError(f"{scores.shape[0]} rows of scores for {len(self.generators)} seeded rows; the sampler "
                             "must be built for this batch's questions and num_return_sequences")
        probs = torch.softmax(self.warpers(input_ids, scores).float(), dim=-1)
        picks = torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, self.generators)])
        one_hot = torch.full_like(scores, float("-inf"))
        return one_hot.scatter_(1, picks[:, None], 0.0)
