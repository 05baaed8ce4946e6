"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``): a window-attention ViT, a 2×2 patch merger, Qwen2.5.

HF module tree (transformers 5)::

    Qwen2_5_VLForConditionalGeneration
    ├── model                         Qwen2_5_VLModel
    │   ├── visual                    Qwen2_5_VisionTransformerPretrainedModel  (the vision tower)
    │   │   ├── patch_embed           Conv3d over (2 frames, 14, 14) patches
    │   │   ├── blocks.N              attn.{qkv, proj}, mlp.{gate,up,down}_proj; window attention except
    │   │   │                         at fullatt_block_indexes (3B: 7, 15, 23, 31)
    │   │   └── merger                ln_q → mlp.0 → GELU → mlp.2: 2×2 patches → one LM token (the projector,
    │   │                             nested inside the tower)
    │   └── language_model           Qwen2_5_VLTextModel (embed_tokens, layers.N.self_attn.{q,k,v,o}_proj,
    │                                 mlp.{gate,up,down}_proj, norm)
    └── lm_head                       tied to embed_tokens in the 3B checkpoint (tie_word_embeddings)

**Dynamic resolution.** The image processor resizes each image to multiples of 28 px (14-px patches,
2×2 merge) within ``[min_pixels, max_pixels]`` keeping the aspect ratio (``smart_resize``: beyond
``max_pixels`` it shrinks, below ``min_pixels`` it enlarges; it never refuses an image), and returns
``image_grid_thw`` = (1, h/14, w/14) per image and ``pixel_values`` as flattened patches
``[Σ patches, 3·2·14·14]``, ordered cell by cell of the merged grid (cell row, cell column, then
the 2×2 patches inside). An image becomes ``h·w/4`` ``<|image_pad|>`` tokens between
``<|vision_start|>`` and ``<|vision_end|>``, one per merged cell in row-major order, so the grid of a
map is (h/2, w/2) of ``image_grid_thw``, per example. ``min_pixels`` / ``max_pixels`` come from the
checkpoint's processor config (the 3B checkpoint: 3,136 and 12,845,056) unless the ``min_pixels`` /
``max_pixels`` config keys override them (:meth:`Qwen25VLFamily.load_processor`); memory grows with
``max_pixels``.

**Positions.** The language model uses 3-D M-RoPE positions (time, row, column) that the model
computes itself from ``input_ids``, ``mm_token_type_ids`` and ``image_grid_thw``: medvlm never
passes ``position_ids``, and :meth:`~medvlm.models.base.ModelFamily.model_inputs` keeps both.

**Window attention.** The vision tower reorders patches window by window (``window_index``) before
its blocks and restores the order after the merger; Grad-CAM hooks the last block, whose rows are
in window order, so :meth:`Qwen25VLFamily.gradcam_order` gives the permutation back.

