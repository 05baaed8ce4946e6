"""Log-probability increase per image position and per attention head.

After Yu & Ananiadou, "Neuron-level knowledge attribution in large language models" (EMNLP 2024,
eq. for attention: Imp(v^l) = log p(w | v^l + h^{l-1}) - log p(w | h^{l-1})) as applied to image
positions in "Understanding multimodal LLMs: the mechanistic interpretability of Llava in visual
question answering" (2024): for the predicted token w at the query position q,

    delta(l, h, j) = log p(w | h_{l-1} + c_lhj) - log p(w | h_{l-1})

where h_{l-1} is the residual stream at q *entering* decoder layer l (read through the final norm
and the unembedding, as the logit lens does) and c_lhj = a_lh[q, j] · (v_lh[j] @ W_O,h^T) is head h
of layer l's weighted value vector from source position j, projected through that head's slice of
``o_proj`` (its exact share of the attention output: summing c over heads and positions gives
``o_proj``'s output without bias; a layer that normalises its attention output before adding it to
the residual, as Gemma 2/3 do with ``post_attention_layernorm``, scales c by that norm's factor at q,
so that c still sums to what the layer adds). The baseline is the layer's own input, not the final residual:
against the final residual a confident model (p(w) near 1) leaves no room to increase and every
delta is near 0, whatever the head reads.

Everything comes from ONE forward pass with hooks (attention rows at q, value vectors, the residual
entering each layer at q; output logits only at q), then one batched readout of every baseline and
every (layer, head, position) candidate: h + c → final norm → unembedding → log_softmax[w].

Position map: ``reduce="sum"`` (default) adds delta over all layers and heads, the total evidence
for w carried from a patch; ``"max"`` keeps the strongest single head, which highlights patches
read by one specialised head. Head scores: delta summed over the image positions; the top 10 heads
are the (layer, head) pairs with the largest total.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from medvlm.diagnostics.capture import Cache, Example, capture
from medvlm.diagnostics.methods.base import Context, Method, MethodResult, Shape, register
from medvlm.models.base import ModelFamily


@dataclass
class LogProbIncrease:
    """delta [layers, heads, positions] for one predicted token (see module docstring).

    ``base_logprob`` is the model's own log p(w) at the query position (its output logits).
    """

    target_id: int
    target_token: str
    query_position: int
    base_logprob: float
    layers: list[int]
    heads: list[int]
    positions: list[int]
    image_positions: list[int]
    grid: tuple[int, int]
    delta: np.ndarray
    #: log p(w | h_{l-1}) per chosen layer: the baseline each layer's deltas are measured from
    layer_base_logprob: np.ndarray | None = None

    def _image_delta(self) -> np.ndarray:
        idx = [self.positions.index(p) for p in self.image_positions]
        return self.delta[:, :, idx]

    def position_map(self, reduce: str = "sum") -> np.ndarray:
        """Per image position, delta summed (or maxed) over layers and heads: a signed (rows, cols) map.

        Use ``np.clip(m, 0, None)`` before scoring with attention_quality (which needs >= 0).
        """
        d = self._image_delta()
        if reduce == "sum":
            return d.sum((0, 1)).reshape(self.grid)
        if reduce == "max":
            return d.max((0, 1)).reshape(self.grid)
        raise ValueError(f"reduce={reduce!r}; expected 'sum' or 'max'")

    @property
    def head_scores(self) -> np.ndarray:
        """Total increase over image positions per (layer, head): [layers, heads]."""
        return self._image_delta().sum(-1)

    def top_heads(self, n: int = 10) -> list[tuple[int, int, float]]:
        """The ``n`` (layer, head, total increase) with the largest total over image positions."""
        scores = self.head_scores
        order = np.argsort(scores, axis=None)[::-1][:n]
        return [(self.layers[i // scores.shape[1]], self.heads[i % scores.shape[1]], float(scores.flat[i]))
                for i in order]


def effective_weight(linear: torch.nn.Module) -> torch.Tensor:
    """The weight a linear layer applies, float32: with an unmerged, active peft LoRA adapter the base
    weight plus each active adapter's scaled delta (B @ A · alpha / r), else ``linear.weight``."""
    base = getattr(linear, "base_layer", None)
    if base is None or not hasattr(linear, "get_delta_weight"):
        return linear.weight.float()
    weight = base.weight.float()
    if getattr(linear, "merged", False) or getattr(linear, "disable_adapters", False):
        return weight  # merged: already in the base weight; disabled: not applied
    for name in getattr(linear, "active_adapters", []):
        if name in getattr(linear, "lora_A", {}):
            weight = weight + linear.get_delta_weight(name).float()
    return weight


def head_contributions(model: torch.nn.Module, family: ModelFamily, cache: Cache, layer: int, query: int,
                       positions: Sequence[int]) -> torch.Tensor:
    """c for one layer: [heads, positions, D], from captured ``attn`` rows at ``query`` and ``v``."""
    return layer_contributions(model, family, cache, [layer], query, positions)[0]


