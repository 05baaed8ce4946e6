"""Raw attention: the response positions' head-mean attention to the image over the last quarter of
the decoder (:func:`medvlm.diagnostics.saliency.attention_map` with ``fusion="mean"``), read from the
shared capture's head-mean rows (the mean over heads commutes with the mean over layers and positions)."""

from __future__ import annotations

import torch

from medvlm.diagnostics.methods.base import Context, Method, MethodResult, Shape, register
from medvlm.diagnostics.saliency import last_quarter


@register
class Attention(Method):
    name = "attention"
    title = "Attention"
    order = 10
    shared = frozenset({"attention_mean"})
    eager = True

    def cost(self, shape: Shape) -> float:
        return 0.0  # read from the shared pass

    def memory(self, shape: Shape) -> float:
        return float(4 * shape.n_layers * shape.seq_len * shape.image_tokens)  # the image rows it stacks

    def run(self, ctx: Context) -> MethodResult:
        cache = ctx.cache
        span = cache.image_span
        idx = [cache.query_index(p) for p in ctx.positions]
        rows = [cache["attn_mean", layer][0][idx, span.start:span.end] for layer in last_quarter(cache.n_layers)]
        grid = torch.stack(rows).float().mean((0, 1)).reshape(span.grid)
        return MethodResult(grid.double().cpu().numpy())
