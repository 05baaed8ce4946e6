"""Multimodal neurons and knowledge neurons: the MLP units of the language model that carry the answer.

A *unit* (neuron) is one coordinate of the input of the family's ``mlp_down`` module in a decoder layer
(``down_proj`` in Llama / Gemma / Qwen decoders: act(gate(x)) · up(x), ``d_mlp`` wide); its output
weight is that coordinate's column of the down projection, w_k = W_down[:, k], which it writes into
the residual stream scaled by its activation a_k (where the layer normalises its MLP output first,
Gemma 3's post-feedforward norm, w_k times that norm's gain, its per-position 1 / RMS left out as the
final norm's is below). Units are named ``(layer, unit)``.

**Multimodal neurons** (Schwettmann, Chowdhury, Klein, Bau & Torralba 2023, "Multimodal neurons in
pretrained text-only transformers", arXiv 2308.01544, ICCV workshops): units scored at the *image
positions* by their contribution to the answer token c, summed over the image positions i:

- ``"direct"`` (default, gradient-free): s_k = Σ_i a_k(i) · (W_downᵀ W_Uᵀ)[k, c], the logit of c that
  the unit writes at position i read straight through the unembedding, the logit-lens reading of its
  output weight. W_U is the unembedding with the final norm's gain γ folded in (W_U · diag(γ), γ from
  :meth:`~medvlm.models.base.ModelFamily.final_norm_gain`: Gemma's 1 + w, Llama's w); the norm's
  per-position 1 / RMS is left out, a positive factor shared by every unit at a position. This is the
  contribution score Pan et al. compute without gradients ("Finding and editing multi-modal neurons
  in pre-trained transformers", Findings of ACL 2024; repository opanhw/MM_Neurons @ 6d3e57b,
  ``src/preparation.py`` multiplies ``down_proj.weight.T`` by the raw ``lm_head.weight.T``, no norm,
  and ``src/trainer.py`` ``find_mm_neurons`` multiplies the activations by its column of the token).
  We fold γ because the model reads W_U only after the norm scales each dimension by its gain, and
  the gains of a trained decoder need not be near 1.
- ``"gradient"``: s_k = Σ_i a_k(i) · ∂p(c)/∂a_k(i), activation × gradient of the model's own
  probability of c at the answer-predicting position: the total effect through every later layer,
  attention and the final norm (the other attribution the project issue names for this method).

For the top units: the vocabulary tokens their output weight decodes to (the top-k of W_U · diag(γ) ·
w_k) and their map over the image grid (activation × readout per position). The paper's text beyond
its abstract could not be read where this was written (no network): the two scores are the ones the
project issue states, the gradient-free form checked against Pan et al.'s public code.

**Knowledge neurons** (Dai, Dong, Hao, Sui, Chang & Wei 2022, "Knowledge neurons in pretrained
transformers", ACL 2022; repository Hunter-DDM/knowledge-neurons @ 922dfd9): integrated gradients
of p(answer) over the units of one layer at the answer-predicting position, the other layers left
as they are, from a baseline of 0:  Attr(a_k) = a_k / m · Σ_{j=1..m} ∂p(j/m · a)/∂a_k  (m = 20 steps;
the paper's right Riemann sum, so completeness holds up to its error: Σ_k Attr = p(a) − p(0) + O(1/m).
The authors' ``src/1_analyze_mlm.py`` ``scaled_input`` sums j = 0..m−1 instead). A unit is kept for
a prompt when its attribution is at least t = 0.2 × the prompt's maximum over all layers
(``src/2_get_kn.py`` ``re_filter``), and the refined set keeps the units kept in at least
max(0.7 · n, 3) of the n prompts (``parse_kn(..., mode_ratio_bag=0.7, min_threshold=3)``), so the
refinement needs three prompts or more: here the question and at least three rewordings of it
(:func:`medvlm.eval.paraphrase.paraphrases`). The authors also nudge the 0.7 by ±0.05 until a
relation's bags average 2–5 neurons; that tuning over many facts is not done here.

Interventions (:func:`edit_units`) multiply chosen units at chosen positions (0 suppresses, 2
amplifies as Dai et al.'s "enhance"); the causal checks live in :mod:`medvlm.diagnostics.neuron_checks`.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from medvlm.diagnostics.capture import Example
from medvlm.models.base import ModelFamily

Unit = tuple[int, int]  # (layer, unit)
METHODS = ("direct", "gradient")
THRESHOLD = 0.2   # Dai et al.: attribution >= 0.2 x the prompt's maximum
SHARE = 0.7       # Dai et al.: kept in at least 70% of the prompts ...
MIN_PROMPTS = 3   # ... and in at least 3 of them


# -- units and layers --------------------------------------------------------------------------------
def resolve_layers(model: torch.nn.Module, family: ModelFamily, layers: Sequence[int] | None) -> list[int]:
    """Decoder layer indices (negative from the end) as sorted non-negative ints; a layer that does not
    exist is a ``ValueError`` naming it and the range."""
    n = len(family.decoder_layers(model))
    if layers is None:
        return list(range(n))
    bad = [layer for layer in layers if not -n <= int(layer) < n]
    if bad:
        raise ValueError(f"neuron layer(s) {bad} do not exist: the language model has {n} decoder layers "
                         f"(0..{n - 1}, or -1..-{n} from the end); choose layers in that range")
    return sorted({int(layer) % n for layer in layers})


def d_mlp(model: torch.nn.Module, family: ModelFamily) -> int:
    return int(family.dimensions(model)["d_mlp"])


def check_units(model: torch.nn.Module, family: ModelFamily, units: Sequence[Unit]) -> list[Unit]:
    """``units`` as ``(layer, unit)`` with non-negative layers; a layer or unit index out of range raises."""
    resolve_layers(model, family, [layer for layer, _ in units])  # raises on a layer that does not exist
    n, width = len(family.decoder_layers(model)), d_mlp(model, family)
    bad = [u for _, u in units if not 0 <= int(u) < width]
    if bad:
        raise ValueError(f"unit index(es) {bad} out of range: each MLP layer has {width} units (0..{width - 1})")
    return [(int(layer) % n, int(u)) for layer, u in units]


def effective_weight(linear: torch.nn.Module) -> torch.Tensor:
    """The weight a linear layer applies, LoRA deltas included (the log-probability method's reading;
    imported on use: the method registry imports this module through the top-neuron method)."""
    from medvlm.diagnostics.methods.logprob import effective_weight as weight

    return weight(linear)


def _down(model: torch.nn.Module, family: ModelFamily, layer: int) -> torch.nn.Module:
    return family.mlp_down(family.decoder_layers(model)[layer])


@contextlib.contextmanager
def _pre_hooks(model: torch.nn.Module, family: ModelFamily, hooks: Mapping[int, object]) -> Iterator[None]:
    """Forward pre-hooks on ``mlp_down`` of the given layers, removed on exit; the model in eval mode
    (LoRA dropout off), its mode restored."""
    handles = [_down(model, family, layer).register_forward_pre_hook(hook) for layer, hook in hooks.items()]
    was_training = model.training
    try:
        if was_training:
            model.eval()
        yield
    finally:
        for h in handles:
            h.remove()
        if was_training:
            model.train()


def _answer_prob(logits: torch.Tensor, target_id: int) -> torch.Tensor:
    """p(target) per row from logits [B, 1, V] kept at the answer-predicting position."""
    return torch.softmax(logits[:, -1].float(), -1)[:, target_id]


# -- interventions ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class UnitEdit:
    """Multiply ``units`` of ``layer`` at sequence ``positions`` by ``factor`` (0 suppresses, 2 amplifies)."""

    layer: int
    units: tuple[int, ...]
    positions: tuple[int, ...]
    factor: float


@contextlib.contextmanager
def edit_units(model: torch.nn.Module, family: ModelFamily, rows: Sequence[Sequence[UnitEdit]]) -> Iterator[None]:
    """While active, batch row b of a forward pass gets the edits ``rows[b]`` (rows beyond them none)."""
    plan: dict[int, list[tuple[int, torch.Tensor, torch.Tensor, float]]] = {}
    for b, edits in enumerate(rows):
        for e in edits:
            if e.units and e.positions:
                plan.setdefault(e.layer, []).append((b, torch.tensor(e.positions)[:, None],
                                                     torch.tensor(e.units)[None, :], float(e.factor)))

    def make(layer: int):
        def hook(module, args):
            x = args[0].clone()
            for b, pos, units, factor in plan[layer]:
                x[b, pos, units] = x[b, pos, units] * factor
            return (x, *args[1:])
        return hook

    with _pre_hooks(model, family, {layer: make(layer) for layer in plan}):
        yield


@torch.no_grad()
def answer_probs(model: torch.nn.Module, family: ModelFamily, example: Example, target_id: int,
                 rows: Sequence[Sequence[UnitEdit]], batch: int = 16) -> np.ndarray:
    """p(target) at the example's answer-predicting position under each row of edits (an empty row is
    the unedited model), ``batch`` rows per forward pass."""
    q = example.target_positions[0]
    out = []
    for start in range(0, len(rows), batch):
        chunk = rows[start:start + batch]
        with edit_units(model, family, chunk):
            logits = model(**family.repeat_inputs(example.inputs, len(chunk)), use_cache=False,
                           logits_to_keep=torch.tensor([q])).logits
        out.append(_answer_prob(logits, target_id))
    return torch.cat(out).double().cpu().numpy()


# -- reading the units -----------------------------------------------------------------------------------
@torch.no_grad()
def _unembed_rows(model: torch.nn.Module, family: ModelFamily, token_id: int) -> torch.Tensor:
    """Row ``token_id`` of the unembedding with the final norm's gain folded in: γ ⊙ W_U[c] [D], float32."""
    head = family.unembed(model)
    row = (effective_weight(head)[token_id] if hasattr(head, "base_layer") else head.weight[token_id].float())
    return row * family.final_norm_gain(model).to(row.device)