@torch.no_grad()
def logprob_increase(model: torch.nn.Module, family: ModelFamily, example: Example, tokenizer=None, *,
                     layers: Sequence[int] | None = None, positions: str | Sequence[int] = "image",
                     query_position: int | None = None, target_id: int | None = None,
                     chunk: int = 512, memory_mb: float = 512) -> LogProbIncrease:
    """delta for every (layer, head, source position) from one capture pass.

    ``query_position`` defaults to the example's first target position (the last prompt position
    without an answer); ``target_id`` to the example's answer token there, else the model's
    prediction. ``positions``: ``"image"`` (default), ``"all"`` or explicit source positions.
    ``chunk`` candidates are unembedded at a time (chunk x vocab floats); layers are scored in
    groups whose candidate vectors fit ``memory_mb``.
    """
    n_layers = len(family.decoder_layers(model))
    chosen = sorted({x % n_layers for x in layers}) if layers is not None else list(range(n_layers))
    q = example.target_positions[0] if query_position is None else query_position
    seq_len = int(example.inputs["input_ids"].shape[-1])
    q %= seq_len
    wanted = {f"blocks.{layer}.{kind}" for layer in chosen for kind in ("attn", "v", "resid_pre")}
    output, cache = capture(model, family, example.inputs, layers=chosen, query_positions=[q], values=True,
                            resid_pre=True, names_filter=wanted, logits_positions=[q])
    span = cache.image_span
    image_positions = list(range(span.start, span.end))
    if isinstance(positions, str):
        if positions not in ("image", "all"):
            raise ValueError(f"positions={positions!r}; expected 'image', 'all' or a list of ints")
        src = image_positions if positions == "image" else list(range(seq_len))
    else:
        src = sorted({int(p) % seq_len for p in positions} | set(image_positions))
    final = torch.log_softmax(output.logits[0, -1].float(), -1)  # logits were computed at q only
    if target_id is None:
        target_id = (example.target_ids[0] if example.target_ids and query_position is None
                     else int(final.argmax()))
    # layers in groups whose fp32 candidates [g, H, P, D] fit ``memory_mb`` (a 7B LLaVA's whole
    # [L, H, P, D] would be ~10 GB): the tiny demo model scores all layers in one readout
    d_model = cache["resid_pre", chosen[0]].shape[-1]
    per_layer = 1 + len(cache.heads) * len(src)
    group = max(1, int(memory_mb * 2**20 // (4 * d_model * per_layer)))
    bases, scores = [], []
    for start in range(0, len(chosen), group):
        layers_g = chosen[start:start + group]
        contrib = layer_contributions(model, family, cache, layers_g, q, src)  # [g, H, P, D]
        h = torch.stack([cache["resid_pre", layer][0, q] for layer in layers_g]).float()  # [g, D]
        candidates = torch.cat([h, (h[:, None, None, :] + contrib).reshape(-1, h.shape[-1])])
        logp = torch.cat([torch.log_softmax(family.lens_logits(model, candidates[i:i + chunk]), -1)
                          [:, target_id] for i in range(0, candidates.shape[0], chunk)])
        bases.append(logp[:len(layers_g)])
        scores.append(logp[len(layers_g):].reshape(contrib.shape[:3]))
        del contrib, candidates
    base = torch.cat(bases)
    delta = torch.cat(scores) - base[:, None, None]
    token = tokenizer.decode([target_id]) if tokenizer is not None else str(target_id)
    return LogProbIncrease(int(target_id), token, q, float(final[target_id]), chosen, list(cache.heads), src,
                           image_positions, span.grid, delta.double().cpu().numpy(), base.double().cpu().numpy())


def layer_contributions(model: torch.nn.Module, family: ModelFamily, cache: Cache, layers: Sequence[int],
                        query: int, positions: Sequence[int]) -> torch.Tensor:
    """:func:`head_contributions` of several layers in one einsum: [layers, heads, positions, D].

    Each is what that head's weighted value from that position adds to the residual stream: the
    family maps the ``o_proj`` shares through any norm the layer applies to its attention output
    (:meth:`~medvlm.models.base.ModelFamily.attention_residual`), which needs the whole attention
    output at ``query`` (every captured source position; every head, as ``capture`` keeps by default)."""
    n_heads, _, head_dim = family.head_layout(model)
    qi, pos = cache.query_index(query), list(positions)
    blocks = family.decoder_layers(model)
    a = torch.stack([cache["attn", layer][0][:, qi] for layer in layers]).float()  # [L, H, S]
    v = torch.stack([cache["v", layer][0] for layer in layers]).float()  # [L, S, H, d]
    o_projs = [family.attention_module(blocks[layer]).o_proj for layer in layers]
    w_o = torch.stack([effective_weight(o) for o in o_projs])  # [L, D, H*d]
    w_o = w_o.unflatten(2, (n_heads, head_dim))[:, :, cache.heads]  # [L, D, H, d]
    contrib = torch.einsum("lhp,lphd,lDhd->lhpD", a[:, :, pos], v[:, pos], w_o)
    whole = None
    if len(cache.heads) == n_heads:  # the attention output at the query: every head, every source position
        whole = torch.einsum("lhs,lshd,lDhd->lD", a, v, w_o)
        whole = whole + torch.stack([o.bias.float() if getattr(o, "bias", None) is not None
                                     else torch.zeros_like(whole[0]) for o in o_projs])
    return torch.stack([family.attention_residual(model, layer, contrib[i], None if whole is None else whole[i])
                        for i, layer in enumerate(layers)])


@register
class LogProb(Method):
    name = "logprob"
    title = "Log-probability increase"
    order = 40
    eager = True

    def cost(self, shape: Shape) -> float:
        candidates = shape.n_layers * (1 + shape.n_heads * shape.image_tokens)
        return shape.forward_flops() + shape.unembed_flops(candidates)

    def run(self, ctx: Context) -> MethodResult:
        lpi = logprob_increase(ctx.model, ctx.family, ctx.example, ctx.tokenizer)
        row = {"top_heads": [{"layer": a, "head": b, "increase": s} for a, b, s in lpi.top_heads(10)],
               "head_scores": lpi.head_scores.tolist()}
        return MethodResult(lpi.position_map("sum"), row, lpi)
