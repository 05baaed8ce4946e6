"""The model-family seam: everything model-specific sits behind :class:`ModelFamily`.

Training, eval and diagnostics call these methods and never branch on the family or guess the
model's structure. Adding a family (MedGemma, Qwen2.5-VL ...) is one new file that subclasses
``ModelFamily``, plus one line in :mod:`medvlm.models.families`; the family contract test
(``tests/models/test_family_contract.py``) then runs over it.

What a family says about its models:

- **the processor**: how a checkpoint's processor is loaded, with the image settings a config may
  override (``min_pixels`` / ``max_pixels`` of dynamic-resolution families; :meth:`load_processor`);
- **inputs**: how images are prepared once for its processor (:meth:`prepare_images`, a fixed
  resolution by default) and fingerprinted for the on-disk cache (:meth:`image_settings`); how a
  training batch is built and which labels are masked (:meth:`train_batch`); how a generation
  batch is built (:meth:`generation_batch`, left-padded) and which tokens end an answer
  (:meth:`stop_token_ids`); where the image tokens are and their
  grid, read from the actual inputs (:meth:`image_spans`);
- **structure**: the decoder layers, each layer's attention module and how its output enters the
  residual stream (:meth:`attention_residual`), the head layout, the final
  norm, the unembedding with any logit soft-capping (:meth:`lens_logits`), whether attention
  weights are returned (:meth:`check_eager`), the vision layer the projector reads, the order of
  its rows when the tower reorders patches, and the token grid Grad-CAM maps onto
  (:meth:`gradcam_layer`, :meth:`gradcam_order`, :meth:`gradcam_map`);
- **LoRA**: target names per tower and per preset (:attr:`lora_presets`), parameters LoRA cannot
  reach (:meth:`bare_parameters`), and which tower a parameter belongs to;
- **the embedded default**: a tiny model of the real class with its real processor class
  (:meth:`tiny_model`);
- **real shapes**: the public configurations of the checkpoints users fine-tune
  (:attr:`real_shapes`) and a model of each with its towers cut to a few layers
  (:meth:`real_shape_model`), which the real-shape test tier (``tests/test_real_shape.py``) and
  ``benchmarks/real_shape.py`` build for every registered family.

Canonical parts (names used across medvlm), each a dotted path in the HF module tree::

    vision_tower      the image encoder (SigLIP / CLIP)            [batch, patches, d_vision]
    projector         image features → language embedding space    [batch, patches, d_model]
    language_model    the decoder stack (embed_tokens, layers, norm)
    lm_head           the unembedding                               [batch, pos, vocab]
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import AutoProcessor, BatchFeature, PreTrainedModel, ProcessorMixin

from medvlm.models.tokenizer import build_tokenizer

IGNORE_INDEX = -100
TOWERS = ("vision", "projector", "language")

#: SigLIP / CLIP vision towers and Llama / Gemma decoders: the LoRA target names per tower, per
#: preset. "paper" reproduces the seed paper's list (q, k, v, o, up, down projections on both
#: towers): on SigLIP/CLIP only q/k/v match, since their attention output is ``out_proj`` and their
#: MLP is ``fc1``/``fc2``. "full" adds those so the vision tower is covered fully, and the
#: projector's linear layers. A family whose modules are named otherwise sets its own.
SIGLIP_LLAMA_LORA_PRESETS: dict[str, dict[str, Any]] = {
    "paper": {
        "r": 12, "alpha": 32,
        "names": {"vision": ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
                  "projector": [],
                  "language": ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]},
    },
    "full": {
        "r": 12, "alpha": 32,
        "names": {"vision": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
                  "projector": ["linear", "linear_1", "linear_2"],
                  "language": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                               "down_proj"]},
    },
}

#: Processor keywords for images that :meth:`ModelFamily.prepare_images` already brought to the
#: model's input resolution: only rescaling and normalisation remain.
PREPARED = {"do_resize": False, "do_center_crop": False}


class AttentionNotEagerError(RuntimeError):
    """The model's attention returns no weights (sdpa / flash); diagnostics need eager attention."""


