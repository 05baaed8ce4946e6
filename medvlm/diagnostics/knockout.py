"""Attention knockout: block attention edges and measure how much the answer's probability moves.

Geva et al. 2023 ("Dissecting recall of factual associations in auto-regressive language
models", arXiv 2304.14767, section 4) find where information flows into the last position by
blocking attention edges: for an edge set E of (target, source) position pairs and a window of k
consecutive layers, the attention score of every pair in E is set to the dtype's minimum before
the softmax, in every head of those layers, and the relative change of the prediction's
probability is reported::

    delta% = (p_knocked - p) / p * 100

The rule as their code applies it (google-research/google-research, commit 9e38b0b,
``dissecting_factual_predictions/factual_associations_dissection.ipynb``): ``set_block_attn_hooks``
sets the mask to ``torch.finfo(dtype).min`` at ``[target, source]`` for every head; the
information-flow cell centres a window on each layer l and clips it at the model's ends,
``range(max(0, l - k // 2), min(n_layers, l - (-k // 2)))`` (k = 9 there), and records
``(new_score - base_score) * 100 / base_score``. Their names are the other way round (their
"source" is the query row); here a *source* is the position information would flow **from** (the
key) and a *target* the position it would flow **to** (the query), so "image -> last" blocks the
last position from reading the image tokens.

How the edges are blocked. Every decoder layer's attention module (``family.attention_module``)
receives the model's own 4-D mask as its ``attention_mask`` argument (transformers 5:
``masking_utils.create_causal_mask`` builds it once per forward, with the family's own rules:
causal for LLaVA, a bidirectional image+prompt prefix for PaliGemma from ``token_type_ids``,
bidirectional image blocks for Gemma 3). A forward pre-hook on each chosen layer's attention
module replaces that argument by a copy with the blocked edges masked, so the family's mask is
kept and only the blocked edges change, under eager and sdpa alike:

- eager gets an additive float mask ``[B, 1, Q, K]`` (0 = attend, the dtype's minimum = not): the
  blocked entries are set to the minimum;
- sdpa gets a boolean mask (True = attend): the blocked entries are set to False; or ``None`` when
  the sequence is plainly causal (sdpa then passes ``is_causal``): the hook builds the causal mask
  the kernel would have used (from the module's ``is_causal``, as ``sdpa_attention_forward``
  reads it) and blocks the edges in it.

A layer where no edge is blocked is left untouched (the hook returns nothing), so an empty edge
set changes nothing at all. A batch of B rows may block a different edge set in each row (one
forward for many knockouts). Flash and flex attention receive no dense mask: they are refused.

What is computed from it: :func:`layer_sweep` (delta% per centred window for the named edge sets:
image -> last, image -> question, question -> last, see :func:`named_edge_sets`) and
:func:`knockout_map` (image cells, one at a time or in blocks as occlusion does, -> last: a causal
map at the attention level). :mod:`medvlm.diagnostics.knockout_validation` runs them over the
probe examples and tests the lesion against its mirror image.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from medvlm.diagnostics.capture import Example, check_length
from medvlm.eval.batching import BatchRecord, run_batches
from medvlm.models.base import ModelFamily, text_config

#: The paper's window (Geva et al. 2023, section 4: k = 9 layers).
DEFAULT_WINDOW = 9
#: The named edge sets of :func:`named_edge_sets`, in display order, with their titles.
EDGE_SETS = {"image_to_last": "image → last", "image_to_question": "image → question",
             "question_to_last": "question → last"}


@dataclass(frozen=True)
class EdgeSet:
    """Every edge from each of ``sources`` (key positions) to each of ``targets`` (query positions)."""

    name: str
    sources: tuple[int, ...]
    targets: tuple[int, ...]

    def check(self, seq_len: int) -> EdgeSet:
        """This set, refused when a side is empty or a position lies outside ``seq_len`` tokens."""
        for side, positions in (("sources", self.sources), ("targets", self.targets)):
            if not positions:
                raise ValueError(f"edge set {self.name!r} has no {side}: there is no edge to block; give at "
                                 f"least one position in 0..{seq_len - 1}")
            bad = [p for p in positions if not 0 <= p < seq_len]
            if bad:
                raise ValueError(f"edge set {self.name!r}: {side} {bad[:5]} outside the sequence of {seq_len} "
                                 f"tokens; positions must lie in 0..{seq_len - 1}")
        return self


@dataclass(frozen=True)
class Knockout:
    """What one batch row blocks: ``edges`` in ``layers`` (None or no layers: nothing)."""

    edges: EdgeSet | None
    layers: frozenset[int]


# -- windows -------------------------------------------------------------------------------------
def check_window(window: int, n_layers: int) -> int:
    """``window`` if it fits a model of ``n_layers`` decoder layers, else a ValueError with the limit."""
    if not isinstance(window, (int, np.integer)) or window < 1:
        raise ValueError(f"knockout window={window!r}; expected a whole number of layers from 1 to {n_layers}")
    if window > n_layers:
        raise ValueError(f"knockout window={window} is wider than the model's {n_layers} decoder layers; "
                         f"use a window of at most {n_layers}")
    return int(window)


def window_layers(centre: int, window: int, n_layers: int) -> list[int]:
    """The layers of the window centred on ``centre``, clipped at the model's ends (Geva et al.'s
    ``range(max(0, l - k // 2), min(n_layers, l - (-k // 2)))``: k // 2 layers below the centre,
    the rest of the window above it, fewer near the first and last layers)."""
    check_window(window, n_layers)
    if not 0 <= centre < n_layers:
        raise ValueError(f"window centre {centre} outside the model's {n_layers} decoder layers (0..{n_layers - 1})")
    return list(range(max(0, centre - window // 2), min(n_layers, centre + -(-window // 2))))


def sweep_window(n_layers: int) -> int:
    """The window the report uses: the paper's 9 layers, or half the depth on models with fewer than
    18 layers (at least 1), so that the windows differ and the curve shows where along the depth the
    edges matter (the demo's 3-layer model gets windows of 1 layer)."""
    return min(DEFAULT_WINDOW, max(1, n_layers // 2))


def _check_layers(layers: Sequence[int] | None, n_layers: int) -> list[int]:
    if layers is None:
        return list(range(n_layers))
    chosen = sorted({int(x) for x in layers})
    bad = [x for x in chosen if not 0 <= x < n_layers]
    if bad or not chosen:
        raise ValueError(f"knockout layers {list(layers)}: expected one or more of 0..{n_layers - 1} "
                         f"(the model has {n_layers} decoder layers)")
    return chosen


# -- the mask ------------------------------------------------------------------------------------
def knocked_mask(mask: torch.Tensor | None, blocks: Sequence[tuple[int, EdgeSet]], batch: int, seq_len: int, *,
                 causal: bool = True, layer: int | None = None) -> torch.Tensor:
    """A copy of a decoder layer's 4-D attention mask with ``blocks`` (batch row, edge set) masked.

    ``mask``: the additive float mask of eager attention, the boolean mask of sdpa, or None (sdpa's
    plain causal case, rebuilt here as the boolean mask it stands for, causal when ``causal``).
    The result has ``batch`` rows; every head is blocked (a mask with one head row broadcasts).
    Raises when a target would be left with no position to attend to (the softmax is undefined).
    """
    if mask is None:
        full = torch.ones(seq_len, seq_len, dtype=torch.bool)
        mask = (full.tril() if causal else full)[None, None]
    if not isinstance(mask, torch.Tensor) or mask.ndim != 4 or tuple(mask.shape[-2:]) != (seq_len, seq_len):
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"attention knockout needs a dense 4-D mask [batch, heads, {seq_len}, {seq_len}] in the "
                         f"attention module; it received {shape}. Use attn_implementation='eager' or 'sdpa' "
                         "(flash and flex attention take no dense mask)")
    if mask.shape[0] not in (1, batch):
        raise ValueError(f"the attention mask has {mask.shape[0]} batch rows for a batch of {batch}")
    out = mask.expand(batch, *mask.shape[1:]).clone()
    blocked = False if out.dtype == torch.bool else torch.finfo(out.dtype).min
    for row, edges in blocks:
        tgt = torch.tensor(edges.targets, device=out.device)
        src = torch.tensor(edges.sources, device=out.device)
        out[row, :, tgt[:, None], src[None, :]] = blocked
        rows = out[row, :, tgt]  # [heads, targets, K]
        open_ = rows if out.dtype == torch.bool else rows > torch.finfo(out.dtype).min / 2
        starved = (~open_.any(-1)).any(0)
        if starved.any():
            where = f" in layer {layer}" if layer is not None else ""
            raise ValueError(f"edge set {edges.name!r} leaves target position(s) "
                             f"{tgt[starved].tolist()[:5]} with nothing to attend to{where} (every key it may "
                             "read is blocked); keep at least one source open for each target")
    return out


def _mask_argument(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[str | int, torch.Tensor | None]:
    """Where the attention module's call holds its mask: a keyword, or a positional index."""
    if "attention_mask" in kwargs:
        return "attention_mask", kwargs["attention_mask"]
    names = [n for n in inspect.signature(module.forward).parameters if n != "self"]
    if "attention_mask" in names and names.index("attention_mask") < len(args):
        index = names.index("attention_mask")
        return index, args[index]
    raise ValueError(f"{type(module).__name__} was called without an attention_mask argument; attention knockout "
                     "edits that argument, so the family's attention_module must name the module that takes it "
                     "(medvlm/models/base.py, ModelFamily.attention_module)")


@contextlib.contextmanager
def blocked_attention(model: torch.nn.Module, family: ModelFamily, rows: Sequence[Knockout],
                      seq_len: int) -> Iterator[None]:
    """While inside, batch row i of a forward pass over ``seq_len`` tokens blocks ``rows[i].edges``
    in ``rows[i].layers`` (see the module docstring). A row that blocks nothing (no edge set, an
    empty one, or no layers: a batch's reference row) leaves its mask as the model made it; a layer
    where no row blocks anything gets no hook. Hooks are removed on exit, also on error."""
    blocks = family.decoder_layers(model)
    per_layer: dict[int, list[tuple[int, EdgeSet]]] = {}
    for i, ko in enumerate(rows):
        if ko.edges is None or not ko.edges.sources or not ko.edges.targets:
            continue
        ko.edges.check(seq_len)
        for layer in _check_layers(sorted(ko.layers), len(blocks)) if ko.layers else []:
            per_layer.setdefault(layer, []).append((i, ko.edges))

    def hook_for(layer: int):
        def hook(module, args, kwargs):
            where, mask = _mask_argument(module, args, kwargs)
            causal = bool(kwargs.get("is_causal", getattr(module, "is_causal", True)))
            new = knocked_mask(mask, per_layer[layer], len(rows), seq_len, causal=causal, layer=layer)
            if mask is not None:
                new = new.to(mask.device)
            if isinstance(where, str):
                return args, {**kwargs, where: new}
            return (*args[:where], new, *args[where + 1:]), kwargs
        return hook

    handles = []
    try:
        for layer in per_layer:
            attn = family.attention_module(blocks[layer])
            handles.append(attn.register_forward_pre_hook(hook_for(layer), with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


# -- positions -----------------------------------------------------------------------------------
def last_position(example: Example) -> int:
    """The position whose next-token prediction is the (first) answer token: the prompt's last token."""
    return int(example.target_positions[0])


def question_positions(model: torch.nn.Module, family: ModelFamily, example: Example) -> list[int]:
    """The prompt's text positions before the last one, without image tokens and without the
    beginning-of-sequence and padding tokens (read from the language model's config): the question and
    the template's words. BOS is left out because it is the attention sink of most decoders; blocking
    it moves attention mass everywhere, and Geva et al.'s GPT-2 prompts hold no BOS."""
    span = example.span or family.image_spans(model, example.inputs)[0]
    ids = example.inputs["input_ids"][0].tolist()
    tc = text_config(model)
    special = {getattr(tc, "bos_token_id", None), getattr(tc, "pad_token_id", None)} - {None}
    mask = example.inputs.get("attention_mask")
    padded = set() if mask is None else {i for i, m in enumerate(mask[0].tolist()) if not m}
    return [p for p in range(last_position(example)) if not span.start <= p < span.end
            and ids[p] not in special and p not in padded]


def named_edge_sets(model: torch.nn.Module, family: ModelFamily, example: Example) -> dict[str, EdgeSet]:
    """The three edge sets of the report (:data:`EDGE_SETS`), for ``example``'s positions."""
    span = example.span or family.image_spans(model, example.inputs)[0]
    image = tuple(range(span.start, span.end))
    last = (last_position(example),)
    question = tuple(question_positions(model, family, example))
    return {"image_to_last": EdgeSet("image_to_last", image, last),
            "image_to_question": EdgeSet("image_to_question", image, question),
            "question_to_last": EdgeSet("question_to_last", question, last)}


def cell_positions(span_start: int, grid: tuple[int, int], cells: Sequence[tuple[int, int]]) -> tuple[int, ...]:
    """Sequence positions of image-grid ``cells`` (row, col), the grid's tokens in row-major order."""
    rows, cols = grid
    bad = [c for c in cells if not (0 <= c[0] < rows and 0 <= c[1] < cols)]
    if bad:
        raise ValueError(f"cells {bad[:5]} outside the {rows}x{cols} image grid")
    return tuple(sorted(span_start + r * cols + c for r, c in cells))


# -- probabilities -------------------------------------------------------------------------------
@torch.no_grad()
def answer_probs(model: torch.nn.Module, family: ModelFamily, inputs: Mapping[str, torch.Tensor], position: int,
                 token: int, rows: Sequence[Knockout]) -> np.ndarray:
    """p(token) at ``position`` for each knockout of ``rows`` (one batched forward, float64 array)."""
    seq_len = int(inputs["input_ids"].shape[-1])
    batch = family.repeat_inputs(inputs, len(rows))
    keep = torch.tensor([position % seq_len], dtype=torch.long)
    with blocked_attention(model, family, rows, seq_len):
        logits = model(**batch, use_cache=False, logits_to_keep=keep).logits[:, 0]
    return torch.softmax(logits.float(), -1)[:, token].double().cpu().numpy()


def relative_change(p_knocked: np.ndarray | float, p: float) -> np.ndarray:
    """(p_knocked - p) / p * 100, NaN where p is 0 (the change is undefined)."""
    p_knocked = np.asarray(p_knocked, dtype=float)
    return (p_knocked - p) / p * 100.0 if p > 0 else np.full_like(p_knocked, np.nan)


@dataclass
class Base:
    """The unblocked prediction knockouts are measured against."""

    position: int
    token: int
    p: float


@torch.no_grad()
def base_prediction(model: torch.nn.Module, family: ModelFamily, example: Example) -> Base:
    """p of the explained token at the last prompt position: the example's first answer token, or the
    model's prediction there when the example holds no answer (Geva et al. explain the prediction)."""
    position = last_position(example)
    check_length(model, family, int(example.inputs["input_ids"].shape[-1]))
    family.check_pixels(model, example.inputs)
    logits = model(**example.inputs, use_cache=False,
                   logits_to_keep=torch.tensor([position], dtype=torch.long)).logits[0, 0].float()
    token = example.target_ids[0] if example.target_ids else int(logits.argmax())
    return Base(position, int(token), float(torch.softmax(logits, -1)[token]))


def _batched(model, family, example: Example, base: Base, rows: Sequence[Knockout], batch_size: int,
             record: BatchRecord | None = None) -> np.ndarray:
    """p of the explained token under each knockout of ``rows``, ``batch_size`` copies of the example
    per forward pass; an out-of-memory error the allocator raises halves the batch and redoes the
    failed chunk (:func:`medvlm.eval.batching.run_batches`, which ``record`` tells of)."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}; expected at least 1")
    out = np.zeros(len(rows))

    def run_chunk(lo: int, hi: int) -> int:
        out[lo:hi] = answer_probs(model, family, example.inputs, base.position, base.token, rows[lo:hi])
        return hi - lo

    if rows:
        run_batches(len(rows), min(batch_size, len(rows)), run_chunk,
                    record if record is not None else BatchRecord(requested=batch_size),
                    what="attention knockout", unit="knocked-out copies")
    return out


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """The model in eval mode while inside (no dropout), its mode restored on exit."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def knockout_delta(model: torch.nn.Module, family: ModelFamily, example: Example, edges: EdgeSet,
                   layers: Sequence[int] | None = None, base: Base | None = None) -> float:
    """delta% of p(answer) when ``edges`` are blocked in ``layers`` (default every decoder layer)."""
    n_layers = len(family.decoder_layers(model))
    chosen = frozenset(_check_layers(layers, n_layers))
    edges.check(int(example.inputs["input_ids"].shape[-1]))
    with eval_mode(model):
        base = base or base_prediction(model, family, example)
        p = answer_probs(model, family, example.inputs, base.position, base.token, [Knockout(edges, chosen)])
    return float(relative_change(p, base.p)[0])


def layer_sweep(model: torch.nn.Module, family: ModelFamily, example: Example, *, window: int = DEFAULT_WINDOW,
                edge_sets: Mapping[str, EdgeSet] | None = None, batch_size: int = 8) -> dict:
    """delta% per window centred on each layer (Geva et al.'s rule, :func:`window_layers`) for each
    edge set (default :func:`named_edge_sets`): ``{"window", "layers": [[blocked layers] per
    centre], "p", "token", "delta": {name: [delta% per centre]}}``. An edge set that is empty for this
    example (a prompt with no question text) is refused with its name."""
    n_layers = len(family.decoder_layers(model))
    check_window(window, n_layers)
    sets = dict(edge_sets) if edge_sets is not None else named_edge_sets(model, family, example)
    seq_len = int(example.inputs["input_ids"].shape[-1])
    for edges in sets.values():
        edges.check(seq_len)
    windows = [window_layers(c, window, n_layers) for c in range(n_layers)]
    rows = [Knockout(edges, frozenset(w)) for edges in sets.values() for w in windows]
    with eval_mode(model):
        base = base_prediction(model, family, example)
        delta = relative_change(_batched(model, family, example, base, rows, batch_size), base.p)
    return {"window": int(window), "layers": windows, "p": base.p, "token": base.token,
            "delta": {name: delta[i * n_layers:(i + 1) * n_layers].tolist() for i, name in enumerate(sets)}}


def map_blocks(grid: tuple[int, int], max_side: int | None) -> tuple[int, list[tuple[int, int]]]:
    """(block side, top-left cells): one cell at a time, or blocks of ``ceil(side / max_side)`` cells
    on grids wider than ``max_side`` (occlusion's blocks too)."""
    if max_side is not None and max_side < 1:
        raise ValueError(f"max_side={max_side}; expected at least 1 (or None: one cell at a time)")
    rows, cols = grid
    block = 1 if max_side is None else max(1, -(-max(rows, cols) // max_side))
    return block, [(r, c) for r in range(0, rows, block) for c in range(0, cols, block)]


def knockout_map(model: torch.nn.Module, family: ModelFamily, example: Example, *, layers: Sequence[int] | None = None,
                 max_side: int | None = 8, batch_size: int = 16, record: BatchRecord | None = None) -> np.ndarray:
    """The relative drop of p(answer), in percent, when the last position may not read one image
    cell (or one block of cells) in ``layers`` (default every decoder layer): a map (rows, cols)
    whose cell (r, c) is -delta% of the knockout of that cell's tokens -> last position. Positive
    cells are read by the last position and support the answer; every cell of a block gets the
    block's value. ``batch_size`` copies of the example go through one forward pass (each runs the
    vision tower again: the registered method sizes it to memory); ``record`` tells of any halving."""
    span = example.span or family.image_spans(model, example.inputs)[0]
    chosen = frozenset(_check_layers(layers, len(family.decoder_layers(model))))
    block, tops = map_blocks(span.grid, max_side)
    rows_, cols_ = span.grid
    last = (last_position(example),)
    knockouts = []
    for r, c in tops:
        cells = [(i, j) for i in range(r, min(r + block, rows_)) for j in range(c, min(c + block, cols_))]
        knockouts.append(Knockout(EdgeSet(f"cell {r},{c}", cell_positions(span.start, span.grid, cells), last),
                                  chosen))
    with eval_mode(model):
        base = base_prediction(model, family, example)
        drops = -relative_change(_batched(model, family, example, base, knockouts, batch_size, record), base.p)
    out = np.zeros(span.grid)
    for (r, c), drop in zip(tops, drops, strict=True):
        out[r:r + block, c:c + block] = drop
    return out
