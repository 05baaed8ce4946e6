"""Attention-knockout map: how much p(answer) drops when the last position may not read one image cell.

A causal map at the attention level (Geva et al. 2023's attention knockout, applied per image
cell; the rule, its source and the mask handling are in :mod:`medvlm.diagnostics.knockout`): for
each cell of the image-token grid (or each block of cells on grids wider than ``max_side``, as
occlusion does), the attention scores from that cell's tokens to the last prompt position are set
to the dtype's minimum before the softmax, in every head of every decoder layer, and the map holds
the relative drop of the explained token's probability in percent, ``(p - p_knocked) / p * 100``.
Positive cells are read directly by the position that answers and support the answer. Unlike
occlusion the image itself is untouched: the other tokens still see the cell, so a cell whose
evidence reaches the answer through other positions scores near 0. One batched forward per
``batch_size`` cells, as many as fit half the free memory (each copy of the example holds a whole
forward pass, vision tower included: :func:`~medvlm.diagnostics.methods.base.copies_per_forward`);
eager or sdpa attention, on top of each family's own mask.
"""

from __future__ import annotations

from medvlm.diagnostics.knockout import knockout_map, map_blocks
from medvlm.diagnostics.methods.base import (
    Context,
    Method,
    MethodResult,
    Shape,
    copies_per_forward,
    plan_budget,
    register,
)
from medvlm.eval.batching import BatchRecord


@register
class AttentionKnockout(Method):
    name = "knockout"
    title = "Attention knockout"
    order = 65

    def cost(self, shape: Shape, max_side: int = 8) -> float:
        _, tops = map_blocks(shape.grid, max_side)
        return (len(tops) + 1) * shape.forward_flops()

    def _batch(self, shape: Shape, budget_bytes: int) -> int:
        return copies_per_forward(shape, budget_bytes, len(map_blocks(shape.grid, 8)[1]))

    def memory(self, shape: Shape, budget_bytes: int | None = None) -> float:
        """One batch of knocked-out copies of the example through the model (each with its own
        edited attention mask, within the forward pass's S² term), sized as :meth:`run` sizes it."""
        budget = plan_budget(None, budget_bytes)
        return shape.forward_bytes(batch=self._batch(shape, budget))

    def run(self, ctx: Context, budget_bytes: int | None = None) -> MethodResult:
        batch = self._batch(Shape.of(ctx.model, ctx.family, ctx.example), plan_budget(ctx.model, budget_bytes))
        record = BatchRecord(requested=batch)
        drops = knockout_map(ctx.model, ctx.family, ctx.example, batch_size=batch, record=record)
        return MethodResult(drops, row={"knockout_batch": record.used, "knockout_oom_halvings": list(record.halvings)})
