"""Attention rollout (Abnar & Zuidema 2020) from the shared capture's head-mean attention of every
layer (:func:`medvlm.diagnostics.saliency.rollout`)."""

from __future__ import annotations

from medvlm.diagnostics.methods.base import Context, Method, MethodResult, Shape, register
from medvlm.diagnostics.saliency import rollout


@register
class Rollout(Method):
    name = "rollout"
    title = "Attention rollout"
    order = 20
    shared = frozenset({"attention_mean"})
    eager = True

    def cost(self, shape: Shape) -> float:
        return float(2 * shape.n_layers * shape.seq_len**3)  # the product of per-layer S x S matrices

    def memory(self, shape: Shape) -> float:
        return float(4 * 5 * shape.seq_len**2)  # S x S float32: A, the identity, Â, the product and its result

    def run(self, ctx: Context) -> MethodResult:
        return MethodResult(rollout(ctx.cache, ctx.positions))
