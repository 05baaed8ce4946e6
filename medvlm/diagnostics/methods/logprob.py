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
entering each layer at q, each head's output at q, the last layer's output at q; output logits only
at q), then one batched readout of every baseline and every candidate: h + c → final norm →
unembedding → log_softmax[w].

The final norm of a candidate (``norm=``): ``"frozen"`` (default) divides by the RMS of the last
decoder layer's output at q, held fixed for every candidate, as the authors' code does
(zepingyu0512/llava-mechanism @ dd4ed00, Llava_visualize_code.ipynb: ``get_bsvalues`` scales every
vector by ``rsqrt(final_var + 1e-6)`` with ``final_var`` the mean square of the last layer's output
at the last position; :meth:`~medvlm.models.base.ModelFamily.frozen_final_norm`). The readout is
then linear in the vector, so a head is credited for the direction it writes, not for shrinking
or growing the residual. ``"recompute"`` normalises each candidate by its own RMS (the logit lens).

Position map: ``reduce="sum"`` (default) adds delta over all layers and heads, the total evidence
for w carried from a patch; ``"max"`` keeps the strongest single head, which highlights patches
read by one specialised head.

Two head scores:

- ``head_scores`` / ``top_heads``: the paper's head importance (eq. 6 of Yu & Ananiadou 2024,
  arXiv 2411.10950; notebook cell "head-level increase"): ONE delta of the head's whole output at q,
  log p(w | h_{l-1} + o_lh) - log p(w | h_{l-1}), o_lh = Σ_j c_lhj over ALL source positions (read
  from the head's input to ``o_proj`` at q: :func:`head_outputs`);
- ``image_head_scores`` / ``image_top_heads``: delta summed over the image positions, what a head
  carries from the image, position by position (a sum of per-position deltas, not the delta of a
  sum: the two rank heads differently).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from medvlm.diagnostics.capture import Cache, Example, capture
from medvlm.diagnostics.methods.base import Context, Method, MethodResult, Shape, register, unembed_rows
from medvlm.models.base import ModelFamily

#: candidate vectors unembedded at a time (chunk x vocab float32 logits and their log-sum-exp)
CHUNK = 512
#: the layers' candidate vectors are built in groups whose float32 vectors fit this many MB
MEMORY_MB = 512


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
    #: the paper's head importance [layers, heads]: the delta of each head's whole output at q
    head_scores: np.ndarray | None = None
    #: how the final norm read the candidates: "frozen" (the last layer's RMS at q) or "recompute"
    norm: str = "frozen"

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
    def image_head_scores(self) -> np.ndarray:
        """Per-position increase summed over the image positions per (layer, head): [layers, heads]."""
        return self._image_delta().sum(-1)

    def top_heads(self, n: int = 10) -> list[tuple[int, int, float]]:
        """The ``n`` (layer, head, importance) with the largest paper's head importance (``head_scores``)."""
        return ranked_heads(self.head_scores, self.layers, self.heads, n)

    def image_top_heads(self, n: int = 10) -> list[tuple[int, int, float]]:
        """The ``n`` (layer, head, total) with the largest increase summed over the image positions."""
        return ranked_heads(self.image_head_scores, self.layers, self.heads, n)


def ranked_heads(scores: np.ndarray, layers: Sequence[int], heads: Sequence[int],
                 n: int = 10) -> list[tuple[int, int, float]]:
    """The ``n`` (layer, head, score) of a [layers, heads] score matrix, largest first."""
    order = np.argsort(scores, axis=None, kind="stable")[::-1][:n]
    return [(int(layers[i // scores.shape[1]]), int(heads[i % scores.shape[1]]), float(scores.flat[i]))
            for i in order]


def head_outputs(model: torch.nn.Module, family: ModelFamily, cache: Cache, layers: Sequence[int],
                 query: int) -> torch.Tensor:
    """o_lh, what each head's whole output at ``query`` adds to the residual stream: [layers, heads, D].

    The head's slice of ``o_proj``'s input (captured ``head_out``) times that head's slice of W_O,
    mapped through any norm the layer applies to its attention output (Gemma's
    ``post_attention_layernorm``, :meth:`~medvlm.models.base.ModelFamily.attention_residual`);
    equal to :func:`layer_contributions` summed over every source position (a · v · W_O summed over j)."""
    n_heads, _, head_dim = family.head_layout(model)
    qi, blocks = cache.query_index(query), family.decoder_layers(model)
    z = torch.stack([cache["head_out", layer][0, qi] for layer in layers]).float()  # [L, Hs, d]
    o_projs = [family.attention_module(blocks[layer]).o_proj for layer in layers]
    w_o = torch.stack([effective_weight(o) for o in o_projs])
    w_o = w_o.unflatten(2, (n_heads, head_dim))[:, :, cache.heads]  # [L, D, Hs, d]
    parts = torch.einsum("lhd,lDhd->lhD", z, w_o)
    whole = None
    if len(cache.heads) == n_heads:  # o_proj's output at the query, bias included
        whole = parts.sum(1) + torch.stack([o.bias.float() if getattr(o, "bias", None) is not None
                                            else torch.zeros_like(parts[0, 0]) for o in o_projs])
    return torch.stack([family.attention_residual(model, layer, parts[i], None if whole is None else whole[i])
                        for i, layer in enumerate(layers)])


def target_logprobs(model: torch.nn.Module, family: ModelFamily, vectors: torch.Tensor, target_id: int,
                    reference: torch.Tensor | None, chunk: int = CHUNK) -> torch.Tensor:
    """log p(target | vector) for residual vectors [N, D] through the final norm (its statistic held
    at ``reference`` when given) and the unembedding, at most ``chunk`` vectors at a time (fewer on a
    large vocabulary: :func:`~medvlm.diagnostics.methods.base.unembed_rows`): [N].

    Each chunk's score is a new [chunk] tensor (the target's logit minus the log-sum-exp), so the
    chunk's [chunk, vocab] logits are freed before the next: a column view of them would keep the
    whole chunk alive until the end."""
    chunk = unembed_rows(model, family, chunk)
    scores = []
    for i in range(0, vectors.shape[0], chunk):
        logits = family.lens_logits(model, vectors[i:i + chunk], reference)
        scores.append(logits[:, target_id] - torch.logsumexp(logits, -1))
        del logits
    return torch.cat(scores)


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


NORMS = ("frozen", "recompute")


@torch.no_grad()
def logprob_increase(model: torch.nn.Module, family: ModelFamily, example: Example, tokenizer=None, *,
                     layers: Sequence[int] | None = None, positions: str | Sequence[int] = "image",
                     query_position: int | None = None, target_id: int | None = None, norm: str = "frozen",
                     chunk: int = CHUNK, memory_mb: float = MEMORY_MB) -> LogProbIncrease:
    """delta for every (layer, head, source position), and each head's importance, from one capture pass.

    ``query_position`` defaults to the example's first target position (the last prompt position
    without an answer); ``target_id`` to the example's answer token there, else the model's
    prediction. ``positions``: ``"image"`` (default), ``"all"`` or explicit source positions.
    ``norm``: how the final norm reads a candidate (module docstring). At most ``chunk`` candidates
    are unembedded at a time (chunk x vocab floats, fewer on a large vocabulary); layers are scored in groups whose candidate
    vectors fit ``memory_mb``.
    """
    if norm not in NORMS:
        raise ValueError(f"norm={norm!r}; expected one of {NORMS}")
    n_layers = len(family.decoder_layers(model))
    chosen = sorted({x % n_layers for x in layers}) if layers is not None else list(range(n_layers))
    q = example.target_positions[0] if query_position is None else query_position
    seq_len = int(example.inputs["input_ids"].shape[-1])
    q %= seq_len
    wanted = {f"blocks.{layer}.{kind}" for layer in chosen for kind in ("attn", "v", "resid_pre", "head_out")}
    wanted.add(f"blocks.{n_layers - 1}.resid_post")  # the final norm's input: its RMS is held fixed
    output, cache = capture(model, family, example.inputs, layers=sorted({*chosen, n_layers - 1}),
                            query_positions=[q], values=True, resid_pre=True, head_outputs=True,
                            hidden_states=norm == "frozen", names_filter=wanted, logits_positions=[q])
    reference = cache["resid_post", n_layers - 1][0, q].float() if norm == "frozen" else None
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
    n_heads = len(cache.heads)
    per_layer = 1 + n_heads * (len(src) + 1)
    group = max(1, int(memory_mb * 2**20 // (4 * d_model * per_layer)))
    bases, scores, whole = [], [], []
    for start in range(0, len(chosen), group):
        layers_g = chosen[start:start + group]
        contrib = layer_contributions(model, family, cache, layers_g, q, src)  # [g, H, P, D]
        h = torch.stack([cache["resid_pre", layer][0, q] for layer in layers_g]).float()  # [g, D]
        o = head_outputs(model, family, cache, layers_g, q)  # [g, H, D]
        g, grid = len(layers_g), contrib.shape[:3]
        # the candidates [h; h + o; h + c] written in place: a sum and a concatenation would each hold
        # another group's worth of vectors (the group's memory would be three times memory_mb)
        candidates = torch.empty(g * per_layer, d_model, dtype=contrib.dtype, device=contrib.device)
        candidates[:g] = h
        torch.add(h[:, None, :], o, out=candidates[g:g + g * n_heads].view(g, n_heads, d_model))
        torch.add(h[:, None, None, :], contrib, out=candidates[g + g * n_heads:].view(contrib.shape))
        del contrib, o
        logp = target_logprobs(model, family, candidates, target_id, reference, chunk)
        del candidates
        bases.append(logp[:g])
        whole.append(logp[g:g + g * n_heads].reshape(g, n_heads))
        scores.append(logp[g + g * n_heads:].reshape(grid))
    base = torch.cat(bases)
    delta = torch.cat(scores) - base[:, None, None]
    importance = torch.cat(whole) - base[:, None]
    token = tokenizer.decode([target_id]) if tokenizer is not None else str(target_id)
    return LogProbIncrease(int(target_id), token, q, float(final[target_id]), chosen, list(cache.heads), src,
                           image_positions, span.grid, delta.double().cpu().numpy(), base.double().cpu().numpy(),
                           importance.double().cpu().numpy(), norm)


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
        candidates = shape.n_layers * (1 + shape.n_heads * (shape.image_tokens + 1))
        return shape.forward_flops() + shape.unembed_flops(candidates)

    def memory(self, shape: Shape) -> float:
        """Its capture pass (a forward; kept per layer: the value vectors of every position repeated
        to every query head and the residual entering the layer, 4·L·S·(H·d + D)); then per group of
        g layers (as many as fit MEMORY_MB, at least one) the contributions and the candidates, each
        4·g·(1 + H·(T + 1))·D bytes, the group's output projections stacked and split by head (four
        copies of 4·g·D·H·d), and one chunk of candidates' logits with their log-sum-exp
        (2 x CHUNK x V floats)."""
        head_width = shape.n_heads * (shape.head_dim or shape.d_model // max(shape.n_heads, 1))
        kept = 4 * shape.n_layers * shape.seq_len * (head_width + shape.d_model)
        per_layer = 1 + shape.n_heads * (shape.image_tokens + 1)
        layer_bytes = 4 * per_layer * shape.d_model
        g = min(shape.n_layers, max(1, MEMORY_MB * 2**20 // layer_bytes))
        weights = 4 * 4 * g * shape.d_model * head_width
        chunk = 4 * 2 * min(CHUNK, g * per_layer) * shape.vocab
        return shape.forward_bytes() + kept + 2 * g * layer_bytes + weights + chunk

    def run(self, ctx: Context) -> MethodResult:
        """The map, and both head scores: ``top_heads`` / ``head_scores`` the paper's head importance
        (whole output at the last position), ``image_top_heads`` / ``image_head_scores`` the
        per-position increase summed over the image positions."""
        lpi = logprob_increase(ctx.model, ctx.family, ctx.example, ctx.tokenizer)
        image = lpi.image_head_scores

        def rows(ranked: list[tuple[int, int, float]]) -> list[dict]:  # "increase": the ranking's own score
            return [{"layer": a, "head": b, "increase": s,
                     "importance": float(lpi.head_scores[lpi.layers.index(a), lpi.heads.index(b)]),
                     "image_increase": float(image[lpi.layers.index(a), lpi.heads.index(b)])} for a, b, s in ranked]

        row = {"top_heads": rows(lpi.top_heads(10)), "head_scores": lpi.head_scores.tolist(),
               "image_top_heads": rows(lpi.image_top_heads(10)), "image_head_scores": image.tolist(),
               "head_norm": lpi.norm}
        return MethodResult(lpi.position_map("sum"), row, lpi)
