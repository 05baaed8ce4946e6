"""MedGemma and Gemma 3 (``Gemma3ForConditionalGeneration``): SigLIP → pooled, normed bare projection → Gemma 3.

HF module tree (transformers 5)::

    Gemma3ForConditionalGeneration
    ├── model                         Gemma3Model
    │   ├── vision_tower              SiglipVisionModel  (encoder.layers.N.self_attn.{q,k,v,out}_proj,
    │   │                                                 mlp.fc1/fc2, then post_layernorm)
    │   ├── multi_modal_projector     Gemma3MultiModalProjector: avg_pool (k×k) → mm_soft_emb_norm (RMS) →
    │   │                             @ mm_input_projection_weight (a bare nn.Parameter [d_vision, d_model])
    │   └── language_model           Gemma3TextModel (embed_tokens scaled by √d_model, layers.N.self_attn.{q,k,v,o}_proj
    │                                 with q_norm/k_norm, post_attention_layernorm, mlp.{gate,up,down}_proj, norm)
    └── lm_head                       tied to embed_tokens (unscaled)

Inputs. The chat template puts ``<start_of_image>`` where the image goes; ``Gemma3Processor`` expands
it to ``\\n\\n<start_of_image>`` + ``mm_tokens_per_image`` × ``<image_soft_token>`` + ``<end_of_image>\\n\\n``
and returns ``token_type_ids`` (1 on the soft tokens). The model builds its attention mask from them:
the tokens of one image attend to each other both ways (never to a later image), everything else is
causal. Without them transformers 5.25 silently falls back to a causal mask over the image (older
versions raised in training), so every batch here carries them, in training and in generation.

An image is ``mm_tokens_per_image`` tokens (256 for MedGemma-4B: 896 px / 14 = a 64×64 SigLIP patch
grid, average-pooled 4×4 to 16×16), row-major. Maps are drawn on that token grid; Grad-CAM hooks the
last SigLIP layer (the projector reads its normalised output) on the patch grid and pools its map
the same way (:meth:`MedGemmaFamily.gradcam_map`). Occlusion hides a token cell: 896 / 16 = 56 px,
the 4×4 patches the token pools.

Chat format (google/gemma-3-4b-it and google/medgemma-4b-it ship the same template; the tiny model
renders the same text)::

    <bos><start_of_turn>user\\n<start_of_image>{question}<end_of_turn>\\n<start_of_turn>model\\n{answer}<end_of_turn>\\n

The loss is on the answer and its ``<end_of_turn>`` only: labels run from after the last
``<start_of_turn>model\\n`` through the first ``<end_of_turn>`` after it. Gemma's tokenizer keeps
``<eos>`` as its end-of-sequence token, so ``<end_of_turn>`` is also a stop token of generation.

Pan-and-scan (crops of a non-square image, each another 256 tokens after the original view) follows
the processor's settings: ``do_pan_and_scan`` and ``pan_and_scan_*`` in the checkpoint's
``preprocessor_config.json`` (off in MedGemma's, where they are null), ``do_pan_and_scan`` overridden
by the config key of that name (:meth:`MedGemmaFamily.load_processor`). ``Gemma3Processor`` itself
ignores those saved values at call time (its class defaults win), so they are read here and passed
with every call. With it on, prepared images keep their size (the crops are cut from the original),
``num_crops`` is not a model input (the processor drops it), and maps are drawn on the original view.

The projector's weight is a bare parameter that LoRA cannot wrap: with ``projector`` in
``lora_towers`` it is trained fully (peft ``modules_to_save``), and the trainable-parameter log says so.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from transformers import (
    AutoProcessor,
    BatchFeature,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3ImageProcessorPil,
    Gemma3Processor,
    Gemma3TextConfig,
    SiglipVisionConfig,
)

from medvlm.models.base import IGNORE_INDEX, SIGLIP_LLAMA_LORA_PRESETS, ImageSpan, ModelFamily, TinySizes
from medvlm.models.tokenizer import build_tokenizer

START_OF_TURN, END_OF_TURN = "<start_of_turn>", "<end_of_turn>"
#: the tiny tokenizer's special tokens (Gemma 3's names): pad, eos, bos, unk first, then the turn and image markers
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", START_OF_TURN, END_OF_TURN, "<start_of_image>", "<end_of_image>",
            "<image_soft_token>"]
#: the tiny model's chat template: the same text as Gemma 3's own template for user and model turns
#: (a system turn is folded into the first user turn, as Gemma 3's template does)
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% set ns = namespace(prefix='') %}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set ns.prefix = message['content'][0]['text'] + '\\n\\n' %}"
    "{% else %}<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% if message['role'] == 'user' %}{{ ns.prefix }}{% set ns.prefix = '' %}{% endif %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<start_of_image>"
    "{% elif c['type'] == 'text' %}{{ c['text'] | trim }}{% endif %}{% endfor %}<end_of_turn>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
#: LoRA names per tower: SigLIP and a Gemma decoder as for PaliGemma; the projector has no linear
#: layer to wrap (see :meth:`MedGemmaFamily.bare_parameters`)
GEMMA3_LORA_PRESETS = {name: {**preset, "names": {**preset["names"], "projector": []}}
                       for name, preset in SIGLIP_LLAMA_LORA_PRESETS.items()}
#: the tiny model pools 2×2 vision patches into one image token (MedGemma-4B pools 4×4)
TINY_POOL = 2
SCAN_KEYS = ("pan_and_scan_min_crop_size", "pan_and_scan_max_num_crops", "pan_and_scan_min_ratio_to_activate")


class MedGemmaFamily(ModelFamily):
    name = "medgemma"
    model_class = Gemma3ForConditionalGeneration
    model_types = ("gemma3",)
    lora_presets = GEMMA3_LORA_PRESETS
    #: a tiny SigLIP step costs 1.7x LLaVA's (8x8 patches pooled to the 4x4 grid); the tower's loss is
    #: flat well before 3,000 steps (0.015 at the end), and the demo must finish within 15 minutes
    tiny_vision_pretrain_steps = 1500

    # -- the processor --------------------------------------------------------------------------
    def load_processor(self, path: str, **image_settings: int) -> Gemma3Processor:
        """The processor of a checkpoint; the ``do_pan_and_scan`` config key overrides its saved setting
        (the stage records it with the adapter, so every later loader sets it the same way)."""
        unknown = set(image_settings) - {"do_pan_and_scan"}
        if unknown:
            raise ValueError(f"{', '.join(sorted(unknown))} set, but the {self.name} family resizes every image "
                             "(and each pan-and-scan crop) to its fixed input size; of the image settings only "
                             "do_pan_and_scan applies to it. Remove them from the config")
        processor = AutoProcessor.from_pretrained(path)
        if "do_pan_and_scan" in image_settings:
            processor.image_processor.do_pan_and_scan = bool(image_settings["do_pan_and_scan"])
        return processor

    # -- inputs ---------------------------------------------------------------------------------
    @staticmethod
    def pan_and_scan(processor) -> dict[str, Any]:
        """The pan-and-scan keywords of the processor's saved settings (``do_pan_and_scan`` False when unset)."""
        ip = processor.image_processor
        if not getattr(ip, "do_pan_and_scan", None):
            return {"do_pan_and_scan": False}
        return {"do_pan_and_scan": True, **{k: getattr(ip, k) for k in SCAN_KEYS if getattr(ip, k, None) is not None}}

    def _image_kwargs(self, processor, prepared: bool) -> dict[str, Any]:
        scan = self.pan_and_scan(processor)
        return {**({} if scan["do_pan_and_scan"] else self.processor_kwargs(prepared)), **scan}

    def _batch(self, processor, images, texts: list[str], side: str, prepared: bool) -> BatchFeature:
        # the template renders <bos> itself: the tokenizer must not add another
        return processor(images=[[im] for im in images], text=texts, padding="longest", padding_side=side,
                         add_special_tokens=False, return_tensors="pt", **self._image_kwargs(processor, prepared))

    def train_batch(self, processor, images, questions, answers, *, prepared: bool = False) -> BatchFeature:
        texts = [processor.apply_chat_template(self._conversation(q, a), tokenize=False)
                 for q, a in zip(questions, answers, strict=True)]
        batch = self._batch(processor, images, texts, "right", prepared)
        batch["labels"] = self.answer_labels(processor.tokenizer, batch["input_ids"], batch["attention_mask"])
        return batch

    def answer_labels(self, tokenizer, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Labels on the model turn only: the tokens after the last ``<start_of_turn>model\\n`` through the
        first ``<end_of_turn>`` after them; IGNORE_INDEX elsewhere (image, prompt, the newline after the
        turn, padding). Raises, naming the row, when a row holds no complete model turn."""
        sot, eot = tokenizer.convert_tokens_to_ids([START_OF_TURN, END_OF_TURN])
        header = tokenizer("model\n", add_special_tokens=False)["input_ids"]
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        for i, row in enumerate(input_ids):
            starts = (row == sot).nonzero().flatten()
            start = int(starts[-1]) + 1 + len(header) if starts.numel() else -1
            ends = (row[max(start, 0):] == eot).nonzero().flatten()
            if start < 0 or row[start - len(header):start].tolist() != header or not ends.numel():
                raise ValueError(f"row {i} holds no '{START_OF_TURN}model\\n ... {END_OF_TURN}' turn: "
                                 f"{tokenizer.decode(row[attention_mask[i] == 1])[-120:]!r}; the chat template must "
                                 "render the answer as Gemma 3's does")
            end = start + int(ends[0]) + 1
            labels[i, start:end] = row[start:end]
        return labels

    def generation_batch(self, processor, images, questions, *, prepared: bool = False) -> BatchFeature:
        texts = [processor.apply_chat_template(self._conversation(q), add_generation_prompt=True, tokenize=False)
                 for q in questions]
        return self._batch(processor, images, texts, "left", prepared)

    def stop_token_ids(self, processor) -> list[int]:
        """``<eos>`` and ``<end_of_turn>``, which closes the model's turn (generation_config.json of the
        Gemma 3 instruction-tuned checkpoints lists both ids, 1 and 106)."""
        tok = processor.tokenizer
        return [tok.eos_token_id, tok.convert_tokens_to_ids(END_OF_TURN)]

    def prepare_images(self, processor, images: Sequence[Any]) -> list[np.ndarray]:
        """At the model's resolution, as the processor resizes them; with pan-and-scan on, as they come
        (RGB uint8): the crops are cut from the original, and the processor resizes every view."""
        if self.pan_and_scan(processor)["do_pan_and_scan"]:
            return [np.asarray(im.convert("RGB") if hasattr(im, "convert") else im, dtype=np.uint8) for im in images]
        return super().prepare_images(processor, images)

    def image_grid(self, model: torch.nn.Module) -> tuple[int, int]:
        """The pooled token grid: √mm_tokens_per_image on each side (16×16 for MedGemma-4B)."""
        n = int(model.config.mm_tokens_per_image)
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"mm_tokens_per_image={n} is not a square grid")
        return side, side

    def image_span(self, model: torch.nn.Module, input_ids: torch.Tensor,
                   inputs: Mapping[str, torch.Tensor] | None = None, row: int = 0) -> ImageSpan:
        """The first run of ``mm_tokens_per_image`` image tokens: the image, or with pan-and-scan its
        original view (its crops follow as further runs)."""
        image_id = self.image_token_id(model)
        pos = (input_ids == image_id).nonzero().flatten()
        if pos.numel() == 0:
            raise ValueError("the sequence holds no image tokens; pass the image through the processor")
        rows, cols = self.span_grid(model, inputs, row)
        start, end = int(pos[0]), int(pos[0]) + rows * cols
        if pos.numel() % (rows * cols) or end > input_ids.shape[-1] or not bool((input_ids[start:end] == image_id).all()):
            raise ValueError(f"found {pos.numel()} image tokens from position {start}, expected runs of a contiguous "
                             f"{rows}x{cols} grid (one per image view)")
        return ImageSpan(start, end, (rows, cols))

    def repeat_inputs(self, inputs: Mapping[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
        """As the default, but with pan-and-scan one example holds several pixel views (the original
        and its crops on dim 0): the copies repeat them whole, as the processor stacks a batch's views."""
        px = inputs.get("pixel_values")
        out = super().repeat_inputs({k: v for k, v in inputs.items() if k != "pixel_values"}, n)
        if px is not None:
            out["pixel_values"] = (px.expand(n, *px.shape[1:]) if px.shape[0] == 1
                                   else px.repeat(n, *([1] * (px.dim() - 1))))
        return out

    def occluded_batch(self, inputs: Mapping[str, torch.Tensor], span: ImageSpan,
                       cells: Sequence[tuple[int, int]], block: int) -> dict[str, torch.Tensor]:
        """Token cells of the image hidden as in :meth:`ModelFamily.occluded_batch` (a cell of the
        pooled grid is a block of ``image_size / rows`` pixels). Refused with pan-and-scan crops,
        which would still show the hidden cell."""
        if inputs["pixel_values"].shape[0] != inputs["input_ids"].shape[0]:
            raise ValueError(f"{inputs['pixel_values'].shape[0]} image views for {inputs['input_ids'].shape[0]} "
                             "sequence(s): pan-and-scan crops still show a cell hidden in the original view; set "
                             "do_pan_and_scan to false in the processor's settings to occlude")
        return super().occluded_batch(inputs, span, cells, block)

    # -- structure ------------------------------------------------------------------------------
    def logit_softcap(self, model: torch.nn.Module) -> float | None:
        """None: ``Gemma3ForConditionalGeneration.forward`` applies no final-logit soft-capping, even when
        the text config sets ``final_logit_softcapping`` (only ``Gemma3ForCausalLM`` does; transformers
        5.25, models/gemma3/modeling_gemma3.py), and the 4B checkpoints set it to null. The lens gives
        the logits the model gives."""
        return None

    def attention_residual(self, model: torch.nn.Module, layer: int, parts: torch.Tensor,
                           attn_out: torch.Tensor | None) -> torch.Tensor:
        """Gemma 3 adds ``post_attention_layernorm(attn_out)`` to the residual: x / rms(x) · (1 + w), so
        each part is scaled by that factor taken at the whole output (linear given the realised rms)."""
        if attn_out is None:
            raise ValueError("Gemma 3 normalises the whole attention output before the residual add: its per-head "
                             "shares need every head captured")
        norm = self.decoder_layers(model)[layer].post_attention_layernorm
        scale = torch.rsqrt(attn_out.float().pow(2).mean(-1, keepdim=True) + norm.eps) * (1.0 + norm.weight.float())
        return parts * scale

    def mlp_output_gain(self, model: torch.nn.Module, layer: int) -> torch.Tensor:
        """1 + w of ``post_feedforward_layernorm``: Gemma 3 normalises the MLP output before the residual add."""
        return 1.0 + self.decoder_layers(model)[layer].post_feedforward_layernorm.weight.detach().float()

    def gradcam_map(self, acts: torch.Tensor, grads: torch.Tensor, span: ImageSpan,
                    inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Grad-CAM of the first image view on its patch grid, average-pooled to the token grid as the
        projector pools the features: ReLU(avgpool_k(Σ_c α_c A_c)), α_c the mean gradient over patches."""
        a, g = acts[0].float(), grads[0].float()  # [patches, C]
        side = math.isqrt(a.shape[0])
        rows, cols = span.grid
        if side * side != a.shape[0] or side % rows or rows != cols:
            raise ValueError(f"{a.shape[0]} vision patches do not pool onto the {rows}x{cols} token grid")
        cam = (a @ g.mean(0)).reshape(1, 1, side, side)
        return torch.relu(torch.nn.functional.avg_pool2d(cam, side // rows)[0, 0])

    # -- LoRA -----------------------------------------------------------------------------------
    def bare_parameters(self) -> dict[str, tuple[str, str]]:
        return {self.parts["projector"]: ("projector", "mm_input_projection_weight is a bare nn.Parameter used in a "
                                                       "matmul, not an nn.Linear, so LoRA cannot wrap it")}

    # -- the embedded default -------------------------------------------------------------------
    def image_features(self, model: torch.nn.Module, processor, images: Sequence[np.ndarray]
                       ) -> tuple[torch.Tensor, tuple[int, int]]:
        """Projected image tokens of one view per image (pan-and-scan crops left out)."""
        kwargs = {**self._image_kwargs(processor, prepared=True), "do_pan_and_scan": False}
        pixels = processor.image_processor(list(images), return_tensors="pt", **kwargs)["pixel_values"]
        return model.get_image_features(pixel_values=pixels).pooler_output, self.image_grid(model)

    def tiny_tokenizer(self, corpus: list[str], vocab_size: int):
        """Byte-level BPE with Gemma 3's special tokens; the turn words ``user`` and ``model`` in its corpus."""
        return build_tokenizer(corpus + ["user model"], vocab_size, SPECIALS, boi_token="<start_of_image>",
                               eoi_token="<end_of_image>", image_token="<image_soft_token>")

    #: public config.json values of the real checkpoint (google/medgemma-4b-it = Gemma 3 4B), for depth-cut
    #: test models (:meth:`real_shape_model`): 896-px images, 64x64 SigLIP patches pooled 4x4 to 256 tokens
    real_shapes = {
        "medgemma-4b-it": {
            "vision": dict(hidden_size=1152, intermediate_size=4304, num_attention_heads=16, image_size=896,
                           patch_size=14, vision_use_head=False),
            "text": dict(hidden_size=2560, intermediate_size=10240, num_attention_heads=8, num_key_value_heads=4,
                         head_dim=256, query_pre_attn_scalar=256, vocab_size=262208, sliding_window=1024,
                         max_position_embeddings=131072),
            "mm_tokens_per_image": 256,
        },
    }

    def real_shape_model(self, name: str, tokenizer, layers: int = 2):
        """A model with the real checkpoint ``name``'s widths, heads, vocabulary, 896-px images and 4x4
        pooling to 256 tokens, its towers cut to ``layers`` layers (the last decoder layer global, the
        others sliding-window, as every sixth layer of the 4B is), random weights."""
        shape = self.real_shapes[name]
        vision = SiglipVisionConfig(**{**shape["vision"], "num_hidden_layers": layers})
        size = {"height": vision.image_size, "width": vision.image_size}
        image_processor = Gemma3ImageProcessorPil(size=size, image_mean=[0.5] * 3, image_std=[0.5] * 3)
        processor = Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer,
                                    chat_template=GEMMA3_CHAT_TEMPLATE, image_seq_length=shape["mm_tokens_per_image"])
        text = Gemma3TextConfig(**shape["text"], num_hidden_layers=layers,
                                layer_types=["sliding_attention"] * (layers - 1) + ["full_attention"],
                                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                bos_token_id=tokenizer.bos_token_id)
        config = Gemma3Config(vision_config=vision, text_config=text, mm_tokens_per_image=shape["mm_tokens_per_image"],
                              boi_token_index=tokenizer.boi_token_id, eoi_token_index=tokenizer.eoi_token_id,
                              image_token_index=tokenizer.image_token_id)
        model = Gemma3ForConditionalGeneration(config)
        with torch.no_grad():  # as the tiny model: a random projection passes the image on
            model.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, config.initializer_range)
        return model, processor

    def tiny_model(self, sizes: TinySizes, tokenizer):
        """``sizes.patch_size`` is the pixel side of one image token, as for the other families (token grid
        ``image_size / patch_size``: 4×4 in the demo); the SigLIP patches are half that and pooled 2×2 into
        a token (MedGemma-4B pools 4×4). Grouped-query attention with half as many KV heads (4B: 8 / 4);
        the last decoder layer global, the others sliding-window (4B: 5 local : 1 global)."""
        if sizes.patch_size % TINY_POOL or sizes.image_size % sizes.patch_size:
            raise ValueError(f"patch_size {sizes.patch_size} must be even and divide image_size {sizes.image_size}")
        grid = sizes.image_size // sizes.patch_size
        image_processor = Gemma3ImageProcessorPil(size={"height": sizes.image_size, "width": sizes.image_size},
                                                  image_mean=[0.5] * 3, image_std=[0.5] * 3)
        processor = Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer,
                                    chat_template=GEMMA3_CHAT_TEMPLATE, image_seq_length=grid * grid)
        vision = SiglipVisionConfig(hidden_size=sizes.vision_hidden, intermediate_size=2 * sizes.vision_hidden,
                                    num_hidden_layers=sizes.vision_layers, num_attention_heads=sizes.vision_heads,
                                    image_size=sizes.image_size, patch_size=sizes.patch_size // TINY_POOL,
                                    vision_use_head=False)
        head_dim = sizes.text_hidden // sizes.text_heads
        text = Gemma3TextConfig(hidden_size=sizes.text_hidden, intermediate_size=2 * sizes.text_hidden,
                                num_hidden_layers=sizes.text_layers, num_attention_heads=sizes.text_heads,
                                num_key_value_heads=max(1, sizes.text_heads // 2), head_dim=head_dim,
                                query_pre_attn_scalar=head_dim, vocab_size=len(tokenizer),
                                max_position_embeddings=512, sliding_window=512,
                                layer_types=["sliding_attention"] * (sizes.text_layers - 1) + ["full_attention"],
                                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                bos_token_id=tokenizer.bos_token_id)
        config = Gemma3Config(vision_config=vision, text_config=text, mm_tokens_per_image=grid * grid,
                              boi_token_index=tokenizer.boi_token_id, eoi_token_index=tokenizer.eoi_token_id,
                              image_token_index=tokenizer.image_token_id)
        model = Gemma3ForConditionalGeneration(config)
        # transformers starts the projection at zero (a fresh model ignores the image until trained); the
        # tiny model draws it like any other weight, so that a random model already passes the image on
        with torch.no_grad():
            model.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, config.initializer_range)
        return model, processor
