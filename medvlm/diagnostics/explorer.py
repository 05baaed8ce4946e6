"""The explorer's engine: one question about one image, answered and explained, without a UI.

:func:`analyze` generates the answer (greedy), then teacher-forces it and runs the registered
saliency methods (:mod:`medvlm.diagnostics.methods`) on it, within a time budget when given (the
methods that would overrun are listed as skipped and computed on demand by :func:`compute_method`).
Besides the maps it keeps one capture of every layer's and head's attention rows at the response
positions, so the layer / head / fusion controls and a click on a token or a patch re-read that
cache instead of running the model; the logit-lens page's top-5 tokens per patch and layer; and
the top-10 heads under two scores (:mod:`medvlm.diagnostics.methods.logprob`): the paper's head
importance (the head's whole output at the first answer position, Yu & Ananiadou 2024, eq. 6) and
the increase summed over the image positions.

One :class:`ExplorerModel` holds the base model and up to two LoRA adapters (PEFT named adapters
on one base, switched per request), so stage 1 and stage 2 can be compared on the same input.
The Gradio app (:mod:`medvlm.diagnostics.explorer_app`) is a thin layer over this module.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from medvlm.diagnostics.attention_quality import score_map
from medvlm.diagnostics.capture import (
    AttentionNotEagerError,
    Cache,
    Example,
    capture,
    prepare_example,
)
from medvlm.diagnostics.methods import Context, Shape, get_method, method_names, registered
from medvlm.diagnostics.methods.logit_lens import LogitLens, lens_html
from medvlm.diagnostics.overlay import enlarge, overlay, save_overlay
from medvlm.diagnostics.saliency import FUSIONS, attention_map, image_to_response, last_quarter, rollout
from medvlm.eval.generate import generate_answers
from medvlm.models.adapters import (
    AdapterError,
    adapter_folder,
    adapter_record,
    apply_adapter,
    check_adapter,
    family_of,
)
from medvlm.models.families import FAMILIES
from medvlm.models.registry import LoadedModel, detect_family, load_model_and_processor
from medvlm.utils.images import WINDOW_PRESETS, is_dicom
from medvlm.utils.images import read_image as read_any_image
from medvlm.utils.io import atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)

BASE = "base model"
#: Overlays are drawn at least this many pixels wide (the demo model sees 64x64 images).
MIN_DISPLAY = 256


class ExplorerError(ValueError):
    """A request the explorer cannot serve; the message says what to change."""


# -- the model and its adapters -------------------------------------------------------------------
class ExplorerModel:
    """A base model with up to two named LoRA adapters; :meth:`use` switches between them.

    ``adapters`` maps a display name (e.g. ``"A: stage1"``) to an adapter folder. All adapters sit
    on the one base model (PEFT named adapters), so two adapters cost one base in memory.
    """

    def __init__(self, loaded: LoadedModel, adapters: dict[str, str] | None = None, name: str = ""):
        self.processor, self.family, self.name = loaded.processor, loaded.family, name
        self.model = loaded.model
        self.adapters: dict[str, str] = {}
        self.adapter_paths: list[str] = []
        for i, (label, folder) in enumerate((adapters or {}).items()):
            self._load_adapter(label, folder, first=i == 0)
        self.model.eval()
        self.n_layers = len(self.family.decoder_layers(self.model))
        self.n_heads = self.family.head_layout(self.model)[0]

    def _load_adapter(self, label: str, folder: str, first: bool) -> None:
        path = adapter_folder(folder)
        try:
            record = adapter_record(path)
        except AdapterError as err:
            raise ExplorerError(str(err)) from err
        if record["merged_into_base"]:  # two named adapters share one base: it cannot hold a merged chain
            raise ExplorerError(f"adapter {folder} is a checkpoint of a stage that merged "
                                f"{record['merged_into_base'][0]} into its base; open that stage's final "
                                "adapter (saved relative to the original base) instead")
        key = f"adapter{len(self.adapters)}"
        if first:
            self.model = apply_adapter(self.model, path, name=key)
        else:
            self.model.load_adapter(str(path), adapter_name=key)
        self.adapters[label] = key
        self.adapter_paths.append(str(folder))

    @property
    def variants(self) -> list[str]:
        """What a request can pick: the adapters, or the base model when there is none."""
        return list(self.adapters) or [BASE]

    @contextlib.contextmanager
    def use(self, variant: str) -> Iterator[torch.nn.Module]:
        """The model with ``variant`` active (an adapter label, or :data:`BASE`)."""
        if variant == BASE:
            ctx = self.model.disable_adapter() if self.adapters else contextlib.nullcontext()
            with ctx:
                yield self.model
            return
        if variant not in self.adapters:
            raise ExplorerError(f"unknown variant {variant!r}; choose one of {self.variants + [BASE]}")
        self.model.set_adapter(self.adapters[variant])
        yield self.model


def adapter_label(letter: str, folder: str | Path) -> str:
    """``"A: stage1"`` for ``runs/<run>/stage1/adapter`` or ``runs/<run>/stage1``."""
    path = Path(folder)
    return f"{letter}: {path.parent.name if path.name == 'adapter' else path.name}"


def load_explorer_model(model: str, adapters: Sequence[str] = (), *, dtype: str = "auto") -> ExplorerModel:
    """Load ``model`` (hub id, folder or ``demo:<family>``) with eager attention and up to two
    adapters, labelled A and B. Raises :class:`ExplorerError` with the reason when it cannot."""
    if not model:
        raise ExplorerError("give a model: a hub id, a model folder or "
                            + " / ".join(f"demo:{name}" for name in sorted(FAMILIES)))
    if len(adapters) > 2:
        raise ExplorerError(f"{len(adapters)} adapters given; the explorer compares at most two")
    family = family_of(model) if adapters else None
    if adapters and family is None:  # a model whose config cannot be read: say that, not an adapter mismatch
        try:
            detect_family(model)
        except (OSError, ValueError, KeyError) as err:
            raise ExplorerError(f"cannot load model {model!r}: {err}") from err
    records = []
    for folder in adapters:  # before any weights load
        try:
            records.append(check_adapter(folder, model, family))
        except AdapterError as err:
            raise ExplorerError(str(err)) from err
    settings = records[0].get("image_settings") if records else None  # adapter A's processor settings
    try:
        loaded = load_model_and_processor(model, dtype=dtype, attn_implementation="eager", for_inference=True,
                                          image_settings=settings or None)
    except (OSError, ValueError, KeyError) as err:
        raise ExplorerError(f"cannot load model {model!r}: {err}") from err
    labels = {adapter_label(letter, folder): str(folder) for letter, folder in zip("AB", adapters, strict=False)}
    return ExplorerModel(loaded, labels, name=model)


# -- inputs ---------------------------------------------------------------------------------------
def read_image(path: str | Path, window: str | None = None, level: float | None = None,
               width: float | None = None) -> Image.Image:
    """An uploaded file as an RGB image: PNG / JPEG, or DICOM through a VOI window.

    ``window`` is a preset (``lung``, ``mediastinum``, ``brain``, ``bone``), ``"custom"`` (then
    ``level`` and ``width`` are used) or None / ``"file"`` (the file's own window). Raises
    :class:`ExplorerError` naming the file when it is not an image.
    """
    path = Path(path)
    if not path.is_file():
        raise ExplorerError(f"{path.name}: file not found")
    win: Any = None
    if is_dicom(path):
        if window == "custom":
            if level is None or width is None or width < 1:
                raise ExplorerError("custom window: give a level and a width >= 1")
            win = (float(level), float(width))
        elif window in WINDOW_PRESETS:
            win = window
        elif window not in (None, "", "file"):
            raise ExplorerError(f"unknown window {window!r}; choose file, custom or one of {sorted(WINDOW_PRESETS)}")
    try:
        return read_any_image(path, win, name=path.name)
    except Exception as err:  # noqa: BLE001 - pydicom and PIL raise many types for a broken file
        what = ": unreadable DICOM" if is_dicom(path) else " is not an image this app can read (PNG, JPEG or DICOM)"
        raise ExplorerError(f"{path.name}{what} ({type(err).__name__}: {err})") from err


# -- the analysis ---------------------------------------------------------------------------------
@dataclass
class Token:
    """One answer token: its text, id, probability under the model, and the top alternatives."""

    text: str
    id: int
    prob: float
    top: list[tuple[str, float]]


@dataclass
class Analysis:
    """Everything the page shows for one (variant, image, question)."""

    variant: str
    question: str
    answer: str
    tokens: list[Token]
    image: np.ndarray  # uint8 HxWx3 at the model's input resolution
    grid: tuple[int, int]
    n_layers: int
    n_heads: int
    maps: dict[str, np.ndarray]
    scores: dict[str, dict[str, Any]]
    top_heads: list[dict[str, Any]]  # by the paper's head importance (eq. 6), each with its image-only score
    lens: LogitLens | None
    timings: dict[str, float]
    errors: dict[str, str] = field(default_factory=dict)
    positions: list[int] = field(default_factory=list)
    attn: Cache | None = None  # attention rows of every layer and head at ``positions``
    mean_attn: Cache | None = None  # head-mean rows of every layer at every position (rollout)
    mask: np.ndarray | None = None
    skipped: dict[str, str] = field(default_factory=dict)  # methods left for on demand, with why
    example: Example | None = None
    image_top_heads: list[dict[str, Any]] = field(default_factory=list)  # by the image-position sum
    #: the top multimodal neurons of the explained token (layer, unit, score, decoded tokens)
    top_neurons: list[dict[str, Any]] = field(default_factory=list)

    def attention(self, token: int | None = None, layer: int | None = None, head: int | None = None,
                  fusion: str = "mean") -> np.ndarray:
        """Response tokens (or one, by index into :attr:`tokens`) → image patches."""
        if self.attn is None:
            raise ExplorerError(self.errors.get("attention", "attention was not captured"))
        return attention_map(self.attn, self._positions(token), layer=layer, head=head,
                             layers=None if layer is not None else last_quarter(self.n_layers), fusion=fusion)

    def rollout(self, token: int | None = None) -> np.ndarray:
        if self.mean_attn is None:
            raise ExplorerError(self.errors.get("rollout", "attention was not captured"))
        return rollout(self.mean_attn, self._positions(token))

    def patch_to_tokens(self, row: int, col: int, layer: int | None = None, head: int | None = None,
                        fusion: str = "mean") -> list[tuple[str, float]]:
        """The reverse reading: how much each response token attends to image patch (row, col)."""
        if self.attn is None:
            raise ExplorerError(self.errors.get("attention", "attention was not captured"))
        weights = image_to_response(self.attn, (row, col), self.positions, layer=layer, head=head,
                                    layers=None if layer is not None else last_quarter(self.n_layers),
                                    fusion=fusion)
        return [(t.text, float(w)) for t, w in zip(self.tokens, weights, strict=True)]

    def _positions(self, token: int | None) -> list[int]:
        if token is None:
            return self.positions
        if not 0 <= token < len(self.positions):
            raise ExplorerError(f"token {token} out of range: the answer has {len(self.positions)} tokens")
        return [self.positions[token]]

    def numbers(self) -> dict[str, Any]:
        """A JSON-ready summary: answer, token probabilities, maps, scores, top heads, timings."""
        return {"variant": self.variant, "question": self.question, "answer": self.answer,
                "tokens": [{"text": t.text, "id": t.id, "prob": t.prob, "top": t.top} for t in self.tokens],
                "grid": list(self.grid), "maps": {k: v.tolist() for k, v in self.maps.items()},
                "scores": self.scores, "top_heads": self.top_heads, "image_top_heads": self.image_top_heads,
                "top_neurons": self.top_neurons,
                "errors": self.errors,
                "seconds": self.timings}


def _token_table(processor, ex: Example, logits: torch.Tensor, k: int = 5) -> list[Token]:
    """``logits``: [explained positions, vocab]. One row per explained position: the answer token there (or, without an answer, the model's
    prediction at the last position), its probability and the top-``k`` alternatives."""
    tok = processor.tokenizer
    probs = torch.softmax(logits.float(), -1)  # [explained positions, vocab]
    ids = ex.target_ids or [int(row.argmax()) for row in probs]
    out = []
    for row, tid in zip(probs, ids, strict=True):
        top = row.topk(k)
        out.append(Token(tok.decode([tid]), int(tid), float(row[tid]),
                         [(tok.decode([int(i)]), float(p)) for p, i in zip(top.values, top.indices, strict=True)]))
    return out


def _generate(model, processor, family, image: Image.Image, question: str, max_new_tokens: int) -> str:
    return generate_answers(model, processor, family, [image], [question], batch_size=1,
                            max_new_tokens=max_new_tokens, resized=False, progress=False)[0]


def analyze(em: ExplorerModel, variant: str, image: Image.Image | np.ndarray, question: str, *,
            mask: np.ndarray | None = None, max_new_tokens: int = 16, methods: Sequence[str] | None = None,
            budget_s: float | None = None, progress: Callable[[float, str], None] | None = None) -> Analysis:
    """Answer ``question`` about ``image`` with ``variant`` and run the saliency methods on it.

    ``methods``: registered method names (default all). ``budget_s``: seconds the methods may take
    after the shared pass; a method whose estimated cost (its declared operations on this
    example's shape, timed against the shared pass) would overrun what is left is skipped and
    listed in ``skipped`` with the reason, to be computed on demand with :func:`compute_method`.
    ``mask`` (bool HxW, any size), when known, adds ROI mass and the pointing game to each
    method's scores. ``progress(fraction, text)`` is called between steps. A method that fails is
    reported in ``errors`` and the others still run.
    """
    question = (question or "").strip()
    if not question:
        raise ExplorerError("type a question")
    step = progress or (lambda f, t: None)
    timings: dict[str, float] = {}
    errors: dict[str, str] = {}
    skipped: dict[str, str] = {}
    pil = read_any_image(image)
    chosen = registered(methods)
    with em.use(variant) as model:
        family, processor = em.family, em.processor
        t0 = time.perf_counter()
        step(0.05, "generating the answer")
        answer = _generate(model, processor, family, pil, question, max_new_tokens)
        timings["generate"] = time.perf_counter() - t0
        try:
            ex = prepare_example(model, processor, family, pil, question, answer or None)
        except ValueError as err:
            if answer:  # an answer that tokenises to nothing: explain the next-token prediction
                ex = prepare_example(model, processor, family, pil, question)
            else:
                raise ExplorerError(str(err)) from err
        step(0.15, "the shared pass: attention and residual stream")
        t = time.perf_counter()
        attn_cache = None
        try:  # every layer's and head's attention rows at the answer positions (the page's controls)
            _, attn_cache = capture(model, family, ex.inputs, query_positions=ex.target_positions,
                                    logits_positions=[-1])  # the logits are not read
        except AttentionNotEagerError as err:  # no eager attention: the other methods still run
            errors.update({m.name: str(err) for m in chosen if m.eager})
            chosen = [m for m in chosen if not m.eager]
        kinds = {k for m in chosen for k in m.shared} | {"hidden_states"}
        ctx = Context(model, processor, family, ex, kinds=kinds)
        tokens = _token_table(processor, ex, ctx.logits)
        timings["shared pass"] = shared = time.perf_counter() - t
        shape = Shape.of(model, family, ex)
        per_flop = shared / shape.forward_flops(logits_at=shape.seq_len)
        results, spent = {}, 0.0
        for k, method in enumerate(chosen):
            estimate = method.cost(shape) * per_flop
            if budget_s is not None and spent + estimate > budget_s:
                skipped[method.name] = (f"estimated {estimate:.1f}s, {max(budget_s - spent, 0):.1f}s of the "
                                        f"{budget_s:.0f}s budget left: compute it on demand")
                continue
            step(0.25 + 0.7 * k / max(len(chosen), 1), method.title)
            t = time.perf_counter()
            try:
                results[method.name] = method.run(ctx)
            except (RuntimeError, ValueError, KeyError) as err:
                errors[method.name] = str(err)
            timings[method.name] = time.perf_counter() - t
            spent += timings[method.name]
        mean_cache = ctx.cache if "attention_mean" in kinds else None
    maps = {name: r.map for name, r in results.items()}
    grid = ex.span.grid
    timings["total"] = time.perf_counter() - t0
    heads = results["logprob"].row if "logprob" in results else {}
    return Analysis(variant, question, answer, tokens, ex.image, grid, em.n_layers, em.n_heads, maps,
                    {name: score_map(grid_map, mask) for name, grid_map in maps.items()},
                    heads.get("top_heads", []),
                    results["logit_lens"].data if "logit_lens" in results else None, timings, errors,
                    list(ex.target_positions), attn_cache, mean_cache, mask, skipped, ex,
                    heads.get("image_top_heads", []),
                    results["neuron"].row["top_neurons"] if "neuron" in results else [])


def compute_method(em: ExplorerModel, analysis: Analysis, name: str) -> Analysis:
    """Compute one method of ``analysis`` that was skipped (or not asked for), on demand."""
    if analysis.example is None:
        raise ExplorerError("this analysis kept no example to compute more maps on")
    method = get_method(name)
    with em.use(analysis.variant) as model:
        ctx = Context(model, em.processor, em.family, analysis.example, kinds=method.shared)
        t = time.perf_counter()
        try:
            result = method.run(ctx)
        except (RuntimeError, ValueError, KeyError) as err:
            analysis.errors[name] = str(err)
            return analysis
        analysis.timings[name] = time.perf_counter() - t
    analysis.maps[name] = result.map
    analysis.maps = {m: analysis.maps[m] for m in method_names() if m in analysis.maps}
    analysis.scores[name] = score_map(result.map, analysis.mask)
    analysis.skipped.pop(name, None)
    if name == "logprob":
        analysis.top_heads, analysis.image_top_heads = result.row["top_heads"], result.row["image_top_heads"]
    if name == "logit_lens":
        analysis.lens = result.data
    if name == "neuron":
        analysis.top_neurons = result.row["top_neurons"]
    return analysis


# -- pictures and files ---------------------------------------------------------------------------
def display_image(image: np.ndarray) -> Image.Image:
    """The model-resolution image enlarged (nearest) to at least :data:`MIN_DISPLAY` pixels."""
    return enlarge(np.asarray(image, np.uint8), MIN_DISPLAY)


def draw_overlay(image: np.ndarray, grid_map: np.ndarray, alpha: float = 0.5,
                 mask: np.ndarray | None = None) -> Image.Image:
    """The map (positive part, min-max scaled) over the enlarged image; the lesion outlined when
    its ``mask`` is known."""
    return overlay(display_image(image), np.clip(np.asarray(grid_map, float), 0.0, None), alpha=alpha,
                   outline=mask)


def overlays(analysis: Analysis, alpha: float = 0.5) -> dict[str, Image.Image]:
    """One overlay per method that produced a map, in the registry's order."""
    return {name: draw_overlay(analysis.image, grid_map, alpha, analysis.mask)
            for name, grid_map in analysis.maps.items()}


def patch_of(x: float, y: float, size: tuple[int, int], grid: tuple[int, int]) -> tuple[int, int]:
    """The (row, col) of the grid cell under pixel (x, y) of an image of ``size`` (width, height)."""
    col = min(int(x * grid[1] / size[0]), grid[1] - 1)
    row = min(int(y * grid[0] / size[1]), grid[0] - 1)
    return max(row, 0), max(col, 0)


def lens_page(analysis: Analysis) -> str:
    """The self-contained logit-lens page (all text escaped)."""
    if analysis.lens is None:
        raise ExplorerError("the logit lens did not run")
    return lens_html(analysis.lens, np.asarray(display_image(analysis.image)), analysis.question,
                     title=f"Logit lens: {analysis.variant}")


def export(analyses: Sequence[Analysis], out_dir: str | Path) -> list[Path]:
    """Write each analysis's overlays (PNG), logit-lens page (HTML) and one ``numbers.json``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for i, a in enumerate(analyses):
        tag = "".join(c if c.isalnum() else "_" for c in a.variant).strip("_") or f"variant{i}"
        for name, grid_map in a.maps.items():  # the same pictures as the page, written atomically
            files.append(save_overlay(out_dir / f"{tag}_{name}.png", display_image(a.image),
                                      np.clip(np.asarray(grid_map, float), 0.0, None), outline=a.mask))
        if a.lens is not None:
            files.append(atomic_write_text(out_dir / f"{tag}_logit_lens.html", lens_page(a)))
    files.append(atomic_write_json(out_dir / "numbers.json", {"analyses": [a.numbers() for a in analyses]}))
    return files


def check_fusion(fusion: str) -> str:
    if fusion not in FUSIONS:
        raise ExplorerError(f"fusion {fusion!r}; choose one of {FUSIONS}")
    return fusion
