"""Occlusion saliency: how much the answer's log-probability drops when one image cell is hidden.

Zeiler & Fergus 2014 ("Visualizing and understanding convolutional networks", section 4.2) slide
a grey square over the input and record the drop in the class score. Here the square is one cell
of the model's own image-token grid (read from the sequence, as everywhere in this package), the
fill is the image's per-channel mean in the processor's normalised space, and the score is
log p(answer tokens | image, question) summed over the answer positions (or the predicted token
when there is no answer)::

    map[r, c] = score(image) - score(image with cell (r, c) replaced by its mean)

Positive cells support the answer. It needs no attention weights and no gradients, and it is
faithful by construction (it measures the model's output, not an internal proxy), which makes it
the reference the other maps are compared with. Its price is one forward pass per cell:
``batch_size`` cells share one batched forward, and logits are computed at the answer positions
only (``logits_to_keep``), not over the whole sequence and vocabulary. The batch is sized to
memory (:func:`~medvlm.diagnostics.methods.base.copies_per_forward`: one occluded copy holds a
whole forward pass); an out-of-memory error the allocator raises halves the batch and redoes the
failed chunk (:func:`medvlm.eval.batching.run_batches`). On grids wider than
``max_side`` (a real checkpoint's 16x16 to 32x32) blocks of cells are hidden together, so at
most ``max_side**2`` forwards run; every cell of a block gets the block's drop.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from medvlm.diagnostics.capture import Example, check_length
from medvlm.diagnostics.knockout import map_blocks
from medvlm.diagnostics.methods.base import (
    Context,
    Method,
    MethodResult,
    Shape,
    copies_per_forward,
    plan_budget,
    register,
)
from medvlm.eval.batching import BatchRecord, run_batches
from medvlm.models.base import ModelFamily


def n_forwards(grid: tuple[int, int], max_side: int | None = 8) -> int:
    """Occluded forward passes a map of ``grid`` takes (one per block of cells)."""
    return len(map_blocks(grid, max_side)[1])


def _answer_score(logits: torch.Tensor, positions: Sequence[int], targets: Sequence[int]) -> torch.Tensor:
    """Summed log-probability of ``targets`` at ``positions`` for each batch row: [B]."""
    logp = torch.log_softmax(logits[:, list(positions)].float(), dim=-1)  # [B, P, V]
    index = torch.tensor(list(targets), device=logp.device)[None, :, None].expand(logp.shape[0], -1, 1)
    return logp.gather(-1, index)[..., 0].sum(-1)


@torch.no_grad()
def occlusion(model: torch.nn.Module, family: ModelFamily, example: Example, *,
              target_ids: Sequence[int] | None = None, positions: Sequence[int] | None = None,
              batch_size: int | None = None, max_side: int | None = 8, budget_bytes: int | None = None,
              record: BatchRecord | None = None) -> np.ndarray:
    """Occlusion map (rows, cols) of ``example`` (see the module docstring).

    ``target_ids`` / ``positions`` default to the example's answer tokens and the positions that
    predict them, else the model's predicted token at the last position. ``batch_size`` occluded
    images go through the model at a time (1 = one forward per cell; None: as many as fit
    ``budget_bytes``, by default half the free memory, see
    :func:`~medvlm.diagnostics.methods.base.copies_per_forward`). ``max_side``:
    hide blocks of ``ceil(side / max_side)`` cells on larger grids (None: always one cell).
    ``record`` (if given) is filled with the batch asked for, the one that finished and any halving.
    """
    if (batch_size is not None and batch_size < 1) or (max_side is not None and max_side < 1):
        raise ValueError(f"batch_size={batch_size}, max_side={max_side}; expected at least 1")
    inputs = example.inputs
    if "pixel_values" not in inputs:
        raise KeyError(f"occlusion needs 'pixel_values' in the inputs; found {sorted(inputs)}")
    check_length(model, family, int(inputs["input_ids"].shape[-1]))
    family.check_pixels(model, inputs)
    span = example.span or family.image_spans(model, inputs)[0]
    rows, cols = span.grid
    positions = list(positions) if positions is not None else example.target_positions
    seq_len = int(inputs["input_ids"].shape[-1])
    keep = torch.tensor([p % seq_len for p in positions], dtype=torch.long)  # logits only where scored
    rows_at = list(range(len(positions)))  # the kept logits' rows, in the order of ``positions``
    block, blocks = map_blocks((rows, cols), max_side)
    record = record if record is not None else BatchRecord(requested="auto" if batch_size is None else batch_size)
    if batch_size is None:
        budget = plan_budget(model, budget_bytes)
        shape = Shape.of(model, family, example)
        batch_size = copies_per_forward(shape, budget, n_forwards(shape.grid, max_side))
        record.estimate = {"budget_mb": round(budget / 2**20, 1),
                           "copy_mb": round(shape.forward_bytes(batch=1) / 2**20, 1)}
    was_training = model.training
    model.eval()
    try:
        base_logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits
        if target_ids is None:
            target_ids = example.target_ids or base_logits[0, rows_at].argmax(-1).tolist()
        base = float(_answer_score(base_logits, rows_at, target_ids)[0])
        drops = np.zeros((rows, cols))

        def run_chunk(lo: int, hi: int) -> int:
            chunk = blocks[lo:hi]
            batch = family.occluded_batch(inputs, span, chunk, block)
            logits = model(**batch, use_cache=False, logits_to_keep=keep).logits
            scores = base - _answer_score(logits, rows_at, target_ids).double().cpu().numpy()
            for (r, c), drop in zip(chunk, scores, strict=True):
                drops[r:r + block, c:c + block] = drop
            return hi - lo

        run_batches(len(blocks), min(batch_size, len(blocks)), run_chunk, record, what="occlusion",
                    unit="occluded copies")
    finally:
        model.train(was_training)
    return drops


@register
class Occlusion(Method):
    name = "occlusion"
    title = "Occlusion"
    order = 60

    def cost(self, shape: Shape, max_side: int = 8) -> float:
        return (n_forwards(shape.grid, max_side) + 1) * shape.forward_flops()

    def memory(self, shape: Shape, budget_bytes: int | None = None) -> float:
        """One batch of occluded copies through the model, sized to ``budget_bytes`` (default: what
        :func:`occlusion` plans with on a CPU, half the free memory) by
        :func:`~medvlm.diagnostics.methods.base.copies_per_forward`, logits at the scored position
        (the probe explains the predicted token); the copies' pixels (a few MB) are within the
        forward pass's upper estimate."""
        budget = plan_budget(None, budget_bytes)
        return shape.forward_bytes(batch=copies_per_forward(shape, budget, n_forwards(shape.grid)))

    def run(self, ctx: Context) -> MethodResult:
        record = BatchRecord(requested="auto")
        drops = occlusion(ctx.model, ctx.family, ctx.example, record=record)
        return MethodResult(drops, row={"occlusion_batch": record.used, "occlusion_oom_halvings": list(record.halvings)})