def _output_weight(model: torch.nn.Module, family: ModelFamily, layer: int) -> torch.Tensor:
    """The units' output weights as the layer writes them into the residual stream: W_down [D, d_mlp]
    (LoRA deltas included), its rows scaled by the gain of a norm the layer applies to its MLP output
    (:meth:`~medvlm.models.base.ModelFamily.mlp_output_gain`, Gemma 3's post-feedforward norm)."""
    w = effective_weight(_down(model, family, layer))
    gain = family.mlp_output_gain(model, layer)
    return w if gain is None else w * gain.to(w.device)[:, None]


@torch.no_grad()
def unit_readout(model: torch.nn.Module, family: ModelFamily, layers: Sequence[int], token_id: int) -> torch.Tensor:
    """(W_downᵀ (γ ⊙ W_U[c]))[k] per layer: [len(layers), d_mlp], float32 (LoRA deltas and the gain of
    a norm on the MLP output included)."""
    u = _unembed_rows(model, family, token_id)
    return torch.stack([_output_weight(model, family, layer).T @ u.to(u.device) for layer in layers])


@torch.no_grad()
def decode_units(model: torch.nn.Module, family: ModelFamily, tokenizer, units: Sequence[Unit],
                 k: int = 5) -> list[list[str]]:
    """The top-``k`` vocabulary tokens each unit's output weight decodes to: top-k of W_U (γ ⊙ w_k)."""
    if not units:
        return []
    gain = family.final_norm_gain(model)
    weights = {layer: _output_weight(model, family, layer) for layer in {layer for layer, _ in units}}
    cols = torch.stack([weights[layer][:, u] for layer, u in units]) * gain.to(weights[units[0][0]].device)
    head = family.unembed(model)
    top = head(cols.to(head.weight.dtype)).float().topk(k, dim=-1).indices
    return [[tokenizer.decode([int(t)]) if tokenizer is not None else str(int(t)) for t in row] for row in top]