**Chat template** (``Qwen/Qwen2.5-VL-3B-Instruct`` ``chat_template.json``, the same as Qwen2-VL's):
``<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user\\n<|vision_start|>
<|image_pad|><|vision_end|>{question}<|im_end|>\\n<|im_start|>assistant\\n{answer}<|im_end|>\\n``.
It has no generation markers, so the answer mask comes from the prompt/answer split, as for LLaVA:
the prompt rendered with ``add_generation_prompt=True`` must be a token prefix of the conversation
(checked per example); the loss is on the answer and its ``<|im_end|>``. Qwen's own fine-tuning
script also labels the newline after ``<|im_end|>`` (QwenLM/Qwen2.5-VL, qwen-vl-finetune/qwenvl/data/
data_processor.py, ``preprocess_qwen_visual``); medvlm does not, so generation stops at ``<|im_end|>``.

**Processor without video.** transformers 5 builds ``Qwen2_5_VLProcessor``'s video processor only
with torchvision installed (huggingface/transformers issue #43986). medvlm passes no videos, so the
family uses the real processor class with its video sub-processor left out
(:class:`Qwen25VLImageTextProcessor`, a subclass that saves itself as ``Qwen2_5_VLProcessor``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from transformers import (
    BatchFeature,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from medvlm.models.base import (
    IGNORE_INDEX,
    SIGLIP_LLAMA_LORA_PRESETS,
    ImageSpan,
    ModelFamily,
    TinySizes,
    unwrap,
)
from medvlm.models.tokenizer import SPECIALS, build_tokenizer

#: ``Qwen/Qwen2.5-VL-3B-Instruct`` chat_template.json (identical in Qwen2-VL-7B-Instruct; transformers'
#: tests/models/qwen2_vl/test_processing_qwen2_vl.py carries the same text).
QWEN_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

#: Special tokens of the Qwen2.5 tokenizer the processor and the template use (the tiny tokenizer's).
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]

#: LoRA names per tower. "paper" is the seed paper's list (q, k, v, o, up, down on both towers): on this
#: vision tower, whose attention is a fused ``attn.qkv`` and ``attn.proj``, it only reaches the MLP's
#: ``up_proj``/``down_proj``. "full" covers the vision blocks, the merger's two linear layers and
#: the language model. Names are matched as dotted suffixes inside each tower (``attn.proj``, not the
#: patch embedding's ``proj`` convolution).
QWEN_LORA_PRESETS: dict[str, dict[str, Any]] = {
    "paper": SIGLIP_LLAMA_LORA_PRESETS["paper"],  # the same names on every tower
    "full": {
        "r": 12, "alpha": 32,
        "names": {"vision": ["attn.qkv", "attn.proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
                  "projector": ["mlp.0", "mlp.2"],
                  "language": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]},
    },
}


class Qwen25VLImageTextProcessor(Qwen2_5_VLProcessor):
    """``Qwen2_5_VLProcessor`` without its video sub-processor (which needs torchvision in transformers 5);
    images and text go through the real class's code. Saved as ``Qwen2_5_VLProcessor``, so a folder it
    writes loads with ``AutoProcessor`` wherever torchvision is installed."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["processor_class"] = "Qwen2_5_VLProcessor"
        return out


def unpatchify(patches: np.ndarray, grid_thw: Sequence[int], patch: int, merge: int, temporal: int) -> np.ndarray:
    """One image's flattened patches ``[t·h·w, C·temporal·patch²]`` (the Qwen2-VL image processor's
    layout: merged cell row, cell column, the merge×merge patches inside, then channel, frame, pixel
    row, pixel column) back to an ``H×W×C`` array (the first frame)."""
    t, h, w = (int(x) for x in grid_thw)
    x = np.asarray(patches).reshape(t, h // merge, w // merge, merge, merge, -1, temporal, patch, patch)
    x = x[0, ..., 0, :, :]  # [h/m, w/m, m, m, C, p, p]
    return x.transpose(0, 2, 5, 1, 3, 6, 4).reshape(h * patch, w * patch, -1)


class Qwen25VLFamily(ModelFamily):
    name = "qwen2_5_vl"
    model_class = Qwen2_5_VLForConditionalGeneration
    model_types = ("qwen2_5_vl",)
    parts = {
        "vision_tower": "model.visual",
        "projector": "model.visual.merger",
        "language_model": "model.language_model",
        "lm_head": "lm_head",
    }
    lora_presets = QWEN_LORA_PRESETS
    #: Held still as PaliGemma's tower is (see there). Tried for the demo's side yes/no question, which
    #: stage 2 answers at chance with the tower trained from the first step (0.49) and held (0.43): so
    #: that is not its cause here. Kept because nothing else got worse (stage 2 0.920 -> 0.927, finding
    #: yes/no 0.65 -> 0.78, in one run each, together with the demo's shorter vision pre-training and
    #: LoRA dropout 0)
    tiny_vision_frozen_share = 1.0
    #: its tower runs on 8x8 patches before the 2x2 merge: a step costs 1.9x LLaVA's; the demo must
    #: finish within 15 minutes (its tower's loss at 1,500 steps: 0.39, from 11)
    tiny_vision_pretrain_steps = 1500

    # -- the processor ---------------------------------------------------------------------------
    def load_processor(self, path: str, **image_settings: int):
        """The processor of a checkpoint; ``min_pixels`` / ``max_pixels`` override its processor config."""
        unknown = set(image_settings) - {"min_pixels", "max_pixels"}
        if unknown:
            raise ValueError(f"image settings {sorted(unknown)} unknown to {self.name}; expected min_pixels, max_pixels")
        processor = Qwen25VLImageTextProcessor.from_pretrained(path, **image_settings)
        size = processor.image_processor.size
        if size.shortest_edge > size.longest_edge:
            raise ValueError(f"min_pixels={size.shortest_edge} is above max_pixels={size.longest_edge}; "
                             "set min_pixels <= max_pixels")
        return processor

    # -- inputs ---------------------------------------------------------------------------------
    def _prompt_texts(self, processor, questions):
        return [processor.apply_chat_template(self._conversation(q), add_generation_prompt=True, tokenize=False)
                for q in questions]

    def processor_kwargs(self, prepared: bool) -> dict[str, Any]:
        return {"do_resize": False} if prepared else {}

    def train_batch(self, processor, images, questions, answers, *, prepared: bool = False) -> BatchFeature:
        tok = processor.tokenizer
        full = [processor.apply_chat_template(self._conversation(q, a), tokenize=False)
                for q, a in zip(questions, answers, strict=True)]
        batch = processor(images=list(images), text=full, padding="longest", padding_side="right",
                          return_tensors="pt", **self.processor_kwargs(prepared))
        labels = torch.full_like(batch["input_ids"], IGNORE_INDEX)
        image_id, end_id = processor.image_token_id, tok.eos_token_id
        expanded = [prompt.replace(processor.image_token, processor.image_token * int((ids == image_id).sum()), 1)
                    for prompt, ids in zip(self._prompt_texts(processor, questions), batch["input_ids"], strict=True)]
        for i, prompt_ids in enumerate(tok(expanded, add_special_tokens=False)["input_ids"]):
            n, ids = len(prompt_ids), batch["input_ids"][i]
            if ids[:n].tolist() != prompt_ids:
                raise ValueError("the chat template's generation prompt is not a token prefix of the full "
                                 f"conversation for example {i} ({expanded[i][-80:]!r}); the answer mask cannot "
                                 "be placed. Use a template whose assistant turn starts at a token boundary.")
            ends = (ids[n:] == end_id).nonzero().flatten()
            if ends.numel() == 0:
                raise ValueError(f"example {i}: no {tok.eos_token} after the answer {answers[i]!r}; the chat "
                                 "template must close the assistant turn with the tokenizer's eos token")
            stop = n + int(ends[0]) + 1  # the answer and its <|im_end|>, not the newline after it
            labels[i, n:stop] = ids[n:stop]
        batch["labels"] = labels
        return batch

    def generation_batch(self, processor, images, questions, *, prepared: bool = False) -> BatchFeature:
        return processor(images=list(images), text=self._prompt_texts(processor, questions), padding="longest",
                         padding_side="left", return_tensors="pt", **self.processor_kwargs(prepared))

    def prepare_images(self, processor, images: Sequence[Any]) -> list[np.ndarray]:
        """Each image resized by the processor itself (``smart_resize``, its resampling), not rescaled or
        normalised, and its patches put back into a uint8 ``H×W×3`` array: what the processor then
        patchifies without resizing again (``do_resize=False``)."""
        ip = processor.image_processor
        out = ip(list(images), do_rescale=False, do_normalize=False, return_tensors="np")
        grids = np.asarray(out["image_grid_thw"])
        starts = np.concatenate([[0], np.cumsum(grids.prod(-1))])
        return [np.clip(unpatchify(out["pixel_values"][a:b], g, ip.patch_size, ip.merge_size,
                                   ip.temporal_patch_size).round(), 0, 255).astype(np.uint8)
                for a, b, g in zip(starts[:-1], starts[1:], grids, strict=True)]

    def input_size(self, model) -> tuple[int, int] | None:
        return None  # every image keeps its own (smart-resized) size

    def image_grid(self, model) -> tuple[int, int]:
        raise ValueError("Qwen2.5-VL has no fixed image grid: each image's grid is (h/2, w/2) of its "
                         "image_grid_thw; read it with image_spans(model, inputs)")

    def _merge(self, model) -> int:
        return int(unwrap(model).config.vision_config.spatial_merge_size)

    def span_grid(self, model, inputs: Mapping[str, torch.Tensor] | None, row: int) -> tuple[int, int]:
        """(h/merge, w/merge) of ``image_grid_thw`` of the image of batch row ``row``."""
        if inputs is None or "image_grid_thw" not in inputs:
            raise ValueError("Qwen2.5-VL's image grid comes from image_grid_thw; pass the processor's inputs")
        _, h, w = (int(x) for x in inputs["image_grid_thw"][row])
        merge = self._merge(model)
        return h // merge, w // merge

    def check_pixels(self, model, inputs: Mapping[str, Any]) -> None:
        """Flattened patches ``[Σ t·h·w of image_grid_thw, 3·temporal·patch²]``."""
        px = inputs.get("pixel_values")
        if px is None:
            return
        vc = unwrap(model).config.vision_config
        width = int(vc.in_channels) * int(vc.temporal_patch_size) * int(vc.patch_size) ** 2
        grid = inputs.get("image_grid_thw")
        rows = None if grid is None else int(torch.as_tensor(grid).prod(-1).sum())
        if px.ndim != 2 or px.shape[1] != width or rows is None or px.shape[0] != rows:
            raise ValueError(f"pixel_values has shape {tuple(px.shape)}; expected [{rows}, {width}] (flattened "
                             "patches matching image_grid_thw) as the Qwen2.5-VL processor makes them (pass the "
                             "image through prepare_example)")

    def vision_tokens(self, model, inputs: Mapping[str, torch.Tensor]) -> int:
        grid = inputs.get("image_grid_thw")
        return 0 if grid is None else int(torch.as_tensor(grid)[0].prod())

    def repeat_inputs(self, inputs: Mapping[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
        """``n`` copies of a one-example batch: the image's patches concatenated ``n`` times (the
        processor flattens a batch's patches into one [P, D] tensor), the rest batch-first."""
        return {k: (v.repeat(n, *([1] * (v.dim() - 1))) if k == "pixel_values" else v.expand(n, *v.shape[1:]))
                for k, v in inputs.items()}

    def occluded_batch(self, inputs: Mapping[str, torch.Tensor], span: ImageSpan,
                       cells: Sequence[tuple[int, int]], block: int) -> dict[str, torch.Tensor]:
        """Copy i hides the merged cells ``cells[i]`` … ``+block`` (their patches: token cell k holds
        patch rows 4k … 4k+3 of ``pixel_values``) with the image's per-channel mean in the processor's
        normalised space; the copies' patches are concatenated, as the processor does for a batch."""
        px = inputs["pixel_values"]  # [P, C·T·p·p] of one image
        rows, cols = span.grid
        per_cell = px.shape[0] // (rows * cols)
        channels = 3
        fill = px.reshape(px.shape[0], channels, -1).mean(dim=(0, 2))  # [C]
        fill_row = fill[:, None].expand(channels, px.shape[1] // channels).reshape(-1)
        copies = []
        for r, c in cells:
            hidden = px.clone()
            for rr in range(r, min(r + block, rows)):
                for cc in range(c, min(c + block, cols)):
                    k = rr * cols + cc
                    hidden[k * per_cell:(k + 1) * per_cell] = fill_row
            copies.append(hidden)
        n = len(cells)
        return {k: (torch.cat(copies) if k == "pixel_values" else v.expand(n, *v.shape[1:]))
                for k, v in inputs.items()}

    # -- structure ------------------------------------------------------------------------------
    def vision_layers(self, model) -> torch.nn.ModuleList:
        return self.get_part(model, "vision_tower").blocks

    def gradcam_order(self, model, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        """Rows of the last vision block's output (window order) in the processor's patch order: the
        tower permutes merged cells by ``window_index`` (transformers.vision_utils.get_vision_window_index)
        and the merger's output is put back with its inverse; the same inverse, spread over each cell's
        merge² patches, reorders the hooked rows of the first image."""
        from transformers.vision_utils import get_vision_window_index

        vc = unwrap(model).config.vision_config
        grid = torch.as_tensor(inputs["image_grid_thw"])[:1]
        window_index, _ = get_vision_window_index(grid, spatial_merge_size=vc.spatial_merge_size,
                                                  window_size=vc.window_size, patch_size=vc.patch_size)
        unit = int(vc.spatial_merge_size) ** 2
        cells = torch.argsort(window_index)  # processor cell k sits at window position cells[k]
        return (cells[:, None] * unit + torch.arange(unit)).flatten()

    def gradcam_map(self, acts, grads, span: ImageSpan, inputs) -> torch.Tensor:
        """Grad-CAM on the merged grid: α_c = mean over the image's patches of the gradient, each cell's
        activation the mean of its merge² patches, map = ReLU(Σ_c α_c A_cell)."""
        rows, cols = span.grid
        a, g = acts.reshape(-1, acts.shape[-1]).float(), grads.reshape(-1, grads.shape[-1]).float()
        per_cell = a.shape[0] // (rows * cols)
        a, g = a[:rows * cols * per_cell], g[:rows * cols * per_cell]  # the first image's patches
        cell = a.reshape(rows * cols, per_cell, -1).mean(1)
        return torch.relu(cell @ g.mean(0)).reshape(rows, cols)

    # -- LoRA -----------------------------------------------------------------------------------
    def tower_of(self, param_name: str) -> str:
        """The merger sits inside the vision tower's module path: it is checked first."""
        for tower, part in (("projector", "projector"), ("vision", "vision_tower"),
                            ("language", "language_model"), ("lm_head", "lm_head")):
            if f"{self.parts[part]}." in param_name or param_name.startswith(self.parts[part]):
                return tower
        return "other"

    # -- the embedded default -------------------------------------------------------------------
    def image_features(self, model, processor, images: Sequence[np.ndarray]) -> tuple[torch.Tensor, tuple[int, int]]:
        """Merged image-token features ``[batch, h/2·w/2, d_model]`` (row-major, as in a sequence) of
        prepared images of one size, and their grid."""
        out = processor.image_processor(list(images), return_tensors="pt", **self.processor_kwargs(prepared=True))
        grid = out["image_grid_thw"]
        if not bool((grid == grid[:1]).all()):
            raise ValueError(f"image_features needs images of one size; got grids {grid.tolist()}")
        feats = model.get_image_features(pixel_values=out["pixel_values"], image_grid_thw=grid).pooler_output
        merge = self._merge(model)
        return torch.stack(list(feats)), (int(grid[0, 1]) // merge, int(grid[0, 2]) // merge)

    def tiny_tokenizer(self, corpus: list[str], vocab_size: int):
        """Byte-level BPE with Qwen's special tokens; ``<|im_end|>`` ends a turn (eos) and
        ``<|endoftext|>`` pads, as in the Qwen2.5 tokenizer. The default system prompt is in the corpus."""
        tok = build_tokenizer(list(corpus) + ["system\nYou are a helpful assistant.\nuser\nassistant\n"],
                              vocab_size, specials=SPECIALS + QWEN_SPECIALS, image_token="<|image_pad|>",
                              video_token="<|video_pad|>", vision_bos_token="<|vision_start|>",
                              vision_eos_token="<|vision_end|>")
        tok.eos_token, tok.pad_token = "<|im_end|>", "<|endoftext|>"
        return tok

    #: public config.json values of the real checkpoint (Qwen/Qwen2.5-VL-3B-Instruct), for depth-cut test
    #: models (:meth:`real_shape_model`); images of 448 px (min = max pixels) give 32x32 patches, 16x16 tokens
    real_shapes = {
        "qwen2.5-vl-3b-instruct": {
            "vision": dict(hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2, window_size=112, out_hidden_size=2048, tokens_per_second=2),
            "text": dict(hidden_size=2048, intermediate_size=11008, num_attention_heads=16, num_key_value_heads=2,
                         vocab_size=151936, max_position_embeddings=128000,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}),
            "pixels": 448 * 448,
        },
    }

    def real_shape_model(self, name: str, tokenizer, layers: int = 2):
        """A model with the real checkpoint ``name``'s widths, heads, vocabulary (tied embeddings), window
        attention (the last kept vision block attends fully, as blocks 7, 15, 23 and 31 do) and 14-px
        patches merged 2x2, its towers cut to ``layers`` blocks, random weights; the processor's pixel
        bounds are one 448-px image (256 tokens)."""
        shape = self.real_shapes[name]
        vision_cfg = shape["vision"]
        image_processor = Qwen2VLImageProcessorPil(min_pixels=shape["pixels"], max_pixels=shape["pixels"],
                                                   patch_size=vision_cfg["patch_size"], merge_size=2,
                                                   temporal_patch_size=2)
        processor = Qwen25VLImageTextProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                               chat_template=QWEN_CHAT_TEMPLATE)
        ids = tokenizer.convert_tokens_to_ids
        text = {**shape["text"], "num_hidden_layers": layers, "pad_token_id": tokenizer.pad_token_id,
                "eos_token_id": tokenizer.eos_token_id, "bos_token_id": tokenizer.pad_token_id}
        vision = {**vision_cfg, "depth": layers, "fullatt_block_indexes": [layers - 1]}
        config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=ids("<|image_pad|>"),
                                  video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
                                  vision_end_token_id=ids("<|vision_end|>"), tie_word_embeddings=True)
        return Qwen2_5_VLForConditionalGeneration(config), processor

    def tiny_model(self, sizes: TinySizes, tokenizer):
        """A token grid of ``image_size / patch_size`` cells a side, each cell 2×2 patches of half that
        size (the demo: 64-px phantom images, 8-px patches, 8×8 patches merged into 4×4 tokens, the other
        families' grid); ``min_pixels`` is ``image_size²`` (smaller images are enlarged to it),
        ``max_pixels`` four times that; merger windows of 4×4 cells, as the real checkpoints' 112 px.
        The real checkpoints' 14-px patches would enlarge the 64-px phantom to 112 px, three times the
        pixels. The vision tower runs before the merge, on four times the tokens of the other families'
        towers at the same grid, so it is narrower: ``vision_hidden / 2`` rounded down to a multiple of 64,
        at least 64 (bitsandbytes' 4-bit CPU kernels take input widths in blocks of 64)."""
        patch = max(1, sizes.patch_size // 2)
        image_processor = Qwen2VLImageProcessorPil(min_pixels=sizes.image_size ** 2,
                                                   max_pixels=4 * sizes.image_size ** 2, patch_size=patch,
                                                   merge_size=2, temporal_patch_size=2)
        processor = Qwen25VLImageTextProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                               chat_template=QWEN_CHAT_TEMPLATE)
        head_dim = sizes.text_hidden // sizes.text_heads
        half = head_dim // 2  # M-RoPE splits the rotary half into time, row, column (3B: 16, 24, 24 of 64)
        t = half // 4
        mrope = [t, (half - t) // 2, half - t - (half - t) // 2]
        ids = tokenizer.convert_tokens_to_ids
        text = dict(vocab_size=len(tokenizer), hidden_size=sizes.text_hidden, intermediate_size=2 * sizes.text_hidden,
                    num_hidden_layers=sizes.text_layers, num_attention_heads=sizes.text_heads,
                    num_key_value_heads=max(1, sizes.text_heads // 2), max_position_embeddings=1024,
                    rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": mrope},
                    pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                    bos_token_id=tokenizer.pad_token_id)
        width = max(64, sizes.vision_hidden // 2 // 64 * 64)
        vision = dict(depth=sizes.vision_layers, hidden_size=width, intermediate_size=2 * width,
                      num_heads=sizes.vision_heads, patch_size=patch, spatial_merge_size=2, temporal_patch_size=2,
                      window_size=4 * 2 * patch, out_hidden_size=sizes.text_hidden,
                      fullatt_block_indexes=[sizes.vision_layers - 1], tokens_per_second=2)
        config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=ids("<|image_pad|>"),
                                  video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
                                  vision_end_token_id=ids("<|vision_end|>"), tie_word_embeddings=True)
        return Qwen2_5_VLForConditionalGeneration(config), processor
