"""Important attention heads of one example, and what they write (Yu & Ananiadou 2024, arXiv 2411.10950).

Head importance (the paper's eq. 6): for the token w explained at the query position q (the last
prompt position), with h_{l-1} the residual stream entering layer l at q and o_lh head h's whole
output there (Σ_j a_lh[q, j] · v_lh[j] · W_O,h over ALL source positions j)::

    importance(l, h) = log p(w | h_{l-1} + o_lh) - log p(w | h_{l-1})

each read through the final norm and the unembedding. The final norm divides every candidate by
the RMS of the last decoder layer's output at q, held fixed (``norm="frozen"``), as the authors'
code does (zepingyu0512/llava-mechanism @ dd4ed00, Llava_visualize_code.ipynb, ``get_bsvalues``
with ``final_var``, used by the "head-level increase" cell); ``norm="recompute"`` normalises each
candidate by its own RMS instead (the logit lens). See :mod:`medvlm.diagnostics.methods.logprob`
for the per-position deltas and the image-only head score.

The reading of a head (the same notebook, the "pos increase" cell): its per-position pieces
c_lhj = a_lh[q, j] · v_lh[j] · W_O,h are ranked by their own increase
log p(w | h_{l-1} + c_lhj) - log p(w | h_{l-1}); the weighted value-output vectors c_lhj of the
``read_positions`` most important positions are projected into the vocabulary alone (final norm
with the same fixed RMS, unembedding: the notebook's "value ov" tokens), and the answer token's
rank there gives its reciprocal rank, 1 / rank (rank 1 = w is the top token; ties count in w's
favour). With a fixed RMS (or any per-vector RMS) the projection of one vector is the
unembedding of g ⊙ c up to a positive factor, so the rank does not depend on the norm choice.

Everything comes from ONE capture pass (attention rows at q, value vectors, each layer's input,
each head's output at q, the last layer's output at q).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from medvlm.diagnostics.capture import Example, capture
from medvlm.diagnostics.methods.logprob import (
    NORMS,
    head_contributions,
    head_outputs,
    ranked_heads,
    target_logprobs,
)
from medvlm.models.base import ModelFamily


@dataclass
class PositionReading:
    """One source position of a head: its increase, and the answer token's rank in its c_lhj's projection."""

    position: int
    is_image: bool
    increase: float
    rank: int
    top_tokens: list[str]

    @property
    def reciprocal_rank(self) -> float:
        return 1.0 / self.rank


@dataclass
class HeadReading:
    """A head's importance, its most important positions (largest increase first) and the answer
    token's rank in the projection of the head's whole output o_lh."""

    layer: int
    head: int
    importance: float
    positions: list[PositionReading]
    output_rank: int

    @property
    def reciprocal_rank(self) -> float:
        """At the head's most important position (the paper's reading)."""
        return self.positions[0].reciprocal_rank if self.positions else float("nan")

    @property
    def mean_reciprocal_rank(self) -> float:
        """Over the read positions."""
        return float(np.mean([p.reciprocal_rank for p in self.positions])) if self.positions else float("nan")

    def to_json(self) -> dict:
        return {"layer": self.layer, "head": self.head, "importance": self.importance,
                "reciprocal_rank": self.reciprocal_rank, "mean_reciprocal_rank": self.mean_reciprocal_rank,
                "output_reciprocal_rank": 1.0 / self.output_rank,
                "positions": [{"position": p.position, "image": p.is_image, "increase": p.increase, "rank": p.rank,
                               "top_tokens": p.top_tokens} for p in self.positions]}


@dataclass
class HeadImportance:
    """Every head's importance for one token at one position, and the readings of some heads."""

    target_id: int
    target_token: str
    query_position: int
    predicted_id: int
    base_logprob: float
    layers: list[int]
    heads: list[int]
    scores: np.ndarray                 # [layers, heads]
    layer_base_logprob: np.ndarray     # [layers]: log p(w | h_{l-1})
    norm: str
    readings: list[HeadReading] = field(default_factory=list)

    def top_heads(self, n: int = 10) -> list[tuple[int, int, float]]:
        return ranked_heads(self.scores, self.layers, self.heads, n)


def reciprocal_rank(logits: torch.Tensor, target_id: int) -> torch.Tensor:
    """1 / rank of ``target_id`` in each row of ``logits`` [..., V] (rank 1 = the largest; ties in its favour)."""
    return 1.0 / answer_rank(logits, target_id).float()