def _activations(model: torch.nn.Module, family: ModelFamily, example: Example, layers: Sequence[int],
                 target_id: int | None, grad: bool) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor], Any]:
    """Unit activations of ``layers`` at every position ([S, d_mlp] each, float32), their gradients of
    p(target) when ``grad`` (else empty), and p(target); without a target, ``(predicted id, its p)``."""
    acts: dict[int, torch.Tensor] = {}
    deltas: dict[int, torch.Tensor] = {}

    def make(layer: int):
        def hook(module, args):
            x = args[0]
            acts[layer] = x[0].detach().float()
            if not grad:
                return None
            deltas[layer] = torch.zeros_like(x, requires_grad=True)  # d p / d delta = d p / d x
            return (x + deltas[layer], *args[1:])
        return hook

    q = example.target_positions[0]
    with _pre_hooks(model, family, {layer: make(layer) for layer in layers}), torch.set_grad_enabled(grad):
        logits = model(**example.inputs, use_cache=False, logits_to_keep=torch.tensor([q])).logits
        if target_id is None:
            probs = torch.softmax(logits[0, -1].float(), -1)
            return acts, {}, (int(probs.argmax()), float(probs.max()))
        p = _answer_prob(logits, target_id)[0]
        grads = {}
        if grad:
            found = torch.autograd.grad(p, [deltas[layer] for layer in layers])
            grads = {layer: g[0].float() for layer, g in zip(layers, found, strict=True)}
    return acts, grads, float(p.detach())


