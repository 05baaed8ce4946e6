"""What a saliency method is, and the registry the probe, budget, report, sanity check and explorer read.

A method is one file in :mod:`medvlm.diagnostics.methods` holding a :class:`Method` subclass
decorated with :func:`register`. It declares:

- ``name`` (the key in every JSON and table), ``title`` (what pages show) and ``order`` (where);
- ``shared``: the capture kinds it reads from the one shared pass (``"attention_mean"``,
  ``"hidden_states"``); a method with its own forward pass declares none;
- ``eager``: whether it needs attention weights (eager attention);
- ``sanity``: whether the parameter-randomisation test applies to it;
- :meth:`Method.cost`: its floating-point operations on an example of a given :class:`Shape`,
  beyond the shared pass, so a budget can be planned before anything runs;
- :meth:`Method.run`: the map (rows × cols of the image-token grid, possibly signed), numbers for
  the JSON outputs and, optionally, objects the explorer draws (:class:`MethodResult`).

The probe, the per-checkpoint budget, the report, the randomisation test and the explorer loop
over :func:`registered`; none of them names a method.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from medvlm.diagnostics.capture import Cache, Example, capture
from medvlm.models.base import ModelFamily
from medvlm.utils.memory import memory_budget

#: float32 logits one unembedding chunk may hold ([rows, vocab]): 64 MiB is 63 rows of Gemma 3's
#: 262,208-token vocabulary (65 of PaliGemma's 257,216), 523 of LLaVA-1.5's 32,064
UNEMBED_BYTES = 64 * 2**20


def unembed_rows(model: torch.nn.Module, family: ModelFamily, rows: int) -> int:
    """How many residual vectors to unembed at once: at most ``rows``, and no more than fit
    :data:`UNEMBED_BYTES` of float32 logits over the model's vocabulary (at least one), so the
    logit lens and the log-probability readouts stay within memory on a large vocabulary."""
    vocab = family.dimensions(model)["vocab"]
    return max(1, min(int(rows), UNEMBED_BYTES // (4 * vocab)))


@dataclass(frozen=True)
class Shape:
    """What a method's cost grows with: one example's sequence and the model's sizes."""

    seq_len: int
    image_tokens: int
    grid: tuple[int, int]
    n_layers: int
    n_heads: int
    d_model: int
    d_mlp: int
    vocab: int
    vision_tokens: int = 0
    vision_layers: int = 0
    d_vision: int = 0
    d_vision_mlp: int = 0
    vision_heads: int = 1
    n_kv_heads: int = 0   # 0: as many as query heads
    head_dim: int = 0     # 0: d_model / n_heads

    @classmethod
    def of(cls, model: torch.nn.Module, family: ModelFamily, example: Example) -> Shape:
        span = example.span or family.image_spans(model, example.inputs)[0]
        n_heads, n_kv, head_dim = family.head_layout(model)
        return cls(seq_len=int(example.inputs["input_ids"].shape[-1]), image_tokens=span.end - span.start,
                   grid=span.grid, n_layers=len(family.decoder_layers(model)), n_heads=n_heads,
                   n_kv_heads=n_kv, head_dim=head_dim, vision_tokens=family.vision_tokens(model, example.inputs),
                   vision_layers=len(family.vision_layers(model)), **family.dimensions(model))

    def forward_flops(self, positions: int | None = None, logits_at: int = 1) -> float:
        """Multiply-adds ×2 of one forward pass over ``positions`` tokens (default the sequence) with
        logits at ``logits_at`` positions: decoder matmuls, attention scores, the unembedding, and
        the vision tower."""
        s = self.seq_len if positions is None else positions
        d, f = self.d_model, self.d_mlp
        decoder = self.n_layers * (2 * s * (4 * d * d + 3 * d * f) + 4 * s * s * d)
        vision = self.vision_layers * (2 * self.vision_tokens * 12 * self.d_vision ** 2
                                       + 4 * self.vision_tokens ** 2 * self.d_vision)
        return float(decoder + vision + 2 * logits_at * self.vocab * d)

    def unembed_flops(self, vectors: int) -> float:
        """Final norm and unembedding of ``vectors`` residual vectors."""
        return float(2 * vectors * self.vocab * self.d_model)

    def decoder_layer_bytes(self, batch: int = 1, positions: int | None = None) -> float:
        """Float32 bytes of one decoder layer's activations over ``batch`` sequences of ``positions``
        tokens (default the sequence): 4·S·(4·D + 4·F + 4·H·d) + 4·2·H·S² (four model-width tensors:
        the residual, its norm, the attention and MLP outputs; four MLP-width ones: gate, up,
        activation, product; four of all heads' width: q, and k and v repeated to every head, the
        heads' output; eager attention's score and probability matrices), times ``batch``. The
        attention's and the MLP's tensors are counted as if alive together: an upper estimate."""
        s = self.seq_len if positions is None else positions
        head_width = self.n_heads * (self.head_dim or self.d_model // max(self.n_heads, 1))
        return float(4 * batch * (s * (4 * self.d_model + 4 * self.d_mlp + 4 * head_width) + 2 * self.n_heads * s * s))

    def vision_layer_bytes(self, batch: int = 1) -> float:
        """Float32 bytes of one vision layer's activations over its T patches, counted as a decoder
        layer's: 4·T·(4·Dv + 4·Fv + 4·Dv) + 4·2·Hv·T², times ``batch``."""
        t, dv = self.vision_tokens, self.d_vision
        return float(4 * batch * (t * (8 * dv + 4 * (self.d_vision_mlp or 4 * dv)) + 2 * self.vision_heads * t * t))

    def forward_bytes(self, batch: int = 1, positions: int | None = None, logits_at: int = 1) -> float:
        """Float32 bytes one forward pass holds at its peak beyond the weights, without autograd:
        the wider of one decoder layer and one vision layer (layers run one after the other and
        free their activations), the embedded sequence and the residual stream (2·S·D), eager
        attention's additive mask (S²), and the logits at ``logits_at`` positions with one float
        copy (2·P·V), all times 4 bytes and ``batch``."""
        s = self.seq_len if positions is None else positions
        rest = 2 * s * self.d_model + s * s + 2 * logits_at * self.vocab
        layer = max(self.decoder_layer_bytes(batch, s), self.vision_layer_bytes(batch))
        return layer + float(4 * batch * rest)

    def backward_bytes(self, batch: int = 1, logits_at: int = 1, factor: float = 1.0) -> float:
        """Float32 bytes a forward and backward pass through every layer holds at its peak: autograd
        keeps each layer's activations for the backward (``factor`` x :meth:`decoder_layer_bytes`
        per decoder layer and :meth:`vision_layer_bytes` per vision layer; ``factor`` > 1 where more
        is kept, e.g. LoRA's dropped-out copy of each adapted module's input), the backward of one
        layer holds as much again for its gradients, and the logits at ``logits_at`` positions are
        kept with their log-softmax and their gradient (3·P·V)."""
        kept = factor * (self.n_layers * self.decoder_layer_bytes(batch)
                         + self.vision_layers * self.vision_layer_bytes(batch))
        return kept + self.forward_bytes(batch) + float(4 * batch * 3 * logits_at * self.vocab)


#: most copies of one example a batched method (occlusion, attention knockout) puts through one
#: forward pass: beyond it a GPU gains little and a CPU nothing
MAX_COPIES = 16


def copies_per_forward(shape: Shape, budget_bytes: int, n: int) -> int:
    """Copies of an example of ``shape`` per forward pass that fit ``budget_bytes``, for ``n`` copies
    in all: each copy holds one forward pass (:meth:`Shape.forward_bytes`, linear in the batch), and
    at real shapes that is mostly the vision tower over all its patches (MedGemma's eager SigLIP keeps
    a 4,096 x 4,096 score matrix per head, about 2.6 GB a copy), so a fixed batch that costs nothing
    on the demo's 16 tokens asks for tens of GB there. At most :data:`MAX_COPIES` and ``n``, at least one."""
    per_copy = shape.forward_bytes(batch=1)
    return int(max(1, min(MAX_COPIES, n, budget_bytes // max(1.0, per_copy))))


def plan_budget(model: torch.nn.Module | None, budget_bytes: int | None = None) -> int:
    """``budget_bytes``, or what a batch sized to memory plans with on the model's device (None: a
    CPU; half the free memory, :func:`medvlm.utils.memory.memory_budget`)."""
    if budget_bytes is not None:
        return int(budget_bytes)
    return memory_budget(torch.device("cpu") if model is None else next(model.parameters()).device)


@dataclass
class MethodResult:
    """One method's output on one example."""

    map: np.ndarray                              # (rows, cols) of the image-token grid, possibly signed
    row: dict[str, Any] = field(default_factory=dict)  # JSON-ready numbers (diagnostics.json, numbers.json)
    data: Any = None                             # objects for the explorer (LogitLens, LogProbIncrease)


class Context:
    """One example being explained: the model and the one shared capture pass, computed on first use
    with every kind the chosen methods (and the caller: ``extra_kinds``) asked for."""

    def __init__(self, model: torch.nn.Module, processor, family: ModelFamily, example: Example, *,
                 kinds: Iterable[str] = (), names_filter=None):
        self.model, self.processor, self.family, self.example = model, processor, family, example
        self.kinds = set(kinds)
        self.names_filter = names_filter
        self._pass: tuple[Any, Cache] | None = None
        self._logits: torch.Tensor | None = None

    @property
    def tokenizer(self):
        return getattr(self.processor, "tokenizer", None)

    def _run(self) -> tuple[Any, Cache]:
        if self._pass is None:  # logits at the explained positions only: the unembedding of every
            # position is the costliest matmul of a large-vocabulary model (257k x 1,045 for PaliGemma-448)
            self._pass = capture(self.model, self.family, self.example.inputs, attention=False,
                                 attention_mean="attention_mean" in self.kinds,
                                 hidden_states="hidden_states" in self.kinds,
                                 resid_pre="resid_pre" in self.kinds, names_filter=self.names_filter,
                                 logits_positions=self.positions)
            self._logits = self._pass[0].logits[0].float()  # [explained positions, vocab]
        return self._pass

    @property
    def cache(self) -> Cache:
        return self._run()[1]

    @property
    def logits(self) -> torch.Tensor:
        """The output logits at the explained positions (:attr:`positions`, in that order): [P, vocab]."""
        if self._logits is None:
            self._run()
        return self._logits

    @property
    def positions(self) -> list[int]:
        return self.example.target_positions

    @property
    def target_id(self) -> int:
        """The token explained: the first answer token when the example holds an answer, else the
        model's prediction at the first target position (from the shared pass)."""
        if self.example.target_ids:
            return self.example.target_ids[0]
        return int(self.logits[0].argmax())

    def release(self) -> None:
        """Drop the shared pass's tensors once every method that reads them has run (the explained
        positions' logits stay; a later read of the cache runs the pass again)."""
        self._pass = None


class Method:
    """A saliency method (see the module docstring)."""

    name: str = ""
    title: str = ""
    order: int = 100
    shared: frozenset[str] = frozenset()
    eager: bool = False
    sanity: bool = True

    def cost(self, shape: Shape) -> float:
        """Floating-point operations beyond the shared pass on an example of ``shape``."""
        return 0.0

    def memory(self, shape: Shape) -> float:
        """Bytes the method may hold at its peak beyond the loaded model and the shared pass's
        tensors, on an example of ``shape``: what it asked for (its batch, the tensors it keeps)
        and the forward passes it runs. The real-shape test tier asserts it (measured as peak
        resident memory). Default: one forward pass of the example (:meth:`Shape.forward_bytes`);
        a method that batches, keeps more or unembeds many vectors says so here."""
        return shape.forward_bytes()

    def run(self, ctx: Context) -> MethodResult:
        raise NotImplementedError

    def map(self, model: torch.nn.Module, family: ModelFamily, example: Example, processor=None) -> np.ndarray:
        """The map alone, with a capture of its own (the randomisation test runs it on a copy)."""
        return self.run(Context(model, processor, family, example, kinds=self.shared)).map


_REGISTRY: dict[str, Method] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: add one instance of ``cls`` to the registry under ``cls.name``."""
    if not cls.name or cls.name in _REGISTRY:
        raise ValueError(f"method {cls.__name__}: name {cls.name!r} is empty or registered twice")
    _REGISTRY[cls.name] = cls()
    return cls


def registered(names: Iterable[str] | None = None) -> list[Method]:
    """Registered methods in display order (``names``: only those, each checked)."""
    chosen = list(_REGISTRY.values()) if names is None else [get_method(n) for n in names]
    return sorted(chosen, key=lambda m: (m.order, m.name))


def method_names() -> list[str]:
    return [m.name for m in registered()]


def get_method(name: str) -> Method:
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown diagnostics method {name!r}.{hint} Available: {', '.join(method_names())}")
    return _REGISTRY[name]
