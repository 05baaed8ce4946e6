"""Logit lens over the image tokens (nostalgebraist 2020, "interpreting GPT: the logit lens").

Each decoder layer's residual stream at each image position is read as if it were the last layer:
final norm → unembedding → softmax. For every (layer, patch) we keep the top-k tokens and their
probabilities, the layer where the patch's top-1 probability peaks ("best layer"), a per-layer table
of the tokens most often decoded at image positions, and a self-contained HTML page (inline CSS and
JS, no network; every text HTML-escaped, the data block JSON-escaped) where hovering a patch shows
its best layer and top-5 tokens.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medvlm.diagnostics.capture import Cache, Example, capture
from medvlm.diagnostics.methods.base import Context, Method, MethodResult, Shape, register, unembed_rows
from medvlm.models.base import ModelFamily
from medvlm.utils.io import atomic_write_text
from medvlm.utils.render import render_page

#: image positions unembedded at a time (chunk x vocab float32 logits: 66 MB at a 257k vocabulary)
LENS_CHUNK = 64


@dataclass
class LogitLens:
    """Top-k decoded tokens per (layer, image patch). Arrays are [layers, patches, k]."""

    layers: list[int]
    positions: list[int]
    grid: tuple[int, int]
    top_ids: np.ndarray
    top_probs: np.ndarray
    top_tokens: list[list[list[str]]]

    @property
    def best_layer_index(self) -> np.ndarray:
        """Per patch, the index into ``layers`` where the top-1 probability is highest: [patches]."""
        return self.top_probs[:, :, 0].argmax(0)

    @property
    def best_layer(self) -> np.ndarray:
        """Per patch, the decoder layer (its index in the model) of highest top-1 probability."""
        return np.asarray(self.layers)[self.best_layer_index]

    @property
    def best_prob(self) -> np.ndarray:
        return self.top_probs[:, :, 0].max(0)

    def confidence_map(self) -> np.ndarray:
        """The best-layer top-1 probability of each patch, as a (rows, cols) map."""
        return self.best_prob.reshape(self.grid)

    def best_layer_map(self) -> np.ndarray:
        return self.best_layer.reshape(self.grid)


@torch.no_grad()
def lens_from_cache(model: torch.nn.Module, family: ModelFamily, cache: Cache, tokenizer=None, *, k: int = 5,
                    target_id: int | None = None, chunk: int = LENS_CHUNK) -> tuple[LogitLens, np.ndarray | None]:
    """Logit lens at the image positions from a capture's ``resid_post`` (every captured layer),
    and with ``target_id`` the map of p(target token) per patch, maxed over layers (else None).

    At most ``chunk`` image positions are unembedded at a time, fewer on a large vocabulary
    (:func:`~medvlm.diagnostics.methods.base.unembed_rows`), to bound memory (chunk x vocab floats).
    Without a tokenizer the top tokens are given as their ids.
    """
    chunk = unembed_rows(model, family, chunk)
    span = cache.image_span
    used = cache.layers("resid_post")
    ids, probs, target = [], [], []
    for layer in used:
        h = cache["resid_post", layer][0, span.start:span.end]
        tops, hits = [], []
        for i in range(0, h.shape[0], chunk):
            p = torch.softmax(family.lens_logits(model, h[i:i + chunk]), -1)
            tops.append(p.topk(k, dim=-1))
            if target_id is not None:
                hits.append(p[:, target_id].clone())  # a view would keep the chunk's [chunk, vocab] alive
        ids.append(torch.cat([t.indices for t in tops]))
        probs.append(torch.cat([t.values for t in tops]))
        if target_id is not None:
            target.append(torch.cat(hits))
    top_ids = torch.stack(ids).cpu().numpy()
    decode = tokenizer.decode if tokenizer is not None else (lambda t: str(t[0]))
    tokens = [[[decode([int(t)]) for t in cell] for cell in layer] for layer in top_ids]
    lens = LogitLens(used, list(range(span.start, span.end)), span.grid, top_ids,
                     torch.stack(probs).double().cpu().numpy(), tokens)
    grid_map = None if target_id is None else torch.stack(target).amax(0).reshape(span.grid).double().cpu().numpy()
    return lens, grid_map


def logit_lens(model: torch.nn.Module, family: ModelFamily, example: Example, tokenizer, *, k: int = 5,
               layers: Sequence[int] | None = None, chunk: int = 64) -> LogitLens:
    """Logit lens at the image positions of ``example`` for ``layers`` (default all), from one pass."""
    _, cache = capture(model, family, example.inputs, layers=layers, attention=False, hidden_states=True,
                       logits_positions=[-1])  # the logits are not read
    return lens_from_cache(model, family, cache, tokenizer, k=k, chunk=chunk)[0]


def layer_table(lens: LogitLens, n: int = 5) -> list[dict]:
    """Per layer, the ``n`` top-1 tokens decoded most often at image positions.

    Rows: ``{"layer", "tokens": [{"token", "count", "share", "mean_prob"}]}`` (share of patches).
    """
    rows = []
    n_patches = len(lens.positions)
    for li, layer in enumerate(lens.layers):
        firsts = [cell[0] for cell in lens.top_tokens[li]]
        probs = lens.top_probs[li, :, 0]
        entries = []
        for token, count in Counter(firsts).most_common(n):
            mask = np.array([t == token for t in firsts])
            entries.append({"token": token, "count": count, "share": count / n_patches,
                            "mean_prob": float(probs[mask].mean())})
        rows.append({"layer": layer, "tokens": entries})
    return rows


# -- the interactive page ------------------------------------------------------------------------
def lens_html(lens: LogitLens, image: np.ndarray, question: str = "", title: str = "Logit lens") -> str:
    """A self-contained page (``medvlm/templates/html/logit_lens.html.j2``): the image with a
    hoverable patch grid, and the per-layer token table; all text escaped."""
    best = lens.best_layer_index
    cells = [{"layer": int(lens.layers[b]), "p": float(lens.top_probs[b, i, 0]),
              "top": [[lens.top_tokens[b][i][j], float(lens.top_probs[b, i, j])]
                      for j in range(min(5, lens.top_probs.shape[2]))]} for i, b in enumerate(best)]
    data = {"cols": lens.grid[1], "cells": cells, "pmax": max(float(lens.best_prob.max()), 1e-12)}
    return render_page("logit_lens.html.j2", title=title, question=question, image=image, data=data,
                       layers=layer_table(lens))


def write_lens_html(path: str | os.PathLike, lens: LogitLens, image: np.ndarray, question: str = "",
                    title: str = "Logit lens") -> Path:
    """Write :func:`lens_html` atomically to ``path``."""
    return atomic_write_text(path, lens_html(lens, image, question, title))


@register
class LogitLensMethod(Method):
    """p(explained token) per image patch, maxed over layers, from the shared pass's residual stream;
    the per-layer top tokens go to the explorer's page and the best-layer counts to the JSON."""

    name = "logit_lens"
    title = "Logit lens"
    order = 50
    shared = frozenset({"hidden_states"})

    def cost(self, shape: Shape) -> float:
        return shape.unembed_flops(shape.n_layers * shape.image_tokens)

    def memory(self, shape: Shape) -> float:
        """A chunk of image positions unembedded at a time: logits and probabilities (2 x chunk x
        vocab floats), and the top tokens and target probabilities it keeps per layer and patch."""
        return float(4 * (2 * LENS_CHUNK * shape.vocab + 3 * shape.n_layers * shape.image_tokens * 5))

    def run(self, ctx: Context) -> MethodResult:
        lens, grid = lens_from_cache(ctx.model, ctx.family, ctx.cache, ctx.tokenizer, target_id=ctx.target_id)
        best = Counter(int(b) for b in lens.best_layer)
        row = {"logit_lens": {"best_layer_counts": {str(k): v for k, v in sorted(best.items())},
                              "mean_best_layer": float(np.mean(lens.best_layer)), "layer_table": layer_table(lens, n=3)}}
        return MethodResult(grid, row, lens)