def answer_rank(logits: torch.Tensor, target_id: int) -> torch.Tensor:
    """Rank of ``target_id`` in each row of ``logits`` [..., V]: 1 + the number of strictly larger logits."""
    if not 0 <= target_id < logits.shape[-1]:
        raise ValueError(f"target id {target_id} outside a vocabulary of {logits.shape[-1]} tokens")
    return 1 + (logits > logits[..., target_id:target_id + 1]).sum(-1)


def _decode(tokenizer, ids: Sequence[int]) -> list[str]:
    return [tokenizer.decode([int(i)]) if tokenizer is not None else str(int(i)) for i in ids]


@torch.no_grad()
def head_importance(model: torch.nn.Module, family: ModelFamily, example: Example, tokenizer=None, *,
                    target_id: int | None = None, read: int | Sequence[tuple[int, int]] = 10,
                    read_positions: int = 5, top_tokens: int = 5, norm: str = "frozen",
                    chunk: int = 512) -> HeadImportance:
    """The paper's head importance of every (layer, head) at the example's first target position,
    and the reading of the heads in ``read`` (the ``read`` most important ones, or explicit
    (layer, head) pairs; 0 reads none). ``target_id``: the token explained (default: the example's
    answer token there, else the model's prediction). See the module docstring."""
    if norm not in NORMS:
        raise ValueError(f"norm={norm!r}; expected one of {NORMS}")
    if read_positions < 1:
        raise ValueError(f"read_positions={read_positions}; read at least 1 position per head")
    n_layers = len(family.decoder_layers(model))
    layers = list(range(n_layers))
    q = example.target_positions[0]
    seq_len = int(example.inputs["input_ids"].shape[-1])
    wanted = {f"blocks.{layer}.{kind}" for layer in layers for kind in ("attn", "v", "resid_pre", "head_out")}
    wanted.add(f"blocks.{n_layers - 1}.resid_post")
    output, cache = capture(model, family, example.inputs, query_positions=[q], values=True, resid_pre=True,
                            head_outputs=True, hidden_states=True, names_filter=wanted, logits_positions=[q])
    final = torch.log_softmax(output.logits[0, -1].float(), -1)
    predicted = int(final.argmax())
    target = int(target_id if target_id is not None else (example.target_ids[0] if example.target_ids else predicted))
    reference = cache["resid_post", n_layers - 1][0, q].float() if norm == "frozen" else None
    h = torch.stack([cache["resid_pre", layer][0, q] for layer in layers]).float()  # [L, D]
    o = head_outputs(model, family, cache, layers, q)  # [L, H, D]
    logp = target_logprobs(model, family, torch.cat([h, (h[:, None] + o).flatten(0, 1)]), target, reference, chunk)
    base = logp[:n_layers]
    scores = (logp[n_layers:].reshape(o.shape[:2]) - base[:, None]).double().cpu().numpy()
    result = HeadImportance(target, _decode(tokenizer, [target])[0], q, predicted, float(final[target]), layers,
                            list(cache.heads), scores, base.double().cpu().numpy(), norm)
    pairs = ([(a, b) for a, b, _ in result.top_heads(read)] if isinstance(read, int)
             else [(int(a) % n_layers, int(b)) for a, b in read])
    span = cache.image_span
    for layer in sorted({a for a, _ in pairs}):
        c = head_contributions(model, family, cache, layer, q, range(seq_len))  # [H, S, D]
        for head in [b for a, b in pairs if a == layer]:
            if head not in cache.heads:
                raise ValueError(f"head {head} out of range for {len(cache.heads)} heads")
            hi = cache.heads.index(head)
            inc = target_logprobs(model, family, h[layer] + c[hi], target, reference, chunk) - base[layer]
            top = torch.argsort(inc, descending=True, stable=True)[:read_positions]
            logits = family.lens_logits(model, torch.cat([c[hi][top], o[layer, hi][None]]), reference)
            ranks = answer_rank(logits, target)
            best = logits[:-1].topk(min(top_tokens, logits.shape[-1])).indices
            readings = [PositionReading(int(j), bool(span.start <= int(j) < span.end), float(inc[j]), int(r),
                                        _decode(tokenizer, ids.tolist()))
                        for j, r, ids in zip(top, ranks[:-1], best, strict=True)]
            result.readings.append(HeadReading(layer, head, float(scores[layer, hi]), readings, int(ranks[-1])))
    order = {pair: i for i, pair in enumerate(pairs)}
    result.readings.sort(key=lambda r: order[(r.layer, r.head)])
    return result
