"""The top multimodal neuron's map over the image grid (Schwettmann et al. 2023; see
:mod:`medvlm.diagnostics.neurons`).

Every MLP unit of the language model is scored by its gradient-free contribution to the explained
token at the image positions, Σ_i a_k(i) · (W_downᵀ W_U)[k, c] (W_U with the final norm's gain
folded in); the map is the top unit's contribution per image position, a_k(i) · (W_downᵀ W_U)[k, c]:
its activation over the grid, signed so that positive is where it pushes toward the token. The row
names the top units with the vocabulary tokens their output weights decode to.

This is the cheap reading (one forward pass and one readout per layer). Whether the units it ranks
first actually move the answer is a separate question, answered by the causal checks of
:mod:`medvlm.diagnostics.neuron_checks` (on the demo the gradient-free ranking fails it while the
gradient ranking passes: see the README's Diagnostics section).
"""

from __future__ import annotations

from medvlm.diagnostics.methods.base import Context, Method, MethodResult, Shape, register
from medvlm.diagnostics.neurons import multimodal_neurons

TOP = 5


@register
class TopNeuron(Method):
    name = "neuron"
    title = "Top multimodal neuron"
    order = 70

    def cost(self, shape: Shape) -> float:
        readout = 2 * shape.n_layers * shape.d_mlp * shape.d_model       # W_downᵀ · (γ ⊙ W_U[c]) per layer
        maps = 2 * shape.n_layers * shape.image_tokens * shape.d_mlp     # activation x readout at the image
        return shape.forward_flops() + readout + maps + shape.unembed_flops(TOP)  # + decoding the top units

    def run(self, ctx: Context) -> MethodResult:
        ns = multimodal_neurons(ctx.model, ctx.family, ctx.example, ctx.tokenizer,
                                target_id=ctx.example.target_ids[0] if ctx.example.target_ids else None, top=TOP)
        top = ns.table()
        first = top[0]
        caption = f"L{first['layer']}.u{first['unit']} → {', '.join(repr(t) for t in first['tokens'][:3])}"
        return MethodResult(ns.maps[0], {"top_neurons": top, "neuron_caption": caption}, ns)