EAGER_FIX = ("load the model with attn_implementation='eager' (load_model_and_processor(..., "
             "attn_implementation='eager')) or call model.set_attn_implementation('eager')")


@dataclass
class ImageSpan:
    """Where one image's tokens sit in one sequence, and their grid (rows, cols)."""

    start: int
    end: int  # exclusive
    grid: tuple[int, int]


@dataclass
class TinySizes:
    """Widths, depths and resolution of a tiny model of a family (tests, the embedded demo)."""

    image_size: int = 64
    patch_size: int = 16
    vision_hidden: int = 96
    vision_layers: int = 3
    vision_heads: int = 4
    text_hidden: int = 128
    text_layers: int = 3
    text_heads: int = 4
    seed: int = 0


def text_config(model: torch.nn.Module):
    """The language model's config (the composite config's text part)."""
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class ModelFamily:
    """One family of vision-language models (PaliGemma, LLaVA ...)."""

    name: str = ""
    model_class: type[PreTrainedModel]
    #: ``model_type`` values of ``config.json`` this family handles
    model_types: tuple[str, ...] = ()
    #: dotted module paths of the canonical parts (see module docstring)
    parts: dict[str, str] = {
        "vision_tower": "model.vision_tower",
        "projector": "model.multi_modal_projector",
        "language_model": "model.language_model",
        "lm_head": "lm_head",
    }
    lora_presets: dict[str, dict[str, Any]] = SIGLIP_LLAMA_LORA_PRESETS
    #: Share of the tiny demo base's language pre-training (:func:`medvlm.demo.pretrain.pretrain`)
    #: during which the vision tower and projector, pre-trained just before, are held still (learning
    #: rate 0) while the randomly initialised language model learns to read them. 0: trained from
    #: the first step; 1: held for the whole language pre-training.
    tiny_vision_frozen_share: float = 0.0
    #: Steps of the tiny demo base's supervised vision-tower pre-training
    #: (:func:`medvlm.demo.pretrain.pretrain_vision`, batch 32). Families whose tower is dearer per
    #: step take fewer: the demo is timed end to end on a 2-core CPU.
    tiny_vision_pretrain_steps: int = 3000

    #: checkpoint name → the public ``config.json`` values :meth:`real_shape_model` builds from
    #: (widths, heads, vocabulary, image size, projector reading); empty: the family has no
    #: real-shape models yet, and the real-shape tier says so instead of testing it
    real_shapes: dict[str, dict[str, Any]] = {}

    # -- the processor --------------------------------------------------------------------------
    def load_processor(self, path: str, **image_settings: int) -> ProcessorMixin:
        """The processor of a checkpoint (hub id or folder). ``image_settings`` (``min_pixels``,
        ``max_pixels`` of dynamic-resolution families, ``do_pan_and_scan`` of Gemma 3) override its
        processor config; a family they do not apply to refuses them rather than ignore them."""
        if image_settings:
            raise ValueError(f"{', '.join(sorted(image_settings))} set, but the {self.name} family resizes every "
                             "image to its fixed input size; min_pixels / max_pixels apply to dynamic-resolution "
                             "families (Qwen2.5-VL), do_pan_and_scan to Gemma 3 (MedGemma). Remove them from "
                             "the config")
        return AutoProcessor.from_pretrained(path)

    # -- inputs ---------------------------------------------------------------------------------
    @staticmethod
    def _conversation(question: str, answer: str | None = None) -> list[dict]:
        """One image and the question as the user's turn (and the answer as the assistant's): the
        message list chat-template families (LLaVA, Gemma 3, Qwen2.5-VL) render."""
        conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        if answer is not None:
            conv.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        return conv

    def train_batch(self, processor: ProcessorMixin, images: list, questions: list[str],
                    answers: list[str], *, prepared: bool = False) -> BatchFeature:
        """Right-padded training batch with ``labels`` (IGNORE_INDEX on image, prompt, padding).
        ``prepared``: the images come from :meth:`prepare_images` (no resizing left to do)."""
        raise NotImplementedError

    def generation_batch(self, processor: ProcessorMixin, images: list, questions: list[str], *,
                         prepared: bool = False) -> BatchFeature:
        """Left-padded generation batch ending where the answer starts."""
        raise NotImplementedError

    def stop_token_ids(self, processor: ProcessorMixin) -> list[int]:
        """The tokens that end an answer: generation stops at any of them, and the diagnostics do
        not score them as answer tokens. Default: the tokenizer's end-of-sequence token (a chat
        format that closes the turn with its own token, such as Gemma's ``<end_of_turn>``, adds it)."""
        return [processor.tokenizer.eos_token_id]

    def processor_kwargs(self, prepared: bool) -> dict[str, Any]:
        """Extra processor keywords for images already prepared by :meth:`prepare_images`."""
        return dict(PREPARED) if prepared else {}

    def prepare_images(self, processor: ProcessorMixin, images: Sequence[Any]) -> list[np.ndarray]:
        """Each PIL image resized (and cropped) the way the processor would, without rescaling or
        normalising: uint8 HxWx3 arrays at the model's input resolution. Done once per image (the
        on-disk image cache holds them), so a training step only rescales and normalises."""
        out = processor.image_processor(list(images), do_rescale=False, do_normalize=False,
                                        return_tensors="np")["pixel_values"]
        arr = np.asarray(out)
        if arr.shape[1] == 3:  # channels first → last
            arr = arr.transpose(0, 2, 3, 1)
        return list(np.clip(arr.round(), 0, 255).astype(np.uint8))

    def image_settings(self, processor: ProcessorMixin) -> dict[str, Any]:
        """What decides the prepared form of an image (the image cache's fingerprint)."""
        settings = processor.image_processor.to_dict()
        return {k: v for k, v in settings.items() if not k.startswith("image_") and k != "processor_class"}

    def input_size(self, model: torch.nn.Module) -> tuple[int, int] | None:
        """(height, width) in pixels of a prepared image, or None when it varies per image."""
        size = int(model.config.vision_config.image_size)
        return size, size

    def image_grid(self, model: torch.nn.Module) -> tuple[int, int]:
        """Token grid of one image for fixed-resolution families, from the vision config."""
        vc = model.config.vision_config
        side = vc.image_size // vc.patch_size
        return side, side

    def image_token_id(self, model: torch.nn.Module) -> int:
        cfg = model.config
        return int(getattr(cfg, "image_token_id", None) or cfg.image_token_index)

    def image_spans(self, model: torch.nn.Module, inputs: Mapping[str, torch.Tensor]) -> list[ImageSpan]:
        """The image-token span of each sequence of a batch (one image per sequence), its grid
        read from the inputs; raises when a sequence holds no image or a broken span."""
        return [self.image_span(model, row, inputs, i) for i, row in enumerate(inputs["input_ids"])]

    def image_span(self, model: torch.nn.Module, input_ids: torch.Tensor,
                   inputs: Mapping[str, torch.Tensor] | None = None, row: int = 0) -> ImageSpan:
        """Image-token span in one sequence (1-D ids), checked against the grid."""
        pos = (input_ids == self.image_token_id(model)).nonzero().flatten()
        if pos.numel() == 0:
            raise ValueError("the sequence holds no image tokens; pass the image through the processor")
        start, end = int(pos[0]), int(pos[-1]) + 1
        rows, cols = self.span_grid(model, inputs, row)
        if end - start != rows * cols or pos.numel() != rows * cols:
            raise ValueError(f"found {pos.numel()} image tokens at {start}..{end}, expected a contiguous "
                             f"{rows}x{cols} grid")
        return ImageSpan(start, end, (rows, cols))

    def span_grid(self, model: torch.nn.Module, inputs: Mapping[str, torch.Tensor] | None,
                  row: int) -> tuple[int, int]:
        """The token grid of the image of batch row ``row`` (fixed families: the config's grid)."""
        return self.image_grid(model)

    def check_pixels(self, model: torch.nn.Module, inputs: Mapping[str, Any]) -> None:
        """Pixel values shaped as this family's processor makes them."""
        px = inputs.get("pixel_values")
        if px is None:
            return
        size = self.input_size(model)
        if px.ndim != 4 or px.shape[1] != 3 or (size is not None and tuple(px.shape[-2:]) != size):
            want = f"[batch, 3, {size[0]}, {size[1]}]" if size else "[batch, 3, H, W]"
            raise ValueError(f"pixel_values has shape {tuple(px.shape)}; expected {want} as the processor makes "
                             "it (pass the image through prepare_example)")

    def occluded_batch(self, inputs: Mapping[str, torch.Tensor], span: ImageSpan,
                       cells: Sequence[tuple[int, int]], block: int) -> dict[str, torch.Tensor]:
        """``len(cells)`` copies of a one-example batch, copy i with the ``block``×``block`` cells
        from ``cells[i]`` (row, col of the token grid) replaced by the image's per-channel mean in
        the processor's normalised space (occlusion saliency)."""
        px = inputs["pixel_values"]
        rows, cols = span.grid
        ph, pw = px.shape[-2] // rows, px.shape[-1] // cols
        fill = px.mean(dim=(-2, -1), keepdim=True)[0]  # [C, 1, 1]
        occluded = px.repeat(len(cells), 1, 1, 1)
        for i, (r, c) in enumerate(cells):
            occluded[i, :, r * ph:(r + block) * ph, c * pw:(c + block) * pw] = fill
        return {k: (occluded if k == "pixel_values" else v.expand(len(cells), *v.shape[1:]))
                for k, v in inputs.items()}

    def repeat_inputs(self, inputs: Mapping[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
        """``n`` copies of a one-example batch, as the processor would batch them (batch-first
        tensors: a view, no copy). A family whose pixels are not batch-first overrides it."""
        return {k: v.expand(n, *v.shape[1:]) for k, v in inputs.items()}

    def model_inputs(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The processor's outputs that the model's forward takes (labels kept when present)."""
        return {k: v for k, v in batch.items() if k not in ("num_crops",)}

    # -- structure ------------------------------------------------------------------------------
    def get_part(self, model: torch.nn.Module, part: str) -> torch.nn.Module:
        obj = unwrap(model)
        for attr in self.parts[part].split("."):
            obj = getattr(obj, attr)
        return obj

    def decoder_layers(self, model: torch.nn.Module) -> torch.nn.ModuleList:
        return self.get_part(model, "language_model").layers

    def attention_module(self, layer: torch.nn.Module) -> torch.nn.Module:
        """The self-attention block of one decoder layer (its ``o_proj`` takes the heads' outputs,
        its forward returns ``(output, weights)``)."""
        return layer.self_attn

    def attention_residual(self, model: torch.nn.Module, layer: int, parts: torch.Tensor,
                           attn_out: torch.Tensor | None) -> torch.Tensor:
        """What parts [..., D] of one position's attention output ``attn_out`` [D] (its ``o_proj``
        output, bias included; None when not every head was captured) add to the residual stream of
        decoder layer ``layer``. Default: the parts themselves (the layer adds its attention output
        as it is). A layer that normalises the attention output first scales them by that norm's
        factor at this position, so they still sum to what the layer adds."""
        return parts

    def mlp_down(self, layer: torch.nn.Module) -> torch.nn.Module:
        """The module of one decoder layer whose INPUT holds the MLP units' activations [..., d_mlp]
        (the neuron diagnostics hook and scale it) and whose weight maps them back to the residual
        stream: Llama / Gemma / Qwen decoders' ``mlp.down_proj``."""
        return layer.mlp.down_proj

    def mlp_output_gain(self, model: torch.nn.Module, layer: int) -> torch.Tensor | None:
        """The per-dimension gain [D] (float32) of a norm that decoder layer ``layer`` applies to its MLP
        output before adding it to the residual stream (Gemma 2 / 3's ``post_feedforward_layernorm``),
        or None: the layer adds the MLP output as it is (Llama, Gemma 1, Qwen). The norm's per-position
        1 / RMS is not part of it (a positive factor shared by every unit at a position)."""
        return None

    def head_layout(self, model: torch.nn.Module) -> tuple[int, int, int]:
        """(n_heads, n_kv_heads, head_dim) of the language model."""
        tc = text_config(model)
        n_heads = int(tc.num_attention_heads)
        n_kv = int(getattr(tc, "num_key_value_heads", None) or n_heads)
        head_dim = int(getattr(tc, "head_dim", None) or tc.hidden_size // n_heads)
        return n_heads, n_kv, head_dim

    def dimensions(self, model: torch.nn.Module) -> dict[str, int]:
        """Widths a cost or memory estimate needs: ``d_model``, ``d_mlp``, ``vocab`` (language model),
        ``d_vision``, ``d_vision_mlp`` and ``vision_heads`` (vision tower; SigLIP / CLIP name them
        ``intermediate_size`` and ``num_attention_heads``, Qwen2.5-VL's tower ``num_heads``)."""
        tc = text_config(model)
        vc = getattr(model.config, "vision_config", None)
        d_vision = int(getattr(vc, "hidden_size", 0) or 0)
        heads = getattr(vc, "num_attention_heads", None) or getattr(vc, "num_heads", None)
        return {"d_model": int(tc.hidden_size), "d_mlp": int(getattr(tc, "intermediate_size", 4 * tc.hidden_size)),
                "vocab": int(tc.vocab_size), "d_vision": d_vision,
                "d_vision_mlp": int(getattr(vc, "intermediate_size", 0) or 4 * d_vision),
                "vision_heads": int(heads or max(1, d_vision // 64))}

    def vision_tokens(self, model: torch.nn.Module, inputs: Mapping[str, torch.Tensor]) -> int:
        """Tokens the vision tower processes for the batch's first image (its patches)."""
        px = inputs.get("pixel_values")
        patch = int(model.config.vision_config.patch_size)
        return 0 if px is None else int(px.shape[-2] * px.shape[-1] // patch**2)

    def max_length(self, model: torch.nn.Module) -> int | None:
        limit = getattr(text_config(model), "max_position_embeddings", None)
        return None if limit is None else int(limit)

    def check_eager(self, model: torch.nn.Module) -> None:
        """Raise :class:`AttentionNotEagerError` unless the language model returns attention weights."""
        base = unwrap(model)
        impl = getattr(text_config(base), "_attn_implementation", None) or base.config._attn_implementation
        if impl not in (None, "eager"):
            raise AttentionNotEagerError(f"the language model uses attn_implementation={impl!r}, which returns "
                                         f"no attention weights; {EAGER_FIX}")

    def final_norm(self, model: torch.nn.Module) -> torch.nn.Module:
        return self.get_part(model, "language_model").norm

    def final_norm_gain(self, model: torch.nn.Module) -> torch.Tensor:
        """The per-dimension gain γ [D] (float32) of the final norm, read as its output for a large
        constant input: an RMS norm gives γ · c / sqrt(c² + eps) = γ to float precision (Llama's
        ``weight``, Gemma's ``1 + weight``). A family whose final norm centres its input (LayerNorm)
        overrides this."""
        norm = self.final_norm(model)
        width = int(text_config(model).hidden_size)
        param = next(norm.parameters(), None)
        ones = torch.full((1, width), 1e3, dtype=param.dtype if param is not None else torch.float32,
                          device=param.device if param is not None else None)
        with torch.no_grad():
            return norm(ones)[0].float()

    def unembed(self, model: torch.nn.Module) -> torch.nn.Module:
        return self.get_part(model, "lm_head")

    def logit_softcap(self, model: torch.nn.Module) -> float | None:
        """The final-logit soft-capping of the config (Gemma 2: tanh(z / cap) · cap), or None."""
        cap = getattr(text_config(model), "final_logit_softcapping", None)
        return float(cap) if cap else None

    def frozen_final_norm(self, model: torch.nn.Module, resid: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """The final norm of ``resid`` [..., D] with its normalising statistic taken from ``reference``
        ([..., D], broadcast) instead of from each vector: for an RMS norm g ⊙ x / rms_eps(ref).

        Yu & Ananiadou read a candidate vector this way (zepingyu0512/llava-mechanism @ dd4ed00,
        Llava_visualize_code.ipynb, ``get_bsvalues``: ``vector * rsqrt(final_var + eps) * norm.weight``
        with ``final_var`` the mean square of the last layer's output at the last position): the
        readout is then linear in the vector. Computed as norm(x) · rms_eps(x) / rms_eps(ref), so
        the norm module's own gain convention (Llama's g, Gemma's 1 + g) is kept. A family whose
        final norm is not an RMS norm with an epsilon overrides this."""
        norm = self.final_norm(model)
        eps = next((getattr(norm, a) for a in ("variance_epsilon", "eps") if getattr(norm, a, None) is not None), None)
        if eps is None or "rmsnorm" not in type(norm).__name__.lower():
            raise NotImplementedError(f"{type(self).__name__}: the final norm {type(norm).__name__} is not an RMS "
                                      "norm with an epsilon; override ModelFamily.frozen_final_norm for it")

        def rms(t: torch.Tensor) -> torch.Tensor:
            return t.float().pow(2).mean(-1, keepdim=True).add(float(eps)).sqrt()

        return norm(resid).float() * rms(resid) / rms(reference)

    def lens_logits(self, model: torch.nn.Module, resid: torch.Tensor,
                    reference: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (float32) the model would give residual vectors [..., D]: final norm, unembedding
        and the final-logit soft-capping when the config sets it, as the model's own head does.
        ``reference``: hold the final norm's statistic at this residual's (see :meth:`frozen_final_norm`)
        instead of recomputing it per vector."""
        head = self.unembed(model)
        x = resid.to(head.weight.dtype)
        normed = self.final_norm(model)(x) if reference is None else self.frozen_final_norm(model, x, reference)
        logits = head(normed.to(head.weight.dtype))
        cap = self.logit_softcap(model)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits.float()

    def vision_layers(self, model: torch.nn.Module) -> torch.nn.ModuleList:
        """The encoder layers of the vision tower."""
        return self.get_part(model, "vision_tower").encoder.layers

    def vision_feature_layer(self, model: torch.nn.Module) -> int:
        """Index into :meth:`vision_layers` of the layer whose output the projector reads."""
        return -1

    def gradcam_layer(self, model: torch.nn.Module) -> torch.nn.Module:
        """The vision layer Grad-CAM hooks: the one whose output the projector reads."""
        return self.vision_layers(model)[self.vision_feature_layer(model)]

    def gradcam_order(self, model: torch.nn.Module, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        """Indices that put the rows of :meth:`gradcam_layer`'s output (the tokens axis) in the order
        the processor emitted the patches, for towers that reorder patches inside (Qwen2.5-VL's
        window attention); None: they are in order already."""
        return None

    def gradcam_map(self, acts: torch.Tensor, grads: torch.Tensor, span: ImageSpan,
                    inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Grad-CAM on the span's grid from the hooked layer's output and its gradient
        ([batch, tokens, C] each, rows in :meth:`gradcam_order`): α_c = mean over patches of the
        gradient, map = ReLU(Σ_c α_c A).
        Default: the last rows·cols tokens are the patches (CLIP's class token comes first)."""
        n = span.grid[0] * span.grid[1]
        a, g = acts[0, -n:].float(), grads[0, -n:].float()
        return torch.relu(a @ g.mean(0)).reshape(span.grid)

    # -- LoRA -----------------------------------------------------------------------------------
    def lora_target_regex(self, towers: Sequence[str], names: dict[str, list[str]]) -> str:
        """A regex that peft full-matches against module names, one alternative per tower."""
        unknown = set(towers) - set(TOWERS)
        if unknown:
            raise ValueError(f"unknown LoRA towers {sorted(unknown)}; expected a subset of {TOWERS}")
        key = {"vision": "vision_tower", "projector": "projector", "language": "language_model"}
        alts = []
        for tower in towers:
            tower_names = names.get(tower) or []
            if not tower_names:
                continue
            prefix = re.escape(self.parts[key[tower]])
            alts.append(rf"{prefix}\.(?:.*\.)?(?:{'|'.join(map(re.escape, tower_names))})")
        if not alts:
            raise ValueError(f"no LoRA target names for towers {list(towers)}")
        return rf"^(?:base_model\.model\.)?(?:{'|'.join(alts)})$"

    def bare_parameters(self) -> dict[str, tuple[str, str]]:
        """Modules whose parameters no LoRA target can reach (a projector that is a bare weight):
        ``{module name: (tower, why)}``. When ``lora_towers`` names the tower, the module is trained
        fully instead (peft's ``modules_to_save``)."""
        return {}

    def tower_of(self, param_name: str) -> str:
        """Which tower a parameter belongs to (for per-tower trainable counts)."""
        for tower, part in (("vision", "vision_tower"), ("projector", "projector"),
                            ("language", "language_model"), ("lm_head", "lm_head")):
            if f"{self.parts[part]}." in param_name or param_name.startswith(self.parts[part]):
                return tower
        return "other"

    # -- the embedded default -------------------------------------------------------------------
    def image_features(self, model: torch.nn.Module, processor: ProcessorMixin,
                       images: Sequence[np.ndarray]) -> tuple[torch.Tensor, tuple[int, int]]:
        """Projected image-token features of prepared images, ``[batch, tokens, d_model]`` in the
        order the tokens take in a sequence, and their grid (rows, cols): what the demo's vision
        pre-training trains its per-token heads on."""
        pixels = processor.image_processor(list(images), return_tensors="pt",
                                           **self.processor_kwargs(prepared=True))["pixel_values"]
        feats = model.get_image_features(pixel_values=pixels).pooler_output
        feats = torch.stack(list(feats)) if isinstance(feats, (list, tuple)) else feats
        return feats, self.image_grid(model)

    def tiny_tokenizer(self, corpus: list[str], vocab_size: int):
        """A tokenizer for the family's tiny model, trained on ``corpus``, with the special tokens its
        processor and chat template need (default: pad, eos, bos, unk and ``<image>``)."""
        return build_tokenizer(corpus, vocab_size)

    def real_shape_model(self, name: str, tokenizer, layers: int = 2) -> tuple[PreTrainedModel, ProcessorMixin]:
        """``(model, processor)`` of the real checkpoint ``name`` (a key of :attr:`real_shapes`): its
        real class and processor class, widths, heads, vocabulary, image resolution and the layer
        the projector reads, each tower cut to ``layers`` layers (more where a real setting needs
        them, e.g. a penultimate feature layer), random weights, float32; ``tokenizer`` is the
        family's tiny tokenizer (:meth:`tiny_tokenizer`)."""
        raise NotImplementedError(f"{type(self).__name__} lists real shapes {sorted(self.real_shapes)} but does not "
                                  "build them; define real_shape_model(name, tokenizer, layers=2)")

    def tiny_model(self, sizes: TinySizes, tokenizer) -> tuple[PreTrainedModel, ProcessorMixin]:
        """A tiny model of the family's real class with random weights and its real processor
        class, the tokenizer given (built locally), at ``sizes``."""
        raise NotImplementedError