# -- multimodal neurons ----------------------------------------------------------------------------------
@dataclass
class NeuronSet:
    """Scored units of one example and the chosen set (best first).

    ``scores`` [len(layers), d_mlp]: the multimodal score, or the knowledge neurons' attribution
    (mean over the prompts). ``positions``: where the units were scored, where a causal check edits
    them. ``maps``: each chosen unit's contribution over the image grid, its activation a_k(i) times
    its readout (the constant (W_downᵀ W_U)[k, c], or ∂p/∂a_k(i)), so positive is where it pushes
    toward the answer (multimodal neurons; the bare activations are in ``extra["activations"]``).
    """

    kind: str
    method: str
    target_id: int
    target_token: str
    layers: list[int]
    scores: np.ndarray
    positions: list[int]
    units: list[Unit]
    tokens: list[list[str]] = field(default_factory=list)
    grid: tuple[int, int] | None = None
    maps: list[np.ndarray] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    def score(self, unit: Unit) -> float:
        return float(self.scores[self.layers.index(unit[0]), unit[1]])

    def table(self) -> list[dict]:
        """JSON-ready rows of the chosen units: layer, unit, score, decoded tokens."""
        return [{"layer": layer, "unit": u, "score": self.score((layer, u)),
                 "tokens": self.tokens[i] if i < len(self.tokens) else []}
                for i, (layer, u) in enumerate(self.units)]


