"""One instrumented forward pass: hooks on the decoder keep only what a diagnostic asked for.

Every diagnostic in medvlm (raw attention, rollout, log-probability increase, logit lens) reads its
tensors from :func:`capture` instead of running ``output_attentions=True`` on all layers. Hooks are
registered on the modules the :class:`~medvlm.models.base.ModelFamily` seam names (decoder layers),
so nothing here branches on the family. The API follows TransformerLens' ``run_with_cache``:
``capture(...) -> (output, cache)``, hooks removed in a ``finally``, tensors detached, the cache
indexable by ``"blocks.{layer}.{kind}"`` or ``(kind, layer)`` with negative layers.

Kinds and shapes (``B`` batch, ``Hs`` selected heads, ``Q`` selected query positions, ``S``
sequence length, ``D`` model width, ``d`` head width)::

    attn        [B, Hs, Q, S]   attention rows (eager attention's weights, post-softmax)
    attn_mean   [B, Q, S]       the same rows averaged over *all* heads (cheap rollout input)
    resid_pre   [B, S, D]       residual stream entering the layer
    resid_post  [B, S, D]       residual stream after the layer (before the final norm)
    head_out    [B, Q, Hs, d]   per-head outputs: the input of ``o_proj`` split by head
    v           [B, S, Hs, d]   value vectors per query head (grouped-query heads repeated)

A tutorial on a tiny random PaliGemma (eager attention, 2 decoder layers)::

    >>> import numpy as np
    >>> from medvlm.models.base import TinySizes
    >>> from medvlm.models.tiny import build_tiny, tiny_tokenizer
    >>> from medvlm.models.registry import get_family
    >>> tok = tiny_tokenizer("paligemma", ["where is the lesion in the left lung"], 300)
    >>> model, processor = build_tiny("paligemma", TinySizes(vision_layers=1, text_layers=2, patch_size=8), tok)
    >>> model.set_attn_implementation("eager")
    >>> family = get_family("paligemma")
    >>> ex = prepare_example(model, processor, family, np.zeros((64, 64, 3), np.uint8), "where?")
    >>> out, cache = capture(model, family, ex.inputs, layers=[-1], query_positions="last",
    ...                      hidden_states=True)
    >>> cache.names
    ['blocks.1.attn', 'blocks.1.resid_post']
    >>> tuple(cache["attn", -1].shape)[:3], cache.grid
    ((1, 4, 1), (8, 8))
    >>> bool(cache["attn", -1].sum(-1).allclose(cache["attn", -1].new_ones(1)))
    True
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from medvlm.models.base import EAGER_FIX, IGNORE_INDEX, AttentionNotEagerError, ImageSpan, ModelFamily
from medvlm.utils.images import read_image

logger = logging.getLogger(__name__)

KINDS = ("attn", "attn_mean", "resid_pre", "resid_post", "head_out", "v")
Positions = int | str | Sequence[int] | None


# -- inputs --------------------------------------------------------------------------------------
@dataclass
class Example:
    """One question ready for diagnostics.

    ``inputs``: the processor's tensors (batch of 1, no ``labels``). ``target_positions``: the
    positions whose next-token prediction is an answer token (position p predicts token p+1), or
    the last position when no answer was given; ``target_ids``: those answer tokens (empty without
    an answer: methods then use the model's prediction). ``image``: uint8 HxWx3 at the model's input
    resolution, for overlays.
    """

    inputs: dict[str, torch.Tensor]
    target_positions: list[int]
    target_ids: list[int]
    image: np.ndarray
    question: str
    answer: str | None = None
    span: ImageSpan | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def prepare_example(model: torch.nn.Module, processor, family: ModelFamily, image: Any, question: str,
                    answer: str | None = None) -> Example:
    """Tokenise one (image, question[, answer]) with the family's own batch builders.

    With an answer the sequence is teacher-forced (the family's training batch) and the target
    positions are those predicting the answer tokens, the family's stop tokens (end of sequence, end of turn)
    excluded.
    """
    pil = read_image(image)
    if answer is None:
        batch = family.generation_batch(processor, [pil], [question])
    else:
        batch = family.train_batch(processor, [pil], [question], [answer])
    inputs = {k: v for k, v in family.model_inputs(batch).items() if k != "labels"}
    ids = inputs["input_ids"][0]
    stops = set(family.stop_token_ids(processor))
    if answer is None:
        positions, targets = [int(ids.shape[0]) - 1], []
    else:
        labels = batch["labels"][0]
        keep = [p for p in range(1, ids.shape[0]) if labels[p] != IGNORE_INDEX and int(ids[p]) not in stops]
        if not keep:
            raise ValueError(f"answer {answer!r} produced no answer tokens for question {question!r}")
        positions, targets = [p - 1 for p in keep], [int(ids[p]) for p in keep]
    check_length(model, family, int(ids.shape[0]))
    span = family.image_spans(model, inputs)[0]
    return Example(to_model(model, inputs), positions, targets, family.prepare_images(processor, [pil])[0],
                   question, answer, span)


def to_model(model: torch.nn.Module, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``inputs`` on the model's device, floating tensors (pixel values) in its dtype: a bfloat16
    checkpoint on a GPU takes the processor's float32 CPU tensors otherwise and fails."""
    device = getattr(model, "device", None) or next(model.parameters()).device
    dtype = getattr(model, "dtype", None)
    return {k: (v.to(device=device, dtype=dtype) if v.is_floating_point() and dtype is not None and dtype.is_floating_point
                else v.to(device)) for k, v in inputs.items()}


def check_length(model: torch.nn.Module, family: ModelFamily, seq_len: int) -> None:
    limit = family.max_length(model)
    if limit is not None and seq_len > limit:
        raise ValueError(f"the sequence has {seq_len} tokens but the language model's maximum length "
                         f"(max_position_embeddings) is {int(limit)}; shorten the question or answer")


# -- the cache -----------------------------------------------------------------------------------
@dataclass
class Cache:
    """Tensors of one capture pass, by name ``blocks.{layer}.{kind}`` (see the module docstring)."""

    tensors: dict[str, torch.Tensor]
    n_layers: int
    seq_len: int
    query_positions: list[int]
    heads: list[int]
    image_spans: list[ImageSpan]

    @property
    def names(self) -> list[str]:
        return list(self.tensors)

    @property
    def image_span(self) -> ImageSpan:
        return self.image_spans[0]

    @property
    def grid(self) -> tuple[int, int]:
        return self.image_span.grid

    def key(self, kind: str, layer: int) -> str:
        if kind not in KINDS:
            raise KeyError(f"unknown kind {kind!r}; expected one of {KINDS}")
        if not -self.n_layers <= layer < self.n_layers:
            raise KeyError(f"layer {layer} out of range for {self.n_layers} decoder layers")
        return f"blocks.{layer % self.n_layers}.{kind}"

    def __getitem__(self, key: str | tuple[str, int]) -> torch.Tensor:
        name = self.key(*key) if isinstance(key, tuple) else key
        if name not in self.tensors:
            raise KeyError(f"{name!r} was not captured; captured: {self.names}. Ask for it in capture(...)")
        return self.tensors[name]

    def __contains__(self, key: object) -> bool:
        try:
            self[key]  # type: ignore[index]
        except KeyError:
            return False
        return True

    def layers(self, kind: str) -> list[int]:
        """Layers (ascending) for which ``kind`` was captured."""
        return sorted(int(n.split(".")[1]) for n in self.tensors if n.endswith(f".{kind}"))

    def stack(self, kind: str) -> torch.Tensor:
        """``kind`` of every captured layer stacked on a new first axis (ascending layers)."""
        layers = self.layers(kind)
        if not layers:
            raise KeyError(f"no {kind!r} captured; captured: {self.names}")
        return torch.stack([self.tensors[f"blocks.{layer}.{kind}"] for layer in layers])

    def query_index(self, position: int) -> int:
        """Row of the captured attention / head outputs that holds sequence position ``position``."""
        pos = position % self.seq_len
        if pos not in self.query_positions:
            raise KeyError(f"position {position} was not captured; captured {self.query_positions}")
        return self.query_positions.index(pos)


# -- the pass ------------------------------------------------------------------------------------
def resolve_positions(positions: Positions, seq_len: int, span: ImageSpan | None = None) -> list[int]:
    """Positions as sorted unique non-negative ints: None = all, "last", "image", ints (negative ok)."""
    if positions is None:
        return list(range(seq_len))
    if isinstance(positions, str):
        if positions == "last":
            return [seq_len - 1]
        if positions == "image" and span is not None:
            return list(range(span.start, span.end))
        raise ValueError(f"query_positions={positions!r}; expected None, 'last', 'image' or integers")
    items = [positions] if isinstance(positions, int) else list(positions)
    bad = [p for p in items if not -seq_len <= int(p) < seq_len]
    if bad:
        raise ValueError(f"query positions {bad} outside a sequence of {seq_len} tokens")
    return sorted({int(p) % seq_len for p in items})


def _resolve_layers(layers: int | Iterable[int] | None, n: int) -> list[int]:
    if layers is None:
        return list(range(n))
    items = [layers] if isinstance(layers, int) else list(layers)
    bad = [x for x in items if not -n <= x < n]
    if bad:
        raise ValueError(f"layers {bad} out of range for {n} decoder layers")
    return sorted({x % n for x in items})


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def capture(
    model: torch.nn.Module,
    family: ModelFamily,
    inputs: Mapping[str, torch.Tensor],
    *,
    layers: int | Iterable[int] | None = None,
    heads: Iterable[int] | None = None,
    query_positions: Positions = None,
    attention: bool = True,
    attention_mean: bool = False,
    hidden_states: bool = False,
    resid_pre: bool = False,
    head_outputs: bool = False,
    values: bool = False,
    names_filter: Callable[[str], bool] | Iterable[str] | None = None,
    grad: bool = False,
    logits_positions: Sequence[int] | None = None,
) -> tuple[Any, Cache]:
    """Run ``model(**inputs)`` once and keep only the requested tensors (see the module docstring).

    ``layers`` / ``heads``: indices (negative layers allowed; None = all). ``query_positions``: rows
    of attention and head outputs to keep (None = all, "last", "image", or ints). ``names_filter``
    further restricts by full name (a predicate or a collection of names). Tensors are detached
    (``grad=False`` also runs without autograd). The model runs in eval mode; its mode is restored.
    ``logits_positions``: compute the output logits only at these positions (the unembedding of
    every position is the costliest matmul of a large-vocabulary model); ``output.logits[:, i]``
    then holds the i-th of these positions, sorted. Default: every position, as a plain forward.
    """
    if attention or attention_mean:
        family.check_eager(model)
    if "input_ids" not in inputs:
        raise KeyError(f"inputs need 'input_ids'; found {sorted(inputs)}")
    input_ids = inputs["input_ids"]
    seq_len = int(input_ids.shape[-1])
    check_length(model, family, seq_len)
    family.check_pixels(model, inputs)
    spans = family.image_spans(model, inputs)
    blocks = family.decoder_layers(model)
    n_heads, n_kv, head_dim = family.head_layout(model)
    chosen = _resolve_layers(layers, len(blocks))
    head_idx = list(range(n_heads)) if heads is None else sorted({int(h) for h in heads})
    if any(not 0 <= h < n_heads for h in head_idx):
        raise ValueError(f"heads {head_idx} out of range for {n_heads} heads")
    rows = resolve_positions(query_positions, seq_len, spans[0])
    kinds = [k for k, on in zip(KINDS, (attention, attention_mean, resid_pre, hidden_states, head_outputs,
                                         values), strict=True) if on]
    keep = names_filter if callable(names_filter) or names_filter is None else set(names_filter).__contains__
    wanted = {layer: [k for k in kinds if keep is None or keep(f"blocks.{layer}.{k}")] for layer in chosen}
    store: dict[str, torch.Tensor] = {}
    rows_t, heads_t = torch.tensor(rows), torch.tensor(head_idx)
    all_rows = rows == list(range(seq_len))  # every query row: read the weights without a copy of them

    def put(layer: int, kind: str, tensor: torch.Tensor) -> None:
        store[f"blocks.{layer}.{kind}"] = tensor.detach()

    def on_attn(layer: int):
        def hook(module, args, output):
            weights = output[1] if isinstance(output, (tuple, list)) and len(output) > 1 else None
            if weights is None:
                raise AttentionNotEagerError(f"decoder layer {layer} returned no attention weights; {EAGER_FIX}")
            picked = weights if all_rows else weights.index_select(2, rows_t.to(weights.device))  # [B, H, Q, S]
            if "attn" in wanted[layer]:
                put(layer, "attn", picked.index_select(1, heads_t.to(weights.device)))
            if "attn_mean" in wanted[layer]:
                put(layer, "attn_mean", picked.mean(1))
        return hook

    def on_o_proj(layer: int):
        def hook(module, args):
            x = args[0].index_select(1, rows_t.to(args[0].device))  # [B, Q, H*d]
            put(layer, "head_out", x.unflatten(-1, (n_heads, head_dim))[:, :, heads_t])
        return hook

    def on_v_proj(layer: int):
        def hook(module, args, output):
            v = output.unflatten(-1, (n_kv, head_dim)).repeat_interleave(n_heads // n_kv, dim=2)
            put(layer, "v", v[:, :, heads_t])  # [B, S, Hs, d]
        return hook

    handles = []
    was_training = model.training
    try:
        for layer, ks in wanted.items():
            block = blocks[layer]
            attn = family.attention_module(block)
            if "attn" in ks or "attn_mean" in ks:
                handles.append(attn.register_forward_hook(on_attn(layer)))
            if "head_out" in ks:
                handles.append(attn.o_proj.register_forward_pre_hook(on_o_proj(layer)))
            if "v" in ks:
                handles.append(attn.v_proj.register_forward_hook(on_v_proj(layer)))
            if "resid_post" in ks:
                handles.append(block.register_forward_hook(
                    lambda m, a, o, layer=layer: put(layer, "resid_post", _first(o))))
            if "resid_pre" in ks:
                handles.append(block.register_forward_pre_hook(
                    lambda m, a, kw, layer=layer: put(layer, "resid_pre", a[0] if a else kw["hidden_states"]),
                    with_kwargs=True))
        if was_training:  # Module.train() walks every submodule: only switch when needed
            model.eval()
        extra = {}
        if logits_positions is not None:
            keep_rows = resolve_positions(list(logits_positions), seq_len)
            extra["logits_to_keep"] = torch.tensor(keep_rows, dtype=torch.long)
        with torch.set_grad_enabled(grad):
            output = model(**inputs, use_cache=False, **extra)
    finally:
        for handle in handles:
            handle.remove()
        if was_training:
            model.train()
    order = {f"blocks.{layer}.{k}": (layer, KINDS.index(k)) for layer in chosen for k in KINDS}
    tensors = dict(sorted(store.items(), key=lambda kv: order[kv[0]]))
    return output, Cache(tensors, len(blocks), seq_len, rows, head_idx, spans)
