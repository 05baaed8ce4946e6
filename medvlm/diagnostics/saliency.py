"""Attention saliency over the image grid: raw attention (one head or fused), the reverse reading
(an image patch → response tokens) and attention rollout, all read from one :func:`capture` pass.

Maps are numpy arrays of shape ``cache.grid`` (rows, cols of the image tokens in the actual
sequence, row-major as the vision tower emits patches), non-negative, on the raw attention scale
(not renormalised), so :mod:`medvlm.diagnostics.attention_quality` can score them directly.

*Response positions* are the query positions whose next-token prediction is an answer token
(``Example.target_positions``): position p's row is where the model looks when it writes token
p+1. Without an answer it is the last prompt position.

Head fusion (``fusion=``), over the chosen layers (default: the last quarter of the decoder, at
least one layer, where attention to the image is most answer-specific in LLaVA-style models):

- ``"mean"``: mean over layers, heads and response positions.
- ``"max"``: max over heads, then mean over layers and positions.
- ``"entropy"``: a weighted mean where each (layer, head, position) row weighs
  ``w = 1 - H(p) / log N``, with p its attention over the N image tokens renormalised to sum 1 and
  H the natural-log entropy: a head spreading its image attention uniformly gets weight 0, a head
  focused on one patch weight 1. If every row is uniform (all weights 0) it falls back to the mean.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from medvlm.diagnostics.capture import Cache, Example, capture
from medvlm.models.base import ModelFamily

FUSIONS = ("mean", "max", "entropy")


def last_quarter(n_layers: int) -> list[int]:
    """The last quarter of ``n_layers`` decoder layers (at least one)."""
    return list(range(n_layers - max(1, n_layers // 4), n_layers))


def _image_rows(cache: Cache, positions: Sequence[int], layers: Sequence[int], kind: str = "attn") -> torch.Tensor:
    """Attention rows to the image columns: [L, H, Q, N_img] (batch item 0)."""
    span = cache.image_span
    idx = [cache.query_index(p) for p in positions]
    rows = [cache[kind, layer][0][:, idx, span.start:span.end] for layer in layers]
    return torch.stack(rows).float()


def fuse(rows: torch.Tensor, fusion: str = "mean") -> torch.Tensor:
    """Fuse attention rows [L, H, Q, N] over layers, heads and positions into a vector [N]."""
    if fusion not in FUSIONS:
        raise ValueError(f"fusion={fusion!r}; expected one of {FUSIONS}")
    if fusion == "mean":
        return rows.mean(dim=(0, 1, 2))
    if fusion == "max":
        return rows.amax(dim=1).mean(dim=(0, 1))
    n = rows.shape[-1]
    p = rows / rows.sum(-1, keepdim=True).clamp_min(1e-12)
    entropy = -(p * p.clamp_min(1e-12).log()).sum(-1)  # [L, H, Q]
    weights = (1.0 - entropy / np.log(n)).clamp_min(0.0) if n > 1 else torch.ones_like(entropy)
    if float(weights.sum()) <= 0:
        return rows.mean(dim=(0, 1, 2))
    return (weights[..., None] * rows).sum(dim=(0, 1, 2)) / weights.sum()


def _to_grid(vector: torch.Tensor, grid: tuple[int, int]) -> np.ndarray:
    return vector.reshape(grid).double().cpu().numpy()


def attention_map(cache: Cache, positions: Sequence[int], *, layer: int | None = None, head: int | None = None,
                  layers: Sequence[int] | None = None, fusion: str = "mean") -> np.ndarray:
    """Response positions → image patches, as a (rows, cols) map.

    ``layer`` and ``head`` pick one head (its attention averaged over ``positions``); otherwise the
    heads captured in ``layers`` (default: the last quarter) are fused by ``fusion``.
    """
    if layer is not None and head is not None:
        rows = _image_rows(cache, positions, [layer])[:, [cache.heads.index(head)]]
        return _to_grid(rows.mean(dim=(0, 1, 2)), cache.grid)
    chosen = [layer] if layer is not None else list(layers or last_quarter(cache.n_layers))
    rows = _image_rows(cache, positions, chosen)
    if head is not None:
        rows = rows[:, [cache.heads.index(head)]]
    return _to_grid(fuse(rows, fusion), cache.grid)


def image_to_response(cache: Cache, patch: int | tuple[int, int], positions: Sequence[int], *,
                      layer: int | None = None, head: int | None = None,
                      layers: Sequence[int] | None = None, fusion: str = "mean") -> np.ndarray:
    """The reverse reading: one image patch → the response positions that attend to it.

    ``patch`` is a flat index into the grid or ``(row, col)``. Returns a vector over ``positions``:
    the attention weight each response position gives to that patch (raw weights, fused over heads
    and layers like :func:`attention_map`; ``"entropy"`` weights come from each row's whole image
    distribution). Divide by the sum for a distribution over response tokens.
    """
    rows_n, cols_n = cache.grid
    flat = patch[0] * cols_n + patch[1] if isinstance(patch, tuple) else int(patch)
    if not 0 <= flat < rows_n * cols_n:
        raise ValueError(f"patch {patch} outside the {rows_n}x{cols_n} image grid")
    chosen = [layer] if layer is not None else list(layers or last_quarter(cache.n_layers))
    rows = _image_rows(cache, positions, chosen)
    if head is not None:
        rows = rows[:, [cache.heads.index(head)]]
    if fusion not in FUSIONS:
        raise ValueError(f"fusion={fusion!r}; expected one of {FUSIONS}")
    per_position = torch.stack([fuse(rows[:, :, [q]], fusion)[flat] for q in range(rows.shape[2])])
    return per_position.double().cpu().numpy()


def rollout(cache: Cache, positions: Sequence[int]) -> np.ndarray:
    """Attention rollout (Abnar & Zuidema 2020, "Quantifying attention flow in transformers").

    Per layer the head-mean attention A (``attn_mean`` over all positions, or ``attn`` averaged)
    is mixed with the residual path, Â = 0.5·A + 0.5·I, rows renormalised; the rollout is the
    product Â_L ··· Â_1 over all captured layers. Read at ``positions`` over the image columns and
    averaged over positions.
    """
    kind = "attn_mean" if cache.layers("attn_mean") else "attn"
    layers = cache.layers(kind)
    if layers != list(range(cache.n_layers)) or cache.query_positions != list(range(cache.seq_len)):
        raise ValueError("rollout needs full attention matrices of every layer; capture with layers=None and "
                         "query_positions=None (attention_mean=True is the cheapest)")
    joint = None
    for layer in layers:
        a = cache[kind, layer][0].float()
        a = a if kind == "attn_mean" else a.mean(0)
        a_hat = 0.5 * a + 0.5 * torch.eye(a.shape[-1], device=a.device)
        a_hat = a_hat / a_hat.sum(-1, keepdim=True)
        joint = a_hat if joint is None else a_hat @ joint
    span = cache.image_span
    return _to_grid(joint[list(positions), span.start:span.end].mean(0), cache.grid)


# -- one call from an example ---------------------------------------------------------------------
def raw_attention(model: torch.nn.Module, family: ModelFamily, example: Example, *, layer: int | None = None,
                  head: int | None = None, layers: Sequence[int] | None = None,
                  fusion: str = "mean") -> np.ndarray:
    """:func:`attention_map` of ``example``'s response positions, capturing only what it reads."""
    n = len(family.decoder_layers(model))
    chosen = [layer] if layer is not None else list(layers or last_quarter(n))
    _, cache = capture(model, family, example.inputs, layers=chosen, query_positions=example.target_positions,
                       logits_positions=[-1])  # the logits are not read
    return attention_map(cache, example.target_positions, layer=layer, head=head, layers=chosen, fusion=fusion)


def attention_rollout(model: torch.nn.Module, family: ModelFamily, example: Example) -> np.ndarray:
    """:func:`rollout` of ``example``'s response positions from one head-mean capture pass."""
    _, cache = capture(model, family, example.inputs, attention=False, attention_mean=True, logits_positions=[-1])
    return rollout(cache, example.target_positions)