def top_units(scores: np.ndarray, layers: Sequence[int], n: int) -> list[Unit]:
    """The ``n`` units with the largest scores (descending; ties broken by layer, then unit)."""
    flat = np.asarray(scores, float).ravel()
    order = np.lexsort((np.arange(flat.size), -flat))[:n]
    width = scores.shape[1]
    return [(int(layers[i // width]), int(i % width)) for i in order]


def multimodal_neurons(model: torch.nn.Module, family: ModelFamily, example: Example, tokenizer=None, *,
                       target_id: int | None = None, method: str = "direct", layers: Sequence[int] | None = None,
                       top: int = 10, k_tokens: int = 5) -> NeuronSet:
    """Units scored at the image positions by their contribution to ``target_id`` (default: the example's
    first answer token, else the model's prediction), the ``top`` best with their decoded tokens and
    activation maps over the image grid (see the module docstring for ``method``)."""
    if method not in METHODS:
        raise ValueError(f"method={method!r}; expected one of {METHODS}")
    chosen = resolve_layers(model, family, layers)
    span = example.span or family.image_spans(model, example.inputs)[0]
    image = list(range(span.start, span.end))
    if target_id is None:
        target_id = example.target_ids[0] if example.target_ids else None
    if target_id is None and method == "gradient":  # the gradient needs the target before the pass
        target_id = _activations(model, family, example, [], None, grad=False)[2][0]
    acts, grads, p = _activations(model, family, example, chosen, target_id, grad=method == "gradient")
    if target_id is None:
        target_id, p = p
    a = torch.stack([acts[layer][image] for layer in chosen])  # [L, N, F]
    if method == "direct":
        contrib = a * unit_readout(model, family, chosen, target_id).to(a.device)[:, None, :]
    else:
        contrib = a * torch.stack([grads[layer][image] for layer in chosen])
    scores = contrib.sum(1).double().cpu().numpy()
    units = top_units(scores, chosen, top)
    maps = [contrib[chosen.index(layer), :, u].reshape(span.grid).double().cpu().numpy() for layer, u in units]
    acts = [a[chosen.index(layer), :, u].reshape(span.grid).double().cpu().numpy() for layer, u in units]
    token = tokenizer.decode([target_id]) if tokenizer is not None else str(target_id)
    return NeuronSet("multimodal", method, int(target_id), token, chosen, scores, image, units,
                     decode_units(model, family, tokenizer, units, k_tokens), span.grid, maps,
                     {"p": p, "activations": acts})


# -- knowledge neurons -----------------------------------------------------------------------------------
def ig_batch(model: torch.nn.Module, family: ModelFamily, seq_len: int, steps: int, memory_mb: float) -> int:
    """Interpolation steps per forward + backward pass, so that the autograd activations of one pass fit
    ``memory_mb``: per sequence ≈ layers · tokens · (8·d_model + 4·d_mlp + 2·heads·tokens) elements."""
    dims = family.dimensions(model)
    n_layers, n_heads = len(family.decoder_layers(model)), family.head_layout(model)[0]
    elem = next(model.parameters()).element_size()
    per_row = n_layers * seq_len * (8 * dims["d_model"] + 4 * dims["d_mlp"] + 2 * n_heads * seq_len) * elem
    return int(max(1, min(steps + 1, memory_mb * 2**20 // max(per_row, 1))))


@dataclass
class Attribution:
    """Integrated gradients of p(target) over the units of each layer at one position."""

    layers: list[int]
    attr: np.ndarray        # [L, d_mlp]
    p: float                # p(target), unedited
    p_baseline: np.ndarray  # [L]: p(target) with that layer's units at the position set to 0
    steps: int

    def completeness_gap(self) -> np.ndarray:
        """Σ_k Attr − (p − p(baseline)) per layer: the Riemann error (→ 0 as steps grow)."""
        return self.attr.sum(1) - (self.p - self.p_baseline)


def integrated_gradients(model: torch.nn.Module, family: ModelFamily, example: Example, target_id: int, *,
                         layers: Sequence[int] | None = None, steps: int = 20, memory_mb: float = 2048) -> Attribution:
    """Dai et al.'s attribution of each unit at the answer-predicting position (module docstring), one
    layer at a time, ``steps`` points (plus the baseline) batched within ``memory_mb``."""
    if steps < 1:
        raise ValueError(f"steps={steps}; integrated gradients need at least 1 step (Dai et al. use 20)")
    chosen = resolve_layers(model, family, layers)
    q = example.target_positions[0]
    acts, _, _ = _activations(model, family, example, chosen, None, grad=False)
    dtype = next(model.parameters()).dtype
    alphas = torch.arange(0, steps + 1, dtype=torch.float32) / steps  # alpha 0 gives p(baseline)
    batch = ig_batch(model, family, int(example.inputs["input_ids"].shape[-1]), steps, memory_mb)
    attr, base, p_full = [], [], float("nan")
    for layer in chosen:
        a_q = acts[layer][q]
        total = torch.zeros_like(a_q)
        for chunk in alphas.split(batch):
            s = (chunk[:, None].to(a_q.device) * a_q[None]).to(dtype).requires_grad_(True)

            def hook(module, args, s=s):
                x = args[0].clone()
                x[:, q] = s
                return (x, *args[1:])

            with _pre_hooks(model, family, {layer: hook}), torch.enable_grad():
                logits = model(**family.repeat_inputs(example.inputs, len(chunk)), use_cache=False,
                               logits_to_keep=torch.tensor([q])).logits
                p = _answer_prob(logits, target_id)
                (g,) = torch.autograd.grad(p.sum(), s)
            total += (g.float() * (chunk > 0)[:, None].to(g.device)).sum(0)
            if chunk[0] == 0:
                base.append(float(p[0].detach()))
            if chunk[-1] == 1:
                p_full = float(p[-1].detach())
        attr.append((a_q * total / steps).double().cpu().numpy())
    return Attribution(chosen, np.stack(attr), p_full, np.asarray(base), steps)


def kept_units(attribution: Attribution, threshold: float = THRESHOLD) -> set[Unit]:
    """Units whose attribution is at least ``threshold`` × the maximum over all layers (Dai et al.)."""
    a = attribution.attr
    top = float(a.max())
    if top <= 0:
        return set()
    rows, cols = np.nonzero(a >= threshold * top)
    return {(attribution.layers[r], int(c)) for r, c in zip(rows, cols, strict=True)}


def refine(per_prompt: Sequence[set[Unit]], share: float = SHARE, min_count: int = MIN_PROMPTS) -> list[Unit]:
    """Units kept in at least max(``share`` · n, ``min_count``) of the n prompts' sets (Dai et al.)."""
    if len(per_prompt) < min_count:
        raise ValueError(f"the knowledge-neuron refinement got {len(per_prompt)} prompt(s); it needs at least "
                         f"{min_count} (a unit must be kept in max({share} x n, {min_count}) prompts): pass the "
                         "question with at least three rewordings")
    counts = Counter(u for units in per_prompt for u in units)
    need = max(share * len(per_prompt), min_count)
    return sorted(u for u, c in counts.items() if c >= need - 1e-9)


def knowledge_neurons(model: torch.nn.Module, family: ModelFamily, examples: Sequence[Example],
                      target_ids: Sequence[int], tokenizer=None, *, layers: Sequence[int] | None = None,
                      steps: int = 20, threshold: float = THRESHOLD, share: float = SHARE,
                      min_prompts: int = MIN_PROMPTS + 1, memory_mb: float = 2048, k_tokens: int = 5) -> NeuronSet:
    """Knowledge neurons of one fact asked several ways: ``examples[0]`` is the question, the others its
    rewordings (at least three, so ``min_prompts`` = 4 wordings), ``target_ids`` the answer's first token
    under each. The set is ordered by mean attribution; it is edited at the question's answer position."""
    if len(examples) != len(target_ids):
        raise ValueError(f"{len(examples)} prompts but {len(target_ids)} target ids; pass one per prompt")
    if len(examples) < min_prompts:
        raise ValueError(f"knowledge neurons need the question and at least {min_prompts - 1} paraphrases of it "
                         f"(Dai et al. keep units shared by max({share} x n, {MIN_PROMPTS}) prompts); got "
                         f"{len(examples) - 1} paraphrase(s) for {examples[0].question!r}")
    attributions = [integrated_gradients(model, family, ex, t, layers=layers, steps=steps, memory_mb=memory_mb)
                    for ex, t in zip(examples, target_ids, strict=True)]
    per_prompt = [kept_units(a, threshold) for a in attributions]
    mean = np.mean([a.attr for a in attributions], axis=0)
    chosen = attributions[0].layers
    units = sorted(refine(per_prompt, share), key=lambda u: -mean[chosen.index(u[0]), u[1]])
    token = tokenizer.decode([target_ids[0]]) if tokenizer is not None else str(target_ids[0])
    extra = {"per_prompt": [sorted(s) for s in per_prompt], "p": attributions[0].p, "steps": steps,
             "completeness_gap_max": float(max(np.abs(a.completeness_gap()).max() for a in attributions)),
             "threshold": threshold, "share": share, "n_prompts": len(examples)}
    return NeuronSet("knowledge", "integrated_gradients", int(target_ids[0]), token, chosen, mean,
                     [examples[0].target_positions[0]], units, decode_units(model, family, tokenizer, units, k_tokens),
                     extra=extra)

